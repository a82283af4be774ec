//! What the admin CLI does, and the local socket through which it reaches a running server.
//!
//! sled allows one process, so while `mailgate serve` runs, the CLI sends its request as
//! one JSON line over `data_dir/admin.sock` (mode 0600, in a 0700 directory) and the
//! server executes it; with no server running, the CLI opens the store itself. Either
//! way the same [`execute`] runs, so a change takes effect at once (a revoked app
//! password fails its next login, and its live sessions end).

use crate::auth::{self, app_password, crypto::SecretKey, password};
use crate::fsutil::now_unix;
use crate::sessions::Sessions;
use crate::store::{Account, AppPasswordRecord, AuditEvent, Scope, Store, StoreError, TotpState};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One admin command. Passwords cross the socket only as argon2id hashes (made by the CLI).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Is a server there?
    Ping,
    /// `user add`.
    UserAdd {
        /// Address.
        email: String,
        /// Aliases.
        addresses: Vec<String>,
        /// argon2id hash of the account password, if one was given.
        password_hash: Option<String>,
    },
    /// `user import`: accounts with their (Dovecot) password hashes, all or none.
    UserImport {
        /// (address, stored hash).
        users: Vec<(String, String)>,
    },
    /// `user list`.
    UserList,
    /// `store export`: the whole store (the answer's json).
    StoreExport,
    /// `store import`: a dump into an empty store.
    StoreImport {
        /// The dump.
        dump: Box<crate::store::Dump>,
    },
    /// `user passwd`.
    UserPasswd {
        /// Address.
        email: String,
        /// argon2id hash of the new password.
        password_hash: String,
    },
    /// `user unlock`: clears the failed-login lock.
    UserUnlock {
        /// Address.
        email: String,
    },
    /// `user remove`.
    UserRemove {
        /// Address.
        email: String,
    },
    /// `app-password create`.
    AppPasswordCreate {
        /// Address.
        email: String,
        /// Label.
        label: String,
        /// Scopes.
        scopes: Vec<Scope>,
    },
    /// `app-password list`.
    AppPasswordList {
        /// Address.
        email: String,
    },
    /// `app-password revoke`.
    AppPasswordRevoke {
        /// Address.
        email: String,
        /// Public id.
        id: String,
    },
    /// `totp enable`.
    TotpEnable {
        /// Address.
        email: String,
        /// Base32 secret to import.
        secret: Option<String>,
    },
    /// `totp disable`.
    TotpDisable {
        /// Address.
        email: String,
    },
}

/// The answer: lines for a person (the last one is the important one), and data for `--json`.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Response {
    /// Whether it worked.
    pub ok: bool,
    /// Text for stdout.
    pub lines: Vec<String>,
    /// Machine-readable result, if any.
    pub json: Option<serde_json::Value>,
    /// What went wrong, for stderr.
    pub error: Option<String>,
}

impl Response {
    fn ok(lines: Vec<String>) -> Response {
        Response { ok: true, lines, ..Default::default() }
    }
    /// A failed answer.
    pub fn err(msg: impl Into<String>) -> Response {
        Response { ok: false, error: Some(msg.into()), ..Default::default() }
    }
}

/// What [`execute`] works on.
pub struct Context {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Key that seals TOTP secrets.
    pub key: Arc<SecretKey>,
    /// Issuer name in otpauth URIs (the server host name).
    pub issuer: String,
    /// Live sessions, when a server runs.
    pub sessions: Option<Sessions>,
    /// The server's hashing threads, when a server runs: requests (which hash passwords,
    /// app passwords and backup codes) run there, so hashing memory stays bounded by
    /// `limits.max_concurrent_hashes` × 19 MiB (PERFORMANCE.md M2).
    pub hashing: Option<crate::auth::Authenticator>,
}

/// Checks and normalises an e-mail address given on the command line.
pub fn check_email(raw: &str) -> Result<String, String> {
    let e = auth::normalize_username(raw);
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == ':');
    if ok { Ok(e) } else { Err(format!("`{raw}` is not an e-mail address")) }
}

fn store_err(e: StoreError) -> String {
    e.to_string()
}

fn need_account(store: &dyn Store, email: &str) -> Result<Account, String> {
    store.get_account(email).map_err(store_err)?.ok_or_else(|| format!("unknown user {email}"))
}

fn audit(store: &dyn Store, username: &str, kind: &str, detail: String) {
    let ev = AuditEvent { at: now_unix(), username: username.into(), kind: kind.into(), detail };
    let _ = store.append_audit(&ev);
}

/// Formats unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn fmt_time(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// The longest app-password label, in characters.
pub const MAX_LABEL_CHARS: usize = 64;

/// A character, shown as `U+XXXX` (an error message must not contain the character it
/// refuses: a bidi control in it would reorder the message itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePoint(pub char);

impl std::fmt::Display for CodePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "U+{:04X}", u32::from(self.0))
    }
}

/// Why an app-password label is refused ([`check_label`]). Labels are shown to the account
/// owner (web page, `app-password list`, audit events) to tell devices apart before one is
/// revoked, so a label must look like what it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Empty, or white space only.
    #[error("the label must not be empty")]
    Empty,
    /// More than [`MAX_LABEL_CHARS`] characters.
    #[error("the label must be at most {MAX_LABEL_CHARS} characters")]
    TooLong,
    /// A control character (Unicode category Cc: tab, newline, escape, ...): it breaks the
    /// tab-separated list and can drive a terminal.
    #[error("the label contains {0}, a control character; leave it out")]
    Control(CodePoint),
    /// A bidirectional text control: it reorders what follows, so that "U+202E gnp.exe"
    /// shows as "exe.png".
    #[error(
        "the label contains {0}, a bidirectional text control, which can make a label show as something it is not \
         (\"exe.png\" for \"gnp.exe\"); leave it out"
    )]
    Bidi(CodePoint),
    /// Another invisible character (category Cf: zero-width space and joiners, soft
    /// hyphen, byte order mark, ...; or a line or paragraph separator, Zl/Zp): two labels
    /// that look the same could differ.
    #[error("the label contains {0}, an invisible formatting character; leave it out")]
    Invisible(CodePoint),
}

/// Checks an app-password label, for the CLI and the web step alike; returns it without
/// surrounding white space. 1 to [`MAX_LABEL_CHARS`] characters, none of them a control
/// character (Cc), a bidirectional text control (U+202A–U+202E, U+2066–U+2069, U+200E,
/// U+200F, U+061C) or another invisible one (Cf, Zl, Zp). General categories come from the
/// `unicode-properties` tables.
pub fn check_label(label: &str) -> Result<&str, LabelError> {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    let label = label.trim();
    if label.is_empty() {
        return Err(LabelError::Empty);
    }
    for c in label.chars() {
        // Every bidi control is also Cf: named first, for the clearer message.
        if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}') {
            return Err(LabelError::Bidi(CodePoint(c)));
        }
        match c.general_category() {
            GeneralCategory::Control => return Err(LabelError::Control(CodePoint(c))),
            GeneralCategory::Format | GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => {
                return Err(LabelError::Invisible(CodePoint(c)));
            }
            _ => {}
        }
    }
    if label.chars().count() > MAX_LABEL_CHARS {
        return Err(LabelError::TooLong);
    }
    Ok(label)
}

/// Creates an app password for `email` (label checked by [`check_label`], scopes
/// defaulting to both); durable on return. Shared by the CLI and the web step.
pub fn create_app_password(
    store: &dyn Store,
    email: &str,
    label: &str,
    scopes: Vec<Scope>,
    by: &str,
) -> Result<(app_password::NewAppPassword, String, Vec<Scope>), String> {
    let label = check_label(label).map_err(|e| e.to_string())?.to_string();
    let mut scopes = if scopes.is_empty() { vec![Scope::Imap, Scope::Smtp] } else { scopes };
    scopes.sort();
    scopes.dedup();
    need_account(store, email)?;
    let new = app_password::generate().map_err(|e| e.to_string())?;
    let hash = password::hash(new.password.expose().as_bytes()).map_err(|e| e.to_string())?;
    let record = AppPasswordRecord {
        id: new.id.clone(),
        username: email.to_string(),
        label: label.clone(),
        scopes: scopes.clone(),
        hash,
        created_at: now_unix(),
        created_by: by.into(),
        last_used: None,
    };
    store.create_app_password(&record).map_err(store_err)?;
    audit(store, email, "app_password_created", format!("{label} ({}) by {by}", new.id));
    Ok((new, label, scopes))
}

/// Revokes an app password and ends the live sessions opened with it; returns the record
/// and how many sessions ended. Durable on return.
pub fn revoke_app_password(
    store: &dyn Store,
    sessions: Option<&Sessions>,
    email: &str,
    id: &str,
    by: &str,
) -> Result<(AppPasswordRecord, usize), String> {
    let rec = store.revoke_app_password(email, id).map_err(store_err)?;
    let ended = sessions.map(|s| s.kill(email, Some(id))).unwrap_or(0);
    audit(store, email, "app_password_revoked", format!("{} ({id}) by {by}", rec.label));
    Ok((rec, ended))
}

/// Devices that still send the account password of a 2FA account (refused), newest
/// first, at most 10: (description, last time).
pub fn stale_devices(store: &dyn Store, email: &str) -> Result<Vec<(String, u64)>, String> {
    let mut stale: Vec<(String, u64)> = Vec::new();
    for ev in store.recent_audit(email, 500).map_err(store_err)? {
        if ev.kind == "account_password_refused_2fa" && !stale.iter().any(|(d, _)| *d == ev.detail) {
            stale.push((ev.detail, ev.at));
        }
    }
    stale.truncate(10);
    Ok(stale)
}

/// Records an audit event (failures to write are logged, not fatal).
pub fn audit_event(store: &dyn Store, username: &str, kind: &str, detail: String) {
    audit(store, username, kind, detail);
}

/// Runs one command.
pub fn execute(ctx: &Context, req: Request) -> Response {
    match run(ctx, req) {
        Ok(r) => r,
        Err(e) => Response::err(e),
    }
}

fn run(ctx: &Context, req: Request) -> Result<Response, String> {
    let store = ctx.store.as_ref();
    match req {
        Request::Ping => Ok(Response::ok(vec!["pong".into()])),
        Request::UserAdd { email, addresses, password_hash } => {
            let email = check_email(&email)?;
            let mut aliases = Vec::new();
            for a in addresses {
                let a = check_email(&a)?;
                if a != email && !aliases.contains(&a) {
                    aliases.push(a);
                }
            }
            let now = now_unix();
            let has_pw = password_hash.is_some();
            store
                .create_account(&Account { addresses: aliases, password_hash, ..Account::new(&email, now) })
                .map_err(store_err)?;
            audit(store, &email, "account_created", String::new());
            let note = if has_pw { "" } else { " (no account password: app passwords only)" };
            Ok(Response::ok(vec![format!("added {email}{note}")]))
        }
        Request::UserImport { users } => {
            let now = now_unix();
            let accounts: Vec<Account> = users
                .iter()
                .map(|(email, hash)| Account { password_hash: Some(hash.clone()), ..Account::new(email, now) })
                .collect();
            store.create_accounts(&accounts).map_err(store_err)?;
            for a in &accounts {
                audit(store, &a.username, "account_created", "imported".into());
            }
            Ok(Response::ok(vec![format!("imported {} accounts", accounts.len())]))
        }
        Request::StoreExport => {
            let dump = store.export().map_err(store_err)?;
            let json = serde_json::to_value(&dump).map_err(|e| e.to_string())?;
            Ok(Response {
                ok: true,
                lines: vec![format!(
                    "{} accounts, {} app passwords, {} audit events",
                    dump.accounts.len(),
                    dump.app_passwords.len(),
                    dump.audit.len()
                )],
                json: Some(json),
                error: None,
            })
        }
        Request::StoreImport { dump } => {
            store.import(&dump).map_err(store_err)?;
            Ok(Response::ok(vec![format!(
                "imported {} accounts, {} app passwords, {} audit events",
                dump.accounts.len(),
                dump.app_passwords.len(),
                dump.audit.len()
            )]))
        }
        Request::UserList => {
            let accounts = store.list_accounts().map_err(store_err)?;
            let mut lines = Vec::new();
            let mut json = Vec::new();
            for a in &accounts {
                let n = store.list_app_passwords(&a.username).map_err(store_err)?.len();
                lines.push(format!(
                    "{}\t2fa={}\tpassword={}\tapp-passwords={}\taliases={}",
                    a.username,
                    if a.has_second_factor() { "on" } else { "off" },
                    if a.password_hash.is_some() { "set" } else { "none" },
                    n,
                    a.addresses.join(",")
                ));
                json.push(serde_json::json!({
                    "username": a.username, "addresses": a.addresses, "totp": a.has_second_factor(),
                    "has_password": a.password_hash.is_some(), "app_passwords": n, "created": a.created_at,
                }));
            }
            if accounts.is_empty() {
                lines.push("no users".into());
            }
            Ok(Response { ok: true, lines, json: Some(json.into()), error: None })
        }
        Request::UserPasswd { email, password_hash } => {
            let email = check_email(&email)?;
            let mut a = need_account(store, &email)?;
            a.password_hash = Some(password_hash);
            a.updated_at = now_unix();
            store.put_account(&a).map_err(store_err)?;
            let ended = ctx.sessions.as_ref().map(|s| s.kill_account_password_sessions(&email)).unwrap_or(0);
            audit(store, &email, "account_password_changed", "by admin".into());
            Ok(Response::ok(vec![format!(
                "password changed for {email} ({ended} sessions opened with the old password ended)"
            )]))
        }
        Request::UserUnlock { email } => {
            let email = check_email(&email)?;
            need_account(store, &email)?;
            // The account's guess budgets (in the store, shared by the nodes) and, when a
            // server runs, its in-memory failure delay: the next login is answered at once.
            match &ctx.hashing {
                Some(auth) => auth.forget_failures(&email),
                None => auth::budget::Budgets::clear_account(store, &email),
            }
            .map_err(store_err)?;
            audit(store, &email, "account_unlocked", "by admin".into());
            Ok(Response::ok(vec![format!(
                "unlocked {email}: its password and code guess budgets are full again and its failure delay is cleared"
            )]))
        }
        Request::UserRemove { email } => {
            let email = check_email(&email)?;
            store.remove_account(&email).map_err(store_err)?;
            let ended = ctx.sessions.as_ref().map(|s| s.kill(&email, None)).unwrap_or(0);
            Ok(Response::ok(vec![format!("removed {email} ({ended} live sessions ended)")]))
        }
        Request::AppPasswordCreate { email, label, scopes } => {
            let email = check_email(&email)?;
            let (new, label, scopes) = create_app_password(store, &email, &label, scopes, "admin")?;
            let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
            Ok(Response {
                ok: true,
                lines: vec![
                    format!(
                        "created app password {} \"{label}\" for {email} (scopes: {})",
                        new.id,
                        scope_names.join(",")
                    ),
                    "It is shown only this once; enter it in the mail app as the password (spaces optional):".into(),
                    new.grouped().expose().clone(),
                ],
                json: Some(serde_json::json!({"id": new.id})),
                error: None,
            })
        }
        Request::AppPasswordList { email } => {
            let email = check_email(&email)?;
            need_account(store, &email)?;
            let list = store.list_app_passwords(&email).map_err(store_err)?;
            let mut lines = Vec::new();
            let mut json = Vec::new();
            for r in &list {
                let scopes: Vec<&str> = r.scopes.iter().map(|s| s.as_str()).collect();
                let used = match &r.last_used {
                    Some(u) => format!(
                        "{} from {}{}",
                        fmt_time(u.at),
                        u.ip,
                        u.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
                    ),
                    None => "never".into(),
                };
                lines.push(format!(
                    "{}\t{}\t{}\tcreated {}\tlast used {}",
                    r.id,
                    r.label,
                    scopes.join(","),
                    fmt_time(r.created_at),
                    used
                ));
                json.push(serde_json::json!({
                    "id": r.id, "label": r.label, "scopes": scopes, "created": r.created_at,
                    "created_by": r.created_by,
                    "last_used": r.last_used.as_ref().map(|u| serde_json::json!({"at": u.at, "ip": u.ip, "client": u.client})),
                }));
            }
            if list.is_empty() {
                lines.push(format!("{email} has no app passwords"));
            }
            let stale = stale_devices(store, &email)?;
            for (detail, at) in &stale {
                lines.push(format!(
                    "refused account password (needs an app password): {detail}, last {}",
                    fmt_time(*at)
                ));
            }
            let stale_json: Vec<_> = stale.iter().map(|(d, at)| serde_json::json!({"device": d, "last": at})).collect();
            Ok(Response {
                ok: true,
                lines,
                json: Some(serde_json::json!({"app_passwords": json, "account_password_refusals": stale_json})),
                error: None,
            })
        }
        Request::AppPasswordRevoke { email, id } => {
            let email = check_email(&email)?;
            let id = id.trim().to_ascii_lowercase();
            need_account(store, &email)?;
            let (rec, ended) = revoke_app_password(store, ctx.sessions.as_ref(), &email, &id, "admin")?;
            Ok(Response::ok(vec![format!(
                "revoked app password {id} \"{}\" of {email} ({ended} live sessions ended)",
                rec.label
            )]))
        }
        Request::TotpEnable { email, secret } => {
            let email = check_email(&email)?;
            let mut a = need_account(store, &email)?;
            let replaced = a.totp.is_some();
            let en = auth::totp::enrol(&ctx.key, &ctx.issuer, &email, secret.as_deref()).map_err(|e| e.to_string())?;
            a.totp = Some(TotpState { secret_enc: en.sealed, enabled_at: now_unix(), last_step: 0 });
            a.second_factor_required = true;
            a.updated_at = now_unix();
            store.put_account(&a).map_err(store_err)?;
            // Sessions opened with the account password end: from now on it is refused.
            let ended = ctx.sessions.as_ref().map(|s| s.kill_account_password_sessions(&email)).unwrap_or(0);
            audit(store, &email, "totp_enabled", "by admin".into());
            let what = if replaced { "re-enrolled (the old TOTP secret no longer works)" } else { "enabled" };
            Ok(Response::ok(vec![
                format!("two-factor authentication {what} for {email} ({ended} account-password sessions ended)"),
                "Add this to an authenticator app (it is shown only this once):".into(),
                en.uri.expose().clone(),
            ]))
        }
        Request::TotpDisable { email } => {
            let email = check_email(&email)?;
            let mut a = need_account(store, &email)?;
            a.totp = None;
            a.second_factor_required = false;
            a.backup_codes = None;
            a.updated_at = now_unix();
            store.put_account(&a).map_err(store_err)?;
            audit(store, &email, "totp_disabled", "by admin".into());
            Ok(Response::ok(vec![format!("two-factor authentication disabled for {email}")]))
        }
    }
}

/// The admin socket: server side.
pub mod socket {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};

    /// Longest request line: a `store import` carries the whole dump (the socket is the
    /// owner's only).
    const MAX_REQUEST: usize = 256 * 1024 * 1024;

    /// Binds the socket with mode 0600 (replacing a stale one).
    pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    }

    /// Serves admin requests until the listener is dropped.
    pub async fn serve(listener: UnixListener, ctx: Arc<Context>) {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let ctx = ctx.clone();
            tokio::spawn(async move { handle(conn, ctx).await });
        }
    }

    async fn handle(conn: UnixStream, ctx: Arc<Context>) {
        let (r, mut w) = conn.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
        if reader.read_line(&mut line).await.is_err() {
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let ctx2 = ctx.clone();
                match &ctx.hashing {
                    Some(auth) => auth
                        .run_hashing(move || execute(&ctx2, req))
                        .await
                        .unwrap_or_else(|| Response::err("the server is too busy; try again")),
                    None => tokio::task::spawn_blocking(move || execute(&ctx2, req))
                        .await
                        .unwrap_or_else(|_| Response::err("internal error")),
                }
            }
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }

    use tokio::io::AsyncReadExt as _;

    /// Client side: sends one request to a running server. `Ok(None)`: no server listens.
    pub fn request(path: &Path, req: &Request) -> Result<Option<Response>, String> {
        use std::io::{BufRead, Write};
        let mut conn = match std::os::unix::net::UnixStream::connect(path) {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(e) => return Err(format!("cannot reach the running server at {}: {e}", path.display())),
        };
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        conn.write_all(&line).map_err(|e| format!("admin socket: {e}"))?;
        let mut resp = String::new();
        std::io::BufReader::new(conn).read_line(&mut resp).map_err(|e| format!("admin socket: {e}"))?;
        serde_json::from_str(&resp).map(Some).map_err(|e| format!("admin socket: bad answer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13 item 12: labels that do not look like what they are are refused, each
    /// with a message naming the character by its code point.
    #[test]
    fn labels_with_bidi_invisible_or_control_characters_are_refused() {
        for (label, want) in [
            ("\u{202E}gnp.exe", LabelError::Bidi(CodePoint('\u{202E}'))),
            ("Phone \u{202A}x", LabelError::Bidi(CodePoint('\u{202A}'))),
            ("a\u{202B}b", LabelError::Bidi(CodePoint('\u{202B}'))),
            ("a\u{202C}b", LabelError::Bidi(CodePoint('\u{202C}'))),
            ("a\u{202D}b", LabelError::Bidi(CodePoint('\u{202D}'))),
            ("a\u{2066}b", LabelError::Bidi(CodePoint('\u{2066}'))),
            ("a\u{2067}b", LabelError::Bidi(CodePoint('\u{2067}'))),
            ("a\u{2068}b", LabelError::Bidi(CodePoint('\u{2068}'))),
            ("a\u{2069}b", LabelError::Bidi(CodePoint('\u{2069}'))),
            ("a\u{200E}b", LabelError::Bidi(CodePoint('\u{200E}'))),
            ("a\u{200F}b", LabelError::Bidi(CodePoint('\u{200F}'))),
            ("a\u{061C}b", LabelError::Bidi(CodePoint('\u{061C}'))),
            ("Lap\u{200B}top", LabelError::Invisible(CodePoint('\u{200B}'))),
            ("Lap\u{200C}top", LabelError::Invisible(CodePoint('\u{200C}'))),
            ("Lap\u{200D}top", LabelError::Invisible(CodePoint('\u{200D}'))),
            ("\u{FEFF}Laptop", LabelError::Invisible(CodePoint('\u{FEFF}'))),
            ("Lap\u{2060}top", LabelError::Invisible(CodePoint('\u{2060}'))),
            ("Lap\u{2064}top", LabelError::Invisible(CodePoint('\u{2064}'))),
            ("Lap\u{00AD}top", LabelError::Invisible(CodePoint('\u{00AD}'))),
            ("Lap\u{E0041}top", LabelError::Invisible(CodePoint('\u{E0041}'))),
            ("Lap\u{2028}top", LabelError::Invisible(CodePoint('\u{2028}'))),
            ("Lap\ttop", LabelError::Control(CodePoint('\t'))),
            ("Lap\ntop", LabelError::Control(CodePoint('\n'))),
            ("Lap\u{1B}[31mtop", LabelError::Control(CodePoint('\u{1B}'))),
            ("Lap\u{0}top", LabelError::Control(CodePoint('\u{0}'))),
            ("Lap\u{7F}top", LabelError::Control(CodePoint('\u{7F}'))),
            ("Lap\u{85}top", LabelError::Control(CodePoint('\u{85}'))),
            ("", LabelError::Empty),
            (" \t ", LabelError::Empty),
            (&"x".repeat(MAX_LABEL_CHARS + 1), LabelError::TooLong),
        ] {
            assert_eq!(check_label(label), Err(want.clone()), "{label:?}");
        }
        let e = check_label("\u{202E}gnp.exe").unwrap_err().to_string();
        assert!(e.contains("U+202E") && e.contains("bidirectional text control"), "{e}");
        assert!(!e.contains('\u{202E}'), "the message carries the character itself: {e:?}");
        assert!(check_label("a\u{200B}b").unwrap_err().to_string().contains("U+200B, an invisible"));
        assert!(check_label("a\u{7}b").unwrap_err().to_string().contains("U+0007, a control character"));
    }

    #[test]
    fn ordinary_labels_in_any_script_are_accepted_and_trimmed() {
        for (label, want) in [
            ("Thunderbird laptop", "Thunderbird laptop"),
            ("  Phone  ", "Phone"),
            ("Téléphone de Zoë", "Téléphone de Zoë"),
            ("هاتف", "هاتف"),
            ("עבודה", "עבודה"),
            ("携帯電話", "携帯電話"),
            ("Ноутбук", "Ноутбук"),
            ("iPad 📱", "iPad 📱"),
            ("👩\u{1F3FD}", "👩\u{1F3FD}"),
        ] {
            assert_eq!(check_label(label), Ok(want), "{label:?}");
        }
        assert!(check_label(&"é".repeat(MAX_LABEL_CHARS)).is_ok(), "the limit counts characters, not bytes");
    }
}

#[cfg(test)]
mod unlock_tests {
    use super::*;
    use std::time::Duration;

    /// Issue 13 item 8: `user unlock` on a running server clears the account's in-memory
    /// failure delay (it used to stay: nothing called `forget_failures`) and refills its
    /// guess budgets.
    #[tokio::test]
    async fn unlock_clears_the_delay_and_the_budgets() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::sled_store::SledStore::open(dir.path()).unwrap());
        store.create_account(&Account::new("a@x", 0)).unwrap();
        let auth = crate::auth::Authenticator::new(store.clone(), 1)
            .with_failure_delays(Duration::from_millis(1), Duration::from_millis(1));
        for n in 0..40u8 {
            let _ = auth.failure_delay(std::net::IpAddr::from([192, 0, 2, n]), "a@x", format!("g{n}").as_bytes());
            if let Ok(t) =
                auth.take_slot(crate::auth::budget::Secret::AccountPassword, "a@x", [192, 0, 2, n].into()).await
            {
                auth.settle(t, crate::auth::Outcome::Wrong).await;
            }
        }
        let stranger = std::net::IpAddr::from([203, 0, 113, 1]);
        assert!(auth.failure_delay(stranger, "a@x", b"x") >= Duration::from_secs(20), "the account delay grew");
        assert!(auth.take_slot(crate::auth::budget::Secret::AccountPassword, "a@x", stranger).await.is_err());
        let ctx = Context {
            store: store.clone(),
            key: Arc::new(SecretKey::from_bytes(&[7; 32]).unwrap()),
            issuer: "mail.example.test".into(),
            sessions: None,
            hashing: Some(auth.clone()),
        };
        let out = execute(&ctx, Request::UserUnlock { email: "a@x".into() });
        assert!(out.ok, "{:?}", out.error);
        assert!(auth.failure_delay(stranger, "a@x", b"y") < Duration::from_secs(1), "the delay was left in place");
        assert!(auth.take_slot(crate::auth::budget::Secret::AccountPassword, "a@x", stranger).await.is_ok());
    }
}
