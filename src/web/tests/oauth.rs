//! The web step as OAuth 2.0 authorization server (`web::oauth`), through the router with
//! the harness of `web::tests`: metadata, the authorization request's checks (no open
//! redirect, PKCE S256, scope), the sign-in and consent with CSRF, `state` and `iss` on
//! every answer, the token and revocation endpoints' error shapes, the add-on, autoconfig,
//! and the grants in the device list.

use super::*;
use crate::store::{AppPasswordRecord, OAuthGrant};
use std::collections::HashMap;

/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
/// Thunderbird's external flow: loopback, a new port each time.
const REDIRECT: &str = "http://localhost:43210";
const STATE: &str = "st&te=1/2";
const ISSUER: &str = "https://mail.example.test";

fn oauth_env() -> Env {
    Env::with_config(&format!("{CONFIG}\n[oauth]\nenabled = true\n"))
}

/// `/oauth/authorize` with Thunderbird's parameters, `set` replacing or adding some and
/// `drop` leaving some out.
fn authorize_url(set: &[(&str, &str)], drop: &[&str]) -> String {
    let mut params: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", "thunderbird"),
        ("redirect_uri", REDIRECT),
        ("scope", "mail"),
        ("state", STATE),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    params.retain(|(k, _)| !drop.contains(k) && !set.iter().any(|(s, _)| s == k));
    params.extend_from_slice(set);
    format!("/oauth/authorize?{}", form(&params))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A redirect back to the app: the part before `?` and the decoded parameters.
fn back(r: &Resp) -> (String, HashMap<String, String>) {
    assert_eq!(r.status, StatusCode::FOUND, "expected a redirect to the app; body: {}", r.body);
    let loc = r.location();
    let (base, query) = loc.split_once('?').unwrap();
    let mut params = HashMap::new();
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap();
        assert!(params.insert(decode(k), decode(v)).is_none(), "{k} twice in {loc}");
    }
    (base.to_string(), params)
}

/// An error redirect to [`REDIRECT`] with `error`, the request's state and the issuer.
#[track_caller]
fn assert_error_back(r: &Resp, error: &str) {
    let (base, q) = back(r);
    assert_eq!(base, REDIRECT);
    assert_eq!(q.get("error").map(String::as_str), Some(error), "{q:?}");
    assert_eq!(q.get("state").map(String::as_str), Some(STATE), "{q:?}");
    assert_eq!(q.get("iss").map(String::as_str), Some(ISSUER), "{q:?}");
    assert!(!q.contains_key("code"));
}

/// A refusal shown as a page: no redirect anywhere.
#[track_caller]
fn assert_refused_here(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.body);
    assert!(r.location().is_empty(), "{what}: redirected to {}", r.location());
    assert!(r.header("content-type").starts_with("text/html"), "{what}");
}

/// Signs `user` in through an authorization request; ends on the consent page.
async fn to_consent(c: &mut Client, url: &str, user: &str, totp_at: Option<u64>) -> Resp {
    let first = c.get(url).await;
    if first.location() == "/oauth/consent" {
        // Signed in recently: straight to the consent.
        let consent = c.get("/oauth/consent").await;
        consent.assert_ok();
        return consent;
    }
    first.assert_redirect("/login");
    let page = c.get("/login").await;
    page.assert_ok();
    let r = c.post("/login", &[("username", user), ("password", PW)]).await;
    if let Some(t) = totp_at {
        r.assert_redirect("/login/totp");
        c.get("/oauth/consent").await.assert_redirect("/login");
        c.post("/login/totp", &[("code", &code(SECRET, t))]).await.assert_redirect("/oauth/consent");
    } else {
        r.assert_redirect("/oauth/consent");
    }
    let consent = c.get("/oauth/consent").await;
    consent.assert_ok();
    consent
}

fn request_id(page: &Resp) -> String {
    between(&page.body, "name=\"request\" value=\"", "\"").unwrap()
}

// ---------------------------------------------------------------------------------------
// Metadata, and everything off when [oauth] is off

#[tokio::test]
async fn metadata_names_the_endpoints_pkce_and_the_issuer() {
    let env = oauth_env();
    let r = env.client().get("/.well-known/oauth-authorization-server").await;
    r.assert_ok();
    assert!(r.header("content-type").starts_with("application/json"));
    let m: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(m["issuer"], ISSUER);
    assert_eq!(m["authorization_endpoint"], "https://mail.example.test/oauth/authorize");
    assert_eq!(m["token_endpoint"], "https://mail.example.test/oauth/token");
    assert_eq!(m["revocation_endpoint"], "https://mail.example.test/oauth/revoke");
    assert_eq!(m["response_types_supported"], serde_json::json!(["code"]));
    assert_eq!(m["grant_types_supported"], serde_json::json!(["authorization_code", "refresh_token"]));
    assert_eq!(m["code_challenge_methods_supported"], serde_json::json!(["S256"]));
    assert_eq!(m["token_endpoint_auth_methods_supported"], serde_json::json!(["none"]));
    assert_eq!(m["authorization_response_iss_parameter_supported"], true);
    let scopes = m["scopes_supported"].as_array().unwrap();
    assert!(scopes.contains(&"mail".into()) && scopes.contains(&"imap".into()));
    assert!(!scopes.contains(&"pop3".into()), "POP3 has no listener here");
    assert_security_headers(&r, "metadata");
}

#[tokio::test]
async fn every_oauth_path_is_404_when_oauth_is_off() {
    let env = Env::new();
    let mut c = env.client();
    for path in [
        "/.well-known/oauth-authorization-server",
        &authorize_url(&[], &[]),
        "/oauth/consent",
        "/oauth/thunderbird-addon.xpi",
    ] {
        assert_eq!(c.get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    for path in ["/oauth/token", "/oauth/revoke", "/oauth/consent"] {
        let r = c.post_raw(path, &[("client_id", "thunderbird"), ("grant_type", "refresh_token")], &[]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
    // Neither the account page nor autoconfig mention it.
    env.add_user(ALICE, PW, false);
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    assert!(!page.body.contains("thunderbird-addon.xpi"), "{}", page.body);
    let xml = c.get("/mail/config-v1.1.xml").await.body;
    assert!(!xml.contains("OAuth2") && !xml.contains("oAuth2"), "{xml}");
}

// ---------------------------------------------------------------------------------------
// The authorization request: client and redirect first, never an open redirect

#[tokio::test]
async fn unknown_or_missing_client_is_refused_on_a_page() {
    let env = oauth_env();
    let mut c = env.client();
    for url in [
        authorize_url(&[("client_id", "evil")], &[]),
        authorize_url(&[], &["client_id"]),
        authorize_url(&[("client_id", "")], &[]),
        format!("{}&client_id=open", authorize_url(&[], &[])),
    ] {
        let r = c.get(&url).await;
        assert_refused_here(&r, &url);
        assert!(r.session_set_cookie().is_none(), "{url}: no session for a refused request");
    }
}

#[tokio::test]
async fn redirects_elsewhere_than_loopback_are_refused_without_a_redirect() {
    let env = oauth_env();
    let mut c = env.client();
    for to in [
        "https://evil.example/cb",
        "http://evil.example/",
        "https://localhost:443/",
        "http://localhost.evil.com/",
        "http://localhost.evil.com:80",
        "http://localhost@evil.com/",
        "http://localhost:1234@evil.com/",
        "http://user@localhost:1234/",
        "http://user:pw@127.0.0.1/",
        "http://127.0.0.1.evil/",
        "http://127.0.0.1.nip.io/",
        "http://[::1].evil/",
        "http://localhost\\@evil.com/",
        "http://localhost:1234\\evil.com",
        "http://localhost/cb?next=https://evil.example",
        "http://localhost/#frag",
        "http://localhost:99999/",
        "http://localhost:/",
        "http://localhost :80/",
        "//evil.example/",
        "javascript:alert(1)",
        "HTTP://EVIL.EXAMPLE/",
        "http://evil.example%2f@localhost/",
    ] {
        let r = c.get(&authorize_url(&[("redirect_uri", to)], &[])).await;
        assert_refused_here(&r, to);
    }
    // Missing, empty and repeated redirect URIs too.
    assert_refused_here(&c.get(&authorize_url(&[], &["redirect_uri"])).await, "missing");
    assert_refused_here(&c.get(&authorize_url(&[("redirect_uri", "")], &[])).await, "empty");
    let twice = format!("{}&redirect_uri={}", authorize_url(&[], &[]), encode("http://127.0.0.1:1/"));
    assert_refused_here(&c.get(&twice).await, "twice");
    // Control: loopback on any port, any of the three names, is accepted.
    for to in ["http://localhost", "http://localhost:5/", "http://127.0.0.1:65535/cb", "http://[::1]:8080"] {
        let r = c.get(&authorize_url(&[("redirect_uri", to)], &[])).await;
        r.assert_redirect("/login");
    }
}

#[tokio::test]
async fn pkce_s256_is_required() {
    let env = oauth_env();
    let mut c = env.client();
    for (set, drop) in [
        (vec![], vec!["code_challenge_method"]),
        (vec![("code_challenge_method", "plain")], vec![]),
        (vec![("code_challenge_method", "s256")], vec![]),
        (vec![], vec!["code_challenge"]),
        (vec![("code_challenge", "short")], vec![]),
        (vec![("code_challenge", &"A".repeat(44)[..])], vec![]),
        (vec![("code_challenge", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c=")], vec![]),
    ] {
        let r = c.get(&authorize_url(&set, &drop)).await;
        assert_error_back(&r, "invalid_request");
    }
}

#[tokio::test]
async fn other_request_errors_go_back_to_the_app_with_state_and_iss() {
    let env = oauth_env();
    let mut c = env.client();
    assert_error_back(&c.get(&authorize_url(&[("scope", "mail admin")], &[])).await, "invalid_scope");
    assert_error_back(&c.get(&authorize_url(&[("scope", "pop3")], &[])).await, "invalid_scope");
    assert_error_back(&c.get(&authorize_url(&[("response_type", "token")], &[])).await, "unsupported_response_type");
    assert_error_back(&c.get(&authorize_url(&[], &["response_type"])).await, "invalid_request");
    assert_error_back(&c.get(&authorize_url(&[("prompt", "none")], &[])).await, "interaction_required");
    let twice = format!("{}&scope=imap", authorize_url(&[], &[]));
    assert_error_back(&c.get(&twice).await, "invalid_request");
    // Without a state, none comes back; an over-long one is refused without echoing it.
    let (_, q) = back(&c.get(&authorize_url(&[("response_type", "token")], &["state"])).await);
    assert!(!q.contains_key("state") && q["iss"] == ISSUER, "{q:?}");
    let long = "s".repeat(2000);
    let (_, q) = back(&c.get(&authorize_url(&[("state", &long)], &[])).await);
    assert_eq!(q["error"], "invalid_request");
    assert!(!q.contains_key("state"));
}

// ---------------------------------------------------------------------------------------
// Sign-in and consent

#[tokio::test]
async fn login_hint_prefills_the_sign_in_and_the_request_waits_through_it() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let r = c.get(&authorize_url(&[("login_hint", ALICE)], &[])).await;
    r.assert_redirect("/login");
    assert!(r.session_set_cookie().is_some(), "the request waits in a new session");
    let page = c.get("/login").await;
    page.assert_ok();
    assert!(page.body.contains(&format!("value=\"{ALICE}\"")), "{}", page.body);
    assert!(page.body.contains("Sign in to let Thunderbird use your mail account."), "{}", page.body);
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/oauth/consent");
    let consent = c.get("/oauth/consent").await;
    consent.assert_ok();
    for text in ["Allow Thunderbird to use your mail account?", ALICE, "read your mail", "send mail as you"] {
        assert!(consent.body.contains(text), "{text}: {}", consent.body);
    }
    assert!(!consent.body.contains("POP3"), "{}", consent.body);
    // The form may lead to the app's loopback address (form-action covers the redirect).
    let csp = consent.header("content-security-policy");
    assert!(csp.contains("form-action 'self' http://localhost:43210;"), "{csp}");
    assert_security_headers(&consent, "consent");
    // Other pages keep the strict CSP.
    let other = c.get("/app-passwords").await;
    assert!(other.header("content-security-policy").contains("form-action 'self';"));
}

#[tokio::test]
async fn a_signed_in_person_goes_straight_to_consent_and_deny_answers_access_denied() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    c.get(&authorize_url(&[], &[])).await.assert_redirect("/oauth/consent");
    let page = c.get("/oauth/consent").await;
    page.assert_ok();
    let request = request_id(&page);
    let r = c.post("/oauth/consent", &[("request", &request), ("decision", "deny")]).await;
    assert_error_back(&r, "access_denied");
    // Answered once: the same form again finds nothing waiting, and redirects nowhere.
    let again = c.post("/oauth/consent", &[("request", &request), ("decision", "deny")]).await;
    assert_refused_here(&again, "answered already");
    assert_refused_here(&c.get("/oauth/consent").await, "nothing waiting");
}

#[tokio::test]
async fn two_factor_accounts_give_their_code_before_the_consent() {
    let env = oauth_env();
    env.add_user(ALICE, PW, true);
    let mut c = env.client();
    let t = env.now();
    let consent = to_consent(&mut c, &authorize_url(&[("login_hint", ALICE)], &[]), ALICE, Some(t)).await;
    assert!(consent.body.contains("Allow Thunderbird"), "{}", consent.body);
}

#[tokio::test]
async fn consent_needs_the_token_the_same_origin_and_the_request_shown() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let page = to_consent(&mut c, &authorize_url(&[], &[]), ALICE, None).await;
    let request = request_id(&page);
    let csrf = c.csrf.clone().unwrap();
    // No token, a wrong token, a cross-site post, a foreign origin: 403, no redirect.
    for (fields, headers) in [
        (vec![("request", request.as_str()), ("decision", "allow")], vec![("sec-fetch-site", "same-origin")]),
        (
            vec![("csrf", "wrong"), ("request", request.as_str()), ("decision", "allow")],
            vec![("sec-fetch-site", "same-origin")],
        ),
        (
            vec![("csrf", csrf.as_str()), ("request", request.as_str()), ("decision", "allow")],
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            vec![("csrf", csrf.as_str()), ("request", request.as_str()), ("decision", "allow")],
            vec![("origin", "https://evil.example")],
        ),
    ] {
        let r = c.post_raw("/oauth/consent", &fields, &headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{fields:?} {headers:?}: {}", r.body);
        assert!(r.location().is_empty());
    }
    // Another request's id (a page from before a newer request replaced it): refused.
    let r = c.post("/oauth/consent", &[("request", "not-the-request"), ("decision", "allow")]).await;
    assert_refused_here(&r, "another request");
    // The request is still waiting: Deny works with the right id.
    let r = c.post("/oauth/consent", &[("request", &request), ("decision", "deny")]).await;
    assert_error_back(&r, "access_denied");
}

#[tokio::test]
async fn a_newer_request_replaces_the_waiting_one_and_old_ones_expire() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let first = to_consent(&mut c, &authorize_url(&[], &[]), ALICE, None).await;
    c.get(&authorize_url(&[("redirect_uri", "http://127.0.0.1:5555/")], &[])).await.assert_redirect("/oauth/consent");
    let second = c.get("/oauth/consent").await;
    assert!(second.header("content-security-policy").contains("http://127.0.0.1:5555"));
    let r = c.post("/oauth/consent", &[("request", &request_id(&first)), ("decision", "deny")]).await;
    assert_refused_here(&r, "the replaced request");
    // Ten minutes later the waiting request is gone (a new sign-in is needed anyway).
    env.clock.advance(super::super::session::AUTHORIZE_SECS + 1);
    let r = c.post("/oauth/consent", &[("request", &request_id(&second)), ("decision", "deny")]).await;
    assert_ne!(r.status, StatusCode::FOUND, "an expired request redirects nowhere: {}", r.location());
}

#[tokio::test]
async fn a_stale_sign_in_must_sign_in_again_before_consent() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    env.clock.advance(super::super::session::STEP_UP_SECS + 1);
    c.get(&authorize_url(&[], &[])).await.assert_redirect("/login");
    c.get("/login").await.assert_ok();
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/oauth/consent");
}

// ---------------------------------------------------------------------------------------
// Token and revocation endpoints: error shapes

async fn token_post(c: &mut Client, fields: &[(&str, &str)]) -> (StatusCode, serde_json::Value, Resp) {
    let r = c.post_raw("/oauth/token", fields, &[]).await;
    let json = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, json, r)
}

#[tokio::test]
async fn token_endpoint_errors_follow_rfc_6749() {
    let env = oauth_env();
    let mut c = env.client();
    let code = [("client_id", "thunderbird"), ("grant_type", "authorization_code"), ("redirect_uri", REDIRECT)];
    for (fields, status, error) in [
        (vec![("grant_type", "refresh_token"), ("refresh_token", "x")], StatusCode::UNAUTHORIZED, "invalid_client"),
        (
            vec![("client_id", "evil"), ("grant_type", "refresh_token"), ("refresh_token", "x")],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (vec![("client_id", "thunderbird")], StatusCode::BAD_REQUEST, "invalid_request"),
        (
            vec![("client_id", "thunderbird"), ("grant_type", "password")],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            vec![("client_id", "thunderbird"), ("grant_type", "client_credentials")],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            vec![("client_id", "thunderbird"), ("grant_type", "refresh_token")],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            vec![
                ("client_id", "thunderbird"),
                ("grant_type", "refresh_token"),
                ("refresh_token", "x"),
                ("scope", "root"),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        ([&code[..], &[("code", "c")]].concat(), StatusCode::BAD_REQUEST, "invalid_request"),
        ([&code[..], &[("code_verifier", VERIFIER)]].concat(), StatusCode::BAD_REQUEST, "invalid_request"),
        (
            [&code[..], &[("code", "c"), ("code_verifier", "short")]].concat(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            [&code[..], &[("code", "c"), ("code", "d"), ("code_verifier", VERIFIER)]].concat(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            vec![("client_id", "thunderbird"), ("client_id", "open"), ("grant_type", "refresh_token")],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ] {
        let (got, json, r) = token_post(&mut c, &fields).await;
        assert_eq!(got, status, "{fields:?}: {}", r.body);
        assert_eq!(json["error"], error, "{fields:?}: {}", r.body);
        assert!(r.header("content-type").starts_with("application/json"));
        assert_eq!(r.header("cache-control"), "no-store");
        assert!(!r.body.contains("access_token"));
    }
    // Not a form, and too large: invalid_request.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/oauth/token")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"client_id\":\"thunderbird\",\"grant_type\":\"refresh_token\"}"))
        .unwrap();
    let resp = router(env.web.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["error"], "invalid_request");
    let big = "x".repeat(64 * 1024);
    let (got, json, _) =
        token_post(&mut c, &[("client_id", "thunderbird"), ("grant_type", "refresh_token"), ("refresh_token", &big)])
            .await;
    assert_eq!((got, json["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    // GET is not a token request.
    assert_eq!(c.get("/oauth/token").await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn revocation_errors() {
    let env = oauth_env();
    let mut c = env.client();
    let r = c.post_raw("/oauth/revoke", &[("token", "x")], &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = c.post_raw("/oauth/revoke", &[("token", "x"), ("client_id", "evil")], &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = c.post_raw("/oauth/revoke", &[("client_id", "thunderbird")], &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("invalid_request"));
}

// ---------------------------------------------------------------------------------------
// The add-on, autoconfig, the device list

fn unzip_manifest(bytes: &[u8]) -> serde_json::Value {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    assert_eq!(zip.len(), 1, "only manifest.json");
    let mut f = zip.by_name("manifest.json").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut f, &mut text).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_addon_registers_this_server_as_thunderbirds_oauth_provider() {
    let config = Config::from_toml_str(&format!("{CONFIG}\n[oauth]\nenabled = true\n"), "t").unwrap();
    let xpi = crate::web::thunderbird_addon(&config).unwrap();
    assert_eq!(xpi, crate::web::thunderbird_addon(&config).unwrap(), "the same bytes each time");
    let m = unzip_manifest(&xpi);
    assert_eq!(m["manifest_version"], 2);
    assert_eq!(m["browser_specific_settings"]["gecko"]["id"], "oauth@mail.example.test");
    let p = &m["oauth_provider"];
    assert_eq!(p["issuer"], HOST);
    assert_eq!(p["clientId"], "thunderbird");
    assert_eq!(p["authorizationEndpoint"], "https://mail.example.test/oauth/authorize");
    assert_eq!(p["tokenEndpoint"], "https://mail.example.test/oauth/token");
    assert_eq!(p["redirectionEndpoint"], "http://localhost");
    assert_eq!(p["usePKCE"], true);
    assert_eq!(p["useExternalBrowser"], true);
    assert_eq!(p["issuerIdentifier"], ISSUER);
    assert_eq!(p["hostnames"], serde_json::json!([HOST]));
    assert_eq!(p["scopes"], "mail");
    assert!(p.get("clientSecret").is_none());

    // Thunderbird matches only host names with a dot.
    let local =
        Config::from_toml_str("[server]\npublic_url = \"https://localhost\"\nhostname = \"localhost\"", "t").unwrap();
    assert!(matches!(crate::web::thunderbird_addon(&local), Err(crate::web::AddonError::Hostname(_))));
}

#[tokio::test]
async fn the_addon_is_offered_for_download() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("href=\"/oauth/thunderbird-addon.xpi\""), "{}", page.body);
    assert!(page.body.contains("Install Add-on From File"));
}

#[tokio::test]
async fn the_addon_bytes_match_the_manifest_over_http() {
    // The body is binary: fetch it without the harness's UTF-8 body.
    let env = oauth_env();
    let req = Request::builder().uri("/oauth/thunderbird-addon.xpi").body(Body::empty()).unwrap();
    let resp = router(env.web.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(header("content-type"), "application/x-xpinstall");
    assert_eq!(header("content-disposition"), "attachment; filename=\"oauth@mail.example.test.xpi\"");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(unzip_manifest(&bytes)["oauth_provider"]["clientId"], "thunderbird");
}

#[tokio::test]
async fn autoconfig_offers_oauth2_beside_the_password() {
    let env = oauth_env();
    let xml = env.client().get("/.well-known/autoconfig/mail/config-v1.1.xml").await.body;
    assert_eq!(xml.matches("<authentication>OAuth2</authentication>").count(), 2, "{xml}");
    assert_eq!(xml.matches("<authentication>password-cleartext</authentication>").count(), 2, "{xml}");
    let block = between(&xml, "<oAuth2>", "</oAuth2>").unwrap();
    for part in [
        "<issuer>https://mail.example.test</issuer>",
        "<scope>mail</scope>",
        "<authURL>https://mail.example.test/oauth/authorize</authURL>",
        "<tokenURL>https://mail.example.test/oauth/token</tokenURL>",
        "<clientID>open</clientID>",
    ] {
        assert!(block.contains(part), "{part}: {xml}");
    }
    assert!(xml.find("</emailProvider>").unwrap() < xml.find("<oAuth2>").unwrap());
}

#[tokio::test]
async fn grants_are_listed_as_devices_with_the_revoke_button() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let record = AppPasswordRecord {
        id: "oa1b2c3d4".into(),
        username: ALICE.into(),
        label: "Thunderbird (browser sign-in)".into(),
        scopes: vec![Scope::Imap, Scope::Smtp],
        hash: String::new(),
        created_at: T0 - 3600,
        created_by: "oauth".into(),
        last_used: Some(LastUse {
            at: T0 - 60,
            ip: "192.0.2.7".into(),
            client: Some("Thunderbird 153".into()),
            protocol: Some(Scope::Imap),
        }),
        last_used_by: Default::default(),
        oauth: Some(OAuthGrant {
            client_id: "thunderbird".into(),
            client_name: "Thunderbird".into(),
            refresh_generation: 1,
            refresh_hash: "00".repeat(32),
            retired: vec![],
            refreshed_at: T0 - 3600,
            user_agent: Some("Mozilla/5.0 Thunderbird/153.0".into()),
        }),
        expires_at: None,
        allow: vec![],
        narrow: None,
    };
    env.store.create_app_password(&record).unwrap();
    let mut c = env.client();
    c.sign_in(ALICE, PW).await;
    let page = c.get("/app-passwords").await;
    page.assert_ok();
    for text in [
        "Thunderbird",
        "Signed in through the browser",
        "Mozilla/5.0 Thunderbird/153.0",
        "192.0.2.7",
        "Thunderbird 153",
        "IMAP, SMTP",
    ] {
        assert!(page.body.contains(text), "{text}: {}", page.body);
    }
    assert!(page.body.contains("action=\"/app-passwords/oa1b2c3d4/revoke\""), "{}", page.body);
    c.post("/app-passwords/oa1b2c3d4/revoke", &[]).await;
    assert_eq!(env.app_password_count(ALICE), 0);
}

// ---------------------------------------------------------------------------------------
// The whole flow, with the account service's codes and tokens

/// Signs ALICE in through the browser and allows: the code from the redirect.
async fn allowed_code(env: &Env, c: &mut Client, url: &str) -> String {
    let page = to_consent(c, url, ALICE, None).await;
    let r = c.post("/oauth/consent", &[("request", &request_id(&page)), ("decision", "allow")]).await;
    let (base, q) = back(&r);
    assert_eq!(base, REDIRECT);
    assert_eq!(q.get("state").map(String::as_str), Some(STATE), "{q:?}");
    assert_eq!(q.get("iss").map(String::as_str), Some(ISSUER), "{q:?}");
    assert!(!q.contains_key("error"), "{q:?}");
    let _ = env;
    q["code"].clone()
}

fn redeem<'a>(code: &'a str, client: &'a str, redirect: &'a str, verifier: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "authorization_code"),
        ("client_id", client),
        ("code", code),
        ("redirect_uri", redirect),
        ("code_verifier", verifier),
    ]
}

#[tokio::test]
async fn code_to_tokens_once_and_the_grant_is_a_device() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let code = allowed_code(&env, &mut c, &authorize_url(&[], &[])).await;
    assert!(!env.web.config.oauth.client("thunderbird").unwrap().name.is_empty());
    let mut app = env.client();
    let r = app
        .send(
            Method::POST,
            "/oauth/token",
            Some(form(&redeem(&code, "thunderbird", REDIRECT, VERIFIER))),
            &[("user-agent", "Thunderbird/153.0")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.header("cache-control"), "no-store");
    assert!(r.header("content-type").starts_with("application/json"));
    let t: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 3600);
    assert_eq!(t["scope"], "mail");
    assert!(t["access_token"].as_str().unwrap().starts_with("mgat1."), "{t}");
    assert!(t["refresh_token"].as_str().unwrap().starts_with("mgrt1."), "{t}");
    // The grant is a device of the account, with the client and the user agent.
    let list = env.store.list_app_passwords(ALICE).unwrap();
    assert_eq!(list.len(), 1);
    let grant = list[0].oauth.as_ref().unwrap();
    assert_eq!(grant.client_id, "thunderbird");
    assert_eq!(grant.user_agent.as_deref(), Some("Thunderbird/153.0"));
    let page = c.get("/app-passwords").await;
    assert!(page.body.contains("Signed in through the browser; Thunderbird/153.0"), "{}", page.body);
    // A code works once.
    let (status, json, _) = token_post(&mut app, &redeem(&code, "thunderbird", REDIRECT, VERIFIER)).await;
    assert_eq!((status, json["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    // Nothing secret in the page or the debug output of the record.
    assert!(!page.body.contains(t["refresh_token"].as_str().unwrap()));
    assert!(!format!("{:?}", list[0]).contains(t["access_token"].as_str().unwrap()));
}

#[tokio::test]
async fn a_code_is_bound_to_its_client_redirect_verifier_and_lifetime() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let mut app = env.client();
    // Another client, another redirect, another verifier: refused (each with a new code,
    // since a refused redemption may spend the code).
    let other_verifier = "A".repeat(43);
    for (client, redirect, verifier) in [
        ("open", REDIRECT, VERIFIER),
        ("thunderbird", "http://localhost:43211", VERIFIER),
        ("thunderbird", REDIRECT, other_verifier.as_str()),
    ] {
        let code = allowed_code(&env, &mut c, &authorize_url(&[], &[])).await;
        let (status, json, r) = token_post(&mut app, &redeem(&code, client, redirect, verifier)).await;
        assert!(
            (status, json["error"].as_str()) == (StatusCode::BAD_REQUEST, Some("invalid_grant"))
                || (status, json["error"].as_str()) == (StatusCode::UNAUTHORIZED, Some("invalid_client")),
            "{client} {redirect} {verifier}: {status} {}",
            r.body
        );
        assert!(!r.body.contains("access_token"));
    }
    // An expired code.
    let code = allowed_code(&env, &mut c, &authorize_url(&[], &[])).await;
    env.clock.advance(61);
    let (status, json, _) = token_post(&mut app, &redeem(&code, "thunderbird", REDIRECT, VERIFIER)).await;
    assert_eq!((status, json["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert_eq!(env.app_password_count(ALICE), 0, "no grant from a refused code");
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_replay_ends_the_grant() {
    let env = oauth_env();
    env.add_user(ALICE, PW, true);
    let mut c = env.client();
    let t = env.now();
    let page = to_consent(&mut c, &authorize_url(&[], &[]), ALICE, Some(t)).await;
    let r = c.post("/oauth/consent", &[("request", &request_id(&page)), ("decision", "allow")]).await;
    let code = back(&r).1["code"].clone();
    let mut app = env.client();
    let (status, first, _) = token_post(&mut app, &redeem(&code, "thunderbird", REDIRECT, VERIFIER)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let refresh1 = first["refresh_token"].as_str().unwrap().to_string();
    let renew = |rt: &str| {
        vec![
            ("grant_type", "refresh_token".to_string()),
            ("client_id", "thunderbird".into()),
            ("refresh_token", rt.to_string()),
        ]
    };
    let fields = renew(&refresh1);
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, second, _) = token_post(&mut app, &fields).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let refresh2 = second["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(refresh1, refresh2, "rotated");
    assert!(second["access_token"].as_str().unwrap().starts_with("mgat1."));
    // Another client cannot use it.
    let other = renew(&refresh2);
    let mut other: Vec<(&str, &str)> = other.iter().map(|(k, v)| (*k, v.as_str())).collect();
    other[1].1 = "open";
    let (status, _, _) = token_post(&mut app, &other).await;
    assert_ne!(status, StatusCode::OK);
    // The retired one again: refused, and the grant ends (RFC 9700 4.14.2).
    let (status, json, _) = token_post(&mut app, &fields).await;
    assert_eq!((status, json["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    let current = renew(&refresh2);
    let current: Vec<(&str, &str)> = current.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, _) = token_post(&mut app, &current).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the grant was revoked by the replay");
    assert_eq!(env.app_password_count(ALICE), 0);
}

#[tokio::test]
async fn revocation_ends_the_grant_and_unknown_tokens_are_fine() {
    let env = oauth_env();
    env.add_user(ALICE, PW, false);
    let mut c = env.client();
    let code = allowed_code(&env, &mut c, &authorize_url(&[], &[])).await;
    let mut app = env.client();
    let (status, t, _) = token_post(&mut app, &redeem(&code, "thunderbird", REDIRECT, VERIFIER)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(env.app_password_count(ALICE), 1);
    let r = app.post_raw("/oauth/revoke", &[("client_id", "thunderbird"), ("token", "mgrt1.nothing.1.x")], &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(env.app_password_count(ALICE), 1);
    let rt = t["refresh_token"].as_str().unwrap();
    let r = app
        .post_raw(
            "/oauth/revoke",
            &[("client_id", "thunderbird"), ("token", rt), ("token_type_hint", "refresh_token")],
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(env.app_password_count(ALICE), 0);
}

#[tokio::test]
async fn giving_up_the_sign_in_tells_the_app_access_denied() {
    let env = oauth_env();
    env.add_user(ALICE, PW, true);
    // On the sign-in page: "Cancel and return to Thunderbird".
    let mut c = env.client();
    c.get(&authorize_url(&[], &[])).await.assert_redirect("/login");
    let page = c.get("/login").await;
    assert!(page.body.contains("Cancel and return to Thunderbird"), "{}", page.body);
    let forged = c.post_raw("/oauth/cancel", &[("csrf", "wrong")], &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_error_back(&c.post("/oauth/cancel", &[]).await, "access_denied");
    // Answered: the sign-in page no longer offers it, and cancelling again goes nowhere.
    assert!(!c.get("/login").await.body.contains("Cancel and return"));
    c.post("/oauth/cancel", &[]).await.assert_redirect("/login");
    // Without a waiting app, the sign-in page has no such button.
    assert!(!env.client().get("/login").await.body.contains("Cancel and return"));

    // On the second-factor page: Cancel sign-in goes back to the app too.
    let mut c = env.client();
    c.get(&authorize_url(&[], &[])).await.assert_redirect("/login");
    c.get("/login").await.assert_ok();
    c.post("/login", &[("username", ALICE), ("password", PW)]).await.assert_redirect("/login/totp");
    c.get("/login/totp").await.assert_ok();
    let r = c.post("/login/cancel", &[]).await;
    assert_error_back(&r, "access_denied");
    assert!(r.session_set_cookie().is_some_and(|s| s.contains("Max-Age=0")), "the session ends as on any cancel");
}
