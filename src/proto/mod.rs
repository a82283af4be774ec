//! Sans-IO protocol code: bytes in, events and bytes out.
//!
//! Nothing here awaits, reads a clock, opens a socket or touches the store; the one
//! driver in `net` does the I/O. Depends on `secret` and protocol crates only
//! (a CI check keeps tokio, rustls and sled out of this folder).

pub mod imap;
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
