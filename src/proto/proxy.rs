//! PROXY protocol v1/v2 headers (haproxy's spec) from a trusted load balancer, sans-IO.
//!
//! The header is read byte-exact — [`need`] says how many more bytes to read — so that the
//! first bytes of the client's own stream (a TLS ClientHello right behind the header) are
//! never consumed here. Parsing is `proxy-header`'s.

use proxy_header::{ParseConfig, ProxyHeader};
use std::net::SocketAddr;

/// v2: 12-byte signature, version/command, family, 2-byte length.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1: "PROXY " … CRLF, at most 107 bytes (haproxy's spec).
const V1_MAX: usize = 107;
/// v2: the fixed part and at most this many bytes of addresses and TLVs.
const V2_MAX_BODY: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// The connection did not start with a PROXY header.
    Missing,
    /// Malformed, or longer than allowed.
    Invalid(String),
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Missing => f.write_str("no PROXY protocol header"),
            ProxyError::Invalid(why) => write!(f, "bad PROXY protocol header: {why}"),
        }
    }
}

/// How many more bytes to read before the header in `buf` is complete (0: complete).
/// Never asks for a byte beyond the header.
pub fn need(buf: &[u8]) -> Result<usize, ProxyError> {
    const V1: &[u8] = b"PROXY ";
    if buf.len() < 6 {
        let n = buf.len();
        if !(V1.starts_with(buf) || V2_SIG.starts_with(buf)) {
            return Err(ProxyError::Missing);
        }
        return Ok(6 - n);
    }
    if buf.starts_with(V1) {
        if buf.ends_with(b"\r\n") {
            return Ok(0);
        }
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Invalid("v1 line longer than 107 bytes".into()));
        }
        return Ok(1);
    }
    if !V2_SIG.starts_with(&buf[..buf.len().min(12)]) {
        return Err(ProxyError::Missing);
    }
    if buf.len() < 16 {
        return Ok(16 - buf.len());
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if body > V2_MAX_BODY {
        return Err(ProxyError::Invalid(format!("v2 header of {body} bytes")));
    }
    Ok(16 + body - buf.len().min(16 + body))
}

/// The client's address from a complete header; `None` for a LOCAL header (the load
/// balancer's own health check) or v1 `UNKNOWN`.
pub fn client(buf: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let cfg = ParseConfig { include_tlvs: false, allow_v1: true, allow_v2: true };
    match ProxyHeader::parse(buf, cfg) {
        Ok((h, used)) if used == buf.len() => Ok(h.proxied_address().map(|a| a.source)),
        Ok(_) => Err(ProxyError::Invalid("trailing bytes".into())),
        Err(e) => Err(ProxyError::Invalid(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proxy_header::ProxiedAddress;

    /// Feeds `stream` the way the driver does: exactly the bytes asked for.
    fn read(stream: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, usize) {
        let mut buf = Vec::new();
        loop {
            match need(&buf) {
                Ok(0) => return (client(&buf), buf.len()),
                Ok(n) => {
                    if buf.len() + n > stream.len() {
                        return (Err(ProxyError::Invalid("eof".into())), buf.len());
                    }
                    buf.extend_from_slice(&stream[buf.len()..buf.len() + n]);
                }
                Err(e) => return (Err(e), buf.len()),
            }
        }
    }

    fn v2(source: &str, dest: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ProxyHeader::with_address(ProxiedAddress::stream(source.parse().unwrap(), dest.parse().unwrap()))
            .encode_v2(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn v1_and_v2_give_the_client_and_stop_at_the_header() {
        let hello = b"\x16\x03\x01\x02\x00 rest of a ClientHello";
        for (header, want) in [
            (b"PROXY TCP4 198.51.100.7 192.0.2.1 51234 993\r\n".to_vec(), Some("198.51.100.7:51234")),
            (b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 993\r\n".to_vec(), Some("[2001:db8::7]:51234")),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (v2("198.51.100.7:51234", "192.0.2.1:993"), Some("198.51.100.7:51234")),
            (v2("[2001:db8::7]:4000", "[2001:db8::1]:993"), Some("[2001:db8::7]:4000")),
        ] {
            let mut stream = header.clone();
            stream.extend_from_slice(hello);
            let (got, used) = read(&stream);
            assert_eq!(used, header.len(), "read past the header");
            assert_eq!(got, Ok(want.map(|w| w.parse().unwrap())));
        }
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        assert_eq!(read(&local).0, Ok(None));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"a1 LOGIN alice pw\r\n"[..],
            b"\x16\x03\x01\x02\x00",
            b"EHLO x\r\n",
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY TCP4 not an address at all 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
        ] {
            assert!(read(bad).0.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 200]].concat();
        let (r, used) = read(&long);
        assert!(r.is_err() && used <= V1_MAX);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: crate::proto::fuzz_cases(2048), .. ProptestConfig::default() })]
        /// Arbitrary bytes: never a panic, never more than the bound read.
        #[test]
        fn prop_header_reader_is_bounded(bytes in prop::collection::vec(any::<u8>(), 0..1200), sig in any::<bool>()) {
            let stream = if sig { [&V2_SIG[..], &bytes].concat() } else { bytes };
            let (_, used) = read(&stream);
            prop_assert!(used <= 16 + V2_MAX_BODY);
        }
    }
}
