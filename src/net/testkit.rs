//! In-process connection tests: the IMAP, SMTP and POP3 fronts served over
//! `tokio::io::duplex`, with a scripted upstream on loopback. (The binary is tested
//! end to end against real Dovecot and Postfix in `tests/`.)

use crate::auth::Authenticator;
use crate::config::Config;
use crate::live::LiveSessions;
use crate::net::gate::Gate;
use crate::net::imap::ImapService;
use crate::net::pop3::Pop3Service;
use crate::net::sieve::SieveService;
use crate::net::smtp::SmtpService;
use crate::net::upstream::{Connector, ImapUpstream, Pop3Upstream, SieveUpstream};
use crate::store::{Account, Store};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio_rustls::TlsAcceptor;

pub const USER: &str = "alice@example.com";
pub const PASSWORD: &str = "correct horse battery staple";
pub const CLIENT: &str = "192.0.2.7:50000";
pub const LOCAL: &str = "127.0.0.1:993";

/// A scripted upstream IMAP server: logs everyone in, answers every other command `OK`
/// and records the lines it got after the login.
pub struct FakeImap {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl FakeImap {
    pub async fn start() -> FakeImap {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(fake_imap_session(tcp, log.clone()));
            }
        });
        FakeImap { addr, seen }
    }
}

async fn fake_imap_session(tcp: tokio::net::TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let _ = w.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] fake ready\r\n").await;
    let mut logged_in = false;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let tag = line.split(' ').next().unwrap_or("*").to_string();
        let upper = line.to_ascii_uppercase();
        let reply = if !logged_in && upper.contains(" ID ") {
            format!("* ID NIL\r\n{tag} OK ID done\r\n")
        } else if !logged_in && (upper.contains(" AUTHENTICATE ") || upper.contains(" LOGIN ")) {
            logged_in = true;
            format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
        } else {
            seen.lock().unwrap().push(line.clone());
            if upper.contains(" LOGOUT") {
                let _ = w.write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes()).await;
                return;
            }
            format!("{tag} OK done\r\n")
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A scripted line-by-line upstream server: sends `greeting`, answers each line with
/// what `reply` says (the connection ends after a [`Reply::Last`]), and records every line
/// it got (the login lines included: the tests check who mailgate logged in as).
pub struct FakeLines {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

/// A [`FakeLines`] answer to one line.
pub enum Reply {
    /// Answer and read on.
    Line(&'static str),
    /// Answer and close.
    Last(&'static str),
}

impl FakeLines {
    pub async fn start(greeting: &'static str, reply: fn(&str) -> Reply) -> FakeLines {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(fake_session(tcp, greeting, reply, log.clone()));
            }
        });
        FakeLines { addr, seen }
    }

    /// The lines seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn fake_session(
    tcp: tokio::net::TcpStream,
    greeting: &str,
    reply: fn(&str) -> Reply,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let _ = w.write_all(greeting.as_bytes()).await;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        seen.lock().unwrap().push(line.trim_end().to_string());
        let (text, last) = match reply(&line.to_ascii_uppercase()) {
            Reply::Line(text) => (text, false),
            Reply::Last(text) => (text, true),
        };
        if w.write_all(text.as_bytes()).await.is_err() || last {
            return;
        }
    }
}

/// A scripted upstream POP3 server (as Dovecot's pop3-login): accepts `XCLIENT` and every
/// login, answers every other command `+OK`.
pub struct FakePop3;

impl FakePop3 {
    pub async fn start() -> FakeLines {
        FakeLines::start("+OK fake POP3 ready.\r\n", |upper| {
            if upper.starts_with("AUTH ") || upper.starts_with("PASS ") {
                Reply::Line("+OK Logged in.\r\n")
            } else if upper.starts_with("QUIT") {
                Reply::Last("+OK Logging out.\r\n")
            } else {
                Reply::Line("+OK done\r\n")
            }
        })
        .await
    }
}

/// A scripted upstream ManageSieve server (as Pigeonhole's managesieve-login): lists
/// `XCLIENT`, accepts it and every `AUTHENTICATE`, answers every other command `OK`.
pub struct FakeSieve;

impl FakeSieve {
    pub async fn start() -> FakeLines {
        const LISTING: &str = "\"IMPLEMENTATION\" \"fake\"\r\n\"SIEVE\" \"fileinto vacation\"\r\n\"SASL\" \"PLAIN\"\r\n\
                               \"XCLIENT\"\r\n\"VERSION\" \"1.0\"\r\nOK \"fake ready.\"\r\n";
        FakeLines::start(LISTING, |upper| {
            if upper.starts_with("XCLIENT") {
                Reply::Line("OK \"Updated.\"\r\n")
            } else if upper.starts_with("AUTHENTICATE") {
                Reply::Line("OK \"Logged in.\"\r\n")
            } else if upper.starts_with("LOGOUT") {
                Reply::Last("OK \"Logout completed.\"\r\n")
            } else {
                Reply::Line("OK \"done\"\r\n")
            }
        })
        .await
    }
}

/// A scripted upstream submission server (XCLIENT, as Postfix): accepts every
/// command and message and records the messages.
pub struct FakeSmtp {
    pub addr: SocketAddr,
    pub messages: Arc<Mutex<Vec<String>>>,
}

impl FakeSmtp {
    pub async fn start() -> FakeSmtp {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let log = messages.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(fake_smtp_session(tcp, log.clone()));
            }
        });
        FakeSmtp { addr, messages }
    }
}

async fn fake_smtp_session(tcp: tokio::net::TcpStream, messages: Arc<Mutex<Vec<String>>>) {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let _ = w.write_all(b"220 fake ESMTP\r\n").await;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            "250-fake\r\n250-XCLIENT LOGIN ADDR PORT NAME\r\n250-8BITMIME\r\n250 SIZE 10000000\r\n".to_string()
        } else if upper.starts_with("XCLIENT") {
            "220 fake ESMTP\r\n".to_string()
        } else if upper.starts_with("DATA") {
            let _ = w.write_all(b"354 go ahead\r\n").await;
            let mut message = String::new();
            while !message.ends_with("\r\n.\r\n") {
                if r.read_line(&mut message).await.unwrap_or(0) == 0 {
                    return;
                }
            }
            messages.lock().unwrap().push(message);
            "250 2.0.0 queued\r\n".to_string()
        } else if upper.starts_with("QUIT") {
            let _ = w.write_all(b"221 2.0.0 bye\r\n").await;
            return;
        } else {
            "250 2.0.0 ok\r\n".to_string()
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Everything a front needs, on a temporary directory.
pub struct Kit {
    _dir: tempfile::TempDir,
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub live: LiveSessions,
    pub acceptor: TlsAcceptor,
    pub ca: std::path::PathBuf,
    /// What the services count (the hashing pool's gauges are registered once per
    /// service made).
    pub metrics: crate::metrics::Metrics,
    /// This mailgate's key: the OAuth access tokens are made and checked with it.
    pub key: Arc<crate::auth::crypto::SecretKey>,
}

impl Kit {
    /// `extra`: more TOML; the upstreams point at `upstream`.
    pub fn new(upstream: SocketAddr, extra: &str) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        crate::tls::ensure_dev_cert(&cert, &key, &["localhost".into()]).unwrap();
        let secret = dir.path().join("master.secret");
        std::fs::write(&secret, "master-pw\n").unwrap();
        let toml = format!(
            "{extra}\n[upstream.imap]\naddress = \"{upstream}\"\nmaster_password_file = \"{secret}\"\n\
             [upstream.smtp]\naddress = \"{upstream}\"\nlogin = \"xclient\"\n\
             [upstream.pop3]\naddress = \"{upstream}\"\nmaster_password_file = \"{secret}\"\nxclient = true\n\
             [upstream.sieve]\naddress = \"{upstream}\"\nmaster_password_file = \"{secret}\"\nxclient = true\n",
            secret = secret.display(),
        );
        let config = Arc::new(Config::from_toml_str(&toml, "test").unwrap());
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sled_store::SledStore::open(&dir.path().join("store")).unwrap());
        let hash = crate::auth::password::hash(PASSWORD.as_bytes()).unwrap();
        store.create_account(&Account { password_hash: Some(hash), ..Account::new(USER, 0) }).unwrap();
        let acceptor = TlsAcceptor::from(
            crate::tls::server_config(&crate::tls::CertStore::load(&cert, &key).unwrap(), &["imap", "smtp"]).unwrap(),
        );
        let metrics = crate::metrics::Metrics::new();
        let key = Arc::new(crate::auth::crypto::SecretKey::from_bytes(&[9; 32]).unwrap());
        Kit { config, store, live: LiveSessions::default(), acceptor, ca: cert, metrics, key, _dir: dir }
    }

    /// An OAuth access token of [`USER`] for `scopes`, as the web step's authorization and
    /// token endpoints would give Thunderbird one (code, then PKCE redemption).
    pub fn oauth_access_token(&self, scopes: &[crate::store::Scope]) -> String {
        use crate::auth::oauth::{Approved, Requester};
        const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        const REDIRECT: &str = "http://localhost:40123";
        let svc = crate::accounts::AccountService::new(
            self.store.clone(),
            self.key.clone(),
            "mail.example.test",
            crate::accounts::Actor::Web,
        );
        let approved = Approved {
            client_id: "thunderbird".into(),
            redirect_uri: REDIRECT.into(),
            code_challenge: CHALLENGE.into(),
            scopes: scopes.to_vec(),
        };
        let oauth = &self.config.oauth;
        let code = svc.oauth_issue_code(USER, &approved, oauth).unwrap();
        let client = oauth.client("thunderbird").unwrap();
        let from = Requester { ip: [192, 0, 2, 7].into(), user_agent: Some("Thunderbird 153".into()) };
        let tokens = svc.oauth_redeem_code(code.expose(), client, REDIRECT, VERIFIER, &from, oauth).unwrap();
        tokens.access_token.expose().to_string()
    }

    fn gate(&self) -> Gate {
        let auth =
            Authenticator::new(self.store.clone(), 1).with_metrics(self.metrics.clone()).with_oauth(self.key.clone());
        Gate::new(auth, self.live.clone(), self.config.app_password_url(), 10)
    }

    pub fn imap(&self) -> Arc<ImapService> {
        let connector = Connector::new(&self.config.upstream_imap, Duration::from_secs(30)).unwrap();
        Arc::new(ImapService {
            config: self.config.clone(),
            acceptor: self.acceptor.clone(),
            gate: self.gate(),
            upstream: ImapUpstream(Arc::new(connector)),
        })
    }

    pub fn pop3(&self) -> Arc<Pop3Service> {
        let up = self.config.upstream_pop3.as_ref().unwrap();
        let connector = Connector::new(up, Duration::from_secs(30)).unwrap();
        Arc::new(Pop3Service {
            config: self.config.clone(),
            acceptor: self.acceptor.clone(),
            gate: self.gate(),
            upstream: Pop3Upstream(Arc::new(connector)),
        })
    }

    pub fn sieve(&self) -> Arc<SieveService> {
        let up = self.config.upstream_sieve.as_ref().unwrap();
        let connector = Connector::new(up, Duration::from_secs(30)).unwrap();
        Arc::new(SieveService {
            config: self.config.clone(),
            acceptor: self.acceptor.clone(),
            gate: self.gate(),
            upstream: SieveUpstream::new(Arc::new(connector)),
        })
    }

    pub fn smtp(&self) -> Arc<SmtpService> {
        Arc::new(SmtpService {
            config: self.config.clone(),
            acceptor: self.acceptor.clone(),
            gate: self.gate(),
            upstream: Arc::new(Connector::new(&self.config.upstream_smtp, Duration::from_secs(30)).unwrap()),
            upstream_extensions: std::sync::RwLock::new(None),
        })
    }

    /// A TLS client for the front's certificate.
    pub fn tls_client(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(crate::tls::client_config(Some(&self.ca)).unwrap())
    }
}

/// A pipe: the server's end and the client's.
pub fn pipe() -> (DuplexStream, DuplexStream) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    (a, b)
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Reads until `want` has been seen (or the stream ends), up to 60 s (a hang guard).
pub async fn read_until<R: tokio::io::AsyncRead + Unpin>(r: &mut R, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(want) {
        match tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("nothing more after 60 s; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads to the end of the stream (hang guard 60 s).
pub async fn read_to_end<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}
