//! `[tls] acme = true` (issue 19, point 3) against Pebble, the ACME test CA, on loopback:
//! the first certificate issued (TLS-ALPN-01 answered on the IMAPS listener and really
//! validated: `PEBBLE_VA_ALWAYS_VALID` is not set), a renewal put in service while a
//! connection made before keeps going, and a failed renewal (Pebble stopped) that keeps
//! the certificate in service. pebble-challtestsrv is Pebble's DNS: every name is
//! 127.0.0.1, so `mail.example.test` (the harness's `server.hostname`) is mailgate.

use crate::support::client::{Client, TIMEOUT};
use crate::support::daemon::{pick_ports, poll, spawn_logged, try_poll};
use crate::support::mailgate::{Mailgate, Options};
use mailgate::tls::CertInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

const ISSUED: &str = "ACME certificate issued and in service";
const FAILED: &str = "ACME order failed, the certificate in service stays";
const HOST: &str = "mail.example.test";
/// Hang guard for an order: Pebble validates, signs and the check interval passes.
const ORDER: Duration = Duration::from_secs(120);

/// Pebble and its DNS, stopped (by their own process ids) when dropped.
struct Pebble {
    children: Vec<Child>,
    /// The directory URL.
    directory: String,
}

impl Pebble {
    /// Starts Pebble with its HTTPS certificate from `pki` (made in `dir`), validating
    /// TLS-ALPN-01 on `tls_port` of whatever the DNS says (127.0.0.1).
    fn start(dir: &Path, listen: u16, tls_port: u16) -> Pebble {
        let pki = crate::support::pki::make(dir, "pebble", &["127.0.0.1", "localhost"]);
        let p = pick_ports(3).unwrap();
        let (mgmt, dns, dns_mgmt) = (p[0], p[1], p[2]);
        let config = dir.join("pebble.json");
        let json = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": pki.cert,
            "privateKey": pki.key,
            "httpPort": 1,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(&config, json.to_string()).unwrap();
        let dns_srv = spawn_logged(
            Command::new("pebble-challtestsrv").args([
                "-dns01",
                &format!("127.0.0.1:{dns}"),
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ]),
            &dir.join("challtestsrv.log"),
            "pebble-challtestsrv",
        )
        .unwrap();
        let dns_up = poll(TIMEOUT, || TcpStream::connect(("127.0.0.1", dns_mgmt)).is_ok());
        assert!(dns_up, "pebble-challtestsrv did not start");
        let pebble = spawn_logged(
            Command::new("pebble")
                .args(["-config", &config.display().to_string(), "-dnsserver", &format!("127.0.0.1:{dns}")])
                // No random 0-15 s sleep before validating, no refused nonces, and a new
                // authorization (so a new challenge) for every order.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0"),
            &dir.join("pebble.log"),
            "pebble",
        )
        .unwrap();
        let up = poll(TIMEOUT, || TcpStream::connect(("127.0.0.1", listen)).is_ok());
        assert!(up, "pebble did not listen:\n{}", std::fs::read_to_string(dir.join("pebble.log")).unwrap_or_default());
        Pebble { children: vec![dns_srv, pebble], directory: format!("https://127.0.0.1:{listen}/dir") }
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Takes any server certificate: the test reads what it is served, it does not trust it.
#[derive(Debug)]
struct Anything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Anything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn any_cert() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Anything(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"imap".to_vec()];
    Arc::new(cfg)
}

/// The leaf a new IMAPS connection for the host name is served.
fn served(addr: SocketAddr) -> Vec<u8> {
    Client::tls_named(addr, any_cert(), HOST).unwrap().peer_leaf().unwrap()
}

fn from_pebble(leaf: &[u8]) -> bool {
    let info = CertInfo::of_der(leaf);
    info.issuer.contains("Pebble Intermediate CA") && info.names == [HOST]
}

#[test]
fn acme_issues_renews_and_keeps_the_certificate_when_the_ca_fails() {
    let pebble_dir = tempfile::tempdir().unwrap();
    let listen = pick_ports(1).unwrap()[0];
    // Renew when less than 100 years are left: every check (1 s) finds the certificate due.
    let tls_extra = format!(
        "acme = true\nacme_directory = \"https://127.0.0.1:{listen}/dir\"\nacme_contact = \"postmaster@example.test\"\n\
         acme_ca_file = \"{}\"\nacme_renew_before_days = 36500\nacme_check_secs = 1\n",
        pebble_dir.path().join("pebble-ca.pem").display()
    );
    // The CA file must exist when mailgate reads it (at the first order); Pebble's PKI is
    // made by Pebble::start, before that order can succeed.
    // A long pre-auth deadline: the connection held across the renewal must outlive a slow order.
    let limits = "preauth_timeout_secs = 600\n".to_string();
    let mg = Mailgate::start(Options { tls_extra, limits, ..Default::default() });
    // Before any order can succeed (Pebble is not up): the self-signed placeholder.
    let placeholder = CertInfo::of_der(&served(mg.imaps));
    assert_eq!(
        (placeholder.names.as_slice(), &placeholder.issuer),
        ([HOST.to_string()].as_slice(), &placeholder.subject)
    );
    let mut pebble = Pebble::start(pebble_dir.path(), listen, mg.imaps.port());

    // (1) The first order: until then the self-signed placeholder, then Pebble's certificate.
    mg.wait_log(ISSUED, 1, ORDER);
    let first = served(mg.imaps);
    assert!(from_pebble(&first), "{:?}", CertInfo::of_der(&first));
    let key = mg.dir.path().join("data/acme/key.pem");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let account = mg.dir.path().join("data/acme/account.json");
    assert_eq!(std::fs::metadata(&account).unwrap().permissions().mode() & 0o777, 0o600);
    // The stored account names its directory (a changed acme_directory registers anew).
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&account).unwrap()).unwrap();
    assert_eq!(stored["directory"], pebble.directory.as_str());
    assert!(!mg.log().contains(stored["key_pkcs8"].as_str().unwrap()), "the account key is not logged");

    // (2) Renewal: a connection made now keeps its certificate and keeps working while a
    // new one (another serial, another key) is put in service for new connections.
    let mut before = Client::tls_named(mg.imaps, any_cert(), HOST).unwrap();
    assert!(before.line().starts_with("* OK"));
    let held = before.peer_leaf().unwrap();
    let renewed = try_poll(ORDER, Duration::from_millis(200), || Ok::<_, ()>(served(mg.imaps) != held));
    let renewed = renewed.unwrap_or(false);
    assert!(renewed, "no renewed certificate served:\n{}", mg.log());
    let second = served(mg.imaps);
    assert!(from_pebble(&second), "{:?}", CertInfo::of_der(&second));
    assert_ne!(second, held);
    let r = before.cmd("c", "CAPABILITY");
    assert!(r.last().unwrap().starts_with("c OK"), "{r:?}");
    assert_eq!(before.peer_leaf().unwrap(), held);

    // (3) The CA fails: an ERROR line says why, and the certificate in service stays.
    pebble.stop();
    let failures = mg.log().matches(FAILED).count();
    mg.wait_log(FAILED, failures + 1, ORDER);
    let kept = served(mg.imaps);
    assert!(from_pebble(&kept), "{:?}", CertInfo::of_der(&kept));
    mg.wait_log(FAILED, failures + 2, ORDER);
    assert_eq!(served(mg.imaps), kept, "a failed order changes nothing");
    let log = mg.log();
    let line = log.lines().rev().find(|l| l.contains(FAILED)).unwrap();
    assert!(line.contains("ERROR") && line.contains(&format!("127.0.0.1:{listen}")), "{line}");
}
