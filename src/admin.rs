//! What the admin CLI does, and the local socket through which it reaches a running server.
//!
//! sled allows one process, so while `mailgate serve` runs, the CLI sends its request as
//! one JSON line over `data_dir/admin.sock` (mode 0600, in a 0700 directory) and the
//! server executes it; with no server running, the CLI opens the store itself. Either
//! way the same [`execute`] runs, so a change takes effect at once (a revoked app
//! password fails its next login, and its live sessions end).
//!
//! Every change is made by the account service ([`crate::accounts`]), as the web step's
//! are; a command here only checks its arguments and words the answer.

use crate::accounts::{AccountError, AccountService, Actor, check_email, fmt_time, last_uses_text};
use crate::auth::crypto::SecretKey;
use crate::live::LiveSessions;
use crate::store::{Dump, Scope, Store, StoreError};
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
        /// When it stops working (unix seconds).
        #[serde(default)]
        expires_at: Option<u64>,
        /// Networks it may be used from; empty: anywhere.
        #[serde(default)]
        allow: Vec<ipnet::IpNet>,
    },
    /// `devices`.
    Devices {
        /// Address.
        email: String,
        /// Days without use after which a device is marked stale.
        stale_after_days: u64,
    },
    /// `app-password create` with limits inside the scopes (issue 20); a variant of its own
    /// so that a plain create keeps its shape.
    AppPasswordCreateNarrow {
        /// Address.
        email: String,
        /// Label.
        label: String,
        /// Scopes.
        scopes: Vec<Scope>,
        /// When it stops working (unix seconds).
        #[serde(default)]
        expires_at: Option<u64>,
        /// Networks it may be used from; empty: anywhere.
        #[serde(default)]
        allow: Vec<ipnet::IpNet>,
        /// What it may do inside its scopes.
        narrow: crate::store::Narrowing,
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
    /// `totp backup-codes`: a new set of backup codes.
    BackupCodesRegenerate {
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
    pub live: Option<LiveSessions>,
    /// The server's hashing threads, when a server runs: requests (which hash passwords,
    /// app passwords and backup codes) run there, so hashing memory stays bounded by
    /// `limits.max_concurrent_hashes` × 19 MiB (PERFORMANCE.md M2).
    pub hashing: Option<crate::auth::Authenticator>,
}

impl Context {
    /// The account service, acting as the admin, with the server's sessions and
    /// authenticator when one runs.
    pub fn accounts(&self) -> AccountService {
        let mut service = AccountService::new(self.store.clone(), self.key.clone(), &self.issuer, Actor::Admin);
        if let Some(s) = &self.live {
            service = service.with_live(s.clone());
        }
        if let Some(a) = &self.hashing {
            service = service.with_authenticator(a.clone());
        }
        service
    }
}

/// Why an admin command failed; its text is what the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The account service refused the change.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// The store failed (listing, export).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The export could not be encoded.
    #[error("cannot encode the export: {0}")]
    Json(#[from] serde_json::Error),
}

type Answer = Result<Response, AdminError>;

/// Runs one command.
pub fn execute(ctx: &Context, req: Request) -> Response {
    let answer = match req {
        Request::Ping => Ok(Response::ok(vec!["pong".into()])),
        Request::UserAdd { email, addresses, password_hash } => user_add(ctx, &email, &addresses, password_hash),
        Request::UserImport { users } => user_import(ctx, &users),
        Request::UserList => user_list(ctx),
        Request::StoreExport => store_export(ctx),
        Request::StoreImport { dump } => store_import(ctx, &dump),
        Request::UserPasswd { email, password_hash } => user_passwd(ctx, &email, password_hash),
        Request::UserUnlock { email } => user_unlock(ctx, &email),
        Request::UserRemove { email } => user_remove(ctx, &email),
        Request::AppPasswordCreate { email, label, scopes, expires_at, allow } => {
            let limits = crate::auth::app_password::Limits { expires_at, allow, narrow: None };
            app_password_create(ctx, &email, &label, scopes, limits)
        }
        Request::AppPasswordCreateNarrow { email, label, scopes, expires_at, allow, narrow } => {
            let limits = crate::auth::app_password::Limits { expires_at, allow, narrow: Some(narrow) };
            app_password_create(ctx, &email, &label, scopes, limits)
        }
        Request::AppPasswordList { email } => app_password_list(ctx, &email),
        Request::Devices { email, stale_after_days } => devices(ctx, &email, stale_after_days),
        Request::AppPasswordRevoke { email, id } => app_password_revoke(ctx, &email, &id),
        Request::TotpEnable { email, secret } => totp_enable(ctx, &email, secret.as_deref()),
        Request::TotpDisable { email } => totp_disable(ctx, &email),
        Request::BackupCodesRegenerate { email } => backup_codes_regenerate(ctx, &email),
    };
    answer.unwrap_or_else(|e| Response::err(e.to_string()))
}

fn user_add(ctx: &Context, email: &str, addresses: &[String], password_hash: Option<String>) -> Answer {
    let has_pw = password_hash.is_some();
    let email = ctx.accounts().create(email, addresses, password_hash)?;
    let note = if has_pw { "" } else { " (no account password: app passwords only)" };
    Ok(Response::ok(vec![format!("added {email}{note}")]))
}

fn user_import(ctx: &Context, users: &[(String, String)]) -> Answer {
    let n = ctx.accounts().import_users(users)?;
    Ok(Response::ok(vec![format!("imported {n} accounts")]))
}

fn store_export(ctx: &Context) -> Answer {
    let dump = ctx.store.export()?;
    let json = serde_json::to_value(&dump)?;
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

fn store_import(ctx: &Context, dump: &Dump) -> Answer {
    ctx.accounts().import_store(dump)?;
    Ok(Response::ok(vec![format!(
        "imported {} accounts, {} app passwords, {} audit events",
        dump.accounts.len(),
        dump.app_passwords.len(),
        dump.audit.len()
    )]))
}

fn user_list(ctx: &Context) -> Answer {
    let store = ctx.store.as_ref();
    let accounts = store.list_accounts()?;
    let mut lines = Vec::new();
    let mut json = Vec::new();
    for a in &accounts {
        let n = store.list_app_passwords(&a.username)?.len();
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

fn user_passwd(ctx: &Context, email: &str, password_hash: String) -> Answer {
    let email = check_email(email)?;
    let ended = ctx.accounts().set_password(&email, password_hash, false)?;
    Ok(Response::ok(vec![format!(
        "password changed for {email} ({ended} sessions opened with the old password ended)"
    )]))
}

fn user_unlock(ctx: &Context, email: &str) -> Answer {
    let email = check_email(email)?;
    ctx.accounts().unlock(&email)?;
    Ok(Response::ok(vec![format!(
        "unlocked {email}: its password and code guess budgets are full again and its failure delay is cleared"
    )]))
}

fn user_remove(ctx: &Context, email: &str) -> Answer {
    let email = check_email(email)?;
    let ended = ctx.accounts().remove(&email)?;
    Ok(Response::ok(vec![format!("removed {email} ({ended} live sessions ended)")]))
}

fn app_password_create(
    ctx: &Context,
    email: &str,
    label: &str,
    scopes: Vec<Scope>,
    limits: crate::auth::app_password::Limits,
) -> Answer {
    let email = check_email(email)?;
    let made = ctx.accounts().create_limited_app_password(&email, label, scopes, limits)?;
    let scope_names: Vec<&str> = made.scopes.iter().map(|s| s.as_str()).collect();
    let limits =
        ctx.store.get_app_password(&made.new.id)?.map(|r| crate::accounts::limits_text(&r)).unwrap_or_default();
    Ok(Response {
        ok: true,
        lines: vec![
            format!(
                "created app password {} \"{}\" for {email} (scopes: {}{limits})",
                made.new.id,
                made.label,
                scope_names.join(",")
            ),
            "It is shown only this once; enter it in the mail app as the password (spaces optional):".into(),
            made.new.grouped().expose().clone(),
        ],
        json: Some(serde_json::json!({"id": made.new.id})),
        error: None,
    })
}

/// One last use in `--json` output.
fn use_json(u: &crate::store::LastUse) -> serde_json::Value {
    serde_json::json!({"at": u.at, "ip": u.ip, "client": u.client, "protocol": u.protocol.map(|p| p.as_str())})
}

fn app_password_list(ctx: &Context, email: &str) -> Answer {
    let email = check_email(email)?;
    let accounts = ctx.accounts();
    accounts.account(&email)?;
    let list = ctx.store.list_app_passwords(&email)?;
    let mut lines = Vec::new();
    let mut json = Vec::new();
    for r in &list {
        let scopes: Vec<&str> = r.scopes.iter().map(|s| s.as_str()).collect();
        // An OAuth grant (a mail app signed in through the browser) is a device like an
        // app password: same list, same revoke.
        let kind = match &r.oauth {
            Some(g) => format!(
                "\tsigned in through the browser: client {}{}",
                g.client_id,
                g.user_agent.as_deref().map(|ua| format!(", {ua}")).unwrap_or_default()
            ),
            None => String::new(),
        };
        let now = crate::fsutil::now_unix();
        let limits = match r.expires_at {
            Some(at) if at <= now => format!("\tEXPIRED {}", fmt_time(at)),
            Some(at) => format!("\texpires {}", fmt_time(at)),
            None => String::new(),
        } + &if r.allow.is_empty() {
            String::new()
        } else {
            format!("\tonly from {}", r.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","))
        } + &match &r.narrow {
            Some(n) => format!("\t{}", n.words().trim_start_matches(", ")),
            None => String::new(),
        };
        lines.push(format!(
            "{}\t{}\t{}\tcreated {}\tlast used {}{kind}{limits}",
            r.id,
            r.label,
            scopes.join(","),
            fmt_time(r.created_at),
            last_uses_text(r)
        ));
        json.push(serde_json::json!({
            "id": r.id, "label": r.label, "scopes": scopes, "created": r.created_at,
            "created_by": r.created_by,
            "kind": if r.oauth.is_some() { "oauth" } else { "app_password" },
            "expires_at": r.expires_at,
            "expired": r.expires_at.is_some_and(|at| at <= now),
            "allow": r.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "read_only": r.narrow.as_ref().is_some_and(|n| n.read_only),
            "folders": r.narrow.as_ref().map(|n| n.folders.clone()).unwrap_or_default(),
            "send_as": r.narrow.as_ref().map(|n| n.send_as.clone()).unwrap_or_default(),
            "send_to": r.narrow.as_ref().map(|n| n.send_to.clone()).unwrap_or_default(),
            "max_messages_per_hour": r.narrow.as_ref().and_then(|n| n.max_messages),
            "max_recipients_per_hour": r.narrow.as_ref().and_then(|n| n.max_recipients),
            "oauth": r.oauth.as_ref().map(|g| serde_json::json!({
                "client_id": g.client_id, "client_name": g.client_name, "user_agent": g.user_agent,
                "refreshed": g.refreshed_at,
            })),
            "last_used": r.last_used.as_ref().map(use_json),
            "last_used_by": r.last_used_by.iter().map(|(p, u)| (p.as_str().to_string(), use_json(u))).collect::<serde_json::Map<_, _>>(),
        }));
    }
    if list.is_empty() {
        lines.push(format!("{email} has no app passwords"));
    }
    let stale = accounts.stale_devices(&email)?;
    for (detail, at) in &stale {
        lines.push(format!("refused account password (needs an app password): {detail}, last {}", fmt_time(*at)));
    }
    let stale_json: Vec<_> = stale.iter().map(|(d, at)| serde_json::json!({"device": d, "last": at})).collect();
    Ok(Response {
        ok: true,
        lines,
        json: Some(serde_json::json!({"app_passwords": json, "account_password_refusals": stale_json})),
        error: None,
    })
}

fn devices(ctx: &Context, email: &str, stale_after_days: u64) -> Answer {
    let email = check_email(email)?;
    let list = ctx.accounts().devices(&email, stale_after_days.saturating_mul(86_400))?;
    let mut lines = vec![format!("{email}: app passwords and apps signed in through the browser")];
    let mut json = Vec::new();
    for d in &list.signed_in {
        let r = &d.record;
        let kind = match &r.oauth {
            Some(g) => format!("signed in through the browser ({})", g.client_id),
            None => "app password".to_string(),
        };
        let mut marks = crate::accounts::limits_text(r);
        if d.stale {
            marks.push_str(&format!(
                ", STALE: unused for over {stale_after_days} days (revoke it if the device is gone)"
            ));
        }
        if let Some((at, why)) = &d.last_refusal {
            marks.push_str(&format!(", last refused {}: {why}", fmt_time(*at)));
        }
        let scopes: Vec<&str> = r.scopes.iter().map(|s| s.as_str()).collect();
        lines.push(format!(
            "  {}\t{}\t{kind}\t{}\tcreated {}\tlast used {}{marks}",
            r.id,
            r.label,
            scopes.join(","),
            fmt_time(r.created_at),
            last_uses_text(r)
        ));
        json.push(serde_json::json!({
            "id": r.id, "label": r.label, "kind": if r.oauth.is_some() { "oauth" } else { "app_password" },
            "client_id": r.oauth.as_ref().map(|g| g.client_id.clone()),
            "scopes": scopes, "created": r.created_at, "last_used": r.last_used.as_ref().map(use_json),
            "stale": d.stale, "expires_at": r.expires_at,
            "last_refusal": d.last_refusal.as_ref().map(|(at, why)| serde_json::json!({"at": at, "reason": why})),
        }));
    }
    if list.signed_in.is_empty() {
        lines.push("  none".into());
    }
    lines.push(format!("{email}: mail apps still using the account password"));
    for p in &list.account_password {
        lines.push(format!(
            "  {}{}\tvia {}\tlast {}\t{}",
            p.ip,
            p.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
            p.protocols.join(", "),
            fmt_time(p.last_seen),
            if p.refused { "REFUSED: give it an app password" } else { "signed in" }
        ));
    }
    if list.account_password.is_empty() {
        lines.push("  none".into());
    }
    let pw_json: Vec<_> = list
        .account_password
        .iter()
        .map(|p| {
            serde_json::json!({"ip": p.ip, "client": p.client, "protocols": p.protocols, "last_seen": p.last_seen, "refused": p.refused})
        })
        .collect();
    Ok(Response {
        ok: true,
        lines,
        json: Some(serde_json::json!({"signed_in": json, "account_password": pw_json})),
        error: None,
    })
}

fn app_password_revoke(ctx: &Context, email: &str, id: &str) -> Answer {
    let email = check_email(email)?;
    let accounts = ctx.accounts();
    accounts.account(&email)?;
    let (rec, ended) = accounts.revoke_app_password(&email, id)?;
    Ok(Response::ok(vec![format!(
        "revoked app password {} \"{}\" of {email} ({ended} live sessions ended)",
        rec.id, rec.label
    )]))
}

fn totp_enable(ctx: &Context, email: &str, secret: Option<&str>) -> Answer {
    let email = check_email(email)?;
    let accounts = ctx.accounts();
    accounts.account(&email)?;
    let on = accounts.enable_totp(&email, secret)?;
    let what = if on.replaced { "re-enrolled (the old TOTP secret no longer works)" } else { "enabled" };
    let mut lines = vec![
        format!("two-factor authentication {what} for {email} ({} account-password sessions ended)", on.ended),
        "Backup codes, each good for one sign-in on the web step without the app (shown only this once):".into(),
    ];
    lines.extend(on.backup_codes.iter().map(|c| c.expose().clone()));
    lines.push("Add this to an authenticator app (it is shown only this once):".into());
    lines.extend(on.uri.map(|u| u.expose().clone()));
    Ok(Response::ok(lines))
}

fn totp_disable(ctx: &Context, email: &str) -> Answer {
    let email = check_email(email)?;
    ctx.accounts().disable_totp(&email)?;
    Ok(Response::ok(vec![format!("two-factor authentication disabled for {email}")]))
}

fn backup_codes_regenerate(ctx: &Context, email: &str) -> Answer {
    let email = check_email(email)?;
    let codes = ctx.accounts().regenerate_backup_codes(&email)?;
    let mut lines = vec![format!(
        "new backup codes for {email}; the old ones no longer work. Each is good for one sign-in on the web step (shown only this once):"
    )];
    lines.extend(codes.iter().map(|c| c.expose().clone()));
    Ok(Response::ok(lines))
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
                        .hash_for_admin(move || execute(&ctx2, req))
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

    /// Why a request could not be sent to the running server, or its answer read.
    #[derive(Debug, thiserror::Error)]
    pub enum SocketError {
        /// The socket is there but cannot be connected to.
        #[error("cannot reach the running server at {path}: {source}")]
        Unreachable {
            /// The socket.
            path: std::path::PathBuf,
            /// Why.
            source: std::io::Error,
        },
        /// Writing the request or reading the answer failed.
        #[error("admin socket: {0}")]
        Io(#[from] std::io::Error),
        /// The request could not be encoded.
        #[error("admin socket: cannot encode the request: {0}")]
        Encode(serde_json::Error),
        /// The answer is not one.
        #[error("admin socket: bad answer: {0}")]
        BadAnswer(serde_json::Error),
    }

    /// Client side: sends one request to a running server. `Ok(None)`: no server listens.
    pub fn request(path: &Path, req: &Request) -> Result<Option<Response>, SocketError> {
        use std::io::{BufRead, Write};
        let mut conn = match std::os::unix::net::UnixStream::connect(path) {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(source) => return Err(SocketError::Unreachable { path: path.to_path_buf(), source }),
        };
        let mut line = serde_json::to_vec(req).map_err(SocketError::Encode)?;
        line.push(b'\n');
        conn.write_all(&line)?;
        let mut resp = String::new();
        std::io::BufReader::new(conn).read_line(&mut resp)?;
        serde_json::from_str(&resp).map(Some).map_err(SocketError::BadAnswer)
    }
}

#[cfg(test)]
mod unlock_tests {
    use super::*;
    use crate::store::Account;
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
            live: None,
            hashing: Some(auth.clone()),
        };
        let out = execute(&ctx, Request::UserUnlock { email: "a@x".into() });
        assert!(out.ok, "{:?}", out.error);
        assert!(auth.failure_delay(stranger, "a@x", b"y") < Duration::from_secs(1), "the delay was left in place");
        assert!(auth.take_slot(crate::auth::budget::Secret::AccountPassword, "a@x", stranger).await.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: a mail app signed in through the browser is listed and revoked like an
    /// app password, with its client, in text and `--json`.
    #[test]
    fn oauth_grants_are_listed_and_revoked_like_app_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::sled_store::SledStore::open(dir.path()).unwrap());
        let key = Arc::new(SecretKey::from_bytes(&[3; 32]).unwrap());
        let ctx = Context { store, key, issuer: "mail.example.test".into(), live: None, hashing: None };
        let svc = ctx.accounts();
        svc.create("a@example.test", &[], None).unwrap();
        let cfg = crate::config::Config::from_toml_str("[oauth]\nenabled = true\n", "t").unwrap().oauth;
        let approved = crate::auth::oauth::Approved {
            client_id: "thunderbird".into(),
            redirect_uri: "http://127.0.0.1:5555/".into(),
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into(),
            scopes: vec![Scope::Imap, Scope::Smtp],
        };
        let code = svc.oauth_issue_code("a@example.test", &approved, &cfg).unwrap();
        let from =
            crate::auth::oauth::Requester { ip: [192, 0, 2, 4].into(), user_agent: Some("Thunderbird/153.0".into()) };
        let client = cfg.client("thunderbird").unwrap();
        let t = svc
            .oauth_redeem_code(
                code.expose(),
                client,
                "http://127.0.0.1:5555/",
                "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
                &from,
                &cfg,
            )
            .unwrap();
        let r = execute(&ctx, Request::AppPasswordList { email: "a@example.test".into() });
        assert!(r.ok, "{:?}", r.error);
        let line = r.lines.iter().find(|l| l.starts_with(&t.grant_id)).unwrap();
        assert!(
            line.contains("Thunderbird")
                && line.contains("signed in through the browser: client thunderbird, Thunderbird/153.0"),
            "{line}"
        );
        let j = &r.json.unwrap()["app_passwords"][0];
        assert_eq!(j["kind"], "oauth");
        assert_eq!(j["oauth"]["client_id"], "thunderbird");
        assert_eq!(j["scopes"], serde_json::json!(["imap", "smtp"]));
        let text = serde_json::to_string(j).unwrap();
        assert!(!text.contains(t.refresh_token.expose()) && !text.contains("refresh_hash"), "{text}");
        let r = execute(&ctx, Request::AppPasswordRevoke { email: "a@example.test".into(), id: t.grant_id.clone() });
        assert!(r.ok, "{:?}", r.error);
        assert!(svc.oauth_refresh(t.refresh_token.expose(), client, &from, &cfg).is_err());
    }
}
