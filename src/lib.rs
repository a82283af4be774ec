//! # mailgate
//!
//! An IMAP/SMTP authentication proxy: it terminates TLS in front of existing mail
//! servers, authenticates mail clients itself (per-device app passwords; accounts with
//! TOTP never accept their account password over IMAP/SMTP), then logs in upstream as
//! the user with master credentials and relays the session byte for byte.
//!
//! ```text
//!  mail client ──TLS──▶ net (listener → front → driver + login gate) ──▶ upstream (as the user)
//!                             │            ▲
//!                  proto (sans-IO)    auth (app passwords, argon2id) ──▶ store (sled or PostgreSQL)
//!  admin CLI ──admin socket──▶ admin ──▶ accounts ◀── web ─────────────────▶ store
//! ```
//!
//! # Layout
//! * `secret`: secret newtypes (redacted, zeroized, constant-time compared). Leaf.
//! * `addr`: the client address key every per-address limit counts by. Leaf.
//! * `config`: the TOML configuration, validated before any port opens.
//! * `proto`: sans-IO protocol state machines (IMAP and SMTP fronts and upstream logins,
//!   SASL, PROXY headers, the `From:` reading). No I/O.
//! * `auth`: credential checks, app passwords, password hashing, TOTP secrets.
//! * `store`: the `Store` trait and its two implementations, sled (embedded; the only
//!   module using sled) and PostgreSQL (shared by several nodes).
//! * `tls`: rustls configurations.
//! * `cms`: CMS SignedData (PKCS#7) with the TLS key: signed Apple configuration profiles.
//! * `acme`: the certificate from an ACME CA (`[tls] acme`), ordered and renewed.
//! * `net`: listeners, the one connection driver, the one login gate, the IMAP and SMTP
//!   fronts, upstream connections, the relay.
//! * `live`: the live mail sessions (`LiveSessions`), so a revocation ends them at once.
//! * `metrics`: the Prometheus counters (fixed labels only) and the `/metrics` listener.
//! * `accounts`: the account service; every change to an account (CLI, web, import) goes through it.
//! * `notify`: security notifications mailed to the account (queued in the store, sent
//!   by a task of `app`).
//! * `web`: the web step (sign-in with TOTP, enrolment, backup codes, app passwords).
//! * `admin`: what the CLI does, and the admin socket; `import`: Dovecot passwd-files.
//! * `fsutil`: private files and directories (0600 / 0700).
//! * `systemd`: service notifications to systemd (ready, reloading, stopping, watchdog).
//! * `app`: wiring.
//! * `check`: `mailgate check`, the self-check (certificate, store, upstream logins as
//!   `serve` does them, the web step), one finding per check with what to change.

pub mod accounts;
pub mod acme;
pub mod addr;
pub mod admin;
pub mod app;
pub mod auth;
pub mod check;
pub mod cms;
pub mod config;
pub mod fsutil;
pub mod import;
pub mod live;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod proto;
pub mod secret;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod web;
