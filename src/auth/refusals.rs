//! One log line per kind of refusal and client address a minute (SECURITY.md §H).
//!
//! A flood must leave a trace an admin can read, without writing a line per request: the
//! first refusal of a kind from an address is logged at once, the next ones of the minute
//! are counted and reported with the next line. The kinds here say why something was
//! *not checked* (a guess budget used up, the hashing threads busy): the cheap refusals a
//! flood is made of. Each attempt that was checked has its own line
//! ([`super::login_log`]), which also carries `result=throttled` for these, aggregated
//! the same way. The line has one fixed shape, `refused <kind> from <address>`, followed
//! by fields:
//!
//! ```text
//! WARN mailgate::auth::refusals: refused password_guesses_used_up_by_address from 192.0.2.7 user=a@example.com more=41
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The kinds of refusal that are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The address has used its account-password guesses.
    PasswordBudgetAddress,
    /// The account has used the guesses of unfamiliar addresses.
    PasswordBudgetAccount,
    /// The address has used its second-factor guesses.
    CodeBudgetAddress,
    /// The account has used its second-factor guesses.
    CodeBudgetAccount,
    /// The address has too many checks waiting for a hashing thread.
    HashingBusyAddress,
    /// The hashing queue is full.
    HashingFull,
}

impl Kind {
    /// The name in the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PasswordBudgetAddress => "password_guesses_used_up_by_address",
            Kind::PasswordBudgetAccount => "password_guesses_used_up_for_account",
            Kind::CodeBudgetAddress => "code_guesses_used_up_by_address",
            Kind::CodeBudgetAccount => "code_guesses_used_up_for_account",
            Kind::HashingBusyAddress => "too_many_checks_from_address",
            Kind::HashingFull => "hashing_queue_full",
        }
    }
}

/// How often one kind from one address is logged.
const EVERY: Duration = Duration::from_secs(60);
/// Entries kept at most (a flood from a million addresses must not grow this).
const MAX_ENTRIES: usize = 50_000;

/// Lets one line a minute through per key and client address, counting the others.
pub struct Limiter<K> {
    last: Mutex<HashMap<(K, IpAddr), (Instant, u64)>>,
}

impl<K> Default for Limiter<K> {
    fn default() -> Self {
        Limiter { last: Mutex::new(HashMap::new()) }
    }
}

impl<K: Copy + Eq + std::hash::Hash> Limiter<K> {
    /// `Some(more)`: write a line now, with `more` lines counted since the last one;
    /// `None`: one was written for this key and address within the minute (counted).
    pub fn admit(&self, key: K, ip: IpAddr) -> Option<u64> {
        let Ok(mut m) = self.last.lock() else { return None };
        let now = Instant::now();
        if m.len() >= MAX_ENTRIES {
            m.retain(|_, (at, _)| now.duration_since(*at) < EVERY);
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
        }
        let ip = ip.to_canonical();
        match m.get_mut(&(key, ip)) {
            Some((at, more)) if now.duration_since(*at) < EVERY => {
                *more += 1;
                None
            }
            entry => {
                let more = entry.map(|(_, more)| *more).unwrap_or(0);
                m.insert((key, ip), (now, 0));
                Some(more)
            }
        }
    }
}

/// The rate limiter of the refusal lines.
#[derive(Default)]
pub struct RefusalLog {
    limiter: Limiter<Kind>,
}

impl RefusalLog {
    /// Notes a refusal; writes the line if none was written for this kind and address in
    /// the last minute. Returns whether it wrote one.
    pub fn note(&self, kind: Kind, ip: IpAddr, user: &str) -> bool {
        let Some(more) = self.limiter.admit(kind, ip) else { return false };
        let user = crate::auth::printable(user);
        let ip = ip.to_canonical();
        tracing::warn!(user = %user, more, "refused {} from {ip}", kind.as_str());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_and_address_a_minute() {
        let log = RefusalLog::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        assert!(log.note(Kind::PasswordBudgetAddress, a, "x@y"));
        for _ in 0..100 {
            assert!(!log.note(Kind::PasswordBudgetAddress, a, "x@y"));
        }
        assert!(log.note(Kind::HashingFull, a, "x@y"), "another kind");
        assert!(log.note(Kind::PasswordBudgetAddress, b, "x@y"), "another address");
        assert!(
            !log.note(Kind::PasswordBudgetAddress, "192.0.2.2".parse().unwrap(), ""),
            "the same address, mapped or not"
        );
    }
}
