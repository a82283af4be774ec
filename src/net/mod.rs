//! All mail-side I/O: listeners, the client stream (plain → TLS), the IMAP session
//! driver, the upstream connection and the relay. Depends on proto, auth, tls, config.

pub mod imap;
pub mod listener;
pub mod relay;
pub mod smtp;
pub mod stream;
pub mod upstream;
