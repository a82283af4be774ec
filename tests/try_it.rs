//! The README's first command, `scripts/try.sh` (issue 15, item 1), run as a newcomer
//! would, but with the debug binary (`MAILGATE_BIN`), a fresh directory and free ports.
//! What it prints is all the test knows. With that, swaks sends through mailgate's
//! submission port and Python's imaplib reads the message back through its IMAPS port;
//! the real Thunderbird (`../shared/tools/thunderbird.py`) reads and sends; the printed
//! web-step URL and account password sign in, and that password works over IMAP too.
//! Then SIGINT to the script must stop everything it started.

use crate::support::daemon::{pick_ports, poll, signal, tail, temp_dir};
use crate::support::mailgate::{bin, webclient};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the script may take from start to "Press Ctrl-C" (init, two argon2 hashes,
/// Dovecot and mailgate starting; the binary is prebuilt).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The running script; stopped (SIGINT, then SIGKILL of everything of its directory) on drop.
struct Try {
    child: Child,
    dir: tempfile::TempDir,
    /// Everything it printed so far (stdout and stderr, in order of arrival per stream).
    output: Arc<Mutex<String>>,
    /// Names that mark its processes in /proc/PID/cmdline.
    marks: Vec<String>,
}

impl Try {
    fn start(ports: &HashMap<&'static str, u16>) -> Try {
        let dir = temp_dir("mailgate-try-").unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/try.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .env("MAILGATE_BIN", bin())
            .env("TRY_DIR", dir.path())
            .env("NO_INSTALL", "1")
            .env_remove("ACCOUNT_PASSWORD")
            .env_remove("PORT_BASE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in ports {
            cmd.env(k, v.to_string());
        }
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for stream in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let marks = vec![dir.path().display().to_string(), format!("mailgate-dev-{}/", ports["DOVECOT_IMAP_PORT"])];
        Try { child, dir, output, marks }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the last line of the instructions; panics with the output if the
    /// script ends or takes too long.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = self.output();
            if out.contains("Press Ctrl-C to stop everything.") {
                return out;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!("scripts/try.sh ended ({status}) before it was ready:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "scripts/try.sh not ready after {READY_TIMEOUT:?}:\n{out}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// PIDs of live processes whose command line names this try (its directory, or its
    /// Dovecot instance), apart from the script itself.
    fn processes(&self) -> Vec<(u32, String)> {
        let me = self.child.id();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if pid == me || pid == std::process::id() {
                continue;
            }
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            // Zombies have an empty command line; they are gone as far as this test goes.
            if self.marks.iter().any(|m| cmdline.contains(m.as_str())) {
                found.push((pid, cmdline.trim().to_string()));
            }
        }
        found
    }
}

impl Drop for Try {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(&[self.child.id()], "INT");
            poll(Duration::from_secs(20), || !matches!(self.child.try_wait(), Ok(None)));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let left: Vec<u32> = self.processes().into_iter().map(|(p, _)| p).collect();
        if !left.is_empty() {
            signal(&left, "KILL");
        }
    }
}

/// The value after `label` on the first line that starts (after indentation) with it.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(label))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no line starting with {label:?} in:\n{out}"))
}

/// `IMAP   hostname localhost   port 10993   SSL/TLS   Normal password` → (host, port, security).
fn server(out: &str, label: &str) -> (String, u16, String) {
    let words: Vec<&str> = field(out, label).split_whitespace().collect();
    let at = |w: &str| words.iter().position(|x| *x == w).map(|i| words[i + 1]).unwrap();
    (at("hostname").to_string(), at("port").parse().unwrap(), words[5].to_string())
}

/// Polls alice's INBOX over IMAPS (certificate checked against `ca` for `host`) until a
/// message whose subject contains `subject` is there; prints its count.
const PY_READ: &str = r#"
import imaplib, ssl, sys, time
host, port, ca, user, password, subject = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=ca)
deadline = time.time() + 20
while True:
    m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx)
    m.login(user, password)
    typ, count = m.select("INBOX", readonly=True)
    data = []
    if count[0] != b"0":
        typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    m.logout()
    found = [d for d in data if isinstance(d, tuple) and subject.encode() in d[1]]
    if found or time.time() > deadline:
        print(f"found {len(found)}")
        sys.exit(0 if found else 1)
    time.sleep(0.3)
"#;

fn read_back(host: &str, port: u16, ca: &Path, password: &str, subject: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", PY_READ, host, &port.to_string()])
        .arg(ca)
        .args(["alice@example.com", password, subject])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imaplib did not find {subject:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn try_sh_gives_a_setup_that_reads_and_sends_and_stops_on_ctrl_c() {
    assert!(crate::support::thunderbird::script().exists(), "thunderbird.py is missing");
    let names = [
        "IMAPS_PORT",
        "IMAP_PORT",
        "SMTPS_PORT",
        "SMTP_PORT",
        "WEB_PORT",
        "DOVECOT_IMAP_PORT",
        "DOVECOT_SUBMISSION_PORT",
        "DELIVERY_PORT",
    ];
    let ports: HashMap<&'static str, u16> = names.into_iter().zip(pick_ports(names.len()).unwrap()).collect();
    let mut t = Try::start(&ports);
    let out = t.wait_ready();
    let fail = |what: &str, detail: &str, t: &Try| -> String {
        let log = |p: &str| std::fs::read_to_string(t.dir.path().join(p)).unwrap_or_default();
        format!(
            "{what}\n{detail}\n--- try.sh ---\n{}\n--- mailgate.log ---\n{}\n--- dovecot.log ---\n{}\n--- dovecot.out ---\n{}",
            t.output(),
            tail(&log("mailgate.log"), 40),
            tail(&log("dovecot/dovecot.log"), 40),
            tail(&log("dovecot.out"), 20)
        )
    };

    // What it printed: the ports it was given, and the passwords.
    let user = field(&out, "Email address");
    assert_eq!(user, "alice@example.com");
    let app = field(&out, "Password").split("   ").next().unwrap().trim().to_string();
    assert_eq!(app.replace(' ', "").len(), 32, "app password {app:?}");
    let account = field(&out, "Account password").to_string();
    let (imap_host, imaps_port, imap_sec) = server(&out, "Incoming server");
    let (smtp_host, smtps_port, smtp_sec) = server(&out, "Outgoing server");
    assert_eq!((imaps_port, imap_sec.as_str()), (ports["IMAPS_PORT"], "SSL/TLS"));
    assert_eq!((smtps_port, smtp_sec.as_str()), (ports["SMTPS_PORT"], "SSL/TLS"));
    let also = field(&out, "Also offered:");
    assert!(
        also.contains(&format!("IMAP on port {}", ports["IMAP_PORT"]))
            && also.contains(&format!("SMTP on port {}", ports["SMTP_PORT"]))
            && also.contains("STARTTLS"),
        "{also}"
    );
    let web = field(&out, "Web step:").split_whitespace().next().unwrap().to_string();
    assert_eq!(web, format!("https://localhost:{}/", ports["WEB_PORT"]));
    assert_eq!(field(&out, "Sign in as"), "alice@example.com");
    // The configuration was written from those ports.
    let conf = std::fs::read_to_string(t.dir.path().join("mailgate.toml")).unwrap();
    for (key, port) in [
        ("listen_tls = [\"127.0.0.1:", ports["IMAPS_PORT"]),
        ("address = \"127.0.0.1:", ports["DOVECOT_IMAP_PORT"]),
        ("address = \"127.0.0.1:", ports["DOVECOT_SUBMISSION_PORT"]),
        ("public_url = \"https://localhost:", ports["WEB_PORT"]),
    ] {
        assert!(conf.contains(&format!("{key}{port}")), "{key}{port} not in\n{conf}");
    }
    let ca: PathBuf = t.dir.path().join("certs/cert.pem");
    assert!(!t.processes().is_empty(), "{}", fail("no processes of the try found", "", &t));

    // swaks sends through the submission port (STARTTLS), imaplib reads it back.
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let subject = format!("try.sh swaks {stamp}");
    let sent = Command::new("swaks")
        .args(["--server", &format!("{smtp_host}:{}", ports["SMTP_PORT"]), "--tls"])
        .args(["--auth", "PLAIN", "--auth-user", user, "--auth-password", &app])
        .args(["--from", user, "--to", user, "--header", &format!("Subject: {subject}")])
        .args(["--body", "sent by the try_it test"])
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", fail("swaks failed", &String::from_utf8_lossy(&sent.stdout), &t));
    assert_eq!(read_back(&imap_host, imaps_port, &ca, &app, &subject), "found 1");

    // The account password (no two-step verification yet) works too, as printed.
    assert_eq!(read_back(&imap_host, imaps_port, &ca, &account, &subject), "found 1");

    // The web step: the printed URL and account password sign in.
    let signed_in = webclient(ports["WEB_PORT"], &ca, user, &account, &["signin", "account"])
        .unwrap_or_else(|e| panic!("{}", fail("web step sign-in failed", &e, &t)));
    assert_eq!(signed_in["signin"][0], 303, "{signed_in}");
    assert!(signed_in["account_page"].as_str().is_some_and(|p| p.contains(user)), "{signed_in}");

    // Thunderbird with exactly the printed settings: reads, sends (to alice herself).
    let sec = |s: &str| if s == "SSL/TLS" { "ssl" } else { "starttls" }.to_string();
    let (imap_sec, smtp_sec) = (sec(&imap_sec), sec(&smtp_sec));
    let (imaps, smtps) = (imaps_port.to_string(), smtps_port.to_string());
    let tb_out = crate::support::thunderbird::run(&[
        "--imap-host",
        &imap_host,
        "--imap-port",
        &imaps,
        "--imap-security",
        &imap_sec,
        "--smtp-host",
        &smtp_host,
        "--smtp-port",
        &smtps,
        "--smtp-security",
        &smtp_sec,
        "--user",
        user,
        "--password",
        &app,
        "--to",
        user,
        "--no-bad-password",
    ]);
    let tb_stdout = String::from_utf8_lossy(&tb_out.stdout);
    assert!(
        tb_out.status.success() && tb_stdout.contains("PASS smtp-send") && tb_stdout.contains("PASS imap-inbox"),
        "{}",
        fail("Thunderbird failed", &format!("{tb_stdout}{}", String::from_utf8_lossy(&tb_out.stderr)), &t)
    );
    // Thunderbird saw swaks' message (and, when it has arrived by then, the security
    // notification about the new app password, [notify] being on by default), and its own
    // arrived in INBOX.
    assert!(tb_stdout.contains("INBOX has 1 messages") || tb_stdout.contains("INBOX has 2 messages"), "{tb_stdout}");
    assert_eq!(read_back(&imap_host, imaps_port, &ca, &app, "try.sh swaks"), "found 1");
    assert_eq!(read_back(&imap_host, imaps_port, &ca, &app, "tb-harness"), "found 1");

    // Ctrl-C: the script stops everything it started, then ends.
    let before = t.processes();
    assert!(before.iter().any(|(_, c)| c.contains("serve")), "{before:?}");
    assert!(before.iter().any(|(_, c)| c.contains("dovecot -F")), "{before:?}");
    assert!(before.iter().any(|(_, c)| c.contains("dev-deliver.py")), "{before:?}");
    assert!(signal(&[t.child.id()], "INT"));
    assert!(
        poll(Duration::from_secs(30), || !matches!(t.child.try_wait(), Ok(None))),
        "{}",
        fail("try.sh still runs 30 s after SIGINT", "", &t)
    );
    let status = t.child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{}", t.output());
    std::thread::sleep(Duration::from_millis(200));
    assert!(t.output().contains("try: stopped"), "{}", t.output());
    let left = t.processes();
    assert!(left.is_empty(), "{}", fail("left running after Ctrl-C", &format!("{left:?}\nbefore: {before:?}"), &t));
}
