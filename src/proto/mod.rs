//! Sans-IO protocol code: bytes in, events and bytes out.
//!
//! Nothing here awaits, reads a clock, opens a socket or touches the store; the one
//! driver in `net` does the I/O. Depends on `secret` and protocol crates only
//! (a CI check keeps tokio, rustls and sled out of this folder).

pub mod foreign;
pub mod from_header;
pub mod imap;
pub mod proxy;
pub mod sasl;
pub mod smtp;
pub mod smtp_upstream;
pub mod upstream;

/// Proptest case count for the fuzz-style property tests: `default` in a normal
/// `cargo test`, or `MAILGATE_FUZZ_CASES` for a long run (docs/security.md, "Fuzzing").
#[cfg(test)]
pub(crate) fn fuzz_cases(default: u32) -> u32 {
    std::env::var("MAILGATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A session as arbitrary reads: up to 24 chunks drawn from `bytes` (fuzz targets).
#[cfg(test)]
pub(crate) fn chunked(
    bytes: impl proptest::strategy::Strategy<Value = Vec<u8>>,
) -> impl proptest::strategy::Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(bytes, 0..24)
}

/// The committed fuzz corpus for `kind` (`fuzz/corpus/<kind>/*`), each input cut into
/// reads in several ways: whole, byte by byte, and at every 7th byte.
#[cfg(test)]
pub(crate) fn corpus_cuts(kind: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(kind);
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let name = path.display().to_string();
        out.push((format!("{name} whole"), vec![bytes.clone()]));
        out.push((format!("{name} bytewise"), bytes.iter().map(|b| vec![*b]).collect()));
        out.push((format!("{name} by 7"), bytes.chunks(7).map(<[u8]>::to_vec).collect()));
    }
    out
}
