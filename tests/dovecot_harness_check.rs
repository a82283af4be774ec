// TEMPORARY: verifies tests/support/dovecot.rs; delete after it passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::dovecot::{Dovecot, DovecotOptions};

struct Imap {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Imap {
    fn connect(port: u16) -> (Imap, String) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut i = Imap { r: BufReader::new(s.try_clone().unwrap()), w: s };
        let g = i.line();
        (i, g)
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        print!("S: {l}");
        l
    }
    fn send(&mut self, raw: &[u8]) {
        println!("C: {}", String::from_utf8_lossy(raw).trim_end());
        self.w.write_all(raw).unwrap();
    }
    /// Send `tag cmd`, return all lines up to and including the tagged one.
    fn cmd(&mut self, tag: &str, cmd: &str) -> Vec<String> {
        self.send(format!("{tag} {cmd}\r\n").as_bytes());
        self.until(tag)
    }
    fn until(&mut self, tag: &str) -> Vec<String> {
        let mut v = Vec::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "EOF");
            let done = l.starts_with(&format!("{tag} "));
            v.push(l);
            if done {
                return v;
            }
        }
    }
}

fn tagged_ok(v: &[String]) -> bool {
    v.last().map(|l| l.split_whitespace().nth(1) == Some("OK")).unwrap_or(false)
}

fn b64(data: &[u8]) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    out.stdin.as_ref().unwrap().write_all(data).unwrap();
    let o = out.wait_with_output().unwrap();
    String::from_utf8(o.stdout).unwrap()
}

fn opts(tls: Option<(PathBuf, PathBuf)>) -> DovecotOptions {
    DovecotOptions {
        users: vec![
            ("alice@example.com".into(), "alice-password".into()),
            ("bob@example.com".into(), "b:ob pw".into()),
        ],
        master_user: "mailgate".into(),
        master_password: "masterpw".into(),
        tls,
    }
}

fn exercise(d: &Dovecot) {
    // master SASL PLAIN with ID first
    let (mut c, g) = Imap::connect(d.port);
    assert!(g.starts_with("* OK"), "{g}");
    assert!(tagged_ok(&c.cmd("a0", r#"ID ("x-originating-ip" "127.0.0.9" "x-originating-port" "5555")"#)));
    let sasl = b64(b"alice@example.com\0mailgate\0masterpw");
    let r = c.cmd("a1", &format!("AUTHENTICATE PLAIN {sasl}"));
    assert!(tagged_ok(&r), "{r:?}");
    let r = c.cmd("a2", "SELECT INBOX");
    assert!(tagged_ok(&r), "{r:?}");
    let msg = b"From: a@example.com\r\nSubject: test\r\n\r\nhello\r\n";
    c.send(format!("a3 APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes());
    let cont = c.line();
    assert!(cont.starts_with('+'), "{cont}");
    c.send(msg);
    c.send(b"\r\n");
    let r = c.until("a3");
    assert!(tagged_ok(&r), "{r:?}");
    assert!(tagged_ok(&c.cmd("a4", "LOGOUT")));

    assert!(
        d.wait_for_log("method=PLAIN, rip=127.0.0.9", Duration::from_secs(5)),
        "no rip=127.0.0.9 login line:\n{}",
        d.log()
    );
    assert!(d.log().contains("Master user logging in as alice@example.com"));

    // master LOGIN with separator
    let (mut c, _) = Imap::connect(d.port);
    let r = c.cmd("b1", r#"LOGIN "alice@example.com*mailgate" "masterpw""#);
    assert!(tagged_ok(&r), "{r:?}");
    let r = c.cmd("b2", "SELECT INBOX");
    assert!(r.iter().any(|l| l.contains("1 EXISTS")), "{r:?}");
    c.cmd("b3", "LOGOUT");

    // own password; bob's password needs {PLAIN.b64}
    let (mut c, _) = Imap::connect(d.port);
    assert!(tagged_ok(&c.cmd("c1", r#"LOGIN "alice@example.com" "alice-password""#)));
    c.cmd("c2", "LOGOUT");
    let (mut c, _) = Imap::connect(d.port);
    assert!(tagged_ok(&c.cmd("c1", r#"LOGIN "bob@example.com" "b:ob pw""#)));
    c.cmd("c2", "LOGOUT");

    // wrong passwords fail, and quickly (no auth penalty)
    for i in 0..3 {
        let t = Instant::now();
        let (mut c, _) = Imap::connect(d.port);
        let r = c.cmd("d1", r#"LOGIN "alice@example.com*mailgate" "wrong""#);
        assert!(!tagged_ok(&r));
        let sasl = b64(b"alice@example.com\0mailgate\0wrong");
        let r = c.cmd("d2", &format!("AUTHENTICATE PLAIN {sasl}"));
        assert!(!tagged_ok(&r));
        println!("failure round {i}: {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(3), "auth failures too slow: {:?}", t.elapsed());
    }
    // and a good login right after is not delayed
    let t = Instant::now();
    let (mut c, _) = Imap::connect(d.port);
    assert!(tagged_ok(&c.cmd("e1", r#"LOGIN "alice@example.com*mailgate" "masterpw""#)));
    assert!(t.elapsed() < Duration::from_secs(1));
    c.cmd("e2", "LOGOUT");

    // maildir location/ownership, deliver()
    let md = d.maildir("alice@example.com");
    assert!(md.join("cur").is_dir(), "{}", md.display());
    assert_eq!(std::fs::metadata(&md).unwrap().uid(), 65534);
    d.deliver("alice@example.com", b"Subject: delivered\r\n\r\nx\r\n");
    d.deliver("carol@example.com", b"Subject: fresh\r\n\r\ny\r\n"); // maildir does not exist yet
    let (mut c, _) = Imap::connect(d.port);
    assert!(tagged_ok(&c.cmd("f1", r#"LOGIN "alice@example.com*mailgate" "masterpw""#)));
    let r = c.cmd("f2", "SELECT INBOX");
    assert!(r.iter().any(|l| l.contains("2 EXISTS")), "{r:?}");
    let r = c.cmd("f3", "FETCH 2 BODY.PEEK[HEADER.FIELDS (SUBJECT)]");
    assert!(r.iter().any(|l| l.contains("delivered")), "{r:?}");
    c.cmd("f4", "LOGOUT");

    // many concurrent sessions for the same user/ip
    let mut conns = Vec::new();
    for i in 0..60 {
        let (mut c, _) = Imap::connect(d.port);
        let r = c.cmd("g1", r#"LOGIN "alice@example.com*mailgate" "masterpw""#);
        assert!(tagged_ok(&r), "session {i}: {r:?}");
        conns.push(c);
    }
    drop(conns);

    let log = d.log();
    assert!(!log.contains("Error:") && !log.contains("Fatal:"), "errors in log:\n{log}");
}

fn procs_matching(pat: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let s = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if s.contains(pat) {
                v.push(format!("{}: {s}", e.file_name().to_string_lossy()));
            }
        }
    }
    v
}

fn check_stopped(d: Dovecot) {
    let pid = d.pid();
    let dir = d.dir.path().to_path_buf();
    let inst = format!("mailgate-test-{}", d.port);
    let t = Instant::now();
    drop(d);
    println!("drop took {:?}", t.elapsed());
    assert!(!PathBuf::from(format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    std::thread::sleep(Duration::from_millis(500));
    let left = procs_matching(&inst);
    assert!(left.is_empty(), "leftover processes: {left:?}");
}

#[test]
fn plain_and_tls() {
    // --- no TLS
    let d = Dovecot::start(opts(None));
    println!("plain: port {} pid {} dir {}", d.port, d.pid(), d.dir.path().display());
    assert!(d.tls_port.is_none());
    println!("{}", std::fs::read_to_string(d.config_path()).unwrap());
    assert_eq!(std::fs::metadata(d.dir.path()).unwrap().mode() & 0o777, 0o755);
    let (_c, g) = Imap::connect(d.port);
    assert!(!g.contains("STARTTLS"), "{g}");
    exercise(&d);
    println!("---- log ----\n{}", d.log());
    // a logged-in session open across the drop must be cut
    let (mut held, _) = Imap::connect(d.port);
    assert!(tagged_ok(&held.cmd("h1", r#"LOGIN "alice@example.com*mailgate" "masterpw""#)));
    assert!(tagged_ok(&held.cmd("h2", "SELECT INBOX")));
    check_stopped(d);
    let mut rest = String::new();
    let n = held.r.read_line(&mut rest);
    println!("held session after drop: {n:?} {rest:?}");
    assert!(matches!(n, Ok(0)) || n.is_err() || rest.starts_with("* BYE"), "{n:?} {rest:?}");
    drop(_c);

    // --- TLS
    let certdir = tempfile::tempdir().unwrap();
    let cert = certdir.path().join("cert.pem");
    let key = certdir.path().join("key.pem");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "2",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let d = Dovecot::start(opts(Some((cert.clone(), key.clone()))));
    let tls_port = d.tls_port.unwrap();
    println!("tls: port {} tls_port {tls_port}", d.port);
    assert_ne!(d.port, tls_port);
    let (mut c, g) = Imap::connect(d.port);
    assert!(g.contains("STARTTLS"), "{g}");
    let r = c.cmd("t1", "CAPABILITY");
    assert!(r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    c.cmd("t2", "LOGOUT");
    TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    // real handshakes, verified against the cert
    for args in [
        vec!["-connect".to_string(), format!("127.0.0.1:{tls_port}")],
        vec!["-connect".to_string(), format!("127.0.0.1:{}", d.port), "-starttls".into(), "imap".into()],
    ] {
        let mut child = Command::new("openssl")
            .arg("s_client")
            .args(&args)
            .args(["-verify_return_error", "-verify_hostname", "localhost", "-CAfile"])
            .arg(&cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let sasl = b64(b"alice@example.com\0mailgate\0masterpw");
        std::thread::sleep(Duration::from_millis(700));
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(format!("x1 AUTHENTICATE PLAIN {sasl}\r\nx2 LOGOUT\r\n").as_bytes())
            .unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        println!("s_client {args:?}:\n{out}\n{err}");
        assert!(out.contains("x1 OK"), "{out}\n{err}");
        assert!(err.contains("Verification: OK") || out.contains("Verify return code: 0"), "{err}");
    }
    drop(certdir); // copies are used
    exercise(&d);
    assert!(d.wait_for_log(", TLS, session=", Duration::from_secs(5)), "{}", d.log());
    println!("---- log ----\n{}", d.log());
    check_stopped(d);
}

#[test]
fn parallel_instances() {
    let ds: Vec<Dovecot> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6).map(|_| s.spawn(|| Dovecot::start(DovecotOptions::default()))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for d in &ds {
        let (mut c, _) = Imap::connect(d.port);
        assert!(tagged_ok(&c.cmd("p1", r#"LOGIN "alice@example.com*mailgate" "master-password""#)));
        c.cmd("p2", "LOGOUT");
    }
    for d in ds {
        check_stopped(d);
    }
}

#[test]
#[ignore]
fn start_failure_message() {
    let r = std::panic::catch_unwind(|| Dovecot::start(DovecotOptions::default()));
    let e = r.err().expect("must fail");
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    println!("PANIC MESSAGE:\n{msg}");
    assert!(msg.contains("dovecot failed to start") && msg.contains("fake-dovecot: broken"), "{msg}");
}
