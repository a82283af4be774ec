//! Credential checks, shared by IMAP, SMTP and (later) the web step.
//!
//! [`Authenticator::verify`] takes what a mail client sent and returns a [`Verdict`].
//! Only this module can make an [`Authenticated`] proof, and the relay needs one, so
//! a path that skips the check does not compile (the rustls capability pattern).
//!
//! Rules: an app password (recognised by its shape, selected by its public id) must
//! belong to the account and carry the protocol's scope. The account password works
//! only for accounts without a second factor; for the others it is refused with
//! [`Verdict::NeedsAppPassword`] (after checking it is right, so the answer reveals
//! nothing to someone who does not know it) and recorded for the owner to see.
//! Every other failure is the same [`Verdict::Denied`]. Each attempt costs at most one
//! argon2id hash (a dummy one for unknown users), computed on the blocking pool behind
//! a semaphore so hashing cannot eat all memory and cores.

pub mod app_password;
pub mod backup_codes;
pub mod clock;
pub mod crypto;
pub mod legacy_hash;
pub mod password;
pub mod throttle;
pub mod totp;

use crate::config::{Accounts, PasswordCheck};
use crate::fsutil::now_unix;
use crate::proto::sasl::Credentials;
use crate::secret::SecretBytes;
use crate::store::{AuditEvent, LastUse, Scope, Store};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Which protocol asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// IMAP.
    Imap,
    /// SMTP submission.
    Smtp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Imap => "IMAP",
            Protocol::Smtp => "SMTP",
        })
    }
}

impl Protocol {
    fn scope(self) -> Scope {
        match self {
            Protocol::Imap => Scope::Imap,
            Protocol::Smtp => Scope::Smtp,
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Client address.
    pub ip: IpAddr,
    /// Client name from IMAP `ID`, if sent.
    pub client_name: Option<String>,
}

/// Proof that a login was verified. Only [`Authenticator`] makes one.
#[derive(Debug, Clone)]
pub struct Authenticated {
    username: String,
    app_password_id: Option<String>,
    senders: Vec<String>,
}

impl Authenticated {
    /// The account.
    pub fn username(&self) -> &str {
        &self.username
    }
    /// The app password used, if any (`None`: the account password).
    pub fn app_password_id(&self) -> Option<&str> {
        self.app_password_id.as_deref()
    }
    /// The addresses the account may send as: its own and its aliases.
    pub fn senders(&self) -> &[String] {
        &self.senders
    }
}

/// The outcome of a check.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead.
    Granted(Authenticated),
    /// Refused; one answer for every cause.
    Denied,
    /// The right account password of an account with two-factor authentication.
    NeedsAppPassword,
    /// The check could not run (store error, overload); try later.
    Unavailable,
    /// `password_check = "upstream"`: the account password must be checked by the
    /// upstream server. For an account without a second factor, the driver logs in
    /// upstream as the user with it (that login is the check and becomes the session);
    /// for one with a second factor it only checks ([`Authenticator::check_upstream`]).
    /// Either way it then calls [`Authenticator::confirm_upstream`].
    CheckUpstream(UpstreamCheck),
}

/// An account password waiting for the upstream server's word.
#[derive(Debug)]
pub struct UpstreamCheck {
    username: String,
    password: SecretBytes,
    second_factor: bool,
    who: String,
}

impl UpstreamCheck {
    /// The account.
    pub fn username(&self) -> &str {
        &self.username
    }
    /// The password the client sent.
    pub fn password(&self) -> &SecretBytes {
        &self.password
    }
    /// The account has a second factor: check only, never open a session with it.
    pub fn second_factor(&self) -> bool {
        self.second_factor
    }
}

/// What the upstream server said about a user + password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    /// It accepted them.
    Valid,
    /// It refused them.
    Invalid,
    /// It could not be asked (down, timeout, TLS failure).
    Unavailable,
}

/// Checks a user's password by logging in to the upstream server with it (implemented in
/// `net`, so that auth stays free of I/O code).
pub trait PasswordChecker: Send + Sync {
    /// Logs in as `username` with `password` and out again.
    fn check(
        &self,
        username: String,
        password: SecretBytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = CheckResult> + Send + '_>>;
}

/// Remembers successful upstream checks for a short time, keyed by a keyed hash of user
/// *and* password (never the password itself), so a client retrying does not cost an
/// upstream login each time. Dropped for a user at once when a check fails. Never used
/// for TOTP or backup codes (SECURITY.md case 68).
pub struct VerifyCache {
    key: aws_lc_rs::hmac::Key,
    ttl: Duration,
    entries: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (String, std::time::Instant)>>,
}

/// Entries kept at most (each is a 32-byte tag and a name).
const VERIFY_CACHE_MAX: usize = 100_000;

impl VerifyCache {
    /// A cache with a fresh random key.
    pub fn new(ttl: Duration) -> Option<VerifyCache> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).ok()?;
        Some(VerifyCache {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k),
            ttl,
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn tag(&self, username: &str, password: &SecretBytes) -> Vec<u8> {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.key);
        ctx.update(username.as_bytes());
        ctx.update(&[0]);
        ctx.update(password.expose());
        ctx.sign().as_ref().to_vec()
    }

    /// Whether this user + password was checked successfully within the lifetime.
    pub fn hit(&self, username: &str, password: &SecretBytes) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let tag = self.tag(username, password);
        let Ok(m) = self.entries.lock() else { return false };
        m.get(&tag).is_some_and(|(u, at)| u == username && at.elapsed() < self.ttl)
    }

    /// Remembers a successful check.
    pub fn remember(&self, username: &str, password: &SecretBytes) {
        if self.ttl.is_zero() {
            return;
        }
        let tag = self.tag(username, password);
        if let Ok(mut m) = self.entries.lock() {
            if m.len() >= VERIFY_CACHE_MAX {
                let ttl = self.ttl;
                m.retain(|_, (_, at)| at.elapsed() < ttl);
                if m.len() >= VERIFY_CACHE_MAX {
                    m.clear();
                }
            }
            m.insert(tag, (username.to_string(), std::time::Instant::now()));
        }
    }

    /// Forgets every entry of a user (failed check, password change, revocation).
    pub fn forget(&self, username: &str) {
        if let Ok(mut m) = self.entries.lock() {
            m.retain(|_, (u, _)| u != username);
        }
    }
}

/// The outcome of the web step's password check.
#[derive(Debug)]
pub enum WebCheck {
    /// The account password is right.
    Ok(Box<crate::store::Account>),
    /// Wrong password or unknown user (one answer).
    Denied,
    /// Try later.
    Unavailable,
}

/// How long a login waits for its check before it is told to come back later.
const HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Checks that may wait for a hashing thread; past this, logins get `Unavailable` at once.
const HASH_QUEUE_LEN: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// Checks credentials against the store.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    /// Queue of the hashing threads: a fixed set, so argon2's 19 MiB working memory is
    /// allocated once per thread and the number of hashes at once is bounded.
    jobs: std::sync::mpsc::SyncSender<Job>,
    /// `password_check = "upstream"`: the mode, the checker and its cache.
    upstream: Option<Arc<UpstreamMode>>,
    /// Failure delays per address and account.
    throttle: Arc<throttle::Throttle>,
}

struct UpstreamMode {
    accounts: Accounts,
    checker: Arc<dyn PasswordChecker>,
    cache: VerifyCache,
}

/// Lower-cases and trims a login name.
pub fn normalize_username(name: &str) -> String {
    name.trim().to_lowercase()
}

impl Authenticator {
    /// `max_hashes`: argon2 evaluations at once (one thread each).
    pub fn new(store: Arc<dyn Store>, max_hashes: usize) -> Authenticator {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(HASH_QUEUE_LEN);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for n in 0..max_hashes.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("mailgate-hash-{n}")).spawn(move || {
                loop {
                    // The lock is held only while taking a job, not while running it.
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return, // every Authenticator is gone
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a hashing thread");
            }
        }
        Authenticator {
            store,
            jobs: tx,
            upstream: None,
            throttle: Arc::new(throttle::Throttle::new(Duration::ZERO, Duration::ZERO)),
        }
    }

    /// Failure delays: `base` for a first failure, doubling per address up to `max`.
    pub fn with_failure_delays(mut self, base: Duration, max: Duration) -> Authenticator {
        self.throttle = Arc::new(throttle::Throttle::new(base, max));
        self
    }

    /// Records a refused guess (wrong password or app password) of `username` from `ip`
    /// and returns how long to wait before answering (SECURITY.md §H).
    pub fn failure_delay(&self, ip: IpAddr, username: &str, secret: &[u8]) -> Duration {
        self.throttle.fail(ip, &normalize_username(username), secret)
    }

    /// The wait before a refusal that is not a guess (malformed exchange, the account
    /// password of a 2FA account).
    pub fn base_delay(&self) -> Duration {
        self.throttle.base()
    }

    /// A successful login clears the address's penalty and the account's delay.
    pub fn succeeded(&self, ip: IpAddr, username: &str) {
        self.throttle.succeed(ip, username);
    }

    /// Clears an account's in-memory failure delay (admin unlock).
    pub fn forget_failures(&self, username: &str) {
        self.throttle.forget_user(username);
    }

    /// Account passwords are checked by the upstream server (`password_check = "upstream"`).
    pub fn with_upstream_check(mut self, accounts: Accounts, checker: Arc<dyn PasswordChecker>) -> Authenticator {
        if accounts.password_check == PasswordCheck::Upstream
            && let Some(cache) = VerifyCache::new(accounts.verify_cache)
        {
            self.upstream = Some(Arc::new(UpstreamMode { accounts, checker, cache }));
        }
        self
    }

    /// Whether account passwords are checked upstream.
    pub fn upstream_mode(&self) -> bool {
        self.upstream.is_some()
    }

    /// Checks a user + password with the upstream server (only, no session), using the
    /// cache. For accounts with a second factor and for the web step.
    pub async fn check_upstream(&self, username: &str, password: &SecretBytes) -> CheckResult {
        let Some(mode) = &self.upstream else { return CheckResult::Unavailable };
        if mode.cache.hit(username, password) {
            return CheckResult::Valid;
        }
        let result = mode.checker.check(username.to_string(), SecretBytes::from(password.expose().clone())).await;
        match result {
            CheckResult::Valid => mode.cache.remember(username, password),
            CheckResult::Invalid => mode.cache.forget(username),
            CheckResult::Unavailable => {}
        }
        result
    }

    /// Forgets cached checks of a user (password change, account removed).
    pub fn forget(&self, username: &str) {
        if let Some(mode) = &self.upstream {
            mode.cache.forget(username);
        }
    }

    /// The upstream server's word on a [`Verdict::CheckUpstream`]: grants (creating the
    /// account on first use), refuses, or — for an account with a second factor and the
    /// right password — [`Verdict::NeedsAppPassword`].
    pub async fn confirm_upstream(&self, check: UpstreamCheck, result: CheckResult) -> Verdict {
        let Some(mode) = self.upstream.clone() else { return Verdict::Unavailable };
        match result {
            CheckResult::Unavailable => return Verdict::Unavailable,
            CheckResult::Invalid => {
                mode.cache.forget(&check.username);
                let store = self.store.clone();
                let (user, who) = (check.username.clone(), check.who.clone());
                let _ = self
                    .run_blocking(move || {
                        record(store.as_ref(), &user, "login_failed", who);
                        if let Ok(Some(a)) = store.get_account(&user) {
                            count_failures(store.as_ref(), &a, &Verdict::Denied);
                        }
                    })
                    .await;
                return Verdict::Denied;
            }
            CheckResult::Valid => mode.cache.remember(&check.username, &check.password),
        }
        let store = self.store.clone();
        let accounts = mode.accounts.clone();
        self.run_blocking(move || {
            let Some(account) = ensure_account(store.as_ref(), &accounts, &check.username) else {
                return Verdict::Denied;
            };
            if account.failed_logins >= crate::store::MAX_FAILED_LOGINS {
                return Verdict::Denied;
            }
            if account.has_second_factor() {
                record(store.as_ref(), &account.username, "account_password_refused_2fa", check.who.clone());
                return Verdict::NeedsAppPassword;
            }
            record(
                store.as_ref(),
                &account.username,
                "login",
                format!("{} with the account password (checked upstream)", check.who),
            );
            let granted = Verdict::Granted(Authenticated {
                username: account.username.clone(),
                app_password_id: None,
                senders: senders(&account),
            });
            count_failures(store.as_ref(), &account, &granted);
            granted
        })
        .await
        .unwrap_or(Verdict::Unavailable)
    }

    /// Runs `f` on a hashing thread (for checks that hash: account passwords, backup codes).
    /// `None`: the queue is full or the result did not come in time.
    pub async fn run_blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.try_send(job).ok()?;
        tokio::time::timeout(HASH_QUEUE_TIMEOUT, rx).await.ok()?.ok()
    }

    /// The web step's first factor: the account password only (app passwords never open
    /// the web step). Unknown users cost the same hash.
    pub async fn check_account_password(&self, username: &str, password: &SecretBytes) -> WebCheck {
        let username = normalize_username(username);
        if self.upstream.is_some() {
            return self.check_account_password_upstream(&username, password).await;
        }
        let store = self.store.clone();
        let password = SecretBytes::from(password.expose().clone());
        self.run_blocking(move || match store.get_account(&username) {
            // The web step stays open to a locked account: signing in there (with the second
            // factor) is how its owner unlocks it (SECURITY.md case 62).
            Ok(Some(account)) => match account.password_hash.as_deref() {
                Some(h) if legacy_hash::verify(password.expose(), h) => {
                    rehash_if_needed(store.as_ref(), &account, &password);
                    WebCheck::Ok(Box::new(account))
                }
                _ => {
                    if account.password_hash.is_none() {
                        password::dummy_verify(password.expose());
                    }
                    count_failures(store.as_ref(), &account, &Verdict::Denied);
                    WebCheck::Denied
                }
            },
            Ok(None) => {
                password::dummy_verify(password.expose());
                WebCheck::Denied
            }
            Err(e) => {
                tracing::error!(error = %e, "store error during web sign-in");
                WebCheck::Unavailable
            }
        })
        .await
        .unwrap_or(WebCheck::Unavailable)
    }

    /// The web step in `password_check = "upstream"` mode: the upstream server checks the
    /// password (cached briefly); the account is created on first use where allowed.
    async fn check_account_password_upstream(&self, username: &str, password: &SecretBytes) -> WebCheck {
        let Some(mode) = self.upstream.clone() else { return WebCheck::Unavailable };
        let known = match self.store.get_account(username) {
            Ok(a) => a.is_some(),
            Err(_) => return WebCheck::Unavailable,
        };
        if !known && !mode.accounts.may_create(username) {
            return WebCheck::Denied;
        }
        match self.check_upstream(username, password).await {
            CheckResult::Valid => {
                let store = self.store.clone();
                let (user, accounts) = (username.to_string(), mode.accounts.clone());
                match self.run_blocking(move || ensure_account(store.as_ref(), &accounts, &user)).await.flatten() {
                    Some(a) => WebCheck::Ok(Box::new(a)),
                    None => WebCheck::Unavailable,
                }
            }
            CheckResult::Invalid => WebCheck::Denied,
            CheckResult::Unavailable => WebCheck::Unavailable,
        }
    }

    /// The store behind this authenticator.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Checks a login.
    pub async fn verify(&self, creds: &Credentials, protocol: Protocol, peer: &Peer) -> Verdict {
        let store = self.store.clone();
        let username = normalize_username(&creds.username);
        let password = SecretBytes::from(creds.password.expose().clone());
        let peer = peer.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let accounts = self.upstream.as_ref().map(|m| m.accounts.clone());
        let job: Job = Box::new(move || {
            let _ = tx.send(decide_with(store.as_ref(), accounts.as_ref(), &username, &password, protocol, &peer));
        });
        if self.jobs.try_send(job).is_err() {
            return Verdict::Unavailable;
        }
        match tokio::time::timeout(HASH_QUEUE_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            _ => Verdict::Unavailable,
        }
    }
}

/// The decision, synchronous (runs on the blocking pool).
pub fn decide(store: &dyn Store, username: &str, password: &SecretBytes, protocol: Protocol, peer: &Peer) -> Verdict {
    decide_with(store, None, username, password, protocol, peer)
}

/// The decision with the account mode: with `password_check = "upstream"`, an account
/// password is not checked here but handed back as [`Verdict::CheckUpstream`].
pub fn decide_with(
    store: &dyn Store,
    accounts: Option<&Accounts>,
    username: &str,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
) -> Verdict {
    let upstream_mode = accounts.is_some_and(|a| a.password_check == PasswordCheck::Upstream);
    let account = match store.get_account(username) {
        Ok(Some(a)) => a,
        Ok(None) if upstream_mode && accounts.is_some_and(|a| a.may_create(username)) => {
            return Verdict::CheckUpstream(UpstreamCheck {
                username: username.to_string(),
                password: SecretBytes::from(password.expose().clone()),
                second_factor: false,
                who: format!("{} via {protocol}", peer.ip),
            });
        }
        Ok(None) => {
            password::dummy_verify(password.expose());
            return Verdict::Denied;
        }
        Err(e) => {
            tracing::error!(error = %e, "store error during login");
            return Verdict::Unavailable;
        }
    };
    let audit = |kind: &str, detail: String| {
        let ev = AuditEvent { at: now_unix(), username: account.username.clone(), kind: kind.into(), detail };
        if let Err(e) = store.append_audit(&ev) {
            tracing::warn!(error = %e, "audit write failed");
        }
    };
    if account.failed_logins >= crate::store::MAX_FAILED_LOGINS {
        // Locked: a cheap refusal, before any hashing (SECURITY.md case 60).
        audit("login_refused_locked", format!("{} via {protocol}", peer.ip));
        return Verdict::Denied;
    }
    let verdict = decide_account(store, &account, password, protocol, peer, upstream_mode, &audit);
    count_failures(store, &account, &verdict);
    verdict
}

/// Keeps the account's persistent count of consecutive failures.
fn count_failures(store: &dyn Store, account: &crate::store::Account, verdict: &Verdict) {
    let change: Option<fn(&mut crate::store::Account)> = match verdict {
        Verdict::Denied => Some(|a| a.failed_logins = a.failed_logins.saturating_add(1)),
        Verdict::Granted(_) if account.failed_logins > 0 => Some(|a| a.failed_logins = 0),
        _ => None,
    };
    if let Some(change) = change
        && let Err(e) = store.update_account(&account.username, &mut |a| {
            change(a);
            Ok(())
        })
    {
        tracing::warn!(user = %account.username, error = %e, "could not count a login failure");
    }
}

/// The decision for an existing, unlocked account.
fn decide_account(
    store: &dyn Store,
    account: &crate::store::Account,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
    upstream_mode: bool,
    audit: &dyn Fn(&str, String),
) -> Verdict {
    let who = format!(
        "{} via {}{}",
        peer.ip,
        protocol,
        peer.client_name.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
    );
    if let Some((id, normalized)) = app_password::parse(password.expose()) {
        match store.get_app_password(&id) {
            Ok(Some(rec)) if rec.username == account.username => {
                if !password::verify(normalized.expose().as_bytes(), &rec.hash) {
                    audit("login_failed", who);
                    return Verdict::Denied;
                }
                if !rec.scopes.contains(&protocol.scope()) {
                    audit("app_password_wrong_scope", format!("{} ({}) from {who}", rec.label, rec.id));
                    return Verdict::Denied;
                }
                let used = LastUse { at: now_unix(), ip: peer.ip.to_string(), client: peer.client_name.clone() };
                if let Err(e) = store.record_app_password_use(&rec.id, &used) {
                    tracing::warn!(error = %e, "last-use write failed");
                }
                audit("login", format!("{who} with app password {} ({})", rec.label, rec.id));
                return Verdict::Granted(Authenticated {
                    username: account.username.clone(),
                    app_password_id: Some(rec.id),
                    senders: senders(account),
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "store error during login");
                return Verdict::Unavailable;
            }
        }
    }
    if upstream_mode {
        return Verdict::CheckUpstream(UpstreamCheck {
            username: account.username.clone(),
            password: SecretBytes::from(password.expose().clone()),
            second_factor: account.has_second_factor(),
            who,
        });
    }
    let Some(hash) = account.password_hash.as_deref() else {
        password::dummy_verify(password.expose());
        return Verdict::Denied;
    };
    if !legacy_hash::verify(password.expose(), hash) {
        audit("login_failed", who);
        return Verdict::Denied;
    }
    rehash_if_needed(store, account, password);
    if account.has_second_factor() {
        audit("account_password_refused_2fa", who);
        return Verdict::NeedsAppPassword;
    }
    audit("login", format!("{who} with the account password"));
    Verdict::Granted(Authenticated {
        username: account.username.clone(),
        app_password_id: None,
        senders: senders(account),
    })
}

/// An imported hash (bcrypt, SHA-crypt, SSHA…) or one with weaker parameters is replaced
/// by an argon2id hash of the password that just proved right.
fn rehash_if_needed(store: &dyn Store, account: &crate::store::Account, password: &SecretBytes) {
    let Some(old) = account.password_hash.as_deref() else { return };
    if !legacy_hash::needs_rehash(old) {
        return;
    }
    let Ok(new) = password::hash(password.expose()) else { return };
    let old = old.to_string();
    let result = store.update_account(&account.username, &mut |a| {
        // Only if nobody changed the password meanwhile.
        if a.password_hash.as_deref() == Some(old.as_str()) {
            a.password_hash = Some(new.clone());
        }
        Ok(())
    });
    if let Err(e) = result {
        tracing::warn!(user = %account.username, error = %e, "could not upgrade the password hash");
    }
}

/// The account, created on its first successful upstream-checked login where allowed.
/// `None`: not allowed, or the store failed.
fn ensure_account(store: &dyn Store, accounts: &Accounts, username: &str) -> Option<crate::store::Account> {
    match store.get_account(username) {
        Ok(Some(a)) => Some(a),
        Ok(None) if accounts.may_create(username) => {
            let now = now_unix();
            let account = crate::store::Account {
                username: username.to_string(),
                addresses: vec![],
                password_hash: None,
                totp: None,
                second_factor_required: false,
                backup_codes: None,
                second_factor_failures: 0,
                failed_logins: 0,
                created_at: now,
                updated_at: now,
            };
            match store.create_account(&account) {
                Ok(()) => {
                    record(store, username, "account_created", "on first login (password checked upstream)".into());
                    Some(account)
                }
                // Created by a concurrent login in the meantime: use that one.
                Err(_) => store.get_account(username).ok().flatten(),
            }
        }
        _ => None,
    }
}

fn record(store: &dyn Store, username: &str, kind: &str, detail: String) {
    let ev = AuditEvent { at: now_unix(), username: username.into(), kind: kind.into(), detail };
    if let Err(e) = store.append_audit(&ev) {
        tracing::warn!(error = %e, "audit write failed");
    }
}

fn senders(account: &crate::store::Account) -> Vec<String> {
    std::iter::once(account.username.clone()).chain(account.addresses.iter().cloned()).collect()
}

/// The text a person sees when their mail client sends the account password of a 2FA
/// account (IMAP `[ALERT]`, SMTP `534 5.7.9`).
pub fn app_password_hint(url: &str) -> String {
    format!(
        "This account uses two-step verification, so your mail app needs an app password instead of your account password. Create one at {url} and enter it here as the password."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;
    use crate::store::{Account, AppPasswordRecord, TotpState};

    fn setup() -> (tempfile::TempDir, SledStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.create_account(&Account {
            username: "a@x".into(),
            addresses: vec![],
            password_hash: Some(password::hash(b"account-pw").unwrap()),
            totp: None,
            second_factor_required: false,
            backup_codes: None,
            second_factor_failures: 0,
            failed_logins: 0,
            created_at: 0,
            updated_at: 0,
        })
        .unwrap();
        let p = app_password::generate().unwrap();
        s.create_app_password(&AppPasswordRecord {
            id: p.id.clone(),
            username: "a@x".into(),
            label: "phone".into(),
            scopes: vec![Scope::Imap],
            hash: password::hash(p.password.expose().as_bytes()).unwrap(),
            created_at: 0,
            created_by: "admin".into(),
            last_used: None,
        })
        .unwrap();
        (dir, s, p.grouped().expose().clone())
    }

    fn peer() -> Peer {
        Peer { ip: "192.0.2.1".parse().unwrap(), client_name: Some("Thunderbird".into()) }
    }

    fn pw(s: &str) -> SecretBytes {
        s.as_bytes().to_vec().into()
    }

    #[test]
    fn table() {
        let (_d, s, app) = setup();
        assert!(
            matches!(decide(&s, "a@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Granted(a) if a.app_password_id().is_some())
        );
        let used = s.list_app_passwords("a@x").unwrap()[0].last_used.clone().unwrap();
        assert_eq!(used.client.as_deref(), Some("Thunderbird"));
        assert!(matches!(decide(&s, "a@x", &pw(&app), Protocol::Smtp, &peer()), Verdict::Denied));
        assert!(
            matches!(decide(&s, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::Granted(a) if a.app_password_id().is_none())
        );
        assert!(matches!(decide(&s, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(matches!(decide(&s, "nobody@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Denied));
        // Another account's app password does not open this one.
        let mut b = s.get_account("a@x").unwrap().unwrap();
        b.username = "b@x".into();
        s.create_account(&b).unwrap();
        assert!(matches!(decide(&s, "b@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Denied));
    }

    #[test]
    fn imported_hashes_are_upgraded_to_argon2id_on_login() {
        let (_d, s, _app) = setup();
        let mut a = s.get_account("a@x").unwrap().unwrap();
        // doveadm pw -s SHA512-CRYPT -p 'correct horse'
        a.password_hash = Some(
            "{SHA512-CRYPT}$6$LkYAziLPYynr.PmP$vjYNVvjz2joE6JhbOlaxkT0BfUvIVYgIrhqMPxmF7knjl4ZkXro7CshkWtQK1CsB9a94nNhE65TkZx5VsTxSA/".into(),
        );
        s.put_account(&a).unwrap();
        assert!(matches!(decide(&s, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(s.get_account("a@x").unwrap().unwrap().password_hash.unwrap().starts_with("{SHA512-CRYPT}"));
        let v = decide(&s, "a@x", &pw("correct horse"), Protocol::Imap, &peer());
        assert!(matches!(v, Verdict::Granted(_)), "{v:?}");
        let h = s.get_account("a@x").unwrap().unwrap().password_hash.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(matches!(decide(&s, "a@x", &pw("correct horse"), Protocol::Imap, &peer()), Verdict::Granted(_)));
    }

    #[test]
    fn hundred_failures_lock_the_account_until_unlocked() {
        let (_d, s, app) = setup();
        for n in 0..crate::store::MAX_FAILED_LOGINS {
            let guess = format!("guess {n}");
            assert!(matches!(decide(&s, "a@x", &pw(&guess), Protocol::Imap, &peer()), Verdict::Denied));
        }
        assert_eq!(s.get_account("a@x").unwrap().unwrap().failed_logins, crate::store::MAX_FAILED_LOGINS);
        // Locked: the right password and the app password are refused too.
        assert!(matches!(decide(&s, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(matches!(decide(&s, "a@x", &pw(&app), Protocol::Smtp, &peer()), Verdict::Denied));
        // Unlocked (web sign-in or `mailgate user unlock` reset the count): works again.
        s.update_account("a@x", &mut |a| {
            a.failed_logins = 0;
            Ok(())
        })
        .unwrap();
        assert!(matches!(decide(&s, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::Granted(_)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let (_d, s, app) = setup();
        for _ in 0..5 {
            decide(&s, "a@x", &pw("nope"), Protocol::Imap, &peer());
        }
        assert_eq!(s.get_account("a@x").unwrap().unwrap().failed_logins, 5);
        assert!(matches!(decide(&s, "a@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Granted(_)));
        assert_eq!(s.get_account("a@x").unwrap().unwrap().failed_logins, 0);
    }

    #[test]
    fn verify_cache_keys_user_and_secret_expires_and_forgets() {
        let c = VerifyCache::new(Duration::from_millis(200)).unwrap();
        c.remember("a@x", &pw("secret-1"));
        assert!(c.hit("a@x", &pw("secret-1")));
        assert!(!c.hit("a@x", &pw("secret-2")));
        assert!(!c.hit("b@x", &pw("secret-1")), "another user with the same secret");
        c.remember("b@x", &pw("secret-1"));
        c.forget("a@x");
        assert!(!c.hit("a@x", &pw("secret-1")));
        assert!(c.hit("b@x", &pw("secret-1")));
        std::thread::sleep(Duration::from_millis(250));
        assert!(!c.hit("b@x", &pw("secret-1")), "expired");
        let off = VerifyCache::new(Duration::ZERO).unwrap();
        off.remember("a@x", &pw("s"));
        assert!(!off.hit("a@x", &pw("s")));
    }

    #[test]
    fn second_factor_accounts_refuse_the_account_password() {
        let (_d, s, app) = setup();
        let mut a = s.get_account("a@x").unwrap().unwrap();
        a.totp = Some(TotpState { secret_enc: String::new(), enabled_at: 1, last_step: 0 });
        a.second_factor_required = true;
        s.put_account(&a).unwrap();
        assert!(matches!(decide(&s, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::NeedsAppPassword));
        assert!(matches!(decide(&s, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(matches!(decide(&s, "a@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Granted(_)));
        let ev = s.recent_audit("a@x", 5).unwrap();
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["login", "login_failed", "account_password_refused_2fa"]);
        assert!(ev[2].detail.contains("192.0.2.1 via IMAP (Thunderbird)"), "{}", ev[2].detail);
        // Fail closed: the TOTP record lost, the marker still refuses.
        a.totp = None;
        s.put_account(&a).unwrap();
        assert!(matches!(decide(&s, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::NeedsAppPassword));
    }
}
