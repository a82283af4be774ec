//! One-step set-up of a device (issue 18, point 1): a button on the app-password page
//! makes a fresh app password (IMAP and SMTP, named after the platform and the day) through
//! the same account-service path as the form, and hands it to the device with the
//! server settings the created page and the autoconfig file give:
//!
//! * Apple (iOS, iPadOS, macOS): a configuration profile (`.mobileconfig`, an XML plist with
//!   one `com.apple.mail.managed` payload), signed with CMS when `[web] sign_profiles`. Its
//!   PayloadIdentifier and PayloadUUID are derived from the account under `secret.key`, so
//!   installing a newer one replaces the older one instead of adding a second account.
//! * Thunderbird for Android / K-9 Mail: a page with a QR code in Thunderbird's
//!   account-import format, and the settings as text for any other app.

use super::pages::{
    Draft, Fields, Site, W, account_page, client_ip, has_label, html, imap_endpoint, must_enrol_first, post_user,
    qr_svg, redirect, smtp_endpoint, with_copy_script,
};
use super::{ClientIp, Web};
use crate::accounts::CreatedAppPassword;
use crate::store::Scope;
use askama::Template;
use axum::extract::{Extension, Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The most app passwords of one platform made on one day that get their own label
/// ("Apple device 2026-12-07 (2)", …); the account's device cap comes first anyway.
const MAX_SAME_DAY: u32 = 20;

/// A fresh app password for `platform`, or the response that says why not (the account
/// page with the reason, a sign-in, the enrolment under `[policy]`).
async fn mint(
    web: &Web,
    ip: Option<Extension<ClientIp>>,
    headers: &HeaderMap,
    form: &std::collections::HashMap<String, String>,
    platform: &str,
) -> Result<(super::pages::Ctx, String, CreatedAppPassword), Response> {
    let ip = client_ip(&ip);
    let (ctx, username) = post_user(web, headers, form, true).map_err(IntoResponse::into_response)?;
    if must_enrol_first(web, &username) {
        return Err(redirect("/two-factor"));
    }
    let day = crate::accounts::fmt_time(web.now()).chars().take(10).collect::<String>();
    let base = format!("{platform} {day}");
    let label = std::iter::once(base.clone())
        .chain((2..=MAX_SAME_DAY).map(|n| format!("{base} ({n})")))
        .find(|l| !has_label(web, &username, l));
    let failed = |text: &str| account_page(web, &ctx, &username, Draft::with_error(text.to_string()));
    let Some(label) = label else {
        return Err(failed(&format!(
            "You made {MAX_SAME_DAY} app passwords for “{platform}” today. Revoke the ones you do not use and try again."
        )));
    };
    let (accounts, user) = (web.accounts(), username.clone());
    let scopes = vec![Scope::Imap, Scope::Smtp];
    let made = web
        .auth
        .hash_for(ip, move || {
            accounts.create_limited_app_password(&user, &label, scopes, crate::auth::app_password::Limits::default())
        })
        .await;
    match made {
        Some(Ok(created)) => Ok((ctx, username, created)),
        Some(Err(e)) => Err(failed(&format!("The app password was not created: {e}."))),
        None => Err(failed("The app password could not be created right now. Try again in a minute.")),
    }
}

// ---------------------------------------------------------------------------------------
// Apple

#[derive(Template)]
#[template(path = "profile.mobileconfig", escape = "html")]
struct Profile<'a> {
    /// PayloadIdentifier of the profile (the account payload's adds `.account`).
    identifier: &'a str,
    uuid: &'a str,
    account_uuid: &'a str,
    /// PayloadDisplayName and EmailAccountDescription: "Example Mail (alice@example.com)".
    description: &'a str,
    organisation: &'a str,
    email: &'a str,
    host: &'a str,
    imap_port: u16,
    smtp_port: u16,
    password: &'a str,
    /// The day it was made (YYYY-MM-DD), in PayloadDescription.
    date: &'a str,
}

/// A UUID derived from the account under `secret.key` (HMAC; version 8, RFC 9562), the
/// same on every download and every node, and telling nothing about the account to
/// anyone without the key. `part` tells the profile's apart from its payload's.
fn stable_uuid(web: &Web, username: &str, part: &str) -> String {
    let tag = web.key.tag(&[b"apple-profile", username.as_bytes(), part.as_bytes()]);
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(tag.iter()) {
        *d = *s;
    }
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The host name reversed (`mail.example.com` → `com.example.mail`), the usual start of
/// an Apple payload identifier.
fn reverse_dns(host: &str) -> String {
    host.split('.').rev().filter(|p| !p.is_empty()).collect::<Vec<_>>().join(".")
}

/// The profile (XML plist) for `username` with `password`.
fn profile_xml(web: &Web, username: &str, password: &str) -> Result<String, askama::Error> {
    let site = web.site();
    let uuid = stable_uuid(web, username, "profile");
    let account_uuid = stable_uuid(web, username, "account");
    let identifier = format!("{}.mailgate.{}", reverse_dns(site.host), uuid.to_ascii_lowercase());
    let description = format!("{} ({username})", site.name);
    let date = crate::accounts::fmt_time(web.now()).chars().take(10).collect::<String>();
    Profile {
        identifier: &identifier,
        uuid: &uuid,
        account_uuid: &account_uuid,
        description: &description,
        organisation: site.name,
        email: username,
        host: site.host,
        imap_port: imap_endpoint(&web.config).0,
        smtp_port: smtp_endpoint(&web.config).0,
        password,
        date: &date,
    }
    .render()
}

/// `POST /app-passwords/apple`: the profile as a download. `IncomingMailServerUseSSL` and
/// `OutgoingMailServerUseSSL` are true on either kind of port: Apple Mail then uses
/// implicit TLS or STARTTLS as the port asks, and mailgate refuses a login outside TLS.
pub(super) async fn apple_profile(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let (ctx, username, created) = match mint(&web, ip, &headers, &form, "Apple device").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let xml = match profile_xml(&web, &username, created.new.password.expose()) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "profile template failed");
            return undo(&web, &ctx, &username, &created, "The profile could not be made.");
        }
    };
    let body = if web.config.web_sign_profiles {
        let signed = match &web.certs {
            Some(certs) => certs.sign_cms(xml.as_bytes()).map_err(|e| e.to_string()),
            None => Err("no certificate in service".to_string()),
        };
        match signed {
            Ok(der) => der,
            Err(e) => {
                tracing::error!(error = %e, "signing a configuration profile failed");
                return undo(&web, &ctx, &username, &created, "The profile could not be signed.");
            }
        }
    } else {
        xml.into_bytes()
    };
    let name: String =
        web.host().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).collect();
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{name}.mobileconfig\""))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment; filename=\"mail.mobileconfig\""));
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/x-apple-aspen-config")),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// A profile that cannot be handed out: its app password is revoked again (nobody has
/// it), and the account page says so.
fn undo(web: &Web, ctx: &super::pages::Ctx, username: &str, created: &CreatedAppPassword, why: &str) -> Response {
    if let Err(e) = web.accounts().revoke_app_password(username, &created.new.id) {
        tracing::error!(error = %e, "revoking an app password whose profile failed");
    }
    let draft = Draft::with_error(format!("{why} Nothing was changed; tell your mail administrator."));
    account_page(web, ctx, username, draft)
}

// ---------------------------------------------------------------------------------------
// Thunderbird for Android

#[derive(Template)]
#[template(path = "android.html")]
struct AndroidPage<'a> {
    site: Site<'a>,
    csrf: &'a str,
    username: &'a str,
    label: &'a str,
    /// Grouped in fours, as on the created page.
    password: &'a str,
    /// The QR code (inline SVG, rendered by mailgate).
    qr: String,
    /// Every setting as text, for other apps.
    settings: String,
}

/// Thunderbird for Android's ConnectionSecurity: 3 `Tls` (implicit), 2 `AlwaysStartTls`.
fn connection_security(security: &str) -> u8 {
    if security == "STARTTLS" { 2 } else { 3 }
}

/// The QR code's payload: Thunderbird's "Export for Mobile" QR code format, format
/// version 1 (specification version 1, 2025-02-06: thunderbird/thunderbird-android,
/// feature/migration/qrcode/qr-code-format.md, as of commit 833ae03, 2025-03-05):
///
/// `[FormatVersion, [SequenceNumber, SequenceEnd], IncomingServer, OutgoingServerGroups]`,
/// IncomingServer `[0 (IMAP), Hostname, Port, ConnectionSecurity, AuthenticationType,
/// Username, AccountName, Password]`, one OutgoingServerGroup `[[0 (SMTP), Hostname, Port,
/// ConnectionSecurity, AuthenticationType, Username, Password], [EmailAddress,
/// DisplayName]]`. AuthenticationType 1 is `PasswordCleartext` (inside TLS); an empty
/// AccountName makes the reader use the e-mail address; the display name is not known
/// here, so it is empty (the person can set it in the app).
pub(super) fn android_payload(web: &Web, username: &str, password: &str) -> String {
    let host = web.host();
    let (imap_port, imap_security) = imap_endpoint(&web.config);
    let (smtp_port, smtp_security) = smtp_endpoint(&web.config);
    serde_json::json!([
        1,
        [1, 1],
        [0, host, imap_port, connection_security(imap_security), 1, username, "", password],
        [[[0, host, smtp_port, connection_security(smtp_security), 1, username, password], [username, ""]]]
    ])
    .to_string()
}

/// `POST /app-passwords/android`: the QR code and the settings as text.
pub(super) async fn android_setup(
    State(web): W,
    ip: Option<Extension<ClientIp>>,
    headers: HeaderMap,
    Form(form): Fields,
) -> Response {
    let (ctx, username, created) = match mint(&web, ip, &headers, &form, "Android device").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let host = web.host();
    let (imap_port, imap_security) = imap_endpoint(&web.config);
    let (smtp_port, smtp_security) = smtp_endpoint(&web.config);
    let grouped = created.new.grouped();
    let settings = format!(
        "E-mail address: {username}\nUsername: {username}\nPassword: {}\nIncoming mail (IMAP): {host}, port {imap_port}, \
         {imap_security}\nOutgoing mail (SMTP): {host}, port {smtp_port}, {smtp_security}\nAuthentication: normal password",
        grouped.expose()
    );
    let qr = qr_svg(&android_payload(&web, &username, created.new.password.expose()));
    with_copy_script(html(
        AndroidPage {
            site: web.site(),
            csrf: &ctx.csrf,
            username: &username,
            label: &created.label,
            password: grouped.expose(),
            qr,
            settings,
        },
        StatusCode::OK,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_dns_reverses_the_labels() {
        assert_eq!(reverse_dns("mail.example.com"), "com.example.mail");
        assert_eq!(reverse_dns("localhost"), "localhost");
    }

    #[test]
    fn starttls_is_always_start_tls_and_the_rest_is_tls() {
        assert_eq!(connection_security("STARTTLS"), 2);
        assert_eq!(connection_security("SSL/TLS"), 3);
    }
}
