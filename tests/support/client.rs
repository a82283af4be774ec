//! A small blocking IMAP test client over plain TCP or real TLS (rustls), for byte-exact
//! scripts. Every read has a timeout, so a hang fails the test instead of blocking CI.

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default wait for an expected line: a hang guard, not a measurement. A wait ends as
/// soon as the line comes; 30 s leaves room for a machine loaded far beyond its cores
/// (the suite must pass under `nice` beside `stress-ng --cpu 4` on 2 cores).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The wait for something the server does at once (a close after an error, a goodbye, a
/// log line of an upstream server): it ends when that happens, normally within
/// milliseconds, so 20 s costs nothing on a good day and survives a loaded machine. It
/// stays below the 30 s TLS-handshake and 60 s pre-auth deadlines that would close a
/// connection anyway, so a test that waits this long still proves what closed it.
pub const PROMPTLY: Duration = Duration::from_secs(20);

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Gone,
}

/// One client connection.
pub struct Client {
    conn: Conn,
    buf: Vec<u8>,
    /// Everything read so far (for assertions about what was ever sent).
    pub transcript: Vec<u8>,
}

/// A rustls client config trusting `ca` (PEM) and offering `alpn`.
pub fn tls_config(ca: &Path, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

fn wrap(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Conn> {
    wrap_named(tcp, cfg, "localhost")
}

fn wrap_named(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>, name: &str) -> std::io::Result<Conn> {
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from(name.to_string()).unwrap())
        .map_err(std::io::Error::other)?;
    // Drive the handshake now so that a refusal shows up here. A loaded machine (CI runs
    // tests in parallel on 2 cores) may take longer than the short read timeout the
    // scripts use afterwards, so the handshake gets at least TIMEOUT.
    let after = tcp.read_timeout()?;
    if after.is_some_and(|t| t < TIMEOUT) {
        tcp.set_read_timeout(Some(TIMEOUT))?;
    }
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    s.sock.set_read_timeout(after)?;
    Ok(Conn::Tls(Box::new(s)))
}

impl Client {
    /// Plain TCP.
    pub fn plain(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Client { conn: Conn::Plain(tcp), buf: Vec::new(), transcript: Vec::new() }
    }

    /// TLS from the first byte; `Err` if the handshake fails.
    pub fn tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Client { conn: wrap(tcp, cfg)?, buf: Vec::new(), transcript: Vec::new() })
    }

    /// TLS from the first byte, waiting up to `wait` (more than [`TIMEOUT`]) for the
    /// handshake: a server under a deliberate storm.
    pub fn tls_patient(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, wait: Duration) -> std::io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        tcp.set_read_timeout(Some(wait))?;
        let conn = wrap(tcp, cfg)?;
        let client = Client { conn, buf: Vec::new(), transcript: Vec::new() };
        if let Conn::Tls(s) = &client.conn {
            s.sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        }
        Ok(client)
    }

    /// [`Client::tls_patient`] over a connection already made (e.g. from a chosen source
    /// address).
    pub fn tls_patient_over(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>, wait: Duration) -> std::io::Result<Client> {
        tcp.set_read_timeout(Some(wait))?;
        let conn = wrap(tcp, cfg)?;
        let client = Client { conn, buf: Vec::new(), transcript: Vec::new() };
        if let Conn::Tls(s) = &client.conn {
            s.sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        }
        Ok(client)
    }

    /// TLS over a connection already made (e.g. after writing a PROXY header on it).
    pub fn tls_over(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Client> {
        tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Client { conn: wrap(tcp, cfg)?, buf: Vec::new(), transcript: Vec::new() })
    }

    /// TLS with SNI `name` (an IP address sends no SNI).
    pub fn tls_named(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, name: &str) -> std::io::Result<Client> {
        let tcp = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Client { conn: wrap_named(tcp, cfg, name)?, buf: Vec::new(), transcript: Vec::new() })
    }

    /// Switches a plain connection to TLS (after a STARTTLS OK). Buffered unread bytes are
    /// returned: they were sent in plaintext after the OK.
    pub fn starttls(&mut self, cfg: Arc<rustls::ClientConfig>) -> Vec<u8> {
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else { panic!("not plain") };
        self.conn = wrap(tcp, cfg).unwrap();
        std::mem::take(&mut self.buf)
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        match &mut self.conn {
            Conn::Plain(s) => s.write_all(bytes).unwrap(),
            Conn::Tls(s) => {
                s.write_all(bytes).unwrap();
                s.flush().unwrap();
            }
            Conn::Gone => panic!("closed"),
        }
    }

    /// Sends raw bytes, ignoring a connection the server already closed.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = match &mut self.conn {
            Conn::Plain(s) => s.write_all(bytes),
            Conn::Tls(s) => s.write_all(bytes).and_then(|_| s.flush()),
            Conn::Gone => Ok(()),
        };
    }

    /// One read attempt: Ok(0) = closed, Err(WouldBlock/TimedOut) = nothing yet.
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = match &mut self.conn {
            Conn::Plain(s) => s.read(&mut tmp)?,
            Conn::Tls(s) => s.read(&mut tmp)?,
            Conn::Gone => 0,
        };
        self.buf.extend_from_slice(&tmp[..n]);
        self.transcript.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// The next line (without CRLF), or `None` if the server closed or `wait` passed.
    pub fn line_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8_lossy(&line[..pos]).into_owned());
            }
            if Instant::now() > deadline {
                return None;
            }
            match self.fill() {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    }

    /// The next line; panics if none comes within [`TIMEOUT`].
    pub fn line(&mut self) -> String {
        self.line_within(TIMEOUT).expect("expected a line from the server")
    }

    /// Reads lines until one starts with `prefix`; returns all of them.
    pub fn until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            let done = l.starts_with(prefix);
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// Sends a command line and returns every line up to its tagged reply.
    pub fn cmd(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes());
        self.until(&format!("{tag} "))
    }

    /// Exactly `n` bytes (for literals).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let deadline = Instant::now() + TIMEOUT;
        while self.buf.len() < n {
            assert!(Instant::now() < deadline, "timed out reading {n} bytes");
            match self.fill() {
                Ok(0) => panic!("closed while reading {n} bytes"),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("{e}"),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// True if the server closes the connection within `wait` (any unread lines are skipped).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.fill() {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// The server's leaf certificate (DER), on a TLS connection.
    pub fn peer_leaf(&self) -> Option<Vec<u8>> {
        match &self.conn {
            Conn::Tls(s) => s.conn.peer_certificates()?.first().map(|c| c.to_vec()),
            _ => None,
        }
    }

    /// Everything received and not yet read as lines.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}
