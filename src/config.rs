//! Configuration: the TOML file admins write, parsed and checked before any port opens.
//!
//! [`RawConfig`] mirrors the file (`deny_unknown_fields`, every key optional with the
//! embedded default); [`Config::from_toml_str`] turns it into the typed [`Config`] or a
//! [`ConfigError`] that names the key and the reason. Relative paths are taken from the
//! directory mailgate is started in. Reads one file; never opens sockets.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the configuration file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/mailgate.toml";

/// A configuration that could not be used. The text names the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message: line, column, key and reason.
        message: String,
    },
    /// A value has the right type but cannot be used.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `upstream.imap.address`.
        key: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The longest `[web] organisation`: it shares the header with the account name on a
/// phone's 390-px-wide screen.
const MAX_ORGANISATION: usize = 60;

/// `[tls] acme = true`: where and how the certificate is ordered and renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The CA's directory URL (`tls.acme_directory`), e.g. Let's Encrypt's.
    pub directory: String,
    /// Account contact URIs (`tls.acme_contact`: an address or a `mailto:` URI).
    pub contact: String,
    /// CA file trusted for the directory's HTTPS (`tls.acme_ca_file`; else the system roots).
    pub ca_file: Option<PathBuf>,
    /// The names ordered: `server.hostname`, then `tls.names`.
    pub names: Vec<String>,
    /// Renew when less than this is left of the certificate's validity.
    pub renew_before: Duration,
    /// How often the validity is checked, and the first wait after a failed order.
    pub check: Duration,
    /// `data_dir/acme`: the account credentials and the issued pair.
    pub dir: PathBuf,
}

impl AcmeConfig {
    /// The issued certificate chain (PEM), served by the `CertStore`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// The issued certificate's key (PEM, mode 0600).
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// The ACME account's credentials (JSON with the account key, mode 0600).
    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }
}

/// A DNS name an ACME CA can issue for: dot-separated labels of letters, digits and '-'
/// (not at either end), at most 63 bytes each and 253 in all; no IP address.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<std::net::IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn acme_config(tls: &RawTls, hostname: &str, data_dir: &Path) -> Result<Option<AcmeConfig>, ConfigError> {
    if !tls.acme {
        let set = [
            ("tls.acme_directory", tls.acme_directory.is_some()),
            ("tls.acme_contact", tls.acme_contact.is_some()),
            ("tls.acme_ca_file", tls.acme_ca_file.is_some()),
            ("tls.names", !tls.names.is_empty()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
            return Err(invalid(key, "is only used with `tls.acme = true`"));
        }
        return Ok(None);
    }
    let directory = match tls.acme_directory.as_deref().map(str::trim) {
        Some(d) if d.starts_with("https://") && d.len() > "https://".len() => d.to_string(),
        Some(_) => return Err(invalid("tls.acme_directory", "must be the CA's https:// directory URL")),
        None => {
            return Err(invalid("tls.acme_directory", "is required with `tls.acme = true` (the CA's directory URL)"));
        }
    };
    let contact = match tls.acme_contact.as_deref().map(str::trim) {
        Some(c) if c.contains('@') && !c.contains(char::is_whitespace) => {
            if c.starts_with("mailto:") {
                c.to_string()
            } else {
                format!("mailto:{c}")
            }
        }
        Some(_) => return Err(invalid("tls.acme_contact", "must be an e-mail address (or a mailto: URI)")),
        None => {
            return Err(invalid("tls.acme_contact", "is required with `tls.acme = true` (the CA's contact address)"));
        }
    };
    if !is_dns_name(hostname) {
        return Err(invalid("server.hostname", "must be a DNS name for ACME (not an address)"));
    }
    let mut names = vec![hostname.to_ascii_lowercase()];
    for n in &tls.names {
        let n = n.trim().to_ascii_lowercase();
        if !is_dns_name(&n) {
            return Err(invalid("tls.names", format!("`{n}` is not a DNS name")));
        }
        if !names.contains(&n) {
            names.push(n);
        }
    }
    if tls.acme_renew_before_days == 0 {
        return Err(invalid("tls.acme_renew_before_days", "must be greater than 0"));
    }
    if tls.acme_check_secs == 0 {
        return Err(invalid("tls.acme_check_secs", "must be greater than 0"));
    }
    Ok(Some(AcmeConfig {
        directory,
        contact,
        ca_file: tls.acme_ca_file.clone(),
        names,
        renew_before: Duration::from_secs(tls.acme_renew_before_days.saturating_mul(86_400)),
        check: Duration::from_secs(tls.acme_check_secs),
        dir: data_dir.join("acme"),
    }))
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), reason: reason.into() }
}

/// The file as written. Every section and key is optional; omitted ones take the embedded defaults.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    imap: RawListeners<ImapPorts>,
    #[serde(default)]
    smtp: RawSmtp,
    /// `None`: no `[pop3]` section (the defaults apply only with `[upstream.pop3]`).
    pop3: Option<RawListeners<Pop3Ports>>,
    /// `None`: no `[sieve]` section (the default applies only with `[upstream.sieve]`).
    sieve: Option<RawSieve>,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    upstream: RawUpstreams,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    accounts: RawAccounts,
    #[serde(default)]
    proxy_protocol: RawProxyProtocol,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    oauth: RawOAuth,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    notify: RawNotify,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default = "d_true")]
    enabled: bool,
    from: Option<String>,
    relay: Option<String>,
    #[serde(default)]
    kinds_off: Vec<String>,
    #[serde(default = "d_notify_max_per_hour")]
    max_per_hour: u32,
    #[serde(default = "d_notify_first_retry")]
    first_retry_secs: u64,
}

impl Default for RawNotify {
    fn default() -> RawNotify {
        RawNotify {
            enabled: true,
            from: None,
            relay: None,
            kinds_off: vec![],
            max_per_hour: d_notify_max_per_hour(),
            first_retry_secs: d_notify_first_retry(),
        }
    }
}

fn d_notify_max_per_hour() -> u32 {
    10
}

fn d_notify_first_retry() -> u64 {
    60
}

/// The names of the kinds of security notifications (`[notify] kinds_off`); the texts
/// are `notify::Kind`'s, which a test holds to this list.
pub const NOTICE_KINDS: &[&str] = &[
    "app_password_created",
    "oauth_grant_created",
    "new_device",
    "backup_code_used",
    "backup_codes_generated",
    "totp_enabled",
    "totp_disabled",
    "account_password_changed",
    "account_locked",
    "second_factor_reminder",
    "send_quota_reached",
];

/// `[notify]`: security notifications mailed to the account (see `notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    /// Whether any is sent (and queued).
    pub enabled: bool,
    /// The `From:` address (default `mailgate@<server.hostname>`).
    pub from: String,
    /// `host:port` of an MTA taking plain SMTP without authentication; `None`: through
    /// `[upstream.smtp]`, logged in as the recipient account.
    pub relay: Option<String>,
    /// Kinds not sent ([`NOTICE_KINDS`]).
    pub kinds_off: Vec<String>,
    /// Notices one account may get in an hour; more are dropped (a flood).
    pub max_per_hour: u32,
    /// A failed send is retried after this long, then after twice as long each time, at
    /// most an hour apart.
    pub first_retry: Duration,
}

impl Notify {
    /// Whether notices of `kind` are sent.
    pub fn sends(&self, kind: &str) -> bool {
        self.enabled && !self.kinds_off.iter().any(|k| k == kind)
    }
}

impl Default for Notify {
    fn default() -> Notify {
        Notify {
            enabled: true,
            from: "mailgate@localhost".into(),
            relay: None,
            kinds_off: vec![],
            max_per_hour: d_notify_max_per_hour(),
            first_retry: Duration::from_secs(d_notify_first_retry()),
        }
    }
}

fn notify(raw: RawNotify, hostname: &str) -> Result<Notify, ConfigError> {
    let from = match raw.from.as_deref().map(str::trim) {
        None | Some("") => format!("mailgate@{hostname}"),
        Some(f) => f.to_string(),
    };
    let plain = |c: u8| c.is_ascii_graphic() && !matches!(c, b'<' | b'>' | b'"' | b',' | b'(' | b')' | b';');
    if from.split('@').count() != 2 || from.starts_with('@') || from.ends_with('@') || !from.bytes().all(plain) {
        return Err(invalid(
            "notify.from",
            format!("`{from}` is not an e-mail address (e.g. \"mailgate@example.com\")"),
        ));
    }
    let relay = match raw.relay.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(r) => match r.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Some(r.to_string()),
            _ => return Err(invalid("notify.relay", format!("`{r}` is not host:port (e.g. \"127.0.0.1:25\")"))),
        },
    };
    let mut kinds_off = Vec::new();
    for k in raw.kinds_off {
        let k = k.trim().to_ascii_lowercase();
        if !NOTICE_KINDS.contains(&k.as_str()) {
            return Err(invalid(
                "notify.kinds_off",
                format!("`{k}` is not a kind of notification (one of {})", NOTICE_KINDS.join(", ")),
            ));
        }
        kinds_off.push(k);
    }
    if raw.max_per_hour == 0 {
        return Err(invalid("notify.max_per_hour", "must be at least 1 (turn notifications off with enabled = false)"));
    }
    if !(1..=3600).contains(&raw.first_retry_secs) {
        return Err(invalid("notify.first_retry_secs", "must be 1 to 3600"));
    }
    Ok(Notify {
        enabled: raw.enabled,
        from,
        relay,
        kinds_off,
        max_per_hour: raw.max_per_hour,
        first_retry: Duration::from_secs(raw.first_retry_secs),
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    require_second_factor: Vec<String>,
    grace_until: Option<String>,
}

/// `[policy]`: two-step verification required for some domains, after a grace period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Domains whose accounts must use two-step verification (lower case).
    pub require_second_factor: Vec<String>,
    /// Until this time (unix seconds, the end of the configured day, UTC), accounts of
    /// those domains without it still sign in with their account password; `None`: no
    /// grace.
    pub grace_until: Option<u64>,
}

impl Policy {
    /// Whether `username`'s domain must use two-step verification.
    pub fn requires_second_factor(&self, username: &str) -> bool {
        let domain = username.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        self.require_second_factor.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Whether `username` must have two-step verification *now*: its domain requires it
    /// and the grace period is over.
    pub fn enforced(&self, username: &str, now: u64) -> bool {
        self.requires_second_factor(username) && self.grace_until.is_none_or(|until| now >= until)
    }

    /// Whether `username` still needs to enrol (its domain requires it), grace or not.
    pub fn in_grace(&self, username: &str, now: u64) -> bool {
        self.requires_second_factor(username) && !self.enforced(username, now)
    }
}

fn policy(raw: RawPolicy) -> Result<Policy, ConfigError> {
    let mut domains = Vec::new();
    for d in raw.require_second_factor {
        let d = d.trim().trim_start_matches('@').to_ascii_lowercase();
        if d.is_empty() || !d.contains('.') || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
            return Err(invalid(
                "policy.require_second_factor",
                format!("`{d}` is not a domain (e.g. \"example.com\")"),
            ));
        }
        domains.push(d);
    }
    let grace_until = match raw.grace_until.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(date) if date.len() == 10 && date.as_bytes()[4] == b'-' => Some(
            crate::auth::app_password::parse_expiry(date, 0)
                .map_err(|_| invalid("policy.grace_until", format!("`{date}` is not a date YYYY-MM-DD")))?,
        ),
        Some(other) => return Err(invalid("policy.grace_until", format!("`{other}` is not a date YYYY-MM-DD"))),
    };
    Ok(Policy { require_second_factor: domains, grace_until })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "d_access_token_secs")]
    access_token_secs: u64,
    #[serde(default = "d_refresh_token_days")]
    refresh_token_days: u64,
    #[serde(default = "d_code_secs")]
    code_secs: u64,
    /// `None`: the defaults (`thunderbird`, `open`).
    clients: Option<Vec<RawOAuthClient>>,
}
fn d_access_token_secs() -> u64 {
    3600
}
fn d_refresh_token_days() -> u64 {
    365
}
fn d_code_secs() -> u64 {
    60
}
impl Default for RawOAuth {
    fn default() -> Self {
        RawOAuth {
            enabled: false,
            access_token_secs: d_access_token_secs(),
            refresh_token_days: d_refresh_token_days(),
            code_secs: d_code_secs(),
            clients: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuthClient {
    id: String,
    name: Option<String>,
    /// Loopback redirect URIs on any port (RFC 8252 §7.3); default true.
    #[serde(default = "d_true")]
    loopback: bool,
    /// Other redirect URIs, matched exactly.
    #[serde(default)]
    redirect_uris: Vec<String>,
}
fn d_true() -> bool {
    true
}

/// mailgate as the OAuth 2.0 authorization server of mail apps (`[oauth]`).
#[derive(Debug, Clone)]
pub struct OAuth {
    /// Whether the web step answers OAuth requests and the mail ports offer XOAUTH2 and
    /// OAUTHBEARER.
    pub enabled: bool,
    /// How long an access token is good for.
    pub access_token_lifetime: Duration,
    /// How long a refresh token is good for after its last use.
    pub refresh_token_lifetime: Duration,
    /// How long an authorization code is good for.
    pub code_lifetime: Duration,
    /// The public clients that may ask (mail apps; no client secrets).
    pub clients: Vec<OAuthClient>,
}

/// A public OAuth client (a mail app) allowed to ask for tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    /// `client_id` as the app sends it.
    pub id: String,
    /// The name people see on the consent page and in the device list.
    pub name: String,
    /// Loopback redirects (`http://localhost`, `127.0.0.1`, `[::1]`) on any port.
    pub loopback: bool,
    /// Other redirect URIs, matched exactly.
    pub redirect_uris: Vec<String>,
}

impl OAuth {
    /// The client with this `client_id`.
    pub fn client(&self, id: &str) -> Option<&OAuthClient> {
        self.clients.iter().find(|c| c.id == id)
    }
}

impl OAuthClient {
    /// Whether the client may be sent to `uri`: exactly one of its configured URIs, or
    /// (when `loopback`) `http://` to `localhost`, `127.0.0.1` or `[::1]` on any port with
    /// any path (RFC 8252 §7.3), without user info, query or fragment.
    pub fn allows_redirect(&self, uri: &str) -> bool {
        if self.redirect_uris.iter().any(|u| u == uri) {
            return true;
        }
        self.loopback && is_loopback_redirect(uri)
    }
}

/// `http://localhost[:port][/path]`, `http://127.0.0.1…` or `http://[::1]…`, nothing else.
fn is_loopback_redirect(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("http://") else { return false };
    if uri.len() > 512 || rest.bytes().any(|b| !b.is_ascii_graphic() || matches!(b, b'?' | b'#' | b'@' | b'\\')) {
        return false;
    }
    let (authority, _path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let host_port = |host: &str, after: &str| -> bool {
        authority.strip_prefix(host).is_some_and(|p| {
            p.is_empty()
                || p.strip_prefix(':')
                    .is_some_and(|n| !n.is_empty() && n.len() <= 5 && n.parse::<u16>().is_ok_and(|port| port != 0))
        }) && after.is_empty()
    };
    host_port("localhost", "") || host_port("127.0.0.1", "") || host_port("[::1]", "")
}

fn oauth(raw: RawOAuth) -> Result<OAuth, ConfigError> {
    if !(60..=86_400).contains(&raw.access_token_secs) {
        return Err(invalid("oauth.access_token_secs", "must be between 60 and 86400 seconds"));
    }
    if !(1..=3650).contains(&raw.refresh_token_days) {
        return Err(invalid("oauth.refresh_token_days", "must be between 1 and 3650 days"));
    }
    if !(10..=600).contains(&raw.code_secs) {
        return Err(invalid("oauth.code_secs", "must be between 10 and 600 seconds"));
    }
    let raw_clients = raw.clients.unwrap_or_else(|| {
        vec![
            RawOAuthClient {
                id: "thunderbird".into(),
                name: Some("Thunderbird".into()),
                loopback: true,
                redirect_uris: vec![],
            },
            RawOAuthClient { id: "open".into(), name: Some("Mail app".into()), loopback: true, redirect_uris: vec![] },
        ]
    });
    let mut clients: Vec<OAuthClient> = Vec::new();
    for c in raw_clients {
        let id = c.id.trim().to_string();
        if id.is_empty() || id.len() > 100 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("oauth.clients.id", "must be 1 to 100 printable characters without spaces"));
        }
        if clients.iter().any(|k| k.id == id) {
            return Err(invalid("oauth.clients.id", format!("`{id}` is listed twice")));
        }
        let name = c.name.as_deref().map(str::trim).filter(|n| !n.is_empty()).unwrap_or(&id).to_string();
        if name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(invalid("oauth.clients.name", "must be at most 64 characters on one line"));
        }
        for u in &c.redirect_uris {
            let ok = (u.starts_with("https://") || is_loopback_redirect(u) || u.contains(":/"))
                && u.len() <= 512
                && u.bytes().all(|b| b.is_ascii_graphic())
                && !u.contains('#');
            if !ok {
                return Err(invalid(
                    "oauth.clients.redirect_uris",
                    format!("`{u}` must be an absolute URI without spaces or fragment"),
                ));
            }
        }
        if !c.loopback && c.redirect_uris.is_empty() {
            return Err(invalid(
                "oauth.clients",
                format!("client `{id}` has no redirect: set loopback or redirect_uris"),
            ));
        }
        clients.push(OAuthClient { id, name, loopback: c.loopback, redirect_uris: c.redirect_uris });
    }
    Ok(OAuth {
        enabled: raw.enabled,
        access_token_lifetime: Duration::from_secs(raw.access_token_secs),
        refresh_token_lifetime: Duration::from_secs(raw.refresh_token_days * 86_400),
        code_lifetime: Duration::from_secs(raw.code_secs),
        clients,
    })
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// `None`: no metrics listener (the default).
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

/// How `serve` writes its log (`[log] format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event (`time  LEVEL target: message key=value …`).
    #[default]
    Text,
    /// One JSON object per line, with the same fields.
    Json,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<String>,
    url: Option<String>,
    url_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for RawStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold the database password.
        f.debug_struct("RawStore").field("backend", &self.backend).finish_non_exhaustive()
    }
}

/// Where accounts, app passwords and TOTP state live.
#[derive(Debug, Clone, Default)]
pub enum StoreBackend {
    /// The embedded sled database in `data_dir` (one node).
    #[default]
    Sled,
    /// A PostgreSQL database shared by several nodes.
    Postgres {
        /// The URL as written, or read from `url_file` when the server starts.
        url: PostgresUrl,
        /// CA file for TLS to the database (else the system roots).
        ca_file: Option<PathBuf>,
    },
}

/// A PostgreSQL URL (it may carry the password), or the file holding it.
#[derive(Clone)]
pub enum PostgresUrl {
    /// Written in the config file.
    Inline(String),
    /// Read from this file (first line).
    File(PathBuf),
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostgresUrl::Inline(_) => f.write_str("Inline(<redacted>)"),
            PostgresUrl::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl PostgresUrl {
    /// The URL (read from its file if configured so).
    pub fn resolve(&self) -> Result<String, UrlFileError> {
        match self {
            PostgresUrl::Inline(u) => Ok(u.clone()),
            PostgresUrl::File(p) => {
                crate::secret::read_secret_line(p).map(|u| u.expose().trim().to_string()).map_err(UrlFileError)
            }
        }
    }
}

/// `store.url_file` holds no URL (unreadable or empty); the text names the file only.
#[derive(Debug, thiserror::Error)]
#[error("cannot read store.url_file {0}")]
pub struct UrlFileError(pub crate::secret::SecretFileError);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxyProtocol {
    #[serde(default)]
    imap: bool,
    #[serde(default)]
    smtp: bool,
    #[serde(default)]
    pop3: bool,
    #[serde(default)]
    sieve: bool,
    #[serde(default)]
    web: bool,
    #[serde(default)]
    trusted: Vec<String>,
}

/// Listeners behind a load balancer that starts every connection with a PROXY protocol
/// header (v1 or v2) carrying the client's address.
#[derive(Debug, Clone, Default)]
pub struct ProxyProtocol {
    /// The IMAP listeners expect the header.
    pub imap: bool,
    /// The SMTP listeners expect the header.
    pub smtp: bool,
    /// The POP3 listeners expect the header.
    pub pop3: bool,
    /// The ManageSieve listeners expect the header.
    pub sieve: bool,
    /// The web listeners expect the header.
    pub web: bool,
    /// The only addresses allowed to connect to those listeners.
    pub trusted: Vec<ipnet::IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccounts {
    #[serde(default = "d_password_check")]
    password_check: String,
    #[serde(default)]
    allowed_domains: Vec<String>,
    #[serde(default = "d_verify_cache")]
    verify_cache_secs: u64,
    #[serde(default = "d_stale_device_days")]
    stale_device_days: u64,
}
fn d_stale_device_days() -> u64 {
    90
}
fn d_password_check() -> String {
    "local".into()
}
fn d_verify_cache() -> u64 {
    60
}
impl Default for RawAccounts {
    fn default() -> Self {
        RawAccounts {
            password_check: d_password_check(),
            allowed_domains: vec![],
            verify_cache_secs: d_verify_cache(),
            stale_device_days: d_stale_device_days(),
        }
    }
}

/// Who checks account passwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    /// mailgate keeps argon2id hashes (set with the CLI, the web step or `user import`).
    Local,
    /// The upstream IMAP server checks them: mailgate logs in there as the user.
    Upstream,
}

/// How accounts and their passwords are handled.
#[derive(Debug, Clone)]
pub struct Accounts {
    /// Who checks account passwords.
    pub password_check: PasswordCheck,
    /// With `upstream`: the domains whose users get a mailgate account on their first
    /// successful login (lower case). Empty: every domain.
    pub allowed_domains: Vec<String>,
    /// How long a successful upstream check of a user + password is remembered.
    pub verify_cache: Duration,
    /// An app password or signed-in app unused this long is marked stale.
    pub stale_after: Duration,
}

impl Accounts {
    /// Whether an account for `username` may be created on its first successful login.
    pub fn may_create(&self, username: &str) -> bool {
        self.password_check == PasswordCheck::Upstream
            && username.rsplit_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && (self.allowed_domains.is_empty() || self.allowed_domains.iter().any(|d| d == domain))
            })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "d_hostname")]
    hostname: String,
    #[serde(default = "d_public_url")]
    public_url: String,
    #[serde(default = "d_data_dir")]
    data_dir: PathBuf,
}
fn d_hostname() -> String {
    "localhost".into()
}
fn d_public_url() -> String {
    "https://localhost:8443".into()
}
fn d_data_dir() -> PathBuf {
    "data".into()
}
impl Default for RawServer {
    fn default() -> Self {
        RawServer { hostname: d_hostname(), public_url: d_public_url(), data_dir: d_data_dir() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default = "d_cert")]
    cert: PathBuf,
    #[serde(default = "d_key")]
    key: PathBuf,
    #[serde(default = "d_reload_check")]
    reload_check_secs: u64,
    #[serde(default)]
    acme: bool,
    #[serde(default)]
    acme_directory: Option<String>,
    #[serde(default)]
    acme_contact: Option<String>,
    #[serde(default)]
    acme_ca_file: Option<PathBuf>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default = "d_acme_renew_before")]
    acme_renew_before_days: u64,
    #[serde(default = "d_acme_check")]
    acme_check_secs: u64,
    #[serde(default)]
    record_crypto: crate::tls::RecordCrypto,
}
fn d_reload_check() -> u64 {
    60
}
fn d_acme_renew_before() -> u64 {
    30
}
fn d_acme_check() -> u64 {
    3600
}
fn d_cert() -> PathBuf {
    "certs/cert.pem".into()
}
fn d_key() -> PathBuf {
    "certs/key.pem".into()
}
impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            cert: d_cert(),
            key: d_key(),
            reload_check_secs: d_reload_check(),
            acme: false,
            acme_directory: None,
            acme_contact: None,
            acme_ca_file: None,
            names: Vec::new(),
            acme_renew_before_days: d_acme_renew_before(),
            acme_check_secs: d_acme_check(),
            record_crypto: crate::tls::RecordCrypto::Auto,
        }
    }
}

/// Default listener addresses of one protocol (loopback, unprivileged ports).
trait DefaultPorts {
    const TLS: &'static str;
    const STARTTLS: &'static str;
}
#[derive(Debug)]
struct ImapPorts;
impl DefaultPorts for ImapPorts {
    const TLS: &'static str = "127.0.0.1:9993";
    const STARTTLS: &'static str = "127.0.0.1:9143";
}
#[derive(Debug)]
struct SmtpPorts;
impl DefaultPorts for SmtpPorts {
    const TLS: &'static str = "127.0.0.1:9465";
    const STARTTLS: &'static str = "127.0.0.1:9587";
}

#[derive(Debug)]
struct Pop3Ports;
impl DefaultPorts for Pop3Ports {
    const TLS: &'static str = "127.0.0.1:9995";
    const STARTTLS: &'static str = "127.0.0.1:9110";
}

/// The ManageSieve listener when `[upstream.sieve]` is written and `[sieve]` is not.
const SIEVE_DEFAULT_LISTEN: &str = "127.0.0.1:14190";

/// `[sieve]`: ManageSieve listeners (STARTTLS, RFC 5804 has no implicit-TLS port).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSieve {
    listen: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners<P: DefaultPorts> {
    listen_tls: Option<Vec<String>>,
    listen_starttls: Option<Vec<String>>,
    #[serde(skip)]
    _p: std::marker::PhantomData<P>,
}
impl<P: DefaultPorts> Default for RawListeners<P> {
    fn default() -> Self {
        RawListeners { listen_tls: None, listen_starttls: None, _p: std::marker::PhantomData }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    listen_tls: Option<Vec<String>>,
    listen_starttls: Option<Vec<String>>,
    #[serde(default = "d_max_message_size")]
    max_message_size: usize,
}
fn d_max_message_size() -> usize {
    50 * 1024 * 1024
}
impl Default for RawSmtp {
    fn default() -> Self {
        RawSmtp { listen_tls: None, listen_starttls: None, max_message_size: d_max_message_size() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    #[serde(default = "d_web_listen")]
    listen: Vec<String>,
    organisation: Option<String>,
    #[serde(default)]
    sign_profiles: bool,
}
fn d_web_listen() -> Vec<String> {
    vec!["127.0.0.1:8443".into()]
}
impl Default for RawWeb {
    fn default() -> Self {
        RawWeb { listen: d_web_listen(), organisation: None, sign_profiles: false }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstreams {
    imap: Option<RawUpstream>,
    smtp: Option<RawUpstream>,
    pop3: Option<RawUpstream>,
    sieve: Option<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Option<String>,
    #[serde(default)]
    tls: UpstreamTls,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    #[serde(default = "d_login")]
    login: String,
    #[serde(default = "d_master_user")]
    master_user: String,
    #[serde(default = "d_master_password_file")]
    master_password_file: PathBuf,
    #[serde(default = "d_separator")]
    master_separator: String,
    /// POP3 and ManageSieve only: pass the client's address with Dovecot's `XCLIENT`.
    xclient: Option<bool>,
}
fn d_login() -> String {
    "master-sasl".into()
}
fn d_master_user() -> String {
    "mailgate".into()
}
fn d_master_password_file() -> PathBuf {
    "config/upstream-master.secret".into()
}
fn d_separator() -> String {
    "*".into()
}
impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            address: None,
            tls: UpstreamTls::None,
            ca_file: None,
            server_name: None,
            login: d_login(),
            master_user: d_master_user(),
            master_password_file: d_master_password_file(),
            master_separator: d_separator(),
            xclient: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "d_failure_delay_ms")]
    auth_failure_delay_ms: u64,
    #[serde(default = "d_ip_penalty_max_ms")]
    ip_penalty_max_ms: u64,
    #[serde(default = "d_preauth_timeout")]
    preauth_timeout_secs: u64,
    #[serde(default = "d_handshake_timeout")]
    tls_handshake_timeout_secs: u64,
    #[serde(default = "d_upstream_timeout")]
    upstream_timeout_secs: u64,
    /// `None`: not in the file (the default applies; see [`Limits::max_connections_set`]).
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default = "d_max_per_ip")]
    max_connections_per_ip: usize,
    #[serde(default = "d_max_hashes")]
    max_concurrent_hashes: usize,
    #[serde(default = "d_max_user_ip")]
    max_sessions_per_user_ip: usize,
    #[serde(default = "d_imap_idle")]
    imap_idle_timeout_secs: u64,
    #[serde(default = "d_ipv6_prefix")]
    ipv6_prefix: u64,
    #[serde(default)]
    app_password_max_messages_per_hour: Option<u32>,
    #[serde(default)]
    app_password_max_recipients_per_hour: Option<u32>,
}
fn d_ipv6_prefix() -> u64 {
    u64::from(crate::addr::DEFAULT_IPV6_PREFIX)
}
fn d_imap_idle() -> u64 {
    IMAP_IDLE_MIN_SECS
}
/// RFC 9051 §5.4: an inactivity autologout timer is at least 30 minutes.
const IMAP_IDLE_MIN_SECS: u64 = 30 * 60;
fn d_max_user_ip() -> usize {
    10
}
fn d_failure_delay_ms() -> u64 {
    2000
}
fn d_ip_penalty_max_ms() -> u64 {
    15_000
}
fn d_preauth_timeout() -> u64 {
    60
}
fn d_handshake_timeout() -> u64 {
    30
}
fn d_upstream_timeout() -> u64 {
    30
}
fn d_max_connections() -> usize {
    10_000
}
fn d_max_per_ip() -> usize {
    50
}
fn d_max_hashes() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}
impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            auth_failure_delay_ms: d_failure_delay_ms(),
            ip_penalty_max_ms: d_ip_penalty_max_ms(),
            preauth_timeout_secs: d_preauth_timeout(),
            tls_handshake_timeout_secs: d_handshake_timeout(),
            upstream_timeout_secs: d_upstream_timeout(),
            max_connections: None,
            max_connections_per_ip: d_max_per_ip(),
            max_concurrent_hashes: d_max_hashes(),
            max_sessions_per_user_ip: d_max_user_ip(),
            imap_idle_timeout_secs: d_imap_idle(),
            ipv6_prefix: d_ipv6_prefix(),
            app_password_max_messages_per_hour: None,
            app_password_max_recipients_per_hour: None,
        }
    }
}

/// How mailgate talks TLS to an upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain TCP: only for loopback or a private, trusted link.
    #[default]
    None,
    /// Plain connect, then STARTTLS; the certificate is verified.
    Starttls,
    /// TLS from the first byte; the certificate is verified.
    Implicit,
}

/// How mailgate logs in upstream as the user without knowing the user's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamLogin {
    /// SASL PLAIN with authzid = user, authcid = master user (Dovecot master users).
    MasterSasl,
    /// `LOGIN user<sep>master masterpassword` (Dovecot `auth_master_user_separator`).
    MasterSeparator,
    /// Postfix `XCLIENT LOGIN=` (SMTP only).
    Xclient,
}

impl std::fmt::Display for UpstreamTls {
    /// The admin's words: "plain", "STARTTLS", "TLS".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamTls::None => "plain",
            UpstreamTls::Starttls => "STARTTLS",
            UpstreamTls::Implicit => "TLS",
        })
    }
}

impl std::fmt::Display for UpstreamLogin {
    /// The admin's words: "master user (SASL PLAIN)", "master user (LOGIN with a
    /// separator)", "XCLIENT".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamLogin::MasterSasl => "master user (SASL PLAIN)",
            UpstreamLogin::MasterSeparator => "master user (LOGIN with a separator)",
            UpstreamLogin::Xclient => "XCLIENT",
        })
    }
}

/// One upstream server, validated.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host:port` as written (the host is used for TLS name checks unless `server_name` is set).
    pub address: String,
    /// TLS mode.
    pub tls: UpstreamTls,
    /// Extra CA file (PEM) trusted for this upstream instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Name checked in the upstream certificate.
    pub server_name: String,
    /// Login style.
    pub login: UpstreamLogin,
    /// Master user name.
    pub master_user: String,
    /// File holding the master password (first line).
    pub master_password_file: PathBuf,
    /// Separator for `master-separator` logins.
    pub master_separator: String,
    /// POP3 and ManageSieve only: tell upstream the client's address with Dovecot's
    /// `XCLIENT ADDR= PORT=` (Dovecot honours it from `login_trusted_networks`, refuses it
    /// otherwise).
    pub xclient: bool,
}

/// Numeric limits. Each default has a precedent (see docs/configuration.md).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Delay before any failed-authentication answer (Dovecot `auth_failure_delay = 2s`);
    /// it doubles with each further failure from the same address.
    pub auth_failure_delay: Duration,
    /// The most an address's failures make a refusal wait (Dovecot's penalty cap, 15 s).
    pub ip_penalty_max: Duration,
    /// Total time a connection may stay unauthenticated (nginx mail `timeout 60s`).
    pub preauth_timeout: Duration,
    /// TLS handshake deadline (Dovecot CVE-2014-3430: stalled handshakes must end).
    pub tls_handshake_timeout: Duration,
    /// Upstream connect + login deadline (Dovecot `login_proxy_timeout = 30s`).
    pub upstream_timeout: Duration,
    /// Connections open at once, all listeners together.
    pub max_connections: usize,
    /// Whether `max_connections` was written in the file (else it is the default): an
    /// open-file limit too low for a value the admin chose is worth a warning at start, one
    /// too low for the default on this machine is not (see `app::raise_fd_limit`).
    pub max_connections_set: bool,
    /// Connections open at once from one client address (Postfix `smtpd_client_connection_count_limit = 50`).
    pub max_connections_per_ip: usize,
    /// Password hashes computed at once (each argon2id hash holds 19 MiB).
    pub max_concurrent_hashes: usize,
    /// Live sessions of one account from one address (Dovecot `mail_max_userip_connections = 10`).
    pub max_sessions_per_user_ip: usize,
    /// A logged-in IMAP client that sends nothing for this long is logged out
    /// (RFC 9051 §5.4: at least 30 minutes; IDLE clients re-issue IDLE within 29).
    pub imap_idle_timeout: Duration,
    /// IPv6 clients are counted per prefix of this length (1..=128) by the per-address
    /// limits: a client picks any address in its /64 at no cost (see [`crate::addr`]).
    pub ipv6_prefix: u8,
    /// The send quota of every app password without its own `--max-messages` (messages
    /// per hour over SMTP); `None`: none.
    pub app_password_max_messages_per_hour: Option<u32>,
    /// The same for recipients (`--max-recipients`).
    pub app_password_max_recipients_per_hour: Option<u32>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name used in greetings.
    pub hostname: String,
    /// Base URL of the web step, without a trailing slash.
    pub public_url: String,
    /// Where the store, the secret key and the admin socket live.
    pub data_dir: PathBuf,
    /// Certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// Private key (PEM).
    pub tls_key: PathBuf,
    /// How often the certificate and key files are checked for a change (`tls.reload_check_secs`).
    pub tls_reload_check: Duration,
    /// `[tls] record_crypto`: which library encrypts the listeners' TLS records.
    pub tls_record_crypto: crate::tls::RecordCrypto,
    /// `[tls] acme = true`: the certificate comes from an ACME CA (`tls_cert`/`tls_key` then
    /// point into `data_dir/acme/`).
    pub acme: Option<AcmeConfig>,
    /// IMAP implicit-TLS listeners.
    pub imap_tls: Vec<SocketAddr>,
    /// IMAP STARTTLS listeners.
    pub imap_starttls: Vec<SocketAddr>,
    /// SMTP implicit-TLS listeners (served by the SMTP work).
    pub smtp_tls: Vec<SocketAddr>,
    /// SMTP STARTTLS listeners (served by the SMTP work).
    pub smtp_starttls: Vec<SocketAddr>,
    /// POP3 implicit-TLS listeners (empty when POP3 is off).
    pub pop3_tls: Vec<SocketAddr>,
    /// POP3 STLS listeners (empty when POP3 is off).
    pub pop3_starttls: Vec<SocketAddr>,
    /// ManageSieve listeners, STARTTLS (empty when ManageSieve is off).
    pub sieve_listen: Vec<SocketAddr>,
    /// Largest message accepted for submission (advertised as SIZE).
    pub smtp_max_message_size: usize,
    /// HTTPS listeners of the web step.
    pub web_listen: Vec<SocketAddr>,
    /// The organisation's name in the web step's header and page titles (`None`: the host
    /// name is shown).
    pub web_organisation: Option<String>,
    /// `[web] sign_profiles`: Apple configuration profiles are signed (CMS) with the TLS
    /// certificate and key in service, so that iOS and macOS show them as verified.
    pub web_sign_profiles: bool,
    /// Upstream IMAP server.
    pub upstream_imap: Upstream,
    /// Upstream SMTP submission server.
    pub upstream_smtp: Upstream,
    /// Upstream POP3 server; `None`: POP3 is off (no `[upstream.pop3]`).
    pub upstream_pop3: Option<Upstream>,
    /// Upstream ManageSieve server; `None`: ManageSieve is off (no `[upstream.sieve]`).
    pub upstream_sieve: Option<Upstream>,
    /// Limits.
    pub limits: Limits,
    /// Account passwords and first-use accounts.
    pub accounts: Accounts,
    /// PROXY protocol on the listeners behind a load balancer.
    pub proxy_protocol: ProxyProtocol,
    /// The store backend.
    pub store: StoreBackend,
    /// The log's format.
    pub log_format: LogFormat,
    /// Where Prometheus metrics are served over plain HTTP (`[metrics] listen`); `None`:
    /// nowhere (the default).
    pub metrics_listen: Option<SocketAddr>,
    /// `[oauth]`: mailgate as the OAuth 2.0 server of mail apps.
    pub oauth: OAuth,
    /// `[policy]`: two-step verification required.
    pub policy: Policy,
    /// `[notify]`: security notifications by mail.
    pub notify: Notify,
}

impl Upstream {
    /// One phrase for the start-up summary, e.g. `127.0.0.1:143, plain, master user
    /// "mailgate" (SASL PLAIN)` or `127.0.0.1:587, STARTTLS, XCLIENT`.
    pub fn summary(&self) -> String {
        let mut how = match self.login {
            UpstreamLogin::MasterSasl => format!("master user \"{}\" (SASL PLAIN)", self.master_user),
            UpstreamLogin::MasterSeparator => {
                format!(
                    "master user \"{}\" (LOGIN user{}{})",
                    self.master_user, self.master_separator, self.master_user
                )
            }
            UpstreamLogin::Xclient => "XCLIENT".to_string(),
        };
        if self.xclient {
            how.push_str(", client address by XCLIENT");
        }
        format!("{}, {}, {how}", self.address, self.tls)
    }
}

impl Config {
    /// What `serve` says about its upstream servers and files before it starts, one line
    /// each, in plain words (no Rust names).
    pub fn startup_summary(&self) -> Vec<String> {
        let mut lines = vec![
            format!("upstream IMAP {}", self.upstream_imap.summary()),
            format!("upstream SMTP {}", self.upstream_smtp.summary()),
        ];
        match &self.upstream_pop3 {
            Some(up) => lines.push(format!("upstream POP3 {}", up.summary())),
            None => lines.push("POP3 off (no [upstream.pop3])".to_string()),
        }
        match &self.upstream_sieve {
            Some(up) => lines.push(format!("upstream ManageSieve {}", up.summary())),
            None => lines.push("ManageSieve off (no [upstream.sieve])".to_string()),
        }
        lines.push(format!("data in {}, certificate {}", self.data_dir.display(), self.tls_cert.display()));
        lines
    }

    /// The embedded defaults (no config file): loopback listeners on unprivileged ports
    /// for every protocol, each in front of the same host's standard ports (POP3 and
    /// ManageSieve included, which a config file turns on only with their upstream
    /// section), data in `data/`.
    pub fn embedded_defaults() -> Config {
        let mut raw = RawConfig::default();
        raw.upstream.pop3 = Some(RawUpstream::default());
        raw.upstream.sieve = Some(RawUpstream::default());
        match Config::from_raw(raw) {
            Ok(c) => c,
            // The defaults are constants checked by a unit test; this arm cannot run.
            Err(e) => unreachable_defaults(e),
        }
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text. `origin` names the text in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })?;
        Config::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let s = raw.server;
        let hostname = s.hostname.trim().to_string();
        if hostname.is_empty() || !hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
            return Err(invalid("server.hostname", "must be a host name (letters, digits, '.', '-')"));
        }
        let hostname_for_notify = hostname.clone();
        let public_url = s.public_url.trim().trim_end_matches('/').to_string();
        if !(public_url.starts_with("https://") || public_url.starts_with("http://"))
            || public_url.len() > 200
            || !public_url.bytes().all(|b| b.is_ascii_graphic() && b != b']' && b != b'"')
        {
            return Err(invalid(
                "server.public_url",
                "must be an http(s) URL without spaces, quotes or ']' (it is shown to mail users)",
            ));
        }
        if s.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty"));
        }
        let imap_tls = addrs("imap.listen_tls", raw.imap.listen_tls, ImapPorts::TLS)?;
        let imap_starttls = addrs("imap.listen_starttls", raw.imap.listen_starttls, ImapPorts::STARTTLS)?;
        let smtp_tls = addrs("smtp.listen_tls", raw.smtp.listen_tls, SmtpPorts::TLS)?;
        let smtp_starttls = addrs("smtp.listen_starttls", raw.smtp.listen_starttls, SmtpPorts::STARTTLS)?;
        let smtp_max_message_size = raw.smtp.max_message_size;
        if !(1024..=(1 << 31)).contains(&smtp_max_message_size) {
            return Err(invalid("smtp.max_message_size", "must be between 1024 and 2147483648 octets"));
        }
        let web_listen = addrs("web.listen", Some(raw.web.listen), "")?;
        let web_organisation = match raw.web.organisation.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(o) if o.chars().count() > MAX_ORGANISATION || o.chars().any(char::is_control) => {
                return Err(invalid(
                    "web.organisation",
                    format!("must be at most {MAX_ORGANISATION} characters on one line (it heads every page)"),
                ));
            }
            Some(o) => Some(o.to_string()),
        };
        let upstream_imap = upstream("upstream.imap", raw.upstream.imap.unwrap_or_default(), "127.0.0.1:143", false)?;
        let upstream_smtp = upstream("upstream.smtp", raw.upstream.smtp.unwrap_or_default(), "127.0.0.1:587", true)?;
        let (pop3_tls, pop3_starttls, upstream_pop3) = pop3(raw.pop3, raw.upstream.pop3)?;
        let (sieve_listen, upstream_sieve) = sieve(raw.sieve, raw.upstream.sieve)?;
        let l = raw.limits;
        let positive = |key: &str, v: u64| {
            if v == 0 { Err(invalid(key, "must be greater than 0")) } else { Ok(v) }
        };
        let limits = Limits {
            auth_failure_delay: Duration::from_millis(l.auth_failure_delay_ms),
            ip_penalty_max: Duration::from_millis(l.ip_penalty_max_ms.max(l.auth_failure_delay_ms)),
            preauth_timeout: Duration::from_secs(positive("limits.preauth_timeout_secs", l.preauth_timeout_secs)?),
            tls_handshake_timeout: Duration::from_secs(positive(
                "limits.tls_handshake_timeout_secs",
                l.tls_handshake_timeout_secs,
            )?),
            upstream_timeout: Duration::from_secs(positive("limits.upstream_timeout_secs", l.upstream_timeout_secs)?),
            max_connections: positive(
                "limits.max_connections",
                l.max_connections.unwrap_or_else(d_max_connections) as u64,
            )? as usize,
            max_connections_set: l.max_connections.is_some(),
            max_connections_per_ip: positive("limits.max_connections_per_ip", l.max_connections_per_ip as u64)?
                as usize,
            max_concurrent_hashes: positive("limits.max_concurrent_hashes", l.max_concurrent_hashes as u64)? as usize,
            max_sessions_per_user_ip: positive("limits.max_sessions_per_user_ip", l.max_sessions_per_user_ip as u64)?
                as usize,
            imap_idle_timeout: if l.imap_idle_timeout_secs < IMAP_IDLE_MIN_SECS {
                return Err(invalid(
                    "limits.imap_idle_timeout_secs",
                    "must be at least 1800 (RFC 9051 §5.4: 30 minutes; IDLE clients refresh every 29)",
                ));
            } else {
                Duration::from_secs(l.imap_idle_timeout_secs)
            },
            ipv6_prefix: match u8::try_from(l.ipv6_prefix) {
                Ok(p @ 1..=128) => p,
                _ => {
                    return Err(invalid(
                        "limits.ipv6_prefix",
                        "must be between 1 and 128 (the IPv6 prefix length counted as one client, usually 64)",
                    ));
                }
            },
            app_password_max_messages_per_hour: match l.app_password_max_messages_per_hour {
                Some(0) => return Err(invalid("limits.app_password_max_messages_per_hour", "must be at least 1")),
                n => n,
            },
            app_password_max_recipients_per_hour: match l.app_password_max_recipients_per_hour {
                Some(0) => return Err(invalid("limits.app_password_max_recipients_per_hour", "must be at least 1")),
                n => n,
            },
        };
        let a = raw.accounts;
        let log_format = match raw.log.format.as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(invalid("log.format", format!("`{other}` is not one of: text, json"))),
        };
        let metrics_listen = match raw.metrics.listen.as_deref().map(str::trim) {
            None => None,
            Some(a) => {
                let addr = a.parse::<SocketAddr>().map_err(|_| {
                    invalid("metrics.listen", format!("`{a}` is not an address:port such as 127.0.0.1:9090"))
                })?;
                if addr.port() == 0 {
                    return Err(invalid("metrics.listen", "needs a port (Prometheus scrapes a fixed address)"));
                }
                let taken = [&imap_tls, &imap_starttls, &smtp_tls, &smtp_starttls, &pop3_tls, &pop3_starttls]
                    .into_iter()
                    .chain([&sieve_listen, &web_listen])
                    .flatten()
                    .any(|l| {
                        l.port() == addr.port()
                            && (l.ip() == addr.ip() || l.ip().is_unspecified() || addr.ip().is_unspecified())
                    });
                if taken {
                    return Err(invalid("metrics.listen", format!("{addr} is already a mail or web listener")));
                }
                Some(addr)
            }
        };
        let password_check = match a.password_check.as_str() {
            "local" => PasswordCheck::Local,
            "upstream" => PasswordCheck::Upstream,
            other => {
                return Err(invalid("accounts.password_check", format!("`{other}` is not one of: local, upstream")));
            }
        };
        let mut allowed_domains = Vec::new();
        for d in a.allowed_domains {
            let d = d.trim().trim_start_matches('@').to_ascii_lowercase();
            if d.is_empty() || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                return Err(invalid("accounts.allowed_domains", format!("`{d}` is not a domain name")));
            }
            allowed_domains.push(d);
        }
        if a.verify_cache_secs > 3600 {
            return Err(invalid("accounts.verify_cache_secs", "must be at most 3600 (a short lifetime)"));
        }
        if !(1..=3650).contains(&a.stale_device_days) {
            return Err(invalid("accounts.stale_device_days", "must be between 1 and 3650"));
        }
        let accounts = Accounts {
            password_check,
            allowed_domains,
            verify_cache: Duration::from_secs(a.verify_cache_secs),
            stale_after: Duration::from_secs(a.stale_device_days * 86_400),
        };
        let p = raw.proxy_protocol;
        let mut trusted = Vec::new();
        for t in &p.trusted {
            let net = t
                .parse::<ipnet::IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| invalid("proxy_protocol.trusted", format!("`{t}` is not an address or address/prefix")))?;
            trusted.push(net);
        }
        if (p.imap || p.smtp || p.pop3 || p.sieve || p.web) && trusted.is_empty() {
            return Err(invalid(
                "proxy_protocol.trusted",
                "must list the load balancers' addresses when a listener expects PROXY headers",
            ));
        }
        let proxy_protocol =
            ProxyProtocol { imap: p.imap, smtp: p.smtp, pop3: p.pop3, sieve: p.sieve, web: p.web, trusted };
        let st = raw.store;
        let store = match st.backend.as_deref().unwrap_or("sled") {
            "sled" => {
                if st.url.is_some() || st.url_file.is_some() || st.ca_file.is_some() {
                    return Err(invalid("store.url", "is only used with backend = \"postgres\""));
                }
                StoreBackend::Sled
            }
            "postgres" => {
                let url = match (st.url, st.url_file) {
                    (Some(u), None) => {
                        if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                            return Err(invalid("store.url", "must be a postgres:// URL"));
                        }
                        PostgresUrl::Inline(u)
                    }
                    (None, Some(f)) => PostgresUrl::File(f),
                    (Some(_), Some(_)) => return Err(invalid("store.url", "give url or url_file, not both")),
                    (None, None) => {
                        return Err(invalid("store.url", "backend = \"postgres\" needs url or url_file"));
                    }
                };
                StoreBackend::Postgres { url, ca_file: st.ca_file }
            }
            other => return Err(invalid("store.backend", format!("`{other}` is not one of: sled, postgres"))),
        };
        let acme = acme_config(&raw.tls, &hostname, &s.data_dir)?;
        let (tls_cert, tls_key) = match &acme {
            Some(a) => (a.cert_path(), a.key_path()),
            None => (raw.tls.cert, raw.tls.key),
        };
        Ok(Config {
            hostname,
            public_url,
            data_dir: s.data_dir,
            tls_cert,
            tls_key,
            acme,
            tls_record_crypto: raw.tls.record_crypto,
            tls_reload_check: match raw.tls.reload_check_secs {
                0 => return Err(invalid("tls.reload_check_secs", "must be greater than 0")),
                secs => Duration::from_secs(secs),
            },
            imap_tls,
            imap_starttls,
            smtp_tls,
            smtp_starttls,
            pop3_tls,
            pop3_starttls,
            sieve_listen,
            smtp_max_message_size,
            web_listen,
            web_organisation,
            web_sign_profiles: raw.web.sign_profiles,
            upstream_imap,
            upstream_smtp,
            upstream_pop3,
            upstream_sieve,
            limits,
            accounts,
            proxy_protocol,
            store,
            log_format,
            metrics_listen,
            oauth: oauth(raw.oauth)?,
            policy: policy(raw.policy)?,
            notify: notify(raw.notify, &hostname_for_notify)?,
        })
    }

    /// The page where a person makes app passwords (used in `[ALERT]` and `534` texts).
    pub fn app_password_url(&self) -> String {
        format!("{}/app-passwords", self.public_url)
    }

    /// The OAuth issuer identifier (RFC 9207 `iss`, RFC 8414 `issuer`): the public URL.
    pub fn oauth_issuer(&self) -> &str {
        &self.public_url
    }

    /// The OAuth authorization server metadata URL (RFC 8414), named in OAUTHBEARER errors.
    pub fn oauth_metadata_url(&self) -> String {
        format!("{}/.well-known/oauth-authorization-server", self.public_url)
    }

    /// Path of the sled database.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Path of the key that encrypts TOTP secrets (kept outside the database).
    pub fn secret_key_path(&self) -> PathBuf {
        self.data_dir.join("secret.key")
    }

    /// Path of the local admin socket.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }
}

#[cold]
fn unreachable_defaults(e: ConfigError) -> Config {
    // Only reachable if a default constant above is edited into an invalid value;
    // `defaults_are_valid` fails first. Report and exit instead of panicking.
    eprintln!("mailgate: built-in defaults are invalid: {e}");
    std::process::exit(70)
}

fn addrs(key: &str, value: Option<Vec<String>>, default: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let list = value.unwrap_or_else(|| if default.is_empty() { vec![] } else { vec![default.to_string()] });
    list.iter()
        .map(|a| {
            a.parse::<SocketAddr>()
                .map_err(|_| invalid(key, format!("`{a}` is not an address:port such as 0.0.0.0:993 or [::]:993")))
        })
        .collect()
}

/// POP3 is on when `[upstream.pop3]` is written: its listeners are `[pop3]`'s, or the
/// embedded defaults when that section is left out. A `[pop3]` listener without
/// `[upstream.pop3]` is an error naming both.
#[allow(clippy::type_complexity)]
fn pop3(
    listeners: Option<RawListeners<Pop3Ports>>,
    up: Option<RawUpstream>,
) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>, Option<Upstream>), ConfigError> {
    let l = listeners.unwrap_or_default();
    let lists = [
        ("pop3.listen_tls", l.listen_tls, Pop3Ports::TLS),
        ("pop3.listen_starttls", l.listen_starttls, Pop3Ports::STARTTLS),
    ];
    let (mut lists, upstream) = optional_service("POP3", "upstream.pop3", "127.0.0.1:110", lists, up)?;
    let starttls = lists.pop().unwrap_or_default();
    let tls = lists.pop().unwrap_or_default();
    Ok((tls, starttls, upstream))
}

/// ManageSieve is on when `[upstream.sieve]` is written, as POP3 is.
fn sieve(
    listeners: Option<RawSieve>,
    up: Option<RawUpstream>,
) -> Result<(Vec<SocketAddr>, Option<Upstream>), ConfigError> {
    let lists = [("sieve.listen", listeners.unwrap_or_default().listen, SIEVE_DEFAULT_LISTEN)];
    let (mut lists, upstream) = optional_service("ManageSieve", "upstream.sieve", "127.0.0.1:4190", lists, up)?;
    Ok((lists.pop().unwrap_or_default(), upstream))
}

/// A protocol that is on only with its upstream section (POP3, ManageSieve): with
/// `[upstream.<x>]`, each listener list as written or its default; without it, no
/// listeners, and a listener written anyway is an error naming both keys.
fn optional_service<const N: usize>(
    name: &str,
    upstream_key: &str,
    default_upstream: &str,
    lists: [(&str, Option<Vec<String>>, &str); N],
    up: Option<RawUpstream>,
) -> Result<(Vec<Vec<SocketAddr>>, Option<Upstream>), ConfigError> {
    let Some(up) = up else {
        for (key, list, _) in lists {
            if !addrs(key, list, "")?.is_empty() {
                return Err(invalid(
                    key,
                    format!(
                        "a {name} listener needs an upstream {name} server: add [{upstream_key}] (address, login, \
                         master_user, master_password_file), or remove the listener"
                    ),
                ));
            }
        }
        return Ok((vec![], None));
    };
    let addrs = lists.into_iter().map(|(key, list, default)| addrs(key, list, default)).collect::<Result<_, _>>()?;
    Ok((addrs, Some(upstream(upstream_key, up, default_upstream, false)?)))
}

fn upstream(key: &str, raw: RawUpstream, default_addr: &str, smtp: bool) -> Result<Upstream, ConfigError> {
    let xclient = match raw.xclient {
        Some(x) if key == "upstream.pop3" || key == "upstream.sieve" => x,
        None => false,
        Some(_) => {
            return Err(invalid(
                &format!("{key}.xclient"),
                "is a POP3 and ManageSieve setting ([upstream.pop3], [upstream.sieve]); IMAP passes the client \
                 address with ID, SMTP with login = \"xclient\"",
            ));
        }
    };
    let address = raw.address.unwrap_or_else(|| default_addr.to_string());
    let (host, port) = split_host_port(&address)
        .ok_or_else(|| invalid(&format!("{key}.address"), format!("`{address}` is not host:port")))?;
    if port == 0 {
        return Err(invalid(&format!("{key}.address"), "port must not be 0"));
    }
    let login = match (raw.login.as_str(), smtp) {
        ("master-sasl", _) => UpstreamLogin::MasterSasl,
        ("master-separator", false) => UpstreamLogin::MasterSeparator,
        ("xclient", true) => UpstreamLogin::Xclient,
        (other, _) => {
            let allowed = if smtp { "master-sasl or xclient" } else { "master-sasl or master-separator" };
            return Err(invalid(&format!("{key}.login"), format!("`{other}` is not one of: {allowed}")));
        }
    };
    if login != UpstreamLogin::Xclient && raw.master_user.trim().is_empty() {
        return Err(invalid(&format!("{key}.master_user"), "must not be empty"));
    }
    if raw.master_user.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(&format!("{key}.master_user"), "must not contain spaces or control characters"));
    }
    if raw.master_separator.is_empty() || raw.master_separator.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(&format!("{key}.master_separator"), "must be a non-empty string without spaces"));
    }
    let server_name = raw.server_name.unwrap_or_else(|| host.to_string());
    if raw.tls != UpstreamTls::None && rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return Err(invalid(&format!("{key}.server_name"), format!("`{server_name}` is not a DNS name or IP address")));
    }
    Ok(Upstream {
        address,
        tls: raw.tls,
        ca_file: raw.ca_file,
        server_name,
        login,
        master_user: raw.master_user,
        master_password_file: raw.master_password_file,
        master_separator: raw.master_separator,
        xclient,
    })
}

/// Splits `host:port` / `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(' ') {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_raw(RawConfig::default()).unwrap();
        assert!(c.imap_tls[0].ip().is_loopback());
        assert_eq!(c.upstream_imap.login, UpstreamLogin::MasterSasl);
        assert_eq!(c.app_password_url(), "https://localhost:8443/app-passwords");
    }

    /// The certificate files are checked every minute unless `tls.reload_check_secs` says
    /// otherwise; 0 is refused.
    #[test]
    fn the_certificate_check_interval() {
        assert_eq!(Config::from_toml_str("", "t").unwrap().tls_reload_check, Duration::from_secs(60));
        let c = Config::from_toml_str("[tls]\nreload_check_secs = 5", "t").unwrap();
        assert_eq!(c.tls_reload_check, Duration::from_secs(5));
        let e = Config::from_toml_str("[tls]\nreload_check_secs = 0", "t").unwrap_err().to_string();
        assert!(e.contains("tls.reload_check_secs"), "{e}");
    }

    /// The start-up summary is in the admin's words: no Rust names like `None` or
    /// `MasterSasl`.
    #[test]
    fn the_startup_summary_uses_plain_words() {
        let c = Config::embedded_defaults();
        assert_eq!(
            c.startup_summary(),
            [
                "upstream IMAP 127.0.0.1:143, plain, master user \"mailgate\" (SASL PLAIN)",
                "upstream SMTP 127.0.0.1:587, plain, master user \"mailgate\" (SASL PLAIN)",
                "upstream POP3 127.0.0.1:110, plain, master user \"mailgate\" (SASL PLAIN)",
                "upstream ManageSieve 127.0.0.1:4190, plain, master user \"mailgate\" (SASL PLAIN)",
                "data in data, certificate certs/cert.pem",
            ]
        );
        let c = Config::from_toml_str(
            "[upstream.imap]\naddress = \"imap.example.com:993\"\ntls = \"implicit\"\nlogin = \"master-separator\"\n\
             [upstream.smtp]\naddress = \"smtp.example.com:587\"\ntls = \"starttls\"\nlogin = \"xclient\"\n",
            "test",
        )
        .unwrap();
        let lines = c.startup_summary();
        assert_eq!(lines[0], "upstream IMAP imap.example.com:993, TLS, master user \"mailgate\" (LOGIN user*mailgate)");
        assert_eq!(lines[1], "upstream SMTP smtp.example.com:587, STARTTLS, XCLIENT");
        for l in &lines {
            for rust in ["None", "Some(", "Implicit", "Starttls", "MasterSasl", "MasterSeparator", "Xclient"] {
                assert!(!l.contains(rust), "{l}");
            }
        }
        assert_eq!(UpstreamLogin::MasterSasl.to_string(), "master user (SASL PLAIN)");
        assert_eq!(UpstreamTls::None.to_string(), "plain");
    }

    /// `limits.max_connections` written in the file is told apart from the default (the
    /// open-file warning is only for a value the admin chose).
    #[test]
    fn max_connections_set_or_default() {
        let d = Config::embedded_defaults();
        assert_eq!((d.limits.max_connections, d.limits.max_connections_set), (10_000, false));
        let c = Config::from_toml_str("[limits]\nmax_connections = 3000\n", "test").unwrap();
        assert_eq!((c.limits.max_connections, c.limits.max_connections_set), (3000, true));
        assert!(Config::from_toml_str("[limits]\nmax_connections = 0\n", "test").is_err());
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../config/mailgate.example.toml");
        let c = Config::from_toml_str(text, "example").unwrap();
        assert_eq!(c.hostname, "mail.example.com");
        assert_eq!(c.upstream_imap.address, "127.0.0.1:1143");
        assert!(c.upstream_pop3.is_none() && c.pop3_tls.is_empty(), "POP3 is off in the example");
        // Its commented POP3 block, uncommented, turns POP3 on.
        let mut on = false;
        let uncommented: Vec<&str> = text
            .lines()
            .map(|l| {
                on = l == "# [pop3]" || (on && !l.is_empty());
                if on { l.trim_start_matches("# ") } else { l }
            })
            .collect();
        let c = Config::from_toml_str(&uncommented.join("\n"), "example").unwrap();
        let up = c.upstream_pop3.as_ref().unwrap();
        assert_eq!((up.address.as_str(), up.xclient), ("127.0.0.1:1110", true));
        assert_eq!(c.pop3_tls, ["0.0.0.0:995".parse::<SocketAddr>().unwrap()]);
        // Metrics are off in the example; its commented block turns them on, on loopback.
        assert_eq!(Config::from_toml_str(text, "example").unwrap().metrics_listen, None);
        let on = text.replace("# [metrics]\n# listen", "[metrics]\nlisten");
        let c = Config::from_toml_str(&on, "example").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn debian_file_parses_with_metrics_off() {
        let text = include_str!("../debian/mailgate.toml");
        assert_eq!(Config::from_toml_str(text, "debian").unwrap().metrics_listen, None);
        let on = text.replace("# [metrics]\n# listen", "[metrics]\nlisten");
        let c = Config::from_toml_str(&on, "debian").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml_str("[server]\nhostnme = \"x\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("hostnme"), "{e}");
    }

    /// `[tls] acme = true`: the names ordered, the files under data_dir/acme, and each
    /// missing or unusable key named.
    #[test]
    fn acme_settings() {
        let ok = "[server]\nhostname = \"Mail.Example.com\"\ndata_dir = \"/var/lib/mg\"\n[tls]\nacme = true\n\
                  acme_directory = \"https://acme.example/dir\"\nacme_contact = \"postmaster@example.com\"\n";
        let c =
            Config::from_toml_str(&format!("{ok}names = [\"imap.example.com\", \"mail.example.com\"]\n"), "t").unwrap();
        let a = c.acme.as_ref().unwrap();
        assert_eq!(a.names, ["mail.example.com", "imap.example.com"]);
        assert_eq!(a.contact, "mailto:postmaster@example.com");
        assert_eq!(a.renew_before, Duration::from_secs(30 * 86_400));
        assert_eq!(a.check, Duration::from_secs(3600));
        assert_eq!(c.tls_cert, PathBuf::from("/var/lib/mg/acme/cert.pem"));
        assert_eq!(c.tls_key, PathBuf::from("/var/lib/mg/acme/key.pem"));
        assert_eq!(a.account_path(), PathBuf::from("/var/lib/mg/acme/account.json"));
        assert!(Config::embedded_defaults().acme.is_none());

        let named = |text: &str| match Config::from_toml_str(text, "t") {
            Err(ConfigError::Invalid { key, reason }) => format!("{key}: {reason}"),
            other => panic!("{other:?}"),
        };
        let e = named("[tls]\nacme = true\nacme_contact = \"a@example.com\"\n");
        assert!(e.starts_with("tls.acme_directory: is required"), "{e}");
        let e = named("[tls]\nacme = true\nacme_directory = \"https://acme.example/dir\"\n");
        assert!(e.starts_with("tls.acme_contact: is required"), "{e}");
        let e = named(&ok.replace("https://acme.example/dir", "http://acme.example/dir"));
        assert!(e.starts_with("tls.acme_directory: must be"), "{e}");
        let e = named(&ok.replace("postmaster@example.com", "postmaster"));
        assert!(e.starts_with("tls.acme_contact:"), "{e}");
        let e = named(&ok.replace("Mail.Example.com", "127.0.0.1"));
        assert!(e.starts_with("server.hostname: must be a DNS name"), "{e}");
        let e = named(&ok.replace("Mail.Example.com", "mail-.example.com"));
        assert!(e.starts_with("server.hostname:"), "{e}");
        let e = named(&format!("{ok}names = [\"*.example.com\"]\n"));
        assert!(e.starts_with("tls.names: `*.example.com` is not a DNS name"), "{e}");
        assert!(named(&format!("{ok}acme_check_secs = 0\n")).starts_with("tls.acme_check_secs:"));
        assert!(named(&format!("{ok}acme_renew_before_days = 0\n")).starts_with("tls.acme_renew_before_days:"));
        // ACME keys without `acme = true` are a mistake, not silently ignored.
        let e = named("[tls]\nacme_directory = \"https://acme.example/dir\"\n");
        assert_eq!(e, "tls.acme_directory: is only used with `tls.acme = true`");
        assert!(named("[tls]\nnames = [\"a.example.com\"]\n").starts_with("tls.names:"));
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("[imap]\nlisten_tls = [\"nope\"]", "imap.listen_tls"),
            ("[upstream.imap]\nlogin = \"xclient\"", "upstream.imap.login"),
            ("[upstream.imap]\naddress = \"host\"", "upstream.imap.address"),
            ("[server]\npublic_url = \"ftp://x\"", "server.public_url"),
            ("[limits]\npreauth_timeout_secs = 0", "limits.preauth_timeout_secs"),
            ("[limits]\nimap_idle_timeout_secs = 600", "limits.imap_idle_timeout_secs"),
            ("[limits]\nipv6_prefix = 0", "limits.ipv6_prefix"),
            ("[limits]\nipv6_prefix = 129", "limits.ipv6_prefix"),
            ("[limits]\nipv6_prefix = 4294967296", "limits.ipv6_prefix"),
            ("[proxy_protocol]\nimap = true", "proxy_protocol.trusted"),
            ("[store]\nbackend = \"mysql\"", "store.backend"),
            ("[store]\nbackend = \"postgres\"", "store.url"),
            ("[store]\nbackend = \"postgres\"\nurl = \"mysql://x\"", "store.url"),
            ("[proxy_protocol]\ntrusted = [\"10.0.0.300\"]", "proxy_protocol.trusted"),
            ("[notify]\nfrom = \"no-at-sign\"", "notify.from"),
            ("[notify]\nrelay = \"localhost\"", "notify.relay"),
            ("[notify]\nkinds_off = [\"lunch\"]", "notify.kinds_off"),
            ("[notify]\nmax_per_hour = 0", "notify.max_per_hour"),
        ] {
            let e = Config::from_toml_str(text, "t").unwrap_err().to_string();
            assert!(e.contains(key), "{text} -> {e}");
        }
        let e = Config::from_toml_str("[upstream.imap]\ntls = \"maybe\"", "t").unwrap_err().to_string();
        assert!(e.contains("tls") && e.contains("maybe"), "{e}");
    }

    /// `[notify]`: on by default, from `mailgate@<hostname>`, through upstream, 10 an hour;
    /// each key read as written.
    #[test]
    fn notify_defaults_and_keys() {
        let c = Config::from_toml_str("[server]\nhostname = \"mail.example.com\"", "t").unwrap();
        assert_eq!(
            c.notify,
            Notify {
                enabled: true,
                from: "mailgate@mail.example.com".into(),
                relay: None,
                kinds_off: vec![],
                max_per_hour: 10,
                first_retry: Duration::from_secs(60),
            }
        );
        let text = "[notify]\nenabled = false\nfrom = \"security@example.com\"\nrelay = \"127.0.0.1:25\"\n\
                    kinds_off = [\"new_device\", \"Account_Locked\"]\nmax_per_hour = 3";
        let n = Config::from_toml_str(text, "t").unwrap().notify;
        assert_eq!(
            (n.enabled, n.from.as_str(), n.relay.as_deref()),
            (false, "security@example.com", Some("127.0.0.1:25"))
        );
        assert_eq!((n.kinds_off, n.max_per_hour), (vec!["new_device".to_string(), "account_locked".into()], 3));
        let on = Notify { kinds_off: vec!["new_device".into()], ..Notify::default() };
        assert!(on.sends("totp_enabled") && !on.sends("new_device"));
        assert!(!Notify { enabled: false, ..Notify::default() }.sends("totp_enabled"));
    }

    #[test]
    fn ipv6_prefix_defaults_to_64_and_takes_1_to_128() {
        assert_eq!(Config::from_raw(RawConfig::default()).unwrap().limits.ipv6_prefix, 64);
        for p in [1u8, 48, 56, 128] {
            let c = Config::from_toml_str(&format!("[limits]\nipv6_prefix = {p}"), "t").unwrap();
            assert_eq!(c.limits.ipv6_prefix, p);
        }
    }

    #[test]
    fn metrics_are_off_unless_a_listen_address_is_given() {
        assert_eq!(Config::from_raw(RawConfig::default()).unwrap().metrics_listen, None);
        let c = Config::from_toml_str("[metrics]\nlisten = \"127.0.0.1:9090\"", "t").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let c = Config::from_toml_str("[metrics]\nlisten = \" [::1]:9090 \"", "t").unwrap();
        assert_eq!(c.metrics_listen, Some("[::1]:9090".parse().unwrap()));
        for bad in ["localhost:9090", "127.0.0.1", "127.0.0.1:0", "0.0.0.0:9993", "127.0.0.1:8443", ""] {
            let e = Config::from_toml_str(&format!("[metrics]\nlisten = \"{bad}\""), "t").unwrap_err().to_string();
            assert!(e.contains("metrics.listen"), "{bad} -> {e}");
        }
        assert!(Config::from_toml_str("[metrics]\npath = \"/m\"", "t").is_err(), "unknown key");
    }

    #[test]
    fn log_format_is_text_or_json() {
        assert_eq!(Config::from_raw(RawConfig::default()).unwrap().log_format, LogFormat::Text);
        assert_eq!(Config::from_toml_str("[log]\nformat = \"text\"", "t").unwrap().log_format, LogFormat::Text);
        assert_eq!(Config::from_toml_str("[log]\nformat = \"json\"", "t").unwrap().log_format, LogFormat::Json);
        let e = Config::from_toml_str("[log]\nformat = \"xml\"", "t").unwrap_err().to_string();
        assert!(e.contains("log.format"), "{e}");
        assert!(Config::from_toml_str("[log]\nlevel = \"debug\"", "t").is_err(), "unknown key");
    }

    #[test]
    fn web_sign_profiles_is_off_by_default_and_a_bool() {
        assert!(!Config::from_raw(RawConfig::default()).unwrap().web_sign_profiles);
        assert!(Config::from_toml_str("[web]\nsign_profiles = true", "t").unwrap().web_sign_profiles);
        let e = Config::from_toml_str("[web]\nsign_profiles = \"yes\"", "t").unwrap_err().to_string();
        assert!(e.contains("sign_profiles"), "{e}");
    }

    #[test]
    fn web_organisation_is_optional_trimmed_and_one_short_line() {
        assert_eq!(Config::from_raw(RawConfig::default()).unwrap().web_organisation, None);
        let c = Config::from_toml_str("[web]\norganisation = \"  Example Mail  \"", "t").unwrap();
        assert_eq!(c.web_organisation.as_deref(), Some("Example Mail"));
        let c = Config::from_toml_str("[web]\norganisation = \" \"", "t").unwrap();
        assert_eq!(c.web_organisation, None);
        for bad in ["\"a\\nb\"", &format!("\"{}\"", "x".repeat(61))] {
            let e = Config::from_toml_str(&format!("[web]\norganisation = {bad}"), "t").unwrap_err().to_string();
            assert!(e.contains("web.organisation"), "{bad} -> {e}");
        }
    }

    #[test]
    fn smtp_accepts_xclient() {
        let c = Config::from_toml_str("[upstream.smtp]\nlogin = \"xclient\"", "t").unwrap();
        assert_eq!(c.upstream_smtp.login, UpstreamLogin::Xclient);
    }

    #[test]
    fn the_store_url_comes_from_url_file_without_reaching_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("store-url.secret");
        std::fs::write(&file, "postgres://mailgate:s3cret@db/mailgate?sslmode=require\r\nignored\n").unwrap();
        let toml = format!("[store]\nbackend = \"postgres\"\nurl_file = \"{}\"\n", file.display());
        let c = Config::from_toml_str(&toml, "t").unwrap();
        let StoreBackend::Postgres { url, .. } = &c.store else { panic!("{:?}", c.store) };
        assert_eq!(url.resolve().unwrap(), "postgres://mailgate:s3cret@db/mailgate?sslmode=require");
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(url.resolve().unwrap_err().to_string().contains("is empty"));
        std::fs::remove_file(&file).unwrap();
        assert!(url.resolve().unwrap_err().to_string().starts_with("cannot read store.url_file "));
        let inline = Config::from_toml_str("[store]\nbackend = \"postgres\"\nurl = \"postgres://u:pw@h/d\"", "t");
        assert!(!format!("{:?}", inline.unwrap()).contains("pw@"));
    }

    /// In a config file, no `[upstream.pop3]` and no `[pop3]` listeners: POP3 is off, and
    /// `[pop3]` with empty lists is the same; ManageSieve likewise. With no config file
    /// (the embedded defaults) both are on, in front of the same host's standard ports.
    #[test]
    fn pop3_and_sieve_are_off_without_their_upstream() {
        for text in ["", "[pop3]\n", "[pop3]\nlisten_tls = []\nlisten_starttls = []\n[sieve]\nlisten = []\n"] {
            let c = Config::from_toml_str(text, "t").unwrap();
            assert!(c.upstream_pop3.is_none() && c.pop3_tls.is_empty() && c.pop3_starttls.is_empty(), "{text}");
            assert!(c.upstream_sieve.is_none() && c.sieve_listen.is_empty(), "{text}");
        }
        let d = Config::embedded_defaults();
        assert_eq!(d.upstream_pop3.map(|u| u.address).as_deref(), Some("127.0.0.1:110"));
        assert_eq!(
            (&d.pop3_tls[..], &d.pop3_starttls[..]),
            (&[addr("127.0.0.1:9995")][..], &[addr("127.0.0.1:9110")][..])
        );
        assert_eq!(d.upstream_sieve.map(|u| u.address).as_deref(), Some("127.0.0.1:4190"));
        assert_eq!(d.sieve_listen, [addr("127.0.0.1:14190")]);
    }

    /// `[upstream.sieve]` alone turns ManageSieve on with the embedded listener; `[sieve]`
    /// names its own; a listener without the upstream is refused naming both; `xclient`
    /// and `proxy_protocol.sieve` as for POP3.
    #[test]
    fn sieve_listeners_come_with_the_upstream() {
        let c = Config::from_toml_str("[upstream.sieve]\naddress = \"127.0.0.1:4190\"\nxclient = true\n", "t").unwrap();
        assert_eq!(c.sieve_listen, [addr("127.0.0.1:14190")]);
        assert!(c.upstream_sieve.as_ref().unwrap().xclient);
        assert_eq!(
            c.startup_summary()[3],
            "upstream ManageSieve 127.0.0.1:4190, plain, master user \"mailgate\" (SASL PLAIN), client address by XCLIENT"
        );
        let c =
            Config::from_toml_str("[sieve]\nlisten = [\"0.0.0.0:4190\"]\n[upstream.sieve]\ntls = \"starttls\"\n", "t")
                .unwrap();
        assert_eq!(c.sieve_listen, [addr("0.0.0.0:4190")]);
        assert_eq!(c.upstream_sieve.unwrap().tls, UpstreamTls::Starttls);
        for (text, key, also) in [
            ("[sieve]\nlisten = [\"127.0.0.1:4190\"]\n", "sieve.listen", "[upstream.sieve]"),
            ("[upstream.sieve]\n[sieve]\nlisten = [\"nope\"]", "sieve.listen", "not an address"),
            ("[upstream.sieve]\nlogin = \"xclient\"", "upstream.sieve.login", "master-separator"),
            ("[proxy_protocol]\nsieve = true", "proxy_protocol.trusted", "load balancers"),
        ] {
            let e = Config::from_toml_str(text, "t").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(also), "{text} -> {e}");
        }
    }

    /// A POP3 listener without `[upstream.pop3]` is refused, the error naming both.
    #[test]
    fn a_pop3_listener_needs_its_upstream() {
        for (text, key) in [
            ("[pop3]\nlisten_tls = [\"127.0.0.1:995\"]\n", "pop3.listen_tls"),
            ("[pop3]\nlisten_starttls = [\"127.0.0.1:110\"]\n", "pop3.listen_starttls"),
        ] {
            let e = Config::from_toml_str(text, "t").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("[upstream.pop3]"), "{text} -> {e}");
        }
    }

    /// `[upstream.pop3]` alone turns POP3 on with the embedded listeners (loopback,
    /// unprivileged, none shared with IMAP or SMTP); `[pop3]` names its own.
    #[test]
    fn pop3_listeners_come_with_the_upstream() {
        let c = Config::from_toml_str("[upstream.pop3]\naddress = \"127.0.0.1:1110\"\n", "t").unwrap();
        assert_eq!(c.pop3_tls, [addr("127.0.0.1:9995")]);
        assert_eq!(c.pop3_starttls, [addr("127.0.0.1:9110")]);
        let d = Config::embedded_defaults();
        let mut all = [&d.imap_tls, &d.imap_starttls, &d.smtp_tls, &d.smtp_starttls, &d.web_listen, &d.pop3_tls]
            .into_iter()
            .chain([&d.pop3_starttls, &d.sieve_listen])
            .flatten()
            .map(|a| a.port())
            .collect::<Vec<_>>();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a default port is used twice: {all:?}");
        let up = c.upstream_pop3.as_ref().unwrap();
        assert_eq!((up.address.as_str(), up.login, up.xclient), ("127.0.0.1:1110", UpstreamLogin::MasterSasl, false));
        assert_eq!(
            c.startup_summary()[2],
            "upstream POP3 127.0.0.1:1110, plain, master user \"mailgate\" (SASL PLAIN)"
        );
        let c = Config::from_toml_str(
            "[pop3]\nlisten_tls = [\"0.0.0.0:995\"]\nlisten_starttls = []\n\
             [upstream.pop3]\naddress = \"pop.example.com:995\"\ntls = \"implicit\"\nlogin = \"master-separator\"\n\
             master_user = \"gate\"\nmaster_password_file = \"/etc/m.secret\"\nxclient = true\n",
            "t",
        )
        .unwrap();
        assert_eq!((&c.pop3_tls[..], &c.pop3_starttls[..]), (&[addr("0.0.0.0:995")][..], &[][..]));
        let up = c.upstream_pop3.as_ref().unwrap();
        assert_eq!((up.tls, up.login, up.xclient), (UpstreamTls::Implicit, UpstreamLogin::MasterSeparator, true));
        assert_eq!(up.master_password_file, PathBuf::from("/etc/m.secret"));
        assert_eq!(
            c.startup_summary()[2],
            "upstream POP3 pop.example.com:995, TLS, master user \"gate\" (LOGIN user*gate), client address by XCLIENT"
        );
    }

    /// `[upstream.pop3]` takes `[upstream.imap]`'s keys and values; `xclient` is POP3's
    /// alone; `proxy_protocol.pop3` needs the trusted addresses like the others.
    #[test]
    fn bad_pop3_values_are_named() {
        for (text, key) in [
            ("[upstream.pop3]\nlogin = \"xclient\"", "upstream.pop3.login"),
            ("[upstream.pop3]\naddress = \"host\"", "upstream.pop3.address"),
            ("[upstream.pop3]\nmaster_user = \"\"", "upstream.pop3.master_user"),
            ("[upstream.pop3]\n[pop3]\nlisten_tls = [\"nope\"]", "pop3.listen_tls"),
            ("[upstream.imap]\nxclient = true", "upstream.imap.xclient"),
            ("[upstream.smtp]\nxclient = true", "upstream.smtp.xclient"),
            ("[proxy_protocol]\npop3 = true", "proxy_protocol.trusted"),
        ] {
            let e = Config::from_toml_str(text, "t").unwrap_err().to_string();
            assert!(e.contains(key), "{text} -> {e}");
        }
        let c = Config::from_toml_str("[proxy_protocol]\npop3 = true\ntrusted = [\"10.0.0.1\"]", "t").unwrap();
        assert!(c.proxy_protocol.pop3 && !c.proxy_protocol.imap);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("[::1]:143"), Some(("::1", 143)));
        assert_eq!(split_host_port("mail.example.com:993"), Some(("mail.example.com", 993)));
        assert_eq!(split_host_port("x"), None);
    }
}
