//! The handlers and their templates.
// Helpers return the response to send instead of an error type: the idiom of axum
// handlers. Boxing every early response would only add allocations.
#![allow(clippy::result_large_err)]

use super::ClientIp;
use super::Web;
use super::session::{COOKIE, ENROL_SECS, MAX_WRONG_CODES, STEP_UP_SECS, Stage};
use crate::admin;
use crate::auth::{WebCheck, backup_codes, password, totp};
use crate::secret::{SecretBytes, SecretString, ct_eq};
use crate::store::{Account, Scope, StoreError, TotpState};
use askama::Template;
use axum::extract::{Extension, Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

type W = State<Arc<Web>>;

type Fields = Form<HashMap<String, String>>;

// ---------------------------------------------------------------------------------------
// Templates

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    host: &'a str,
    csrf: &'a str,
    error: Option<&'a str>,
    notice: Option<String>,
    username: &'a str,
}

#[derive(Template)]
#[template(path = "second_factor.html")]
struct SecondFactorPage<'a> {
    host: &'a str,
    csrf: &'a str,
    error: Option<&'a str>,
    backup: bool,
}

struct Row {
    id: String,
    label: String,
    scopes: String,
    created: String,
    last_used: String,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage<'a> {
    host: &'a str,
    csrf: &'a str,
    username: &'a str,
    notice: Option<String>,
    passwords: Vec<Row>,
    stale: Vec<String>,
    failed: Vec<String>,
    totp: bool,
    codes_left: usize,
    can_change_password: bool,
    /// The new-app-password form as sent, when it was refused.
    draft: Draft,
}

/// The new-app-password form: empty with both scopes ticked, or as the user sent it with
/// what was wrong.
struct Draft {
    label: String,
    imap: bool,
    smtp: bool,
    error: Option<String>,
}

impl Default for Draft {
    fn default() -> Draft {
        Draft { label: String::new(), imap: true, smtp: true, error: None }
    }
}

#[derive(Template)]
#[template(path = "created.html")]
struct CreatedPage<'a> {
    host: &'a str,
    csrf: &'a str,
    username: &'a str,
    label: &'a str,
    password: &'a str,
    imap_port: u16,
    imap_security: &'a str,
    smtp_port: u16,
    smtp_security: &'a str,
}

#[derive(Template)]
#[template(path = "enrol.html")]
struct EnrolPage<'a> {
    host: &'a str,
    csrf: &'a str,
    username: &'a str,
    grouped: &'a str,
    qr: &'a str,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "codes.html")]
struct CodesPage<'a> {
    host: &'a str,
    csrf: &'a str,
    username: &'a str,
    codes: Vec<&'a str>,
}

#[derive(Template)]
#[template(path = "password.html")]
struct PasswordPage<'a> {
    host: &'a str,
    csrf: &'a str,
    username: &'a str,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    host: &'a str,
    heading: &'a str,
    text: &'a str,
    link: &'a str,
    link_text: &'a str,
}

// ---------------------------------------------------------------------------------------
// Helpers

fn html(t: impl Template, status: StatusCode) -> Response {
    match t.render() {
        Ok(body) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong").into_response()
        }
    }
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

fn with_cookie(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict")) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

fn clear_cookie(mut resp: Response) -> Response {
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("__Host-mailgate=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

fn cookie_id(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|kv| {
            let (k, val) = kv.trim().split_once('=')?;
            (k == COOKIE && !val.is_empty() && val.len() <= 64).then(|| val.to_string())
        })
    })
}

/// A request's session: id, token, stage.
struct Ctx {
    id: String,
    csrf: String,
    stage: Stage,
}

impl Web {
    fn now(&self) -> u64 {
        self.clock.now()
    }

    fn host(&self) -> &str {
        &self.config.hostname
    }

    fn load(&self, headers: &HeaderMap) -> Option<Ctx> {
        self.ctx(cookie_id(headers)?)
    }

    /// The session `id`, if it is live.
    fn ctx(&self, id: String) -> Option<Ctx> {
        self.web_sessions.with(&id, self.now(), |s| Ctx {
            id: id.clone(),
            csrf: s.csrf.clone(),
            stage: s.stage.clone(),
        })
    }

    /// The request's session, or a new one for `client` (`true`: the cookie must be set).
    fn load_or_create(&self, headers: &HeaderMap, client: IpAddr) -> Option<(Ctx, bool)> {
        if let Some(c) = self.load(headers) {
            return Some((c, false));
        }
        let id = self.web_sessions.create(self.now(), client)?;
        Some((self.ctx(id)?, true))
    }

    fn take_notice(&self, id: &str) -> Option<String> {
        self.web_sessions.with(id, self.now(), |s| s.notice.take()).flatten()
    }

    fn set_notice(&self, id: &str, text: impl Into<String>) {
        let text = text.into();
        self.web_sessions.with(id, self.now(), |s| s.notice = Some(text.clone()));
    }

    /// CSRF: the session's token in the form, and a same-origin request
    /// (Sec-Fetch-Site, else Origin). The login form is covered too (login CSRF).
    fn check_post(&self, headers: &HeaderMap, ctx: &Ctx, form: &HashMap<String, String>) -> Result<(), Response> {
        let forbidden = || {
            html(
                MessagePage {
                    host: self.host(),
                    heading: "Request refused",
                    text: "This form was sent from another site or has expired. Go back, reload the page and try again.",
                    link: "/",
                    link_text: "Start again",
                },
                StatusCode::FORBIDDEN,
            )
        };
        if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
            && !matches!(site, "same-origin" | "none")
        {
            return Err(forbidden());
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let public = origin_of(&self.config.public_url);
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(|h| format!("https://{h}"));
            if Some(origin) != public.as_deref() && Some(origin) != host.as_deref() {
                return Err(forbidden());
            }
        }
        let token = form.get("csrf").map(String::as_str).unwrap_or("");
        if !ct_eq(token.as_bytes(), ctx.csrf.as_bytes()) {
            return Err(forbidden());
        }
        Ok(())
    }

    /// The signed-in user, or a redirect to the sign-in page.
    fn user(&self, ctx: &Option<Ctx>) -> Result<(String, u64), Response> {
        match ctx {
            Some(Ctx { stage: Stage::SignedIn { username, auth_at }, .. }) => Ok((username.clone(), *auth_at)),
            Some(c) => {
                self.set_notice(&c.id, "Sign in to manage your app passwords and two-step verification.");
                Err(redirect("/login"))
            }
            None => Err(redirect("/login")),
        }
    }

    /// Factor changes and new app passwords need a recent sign-in; otherwise sign in again.
    fn fresh(&self, ctx: &Ctx, auth_at: u64) -> Result<(), Response> {
        if self.now().saturating_sub(auth_at) <= STEP_UP_SECS {
            return Ok(());
        }
        self.web_sessions.with(&ctx.id, self.now(), |s| {
            s.stage = Stage::Anonymous;
            s.notice = Some("For this change, please sign in again.".into());
        });
        Err(redirect("/login"))
    }

    fn account(&self, username: &str) -> Result<Account, Response> {
        match self.auth.store().get_account(username) {
            Ok(Some(a)) => Ok(a),
            _ => Err(self.error("Your account could not be loaded. Sign in again.")),
        }
    }

    fn error(&self, text: &str) -> Response {
        html(
            MessagePage {
                host: self.host(),
                heading: "Something went wrong",
                text,
                link: "/",
                link_text: "Start again",
            },
            StatusCode::INTERNAL_SERVER_ERROR,
        )
    }

    /// Something needed is not there right now (the store, a hashing thread).
    fn unavailable(&self) -> Response {
        html(
            MessagePage {
                host: self.host(),
                heading: "Try again in a minute",
                text: "Signing in is not possible right now. Try again in a minute.",
                link: "/login",
                link_text: "Try again",
            },
            StatusCode::SERVICE_UNAVAILABLE,
        )
    }

    fn audit(&self, username: &str, kind: &str, detail: String) {
        admin::audit_event(self.auth.store().as_ref(), username, kind, detail);
    }

    /// Signs in fully: a new session id, the sign-in time for step-up.
    fn complete_sign_in(&self, ctx: &Ctx, username: &str) -> Response {
        let now = self.now();
        self.web_sessions.with(&ctx.id, now, |s| {
            s.stage = Stage::SignedIn { username: username.to_string(), auth_at: now };
            s.wrong_codes = 0;
        });
        self.audit(username, "web_sign_in", String::new());
        match self.web_sessions.rotate(&ctx.id) {
            Some(new) => with_cookie(redirect("/app-passwords"), &new),
            None => self.error("Sign-in failed."),
        }
    }

    /// A wrong second factor (its slot was taken before it was compared): after the
    /// delay, the pending sign-in is dropped if that was its last slot.
    async fn wrong_code(&self, ctx: &Ctx, username: &str, backup: bool, ip: IpAddr, code: &[u8]) -> Response {
        self.audit(username, "second_factor_failed", if backup { "backup code" } else { "TOTP code" }.into());
        self.auth.log_refusal(crate::auth::refusals::Kind::SecondFactor, ip, username);
        tokio::time::sleep(self.auth.failure_delay(ip, username, code)).await;
        let dropped = self
            .web_sessions
            .with(&ctx.id, self.now(), |s| {
                if s.wrong_codes >= MAX_WRONG_CODES {
                    drop_pending(s);
                    true
                } else {
                    !matches!(s.stage, Stage::SecondFactor { .. })
                }
            })
            .unwrap_or(true);
        if dropped {
            return redirect("/login");
        }
        html(
            SecondFactorPage {
                host: self.host(),
                csrf: &ctx.csrf,
                error: Some(if backup {
                    "That backup code is not right or was used already."
                } else {
                    "That code is not right. Check the time on your phone and try the next code."
                }),
                backup,
            },
            StatusCode::UNAUTHORIZED,
        )
    }
}

fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}"))
}

fn fmt_time(t: u64) -> String {
    admin::fmt_time(t)
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(super) async fn root(State(web): W, headers: HeaderMap) -> Response {
    match web.load(&headers) {
        Some(Ctx { stage: Stage::SignedIn { .. }, .. }) => redirect("/app-passwords"),
        _ => redirect("/login"),
    }
}

pub(super) async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../templates/style.css"),
    )
        .into_response()
}

pub(super) async fn login_form(State(web): W, ip: Option<Extension<ClientIp>>, headers: HeaderMap) -> Response {
    // None: too many sessions, or the shared store is unreachable.
    let Some((ctx, new)) = web.load_or_create(&headers, client_ip(&ip)) else { return web.unavailable() };
    if let Stage::SignedIn { .. } = ctx.stage {
        return redirect("/app-passwords");
    }
    let notice = web.take_notice(&ctx.id);
    let page = html(LoginPage { host: web.host(), csrf: &ctx.csrf, error: None, notice, username: "" }, StatusCode::OK);
    if new { with_cookie(page, &ctx.id) } else { page }
}

/// The client's address, put into each request by the connection (absent in handler tests).
fn client_ip(ip: &Option<Extension<ClientIp>>) -> IpAddr {
    ip.as_ref().map(|e| e.0.0).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

pub(super) async fn login(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let ip = client_ip(&ip);
    let Some(ctx) = web.load(&headers) else { return redirect("/login") };
    if let Err(r) = web.check_post(&headers, &ctx, &form) {
        return r;
    }
    let username = crate::auth::normalize_username(form.get("username").map(String::as_str).unwrap_or(""));
    let password = SecretBytes::from(form.get("password").cloned().unwrap_or_default().into_bytes());
    let refuse = |web: &Web, text: &'static str, status| {
        html(
            LoginPage { host: web.host(), csrf: &ctx.csrf, error: Some(text), notice: None, username: &username },
            status,
        )
    };
    if username.is_empty() || username.len() > 254 || password.expose().is_empty() || password.expose().len() > 1024 {
        tokio::time::sleep(web.auth.base_delay()).await;
        return refuse(&web, "The e-mail address or password is not right.", StatusCode::UNAUTHORIZED);
    }
    match web.auth.check_account_password(&username, &password, ip).await {
        WebCheck::Ok(account) if account.has_second_factor() => {
            let now = web.now();
            web.web_sessions.with(&ctx.id, now, |s| {
                s.stage = Stage::SecondFactor { username: account.username.clone(), since: now };
                s.wrong_codes = 0;
            });
            match web.web_sessions.rotate(&ctx.id) {
                Some(new) => with_cookie(redirect("/login/totp"), &new),
                None => web.error("Sign-in failed."),
            }
        }
        WebCheck::Ok(account) => web.complete_sign_in(&ctx, &account.username),
        WebCheck::Denied => {
            tokio::time::sleep(web.auth.failure_delay(ip, &username, password.expose())).await;
            refuse(&web, "The e-mail address or password is not right.", StatusCode::UNAUTHORIZED)
        }
        WebCheck::Unavailable => refuse(
            &web,
            "Signing in is not possible right now. Try again in a minute.",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    }
}

/// A pending sign-in that used its code slots ends: sign in again.
fn drop_pending(s: &mut super::session::WebSession) {
    s.stage = Stage::Anonymous;
    s.wrong_codes = 0;
    s.notice = Some("Too many wrong codes. Sign in again.".into());
}

/// The page shown when a budget of second-factor guesses is used up.
fn codes_used_up(web: &Web, which: crate::auth::budget::Exhausted) -> Response {
    let text = match which {
        crate::auth::budget::Exhausted::Account => {
            "Too many wrong codes were entered for this account. Try again in a few hours, or ask your mail administrator to unlock it."
        }
        crate::auth::budget::Exhausted::Address => {
            "Too many wrong codes were entered from your network. Try again in a few minutes."
        }
    };
    html(
        MessagePage { host: web.host(), heading: "Sign-in paused", text, link: "/login", link_text: "Back to sign-in" },
        StatusCode::TOO_MANY_REQUESTS,
    )
}

/// A sign-in waiting for its second factor, and its account.
fn pending(ctx: Option<Ctx>) -> Option<(Ctx, String)> {
    let ctx = ctx?;
    let Stage::SecondFactor { username, .. } = &ctx.stage else { return None };
    let username = username.clone();
    Some((ctx, username))
}

fn second_factor_form(web: &Web, headers: &HeaderMap, backup: bool) -> Response {
    let Some((ctx, _)) = pending(web.load(headers)) else { return redirect("/login") };
    html(SecondFactorPage { host: web.host(), csrf: &ctx.csrf, error: None, backup }, StatusCode::OK)
}

pub(super) async fn totp_form(State(web): W, headers: HeaderMap) -> Response {
    second_factor_form(&web, &headers, false)
}

pub(super) async fn backup_form(State(web): W, headers: HeaderMap) -> Response {
    second_factor_form(&web, &headers, true)
}

/// A second-factor code arrived: the pending sign-in, with one of its code slots and one
/// slot of the address's and the account's code budgets taken **before** anything is
/// compared (SECURITY.md §H), so codes sent at the same time cannot all be compared.
/// `Err`: refused uncompared (no pending sign-in, a forged form, no slot left).
async fn second_factor_slot(
    web: &Web,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    ip: IpAddr,
) -> Result<(Ctx, String, crate::auth::budget::Ticket), Response> {
    let Some((ctx, username)) = pending(web.load(headers)) else { return Err(redirect("/login")) };
    web.check_post(headers, &ctx, form)?;
    // The sign-in's own slots: one atomic change of the session (on every node).
    let reserved = web
        .web_sessions
        .with(&ctx.id, web.now(), |s| {
            if !matches!(s.stage, Stage::SecondFactor { .. }) {
                return false;
            }
            if s.wrong_codes >= MAX_WRONG_CODES {
                drop_pending(s);
                return false;
            }
            s.wrong_codes += 1;
            true
        })
        .unwrap_or(false);
    if !reserved {
        return Err(redirect("/login"));
    }
    match web.auth.take_slot(crate::auth::budget::Secret::SecondFactor, &username, ip).await {
        Ok(ticket) => Ok((ctx, username, ticket)),
        Err(no) => {
            give_back_code_slot(web, &ctx);
            Err(match no {
                crate::auth::NoSlot::Exhausted(which) => codes_used_up(web, which),
                crate::auth::NoSlot::Unavailable => web.unavailable(),
            })
        }
    }
}

/// A code slot of the sign-in that was not used after all.
fn give_back_code_slot(web: &Web, ctx: &Ctx) {
    web.web_sessions.with(&ctx.id, web.now(), |s| s.wrong_codes = s.wrong_codes.saturating_sub(1));
}

/// What a TOTP or backup code came to: signed in (with the backup codes left, for a
/// backup code), a wrong code (its slots stay used), or no answer from the store ("try
/// again"; the slots come back).
async fn second_factor_outcome(
    web: &Web,
    (ctx, username, ticket): (Ctx, String, crate::auth::budget::Ticket),
    ip: IpAddr,
    typed: &[u8],
    backup: bool,
    result: Result<Option<usize>, StoreError>,
) -> Response {
    match result {
        Ok(left) => {
            web.auth.settle(ticket, crate::auth::Outcome::Right).await;
            if let Some(left) = left {
                web.audit(&username, "backup_code_used", format!("{left} left"));
                web.set_notice(&ctx.id, format!("You signed in with a backup code. {left} backup codes are left."));
            }
            web.complete_sign_in(&ctx, &username)
        }
        Err(StoreError::Backend(_)) => {
            web.auth.settle(ticket, crate::auth::Outcome::NotCompared).await;
            give_back_code_slot(web, &ctx);
            web.unavailable()
        }
        Err(_) => {
            web.auth.settle(ticket, crate::auth::Outcome::Wrong).await;
            web.wrong_code(&ctx, &username, backup, ip, typed).await
        }
    }
}

pub(super) async fn totp(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let ip = client_ip(&ip);
    let slot = match second_factor_slot(&web, &headers, &form, ip).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let code: String = form.get("code").map(|c| c.chars().filter(|c| !c.is_whitespace()).collect()).unwrap_or_default();
    let now = web.now();
    let key = web.key.clone();
    let user = slot.1.clone();
    // Verify and move the last accepted step forward in one atomic change: the same code
    // (or an earlier one) never works twice, and of two concurrent submissions one wins.
    let accepted = web.auth.store().update_account(&user, &mut |a: &mut Account| {
        let Some(t) = a.totp.as_mut() else { return Err(StoreError::Conflict("no TOTP".into())) };
        let secret = key.open(&t.secret_enc, &user).map_err(|_| StoreError::Corrupt("totp secret".into()))?;
        match totp::matching_step(secret.expose(), &code, now) {
            Some(step) if step > t.last_step => {
                t.last_step = step;
                Ok(())
            }
            _ => Err(StoreError::Conflict("wrong code".into())),
        }
    });
    let result = accepted.map(|_| None);
    second_factor_outcome(&web, slot, ip, code.as_bytes(), false, result).await
}

pub(super) async fn backup(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let ip = client_ip(&ip);
    let slot = match second_factor_slot(&web, &headers, &form, ip).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let code = SecretString::from(form.get("code").cloned().unwrap_or_default());
    let result = spend_backup_code(&web, &slot.1, &code, ip).await;
    second_factor_outcome(&web, slot, ip, code.expose().as_bytes(), true, result).await
}

/// Finds the typed backup code in the account's set (one HMAC; outside any store lock),
/// then spends it in one atomic change if it is still unused. `Ok(left)`: spent.
async fn spend_backup_code(
    web: &Web,
    username: &str,
    code: &SecretString,
    ip: IpAddr,
) -> Result<Option<usize>, StoreError> {
    let wrong = || StoreError::Conflict("wrong code".into());
    let account = web.auth.store().get_account(username)?.ok_or_else(wrong)?;
    let set = account.backup_codes.ok_or_else(wrong)?;
    let found = if backup_codes::needs_hashing(&set) {
        // A set from before keyed hashes: argon2 per code, on a hashing thread.
        let (key, typed) = (web.key.clone(), SecretString::from(code.expose().clone()));
        web.auth
            .run_blocking(ip, move || backup_codes::find(&set, typed.expose(), &key))
            .await
            .ok_or_else(|| StoreError::Backend("the hashing queue is busy".into()))?
    } else {
        backup_codes::find(&set, code.expose(), &web.key)
    };
    let found = found.ok_or_else(wrong)?;
    let mut left = 0;
    web.auth.store().update_account(username, &mut |a: &mut Account| {
        let Some(set) = a.backup_codes.as_mut() else { return Err(wrong()) };
        if !backup_codes::spend(set, &found) {
            return Err(wrong());
        }
        left = set.remaining();
        Ok(())
    })?;
    Ok(Some(left))
}

pub(super) async fn logout(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    if let Some(ctx) = web.load(&headers) {
        if let Err(r) = web.check_post(&headers, &ctx, &form) {
            return r;
        }
        web.web_sessions.remove(&ctx.id);
    }
    clear_cookie(redirect("/login"))
}

pub(super) async fn account(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, _) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    account_page(&web, &ctx, &username, Draft::default())
}

/// The account page; `draft`: the new-app-password form to show again (422 if it has an
/// error).
fn account_page(web: &Web, ctx: &Ctx, username: &str, draft: Draft) -> Response {
    let store = web.auth.store();
    let account = match web.account(username) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let passwords = store
        .list_app_passwords(username)
        .unwrap_or_default()
        .into_iter()
        .map(|r| Row {
            id: r.id.clone(),
            label: r.label.clone(),
            scopes: r.scopes.iter().map(|s| s.as_str().to_uppercase()).collect::<Vec<_>>().join(", "),
            created: fmt_time(r.created_at),
            last_used: match &r.last_used {
                Some(u) => format!(
                    "{} from {}{}",
                    fmt_time(u.at),
                    u.ip,
                    u.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
                ),
                None => "never".into(),
            },
        })
        .collect();
    let stale = admin::stale_devices(store.as_ref(), username)
        .unwrap_or_default()
        .into_iter()
        .map(|(d, at)| format!("{d}, last {}", fmt_time(at)))
        .collect();
    // Someone knew the password but not the second factor (SECURITY.md case 83): say so.
    let since = web.now().saturating_sub(30 * 24 * 3600);
    let failed = store
        .recent_audit(username, 200)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.kind == "second_factor_failed" && e.at >= since)
        .take(5)
        .map(|e| format!("{} (wrong {})", fmt_time(e.at), e.detail))
        .collect();
    let notice = web.take_notice(&ctx.id);
    let status = if draft.error.is_some() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    html(
        AccountPage {
            host: web.host(),
            csrf: &ctx.csrf,
            username,
            notice,
            passwords,
            stale,
            failed,
            totp: account.has_second_factor(),
            codes_left: account.backup_codes.as_ref().map(|c| c.remaining()).unwrap_or(0),
            can_change_password: account.password_hash.is_some() && !web.auth.upstream_mode(),
            draft,
        },
        status,
    )
}

/// The signed-in user of a POST whose token checks out; `fresh`: also a recent sign-in.
fn post_user(
    web: &Web,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    fresh: bool,
) -> Result<(Ctx, String), Response> {
    let ctx = web.load(headers);
    let (username, auth_at) = web.user(&ctx)?;
    let Some(ctx) = ctx else { return Err(redirect("/login")) };
    web.check_post(headers, &ctx, form)?;
    if fresh {
        web.fresh(&ctx, auth_at)?;
    }
    Ok((ctx, username))
}

/// The port and security a mail app should use: implicit TLS if mailgate listens for it,
/// else STARTTLS.
fn endpoint(tls: &[std::net::SocketAddr], starttls: &[std::net::SocketAddr], tls_default: u16) -> (u16, &'static str) {
    match (tls.first(), starttls.first()) {
        (Some(t), _) => (t.port(), "SSL/TLS"),
        (None, Some(s)) => (s.port(), "STARTTLS"),
        (None, None) => (tls_default, "SSL/TLS"),
    }
}

/// Text for an XML element.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub(super) async fn create_app_password(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let ip = client_ip(&ip);
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut scopes = Vec::new();
    if form.contains_key("scope_imap") {
        scopes.push(Scope::Imap);
    }
    if form.contains_key("scope_smtp") {
        scopes.push(Scope::Smtp);
    }
    if scopes.is_empty() {
        web.set_notice(&ctx.id, "Choose what the app password may be used for (reading, sending or both).");
        return redirect("/app-passwords");
    }
    let label = form.get("label").cloned().unwrap_or_default();
    // Refused labels come back in the form as typed, with the reason (the same check
    // runs again in admin::create_app_password, for the CLI too).
    if let Err(e) = admin::check_label(&label) {
        let draft = Draft {
            imap: scopes.contains(&Scope::Imap),
            smtp: scopes.contains(&Scope::Smtp),
            error: Some(format!("The app password was not created: {e}.")),
            label,
        };
        return account_page(&web, &ctx, &username, draft);
    }
    let store = web.auth.store().clone();
    let user = username.clone();
    let made = web
        .auth
        .run_blocking(ip, move || admin::create_app_password(store.as_ref(), &user, &label, scopes, "web"))
        .await;
    match made {
        Some(Ok((new, label, _))) => {
            let (smtp_port, smtp_security) = endpoint(&web.config.smtp_tls, &web.config.smtp_starttls, 465);
            let (imap_port, imap_security) = endpoint(&web.config.imap_tls, &web.config.imap_starttls, 993);
            let grouped = new.grouped();
            html(
                CreatedPage {
                    host: web.host(),
                    csrf: &ctx.csrf,
                    username: &username,
                    label: &label,
                    password: grouped.expose(),
                    imap_port,
                    imap_security,
                    smtp_port,
                    smtp_security,
                },
                StatusCode::OK,
            )
        }
        Some(Err(e)) => {
            web.set_notice(&ctx.id, format!("The app password was not created: {e}."));
            redirect("/app-passwords")
        }
        None => web.error("The app password could not be created right now. Try again in a minute."),
    }
}

pub(super) async fn revoke_app_password(
    State(web): W,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Fields,
) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, false) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match admin::revoke_app_password(web.auth.store().as_ref(), Some(&web.sessions), &username, &id, "web") {
        Ok((rec, ended)) => web.set_notice(
            &ctx.id,
            format!("“{}” is revoked. {ended} of its connections were closed; it can no longer sign in.", rec.label),
        ),
        Err(_) => web.set_notice(&ctx.id, "That app password does not exist (any more)."),
    }
    redirect("/app-passwords")
}

fn qr_svg(uri: &str) -> String {
    match qrcode::QrCode::new(uri.as_bytes()) {
        Ok(code) => code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build(),
        Err(_) => String::new(),
    }
}

pub(super) async fn enrol_form(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, auth_at) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    if let Err(r) = web.fresh(&ctx, auth_at) {
        return r;
    }
    enrol_page(&web, &ctx, &username, None)
}

fn enrol_page(web: &Web, ctx: &Ctx, username: &str, error: Option<&str>) -> Response {
    match web.account(username) {
        Ok(a) if a.has_second_factor() => return redirect("/app-passwords"),
        Ok(_) => {}
        Err(r) => return r,
    }
    let now = web.now();
    let secret = web
        .web_sessions
        .with(&ctx.id, now, |s| {
            if let Some((b32, made)) = &s.pending_totp
                && now.saturating_sub(*made) <= ENROL_SECS
            {
                return Some(b32.expose().clone());
            }
            let (b32, _) = totp::new_secret(web.host(), username).ok()?;
            let v = b32.expose().clone();
            s.pending_totp = Some((b32, now));
            Some(v)
        })
        .flatten();
    let Some(secret) = secret.map(SecretString::from) else { return web.error("Could not start the enrolment.") };
    let uri = match totp_uri(web.host(), username, secret.expose()) {
        Some(u) => u,
        None => return web.error("Could not start the enrolment."),
    };
    let mut resp = html(
        EnrolPage {
            host: web.host(),
            csrf: &ctx.csrf,
            username,
            grouped: crate::auth::app_password::group(secret.expose()).expose(),
            qr: &qr_svg(uri.expose()),
            error,
        },
        if error.is_some() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK },
    );
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn totp_uri(issuer: &str, account: &str, base32: &str) -> Option<SecretString> {
    let secret = totp_rs::Secret::try_from_base32(base32).ok()?;
    let t = totp_rs::Builder::new()
        .with_secret(secret)
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .ok()?;
    t.to_url().ok().map(SecretString::from)
}

pub(super) async fn enrol(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = web.now();
    let pending = web
        .web_sessions
        .with(&ctx.id, now, |s| match &s.pending_totp {
            Some((b32, made)) if now.saturating_sub(*made) <= ENROL_SECS => Some(b32.expose().clone()),
            _ => None,
        })
        .flatten()
        .map(SecretString::from);
    let Some(b32) = pending else { return redirect("/two-factor") };
    let code: String = form.get("code").map(|c| c.chars().filter(|c| !c.is_whitespace()).collect()).unwrap_or_default();
    let raw = match totp_rs::Secret::try_from_base32(b32.expose()) {
        Ok(s) => crate::secret::Secret::new(s.as_ref().to_vec()),
        Err(_) => return web.error("Could not read the new secret."),
    };
    let Some(step) = totp::matching_step(raw.expose(), &code, now) else {
        tokio::time::sleep(web.auth.base_delay()).await;
        return enrol_page(&web, &ctx, &username, Some("That code is not right. Enter the code your app shows now."));
    };
    let sealed = match web.key.seal(raw.expose(), &username) {
        Ok(s) => s,
        Err(_) => return web.error("Could not store the new secret."),
    };
    let Ok((shown, set)) = backup_codes::generate(now, &web.key) else {
        return web.error("Could not make backup codes.");
    };
    let result = web.auth.store().update_account(&username, &mut |a: &mut Account| {
        a.totp = Some(TotpState { secret_enc: sealed.clone(), enabled_at: now, last_step: step });
        a.second_factor_required = true;
        a.backup_codes = Some(set.clone());
        a.updated_at = now;
        Ok(())
    });
    if result.is_err() {
        return web.error("Two-step verification could not be turned on. Nothing was changed.");
    }
    // From now on the account password no longer opens IMAP/SMTP: end those sessions,
    // and other web sessions of this account.
    web.sessions.kill_account_password_sessions(&username);
    web.web_sessions.end_all_of(&username, Some(&ctx.id));
    web.audit(&username, "totp_enabled", "on the web".into());
    codes_page(&web, &ctx, &username, shown)
}

fn codes_page(web: &Web, ctx: &Ctx, username: &str, shown: Vec<SecretString>) -> Response {
    let texts: Vec<String> = shown.iter().map(|c| c.expose().clone()).collect();
    let codes: Vec<&str> = texts.iter().map(String::as_str).collect();
    let resp = html(CodesPage { host: web.host(), csrf: &ctx.csrf, username, codes }, StatusCode::OK);
    web.web_sessions.with(&ctx.id, web.now(), |s| {
        s.pending_totp = None;
        s.shown_codes = Some(shown.clone());
    });
    resp
}

pub(super) async fn disable_2fa(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = web.now();
    let result = web.auth.store().update_account(&username, &mut |a: &mut Account| {
        a.totp = None;
        a.second_factor_required = false;
        a.backup_codes = None;
        a.updated_at = now;
        Ok(())
    });
    if result.is_err() {
        return web.error("Two-step verification could not be turned off. Nothing was changed.");
    }
    web.audit(&username, "totp_disabled", "on the web".into());
    web.web_sessions.with(&ctx.id, now, |s| {
        s.shown_codes = None;
        s.pending_totp = None;
    });
    web.set_notice(&ctx.id, "Two-step verification is off. Your backup codes no longer work.");
    redirect("/app-passwords")
}

pub(super) async fn regenerate_codes(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = web.now();
    let Ok((shown, set)) = backup_codes::generate(now, &web.key) else {
        return web.error("Could not make backup codes.");
    };
    let result = web.auth.store().update_account(&username, &mut |a: &mut Account| {
        if !a.has_second_factor() {
            return Err(StoreError::Conflict("two-step verification is off".into()));
        }
        a.backup_codes = Some(set.clone());
        Ok(())
    });
    if result.is_err() {
        return redirect("/app-passwords");
    }
    web.audit(&username, "backup_codes_generated", "on the web".into());
    codes_page(&web, &ctx, &username, shown)
}

pub(super) async fn download_codes(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, _) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    let text = web
        .web_sessions
        .with(&ctx.id, web.now(), |s| {
            s.shown_codes.as_ref().map(|codes| {
                let mut t = format!(
                    "Backup codes for {username} at {}\r\nEach code works once. Keep this file somewhere safe.\r\n\r\n",
                    web.host()
                );
                for c in codes {
                    t.push_str(c.expose());
                    t.push_str("\r\n");
                }
                t
            })
        })
        .flatten();
    match text {
        Some(t) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"backup-codes.txt\""),
                (header::CACHE_CONTROL, "no-store"),
            ],
            t,
        )
            .into_response(),
        None => {
            (StatusCode::NOT_FOUND, "There are no new backup codes to download. Make a new set on your account page.")
                .into_response()
        }
    }
}

pub(super) async fn password_form(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, auth_at) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    if let Err(r) = web.fresh(&ctx, auth_at) {
        return r;
    }
    match web.account(&username) {
        Ok(a) if a.password_hash.is_some() && !web.auth.upstream_mode() => {}
        Ok(_) => return redirect("/app-passwords"),
        Err(r) => return r,
    }
    html(PasswordPage { host: web.host(), csrf: &ctx.csrf, username: &username, error: None }, StatusCode::OK)
}

pub(super) async fn change_password(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let ip = client_ip(&ip);
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if web.auth.upstream_mode() {
        // The upstream server owns the password (password_check = "upstream").
        return redirect("/app-passwords");
    }
    let new = SecretString::from(form.get("new").cloned().unwrap_or_default());
    let again = SecretString::from(form.get("again").cloned().unwrap_or_default());
    let problem = if new != again {
        Some("The two passwords are not the same.")
    } else {
        // The one password policy, shared with the CLI (auth::password::policy).
        password::policy(new.expose()).err().map(|e| e.sentence())
    };
    if let Some(p) = problem {
        return html(
            PasswordPage { host: web.host(), csrf: &ctx.csrf, username: &username, error: Some(p) },
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    let Some(Ok(hash)) = web.auth.run_blocking(ip, move || password::hash(new.expose().as_bytes())).await else {
        return web.error("The password could not be changed right now.");
    };
    let now = web.now();
    let result = web.auth.store().update_account(&username, &mut |a: &mut Account| {
        if a.password_hash.is_none() {
            return Err(StoreError::Conflict("no local password".into()));
        }
        a.password_hash = Some(hash.clone());
        a.updated_at = now;
        Ok(())
    });
    if result.is_err() {
        return web.error("The password could not be changed. Nothing was changed.");
    }
    web.sessions.kill_account_password_sessions(&username);
    web.web_sessions.end_all_of(&username, Some(&ctx.id));
    let mut revoked = 0;
    if form.contains_key("revoke_all") {
        let store = web.auth.store();
        for rec in store.list_app_passwords(&username).unwrap_or_default() {
            if admin::revoke_app_password(store.as_ref(), Some(&web.sessions), &username, &rec.id, "web").is_ok() {
                revoked += 1;
            }
        }
    }
    web.audit(&username, "account_password_changed", "on the web".into());
    web.set_notice(
        &ctx.id,
        if revoked > 0 {
            format!("Your password is changed and all {revoked} app passwords are revoked. Make new ones for your mail apps.")
        } else {
            "Your password is changed.".to_string()
        },
    );
    redirect("/app-passwords")
}

pub(super) async fn autoconfig(State(web): W) -> Response {
    let host = web.host();
    let socket = |security: &str| if security == "STARTTLS" { "STARTTLS" } else { "SSL" };
    let (imap, imap_security) = endpoint(&web.config.imap_tls, &web.config.imap_starttls, 993);
    let (smtp, smtp_security) = endpoint(&web.config.smtp_tls, &web.config.smtp_starttls, 465);
    let (imap_socket, smtp_socket) = (socket(imap_security), socket(smtp_security));
    let domain = host.split_once('.').map(|(_, d)| d).unwrap_or(host);
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<clientConfig version="1.1">
  <emailProvider id="{host}">
    <domain>{domain}</domain>
    <displayName>{host}</displayName>
    <incomingServer type="imap">
      <hostname>{host}</hostname>
      <port>{imap}</port>
      <socketType>{imap_socket}</socketType>
      <authentication>password-cleartext</authentication>
      <username>%EMAILADDRESS%</username>
    </incomingServer>
    <outgoingServer type="smtp">
      <hostname>{host}</hostname>
      <port>{smtp}</port>
      <socketType>{smtp_socket}</socketType>
      <authentication>password-cleartext</authentication>
      <username>%EMAILADDRESS%</username>
    </outgoingServer>
    <documentation url="{url}/app-passwords">
      <descr lang="en">Use an app password made at {url}/app-passwords</descr>
    </documentation>
  </emailProvider>
</clientConfig>
"#,
        url = xml_escape(&web.config.public_url)
    );
    ([(header::CONTENT_TYPE, "application/xml; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], xml)
        .into_response()
}
