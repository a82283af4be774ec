//! Integration tests: the real `mailgate` binary over loopback with real TLS, and
//! interop tests against a real Dovecot started by the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod acme;
mod admin_cli;
mod cert_reload;
mod check;
mod concurrency;
mod crash;
mod deb;
mod devices;
mod fail2ban;
mod faults;
mod imap_front;
mod import;
mod interop;
mod load;
mod metrics;
mod narrow;
mod notify;
mod oauth;
mod pg_harness;
mod pg_store;
mod pop3;
mod sd_notify;
mod sieve;
mod smtp;
mod support;
mod try_it;
mod upstream_mode;
mod web;
