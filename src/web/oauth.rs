//! The web step as the OAuth 2.0 authorization server of mail apps (`[oauth]`): RFC 8414
//! metadata, the authorization endpoint (RFC 6749 §4.1 with PKCE S256, RFC 7636, and the
//! `iss` response parameter, RFC 9207), the consent page, the token endpoint (public
//! clients, RFC 8252), revocation (RFC 7009), and the Thunderbird add-on that registers
//! these endpoints as an OAuth provider.
//!
//! Order of the checks at `/oauth/authorize`: the client and its redirect URI first; until
//! both are known good, every refusal is a page here and never a redirect (no open
//! redirect). The checked request waits in the web session (server-side) through the
//! sign-in, so nothing in a URL decides where the browser goes after it. The tokens
//! themselves are made and checked by [`crate::accounts::AccountService`]; nothing here
//! logs a code or a token.

use super::pages::{Ctx, Site, client_ip, html, origin_of, redirect, with_cookie, xml_escape};
use super::session::{AUTHORIZE_SECS, PendingAuthorization, STEP_UP_SECS, Stage, token};
use super::{ClientIp, Web};
use crate::auth::oauth::{Approved, OAuthError, Requester, scopes_from_oauth};
use crate::config::{Config, OAuthClient};
use crate::secret::ct_eq;
use crate::store::Scope;
use askama::Template;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Extension, Form, FromRequest as _, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::Arc;

type W = State<Arc<Web>>;

/// The consent page (after the sign-in, the browser comes back here).
pub(super) const CONSENT_PATH: &str = "/oauth/consent";
/// The Thunderbird add-on.
pub(super) const ADDON_PATH: &str = "/oauth/thunderbird-addon.xpi";
/// The longest `state` echoed back (Thunderbird sends 43 characters).
const MAX_STATE: usize = 1024;
/// The largest token or revocation request body: a code, a verifier and a refresh token
/// fit many times over.
const MAX_TOKEN_BODY: usize = 16 * 1024;
/// The longest `User-Agent` kept for the device list.
const MAX_USER_AGENT: usize = 200;

/// The OAuth routes, added to the router only when `[oauth] enabled` (otherwise they are
/// 404 like any unknown path).
pub(super) fn routes(router: Router<Arc<Web>>) -> Router<Arc<Web>> {
    router
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/oauth/authorize", get(authorize))
        .route(CONSENT_PATH, get(consent_form).post(consent))
        .route("/oauth/cancel", post(cancel))
        .route("/oauth/token", post(token_endpoint).layer(DefaultBodyLimit::max(MAX_TOKEN_BODY)))
        .route("/oauth/revoke", post(revoke).layer(DefaultBodyLimit::max(MAX_TOKEN_BODY)))
        .route(ADDON_PATH, get(addon))
}

/// A request waiting in a session is still good at `now`.
pub(super) fn pending_is_live(p: &PendingAuthorization, now: u64) -> bool {
    now.saturating_sub(p.at) <= AUTHORIZE_SECS
}

// ---------------------------------------------------------------------------------------
// Parameters

/// Request parameters (query or form), in order, repeated ones kept.
struct Params(Vec<(String, String)>);

/// A parameter was sent more than once (RFC 6749 §3.1, §3.2: it MUST NOT be).
struct Repeated;

impl Params {
    /// The value of `name`; an empty value counts as absent (RFC 6749 §3.1).
    fn one(&self, name: &str) -> Result<Option<&str>, Repeated> {
        let mut found = self.0.iter().filter(|(k, v)| k == name && !v.is_empty());
        let first = found.next().map(|(_, v)| v.as_str());
        if found.next().is_some() { Err(Repeated) } else { Ok(first) }
    }

    /// Some parameter was sent more than once.
    fn any_repeated(&self) -> bool {
        self.0
            .iter()
            .enumerate()
            .any(|(i, (k, v))| !v.is_empty() && self.0[..i].iter().any(|(j, w)| j == k && !w.is_empty()))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A PKCE S256 `code_challenge`: base64url of a SHA-256, without padding (43 characters).
fn valid_challenge(c: &str) -> bool {
    c.len() == 43 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A PKCE `code_verifier` (RFC 7636 §4.1): 43 to 128 unreserved characters.
fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

// ---------------------------------------------------------------------------------------
// Metadata (RFC 8414)

/// The scopes this server grants: `mail` (IMAP and SMTP), each protocol on its own, POP3
/// and ManageSieve only while they have listeners.
fn scopes_supported(web: &Web) -> Vec<&'static str> {
    let mut s = vec!["mail", "imap", "smtp"];
    if web.pop3_on() {
        s.push("pop3");
    }
    if web.sieve_on() {
        s.push("sieve");
    }
    s
}

/// `GET /.well-known/oauth-authorization-server`.
pub(super) async fn metadata(State(web): W) -> Response {
    let c = &web.config;
    let base = &c.public_url;
    let body = serde_json::json!({
        "issuer": c.oauth_issuer(),
        "authorization_endpoint": format!("{base}/oauth/authorize"),
        "token_endpoint": format!("{base}/oauth/token"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "scopes_supported": scopes_supported(&web),
        "authorization_response_iss_parameter_supported": true,
    });
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "public, max-age=3600")], body.to_string())
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Authorization endpoint

/// A refusal before the redirect URI is known good: a page, never a redirect.
fn refuse_page(web: &Web, heading: &'static str, text: &str) -> Response {
    web.message(StatusCode::BAD_REQUEST, heading, text, ("/", "Go to your account page")).into_response()
}

/// The authorization response to a checked redirect URI (RFC 6749 §4.1.2, §4.1.2.1):
/// `fields`, then `state` when the request had one, then `iss` (RFC 9207).
fn back_to_app(web: &Web, redirect_uri: &str, state: Option<&str>, fields: &[(&str, &str)]) -> Response {
    let mut parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={}", pct(v))).collect();
    if let Some(s) = state {
        parts.push(format!("state={}", pct(s)));
    }
    parts.push(format!("iss={}", pct(web.config.oauth_issuer())));
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let to = format!("{redirect_uri}{sep}{}", parts.join("&"));
    match HeaderValue::from_str(&to) {
        Ok(v) => (StatusCode::FOUND, [(header::LOCATION, v)]).into_response(),
        Err(_) => web.error("The answer to your mail app could not be made.").into_response(),
    }
}

/// An error redirect (RFC 6749 §4.1.2.1).
fn error_back(web: &Web, redirect_uri: &str, state: Option<&str>, error: &str, description: &str) -> Response {
    back_to_app(web, redirect_uri, state, &[("error", error), ("error_description", description)])
}

/// `GET /oauth/authorize`: checks the request; if it is good, keeps it in the web session
/// and sends the browser to the sign-in (when needed) and then to the consent page.
pub(super) async fn authorize(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let uri: axum::http::Uri = match format!("/oauth/authorize?{}", query.unwrap_or_default()).parse() {
        Ok(u) => u,
        Err(_) => {
            return refuse_page(&web, "This sign-in link is broken", "Start the sign-in again from your mail app.");
        }
    };
    let p = match axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri) {
        Ok(q) => Params(q.0),
        Err(_) => {
            return refuse_page(&web, "This sign-in link is broken", "Start the sign-in again from your mail app.");
        }
    };
    // 1. The client and its redirect URI: until both check out, no redirect at all.
    let client = match p.one("client_id") {
        Ok(Some(id)) => web.config.oauth.client(id),
        _ => None,
    };
    let Some(client) = client else {
        return refuse_page(
            &web,
            "This app is not known here",
            "The mail app that sent you here is not one this server lets sign in through the browser. Use an app password instead, or ask your mail administrator.",
        );
    };
    let redirect_uri = match p.one("redirect_uri") {
        Ok(Some(u)) if client.allows_redirect(u) => u.to_string(),
        _ => {
            return refuse_page(
                &web,
                "This sign-in link is not valid",
                &format!(
                    "The link does not say where to return to {}, or names a place this server does not send sign-ins to. Start the sign-in again from your mail app.",
                    client.name
                ),
            );
        }
    };
    // 2. From here on, errors go back to the app.
    let state = match p.one("state") {
        Ok(s) if s.is_none_or(|s| s.len() <= MAX_STATE) => s,
        _ => return error_back(&web, &redirect_uri, None, "invalid_request", "state is repeated or too long"),
    };
    let fail = |error: &str, description: &str| error_back(&web, &redirect_uri, state, error, description);
    if p.any_repeated() {
        return fail("invalid_request", "a parameter is repeated");
    }
    match p.one("response_type") {
        Ok(Some("code")) => {}
        Ok(Some(_)) => return fail("unsupported_response_type", "only response_type=code is supported"),
        _ => return fail("invalid_request", "response_type is missing"),
    }
    if !matches!(p.one("code_challenge_method"), Ok(Some("S256"))) {
        return fail("invalid_request", "PKCE is required: code_challenge_method=S256");
    }
    let challenge = match p.one("code_challenge") {
        Ok(Some(c)) if valid_challenge(c) => c.to_string(),
        _ => return fail("invalid_request", "code_challenge is missing or not an S256 challenge"),
    };
    let scopes = match p.one("scope").map(|s| scopes_from_oauth(s.unwrap_or(""))) {
        Ok(Ok(s)) => s,
        _ => return fail("invalid_scope", "unknown scope (known: mail, imap, smtp, pop3, sieve)"),
    };
    if (scopes.contains(&Scope::Pop3) && !web.pop3_on()) || (scopes.contains(&Scope::Sieve) && !web.sieve_on()) {
        return fail("invalid_scope", "this server does not offer that protocol");
    }
    if matches!(p.one("prompt"), Ok(Some(prompt)) if prompt.split(' ').any(|w| w == "none")) {
        return fail("interaction_required", "the person must sign in and consent");
    }
    let login_hint = match p.one("login_hint") {
        Ok(Some(h)) if h.len() <= 254 && !h.chars().any(char::is_control) => Some(h.to_string()),
        _ => None,
    };
    // 3. Into the session; on to the sign-in or the consent.
    let Some((ctx, new)) = web.load_or_create(&headers, client_ip(&ip)) else {
        return web.unavailable().into_response();
    };
    let Some(id) = token() else { return web.unavailable().into_response() };
    let now = web.now();
    let pending = PendingAuthorization {
        id,
        client_id: client.id.clone(),
        redirect_uri,
        state: state.map(str::to_string),
        code_challenge: challenge,
        scopes,
        login_hint,
        at: now,
    };
    let fresh = matches!(&ctx.stage, Stage::SignedIn { auth_at, .. } if now.saturating_sub(*auth_at) <= STEP_UP_SECS);
    let stored = web.web_sessions.with(&ctx.id, now, |s| {
        s.oauth = Some(pending.clone());
        if !fresh {
            // A sign-in that is not recent does not approve an app: sign in again.
            s.stage = Stage::Anonymous;
            s.notice = Some(format!("Sign in to let {} use your mail account.", client.name));
        }
    });
    if stored.is_none() {
        return web.unavailable().into_response();
    }
    let resp = redirect(if fresh { CONSENT_PATH } else { "/login" });
    if new { with_cookie(resp, &ctx.id) } else { resp }
}

// ---------------------------------------------------------------------------------------
// Consent

#[derive(Template)]
#[template(path = "consent.html")]
struct ConsentPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    /// The client's name ("Thunderbird").
    app: &'a str,
    /// What it may do, one line each.
    can: Vec<&'static str>,
    /// The request's id (the form sends it back).
    request: &'a str,
}

/// What a scope lets an app do, for the consent page.
fn scope_words(s: Scope) -> &'static str {
    match s {
        Scope::Imap => "read your mail and folders (IMAP)",
        Scope::Smtp => "send mail as you (SMTP)",
        Scope::Pop3 => "download your mail (POP3)",
        Scope::Sieve => "change your mail filters (ManageSieve)",
    }
}

/// The consent page's CSP: as every page's, but its form may also lead to the app's
/// redirect URI (browsers apply `form-action` to the redirect that answers the form).
fn consent_csp(redirect_uri: &str) -> Option<HeaderValue> {
    let source = if redirect_uri.starts_with("http://") || redirect_uri.starts_with("https://") {
        origin_of(redirect_uri)?
    } else {
        format!("{}:", redirect_uri.split_once(':')?.0)
    };
    if !source.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'\'' | b'"')) {
        return None;
    }
    HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self' {source}; frame-ancestors 'none'; base-uri 'none'"
    ))
    .ok()
}

/// The waiting request of a session, if it is still good.
fn waiting(web: &Web, ctx: &Ctx) -> Option<PendingAuthorization> {
    let now = web.now();
    web.web_sessions.with(&ctx.id, now, |s| s.oauth.clone().filter(|p| pending_is_live(p, now))).flatten()
}

/// Nothing is waiting for a consent (it expired, was answered, or never came).
fn nothing_waiting(web: &Web) -> Response {
    web.message(
        StatusCode::BAD_REQUEST,
        "No sign-in is waiting",
        "There is no sign-in from a mail app waiting for your answer: it was answered already or took too long. Start it again from your mail app.",
        ("/app-passwords", "Go to your account page"),
    )
    .into_response()
}

/// `GET /oauth/consent`: the app, what it may do, the account; Allow or Deny.
pub(super) async fn consent_form(State(web): W, headers: HeaderMap) -> Response {
    let Some(ctx) = web.load(&headers) else { return redirect("/login") };
    let Stage::SignedIn { username, auth_at } = ctx.stage.clone() else { return redirect("/login") };
    let Some(pending) = waiting(&web, &ctx) else { return nothing_waiting(&web) };
    let Some(client) = web.config.oauth.client(&pending.client_id) else { return nothing_waiting(&web) };
    if let Err(r) = web.fresh(&ctx, auth_at) {
        return r.into_response();
    }
    consent_page(&web, &ctx, &username, client, &pending)
}

fn consent_page(
    web: &Web,
    ctx: &Ctx,
    username: &str,
    client: &OAuthClient,
    pending: &PendingAuthorization,
) -> Response {
    let mut resp = html(
        ConsentPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username,
            app: &client.name,
            can: pending.scopes.iter().map(|s| scope_words(*s)).collect(),
            request: &pending.id,
        },
        StatusCode::OK,
    );
    if let Some(csp) = consent_csp(&pending.redirect_uri) {
        resp.headers_mut().insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    resp
}

/// `POST /oauth/consent`: Allow (a code for the app) or Deny (`access_denied`), both
/// back to the app with `state` and `iss`.
pub(super) async fn consent(State(web): W, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    let Some(ctx) = web.load(&headers) else { return redirect("/login") };
    if let Err(r) = web.check_post(&headers, &ctx, &form) {
        return r.into_response();
    }
    let Stage::SignedIn { username, auth_at } = ctx.stage.clone() else { return redirect("/login") };
    let allow = match form.get("decision").map(String::as_str) {
        Some("allow") => true,
        Some("deny") => false,
        _ => {
            return web
                .message(
                    StatusCode::BAD_REQUEST,
                    "Choose Allow or Deny",
                    "Go back and choose Allow or Deny.",
                    ("/app-passwords", "Go to your account page"),
                )
                .into_response();
        }
    };
    // Allowing needs a recent sign-in (like a new app password); the request stays.
    if allow && let Err(r) = web.fresh(&ctx, auth_at) {
        return r.into_response();
    }
    // The request shown on this page, taken out of the session: answered once.
    let request = form.get("request").map(String::as_str).unwrap_or("");
    let now = web.now();
    let taken = web
        .web_sessions
        .with(&ctx.id, now, |s| match &s.oauth {
            Some(p) if ct_eq(p.id.as_bytes(), request.as_bytes()) && pending_is_live(p, now) => s.oauth.take(),
            _ => None,
        })
        .flatten();
    let Some(p) = taken else { return nothing_waiting(&web) };
    let Some(client) = web.config.oauth.client(&p.client_id).filter(|c| c.allows_redirect(&p.redirect_uri)) else {
        return nothing_waiting(&web);
    };
    let state = p.state.as_deref();
    if !allow {
        tracing::info!(user = %username, client = %client.id, "oauth: access denied by the account owner");
        return error_back(&web, &p.redirect_uri, state, "access_denied", "the account owner denied access");
    }
    let approved = Approved {
        client_id: client.id.clone(),
        redirect_uri: p.redirect_uri.clone(),
        code_challenge: p.code_challenge.clone(),
        scopes: p.scopes.clone(),
    };
    match web.accounts().oauth_issue_code(&username, &approved, &web.config.oauth) {
        Ok(code) => back_to_app(&web, &p.redirect_uri, state, &[("code", code.expose())]),
        Err(e) => {
            tracing::warn!(user = %username, client = %client.id, error = %e, "oauth: no authorization code");
            let error = if e.is_unavailable() { "temporarily_unavailable" } else { "server_error" };
            error_back(&web, &p.redirect_uri, state, error, "the server could not complete the sign-in")
        }
    }
}

/// The login hint and the app's name of the request waiting in session `id`, if any.
pub(super) fn waiting_app(web: &Web, id: &str) -> (Option<String>, Option<String>) {
    let now = web.now();
    let pending = web.web_sessions.with(id, now, |s| s.oauth.clone().filter(|p| pending_is_live(p, now))).flatten();
    let Some(p) = pending else { return (None, None) };
    let app = web.config.oauth.client(&p.client_id).map(|c| c.name.clone());
    (p.login_hint, app)
}

/// Takes the request waiting in session `id` and answers its app `access_denied`: the
/// person gave up the sign-in. `None`: nothing was waiting.
pub(super) fn cancel_waiting(web: &Web, id: &str) -> Option<Response> {
    let now = web.now();
    let p = web.web_sessions.with(id, now, |s| s.oauth.take().filter(|p| pending_is_live(p, now))).flatten()?;
    web.config.oauth.client(&p.client_id).filter(|c| c.allows_redirect(&p.redirect_uri))?;
    Some(error_back(web, &p.redirect_uri, p.state.as_deref(), "access_denied", "the sign-in was cancelled"))
}

/// `POST /oauth/cancel`: "Cancel and return to the app" on the sign-in page.
pub(super) async fn cancel(State(web): W, headers: HeaderMap, Form(form): Form<HashMap<String, String>>) -> Response {
    let Some(ctx) = web.load(&headers) else { return redirect("/login") };
    if let Err(r) = web.check_post(&headers, &ctx, &form) {
        return r.into_response();
    }
    cancel_waiting(&web, &ctx.id).unwrap_or_else(|| redirect("/login"))
}

// ---------------------------------------------------------------------------------------
// Token and revocation endpoints

/// An error answer of the token or revocation endpoint (RFC 6749 §5.2).
fn token_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({ "error": error, "error_description": description });
    (
        status,
        [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")],
        body.to_string(),
    )
        .into_response()
}

/// Why a token or revocation request is refused before its grant is looked at.
enum BadRequest {
    /// Not a form, or too large.
    Body,
    /// No `client_id`, or one not configured.
    Client(&'static str),
    /// `client_id` twice.
    ClientRepeated,
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        match self {
            BadRequest::Body => token_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded, at most 16 KiB",
            ),
            BadRequest::Client(why) => token_error(StatusCode::UNAUTHORIZED, "invalid_client", why),
            BadRequest::ClientRepeated => {
                token_error(StatusCode::BAD_REQUEST, "invalid_request", "client_id is repeated")
            }
        }
    }
}

/// The request body as form parameters and the client named by `client_id` (public
/// clients: no secret).
async fn form_and_client(web: &Web, req: axum::extract::Request) -> Result<(Params, &OAuthClient), BadRequest> {
    let Ok(Form(fields)) = Form::<Vec<(String, String)>>::from_request(req, &()).await else {
        return Err(BadRequest::Body);
    };
    let p = Params(fields);
    let client = match p.one("client_id") {
        Ok(Some(id)) => web.config.oauth.client(id).ok_or(BadRequest::Client("unknown client_id"))?,
        Ok(None) => return Err(BadRequest::Client("client_id is missing")),
        Err(Repeated) => return Err(BadRequest::ClientRepeated),
    };
    Ok((p, client))
}

/// `User-Agent`, printable and shortened, for the device list.
fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(header::USER_AGENT)?.to_str().ok()?;
    let ua: String = ua.chars().filter(|c| !c.is_control()).take(MAX_USER_AGENT).collect();
    let ua = ua.trim();
    (!ua.is_empty()).then(|| ua.to_string())
}

/// `POST /oauth/token`: `authorization_code` (with PKCE) and `refresh_token`.
pub(super) async fn token_endpoint(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    req: axum::extract::Request,
) -> Response {
    let from = Requester { ip: client_ip(&ip), user_agent: user_agent(req.headers()) };
    let (p, client) = match form_and_client(&web, req).await {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    if p.any_repeated() {
        return token_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is repeated");
    }
    let accounts = web.accounts();
    let result = match p.one("grant_type") {
        Ok(Some("authorization_code")) => {
            let (Ok(Some(code)), Ok(Some(redirect_uri)), Ok(Some(verifier))) =
                (p.one("code"), p.one("redirect_uri"), p.one("code_verifier"))
            else {
                return token_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "code, redirect_uri and code_verifier are required",
                );
            };
            if !valid_verifier(verifier) {
                return token_error(StatusCode::BAD_REQUEST, "invalid_request", "code_verifier is not a PKCE verifier");
            }
            accounts.oauth_redeem_code(code, client, redirect_uri, verifier, &from, &web.config.oauth)
        }
        Ok(Some("refresh_token")) => {
            let Ok(Some(refresh)) = p.one("refresh_token") else {
                return token_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required");
            };
            // A narrower scope is not kept apart: the grant's scope is stated in the answer.
            if let Ok(Some(scope)) = p.one("scope")
                && scopes_from_oauth(scope).is_err()
            {
                return token_error(StatusCode::BAD_REQUEST, "invalid_scope", "unknown scope");
            }
            accounts.oauth_refresh(refresh, client, &from, &web.config.oauth)
        }
        Ok(Some(_)) => {
            return token_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            );
        }
        _ => return token_error(StatusCode::BAD_REQUEST, "invalid_request", "grant_type is missing"),
    };
    match result {
        Ok(t) => {
            let body = serde_json::json!({
                "access_token": t.access_token.expose(),
                "token_type": "Bearer",
                "expires_in": t.expires_in,
                "refresh_token": t.refresh_token.expose(),
                "scope": t.scope,
            });
            (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                    (header::PRAGMA, "no-cache"),
                ],
                body.to_string(),
            )
                .into_response()
        }
        Err(e) => oauth_error(e),
    }
}

/// The answer to a refusal of the account service (`auth::oauth::OAuthError`).
fn oauth_error(e: OAuthError) -> Response {
    match e {
        OAuthError::InvalidGrant => token_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code or refresh token is not valid, has expired or was used already",
        ),
        OAuthError::InvalidClient => {
            token_error(StatusCode::UNAUTHORIZED, "invalid_client", "the code or token was issued to another client")
        }
        OAuthError::Unavailable => {
            let mut r =
                token_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "try again in a minute");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            r
        }
    }
}

/// `POST /oauth/revoke` (RFC 7009): an access or refresh token; its grant ends. Unknown
/// tokens are answered 200 like known ones.
pub(super) async fn revoke(State(web): W, req: axum::extract::Request) -> Response {
    let (p, client) = match form_and_client(&web, req).await {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let Ok(Some(token)) = p.one("token") else {
        return token_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required, once");
    };
    match web.accounts().oauth_revoke_token(token, &client.id) {
        Ok(()) | Err(OAuthError::InvalidGrant) => ([(header::CACHE_CONTROL, "no-store")], "").into_response(),
        Err(e) => oauth_error(e),
    }
}

// ---------------------------------------------------------------------------------------
// The Thunderbird add-on and autoconfig

/// Why the Thunderbird add-on cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AddonError {
    /// Thunderbird matches a provider's `hostnames` only to names with a dot.
    #[error(
        "[server] hostname `{0}` cannot name the add-on's server: Thunderbird needs a host name with a dot (letters, digits, '-' and '.')"
    )]
    Hostname(String),
    /// Writing the zip failed.
    #[error("cannot write the add-on: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// Writing the zip failed.
    #[error("cannot write the add-on: {0}")]
    Io(#[from] std::io::Error),
}

/// The add-on's `manifest.json`: an `oauth_provider` (Thunderbird 140+) for this server,
/// with the client id `thunderbird`, PKCE, the system browser and the exact issuer.
pub fn addon_manifest(config: &Config) -> Result<serde_json::Value, AddonError> {
    let host = &config.hostname;
    let good = host.contains('.')
        && !host.starts_with('.')
        && !host.ends_with('.')
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !good {
        return Err(AddonError::Hostname(host.clone()));
    }
    let base = &config.public_url;
    let name = config.web_organisation.as_deref().unwrap_or(host);
    Ok(serde_json::json!({
        "manifest_version": 2,
        "name": format!("{name}: sign in through the browser"),
        "description": format!("Lets Thunderbird sign in to {host} with OAuth2 (the account's password and two-step verification in the browser) instead of an app password."),
        "version": "1.0",
        "browser_specific_settings": { "gecko": { "id": format!("oauth@{host}"), "strict_min_version": "140.0" } },
        "oauth_provider": {
            "issuer": host,
            "clientId": "thunderbird",
            "authorizationEndpoint": format!("{base}/oauth/authorize"),
            "tokenEndpoint": format!("{base}/oauth/token"),
            "redirectionEndpoint": "http://localhost",
            "usePKCE": true,
            "useExternalBrowser": true,
            "issuerIdentifier": config.oauth_issuer(),
            "hostnames": [host],
            "scopes": "mail",
        },
    }))
}

/// The Thunderbird add-on (`.xpi`: a zip holding `manifest.json`), for the web download and
/// `mailgate thunderbird-addon`. The same configuration always gives the same bytes.
pub fn thunderbird_addon(config: &Config) -> Result<Vec<u8>, AddonError> {
    use std::io::Write as _;
    let manifest = serde_json::to_vec_pretty(&addon_manifest(config)?).map_err(std::io::Error::other)?;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("manifest.json", options)?;
    zip.write_all(&manifest)?;
    Ok(zip.finish()?.into_inner())
}

/// `GET /oauth/thunderbird-addon.xpi`.
pub(super) async fn addon(State(web): W) -> Response {
    match thunderbird_addon(&web.config) {
        Ok(bytes) => {
            let disposition = format!("attachment; filename=\"oauth@{}.xpi\"", web.config.hostname);
            (
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static("application/x-xpinstall")),
                    (
                        header::CONTENT_DISPOSITION,
                        HeaderValue::from_str(&disposition)
                            .unwrap_or(HeaderValue::from_static("attachment; filename=\"thunderbird-addon.xpi\"")),
                    ),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "the Thunderbird add-on cannot be built");
            web.message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The add-on is not available",
                "The Thunderbird add-on cannot be made with this server's settings. Tell your mail administrator.",
                ("/app-passwords", "Go to your account page"),
            )
            .into_response()
        }
    }
}

/// The autoconfig draft's `<oAuth2>` element (a child of `<clientConfig>`, after
/// `<emailProvider>`): the issuer, the scope, the endpoints and the open client's id.
pub(super) fn autoconfig_element(config: &Config) -> String {
    let base = xml_escape(&config.public_url);
    let client = config
        .oauth
        .client("open")
        .map(|c| format!("\n    <clientID>{}</clientID>", xml_escape(&c.id)))
        .unwrap_or_default();
    format!(
        r#"
  <oAuth2>
    <issuer>{issuer}</issuer>
    <scope>mail</scope>
    <authURL>{base}/oauth/authorize</authURL>
    <tokenURL>{base}/oauth/token</tokenURL>{client}
  </oAuth2>"#,
        issuer = xml_escape(config.oauth_issuer()),
    )
}
