//! The web step driven through its router (`oneshot`), with a temporary sled store and a
//! fake clock: sign-in, TOTP and backup codes, enrolment, app passwords, step-up, CSRF,
//! session lifetime, password change, headers and autoconfig (SECURITY.md cases 72, 75–94).

use super::*;
use crate::accounts::{AccountService, Actor, fmt_time};
use crate::auth::clock::FakeClock;
use crate::auth::{Peer, Protocol, Verdict, app_password, backup_codes, password};
use crate::secret::{SecretBytes, SecretString};
use crate::store::sled_store::SledStore;
use crate::store::{Account, AuditEvent, LastUse, Scope, Store, TotpState};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

const HOST: &str = "mail.example.test";
const CONFIG: &str = "[limits]\nauth_failure_delay_ms = 0\n[server]\npublic_url = \"https://mail.example.test\"\nhostname = \"mail.example.test\"";
/// Ten seconds into a TOTP step.
const T0: u64 = 1_800_000_010;
/// The TOTP secret of accounts made with `totp: true` (RFC 6238 test key).
const SECRET: &[u8] = b"12345678901234567890";
const ALICE: &str = "alice@example.test";
const BOB: &str = "bob@example.test";
const PW: &str = "alice's account password";

#[test]
fn cookie_name_is_host_prefixed() {
    assert!(COOKIE.starts_with("__Host-"));
}

// ---------------------------------------------------------------------------------------
// Harness

struct Env {
    web: Arc<Web>,
    clock: FakeClock,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env::with_config(CONFIG)
    }

    fn with_config(toml: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let clock = FakeClock::at(T0);
        let config = Config::from_toml_str(toml, "t").unwrap();
        let policy = config.policy.clone();
        let web = Arc::new(Web {
            config: Arc::new(config),
            auth: Authenticator::new(store.clone(), 2).with_clock(Arc::new(clock.clone())).with_policy(policy),
            key: Arc::new(SecretKey::from_bytes(&[7; 32]).unwrap()),
            live: LiveSessions::default(),
            web_sessions: WebSessions::default(),
            clock: Arc::new(clock.clone()),
            certs: None,
        });
        Env { web, clock, store, _dir: dir }
    }

    fn client(&self) -> Client {
        Client { web: self.web.clone(), cookie: None, csrf: None, ip: None }
    }

    fn now(&self) -> u64 {
        self.clock.now()
    }

    /// An account with a local password; with `totp`, TOTP on with [`SECRET`].
    fn add_user(&self, name: &str, pw: &str, totp: bool) {
        let totp = totp.then(|| TotpState {
            secret_enc: self.web.key.seal(SECRET, name).unwrap(),
            enabled_at: 1,
            last_step: 0,
        });
        self.store
            .create_account(&Account {
                password_hash: Some(password::hash(pw.as_bytes()).unwrap()),
                second_factor_required: totp.is_some(),
                totp,
                ..Account::new(name, 1)
            })
            .unwrap();
    }

    /// The account service as the admin CLI uses it (no server: no live sessions).
    fn admin(&self) -> AccountService {
        AccountService::new(self.store.clone(), self.web.key.clone(), HOST, Actor::Admin)
    }

    fn account(&self, name: &str) -> Account {
        self.store.get_account(name).unwrap().unwrap()
    }

    /// An app password made by the admin: (id, grouped password).
    fn app_password(&self, user: &str, label: &str) -> (String, String) {
        let made = self.admin().create_app_password(user, label, vec![]).unwrap();
        (made.new.id.clone(), made.new.grouped().expose().clone())
    }

    /// Gives the account a fresh set of backup codes; returns them.
    fn give_backup_codes(&self, user: &str) -> Vec<String> {
        let (shown, set) = backup_codes::generate(self.now(), &self.web.key).unwrap();
        self.store
            .update_account(user, &mut |a: &mut Account| {
                a.backup_codes = Some(set.clone());
                Ok(())
            })
            .unwrap();
        shown.iter().map(|c| c.expose().clone()).collect()
    }

    fn app_password_count(&self, user: &str) -> usize {
        self.store.list_app_passwords(user).unwrap().len()
    }
}

/// Form fields or headers.
type Fields<'a> = Vec<(&'a str, &'a str)>;
/// Form fields with owned values.
type OwnedFields<'a> = Vec<(&'a str, String)>;

/// A browser: keeps the session cookie and the last synchronizer token it saw.
struct Client {
    web: Arc<Web>,
    cookie: Option<String>,
    csrf: Option<String>,
    /// The client's address, as the connection would add it (none: 0.0.0.0).
    ip: Option<std::net::IpAddr>,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    fn location(&self) -> &str {
        self.header("location")
    }

    /// The raw `Set-Cookie` of the session cookie, if any.
    fn session_set_cookie(&self) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{COOKIE}=")))
            .map(str::to_string)
    }

    #[track_caller]
    fn assert_redirect(&self, to: &str) {
        assert_eq!(self.status, StatusCode::SEE_OTHER, "expected a redirect to {to}; body: {}", self.body);
        assert_eq!(self.location(), to);
    }

    #[track_caller]
    fn assert_ok(&self) {
        assert_eq!(self.status, StatusCode::OK, "location {:?}; body: {}", self.location(), self.body);
    }
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].to_string())
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

impl Client {
    async fn send(&mut self, method: Method, path: &str, body: Option<String>, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(c) = &self.cookie {
            b = b.header(header::COOKIE, format!("{COOKIE}={c}"));
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if let Some(ip) = self.ip {
            b = b.extension(crate::web::ClientIp(ip));
        }
        let req = b.body(Body::from(body.unwrap_or_default())).unwrap();
        let resp = router(self.web.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(bytes.to_vec()).unwrap();
        let r = Resp { status, headers, body };
        if let Some(set) = r.session_set_cookie() {
            let value = between(&set, "=", ";").unwrap_or_default();
            self.cookie = (!value.is_empty()).then_some(value);
        }
        if let Some(t) = between(&r.body, "name=\"csrf\" value=\"", "\"") {
            self.csrf = Some(t);
        }
        r
    }

    async fn get(&mut self, path: &str) -> Resp {
        self.send(Method::GET, path, None, &[]).await
    }

    /// A same-origin form POST with the session's token.
    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Resp {
        let csrf = self.csrf.clone().unwrap_or_default();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.send(Method::POST, path, Some(form(&all)), &[("sec-fetch-site", "same-origin")]).await
    }

    /// A POST exactly as given (no token added, only the given headers).
    async fn post_raw(&mut self, path: &str, fields: &[(&str, &str)], headers: &[(&str, &str)]) -> Resp {
        self.send(Method::POST, path, Some(form(fields)), headers).await
    }

    /// Opens the sign-in page and sends the password.
    async fn login(&mut self, user: &str, pw: &str) -> Resp {
        self.get("/login").await.assert_ok();
        self.post("/login", &[("username", user), ("password", pw)]).await
    }

    async fn sign_in(&mut self, user: &str, pw: &str) {
        self.login(user, pw).await.assert_redirect("/app-passwords");
    }

    async fn sign_in_2fa(&mut self, user: &str, pw: &str, code: &str) {
        self.login(user, pw).await.assert_redirect("/login/totp");
        self.post("/login/totp", &[("code", code)]).await.assert_redirect("/app-passwords");
    }

    /// Turns TOTP on through the pages; returns the secret and the backup codes shown.
    async fn enrol(&mut self, now: u64) -> (Vec<u8>, Vec<String>) {
        let page = self.get("/two-factor").await;
        page.assert_ok();
        let secret = secret_on(&page.body);
        let r = self.post("/two-factor", &[("code", &code(&secret, now))]).await;
        r.assert_ok();
        let codes = codes_on(&r.body);
        assert_eq!(codes.len(), backup_codes::COUNT, "{}", r.body);
        (secret, codes)
    }
}

/// The TOTP code of `secret` at `t`.
fn code(secret: &[u8], t: u64) -> String {
    totp_rs::Builder::new().with_secret(secret.to_vec()).build_noncompliant().generate(t).to_string()
}

/// A 6-digit code valid nowhere near `t` (±3 steps).
fn bad_code(secret: &[u8], t: u64) -> String {
    let near: Vec<String> = (0..7).map(|k| code(secret, t + k * 30 - 90)).collect();
    (0..1000).map(|n| format!("{n:06}")).find(|c| !near.contains(c)).unwrap()
}

/// The raw TOTP secret shown on the enrolment page.
fn secret_on(body: &str) -> Vec<u8> {
    let b32 = between(body, "<code id=\"totp-secret\">", "</code>").unwrap();
    totp_rs::Secret::try_from_base32(b32.replace(' ', "").to_uppercase()).unwrap().as_ref().to_vec()
}

/// The backup codes listed on a codes page.
fn codes_on(body: &str) -> Vec<String> {
    let list = between(body, "id=\"backup-codes\">", "</ol>").unwrap_or_default();
    list.split("<code>").skip(1).filter_map(|s| s.split("</code>").next()).map(str::to_string).collect()
}

fn peer(client: &str) -> Peer {
    Peer { ip: "192.0.2.1".parse().unwrap(), client_name: Some(client.to_string()) }
}

fn imap_login(env: &Env, user: &str, pw: &str) -> Verdict {
    crate::auth::decide(
        env.store.as_ref(),
        None,
        None,
        user,
        &SecretBytes::from(pw.as_bytes().to_vec()),
        Protocol::Imap,
        &peer("t"),
    )
}

#[track_caller]
fn assert_security_headers(r: &Resp, what: &str) {
    let hsts = r.header("strict-transport-security");
    let max_age: u64 = hsts
        .strip_prefix("max-age=")
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(max_age >= 31_536_000, "{what}: HSTS `{hsts}`");
    let csp = r.header("content-security-policy");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: CSP `{csp}`");
    assert!(csp.contains("base-uri 'none'"), "{what}: CSP `{csp}`");
    assert!(csp.contains("object-src 'none'") || csp.contains("default-src 'none'"), "{what}: CSP `{csp}`");
    assert_eq!(r.header("x-content-type-options"), "nosniff", "{what}");
    assert!(!r.header("referrer-policy").is_empty(), "{what}: no Referrer-Policy");
}

// ---------------------------------------------------------------------------------------
// Sign-in (cases 71, 82, 88, 93)

#[tokio::test]
async fn wrong_password_unknown_user_and_passwordless_account_look_the_same() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.store.create_account(&Account::new(BOB, 1)).unwrap();
    let mut c = env.client();
    c.get("/login").await.assert_ok();
    let wrong = c.post("/login", &[("username", ALICE), ("password", "not the password")]).await;
    let unknown = c.post("/login", &[("username", "nobody@example.test"), ("password", "not the password")]).await;
    let no_pw = c.post("/login", &[("username", BOB), ("password", "not the password")]).await;
    for r in [&wrong, &unknown, &no_pw] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.body.contains("The e-mail address or password is not right."), "{}", r.body);
        assert!(r.session_set_cookie().is_none(), "a failed sign-in must not issue a session");
    }
    let norm = |r: &Resp, user: &str| r.body.replace(user, "USER");
    assert_eq!(norm(&wrong, ALICE), norm(&unknown, "nobody@example.test"));
    assert_eq!(norm(&wrong, ALICE), norm(&no_pw, BOB));
    // Still signed out.
    c.get("/app-passwords").await.assert_redirect("/login");
}

#[tokio::test]
async fn app_password_never_opens_the_web_step() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let (_, app) = env.app_password(ALICE, "phone");
    assert!(matches!(imap_login(&env, ALICE, &app), Verdict::Granted(_)), "control: the app password is valid");
    let mut c = env.client();
    for form in [app.clone(), app.replace(' ', ""), app.to_uppercase()] {
        let r = c.login(ALICE, &form).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    }
    c.get("/app-passwords").await.assert_redirect("/login");
}

#[tokio::test]
async fn account_without_totp_goes_straight_to_app_passwords_with_a_new_session_id() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let page = c.get("/login").await;
    page.assert_ok();
    let set = page.session_set_cookie().unwrap();
    let parts: Vec<&str> = set.split(';').map(str::trim).collect();
    assert!(parts[0].starts_with("__Host-mailgate="), "{set}");
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(parts.contains(&attr), "cookie lacks {attr}: {set}");
    }
    assert!(!set.to_ascii_lowercase().contains("domain="), "a __Host- cookie has no Domain: {set}");
    let first = c.cookie.clone().unwrap();
    assert!(first.len() >= 43, "session id of at least 256 bits: {first}");

    // The username is case-insensitive and trimmed.
    let r = c.post("/login", &[("username", " Alice@Example.TEST "), ("password", PW)]).await;
    r.assert_redirect("/app-passwords");
    let second = c.cookie.clone().unwrap();
    assert_ne!(first, second, "the session id changes on sign-in");
    let page = c.get("/app-passwords").await;
    page.assert_ok();
    assert!(page.body.contains(ALICE));

    // The pre-sign-in id is dead: it opens nothing, and /login hands out a new one.
    let mut old = env.client();
    old.cookie = Some(first.clone());
    old.get("/app-passwords").await.assert_redirect("/login");
    let again = old.get("/login").await;
    again.assert_ok();
    assert!(again.session_set_cookie().is_some(), "the old id is unknown, so a new session is made");
    assert_ne!(old.cookie.as_deref(), Some(first.as_str()));
    // The root page sends signed-in people to their account.
    c.get("/").await.assert_redirect("/app-passwords");
    env.client().get("/").await.assert_redirect("/login");
}

#[tokio::test]
async fn partial_sign_in_leads_nowhere_and_ids_rotate_at_each_step() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let (id, _) = env.app_password(ALICE, "phone");
    let hash_before = env.account(ALICE).password_hash.clone();
    let mut c = env.client();
    c.get("/login").await.assert_ok();
    let id0 = c.cookie.clone().unwrap();
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/login/totp");
    let id1 = c.cookie.clone().unwrap();
    assert_ne!(id0, id1, "new id after the password");

    // Case 82: every protected URL sends the half-signed-in session to /login.
    for path in ["/app-passwords", "/two-factor", "/backup-codes.txt", "/password", "/"] {
        c.get(path).await.assert_redirect("/login");
    }
    let revoke = format!("/app-passwords/{id}/revoke");
    let posts: [(&str, Vec<(&str, &str)>); 6] = [
        ("/app-passwords", vec![("label", "attacker"), ("scope_imap", "1"), ("scope_smtp", "1")]),
        ("/password", vec![("new", "a brand new password"), ("again", "a brand new password"), ("revoke_all", "1")]),
        ("/two-factor", vec![("code", "123456")]),
        ("/two-factor/disable", vec![]),
        ("/backup-codes", vec![]),
        (revoke.as_str(), vec![]),
    ];
    for (path, fields) in &posts {
        c.post(path, fields).await.assert_redirect("/login");
    }
    let a = env.account(ALICE);
    assert!(a.totp.is_some() && a.second_factor_required, "2FA unchanged");
    assert!(a.backup_codes.is_none());
    assert_eq!(a.password_hash, hash_before, "password unchanged");
    assert_eq!(env.app_password_count(ALICE), 1, "no app password created or revoked");
    assert_eq!(c.cookie.as_deref(), Some(id1.as_str()));

    // The old (anonymous) id does not reach the second-factor step.
    let mut old = env.client();
    old.cookie = Some(id0);
    old.get("/login/totp").await.assert_redirect("/login");

    // The pending sign-in still works; the id changes again.
    c.get("/login/totp").await.assert_ok();
    c.post("/login/totp", &[("code", &code(SECRET, T0))]).await.assert_redirect("/app-passwords");
    let id2 = c.cookie.clone().unwrap();
    assert_ne!(id1, id2, "new id after the second factor");
    c.get("/app-passwords").await.assert_ok();
    let mut old = env.client();
    old.cookie = Some(id1);
    old.get("/app-passwords").await.assert_redirect("/login");
    old.get("/login/totp").await.assert_redirect("/login");
}

// ---------------------------------------------------------------------------------------
// TOTP (cases 75–79, 83)

#[tokio::test]
async fn totp_code_works_once_and_earlier_steps_stay_refused() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let now_code = code(SECRET, T0);
    env.client().sign_in_2fa(ALICE, PW, &now_code).await;
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, T0 / 30);

    // Case 75: the same code in a new sign-in (another browser) fails.
    let mut b = env.client();
    b.login(ALICE, PW).await.assert_redirect("/login/totp");
    let r = b.post("/login/totp", &[("code", &now_code)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("That code is not right"), "{}", r.body);
    // Case 76: the code of the previous step (still inside the window) fails too.
    let r = b.post("/login/totp", &[("code", &code(SECRET, T0 - 30))]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Case 83: the failures are recorded for the owner.
    let failed = env.store.recent_audit(ALICE, 20).unwrap().iter().filter(|e| e.kind == "second_factor_failed").count();
    assert_eq!(failed, 2);
    // The next step's code works.
    env.clock.advance(30);
    b.post("/login/totp", &[("code", &code(SECRET, T0 + 30))]).await.assert_redirect("/app-passwords");
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, T0 / 30 + 1);
}

#[tokio::test]
async fn totp_window_is_one_step_each_side() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    for t in [T0 + 60, T0 - 60] {
        let r = c.post("/login/totp", &[("code", &code(SECRET, t))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "step {} from now must be refused", (t as i64 - T0 as i64) / 30);
    }
    // T−1, then T, then T+1 (in increasing order: each must be later than the last).
    c.post("/login/totp", &[("code", &code(SECRET, T0 - 30))]).await.assert_redirect("/app-passwords");
    env.client().sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    env.client().sign_in_2fa(ALICE, PW, &code(SECRET, T0 + 30)).await;
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, T0 / 30 + 1);
}

#[tokio::test]
async fn totp_step_boundary_and_times_past_2038() {
    // Case 78: the step changes at 30.000 s, not before; 64-bit time.
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let boundary: u64 = 30 * 150_000_000; // 4.5e9 s > 2^32
    env.clock.set(boundary - 1);
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    let next_next = code(SECRET, boundary + 30);
    let r = c.post("/login/totp", &[("code", &next_next)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "at 29.999 s that code is two steps ahead");
    env.clock.set(boundary);
    c.post("/login/totp", &[("code", &next_next)]).await.assert_redirect("/app-passwords");
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, boundary / 30 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_of_one_totp_code_let_exactly_one_in() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let the_code = code(SECRET, T0);
    let mut a = env.client();
    let mut b = env.client();
    a.login(ALICE, PW).await.assert_redirect("/login/totp");
    b.login(ALICE, PW).await.assert_redirect("/login/totp");
    let (ca, cb) = (the_code.clone(), the_code.clone());
    let ta = tokio::spawn(async move { a.post("/login/totp", &[("code", &ca)]).await });
    let tb = tokio::spawn(async move { b.post("/login/totp", &[("code", &cb)]).await });
    let (ra, rb) = tokio::join!(ta, tb);
    let results = [ra.unwrap(), rb.unwrap()];
    let wins = results.iter().filter(|r| r.status == StatusCode::SEE_OTHER && r.location() == "/app-passwords").count();
    let losses = results.iter().filter(|r| r.status == StatusCode::UNAUTHORIZED).count();
    assert_eq!((wins, losses), (1, 1), "{:?}", results.iter().map(|r| r.status).collect::<Vec<_>>());
}

#[tokio::test]
async fn five_wrong_codes_drop_the_pending_sign_in() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let wrong = bad_code(SECRET, T0);
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    for n in 1..5 {
        let r = c.post("/login/totp", &[("code", &wrong)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "wrong code {n}");
    }
    // A wrong backup code counts toward the same limit (case 86).
    c.post("/login/backup", &[("code", "aaaa bbbb cccc dddd")]).await.assert_redirect("/login");
    c.get("/login/totp").await.assert_redirect("/login");
    // Even the right code no longer helps: the password must be entered again.
    c.post("/login/totp", &[("code", &code(SECRET, T0))]).await.assert_redirect("/login");
    let page = c.get("/login").await;
    page.assert_ok();
    assert!(page.body.contains("Too many wrong codes"), "{}", page.body);
    c.get("/app-passwords").await.assert_redirect("/login");
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, 0, "the right code was not spent");
    // A new sign-in starts a new count and the code works.
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/login/totp");
    c.post("/login/totp", &[("code", &code(SECRET, T0))]).await.assert_redirect("/app-passwords");
}

#[tokio::test]
async fn pending_sign_in_expires_after_five_minutes() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let mut a = env.client();
    a.login(ALICE, PW).await.assert_redirect("/login/totp");
    env.clock.advance(300);
    a.post("/login/totp", &[("code", &code(SECRET, env.now()))]).await.assert_redirect("/app-passwords");

    let mut b = env.client();
    b.login(ALICE, PW).await.assert_redirect("/login/totp");
    env.clock.advance(301);
    b.get("/login/totp").await.assert_redirect("/login");
    b.post("/login/totp", &[("code", &code(SECRET, env.now()))]).await.assert_redirect("/login");
    b.get("/app-passwords").await.assert_redirect("/login");
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, (T0 + 300) / 30, "the late code was not spent");
}

#[tokio::test]
async fn wrong_codes_count_per_account_across_sign_ins() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let wrong = bad_code(SECRET, T0);
    // Sign-ins of 5 wrong codes each use up the account's code budget: a new sign-in does
    // not start the account's count again, and the owner's right code is not compared.
    for n in 0..(crate::auth::budget::CODE_PER_ACCOUNT / 5 + 1) {
        let mut c = env.client();
        c.ip = Some(std::net::IpAddr::from([192, 0, 2, n as u8]));
        c.login(ALICE, PW).await.assert_redirect("/login/totp");
        for _ in 0..5 {
            c.post("/login/totp", &[("code", &wrong)]).await;
        }
    }
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    let r = c.post("/login/totp", &[("code", &code(SECRET, T0))]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert!(r.body.contains("Too many wrong codes were entered for this account"), "{}", r.body);
    assert_eq!(failed_codes(&env), crate::auth::budget::CODE_PER_ACCOUNT as usize);
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, 0, "the right code was not compared");
    // An hour later one more code may be tried: the right one gets in.
    env.clock.advance(crate::auth::budget::CODE_PER_ACCOUNT_REFILL);
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    c.post("/login/totp", &[("code", &code(SECRET, env.now()))]).await.assert_redirect("/app-passwords");
}

/// 400 distinct wrong passwords at once from one address (issue 13 point 5): at most the
/// address's budget is compared, the right password from that address is refused after
/// them, and from another address it signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_password_guesses_compare_at_most_the_address_budget() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let attacker = std::net::IpAddr::from([192, 0, 2, 66]);
    let mut c = env.client();
    c.ip = Some(attacker);
    c.get("/login").await.assert_ok();
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let mut each =
                Client { web: env.web.clone(), cookie: c.cookie.clone(), csrf: c.csrf.clone(), ip: Some(attacker) };
            tokio::spawn(async move {
                each.post("/login", &[("username", ALICE), ("password", &format!("guess number {i}"))]).await.status
            })
        })
        .collect();
    for t in tasks {
        // Compared and wrong, or not compared at all (the budget was used up).
        let status = t.await.unwrap();
        assert!(status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
    }
    let compared =
        env.store.recent_audit(ALICE, 1000).unwrap().iter().filter(|e| e.kind == "web_sign_in_failed").count();
    assert!(compared <= crate::auth::budget::PASSWORD_PER_ADDRESS as usize, "{compared} passwords compared");
    // The right password is not checked from there, and the page says so (not "wrong").
    let r = c.post("/login", &[("username", ALICE), ("password", PW)]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.body.contains("Your password was not checked"), "{}", r.body);
    let mut owner = env.client();
    owner.ip = Some(std::net::IpAddr::from([198, 51, 100, 1]));
    owner.login(ALICE, PW).await.assert_redirect("/app-passwords");
}

/// Second-factor codes compared for ALICE so far (one audit event per compared code).
fn failed_codes(env: &Env) -> usize {
    env.store.recent_audit(ALICE, 1000).unwrap().iter().filter(|e| e.kind == "second_factor_failed").count()
}

/// 300 distinct wrong codes at once on one pending sign-in (SECURITY.md §H, issue 13
/// point 1): at most its 5 slots are compared, and the right code sent afterwards is
/// refused. Today's attack compared every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_codes_compare_at_most_the_sign_ins_slots() {
    for backup in [false, true] {
        let env = Env::new();
        env.add_user(ALICE, PW, true);
        let codes = env.give_backup_codes(ALICE);
        let mut c = env.client();
        c.login(ALICE, PW).await.assert_redirect("/login/totp");
        let (path, right) =
            if backup { ("/login/backup", codes[0].clone()) } else { ("/login/totp", code(SECRET, T0)) };
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let mut each =
                    Client { web: env.web.clone(), cookie: c.cookie.clone(), csrf: c.csrf.clone(), ip: None };
                let guess = if backup {
                    format!("aaaa bbbb cccc {:04}", i % 10_000).replace('0', "2").replace('1', "3")
                } else {
                    format!("{:06}", (i * 7919) % 1_000_000)
                };
                tokio::spawn(async move { each.post(path, &[("code", &guess)]).await.status })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let compared = failed_codes(&env);
        assert!(compared <= crate::web::session::MAX_WRONG_CODES as usize, "{compared} codes compared");
        c.post(path, &[("code", &right)]).await.assert_redirect("/login");
        c.get("/app-passwords").await.assert_redirect("/login");
    }
}

// ---------------------------------------------------------------------------------------
// Enrolment and backup codes (cases 81, 84–87)

#[tokio::test]
async fn enrolment_turns_totp_on_only_after_a_valid_code() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/two-factor").await;
    page.assert_ok();
    assert_eq!(page.header("cache-control"), "no-store");
    assert!(page.body.contains("<svg"), "inline QR code");
    let secret = secret_on(&page.body);
    assert_eq!(secret.len(), 20, "160-bit secret");
    assert!(env.account(ALICE).totp.is_none(), "showing the QR code changes nothing");
    assert!(!env.account(ALICE).has_second_factor());
    // The same pending secret is shown again on reload.
    assert_eq!(secret_on(&c.get("/two-factor").await.body), secret);

    let r = c.post("/two-factor", &[("code", &bad_code(&secret, T0))]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("That code is not right"));
    assert_eq!(secret_on(&r.body), secret, "a wrong code keeps the pending secret");
    assert!(!env.account(ALICE).has_second_factor(), "a wrong code keeps 2FA off");
    assert!(env.account(ALICE).backup_codes.is_none());
    // Account password still opens IMAP.
    assert!(matches!(imap_login(&env, ALICE, PW), Verdict::Granted(_)));

    let enrol_code = code(&secret, T0);
    let r = c.post("/two-factor", &[("code", &enrol_code)]).await;
    r.assert_ok();
    assert_eq!(codes_on(&r.body).len(), 10);
    let a = env.account(ALICE);
    let t = a.totp.clone().unwrap();
    assert!(a.second_factor_required);
    assert_eq!(t.last_step, T0 / 30, "the enrolment code counts as used");
    assert_eq!(env.web.key.open(&t.secret_enc, ALICE).unwrap().expose(), &secret, "the page's key is stored sealed");
    assert_eq!(a.backup_codes.unwrap().remaining(), 10);
    assert!(matches!(imap_login(&env, ALICE, PW), Verdict::NeedsAppPassword));
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "totp_enabled"));
    // Once on, the enrolment page sends the person back.
    c.get("/two-factor").await.assert_redirect("/app-passwords");

    // The enrolment code cannot be replayed for a sign-in; the next step's can.
    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    assert_eq!(d.post("/login/totp", &[("code", &enrol_code)]).await.status, StatusCode::UNAUTHORIZED);
    env.clock.advance(30);
    d.post("/login/totp", &[("code", &code(&secret, env.now()))]).await.assert_redirect("/app-passwords");
}

#[tokio::test]
async fn enrolment_ends_account_password_sessions() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.add_user(BOB, PW, false);
    let mut imap_pw = env.web.live.register(ALICE, None);
    let mut smtp_pw = env.web.live.register(ALICE, None);
    let mut imap_app = env.web.live.register(ALICE, Some("abcdef"));
    let mut bobs = env.web.live.register(BOB, None);
    let mut other_browser = env.client();
    other_browser.sign_in(ALICE, PW).await;
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    c.enrol(T0).await;
    assert!(imap_pw.killed.try_recv().is_ok(), "IMAP session opened with the account password ends");
    assert!(smtp_pw.killed.try_recv().is_ok(), "SMTP session opened with the account password ends");
    assert!(imap_app.killed.try_recv().is_err(), "app-password sessions stay");
    assert!(bobs.killed.try_recv().is_err(), "other accounts are untouched");
    other_browser.get("/app-passwords").await.assert_redirect("/login");
    c.get("/app-passwords").await.assert_ok();
}

#[tokio::test]
async fn backup_codes_page_download_and_single_use() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let (_, codes) = c.enrol(T0).await;
    let unique: std::collections::HashSet<&String> = codes.iter().collect();
    assert_eq!(unique.len(), 10);
    for code in &codes {
        let plain = code.replace(' ', "");
        assert_eq!(plain.len(), backup_codes::LEN, "{code}");
        assert!(plain.bytes().all(|b| app_password::ALPHABET.contains(&b)), "{code}");
    }
    let file = c.get("/backup-codes.txt").await;
    file.assert_ok();
    assert!(file.header("content-disposition").starts_with("attachment"), "{}", file.header("content-disposition"));
    assert!(file.header("content-type").starts_with("text/plain"));
    assert_eq!(file.header("cache-control"), "no-store");
    for code in &codes {
        assert!(file.body.contains(code.as_str()), "{code} missing from the download");
    }
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Backup codes left: <strong>10</strong>"), "{}", page.body);

    // Sign in with a backup code (typed in upper case with dashes).
    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    d.get("/login/backup").await.assert_ok();
    let typed = codes[0].to_uppercase().replace(' ', "-");
    d.post("/login/backup", &[("code", &typed)]).await.assert_redirect("/app-passwords");
    let page = d.get("/app-passwords").await;
    assert!(page.body.contains("9 backup codes are left"), "{}", page.body);
    assert!(page.body.contains("Backup codes left: <strong>9</strong>"), "{}", page.body);
    assert_eq!(env.account(ALICE).backup_codes.unwrap().remaining(), 9);
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "backup_code_used"));

    // Case 84: the same code again fails.
    let mut e = env.client();
    e.login(ALICE, PW).await.assert_redirect("/login/totp");
    let r = e.post("/login/backup", &[("code", &codes[0])]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("That backup code is not right or was used already."), "{}", r.body);
    e.post("/login/backup", &[("code", &codes[1])]).await.assert_redirect("/app-passwords");
    assert_eq!(env.account(ALICE).backup_codes.unwrap().remaining(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_use_of_one_backup_code_lets_exactly_one_in() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let codes = env.give_backup_codes(ALICE);
    let mut a = env.client();
    let mut b = env.client();
    a.login(ALICE, PW).await.assert_redirect("/login/totp");
    b.login(ALICE, PW).await.assert_redirect("/login/totp");
    let (ca, cb) = (codes[5].clone(), codes[5].clone());
    let ta = tokio::spawn(async move { a.post("/login/backup", &[("code", &ca)]).await });
    let tb = tokio::spawn(async move { b.post("/login/backup", &[("code", &cb)]).await });
    let (ra, rb) = tokio::join!(ta, tb);
    let results = [ra.unwrap(), rb.unwrap()];
    let wins = results.iter().filter(|r| r.status == StatusCode::SEE_OTHER && r.location() == "/app-passwords").count();
    let losses = results.iter().filter(|r| r.status == StatusCode::UNAUTHORIZED).count();
    assert_eq!((wins, losses), (1, 1), "{:?}", results.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(env.account(ALICE).backup_codes.unwrap().remaining(), 9);
}

#[tokio::test]
async fn regenerating_backup_codes_invalidates_the_old_set_at_once() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let (_, old) = c.enrol(T0).await;
    assert!(c.get("/app-passwords").await.body.contains("href=\"/backup-codes\""));
    assert!(c.get("/backup-codes").await.body.contains("action=\"/backup-codes\""));
    let r = c.post("/backup-codes", &[]).await;
    r.assert_ok();
    let new = codes_on(&r.body);
    assert_eq!(new.len(), 10);
    assert!(old.iter().all(|o| !new.contains(o)));
    let file = c.get("/backup-codes.txt").await;
    assert!(new.iter().all(|n| file.body.contains(n.as_str())) && old.iter().all(|o| !file.body.contains(o.as_str())));
    assert_eq!(env.account(ALICE).backup_codes.unwrap().remaining(), 10);
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "backup_codes_generated"));

    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    for o in &old[..3] {
        assert_eq!(d.post("/login/backup", &[("code", o)]).await.status, StatusCode::UNAUTHORIZED, "old code {o}");
    }
    d.post("/login/backup", &[("code", &new[0])]).await.assert_redirect("/app-passwords");
}

#[tokio::test]
async fn disabling_2fa_invalidates_totp_and_backup_codes() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let (secret, codes) = c.enrol(T0).await;
    let r = c.post("/two-factor/disable", &[]).await;
    r.assert_redirect("/app-passwords");
    let a = env.account(ALICE);
    assert!(a.totp.is_none() && !a.second_factor_required && a.backup_codes.is_none());
    assert!(!a.has_second_factor());
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Your backup codes no longer work"), "{}", page.body);
    assert!(page.body.contains("Two-step verification is <strong>off</strong>"));
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "totp_disabled"));
    // Sign-in needs only the password now; the account password opens IMAP again.
    env.client().sign_in(ALICE, PW).await;
    assert!(matches!(imap_login(&env, ALICE, PW), Verdict::Granted(_)));

    // Turning it on again: the old codes and the old secret are gone for good.
    env.clock.advance(30);
    let (secret2, _) = c.enrol(env.now()).await;
    assert_ne!(secret, secret2);
    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    assert_eq!(d.post("/login/backup", &[("code", &codes[0])]).await.status, StatusCode::UNAUTHORIZED);
    env.clock.advance(30);
    assert_eq!(
        d.post("/login/totp", &[("code", &code(&secret, env.now()))]).await.status,
        StatusCode::UNAUTHORIZED,
        "the old secret's code"
    );
}

#[tokio::test]
async fn disabling_2fa_withdraws_the_backup_code_download() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    c.enrol(T0).await;
    c.get("/backup-codes.txt").await.assert_ok();
    c.post("/two-factor/disable", &[]).await.assert_redirect("/app-passwords");
    let r = c.get("/backup-codes.txt").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "codes that no longer work are still offered:\n{}", r.body);
}

// ---------------------------------------------------------------------------------------
// App passwords (cases 69–74)

/// Issue 13 item 12: a label with a bidi control ("U+202E gnp.exe" shows as "exe.png"),
/// an invisible or a control character is refused with the reason; the form comes back
/// with what was typed, and nothing is created.
#[tokio::test]
async fn labels_with_bidi_invisible_or_control_characters_are_refused_and_kept_in_the_form() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let typed = "\u{202E}gnp.exe";
    let r = c.post("/app-passwords", &[("label", typed), ("scope_imap", "1")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "location {:?}; body: {}", r.location(), r.body);
    assert!(
        r.body.contains("The app password was not created: the label contains U+202E, a bidirectional text control"),
        "{}",
        r.body
    );
    assert!(r.body.contains(&format!("value=\"{typed}\" aria-invalid=\"true\"")), "typed label not kept: {}", r.body);
    assert!(r.body.contains(r#"name="scope_imap" value="1" checked>"#), "{}", r.body);
    assert!(r.body.contains(r#"name="scope_smtp" value="1">"#), "an unticked scope came back ticked: {}", r.body);
    assert_eq!(env.app_password_count(ALICE), 0);
    for (typed, why) in [
        ("Lap\u{200B}top", "U+200B, an invisible formatting character"),
        ("\u{FEFF}Phone", "U+FEFF, an invisible formatting character"),
        ("Lap\u{00AD}top", "U+00AD, an invisible formatting character"),
        ("a\u{2067}b", "U+2067, a bidirectional text control"),
        ("Tab\there", "U+0009, a control character"),
    ] {
        let r = c.post("/app-passwords", &[("label", typed), ("scope_imap", "1"), ("scope_smtp", "1")]).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{typed:?}");
        assert!(r.body.contains(why), "{typed:?}: {}", r.body);
        assert!(r.body.contains(&format!("value=\"{}\"", typed.replace('"', "&quot;"))), "{typed:?}");
    }
    assert_eq!(env.app_password_count(ALICE), 0);
    // The refused page's form works: a clean label is accepted.
    c.post("/app-passwords", &[("label", "gnp.exe"), ("scope_imap", "1")]).await.assert_ok();
    assert_eq!(env.store.list_app_passwords(ALICE).unwrap()[0].label, "gnp.exe");
}

#[tokio::test]
async fn app_password_create_list_and_revoke() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.add_user(BOB, PW, false);
    let (bobs_id, _) = env.app_password(BOB, "bob's phone");
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;

    let r =
        c.post("/app-passwords", &[("label", "Thunderbird laptop"), ("scope_imap", "1"), ("scope_smtp", "1")]).await;
    r.assert_ok();
    assert_eq!(r.header("cache-control"), "no-store");
    let shown = between(&r.body, "id=\"app-password\" data-copy=\"the app password\">", "</p>").unwrap();
    let groups: Vec<&str> = shown.split(' ').collect();
    assert_eq!(groups.len(), 8, "{shown}");
    assert!(groups.iter().all(|g| g.len() == 4 && g.bytes().all(|b| app_password::ALPHABET.contains(&b))), "{shown}");
    assert!(r.body.contains(&format!("{HOST}, port 9993, SSL/TLS")), "{}", r.body);
    assert!(r.body.contains(&format!("{HOST}, port 9465, SSL/TLS")), "{}", r.body);
    assert!(r.body.contains("Thunderbird laptop"));

    // Stored hashed, made by "web", usable on IMAP and SMTP.
    let list = env.store.list_app_passwords(ALICE).unwrap();
    assert_eq!(list.len(), 1);
    let rec = &list[0];
    let (id, normalized) = app_password::parse(shown.as_bytes()).unwrap();
    assert_eq!(rec.id, id);
    assert_eq!(rec.label, "Thunderbird laptop");
    assert_eq!(rec.scopes, vec![Scope::Imap, Scope::Smtp]);
    assert_eq!(rec.created_by, "web");
    assert!(rec.hash.starts_with("$argon2id$"));
    assert!(!rec.hash.contains(normalized.expose().as_str()));
    assert!(password::verify(normalized.expose().as_bytes(), &rec.hash));

    // Shown once: the list has label, scopes, created, last used, and never the secret.
    let page = c.get("/app-passwords").await;
    page.assert_ok();
    assert!(page.body.contains("<td>Thunderbird laptop</td><td>IMAP, SMTP</td>"), "{}", page.body);
    assert!(page.body.contains(&fmt_time(rec.created_at)));
    assert!(page.body.contains("<td>never</td>"));
    assert!(!page.body.contains(&shown) && !page.body.contains(normalized.expose().as_str()));
    assert!(!page.body.contains("$argon2"));
    // It works on IMAP, and the list shows that use.
    assert!(matches!(imap_login(&env, ALICE, &shown), Verdict::Granted(_)));
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("<td>IMAP ") && page.body.contains(" from 192.0.2.1 (t)</td>"), "{}", page.body);
    // Each protocol shows its own last use.
    let used = LastUse { at: T0, ip: "192.0.2.7".into(), client: None, protocol: Some(Scope::Smtp) };
    env.store.record_app_password_use(&rec.id, &used).unwrap();
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains(" from 192.0.2.1 (t); SMTP "), "{}", page.body);
    assert!(page.body.contains(&format!("SMTP {} from 192.0.2.7</td>", fmt_time(T0))), "{}", page.body);

    // IMAP-only.
    let r = c.post("/app-passwords", &[("label", "Phone"), ("scope_imap", "1")]).await;
    r.assert_ok();
    let phone = env.store.list_app_passwords(ALICE).unwrap().into_iter().find(|r| r.label == "Phone").unwrap();
    assert_eq!(phone.scopes, vec![Scope::Imap]);

    // A duplicate label (any case) is refused with a message.
    let page = c.post("/app-passwords", &[("label", "thunderbird LAPTOP"), ("scope_imap", "1")]).await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.body.contains("You already have an app password called “thunderbird LAPTOP”"), "{}", page.body);
    assert_eq!(env.app_password_count(ALICE), 2);
    // No scope: refused.
    let page = c.post("/app-passwords", &[("label", "Nothing")]).await;
    assert_eq!(page.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.body.contains("Choose what the app password may be used for"), "{}", page.body);
    assert_eq!(env.app_password_count(ALICE), 2);

    // Revoke ends its live sessions, and only those.
    let mut s1 = env.web.live.register(ALICE, Some(&rec.id));
    let mut s2 = env.web.live.register(ALICE, Some(&rec.id));
    let mut other = env.web.live.register(ALICE, Some(&phone.id));
    c.post(&format!("/app-passwords/{}/revoke", rec.id), &[]).await.assert_redirect("/app-passwords");
    assert!(env.store.get_app_password(&rec.id).unwrap().is_none());
    assert!(s1.killed.try_recv().is_ok() && s2.killed.try_recv().is_ok());
    assert!(other.killed.try_recv().is_err());
    assert!(matches!(imap_login(&env, ALICE, &shown), Verdict::Denied));
    let page = c.get("/app-passwords").await;
    assert!(
        page.body.contains("is revoked and can no longer sign in. The 2 connections that used it were closed."),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<td>Thunderbird laptop</td>"));
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "app_password_revoked"));

    // Someone else's id: nothing happens.
    c.post(&format!("/app-passwords/{bobs_id}/revoke"), &[]).await.assert_redirect("/app-passwords");
    assert!(env.store.get_app_password(&bobs_id).unwrap().is_some());
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("does not exist"), "{}", page.body);
}

#[tokio::test]
async fn labels_and_device_names_are_escaped() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    // The IMAP ID client name is chosen by whoever connects.
    let evil = "<script>alert(1)</script>";
    let pw = SecretBytes::from(PW.as_bytes().to_vec());
    assert!(matches!(
        crate::auth::decide(env.store.as_ref(), None, None, ALICE, &pw, Protocol::Imap, &peer(evil)),
        Verdict::NeedsAppPassword
    ));
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    let r = c.post("/app-passwords", &[("label", "<b>x</b>\"'"), ("scope_smtp", "1")]).await;
    r.assert_ok();
    assert!(!r.body.contains("<b>x</b>"));
    let page = c.get("/app-passwords").await;
    assert!(!page.body.contains("<script>") && !page.body.contains("<b>x</b>"), "{}", page.body);
    assert!(
        page.body.contains("&#60;script&#62;alert(1)") || page.body.contains("&lt;script&gt;alert(1)"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn account_page_lists_devices_still_using_the_account_password() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    let page = c.get("/app-passwords").await;
    assert!(!page.body.contains("Devices still using your account password"));

    let pw = SecretBytes::from(PW.as_bytes().to_vec());
    let refused = crate::auth::decide(env.store.as_ref(), None, None, ALICE, &pw, Protocol::Imap, &peer("Thunderbird"));
    assert!(matches!(refused, Verdict::NeedsAppPassword));
    let ev = AuditEvent {
        at: T0,
        username: ALICE.into(),
        kind: "account_password_refused_2fa".into(),
        detail: "198.51.100.4 via SMTP".into(),
    };
    env.store.append_audit(&ev).unwrap();
    // Other kinds are not devices.
    let other = AuditEvent { kind: "login_failed".into(), detail: "203.0.113.9 via IMAP".into(), ..ev.clone() };
    env.store.append_audit(&other).unwrap();
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Devices still using your account password"), "{}", page.body);
    assert!(page.body.contains("192.0.2.1 via IMAP (Thunderbird)"), "{}", page.body);
    assert!(page.body.contains(&format!("198.51.100.4 via SMTP, last {}", fmt_time(T0))), "{}", page.body);
    assert!(!page.body.contains("203.0.113.9"));
}

// ---------------------------------------------------------------------------------------
// Step-up (case 72)

#[tokio::test]
async fn factor_changes_need_a_sign_in_within_ten_minutes() {
    let env = Env::new();
    // Accounts without 2FA: new app password, enrolment (GET and POST), password change.
    let plain: [(&str, Method, &str, Fields<'_>); 5] = [
        ("a1@example.test", Method::POST, "/app-passwords", vec![("label", "late"), ("scope_imap", "1")]),
        ("a2@example.test", Method::GET, "/two-factor", vec![]),
        ("a3@example.test", Method::POST, "/two-factor", vec![]),
        ("a4@example.test", Method::GET, "/password", vec![]),
        (
            "a5@example.test",
            Method::POST,
            "/password",
            vec![("new", "another long password"), ("again", "another long password")],
        ),
    ];
    for (user, method, path, fields) in plain {
        env.clock.set(T0);
        env.add_user(user, PW, false);
        let hash = env.account(user).password_hash;
        let mut c = env.client();
        c.sign_in(user, PW).await;
        let secret = if path == "/two-factor" { Some(secret_on(&c.get("/two-factor").await.body)) } else { None };
        env.clock.advance(601);
        let r = if method == Method::GET {
            c.get(path).await
        } else if let Some(s) = &secret {
            c.post(path, &[("code", &code(s, env.now()))]).await
        } else {
            c.post(path, &fields).await
        };
        r.assert_redirect("/login");
        let page = c.get("/login").await;
        assert!(page.body.contains("For this change, please sign in again."), "{method} {path}: {}", page.body);
        // Downgraded: nothing protected opens until the next sign-in.
        c.get("/app-passwords").await.assert_redirect("/login");
        let a = env.account(user);
        assert!(!a.has_second_factor(), "{method} {path}");
        assert_eq!(a.password_hash, hash, "{method} {path}");
        assert_eq!(env.app_password_count(user), 0, "{method} {path}");
        // Signing in again allows it.
        c.post("/login", &[("username", user), ("password", PW)]).await.assert_redirect("/app-passwords");
        if path == "/two-factor" {
            c.get("/two-factor").await.assert_ok();
        }
    }

    // Accounts with 2FA: turning it off, new backup codes.
    for (n, path) in ["/two-factor/disable", "/backup-codes"].into_iter().enumerate() {
        let user = format!("t{n}@example.test");
        env.clock.set(T0);
        env.add_user(&user, PW, true);
        let codes = env.give_backup_codes(&user);
        let mut c = env.client();
        c.sign_in_2fa(&user, PW, &code(SECRET, T0)).await;
        env.clock.advance(601);
        c.post(path, &[]).await.assert_redirect("/login");
        c.get("/app-passwords").await.assert_redirect("/login");
        let a = env.account(&user);
        assert!(a.totp.is_some() && a.second_factor_required, "{path}");
        assert_eq!(a.backup_codes.unwrap().remaining(), 10, "{path}");
        // The old codes still work, so no new set was made.
        let mut d = env.client();
        d.login(&user, PW).await.assert_redirect("/login/totp");
        d.post("/login/backup", &[("code", &codes[0])]).await.assert_redirect("/app-passwords");
    }
}

#[tokio::test]
async fn step_up_boundary_and_revocation_without_step_up() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let (id, _) = env.app_password(ALICE, "old phone");
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    env.clock.advance(600);
    c.post("/app-passwords", &[("label", "on time"), ("scope_imap", "1")]).await.assert_ok();
    env.clock.advance(1);
    // Revoking still works after 10 minutes, and keeps the session signed in.
    let mut live = env.web.live.register(ALICE, Some(&id));
    c.post(&format!("/app-passwords/{id}/revoke"), &[]).await.assert_redirect("/app-passwords");
    assert!(env.store.get_app_password(&id).unwrap().is_none());
    assert!(live.killed.try_recv().is_ok());
    c.get("/app-passwords").await.assert_ok();
    // Creating does not.
    c.post("/app-passwords", &[("label", "too late"), ("scope_imap", "1")]).await.assert_redirect("/login");
    assert_eq!(env.app_password_count(ALICE), 1);
}

// ---------------------------------------------------------------------------------------
// CSRF (case 90)

#[tokio::test]
async fn cross_site_or_tokenless_posts_are_refused() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let (id, _) = env.app_password(ALICE, "phone");
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let token = c.csrf.clone().unwrap();
    let create = [("label", "csrf"), ("scope_imap", "1")];
    let with_token = |t: &str| {
        let mut f = vec![("csrf", t.to_string())];
        f.extend(create.iter().map(|(k, v)| (*k, v.to_string())));
        f
    };
    let cases: Vec<(&str, OwnedFields<'_>, Fields<'_>)> = vec![
        ("no token", with_token("").into_iter().skip(1).collect(), vec![("sec-fetch-site", "same-origin")]),
        ("empty token", with_token(""), vec![("sec-fetch-site", "same-origin")]),
        (
            "wrong token",
            with_token("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            vec![("sec-fetch-site", "same-origin")],
        ),
        ("cross-site", with_token(&token), vec![("sec-fetch-site", "cross-site")]),
        ("same-site", with_token(&token), vec![("sec-fetch-site", "same-site")]),
        ("foreign origin", with_token(&token), vec![("origin", "https://evil.example")]),
        ("null origin", with_token(&token), vec![("origin", "null")]),
        ("http origin", with_token(&token), vec![("origin", "http://mail.example.test")]),
        (
            "cross-site, right origin",
            with_token(&token),
            vec![("sec-fetch-site", "cross-site"), ("origin", "https://mail.example.test")],
        ),
    ];
    for (what, fields, headers) in &cases {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for path in ["/app-passwords".to_string(), format!("/app-passwords/{id}/revoke"), "/logout".into()] {
            let r = c.post_raw(&path, &fields, headers).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{what} POST {path}: {}", r.body);
            assert!(r.body.contains("Request refused"));
        }
    }
    assert_eq!(env.app_password_count(ALICE), 1, "nothing created, nothing revoked");
    assert!(env.store.get_app_password(&id).unwrap().is_some());
    c.get("/app-passwords").await.assert_ok(); // still signed in: logout was refused too

    // Without Sec-Fetch-Site, the right Origin and token are accepted (older browsers).
    let fields = with_token(&token);
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.post_raw("/app-passwords", &fields, &[("origin", "https://mail.example.test")]).await.assert_ok();
    assert_eq!(env.app_password_count(ALICE), 2);
}

#[tokio::test]
async fn factor_posts_without_a_token_change_nothing() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    env.give_backup_codes(ALICE);
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    let before = env.account(ALICE);
    for path in ["/two-factor/disable", "/backup-codes", "/password"] {
        let fields = [("new", "a long new password"), ("again", "a long new password")];
        let r = c.post_raw(path, &fields, &[("sec-fetch-site", "same-origin")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        let token = c.csrf.clone().unwrap();
        let mut with = vec![("csrf", token.as_str())];
        with.extend_from_slice(&fields);
        let r = c.post_raw(path, &with, &[("sec-fetch-site", "cross-site")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    let after = env.account(ALICE);
    assert!(after.totp.is_some());
    assert_eq!(after.password_hash, before.password_hash);
    assert_eq!(after.backup_codes.unwrap().hashes, before.backup_codes.unwrap().hashes, "backup codes not regenerated");
}

#[tokio::test]
async fn login_form_is_protected_against_login_csrf() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    // No session at all: nothing to sign in.
    let r = c.post_raw("/login", &[("username", ALICE), ("password", PW)], &[]).await;
    r.assert_redirect("/login");
    assert!(c.cookie.is_none());
    c.get("/login").await.assert_ok();
    let token = c.csrf.clone().unwrap();
    let cases: [(&str, &str, &str); 4] = [
        ("", "sec-fetch-site", "same-origin"),
        ("wrong-token", "sec-fetch-site", "same-origin"),
        (&token, "sec-fetch-site", "cross-site"),
        (&token, "origin", "https://evil.example"),
    ];
    for (t, h, v) in cases {
        let r = c.post_raw("/login", &[("csrf", t), ("username", ALICE), ("password", PW)], &[(h, v)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "token {t:?}, {h}: {v}");
        assert!(r.session_set_cookie().is_none());
    }
    c.get("/app-passwords").await.assert_redirect("/login");
    // The second-factor forms too.
    env.add_user(BOB, PW, true);
    let mut b = env.client();
    b.login(BOB, PW).await.assert_redirect("/login/totp");
    let r = b.post_raw("/login/totp", &[("code", &code(SECRET, T0))], &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = b.post_raw("/login/backup", &[("code", "aaaa bbbb cccc dddd")], &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(env.account(BOB).totp.unwrap().last_step, 0);
    b.post("/login/totp", &[("code", &code(SECRET, T0))]).await.assert_redirect("/app-passwords");
}

#[tokio::test]
async fn get_requests_never_change_state() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    env.give_backup_codes(ALICE);
    let (id, _) = env.app_password(ALICE, "phone");
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    let token = c.csrf.clone().unwrap();
    let before = env.account(ALICE);
    for path in [format!("/app-passwords/{id}/revoke?csrf={token}"), format!("/logout?csrf={token}")] {
        let r = c.get(&path).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "GET {path}");
    }
    // These two only ask first (issue 15): the change needs the POST from that page.
    for path in [format!("/two-factor/disable?csrf={token}"), format!("/backup-codes?csrf={token}")] {
        c.get(&path).await.assert_ok();
    }
    // A GET with form fields in the query creates nothing.
    c.get(&format!("/app-passwords?csrf={token}&label=get&scope_imap=1")).await.assert_ok();
    c.get(&format!("/password?csrf={token}&new=aaaaaaaaaaaaaaaa&again=aaaaaaaaaaaaaaaa")).await.assert_ok();
    let after = env.account(ALICE);
    assert!(after.totp.is_some());
    assert_eq!(after.password_hash, before.password_hash);
    assert_eq!(after.backup_codes.unwrap().hashes, before.backup_codes.unwrap().hashes);
    assert_eq!(env.app_password_count(ALICE), 1);
    c.get("/app-passwords").await.assert_ok();

    // A second-factor code in a GET does not sign in.
    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    let t = d.csrf.clone().unwrap();
    d.get(&format!("/login/totp?csrf={t}&code={}", code(SECRET, T0 + 30))).await.assert_ok();
    d.get("/app-passwords").await.assert_redirect("/login");
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, T0 / 30);
}

// ---------------------------------------------------------------------------------------
// Session lifetime (case 89)

#[tokio::test]
async fn idle_sessions_end_after_thirty_minutes() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    env.clock.advance(30 * 60);
    c.get("/app-passwords").await.assert_ok();
    env.clock.advance(30 * 60 + 1);
    c.get("/app-passwords").await.assert_redirect("/login");
    let old = c.cookie.clone().unwrap();
    assert!(env.web.web_sessions.with(&old, env.now(), |_| ()).is_none(), "removed on the server");
    let r = c.get("/login").await;
    r.assert_ok();
    assert!(r.session_set_cookie().is_some(), "a new session replaces the expired one");
}

#[tokio::test]
async fn sessions_end_after_twelve_hours_however_active() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let mut elapsed = 0;
    while elapsed + 25 * 60 <= 12 * 3600 {
        env.clock.advance(25 * 60);
        elapsed += 25 * 60;
        c.get("/app-passwords").await.assert_ok();
    }
    env.clock.advance(25 * 60);
    c.get("/app-passwords").await.assert_redirect("/login");
}

#[tokio::test]
async fn logout_ends_the_session_on_the_server() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let id = c.cookie.clone().unwrap();
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("action=\"/logout\""));
    let r = c.post("/logout", &[]).await;
    r.assert_redirect("/login?signed-out");
    let set = r.session_set_cookie().unwrap();
    assert!(set.contains("Max-Age=0"), "{set}");
    assert!(c.cookie.is_none());
    assert!(env.web.web_sessions.with(&id, env.now(), |_| ()).is_none());
    let mut replay = env.client();
    replay.cookie = Some(id);
    replay.get("/app-passwords").await.assert_redirect("/login");
    replay.get("/password").await.assert_redirect("/login");
}

// ---------------------------------------------------------------------------------------
// Password change (case 94)

#[tokio::test]
async fn password_change_checks_input_and_can_revoke_everything() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.app_password(ALICE, "phone");
    env.app_password(ALICE, "laptop");
    let mut pw_session = env.web.live.register(ALICE, None);
    let mut other = env.client();
    other.sign_in(ALICE, PW).await;
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("href=\"/password\""));
    c.get("/password").await.assert_ok();
    let hash = env.account(ALICE).password_hash;

    let new = "a completely new password";
    let r = c.post("/password", &[("new", new), ("again", "a completely new passwort")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("The two passwords are not the same."));
    let r = c.post("/password", &[("new", "short pw"), ("again", "short pw")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("at least 15 characters"));
    assert_eq!(env.account(ALICE).password_hash, hash);

    c.post("/password", &[("new", new), ("again", new), ("revoke_all", "1")]).await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    page.assert_ok();
    assert!(page.body.contains("all 2 app passwords are revoked"), "{}", page.body);
    assert_eq!(env.app_password_count(ALICE), 0);
    assert!(pw_session.killed.try_recv().is_ok(), "sessions opened with the old password end");
    other.get("/app-passwords").await.assert_redirect("/login");
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "account_password_changed"));

    assert_eq!(env.client().login(ALICE, PW).await.status, StatusCode::UNAUTHORIZED);
    env.client().sign_in(ALICE, new).await;

    // Without the box ticked, app passwords stay.
    env.app_password(ALICE, "tablet");
    let third = "yet another new password";
    c.post("/password", &[("new", third), ("again", third)]).await.assert_redirect("/app-passwords");
    assert_eq!(env.app_password_count(ALICE), 1);
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Your password is changed."), "{}", page.body);
    env.client().sign_in(ALICE, third).await;
}

#[tokio::test]
async fn password_change_needs_a_local_password() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    // The admin removes the local password (e.g. the account moved to an external source).
    env.store
        .update_account(ALICE, &mut |a: &mut Account| {
            a.password_hash = None;
            Ok(())
        })
        .unwrap();
    c.get("/password").await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    assert!(!page.body.contains("href=\"/password\""));
    let new = "a completely new password";
    let r = c.post("/password", &[("new", new), ("again", new)]).await;
    assert_ne!(r.location(), "/app-passwords", "no success");
    assert!(env.account(ALICE).password_hash.is_none(), "no password was set");
}

// ---------------------------------------------------------------------------------------
// Headers (case 91) and autoconfig

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.add_user(BOB, PW, true);
    let mut c = env.client();
    let mut pages = vec![("GET /", c.get("/").await), ("GET /login", c.get("/login").await)];
    pages.push(("POST /login (wrong)", c.post("/login", &[("username", ALICE), ("password", "x")]).await));
    pages.push(("POST /login (no token)", c.post_raw("/login", &[("username", ALICE)], &[]).await));
    c.sign_in(ALICE, PW).await;
    for path in ["/app-passwords", "/two-factor", "/password", "/backup-codes.txt"] {
        pages.push((path, c.get(path).await));
    }
    let mut b = env.client();
    b.login(BOB, PW).await.assert_redirect("/login/totp");
    pages.push(("GET /login/totp", b.get("/login/totp").await));
    pages.push(("GET /login/backup", b.get("/login/backup").await));
    pages.push(("POST /login/totp (wrong)", b.post("/login/totp", &[("code", &bad_code(SECRET, T0))]).await));
    for (what, r) in &pages {
        assert_security_headers(r, what);
        assert_eq!(r.header("cache-control"), "no-store", "{what}");
        if r.header("content-type").starts_with("text/html") {
            assert!(r.header("content-type").contains("charset=utf-8"), "{what}");
        }
    }
    for path in ["/style.css", "/mail/config-v1.1.xml"] {
        let r = c.get(path).await;
        r.assert_ok();
        assert_security_headers(&r, path);
    }
}

#[tokio::test]
async fn autoconfig_names_the_host_and_the_listener_ports() {
    let cfg = format!(
        "{CONFIG}\n[imap]\nlisten_tls = [\"0.0.0.0:993\"]\nlisten_starttls = [\"0.0.0.0:143\"]\n[smtp]\nlisten_tls = [\"0.0.0.0:465\"]\nlisten_starttls = [\"0.0.0.0:587\"]"
    );
    let env = Env::with_config(&cfg);
    let mut c = env.client();
    let a = c.get("/.well-known/autoconfig/mail/config-v1.1.xml").await;
    let b = c.get("/mail/config-v1.1.xml").await;
    a.assert_ok();
    b.assert_ok();
    assert_eq!(a.body, b.body);
    assert!(a.header("content-type").starts_with("application/xml"));
    let x = &a.body;
    assert!(x.starts_with("<?xml"));
    assert!(x.contains("<emailProvider id=\"mail.example.test\">"), "{x}");
    assert!(x.contains("<domain>example.test</domain>"), "{x}");
    assert_eq!(x.matches("<hostname>mail.example.test</hostname>").count(), 2, "{x}");
    let incoming = between(x, "<incomingServer type=\"imap\">", "</incomingServer>").unwrap();
    assert!(incoming.contains("<port>993</port>") && incoming.contains("<socketType>SSL</socketType>"), "{x}");
    let outgoing = between(x, "<outgoingServer type=\"smtp\">", "</outgoingServer>").unwrap();
    assert!(outgoing.contains("<port>465</port>") && outgoing.contains("<socketType>SSL</socketType>"), "{x}");
    assert!(x.contains("<username>%EMAILADDRESS%</username>"));
    assert!(x.contains("https://mail.example.test/app-passwords"));

    // Only STARTTLS for submission: port 587 with STARTTLS.
    let cfg = format!("{CONFIG}\n[smtp]\nlisten_tls = []\nlisten_starttls = [\"0.0.0.0:587\"]");
    let env = Env::with_config(&cfg);
    let x = env.client().get("/mail/config-v1.1.xml").await.body;
    let outgoing = between(&x, "<outgoingServer type=\"smtp\">", "</outgoingServer>").unwrap();
    assert!(outgoing.contains("<port>587</port>") && outgoing.contains("<socketType>STARTTLS</socketType>"), "{x}");
    // Defaults: the embedded loopback ports.
    let x = Env::new().client().get("/mail/config-v1.1.xml").await.body;
    assert!(x.contains("<port>9993</port>") && x.contains("<port>9465</port>"), "{x}");
}

#[tokio::test]
async fn autoconfig_with_only_imap_starttls() {
    let cfg = format!("{CONFIG}\n[imap]\nlisten_tls = []\nlisten_starttls = [\"0.0.0.0:143\"]");
    let env = Env::with_config(&cfg);
    let x = env.client().get("/mail/config-v1.1.xml").await.body;
    let incoming = between(&x, "<incomingServer type=\"imap\">", "</incomingServer>").unwrap();
    assert!(incoming.contains("<port>143</port>"), "{x}");
    assert!(incoming.contains("<socketType>STARTTLS</socketType>"), "{x}");
}

#[tokio::test]
async fn single_factor_account_password_needs_fifteen_characters() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let fourteen = "fourteen chars";
    assert_eq!(fourteen.chars().count(), 14);
    let r = c.post("/password", &[("new", fourteen), ("again", fourteen)]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "location {:?}", r.location());
    assert!(password::verify(PW.as_bytes(), &env.account(ALICE).password_hash.unwrap()));
}

/// A distinct address for each `n` (no two in one client key).
fn nth_address(n: usize) -> std::net::IpAddr {
    std::net::IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8])
}

#[test]
fn a_flood_of_sign_in_page_visits_never_locks_anyone_out() {
    use super::session::{MAX_ANONYMOUS, Stage};
    let s = WebSessions::default();
    let signed = s.create(1, nth_address(0)).unwrap();
    s.with(&signed, 1, |x| x.stage = Stage::SignedIn { username: "a@x".into(), auth_at: 1 });
    // From as many addresses as there are visits: only the cap in all applies.
    let flood: Vec<String> = (0..(MAX_ANONYMOUS + 50))
        .map(|n| s.create(2 + n as u64 / 1000, nth_address(n)).unwrap_or_else(|| panic!("visit {n} got no session")))
        .collect();
    assert!(s.with(&signed, 30, |x| x.stage.clone()).is_some(), "a signed-in session was dropped");
    let live = flood.iter().filter(|id| s.with(id, 30, |_| ()).is_some()).count();
    assert_eq!(live, MAX_ANONYMOUS, "the cap on anonymous sessions in all does not hold");
    let fresh = s.create(40, nth_address(1)).unwrap();
    assert!(s.with(&fresh, 40, |_| ()).is_some());
}

/// Issue 13 item 9: 200,000 visits at 2,300/s from one address used to push out, once
/// past the cap of all anonymous sessions, a visitor from another address who took 20 s
/// to type. Now the flood only pushes out its own sessions.
#[test]
fn a_flood_from_one_address_never_pushes_out_a_visitor_from_another() {
    use super::session::{MAX_ANONYMOUS, MAX_ANONYMOUS_PER_CLIENT, Stage};
    let s = WebSessions::default();
    let t = 1_000;
    let visitor = s.create(t, "198.51.100.7".parse().unwrap()).unwrap();
    // The IPv4-mapped form is the same client as the flooding address.
    let flooder: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let mapped: std::net::IpAddr = "::ffff:203.0.113.9".parse().unwrap();
    let flood: Vec<String> = (0..MAX_ANONYMOUS + 50)
        .map(|n| s.create(t + n as u64 / 2300, if n % 2 == 0 { flooder } else { mapped }).unwrap())
        .collect();
    // 20 s of typing later the visitor's session is there, still anonymous.
    let now = t + (MAX_ANONYMOUS as u64 + 50) / 2300 + 20;
    assert_eq!(s.with(&visitor, now, |x| x.stage.clone()), Some(Stage::Anonymous), "the visitor was pushed out");
    let live = flood.iter().filter(|id| s.with(id, now, |_| ()).is_some()).count();
    assert_eq!(live, MAX_ANONYMOUS_PER_CLIENT, "the flooding address kept more than its cap");
    // The cap in all: `a_flood_of_sign_in_page_visits_never_locks_anyone_out`.
}

#[test]
fn web_sessions_in_memory_pass_the_store_suite() {
    let s = WebSessions::default();
    crate::store::conformance::web_sessions(&s, &s);
    crate::store::conformance::anonymous_web_sessions_are_capped_per_client(&s, &s);
}

// ---------------------------------------------------------------------------------------
// Issue 15 item 4: the web step without rough edges

/// The security notice on an account page, if there is one.
fn security_notice(body: &str) -> Option<String> {
    between(body, "id=\"security-notice\">", "</section>")
}

/// A client at `ip`.
fn client_at(env: &Env, ip: [u8; 4]) -> Client {
    let mut c = env.client();
    c.ip = Some(std::net::IpAddr::from(ip));
    c
}

/// Password right, then `wrong` wrong TOTP codes; the sign-in is left pending.
async fn wrong_codes(c: &mut Client, wrong: usize) {
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    for _ in 0..wrong {
        let r = c.post("/login/totp", &[("code", &bad_code(SECRET, T0))]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    }
}

#[tokio::test]
async fn security_notice_names_time_and_address_and_goes_away_once_dismissed() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let mut attacker = client_at(&env, [203, 0, 113, 5]);
    wrong_codes(&mut attacker, 1).await;
    env.clock.advance(60);
    let mut owner = client_at(&env, [198, 51, 100, 1]);
    owner.sign_in_2fa(ALICE, PW, &code(SECRET, env.now())).await;
    let page = owner.get("/app-passwords").await;
    let notice = security_notice(&page.body).unwrap_or_else(|| panic!("no security notice: {}", page.body));
    assert!(notice.contains(&format!("{}: a wrong 6-digit code, from 203.0.113.5", fmt_time(T0))), "{notice}");
    assert!(notice.contains("href=\"/password\""), "{notice}");
    // It stays until it is dismissed …
    let page = owner.get("/app-passwords").await;
    assert!(security_notice(&page.body).is_some());
    let seen = between(&page.body, "name=\"seen\" value=\"", "\"").unwrap();
    assert_eq!(seen, T0.to_string());
    // … with the page's token: a forged dismissal changes nothing.
    let r = owner.post_raw("/security-notice", &[("seen", &seen)], &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(security_notice(&owner.get("/app-passwords").await.body).is_some());
    owner.post("/security-notice", &[("seen", &seen)]).await.assert_redirect("/app-passwords");
    assert!(security_notice(&owner.get("/app-passwords").await.body).is_none(), "dismissed");
    assert!(env.store.recent_audit(ALICE, 10).unwrap().iter().any(|e| e.kind == "security_notice_seen"));
    // Stored: another sign-in (another browser, later) does not see it either.
    env.clock.advance(30);
    let mut other = client_at(&env, [198, 51, 100, 2]);
    other.sign_in_2fa(ALICE, PW, &code(SECRET, env.now())).await;
    assert!(security_notice(&other.get("/app-passwords").await.body).is_none(), "came back");
    // A newer wrong code brings it back, with that code only.
    env.clock.advance(60);
    let again = env.now();
    wrong_codes(&mut attacker, 1).await;
    let notice = security_notice(&owner.get("/app-passwords").await.body).unwrap();
    assert!(notice.contains(&format!("{}: a wrong 6-digit code, from 203.0.113.5", fmt_time(again))));
    assert!(!notice.contains(&fmt_time(T0)), "{notice}");
}

#[tokio::test]
async fn own_wrong_codes_in_a_sign_in_that_then_succeeds_are_no_security_notice() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let home = [192, 0, 2, 10];
    // A typo, then the right code: the person's own, no notice.
    let mut c = client_at(&env, home);
    wrong_codes(&mut c, 1).await;
    c.post("/login/totp", &[("code", &code(SECRET, env.now()))]).await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    assert!(security_notice(&page.body).is_none(), "own typo shown: {}", page.body);
    // A sign-in from the same address that gave up after a wrong code is shown; the next
    // sign-in's own two typos are not.
    env.clock.advance(60);
    let gave_up = env.now();
    wrong_codes(&mut client_at(&env, home), 1).await;
    env.clock.advance(30);
    let mut d = client_at(&env, home);
    wrong_codes(&mut d, 2).await;
    d.post("/login/totp", &[("code", &code(SECRET, env.now()))]).await.assert_redirect("/app-passwords");
    let notice = security_notice(&d.get("/app-passwords").await.body).unwrap();
    assert_eq!(notice.matches("<li>").count(), 1, "{notice}");
    assert!(notice.contains(&format!("{}: a wrong 6-digit code, from 192.0.2.10", fmt_time(gave_up))));
    // A backup-code sign-in after a wrong TOTP code: the typo is its own too.
    let codes = env.give_backup_codes(ALICE);
    let seen = between(&d.get("/app-passwords").await.body, "name=\"seen\" value=\"", "\"").unwrap();
    d.post("/security-notice", &[("seen", &seen)]).await.assert_redirect("/app-passwords");
    env.clock.advance(60);
    let mut e = client_at(&env, home);
    wrong_codes(&mut e, 1).await;
    e.post("/login/backup", &[("code", &codes[0])]).await.assert_redirect("/app-passwords");
    assert!(security_notice(&e.get("/app-passwords").await.body).is_none());
}

#[tokio::test]
async fn turning_2fa_on_says_it_is_on_and_that_account_password_mail_apps_stop_now() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/two-factor").await;
    let secret = secret_on(&page.body);
    let r = c.post("/two-factor", &[("code", &code(&secret, T0))]).await;
    r.assert_ok();
    assert!(r.body.contains("<h1>Two-step verification is on</h1>"), "{}", r.body);
    assert!(r.body.contains("Mail apps that use your account password stop working now."), "{}", r.body);
    assert!(r.body.contains("<title>Two-step verification is on · "), "{}", r.body);
    assert_eq!(codes_on(&r.body).len(), 10);
    // A new set later is only that.
    let r = c.post("/backup-codes", &[]).await;
    r.assert_ok();
    assert!(r.body.contains("<h1>Your new backup codes</h1>") && !r.body.contains("stop working now"), "{}", r.body);
}

#[tokio::test]
async fn turning_2fa_off_and_new_backup_codes_ask_first() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let codes = env.give_backup_codes(ALICE);
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    let page = c.get("/app-passwords").await;
    // The account page only links to the questions; no form there acts on one click.
    assert!(!page.body.contains("action=\"/two-factor/disable\"") && !page.body.contains("action=\"/backup-codes\""));
    assert!(page.body.contains("href=\"/two-factor/disable\"") && page.body.contains("href=\"/backup-codes\""));
    let before = env.account(ALICE);

    let ask = c.get("/backup-codes").await;
    ask.assert_ok();
    assert!(ask.body.contains("<h1>Make new backup codes?</h1>"), "{}", ask.body);
    assert!(ask.body.contains("Your 10 remaining backup codes stop working at once."), "{}", ask.body);
    assert!(ask.body.contains("action=\"/backup-codes\"") && ask.body.contains("href=\"/app-passwords\">Cancel"));
    let ask = c.get("/two-factor/disable").await;
    ask.assert_ok();
    assert!(ask.body.contains("<h1>Turn off two-step verification?</h1>"), "{}", ask.body);
    assert!(ask.body.contains("codes and your 10 backup codes stop working"), "{}", ask.body);
    assert!(ask.body.contains("action=\"/two-factor/disable\"") && ask.body.contains("href=\"/app-passwords\">Cancel"));
    // Asking changed nothing.
    let a = env.account(ALICE);
    assert!(a.totp.is_some() && a.second_factor_required);
    assert_eq!(a.backup_codes.unwrap().hashes, before.backup_codes.unwrap().hashes);
    let mut d = env.client();
    d.login(ALICE, PW).await.assert_redirect("/login/totp");
    d.post("/login/backup", &[("code", &codes[0])]).await.assert_redirect("/app-passwords");

    // The question's own button does it.
    c.post("/two-factor/disable", &[]).await.assert_redirect("/app-passwords");
    assert!(!env.account(ALICE).has_second_factor());
    // With 2FA off there is nothing to ask about.
    c.get("/two-factor/disable").await.assert_redirect("/app-passwords");
    c.get("/backup-codes").await.assert_redirect("/app-passwords");
    // The questions need a recent sign-in, like the changes.
    env.add_user(BOB, PW, true);
    let mut b = env.client();
    b.sign_in_2fa(BOB, PW, &code(SECRET, T0 + 30)).await;
    env.clock.advance(601);
    b.get("/backup-codes").await.assert_redirect("/login");
}

#[tokio::test]
async fn the_enrolment_page_reads_in_the_order_of_its_steps() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/two-factor").await;
    let b = &page.body;
    let at = |s: &str| b.find(s).unwrap_or_else(|| panic!("{s} missing: {b}"));
    // Step 1 holds the QR code, step 2 the key, step 3 the form.
    assert!(at("id=\"step-scan\"") < at("<svg") && at("<svg") < at("id=\"step-key\""), "{b}");
    assert!(at("id=\"step-key\"") < at("id=\"totp-secret\"") && at("id=\"totp-secret\"") < at("id=\"step-code\""));
    assert!(at("id=\"step-code\"") < at("action=\"/two-factor\""), "{b}");
}

#[tokio::test]
async fn the_second_step_names_the_account_and_cancel_ends_the_pending_sign_in() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let mut c = env.client();
    c.login(ALICE, PW).await.assert_redirect("/login/totp");
    for path in ["/login/totp", "/login/backup"] {
        let page = c.get(path).await;
        assert!(page.body.contains(&format!("Signing in as <strong>{ALICE}</strong>")), "{path}: {}", page.body);
        assert!(page.body.contains("action=\"/login/cancel\""), "{path}: {}", page.body);
    }
    let r = c.post("/login/totp", &[("code", &bad_code(SECRET, T0))]).await;
    assert!(r.body.contains(&format!("Signing in as <strong>{ALICE}</strong>")), "{}", r.body);
    // Cancel needs the token, like every form.
    let r = c.post_raw("/login/cancel", &[], &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    c.get("/login/totp").await.assert_ok();
    let id = c.cookie.clone().unwrap();
    let r = c.post("/login/cancel", &[]).await;
    r.assert_redirect("/login?cancelled");
    assert!(r.session_set_cookie().unwrap().contains("Max-Age=0"));
    assert!(env.web.web_sessions.with(&id, env.now(), |_| ()).is_none(), "the pending sign-in is gone");
    let mut old = env.client();
    old.cookie = Some(id);
    old.post("/login/totp", &[("code", &code(SECRET, T0))]).await.assert_redirect("/login");
    let page = c.get("/login?cancelled").await;
    assert!(page.body.contains("The sign-in was cancelled."), "{}", page.body);
    assert_eq!(env.account(ALICE).totp.unwrap().last_step, 0, "no code was accepted");
}

#[tokio::test]
async fn sign_out_lands_on_the_sign_in_page_saying_so() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let r = c.post("/logout", &[]).await;
    let page = c.get(r.location()).await;
    page.assert_ok();
    assert!(page.body.contains("<h1>Sign in</h1>"), "{}", page.body);
    assert!(page.body.contains("<p class=\"notice\" role=\"status\">You are signed out.</p>"), "{}", page.body);
    // Only that fixed text comes from the address.
    let page = c.get("/login?You+were+hacked").await;
    assert!(!page.body.contains("class=\"notice\"") && !page.body.contains("hacked"), "{}", page.body);
}

#[tokio::test]
async fn the_organisation_heads_every_page_and_title() {
    let env = Env::with_config(&format!("{CONFIG}\n[web]\norganisation = \"Example & Co Mail\""));
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let page = c.get("/login").await;
    assert!(page.body.contains("<title>Sign in · Example &#38; Co Mail</title>"), "{}", page.body);
    assert!(page.body.contains("<span class=\"brand\">Example &#38; Co Mail</span>"), "{}", page.body);
    c.sign_in(ALICE, PW).await;
    for path in ["/app-passwords", "/two-factor", "/password"] {
        let page = c.get(path).await;
        assert!(page.body.contains(" · Example &#38; Co Mail</title>"), "{path}: {}", page.body);
        assert!(page.body.contains("<span class=\"brand\">Example &#38; Co Mail</span>"), "{path}");
    }
    // Mail apps still get the host name.
    let r = c.post("/app-passwords", &[("label", "Phone"), ("scope_imap", "1")]).await;
    assert!(r.body.contains(&format!("<dd>{HOST}, port 9993, SSL/TLS</dd>")), "{}", r.body);
    // Without the setting: the host name.
    let page = Env::new().client().get("/login").await;
    assert!(page.body.contains(&format!("<title>Sign in · {HOST}</title>")), "{}", page.body);
}

#[tokio::test]
async fn the_settings_for_a_new_app_password_match_what_it_may_do() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let imap_only = c.post("/app-passwords", &[("label", "Reader"), ("scope_imap", "1")]).await;
    imap_only.assert_ok();
    assert!(imap_only.body.contains("Incoming mail (IMAP)"), "{}", imap_only.body);
    assert!(!imap_only.body.contains("Outgoing mail (SMTP)") && !imap_only.body.contains("9465"), "{}", imap_only.body);
    assert!(imap_only.body.contains("It can only read mail (IMAP); it cannot send."), "{}", imap_only.body);
    let smtp_only = c.post("/app-passwords", &[("label", "Printer"), ("scope_smtp", "1")]).await;
    smtp_only.assert_ok();
    assert!(smtp_only.body.contains("Outgoing mail (SMTP)") && !smtp_only.body.contains("Incoming mail (IMAP)"));
    assert!(smtp_only.body.contains("It can only send mail (SMTP); it cannot read."), "{}", smtp_only.body);
    let both = c.post("/app-passwords", &[("label", "Laptop"), ("scope_imap", "1"), ("scope_smtp", "1")]).await;
    assert!(both.body.contains("Incoming mail (IMAP)") && both.body.contains("Outgoing mail (SMTP)"));
    assert!(both.body.contains("It can read and send mail."), "{}", both.body);
}

#[tokio::test]
async fn devices_using_the_account_password_are_not_listed_while_2fa_is_off() {
    let env = Env::new();
    env.add_user(ALICE, PW, true);
    let refusal = |at: u64| AuditEvent {
        at,
        username: ALICE.into(),
        kind: "account_password_refused_2fa".into(),
        detail: "198.51.100.4 via IMAP (Thunderbird)".into(),
    };
    env.store.append_audit(&refusal(T0)).unwrap();
    let mut c = env.client();
    c.sign_in_2fa(ALICE, PW, &code(SECRET, T0)).await;
    assert!(c.get("/app-passwords").await.body.contains("Devices still using your account password"));
    c.post("/two-factor/disable", &[]).await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    assert!(!page.body.contains("Devices still using your account password"), "{}", page.body);
    assert!(!page.body.contains("198.51.100.4"), "{}", page.body);
    // On again later: refusals from before do not come back; new ones are listed.
    env.clock.advance(120);
    c.enrol(env.now()).await;
    assert!(!c.get("/app-passwords").await.body.contains("Devices still using your account password"));
    env.store.append_audit(&refusal(env.now())).unwrap();
    assert!(c.get("/app-passwords").await.body.contains("Devices still using your account password"));
}

#[tokio::test]
async fn counts_of_one_are_singular() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let (id, _) = env.app_password(ALICE, "phone");
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let _live = env.web.live.register(ALICE, Some(&id));
    c.post(&format!("/app-passwords/{id}/revoke"), &[]).await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    assert!(
        page.body.contains("“phone” is revoked and can no longer sign in. The connection that used it was closed."),
        "{}",
        page.body
    );
    assert!(!page.body.contains("1 of its connections were"), "{}", page.body);
    let (id, _) = env.app_password(ALICE, "tablet");
    c.post(&format!("/app-passwords/{id}/revoke"), &[]).await;
    assert!(c.get("/app-passwords").await.body.contains("“tablet” is revoked and can no longer sign in.</p>"));

    // One app password revoked with a password change.
    env.app_password(ALICE, "laptop");
    let new = "a completely new password";
    c.post("/password", &[("new", new), ("again", new), ("revoke_all", "1")]).await.assert_redirect("/app-passwords");
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Your password is changed and your app password is revoked."), "{}", page.body);

    // One backup code left, and none.
    env.add_user(BOB, PW, true);
    let codes = env.give_backup_codes(BOB);
    env.store
        .update_account(BOB, &mut |a: &mut Account| {
            let set = a.backup_codes.as_mut().unwrap();
            for h in set.hashes.iter_mut().skip(2) {
                h.clear();
            }
            Ok(())
        })
        .unwrap();
    for (code, says) in [
        (&codes[0], "You signed in with a backup code. 1 backup code is left."),
        (&codes[1], "You signed in with your last backup code. Make new backup codes below."),
    ] {
        let mut b = env.client();
        b.login(BOB, PW).await.assert_redirect("/login/totp");
        b.post("/login/backup", &[("code", code)]).await.assert_redirect("/app-passwords");
        let page = b.get("/app-passwords").await;
        assert!(page.body.contains(says), "{}", page.body);
    }
    // Asking before a new set names one code as one.
    let mut b = env.client();
    b.sign_in_2fa(BOB, PW, &code(SECRET, T0)).await;
    env.store
        .update_account(BOB, &mut |a: &mut Account| {
            a.backup_codes.as_mut().unwrap().hashes[0] = "x".into();
            Ok(())
        })
        .unwrap();
    assert!(b.get("/backup-codes").await.body.contains("Your 1 remaining backup code stops working at once."));
}

#[tokio::test]
async fn a_refused_new_app_password_keeps_what_was_typed() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    // No scope ticked.
    let r = c.post("/app-passwords", &[("label", "Phone in the kitchen")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "location {:?}", r.location());
    assert!(r.body.contains("value=\"Phone in the kitchen\""), "name field cleared: {}", r.body);
    assert!(r.body.contains("id=\"scope-error\">Choose what the app password may be used for"), "{}", r.body);
    assert!(r.body.contains(r#"name="scope_imap" value="1">"#) && r.body.contains(r#"name="scope_smtp" value="1">"#));
    // The same name twice: the name and the scopes as sent.
    c.post("/app-passwords", &[("label", "Laptop"), ("scope_imap", "1"), ("scope_smtp", "1")]).await.assert_ok();
    let r = c.post("/app-passwords", &[("label", "laptop"), ("scope_smtp", "1")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("value=\"laptop\" aria-invalid=\"true\""), "{}", r.body);
    assert!(
        r.body.contains(r#"name="scope_imap" value="1">"#)
            && r.body.contains(r#"name="scope_smtp" value="1" checked>"#)
    );
    assert_eq!(env.app_password_count(ALICE), 1);
}

// ---------------------------------------------------------------------------------------
// POP3 and ManageSieve scopes (issue 17 points 3 and 5)

/// POP3 on with both listeners and ManageSieve on, on the usual ports.
const POP3_AND_SIEVE: &str = "[pop3]\nlisten_tls = [\"0.0.0.0:995\"]\nlisten_starttls = [\"0.0.0.0:110\"]\n[upstream.pop3]\n[sieve]\nlisten = [\"0.0.0.0:4190\"]\n[upstream.sieve]\n";
/// POP3 on with its STLS listener only; ManageSieve off.
const POP3_STLS_ONLY: &str = "[pop3]\nlisten_tls = []\nlisten_starttls = [\"0.0.0.0:110\"]\n[upstream.pop3]\n";

/// An environment with `extra` sections after [`CONFIG`], and Alice signed in.
async fn signed_in_with(extra: &str) -> (Env, Client) {
    let env = Env::with_config(&format!("{CONFIG}\n{extra}"));
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    (env, c)
}

/// The checkbox of `scope` on the page: `Some(ticked)`, or `None` when it is not offered.
fn scope_box(body: &str, scope: &str) -> Option<bool> {
    let tag = between(body, &format!(r#"name="scope_{scope}" value="1""#), ">")?;
    Some(tag.contains("checked"))
}

#[tokio::test]
async fn pop3_and_sieve_are_offered_only_when_their_protocol_is_on() {
    // Both off (the default): IMAP and SMTP only, both ticked.
    let (_env, mut c) = signed_in_with("").await;
    let page = c.get("/app-passwords").await;
    page.assert_ok();
    assert_eq!(scope_box(&page.body, "imap"), Some(true), "{}", page.body);
    assert_eq!(scope_box(&page.body, "smtp"), Some(true));
    assert_eq!((scope_box(&page.body, "pop3"), scope_box(&page.body, "sieve")), (None, None), "{}", page.body);
    assert!(!page.body.contains("POP3") && !page.body.contains("ManageSieve"), "{}", page.body);
    // POP3 on, ManageSieve off: the POP3 box, not ticked (asked for, not given).
    let (_env, mut c) = signed_in_with(POP3_STLS_ONLY).await;
    let page = c.get("/app-passwords").await;
    assert_eq!(scope_box(&page.body, "pop3"), Some(false), "{}", page.body);
    assert_eq!(scope_box(&page.body, "sieve"), None, "{}", page.body);
    assert!(page.body.contains("> Downloading mail (POP3)</label>"), "{}", page.body);
    // Both on.
    let (_env, mut c) = signed_in_with(POP3_AND_SIEVE).await;
    let page = c.get("/app-passwords").await;
    assert_eq!(scope_box(&page.body, "pop3"), Some(false), "{}", page.body);
    assert_eq!(scope_box(&page.body, "sieve"), Some(false), "{}", page.body);
    assert!(page.body.contains("> Sieve filters (ManageSieve)</label>"), "{}", page.body);
    // Nothing ticked: the message fits the four choices.
    let r = c.post("/app-passwords", &[("label", "Nothing")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("Choose what the app password may be used for: tick at least one."), "{}", r.body);
}

#[tokio::test]
async fn a_scope_whose_protocol_is_off_is_refused_and_the_form_kept() {
    let (env, mut c) = signed_in_with("").await;
    let r = c.post("/app-passwords", &[("label", "Old phone"), ("scope_imap", "1"), ("scope_pop3", "1")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "location {:?}", r.location());
    assert!(
        r.body
            .contains("id=\"scope-error\">This server does not offer POP3, so an app password cannot be made for it."),
        "{}",
        r.body
    );
    assert!(r.body.contains("value=\"Old phone\""), "name field cleared: {}", r.body);
    assert_eq!((scope_box(&r.body, "imap"), scope_box(&r.body, "smtp")), (Some(true), Some(false)), "{}", r.body);
    assert_eq!(scope_box(&r.body, "pop3"), None, "an off protocol's box came back: {}", r.body);
    let r = c.post("/app-passwords", &[("label", "Old phone"), ("scope_sieve", "1"), ("scope_pop3", "1")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("This server does not offer POP3 or ManageSieve,"), "{}", r.body);
    assert_eq!(env.app_password_count(ALICE), 0);
    // POP3 on, ManageSieve off: only ManageSieve is refused; the POP3 tick is kept.
    let (env, mut c) = signed_in_with(POP3_STLS_ONLY).await;
    let r = c.post("/app-passwords", &[("label", "Filters"), ("scope_pop3", "1"), ("scope_sieve", "1")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.body.contains("This server does not offer ManageSieve,"), "{}", r.body);
    assert_eq!(scope_box(&r.body, "pop3"), Some(true), "{}", r.body);
    assert_eq!(env.app_password_count(ALICE), 0);
    // The form as it came back is accepted.
    c.post("/app-passwords", &[("label", "Filters"), ("scope_pop3", "1")]).await.assert_ok();
    assert_eq!(env.store.list_app_passwords(ALICE).unwrap()[0].scopes, vec![Scope::Pop3]);
}

#[tokio::test]
async fn the_settings_for_pop3_and_sieve_app_passwords_and_their_list_entry() {
    let (env, mut c) = signed_in_with(POP3_AND_SIEVE).await;
    let all =
        [("label", "Laptop"), ("scope_imap", "1"), ("scope_smtp", "1"), ("scope_pop3", "1"), ("scope_sieve", "1")];
    let r = c.post("/app-passwords", &all).await;
    r.assert_ok();
    let b = &r.body;
    assert!(b.contains(&format!("<dt>Incoming mail (IMAP)</dt><dd>{HOST}, port 9993, SSL/TLS</dd>")), "{b}");
    assert!(
        b.contains(&format!("<dt>Incoming mail (POP3)</dt><dd>{HOST}, port 995, SSL/TLS; or port 110, STARTTLS</dd>")),
        "{b}"
    );
    assert!(b.contains(&format!("<dt>Outgoing mail (SMTP)</dt><dd>{HOST}, port 9465, SSL/TLS</dd>")), "{b}");
    assert!(b.contains(&format!("<dt>Mail filters (ManageSieve)</dt><dd>{HOST}, port 4190, STARTTLS</dd>")), "{b}");
    assert!(
        b.contains(
            "It can read mail (IMAP), send mail (SMTP), download mail (POP3) and change mail filters (ManageSieve)."
        ),
        "{b}"
    );
    let rec = env.store.list_app_passwords(ALICE).unwrap().remove(0);
    assert_eq!(rec.scopes, Scope::ALL.to_vec());

    // Exactly the scopes' settings: POP3 alone, ManageSieve alone.
    let r = c.post("/app-passwords", &[("label", "Old phone"), ("scope_pop3", "1")]).await;
    r.assert_ok();
    assert!(
        r.body.contains("Incoming mail (POP3)") && r.body.contains("It can only download mail (POP3); it cannot send.")
    );
    for other in ["Incoming mail (IMAP)", "Outgoing mail (SMTP)", "Mail filters (ManageSieve)", "4190"] {
        assert!(!r.body.contains(other), "{other}: {}", r.body);
    }
    let r = c.post("/app-passwords", &[("label", "Filter editor"), ("scope_sieve", "1")]).await;
    r.assert_ok();
    assert!(r.body.contains("Mail filters (ManageSieve)"), "{}", r.body);
    assert!(
        r.body.contains("It can only change mail filters (ManageSieve); it cannot read or send mail."),
        "{}",
        r.body
    );
    for other in ["Incoming mail (IMAP)", "Incoming mail (POP3)", "Outgoing mail (SMTP)"] {
        assert!(!r.body.contains(other), "{other}: {}", r.body);
    }
    // The list names the scopes and each protocol's last use readably.
    for (protocol, ip) in [(Scope::Pop3, "192.0.2.8"), (Scope::Sieve, "192.0.2.9")] {
        let used = LastUse { at: T0, ip: ip.into(), client: None, protocol: Some(protocol) };
        env.store.record_app_password_use(&rec.id, &used).unwrap();
    }
    let page = c.get("/app-passwords").await;
    let when = fmt_time(T0);
    assert!(page.body.contains("<td>Laptop</td><td>IMAP, SMTP, POP3, ManageSieve</td>"), "{}", page.body);
    assert!(
        page.body.contains(&format!("<td>POP3 {when} from 192.0.2.8; ManageSieve {when} from 192.0.2.9</td>")),
        "{}",
        page.body
    );
    assert!(page.body.contains("<td>Old phone</td><td>POP3</td>"), "{}", page.body);

    // POP3 with its STLS listener only: that one port.
    let (_env, mut c) = signed_in_with(POP3_STLS_ONLY).await;
    let r = c.post("/app-passwords", &[("label", "Old phone"), ("scope_pop3", "1")]).await;
    assert!(r.body.contains(&format!("<dd>{HOST}, port 110, STARTTLS</dd>")), "{}", r.body);
}

/// The elements of an XML document nest and close (no attributes with `>` in them, no
/// comments: what autoconfig writes); `Err` names the first mismatch.
fn xml_nests(xml: &str) -> Result<(), String> {
    let body = xml.strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>").ok_or("no XML declaration")?;
    let mut open: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').ok_or("an unclosed tag")? + start;
        let tag = &rest[start + 1..end];
        let name = tag.trim_start_matches('/').split_whitespace().next().unwrap_or("").to_string();
        if tag.starts_with('/') {
            let top = open.pop();
            if top.as_deref() != Some(&name) {
                return Err(format!("</{name}> closes {top:?}"));
            }
        } else if !tag.ends_with('/') {
            open.push(name);
        }
        rest = &rest[end + 1..];
    }
    if open.is_empty() { Ok(()) } else { Err(format!("left open: {open:?}")) }
}

#[tokio::test]
async fn autoconfig_lists_pop3_after_imap_only_when_pop3_is_on() {
    // Off: no POP3 entry.
    let x = Env::new().client().get("/mail/config-v1.1.xml").await.body;
    assert!(!x.contains("pop3"), "{x}");
    xml_nests(&x).unwrap();
    // On with both listeners: implicit TLS first, then STLS, after IMAP and before SMTP.
    let env = Env::with_config(&format!("{CONFIG}\n{POP3_AND_SIEVE}"));
    let x = env.client().get("/mail/config-v1.1.xml").await.body;
    xml_nests(&x).unwrap_or_else(|e| panic!("{e}: {x}"));
    let (imap, pop3, smtp) = (
        x.find("<incomingServer type=\"imap\">").unwrap(),
        x.find("<incomingServer type=\"pop3\">").unwrap(),
        x.find("<outgoingServer type=\"smtp\">").unwrap(),
    );
    assert!(imap < pop3 && pop3 < smtp, "{x}");
    let entries: Vec<&str> = x.split("<incomingServer type=\"pop3\">").skip(1).collect();
    assert_eq!(entries.len(), 2, "{x}");
    for (entry, (port, socket)) in entries.iter().zip([(995, "SSL"), (110, "STARTTLS")]) {
        let entry = &entry[..entry.find("</incomingServer>").unwrap()];
        assert!(entry.contains(&format!("<hostname>{HOST}</hostname>")), "{x}");
        assert!(entry.contains(&format!("<port>{port}</port>")), "{x}");
        assert!(entry.contains(&format!("<socketType>{socket}</socketType>")), "{x}");
        assert!(entry.contains("<authentication>password-cleartext</authentication>"), "{x}");
        assert!(entry.contains("<username>%EMAILADDRESS%</username>"), "{x}");
    }
    assert!(!x.to_lowercase().contains("sieve"), "the format has no ManageSieve entry: {x}");
    // STLS only: one entry.
    let env = Env::with_config(&format!("{CONFIG}\n{POP3_STLS_ONLY}"));
    let x = env.client().get("/mail/config-v1.1.xml").await.body;
    xml_nests(&x).unwrap_or_else(|e| panic!("{e}: {x}"));
    let pop3 = between(&x, "<incomingServer type=\"pop3\">", "</incomingServer>").unwrap();
    assert!(pop3.contains("<port>110</port>") && pop3.contains("<socketType>STARTTLS</socketType>"), "{x}");
    assert_eq!(x.matches("type=\"pop3\"").count(), 1, "{x}");
}

// ---------------------------------------------------------------------------------------
// One account service (issue 14 point 3): the CLI and the web make the same changes

/// What must be the same after the same change made through the CLI or the web: every
/// field of the account and of its app passwords, with secrets, hashes, ids and times
/// compared by presence and shape only (they must differ), and the account-change audit
/// events in order (their detail says who; sign-in events are the web's own).
fn stored_shape(store: &dyn Store, user: &str) -> serde_json::Value {
    const CHANGES: [&str; 9] = [
        "account_created",
        "account_password_changed",
        "totp_enabled",
        "totp_disabled",
        "backup_codes_generated",
        "backup_code_used",
        "app_password_created",
        "app_password_revoked",
        "account_unlocked",
    ];
    let a = store.get_account(user).unwrap().unwrap();
    let mut list = store.list_app_passwords(user).unwrap();
    // Made in the same second, they are listed by their random ids.
    list.sort_by(|x, y| x.label.cmp(&y.label));
    let apps: Vec<_> = list
        .iter()
        .map(|r| {
            serde_json::json!({
                "id_len": r.id.len(), "username": r.username, "label": r.label, "scopes": r.scopes,
                "argon2id": r.hash.starts_with("$argon2id$"), "created": r.created_at > 0,
                "last_used": r.last_used.is_some(),
            })
        })
        .collect();
    let mut audit: Vec<String> = store
        .recent_audit(user, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| CHANGES.contains(&k.as_str()))
        .collect();
    audit.reverse();
    serde_json::json!({
        "username": a.username,
        "addresses": a.addresses,
        "password_argon2id": a.password_hash.as_deref().map(|h| h.starts_with("$argon2id$")),
        "totp": a.totp.as_ref().map(|t| serde_json::json!({"sealed": !t.secret_enc.is_empty(), "enabled_at": t.enabled_at > 0})),
        "second_factor_required": a.second_factor_required,
        "backup_codes": a.backup_codes.as_ref().map(|c| serde_json::json!({
            "generated": c.generated_at > 0, "count": c.hashes.len(), "remaining": c.remaining(),
        })),
        "created": a.created_at > 0,
        "updated_not_before_created": a.updated_at >= a.created_at,
        "app_passwords": apps,
        "audit": audit,
    })
}

/// Each step's stored shape and whether the account password hash changed in it.
type Trail = Vec<(&'static str, serde_json::Value, bool)>;

fn record(trail: &mut Trail, store: &dyn Store, step: &'static str, last_hash: &mut Option<String>) {
    let hash = store.get_account(ALICE).unwrap().unwrap().password_hash;
    let changed = hash != *last_hash;
    *last_hash = hash;
    trail.push((step, stored_shape(store, ALICE), changed));
}

/// The sequence through the CLI path: `admin::execute`, as the binary runs it over the
/// admin socket or on the store. A backup code is spent by a sign-in, which the CLI does
/// not do: the account service call the web's backup-code sign-in makes.
async fn through_the_cli(env: &Env) -> Trail {
    let ctx = crate::admin::Context {
        store: env.store.clone(),
        key: env.web.key.clone(),
        issuer: HOST.into(),
        live: Some(env.web.live.clone()),
        hashing: None,
    };
    let run = |req: crate::admin::Request| {
        let out = crate::admin::execute(&ctx, req);
        assert!(out.ok, "{:?}", out.error);
        out
    };
    use crate::admin::Request as R;
    let (mut trail, mut hash) = (Trail::new(), None);
    let pw_hash = |pw: &str| password::hash(pw.as_bytes()).unwrap();
    let email = || ALICE.to_string();
    run(R::UserAdd { email: email(), addresses: vec![], password_hash: Some(pw_hash(PW)) });
    record(&mut trail, env.store.as_ref(), "create", &mut hash);
    run(R::UserPasswd { email: email(), password_hash: pw_hash("alice's second account password") });
    record(&mut trail, env.store.as_ref(), "set password", &mut hash);
    run(R::TotpEnable { email: email(), secret: None });
    record(&mut trail, env.store.as_ref(), "enrol TOTP", &mut hash);
    let out = run(R::BackupCodesRegenerate { email: email() });
    record(&mut trail, env.store.as_ref(), "regenerate backup codes", &mut hash);
    let code = SecretString::from(out.lines[1].clone());
    let owner = AccountService::new(env.store.clone(), env.web.key.clone(), HOST, Actor::Web);
    assert_eq!(owner.consume_backup_code(ALICE, &code, [192, 0, 2, 1].into()).await.unwrap(), 9);
    record(&mut trail, env.store.as_ref(), "use a backup code", &mut hash);
    let scopes = vec![Scope::Imap, Scope::Smtp];
    run(R::AppPasswordCreate { email: email(), label: "Laptop".into(), scopes, expires_at: None, allow: vec![] });
    run(R::AppPasswordCreate {
        email: email(),
        label: "Phone".into(),
        scopes: vec![Scope::Imap],
        expires_at: None,
        allow: vec![],
    });
    record(&mut trail, env.store.as_ref(), "create 2 app passwords", &mut hash);
    let phone = env.store.list_app_passwords(ALICE).unwrap().into_iter().find(|r| r.label == "Phone").unwrap();
    run(R::AppPasswordRevoke { email: email(), id: phone.id });
    record(&mut trail, env.store.as_ref(), "revoke one", &mut hash);
    run(R::TotpDisable { email: email() });
    record(&mut trail, env.store.as_ref(), "disable TOTP", &mut hash);
    run(R::UserUnlock { email: email() });
    record(&mut trail, env.store.as_ref(), "unlock", &mut hash);
    trail
}

/// The same sequence through the web step's pages (an account is made, and unlocked, by
/// an admin only: those two steps are the admin's service calls).
async fn through_the_web(env: &Env) -> Trail {
    let (mut trail, mut hash) = (Trail::new(), None);
    env.admin().create(ALICE, &[], Some(password::hash(PW.as_bytes()).unwrap())).unwrap();
    record(&mut trail, env.store.as_ref(), "create", &mut hash);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let pw2 = "alice's second account password";
    c.post("/password", &[("new", pw2), ("again", pw2)]).await.assert_redirect("/app-passwords");
    record(&mut trail, env.store.as_ref(), "set password", &mut hash);
    c.enrol(env.now()).await;
    record(&mut trail, env.store.as_ref(), "enrol TOTP", &mut hash);
    c.get("/backup-codes").await.assert_ok();
    let r = c.post("/backup-codes", &[]).await;
    r.assert_ok();
    let codes = codes_on(&r.body);
    record(&mut trail, env.store.as_ref(), "regenerate backup codes", &mut hash);
    let mut c = env.client();
    c.login(ALICE, pw2).await.assert_redirect("/login/totp");
    c.get("/login/backup").await.assert_ok();
    c.post("/login/backup", &[("code", &codes[0])]).await.assert_redirect("/app-passwords");
    record(&mut trail, env.store.as_ref(), "use a backup code", &mut hash);
    c.post("/app-passwords", &[("label", "Laptop"), ("scope_imap", "1"), ("scope_smtp", "1")]).await.assert_ok();
    c.get("/app-passwords").await.assert_ok();
    c.post("/app-passwords", &[("label", "Phone"), ("scope_imap", "1")]).await.assert_ok();
    record(&mut trail, env.store.as_ref(), "create 2 app passwords", &mut hash);
    let phone = env.store.list_app_passwords(ALICE).unwrap().into_iter().find(|r| r.label == "Phone").unwrap();
    c.get("/app-passwords").await.assert_ok();
    c.post(&format!("/app-passwords/{}/revoke", phone.id), &[]).await.assert_redirect("/app-passwords");
    record(&mut trail, env.store.as_ref(), "revoke one", &mut hash);
    c.get("/two-factor/disable").await.assert_ok();
    c.post("/two-factor/disable", &[]).await.assert_redirect("/app-passwords");
    record(&mut trail, env.store.as_ref(), "disable TOTP", &mut hash);
    env.admin().unlock(ALICE).unwrap();
    record(&mut trail, env.store.as_ref(), "unlock", &mut hash);
    trail
}

#[tokio::test]
async fn the_cli_and_the_web_make_the_same_changes() {
    let (cli_env, web_env) = (Env::new(), Env::new());
    let cli = through_the_cli(&cli_env).await;
    let web = through_the_web(&web_env).await;
    assert_eq!(cli.len(), web.len());
    for ((step, by_cli, cli_pw), (_, by_web, web_pw)) in cli.iter().zip(&web) {
        assert_eq!(by_cli, by_web, "after `{step}` the stored accounts differ\nCLI: {by_cli:#}\nweb: {by_web:#}");
        assert_eq!(cli_pw, web_pw, "after `{step}`: the password hash changed on one path only");
    }
    // And the changes were made: the last state, spelled out.
    let (_, last, _) = cli.last().unwrap();
    assert_eq!(last["totp"], serde_json::Value::Null);
    assert_eq!(last["backup_codes"], serde_json::Value::Null);
    assert_eq!(last["second_factor_required"], false);
    assert_eq!(last["app_passwords"].as_array().unwrap().len(), 1);
    assert_eq!(last["app_passwords"][0]["label"], "Laptop");
    let (_, used, _) = &cli[4];
    assert_eq!(used["backup_codes"]["remaining"], 9);
    assert_eq!(
        last["audit"],
        serde_json::json!([
            "account_created",
            "account_password_changed",
            "totp_enabled",
            "backup_codes_generated",
            "backup_code_used",
            "app_password_created",
            "app_password_created",
            "app_password_revoked",
            "totp_disabled",
            "account_unlocked"
        ])
    );
}

// ---------------------------------------------------------------------------------------
// /healthz

/// `/healthz` answers `200 ok` while the store answers, with no session cookie, no
/// sign-in and no detail; repeated polls (a load balancer's) keep answering.
#[tokio::test]
async fn healthz_is_ok_without_a_session_or_detail() {
    let env = Env::new();
    let mut c = env.client();
    for _ in 0..50 {
        let r = c.get("/healthz").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "ok\n");
        assert!(r.headers.get(header::SET_COOKIE).is_none(), "no session for a health check");
        assert_eq!(r.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    }
}

mod oauth;

/// Issue 18 points 2 and 3 on the web page: an app password made with an expiry and
/// networks shows them; a wrong network is refused with the form kept; a device unused
/// past the stale time is marked; without two-step verification the apps signing in with
/// the account password are listed as the ones that will need an app password.
#[tokio::test]
async fn limits_stale_devices_and_password_apps_on_the_account_page() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let r = c
        .post(
            "/app-passwords",
            &[("label", "Scanner"), ("scope_smtp", "1"), ("expires", "30d"), ("allow", "192.0.2.0/33")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("is not an IP address or network"), "{}", r.body);
    assert!(
        r.body.contains(r#"value="192.0.2.0/33""#) && r.body.contains(r#"<option value="30d" selected>"#),
        "{}",
        r.body
    );
    assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
    c.post(
        "/app-passwords",
        &[("label", "Scanner"), ("scope_smtp", "1"), ("expires", "30d"), ("allow", "192.0.2.0/24 198.51.100.7")],
    )
    .await
    .assert_ok();
    let rec = env.store.list_app_passwords(ALICE).unwrap().remove(0);
    assert_eq!(rec.expires_at, Some(env.now() + 30 * 86_400));
    assert_eq!(rec.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["192.0.2.0/24", "198.51.100.7/32"]);
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("only from 192.0.2.0/24, 198.51.100.7/32"), "{}", page.body);
    assert!(!page.body.contains("Not used for over"), "{}", page.body);
    let login = AuditEvent {
        at: env.now(),
        username: ALICE.into(),
        kind: "login".into(),
        detail: "203.0.113.5 via IMAP (K-9 Mail 6.8) with the account password".into(),
    };
    env.store.append_audit(&login).unwrap();
    env.clock.advance(91 * 86_400);
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Not used for over 90 days"), "{}", page.body);
    assert!(page.body.contains("Mail apps using your account password"), "{}", page.body);
    assert!(page.body.contains("203.0.113.5 via IMAP (K-9 Mail 6.8)"), "{}", page.body);
}

/// Issue 18 point 5 on the web step: with `[policy] require_second_factor`, an
/// un-enrolled account is sent to the enrolment at every sign-in; during the grace it may
/// wait ("Later", app passwords still made); after the date it may not make app passwords
/// until it has enrolled.
#[tokio::test]
async fn required_second_factor_sends_the_sign_in_to_the_enrolment() {
    // T0 is 2027-01-15.
    let env = Env::with_config(&format!(
        "{CONFIG}\n[policy]\nrequire_second_factor = [\"example.test\"]\ngrace_until = \"2027-02-01\"\n"
    ));
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.get("/login").await;
    let r = c.post("/login", &[("username", ALICE), ("password", PW)]).await;
    r.assert_redirect("/two-factor");
    let page = c.get("/two-factor").await;
    assert!(
        page.body.contains("requires two-step verification") && page.body.contains("until 2027-02-01"),
        "{}",
        page.body
    );
    assert!(page.body.contains(r#"<a href="/app-passwords">Later</a>"#), "{}", page.body);
    c.get("/app-passwords").await;
    c.post("/app-passwords", &[("label", "Phone"), ("scope_imap", "1")]).await.assert_ok();
    // After the date: no way around the enrolment.
    env.clock.advance(30 * 86_400);
    let mut c = env.client();
    c.get("/login").await;
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/two-factor");
    let page = c.get("/two-factor").await;
    assert!(page.body.contains("cannot sign in with your account password"), "{}", page.body);
    assert!(!page.body.contains(">Later<") && !page.body.contains(">Cancel<"), "{}", page.body);
    c.get("/app-passwords").await;
    c.post("/app-passwords", &[("label", "Laptop"), ("scope_imap", "1")]).await.assert_redirect("/two-factor");
    assert_eq!(env.store.list_app_passwords(ALICE).unwrap().len(), 1);
}

/// Issue 20 point 4 on the web page: the presets make narrow app passwords (read-only,
/// send only with a recipient list and a quota, some folders), the list says what each
/// may do, and a preset that cannot hold is refused with the form kept.
#[tokio::test]
async fn presets_make_narrow_app_passwords() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    c.post("/app-passwords", &[("label", "Backup"), ("preset", "read"), ("scope_smtp", "1")]).await.assert_ok();
    c.get("/app-passwords").await;
    c.post(
        "/app-passwords",
        &[("label", "Scanner"), ("preset", "send"), ("send_to", "office@example.test"), ("max_messages", "20")],
    )
    .await
    .assert_ok();
    c.get("/app-passwords").await;
    let r = c.post("/app-passwords", &[("label", "Tickets"), ("preset", "folder"), ("folders", "")]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("Name the folders") && r.body.contains(r#"value="folder" checked"#), "{}", r.body);
    c.post("/app-passwords", &[("label", "Tickets"), ("preset", "folder"), ("folders", "INBOX, Shared/Tickets")])
        .await
        .assert_ok();
    let recs = env.store.list_app_passwords(ALICE).unwrap();
    let by = |l: &str| recs.iter().find(|r| r.label == l).unwrap().clone();
    let backup = by("Backup");
    assert_eq!(backup.scopes, vec![Scope::Imap]);
    assert!(backup.narrow.as_ref().unwrap().read_only);
    let scanner = by("Scanner");
    assert_eq!(scanner.scopes, vec![Scope::Smtp]);
    let n = scanner.narrow.unwrap();
    assert_eq!((n.send_to, n.max_messages), (vec!["office@example.test".to_string()], Some(20)));
    assert_eq!(by("Tickets").narrow.unwrap().folders, vec!["INBOX", "Shared/Tickets"]);
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("read-only") && page.body.contains("at most 20 messages/hour"), "{}", page.body);
}

/// Issue 18 point 1 (Outlook): Autodiscover POX answers a POST like Outlook's with the
/// IMAP and SMTP settings of the config and the address as the login name; a body
/// without an address gets the settings without one, and a huge body is refused.
#[tokio::test]
async fn autodiscover_answers_outlook_with_the_settings() {
    let env = Env::with_config(&format!(
        "{CONFIG}\n[imap]\nlisten_tls = [\"127.0.0.1:993\"]\nlisten_starttls = []\n[smtp]\nlisten_tls = []\nlisten_starttls = [\"127.0.0.1:587\"]\n"
    ));
    let mut c = env.client();
    let request = r#"<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>Alice@Example.test</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"#;
    for path in ["/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"] {
        let r = c.send(Method::POST, path, Some(request.to_string()), &[("content-type", "text/xml")]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let b = &r.body;
        assert!(
            b.contains("<Type>IMAP</Type>") && b.contains("<Port>993</Port>") && b.contains("<SSL>on</SSL>"),
            "{b}"
        );
        assert!(
            b.contains("<Type>SMTP</Type>")
                && b.contains("<Port>587</Port>")
                && b.contains("<Encryption>TLS</Encryption>"),
            "{b}"
        );
        assert!(
            b.contains("<Server>mail.example.test</Server>") && b.contains("<LoginName>alice@example.test</LoginName>"),
            "{b}"
        );
    }
    let r = c
        .send(Method::POST, "/autodiscover/autodiscover.xml", Some("<EMailAddress>x<y</EMailAddress>".into()), &[])
        .await;
    assert!(r.status == StatusCode::OK && !r.body.contains("LoginName") && !r.body.contains("x<y"), "{}", r.body);
    let r = c.send(Method::POST, "/autodiscover/autodiscover.xml", Some("a".repeat(64 * 1024)), &[]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// The XML text of `<key>K</key>` followed by `<string>…</string>` (or `<integer>`) in a
/// profile: the first such value after the key, starting at `from`.
fn plist_value(xml: &str, key: &str, from: usize) -> String {
    let at = xml[from..].find(&format!("<key>{key}</key>")).map(|i| i + from).unwrap_or_else(|| panic!("no {key}"));
    let rest = &xml[at + key.len() + 11..];
    let open = rest.find('>').unwrap();
    let close = rest.find("</").unwrap();
    rest[open + 1..close].to_string()
}

#[tokio::test]
async fn apple_profile_has_a_fresh_app_password_and_stable_identifiers() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    env.add_user(BOB, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Set up an Apple device") && page.body.contains("action=\"/app-passwords/apple\""));

    let r = c.post("/app-passwords/apple", &[]).await;
    r.assert_ok();
    assert_eq!(r.header("content-type"), "application/x-apple-aspen-config");
    assert_eq!(r.header("cache-control"), "no-store");
    assert_eq!(r.header("content-disposition"), format!("attachment; filename=\"{HOST}.mobileconfig\""));
    let xml = &r.body;
    assert!(xml.starts_with("<?xml"), "{xml}");
    let inner = xml.find("com.apple.mail.managed").unwrap();
    assert_eq!(plist_value(xml, "EmailAccountType", 0), "EmailTypeIMAP");
    assert_eq!(plist_value(xml, "EmailAddress", 0), ALICE);
    assert_eq!(plist_value(xml, "IncomingMailServerHostName", 0), HOST);
    assert_eq!(plist_value(xml, "IncomingMailServerPortNumber", 0), "9993");
    assert_eq!(plist_value(xml, "OutgoingMailServerPortNumber", 0), "9465");
    assert_eq!(plist_value(xml, "IncomingMailServerAuthentication", 0), "EmailAuthPassword");
    // The top-level payload comes after the account payload's dict.
    assert_eq!(plist_value(xml, "PayloadType", inner + 30), "Configuration");
    let password = plist_value(xml, "IncomingPassword", 0);
    assert_eq!(plist_value(xml, "OutgoingPassword", 0), password);

    // The app password in it is a new one, IMAP and SMTP, named after the platform and day.
    let list = env.store.list_app_passwords(ALICE).unwrap();
    assert_eq!(list.len(), 1);
    let day = crate::accounts::fmt_time(env.now()).chars().take(10).collect::<String>();
    assert_eq!(list[0].label, format!("Apple device {day}"));
    assert_eq!(list[0].scopes, vec![Scope::Imap, Scope::Smtp]);
    let (id, _) = app_password::parse(password.as_bytes()).unwrap();
    assert_eq!(list[0].id, id);

    // A second download: another password, another label, the same identifiers.
    let again = c.post("/app-passwords/apple", &[]).await;
    again.assert_ok();
    assert_ne!(plist_value(&again.body, "IncomingPassword", 0), password);
    let ids = |x: &str| {
        let top = x.find("</array>").unwrap();
        (plist_value(x, "PayloadUUID", 0), plist_value(x, "PayloadUUID", top), plist_value(x, "PayloadIdentifier", top))
    };
    assert_eq!(ids(xml), ids(&again.body));
    let labels: Vec<String> = env.store.list_app_passwords(ALICE).unwrap().into_iter().map(|r| r.label).collect();
    assert!(labels.contains(&format!("Apple device {day} (2)")), "{labels:?}");
    // Another account gets other identifiers.
    let mut b = env.client();
    b.sign_in(BOB, PW).await;
    b.get("/app-passwords").await.assert_ok();
    let bobs = b.post("/app-passwords/apple", &[]).await;
    assert_ne!(ids(&bobs.body).1, ids(xml).1);
    assert_ne!(ids(&bobs.body).2, ids(xml).2);
}

#[tokio::test]
async fn one_step_setups_need_the_token_and_a_recent_sign_in() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    for path in ["/app-passwords/apple", "/app-passwords/android"] {
        let r = c.post_raw(path, &[], &[("sec-fetch-site", "same-origin")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        let csrf = c.csrf.clone().unwrap();
        let r = c.post_raw(path, &[("csrf", &csrf)], &[("sec-fetch-site", "cross-site")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
    env.clock.advance(super::session::STEP_UP_SECS + 1);
    c.post("/app-passwords/android", &[]).await.assert_redirect("/login");
    assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
    let mut anonymous = env.client();
    anonymous.get("/login").await.assert_ok();
    anonymous.post("/app-passwords/apple", &[]).await.assert_redirect("/login");
}

#[tokio::test]
async fn android_page_has_the_qr_code_the_settings_and_the_copy_script() {
    let env = Env::new();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    c.get("/app-passwords").await.assert_ok();
    let r = c.post("/app-passwords/android", &[]).await;
    r.assert_ok();
    assert!(r.body.contains("<svg"), "{}", r.body);
    assert!(r.body.contains("<script src=\"/copy.js\" defer></script>"), "{}", r.body);
    assert!(
        r.header("content-security-policy").contains("script-src 'self'"),
        "{}",
        r.header("content-security-policy")
    );
    assert!(!r.header("content-security-policy").contains("unsafe-inline"));
    let shown = between(&r.body, "id=\"app-password\" data-copy=\"the app password\">", "</p>").unwrap();
    let settings = between(&r.body, "data-copy=\"the settings\">", "</pre>").unwrap();
    assert!(settings.contains(&format!("Password: {shown}")), "{settings}");
    assert!(settings.contains(&format!("Incoming mail (IMAP): {HOST}, port 9993, SSL/TLS")), "{settings}");
    assert!(settings.contains(&format!("Outgoing mail (SMTP): {HOST}, port 9465, SSL/TLS")), "{settings}");
    let list = env.store.list_app_passwords(ALICE).unwrap();
    assert!(list[0].label.starts_with("Android device "), "{}", list[0].label);

    // The payload itself (the QR code is checked by zbarimg in tests/devices.rs).
    let json: serde_json::Value =
        serde_json::from_str(&super::devices::android_payload(&env.web, ALICE, "abcdefgh")).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            1,
            [1, 1],
            [0, HOST, 9993, 3, 1, ALICE, "", "abcdefgh"],
            [[[0, HOST, 9465, 3, 1, ALICE, "abcdefgh"], [ALICE, ""]]]
        ])
    );

    // The script is served from the site; the created page of the form loads it too.
    let js = c.get("/copy.js").await;
    js.assert_ok();
    assert!(js.header("content-type").starts_with("text/javascript"));
    assert!(js.body.contains("data-copy"));
    c.get("/app-passwords").await.assert_ok();
    let r = c.post("/app-passwords", &[("label", "Laptop"), ("scope_imap", "1"), ("scope_smtp", "1")]).await;
    assert!(r.body.contains("/copy.js") && r.header("content-security-policy").contains("script-src 'self'"));
    // Other pages still allow no script at all.
    let page = c.get("/app-passwords").await;
    assert!(!page.header("content-security-policy").contains("script-src"));
}

#[tokio::test]
async fn one_step_setup_under_an_enforced_policy_leads_to_enrolment() {
    let env = Env::with_config(&format!(
        "{CONFIG}\n[policy]\nrequire_second_factor = [\"example.test\"]\ngrace_until = \"2000-01-01\"\n"
    ));
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.login(ALICE, PW).await;
    c.get("/two-factor").await;
    for path in ["/app-passwords/apple", "/app-passwords/android"] {
        c.post(path, &[]).await.assert_redirect("/two-factor");
    }
    assert!(env.store.list_app_passwords(ALICE).unwrap().is_empty());
}
