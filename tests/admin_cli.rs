//! The admin CLI, as an admin uses it: while `serve` runs (through the admin socket) and
//! without a server (on the store directly). Issue 2 points 3, 4 and 5.

use crate::support::mailgate::{Mailgate, Options, cli_in};
use std::os::unix::fs::PermissionsExt;

#[test]
fn commands_work_while_serving_and_errors_are_named() {
    let mg = Mailgate::start(Options::default());
    let socket = mg.dir.path().join("data/admin.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(mg.dir.path().join("data")).unwrap().permissions().mode() & 0o777, 0o700);
    mg.add_user("Alice@Example.com", "alice-account-pw");
    let out = mg.cli_stdin(&["user", "add", "alice@example.com", "--password-stdin"], "another-pw\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = mg.cli(&["app-password", "create", "nobody@example.com", "--label", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown user nobody@example.com"));
    let pw = mg.app_password("alice@example.com", "Phone", "imap");
    assert_eq!(pw.len(), 39, "{pw}");
    assert!(pw.split(' ').all(|g| g.len() == 4 && g.bytes().all(|b| b"abcdefghjkmnpqrstuvwxyz23456789".contains(&b))));
    let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", "phone"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an app password labelled"));
    let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", "x", "--scope", "pop3"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown scope"));
    let out = mg.cli(&["app-password", "revoke", "alice@example.com", "zzzzzz"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no app password with id zzzzzz"));
    let json = mg.ok(&["app-password", "list", "alice@example.com", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let v = &v["app_passwords"];
    assert_eq!(v[0]["label"], "Phone");
    assert_eq!(v[0]["scopes"], serde_json::json!(["imap"]));
    assert!(v[0]["last_used"].is_null());
    assert!(!json.contains(&pw.replace(' ', "")) && !json.contains("argon2"), "list leaks the secret or hash");
    let users = mg.ok(&["user", "list"]);
    assert!(users.contains("alice@example.com") && users.contains("app-passwords=1"), "{users}");
    // The password never reaches the server's log.
    assert!(!mg.log().contains(&pw) && !mg.log().contains(&pw.replace(' ', "")));
    assert!(!mg.log().contains("alice-account-pw"));
    let out = mg.cli(&["totp", "enable", "alice@example.com", "--secret", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .contains("secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    );
    assert!(mg.ok(&["user", "list"]).contains("2fa=on"));
    mg.ok(&["totp", "disable", "alice@example.com"]);
    assert!(mg.ok(&["user", "list"]).contains("2fa=off"));
    let out = mg.ok(&["user", "unlock", "alice@example.com"]);
    assert!(out.contains("unlocked alice@example.com: its password and code guess budgets are full again"), "{out}");
    assert!(!mg.cli(&["user", "unlock", "nobody@example.com"]).status.success());
}

/// Issue 13 item 12: `--label $'\u202egnp.exe'` ("exe.png" on screen) and labels with other
/// invisible or control characters are refused with a message naming the character, and
/// nothing is created: through a running server and on the store directly.
#[test]
fn labels_with_bidi_invisible_or_control_characters_are_refused() {
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    for serving in [true, false] {
        if !serving {
            mg.stop();
        }
        for (label, why) in [
            ("\u{202e}gnp.exe", "the label contains U+202E, a bidirectional text control"),
            ("Lap\u{200b}top", "the label contains U+200B, an invisible formatting character"),
            ("Lap\u{1b}[8mtop", "the label contains U+001B, a control character"),
        ] {
            let out = mg.cli(&["app-password", "create", "alice@example.com", "--label", label]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "serving={serving} {label:?} was accepted: {stderr}");
            assert!(stderr.contains(why), "serving={serving} {label:?}: {stderr}");
            assert!(!stderr.contains('\u{202e}'), "the message reorders itself: {stderr:?}");
            assert!(!String::from_utf8_lossy(&out.stdout).contains("created app password"));
        }
        let list = mg.ok(&["app-password", "list", "alice@example.com"]);
        assert!(list.contains("has no app passwords"), "serving={serving}: {list}");
    }
}

#[test]
fn commands_work_without_a_server_and_survive_a_restart() {
    let mut mg = Mailgate::start(Options::default());
    mg.stop();
    mg.add_user("bob@example.com", "bob-account-pw");
    let pw = mg.app_password("bob@example.com", "Laptop", "imap,smtp");
    assert_eq!(pw.len(), 39);
    mg.restart();
    let list = mg.ok(&["app-password", "list", "bob@example.com"]);
    assert!(list.contains("Laptop") && list.contains("imap,smtp"), "{list}");
    let id = pw.replace(' ', "")[..6].to_string();
    mg.ok(&["app-password", "revoke", "bob@example.com", &id]);
    mg.stop();
    assert!(mg.ok(&["app-password", "list", "bob@example.com"]).contains("has no app passwords"));
    mg.ok(&["user", "remove", "bob@example.com"]);
    let out = cli_in(mg.dir.path(), &mg.config, &["user", "remove", "bob@example.com"], "");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown user"));
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let mg = Mailgate::start(Options::default());
    // Move the first one's socket away so the CLI cannot reach it; the store lock still holds.
    let out = std::process::Command::new(crate::support::mailgate::bin())
        .current_dir(mg.dir.path())
        .args(["--config", mg.config.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another mailgate process") || err.contains("lock"), "{err}");
}

#[test]
fn embedded_defaults_serve_with_no_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    // In a network namespace of its own (loopback only), so that the fixed default ports
    // cannot clash with anything else running on this machine.
    let mut child = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" serve"])
        .arg(crate::support::mailgate::bin())
        .current_dir(dir.path())
        .env_remove("MAILGATE_CONFIG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("mailgate serving") {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with {status}:\n{text}");
        }
        assert!(std::time::Instant::now() < deadline, "not serving after 20 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(dir.path().join("certs/cert.pem").exists() && dir.path().join("data/secret.key").exists());
    assert!(
        text.contains("embedded defaults") && text.contains("127.0.0.1:9993") && text.contains("127.0.0.1:9143"),
        "{text}"
    );
    let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM should end serve cleanly: {status}");
}

#[test]
fn init_never_replaces_half_a_certificate_pair() {
    let mg = Mailgate::start(Options::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    std::fs::copy(mg.dir.path().join("certs/mailgate-cert.pem"), dir.path().join("certs/cert.pem")).unwrap();
    let cfg = dir.path().join("mailgate.toml");
    std::fs::write(&cfg, "[imap]\nlisten_tls = []\nlisten_starttls = []\n").unwrap();
    let before = std::fs::read(dir.path().join("certs/cert.pem")).unwrap();
    let out = cli_in(dir.path(), &cfg, &["init"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("key.pem: missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("certs/cert.pem")).unwrap(), before);
}

#[test]
fn a_lost_totp_key_is_reported_not_replaced() {
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    mg.ok(&["totp", "enable", "alice@example.com"]);
    mg.stop();
    std::fs::remove_file(mg.dir.path().join("data/secret.key")).unwrap();
    let out = mg.cli(&["user", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("secret.key is missing") && err.contains("1 accounts have TOTP secrets"), "{err}");
    assert!(!mg.dir.path().join("data/secret.key").exists());
}

#[test]
fn store_export_and_import_round_trip() {
    // SECURITY.md cases 100 and 101: owner-only file, secrets still sealed, all valid after.
    let mut mg = Mailgate::start(Options::default());
    mg.add_user("alice@example.com", "alice-account-pw");
    let app = mg.app_password("alice@example.com", "Phone", "imap");
    let out = mg.ok(&["totp", "enable", "alice@example.com", "--secret", "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"]);
    assert!(out.contains("otpauth://"));
    let file = mg.dir.path().join("export.json");
    let out = mg.ok(&["store", "export", file.to_str().unwrap()]);
    assert!(out.contains("1 accounts, 1 app passwords"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("JBSWY3DPEHPK3PXP"), "the TOTP secret is in the clear");
    assert!(!text.contains(&app.replace(' ', "")), "an app password is in the clear");
    // Into a new data directory, with the old secret.key copied beside it.
    mg.stop();
    let data = mg.dir.path().join("data");
    std::fs::rename(&data, mg.dir.path().join("data-old")).unwrap();
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(mg.dir.path().join("data-old/secret.key"), data.join("secret.key")).unwrap();
    let out = mg.ok(&["store", "import", file.to_str().unwrap()]);
    assert!(out.contains("imported 1 accounts, 1 app passwords"), "{out}");
    let out = mg.cli(&["store", "import", file.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not empty"));
    let users = mg.ok(&["user", "list"]);
    assert!(
        users.contains("alice@example.com") && users.contains("2fa=on") && users.contains("app-passwords=1"),
        "{users}"
    );
    // The imported account keeps its TOTP state (commands run: the key is there).
    let out = mg.ok(&["totp", "enable", "alice@example.com"]);
    assert!(out.contains("re-enrolled"), "{out}");
    // And the imported app password logs in (no upstream here: the refusal is only
    // the upstream being down, after the password was accepted).
    mg.restart();
    let mut c =
        crate::support::client::Client::tls(mg.imaps, crate::support::client::tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a NO [UNAVAILABLE]"), "{r:?}");
    assert!(mg.log().contains("upstream login failed"), "the app password was not accepted");
}
