//! Narrow app passwords (issue 20) through mailgate to the real Dovecot: a read-only
//! password reads everything and changes nothing; a folder-limited one sees only its
//! folders. The mailbox is checked before and after with the unrestricted password.

use crate::imap_front::with_dovecot;
use crate::support::client::{Client, tls_config};
use crate::support::dovecot::Dovecot;
use crate::support::mailgate::Mailgate;
use std::process::Command;

const ALICE: &str = "alice@example.com";

fn login(mg: &Mailgate, password: &str) -> (Client, String) {
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    assert!(c.line().starts_with("* OK"));
    let r = c.cmd("l", &format!("LOGIN {ALICE} \"{password}\""));
    let ok = r.last().unwrap().clone();
    assert!(ok.starts_with("l OK"), "{r:?}\n{}", mg.log());
    (c, ok)
}

/// A narrow app password (the last line of `create`'s output) and the whole output.
fn create(mg: &Mailgate, args: &[&str]) -> (String, String) {
    let mut all = vec!["app-password", "create", ALICE, "--label", "narrow"];
    all.extend_from_slice(args);
    let out = mg.ok(&all);
    (out.lines().last().unwrap().to_string(), out)
}

/// Two messages in INBOX (one flagged), a folder `Archive` with one message; upstream's
/// hierarchy delimiter.
fn seed(dovecot: &Dovecot, mg: &Mailgate, full: &str) -> String {
    dovecot.deliver(ALICE, b"From: a@example.com\r\nSubject: one\r\n\r\nfirst\r\n");
    dovecot.deliver(ALICE, b"From: b@example.com\r\nSubject: two\r\n\r\nsecond\r\n");
    let (mut c, _) = login(mg, full);
    let r = c.cmd("d", "LIST \"\" \"\"");
    let delim = r[0].split('"').nth(1).unwrap_or("/").to_string();
    assert!(c.cmd("c", "CREATE Archive").last().unwrap().starts_with("c OK"));
    assert!(c.cmd("s", "SELECT INBOX").last().unwrap().starts_with("s OK"));
    assert!(c.cmd("f", "STORE 1 +FLAGS (\\Flagged)").last().unwrap().starts_with("f OK"));
    assert!(c.cmd("y", "COPY 2 Archive").last().unwrap().starts_with("y OK"));
    c.cmd("z", "LOGOUT");
    delim
}

/// What the unrestricted password sees: folders, subscriptions, each folder's messages
/// with UID, flags and size.
fn snapshot(mg: &Mailgate, full: &str) -> Vec<String> {
    let (mut c, _) = login(mg, full);
    let mut out = Vec::new();
    let keep = |lines: Vec<String>, out: &mut Vec<String>| {
        out.extend(lines.into_iter().filter(|l| l.starts_with("* ") && !l.starts_with("* OK") && !l.contains("RECENT")))
    };
    keep(c.cmd("a", "LIST \"\" \"*\""), &mut out);
    keep(c.cmd("b", "LSUB \"\" \"*\""), &mut out);
    for folder in ["INBOX", "Archive"] {
        keep(c.cmd("e", &format!("EXAMINE {folder}")), &mut out);
        keep(c.cmd("f", "FETCH 1:* (UID FLAGS RFC822.SIZE)"), &mut out);
    }
    c.cmd("z", "LOGOUT");
    out.sort();
    out
}

const PY_READ_ONLY: &str = r#"
import imaplib, ssl, sys
host, port, user, pw, ca = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx, timeout=30)
typ, data = m.login(user, pw)
assert typ == "OK", data
typ, caps = m.capability()
assert typ == "OK" and b"COMPRESS" not in caps[0], caps
typ, data = m.list()
assert typ == "OK" and any(b"Archive" in l for l in data), data
for folder in ("INBOX", "Archive"):
    typ, data = m.select(folder, readonly=True)
    assert typ == "OK", data
    typ, data = m.fetch("1:*", "(BODY[] FLAGS)")
    assert typ == "OK", data
    bodies = [d[1] for d in data if isinstance(d, tuple)]
    assert bodies and all(b"Subject:" in b for b in bodies), data
m.select("INBOX", readonly=True)
for name, call in [
    ("store", lambda: m.store("1", "+FLAGS", "\\Deleted")),
    ("copy", lambda: m.copy("1", "Archive")),
    ("create", lambda: m.create("Evil")),
    ("delete", lambda: m.delete("Archive")),
    ("rename", lambda: m.rename("Archive", "Evil")),
    ("subscribe", lambda: m.subscribe("Archive")),
    ("expunge", lambda: m.expunge()),
    ("append", lambda: m.append("INBOX", None, None, b"Subject: x\r\n\r\nx\r\n")),
]:
    typ, data = call()
    assert typ == "NO" and b"NOPERM" in data[0], (name, typ, data)
m.logout()
print("read-only ok")
"#;

/// Issue 20 point 1 end to end: imaplib reads every folder and message with a read-only
/// password; every writing command (plain, UID form, pipelined, with a synchronizing or
/// non-synchronizing literal) is `NO [NOPERM]`; COMPRESS is neither offered nor
/// accepted; a full `FETCH BODY[]` sets no `\Seen`; the mailbox on Dovecot is unchanged.
#[test]
fn a_read_only_app_password_reads_everything_and_changes_nothing() {
    let (dovecot, mg, full) = with_dovecot();
    seed(&dovecot, &mg, &full);
    let (ro, out) = create(&mg, &["--scope", "imap:read"]);
    assert!(out.contains("read-only"), "{out}");
    let listed = mg.ok(&["app-password", "list", ALICE, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert!(json["app_passwords"].as_array().unwrap().iter().any(|p| p["read_only"] == true), "{listed}");
    let before = snapshot(&mg, &full);
    assert!(before.iter().any(|l| l.contains("\\Flagged")), "{before:?}");

    let py = Command::new("python3")
        .args(["-c", PY_READ_ONLY, "localhost", &mg.imaps.port().to_string(), ALICE, &ro])
        .arg(&mg.ca)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "imaplib:\n{}\n{}\nmailgate log:\n{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr),
        mg.log()
    );

    let (mut c, ok) = login(&mg, &ro);
    assert!(ok.contains("[CAPABILITY") && !ok.contains("COMPRESS") && !ok.contains("MOVE"), "{ok}");
    let caps = c.cmd("k", "CAPABILITY");
    assert!(!caps[0].contains("COMPRESS") && caps[0].contains("IMAP4rev1"), "{caps:?}");
    let r = c.cmd("x", "COMPRESS DEFLATE");
    assert!(r.last().unwrap().starts_with("x NO"), "{r:?}");
    // SELECT goes upstream as EXAMINE.
    let sel = c.cmd("s", "SELECT INBOX");
    assert!(sel.last().unwrap().starts_with("s OK [READ-ONLY]"), "{sel:?}");
    let body = c.cmd("b", "FETCH 1:* BODY[]");
    assert!(body.last().unwrap().starts_with("b OK"), "{body:?}");
    let refused = [
        "STORE 1 +FLAGS (\\Deleted)",
        "UID STORE 1:* +FLAGS (\\Seen)",
        "COPY 1 Archive",
        "UID COPY 1:* Archive",
        "MOVE 1 Archive",
        "UID MOVE 1 Archive",
        "EXPUNGE",
        "UID EXPUNGE 1:*",
        "CREATE Evil",
        "DELETE Archive",
        "RENAME Archive Evil",
        "SUBSCRIBE Archive",
        "UNSUBSCRIBE INBOX",
    ];
    for (i, cmd) in refused.iter().enumerate() {
        let tag = format!("w{i}");
        let r = c.cmd(&tag, cmd);
        assert!(r.last().unwrap().starts_with(&format!("{tag} NO [NOPERM]")), "{cmd}: {r:?}");
    }
    // Pipelined, between passing commands, with both kinds of literal: the synchronizing
    // APPEND gets its NO before any `+`, so the client never sends its data.
    c.send(
        b"p1 NOOP\r\np2 STORE 1:* +FLAGS.SILENT (\\Deleted)\r\np3 APPEND INBOX {5+}\r\nhello\r\np4 EXPUNGE\r\n\
          p5 APPEND INBOX {5}\r\np6 UID MOVE 1:* Archive\r\np7 NOOP\r\n",
    );
    let lines = c.until("p7 ");
    for (tag, want) in [("p1", "OK"), ("p2", "NO [NOPERM]"), ("p3", "NO [NOPERM]"), ("p4", "NO [NOPERM]")] {
        assert!(lines.iter().any(|l| l.starts_with(&format!("{tag} {want}"))), "{tag}: {lines:?}");
    }
    for tag in ["p5", "p6"] {
        assert!(lines.iter().any(|l| l.starts_with(&format!("{tag} NO [NOPERM]"))), "{tag}: {lines:?}");
    }
    assert!(!lines.iter().any(|l| l.starts_with('+')), "a continuation for a refused APPEND: {lines:?}");
    c.cmd("z", "LOGOUT");

    // Pipelined behind LOGIN, in the same write: through the command filter too.
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    c.send(
        format!("l LOGIN {ALICE} \"{ro}\"\r\np SELECT INBOX\r\nq STORE 1:* +FLAGS (\\Deleted)\r\nr EXPUNGE\r\n")
            .as_bytes(),
    );
    // mailgate's own answers may come before upstream's (tags, not order, pair them).
    let mut lines = Vec::new();
    while !["l ", "p ", "q ", "r "].iter().all(|t| lines.iter().any(|l: &String| l.starts_with(t))) {
        lines.push(c.line());
    }
    for (tag, want) in [("l", "OK"), ("p", "OK [READ-ONLY]"), ("q", "NO [NOPERM]"), ("r", "NO [NOPERM]")] {
        assert!(lines.iter().any(|l| l.starts_with(&format!("{tag} {want}"))), "{tag}: {lines:?}");
    }
    c.cmd("z", "LOGOUT");

    // mbsync pulls every folder with the read-only password.
    mbsync_pull(&mg, &ro);

    // Nothing changed on Dovecot: folders, subscriptions, flags (no \Seen from the
    // full FETCHes), counts.
    let after = snapshot(&mg, &full);
    assert_eq!(before, after);
    assert!(!after.iter().any(|l| l.contains("FETCH") && l.contains("\\Seen")), "{after:?}");
}

/// Runs mbsync (Sync Pull, every folder) with `password`; both seeded folders arrive.
fn mbsync_pull(mg: &Mailgate, password: &str) {
    let dir = mg.dir.path();
    let cfg = dir.join("mbsyncrc");
    std::fs::create_dir_all(dir.join("mail")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "IMAPAccount mg\nHost localhost\nPort {port}\nUser {ALICE}\nPass \"{password}\"\nSSLType IMAPS\nCertificateFile {ca}\n\n\
             IMAPStore remote\nAccount mg\n\n\
             MaildirStore local\nPath {dir}/mail/\nInbox {dir}/mail/INBOX\nSubFolders Verbatim\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns *\nCreate Near\nSync Pull\nSyncState *\n",
            port = mg.imaps.port(),
            ca = mg.ca.display(),
            dir = dir.display()
        ),
    )
    .unwrap();
    let out = Command::new("mbsync").arg("-c").arg(&cfg).arg("-a").output().unwrap();
    assert!(
        out.status.success(),
        "mbsync: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mg.log()
    );
    for (folder, subject) in [("INBOX", "Subject: one"), ("Archive", "Subject: two")] {
        let mut found = false;
        for sub in ["new", "cur"] {
            for entry in std::fs::read_dir(dir.join("mail").join(folder).join(sub)).unwrap() {
                found |= String::from_utf8_lossy(&std::fs::read(entry.unwrap().path()).unwrap()).contains(subject);
            }
        }
        assert!(found, "{subject} did not arrive in {folder}");
    }
}

/// Issue 20 point 2 end to end: a password limited to INBOX and one subfolder lists only
/// those (with `*` and `%`), every other folder is `NO [NONEXISTENT]` and never named.
#[test]
fn a_folder_limited_app_password_sees_only_its_folders() {
    let (dovecot, mg, full) = with_dovecot();
    let d = seed(&dovecot, &mg, &full);
    let (mut c, _) = login(&mg, &full);
    for f in [format!("Shared{d}Tickets"), format!("Shared{d}Sales"), "Secret".to_string()] {
        assert!(c.cmd("c", &format!("CREATE \"{f}\"")).last().unwrap().starts_with("c OK"));
    }
    c.cmd("z", "LOGOUT");
    // Patterns are written with `/` whatever upstream's delimiter is.
    let (limited, out) = create(&mg, &["--scope", "imap", "--folders", "INBOX,Shared/Tickets"]);
    assert!(out.contains("folders INBOX|Shared/Tickets"), "{out}");
    let listed = mg.ok(&["app-password", "list", ALICE]);
    assert!(listed.contains("\tfolders INBOX|Shared/Tickets"), "{listed}");
    let (mut c, _) = login(&mg, &limited);
    let tickets = format!("Shared{d}Tickets");
    for pattern in ["*", "%", &format!("Shared{d}%")] {
        let r = c.cmd("l", &format!("LIST \"\" \"{pattern}\""));
        let all = r.join("\n");
        assert!(!all.contains("Secret") && !all.contains("Sales") && !all.contains("Archive"), "{pattern}: {all}");
        assert!(r.last().unwrap().starts_with("l OK"), "{r:?}");
        if pattern == "*" {
            assert!(all.contains("INBOX") && all.contains(&tickets), "{all}");
        }
    }
    // LSUB, and LIST with selection/return options (LIST-EXTENDED, LIST-STATUS: not
    // offered, refused), name no other folder either.
    for (tag, cmd) in [
        ("m", "LSUB \"\" \"*\"".to_string()),
        ("n", "LIST (SUBSCRIBED) \"\" \"*\" RETURN (STATUS (MESSAGES))".to_string()),
        ("o", "LIST \"\" \"*\" RETURN (CHILDREN)".to_string()),
    ] {
        let r = c.cmd(tag, &cmd);
        let all = r.join("\n");
        assert!(!all.contains("Secret") && !all.contains("Sales") && !all.contains("Archive"), "{cmd}: {all}");
    }
    let r = c.cmd("s", "SELECT Secret");
    assert!(r.last().unwrap().starts_with("s NO [NONEXISTENT]"), "{r:?}");
    let r = c.cmd("t", "STATUS Archive (MESSAGES)");
    assert!(r.last().unwrap().starts_with("t NO [NONEXISTENT]"), "{r:?}");
    let r = c.cmd("u", &format!("STATUS \"{tickets}\" (MESSAGES)"));
    assert!(r.last().unwrap().starts_with("u OK"), "{r:?}");
    assert!(c.cmd("v", "SELECT INBOX").last().unwrap().starts_with("v OK"));
    let r = c.cmd("w", "COPY 1 Archive");
    assert!(r.last().unwrap().starts_with("w NO [NONEXISTENT]"), "{r:?}");
    // Not read-only: a write inside the set passes.
    let r = c.cmd("x", &format!("COPY 1 \"{tickets}\""));
    assert!(r.last().unwrap().starts_with("x OK"), "{r:?}");
    // A synchronizing literal inside the set: upstream's `+` reaches the client, the data
    // goes up after it. IDLE and DONE likewise.
    let msg = "Subject: via literal\r\n\r\nbody\r\n";
    c.send(format!("ap APPEND \"{tickets}\" {{{}}}\r\n", msg.len()).as_bytes());
    assert!(c.line().starts_with('+'), "no continuation for the APPEND literal");
    c.send(format!("{msg}\r\n").as_bytes());
    let r = c.until("ap ");
    assert!(r.last().unwrap().starts_with("ap OK"), "{r:?}");
    let r = c.cmd("st", &format!("STATUS \"{tickets}\" (MESSAGES)"));
    assert!(r.iter().any(|l| l.contains("MESSAGES 2")), "{r:?}");
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with('+'), "no continuation for IDLE");
    c.send(b"DONE\r\n");
    assert!(c.until("i ").last().unwrap().starts_with("i OK"));
    c.cmd("z", "LOGOUT");
}

/// A read-only or folder-limited password cannot have the POP3 or ManageSieve scope
/// (those sessions are not filtered), nor send as another account's address.
#[test]
fn narrowings_that_cannot_hold_are_refused_at_create() {
    let (_dovecot, mg, _full) = with_dovecot();
    for args in [
        &["--scope", "imap:read,pop3"][..],
        &["--scope", "imap,sieve", "--folders", "INBOX"][..],
        &["--scope", "smtp", "--send-as", "boss@example.com"][..],
        &["--scope", "imap", "--send-to", "x@example.com"][..],
    ] {
        let mut all = vec!["app-password", "create", ALICE, "--label", "x"];
        all.extend_from_slice(args);
        let out = mg.cli(&all);
        assert!(!out.status.success(), "{args:?} was accepted: {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// Issue 20 point 3 end to end, to Dovecot submission: `--send-as` narrows the sender
/// policy to the named alias (the account's own address is refused now), `--send-to`
/// refuses other recipients with `550 5.7.1` naming the rule, and the per-hour quotas
/// answer `451 4.7.1` with when one frees up (messages at DATA, recipients at RCPT);
/// only the messages within the limits arrive.
#[test]
fn send_limited_app_password_through_dovecot_submission() {
    use crate::smtp::{cmd, login, message, smtps};
    use crate::support::mailgate::Options;
    use crate::support::submission::{Submission, SubmissionOptions};
    // Security notifications on (the quota's owner is told), the other kinds off so the
    // sink holds only the relayed messages and that one notice.
    let sub = Submission::start(SubmissionOptions::default());
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        notify: "enabled = true\nkinds_off = [\"app_password_created\", \"new_device\"]\n".into(),
        ..Default::default()
    });
    let out = mg.cli_stdin(
        &["user", "add", "alice@example.com", "--address", "Alias@Example.org", "--password-stdin"],
        "alice-account-pw\n",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (pw, out) = create(
        &mg,
        &[
            "--scope",
            "smtp",
            "--send-as",
            "alias@example.org",
            "--send-to",
            "boss@example.com,@example.net",
            "--max-messages",
            "2",
            "--max-recipients",
            "3",
        ],
    );
    assert!(out.contains("send as alias@example.org") && out.contains("at most 2 messages/hour"), "{out}");
    let mut c = smtps(&mg);
    login(&mut c, &pw);
    let r = cmd(&mut c, "MAIL FROM:<alice@example.com>");
    assert!(r[0].starts_with("553 5.7.1"), "{r:?}");
    assert!(cmd(&mut c, "MAIL FROM:<alias@example.org>")[0].starts_with("250"));
    let r = cmd(&mut c, "RCPT TO:<eve@example.org>");
    assert!(r[0].starts_with("550 5.7.1") && r[0].contains("boss@example.com, @example.net"), "{r:?}");
    for (i, to) in ["bob@example.net", "carol@example.net"].iter().enumerate() {
        if i > 0 {
            assert!(cmd(&mut c, "MAIL FROM:<alias@example.org>")[0].starts_with("250"));
        }
        let r = cmd(&mut c, &format!("RCPT TO:<{to}>"));
        assert!(r[0].starts_with("250"), "{to}: {r:?}");
        assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
        c.send(&message("alias@example.org", &format!("within quota {i}")));
        let r = cmd(&mut c, ".");
        assert!(r[0].starts_with("250"), "{r:?}\n{}", mg.log());
    }
    // The third message: its recipient is the third of three, the message over two.
    assert!(cmd(&mut c, "MAIL FROM:<alias@example.org>")[0].starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
    assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
    c.send(&message("alias@example.org", "over quota"));
    let r = cmd(&mut c, ".");
    assert!(r[0].starts_with("451 4.7.1") && r[0].contains("2 messages per hour") && r[0].contains("UTC"), "{r:?}");
    assert!(cmd(&mut c, "MAIL FROM:<alias@example.org>")[0].starts_with("250"));
    let r = cmd(&mut c, "RCPT TO:<bob@example.net>");
    assert!(r[0].starts_with("451 4.7.1") && r[0].contains("3 recipients per hour"), "{r:?}");
    assert!(cmd(&mut c, "QUIT")[0].starts_with("221"));
    // The two messages within the quota and the owner's notice (issue 20 point 3).
    sub.sink.wait_for_messages(3, std::time::Duration::from_secs(30));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let all = sub.sink.messages();
    let relayed: Vec<_> = all.iter().filter(|m| m.mail_from == "alias@example.org").collect();
    assert_eq!(relayed.len(), 2, "a message over the quota arrived: {all:?}");
    let notices: Vec<String> = all
        .iter()
        .filter(|m| m.mail_from != "alias@example.org")
        .map(|m| String::from_utf8_lossy(&m.data).to_string())
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("An app password reached its sending limit") && notices[0].contains("2 messages per hour"),
        "{}",
        notices[0]
    );
    assert!(!notices[0].contains(&pw.replace(' ', "")), "the notice carries the password");
    assert!(mg.log().contains("send quota reached"), "{}", mg.log());
}

/// Issue 20 point 3 with Postfix as the upstream (XCLIENT) and real clients: smtplib
/// sends the first message, swaks the rest. `--send-as` refuses the account's own
/// address (`553 5.7.1`), `--send-to` refuses a recipient outside the list with
/// `550 5.7.1` naming the rule, the third message in the hour gets `451 4.7.1` with when
/// one frees up; only the two allowed messages reach Postfix's relay sink.
#[test]
fn send_limited_app_password_through_postfix_with_swaks() {
    use crate::smtp::{message, smtplib, swaks};
    use crate::support::mailgate::Options;
    use crate::support::postfix::{Postfix, PostfixOptions};
    use std::time::Duration;
    let pf = Postfix::start(PostfixOptions::default());
    let mg = Mailgate::start(Options {
        smtp_upstream: format!("127.0.0.1:{}", pf.port),
        smtp_upstream_extra: "login = \"xclient\"\n".into(),
        ..Default::default()
    });
    let out = mg
        .cli_stdin(&["user", "add", ALICE, "--address", "Alias@Example.org", "--password-stdin"], "alice-account-pw\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (pw, out) = create(
        &mg,
        &["--scope", "smtp", "--send-as", "alias@example.org", "--send-to", "@example.net", "--max-messages", "2"],
    );
    assert!(out.contains("send as alias@example.org") && out.contains("at most 2 messages/hour"), "{out}");
    let swaks_to = |from: &str, to: &str, subject: &str| {
        let path = mg.dir.path().join(format!("{subject}.eml"));
        std::fs::write(&path, message(from, subject)).unwrap();
        let out = swaks(&mg, &pw, from, to, &path);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    // The account's own address is not among the ones this password may send as.
    let (ok, shown) = swaks_to(ALICE, "bob@example.net", "own address");
    assert!(!ok && shown.contains("553 5.7.1"), "{shown}");
    // First message: smtplib (to bob@example.net), within the rules.
    let out = smtplib(&mg, "starttls", &pw, "alias@example.org", &message("alias@example.org", "allowed 1"));
    assert!(out.status.success(), "{}\n{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log(), pf.log());
    // A recipient outside the list: refused at RCPT, the reply names the rule.
    let (ok, shown) = swaks_to("alias@example.org", "eve@example.org", "outside");
    assert!(!ok, "{shown}");
    let refusal = shown.lines().find(|l| l.contains("550 5.7.1")).unwrap_or_else(|| panic!("{shown}"));
    assert!(
        refusal.contains("<eve@example.org>") && refusal.contains("may send only to @example.net"),
        "the refusal does not name the rule: {refusal}"
    );
    // Second message: swaks, to another address of the allowed domain.
    let (ok, shown) = swaks_to("alias@example.org", "carol@example.net", "allowed 2");
    assert!(ok, "{shown}\n{}", mg.log());
    // Third message in the hour: over the quota, with when one frees up.
    let (ok, shown) = swaks_to("alias@example.org", "bob@example.net", "over quota");
    assert!(!ok, "{shown}");
    let refusal = shown.lines().find(|l| l.contains("451 4.7.1")).unwrap_or_else(|| panic!("{shown}"));
    assert!(refusal.contains("2 messages per hour") && refusal.contains("UTC"), "{refusal}");

    // Only the two allowed messages were relayed. The refused ones never reached
    // Postfix's DATA (mailgate answers before it), so a message sent afterwards with
    // an unrestricted password, once it has arrived, closes the count.
    let plain = mg.app_password(ALICE, "plain", "smtp");
    let out = smtplib(&mg, "starttls", &plain, ALICE, &message(ALICE, "closing the count"));
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), mg.log());
    let subject = |m: &crate::support::postfix::Delivered| {
        let text = String::from_utf8_lossy(&m.data).to_string();
        text.lines().find_map(|l| l.strip_prefix("Subject: ")).unwrap_or_default().to_string()
    };
    let mut got = pf.wait_for_messages(3, Duration::from_secs(120));
    while !got.iter().any(|m| subject(m) == "closing the count") {
        got = pf.wait_for_messages(got.len() + 1, Duration::from_secs(120));
    }
    let mut relayed: Vec<(String, String, Vec<String>)> =
        got.iter().map(|m| (subject(m), m.mail_from.clone(), m.rcpt_to.clone())).collect();
    relayed.sort();
    assert_eq!(
        relayed,
        vec![
            ("allowed 1".to_string(), "alias@example.org".to_string(), vec!["bob@example.net".to_string()]),
            ("allowed 2".to_string(), "alias@example.org".to_string(), vec!["carol@example.net".to_string()]),
            ("closing the count".to_string(), ALICE.to_string(), vec!["bob@example.net".to_string()]),
        ],
        "{}",
        pf.log()
    );
    assert!(pf.log().contains("sasl_username=alice@example.com"), "{}", pf.log());
    assert!(mg.log().contains("send quota reached"), "{}", mg.log());
}

/// The send quota is counted in the store: two mailgate nodes on one PostgreSQL store
/// share it. Here it is `[limits]`' default for every app password (one message per
/// hour): a plain app password sends once through node A, then is refused by node B.
#[test]
fn the_send_quota_is_shared_by_two_nodes_on_postgresql() {
    use crate::smtp::{cmd, login, message, smtps};
    use crate::support::mailgate::Options;
    use crate::support::postgres::Postgres;
    use crate::support::submission::{Submission, SubmissionOptions};
    let pg = Postgres::start();
    let sub = Submission::start(SubmissionOptions::default());
    let node = || {
        Mailgate::start(Options {
            smtp_upstream: format!("127.0.0.1:{}", sub.port),
            master_password: "master-password".into(),
            extra_sections: format!("[store]\nbackend = \"postgres\"\nurl = \"{}\"\n", pg.url()),
            limits: "auth_failure_delay_ms = 200\napp_password_max_messages_per_hour = 1\n".into(),
            ..Default::default()
        })
    };
    let (a, b) = (node(), node());
    a.add_user(ALICE, "alice-account-pw");
    let pw = a.app_password(ALICE, "plain", "smtp");
    let send = |mg: &Mailgate| {
        let mut c = smtps(mg);
        login(&mut c, &pw);
        assert!(cmd(&mut c, &format!("MAIL FROM:<{ALICE}>"))[0].starts_with("250"));
        assert!(cmd(&mut c, "RCPT TO:<bob@example.net>")[0].starts_with("250"));
        assert!(cmd(&mut c, "DATA")[0].starts_with("354"));
        c.send(&message(ALICE, "quota"));
        let r = cmd(&mut c, ".");
        cmd(&mut c, "QUIT");
        r[0].clone()
    };
    let first = send(&a);
    assert!(first.starts_with("250"), "{first}\n{}", a.log());
    let second = send(&b);
    assert!(second.starts_with("451 4.7.1") && second.contains("1 messages per hour"), "{second}\n{}", b.log());
    sub.sink.wait_for_messages(1, std::time::Duration::from_secs(20));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(sub.sink.messages().len(), 1);
}

/// The real Thunderbird with a read-only IMAP password: the folder list and INBOX sync
/// pass through the filtered session; sending fails cleanly (the password has no SMTP
/// scope) and nothing arrives.
#[test]
fn thunderbird_syncs_read_only_and_cannot_send() {
    use crate::support::mailgate::Options;
    use crate::support::submission::{Submission, SubmissionOptions};
    assert!(crate::support::thunderbird::script().exists(), "thunderbird.py is missing");
    let dovecot = Dovecot::start(crate::support::dovecot::DovecotOptions::default());
    let sub = Submission::start(SubmissionOptions::default());
    let mg = Mailgate::start(Options {
        upstream: format!("127.0.0.1:{}", dovecot.port),
        smtp_upstream: format!("127.0.0.1:{}", sub.port),
        master_password: "master-password".into(),
        ..Default::default()
    });
    mg.add_user(ALICE, "alice-account-pw");
    let full = mg.app_password(ALICE, "full", "imap");
    seed(&dovecot, &mg, &full);
    // Thunderbird creates a Trash folder when there is none (a read-only password gets
    // NO [NOPERM] for that, and Thunderbird reports the folder step failed) and shows
    // subscribed folders only.
    let (mut c, _) = login(&mg, &full);
    for (tag, cmd) in [("t", "CREATE Trash"), ("u", "SUBSCRIBE Trash"), ("v", "SUBSCRIBE Archive")] {
        assert!(c.cmd(tag, cmd).last().unwrap().starts_with(&format!("{tag} OK")));
    }
    c.cmd("z", "LOGOUT");
    let before = snapshot(&mg, &full);
    let (ro, _) = create(&mg, &["--scope", "imap:read"]);
    let (imaps, submission) = (mg.imaps.port().to_string(), mg.submission.port().to_string());
    let out = crate::support::thunderbird::run(&[
        "--imap-host",
        "127.0.0.1",
        "--imap-port",
        &imaps,
        "--imap-security",
        "ssl",
        "--smtp-host",
        "127.0.0.1",
        "--smtp-port",
        &submission,
        "--smtp-security",
        "starttls",
        "--user",
        ALICE,
        "--password",
        &ro,
        "--to",
        "bob@example.net",
        "--no-bad-password",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS imap-folders") && stdout.contains("PASS imap-inbox"), "{stdout}\n{}", mg.log());
    assert!(stdout.contains("Archive") && stdout.contains("Trash"), "{stdout}");
    assert!(stdout.contains("FAIL smtp-send"), "{stdout}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(sub.sink.messages().is_empty(), "a message was sent with a password without SMTP");
    let after = snapshot(&mg, &full);
    assert_eq!(before, after, "Thunderbird changed the mailbox through a read-only password");
}
