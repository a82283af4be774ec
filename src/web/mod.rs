//! The web step: sign-in with the account password and a TOTP code (or a backup code),
//! TOTP enrolment by QR code, backup codes, self-service app passwords, and Thunderbird
//! autoconfig. Pages are rendered on the server (askama), work without JavaScript, and
//! carry their CSS from the binary.
//!
//! Sessions live on the server (an unguessable id in a `__Host-` cookie, a new id after
//! each sign-in step, 30 min idle / 12 h absolute); every POST needs the session's
//! synchronizer token and a same-origin request; changes of factors and new app
//! passwords need a sign-in within the last 10 minutes. Depends on auth, store, sessions
//! and config; not on proto or net.

mod devices;
mod notice;
mod oauth;
mod pages;
pub(crate) mod session;

use crate::auth::Authenticator;
use crate::auth::clock::Clock;
use crate::auth::crypto::SecretKey;
use crate::config::Config;
use crate::live::LiveSessions;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::routing::{get, post};
use std::sync::Arc;

pub use oauth::{AddonError, addon_manifest, thunderbird_addon};
pub use session::{COOKIE, WebSessions};

/// Time allowed for a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// The longest one HTTPS connection is kept.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);
/// The largest request head (request line and headers).
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// The client's address, added to every request by [`serve_connection`].
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub std::net::IpAddr);

/// Everything the handlers need.
pub struct Web {
    /// Configuration.
    pub config: Arc<Config>,
    /// Credential checks and the store.
    pub auth: Authenticator,
    /// Key sealing TOTP secrets.
    pub key: Arc<SecretKey>,
    /// Live IMAP/SMTP sessions (revocation ends them).
    pub live: LiveSessions,
    /// Web sessions.
    pub web_sessions: WebSessions,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The TLS certificate and key in service: `[web] sign_profiles` signs Apple
    /// configuration profiles with them (`None`: profiles go out unsigned).
    pub certs: Option<Arc<crate::tls::CertStore>>,
}

/// The router (tested with `oneshot`, served over TLS by `app`).
pub fn router(web: Arc<Web>) -> Router {
    let routes = Router::new()
        .route("/", get(pages::root))
        .route("/style.css", get(pages::style))
        .route("/copy.js", get(pages::copy_script))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/login/totp", get(pages::totp_form).post(pages::totp))
        .route("/login/backup", get(pages::backup_form).post(pages::backup))
        .route("/login/cancel", post(pages::cancel_sign_in))
        .route("/logout", post(pages::logout))
        .route("/app-passwords", get(pages::account).post(pages::create_app_password))
        .route("/app-passwords/{id}/revoke", post(pages::revoke_app_password))
        .route("/app-passwords/apple", post(devices::apple_profile))
        .route("/app-passwords/android", post(devices::android_setup))
        .route("/two-factor", get(pages::enrol_form).post(pages::enrol))
        .route("/two-factor/disable", get(pages::disable_2fa_form).post(pages::disable_2fa))
        .route("/backup-codes", get(pages::regenerate_codes_form).post(pages::regenerate_codes))
        .route("/security-notice", post(pages::dismiss_alert))
        .route("/backup-codes.txt", get(pages::download_codes))
        .route("/password", get(pages::password_form).post(pages::change_password))
        .route("/.well-known/autoconfig/mail/config-v1.1.xml", get(pages::autoconfig))
        .route("/mail/config-v1.1.xml", get(pages::autoconfig))
        .route(
            "/autodiscover/autodiscover.xml",
            post(pages::autodiscover).layer(axum::extract::DefaultBodyLimit::max(pages::AUTODISCOVER_MAX_BODY)),
        )
        .route(
            "/Autodiscover/Autodiscover.xml",
            post(pages::autodiscover).layer(axum::extract::DefaultBodyLimit::max(pages::AUTODISCOVER_MAX_BODY)),
        )
        .route("/healthz", get(healthz));
    // `[oauth]` off: its paths are unknown (404) like any other.
    let routes = if web.config.oauth.enabled { oauth::routes(routes) } else { routes };
    routes
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::map_request(host_from_authority))
        // Requests by route template (never the raw path) and status.
        .layer(axum::middleware::from_fn_with_state(web.auth.metrics().clone(), crate::metrics::count_web_request))
        .with_state(web)
}

/// How long `/healthz` waits for the store before it says 503.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /healthz` for load balancers: `200 ok` when the store answers a read (this
/// answer itself shows the web listener is up; the mail listeners are bound before it),
/// `503 unavailable` otherwise. No detail in the body, no session, no sign-in: a balancer
/// polls it every few seconds, and the outside world learns nothing from it.
async fn healthz(axum::extract::State(web): axum::extract::State<Arc<Web>>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let store = web.auth.store().clone();
    // A name no account can have (.invalid, RFC 2606; no NUL: PostgreSQL text refuses
    // it): one real read, never a hit.
    let read = tokio::task::spawn_blocking(move || store.get_account("healthz@mailgate.invalid").map(|_| ()));
    let up = matches!(tokio::time::timeout(HEALTH_TIMEOUT, read).await, Ok(Ok(Ok(()))));
    let (status, body) = if up {
        (axum::http::StatusCode::OK, "ok\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
    };
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// HTTP/2 carries the host in the `:authority` pseudo-header, not in `Host`; copy it so
/// the same-origin check sees it either way.
async fn host_from_authority(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

/// Serves the web step over TLS on an accepted connection (HTTP/1.1 or HTTP/2).
pub async fn serve_connection(
    router: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::IpAddr,
    handshake_timeout: std::time::Duration,
) {
    let Ok(Ok(tls)) = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await else { return };
    let service = hyper_util::service::TowerToHyperService::new(router.layer(axum::Extension(ClientIp(peer))));
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // A request's headers must arrive within HEADER_TIMEOUT, and no connection lives
    // longer than CONNECTION_LIFETIME (browsers simply open a new one): idle or trickling
    // connections cannot hold connection slots.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder.http2().timer(hyper_util::rt::TokioTimer::new()).max_header_list_size(MAX_REQUEST_HEAD as u32);
    let serve = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, serve).await;
}

/// Headers on every response: HSTS, a strict CSP, no framing, no sniffing, no caching
/// (pages show secrets and per-session tokens).
async fn security_headers(mut resp: axum::response::Response) -> axum::response::Response {
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    // A page may set its own (the OAuth consent page's form also leads to the app).
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        set(
            h,
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        );
    }
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // Not "no-referrer": with it, browsers send `Origin: null` on same-site form posts,
    // and the same-origin check would refuse every form. "same-origin" keeps the
    // Referer inside the site.
    set(h, header::REFERRER_POLICY, "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    resp
}

#[cfg(test)]
mod tests;
