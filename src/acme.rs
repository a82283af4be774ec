//! `[tls] acme = true`: the server certificate ordered from an ACME CA (RFC 8555; Let's
//! Encrypt or any other) and renewed before it runs out. `instant-acme` speaks the
//! protocol; this module keeps the account, answers the TLS-ALPN-01 challenge (RFC 8737)
//! through the listeners' one resolver ([`CertStore::set_challenge`]), and hands the issued
//! pair to [`CertStore::replace`], which checks it, writes it under `data_dir/acme/` and
//! puts it in service as a SIGHUP reload does: new connections get the new certificate,
//! live ones keep theirs.
//!
//! Start-up: until the first order completes the listeners serve a self-signed placeholder
//! ([`ensure_placeholder`]); TLS-ALPN-01 needs the listeners up, so the order runs once
//! they are. A failed order logs one line and leaves the certificate in service; it is
//! tried again after `acme_check_secs`, the wait doubling up to 16 times that.

use crate::config::AcmeConfig;
use crate::tls::{CertInfo, CertStore, TlsError};
use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::ServerName;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

/// Why an ACME order did not bring a certificate.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA answered with an error, or could not be reached.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The HTTPS request to the CA failed before an answer.
    #[error("{url}: {reason}")]
    Http {
        /// The request's URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The CA offers no TLS-ALPN-01 challenge for a name, or refused an authorization.
    #[error("authorization for {name}: {reason}")]
    Authorization {
        /// The name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The order did not become ready (a challenge failed).
    #[error("order ended as {0:?} (a challenge failed; the CA's log names why)")]
    NotReady(OrderStatus),
    /// A file under `data_dir/acme` could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The stored account could not be read.
    #[error("{path}: not account credentials: {reason}")]
    Account {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The issued pair, the CA file or a challenge certificate was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> AcmeError + '_ {
    move |source| AcmeError::File { path: path.to_path_buf(), source }
}

/// Makes a self-signed placeholder pair for the configured names if none was issued yet,
/// so that the listeners can start (and answer the first challenge). Returns true if it
/// made one.
pub fn ensure_placeholder(cfg: &AcmeConfig) -> Result<bool, AcmeError> {
    crate::fsutil::private_dir(&cfg.dir).map_err(file_err(&cfg.dir))?;
    Ok(crate::tls::ensure_dev_cert(&cfg.cert_path(), &cfg.key_path(), &cfg.names)?)
}

/// Whether the certificate in service must be (re)ordered now: it is the placeholder
/// (self-signed), lacks one of the names, or has less than `renew_before` left.
pub fn due(info: &CertInfo, cfg: &AcmeConfig, now: u64) -> bool {
    let self_signed = info.issuer == info.subject;
    let missing = cfg.names.iter().any(|n| !info.names.iter().any(|m| m.eq_ignore_ascii_case(n)));
    let left = info.expires.map(|e| e.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX)));
    let short = left.is_none_or(|l| l < i64::try_from(cfg.renew_before.as_secs()).unwrap_or(i64::MAX));
    self_signed || missing || short
}

/// The HTTPS client of the ACME account: one HTTP/1.1 connection per request over
/// mailgate's own rustls client configuration (the CA file of `tls.acme_ca_file`, else
/// the system roots).
#[derive(Clone)]
struct Https {
    tls: TlsConnector,
}

impl HttpClient for Https {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move { send(tls, req).await.map_err(|e| instant_acme::Error::Other(Box::new(e))) })
    }
}

/// Time allowed to connect to the CA and get its answer's head.
const CA_TIMEOUT: Duration = Duration::from_secs(30);

async fn send(tls: TlsConnector, mut req: http::Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, AcmeError> {
    let url = req.uri().to_string();
    let fail = |reason: String| AcmeError::Http { url: url.clone(), reason };
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err(fail("not an https:// URL".into()));
    }
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(443);
    let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_else(|| host.clone());
    let name = ServerName::try_from(host.clone()).map_err(|e| fail(e.to_string()))?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| fail(e.to_string()))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| fail(format!("TLS: {e}")))?;
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        *req.uri_mut() = path.parse().map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
        let host_header = http::HeaderValue::from_str(&authority).map_err(|e| fail(e.to_string()))?;
        req.headers_mut().insert(http::header::HOST, host_header);
        crate::net::http::request(stream, req).await.map_err(|e| fail(e.to_string()))
    };
    let rsp = tokio::time::timeout(CA_TIMEOUT, exchange).await.map_err(|_| fail("no answer in 30 s".into()))??;
    Ok(BytesResponse::from(rsp))
}

/// Whether stored account credentials (`account.json`) belong to `directory`: an account
/// is one CA's, so a changed `acme_directory` registers a new one.
fn stored_for(json: &[u8], directory: &str) -> bool {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("directory")?.as_str().map(|d| d == directory))
        .unwrap_or(false)
}

/// The ACME account: read from `account.json` if it is this directory's, or registered
/// with the CA and written there (mode 0600: it holds the account key).
async fn account(cfg: &AcmeConfig) -> Result<Account, AcmeError> {
    let client = crate::tls::client_config(cfg.ca_file.as_deref())?;
    let http = Https { tls: TlsConnector::from(client) };
    let path = cfg.account_path();
    let stored = match std::fs::read(&path) {
        Ok(bytes) => Some(Zeroizing::new(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(file_err(&path)(e)),
    };
    if let Some(bytes) = stored {
        if stored_for(&bytes, &cfg.directory) {
            let creds: AccountCredentials = serde_json::from_slice(&bytes)
                .map_err(|e| AcmeError::Account { path: path.clone(), reason: e.to_string() })?;
            return Ok(Account::builder_with_http(Box::new(http)).from_credentials(creds).await?);
        }
        tracing::info!(directory = %cfg.directory, "the stored ACME account is another directory's: registering a new one");
    }
    let contact = [cfg.contact.as_str()];
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, creds) = Account::builder_with_http(Box::new(http)).create(&new, cfg.directory.clone(), None).await?;
    let json = Zeroizing::new(
        serde_json::to_vec(&creds).map_err(|e| AcmeError::Account { path: path.clone(), reason: e.to_string() })?,
    );
    crate::fsutil::write_private(&path, &json).map_err(file_err(&path))?;
    tracing::info!(directory = %cfg.directory, account = %account.id(), "ACME account registered");
    Ok(account)
}

/// Stops answering the order's challenges when the order ends, whichever way.
struct Challenges<'a> {
    certs: &'a CertStore,
    names: Vec<String>,
}

impl Drop for Challenges<'_> {
    fn drop(&mut self) {
        for n in &self.names {
            self.certs.clear_challenge(n);
        }
    }
}

/// How long the CA gets to validate the challenges, and to issue.
fn patience() -> RetryPolicy {
    RetryPolicy::new().initial_delay(Duration::from_millis(500)).backoff(1.5).timeout(Duration::from_secs(180))
}

/// One order for the configured names: answers the TLS-ALPN-01 challenges, writes the
/// issued pair and puts it in service. On any error the pair in service stays.
pub async fn order(cfg: &AcmeConfig, certs: &CertStore, account: &Account) -> Result<CertInfo, AcmeError> {
    let ids: Vec<Identifier> = cfg.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let mut answering = Challenges { certs, names: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                let name = authz.identifier().to_string();
                return Err(AcmeError::Authorization { name, reason: format!("{other:?}") });
            }
        }
        let name = authz.identifier().to_string();
        let mut challenge = authz.challenge(ChallengeType::TlsAlpn01).ok_or_else(|| AcmeError::Authorization {
            name: name.clone(),
            reason: "no tls-alpn-01 challenge".into(),
        })?;
        let key = crate::tls::acme_challenge_key(&name, challenge.key_authorization().digest().as_ref())?;
        certs.set_challenge(&name, key);
        answering.names.push(name);
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&patience()).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::NotReady(status));
    }
    let key_pem = Zeroizing::new(order.finalize().await?);
    let chain_pem = order.poll_certificate(&patience()).await?;
    drop(answering);
    // Checked before it is written: a pair the store refuses leaves files and service as they were.
    Ok(certs.replace(chain_pem.as_bytes(), key_pem.as_bytes())?)
}

/// Keeps the certificate in `certs` issued and current until the task is dropped: orders
/// at once if it is due ([`due`]), then checks every `cfg.check`. A failed order logs one
/// ERROR line and is tried again after `cfg.check`, the wait doubling up to 16 × `cfg.check`.
pub async fn keep_issued(cfg: AcmeConfig, certs: Arc<CertStore>) {
    let max_wait = cfg.check.saturating_mul(16);
    let mut account_in_use: Option<Account> = None;
    let mut wait = cfg.check;
    loop {
        if due(&certs.info(), &cfg, crate::fsutil::now_unix()) {
            let outcome = async {
                let acct = match account_in_use.take() {
                    Some(a) => a,
                    None => account(&cfg).await?,
                };
                let result = order(&cfg, &certs, &acct).await;
                account_in_use = Some(acct);
                result
            }
            .await;
            match outcome {
                Ok(info) => {
                    tracing::info!(
                        names = %info.names.join(","),
                        issuer = %info.issuer,
                        not_after = %info.not_after,
                        "ACME certificate issued and in service"
                    );
                    wait = cfg.check;
                }
                Err(e) => {
                    tracing::error!(
                        retry_in_secs = wait.as_secs(),
                        "ACME order failed, the certificate in service stays: {e}"
                    );
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2).min(max_wait);
                    continue;
                }
            }
        }
        tokio::time::sleep(cfg.check).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(renew_days: u64) -> AcmeConfig {
        AcmeConfig {
            directory: "https://ca.example/dir".into(),
            contact: "mailto:a@example.com".into(),
            ca_file: None,
            names: vec!["mail.example.com".into(), "imap.example.com".into()],
            renew_before: Duration::from_secs(renew_days * 86_400),
            check: Duration::from_secs(60),
            dir: "/nonexistent".into(),
        }
    }

    fn info(issuer: &str, names: &[&str], expires: Option<i64>) -> CertInfo {
        CertInfo {
            subject: "CN=mail.example.com".into(),
            issuer: issuer.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            not_after: String::new(),
            expires,
        }
    }

    #[test]
    fn an_order_is_due_for_the_placeholder_a_missing_name_or_a_short_validity() {
        let names = ["mail.example.com", "IMAP.example.com"];
        let now = 1_000_000_000;
        let day = 86_400;
        assert!(!due(&info("CN=CA", &names, Some(now + 40 * day)), &cfg(30), now as u64));
        assert!(due(&info("CN=CA", &names, Some(now + 29 * day)), &cfg(30), now as u64), "less than 30 days left");
        assert!(due(&info("CN=CA", &names, Some(now - 1)), &cfg(30), now as u64), "expired");
        assert!(due(&info("CN=CA", &names, None), &cfg(30), now as u64), "unparsed");
        assert!(due(&info("CN=mail.example.com", &names, Some(now + 400 * day)), &cfg(30), now as u64), "self-signed");
        assert!(due(&info("CN=CA", &names[..1], Some(now + 40 * day)), &cfg(30), now as u64), "a name missing");
    }

    #[test]
    fn a_stored_account_is_used_for_its_own_directory_only() {
        let json = br#"{"id":"https://ca.example/acct/1","key_pkcs8":"AAAA","directory":"https://ca.example/dir"}"#;
        assert!(stored_for(json, "https://ca.example/dir"));
        assert!(!stored_for(json, "https://other.example/dir"));
        assert!(!stored_for(br#"{"id":"x","key_pkcs8":"AAAA"}"#, "https://ca.example/dir"));
        assert!(!stored_for(b"not json", "https://ca.example/dir"));
    }

    #[test]
    fn the_challenge_certificate_answers_acme_tls_only() {
        let key = crate::tls::acme_challenge_key("mail.example.com", &[7u8; 32]).unwrap();
        let leaf = CertInfo::of_der(key.end_entity_cert().unwrap());
        assert_eq!(leaf.names, ["mail.example.com"]);
        // The acmeIdentifier extension (1.3.6.1.5.5.7.1.31) holds the digest.
        let der = key.end_entity_cert().unwrap().to_vec();
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(der.windows(oid.len()).any(|w| w == oid));
        assert!(der.windows(32).any(|w| w == [7u8; 32]));
    }
}
