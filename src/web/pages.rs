//! The handlers and their templates.
// Helpers return the response to send instead of an error type: the idiom of axum
// handlers. Boxing every early response would only add allocations.

use super::ClientIp;
use super::Web;
use super::notice;
use super::session::{COOKIE, ENROL_SECS, MAX_WRONG_CODES, SECOND_FACTOR_SECS, STEP_UP_SECS, Stage};
use crate::accounts::{AccountError, AccountService, Actor, check_label, fmt_time, last_uses_text};
use crate::auth::login_log::{Line, Method, Outcome};
use crate::auth::{WebCheck, backup_codes, password};
use crate::secret::{SecretBytes, SecretString, ct_eq};
use crate::store::{Account, Scope};
use askama::Template;
use axum::extract::{Extension, Form, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

pub(super) type W = State<Arc<Web>>;

pub(super) type Fields = Form<HashMap<String, String>>;

// ---------------------------------------------------------------------------------------
// Templates

/// What the header and the title of every page show.
#[derive(Clone, Copy)]
pub(super) struct Site<'a> {
    /// The server's host name (the settings for mail apps name it).
    pub(super) host: &'a str,
    /// The name in the header and the page titles: `[web] organisation`, else the host.
    pub(super) name: &'a str,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    error: Option<&'a str>,
    notice: Option<String>,
    username: &'a str,
    /// A mail app's sign-in waits (OAuth): its name, for "Cancel and return to …".
    app: Option<String>,
}

#[derive(Template)]
#[template(path = "second_factor.html")]
struct SecondFactorPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    /// The account signing in.
    username: &'a str,
    error: Option<&'a str>,
    backup: bool,
}

struct Row {
    id: String,
    label: String,
    scopes: String,
    created: String,
    last_used: String,
    /// A mail app that signed in through the browser (an OAuth grant), not a typed app
    /// password.
    grant: Option<GrantRow>,
    /// Its expiry and networks in words ("expires …, only from …"), if limited.
    limits: Option<String>,
    /// Unused for longer than `[accounts] stale_device_days`.
    stale: bool,
    /// Its right value was last refused: when and why ("it has expired").
    refused: Option<String>,
}

/// What the list shows of an OAuth grant besides an app password's columns.
struct GrantRow {
    /// The `User-Agent` of its token requests, if sent.
    user_agent: Option<String>,
}

/// The security notice: wrong codes after the right password, not yet dismissed.
struct Alert {
    /// "Your account password was entered correctly, then a wrong code:"
    intro: String,
    /// One line per wrong code (at most [`ALERT_LINES`]), newest first.
    lines: Vec<String>,
    /// "… and 3 more."
    more: Option<String>,
    /// The newest time shown; the dismiss form sends it back.
    up_to: u64,
}

/// Wrong codes listed one by one in the security notice; more are counted.
const ALERT_LINES: usize = 5;

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    notice: Option<String>,
    alert: Option<Alert>,
    passwords: Vec<Row>,
    stale: Vec<String>,
    /// Without two-step verification: the mail apps signing in with the account password
    /// (they stop working when it is turned on).
    password_apps: Vec<String>,
    /// Days after which an unused device is marked stale.
    stale_days: u64,
    totp: bool,
    codes_left: usize,
    can_change_password: bool,
    /// The new-app-password form as sent, when it was refused.
    draft: Draft,
    /// POP3 is on: its checkbox is shown.
    pop3_offered: bool,
    /// ManageSieve is on: its checkbox is shown.
    sieve_offered: bool,
    /// OAuth is on: the Thunderbird add-on is offered.
    addon: bool,
}

/// The new-app-password form: empty with IMAP and SMTP ticked (POP3 and ManageSieve are
/// asked for, not given by default), or as the user sent it with what was wrong.
pub(super) struct Draft {
    label: String,
    imap: bool,
    smtp: bool,
    pop3: bool,
    sieve: bool,
    /// `expires`: "" (never), or a duration such as "90d".
    expires: String,
    /// `allow`: the networks it may be used from, as typed.
    allow: String,
    /// `preset`: "full", "read" (read-only), "send" (send only), "folder" (some folders).
    preset: String,
    /// `folders` (the "folder" preset), as typed.
    folders: String,
    /// `send_to` (the "send" preset), as typed.
    send_to: String,
    /// `max_messages` per hour (the "send" preset), as typed.
    max_messages: String,
    /// What is wrong with the expiry or the networks.
    limits_error: Option<String>,
    /// What is wrong with the name.
    label_error: Option<String>,
    /// No scope ticked, or one whose protocol is off.
    scope_error: Option<String>,
    /// Anything else (the store, a busy hashing queue).
    form_error: Option<String>,
}

impl Default for Draft {
    fn default() -> Draft {
        Draft {
            label: String::new(),
            imap: true,
            smtp: true,
            pop3: false,
            sieve: false,
            expires: String::new(),
            allow: String::new(),
            preset: "full".into(),
            folders: String::new(),
            send_to: String::new(),
            max_messages: "100".into(),
            limits_error: None,
            label_error: None,
            scope_error: None,
            form_error: None,
        }
    }
}

impl Draft {
    /// The empty form with `text` above it (a one-step set-up that could not be done).
    pub(super) fn with_error(text: String) -> Draft {
        Draft { form_error: Some(text), ..Draft::default() }
    }

    fn has_error(&self) -> bool {
        self.label_error.is_some()
            || self.scope_error.is_some()
            || self.form_error.is_some()
            || self.limits_error.is_some()
    }
}

#[derive(Template)]
#[template(path = "created.html")]
struct CreatedPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    label: &'a str,
    password: &'a str,
    /// What it may do, in a sentence ([`can_text`]).
    can: String,
    /// May read mail: the IMAP settings are shown.
    imap: bool,
    /// May send mail: the SMTP settings are shown.
    smtp: bool,
    imap_port: u16,
    imap_security: &'a str,
    smtp_port: u16,
    smtp_security: &'a str,
    /// With the POP3 scope: its ports ("port 995, SSL/TLS; or port 110, STARTTLS").
    pop3: Option<String>,
    /// With the ManageSieve scope: its port ("port 4190, STARTTLS").
    sieve: Option<String>,
}

#[derive(Template)]
#[template(path = "enrol.html")]
struct EnrolPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    grouped: &'a str,
    qr: &'a str,
    error: Option<&'a str>,
    /// `[policy]` requires it: why, and whether it can wait (`Some(date)`: until then).
    required: Option<Required>,
}

/// Why the enrolment page insists (`[policy] require_second_factor`).
struct Required {
    /// The last day the account password still works on the mail ports, if the grace
    /// period runs; `None`: it is over.
    until: Option<String>,
}

#[derive(Template)]
#[template(path = "codes.html")]
struct CodesPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    codes: Vec<&'a str>,
    /// Two-step verification was turned on just now (else: a new set of codes).
    turned_on: bool,
}

/// A change that asks first: what it does, and a button that does it.
#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    heading: &'a str,
    paragraphs: Vec<String>,
    action: &'a str,
    button: &'a str,
    danger: bool,
}

#[derive(Template)]
#[template(path = "password.html")]
struct PasswordPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    error: Option<&'a str>,
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    site: Site<'a>,
    heading: &'a str,
    text: &'a str,
    link: &'a str,
    link_text: &'a str,
}

/// Why a request stops before its own page. Every such answer is made by the one
/// [`IntoResponse`] below: a redirect, or a message page in the site's name.
pub(super) enum WebError {
    /// To another page (the sign-in page, the account page).
    Redirect(&'static str),
    /// A page that says what happened.
    Message(Box<Message>),
}

/// What a message page says, and its status.
pub(super) struct Message {
    host: String,
    name: String,
    status: StatusCode,
    heading: &'static str,
    text: String,
    link: &'static str,
    link_text: &'static str,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match self {
            WebError::Redirect(to) => redirect(to),
            WebError::Message(m) => html(
                MessagePage {
                    site: Site { host: &m.host, name: &m.name },
                    heading: m.heading,
                    text: &m.text,
                    link: m.link,
                    link_text: m.link_text,
                },
                m.status,
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

pub(super) fn html(t: impl Template, status: StatusCode) -> Response {
    match t.render() {
        Ok(body) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong").into_response()
        }
    }
}

pub(super) fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

pub(super) fn with_cookie(mut resp: Response, id: &str) -> Response {
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
pub(super) struct Ctx {
    pub(super) id: String,
    pub(super) csrf: String,
    pub(super) stage: Stage,
}

impl Web {
    pub(super) fn now(&self) -> u64 {
        self.clock.now()
    }

    /// The account service, acting for the signed-in owner at the web step's time.
    pub(super) fn accounts(&self) -> AccountService {
        AccountService::new(self.auth.store().clone(), self.key.clone(), self.host(), Actor::Web)
            .with_live(self.live.clone())
            .with_authenticator(self.auth.clone())
            .with_clock(self.clock.clone())
    }

    pub(super) fn host(&self) -> &str {
        &self.config.hostname
    }

    pub(super) fn site(&self) -> Site<'_> {
        Site { host: self.host(), name: self.config.web_organisation.as_deref().unwrap_or(self.host()) }
    }

    /// POP3 is on (it has listeners): its scope is offered and autoconfig names it.
    pub(super) fn pop3_on(&self) -> bool {
        !self.config.pop3_tls.is_empty() || !self.config.pop3_starttls.is_empty()
    }

    /// ManageSieve is on (it has a listener): its scope is offered.
    pub(super) fn sieve_on(&self) -> bool {
        !self.config.sieve_listen.is_empty()
    }

    pub(super) fn load(&self, headers: &HeaderMap) -> Option<Ctx> {
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
    pub(super) fn load_or_create(&self, headers: &HeaderMap, client: IpAddr) -> Option<(Ctx, bool)> {
        if let Some(c) = self.load(headers) {
            return Some((c, false));
        }
        let id = self.web_sessions.create(self.now(), client)?;
        Some((self.ctx(id)?, true))
    }

    fn take_notice(&self, id: &str) -> Option<String> {
        self.web_sessions.with(id, self.now(), |s| s.notice.take()).flatten()
    }

    pub(super) fn set_notice(&self, id: &str, text: impl Into<String>) {
        let text = text.into();
        self.web_sessions.with(id, self.now(), |s| s.notice = Some(text.clone()));
    }

    /// CSRF: the session's token in the form, and a same-origin request
    /// (Sec-Fetch-Site, else Origin). The login form is covered too (login CSRF).
    pub(super) fn check_post(
        &self,
        headers: &HeaderMap,
        ctx: &Ctx,
        form: &HashMap<String, String>,
    ) -> Result<(), WebError> {
        let forbidden = || {
            self.message(
                StatusCode::FORBIDDEN,
                "Request refused",
                "This form was sent from another site or has expired. Go back, reload the page and try again.",
                ("/", "Start again"),
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
    fn user(&self, ctx: &Option<Ctx>) -> Result<(String, u64), WebError> {
        match ctx {
            Some(Ctx { stage: Stage::SignedIn { username, auth_at }, .. }) => Ok((username.clone(), *auth_at)),
            Some(c) => {
                self.set_notice(&c.id, "Sign in to manage your app passwords and two-step verification.");
                Err(WebError::Redirect("/login"))
            }
            None => Err(WebError::Redirect("/login")),
        }
    }

    /// Factor changes and new app passwords need a recent sign-in; otherwise sign in again.
    pub(super) fn fresh(&self, ctx: &Ctx, auth_at: u64) -> Result<(), WebError> {
        if self.now().saturating_sub(auth_at) <= STEP_UP_SECS {
            return Ok(());
        }
        self.web_sessions.with(&ctx.id, self.now(), |s| {
            s.stage = Stage::Anonymous;
            s.notice = Some("For this change, please sign in again.".into());
        });
        Err(WebError::Redirect("/login"))
    }

    fn account(&self, username: &str) -> Result<Account, WebError> {
        match self.auth.store().get_account(username) {
            Ok(Some(a)) => Ok(a),
            _ => Err(self.error("Your account could not be loaded. Sign in again.")),
        }
    }

    /// A message page in the site's name.
    pub(super) fn message(
        &self,
        status: StatusCode,
        heading: &'static str,
        text: &str,
        (link, link_text): (&'static str, &'static str),
    ) -> WebError {
        let site = self.site();
        WebError::Message(Box::new(Message {
            host: site.host.to_string(),
            name: site.name.to_string(),
            status,
            heading,
            text: text.to_string(),
            link,
            link_text,
        }))
    }

    pub(super) fn error(&self, text: &str) -> WebError {
        self.message(StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong", text, ("/", "Start again"))
    }

    /// Something needed is not there right now (the store, a hashing thread).
    pub(super) fn unavailable(&self) -> WebError {
        self.message(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again in a minute",
            "Signing in is not possible right now. Try again in a minute.",
            ("/login", "Try again"),
        )
    }

    /// Records an audit event at the web step's time (which the security notice compares
    /// with); a failure to write is logged, not fatal.
    fn audit(&self, username: &str, kind: &str, detail: String) {
        self.accounts().audit(username, kind, detail);
    }

    /// Signs in fully: a new session id, the sign-in time for step-up. The audit event
    /// says how many wrong codes this sign-in had before (the person's own typos, left
    /// out of the security notice).
    fn complete_sign_in(&self, ctx: &Ctx, username: &str, ip: IpAddr) -> Response {
        let now = self.now();
        let (typos, authorizing) = self
            .web_sessions
            .with(&ctx.id, now, |s| {
                s.stage = Stage::SignedIn { username: username.to_string(), auth_at: now };
                s.wrong_codes = 0;
                let authorizing = s.oauth.as_ref().is_some_and(|p| super::oauth::pending_is_live(p, now));
                (std::mem::take(&mut s.failed_codes), authorizing)
            })
            .unwrap_or((0, false));
        self.audit(username, notice::SIGN_IN, notice::sign_in_detail(ip, typos));
        // A mail app's authorization request waits in the session: on to its consent page.
        // `[policy]`: an account that must have two-step verification and has not enrolled
        // goes to the enrolment first, at every sign-in (issue 18 point 5).
        let must_enrol = self.auth.policy().requires_second_factor(username)
            && self.account(username).is_ok_and(|a| !a.has_second_factor());
        let next = if must_enrol {
            "/two-factor"
        } else if authorizing {
            super::oauth::CONSENT_PATH
        } else {
            "/app-passwords"
        };
        match self.web_sessions.rotate(&ctx.id) {
            Some(new) => with_cookie(redirect(next), &new),
            None => self.error("Sign-in failed.").into_response(),
        }
    }

    /// The login line of a sign-in attempt on the web step (`auth::login_log`).
    fn log_login(&self, result: Outcome, ip: IpAddr, user: &str, method: Method, started: Instant) {
        self.auth.log_login(&Line {
            result,
            protocol: "web",
            client: ip,
            user,
            method,
            app_password: None,
            client_id: None,
            duration: started.elapsed(),
        });
    }

    /// A wrong second factor (its slot was taken before it was compared): after the
    /// delay, the pending sign-in is dropped if that was its last slot.
    async fn wrong_code(&self, ctx: &Ctx, username: &str, backup: bool, ip: IpAddr, code: &[u8]) -> Response {
        self.audit(username, notice::FAILED, notice::failed_detail(backup, ip));
        tokio::time::sleep(self.auth.failure_delay(ip, username, code)).await;
        let dropped = self
            .web_sessions
            .with(&ctx.id, self.now(), |s| {
                if matches!(s.stage, Stage::SecondFactor { .. }) {
                    s.failed_codes = s.failed_codes.saturating_add(1);
                }
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
                site: self.site(),
                csrf: &ctx.csrf,
                username,
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

pub(super) fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}"))
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(super) async fn root(State(web): W, headers: HeaderMap) -> Response {
    match web.load(&headers) {
        Some(Ctx { stage: Stage::SignedIn { .. }, .. }) => redirect("/app-passwords"),
        _ => redirect("/login"),
    }
}

/// The "Copy" buttons of the pages that show a new app password (progressive
/// enhancement: without JavaScript the text is still selectable as a whole).
pub(super) async fn copy_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../templates/copy.js"),
    )
        .into_response()
}

/// The Content-Security-Policy of a page that loads `/copy.js`: the site's usual one with
/// scripts from this origin only (no inline script, no eval).
pub(super) const CSP_WITH_COPY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                                        form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `resp` with [`CSP_WITH_COPY`].
pub(super) fn with_copy_script(mut resp: Response) -> Response {
    resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP_WITH_COPY));
    resp
}

pub(super) async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../templates/style.css"),
    )
        .into_response()
}

pub(super) async fn login_form(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    // None: too many sessions, or the shared store is unreachable.
    let Some((ctx, new)) = web.load_or_create(&headers, client_ip(&ip)) else {
        return web.unavailable().into_response();
    };
    if let Stage::SignedIn { .. } = ctx.stage {
        return redirect("/app-passwords");
    }
    // Sign-out and Cancel end the session, so their word comes in the address; only
    // these fixed texts can be shown this way.
    let notice = web.take_notice(&ctx.id).or_else(|| match query.as_deref() {
        Some("signed-out") => Some("You are signed out.".to_string()),
        Some("cancelled") => Some("The sign-in was cancelled. Sign in again when you are ready.".to_string()),
        _ => None,
    });
    // A mail app's authorization request may name the account (`login_hint`).
    let (hint, app) = super::oauth::waiting_app(&web, &ctx.id);
    let page = html(
        LoginPage { site: web.site(), csrf: &ctx.csrf, error: None, notice, username: &hint.unwrap_or_default(), app },
        StatusCode::OK,
    );
    if new { with_cookie(page, &ctx.id) } else { page }
}

/// The client's address, put into each request by the connection (absent in handler tests).
pub(super) fn client_ip(ip: &Option<Extension<ClientIp>>) -> IpAddr {
    ip.as_ref().map(|e| e.0.0).unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

pub(super) async fn login(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let started = Instant::now();
    let ip = client_ip(&ip);
    let Some(ctx) = web.load(&headers) else { return redirect("/login") };
    if let Err(r) = web.check_post(&headers, &ctx, &form) {
        return r.into_response();
    }
    let typed = form.get("username").map(String::as_str).unwrap_or("");
    let username = crate::auth::normalize_username(typed);
    let log = |result| web.log_login(result, ip, typed, Method::AccountPassword, started);
    let password = SecretBytes::from(form.get("password").cloned().unwrap_or_default().into_bytes());
    let refuse = |web: &Web, text: &'static str, status| {
        html(
            LoginPage {
                site: web.site(),
                csrf: &ctx.csrf,
                error: Some(text),
                notice: None,
                username: &username,
                app: super::oauth::waiting_app(web, &ctx.id).1,
            },
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
                s.failed_codes = 0;
            });
            match web.web_sessions.rotate(&ctx.id) {
                Some(new) => with_cookie(redirect("/login/totp"), &new),
                None => web.error("Sign-in failed.").into_response(),
            }
        }
        WebCheck::Ok(account) => {
            log(Outcome::Ok);
            web.complete_sign_in(&ctx, &account.username, ip)
        }
        WebCheck::Denied => {
            let delay = web.auth.failure_delay(ip, &username, password.expose());
            log(Outcome::Wrong);
            tokio::time::sleep(delay).await;
            refuse(&web, "The e-mail address or password is not right.", StatusCode::UNAUTHORIZED)
        }
        WebCheck::Unavailable => {
            log(Outcome::Unavailable);
            refuse(
                &web,
                "Signing in is not possible right now. Try again in a minute.",
                StatusCode::SERVICE_UNAVAILABLE,
            )
        }
        // The password was not checked: say so, and when to come back (a wrong-password
        // answer here would tell a person with the right password that it is wrong).
        WebCheck::Paused(which) => {
            log(Outcome::Throttled);
            tokio::time::sleep(web.auth.base_delay()).await;
            refuse(
                &web,
                match which {
                    crate::auth::budget::Exhausted::Address => {
                        "Too many sign-in attempts came from your network. Your password was not checked; try again in a few minutes."
                    }
                    crate::auth::budget::Exhausted::Account => {
                        "Too many sign-in attempts for this account came from places it has not been used from. Your password was not checked; try again later, or sign in from a device you have used before."
                    }
                },
                StatusCode::TOO_MANY_REQUESTS,
            )
        }
    }
}

/// What the account page says after a sign-in with a backup code.
fn backup_codes_left(left: usize) -> String {
    match left {
        0 => "You signed in with your last backup code. Make new backup codes below.".into(),
        1 => "You signed in with a backup code. 1 backup code is left.".into(),
        n => format!("You signed in with a backup code. {n} backup codes are left."),
    }
}

/// `1 connection` or `2 connections`.
fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// Ends a sign-in that waits for its second factor (the person chose Cancel): the session
/// goes, as on sign-out.
pub(super) async fn cancel_sign_in(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let Some((ctx, _)) = pending(web.load(&headers)) else { return redirect("/login") };
    if let Err(r) = web.check_post(&headers, &ctx, &form) {
        return r.into_response();
    }
    // A mail app waiting for this sign-in hears that it was cancelled (access_denied).
    let back = super::oauth::cancel_waiting(&web, &ctx.id);
    web.web_sessions.remove(&ctx.id);
    clear_cookie(back.unwrap_or_else(|| redirect("/login?cancelled")))
}

/// A pending sign-in that used its code slots ends: sign in again.
fn drop_pending(s: &mut super::session::WebSession) {
    s.stage = Stage::Anonymous;
    s.wrong_codes = 0;
    s.failed_codes = 0;
    s.notice = Some("Too many wrong codes. Sign in again.".into());
}

/// The page shown when a budget of second-factor guesses is used up.
fn codes_used_up(web: &Web, which: crate::auth::budget::Exhausted) -> WebError {
    let text = match which {
        crate::auth::budget::Exhausted::Account => {
            "Too many wrong codes were entered for this account. Try again in a few hours, or ask your mail administrator to unlock it."
        }
        crate::auth::budget::Exhausted::Address => {
            "Too many wrong codes were entered from your network. Try again in a few minutes."
        }
    };
    web.message(StatusCode::TOO_MANY_REQUESTS, "Sign-in paused", text, ("/login", "Back to sign-in"))
}

/// A sign-in waiting for its second factor, and its account.
fn pending(ctx: Option<Ctx>) -> Option<(Ctx, String)> {
    let ctx = ctx?;
    let Stage::SecondFactor { username, .. } = &ctx.stage else { return None };
    let username = username.clone();
    Some((ctx, username))
}

fn second_factor_form(web: &Web, headers: &HeaderMap, backup: bool) -> Response {
    let Some((ctx, username)) = pending(web.load(headers)) else { return redirect("/login") };
    html(
        SecondFactorPage { site: web.site(), csrf: &ctx.csrf, username: &username, error: None, backup },
        StatusCode::OK,
    )
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
    (ip, backup, started): (IpAddr, bool, Instant),
) -> Result<(Ctx, String, crate::auth::budget::Ticket), WebError> {
    let Some((ctx, username)) = pending(web.load(headers)) else { return Err(WebError::Redirect("/login")) };
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
        return Err(WebError::Redirect("/login"));
    }
    match web.auth.take_slot(crate::auth::budget::Secret::SecondFactor, &username, ip).await {
        Ok(ticket) => Ok((ctx, username, ticket)),
        Err(no) => {
            give_back_code_slot(web, &ctx);
            let method = if backup { Method::BackupCode } else { Method::Totp };
            Err(match no {
                crate::auth::NoSlot::Exhausted(which) => {
                    web.log_login(Outcome::Throttled, ip, &username, method, started);
                    codes_used_up(web, which)
                }
                crate::auth::NoSlot::Unavailable => {
                    web.log_login(Outcome::Unavailable, ip, &username, method, started);
                    web.unavailable()
                }
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
    (ip, backup, started): (IpAddr, bool, Instant),
    typed: &[u8],
    result: Result<Option<usize>, AccountError>,
) -> Response {
    let method = if backup { Method::BackupCode } else { Method::Totp };
    match result {
        Ok(left) => {
            web.log_login(Outcome::Ok, ip, &username, method, started);
            web.auth.settle(ticket, crate::auth::Outcome::Right).await;
            if let Some(left) = left {
                web.set_notice(&ctx.id, backup_codes_left(left));
            }
            web.complete_sign_in(&ctx, &username, ip)
        }
        Err(e) if e.is_unavailable() => {
            web.log_login(Outcome::Unavailable, ip, &username, method, started);
            web.auth.settle(ticket, crate::auth::Outcome::NotCompared).await;
            give_back_code_slot(web, &ctx);
            web.unavailable().into_response()
        }
        Err(_) => {
            web.log_login(Outcome::WrongCode, ip, &username, method, started);
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
    let started = Instant::now();
    let ip = client_ip(&ip);
    let slot = match second_factor_slot(&web, &headers, &form, (ip, false, started)).await {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let code: String = form.get("code").map(|c| c.chars().filter(|c| !c.is_whitespace()).collect()).unwrap_or_default();
    // Checked, and the last accepted step moved forward, in one atomic change.
    let result = web.accounts().accept_totp_code(&slot.1, &code).map(|()| None);
    second_factor_outcome(&web, slot, (ip, false, started), code.as_bytes(), result).await
}

pub(super) async fn backup(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let started = Instant::now();
    let ip = client_ip(&ip);
    let slot = match second_factor_slot(&web, &headers, &form, (ip, true, started)).await {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let code = SecretString::from(form.get("code").cloned().unwrap_or_default());
    let result = web.accounts().consume_backup_code(&slot.1, &code, ip).await.map(Some);
    second_factor_outcome(&web, slot, (ip, true, started), code.expose().as_bytes(), result).await
}

pub(super) async fn logout(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    if let Some(ctx) = web.load(&headers) {
        if let Err(r) = web.check_post(&headers, &ctx, &form) {
            return r.into_response();
        }
        web.web_sessions.remove(&ctx.id);
    }
    clear_cookie(redirect("/login?signed-out"))
}

pub(super) async fn account(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, _) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    account_page(&web, &ctx, &username, Draft::default())
}

/// The account page; `draft`: the new-app-password form to show again (422 if it has an
/// error).
pub(super) fn account_page(web: &Web, ctx: &Ctx, username: &str, draft: Draft) -> Response {
    let account = match web.account(username) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let stale_after = web.config.accounts.stale_after.as_secs();
    let devices = web.accounts().devices(username, stale_after).ok();
    let passwords = devices
        .as_ref()
        .map(|d| d.signed_in.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            let r = d.record;
            let limits = crate::accounts::limits_text(&r) + &r.narrow.as_ref().map(|n| n.words()).unwrap_or_default();
            Row {
                id: r.id.clone(),
                // A grant's label names its app and id ("Thunderbird (k3x9q2)"): two
                // computers' Thunderbirds stay apart.
                label: r.label.clone(),
                scopes: r.scopes.iter().map(|s| s.label()).collect::<Vec<_>>().join(", "),
                created: fmt_time(r.created_at),
                last_used: last_uses_text(&r),
                grant: r.oauth.as_ref().map(|g| GrantRow { user_agent: g.user_agent.clone() }),
                limits: (!limits.is_empty()).then(|| limits.trim_start_matches(", ").to_string()),
                stale: d.stale,
                refused: d.last_refusal.map(|(at, why)| format!("Refused {}: {why}.", fmt_time(at))),
            }
        })
        .collect();
    // Devices refused for sending the account password matter while two-step verification
    // is on (or required), and only refusals since it was turned on; without it, the apps
    // signing in with the account password are the ones that will need an app password.
    let since = account.totp.as_ref().map(|t| t.enabled_at).unwrap_or(0);
    let describe = |p: &crate::accounts::PasswordDevice| {
        format!(
            "{} via {}{}, last {}",
            p.ip,
            p.protocols.join(", "),
            p.client.as_deref().map(|c| format!(" ({c})")).unwrap_or_default(),
            fmt_time(p.last_seen)
        )
    };
    let password_devices = devices.map(|d| d.account_password).unwrap_or_default();
    let barred = account.has_second_factor() || web.auth.policy().enforced(username, web.now());
    let stale = if barred {
        password_devices.iter().filter(|p| p.refused && p.last_seen >= since).map(describe).collect()
    } else {
        Vec::new()
    };
    let password_apps = if account.has_second_factor() {
        Vec::new()
    } else {
        password_devices.iter().filter(|p| !p.refused).map(describe).collect()
    };
    let can_change_password = account.password_hash.is_some() && !web.auth.upstream_mode();
    let notice = web.take_notice(&ctx.id);
    let status = if draft.has_error() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    html(
        AccountPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username,
            notice,
            alert: security_alert(web, username),
            passwords,
            stale,
            password_apps,
            stale_days: stale_after / 86_400,
            totp: account.has_second_factor(),
            codes_left: account.backup_codes.as_ref().map(|c| c.remaining()).unwrap_or(0),
            can_change_password,
            draft,
            pop3_offered: web.pop3_on(),
            sieve_offered: web.sieve_on(),
            addon: web.config.oauth.enabled,
        },
        status,
    )
}

/// Someone knew the password but not the second factor (SECURITY.md case 83): the wrong
/// codes the person has not dismissed yet, without their own typos ([`notice`]).
fn security_alert(web: &Web, username: &str) -> Option<Alert> {
    let events = web.auth.store().recent_audit(username, notice::EVENTS_READ).unwrap_or_default();
    let codes = notice::unseen(&events, web.now(), SECOND_FACTOR_SECS).codes;
    let up_to = codes.first()?.at;
    let lines = codes
        .iter()
        .take(ALERT_LINES)
        .map(|c| {
            let what = if c.what == "backup code" { "a wrong backup code" } else { "a wrong 6-digit code" };
            match &c.from {
                Some(from) => format!("{}: {what}, from {from}", fmt_time(c.at)),
                None => format!("{}: {what}", fmt_time(c.at)),
            }
        })
        .collect();
    let intro = if codes.len() == 1 {
        "Your account password was entered correctly, then a wrong code:".to_string()
    } else {
        format!("Your account password was entered correctly, then a wrong code — {} times:", codes.len())
    };
    let more = (codes.len() > ALERT_LINES).then(|| format!("… and {} more.", codes.len() - ALERT_LINES));
    Some(Alert { intro, lines, more, up_to })
}

/// The person has seen the security notice: it stays away until a newer wrong code. The
/// form says up to which time it showed codes, so one written meanwhile still shows.
pub(super) async fn dismiss_alert(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (_, username) = match post_user(&web, &headers, &form, false) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let shown = form.get("seen").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0).min(web.now());
    let events = web.auth.store().recent_audit(&username, notice::EVENTS_READ).unwrap_or_default();
    let before = notice::unseen(&events, web.now(), SECOND_FACTOR_SECS).seen_up_to;
    if shown > before {
        web.audit(&username, notice::SEEN, notice::seen_detail(shown));
    }
    redirect("/app-passwords")
}

/// The signed-in user of a POST whose token checks out; `fresh`: also a recent sign-in.
pub(super) fn post_user(
    web: &Web,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    fresh: bool,
) -> Result<(Ctx, String), WebError> {
    let ctx = web.load(headers);
    let (username, auth_at) = web.user(&ctx)?;
    let Some(ctx) = ctx else { return Err(WebError::Redirect("/login")) };
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

/// The IMAP port and security ("SSL/TLS" or "STARTTLS") every page, file and profile gives.
pub(super) fn imap_endpoint(config: &crate::config::Config) -> (u16, &'static str) {
    endpoint(&config.imap_tls, &config.imap_starttls, 993)
}

/// The SMTP port and security every page, file and profile gives.
pub(super) fn smtp_endpoint(config: &crate::config::Config) -> (u16, &'static str) {
    endpoint(&config.smtp_tls, &config.smtp_starttls, 465)
}

/// `[policy]`: past the grace period an account without two-step verification enrols
/// first; an app password made with the password alone would undo the requirement.
pub(super) fn must_enrol_first(web: &Web, username: &str) -> bool {
    web.auth.policy().enforced(username, web.now()) && web.account(username).is_ok_and(|a| !a.has_second_factor())
}

/// The POP3 ports a mail app may use, implicit TLS first ("port 995, SSL/TLS; or port 110,
/// STARTTLS"); `None` when POP3 has no listener.
fn pop3_ports(config: &crate::config::Config) -> Option<String> {
    let tls = config.pop3_tls.first().map(|a| format!("port {}, SSL/TLS", a.port()));
    let stls = config.pop3_starttls.first().map(|a| format!("port {}, STARTTLS", a.port()));
    match (tls, stls) {
        (Some(t), Some(s)) => Some(format!("{t}; or {s}")),
        (t, s) => t.or(s),
    }
}

/// The ManageSieve port ("port 4190, STARTTLS": RFC 5804 has no implicit-TLS port);
/// `None` when ManageSieve has no listener.
fn sieve_port(config: &crate::config::Config) -> Option<String> {
    config.sieve_listen.first().map(|a| format!("port {}, STARTTLS", a.port()))
}

/// What an app password with `scopes` can do, in a sentence for the page that shows it:
/// "It can read and send mail." for the usual pair; otherwise each use named with its
/// protocol, "only" when it can not both read and send, and what it cannot do.
fn can_text(scopes: &[Scope]) -> String {
    let has = |s| scopes.contains(&s);
    if scopes.len() == 2 && has(Scope::Imap) && has(Scope::Smtp) {
        return "It can read and send mail.".into();
    }
    let uses: Vec<&str> = Scope::ALL
        .iter()
        .filter(|s| has(**s))
        .map(|s| match s {
            Scope::Imap => "read mail (IMAP)",
            Scope::Pop3 => "download mail (POP3)",
            Scope::Smtp => "send mail (SMTP)",
            Scope::Sieve => "change mail filters (ManageSieve)",
        })
        .collect();
    let uses = match uses.split_last() {
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    let (reads, sends) = (has(Scope::Imap) || has(Scope::Pop3), has(Scope::Smtp));
    match (reads, sends) {
        (true, true) => format!("It can {uses}."),
        (true, false) => format!("It can only {uses}; it cannot send."),
        (false, true) => format!("It can only {uses}; it cannot read."),
        (false, false) => format!("It can only {uses}; it cannot read or send mail."),
    }
}

/// Text for an XML element.
pub(super) fn xml_escape(s: &str) -> String {
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
        Err(r) => return r.into_response(),
    };
    if must_enrol_first(&web, &username) {
        return redirect("/two-factor");
    }
    let imap = form.contains_key("scope_imap");
    let smtp = form.contains_key("scope_smtp");
    let pop3 = form.contains_key("scope_pop3");
    let sieve = form.contains_key("scope_sieve");
    let label = form.get("label").cloned().unwrap_or_default();
    // Every refusal shows the form again as it was sent, with the reason next to the field
    // (the label check runs again in the account service, for the CLI too).
    let expires = form.get("expires").map(|e| e.trim().to_string()).unwrap_or_default();
    let allow = form.get("allow").map(|a| a.trim().to_string()).unwrap_or_default();
    let field = |k: &str| form.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
    let preset = match field("preset").as_str() {
        p @ ("read" | "send" | "folder") => p.to_string(),
        _ => "full".to_string(),
    };
    let mut draft = Draft {
        label,
        imap,
        smtp,
        pop3,
        sieve,
        expires,
        allow,
        folders: field("folders"),
        send_to: field("send_to"),
        max_messages: field("max_messages"),
        preset,
        ..Draft::default()
    };
    // Issue 20's presets: a narrow app password for what is not a full mail app. The
    // preset decides the protocols; the account service checks the rest (own addresses,
    // folder patterns) and refuses what cannot hold.
    let list = |v: &str| {
        v.split([',', ' ', '\n']).map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect::<Vec<_>>()
    };
    let narrow = match draft.preset.as_str() {
        "read" => Some(crate::store::Narrowing { read_only: true, ..Default::default() }),
        "folder" if list(&draft.folders).is_empty() => {
            draft.limits_error = Some("Name the folders it may use, for example INBOX or Shared/Tickets.".into());
            None
        }
        "folder" => Some(crate::store::Narrowing { folders: list(&draft.folders), ..Default::default() }),
        "send" => match draft.max_messages.parse::<u32>() {
            Ok(n) if n >= 1 => Some(crate::store::Narrowing {
                send_to: list(&draft.send_to),
                max_messages: Some(n),
                ..Default::default()
            }),
            _ => {
                draft.limits_error = Some("Give the number of messages per hour it may send (1 or more).".into());
                None
            }
        },
        _ => None,
    };
    // Optional limits: an expiry from the list (or a date a script sends) and networks.
    let now = web.now();
    let expires_at = match draft.expires.as_str() {
        "" | "never" => Ok(None),
        e => crate::auth::app_password::parse_expiry(e, now).map(Some).map_err(|e| e.to_string()),
    };
    let nets: Vec<String> = draft.allow.split([',', ' ', '\n']).map(str::to_string).collect();
    let allow_nets = crate::auth::app_password::parse_allow(&nets).map_err(|e| e.to_string());
    let limits = match (expires_at, allow_nets) {
        (Ok(expires_at), Ok(allow)) => Some(crate::auth::app_password::Limits { expires_at, allow, narrow }),
        (Err(e), _) | (_, Err(e)) => {
            draft.limits_error = Some(format!("The app password was not created: {e}."));
            None
        }
    };
    draft.label_error = match check_label(&draft.label) {
        Err(e) => Some(format!("The app password was not created: {e}.")),
        Ok(label) if has_label(&web, &username, label) => {
            Some(format!("You already have an app password called “{label}”. Choose another name."))
        }
        Ok(_) => None,
    };
    match draft.preset.as_str() {
        "read" | "folder" => (draft.imap, draft.smtp, draft.pop3, draft.sieve) = (true, false, false, false),
        "send" => (draft.imap, draft.smtp, draft.pop3, draft.sieve) = (false, true, false, false),
        _ => {}
    }
    let (imap, smtp, pop3, sieve) = (draft.imap, draft.smtp, draft.pop3, draft.sieve);
    // A scope whose protocol is off (a page from before the admin turned it off, or a
    // forged form): refused, not quietly dropped, so that nobody gets less than they
    // asked for without knowing. The form comes back without that checkbox.
    let off: Vec<&str> = [(pop3 && !web.pop3_on(), "POP3"), (sieve && !web.sieve_on(), "ManageSieve")]
        .into_iter()
        .filter_map(|(refused, name)| refused.then_some(name))
        .collect();
    if !off.is_empty() {
        draft.scope_error = Some(format!(
            "This server does not offer {}, so an app password cannot be made for it. Check the choices below and \
             create the app password again.",
            off.join(" or ")
        ));
    } else if !(imap || smtp || pop3 || sieve) {
        draft.scope_error = Some(if web.pop3_on() || web.sieve_on() {
            "Choose what the app password may be used for: tick at least one.".into()
        } else {
            "Choose what the app password may be used for: reading mail, sending mail or both.".into()
        });
    }
    if draft.has_error() {
        return account_page(&web, &ctx, &username, draft);
    }
    let scopes = [(imap, Scope::Imap), (smtp, Scope::Smtp), (pop3, Scope::Pop3), (sieve, Scope::Sieve)]
        .into_iter()
        .filter_map(|(on, s)| on.then_some(s))
        .collect();
    let (accounts, user, label) = (web.accounts(), username.clone(), draft.label.clone());
    let limits = limits.unwrap_or_default();
    let made = web.auth.hash_for(ip, move || accounts.create_limited_app_password(&user, &label, scopes, limits)).await;
    match made {
        Some(Ok(crate::accounts::CreatedAppPassword { new, label, scopes })) => {
            let (smtp_port, smtp_security) = smtp_endpoint(&web.config);
            let (imap_port, imap_security) = imap_endpoint(&web.config);
            let grouped = new.grouped();
            with_copy_script(html(
                CreatedPage {
                    site: web.site(),
                    csrf: &ctx.csrf,
                    username: &username,
                    label: &label,
                    password: grouped.expose(),
                    can: can_text(&scopes),
                    imap: scopes.contains(&Scope::Imap),
                    smtp: scopes.contains(&Scope::Smtp),
                    imap_port,
                    imap_security,
                    smtp_port,
                    smtp_security,
                    pop3: scopes.contains(&Scope::Pop3).then(|| pop3_ports(&web.config)).flatten(),
                    sieve: scopes.contains(&Scope::Sieve).then(|| sieve_port(&web.config)).flatten(),
                },
                StatusCode::OK,
            ))
        }
        Some(Err(e)) => {
            draft.form_error = Some(format!("The app password was not created: {e}."));
            account_page(&web, &ctx, &username, draft)
        }
        None => {
            draft.form_error = Some("The app password could not be created right now. Try again in a minute.".into());
            account_page(&web, &ctx, &username, draft)
        }
    }
}

/// Whether the account has an app password with this label (in any case, as the store
/// compares them).
pub(super) fn has_label(web: &Web, username: &str, label: &str) -> bool {
    let list = web.auth.store().list_app_passwords(username).unwrap_or_default();
    list.iter().any(|r| r.label.eq_ignore_ascii_case(label))
}

pub(super) async fn revoke_app_password(
    State(web): W,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Fields,
) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, false) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    match web.accounts().revoke_app_password(&username, &id) {
        Ok((rec, ended)) => web.set_notice(&ctx.id, revoked_text(&rec.label, ended)),
        Err(_) => web.set_notice(&ctx.id, "That app password does not exist (any more)."),
    }
    redirect("/app-passwords")
}

/// What the account page says after a revocation that closed `ended` connections.
fn revoked_text(label: &str, ended: usize) -> String {
    match ended {
        0 => format!("“{label}” is revoked and can no longer sign in."),
        1 => format!("“{label}” is revoked and can no longer sign in. The connection that used it was closed."),
        n => format!("“{label}” is revoked and can no longer sign in. The {n} connections that used it were closed."),
    }
}

pub(super) fn qr_svg(uri: &str) -> String {
    match qrcode::QrCode::new(uri.as_bytes()) {
        Ok(code) => code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build(),
        Err(_) => String::new(),
    }
}

pub(super) async fn enrol_form(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, auth_at) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    if let Err(r) = web.fresh(&ctx, auth_at) {
        return r.into_response();
    }
    enrol_page(&web, &ctx, &username, None)
}

/// `[policy]`: why the enrolment insists, and until which day it may wait.
fn required_notice(web: &Web, username: &str, now: u64) -> Option<Required> {
    let policy = web.auth.policy();
    if !policy.requires_second_factor(username) {
        return None;
    }
    // The grace runs through the end of its day: name that day.
    let until = policy
        .grace_until
        .filter(|_| policy.in_grace(username, now))
        .map(|end| fmt_time(end.saturating_sub(1)).split(' ').next().unwrap_or_default().to_string());
    Some(Required { until })
}

fn enrol_page(web: &Web, ctx: &Ctx, username: &str, error: Option<&str>) -> Response {
    match web.account(username) {
        Ok(a) if a.has_second_factor() => return redirect("/app-passwords"),
        Ok(_) => {}
        Err(r) => return r.into_response(),
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
            let pending = web.accounts().new_totp_secret(username).ok()?;
            let v = pending.base32.expose().clone();
            s.pending_totp = Some((pending.base32, now));
            Some(v)
        })
        .flatten();
    let Some(secret) = secret.map(SecretString::from) else {
        return web.error("Could not start the enrolment.").into_response();
    };
    let uri = match web.accounts().totp_uri(username, &secret) {
        Ok(u) => u,
        Err(_) => return web.error("Could not start the enrolment.").into_response(),
    };
    let mut resp = html(
        EnrolPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username,
            grouped: crate::auth::app_password::group(secret.expose()).expose(),
            qr: &qr_svg(uri.expose()),
            error,
            required: required_notice(web, username, now),
        },
        if error.is_some() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK },
    );
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(super) async fn enrol(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
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
    match web.accounts().confirm_totp(&username, &b32, &code) {
        Ok(on) => {
            // The service ended the IMAP/SMTP sessions opened with the account password;
            // other web sessions of this account end too.
            web.web_sessions.end_all_of(&username, Some(&ctx.id));
            codes_page(&web, &ctx, &username, on.backup_codes, true)
        }
        Err(AccountError::WrongCode) => {
            tokio::time::sleep(web.auth.base_delay()).await;
            enrol_page(&web, &ctx, &username, Some("That code is not right. Enter the code your app shows now."))
        }
        Err(AccountError::SecondFactorOn(_)) => redirect("/app-passwords"),
        Err(_) => web.error("Two-step verification could not be turned on. Nothing was changed.").into_response(),
    }
}

/// The backup codes just made; `turned_on`: with two-step verification, just now.
fn codes_page(web: &Web, ctx: &Ctx, username: &str, shown: Vec<SecretString>, turned_on: bool) -> Response {
    let texts: Vec<String> = shown.iter().map(|c| c.expose().clone()).collect();
    let codes: Vec<&str> = texts.iter().map(String::as_str).collect();
    let resp = html(CodesPage { site: web.site(), csrf: &ctx.csrf, username, codes, turned_on }, StatusCode::OK);
    web.web_sessions.with(&ctx.id, web.now(), |s| {
        s.pending_totp = None;
        s.shown_codes = Some(shown.clone());
    });
    resp
}

/// The signed-in user of a page that leads to a factor change: signed in recently, with
/// two-step verification on (else back to the account page).
fn factor_change_user(web: &Web, headers: &HeaderMap) -> Result<(Ctx, String, Account), WebError> {
    let ctx = web.load(headers);
    let (username, auth_at) = web.user(&ctx)?;
    let Some(ctx) = ctx else { return Err(WebError::Redirect("/login")) };
    web.fresh(&ctx, auth_at)?;
    match web.account(&username)? {
        a if a.has_second_factor() => Ok((ctx, username, a)),
        _ => Err(WebError::Redirect("/app-passwords")),
    }
}

/// Asks before turning two-step verification off.
pub(super) async fn disable_2fa_form(State(web): W, headers: HeaderMap) -> Response {
    let (ctx, username, account) = match factor_change_user(&web, &headers) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let left = account.backup_codes.as_ref().map(|c| c.remaining()).unwrap_or(0);
    let mut paragraphs = vec![
        "Signing in here will need only your account password.".to_string(),
        "Mail apps will be able to sign in with your account password again, so anyone who learns it can read and send your mail. App passwords keep working.".to_string(),
    ];
    paragraphs.push(match left {
        0 => "Your authenticator app's codes stop working. To turn it on again later, you scan a new QR code.".into(),
        n => format!(
            "Your authenticator app's codes and your {} stop working. To turn it on again later, you scan a new QR code.",
            count(n, "backup code", "backup codes")
        ),
    });
    html(
        ConfirmPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username: &username,
            heading: "Turn off two-step verification?",
            paragraphs,
            action: "/two-factor/disable",
            button: "Turn off two-step verification",
            danger: true,
        },
        StatusCode::OK,
    )
}

/// Asks before replacing the backup codes.
pub(super) async fn regenerate_codes_form(State(web): W, headers: HeaderMap) -> Response {
    let (ctx, username, account) = match factor_change_user(&web, &headers) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let left = account.backup_codes.as_ref().map(|c| c.remaining()).unwrap_or(0);
    let old = match left {
        0 => "You have no backup codes left.".to_string(),
        1 => "Your 1 remaining backup code stops working at once.".to_string(),
        n => format!("Your {n} remaining backup codes stop working at once."),
    };
    html(
        ConfirmPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username: &username,
            heading: "Make new backup codes?",
            paragraphs: vec![
                format!("You get {} new backup codes, shown only once. {old}", backup_codes::COUNT),
                "Have somewhere ready to keep the new codes before you go on.".into(),
            ],
            action: "/backup-codes",
            button: "Make new backup codes",
            danger: false,
        },
        StatusCode::OK,
    )
}

pub(super) async fn disable_2fa(State(web): W, headers: HeaderMap, Form(form): Fields) -> Response {
    let (ctx, username) = match post_user(&web, &headers, &form, true) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let now = web.now();
    if web.accounts().disable_totp(&username).is_err() {
        return web.error("Two-step verification could not be turned off. Nothing was changed.").into_response();
    }
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
        Err(r) => return r.into_response(),
    };
    match web.accounts().regenerate_backup_codes(&username) {
        Ok(shown) => codes_page(&web, &ctx, &username, shown, false),
        Err(AccountError::SecondFactorOff(_) | AccountError::UnknownUser(_)) => redirect("/app-passwords"),
        Err(_) => web.error("Could not make backup codes.").into_response(),
    }
}

pub(super) async fn download_codes(State(web): W, headers: HeaderMap) -> Response {
    let ctx = web.load(&headers);
    let (username, _) = match web.user(&ctx) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
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
        Err(r) => return r.into_response(),
    };
    let Some(ctx) = ctx else { return redirect("/login") };
    if let Err(r) = web.fresh(&ctx, auth_at) {
        return r.into_response();
    }
    match web.account(&username) {
        Ok(a) if a.password_hash.is_some() && !web.auth.upstream_mode() => {}
        Ok(_) => return redirect("/app-passwords"),
        Err(r) => return r.into_response(),
    }
    html(PasswordPage { site: web.site(), csrf: &ctx.csrf, username: &username, error: None }, StatusCode::OK)
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
        Err(r) => return r.into_response(),
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
            PasswordPage { site: web.site(), csrf: &ctx.csrf, username: &username, error: Some(p) },
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    let Some(Ok(hash)) = web.auth.hash_for(ip, move || password::hash(new.expose().as_bytes())).await else {
        return web.error("The password could not be changed right now.").into_response();
    };
    let accounts = web.accounts();
    if accounts.set_password(&username, hash, true).is_err() {
        return web.error("The password could not be changed. Nothing was changed.").into_response();
    }
    web.web_sessions.end_all_of(&username, Some(&ctx.id));
    let revoked =
        if form.contains_key("revoke_all") { accounts.revoke_all_app_passwords(&username).unwrap_or(0) } else { 0 };
    web.set_notice(
        &ctx.id,
        match revoked {
            0 => "Your password is changed.".to_string(),
            1 => "Your password is changed and your app password is revoked. Make a new one for your mail app.".into(),
            n => format!(
                "Your password is changed and all {n} app passwords are revoked. Make new ones for your mail apps."
            ),
        },
    );
    redirect("/app-passwords")
}

/// Thunderbird's autoconfig file (config-v1.1.xml): servers in order of preference, IMAP
/// first; then, when POP3 is on, POP3 (its implicit-TLS port, then its STLS port), so that
/// a person who chooses POP3 in Thunderbird gets mailgate's ports; then SMTP. The format
/// has no ManageSieve entry. With `[oauth]` on, each server also names `OAuth2` (after the
/// password, which stays the first choice of apps that cannot sign in through the
/// browser), and the file carries the autoconfig draft's `<oAuth2>` element.
pub(super) async fn autoconfig(State(web): W) -> Response {
    let host = web.host();
    let auth = if web.config.oauth.enabled {
        "<authentication>password-cleartext</authentication>\n      <authentication>OAuth2</authentication>"
    } else {
        "<authentication>password-cleartext</authentication>"
    };
    let oauth2 = if web.config.oauth.enabled { super::oauth::autoconfig_element(&web.config) } else { String::new() };
    let socket = |security: &str| if security == "STARTTLS" { "STARTTLS" } else { "SSL" };
    let (imap, imap_security) = imap_endpoint(&web.config);
    let (smtp, smtp_security) = smtp_endpoint(&web.config);
    let (imap_socket, smtp_socket) = (socket(imap_security), socket(smtp_security));
    let domain = host.split_once('.').map(|(_, d)| d).unwrap_or(host);
    let pop3: String = [(&web.config.pop3_tls, "SSL"), (&web.config.pop3_starttls, "STARTTLS")]
        .into_iter()
        .filter_map(|(listeners, socket)| listeners.first().map(|a| (a.port(), socket)))
        .map(|(port, socket)| {
            format!(
                r#"
    <incomingServer type="pop3">
      <hostname>{host}</hostname>
      <port>{port}</port>
      <socketType>{socket}</socketType>
      {auth}
      <username>%EMAILADDRESS%</username>
    </incomingServer>"#
            )
        })
        .collect();
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
      {auth}
      <username>%EMAILADDRESS%</username>
    </incomingServer>{pop3}
    <outgoingServer type="smtp">
      <hostname>{host}</hostname>
      <port>{smtp}</port>
      <socketType>{smtp_socket}</socketType>
      {auth}
      <username>%EMAILADDRESS%</username>
    </outgoingServer>
    <documentation url="{url}/app-passwords">
      <descr lang="en">Use an app password made at {url}/app-passwords</descr>
    </documentation>
  </emailProvider>{oauth2}
</clientConfig>
"#,
        url = xml_escape(&web.config.public_url)
    );
    ([(header::CONTENT_TYPE, "application/xml; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], xml)
        .into_response()
}

/// The largest Autodiscover request read (Outlook's is about 400 bytes).
pub(super) const AUTODISCOVER_MAX_BODY: usize = 16 * 1024;

/// Outlook's Autodiscover (POX, `POST /autodiscover/autodiscover.xml` with the address in
/// `<EMailAddress>`): the IMAP and SMTP settings, as the Thunderbird autoconfig file gives
/// them, with the address as the login name. The request is read by looking for that one
/// element (no XML parser: nothing else in it is used); an address that does not read as
/// one is left out of the answer rather than echoed.
pub(super) async fn autodiscover(State(web): W, body: axum::body::Bytes) -> Response {
    let text = String::from_utf8_lossy(&body);
    let email = text
        .split_once("<EMailAddress>")
        .and_then(|(_, rest)| rest.split_once("</EMailAddress>"))
        .and_then(|(addr, _)| crate::accounts::check_email(addr.trim()).ok());
    let host = xml_escape(web.host());
    let login = email.map(|e| format!("\n        <LoginName>{}</LoginName>", xml_escape(&e))).unwrap_or_default();
    let protocol = |kind: &str, (port, security): (u16, &str)| {
        // Implicit TLS is SSL on; STARTTLS is Encryption TLS (Outlook 2016's reading).
        let tls = if security == "STARTTLS" { "<Encryption>TLS</Encryption>" } else { "<SSL>on</SSL>" };
        format!(
            "      <Protocol>
        <Type>{kind}</Type>
        <Server>{host}</Server>
        <Port>{port}</Port>{login}
        <DomainRequired>off</DomainRequired>
        <SPA>off</SPA>
        {tls}
        <AuthRequired>on</AuthRequired>
      </Protocol>
"
        )
    };
    let imap = protocol("IMAP", imap_endpoint(&web.config));
    let smtp = protocol("SMTP", smtp_endpoint(&web.config));
    let xml = format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">
  <Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a">
    <Account>
      <AccountType>email</AccountType>
      <Action>settings</Action>
{imap}{smtp}    </Account>
  </Response>
</Autodiscover>
"#
    );
    ([(header::CONTENT_TYPE, "application/xml; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], xml)
        .into_response()
}
