//! Test support: a tiny SMTP sink that records every accepted message byte for byte.
//! It also re-exports, under their old names here, the process/file helpers of
//! [`super::daemon`] that other tests use from this module (e.g. [`poll`]).
//!
//! The [`Sink`] is the relay host of the test Dovecot submission server and of the test
//! Postfix: whatever they accept ends up here as a [`Delivered`] with the exact
//! message bytes (dot-stuffing undone).
//!
//! Dialogue: `220` greeting; `EHLO` → `250` with `8BITMIME`, `SMTPUTF8`, `SIZE`,
//! `ENHANCEDSTATUSCODES` (no PIPELINING/CHUNKING/XCLIENT/AUTH/STARTTLS); `MAIL` and `RCPT`
//! → `250`; `DATA` → `354`, read until `CRLF.CRLF`, then `250`. `RSET`, `NOOP`, `QUIT`,
//! `HELO` are understood, anything else gets `502`. Several transactions per connection
//! and several connections at once are fine. The recipient [`REJECTED_RECIPIENT`] is
//! refused with [`REJECTED_REPLY`], so a refusal *by the relay host* can be tested.
//!
//! Only std.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The helpers submission.rs, postfix.rs and tests used from here before they moved to
// `daemon`; still part of this module's API.
#[allow(unused_imports)]
pub use super::daemon::{
    STOP_TIMEOUT, child_processes, chown, effective_uid, lookup_id, pick_ports, poll, proc_stat, set_mode, signal,
    smtp_greeting_ok, stop_child, tail, traversable_tmp,
};

use std::io::{BufRead, BufReader, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

/// The sink refuses this recipient (case-insensitive) with [`REJECTED_REPLY`].
pub const REJECTED_RECIPIENT: &str = "reject@example.com";
/// `RCPT TO:<reject@example.com>` gets exactly this reply line (without CRLF).
pub const REJECTED_REPLY: &str = "550 5.1.1 Recipient refused by the test sink";
/// Host name in the sink's greeting and EHLO reply. Must differ from the senders'
/// own names (Postfix refuses to talk to a server greeting with its own myhostname).
pub const SINK_HOSTNAME: &str = "sink.mailgate.test";

/// One message accepted by the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Address inside `MAIL FROM:<...>` (empty for the null sender).
    pub mail_from: String,
    /// Addresses inside the accepted `RCPT TO:<...>`, in order.
    pub rcpt_to: Vec<String>,
    /// The exact message bytes: dot-stuffing undone, without the final `CRLF.CRLF`
    /// (i.e. without the CRLF that ends the last line). A message sent as
    /// `"A\r\nB\r\n"` (wire: `A\r\nB\r\n.\r\n`) is stored as `"A\r\nB"`.
    pub data: Vec<u8>,
    /// Argument of the last EHLO/HELO of the connection.
    pub helo: String,
    /// Whatever followed `MAIL FROM:<...>` (e.g. ` BODY=8BITMIME SIZE=123`), trimmed.
    pub mail_params: String,
}

impl Delivered {
    /// `data` plus the CRLF that ended the last line, i.e. the message as the
    /// original client handed it over (if it ended with CRLF).
    pub fn data_with_final_crlf(&self) -> Vec<u8> {
        let mut d = self.data.clone();
        d.extend_from_slice(b"\r\n");
        d
    }

    /// The first header field (incl. its folded continuation lines and final CRLF)
    /// if it is a `Received:` field. Both Dovecot submission and Postfix prepend
    /// exactly one such field to every relayed message.
    pub fn added_received(&self) -> Option<&[u8]> {
        if self.data.len() < 9 || !self.data[..9].eq_ignore_ascii_case(b"received:") {
            return None;
        }
        Some(&self.data[..first_field_len(&self.data)])
    }

    /// Same as [`Delivered::added_received`], as a string with folding undone
    /// (continuation CRLFs removed, whitespace kept).
    pub fn added_received_unfolded(&self) -> Option<String> {
        let f = self.added_received()?;
        let s = String::from_utf8_lossy(f);
        Some(s.trim_end_matches("\r\n").replace("\r\n", ""))
    }

    /// `data` with the prepended `Received:` field removed (exactly one; `data`
    /// unchanged if it does not start with `Received:`). For a message the test
    /// sent as `M` (ending in CRLF), Dovecot submission and Postfix (as configured
    /// here) deliver `Received: ...\r\n` + `M`, so
    /// `d.without_added_received() == &M[..M.len() - 2]`.
    pub fn without_added_received(&self) -> &[u8] {
        match self.added_received() {
            Some(r) => &self.data[r.len()..],
            None => &self.data,
        }
    }

    /// Like [`Delivered::without_added_received`], plus the final CRLF: equal to the
    /// message exactly as the client sent it (when it ended in CRLF).
    pub fn original_message(&self) -> Vec<u8> {
        let mut d = self.without_added_received().to_vec();
        d.extend_from_slice(b"\r\n");
        d
    }
}

/// Length of the first header field of `data`, including continuation lines and
/// the CRLF ending it (or all of `data`).
fn first_field_len(data: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match data[pos..].windows(2).position(|w| w == b"\r\n") {
            None => return data.len(),
            Some(i) => {
                pos += i + 2;
                if !matches!(data.get(pos), Some(b' ' | b'\t')) {
                    return pos;
                }
            }
        }
    }
}

#[derive(Default)]
struct SinkState {
    messages: Vec<Delivered>,
    /// Dialogue transcript (`C:`/`S:` lines; DATA contents summarised).
    transcript: String,
}

/// A running SMTP sink on a free 127.0.0.1 port; stops accepting on drop.
pub struct Sink {
    pub port: u16,
    state: Arc<Mutex<SinkState>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Sink {
    /// Bind a free loopback port and start accepting.
    pub fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("sink: bind 127.0.0.1:0: {e}"));
        let port = listener.local_addr().expect("sink: local_addr").port();
        let state = Arc::new(Mutex::new(SinkState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (Arc::clone(&state), Arc::clone(&stop));
        let acceptor = thread::Builder::new()
            .name(format!("smtp-sink-{port}"))
            .spawn(move || {
                for (n, conn) in listener.incoming().enumerate() {
                    if sp.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = Arc::clone(&st);
                    let id = n + 1;
                    let _ = thread::Builder::new().name(format!("smtp-sink-{port}-{id}")).spawn(move || {
                        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        note(&st, &format!("[{id}] -- connection from {peer}\n"));
                        if let Err(e) = serve(conn, &st, id) {
                            note(&st, &format!("[{id}] -- connection ended: {e}\n"));
                        }
                    });
                }
            })
            .expect("sink: spawn acceptor thread");
        Sink { port, state, stop, acceptor: Some(acceptor) }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// All messages accepted so far, in order of completion.
    pub fn messages(&self) -> Vec<Delivered> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).messages.clone()
    }

    /// What was said on all connections so far (`[conn#] C:` / `[conn#] S:` lines;
    /// message contents are not included, only their size).
    pub fn transcript(&self) -> String {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).transcript.clone()
    }

    /// Poll until at least `n` messages arrived; `None` after `timeout`.
    pub fn try_wait_for_messages(&self, n: usize, timeout: Duration) -> Option<Vec<Delivered>> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n {
                return Some(m);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Poll until at least `n` messages arrived and return all of them; panics
    /// with the sink transcript after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        self.try_wait_for_messages(n, timeout).unwrap_or_else(|| {
            panic!(
                "sink: {} message(s) after {timeout:?}, wanted {n}\n--- sink transcript ---\n{}",
                self.messages().len(),
                tail(&self.transcript(), 60)
            )
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

fn note(st: &Mutex<SinkState>, s: &str) {
    st.lock().unwrap_or_else(|p| p.into_inner()).transcript.push_str(s);
}

/// Address inside `<...>` after `prefix` (case-insensitive), and what follows it.
fn path_arg(line: &str, prefix: &str) -> Option<(String, String)> {
    if line.len() < prefix.len() || !line[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((rest[..end].to_owned(), rest[end + 1..].trim().to_owned()))
}

fn serve(conn: TcpStream, st: &Mutex<SinkState>, id: usize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut reply = |st: &Mutex<SinkState>, text: &str| -> std::io::Result<()> {
        note(st, &format!("[{id}] S: {}\n", text.replace("\r\n", &format!("\n[{id}] S: "))));
        out.write_all(text.as_bytes())?;
        out.write_all(b"\r\n")?;
        out.flush()
    };
    reply(st, &format!("220 {SINK_HOSTNAME} ESMTP mailgate test sink"))?;
    let mut helo = String::new();
    let mut from: Option<(String, String)> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            note(st, &format!("[{id}] -- client closed the connection\n"));
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned();
        note(st, &format!("[{id}] C: {text}\n"));
        let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                helo = text[4..].trim().to_owned();
                (from, rcpts) = (None, Vec::new());
                reply(
                    st,
                    &format!(
                        "250-{SINK_HOSTNAME}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES"
                    ),
                )?;
            }
            "HELO" => {
                helo = text[4..].trim().to_owned();
                (from, rcpts) = (None, Vec::new());
                reply(st, &format!("250 {SINK_HOSTNAME}"))?;
            }
            "MAIL" => match path_arg(&text, "MAIL FROM:") {
                Some(f) if from.is_none() => {
                    from = Some(f);
                    rcpts.clear();
                    reply(st, "250 2.1.0 Ok")?;
                }
                Some(_) => reply(st, "503 5.5.1 Error: nested MAIL command")?,
                None => reply(st, "501 5.5.4 Syntax: MAIL FROM:<address>")?,
            },
            "RCPT" => match path_arg(&text, "RCPT TO:") {
                _ if from.is_none() => reply(st, "503 5.5.1 Error: need MAIL command")?,
                Some((to, _)) if to.eq_ignore_ascii_case(REJECTED_RECIPIENT) => reply(st, REJECTED_REPLY)?,
                Some((to, _)) => {
                    rcpts.push(to);
                    reply(st, "250 2.1.5 Ok")?;
                }
                None => reply(st, "501 5.5.4 Syntax: RCPT TO:<address>")?,
            },
            "DATA" => {
                if from.is_none() || rcpts.is_empty() {
                    reply(st, "503 5.5.1 Error: need RCPT command")?;
                    continue;
                }
                reply(st, "354 End data with <CR><LF>.<CR><LF>")?;
                let data = read_data(&mut reader)?;
                let (mail_from, mail_params) = from.take().unwrap_or_default();
                note(st, &format!("[{id}] -- {} message bytes\n", data.len()));
                st.lock().unwrap_or_else(|p| p.into_inner()).messages.push(Delivered {
                    mail_from,
                    rcpt_to: std::mem::take(&mut rcpts),
                    data,
                    helo: helo.clone(),
                    mail_params,
                });
                reply(st, "250 2.0.0 Ok: queued by the test sink")?;
            }
            "RSET" => {
                (from, rcpts) = (None, Vec::new());
                reply(st, "250 2.0.0 Ok")?;
            }
            "NOOP" => reply(st, "250 2.0.0 Ok")?,
            "QUIT" => {
                // The client may close without waiting for the reply (Postfix does).
                let _ = reply(st, "221 2.0.0 Bye");
                let _ = reader.get_ref().shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => reply(st, "502 5.5.2 Error: command not recognized")?,
        }
    }
}

/// Read DATA lines up to `.CRLF` at the start of a line; undo dot-stuffing; drop
/// the CRLF before the terminating dot.
fn read_data(reader: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "EOF inside DATA"));
        }
        if line == b".\r\n" {
            if data.ends_with(b"\r\n") {
                data.truncate(data.len() - 2);
            }
            return Ok(data);
        }
        let l = if line.first() == Some(&b'.') { &line[1..] } else { &line[..] };
        data.extend_from_slice(l);
    }
}
