//! Credential checks, shared by IMAP, SMTP (through the login gate, `net::gate`) and
//! the web step.
//!
//! [`Authenticator::verify`] takes what a mail client sent and returns a [`Verdict`].
//! Only this module can make an [`Authenticated`] proof, and the relay, the upstream
//! login and the live-session registry each take one, so a path that skips the check
//! does not compile (the rustls capability pattern).
//!
//! Rules: an app password (recognised by its shape, selected by its public id) must
//! belong to the account and carry the protocol's scope. The account password works
//! only for accounts without a second factor; for the others it is refused with
//! [`Verdict::NeedsAppPassword`] (after checking it is right, so the answer reveals
//! nothing to someone who does not know it) and recorded for the owner to see.
//! Every other failure is the same [`Verdict::Denied`]. Each attempt costs at most one
//! argon2id hash (a dummy one for unknown users), computed on the hashing threads
//! ([`hashing`]), shared fairly per client address, so hashing cannot eat all memory
//! and cores. Every guess of a secret a person can remember first takes a slot of the
//! guess budgets ([`budget`]).

pub mod app_password;
pub mod backup_codes;
pub mod budget;
pub mod clock;
pub mod crypto;
pub mod hashing;
pub mod legacy_hash;
pub mod login_log;
pub mod oauth;
pub mod password;
pub mod refusals;
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
    /// POP3.
    Pop3,
    /// ManageSieve.
    Sieve,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.scope().label())
    }
}

impl Protocol {
    /// The app-password scope that allows this protocol.
    pub fn scope(self) -> Scope {
        match self {
            Protocol::Imap => Scope::Imap,
            Protocol::Smtp => Scope::Smtp,
            Protocol::Pop3 => Scope::Pop3,
            Protocol::Sieve => Scope::Sieve,
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
    /// The app password's limits inside its scopes (issue 20), from its record; `None`:
    /// full rights. Carried here so that no path from the login to the session drops it.
    narrow: Option<Arc<crate::store::Narrowing>>,
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
    /// The addresses this login may send as: the account's own and its aliases, or for an
    /// app password with `--send-as` the part of them it names.
    pub fn senders(&self) -> &[String] {
        &self.senders
    }
    /// The app password's limits inside its scopes; `None`: full rights.
    pub fn narrowing(&self) -> Option<&crate::store::Narrowing> {
        self.narrow.as_deref()
    }
    /// What an IMAP session of this login is limited to, with folder patterns read with
    /// upstream's hierarchy `delimiter` (patterns are stored with `/` between levels).
    /// Unrestricted ([`Restriction::is_restricted`] false) for full rights.
    ///
    /// [`Restriction::is_restricted`]: crate::proto::imap_filter::Restriction::is_restricted
    pub fn restriction(
        &self,
        delimiter: u8,
    ) -> Result<crate::proto::imap_filter::Restriction, crate::proto::imap_filter::FolderSetError> {
        use crate::proto::imap_filter::{FolderSet, Restriction};
        let Some(n) = self.narrow.as_deref() else { return Ok(Restriction::default()) };
        let folders = if n.folders.is_empty() {
            None
        } else {
            let d = char::from(delimiter).to_string();
            Some(FolderSet::new(n.folders.iter().map(|p| p.replace('/', &d)), delimiter)?)
        };
        Ok(Restriction { read_only: n.read_only, folders })
    }
    /// A proof for unit tests of the modules that take one.
    #[cfg(test)]
    pub(crate) fn for_tests(username: &str, app_password_id: Option<&str>) -> Authenticated {
        Authenticated {
            username: username.into(),
            app_password_id: app_password_id.map(str::to_string),
            senders: vec![username.into()],
            narrow: None,
        }
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
    /// The right account password of an account that `[policy] require_second_factor`
    /// obliges to use two-step verification, past the grace period, without it yet.
    NeedsSecondFactor,
    /// The check could not run (store error, overload); try later.
    Unavailable,
    /// Not checked: a guess budget is used up (the address's, or the account's for
    /// unfamiliar addresses); answered as [`Verdict::Unavailable`] is ("try later").
    Throttled,
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
    /// The guess budget's slot, settled by [`Authenticator::confirm_upstream`].
    ticket: Option<budget::Ticket>,
    /// The client address.
    ip: IpAddr,
    /// The protocol of the login (for a new device's notification).
    protocol: Protocol,
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

    fn tag(&self, username: &str, parts: &[&[u8]]) -> Vec<u8> {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.key);
        ctx.update(username.as_bytes());
        for p in parts {
            // Length-prefixed, so no two part lists give the same input.
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign().as_ref().to_vec()
    }

    /// Whether this user + password was checked successfully within the lifetime.
    pub fn hit(&self, username: &str, password: &SecretBytes) -> bool {
        self.hit_parts(username, &[password.expose()])
    }

    /// Whether this user + these secret parts were checked successfully within the lifetime.
    pub fn hit_parts(&self, username: &str, parts: &[&[u8]]) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let tag = self.tag(username, parts);
        let Ok(m) = self.entries.lock() else { return false };
        m.get(&tag).is_some_and(|(u, at)| u == username && at.elapsed() < self.ttl)
    }

    /// Remembers a successful check.
    pub fn remember(&self, username: &str, password: &SecretBytes) {
        self.remember_parts(username, &[password.expose()]);
    }

    /// Remembers a successful check of a user + these secret parts.
    pub fn remember_parts(&self, username: &str, parts: &[&[u8]]) {
        if self.ttl.is_zero() {
            return;
        }
        let tag = self.tag(username, parts);
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
    /// Not checked: a budget of password guesses is used up (the address's, or the
    /// account's for addresses it never signed in from). Tells nothing about the password
    /// or the account: the budgets exist for every name.
    Paused(budget::Exhausted),
    /// Try later.
    Unavailable,
}

/// How long a login waits for its check before it is told to come back later. With the
/// hashing threads shared fairly per address, only a flood from more addresses than the
/// threads can serve in this time makes anyone wait that long.
const HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks credentials against the store.
#[derive(Clone)]
pub struct Authenticator {
    store: Arc<dyn Store>,
    /// The hashing threads, shared fairly by client addresses ([`hashing`]).
    pool: hashing::HashPool,
    /// `password_check = "upstream"`: the mode, the checker and its cache.
    upstream: Option<Arc<UpstreamMode>>,
    /// Failure delays per address and account.
    throttle: Arc<throttle::Throttle>,
    /// Recently verified app passwords (see [`Authenticator::with_verify_cache`]).
    app_cache: Option<Arc<VerifyCache>>,
    /// One log line per kind of refusal and address a minute.
    refusals: Arc<refusals::RefusalLog>,
    /// The login lines (one per checked attempt, floods aggregated).
    logins: Arc<login_log::LoginLog>,
    /// The time of the guess budgets.
    clock: Arc<dyn clock::Clock>,
    /// IPv6 clients are one client per prefix of this length (`[limits] ipv6_prefix`).
    v6_prefix: u8,
    /// The process's metrics (logins counted with their line; the gate, the fronts and
    /// the web step take it from here).
    metrics: crate::metrics::Metrics,
    /// `[oauth] enabled`: the key access tokens are checked with.
    oauth_key: Option<Arc<crypto::SecretKey>>,
    /// `[policy]`: two-step verification required for some domains.
    policy: Arc<crate::config::Policy>,
    /// `[notify]`: where security notifications are queued (a new device, a lock); also
    /// the account service's, through [`Authenticator::notifier`].
    notifier: Option<crate::notify::Notifier>,
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

/// Why a slot for a guess was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// A budget is empty: refuse without comparing.
    Exhausted(budget::Exhausted),
    /// The store did not answer: try again later.
    Unavailable,
}

/// What a compared guess came to (see [`Authenticator::settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The secret was right.
    Right,
    /// It was wrong.
    Wrong,
    /// Nothing was compared after all.
    NotCompared,
}

impl Authenticator {
    /// `max_hashes`: argon2 evaluations at once (one thread each).
    pub fn new(store: Arc<dyn Store>, max_hashes: usize) -> Authenticator {
        Authenticator {
            store,
            pool: hashing::HashPool::new(max_hashes),
            upstream: None,
            throttle: Arc::new(throttle::Throttle::new(Duration::ZERO, Duration::ZERO)),
            app_cache: None,
            refusals: Arc::new(refusals::RefusalLog::default()),
            logins: Arc::new(login_log::LoginLog::default()),
            clock: Arc::new(clock::SystemClock),
            v6_prefix: crate::addr::DEFAULT_IPV6_PREFIX,
            metrics: crate::metrics::Metrics::new(),
            oauth_key: None,
            policy: Arc::new(crate::config::Policy::default()),
            notifier: None,
        }
    }

    /// Queues security notifications with `notifier` (a server runs with `[notify]`).
    pub fn with_notifier(mut self, notifier: crate::notify::Notifier) -> Authenticator {
        self.notifier = Some(notifier);
        self
    }

    /// Where security notifications are queued, if anywhere.
    pub fn notifier(&self) -> Option<&crate::notify::Notifier> {
        self.notifier.as_ref()
    }

    /// A mail-port sign-in from an address the account never used (in 90 days): a
    /// security notification (queued off the login's path).
    fn new_device(&self, verdict: &Verdict, peer: &Peer, protocol: Protocol) {
        let (Some(n), Verdict::Granted(a)) = (self.notifier.clone(), verdict) else { return };
        let (user, app_password_id, ip) = (a.username.clone(), a.app_password_id.clone(), peer.ip);
        let client = peer.client_name.as_deref().map(printable);
        tokio::task::spawn_blocking(move || {
            n.new_device(&user, ip, client.as_deref(), &protocol.to_string(), app_password_id.as_deref());
        });
    }

    /// The account's guess budget ran out: a security notification, once per lock (the
    /// time the budget takes to refill), for accounts that exist.
    fn account_locked(&self, secret: budget::Secret, username: &str, ip: IpAddr) {
        let Some(n) = self.notifier.clone() else { return };
        let (user, address) = (username.to_string(), ip.to_string());
        let (what, lock_secs) = match secret {
            budget::Secret::AccountPassword => (
                "sign-ins with the account password",
                u64::from(budget::PASSWORD_PER_ACCOUNT) * budget::PASSWORD_PER_ACCOUNT_REFILL,
            ),
            budget::Secret::SecondFactor => {
                ("two-step verification codes", u64::from(budget::CODE_PER_ACCOUNT) * budget::CODE_PER_ACCOUNT_REFILL)
            }
        };
        tokio::task::spawn_blocking(move || n.account_locked(&user, what, &address, lock_secs));
    }

    /// `[policy]`: accounts of these domains without two-step verification lose the
    /// account password on the mail ports once the grace period is over.
    pub fn with_policy(mut self, policy: crate::config::Policy) -> Authenticator {
        self.policy = Arc::new(policy);
        self
    }

    /// The `[policy]` in force.
    pub fn policy(&self) -> &crate::config::Policy {
        &self.policy
    }

    /// Accepts OAuth access tokens (SASL XOAUTH2 / OAUTHBEARER) made with `key`
    /// (`[oauth] enabled`). Without it every bearer login is refused.
    pub fn with_oauth(mut self, key: Arc<crypto::SecretKey>) -> Authenticator {
        self.oauth_key = Some(key);
        self
    }

    /// Counts into `metrics` (and registers the hashing pool's gauges there).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Authenticator {
        self.pool.register_metrics(&metrics);
        self.metrics = metrics;
        self
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Counts IPv6 clients per prefix of `bits` in every per-address limit (budgets,
    /// hashing turns, failure delays). Call before [`Authenticator::with_failure_delays`].
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Authenticator {
        self.v6_prefix = bits;
        self
    }

    /// The key `ip` is counted under.
    fn client(&self, ip: IpAddr) -> IpAddr {
        crate::addr::client_key(ip, self.v6_prefix)
    }

    /// The clock of the guess budgets (tests move it).
    pub fn with_clock(mut self, clock: Arc<dyn clock::Clock>) -> Authenticator {
        self.clock = clock;
        self
    }

    /// The most checks that have run at once on the hashing threads (SECURITY.md case 63).
    pub fn hashing_peak(&self) -> usize {
        self.pool.peak()
    }

    /// Hash jobs dropped without running because their client had gone.
    pub fn hashing_dropped(&self) -> usize {
        self.pool.dropped()
    }

    /// Remembers verified app passwords for `ttl`, so a mail app that opens several
    /// connections, or reconnects, does not cost an argon2 hash each time (mail apps do
    /// this all day). The entry is an HMAC, under a key that lives only in memory, of
    /// the user, the app password *and* its stored hash; it counts only while the record
    /// still exists with that hash and the scope allows the protocol, so a revoked or
    /// replaced app password stops working at once. Account passwords, TOTP and backup
    /// codes are never cached (SECURITY.md case 68).
    pub fn with_verify_cache(mut self, ttl: Duration) -> Authenticator {
        self.app_cache = VerifyCache::new(ttl).map(Arc::new);
        self
    }

    /// Failure delays: `base` for a first failure, doubling per address up to `max`.
    pub fn with_failure_delays(mut self, base: Duration, max: Duration) -> Authenticator {
        self.throttle = Arc::new(throttle::Throttle::new(base, max).with_ipv6_prefix(self.v6_prefix));
        self
    }

    /// Keeps the failure counts in `store` when several nodes share it (see
    /// [`throttle::Throttle::share`]).
    pub fn with_shared_failure_counts(self, key: Arc<crate::auth::crypto::SecretKey>) -> Authenticator {
        self.throttle.share(self.store.clone(), key);
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

    /// Admin unlock: clears the account's failure delay and empties its guess budgets
    /// (the addresses that guessed keep theirs).
    pub fn forget_failures(&self, username: &str) -> Result<(), crate::store::StoreError> {
        self.throttle.forget_user(username);
        budget::Budgets::clear_account(self.store.as_ref(), username)
    }

    /// Writes the log line of a refusal, at most one a minute per kind and address
    /// (with the number left out), so floods leave a trace fail2ban can read.
    pub fn log_refusal(&self, kind: refusals::Kind, ip: IpAddr, user: &str) {
        self.refusals.note(kind, ip, user);
    }

    /// Writes the login line of an attempt ([`login_log`]: floods aggregated) and counts
    /// it in the metrics from the same values (every attempt, aggregated or not).
    pub fn log_login(&self, line: &login_log::Line<'_>) {
        self.metrics.login(line.protocol, line.method.as_str(), line.result.as_str(), line.duration);
        self.logins.write(line);
    }

    /// The public id of the app password `password` when it is one of `username`'s (for
    /// the login line of a refused attempt: a typed secret that is not an app password of
    /// the account is never shown, not even its first characters).
    pub fn app_password_id_of(&self, username: &str, password: &[u8]) -> Option<String> {
        let (id, _) = app_password::parse(password)?;
        let rec = self.store.get_app_password(&id).ok().flatten()?;
        (rec.username == normalize_username(username)).then_some(id)
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
        let started = std::time::Instant::now();
        let result = mode.checker.check(username.to_string(), SecretBytes::from(password.expose().clone())).await;
        let counted = match result {
            CheckResult::Valid => crate::metrics::UpstreamResult::Ok,
            CheckResult::Invalid => crate::metrics::UpstreamResult::Refused,
            CheckResult::Unavailable => crate::metrics::UpstreamResult::Failed,
        };
        // The checker is the upstream IMAP server, whatever protocol the client used.
        self.metrics.upstream_login("imap", counted, started.elapsed());
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

    /// Takes a slot for one guess of `secret` of `username` from `ip` before it is
    /// compared (TOTP and backup codes on the web step; account passwords here). Logs a
    /// refusal when a budget is empty.
    pub async fn take_slot(
        &self,
        secret: budget::Secret,
        username: &str,
        ip: IpAddr,
    ) -> Result<budget::Ticket, NoSlot> {
        let store = self.store.clone();
        let user = username.to_string();
        let now = self.clock.now();
        let client = self.client(ip);
        let taken = self.blocking(move || budget::Budgets::take(store.as_ref(), secret, &user, client, now)).await;
        match taken {
            Some(Ok(Ok(t))) => Ok(t),
            Some(Ok(Err(which))) => {
                let kind = match (secret, which) {
                    (budget::Secret::AccountPassword, budget::Exhausted::Address) => {
                        refusals::Kind::PasswordBudgetAddress
                    }
                    (budget::Secret::AccountPassword, budget::Exhausted::Account) => {
                        refusals::Kind::PasswordBudgetAccount
                    }
                    (budget::Secret::SecondFactor, budget::Exhausted::Address) => refusals::Kind::CodeBudgetAddress,
                    (budget::Secret::SecondFactor, budget::Exhausted::Account) => refusals::Kind::CodeBudgetAccount,
                };
                self.log_refusal(kind, ip, username);
                if which == budget::Exhausted::Account {
                    self.account_locked(secret, username, ip);
                }
                Err(NoSlot::Exhausted(which))
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "store error while taking a guess budget");
                Err(NoSlot::Unavailable)
            }
            None => Err(NoSlot::Unavailable),
        }
    }

    /// Settles a slot taken with [`Authenticator::take_slot`]; returns whether a right
    /// secret came from an address new to the account ([`budget::Budgets::signed_in`]).
    pub async fn settle(&self, ticket: budget::Ticket, outcome: Outcome) -> bool {
        let store = self.store.clone();
        let now = self.clock.now();
        self.blocking(move || settle_ticket(store.as_ref(), ticket, outcome, now)).await.unwrap_or(false)
    }

    /// Runs `f` (store I/O, no hashing) on tokio's blocking threads.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        tokio::task::spawn_blocking(f).await.ok()
    }

    /// The upstream server's word on a [`Verdict::CheckUpstream`]: grants (creating the
    /// account on first use), refuses, or — for an account with a second factor and the
    /// right password — [`Verdict::NeedsAppPassword`].
    pub async fn confirm_upstream(&self, check: UpstreamCheck, result: CheckResult) -> Verdict {
        let Some(mode) = self.upstream.clone() else { return Verdict::Unavailable };
        let store = self.store.clone();
        let UpstreamCheck { username, password, second_factor: _, who, ticket, ip, protocol } = check;
        match result {
            CheckResult::Unavailable => {
                if let Some(t) = ticket {
                    self.settle(t, Outcome::NotCompared).await;
                }
                return Verdict::Unavailable;
            }
            CheckResult::Invalid => {
                mode.cache.forget(&username);
                if let Some(t) = ticket {
                    self.settle(t, Outcome::Wrong).await;
                }
                let user = username.clone();
                let _ = self.blocking(move || record(store.as_ref(), &user, "login_failed", who)).await;
                return Verdict::Denied;
            }
            CheckResult::Valid => mode.cache.remember(&username, &password),
        }
        let first = match ticket {
            Some(t) => self.settle(t, Outcome::Right).await,
            None => false,
        };
        let accounts = mode.accounts.clone();
        let client = self.client(ip);
        let policy = self.policy.clone();
        self.blocking(move || {
            let Some(account) = ensure_account(store.as_ref(), &accounts, &username) else {
                return (Verdict::Denied, false);
            };
            if account.has_second_factor() {
                record(store.as_ref(), &account.username, "account_password_refused_2fa", who);
                return (Verdict::NeedsAppPassword, false);
            }
            if policy.enforced(&account.username, now_unix()) {
                record(store.as_ref(), &account.username, "account_password_refused_2fa", who);
                return (Verdict::NeedsSecondFactor, false);
            }
            record(
                store.as_ref(),
                &account.username,
                "login",
                format!("{who} with the account password (checked upstream)"),
            );
            let new = budget::Budgets::signed_in(store.as_ref(), &account.username, client, now_unix());
            let granted = Verdict::Granted(Authenticated {
                username: account.username.clone(),
                app_password_id: None,
                senders: senders(&account),
                narrow: None,
            });
            (granted, new)
        })
        .await
        .map(|(verdict, new)| {
            if first || new {
                self.new_device(&verdict, &Peer { ip, client_name: None }, protocol);
            }
            verdict
        })
        .unwrap_or(Verdict::Unavailable)
    }

    /// Runs `f` on a hashing thread in `ip`'s turn (for work that hashes: a new app
    /// password, a password change). `None`: this address has too many checks waiting,
    /// or the result did not come in time.
    pub async fn hash_for<T: Send + 'static>(&self, ip: IpAddr, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let owner = hashing::Owner::Address(self.client(ip));
        self.hash(owner, f).await
    }

    async fn hash<T: Send + 'static>(
        &self,
        owner: hashing::Owner,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let deadline = std::time::Instant::now() + HASH_QUEUE_TIMEOUT;
        match self.pool.submit(owner, Some(deadline), f) {
            Ok(rx) => tokio::time::timeout(HASH_QUEUE_TIMEOUT, rx).await.ok()?.ok(),
            Err(busy) => {
                if let hashing::Owner::Address(ip) = owner {
                    let kind = match busy {
                        hashing::Busy::Owner => refusals::Kind::HashingBusyAddress,
                        hashing::Busy::Full => refusals::Kind::HashingFull,
                    };
                    self.log_refusal(kind, ip, "");
                }
                None
            }
        }
    }

    /// Runs `f` on a hashing thread in the admin socket's turn and waits for it however
    /// long it takes (an import hashes many passwords). `None`: the queue is full.
    pub async fn hash_for_admin<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let rx = self.pool.submit(hashing::Owner::Admin, None, f).ok()?;
        rx.await.ok()
    }

    /// The web step's first factor: the account password only (app passwords never open
    /// the web step). Takes a slot of the guess budgets first; unknown users cost the same.
    pub async fn check_account_password(&self, username: &str, password: &SecretBytes, ip: IpAddr) -> WebCheck {
        let username = normalize_username(username);
        let ticket = match self.take_slot(budget::Secret::AccountPassword, &username, ip).await {
            Ok(t) => t,
            Err(NoSlot::Exhausted(which)) => return WebCheck::Paused(which),
            Err(NoSlot::Unavailable) => return WebCheck::Unavailable,
        };
        let check = if self.upstream.is_some() {
            self.check_account_password_upstream(&username, password).await
        } else {
            let store = self.store.clone();
            let password = SecretBytes::from(password.expose().clone());
            let user = username.clone();
            self.hash_for(ip, move || web_password(store.as_ref(), &user, &password, ip))
                .await
                .unwrap_or(WebCheck::Unavailable)
        };
        let outcome = match &check {
            WebCheck::Ok(_) => Outcome::Right,
            WebCheck::Denied => Outcome::Wrong,
            WebCheck::Unavailable | WebCheck::Paused(_) => Outcome::NotCompared,
        };
        self.settle(ticket, outcome).await;
        check
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
                match self.blocking(move || ensure_account(store.as_ref(), &accounts, &user)).await.flatten() {
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

    /// Checks a login. In this order, cheapest first: a recently verified app password is
    /// granted at once (a few store reads, no hash, no budget); an app password of the
    /// account (found by its public id) goes to the hashing threads in its address's turn;
    /// anything else is an account-password guess, which first takes a slot of the guess
    /// budgets ([`budget`]) and is refused uncompared when they are empty.
    pub async fn verify(&self, creds: &Credentials, protocol: Protocol, peer: &Peer) -> Verdict {
        let store = self.store.clone();
        let username = normalize_username(&creds.username);
        if creds.mechanism == crate::proto::sasl::Mechanism::Bearer {
            return self.verify_bearer(creds, &username, protocol, peer).await;
        }
        if let Some(cache) = &self.app_cache
            && let Some(v) = cached_app_password(store.as_ref(), cache, &username, &creds.password, protocol, peer)
        {
            self.note_signed_in(&v, peer, protocol).await;
            return v;
        }
        let app_password_of_account = app_password::parse(creds.password.expose())
            .and_then(|(id, _)| store.get_app_password(&id).ok().flatten())
            .is_some_and(|rec| rec.username == username);
        let ticket = if app_password_of_account {
            None
        } else {
            match self.take_slot(budget::Secret::AccountPassword, &username, peer.ip).await {
                Ok(t) => Some(t),
                // Not checked: "try again later" (IMAP `NO [UNAVAILABLE]`, SMTP `454`), not
                // "wrong", so a mail app with the right password does not ask its person
                // for another one, and nobody learns anything about the password.
                Err(NoSlot::Exhausted(_)) => return Verdict::Throttled,
                Err(NoSlot::Unavailable) => return Verdict::Unavailable,
            }
        };
        let password = SecretBytes::from(creds.password.expose().clone());
        let who = peer.clone();
        let accounts = self.upstream.as_ref().map(|m| m.accounts.clone());
        let cache = self.app_cache.clone();
        let user = username.clone();
        let policy = self.policy.clone();
        let verdict = self
            .hash_for(peer.ip, move || {
                let how = How { accounts: accounts.as_ref(), cache: cache.as_deref(), policy: &policy };
                decide_with(store.as_ref(), how, &user, &password, protocol, &who)
            })
            .await
            .unwrap_or(Verdict::Unavailable);
        let Some(ticket) = ticket else {
            self.note_signed_in(&verdict, peer, protocol).await;
            return verdict;
        };
        match verdict {
            Verdict::CheckUpstream(mut check) => {
                check.ticket = Some(ticket);
                Verdict::CheckUpstream(check)
            }
            v => {
                let outcome = match &v {
                    Verdict::Granted(_) | Verdict::NeedsAppPassword | Verdict::NeedsSecondFactor => Outcome::Right,
                    Verdict::Denied if self.throttle.repeats_last(peer.ip, &username, creds.password.expose()) => {
                        // A mail app retrying the same stale password learns nothing new.
                        Outcome::NotCompared
                    }
                    Verdict::Denied => Outcome::Wrong,
                    _ => Outcome::NotCompared,
                };
                if self.settle(ticket, outcome).await {
                    self.new_device(&v, peer, protocol);
                }
                v
            }
        }
    }
}

impl Authenticator {
    /// An OAuth access token: an HMAC check and two store reads (the grant, the account),
    /// no hash and no guess budget (a token cannot be guessed). Refused alike for every
    /// reason: malformed, forged, expired, revoked, another user's, or outside the grant's
    /// scopes.
    async fn verify_bearer(&self, creds: &Credentials, username: &str, protocol: Protocol, peer: &Peer) -> Verdict {
        let Some(key) = self.oauth_key.clone() else { return Verdict::Denied };
        // OAUTHBEARER without an authzid (RFC 7628 §3.1): the token names the account.
        let named;
        let username = if username.is_empty() {
            let owner = oauth::grant_id_of(creds.password.expose())
                .and_then(|id| self.store.get_app_password(&id).ok().flatten())
                .map(|rec| rec.username);
            let Some(owner) = owner else { return Verdict::Denied };
            named = owner;
            named.as_str()
        } else {
            username
        };
        let grant = match oauth::check_access_token(&key, creds.password.expose(), username, self.clock.now()) {
            Ok(id) => id,
            Err(_) => return Verdict::Denied,
        };
        // Inline like the cached app-password path: two reads and an unflushed write.
        let (store, user, who) = (self.store.clone(), username.to_string(), peer.clone());
        let verdict = (move || {
            let rec = match store.get_app_password(&grant) {
                Ok(Some(rec)) => rec,
                Ok(None) => return Verdict::Denied,
                Err(e) => {
                    tracing::error!(error = %e, "store error during a token login");
                    return Verdict::Unavailable;
                }
            };
            if rec.oauth.is_none() || rec.username != user || !rec.scopes.contains(&protocol.scope()) {
                return Verdict::Denied;
            }
            let account = match store.get_account(&user) {
                Ok(Some(a)) => a,
                Ok(None) => return Verdict::Denied,
                Err(e) => {
                    tracing::error!(error = %e, "store error during a token login");
                    return Verdict::Unavailable;
                }
            };
            let audit = |kind: &str, detail: String| record(store.as_ref(), &account.username, kind, detail);
            grant_app_password(store.as_ref(), &account, rec, protocol, &who, &audit)
        })();
        self.note_signed_in(&verdict, peer, protocol).await;
        verdict
    }

    /// A login granted without a guess-budget slot (an app password): its address becomes
    /// familiar to the account (a slot's settlement does this for the others).
    /// A new address is a new device (a security notification).
    async fn note_signed_in(&self, verdict: &Verdict, peer: &Peer, protocol: Protocol) {
        if let Verdict::Granted(a) = verdict {
            let (store, user, client, now) =
                (self.store.clone(), a.username.clone(), self.client(peer.ip), self.clock.now());
            if self.blocking(move || budget::Budgets::signed_in(store.as_ref(), &user, client, now)).await == Some(true)
            {
                self.new_device(verdict, peer, protocol);
            }
        }
    }
}

/// Settles a slot (on a blocking thread: store I/O).
fn settle_ticket(store: &dyn Store, ticket: budget::Ticket, outcome: Outcome, now: u64) -> bool {
    match outcome {
        Outcome::Right => ticket.right(store, now),
        Outcome::Wrong => {
            ticket.wrong();
            false
        }
        Outcome::NotCompared => {
            ticket.not_compared(store, now);
            false
        }
    }
}

/// The web step's password check (on a hashing thread). Unknown users and accounts
/// without a password cost the same hash.
fn web_password(store: &dyn Store, username: &str, password: &SecretBytes, ip: IpAddr) -> WebCheck {
    match store.get_account(username) {
        Ok(Some(account)) => match account.password_hash.as_deref() {
            Some(h) if legacy_hash::verify(password.expose(), h) => {
                rehash_if_needed(store, &account, password);
                WebCheck::Ok(Box::new(account))
            }
            _ => {
                if account.password_hash.is_none() {
                    password::dummy_verify(password.expose());
                }
                record(store, &account.username, "web_sign_in_failed", ip.to_string());
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
    }
}

/// The decision, synchronous (runs on a hashing thread). With the account mode
/// `password_check = "upstream"`, an account password is not checked here but handed
/// back as [`Verdict::CheckUpstream`]; a verified app password is remembered in `cache`.
#[cfg(test)]
pub(crate) fn decide(
    store: &dyn Store,
    accounts: Option<&Accounts>,
    cache: Option<&VerifyCache>,
    username: &str,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
) -> Verdict {
    static NO_POLICY: crate::config::Policy =
        crate::config::Policy { require_second_factor: Vec::new(), grace_until: None };
    decide_with(store, How { accounts, cache, policy: &NO_POLICY }, username, password, protocol, peer)
}

/// What [`decide_with`] decides by besides the credentials.
#[derive(Clone, Copy)]
pub(crate) struct How<'a> {
    /// `[accounts]` when `password_check = "upstream"`.
    pub accounts: Option<&'a Accounts>,
    /// Recently verified app passwords.
    pub cache: Option<&'a VerifyCache>,
    /// `[policy]`.
    pub policy: &'a crate::config::Policy,
}

/// [`decide`] under a `[policy]`.
pub(crate) fn decide_with(
    store: &dyn Store,
    how: How<'_>,
    username: &str,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
) -> Verdict {
    let How { accounts, cache, policy } = how;
    let upstream_mode = accounts.is_some_and(|a| a.password_check == PasswordCheck::Upstream);
    let account = match store.get_account(username) {
        Ok(Some(a)) => a,
        Ok(None) if upstream_mode && accounts.is_some_and(|a| a.may_create(username)) => {
            return Verdict::CheckUpstream(UpstreamCheck {
                username: username.to_string(),
                password: SecretBytes::from(password.expose().clone()),
                second_factor: false,
                who: format!("{} via {protocol}", peer.ip),
                ticket: None,
                ip: peer.ip,
                protocol,
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
    let audit = |kind: &str, detail: String| record(store, &account.username, kind, detail);
    let mode = Mode { upstream: upstream_mode, cache, policy };
    decide_account(store, &account, password, protocol, peer, mode, &audit)
}

/// How account passwords are checked, and where verified app passwords are remembered.
#[derive(Clone, Copy)]
struct Mode<'a> {
    /// `password_check = "upstream"`.
    upstream: bool,
    cache: Option<&'a VerifyCache>,
    policy: &'a crate::config::Policy,
}

/// The fast path: an app password verified within the cache lifetime, whose record
/// still exists unchanged. `None`: not cached (or anything unusual) — take the full check.
fn cached_app_password(
    store: &dyn Store,
    cache: &VerifyCache,
    username: &str,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
) -> Option<Verdict> {
    let (id, normalized) = app_password::parse(password.expose())?;
    let account = store.get_account(username).ok()??;
    let rec = store.get_app_password(&id).ok()??;
    if rec.username != account.username
        || !rec.scopes.contains(&protocol.scope())
        || !cache.hit_parts(&account.username, &[normalized.expose().as_bytes(), rec.hash.as_bytes()])
    {
        return None;
    }
    let audit = |kind: &str, detail: String| record(store, &account.username, kind, detail);
    Some(grant_app_password(store, &account, rec, protocol, peer, &audit))
}

/// How a login is described in the audit log: address, protocol and the client's name.
fn who(peer: &Peer, protocol: Protocol) -> String {
    format!(
        "{} via {}{}",
        peer.ip,
        protocol,
        peer.client_name.as_deref().map(|c| format!(" ({c})")).unwrap_or_default()
    )
}

/// A verified app password: its last use and the audit event are recorded.
fn grant_app_password(
    store: &dyn Store,
    account: &crate::store::Account,
    rec: crate::store::AppPasswordRecord,
    protocol: Protocol,
    peer: &Peer,
    audit: &dyn Fn(&str, String),
) -> Verdict {
    if let Some(why) = app_password::refusal(&rec, peer.ip, now_unix()) {
        // Right value, but not from here or not any more: answered like a wrong password
        // (same reply and delay), the reason audited for the owner and the admin.
        audit(
            "app_password_refused",
            format!("{} ({}) from {} via {protocol}: {}", rec.label, rec.id, peer.ip, why.words()),
        );
        return Verdict::Denied;
    }
    if matches!(protocol, Protocol::Pop3 | Protocol::Sieve) && rec.narrow.as_ref().is_some_and(|n| n.limits_imap()) {
        // POP3 and ManageSieve are relayed unfiltered: a read-only or folder-limited
        // password never opens them (refused at create too; this holds for any record).
        audit(
            "app_password_refused",
            format!(
                "{} ({}) from {} via {protocol}: it is limited to read-only or some folders",
                rec.label, rec.id, peer.ip
            ),
        );
        return Verdict::Denied;
    }
    let used = LastUse {
        at: now_unix(),
        ip: peer.ip.to_string(),
        client: peer.client_name.clone(),
        protocol: Some(protocol.scope()),
    };
    if let Err(e) = store.record_app_password_use(&rec.id, &used) {
        tracing::warn!(error = %e, "last-use write failed");
    }
    let how = match rec.oauth {
        // A grant's label names its id already: "Thunderbird (abcdef)".
        Some(_) => format!("signed in through the browser as {}", rec.label),
        None => format!("with app password {} ({})", rec.label, rec.id),
    };
    audit("login", format!("{} {how}", who(peer, protocol)));
    let mut senders = senders(account);
    if let Some(n) = rec.narrow.as_ref().filter(|n| !n.send_as.is_empty()) {
        // Only the named addresses that are still the account's own.
        senders.retain(|s| n.send_as.iter().any(|a| a.eq_ignore_ascii_case(s)));
    }
    Verdict::Granted(Authenticated {
        username: account.username.clone(),
        app_password_id: Some(rec.id),
        senders,
        narrow: rec.narrow.filter(|n| !n.is_empty()).map(Arc::new),
    })
}

/// The decision for an existing account.
fn decide_account(
    store: &dyn Store,
    account: &crate::store::Account,
    password: &SecretBytes,
    protocol: Protocol,
    peer: &Peer,
    mode: Mode<'_>,
    audit: &dyn Fn(&str, String),
) -> Verdict {
    let Mode { upstream: upstream_mode, cache, policy } = mode;
    // `[policy]`: past the grace period, an account that must use two-step verification
    // and has not enrolled is treated as having it: its account password opens only the
    // web step (where it enrols).
    let policy_bars = !account.has_second_factor() && policy.enforced(&account.username, now_unix());
    let who = who(peer, protocol);
    if let Some((id, normalized)) = app_password::parse(password.expose()) {
        match store.get_app_password(&id) {
            Ok(Some(rec)) if rec.username == account.username => {
                // A burst of connections with the same new app password (a client opening
                // its folders, or many clients at once) queues one check each; the first
                // to finish remembers it, and the rest are served from the cache here
                // instead of each costing an argon2 hash.
                let parts = [normalized.expose().as_bytes(), rec.hash.as_bytes()];
                let verified = cache.is_some_and(|c| c.hit_parts(&account.username, &parts))
                    || password::verify(normalized.expose().as_bytes(), &rec.hash);
                if !verified {
                    audit("login_failed", who);
                    return Verdict::Denied;
                }
                if !rec.scopes.contains(&protocol.scope()) {
                    audit("app_password_wrong_scope", format!("{} ({}) from {who}", rec.label, rec.id));
                    return Verdict::Denied;
                }
                if let Some(cache) = cache {
                    cache.remember_parts(&account.username, &parts);
                }
                return grant_app_password(store, account, rec, protocol, peer, audit);
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
            second_factor: account.has_second_factor() || policy_bars,
            who,
            ticket: None,
            ip: peer.ip,
            protocol,
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
    if policy_bars {
        // Listed with the devices still using the account password, like a 2FA refusal.
        audit("account_password_refused_2fa", who);
        return Verdict::NeedsSecondFactor;
    }
    audit("login", format!("{who} with the account password"));
    Verdict::Granted(Authenticated {
        username: account.username.clone(),
        app_password_id: None,
        senders: senders(account),
        narrow: None,
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
            let account = crate::store::Account::new(username, now);
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

/// A client-sent name as it may appear in a log line: no control characters (no forged
/// lines), at most 100 characters.
pub fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(100).collect()
}

/// The text a person sees when their mail client sends the account password of an
/// account that `[policy]` obliges to use two-step verification and that has not
/// enrolled yet (IMAP `[ALERT]`, SMTP `534 5.7.9`).
pub fn second_factor_hint(url: &str) -> String {
    format!(
        "Your organisation requires two-step verification for this account. Set it up at {url} (sign in there with your account password), then create an app password there and enter it here as the password."
    )
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
            password_hash: Some(password::hash(b"account-pw").unwrap()),
            ..Account::new("a@x", 0)
        })
        .unwrap();
        let good = add_app_password(&s, "phone");
        (dir, s, good)
    }

    /// Gives a@x a new IMAP app password labelled `label`; returns it, grouped.
    fn add_app_password(s: &SledStore, label: &str) -> String {
        let p = app_password::generate().unwrap();
        s.create_app_password(&AppPasswordRecord {
            id: p.id.clone(),
            username: "a@x".into(),
            label: label.into(),
            scopes: vec![Scope::Imap],
            hash: password::hash(p.password.expose().as_bytes()).unwrap(),
            created_at: 0,
            created_by: "admin".into(),
            last_used: None,
            last_used_by: Default::default(),
            oauth: None,
            expires_at: None,
            allow: vec![],
            narrow: None,
        })
        .unwrap();
        p.grouped().expose().clone()
    }

    fn peer() -> Peer {
        Peer { ip: "192.0.2.1".parse().unwrap(), client_name: Some("Thunderbird".into()) }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pw(s: &str) -> SecretBytes {
        s.as_bytes().to_vec().into()
    }

    /// Issue 18 point 5: `[policy] require_second_factor` with a grace period: before the
    /// date an un-enrolled account of the domain still signs in with its account
    /// password; after it, the right password gets the enrol words (and is listed with the
    /// devices still using it), a wrong one is still just wrong; other domains and
    /// app passwords are unaffected.
    #[test]
    fn the_second_factor_policy_bars_the_account_password_after_the_grace_date() {
        let (_dir, s, app) = setup();
        s.create_account(&Account {
            password_hash: Some(password::hash(b"other-pw").unwrap()),
            ..Account::new("c@y", 0)
        })
        .unwrap();
        let policy =
            |grace: Option<u64>| crate::config::Policy { require_second_factor: vec!["x".into()], grace_until: grace };
        let run = |p: &crate::config::Policy, user: &str, secret: &str| {
            decide_with(&s, How { accounts: None, cache: None, policy: p }, user, &pw(secret), Protocol::Imap, &peer())
        };
        let before = policy(Some(now_unix() + 86_400));
        assert!(matches!(run(&before, "a@x", "account-pw"), Verdict::Granted(_)));
        assert!(before.in_grace("a@x", now_unix()) && !before.in_grace("c@y", now_unix()));
        for after in [policy(Some(now_unix() - 1)), policy(None)] {
            assert!(matches!(run(&after, "a@x", "account-pw"), Verdict::NeedsSecondFactor));
            assert!(matches!(run(&after, "a@x", "wrong"), Verdict::Denied));
            assert!(matches!(run(&after, "a@x", &app), Verdict::Granted(_)));
            assert!(matches!(run(&after, "c@y", "other-pw"), Verdict::Granted(_)));
        }
        let events = s.recent_audit("a@x", 20).unwrap();
        assert!(events.iter().any(|e| e.kind == "account_password_refused_2fa"));
        assert!(second_factor_hint("https://m.example/app-passwords").contains("requires two-step verification"));
    }

    /// Issue 18 point 3: the right app password past its expiry, or from outside its
    /// networks, is refused as a wrong one would be (also from the verify cache), and the
    /// reason is audited.
    #[tokio::test]
    async fn expired_or_out_of_network_app_passwords_are_refused_with_the_reason_audited() {
        let (_dir, s, _good) = setup();
        let p = app_password::generate().unwrap();
        s.create_app_password(&AppPasswordRecord {
            id: p.id.clone(),
            username: "a@x".into(),
            label: "scanner".into(),
            scopes: vec![Scope::Imap],
            hash: password::hash(p.password.expose().as_bytes()).unwrap(),
            created_at: 0,
            created_by: "admin".into(),
            last_used: None,
            last_used_by: Default::default(),
            oauth: None,
            expires_at: Some(now_unix() + 3600),
            allow: app_password::parse_allow(&["192.0.2.0/24".into()]).unwrap(),
            narrow: None,
        })
        .unwrap();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store.clone(), 2).with_verify_cache(Duration::from_secs(60));
        let creds = Credentials::password("a@x".into(), pw(p.password.expose()));
        let from = |ip: &str| Peer { ip: ip.parse().unwrap(), client_name: None };
        assert!(matches!(auth.verify(&creds, Protocol::Imap, &from("192.0.2.9")).await, Verdict::Granted(_)));
        // Cached now; still refused from elsewhere.
        assert!(matches!(auth.verify(&creds, Protocol::Imap, &from("198.51.100.1")).await, Verdict::Denied));
        store
            .update_app_password(&p.id, &mut |r| {
                r.expires_at = Some(now_unix() - 1);
                Ok(())
            })
            .unwrap();
        assert!(matches!(auth.verify(&creds, Protocol::Imap, &from("192.0.2.9")).await, Verdict::Denied));
        let reasons: Vec<String> = store
            .recent_audit("a@x", 10)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "app_password_refused")
            .map(|e| e.detail)
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("expired") && reasons[1].contains("outside the networks"), "{reasons:?}");
    }

    /// Issue 20: the record's narrowing arrives in `Authenticated` on every path (hashed
    /// and cached): the IMAP restriction, senders cut to `--send-as`; a read-only password
    /// is refused over POP3 and ManageSieve even if its record has those scopes.
    #[tokio::test]
    async fn a_narrow_app_password_carries_its_limits_into_the_login() {
        let (_dir, s, _good) = setup();
        s.update_account("a@x", &mut |a| {
            a.addresses = vec!["sales@x".into()];
            Ok(())
        })
        .unwrap();
        let p = app_password::generate().unwrap();
        let narrow = crate::store::Narrowing {
            read_only: true,
            folders: vec!["INBOX".into(), "Shared/Tickets".into()],
            send_as: vec!["sales@x".into()],
            ..Default::default()
        };
        s.create_app_password(&AppPasswordRecord {
            id: p.id.clone(),
            username: "a@x".into(),
            label: "crm".into(),
            scopes: vec![Scope::Imap, Scope::Smtp, Scope::Pop3, Scope::Sieve],
            hash: password::hash(p.password.expose().as_bytes()).unwrap(),
            created_at: 0,
            created_by: "admin".into(),
            last_used: None,
            last_used_by: Default::default(),
            oauth: None,
            expires_at: None,
            allow: vec![],
            narrow: Some(narrow),
        })
        .unwrap();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store.clone(), 2).with_verify_cache(Duration::from_secs(60));
        let creds = Credentials::password("a@x".into(), pw(p.password.expose()));
        for _ in 0..2 {
            // The second time from the verify cache.
            let Verdict::Granted(who) = auth.verify(&creds, Protocol::Imap, &peer()).await else {
                panic!("not granted")
            };
            assert_eq!(who.senders(), ["sales@x".to_string()]);
            let r = who.restriction(b'.').unwrap();
            assert!(r.read_only && r.is_restricted());
            let set = r.folders.unwrap();
            assert!(set.allows(b"Shared.Tickets") && set.allows(b"inbox") && !set.allows(b"Shared/Tickets"));
        }
        for protocol in [Protocol::Pop3, Protocol::Sieve] {
            assert!(matches!(auth.verify(&creds, protocol, &peer()).await, Verdict::Denied), "{protocol}");
        }
        let full = Authenticated::for_tests("a@x", None);
        assert!(full.narrowing().is_none() && !full.restriction(b'/').unwrap().is_restricted());
    }

    /// Issue 16: an access token logs in its own user over the grant's protocols only,
    /// without a hash or a guess budget; another user's name, a forged or expired token, a
    /// revoked grant, a token typed as a password, and tokens while OAuth is off are refused.
    #[tokio::test]
    async fn access_tokens_log_in_their_own_user_until_expired_or_revoked() {
        use crate::auth::clock::FakeClock;
        use crate::proto::sasl::Mechanism;
        let (_dir, s, _good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        store.create_account(&Account::new("b@x", 0)).unwrap();
        let key = Arc::new(crypto::SecretKey::from_bytes(&[9; 32]).unwrap());
        let clock = FakeClock::at(1_800_000_000);
        let accounts =
            crate::accounts::AccountService::new(store.clone(), key.clone(), "x", crate::accounts::Actor::Web)
                .with_clock(Arc::new(clock.clone()));
        let cfg = crate::config::Config::from_toml_str("[oauth]\nenabled = true\n", "t").unwrap().oauth;
        let client = cfg.client("thunderbird").unwrap().clone();
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let approved = oauth::Approved {
            client_id: "thunderbird".into(),
            redirect_uri: "http://localhost:1".into(),
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into(),
            scopes: vec![Scope::Imap],
        };
        let code = accounts.oauth_issue_code("a@x", &approved, &cfg).unwrap();
        let from = oauth::Requester { ip: ip("192.0.2.1"), user_agent: None };
        let t =
            accounts.oauth_redeem_code(code.expose(), &client, "http://localhost:1", verifier, &from, &cfg).unwrap();
        let token = t.access_token.expose().clone();
        // One hashing thread, held busy: a token login must not need it.
        let auth = Authenticator::new(store.clone(), 1).with_clock(Arc::new(clock.clone())).with_oauth(key.clone());
        let bearer = |user: &str, tok: &str| Credentials {
            username: user.into(),
            password: pw(tok),
            mechanism: Mechanism::Bearer,
        };
        let v = auth.verify(&bearer("A@X", &token), Protocol::Imap, &peer()).await;
        let Verdict::Granted(who) = v else { panic!("{v:?}") };
        assert_eq!((who.username(), who.app_password_id()), ("a@x", Some(t.grant_id.as_str())));
        let rec = store.get_app_password(&t.grant_id).unwrap().unwrap();
        assert_eq!(rec.last_used.as_ref().map(|u| u.ip.as_str()), Some("192.0.2.1"));
        for (user, tok, proto) in [
            ("b@x", token.as_str(), Protocol::Imap),
            ("a@x", token.as_str(), Protocol::Smtp),
            ("a@x", &token.replace("mgat1.", "mgat1.x"), Protocol::Imap),
            ("a@x", "mgat1.abcdef.9999999999.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Protocol::Imap),
            ("a@x", t.refresh_token.expose().as_str(), Protocol::Imap),
        ] {
            let v = auth.verify(&bearer(user, tok), proto, &peer()).await;
            assert!(matches!(v, Verdict::Denied), "{user} {proto}: {v:?}");
        }
        // OAUTHBEARER without an authzid: the token's grant names the account.
        let v = auth.verify(&bearer("", &token), Protocol::Imap, &peer()).await;
        assert!(matches!(&v, Verdict::Granted(w) if w.username() == "a@x"), "{v:?}");
        // Typed as a password, a token is just a wrong password.
        let typed = Credentials::password("a@x".into(), pw(&token));
        assert!(matches!(auth.verify(&typed, Protocol::Imap, &peer()).await, Verdict::Denied));
        // OAuth off: refused.
        let off = Authenticator::new(store.clone(), 1).with_clock(Arc::new(clock.clone()));
        assert!(matches!(off.verify(&bearer("a@x", &token), Protocol::Imap, &peer()).await, Verdict::Denied));
        // Expired.
        clock.advance(3600);
        assert!(matches!(auth.verify(&bearer("a@x", &token), Protocol::Imap, &peer()).await, Verdict::Denied));
        // Revoked: a fresh token of the same grant stops at once.
        let fresh = oauth::new_access_token(&key, &t.grant_id, "a@x", 1_800_003_660);
        assert!(matches!(
            auth.verify(&bearer("a@x", fresh.expose()), Protocol::Imap, &peer()).await,
            Verdict::Granted(_)
        ));
        store.revoke_app_password("a@x", &t.grant_id).unwrap();
        assert!(matches!(auth.verify(&bearer("a@x", fresh.expose()), Protocol::Imap, &peer()).await, Verdict::Denied));
        assert_eq!(auth.hashing_peak(), 1, "only the typed token was hashed");
    }

    /// A verified app password is served from the cache even while every hashing thread
    /// is busy; a different scope, a wrong password, another user's name or a revoked
    /// record never are (SECURITY.md case 68).
    #[tokio::test]
    async fn verified_app_passwords_skip_the_hash_until_revoked() {
        let (_dir, s, good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        store.create_account(&Account::new("b@x", 0)).unwrap();
        let auth = Authenticator::new(store.clone(), 1).with_verify_cache(Duration::from_secs(60));
        let creds = |user: &str, p: &str| Credentials::password(user.into(), pw(p));
        let quick = |c: Credentials, proto: Protocol| {
            let auth = auth.clone();
            async move { tokio::time::timeout(Duration::from_millis(300), auth.verify(&c, proto, &peer())).await }
        };
        // First login: hashed, remembered.
        assert!(matches!(auth.verify(&creds("a@x", &good), Protocol::Imap, &peer()).await, Verdict::Granted(_)));
        // From here until the hashing thread is released, tokio's clock is paused: "at
        // once" means before the 300 ms timer could fire on an otherwise idle runtime (the
        // clock jumps as soon as everything waits for the busy hashing thread), whatever the
        // machine's load. Store reads go through spawn_blocking, which holds the clock.
        tokio::time::pause();
        // Occupy the only hashing thread.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = auth.clone();
        let blocker = tokio::spawn(async move { busy.hash_for(ip("198.51.100.9"), move || held.recv()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Cached: granted at once, with separators or without, and the use is recorded.
        let plain: String = good.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
        for p in [good.as_str(), plain.as_str()] {
            match quick(creds("A@X ", p), Protocol::Imap).await {
                Ok(Verdict::Granted(a)) => assert_eq!(a.username(), "a@x"),
                other => panic!("not served from the cache: {other:?}"),
            }
        }
        // Not cached: these wait for the (busy) hashing thread.
        let mut wrong = good.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'a' { 'b' } else { 'a' });
        assert!(quick(creds("a@x", &wrong), Protocol::Imap).await.is_err(), "wrong password served");
        assert!(quick(creds("a@x", &good), Protocol::Smtp).await.is_err(), "scope ignored");
        assert!(quick(creds("b@x", &good), Protocol::Imap).await.is_err(), "other user's name served");
        assert!(matches!(quick(creds("a@x", &good), Protocol::Imap).await, Ok(Verdict::Granted(_))));
        // Revoked: refused at once by the cache path, whatever was remembered.
        let (id, _) = app_password::parse(good.as_bytes()).unwrap();
        store.revoke_app_password("a@x", &id).unwrap();
        assert!(quick(creds("a@x", &good), Protocol::Imap).await.is_err(), "revoked app password served");
        tokio::time::resume();
        release.send(()).unwrap();
        let _ = blocker.await;
        assert!(matches!(auth.verify(&creds("a@x", &good), Protocol::Imap, &peer()).await, Verdict::Denied));
        let used = store.recent_audit("a@x", 100).unwrap();
        assert!(used.iter().filter(|e| e.kind == "login").count() >= 4, "cached logins are audited");
    }

    /// Many connections at once with the same new app password (a mail client opening
    /// its folders) cost one argon2 hash, not one each: the checks queued behind the first
    /// find it remembered.
    #[tokio::test]
    async fn a_burst_with_one_new_app_password_costs_one_hash() {
        let (_dir, s, good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store, 1).with_verify_cache(Duration::from_secs(60));
        let hashes = || auth.hash_for(ip("198.51.100.9"), password::evaluations_on_this_thread);
        let before = hashes().await.unwrap();
        let logins: Vec<_> = (0..16)
            .map(|_| {
                let auth = auth.clone();
                let c = Credentials::password("a@x".into(), pw(&good));
                tokio::spawn(async move { auth.verify(&c, Protocol::Imap, &peer()).await })
            })
            .collect();
        for l in logins {
            assert!(matches!(l.await.unwrap(), Verdict::Granted(_)));
        }
        assert_eq!(hashes().await.unwrap() - before, 1);
    }

    /// 200 logins with random passwords at once from 20 addresses: never more hashes at
    /// once than the threads, every one answered, and a real login from another address
    /// gets its turn after at most one job of each flooding address, so it is granted
    /// (SECURITY.md case 63). No wall-clock bound: the queue's own deadline is the only one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_login_storm_is_bounded_by_the_hashing_threads() {
        let (_dir, s, good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store, 2);
        let mut storm = Vec::new();
        for i in 0..200 {
            let auth = auth.clone();
            storm.push(tokio::spawn(async move {
                let user = if i % 4 == 0 { "a@x".to_string() } else { format!("nobody{i}@x") };
                let c = Credentials::password(user, pw(&format!("random-{i}-{}", i * 7919)));
                let from = Peer { ip: ip(&format!("192.0.2.{}", i % 20)), client_name: None };
                auth.verify(&c, Protocol::Imap, &from).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let real = Credentials::password("a@x".into(), pw(&good));
        let started = std::time::Instant::now();
        let v = auth.verify(&real, Protocol::Imap, &Peer { ip: ip("203.0.113.5"), client_name: None }).await;
        assert!(matches!(v, Verdict::Granted(_)), "real login during the storm: {v:?}");
        let waited = started.elapsed();
        let mut denied = 0;
        for t in storm {
            match t.await.unwrap() {
                Verdict::Denied => denied += 1,
                Verdict::Unavailable | Verdict::Throttled => {}
                other => panic!("a random password got {other:?}"),
            }
        }
        assert!(auth.hashing_peak() <= 2, "{} hashes at once", auth.hashing_peak());
        assert!(denied > 0);
        eprintln!("200 concurrent bad logins: {denied} denied, real login answered after {waited:?}");
    }

    /// Concurrent guesses of the account password from one address: only the address's
    /// budget of them is compared (one hash each); the rest are refused uncompared, and
    /// the right password from that address is refused too until the budget refills,
    /// while the same password from another address gets in (SECURITY.md §H).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_guesses_compare_at_most_the_budget() {
        let (_dir, s, _good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store.clone(), 2);
        let attacker = Peer { ip: ip("192.0.2.66"), client_name: None };
        let guesses: Vec<_> = (0..100)
            .map(|i| {
                let (auth, from) = (auth.clone(), attacker.clone());
                tokio::spawn(async move {
                    let c = Credentials::password("a@x".into(), pw(&format!("guess-{i}")));
                    auth.verify(&c, Protocol::Imap, &from).await
                })
            })
            .collect();
        for g in guesses {
            assert!(matches!(g.await.unwrap(), Verdict::Denied | Verdict::Unavailable | Verdict::Throttled));
        }
        // Refused uncompared: "try later", never a grant, whatever the password.
        let compared = store.recent_audit("a@x", 1000).unwrap().iter().filter(|e| e.kind == "login_failed").count();
        assert!(compared <= budget::PASSWORD_PER_ADDRESS as usize, "{compared} guesses compared");
        let right = Credentials::password("a@x".into(), pw("account-pw"));
        assert!(matches!(auth.verify(&right, Protocol::Imap, &attacker).await, Verdict::Throttled));
        let owner = Peer { ip: ip("198.51.100.1"), client_name: None };
        assert!(matches!(auth.verify(&right, Protocol::Imap, &owner).await, Verdict::Granted(_)));
    }

    /// 120 wrong logins from 40 addresses never stop the owner's app passwords (no
    /// account lock), and the account password still works from an address the owner
    /// signed in from before, while strangers are held by the account's budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guessing_from_many_addresses_does_not_lock_the_owner_out() {
        let (_dir, s, good) = setup();
        let store: Arc<dyn Store> = Arc::new(s);
        let auth = Authenticator::new(store.clone(), 2);
        let home = Peer { ip: ip("198.51.100.1"), client_name: None };
        let right = Credentials::password("a@x".into(), pw("account-pw"));
        assert!(matches!(auth.verify(&right, Protocol::Imap, &home).await, Verdict::Granted(_)));
        for n in 0..40 {
            for k in 0..3 {
                let c = Credentials::password("a@x".into(), pw(&format!("guess-{n}-{k}")));
                let from = Peer { ip: ip(&format!("192.0.2.{n}")), client_name: None };
                // Wrong (compared), or not compared once the account's budget is used up.
                assert!(matches!(auth.verify(&c, Protocol::Imap, &from).await, Verdict::Denied | Verdict::Throttled));
            }
        }
        let compared = store.recent_audit("a@x", 1000).unwrap().iter().filter(|e| e.kind == "login_failed").count();
        assert_eq!(compared, budget::PASSWORD_PER_ACCOUNT as usize);
        let app = Credentials::password("a@x".into(), pw(&good));
        let stranger = Peer { ip: ip("203.0.113.9"), client_name: None };
        assert!(matches!(auth.verify(&app, Protocol::Imap, &stranger).await, Verdict::Granted(_)));
        assert!(matches!(auth.verify(&right, Protocol::Imap, &home).await, Verdict::Granted(_)));
        // An address that never signed in is held by the account's budget (the one that
        // just used the app password is the owner's now).
        let new = Peer { ip: ip("203.0.113.10"), client_name: None };
        assert!(matches!(auth.verify(&right, Protocol::Imap, &new).await, Verdict::Throttled));
        // An admin unlock empties the account's budget.
        auth.forget_failures("a@x").unwrap();
        assert!(matches!(auth.verify(&right, Protocol::Imap, &new).await, Verdict::Granted(_)));
    }

    /// A check that cannot get a hashing thread within the queue deadline is told to come
    /// back later (`NO [UNAVAILABLE]`), not left waiting.
    #[tokio::test(start_paused = true)]
    async fn a_check_stuck_in_the_queue_is_unavailable() {
        let (_dir, s, good) = setup();
        let auth = Authenticator::new(Arc::new(s), 1);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = auth.clone();
        let blocker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move { busy.hash_for(ip("198.51.100.9"), move || held.recv()).await })
        });
        std::thread::sleep(Duration::from_millis(100));
        let real = Credentials::password("a@x".into(), pw(&good));
        let before = tokio::time::Instant::now();
        assert!(matches!(auth.verify(&real, Protocol::Imap, &peer()).await, Verdict::Unavailable));
        assert!(before.elapsed() >= HASH_QUEUE_TIMEOUT);
        release.send(()).unwrap();
        let _ = blocker.join();
    }

    /// One check costs one argon2 evaluation, whether the account has 1 or 50 app
    /// passwords, for a wrong app password, a wrong account password or an unknown user
    /// (SECURITY.md case 64).
    #[test]
    fn one_hash_per_attempt_with_fifty_app_passwords() {
        let (_dir, s, good) = setup();
        for i in 0..49 {
            add_app_password(&s, &format!("device {i}"));
        }
        assert_eq!(s.list_app_passwords("a@x").unwrap().len(), 50);
        let mut wrong_app = good.clone();
        let last = wrong_app.pop().unwrap();
        wrong_app.push(if last == 'a' { 'b' } else { 'a' });
        let other_shape = app_password::generate().unwrap().grouped().expose().clone();
        for (user, secret) in [
            ("a@x", good.as_str()),
            ("a@x", wrong_app.as_str()),
            ("a@x", other_shape.as_str()),
            ("a@x", "not the account password"),
            ("nobody@x", "whatever"),
            ("nobody@x", good.as_str()),
        ] {
            let before = password::evaluations_on_this_thread();
            let _ = decide(&s, None, None, user, &pw(secret), Protocol::Imap, &peer());
            let n = password::evaluations_on_this_thread() - before;
            assert_eq!(n, 1, "{user} / {secret}: {n} evaluations");
        }
    }

    #[test]
    fn table() {
        let (_d, s, app) = setup();
        assert!(
            matches!(decide(&s, None, None, "a@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Granted(a) if a.app_password_id().is_some())
        );
        let used = s.list_app_passwords("a@x").unwrap()[0].last_used.clone().unwrap();
        assert_eq!(used.client.as_deref(), Some("Thunderbird"));
        assert!(matches!(decide(&s, None, None, "a@x", &pw(&app), Protocol::Smtp, &peer()), Verdict::Denied));
        assert!(
            matches!(decide(&s, None, None, "a@x", &pw("account-pw"), Protocol::Imap, &peer()), Verdict::Granted(a) if a.app_password_id().is_none())
        );
        assert!(matches!(decide(&s, None, None, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(matches!(decide(&s, None, None, "nobody@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Denied));
        // Another account's app password does not open this one.
        let mut b = s.get_account("a@x").unwrap().unwrap();
        b.username = "b@x".into();
        s.create_account(&b).unwrap();
        assert!(matches!(decide(&s, None, None, "b@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Denied));
    }

    #[test]
    fn imported_hashes_are_upgraded_to_argon2id_on_login() {
        let (_d, s, _app) = setup();
        // doveadm pw -s SHA512-CRYPT -p 'correct horse'
        s.update_account("a@x", &mut |a| {
            a.password_hash = Some(
                "{SHA512-CRYPT}$6$LkYAziLPYynr.PmP$vjYNVvjz2joE6JhbOlaxkT0BfUvIVYgIrhqMPxmF7knjl4ZkXro7CshkWtQK1CsB9a94nNhE65TkZx5VsTxSA/".into(),
            );
            Ok(())
        })
        .unwrap();
        assert!(matches!(decide(&s, None, None, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(s.get_account("a@x").unwrap().unwrap().password_hash.unwrap().starts_with("{SHA512-CRYPT}"));
        let v = decide(&s, None, None, "a@x", &pw("correct horse"), Protocol::Imap, &peer());
        assert!(matches!(v, Verdict::Granted(_)), "{v:?}");
        let h = s.get_account("a@x").unwrap().unwrap().password_hash.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(matches!(
            decide(&s, None, None, "a@x", &pw("correct horse"), Protocol::Imap, &peer()),
            Verdict::Granted(_)
        ));
    }

    #[test]
    fn verify_cache_keys_user_and_secret_expires_and_forgets() {
        // A lifetime no loaded machine outlasts between two lines for the hits, and a short
        // one for the expiry (load can only make that wait longer, never shorter).
        let c = VerifyCache::new(Duration::from_secs(600)).unwrap();
        c.remember("a@x", &pw("secret-1"));
        assert!(c.hit("a@x", &pw("secret-1")));
        assert!(!c.hit("a@x", &pw("secret-2")));
        assert!(!c.hit("b@x", &pw("secret-1")), "another user with the same secret");
        c.remember("b@x", &pw("secret-1"));
        c.forget("a@x");
        assert!(!c.hit("a@x", &pw("secret-1")));
        assert!(c.hit("b@x", &pw("secret-1")));
        let short = VerifyCache::new(Duration::from_millis(50)).unwrap();
        short.remember("b@x", &pw("secret-1"));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!short.hit("b@x", &pw("secret-1")), "expired");
        let off = VerifyCache::new(Duration::ZERO).unwrap();
        off.remember("a@x", &pw("s"));
        assert!(!off.hit("a@x", &pw("s")));
    }

    #[test]
    fn second_factor_accounts_refuse_the_account_password() {
        let (_d, s, app) = setup();
        s.update_account("a@x", &mut |a| {
            a.totp = Some(TotpState { secret_enc: String::new(), enabled_at: 1, last_step: 0 });
            a.second_factor_required = true;
            Ok(())
        })
        .unwrap();
        assert!(matches!(
            decide(&s, None, None, "a@x", &pw("account-pw"), Protocol::Imap, &peer()),
            Verdict::NeedsAppPassword
        ));
        assert!(matches!(decide(&s, None, None, "a@x", &pw("wrong"), Protocol::Imap, &peer()), Verdict::Denied));
        assert!(matches!(decide(&s, None, None, "a@x", &pw(&app), Protocol::Imap, &peer()), Verdict::Granted(_)));
        let ev = s.recent_audit("a@x", 5).unwrap();
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["login", "login_failed", "account_password_refused_2fa"]);
        assert!(ev[2].detail.contains("192.0.2.1 via IMAP (Thunderbird)"), "{}", ev[2].detail);
        // Fail closed: the TOTP record lost, the marker still refuses.
        s.update_account("a@x", &mut |a| {
            a.totp = None;
            Ok(())
        })
        .unwrap();
        assert!(matches!(
            decide(&s, None, None, "a@x", &pw("account-pw"), Protocol::Imap, &peer()),
            Verdict::NeedsAppPassword
        ));
    }
}
