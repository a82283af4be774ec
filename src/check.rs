//! `mailgate check`: is this configuration able to serve? One [`Finding`] per check,
//! each saying what it found and, when something is wrong, what to change: the
//! configuration key (`upstream.imap.ca_file`) or the Dovecot/Postfix setting
//! (`login_trusted_networks`, `smtpd_authorized_xclient_hosts`).
//!
//! The checks use the code `serve` uses, so a pass means serving works: the certificate
//! is read by [`crate::tls::CertStore`], every upstream is reached through
//! [`Connector`] with the configured TLS, the logins as a user are the fronts' own
//! ([`UserLogin::login`] for IMAP, POP3 and ManageSieve, [`crate::net::smtp::log_in`]),
//! and the store is opened by [`crate::app::open_store`] (or, while `serve` holds it,
//! asked over the admin socket). Nothing secret is ever put in a finding: errors carry
//! no password, and upstream's own words are its login replies.
//!
//! Depends on config, tls, net (upstream logins), store (through app) and admin (the
//! socket); nothing depends on it but `main.rs`.

use crate::config::{Config, StoreBackend, Upstream, UpstreamLogin as LoginMode, UpstreamTls};
use crate::net::driver::{Conn, DriveError, Tls};
use crate::net::gate::Origin;
use crate::net::stream::MaybeTls;
use crate::net::upstream::{Connector, ImapUpstream, Pop3Upstream, SieveUpstream, UpstreamFailure, UserLogin};
use crate::secret::SecretString;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A certificate with fewer days than this left is a warning: renewal (ACME renews at 30
/// days left) has failed for two weeks.
pub const EXPIRY_WARN_DAYS: i64 = 14;

/// The client address the user-login checks pass upstream (TEST-NET-1, RFC 5737; the
/// first dynamic port, as Dovecot refuses port 0 in XCLIENT), so
/// their lines in Dovecot's and Postfix's logs are easy to find (`rip=192.0.2.1`).
pub const CHECK_CLIENT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 49152);

/// How long the web requests may take.
const WEB_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a web answer read.
const WEB_MAX_ANSWER: usize = 1024 * 1024;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works.
    Ok,
    /// Works, but needs attention soon (a certificate near its end, a name missing).
    Warn,
    /// Does not work: `serve` would fail here. The exit status is 1.
    Fail,
    /// Not run, and why (`--user` not given, a part that is off).
    Skipped,
}

impl Status {
    /// The word at the start of the human-readable line.
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was checked, in words ("upstream IMAP login as alice@example.com").
    pub check: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to change, naming the key or setting; only when not OK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: impl Into<String>, status: Status, detail: impl Into<String>) -> Finding {
        Finding { check: check.into(), status, detail: detail.into(), fix: None }
    }

    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(check, Status::Ok, detail)
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { fix: Some(fix.into()), ..Finding::new(check, Status::Fail, detail) }
    }

    fn warn(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { fix: Some(fix.into()), ..Finding::new(check, Status::Warn, detail) }
    }

    fn skipped(check: impl Into<String>, detail: impl Into<String>) -> Finding {
        Finding::new(check, Status::Skipped, detail)
    }
}

/// Whether any check failed (the exit status is then 1).
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.status == Status::Fail)
}

/// The human-readable report: one line per check (`ok`, `WARN`, `FAIL`, `skip`), the
/// change to make on the next line, then a summary line.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!("{:<5} {}: {}\n", f.status.word(), f.check, f.detail));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("      change: {fix}\n"));
        }
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    let (fails, warns) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&match (fails, warns) {
        (0, 0) => "mailgate check: everything checked works\n".to_string(),
        (0, w) => format!("mailgate check: works, {w} warning(s)\n"),
        (f, w) => format!("mailgate check: {f} check(s) failed, {w} warning(s)\n"),
    });
    out
}

/// The JSON report: `{"ok": bool, "checks": [Finding…]}`.
pub fn to_json(findings: &[Finding]) -> serde_json::Value {
    serde_json::json!({ "ok": !failed(findings), "checks": findings })
}

// ---------------------------------------------------------------------------------------
// The server's own certificate
// ---------------------------------------------------------------------------------------

/// The `[tls]` pair: it loads and the key is the certificate's (as `serve` loads it), the
/// chain is in order, the validity covers `now` (a warning under [`EXPIRY_WARN_DAYS`]),
/// and its names cover `server.hostname` (a warning: mail apps are set up with some name)
/// and the host of `server.public_url` (a failure: browsers refuse the web step).
pub fn own_certificate(config: &Config, now: SystemTime) -> Vec<Finding> {
    let check = "own certificate";
    let cert_key = format!("`tls.cert` ({}) / `tls.key` ({})", config.tls_cert.display(), config.tls_key.display());
    if config.acme.is_some() && !config.tls_cert.exists() && !config.tls_key.exists() {
        // `serve` makes a placeholder and orders the certificate; nothing is wrong yet.
        return vec![Finding::warn(
            check,
            format!("`tls.acme`: no certificate issued yet ({} does not exist)", config.tls_cert.display()),
            "start `mailgate serve`: it orders the certificate (see the log line `ACME certificate issued`)",
        )];
    }
    let store = match crate::tls::CertStore::load(&config.tls_cert, &config.tls_key) {
        Ok(s) => s,
        Err(e) => {
            return vec![Finding::fail(
                check,
                format!("cannot be used: {e}"),
                format!("{cert_key}: a PEM chain (leaf first) and its private key"),
            )];
        }
    };
    let chain = match crate::tls::load_certs(&config.tls_cert) {
        Ok(c) => c,
        Err(e) => return vec![Finding::fail(check, format!("cannot be read: {e}"), cert_key)],
    };
    let mut out = Vec::new();
    let parsed: Vec<Option<x509_cert::Certificate>> = chain.iter().map(|c| parse(c)).collect();
    let Some(Some(leaf)) = parsed.first() else {
        return vec![Finding::fail(check, "the first certificate does not parse", cert_key)];
    };
    let info = store.info();
    let names = if info.names.is_empty() { "(none)".to_string() } else { info.names.join(", ") };
    // The chain: each certificate issued by the next one.
    let in_order = parsed
        .windows(2)
        .all(|w| matches!(w, [Some(a), Some(b)] if a.tbs_certificate.issuer == b.tbs_certificate.subject));
    let self_signed = leaf.tbs_certificate.issuer == leaf.tbs_certificate.subject;
    let described = format!("{} ({} in the chain), names {names}", info.subject, chain.len());
    if !in_order {
        out.push(Finding::fail(
            "own certificate chain",
            format!("{described}: the certificates are not in order (each must be issued by the next)"),
            format!("`tls.cert` ({}): the leaf first, then its intermediates", config.tls_cert.display()),
        ));
    } else if self_signed && config.acme.is_some() {
        out.push(Finding::warn(
            "own certificate chain",
            format!("{described}: the self-signed placeholder; the ACME order has not completed yet"),
            "`tls.acme`: see mailgate's log (`ACME order failed, …` says why); port 443 of every name must reach \
             an implicit-TLS listener of mailgate",
        ));
    } else if self_signed {
        out.push(Finding::warn(
            "own certificate chain",
            format!("{described}: self-signed; every mail app and browser asks for an exception"),
            "`tls.cert` / `tls.key`: a certificate from a CA the devices trust (e.g. Let's Encrypt)",
        ));
    } else {
        out.push(Finding::ok("own certificate chain", format!("{described}; the key matches")));
    }
    out.push(validity(leaf, now, &config.tls_cert));
    let leaf_der = &chain[0];
    let covers = |name: &str| -> bool {
        let (Ok(name), Ok(cert)) = (ServerName::try_from(name), webpki::EndEntityCert::try_from(leaf_der)) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    };
    if covers(&config.hostname) {
        out.push(Finding::ok("certificate name for server.hostname", format!("covers {}", config.hostname)));
    } else {
        out.push(Finding::warn(
            "certificate name for server.hostname",
            format!(
                "{} is not among the certificate's names ({names}); mail apps set up with it refuse the certificate",
                config.hostname
            ),
            format!(
                "add {} to the certificate (`tls.cert`), or set `server.hostname` to one of its names",
                config.hostname
            ),
        ));
    }
    match url_host_port(&config.public_url) {
        Some((host, _)) if covers(&host) => {
            out.push(Finding::ok("certificate name for the web URL", format!("covers {host} ({})", config.public_url)))
        }
        Some((host, _)) => out.push(Finding::fail(
            "certificate name for the web URL",
            format!(
                "{host} (from {}) is not among the certificate's names ({names}); browsers refuse the web step",
                config.public_url
            ),
            format!("add {host} to the certificate (`tls.cert`), or set `server.public_url` to a name it has"),
        )),
        None => out.push(Finding::fail(
            "certificate name for the web URL",
            format!("{} has no host", config.public_url),
            "`server.public_url`: https://HOST[:PORT]",
        )),
    }
    out
}

fn parse(der: &CertificateDer<'_>) -> Option<x509_cert::Certificate> {
    use x509_cert::der::Decode as _;
    x509_cert::Certificate::from_der(der).ok()
}

/// Not before / not after against `now`.
fn validity(leaf: &x509_cert::Certificate, now: SystemTime, path: &std::path::Path) -> Finding {
    let check = "own certificate validity";
    let v = &leaf.tbs_certificate.validity;
    let (start, end) = (v.not_before.to_system_time(), v.not_after.to_system_time());
    let renew = format!(
        "renew the certificate in `tls.cert` ({}) and `tls.key`; serve takes the new pair on SIGHUP or within `tls.reload_check_secs`",
        path.display()
    );
    let end_text = v.not_after.to_date_time().to_string();
    if now < start {
        return Finding::fail(
            check,
            format!("not valid before {}", v.not_before.to_date_time()),
            "check the system clock, or use a certificate valid now (`tls.cert`)",
        );
    }
    match end.duration_since(now) {
        Err(_) => Finding::fail(check, format!("expired on {end_text}"), renew),
        Ok(left) => {
            let days = (left.as_secs() / 86_400) as i64;
            if days < EXPIRY_WARN_DAYS {
                Finding::warn(check, format!("expires on {end_text}, in {days} day(s)"), renew)
            } else {
                Finding::ok(check, format!("valid until {end_text} ({days} days left)"))
            }
        }
    }
}

/// The host (without brackets for IPv6) and port of an http(s) URL.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    let (default_port, rest) =
        if let Some(r) = url.strip_prefix("https://") { (443, r) } else { (80, url.strip_prefix("http://")?) };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    (!host.is_empty()).then(|| (host.to_ascii_lowercase(), port))
}

// ---------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------

/// The store answers and its schema is this version's. While `serve` runs it holds the
/// embedded store, so then the running server is asked (over the admin socket); otherwise
/// the store is opened as `serve` opens it (which checks the schema version). Blocking:
/// call it outside the async runtime (the PostgreSQL store runs its own).
pub fn store(config: &Config) -> Finding {
    let check = "store";
    let socket = config.admin_socket_path();
    match crate::admin::socket::request(&socket, &crate::admin::Request::Ping) {
        Ok(Some(_)) => {
            return Finding::ok(
                check,
                format!(
                    "in use by the running mailgate, which answered on {} (it checked the schema when it opened the store)",
                    socket.display()
                ),
            );
        }
        Ok(None) => {}
        Err(e) => {
            return Finding::fail(
                check,
                e.to_string(),
                format!(
                    "run check as the user that runs `mailgate serve`, with the same `server.data_dir` ({})",
                    config.data_dir.display()
                ),
            );
        }
    }
    let fix = match &config.store {
        StoreBackend::Sled => {
            let path = config.store_path();
            if !path.exists() {
                return Finding::warn(
                    check,
                    format!("no store yet at {}", path.display()),
                    format!("`mailgate init` (or the first `serve`) makes it; check `server.data_dir` ({})", config.data_dir.display()),
                );
            }
            format!("`server.data_dir` ({}); a store of another mailgate version: `mailgate store export` with that version, `store import` with this one", config.data_dir.display())
        }
        StoreBackend::Postgres { .. } => {
            "`store.url` / `store.url_file` (host, user, password, database) and `store.ca_file` for its TLS; the database must accept this host (pg_hba.conf)".to_string()
        }
    };
    // PostgreSQL: opened without migrating (nodes of the older version may still use it),
    // and the schema version compared with this mailgate's.
    if let StoreBackend::Postgres { url, ca_file } = &config.store {
        let opened = url.resolve().map_err(|e| e.to_string()).and_then(|url| {
            crate::store::pg_store::PgStore::open_unmigrated(&url, ca_file.as_deref()).map_err(|e| e.to_string())
        });
        let store = match opened {
            Ok(s) => s,
            Err(e) => return Finding::fail(check, e, fix),
        };
        return match store.schema_versions() {
            Ok((current, latest)) if current > latest => Finding::fail(
                check,
                format!("PostgreSQL store has schema version {current}, newer than this mailgate's {latest}"),
                "run the mailgate version that wrote it (or newer) on every node",
            ),
            Ok((current, latest)) if current < latest => Finding::warn(
                check,
                format!("PostgreSQL store reached, schema version {current}; this mailgate's is {latest}"),
                "nothing to change: `mailgate serve` of this version migrates it when it starts (nodes of the older version must be upgraded then too)",
            ),
            Ok((current, _)) => match crate::store::Store::get_account(&store, "check@mailgate.invalid") {
                Ok(_) => Finding::ok(check, format!("PostgreSQL store opened, schema version {current} (current)")),
                Err(e) => Finding::fail(check, format!("opened, but a read failed: {e}"), fix),
            },
            Err(e) => Finding::fail(check, format!("opened, but reading its schema version failed: {e}"), fix),
        };
    }
    match crate::app::open_store(config) {
        Ok(store) => match store.get_account("check@mailgate.invalid") {
            Ok(_) => {
                let which = match &config.store {
                    StoreBackend::Sled => format!("embedded store {}", config.store_path().display()),
                    StoreBackend::Postgres { .. } => "PostgreSQL store".to_string(),
                };
                Finding::ok(check, format!("{which} opened, schema version {} (current)", crate::store::SCHEMA_VERSION))
            }
            Err(e) => Finding::fail(check, format!("opened, but a read failed: {e}"), fix),
        },
        Err(e) => Finding::fail(check, format!("{e}"), fix),
    }
}

// ---------------------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------------------

/// Which upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Imap,
    Smtp,
    Pop3,
    Sieve,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Imap => "IMAP",
            Kind::Smtp => "SMTP",
            Kind::Pop3 => "POP3",
            Kind::Sieve => "ManageSieve",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Imap => "upstream.imap",
            Kind::Smtp => "upstream.smtp",
            Kind::Pop3 => "upstream.pop3",
            Kind::Sieve => "upstream.sieve",
        }
    }

    /// The server's setting that turns its TLS on.
    fn tls_setting(self) -> &'static str {
        match self {
            Kind::Smtp => {
                "Postfix `smtpd_tls_cert_file`/`smtpd_tls_key_file` with `smtpd_tls_security_level = may` (Dovecot submission: `ssl = yes`)"
            }
            _ => "Dovecot `ssl = yes` with `ssl_cert`/`ssl_key`",
        }
    }
}

/// Every configured upstream: reachable with the configured TLS (its certificate
/// verified), and with `user`, the login as that user the way `serve` logs in, with the
/// client address forwarded.
pub async fn upstreams(config: &Config, user: Option<&str>) -> Vec<Finding> {
    let mut list = vec![(Kind::Imap, &config.upstream_imap), (Kind::Smtp, &config.upstream_smtp)];
    if let Some(up) = &config.upstream_pop3 {
        list.push((Kind::Pop3, up));
    }
    if let Some(up) = &config.upstream_sieve {
        list.push((Kind::Sieve, up));
    }
    let mut out = Vec::new();
    for (kind, cfg) in list {
        let connector = match Connector::new(cfg, config.limits.upstream_timeout) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                out.push(Finding::fail(
                    format!("upstream {} TLS settings", kind.name()),
                    e.to_string(),
                    format!(
                        "`{}.ca_file`: a readable PEM file with the CA that signed upstream's certificate",
                        kind.key()
                    ),
                ));
                continue;
            }
        };
        let (reached, xclient_offered) = reach(kind, &connector, config).await;
        let reachable = reached.status == Status::Ok;
        out.push(reached);
        match user {
            None => {}
            Some(_) if !reachable => out.push(Finding::skipped(
                format!("upstream {} login", kind.name()),
                "not tried: upstream cannot be reached (above)",
            )),
            Some(user) => out.extend(log_in(kind, connector, config, user, xclient_offered).await),
        }
    }
    if user.is_none() {
        out.push(Finding::skipped(
            "upstream logins as a user",
            "not tried without a user: run `mailgate check --user EMAIL` with an address that exists upstream, to try the master login and the client-address forwarding each login uses",
        ));
    }
    out
}

fn tls_words(cfg: &Upstream) -> &'static str {
    match cfg.tls {
        UpstreamTls::None => "without TLS",
        UpstreamTls::Starttls => "with STARTTLS, certificate verified",
        UpstreamTls::Implicit => "with TLS, certificate verified",
    }
}

/// Connects with the configured TLS and reads the greeting (no login, nothing secret
/// sent); for SMTP and ManageSieve also whether upstream offers mailgate XCLIENT (Dovecot
/// and Postfix list it only to the addresses they trust with it).
async fn reach(kind: Kind, connector: &Connector, config: &Config) -> (Finding, Option<bool>) {
    use crate::proto::imap_upstream::UpstreamLogin as ImapLogin;
    use crate::proto::sieve_upstream::{Outcome, UpstreamLogin as SieveLogin};
    let cfg = connector.config();
    let check = format!("upstream {} {}", kind.name(), cfg.address);
    let starttls = cfg.tls == UpstreamTls::Starttls;
    let mut xclient_offered = None;
    let mut probe = SieveLogin::probe(starttls);
    let reached: Result<String, UpstreamFailure> = match kind {
        Kind::Imap => match connector.log_in(&mut ImapLogin::probe(starttls)).await {
            Ok((Ok(_), stream)) => {
                say_goodbye(stream, b"M9 LOGOUT\r\n").await;
                Ok("answers".into())
            }
            Ok((Err(e), _)) => Err(e.into()),
            Err(e) => Err(e),
        },
        Kind::Smtp => {
            let none = SecretString::from(String::new());
            let style = crate::proto::smtp_upstream::Style::Probe;
            match crate::net::smtp::log_in(connector, &config.hostname, style, "", none, CHECK_CLIENT).await {
                Ok((up, caps)) => {
                    up.quit().await;
                    let auth = caps.iter().any(|c| c.starts_with("AUTH"));
                    let xclient = caps.iter().any(|c| c.starts_with("XCLIENT"));
                    xclient_offered = Some(xclient);
                    Ok(format!(
                        "answers (EHLO offers{}{})",
                        if auth { " AUTH" } else { " no AUTH" },
                        if xclient { ", XCLIENT" } else { ", no XCLIENT" }
                    ))
                }
                Err(e) => Err(e),
            }
        }
        Kind::Sieve => match connector.log_in(&mut probe).await {
            Ok((Outcome::Listed, stream)) => {
                say_goodbye(stream, b"LOGOUT\r\n").await;
                xclient_offered = Some(probe.capabilities().iter().any(|c| c.name.eq_ignore_ascii_case("XCLIENT")));
                Ok("answers".into())
            }
            Ok((Outcome::Failed(e), _)) => Err(e.into()),
            Ok((_, _)) => Err(crate::proto::sieve_upstream::UpstreamError::Protocol("no capability listing").into()),
            Err(e) => Err(e),
        },
        // POP3 has no probe: the connection (and TLS for `implicit`) is checked here; STLS
        // is part of the login (`--user`).
        Kind::Pop3 => match connector.connect().await {
            Ok(mut conn) => {
                conn.close().await;
                Ok(if starttls {
                    "accepts connections (STLS is tried by the login with --user)"
                } else {
                    "accepts connections (the greeting is read by the login with --user)"
                }
                .into())
            }
            Err(e) => Err(e),
        },
    };
    let finding = match reached {
        Ok(what) => Finding::ok(check, format!("{what}, {}", tls_words(cfg))),
        Err(e) => {
            let (detail, fix) = explain(kind, cfg, &e, None);
            Finding::fail(check, detail, fix)
        }
    };
    (finding, xclient_offered)
}

async fn say_goodbye(stream: MaybeTls, line: &[u8]) {
    let mut conn = Conn::new(stream, Tls::None);
    conn.set_idle(Some(Duration::from_secs(2)));
    let _ = conn.send(line).await;
    conn.close().await;
}

/// Logs in as `user` the way the front does, then leaves: the login finding, and the
/// forwarding finding (the client address passed upstream).
async fn log_in(
    kind: Kind,
    connector: Arc<Connector>,
    config: &Config,
    user: &str,
    xclient_offered: Option<bool>,
) -> Vec<Finding> {
    let cfg = connector.config().clone();
    let check = format!("upstream {} login as {user}", kind.name());
    let id = [("name".to_string(), "mailgate check".to_string())];
    // The address a client would have reached (IMAP's `x-connected-ip`).
    let local = config.imap_tls.iter().chain(&config.imap_starttls).next().copied().unwrap_or(CHECK_CLIENT);
    let origin = Origin { client: CHECK_CLIENT, local, id: &id };
    let how = match (kind, cfg.login) {
        (Kind::Smtp, LoginMode::Xclient) => "XCLIENT LOGIN".to_string(),
        (_, LoginMode::MasterSeparator) => format!("{user}{}{}", cfg.master_separator, cfg.master_user),
        _ => format!("master user {}, SASL PLAIN", cfg.master_user),
    };
    let done: Result<(), UpstreamFailure> = match kind {
        Kind::Imap => match ImapUpstream(connector.clone()).login(user, None, &origin).await {
            Ok(up) => {
                say_goodbye(up.stream, b"L1 LOGOUT\r\n").await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Kind::Pop3 => match Pop3Upstream(connector.clone()).login(user, None, &origin).await {
            Ok(up) => {
                say_goodbye(up.stream, b"QUIT\r\n").await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Kind::Sieve => match SieveUpstream::new(connector.clone()).login(user, None, &origin).await {
            Ok(up) => {
                say_goodbye(up.stream, b"LOGOUT\r\n").await;
                Ok(())
            }
            Err(e) => Err(e),
        },
        Kind::Smtp => {
            use crate::proto::smtp_upstream::Style;
            let creds = match cfg.login {
                LoginMode::Xclient => Ok((Style::Xclient, SecretString::from(String::new()))),
                _ => connector.master_password().map(|p| (Style::MasterSasl, p)),
            };
            match creds {
                Ok((style, password)) => {
                    match crate::net::smtp::log_in(&connector, &config.hostname, style, user, password, CHECK_CLIENT)
                        .await
                    {
                        Ok((up, _)) => {
                            up.quit().await;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    let forwarding = format!("client address forwarding to {}", kind.name());
    match done {
        Ok(()) => {
            vec![Finding::ok(check, format!("accepted ({how})")), forwarded(kind, &cfg, &forwarding, xclient_offered)]
        }
        Err(e) => {
            let (detail, fix) = explain(kind, &cfg, &e, Some(user));
            let mut out = vec![Finding::fail(check, detail, fix)];
            if is_forwarding_refusal(&e) {
                out.push(Finding::fail(forwarding, "refused (see the login above)", forwarding_fix(kind)));
            }
            out
        }
    }
}

/// What a successful login says about the forwarded client address (`xclient_offered`:
/// whether upstream listed XCLIENT to mailgate, where that is known).
fn forwarded(kind: Kind, cfg: &Upstream, check: &str, xclient_offered: Option<bool>) -> Finding {
    match kind {
        Kind::Imap => Finding::skipped(
            check,
            format!(
                "sent with ID (x-originating-ip {}); Dovecot takes it only from `login_trusted_networks` and does not say whether it did: its login line shows rip={} when it did",
                CHECK_CLIENT.ip(),
                CHECK_CLIENT.ip()
            ),
        ),
        Kind::Smtp if cfg.login == LoginMode::Xclient => Finding::ok(check, "XCLIENT accepted"),
        Kind::Smtp if xclient_offered == Some(true) => Finding::ok(check, "XCLIENT ADDR accepted"),
        Kind::Smtp => Finding::warn(
            check,
            "upstream does not offer mailgate XCLIENT: it sees mailgate's address, not the mail client's (logins work; its logs and limits count mailgate)",
            forwarding_fix(Kind::Smtp),
        ),
        Kind::Sieve if cfg.xclient && xclient_offered == Some(false) => Finding::fail(
            check,
            "`upstream.sieve.xclient = true`, but upstream does not list XCLIENT to mailgate, so the client address is not passed",
            forwarding_fix(Kind::Sieve),
        ),
        Kind::Pop3 | Kind::Sieve if cfg.xclient => Finding::ok(check, "XCLIENT accepted"),
        Kind::Pop3 | Kind::Sieve => Finding::skipped(check, format!("off (`{}.xclient = false`)", kind.key())),
    }
}

fn is_forwarding_refusal(e: &UpstreamFailure) -> bool {
    use crate::proto::smtp_upstream::SmtpUpstreamError;
    matches!(
        e,
        UpstreamFailure::Pop3(crate::proto::pop3_upstream::UpstreamError::XClient)
            | UpstreamFailure::Sieve(crate::proto::sieve_upstream::UpstreamError::XClient)
            | UpstreamFailure::Smtp(SmtpUpstreamError::XclientRefused(_))
            | UpstreamFailure::Smtp(SmtpUpstreamError::NotOffered("XCLIENT LOGIN"))
    )
}

fn forwarding_fix(kind: Kind) -> String {
    match kind {
        Kind::Smtp => "Postfix `smtpd_authorized_xclient_hosts` must include mailgate's address as Postfix sees it (Dovecot submission: `login_trusted_networks`); `upstream.smtp.login = \"master-sasl\"` logs in without XCLIENT LOGIN".into(),
        _ => format!(
            "Dovecot `login_trusted_networks` must include mailgate's address (as Dovecot sees it), or `{}.xclient = false`",
            kind.key()
        ),
    }
}

/// What went wrong, in words, and what to change.
fn explain(kind: Kind, cfg: &Upstream, e: &UpstreamFailure, user: Option<&str>) -> (String, String) {
    use crate::proto::imap_upstream::UpstreamError as Imap;
    use crate::proto::smtp_upstream::SmtpUpstreamError as Smtp;
    let key = kind.key();
    let address = format!("`{key}.address` ({}); is the server running and listening there?", cfg.address);
    let starttls_fix = format!(
        "{} on the server, or `{key}.tls = \"none\"` if the path to it is trusted (loopback)",
        kind.tls_setting()
    );
    let login_fix = |what: &str| match (kind, cfg.login) {
        (Kind::Smtp, LoginMode::Xclient) => forwarding_fix(Kind::Smtp),
        (Kind::Smtp, _) => format!(
            "`{key}.master_password_file` and `{key}.master_user` must be the master user's in the server's SASL passdb (Dovecot `passdb {{ master = yes }}`); {what}"
        ),
        (_, LoginMode::MasterSeparator) => format!(
            "`{key}.master_password_file` and `{key}.master_user` must match Dovecot's master passdb (`passdb {{ master = yes }}`), and `{key}.master_separator` Dovecot's `auth_master_user_separator`; {what}"
        ),
        _ => format!(
            "`{key}.master_password_file` and `{key}.master_user` must match Dovecot's master passdb (`passdb {{ master = yes }}`); {what}"
        ),
    };
    let user_exists = match user {
        Some(u) => format!("{u} must exist upstream"),
        None => "the user must exist upstream".to_string(),
    };
    match e {
        UpstreamFailure::Io(io) => (
            format!("cannot connect: {io}"),
            address,
        ),
        UpstreamFailure::Timeout => ("no answer in time (`limits.upstream_timeout_secs`)".into(), address),
        UpstreamFailure::Conn(DriveError::Handshake(io)) => handshake(kind, cfg, io),
        UpstreamFailure::Conn(DriveError::PeerClosed) if cfg.tls == UpstreamTls::Implicit => (
            "closed the connection during the TLS handshake".into(),
            format!("`{key}.tls`: \"implicit\" needs a TLS port (993, 465, 995); for a plain port use \"starttls\""),
        ),
        UpstreamFailure::Conn(c) => (format!("connection failed: {c}"), address),
        UpstreamFailure::Name(n) => (
            format!("`{key}.server_name` ({}) is not a usable TLS name: {n}", cfg.server_name),
            format!("`{key}.server_name`: the name in upstream's certificate"),
        ),
        UpstreamFailure::MasterPassword(m) => (
            format!("the master password cannot be read: {m}"),
            format!("`{key}.master_password_file` ({}): a file readable by mailgate whose first line is the master password", cfg.master_password_file.display()),
        ),
        UpstreamFailure::Protocol(Imap::StartTls)
        | UpstreamFailure::Smtp(Smtp::StartTls)
        | UpstreamFailure::Pop3(crate::proto::pop3_upstream::UpstreamError::StartTls)
        | UpstreamFailure::Sieve(crate::proto::sieve_upstream::UpstreamError::StartTls) => (
            format!("upstream does not offer STARTTLS, but `{key}.tls = \"starttls\"`"),
            starttls_fix,
        ),
        UpstreamFailure::Protocol(Imap::LoginDisabled) | UpstreamFailure::Sieve(crate::proto::sieve_upstream::UpstreamError::NoPlain) => (
            "upstream refuses logins without TLS".into(),
            format!("`{key}.tls = \"starttls\"` (or \"implicit\" on its TLS port)"),
        ),
        UpstreamFailure::Protocol(Imap::Greeting)
        | UpstreamFailure::Smtp(Smtp::Greeting(_))
        | UpstreamFailure::Pop3(crate::proto::pop3_upstream::UpstreamError::Greeting)
        | UpstreamFailure::Sieve(crate::proto::sieve_upstream::UpstreamError::Greeting) => (
            format!("{e}: not a {} server, or it refuses mailgate", kind.name()),
            address,
        ),
        UpstreamFailure::Protocol(Imap::LoginRefused)
        | UpstreamFailure::Smtp(Smtp::LoginRefused(_))
        | UpstreamFailure::Pop3Refused(_)
        | UpstreamFailure::SieveRefused { .. } => (format!("{e}"), login_fix(&user_exists)),
        UpstreamFailure::Smtp(Smtp::NotOffered(what)) if *what != "XCLIENT LOGIN" => (
            format!("upstream does not offer {what}"),
            "Postfix `smtpd_sasl_auth_enable = yes` with `smtpd_sasl_type = dovecot` (Dovecot submission: `auth_mechanisms = plain`), or `upstream.smtp.login = \"xclient\"`".into(),
        ),
        e if is_forwarding_refusal(e) => (format!("{e}"), forwarding_fix(kind)),
        other => (format!("{other}"), format!("the `[{key}]` settings")),
    }
}

/// A failed TLS handshake: which certificate problem, and what to change.
fn handshake(kind: Kind, cfg: &Upstream, io: &std::io::Error) -> (String, String) {
    use rustls::CertificateError as C;
    let key = kind.key();
    let inner = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    let ca = match &cfg.ca_file {
        Some(p) => format!("`{key}.ca_file` ({}) must hold the CA that signed upstream's certificate", p.display()),
        None => format!(
            "`{key}.ca_file`: the CA that signed upstream's certificate (without it only the system's roots are trusted)"
        ),
    };
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer | C::BadSignature => (format!("upstream's certificate is not trusted ({c:?})"), ca),
            C::NotValidForName | C::NotValidForNameContext { .. } => (
                format!("upstream's certificate is not valid for the name {}", cfg.server_name),
                format!("`{key}.server_name`: a name in upstream's certificate (now {})", cfg.server_name),
            ),
            C::Expired | C::ExpiredContext { .. } => (
                "upstream's certificate has expired".into(),
                format!("renew the upstream server's certificate ({})", kind.tls_setting()),
            ),
            other => (format!("upstream's certificate is refused: {other:?}"), ca),
        },
        Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => (
            format!("the TLS handshake failed: {io}"),
            format!(
                "`{key}.tls`: \"implicit\" needs a TLS port, \"starttls\" a plain one (now \"{}\" on {})",
                tls_name(cfg.tls),
                cfg.address
            ),
        ),
        _ => (format!("the TLS handshake failed: {io}"), format!("`{key}.tls` ({}) and {ca}", tls_name(cfg.tls))),
    }
}

fn tls_name(t: UpstreamTls) -> &'static str {
    match t {
        UpstreamTls::None => "none",
        UpstreamTls::Starttls => "starttls",
        UpstreamTls::Implicit => "implicit",
    }
}

// ---------------------------------------------------------------------------------------
// The web step
// ---------------------------------------------------------------------------------------

/// The web step at `server.public_url`: Thunderbird's autoconfig file answers there, and
/// `/healthz` says the running server reaches its store. The URL's certificate is
/// verified against the system roots, or must be the `[tls]` certificate itself.
pub async fn web(config: &Config) -> Vec<Finding> {
    if config.web_listen.is_empty() {
        return vec![Finding::skipped("web step", "off (`web.listen = []`)")];
    }
    let Some((host, port)) = url_host_port(&config.public_url) else {
        return vec![Finding::fail("web step", format!("{} has no host", config.public_url), "`server.public_url`")];
    };
    let own = crate::tls::load_certs(&config.tls_cert).ok().and_then(|c| c.into_iter().next());
    let https = config.public_url.starts_with("https://");
    let not_there = format!(
        "`server.public_url` ({}) must reach a `web.listen` address ({}) of a running `mailgate serve` (or the proxy in front of it)",
        config.public_url,
        config.web_listen.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
    );
    let mut out = Vec::new();
    let path = "/.well-known/autoconfig/mail/config-v1.1.xml";
    match get(&host, port, https, path, own.clone()).await {
        Ok((200, body)) if body.contains("<clientConfig") => {
            out.push(Finding::ok("autoconfig", format!("{}{path} answers with the mail settings", config.public_url)))
        }
        Ok((code, _)) => out.push(Finding::fail(
            "autoconfig",
            format!("{}{path} answered HTTP {code}, not the autoconfig file", config.public_url),
            not_there.clone(),
        )),
        Err(e) => {
            out.push(Finding::fail("autoconfig", format!("{}{path}: {e}", config.public_url), not_there.clone()));
            return out;
        }
    }
    match get(&host, port, https, "/healthz", own).await {
        Ok((200, _)) => out.push(Finding::ok("/healthz", "200: the running server reaches its store")),
        Ok((503, _)) => out.push(Finding::fail(
            "/healthz",
            "503: the running server cannot reach its store",
            "the `[store]` settings; see the store check above and serve's log",
        )),
        Ok((code, _)) => out.push(Finding::fail(
            "/healthz",
            format!("answered HTTP {code}: not this version of mailgate"),
            not_there,
        )),
        Err(e) => out.push(Finding::fail("/healthz", e.to_string(), not_there)),
    }
    out
}

/// Why a GET to the web step got no HTTP answer.
#[derive(Debug, thiserror::Error)]
enum WebError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("bad host name: {0}")]
    Name(rustls::pki_types::InvalidDnsNameError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("no answer within {} s", WEB_TIMEOUT.as_secs())]
    Timeout,
}

/// One HTTP/1.1 GET (hyper's client on one connection): the status code and the body
/// (at most [`WEB_MAX_ANSWER`] bytes).
async fn get(
    host: &str,
    port: u16,
    https: bool,
    path: &str,
    own: Option<CertificateDer<'static>>,
) -> Result<(u16, String), WebError> {
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "mailgate-check")
        .body(axum::body::Body::empty())
        .map_err(|e| WebError::Http(e.to_string()))?;
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
        stream: S,
        request: http::Request<axum::body::Body>,
    ) -> Result<(u16, String), WebError> {
        let answer = crate::net::http::request(stream, request).await.map_err(|e| WebError::Http(e.to_string()))?;
        let code = answer.status().as_u16();
        let body = axum::body::to_bytes(axum::body::Body::new(answer.into_body()), WEB_MAX_ANSWER)
            .await
            .map_err(|e| WebError::Http(e.to_string()))?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
    let answer = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(WebError::Connect)?;
        if !https {
            return exchange(tcp, request).await;
        }
        let name = ServerName::try_from(host.to_string()).map_err(WebError::Name)?;
        let connector = tokio_rustls::TlsConnector::from(web_client_config(own)?);
        let tls = connector.connect(name, tcp).await.map_err(|e| WebError::Tls(e.to_string()))?;
        exchange(tls, request).await
    };
    tokio::time::timeout(WEB_TIMEOUT, answer).await.map_err(|_| WebError::Timeout)?
}

/// The client side for the web requests: the system roots, and the `[tls]` leaf itself
/// (a private or self-signed certificate is what this server serves; the name check is
/// the certificate check's).
fn web_client_config(own: Option<CertificateDer<'static>>) -> Result<Arc<rustls::ClientConfig>, WebError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().ok();
    let verifier = Arc::new(OwnOrRoots { roots: webpki, own, provider: provider.clone() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts a server certificate the system roots verify, or exactly the `[tls]` leaf.
#[derive(Debug)]
struct OwnOrRoots {
    roots: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    own: Option<CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for OwnOrRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self.own.as_ref().is_some_and(|own| own.as_ref() == end_entity.as_ref()) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match &self.roots {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------
// Everything
// ---------------------------------------------------------------------------------------

/// Every check, in the order the report shows them: the configuration (`source` says
/// which file; it was loaded, or main would have stopped with status 64), the own
/// certificate, the store, the upstreams (with `user`: its logins), the web step.
/// Blocking parts (the store) run before the runtime is started.
pub fn run(config: &Config, source: &str, user: Option<&str>) -> Vec<Finding> {
    let mut out = vec![Finding::ok("configuration", format!("{source}: valid"))];
    out.extend(own_certificate(config, SystemTime::now()));
    out.push(store(config));
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(async {
            out.extend(upstreams(config, user).await);
            out.extend(web(config).await);
        }),
        Err(e) => {
            out.push(Finding::fail("runtime", format!("cannot start: {e}"), "the system's thread and file limits"))
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_and_ports() {
        assert_eq!(url_host_port("https://mail.example.com"), Some(("mail.example.com".into(), 443)));
        assert_eq!(url_host_port("https://Mail.Example.com:8443/x"), Some(("mail.example.com".into(), 8443)));
        assert_eq!(url_host_port("http://127.0.0.1:8080"), Some(("127.0.0.1".into(), 8080)));
        assert_eq!(url_host_port("https://[::1]:8443/"), Some(("::1".into(), 8443)));
        assert_eq!(url_host_port("https://[::1]"), Some(("::1".into(), 443)));
        assert_eq!(url_host_port("ftp://x"), None);
        assert_eq!(url_host_port("https://:443"), None);
        assert_eq!(url_host_port("https://x:notaport"), None);
    }

    /// The report's words: one line per check, the change on the next, a summary; JSON
    /// has the same findings and `ok`.
    #[test]
    fn the_report_says_what_to_change() {
        let findings = vec![
            Finding::ok("configuration", "x.toml: valid"),
            Finding::fail("upstream IMAP 127.0.0.1:143", "cannot connect", "`upstream.imap.address`"),
            Finding::warn("own certificate validity", "expires in 3 day(s)", "renew"),
        ];
        let text = render(&findings);
        assert!(text.contains("ok    configuration: x.toml: valid\n"), "{text}");
        assert!(
            text.contains("FAIL  upstream IMAP 127.0.0.1:143: cannot connect\n      change: `upstream.imap.address`\n")
        );
        assert!(text.ends_with("mailgate check: 1 check(s) failed, 1 warning(s)\n"), "{text}");
        assert!(failed(&findings));
        let json = to_json(&findings);
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "`upstream.imap.address`");
        assert!(json["checks"][0].get("fix").is_none());
        assert!(!failed(&findings[..1]));
        assert!(render(&findings[..1]).ends_with("everything checked works\n"));
    }

    fn pair(dir: &std::path::Path, names: &[&str], not_after: SystemTime) -> Config {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.not_before = (not_after - days(90)).into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let mut config = Config::embedded_defaults();
        config.tls_cert = dir.join("cert.pem");
        config.tls_key = dir.join("key.pem");
        config.hostname = "mail.example.test".into();
        config.public_url = "https://web.example.test:8443".into();
        config
    }

    /// With `tls.acme`, a pair not issued yet and the placeholder are warnings that point
    /// at the order, not at `tls.cert`.
    #[test]
    fn acme_pair_not_issued_yet() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = pair(dir.path(), &["mail.example.test"], SystemTime::now() + days(60));
        config.acme = Some(crate::config::AcmeConfig {
            directory: "https://ca.example/dir".into(),
            contact: "mailto:a@example.test".into(),
            ca_file: None,
            names: vec!["mail.example.test".into()],
            renew_before: days(30),
            check: Duration::from_secs(3600),
            dir: dir.path().into(),
        });
        let f = own_certificate(&config, SystemTime::now());
        assert_eq!(status_of(&f, "own certificate chain"), Status::Warn);
        assert!(f.iter().any(|f| f.detail.contains("placeholder")), "{f:?}");
        std::fs::remove_file(&config.tls_cert).unwrap();
        std::fs::remove_file(&config.tls_key).unwrap();
        let f = own_certificate(&config, SystemTime::now());
        assert_eq!((f.len(), f[0].status), (1, Status::Warn), "{f:?}");
        assert!(f[0].detail.contains("no certificate issued yet"), "{f:?}");
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    fn status_of(findings: &[Finding], check: &str) -> Status {
        findings
            .iter()
            .find(|f| f.check == check)
            .map(|f| f.status)
            .unwrap_or_else(|| panic!("no {check}: {findings:?}"))
    }

    /// Days to expiry: fine, a warning under 14 days, a failure once expired; the names
    /// cover server.hostname (else a warning) and the web URL's host (else a failure).
    #[test]
    fn the_own_certificate_is_judged_by_its_dates_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let config = pair(dir.path(), &["mail.example.test", "web.example.test"], now + days(60));
        let f = own_certificate(&config, SystemTime::now());
        assert_eq!(status_of(&f, "own certificate validity"), Status::Ok, "{f:?}");
        assert_eq!(status_of(&f, "certificate name for server.hostname"), Status::Ok);
        assert_eq!(status_of(&f, "certificate name for the web URL"), Status::Ok);
        assert_eq!(status_of(&f, "own certificate chain"), Status::Warn, "self-signed");

        let config = pair(dir.path(), &["mail.example.test"], now + days(5));
        let f = own_certificate(&config, SystemTime::now());
        assert_eq!(status_of(&f, "own certificate validity"), Status::Warn);
        let web = f.iter().find(|f| f.check == "certificate name for the web URL").unwrap();
        assert_eq!(web.status, Status::Fail);
        assert!(web.fix.as_deref().unwrap().contains("`server.public_url`"), "{web:?}");

        let config = pair(dir.path(), &["web.example.test"], now - days(1));
        let f = own_certificate(&config, SystemTime::now());
        let validity = f.iter().find(|f| f.check == "own certificate validity").unwrap();
        assert_eq!(validity.status, Status::Fail);
        assert!(validity.detail.starts_with("expired on "), "{validity:?}");
        assert!(validity.fix.as_deref().unwrap().contains("`tls.cert`"));
        assert_eq!(status_of(&f, "certificate name for server.hostname"), Status::Warn);

        std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
        let f = own_certificate(&config, SystemTime::now());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].status, Status::Fail);
        assert!(f[0].fix.as_deref().unwrap().contains("`tls.key`"), "{f:?}");
    }
}
