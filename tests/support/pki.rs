//! Throwaway certificates made at test time: a CA and a leaf signed by it.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};

/// Paths of a generated PKI.
pub struct Pki {
    /// CA certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// Leaf certificate chain (PEM).
    pub cert: PathBuf,
    /// Leaf key (PEM).
    pub key: PathBuf,
}

fn ca_params(prefix: &str) -> CertificateParams {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    ca_params
}

/// Makes `<prefix>-ca.pem`, `<prefix>-cert.pem`, `<prefix>-key.pem` in `dir` for `names`
/// (and the CA's key, `<prefix>-ca-key.pem`, for [`another_leaf`]).
pub fn make(dir: &Path, prefix: &str, names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join(format!("{prefix}-ca-key.pem")), ca_key.serialize_pem()).unwrap();
    let ca = CertifiedIssuer::self_signed(ca_params(prefix), ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let pki = Pki {
        ca: dir.join(format!("{prefix}-ca.pem")),
        cert: dir.join(format!("{prefix}-cert.pem")),
        key: dir.join(format!("{prefix}-key.pem")),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

/// A new leaf for `names` (certificate PEM, key PEM) from the CA that [`make`] made in
/// `dir` with `prefix`: what a renewal brings.
pub fn another_leaf(dir: &Path, prefix: &str, names: &[&str]) -> (String, String) {
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.join(format!("{prefix}-ca-key.pem"))).unwrap()).unwrap();
    let ca = Issuer::new(ca_params(prefix), ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}
