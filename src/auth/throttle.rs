//! Failure throttling shared by IMAP, SMTP and the web step (SECURITY.md §H).
//!
//! * Per client (IPv4 address, or IPv6 prefix: `[limits] ipv6_prefix`, /64 by default): each failed login makes the next refusal
//!   wait longer — the base delay, doubling, capped (Dovecot's auth penalty: 2, 4, 8, 15 s).
//!   Repeating the *same* wrong user + secret (a misconfigured client) does not raise it.
//!   A success from the address clears it; it fades after an hour without failures.
//! * Per account: consecutive failures also lengthen the wait (after 10, one more second
//!   each, up to 30 s).
//!
//! These are only delays, so concurrent requests do not wait for each other: what bounds
//! the number of guesses is [`crate::auth::budget`], taken before a guess is compared.
//!
//! With a store shared by several nodes ([`Throttle::share`]), both counts are kept in the
//! store, so guesses spread over the nodes meet the penalty guesses sent to one would;
//! if the store cannot be reached, each node's own count is used meanwhile.
//!
//! Nothing here sleeps: callers ask for the delay and wait themselves.

use crate::auth::crypto::SecretKey;
use crate::store::Store;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// An address's penalty is forgotten after this long without failures (Dovecot: 1 h).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Entries kept at most; the oldest are dropped past it.
const MAX_ENTRIES: usize = 100_000;
/// Account failures before the account's own delay starts growing.
const ACCOUNT_FREE_FAILURES: u32 = 10;
/// The longest per-account delay.
const ACCOUNT_MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    User(String),
}

struct Entry {
    failures: u32,
    last: Instant,
    last_tag: Option<Vec<u8>>,
}

/// The shared throttle.
pub struct Throttle {
    base: Duration,
    max: Duration,
    key: aws_lc_rs::hmac::Key,
    map: Mutex<HashMap<Key, Entry>>,
    shared: OnceLock<Shared>,
    /// IPv6 clients are counted per prefix of this length ([`crate::addr::client_key`]).
    v6_prefix: u8,
}

/// Counts in a store shared by the nodes; tags under a key all nodes have.
struct Shared {
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("base", &self.base).field("max", &self.max).finish()
    }
}

impl Throttle {
    /// `base`: the delay of a first failure; `max`: the cap of the address penalty.
    pub fn new(base: Duration, max: Duration) -> Throttle {
        let mut k = [0u8; 32];
        let _ = getrandom::fill(&mut k);
        Throttle {
            base,
            max: max.max(base),
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k),
            map: Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
            v6_prefix: crate::addr::DEFAULT_IPV6_PREFIX,
        }
    }

    /// Counts IPv6 clients per prefix of `bits` (`[limits] ipv6_prefix`).
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Throttle {
        self.v6_prefix = bits;
        self
    }

    fn ip_key(&self, ip: IpAddr) -> IpAddr {
        crate::addr::client_key(ip, self.v6_prefix)
    }

    /// Keeps the counts in `store` if it is shared by several nodes (else nothing changes).
    /// `key` (the nodes' common `secret.key`) makes the tags of failed secrets.
    pub fn share(&self, store: Arc<dyn Store>, key: Arc<SecretKey>) {
        if store.failure_counts().is_some() {
            let _ = self.shared.set(Shared { store, key });
        }
    }

    /// The shared counts of this failure (address, account), if the store answers.
    fn count_shared(&self, ip: IpAddr, username: &str, secret: &[u8]) -> Option<(u32, u32)> {
        let shared = self.shared.get()?;
        let counts = shared.store.failure_counts()?;
        let tag = shared.key.tag(&[username.as_bytes(), secret]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        match counts.count_failures(&shared_keys(self.ip_key(ip), username), &tag, now, FORGET_AFTER.as_secs()) {
            Ok(c) => Some((*c.first()?, *c.get(1)?)),
            Err(e) => {
                tracing::warn!(error = %e, "shared failure counts unavailable; counting on this node");
                None
            }
        }
    }

    fn clear_shared(&self, keys: Vec<String>) {
        if self.base.is_zero() {
            return;
        }
        if let Some(counts) = self.shared.get().and_then(|s| s.store.failure_counts()) {
            counts.clear_failures(keys);
        }
    }

    /// The delay of a refusal that is not a guess (malformed exchange, the account password
    /// of a 2FA account): the base delay, without raising any penalty.
    pub fn base(&self) -> Duration {
        self.base
    }

    fn tag(&self, username: &str, secret: &[u8]) -> Vec<u8> {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.key);
        ctx.update(username.as_bytes());
        ctx.update(&[0]);
        ctx.update(secret);
        ctx.sign().as_ref().to_vec()
    }

    /// Records a failed login of `username` with `secret` from `ip`; returns how long to
    /// wait before answering.
    pub fn fail(&self, ip: IpAddr, username: &str, secret: &[u8]) -> Duration {
        let tag = self.tag(username, secret);
        let Ok(mut m) = self.map.lock() else { return self.max };
        if m.len() >= MAX_ENTRIES {
            m.retain(|_, e| e.last.elapsed() < FORGET_AFTER);
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
        }
        let now = Instant::now();
        let mut bump = |key: Key, same_secret_counts: bool| -> u32 {
            let e = m.entry(key).or_insert(Entry { failures: 0, last: now, last_tag: None });
            if e.last.elapsed() >= FORGET_AFTER {
                e.failures = 0;
            }
            let repeat = e.last_tag.as_deref() == Some(tag.as_slice());
            if !repeat || same_secret_counts || e.failures == 0 {
                e.failures = e.failures.saturating_add(1);
            }
            e.last = now;
            e.last_tag = Some(tag.clone());
            e.failures
        };
        let mut ip_failures = bump(Key::Ip(self.ip_key(ip)), false);
        let mut user_failures = bump(Key::User(username.to_string()), false);
        drop(m);
        if self.base.is_zero() {
            // `auth_failure_delay_ms = 0` turns every delay off (the stored lock at
            // MAX_FAILED_LOGINS still applies).
            return Duration::ZERO;
        }
        if let Some((ip_shared, user_shared)) = self.count_shared(ip, username, secret) {
            (ip_failures, user_failures) = (ip_shared, user_shared);
        }
        self.ip_delay(ip_failures).max(account_delay(user_failures))
    }

    /// Whether `username` + `secret` is the last failure recorded for `ip` (a mail app
    /// retrying a stale password): checked before [`Throttle::fail`] records this one.
    pub fn repeats_last(&self, ip: IpAddr, username: &str, secret: &[u8]) -> bool {
        let tag = self.tag(&crate::auth::normalize_username(username), secret);
        let Ok(m) = self.map.lock() else { return false };
        m.get(&Key::Ip(self.ip_key(ip)))
            .is_some_and(|e| e.last.elapsed() < FORGET_AFTER && e.last_tag.as_deref() == Some(tag.as_slice()))
    }

    /// A successful login: the address's penalty and the account's count are cleared.
    pub fn succeed(&self, ip: IpAddr, username: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&Key::Ip(self.ip_key(ip)));
            m.remove(&Key::User(username.to_string()));
        }
        self.clear_shared(shared_keys(self.ip_key(ip), username));
    }

    /// Clears an account's in-memory count (admin unlock).
    pub fn forget_user(&self, username: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&Key::User(username.to_string()));
        }
        self.clear_shared(vec![shared_user_key(username)]);
    }

    /// base × 2^(n−1), capped.
    fn ip_delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (failures - 1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// The keys of the shared counts: the client key, then the account.
fn shared_keys(client: IpAddr, username: &str) -> Vec<String> {
    vec![format!("ip:{client}"), shared_user_key(username)]
}

fn shared_user_key(username: &str) -> String {
    format!("user:{username}")
}

fn account_delay(failures: u32) -> Duration {
    Duration::from_secs(u64::from(failures.saturating_sub(ACCOUNT_FREE_FAILURES))).min(ACCOUNT_MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn penalty_doubles_up_to_the_cap_and_success_clears_it() {
        let t = Throttle::new(Duration::from_secs(2), Duration::from_secs(15));
        let delays: Vec<u64> =
            (0..5).map(|n| t.fail(ip("192.0.2.1"), &format!("user{n}@x"), b"guess").as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 15, 15], "rotating usernames does not help");
        assert_eq!(t.fail(ip("192.0.2.2"), "other@x", b"x").as_secs(), 2, "another address starts fresh");
        t.succeed(ip("192.0.2.1"), "user0@x");
        assert_eq!(t.fail(ip("192.0.2.1"), "user9@x", b"y").as_secs(), 2);
    }

    #[test]
    fn the_same_wrong_secret_does_not_raise_the_penalty() {
        let t = Throttle::new(Duration::from_secs(2), Duration::from_secs(15));
        for _ in 0..5 {
            assert_eq!(t.fail(ip("192.0.2.1"), "a@x", b"old password").as_secs(), 2);
        }
        assert_eq!(t.fail(ip("192.0.2.1"), "a@x", b"another").as_secs(), 4);
    }

    #[test]
    fn ipv6_is_throttled_by_its_prefix() {
        let t = Throttle::new(Duration::from_secs(2), Duration::from_secs(15));
        assert_eq!(t.fail(ip("2001:db8:1:1::1"), "a@x", b"1").as_secs(), 2);
        assert_eq!(t.fail(ip("2001:db8:1:1:ffff::9"), "b@x", b"2").as_secs(), 4, "same /64");
        assert_eq!(t.fail(ip("2001:db8:1:2::1"), "c@x", b"3").as_secs(), 2, "another /64");
        let t48 = Throttle::new(Duration::from_secs(2), Duration::from_secs(15)).with_ipv6_prefix(48);
        assert_eq!(t48.fail(ip("2001:db8:1:1::1"), "a@x", b"1").as_secs(), 2);
        assert_eq!(t48.fail(ip("2001:db8:1:ffff::9"), "b@x", b"2").as_secs(), 4, "same /48");
        assert_eq!(t.fail(ip("::ffff:192.0.2.7"), "d@x", b"4").as_secs(), 2);
        assert_eq!(t.fail(ip("192.0.2.7"), "e@x", b"5").as_secs(), 4, "mapped IPv4 is the same client");
    }

    #[test]
    fn no_delays_at_all_when_the_base_delay_is_zero() {
        let t = Throttle::new(Duration::ZERO, Duration::ZERO);
        for n in 0..60 {
            assert_eq!(t.fail(ip("192.0.2.1"), "a@x", format!("g{n}").as_bytes()), Duration::ZERO);
        }
    }

    #[test]
    fn account_delay_grows_after_ten_failures_from_anywhere() {
        // A 1 ms address penalty, to see the account's delay alone.
        let t = Throttle::new(Duration::from_millis(1), Duration::from_millis(1));
        for n in 0..10 {
            assert_eq!(t.fail(ip(&format!("192.0.2.{n}")), "a@x", format!("g{n}").as_bytes()).as_secs(), 0);
        }
        assert_eq!(t.fail(ip("198.51.100.1"), "a@x", b"g10").as_secs(), 1);
        for n in 11..60 {
            t.fail(ip("198.51.100.1"), "a@x", format!("g{n}").as_bytes());
        }
        assert_eq!(t.fail(ip("198.51.100.1"), "a@x", b"last"), ACCOUNT_MAX_DELAY);
    }
}
