//! Security notifications by mail (issue 18 point 4): a short mail to the account when an
//! app password or a signed-in app is created, a new device signs in, a backup code is
//! used or the codes are remade, two-step verification goes on or off, the account
//! password changes, sign-ins are paused after failures, and (weekly) when `[policy]`
//! wants two-step verification that is not on yet.
//!
//! Three parts:
//! * [`Notifier`], the handle the places that make a change call ([`Notifier::notify`]):
//!   it checks `[notify]` (on, the kind not turned off), takes one slot of the account's
//!   flood budget (`notify:<user>`, `max_per_hour`; over it the notice is dropped with a
//!   log line and, once an hour, a `notification_suppressed` audit event), and queues the
//!   notice in the store: one write, never an error for the caller (failures are logged).
//! * [`render`]: the mail (plain text and a simple HTML alternative): what happened, when
//!   (UTC), from which address and client, and what to do if it was not them (the devices
//!   page, `public_url/app-passwords`). A notice holds only labels, ids, addresses and
//!   client names, never a password, code or token; its facts are made printable ASCII
//!   when queued, so no header or line can be forged through a label.
//! * [`run`], the sender task `app::run` starts: it wakes on each enqueue and every 30 s,
//!   claims due notices with a lease (on PostgreSQL no two nodes claim one), sends each
//!   through `[notify] relay` (plain SMTP, no login) or else `[upstream.smtp]` logged in as
//!   the recipient account (master SASL or XCLIENT, as the SMTP front does), and deletes
//!   it; a failure is retried after 1 min, doubling up to 1 h; a notice older than a day
//!   is dropped with one log line. Once an hour it also queues the weekly reminders of
//!   `[policy]` accounts still in their grace period.
//!
//! Depends on store, config, auth (the clock, random ids) and, for sending, net (the
//! SMTP upstream login). `accounts` and `auth` hold a `Notifier`; nothing here calls them.

use crate::auth::clock::{Clock, SystemClock};
use crate::config::{Config, Notify, UpstreamLogin, UpstreamTls};
use crate::net::upstream::{Connector, UpstreamFailure};
use crate::proto::smtp_upstream::Style;
use crate::secret::SecretString;
use crate::store::{AuditEvent, Budget, Notice, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// A notice not sent within a day is dropped (what it reports is old news by then).
pub const MAX_AGE_SECS: u64 = 86_400;
/// The longest wait between two attempts of one notice.
pub const MAX_RETRY_SECS: u64 = 3600;
/// The sender looks at the queue at least this often (a notice retried, another node's).
const POLL: Duration = Duration::from_secs(30);
/// A claimed notice is hidden from other claims this long (a send takes far less; a node
/// that dies mid-send leaves it to be claimed again then).
const LEASE_SECS: u64 = 300;
/// Notices claimed at once.
const BATCH: usize = 20;
/// `[policy]` reminders go to an account at most this often.
const REMINDER_EVERY_SECS: u64 = 7 * 86_400;
/// How often the sender looks for accounts due a reminder.
const REMINDER_SCAN: Duration = Duration::from_secs(3600);
/// A fact's value is cut to this many characters.
const MAX_FACT_LEN: usize = 100;

/// What happened: one kind of notice. Its name is `[notify] kinds_off`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An app password was made.
    AppPasswordCreated,
    /// A mail app signed in through the browser (an OAuth grant).
    OAuthGrantCreated,
    /// A sign-in on a mail port from an address the account never used (in 90 days).
    NewDevice,
    /// A backup code was used at sign-in.
    BackupCodeUsed,
    /// A new set of backup codes replaced the old one.
    BackupCodesGenerated,
    /// Two-step verification turned on.
    TotpEnabled,
    /// Two-step verification turned off.
    TotpDisabled,
    /// The account password changed.
    AccountPasswordChanged,
    /// The account's guess budget ran out: sign-ins with the password (or codes) paused.
    AccountLocked,
    /// `[policy]` wants two-step verification, and the grace period is running.
    SecondFactorReminder,
    /// An app password used up its send quota (issue 20).
    SendQuotaReached,
}

impl Kind {
    /// Every kind, in [`crate::config::NOTICE_KINDS`]'s order.
    pub const ALL: [Kind; 11] = [
        Kind::AppPasswordCreated,
        Kind::OAuthGrantCreated,
        Kind::NewDevice,
        Kind::BackupCodeUsed,
        Kind::BackupCodesGenerated,
        Kind::TotpEnabled,
        Kind::TotpDisabled,
        Kind::AccountPasswordChanged,
        Kind::AccountLocked,
        Kind::SecondFactorReminder,
        Kind::SendQuotaReached,
    ];

    /// The name (stored, and in `kinds_off`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AppPasswordCreated => "app_password_created",
            Kind::OAuthGrantCreated => "oauth_grant_created",
            Kind::NewDevice => "new_device",
            Kind::BackupCodeUsed => "backup_code_used",
            Kind::BackupCodesGenerated => "backup_codes_generated",
            Kind::TotpEnabled => "totp_enabled",
            Kind::TotpDisabled => "totp_disabled",
            Kind::AccountPasswordChanged => "account_password_changed",
            Kind::AccountLocked => "account_locked",
            Kind::SendQuotaReached => "send_quota_reached",
            Kind::SecondFactorReminder => "second_factor_reminder",
        }
    }

    /// The kind of a stored name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The mail's subject.
    pub fn subject(self) -> &'static str {
        match self {
            Kind::AppPasswordCreated => "A new app password was created",
            Kind::OAuthGrantCreated => "A mail app was signed in to your account",
            Kind::NewDevice => "New sign-in from a new device",
            Kind::BackupCodeUsed => "A backup code was used to sign in",
            Kind::BackupCodesGenerated => "New backup codes were created",
            Kind::TotpEnabled => "Two-step verification was turned on",
            Kind::TotpDisabled => "Two-step verification was turned off",
            Kind::AccountPasswordChanged => "Your account password was changed",
            Kind::AccountLocked => "Sign-ins to your account were paused after failed attempts",
            Kind::SecondFactorReminder => "Please turn on two-step verification",
            Kind::SendQuotaReached => "An app password reached its sending limit",
        }
    }

    /// The first paragraph: what happened.
    fn what(self) -> &'static str {
        match self {
            Kind::AppPasswordCreated => {
                "A new app password was created for your mail account. Mail apps can sign in with it."
            }
            Kind::OAuthGrantCreated => {
                "A mail app was signed in to your mail account through the browser. It can read and send mail as you."
            }
            Kind::NewDevice => {
                "Your mail account was signed in to from a device or network it was not used from before."
            }
            Kind::BackupCodeUsed => "One of your backup codes was used to sign in to your account.",
            Kind::BackupCodesGenerated => "A new set of backup codes was created; the old codes no longer work.",
            Kind::TotpEnabled => {
                "Two-step verification was turned on. Mail apps now need an app password; the account password alone no longer works in them."
            }
            Kind::TotpDisabled => {
                "Two-step verification was turned off. Your account is now protected by its password only."
            }
            Kind::AccountPasswordChanged => {
                "The password of your mail account was changed. Mail apps that used the old password were signed out."
            }
            Kind::AccountLocked => {
                "Someone tried many wrong passwords or codes for your account, so such sign-ins are paused for a while. Devices you signed in from before keep working."
            }
            Kind::SecondFactorReminder => {
                "Your organisation requires two-step verification for your account, and it is not on yet. Until the date below your account password still works in mail apps; after it, it will not."
            }
            Kind::SendQuotaReached => {
                "An app password of yours reached the number of messages or recipients it may send in an hour, so further mail from it is refused until the time below. A device that suddenly sends this much may have been taken over."
            }
        }
    }

    /// What to do if it was not them.
    fn advice(self) -> &'static str {
        match self {
            Kind::SecondFactorReminder => "Turn on two-step verification on your account page:",
            Kind::AccountLocked => {
                "If these attempts were not yours, nothing got in: no action is needed, but consider a stronger password. Review your devices here:"
            }
            _ => {
                "If this was you, there is nothing to do. If it was not you, sign in at once, revoke any app password or device you do not know, and change your account password:"
            }
        }
    }
}

/// How each fact is labelled in the mail (anything else is shown by its name).
fn fact_label(name: &str) -> &str {
    match name {
        "label" => "Name",
        "id" => "Id",
        "scopes" => "May use",
        "app" => "App",
        "address" => "From address",
        "client" => "Client",
        "protocol" => "Protocol",
        "left" => "Codes left",
        "by" => "Changed",
        "what" => "Paused",
        "until" => "Grace period ends",
        "quota" => "Limit",
        "frees" => "Sends again from",
        other => other,
    }
}

/// A fact's value as stored: printable ASCII (anything else becomes `?`), at most
/// [`MAX_FACT_LEN`] characters.
fn clean(value: &str) -> String {
    value.chars().take(MAX_FACT_LEN).map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// The `[notify]` settings, the store and the sender's wake-up: what queues notices.
/// Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    store: Arc<dyn Store>,
    settings: Arc<Notify>,
    wake: Arc<tokio::sync::Notify>,
    clock: Arc<dyn Clock>,
}

impl Notifier {
    /// A notifier queueing into `store` as `settings` say.
    pub fn new(store: Arc<dyn Store>, settings: Notify) -> Notifier {
        Notifier {
            store,
            settings: Arc::new(settings),
            wake: Arc::new(tokio::sync::Notify::new()),
            clock: Arc::new(SystemClock),
        }
    }

    /// The clock of notices and their budgets (tests move it).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Notifier {
        self.clock = clock;
        self
    }

    /// The settings.
    pub fn settings(&self) -> &Notify {
        &self.settings
    }

    /// Queues a notice of `kind` for `username` with `facts` (labels, ids, addresses,
    /// client names: never a secret) and wakes the sender. Never fails: a notice that
    /// cannot be queued is logged and forgotten, the change it reports stands.
    pub fn notify(&self, username: &str, kind: Kind, facts: &[(&str, &str)]) {
        if !self.settings.sends(kind.as_str()) {
            return;
        }
        let now = self.clock.now();
        let per_hour = self.settings.max_per_hour.max(1);
        let flood = Budget {
            key: format!("notify:{}", username.escape_debug()),
            burst: per_hour,
            refill_secs: (3600 / u64::from(per_hour)).max(1),
        };
        match self.store.take_attempt(std::slice::from_ref(&flood), now) {
            Ok(None) => {}
            Ok(Some(_)) => return self.suppressed(username, kind, now),
            Err(e) => {
                tracing::warn!(error = %e, kind = kind.as_str(), "cannot queue a security notification");
                return;
            }
        }
        let id = match crate::auth::app_password::random_chars(20) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cannot queue a security notification");
                return;
            }
        };
        let notice = Notice {
            id,
            username: username.to_string(),
            kind: kind.as_str().to_string(),
            facts: facts.iter().map(|(k, v)| ((*k).to_string(), clean(v))).collect(),
            created_at: now,
            due_at: now,
            attempts: 0,
        };
        match self.store.enqueue_notice(&notice) {
            Ok(()) => self.wake.notify_one(),
            Err(e) => tracing::warn!(error = %e, kind = kind.as_str(), "cannot queue a security notification"),
        }
    }

    /// A sign-in on a mail port from an address new to the account (see
    /// `auth::budget::Budgets::signed_in`): the address, the client's name if it sent one,
    /// the protocol, and the app password's id or "account password". Store I/O.
    pub fn new_device(
        &self,
        username: &str,
        ip: std::net::IpAddr,
        client: Option<&str>,
        protocol: &str,
        app_password_id: Option<&str>,
    ) {
        let how = app_password_id.map(|id| format!("app password {id}")).unwrap_or_else(|| "account password".into());
        let (address, client) = (ip.to_string(), client.unwrap_or("not given"));
        let facts = [("address", address.as_str()), ("client", client), ("protocol", protocol), ("with", &how)];
        self.notify(username, Kind::NewDevice, &facts);
    }

    /// The account's budget of guesses of `what` ran out at a guess from `address`: one
    /// notice per lock (`lock_secs`, the time the budget takes to refill), and only for an
    /// account that exists (guesses at made-up names mail nobody). Store I/O.
    pub fn account_locked(&self, username: &str, what: &str, address: &str, lock_secs: u64) {
        if !matches!(self.store.get_account(username), Ok(Some(_))) {
            return;
        }
        if self.once_per(&format!("notify-lock:{what}:{}", username.escape_debug()), lock_secs) {
            self.notify(username, Kind::AccountLocked, &[("what", what), ("address", address)]);
        }
    }

    /// Whether the once-only slot `key` is free, taking it for `secs` (a lock notice once
    /// per lock, a reminder once a week; shared by every node of the store). A store
    /// failure counts as taken (no notice rather than many).
    pub fn once_per(&self, key: &str, secs: u64) -> bool {
        let slot = Budget { key: key.to_string(), burst: 1, refill_secs: secs.max(1) };
        matches!(self.store.take_attempt(std::slice::from_ref(&slot), self.clock.now()), Ok(None))
    }

    /// A notice over the account's hourly budget: dropped, with a log line, and an audit
    /// event once an hour (a flood does not flood the audit log either).
    fn suppressed(&self, username: &str, kind: Kind, now: u64) {
        tracing::info!(user = %username.escape_debug(), kind = kind.as_str(), "security notification dropped: too many for this account this hour");
        if self.once_per(&format!("notify-suppressed:{}", username.escape_debug()), 3600) {
            let ev = AuditEvent {
                at: now,
                username: username.to_string(),
                kind: "notification_suppressed".into(),
                detail: format!(
                    "{} not mailed: more than {} notifications this hour (more are dropped until the hour is over)",
                    kind.as_str(),
                    self.settings.max_per_hour
                ),
            };
            if let Err(e) = self.store.append_audit(&ev) {
                tracing::warn!(error = %e, "cannot write an audit event");
            }
        }
    }
}

/// The `Date:` header of a mail sent at `t` (RFC 5322 §3.3).
fn rfc5322_date(t: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let (y, m, d) = crate::accounts::civil(t);
    let s = t % 86_400;
    let day = DAYS.get(((t / 86_400) % 7) as usize).copied().unwrap_or("Thu");
    let month = MONTHS.get((m as usize).saturating_sub(1)).copied().unwrap_or("Jan");
    format!("{day}, {d:02} {month} {y:04} {:02}:{:02}:{:02} +0000", s / 3600, s % 3600 / 60, s % 60)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// What a mail says, beside its headers.
pub struct Rendered {
    /// The subject.
    pub subject: String,
    /// The plain text body (CRLF lines).
    pub text: String,
    /// The HTML alternative.
    pub html: String,
}

/// The texts of `notice` (`devices_url`: the page to act on, `public_url/app-passwords`).
pub fn texts(notice: &Notice, devices_url: &str) -> Rendered {
    let kind = Kind::from_name(&notice.kind);
    let subject = kind.map(Kind::subject).unwrap_or("Security notice for your mail account").to_string();
    let what = kind.map(Kind::what).unwrap_or("Something changed in your mail account.");
    let advice = kind.map(Kind::advice).unwrap_or(Kind::AppPasswordCreated.advice());
    let mut rows: Vec<(&str, String)> =
        vec![("When", crate::accounts::fmt_time(notice.created_at)), ("Account", clean(&notice.username))];
    rows.extend(notice.facts.iter().map(|(k, v)| (fact_label(k), clean(v))));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut text = format!("Hello,\r\n\r\n{what}\r\n\r\n");
    for (k, v) in &rows {
        text.push_str(&format!("  {:<width$} {v}\r\n", format!("{k}:")));
    }
    text.push_str(&format!(
        "\r\n{advice}\r\n{devices_url}\r\n\r\n-- \r\nThis message was sent automatically by mailgate.\r\n"
    ));
    let mut html = format!(
        "<!DOCTYPE html>\r\n<html><body style=\"font-family:sans-serif\">\r\n<p>Hello,</p>\r\n<p>{}</p>\r\n<table>\r\n",
        html_escape(what)
    );
    for (k, v) in &rows {
        html.push_str(&format!("<tr><td><b>{}</b></td><td>{}</td></tr>\r\n", html_escape(k), html_escape(v)));
    }
    html.push_str(&format!(
        "</table>\r\n<p>{}<br>\r\n<a href=\"{url}\">{url}</a></p>\r\n<p style=\"color:#666\">This message was sent automatically by mailgate.</p>\r\n</body></html>\r\n",
        html_escape(advice),
        url = html_escape(devices_url)
    ));
    Rendered { subject, text, html }
}

/// The whole message of `notice` from `from` to its account, sent at `now`: headers and a
/// `multipart/alternative` body (plain text, then HTML), 7-bit, CRLF lines. Not
/// dot-stuffed.
pub fn render(notice: &Notice, from: &str, hostname: &str, devices_url: &str, now: u64) -> Vec<u8> {
    let r = texts(notice, devices_url);
    let boundary = format!("=_mailgate_{}", clean(&notice.id));
    let mut m = String::new();
    m.push_str(&format!("From: mailgate <{from}>\r\n"));
    m.push_str(&format!("To: <{}>\r\n", clean(&notice.username)));
    m.push_str(&format!("Subject: {}\r\n", r.subject));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    m.push_str(&format!("Message-ID: <{}.notice@{hostname}>\r\n", clean(&notice.id)));
    m.push_str("Auto-Submitted: auto-generated\r\n");
    m.push_str(&format!("X-Mailgate-Notice: {}\r\n", clean(&notice.kind)));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!("Content-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n"));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    ));
    m.push_str(&r.text);
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
    ));
    m.push_str(&r.html);
    m.push_str(&format!("--{boundary}--\r\n"));
    m.into_bytes()
}

/// `message` as SMTP DATA: lines starting with a dot get another, and the final `.`.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Why a notice was not sent (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Connecting or logging in failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamFailure),
    /// The server refused a step of the transaction.
    #[error("the SMTP server refused {step} (code {code})")]
    Refused {
        /// `MAIL`, `RCPT`, `DATA` or the message.
        step: &'static str,
        /// Its reply code.
        code: u16,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the sender task needs.
pub struct Sender {
    /// The queue and its settings.
    pub notifier: Notifier,
    /// The configuration (host name, public URL, `[policy]`).
    pub config: Arc<Config>,
    /// `[upstream.smtp]` (used without `[notify] relay`).
    pub upstream: Arc<Connector>,
}

impl Sender {
    /// Where mail goes: the relay's connector, or `[upstream.smtp]`'s.
    fn relay(&self) -> Result<Option<Connector>, UpstreamFailure> {
        let Some(relay) = &self.notifier.settings.relay else { return Ok(None) };
        let host = relay.rsplit_once(':').map(|(h, _)| h).unwrap_or(relay).trim_matches(['[', ']']);
        let cfg = crate::config::Upstream {
            address: relay.clone(),
            tls: UpstreamTls::None,
            ca_file: None,
            server_name: host.to_string(),
            login: UpstreamLogin::MasterSasl,
            master_user: String::new(),
            master_password_file: Default::default(),
            master_separator: String::new(),
            xclient: false,
        };
        Connector::new(&cfg, self.upstream.timeout())
            .map(Some)
            .map_err(|e| UpstreamFailure::Io(std::io::Error::other(e.to_string())))
    }

    /// Sends one notice.
    async fn send(&self, notice: &Notice, now: u64) -> Result<(), SendError> {
        // mailgate itself is the client (Dovecot refuses port 0 in XCLIENT).
        let me: std::net::SocketAddr = ([127, 0, 0, 1], 49152).into();
        let hostname = &self.config.hostname;
        let relay = self.relay()?;
        let (mut up, envelope_from) = match &relay {
            // An MTA's port 25: no login; the envelope sender is `[notify] from`.
            Some(relay) => {
                let none = SecretString::from(String::new());
                (
                    crate::net::smtp::log_in(relay, hostname, Style::Probe, "", none, me).await?.0,
                    self.notifier.settings.from.clone(),
                )
            }
            // Upstream submission as the account itself (its own address as the envelope
            // sender, which sender-login checks accept), the way the SMTP front logs in.
            None => {
                let (style, password) = match self.upstream.config().login {
                    UpstreamLogin::Xclient => (Style::Xclient, SecretString::from(String::new())),
                    _ => (Style::MasterSasl, self.upstream.master_password()?),
                };
                let up =
                    crate::net::smtp::log_in(&self.upstream, hostname, style, &notice.username, password, me).await?.0;
                (up, notice.username.clone())
            }
        };
        let wait = self.upstream.timeout();
        let result = async {
            let steps: [(&'static str, Vec<u8>, u16); 3] = [
                ("MAIL", format!("MAIL FROM:<{}>\r\n", clean(&envelope_from)).into_bytes(), 250),
                ("RCPT", format!("RCPT TO:<{}>\r\n", clean(&notice.username)).into_bytes(), 250),
                ("DATA", b"DATA\r\n".to_vec(), 354),
            ];
            for (step, line, want) in steps {
                let (code, _) = up.command(&line, wait).await?;
                if code != want && !(step == "RCPT" && code == 251) {
                    return Err(SendError::Refused { step, code });
                }
            }
            let devices = self.config.app_password_url();
            let message = render(notice, &self.notifier.settings.from, hostname, &devices, now);
            let (code, _) = up.command(&dot_stuffed(&message), Duration::from_secs(600)).await?;
            if code != 250 {
                return Err(SendError::Refused { step: "the message", code });
            }
            Ok(())
        }
        .await;
        up.quit().await;
        result
    }

    /// Claims what is due and sends it; returns how many were claimed and the soonest
    /// retry it scheduled (seconds from now).
    async fn round(&self) -> (usize, Option<u64>) {
        let store = self.notifier.store.clone();
        let now = self.notifier.clock.now();
        let claimed = tokio::task::spawn_blocking(move || store.claim_notices(now, LEASE_SECS, BATCH)).await;
        let notices = match claimed {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the queue of security notifications");
                return (0, None);
            }
            Err(_) => return (0, None),
        };
        let count = notices.len();
        let mut soonest: Option<u64> = None;
        for notice in notices {
            let store = self.notifier.store.clone();
            if now.saturating_sub(notice.created_at) >= MAX_AGE_SECS {
                tracing::warn!(
                    user = %notice.username.escape_debug(),
                    kind = %notice.kind,
                    attempts = notice.attempts,
                    "security notification dropped: not sent within a day"
                );
                let id = notice.id.clone();
                let _ = tokio::task::spawn_blocking(move || store.delete_notice(&id)).await;
                continue;
            }
            match self.send(&notice, now).await {
                Ok(()) => {
                    tracing::info!(user = %notice.username.escape_debug(), kind = %notice.kind, "security notification sent");
                    let id = notice.id.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.delete_notice(&id)).await {
                        tracing::warn!(error = %e, "cannot remove a sent security notification from the queue");
                    }
                }
                Err(e) => {
                    let attempts = notice.attempts.saturating_add(1);
                    let wait = retry_after(self.notifier.settings.first_retry.as_secs().max(1), attempts);
                    tracing::warn!(
                        user = %notice.username.escape_debug(),
                        kind = %notice.kind,
                        error = %e,
                        retry_in_secs = wait,
                        "cannot send a security notification; will retry"
                    );
                    soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                    let id = notice.id.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || store.reschedule_notice(&id, now + wait, attempts)).await;
                }
            }
        }
        (count, soonest)
    }

    /// Queues the weekly reminders of `[policy]` accounts in their grace period without
    /// two-step verification (at most one per account per 7 days, on every node together).
    async fn remind(&self) {
        let policy = &self.config.policy;
        if policy.require_second_factor.is_empty() || !self.notifier.settings.sends(Kind::SecondFactorReminder.as_str())
        {
            return;
        }
        let (notifier, policy) = (self.notifier.clone(), policy.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let now = notifier.clock.now();
            let accounts = match notifier.store.list_accounts() {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list accounts for two-step verification reminders");
                    return;
                }
            };
            // `grace_until` is the first second after the configured day.
            let until = policy.grace_until.map(|t| crate::accounts::fmt_time(t.saturating_sub(1))).unwrap_or_default();
            for a in accounts.iter().filter(|a| !a.has_second_factor() && policy.in_grace(&a.username, now)) {
                let key = format!("notify-reminder:{}", a.username.escape_debug());
                if notifier.once_per(&key, REMINDER_EVERY_SECS) {
                    notifier.notify(&a.username, Kind::SecondFactorReminder, &[("until", &until)]);
                }
            }
        })
        .await;
    }
}

/// The wait before attempt `attempts + 1` of a notice whose `attempts` failed: `first`,
/// doubling, at most [`MAX_RETRY_SECS`].
pub fn retry_after(first: u64, attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(20);
    first.saturating_mul(1u64 << doublings).min(MAX_RETRY_SECS)
}

/// The sender task (started by `app::run` when `[notify] enabled`): runs until aborted.
pub async fn run(sender: Sender) {
    let mut next_scan = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_scan {
            sender.remind().await;
            next_scan = tokio::time::Instant::now() + REMINDER_SCAN;
        }
        // A full batch: there may be more due at once.
        let mut pause = POLL;
        loop {
            let (claimed, retry) = sender.round().await;
            if let Some(secs) = retry {
                pause = pause.min(Duration::from_secs(secs));
            }
            if claimed < BATCH {
                break;
            }
        }
        let _ = tokio::time::timeout(pause, sender.notifier.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;

    fn notice(kind: Kind, facts: &[(&str, &str)]) -> Notice {
        Notice {
            id: "abcdefghij".into(),
            username: "alice@example.com".into(),
            kind: kind.as_str().into(),
            facts: facts.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
            created_at: 1_796_670_000,
            due_at: 1_796_670_000,
            attempts: 0,
        }
    }

    /// The kinds here are the ones `[notify] kinds_off` accepts, in the same order.
    #[test]
    fn the_kinds_are_the_configs() {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, crate::config::NOTICE_KINDS);
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.as_str()), Some(k));
        }
    }

    /// A mail says what happened, when (UTC), the facts, and where to act; plain text and
    /// HTML alternatives; the subject in the header; a label cannot add a header or HTML.
    #[test]
    fn a_notice_renders_its_facts_and_the_devices_page() {
        let n = notice(
            Kind::AppPasswordCreated,
            &[("label", "Phone <b>\r\nBcc: x@evil"), ("id", "k3m9q2"), ("by", "on the web")],
        );
        let stored = Notice { facts: n.facts.iter().map(|(k, v)| (k.clone(), clean(v))).collect(), ..n };
        let m = String::from_utf8(render(
            &stored,
            "mailgate@mail.example.com",
            "mail.example.com",
            "https://mail.example.com/app-passwords",
            1_796_670_060,
        ))
        .unwrap();
        assert!(m.contains("Subject: A new app password was created\r\n"), "{m}");
        assert!(m.contains("From: mailgate <mailgate@mail.example.com>\r\nTo: <alice@example.com>\r\n"), "{m}");
        assert!(m.contains("Date: Mon, 07 Dec 2026 19:01:00 +0000\r\n"), "{m}");
        assert!(m.contains("multipart/alternative") && m.contains("text/plain") && m.contains("text/html"), "{m}");
        assert!(m.contains("2026-12-07 19:00:00 UTC") && m.contains("k3m9q2") && m.contains("on the web"), "{m}");
        assert!(m.contains("https://mail.example.com/app-passwords"), "{m}");
        assert!(!m.contains("\nBcc:"), "a label cannot start a header line: {m}");
        assert!(m.contains("Phone &lt;b&gt;??Bcc: x@evil"), "escaped in HTML: {m}");
        assert!(m.is_ascii() && m.split("\r\n").all(|l| l.len() < 998 && !l.contains('\n')), "{m}");
        // Every kind has its subject and advice; the reminder names the date.
        for k in Kind::ALL {
            let r = texts(&notice(k, &[("until", "2027-01-31 23:59:59 UTC")]), "https://x/app-passwords");
            assert_eq!(r.subject, k.subject());
            assert!(r.text.contains("https://x/app-passwords") && r.html.contains("https://x/app-passwords"));
        }
    }

    /// DATA is dot-stuffed and ends with the final dot.
    #[test]
    fn data_is_dot_stuffed() {
        assert_eq!(dot_stuffed(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n.\r\n");
        assert_eq!(dot_stuffed(b"x"), b"x\r\n.\r\n");
    }

    /// Retries: 1 min, doubling, at most an hour.
    #[test]
    fn the_backoff_doubles_up_to_an_hour() {
        let waits: Vec<u64> = (1..=8).map(|a| retry_after(60, a)).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_after(60, u32::MAX), 3600);
    }

    /// Queued notices are claimed once; a kind turned off, or everything off, queues
    /// nothing; past `max_per_hour` an account's notices are dropped with one audit event;
    /// the once-only slots hold for their time.
    #[test]
    fn the_notifier_queues_limits_and_switches() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let clock = crate::auth::clock::FakeClock::at(1_000_000);
        let settings = Notify { kinds_off: vec!["new_device".into()], max_per_hour: 3, ..Notify::default() };
        let n = Notifier::new(store.clone(), settings).with_clock(Arc::new(clock.clone()));
        n.notify("a@x", Kind::NewDevice, &[]);
        assert!(store.claim_notices(1_000_000, 1_000_000, 100).unwrap().is_empty(), "turned off");
        for _ in 0..10 {
            n.notify("a@x", Kind::TotpEnabled, &[("by", "on the web\u{7}")]);
        }
        n.notify("b@x", Kind::TotpEnabled, &[]);
        let got = store.claim_notices(1_000_000, 1_000_000, 100).unwrap();
        assert_eq!(got.iter().filter(|n| n.username == "a@x").count(), 3, "the hourly budget");
        assert_eq!(got.iter().filter(|n| n.username == "b@x").count(), 1, "per account");
        assert_eq!(
            got.iter().find(|n| n.username == "a@x").unwrap().facts,
            [("by".to_string(), "on the web?".to_string())]
        );
        let audit = store.recent_audit("a@x", 10).unwrap();
        assert_eq!(audit.iter().filter(|e| e.kind == "notification_suppressed").count(), 1, "{audit:?}");
        clock.advance(1200);
        n.notify("a@x", Kind::TotpEnabled, &[]);
        assert_eq!(store.claim_notices(1_001_200, 60, 100).unwrap().len(), 1, "one back after 20 minutes");
        let off = Notifier::new(store.clone(), Notify { enabled: false, ..Notify::default() });
        off.notify("c@x", Kind::TotpEnabled, &[]);
        assert!(store.claim_notices(1_001_200, 60, 100).unwrap().is_empty());
        assert!(n.once_per("k", 100) && !n.once_per("k", 100));
        clock.advance(100);
        assert!(n.once_per("k", 100));
    }
}
