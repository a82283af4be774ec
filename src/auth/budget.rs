//! Budgets of guesses: what bounds guessing of the secrets a person can remember or read
//! off a phone (the account password, TOTP codes, backup codes), however many requests
//! arrive at once (SECURITY.md §H).
//!
//! Every such attempt **takes its slot before anything is compared or hashed**, in one
//! atomic step of the store (shared by all nodes): N concurrent requests against a budget
//! of k compare at most k. What happens after the comparison:
//! * wrong: the slot stays used (it comes back with the budget's refill rate);
//! * right: the slot is given back, and the budget of *that address* is emptied — never
//!   the account's, so the owner's success does not refund an attacker elsewhere;
//! * not compared after all (store or upstream unavailable): the slot is given back.
//!
//! The budgets (burst, then one more per refill period):
//! * account password, per address (IMAP, SMTP and the web together): 10, then 1 per 6 min;
//! * account password, per account, from addresses it never signed in from: 30, then 1 per
//!   10 min. Addresses it signed in from within 90 days ("familiar") draw only on their own
//!   address budget, so an attack from elsewhere never locks the owner out;
//! * second factor (TOTP or backup code), per address: 10, then 1 per 6 min; per account:
//!   20, then 1 per 4 hours; per pending sign-in: 5 ([`crate::web`]).
//!
//! App passwords (≥ 100 bits) and, later, OAuth tokens draw on no budget: guessing them
//! is hopeless, and an attack on the account password must never stop them.

use crate::store::{Budget, Store, StoreError};
use std::net::IpAddr;

/// Account-password guesses one address may make at once.
pub const PASSWORD_PER_ADDRESS: u32 = 10;
/// Seconds until an address gets one account-password guess back.
pub const PASSWORD_PER_ADDRESS_REFILL: u64 = 360;
/// Account-password guesses at one account from unfamiliar addresses, at once.
pub const PASSWORD_PER_ACCOUNT: u32 = 30;
/// Seconds until the account budget gets one guess back.
pub const PASSWORD_PER_ACCOUNT_REFILL: u64 = 600;
/// Second-factor codes one address may try at once.
pub const CODE_PER_ADDRESS: u32 = 10;
/// Seconds until an address gets one code back.
pub const CODE_PER_ADDRESS_REFILL: u64 = 360;
/// Second-factor codes tried at one account at once.
pub const CODE_PER_ACCOUNT: u32 = 20;
/// Seconds until an account gets one code back.
pub const CODE_PER_ACCOUNT_REFILL: u64 = 4 * 3600;
/// A familiar address is remembered again after this long (one write a day at most).
const FAMILIAR_TOUCH_SECS: u64 = 86_400;

/// What is being guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// The account password (IMAP, SMTP, the web step's first step).
    AccountPassword,
    /// A TOTP code or a backup code (the web step's second step).
    SecondFactor,
}

impl Secret {
    fn prefix(self) -> &'static str {
        match self {
            Secret::AccountPassword => "pw",
            Secret::SecondFactor => "2fa",
        }
    }
}

/// Which budget had nothing left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// The client address's.
    Address,
    /// The account's.
    Account,
}

impl Exhausted {
    /// For log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Exhausted::Address => "address",
            Exhausted::Account => "account",
        }
    }
}

/// A slot taken: settle it with [`Ticket::wrong`], [`Ticket::right`] or
/// [`Ticket::not_compared`]. Dropping it unsettled leaves the slot used, as a wrong guess.
#[derive(Debug)]
#[must_use = "a taken slot must be settled"]
pub struct Ticket {
    budgets: Vec<Budget>,
    address_key: String,
    username: String,
    address: IpAddr,
}

/// The budgets for one kind of secret.
pub struct Budgets;

fn address_budget(secret: Secret, ip: IpAddr) -> Budget {
    let (burst, refill_secs) = match secret {
        Secret::AccountPassword => (PASSWORD_PER_ADDRESS, PASSWORD_PER_ADDRESS_REFILL),
        Secret::SecondFactor => (CODE_PER_ADDRESS, CODE_PER_ADDRESS_REFILL),
    };
    Budget { key: format!("{}-ip:{}", secret.prefix(), ip), burst, refill_secs }
}

fn account_budget(secret: Secret, username: &str) -> Budget {
    let (burst, refill_secs) = match secret {
        Secret::AccountPassword => (PASSWORD_PER_ACCOUNT, PASSWORD_PER_ACCOUNT_REFILL),
        Secret::SecondFactor => (CODE_PER_ACCOUNT, CODE_PER_ACCOUNT_REFILL),
    };
    Budget { key: format!("{}-user:{}", secret.prefix(), username.escape_debug()), burst, refill_secs }
}

/// The key under which an account's familiar address is remembered. Names are escaped
/// (a client may send any bytes as a name; the keys are text in PostgreSQL).
fn familiar_key(username: &str, ip: IpAddr) -> String {
    format!("{} {ip}", username.escape_debug())
}

impl Budgets {
    /// Takes a slot for one guess of `secret` of `username` from the client `ip` (its
    /// client key, [`crate::addr::client_key`]), before it is compared. `Ok(Err(_))`: a budget is empty, so the guess must be refused uncompared.
    pub fn take(
        store: &dyn Store,
        secret: Secret,
        username: &str,
        ip: IpAddr,
        now: u64,
    ) -> Result<Result<Ticket, Exhausted>, StoreError> {
        let mut budgets = vec![address_budget(secret, ip)];
        let familiar = secret == Secret::AccountPassword
            && store
                .familiar_since(&familiar_key(username, ip))?
                .is_some_and(|at| now.saturating_sub(at) < crate::store::FAMILIAR_KEEP_SECS);
        if !familiar {
            budgets.push(account_budget(secret, username));
        }
        Ok(match store.take_attempt(&budgets, now)? {
            None => {
                Ok(Ticket { address_key: budgets[0].key.clone(), budgets, username: username.to_string(), address: ip })
            }
            Some(0) => Err(Exhausted::Address),
            Some(_) => Err(Exhausted::Account),
        })
    }

    /// A success from `ip` (any credential): the address becomes familiar to the account.
    /// Returns whether it was new: not familiar to the account before (never, or not within
    /// [`crate::store::FAMILIAR_KEEP_SECS`]), the "new device" of a security notification.
    pub fn signed_in(store: &dyn Store, username: &str, ip: IpAddr, now: u64) -> bool {
        let key = familiar_key(username, ip);
        let since = match store.familiar_since(&key) {
            Ok(since) => since,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a familiar address");
                return false;
            }
        };
        let fresh = since.is_some_and(|at| now.saturating_sub(at) < FAMILIAR_TOUCH_SECS);
        if !fresh && let Err(e) = store.remember_familiar(&key, now) {
            tracing::warn!(error = %e, "cannot remember a familiar address");
        }
        since.is_none_or(|at| now.saturating_sub(at) >= crate::store::FAMILIAR_KEEP_SECS)
    }

    /// Empties every budget of an account (admin unlock); addresses keep theirs.
    pub fn clear_account(store: &dyn Store, username: &str) -> Result<(), StoreError> {
        let keys = [Secret::AccountPassword, Secret::SecondFactor].map(|s| account_budget(s, username).key);
        store.clear_attempts(&keys)
    }
}

impl Ticket {
    /// The guess was wrong: the slot stays used (nothing to write).
    pub fn wrong(self) {}

    /// The secret was right: the slot comes back and the address's budget is emptied (it
    /// proved it knows the secret); the account's budget keeps what others used. The
    /// address becomes familiar (returns whether it was new, see [`Budgets::signed_in`]).
    pub fn right(self, store: &dyn Store, now: u64) -> bool {
        let rest: Vec<Budget> = self.budgets.iter().skip(1).cloned().collect();
        if let Err(e) = store.clear_attempts(std::slice::from_ref(&self.address_key)) {
            tracing::warn!(error = %e, "cannot clear an address's budget");
        }
        if !rest.is_empty()
            && let Err(e) = store.give_back_attempt(&rest, now)
        {
            tracing::warn!(error = %e, "cannot give back a budget slot");
        }
        Budgets::signed_in(store, &self.username, self.address, now)
    }

    /// Nothing was compared (a store or upstream failure): the slot comes back.
    pub fn not_compared(self, store: &dyn Store, now: u64) {
        if let Err(e) = store.give_back_attempt(&self.budgets, now) {
            tracing::warn!(error = %e, "cannot give back a budget slot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// 200 threads guessing at once from one address: exactly the burst get slots.
    #[test]
    fn concurrent_takers_never_overdraw() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..200)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    match Budgets::take(store.as_ref(), Secret::AccountPassword, "a@x", ip("192.0.2.1"), 1000).unwrap()
                    {
                        Ok(t) => {
                            t.wrong();
                            1
                        }
                        Err(_) => 0,
                    }
                })
            })
            .collect();
        let taken: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, PASSWORD_PER_ADDRESS);
    }

    /// Many addresses exhaust the account budget; the owner's familiar address is not held
    /// by it, and its success does not refund the others.
    #[test]
    fn the_account_budget_holds_strangers_not_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let now = 10_000;
        Budgets::signed_in(&s, "a@x", ip("198.51.100.7"), now);
        let mut taken = 0;
        for n in 0..40u8 {
            for _ in 0..3 {
                if let Ok(t) =
                    Budgets::take(&s, Secret::AccountPassword, "a@x", ip(&format!("192.0.2.{n}")), now).unwrap()
                {
                    t.wrong();
                    taken += 1;
                }
            }
        }
        assert_eq!(taken, PASSWORD_PER_ACCOUNT);
        let owner = Budgets::take(&s, Secret::AccountPassword, "a@x", ip("198.51.100.7"), now).unwrap().unwrap();
        owner.right(&s, now);
        let stranger = Budgets::take(&s, Secret::AccountPassword, "a@x", ip("203.0.113.1"), now).unwrap();
        assert_eq!(stranger.unwrap_err(), Exhausted::Account, "the owner's success refunded nobody");
        // One refill period later one guess is back.
        let later = now + PASSWORD_PER_ACCOUNT_REFILL;
        assert!(Budgets::take(&s, Secret::AccountPassword, "a@x", ip("203.0.113.1"), later).unwrap().is_ok());
        assert!(Budgets::take(&s, Secret::AccountPassword, "a@x", ip("203.0.113.2"), later).unwrap().is_err());
        Budgets::clear_account(&s, "a@x").unwrap();
        assert!(Budgets::take(&s, Secret::AccountPassword, "a@x", ip("203.0.113.2"), later).unwrap().is_ok());
    }

    /// A right answer empties the address's own budget; a wrong one keeps its slot; the
    /// refill brings one slot back per period.
    #[test]
    fn refill_and_settling() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let a = ip("2001:db8::");
        for _ in 0..CODE_PER_ADDRESS {
            Budgets::take(&s, Secret::SecondFactor, "a@x", a, 0).unwrap().unwrap().wrong();
        }
        let same_64 = ip("2001:db8::"); // the client key of 2001:db8::ffff
        assert_eq!(
            Budgets::take(&s, Secret::SecondFactor, "b@x", same_64, 0).unwrap().unwrap_err(),
            Exhausted::Address
        );
        let t = Budgets::take(&s, Secret::SecondFactor, "a@x", a, CODE_PER_ADDRESS_REFILL).unwrap().unwrap();
        t.right(&s, CODE_PER_ADDRESS_REFILL);
        for _ in 0..CODE_PER_ADDRESS {
            Budgets::take(&s, Secret::SecondFactor, "b@x", a, CODE_PER_ADDRESS_REFILL)
                .unwrap()
                .unwrap()
                .not_compared(&s, CODE_PER_ADDRESS_REFILL);
        }
    }
}
