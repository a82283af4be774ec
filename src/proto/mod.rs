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
