//! Requests of another protocol on a mail port (ALPACA-style cross-protocol attacks).
//!
//! A web page can make a browser send an HTTP request to a mail port (a form POST whose
//! body holds mail commands), and a confused client can speak TLS to a plaintext port.
//! When the first line of a connection (or the first after STARTTLS) is such a request,
//! the mail machines close the connection at once and echo nothing of it: no tag, no
//! word of the request comes back, so nothing the attacker chose is reflected into a
//! page. Checked on the first line only: later lines are the protocol's own business.

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstLine {
    /// Not decided until more bytes arrive (a line that starts like an HTTP request line).
    NeedMore,
    /// A request of another protocol: close without a word.
    Foreign,
    /// Not known to be foreign: handle as the protocol's own.
    Own,
}

/// Request methods of HTTP (RFC 9110, WebDAV's common ones) and HTTP/2's preface.
const METHODS: &[&[u8]] =
    &[b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"CONNECT", b"PATCH", b"TRACE", b"PRI", b"PROPFIND"];

/// How long a first line that starts like a request line may grow while undecided (the
/// longest IMAP command line before login; SMTP's is shorter).
pub const MAX_UNDECIDED: usize = 8192;

/// Looks at the start of what the client sent first.
pub fn first_line(buf: &[u8]) -> FirstLine {
    let Some(&first) = buf.first() else { return FirstLine::NeedMore };
    // A TLS handshake record (a ClientHello on a plaintext port): no mail command starts
    // with a control character.
    if first == 0x16 {
        return FirstLine::Foreign;
    }
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = match line_end {
        Some(n) => buf[..n].strip_suffix(b"\r").unwrap_or(&buf[..n]),
        None => buf,
    };
    let word_end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let word = &line[..word_end];
    let method = METHODS.iter().any(|m| m.eq_ignore_ascii_case(word));
    let proxy = word.eq_ignore_ascii_case(b"PROXY");
    if line_end.is_none() {
        // Still arriving: wait while it can still become a request line.
        let could_be = word_end == line.len() && METHODS.iter().chain(&[&b"PROXY"[..]]).any(|m| starts_like(m, word));
        return match (method || proxy || could_be, buf.len() > MAX_UNDECIDED) {
            (false, _) => FirstLine::Own,
            (true, false) => FirstLine::NeedMore,
            // No mail command line is this long: not a mail client.
            (true, true) => FirstLine::Foreign,
        };
    }
    if proxy {
        // A PROXY protocol header where none is configured (the listener reads it when
        // it is): a load balancer set up wrong, or a forged client address.
        return FirstLine::Foreign;
    }
    let http_version =
        line.rsplit(|b| *b == b' ').next().is_some_and(|v| v.len() >= 6 && v[..5].eq_ignore_ascii_case(b"HTTP/"));
    if method && http_version { FirstLine::Foreign } else { FirstLine::Own }
}

/// What a mail machine does with what it has read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Handle it as a command of the protocol.
    Go,
    /// Read more first.
    Wait,
    /// Close without a word.
    Close,
}

/// The check a mail machine makes before each command: on the first line only (until
/// `*checked` is set), whether it is another protocol's request.
pub fn gate(checked: &mut bool, buf: &[u8]) -> Gate {
    if *checked {
        return Gate::Go;
    }
    match first_line(buf) {
        FirstLine::NeedMore => Gate::Wait,
        FirstLine::Foreign => Gate::Close,
        FirstLine::Own => {
            *checked = true;
            Gate::Go
        }
    }
}

/// Whether `word` is a (case-insensitive) prefix of `name`.
fn starts_like(name: &[u8], word: &[u8]) -> bool {
    word.len() <= name.len() && name[..word.len()].eq_ignore_ascii_case(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_other_protocols_are_told_apart() {
        for foreign in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /form HTTP/1.1\r\n",
            b"post / http/1.0\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"\x16\x03\x01\x02\x00\x01",
        ] {
            assert_eq!(first_line(foreign), FirstLine::Foreign, "{}", String::from_utf8_lossy(foreign));
        }
        for own in [
            &b"a LOGIN alice pw\r\n"[..],
            b"EHLO client.example\r\n",
            b"GET LOGIN alice pw\r\n", // an IMAP tag that happens to be GET
            b"POST NOOP\r\n",
            b"a CAPABILITY",
            b"QUIT\r\n",
            "é NOOP\r\n".as_bytes(),
        ] {
            assert_eq!(first_line(own), FirstLine::Own, "{}", String::from_utf8_lossy(own));
        }
        for partial in [&b""[..], b"G", b"GE", b"GET", b"GET / HTTP/1.1", b"PROX", b"po"] {
            assert_eq!(first_line(partial), FirstLine::NeedMore, "{}", String::from_utf8_lossy(partial));
        }
        // Undecided input is bounded: a request line that never ends is closed.
        let mut endless = b"GET /".to_vec();
        endless.resize(MAX_UNDECIDED + 1, b'a');
        assert_eq!(first_line(&endless), FirstLine::Foreign);
    }
}
