//! Certificates without a restart (issue 19, point 3): SIGHUP or a change of the files
//! puts a renewed certificate in service for new connections on every listener; a live
//! session keeps going; a broken pair is refused with one log line and the old pair stays.

use crate::imap_front::with_dovecot_opts;
use crate::support::client::{Client, PROMPTLY, tls_config};
use crate::support::mailgate::{Mailgate, Options};
use crate::support::pki::another_leaf;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use std::net::SocketAddr;
use std::path::Path;

const RELOADED: &str = "TLS certificate reloaded";
const REFUSED: &str = "TLS certificate reload refused";

/// Replaces a file in one step (write beside it, rename over it), as a careful renewal
/// tool does.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

/// The leaf certificate a new TLS connection to `addr` is served.
fn served(mg: &Mailgate, addr: SocketAddr, alpn: &[&str]) -> Vec<u8> {
    Client::tls(addr, tls_config(&mg.ca, alpn)).unwrap().peer_leaf().unwrap()
}

/// The leaf certificate a new STARTTLS connection to the IMAP port is served.
fn served_starttls(mg: &Mailgate) -> Vec<u8> {
    let mut c = Client::plain(mg.imap);
    c.line();
    assert!(c.cmd("s", "STARTTLS").last().unwrap().starts_with("s OK"));
    c.starttls(tls_config(&mg.ca, &["imap"]));
    c.peer_leaf().unwrap()
}

#[test]
fn sighup_serves_a_renewed_certificate_and_the_idle_session_keeps_going() {
    // The file check is off for the length of the test: only the signal reloads.
    let (_dovecot, mut mg, app) =
        with_dovecot_opts(Options { tls_extra: "reload_check_secs = 86400\n".into(), ..Default::default() });
    let old = der(&std::fs::read_to_string(&mg.cert).unwrap());
    let mut c = Client::tls(mg.imaps, tls_config(&mg.ca, &["imap"])).unwrap();
    c.line();
    assert_eq!(c.peer_leaf().as_ref(), Some(&old));
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}");
    assert!(c.cmd("b", "SELECT INBOX").last().unwrap().starts_with("b OK"));
    c.send(b"i IDLE\r\n");
    assert!(c.line().starts_with("+ "));

    // Renewal: a new pair from the same CA, then `systemctl reload mailgate`.
    let dir = mg.cert.parent().unwrap();
    let (cert, key) = another_leaf(dir, "mailgate", &["localhost", "127.0.0.1"]);
    replace(&mg.cert, &cert);
    replace(&mg.key, &key);
    mg.hup();
    mg.wait_log(RELOADED, 1, PROMPTLY);
    let new = der(&cert);
    assert_ne!(new, old);
    assert_eq!(served(&mg, mg.imaps, &["imap"]), new, "IMAP, implicit TLS");
    assert_eq!(served_starttls(&mg), new, "IMAP, STARTTLS");
    assert_eq!(served(&mg, mg.smtps, &["smtp"]), new, "SMTP submission, implicit TLS");
    assert_eq!(served(&mg, mg.web, &["http/1.1"]), new, "the web step");
    let log = mg.log();
    let line = log.lines().find(|l| l.contains(RELOADED)).unwrap();
    assert!(line.contains("INFO") && line.contains("trigger=SIGHUP"), "{line}");
    assert!(line.contains("names=localhost,127.0.0.1") && line.contains("not_after="), "{line}");

    // The session logged in before the reload is untouched.
    c.send(b"DONE\r\n");
    assert!(c.until("i ").last().unwrap().starts_with("i OK"));
    assert!(c.cmd("n", "NOOP").last().unwrap().starts_with("n OK"));
    assert_eq!(c.peer_leaf().as_ref(), Some(&old));

    // A broken pair: the key of another certificate. Refused; the renewed pair stays.
    let (_, other_key) = another_leaf(dir, "mailgate", &["localhost"]);
    replace(&mg.key, &other_key);
    mg.hup();
    mg.wait_log(REFUSED, 1, PROMPTLY);
    assert_eq!(served(&mg, mg.imaps, &["imap"]), new);
    assert_eq!(served(&mg, mg.web, &["http/1.1"]), new);
    let log = mg.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains(REFUSED)).collect();
    assert_eq!(refusals.len(), 1, "{log}");
    let want = format!("{}: is not the key of the certificate in {}", mg.key.display(), mg.cert.display());
    assert!(refusals[0].contains("ERROR") && refusals[0].contains(&want), "{}", refusals[0]);
    assert_eq!(log.matches(RELOADED).count(), 1, "{log}");
    // No key in the log, old or new.
    for k in [&key, &other_key] {
        let body: String = k.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!log.contains(&body[..40]), "a private key is in the log");
    }
    assert!(!log.contains("PRIVATE KEY"));
    assert!(c.cmd("m", "NOOP").last().unwrap().starts_with("m OK"));
    assert!(c.cmd("z", "LOGOUT").iter().any(|l| l.starts_with("* BYE")));
    // SIGHUP handling leaves SIGTERM's clean shutdown as it was.
    assert!(mg.terminate().is_some_and(|s| s.success()), "{}", mg.log());
}

#[test]
fn changed_certificate_files_are_picked_up_without_a_signal() {
    let mg = Mailgate::start(Options { tls_extra: "reload_check_secs = 1\n".into(), ..Default::default() });
    let (cert, key) = another_leaf(mg.cert.parent().unwrap(), "mailgate", &["localhost", "127.0.0.1"]);
    // The check may see the certificate before the key: that half is refused, and the
    // whole pair is taken at the next check.
    replace(&mg.cert, &cert);
    replace(&mg.key, &key);
    mg.wait_log(RELOADED, 1, PROMPTLY);
    assert_eq!(served(&mg, mg.imaps, &["imap"]), der(&cert));
    let log = mg.log();
    assert!(log.lines().any(|l| l.contains(RELOADED) && l.contains("trigger=file-change")), "{log}");
    assert_eq!(served(&mg, mg.smtps, &["smtp"]), der(&cert));
}
