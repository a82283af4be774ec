//! Test support: private servers on loopback (Dovecot IMAP and submission, Postfix,
//! PostgreSQL, HAProxy, an SMTP sink; what they share is in `daemon`), the real mailgate
//! binary, throwaway certificates and a byte-exact IMAP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod client;
pub mod daemon;
pub mod dovecot;
pub mod haproxy;
pub mod mailgate;
pub mod pki;
pub mod postfix;
pub mod postgres;
pub mod sink;
pub mod submission;
pub mod thunderbird;
