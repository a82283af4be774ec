//! TLS configuration: the server side (listeners) and the client side (upstream).
//! The client side is built once at start-up; the server certificate lives in one
//! [`CertStore`] that every listener's resolver reads and that SIGHUP or a change of the
//! files replaces ([`keep_current`]). No protocol knowledge.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use zeroize::Zeroizing;

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

/// Which library encrypts and decrypts the TLS records of the listeners (`[tls]
/// record_crypto`). Everything else (key exchange, signatures, randomness, the upstream
/// and ACME clients) is aws-lc-rs whatever the choice.
///
/// aws-lc-sys 0.47 has two x86-64 AES-GCM paths: AVX-512 (VAES on zmm) and 128-bit
/// AES-NI with AVX. ring 0.17.14 has a VAES + VPCLMULQDQ AVX2 path (ymm) and no AVX-512
/// one. On a CPU with VAES and AVX2 but without AVX-512 (AMD Zen 3, some Intel client
/// parts) ring's path costs about 0.6x aws-lc's per byte; with AVX-512, aws-lc's is
/// cheaper (docs/performance.md "Record encryption: aws-lc-rs or ring").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordCrypto {
    /// [`RecordCrypto::decide`] on this CPU: ring with VAES + AVX2 and no AVX-512, else aws-lc-rs.
    #[default]
    Auto,
    /// aws-lc-rs.
    AwsLcRs,
    /// ring.
    Ring,
}

impl RecordCrypto {
    /// `Auto` resolved for the CPU this runs on (and what `OPENSSL_ia32cap` hides from
    /// aws-lc, so that `bench/run --no-avx512` sees the choice of a host without AVX-512).
    pub fn resolve(self) -> RecordCrypto {
        match self {
            RecordCrypto::Auto => RecordCrypto::decide(CpuAes::detect()),
            chosen => chosen,
        }
    }

    /// The automatic choice for a CPU with `cpu`'s AES features.
    pub fn decide(cpu: CpuAes) -> RecordCrypto {
        if cpu.vaes_avx2 && !cpu.avx512 { RecordCrypto::Ring } else { RecordCrypto::AwsLcRs }
    }

    /// Its name in the configuration and the logs.
    pub fn name(self) -> &'static str {
        match self {
            RecordCrypto::Auto => "auto",
            RecordCrypto::AwsLcRs => "aws-lc-rs",
            RecordCrypto::Ring => "ring",
        }
    }
}

/// The CPU features that decide which AES-GCM code the libraries run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuAes {
    /// VAES, VPCLMULQDQ and AVX2: ring's wide path.
    pub vaes_avx2: bool,
    /// AVX512F/BW/VL/DQ with VAES and VPCLMULQDQ: aws-lc's wide path (unless
    /// `OPENSSL_ia32cap` hides AVX512F from it).
    pub avx512: bool,
}

impl CpuAes {
    /// This CPU's.
    pub fn detect() -> CpuAes {
        #[cfg(target_arch = "x86_64")]
        {
            let vaes = std::arch::is_x86_feature_detected!("vaes") && std::arch::is_x86_feature_detected!("vpclmulqdq");
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq");
            let hidden = std::env::var("OPENSSL_ia32cap").is_ok_and(|v| ia32cap_hides_avx512f(&v));
            CpuAes { vaes_avx2: vaes && std::arch::is_x86_feature_detected!("avx2"), avx512: vaes && avx512 && !hidden }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuAes::default()
    }
}

/// Whether an `OPENSSL_ia32cap` value (`[~|]v1[:[~|]v2]`, v2: CPUID leaf 7 with EBX in
/// bits 0-31) hides AVX512F (leaf 7 EBX bit 16) from aws-lc: `~` with the bit clears it,
/// a plain value without it replaces the word.
fn ia32cap_hides_avx512f(value: &str) -> bool {
    let Some((_, leaf7)) = value.split_once(':') else { return false };
    let (clear, digits) = match leaf7.strip_prefix('~') {
        Some(d) => (true, d),
        None if leaf7.starts_with('|') => return false,
        None => (false, leaf7),
    };
    let digits = digits.trim();
    let parsed = match digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse::<u64>(),
    };
    let Ok(bits) = parsed else { return false };
    let f = bits & (1 << 16) != 0;
    if clear { f } else { !f }
}

/// The library chosen for the listeners' records (set once at start-up by
/// [`choose_record_crypto`]; `Auto` until then).
static RECORD_CRYPTO: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the library for the listeners' records (resolving `Auto`) and returns it. Server
/// configurations built afterwards use it.
pub fn choose_record_crypto(choice: RecordCrypto) -> RecordCrypto {
    let resolved = choice.resolve();
    let code = match resolved {
        RecordCrypto::Auto | RecordCrypto::AwsLcRs => 1,
        RecordCrypto::Ring => 2,
    };
    RECORD_CRYPTO.store(code, Ordering::Relaxed);
    resolved
}

fn record_crypto() -> RecordCrypto {
    match RECORD_CRYPTO.load(Ordering::Relaxed) {
        1 => RecordCrypto::AwsLcRs,
        2 => RecordCrypto::Ring,
        _ => choose_record_crypto(RecordCrypto::Auto),
    }
}

/// aws-lc-rs' provider, with the cipher suites (the record encryption) of `lib`: each of
/// aws-lc-rs' default suites, in its order, replaced by ring's suite of the same id.
fn server_provider(lib: RecordCrypto) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    if lib == RecordCrypto::Ring {
        p.cipher_suites = p
            .cipher_suites
            .iter()
            .map(|s| {
                rustls::crypto::ring::ALL_CIPHER_SUITES.iter().find(|r| r.suite() == s.suite()).copied().unwrap_or(*s)
            })
            .collect();
    }
    Arc::new(p)
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

/// The certificate and key in service, as one unit: what the resolver hands out.
struct Pair {
    key: Arc<CertifiedKey>,
    leaf: CertificateDer<'static>,
}

/// What a certificate says about itself, for the log line of a (re)load: its subject, the
/// names in its subjectAltName extension and the end of its validity (RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's distinguished name (e.g. `CN=mail.example.com`).
    pub subject: String,
    /// The issuer's distinguished name (the subject's own for a self-signed certificate).
    pub issuer: String,
    /// DNS names and IP addresses the certificate is for.
    pub names: Vec<String>,
    /// `notAfter`.
    pub not_after: String,
    /// `notAfter` in seconds since 1970 (the metric `mailgate_tls_certificate_expiry_timestamp_seconds`).
    pub expires: Option<i64>,
}

impl CertInfo {
    /// What the DER certificate `leaf` says about itself.
    pub fn of_der(leaf: &[u8]) -> CertInfo {
        CertInfo::of(&CertificateDer::from(leaf.to_vec()))
    }

    fn of(leaf: &CertificateDer<'_>) -> CertInfo {
        use x509_cert::der::Decode as _;
        let Ok(cert) = x509_cert::Certificate::from_der(leaf) else {
            // rustls accepted it, so this does not happen; the log line says so if it does.
            return CertInfo {
                subject: "(unparsed)".into(),
                issuer: "(unparsed)".into(),
                names: Vec::new(),
                not_after: "(unparsed)".into(),
                expires: None,
            };
        };
        let tbs = &cert.tbs_certificate;
        let names = match tbs.get::<x509_cert::ext::pkix::SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .iter()
                .filter_map(|n| match n {
                    x509_cert::ext::pkix::name::GeneralName::DnsName(d) => Some(d.to_string()),
                    x509_cert::ext::pkix::name::GeneralName::IpAddress(ip) => {
                        let b = ip.as_bytes();
                        <[u8; 4]>::try_from(b)
                            .map(|a| std::net::IpAddr::from(a).to_string())
                            .or_else(|_| <[u8; 16]>::try_from(b).map(|a| std::net::IpAddr::from(a).to_string()))
                            .ok()
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        CertInfo {
            subject: tbs.subject.to_string(),
            issuer: tbs.issuer.to_string(),
            names,
            not_after: tbs.validity.not_after.to_date_time().to_string(),
            expires: i64::try_from(tbs.validity.not_after.to_unix_duration().as_secs()).ok(),
        }
    }
}

/// Why a reload was asked for (named in the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (`systemctl reload mailgate`).
    Signal,
    /// The periodic check found the certificate or key file changed.
    FileChange,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file-change",
        })
    }
}

/// The server certificate of every listener (IMAP, SMTP, web): one shared resolver whose
/// pair can be replaced while serving. A handshake takes the pair in service when it
/// starts, so a reload changes what new connections get and never touches a connection
/// already made (each holds its own rustls state). A new pair that cannot be read, parsed
/// or whose key does not match the certificate is refused, and the old pair stays.
///
/// Serves the certificate to clients that send no SNI (they connect by address) or an
/// SNI name the certificate is valid for; any other name aborts the handshake (ALPACA
/// strict SNI). Nothing is cached per name, so random names cost no memory.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<Pair>>,
    /// SHA-256 over both files as last read (never logged): the periodic check reloads
    /// when it differs, and a refused pair is not tried (and logged) again until the files
    /// change once more. `None`: a file could not be read.
    seen: Mutex<Option<[u8; 32]>>,
    /// Held while the files are read for a reload or replaced by [`CertStore::replace`], so
    /// that the file check never reads half a replacement.
    files: Mutex<()>,
    /// The end of the validity of the certificate in service, in seconds since 1970
    /// (`mailgate_tls_certificate_expiry_timestamp_seconds`; set at load and reload).
    expiry: prometheus_client::metrics::gauge::Gauge,
    /// `[tls] acme`: the listeners also accept the `acme-tls/1` ALPN (TLS-ALPN-01,
    /// RFC 8737); set before their configurations are built.
    acme_alpn: AtomicBool,
    /// The TLS-ALPN-01 challenge certificates of an ACME order under way, by name; a
    /// handshake offering `acme-tls/1` gets the one for its SNI name and nothing else.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for CertStore {
    // The key stays out of Debug output: only the paths and the certificate's names.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("in_service", &self.info())
            .finish()
    }
}

/// Reads both files: their bytes (the key's wiped when dropped), or the error naming the
/// one that could not be read.
fn read_files(cert: &Path, key: &Path) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), TlsError> {
    let c = std::fs::read(cert).map_err(|e| pem_err(cert, e))?;
    let k = Zeroizing::new(std::fs::read(key).map_err(|e| pem_err(key, e))?);
    Ok((c, k))
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// Parses a pair read from `cert` and `key` and checks that the key is the certificate's.
fn parse_pair(cert: &Path, key: &Path, cert_pem: &[u8], key_pem: &[u8]) -> Result<Pair, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|e| pem_err(cert, e))?;
    let leaf = certs.first().cloned().ok_or_else(|| pem_err(cert, "no certificate found"))?;
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err(key, e))?;
    let signing = provider().key_provider.load_private_key(private).map_err(|e| pem_err(key, e))?;
    let certified = CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key (as CertifiedKey::from_der, let it be).
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(pem_err(key, format!("is not the key of the certificate in {}", cert.display())));
        }
        Err(e) => return Err(pem_err(cert, e)),
    }
    Ok(Pair { key: Arc::new(certified), leaf })
}

impl CertStore {
    /// Reads the pair at start-up; an unusable pair is an error (nothing to keep serving).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let (c, k) = read_files(cert, key)?;
        let pair = parse_pair(cert, key, &c, &k)?;
        let expiry = prometheus_client::metrics::gauge::Gauge::default();
        expiry.set(CertInfo::of(&pair.leaf).expires.unwrap_or(0));
        Ok(Arc::new(CertStore {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            current: RwLock::new(Arc::new(pair)),
            seen: Mutex::new(Some(digest(&c, &k))),
            files: Mutex::new(()),
            expiry,
            acme_alpn: AtomicBool::new(false),
            challenges: RwLock::new(HashMap::new()),
        }))
    }

    /// Makes the listeners built after this call answer TLS-ALPN-01 challenges (`[tls] acme`).
    pub fn answer_acme_challenges(&self) {
        self.acme_alpn.store(true, Ordering::Relaxed);
    }

    /// Serves `key` to `acme-tls/1` handshakes for `name` until [`CertStore::clear_challenge`].
    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        self.challenges.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_ascii_lowercase(), key);
    }

    /// Stops answering the challenge for `name`.
    pub fn clear_challenge(&self, name: &str) {
        self.challenges.write().unwrap_or_else(|p| p.into_inner()).remove(&name.to_ascii_lowercase());
    }

    /// The certificate and key files this store reads.
    pub fn paths(&self) -> (&Path, &Path) {
        (&self.cert_path, &self.key_path)
    }

    /// Registers the expiry gauge of the certificate in service.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        metrics.register(
            "tls_certificate_expiry_timestamp_seconds",
            "End of the validity (notAfter) of the certificate in service, in seconds since 1970",
            self.expiry.clone(),
        );
    }

    fn in_service(&self) -> Arc<Pair> {
        // A poisoned lock still holds a whole pair (it is replaced in one assignment).
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What the certificate in service says about itself.
    pub fn info(&self) -> CertInfo {
        CertInfo::of(&self.in_service().leaf)
    }

    /// The leaf certificate in service (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.in_service().leaf.clone()
    }

    /// `content` in a CMS SignedData (DER) signed with the key in service, carrying its
    /// chain as loaded (`[web] sign_profiles`: Apple configuration profiles).
    pub fn sign_cms(&self, content: &[u8]) -> Result<Vec<u8>, crate::cms::CmsError> {
        let pair = self.in_service();
        crate::cms::sign_attached(&pair.key.cert, pair.key.key.as_ref(), content)
    }

    /// Reads the files again and puts the pair in service if it is usable; otherwise the
    /// pair in service stays and the error names the file and why.
    pub fn reload(&self) -> Result<CertInfo, TlsError> {
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        self.reload_locked()
    }

    fn reload_locked(&self) -> Result<CertInfo, TlsError> {
        let read = read_files(&self.cert_path, &self.key_path);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = read.as_ref().ok().map(|(c, k)| digest(c, k));
        let (c, k) = read?;
        let pair = parse_pair(&self.cert_path, &self.key_path, &c, &k)?;
        let info = CertInfo::of(&pair.leaf);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        self.expiry.set(info.expires.unwrap_or(0));
        Ok(info)
    }

    /// The periodic check: reloads if either file changed since it was last read (`None`:
    /// nothing changed).
    pub fn reload_if_changed(&self) -> Option<Result<CertInfo, TlsError>> {
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let now = read_files(&self.cert_path, &self.key_path).ok().map(|(c, k)| digest(&c, &k));
        let last = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        (now != last).then(|| self.reload_locked())
    }

    /// Puts a new pair (PEM) in service and writes it over the files (each written beside
    /// its file, then renamed over it; the key with mode 0600). A pair that does not parse
    /// or whose key is not the certificate's is refused before any file is touched, so the
    /// files always hold a usable pair.
    pub fn replace(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<CertInfo, TlsError> {
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let pair = parse_pair(&self.cert_path, &self.key_path, cert_pem, key_pem)?;
        let (cert_new, key_new) = (self.cert_path.with_extension("pem.new"), self.key_path.with_extension("pem.new"));
        std::fs::write(&cert_new, cert_pem).map_err(|e| pem_err(&cert_new, e))?;
        crate::fsutil::write_private(&key_new, key_pem).map_err(|e| pem_err(&key_new, e))?;
        std::fs::rename(&key_new, &self.key_path).map_err(|e| pem_err(&self.key_path, e))?;
        std::fs::rename(&cert_new, &self.cert_path).map_err(|e| pem_err(&self.cert_path, e))?;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest(cert_pem, key_pem));
        let info = CertInfo::of(&pair.leaf);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        self.expiry.set(info.expires.unwrap_or(0));
        Ok(info)
    }

    /// Reloads and logs the outcome: one INFO line naming the new certificate, or one
    /// ERROR line naming the file and why the old pair stays in service.
    pub fn reload_and_log(&self, trigger: Trigger) {
        match self.reload() {
            Ok(info) => log_reloaded(&self.cert_path, trigger, &info),
            Err(e) => log_refused(trigger, &e),
        }
    }
}

fn log_reloaded(cert: &Path, trigger: Trigger, info: &CertInfo) {
    tracing::info!(
        %trigger,
        cert = %cert.display(),
        subject = %info.subject,
        names = %info.names.join(","),
        not_after = %info.not_after,
        "TLS certificate reloaded"
    );
}

fn log_refused(trigger: Trigger, e: &TlsError) {
    tracing::error!(%trigger, "TLS certificate reload refused, the previous certificate stays in service: {e}");
}

/// The ALPN id of the TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The TLS-ALPN-01 challenge certificate for `name`: self-signed, for `name` only, with the
/// critical acmeIdentifier extension holding `digest` (SHA-256 of the key authorization).
pub fn acme_challenge_key(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(generate)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    let private = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Generate(e.to_string()))?;
    let signing = provider().key_provider.load_private_key(private)?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if hello.alpn().is_some_and(|mut ids| ids.any(|id| id == ACME_TLS_ALPN)) {
            // A CA validating a challenge (RFC 8737 §3): its certificate or nothing.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.read().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
        }
        let pair = self.in_service();
        let Some(name) = hello.server_name() else { return Some(pair.key.clone()) };
        let name = ServerName::try_from(name).ok()?;
        let leaf = webpki::EndEntityCert::try_from(&pair.leaf).ok()?;
        leaf.verify_is_valid_for_subject_name(&name).ok()?;
        Some(pair.key.clone())
    }
}

/// Keeps `certs` current until the task is dropped: reloads on SIGHUP, and when the
/// certificate or key file changed (checked every `every`). Registers for SIGHUP when
/// called (so call it before announcing that the server is up: an unhandled SIGHUP ends
/// the process); without the signal (it cannot be registered) only the check runs.
pub fn keep_current(certs: Arc<CertStore>, every: Duration) -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}): the certificate reloads only when its files change");
            None
        }
    };
    async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                got = signalled => match got {
                    Some(()) => {
                        // `systemctl reload` (ExecReload sends SIGHUP) waits for READY=1.
                        crate::systemd::reloading();
                        certs.reload_and_log(Trigger::Signal);
                        crate::systemd::reloaded();
                    }
                    None => hup = None,
                },
                _ = tick.tick() => match certs.reload_if_changed() {
                    Some(Ok(info)) => log_reloaded(&certs.cert_path, Trigger::FileChange, &info),
                    Some(Err(e)) => log_refused(Trigger::FileChange, &e),
                    None => {}
                },
            }
        }
    }
}

/// The server configuration for one protocol, served with `certs`; `alpn` is its IANA
/// ALPN id ("imap", "smtp"). A client that offers ALPN without it is refused (ALPACA); one
/// that offers none is served. TLS 1.2 and 1.3 only, forward-secret suites (rustls' defaults).
pub fn server_config(certs: &Arc<CertStore>, alpn: &[&str]) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(certs, alpn, record_crypto())
}

/// [`server_config`] with the records encrypted by `lib` ([`RecordCrypto`]).
pub fn server_config_with(
    certs: &Arc<CertStore>,
    alpn: &[&str],
    lib: RecordCrypto,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(server_provider(lib.resolve()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if certs.acme_alpn.load(Ordering::Relaxed) {
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    /// A test CA that signs leaves for `localhost`.
    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new() -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
        }
        /// A leaf (certificate PEM, key PEM).
        fn leaf(&self, names: &[&str]) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let cert = CertificateParams::new(names).unwrap().signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }
        /// A leaf for `localhost` valid until the start of `(year, month, day)`.
        fn leaf_until(&self, year: i32, month: u8, day: u8) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, month, day);
            let cert = params.signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }
        fn client(&self) -> Arc<rustls::ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.0.der().clone()).unwrap();
            Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    }

    struct Files {
        _dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    impl Files {
        fn new((cert, key): &(String, String)) -> Files {
            let dir = tempfile::tempdir().unwrap();
            let f = Files { cert: dir.path().join("cert.pem"), key: dir.path().join("key.pem"), _dir: dir };
            f.write(cert, key);
            f
        }
        fn write(&self, cert: &str, key: &str) {
            std::fs::write(&self.cert, cert).unwrap();
            std::fs::write(&self.key, key).unwrap();
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A TLS connection made in memory: the client's and the server's ends after the
    /// handshake.
    fn connect(
        client: &Arc<ClientConfig>,
        server: &Arc<ServerConfig>,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let mut c = rustls::ClientConnection::new(client.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            shuttle(&mut c, &mut s);
        }
        (c, s)
    }

    /// Moves what each side has to send to the other.
    fn shuttle(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets().unwrap();
    }

    fn peer_leaf(c: &rustls::ClientConnection) -> CertificateDer<'static> {
        c.peer_certificates().unwrap()[0].clone().into_owned()
    }

    /// `[tls] record_crypto = "auto"`: ring only on a CPU with VAES + AVX2 and no AVX-512
    /// (as aws-lc sees it: `OPENSSL_ia32cap` may hide AVX512F, as `bench/run --no-avx512` does).
    #[test]
    fn record_crypto_auto_follows_the_cpu_and_the_mask() {
        let cpu = |vaes_avx2, avx512| CpuAes { vaes_avx2, avx512 };
        assert_eq!(RecordCrypto::decide(cpu(true, false)), RecordCrypto::Ring);
        assert_eq!(RecordCrypto::decide(cpu(true, true)), RecordCrypto::AwsLcRs);
        assert_eq!(RecordCrypto::decide(cpu(false, false)), RecordCrypto::AwsLcRs);
        assert_eq!(RecordCrypto::Ring.resolve(), RecordCrypto::Ring);
        assert_eq!(RecordCrypto::AwsLcRs.resolve(), RecordCrypto::AwsLcRs);
        assert_ne!(RecordCrypto::Auto.resolve(), RecordCrypto::Auto);
        for (value, hides) in [
            (":~0x5842DC230000", true),
            (":~0x10000", true),
            (":~0x20000", false),
            (":0x0", true),
            (":0x10000", false),
            (":|0x10000", false),
            ("0x4000000", false),
            ("~0x200000000000000", false),
            (":~65536", true),
            (":~zz", false),
            ("", false),
        ] {
            assert_eq!(ia32cap_hides_avx512f(value), hides, "{value:?}");
        }
        let c = crate::config::Config::from_toml_str("[tls]\nrecord_crypto = \"ring\"", "t").unwrap();
        assert_eq!(c.tls_record_crypto, RecordCrypto::Ring);
        let e = crate::config::Config::from_toml_str("[tls]\nrecord_crypto = \"openssl\"", "t").unwrap_err();
        assert!(e.to_string().contains("aws-lc-rs"), "{e}");
    }

    /// Either library carries data both ways on every TLS 1.3 suite (a client of the other
    /// library at the far end), and with ring the listeners' suites are ring's.
    #[test]
    fn both_record_libraries_carry_data_on_every_suite() {
        use std::io::{Read as _, Write as _};
        let ca = Ca::new();
        let files = Files::new(&ca.leaf(&["localhost"]));
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let ring = server_provider(RecordCrypto::Ring);
        for s in &ring.cipher_suites {
            let from_ring = rustls::crypto::ring::ALL_CIPHER_SUITES.iter().any(|r| match (r, s) {
                (rustls::SupportedCipherSuite::Tls13(a), rustls::SupportedCipherSuite::Tls13(b)) => {
                    std::ptr::eq(*a, *b)
                }
                (rustls::SupportedCipherSuite::Tls12(a), rustls::SupportedCipherSuite::Tls12(b)) => {
                    std::ptr::eq(*a, *b)
                }
                _ => false,
            });
            assert!(from_ring, "{:?} is not ring's", s.suite());
        }
        let aws = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(
            ring.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            aws.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            "same suites, same order"
        );
        for lib in [RecordCrypto::AwsLcRs, RecordCrypto::Ring] {
            let server = server_config_with(&certs, &["imap"], lib).unwrap();
            for suite in aws.cipher_suites.iter().filter(|s| s.tls13().is_some()) {
                let mut p = rustls::crypto::aws_lc_rs::default_provider();
                p.cipher_suites = vec![*suite];
                let mut roots = RootCertStore::empty();
                roots.add(ca.0.der().clone()).unwrap();
                let client = Arc::new(
                    ClientConfig::builder_with_provider(Arc::new(p))
                        .with_protocol_versions(&[&rustls::version::TLS13])
                        .unwrap()
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                );
                let (mut c, mut s) = connect(&client, &server);
                assert_eq!(s.negotiated_cipher_suite().map(|n| n.suite()), Some(suite.suite()), "{lib:?}");
                let big = vec![0xa5u8; 16_000];
                s.writer().write_all(&big).unwrap();
                c.writer().write_all(b"a1 NOOP\r\n").unwrap();
                let (mut got_c, mut got_s) = (Vec::new(), Vec::new());
                for _ in 0..64 {
                    shuttle(&mut c, &mut s);
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = c.reader().read(&mut buf) {
                        got_c.extend_from_slice(&buf[..n]);
                    }
                    while let Ok(n @ 1..) = s.reader().read(&mut buf) {
                        got_s.extend_from_slice(&buf[..n]);
                    }
                    if got_c.len() == big.len() && !got_s.is_empty() {
                        break;
                    }
                }
                assert_eq!(got_c, big, "{lib:?} {:?}", suite.suite());
                assert_eq!(got_s, b"a1 NOOP\r\n", "{lib:?} {:?}", suite.suite());
            }
        }
    }

    /// A good new pair serves new connections at once; a connection made before keeps
    /// working (it holds its own keys).
    #[test]
    fn a_reload_serves_the_new_pair_to_new_connections() {
        use std::io::{Read as _, Write as _};
        let ca = Ca::new();
        let (old, new) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost", "mail.example.test", "127.0.0.1"]));
        let files = Files::new(&old);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let server = server_config(&certs, &["imap"]).unwrap();
        let (mut c1, mut s1) = connect(&ca.client(), &server);
        assert_eq!(peer_leaf(&c1), der(&old.0));

        files.write(&new.0, &new.1);
        let info = certs.reload().unwrap();
        assert_eq!(info.names, ["localhost", "mail.example.test", "127.0.0.1"]);
        assert!(info.not_after.ends_with('Z') && info.not_after.len() == 20, "{info:?}");
        assert_eq!(certs.leaf(), der(&new.0));
        let (c2, _s2) = connect(&ca.client(), &server);
        assert_eq!(peer_leaf(&c2), der(&new.0), "a new connection gets the new certificate");

        // The connection made before the reload still carries data both ways.
        c1.writer().write_all(b"a NOOP\r\n").unwrap();
        shuttle(&mut c1, &mut s1);
        let mut got = [0u8; 8];
        s1.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a NOOP\r\n");
        s1.writer().write_all(b"a OK\r\n").unwrap();
        shuttle(&mut c1, &mut s1);
        let mut got = [0u8; 6];
        c1.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a OK\r\n");
    }

    /// Unreadable or unparsable files are refused, naming the file; the old pair stays.
    #[test]
    fn a_broken_pair_keeps_the_old_one() {
        let ca = Ca::new();
        let old = ca.leaf(&["localhost"]);
        let files = Files::new(&old);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let server = server_config(&certs, &["imap"]).unwrap();

        files.write("not a certificate\n", &old.1);
        let e = certs.reload().unwrap_err().to_string();
        assert!(e.starts_with(&files.cert.display().to_string()) && e.contains("no certificate"), "{e}");

        files.write(&old.0, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let e = certs.reload().unwrap_err().to_string();
        assert!(e.starts_with(&files.key.display().to_string()), "{e}");

        std::fs::remove_file(&files.key).unwrap();
        let e = certs.reload().unwrap_err().to_string();
        assert!(e.starts_with(&files.key.display().to_string()) && e.contains("No such file"), "{e}");

        assert_eq!(certs.leaf(), der(&old.0));
        let (c, _s) = connect(&ca.client(), &server);
        assert_eq!(peer_leaf(&c), der(&old.0));
    }

    /// The expiry metric follows the certificate in service: set at load, changed by a
    /// reload, kept when a reload is refused.
    #[test]
    fn the_expiry_metric_follows_the_certificate_in_service() {
        let ca = Ca::new();
        let files = Files::new(&ca.leaf_until(2030, 1, 1));
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let metrics = crate::metrics::Metrics::new();
        certs.register_metrics(&metrics);
        let expiry = || {
            let text = metrics.render();
            let line = text.lines().find(|l| l.starts_with("mailgate_tls_certificate_expiry_timestamp_seconds "));
            line.and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok()).unwrap()
        };
        assert_eq!(expiry(), 1_893_456_000, "2030-01-01T00:00:00Z");
        let (cert, key) = ca.leaf_until(2031, 5, 1);
        files.write(&cert, &key);
        assert_eq!(certs.reload().unwrap().expires, Some(1_935_360_000));
        assert_eq!(expiry(), 1_935_360_000, "2031-05-01T00:00:00Z");
        files.write("not a certificate\n", &key);
        assert!(certs.reload().is_err());
        assert_eq!(expiry(), 1_935_360_000, "the pair in service did not change");
    }

    /// A certificate with another certificate's key is refused (rustls' keys_match).
    #[test]
    fn a_key_that_does_not_match_the_certificate_is_refused() {
        let ca = Ca::new();
        let (old, new) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost"]));
        let files = Files::new(&old);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        files.write(&new.0, &old.1);
        let e = certs.reload().unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}: is not the key of the certificate in {}", files.key.display(), files.cert.display())
        );
        assert_eq!(certs.leaf(), der(&old.0));
        // At start-up the same pair is an error.
        assert!(CertStore::load(&files.cert, &files.key).is_err());
    }

    /// The periodic check reloads only when a file changed, and tries a refused pair once.
    #[test]
    fn the_file_check_reloads_on_a_change_only() {
        let ca = Ca::new();
        let (old, new) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost"]));
        let files = Files::new(&old);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        assert!(certs.reload_if_changed().is_none());
        // Half a renewal (the certificate replaced before the key): refused, tried once.
        std::fs::write(&files.cert, &new.0).unwrap();
        assert!(matches!(certs.reload_if_changed(), Some(Err(_))));
        assert!(certs.reload_if_changed().is_none());
        assert_eq!(certs.leaf(), der(&old.0));
        std::fs::write(&files.key, &new.1).unwrap();
        assert!(matches!(certs.reload_if_changed(), Some(Ok(_))));
        assert_eq!(certs.leaf(), der(&new.0));
        assert!(certs.reload_if_changed().is_none());
    }

    /// Strict SNI holds for a reloaded certificate's names.
    #[test]
    fn strict_sni_follows_the_certificate_in_service() {
        let ca = Ca::new();
        let files = Files::new(&ca.leaf(&["localhost"]));
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let server = server_config(&certs, &["imap"]).unwrap();
        let new = ca.leaf(&["mail.example.test"]);
        files.write(&new.0, &new.1);
        certs.reload().unwrap();
        let mut c = rustls::ClientConnection::new(ca.client(), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        assert!(s.process_new_packets().is_err(), "localhost is no longer the certificate's name");
    }

    /// `replace` refuses a bad pair without touching the files, and puts a good one in
    /// service and on disk (the file check then sees nothing new).
    #[test]
    fn replace_checks_the_pair_before_writing_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let ca = Ca::new();
        let (old, new, other) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost"]), ca.leaf(&["localhost"]));
        let files = Files::new(&old);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        assert!(certs.replace(new.0.as_bytes(), other.1.as_bytes()).is_err(), "not the certificate's key");
        assert!(certs.replace(b"nothing", new.1.as_bytes()).is_err());
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), old.0);
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), old.1);
        assert_eq!(certs.leaf(), der(&old.0));

        certs.replace(new.0.as_bytes(), new.1.as_bytes()).unwrap();
        assert_eq!(certs.leaf(), der(&new.0));
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), new.0);
        assert_eq!(std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(certs.reload_if_changed().is_none());
    }

    /// Takes any server certificate and signature: webpki, which rustls' signature checks
    /// parse the certificate with, refuses the critical acmeIdentifier extension that a
    /// real validator (Pebble, Boulder) reads.
    #[derive(Debug)]
    struct Reads(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for Reads {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// With ACME on, a handshake offering `acme-tls/1` gets the challenge certificate of
    /// its SNI name (or nothing), while ordinary clients keep getting the pair in service.
    #[test]
    fn acme_tls_alpn_handshakes_get_the_challenge_certificate() {
        let ca = Ca::new();
        let pair = ca.leaf(&["localhost"]);
        let files = Files::new(&pair);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        certs.answer_acme_challenges();
        let server = server_config(&certs, &["imap"]).unwrap();
        assert_eq!(server.alpn_protocols, [b"imap".to_vec(), ACME_TLS_ALPN.to_vec()]);
        let challenge = acme_challenge_key("localhost", &[1u8; 32]).unwrap();
        certs.set_challenge("LOCALHOST", challenge.clone());

        // A validator reads the certificate (RFC 8737 §3), it does not verify a chain.
        let mut validator = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Reads(provider())))
            .with_no_client_auth();
        validator.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        let validator = Arc::new(validator);
        let (c, _s) = connect(&validator, &server);
        assert_eq!(&peer_leaf(&c), challenge.end_entity_cert().unwrap());
        assert_eq!(c.alpn_protocol(), Some(ACME_TLS_ALPN));

        let (c, _s) = connect(&ca.client(), &server);
        assert_eq!(peer_leaf(&c), der(&pair.0), "an IMAP client is not affected");

        certs.clear_challenge("localhost");
        let mut c = rustls::ClientConnection::new(validator, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        assert!(s.process_new_packets().is_err(), "no challenge under way: no certificate");
    }

    /// Debug output names the files and the certificate, never the key.
    #[test]
    fn debug_output_has_no_key() {
        let ca = Ca::new();
        let pair = ca.leaf(&["localhost"]);
        let files = Files::new(&pair);
        let certs = CertStore::load(&files.cert, &files.key).unwrap();
        let shown = format!("{certs:?}");
        assert!(shown.contains("cert.pem") && shown.contains("localhost"), "{shown}");
        let body: String = pair.1.lines().filter(|l| !l.starts_with("-----")).collect();
        for chunk in body.as_bytes().chunks(16) {
            assert!(!shown.contains(std::str::from_utf8(chunk).unwrap()), "{shown}");
        }
    }
}
