//! `mailgate check` (issue 19, point 6) against real servers: a correct setup (a Dovecot
//! with TLS for IMAP and POP3, Dovecot submission for SMTP, mailgate serving) passes
//! every check; five broken ones each fail and name their cause — the config key or the
//! Dovecot setting to change. `/healthz` answers 200 while the store answers and 503
//! once the PostgreSQL store has gone.

use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::pki;
use crate::support::postgres::Postgres;
use crate::support::submission::{Submission, SubmissionOptions};
use std::process::Output;

const USER: &str = "alice@example.com";

/// The lines of a check run, and its exit status.
struct Run {
    code: Option<i32>,
    text: String,
}

impl Run {
    fn of(out: Output) -> Run {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Run { code: out.status.code(), text }
    }

    /// The checks that failed, by name (the text between `FAIL` and the first `: `).
    fn failed(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("FAIL  "))
            .map(|l| l.split_once(": ").map_or(l, |(name, _)| name).to_string())
            .collect()
    }

    /// The whole report entry (its line and the `change:` line) of the check `name`.
    fn entry(&self, name: &str) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.get(6..).is_some_and(|rest| rest.starts_with(&format!("{name}: "))))
            .unwrap_or_else(|| panic!("no check {name:?} in:\n{}", self.text));
        let mut entry = lines[at].to_string();
        if let Some(next) = lines.get(at + 1).filter(|l| l.starts_with("      change: ")) {
            entry.push('\n');
            entry.push_str(next);
        }
        entry
    }
}

/// Edits mailgate's config file (the running server keeps what it read; `check` reads
/// the file again).
fn edit(mg: &Mailgate, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&mg.config).unwrap();
    std::fs::write(&mg.config, f(text)).unwrap();
}

fn check(mg: &Mailgate) -> Run {
    Run::of(mg.cli(&["check", "--user", USER]))
}

/// `GET /healthz` on the web listener: the status line and the body.
fn healthz(mg: &Mailgate) -> (String, String) {
    let mut c = Client::tls(mg.web, tls_config(&mg.ca, &["http/1.1"])).unwrap();
    c.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let status = c.line();
    let mut headers = Vec::new();
    loop {
        let l = c.line();
        if l.is_empty() {
            break;
        }
        headers.push(l.to_ascii_lowercase());
    }
    assert!(!headers.iter().any(|h| h.starts_with("set-cookie:")), "no session for a health check: {headers:?}");
    assert!(c.closed_within(std::time::Duration::from_secs(20)), "Connection: close");
    (status, String::from_utf8_lossy(c.pending()).trim_end().to_string())
}

#[test]
fn check_passes_a_correct_setup_and_names_the_cause_of_five_broken_ones() {
    let certs = tempfile::tempdir().unwrap();
    let up = pki::make(certs.path(), "upstream", &["localhost", "127.0.0.1"]);
    let dovecot = Dovecot::start(DovecotOptions {
        tls: Some((up.cert.clone(), up.key.clone())),
        pop3: true,
        sieve: true,
        ..Default::default()
    });
    // A second Dovecot, without TLS, that trusts no forwarding from mailgate's address.
    let untrusting = Dovecot::start(DovecotOptions {
        pop3: true,
        sieve: true,
        extra_config: "login_trusted_networks = 192.0.2.0/24\n".into(),
        ..Default::default()
    });
    let submission = Submission::start(SubmissionOptions::default());
    let pop3 = format!("127.0.0.1:{}", dovecot.pop3_port.unwrap());
    let sieve = format!("127.0.0.1:{}", dovecot.sieve_port.unwrap());
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        upstream_extra: format!("tls = \"starttls\"\nserver_name = \"localhost\"\nca_file = \"{}\"\n", up.ca.display()),
        smtp_upstream: format!("127.0.0.1:{}", submission.port),
        master_password: "master-password".into(),
        pop3_upstream: Some(pop3.clone()),
        pop3_upstream_extra: "xclient = true\n".into(),
        sieve_upstream: Some(sieve.clone()),
        sieve_upstream_extra: format!(
            "xclient = true\ntls = \"starttls\"\nserver_name = \"localhost\"\nca_file = \"{}\"\n",
            up.ca.display()
        ),
        ..Default::default()
    });
    // The certificate is for localhost: the web URL and the host name say so.
    let web_url = format!("https://localhost:{}", mg.web.port());
    edit(&mg, |t| {
        t.replace("hostname = \"mail.example.test\"", "hostname = \"localhost\"")
            .replace("public_url = \"https://mail.example.test\"", &format!("public_url = \"{web_url}\""))
    });

    // 1. Correct: every check passes, status 0; the logins as the user were made.
    let run = check(&mg);
    eprintln!("the report on a correct setup:\n{}", run.text);
    assert_eq!(run.code, Some(0), "{}", run.text);
    assert!(run.failed().is_empty(), "{}", run.text);
    for name in [
        "own certificate validity",
        "certificate name for the web URL",
        "store",
        "upstream IMAP login as alice@example.com",
        "upstream SMTP login as alice@example.com",
        "upstream POP3 login as alice@example.com",
        "client address forwarding to POP3",
        "upstream ManageSieve login as alice@example.com",
        "client address forwarding to ManageSieve",
        "client address forwarding to SMTP",
        "autoconfig",
        "/healthz",
    ] {
        assert!(run.entry(name).starts_with("ok    "), "{name}:\n{}", run.text);
    }
    assert!(run.entry("store").contains("in use by the running mailgate"), "{}", run.text);
    assert!(!run.text.contains("master-password"), "no secret in the report");
    // Its logins reached Dovecot with the check's client address (ID for IMAP, XCLIENT
    // for POP3).
    for login in
        ["imap-login: Info: Login: user=<alice@example.com>", "pop3-login: Info: Login: user=<alice@example.com>"]
    {
        let wanted = format!("{login}, method=PLAIN, rip=192.0.2.1");
        assert!(dovecot.wait_for_log(&wanted, PROMPTLY), "{wanted}:\n{}", dovecot.log());
    }
    // JSON: the same findings, `ok` true.
    let json = mg.cli(&["check", "--json", "--user", USER]);
    assert!(json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checks"].as_array().unwrap().iter().all(|c| c["status"] != "fail"), "{v}");
    // Without --user the logins are skipped, and the report says how to run them.
    let run = Run::of(mg.cli(&["check"]));
    assert_eq!(run.code, Some(0), "{}", run.text);
    assert!(run.entry("upstream logins as a user").contains("mailgate check --user EMAIL"), "{}", run.text);

    // 2. Wrong master password: the logins fail naming the master password file.
    let secret = mg.dir.path().join("config/master.secret");
    std::fs::write(&secret, "not-the-master-password\n").unwrap();
    let run = check(&mg);
    eprintln!("the report with a wrong master password:\n{}", run.text);
    assert_eq!(run.code, Some(1), "{}", run.text);
    let imap = run.entry("upstream IMAP login as alice@example.com");
    assert!(imap.starts_with("FAIL") && imap.contains("`upstream.imap.master_password_file`"), "{imap}");
    assert!(run.failed().iter().all(|f| f.contains("login as")), "only the logins: {:?}", run.failed());
    assert!(!run.text.contains("not-the-master-password"), "no secret in the report");
    std::fs::write(&secret, "master-password\n").unwrap();

    // 3. Upstream without TLS while `tls = "starttls"`.
    let plain = format!("127.0.0.1:{}", untrusting.port);
    let imap_address = format!("address = \"127.0.0.1:{}\"", dovecot.port);
    edit(&mg, |t| t.replace(&imap_address, &format!("address = \"{plain}\"")));
    let run = check(&mg);
    assert_eq!(run.code, Some(1), "{}", run.text);
    assert_eq!(run.failed(), vec![format!("upstream IMAP {plain}")], "{}", run.text);
    let entry = run.entry(&format!("upstream IMAP {plain}"));
    assert!(entry.contains("does not offer STARTTLS"), "{entry}");
    assert!(entry.contains("Dovecot `ssl = yes`") && entry.contains("`upstream.imap.tls"), "{entry}");
    edit(&mg, |t| t.replace(&format!("address = \"{plain}\""), &imap_address));

    // 4. Upstream's certificate not trusted (no ca_file: only the system roots).
    let ca_line = format!("ca_file = \"{}\"\n", up.ca.display());
    edit(&mg, |t| t.replacen(&ca_line, "", 1));
    let run = check(&mg);
    assert_eq!(run.code, Some(1), "{}", run.text);
    let name = format!("upstream IMAP 127.0.0.1:{}", dovecot.port);
    assert_eq!(run.failed(), vec![name.clone()], "{}", run.text);
    let entry = run.entry(&name);
    assert!(entry.contains("not trusted") && entry.contains("`upstream.imap.ca_file`"), "{entry}");
    // [upstream.imap] comes first in the file: its line, not [upstream.sieve]'s.
    edit(&mg, |t| t.replacen("server_name = \"localhost\"\n", &format!("server_name = \"localhost\"\n{ca_line}"), 1));
    assert_eq!(check(&mg).code, Some(0), "restored");

    // 5. Dovecot does not trust mailgate's address for forwarding (POP3 and ManageSieve
    // XCLIENT).
    let untrusting_pop3 = format!("127.0.0.1:{}", untrusting.pop3_port.unwrap());
    let untrusting_sieve = format!("127.0.0.1:{}", untrusting.sieve_port.unwrap());
    edit(&mg, |t| {
        t.replace(&format!("address = \"{pop3}\""), &format!("address = \"{untrusting_pop3}\""))
            .replace(&format!("address = \"{sieve}\""), &format!("address = \"{untrusting_sieve}\""))
            .replace("xclient = true\ntls = \"starttls\"", "xclient = true\ntls = \"none\"")
    });
    let run = check(&mg);
    eprintln!("the report with Dovecot not trusting mailgate:\n{}", run.text);
    assert_eq!(run.code, Some(1), "{}", run.text);
    for protocol in ["POP3", "ManageSieve"] {
        let forwarding = run.entry(&format!("client address forwarding to {protocol}"));
        assert!(forwarding.starts_with("FAIL"), "{forwarding}");
        assert!(
            forwarding.contains("Dovecot `login_trusted_networks` must include mailgate's address"),
            "{forwarding}"
        );
    }
    assert!(run.entry("upstream POP3 login as alice@example.com").contains("XCLIENT"), "{}", run.text);
    assert!(
        run.failed().iter().all(|f| f.contains("POP3") || f.contains("ManageSieve")),
        "only POP3 and ManageSieve: {}",
        run.text
    );
    edit(&mg, |t| {
        t.replace(&format!("address = \"{untrusting_pop3}\""), &format!("address = \"{pop3}\""))
            .replace(&format!("address = \"{untrusting_sieve}\""), &format!("address = \"{sieve}\""))
            .replace("xclient = true\ntls = \"none\"", "xclient = true\ntls = \"starttls\"")
    });

    // 6. mailgate's own certificate expired.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2025, 1, 1);
    let expired = params.self_signed(&key).unwrap();
    std::fs::write(&mg.cert, expired.pem()).unwrap();
    std::fs::write(&mg.key, key.serialize_pem()).unwrap();
    let run = Run::of(mg.cli(&["check"]));
    assert_eq!(run.code, Some(1), "{}", run.text);
    let validity = run.entry("own certificate validity");
    assert!(validity.starts_with("FAIL  own certificate validity: expired on 2025-01-01"), "{validity}");
    assert!(validity.contains("`tls.cert`"), "{validity}");
    assert!(run.failed().contains(&"own certificate validity".to_string()), "{}", run.text);

    // /healthz: the store answers (the embedded one, held by serve).
    let (status, body) = healthz(&mg);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok");

    // With serve stopped, check opens the embedded store itself, and the web URL has
    // nobody behind it.
    let mut mg = mg;
    mg.stop();
    let run = Run::of(mg.cli(&["check"]));
    assert!(
        run.entry("store").starts_with("ok    store: embedded store data/store opened, schema version"),
        "{}",
        run.text
    );
    let autoconfig = run.entry("autoconfig");
    assert!(autoconfig.starts_with("FAIL") && autoconfig.contains("`server.public_url`"), "{autoconfig}");
}

/// Postfix as the SMTP upstream with `login = "xclient"`: check passes while mailgate's
/// address is in `smtpd_authorized_xclient_hosts`, and names that setting when it is not.
#[test]
fn check_names_postfix_smtpd_authorized_xclient_hosts() {
    use crate::support::postfix::{Postfix, PostfixOptions};
    let trusting = Postfix::start(PostfixOptions::default());
    let refusing = Postfix::start(PostfixOptions { xclient_hosts: String::new(), ..Default::default() });
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", trusting.port),
        smtp_upstream_extra: "login = \"xclient\"\n".into(),
        ..Default::default()
    });
    let run = check(&mg);
    let login = run.entry("upstream SMTP login as alice@example.com");
    assert!(login.starts_with("ok    ") && login.contains("XCLIENT LOGIN"), "{}", run.text);
    assert!(run.entry("client address forwarding to SMTP").starts_with("ok    "), "{}", run.text);

    edit(&mg, |t| t.replace(&format!("127.0.0.1:{}", trusting.port), &format!("127.0.0.1:{}", refusing.port)));
    let run = check(&mg);
    assert_eq!(run.code, Some(1), "{}", run.text);
    for name in ["upstream SMTP login as alice@example.com", "client address forwarding to SMTP"] {
        let entry = run.entry(name);
        assert!(entry.starts_with("FAIL") && entry.contains("Postfix `smtpd_authorized_xclient_hosts`"), "{entry}");
    }
}

/// `/healthz` says 503, without detail, once the PostgreSQL store is gone, and `check`
/// reports it; 200 again when the database is back.
#[test]
fn healthz_says_503_when_the_store_is_gone() {
    let mut pg = Postgres::start();
    let mg = Mailgate::start(Options {
        extra_sections: format!("[store]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.url()),
        ..Default::default()
    });
    let (status, body) = healthz(&mg);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "ok");
    pg.stop();
    let (status, body) = healthz(&mg);
    assert!(status.starts_with("HTTP/1.1 503"), "{status}\n{}", mg.log());
    assert_eq!(body, "unavailable", "no detail");
    let web_url = format!("https://localhost:{}", mg.web.port());
    edit(&mg, |t| t.replace("public_url = \"https://mail.example.test\"", &format!("public_url = \"{web_url}\"")));
    let run = Run::of(mg.cli(&["check"]));
    assert_eq!(run.code, Some(1), "{}", run.text);
    assert!(run.entry("/healthz").starts_with("FAIL  /healthz: 503"), "{}", run.text);
    pg.restart();
    let (status, _) = healthz(&mg);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}\n{}", mg.log());

    // With serve stopped, check opens the database itself: current schema, ok. An older
    // schema (other nodes may still run the older version) is reported and left as it is.
    let mut mg = mg;
    mg.stop();
    let latest: u32 = pg.psql("SELECT max(version) FROM mailgate_schema").trim().parse().unwrap();
    let run = Run::of(mg.cli(&["check"]));
    assert!(
        run.entry("store")
            .starts_with(&format!("ok    store: PostgreSQL store opened, schema version {latest} (current)")),
        "{}",
        run.text
    );
    pg.psql(&format!("DELETE FROM mailgate_schema WHERE version = {latest}"));
    let run = Run::of(mg.cli(&["check"]));
    let entry = run.entry("store");
    assert!(
        entry.starts_with(&format!(
            "WARN  store: PostgreSQL store reached, schema version {}; this mailgate's is {latest}",
            latest - 1
        )),
        "{}",
        run.text
    );
    assert!(entry.contains("migrates it when it starts"), "{entry}");
    assert_eq!(
        pg.psql("SELECT max(version) FROM mailgate_schema").trim(),
        (latest - 1).to_string(),
        "check migrated nothing"
    );
}
