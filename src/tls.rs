//! TLS configuration: the server side (listeners) and the client side (upstream).
//! Built once at start-up. No protocol knowledge.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// A TLS set-up problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (e.g. key does not match certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating a development certificate failed.
    #[error("generating a development certificate: {0}")]
    Generate(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn pem_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem { path: path.display().to_string(), reason: reason.to_string() }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Serves the one certificate to clients that send no SNI (they connect by address) or an
/// SNI name the certificate is valid for; any other name aborts the handshake (ALPACA
/// strict SNI). Nothing is cached per name, so random names cost no memory.
#[derive(Debug)]
struct StrictSni {
    key: Arc<CertifiedKey>,
    leaf: CertificateDer<'static>,
}

impl ResolvesServerCert for StrictSni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else { return Some(self.key.clone()) };
        let name = ServerName::try_from(name).ok()?;
        let leaf = webpki::EndEntityCert::try_from(&self.leaf).ok()?;
        leaf.verify_is_valid_for_subject_name(&name).ok()?;
        Some(self.key.clone())
    }
}

/// The server configuration for one protocol; `alpn` is its IANA ALPN id ("imap", "smtp").
/// A client that offers ALPN without it is refused (ALPACA); one that offers none is served.
/// TLS 1.2 and 1.3 only, forward-secret suites (rustls' defaults).
pub fn server_config(cert: &Path, key: &Path, alpn: &[&str]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let leaf = certs.first().cloned().ok_or_else(|| pem_err(cert, "no certificate found"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    let provider = provider();
    let certified = Arc::new(CertifiedKey::from_der(certs, key, &provider)?);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(StrictSni { key: certified, leaf }));
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The client configuration for an upstream: trusts `ca_file` if given, else the system roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in load_certs(path)? {
                roots.add(c).map_err(|e| pem_err(path, e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
        }
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Makes a self-signed development certificate for `names` if `cert`/`key` do not exist.
/// Returns true if it made one.
pub fn ensure_dev_cert(cert: &Path, key: &Path, names: &[String]) -> Result<bool, TlsError> {
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(false),
        (false, false) => {}
        // Never replace half of a real pair.
        (true, false) => return Err(pem_err(key, "missing (the certificate exists; not making a new pair)")),
        (false, true) => return Err(pem_err(cert, "missing (the key exists; not making a new pair)")),
    }
    let ck = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| pem_err(dir, e))?;
    }
    std::fs::write(cert, ck.cert.pem()).map_err(|e| pem_err(cert, e))?;
    crate::fsutil::write_private(key, ck.signing_key.serialize_pem().as_bytes()).map_err(|e| pem_err(key, e))?;
    Ok(true)
}
