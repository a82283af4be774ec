//! All mail-side I/O: listeners, the one driver that runs every protocol machine, the
//! login gate, the protocol fronts (IMAP, SMTP, POP3), the upstream connections and the
//! relay. Depends on proto, auth, tls, config, sessions.

pub mod driver;
pub mod front;
pub mod gate;
pub mod http;
pub mod imap;
pub mod listener;
#[cfg(test)]
mod oauth_tests;
pub mod pop3;
pub mod relay;
pub mod sieve;
pub mod smtp;
pub mod stream;
#[cfg(test)]
pub(crate) mod testkit;
pub mod upstream;
