//! The embedded store on sled 0.34.7.
//!
//! Trees and keys:
//! * `meta`: `schema_version` → u32 big-endian.
//! * `accounts`: username → JSON [`Account`].
//! * `app_passwords`: public id → JSON [`AppPasswordRecord`].
//! * `account_app_passwords`: `username NUL id` → empty (index for listing).
//! * `audit`: `username NUL` u64 big-endian sequence → JSON [`AuditEvent`] (per-account
//!   prefix, so an account's recent events are read without scanning everyone's).
//! * `attempts`: budget key → used (u32) and its time (u64), big-endian, then the time
//!   every attempt is back (u64), by which entries are purged ([`Budget`]).
//! * `familiar`: `account address` → unix seconds of the last sign-in from there.
//! * `notices`: notice id → JSON [`Notice`] (the queue of security notifications; small,
//!   so a claim scans it under [`SledStore::notice_lock`]).
//!
//! sled takes an exclusive lock on the directory: one process at a time (the admin CLI
//! talks to a running server over its socket instead).

use super::*;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;
use std::sync::Mutex;

/// sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    accounts: sled::Tree,
    app_passwords: sled::Tree,
    index: sled::Tree,
    audit: sled::Tree,
    attempts: sled::Tree,
    familiar: sled::Tree,
    notices: sled::Tree,
    /// Serialises claims and reschedules of notices (one process: a lock is the lease's
    /// atomicity).
    notice_lock: Mutex<()>,
    /// Budget takes since the last purge of refilled entries.
    takes: std::sync::atomic::AtomicU64,
    /// Serialises app-password creation (label and count checks need a scan, which sled
    /// transactions cannot do).
    create_lock: Mutex<()>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt(what.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(backend)
}

fn index_key(username: &str, id: &str) -> Vec<u8> {
    let mut k = username.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

/// How long [`SledStore::open`] waits for another process to release the store.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledStore {
    /// Opens (or creates) the store in `path`. Fails if another process holds it, or if
    /// it was written by another schema version.
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        // A process that just exited (a restart, an admin command in direct mode right
        // after the server stopped) can hold the lock for a moment while its last
        // threads wind down; wait briefly before calling the store busy.
        let give_up = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match sled::Config::new().path(path).flush_every_ms(Some(500)).open() {
                Ok(db) => break db,
                Err(e) => {
                    let text = e.to_string();
                    if !text.contains("lock") {
                        return Err(StoreError::Backend(format!("cannot open {}: {text}", path.display())));
                    }
                    if std::time::Instant::now() >= give_up {
                        return Err(StoreError::Backend(format!(
                            "{} is in use by another mailgate process ({text})",
                            path.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        };
        let meta = db.open_tree("meta").map_err(backend)?;
        match meta.get("schema_version").map_err(backend)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("schema_version".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema { found });
                }
            }
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes()).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
        }
        Ok(SledStore {
            accounts: db.open_tree("accounts").map_err(backend)?,
            app_passwords: db.open_tree("app_passwords").map_err(backend)?,
            index: db.open_tree("account_app_passwords").map_err(backend)?,
            audit: db.open_tree("audit").map_err(backend)?,
            attempts: db.open_tree("attempts").map_err(backend)?,
            familiar: db.open_tree("familiar").map_err(backend)?,
            notices: db.open_tree("notices").map_err(backend)?,
            notice_lock: Mutex::new(()),
            takes: std::sync::atomic::AtomicU64::new(0),
            db,
            create_lock: Mutex::new(()),
        })
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    /// Drops budget entries whose attempts are all back, and familiar addresses not seen
    /// for [`FAMILIAR_KEEP_SECS`]. Run every [`PURGE_EVERY`] takes.
    fn purge(&self, now: u64) {
        for entry in self.attempts.iter().flatten() {
            if decode_use(&entry.1).is_none_or(|(_, until)| until <= now) {
                let _ = self.attempts.compare_and_swap(&entry.0, Some(entry.1), None as Option<&[u8]>);
            }
        }
        for entry in self.familiar.iter().flatten() {
            let at = <[u8; 8]>::try_from(entry.1.as_ref()).map(u64::from_be_bytes).unwrap_or(0);
            if at.saturating_add(FAMILIAR_KEEP_SECS) <= now {
                let _ = self.familiar.remove(&entry.0);
            }
        }
    }
}

/// Budget entries are purged on one take in this many.
const PURGE_EVERY: u64 = 4096;

fn encode_use(u: BudgetUse, until: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&u.used.to_be_bytes());
    v.extend_from_slice(&u.at.to_be_bytes());
    v.extend_from_slice(&until.to_be_bytes());
    v
}

fn decode_use(v: &[u8]) -> Option<(BudgetUse, u64)> {
    let used = u32::from_be_bytes(v.get(0..4)?.try_into().ok()?);
    let at = u64::from_be_bytes(v.get(4..12)?.try_into().ok()?);
    let until = u64::from_be_bytes(v.get(12..20)?.try_into().ok()?);
    Some((BudgetUse { used, at }, until))
}

impl Store for SledStore {
    fn take_attempt(&self, budgets: &[Budget], now: u64) -> Result<Option<usize>, StoreError> {
        if self.takes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            self.purge(now);
        }
        // One transaction over every key: all taken or none, and concurrent takers of
        // the same key are serialised (a conflicting one runs again on the new value).
        let r = self.attempts.transaction(|t| {
            let mut new = Vec::with_capacity(budgets.len());
            for (i, b) in budgets.iter().enumerate() {
                let cur = t.get(b.key.as_bytes())?.and_then(|v| decode_use(&v)).map(|u| u.0).unwrap_or_default();
                match cur.take(b, now) {
                    Some(u) => new.push(encode_use(u, u.empty_at(b.refill_secs))),
                    None => return Ok(Some(i)),
                }
            }
            for (b, v) in budgets.iter().zip(new) {
                t.insert(b.key.as_bytes(), v)?;
            }
            Ok(None)
        });
        r.map_err(|e: TransactionError<StoreError>| tx_err(e))
    }

    fn give_back_attempt(&self, budgets: &[Budget], now: u64) -> Result<(), StoreError> {
        let r = self.attempts.transaction(|t| {
            for b in budgets {
                if let Some((cur, _)) = t.get(b.key.as_bytes())?.and_then(|v| decode_use(&v)) {
                    let u = cur.give_back(b, now);
                    t.insert(b.key.as_bytes(), encode_use(u, u.empty_at(b.refill_secs)))?;
                }
            }
            Ok(())
        });
        r.map_err(|e: TransactionError<StoreError>| tx_err(e))
    }

    fn clear_attempts(&self, keys: &[String]) -> Result<(), StoreError> {
        for k in keys {
            self.attempts.remove(k.as_bytes()).map_err(backend)?;
        }
        Ok(())
    }

    fn remember_familiar(&self, key: &str, now: u64) -> Result<(), StoreError> {
        self.familiar.insert(key.as_bytes(), &now.to_be_bytes()).map_err(backend)?;
        Ok(())
    }

    fn familiar_since(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .familiar
            .get(key.as_bytes())
            .map_err(backend)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    fn enqueue_notice(&self, notice: &Notice) -> Result<(), StoreError> {
        let swapped = self
            .notices
            .compare_and_swap(notice.id.as_bytes(), None as Option<&[u8]>, Some(encode(notice)?))
            .map_err(backend)?;
        swapped.map_err(|_| StoreError::Conflict(format!("notice {} exists already", notice.id)))
    }

    fn claim_notices(&self, now: u64, lease_secs: u64, limit: usize) -> Result<Vec<Notice>, StoreError> {
        let _guard = self.notice_lock.lock().map_err(|_| backend("lock poisoned"))?;
        let mut due = Vec::new();
        for kv in self.notices.iter() {
            let (k, v) = kv.map_err(backend)?;
            let n: Notice = decode(&String::from_utf8_lossy(&k), &v)?;
            if n.due_at <= now {
                due.push(n);
            }
        }
        due.sort_by(|a, b| a.due_at.cmp(&b.due_at).then_with(|| a.id.cmp(&b.id)));
        due.truncate(limit);
        for n in &mut due {
            n.due_at = now.saturating_add(lease_secs);
            self.notices.insert(n.id.as_bytes(), encode(n)?).map_err(backend)?;
        }
        Ok(due)
    }

    fn reschedule_notice(&self, id: &str, due_at: u64, attempts: u32) -> Result<(), StoreError> {
        let _guard = self.notice_lock.lock().map_err(|_| backend("lock poisoned"))?;
        if let Some(v) = self.notices.get(id).map_err(backend)? {
            let mut n: Notice = decode(id, &v)?;
            n.due_at = due_at;
            n.attempts = attempts;
            self.notices.insert(id.as_bytes(), encode(&n)?).map_err(backend)?;
        }
        Ok(())
    }

    fn delete_notice(&self, id: &str) -> Result<(), StoreError> {
        let _guard = self.notice_lock.lock().map_err(|_| backend("lock poisoned"))?;
        self.notices.remove(id.as_bytes()).map_err(backend)?;
        Ok(())
    }

    fn get_account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        match self.accounts.get(username).map_err(backend)? {
            Some(v) => Ok(Some(decode(username, &v)?)),
            None => Ok(None),
        }
    }

    fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let value = encode(account)?;
        let swapped = self
            .accounts
            .compare_and_swap(account.username.as_bytes(), None as Option<&[u8]>, Some(value))
            .map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::Conflict(format!("account {} already exists", account.username)));
        }
        self.durable()
    }

    fn create_accounts(&self, accounts: &[Account]) -> Result<(), StoreError> {
        let values: Vec<(String, Vec<u8>)> =
            accounts.iter().map(|a| Ok((a.username.clone(), encode(a)?))).collect::<Result<_, StoreError>>()?;
        let res = self.accounts.transaction(|t| {
            let mut existing = Vec::new();
            for (name, _) in &values {
                if t.get(name.as_bytes())?.is_some() {
                    existing.push(name.clone());
                }
            }
            if !existing.is_empty() {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict(format!(
                    "these accounts exist already: {}",
                    existing.join(", ")
                ))));
            }
            for (name, value) in &values {
                t.insert(name.as_bytes(), value.clone())?;
            }
            Ok(())
        });
        res.map_err(tx_err)?;
        self.durable()
    }

    fn update_account(
        &self,
        username: &str,
        change: &mut dyn FnMut(&mut Account) -> Result<(), StoreError>,
    ) -> Result<Account, StoreError> {
        // One writer at a time for read-check-write changes (sled's optimistic
        // transactions would re-run `change`, which may be an expensive hash check).
        let _guard = self.create_lock.lock().map_err(|_| backend("lock poisoned"))?;
        let Some(current) = self.accounts.get(username).map_err(backend)? else {
            return Err(StoreError::NotFound(format!("unknown user {username}")));
        };
        let mut account: Account = decode(username, &current)?;
        change(&mut account)?;
        let value = encode(&account)?;
        let swapped =
            self.accounts.compare_and_swap(username.as_bytes(), Some(current), Some(value)).map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::Conflict(format!("{username} was changed at the same time; try again")));
        }
        self.durable()?;
        Ok(account)
    }

    fn remove_account(&self, username: &str) -> Result<(), StoreError> {
        let ids: Vec<Vec<u8>> = self
            .index
            .scan_prefix(index_key(username, ""))
            .keys()
            .map(|k| k.map(|k| k.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        let res = (&self.accounts, &self.app_passwords, &self.index).transaction(|(a, p, i)| {
            if a.remove(username.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(StoreError::NotFound(format!(
                    "unknown user {username}"
                ))));
            }
            for key in &ids {
                let id = &key[username.len() + 1..];
                p.remove(id)?;
                i.remove(key.as_slice())?;
            }
            Ok(())
        });
        res.map_err(tx_err)?;
        self.durable()
    }

    fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.accounts
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    fn create_app_password(&self, record: &AppPasswordRecord) -> Result<(), StoreError> {
        let _guard = self.create_lock.lock().map_err(|_| backend("lock poisoned"))?;
        let existing = self.list_app_passwords(&record.username)?;
        if existing.len() >= MAX_APP_PASSWORDS {
            return Err(StoreError::Limit(format!(
                "{} already has {MAX_APP_PASSWORDS} app passwords; revoke one first",
                record.username
            )));
        }
        if existing.iter().any(|r| r.label.eq_ignore_ascii_case(&record.label)) {
            return Err(StoreError::Conflict(format!(
                "{} already has an app password labelled \"{}\"",
                record.username, record.label
            )));
        }
        let value = encode(record)?;
        let res = (&self.accounts, &self.app_passwords, &self.index).transaction(|(a, p, i)| {
            if a.get(record.username.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(StoreError::NotFound(format!(
                    "unknown user {}",
                    record.username
                ))));
            }
            if p.get(record.id.as_bytes())?.is_some() {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict("id collision".into())));
            }
            p.insert(record.id.as_bytes(), value.clone())?;
            i.insert(index_key(&record.username, &record.id), &[][..])?;
            Ok(())
        });
        res.map_err(tx_err)?;
        self.durable()
    }

    fn get_app_password(&self, id: &str) -> Result<Option<AppPasswordRecord>, StoreError> {
        match self.app_passwords.get(id).map_err(backend)? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    fn list_app_passwords(&self, username: &str) -> Result<Vec<AppPasswordRecord>, StoreError> {
        let mut out = Vec::new();
        for key in self.index.scan_prefix(index_key(username, "")).keys() {
            let key = key.map_err(backend)?;
            let id = String::from_utf8_lossy(&key[username.len() + 1..]).to_string();
            if let Some(r) = self.get_app_password(&id)? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    fn revoke_app_password(&self, username: &str, id: &str) -> Result<AppPasswordRecord, StoreError> {
        let res = (&self.app_passwords, &self.index).transaction(|(p, i)| {
            let not_found = || {
                ConflictableTransactionError::Abort(StoreError::NotFound(format!(
                    "{username} has no app password with id {id}"
                )))
            };
            let Some(v) = p.get(id.as_bytes())? else { return Err(not_found()) };
            let rec: AppPasswordRecord = decode(id, &v).map_err(ConflictableTransactionError::Abort)?;
            if rec.username != username {
                return Err(not_found());
            }
            p.remove(id.as_bytes())?;
            i.remove(index_key(username, id))?;
            Ok(rec)
        });
        let rec = res.map_err(tx_err)?;
        self.durable()?;
        Ok(rec)
    }

    fn update_app_password(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut AppPasswordRecord) -> Result<(), StoreError>,
    ) -> Result<AppPasswordRecord, StoreError> {
        // Compare-and-swap; a last-use write in between makes it read and check again.
        for _ in 0..64 {
            let Some(current) = self.app_passwords.get(id).map_err(backend)? else {
                return Err(StoreError::NotFound(format!("no app password with id {id}")));
            };
            let mut rec: AppPasswordRecord = decode(id, &current)?;
            change(&mut rec)?;
            let value = encode(&rec)?;
            if self.app_passwords.compare_and_swap(id.as_bytes(), Some(current), Some(value)).map_err(backend)?.is_ok()
            {
                self.durable()?;
                return Ok(rec);
            }
        }
        Err(StoreError::Conflict(format!("app password {id} was changed at the same time; try again")))
    }

    fn record_app_password_use(&self, id: &str, used: &LastUse) -> Result<(), StoreError> {
        // Read-modify-write without flush; a concurrent revoke wins (the record is gone).
        let _ = self
            .app_passwords
            .fetch_and_update(id.as_bytes(), |old| {
                let old = old?;
                let mut rec: AppPasswordRecord = serde_json::from_slice(old).ok()?;
                rec.last_used = Some(used.clone());
                if let Some(protocol) = used.protocol {
                    rec.last_used_by.insert(protocol, used.clone());
                }
                serde_json::to_vec(&rec).ok()
            })
            .map_err(backend)?;
        Ok(())
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let seq = self.db.generate_id().map_err(backend)?;
        let prefix = index_key(&event.username, "");
        let mut key = prefix.clone();
        key.extend_from_slice(&seq.to_be_bytes());
        self.audit.insert(key, encode(event)?).map_err(backend)?;
        // Keep the newest MAX_AUDIT_PER_ACCOUNT events of each account; checked every
        // 64th event so the cost stays small.
        if seq % 64 == 0 {
            let keys: Vec<sled::IVec> =
                self.audit.scan_prefix(&prefix).keys().collect::<Result<_, _>>().map_err(backend)?;
            let excess = keys.len().saturating_sub(MAX_AUDIT_PER_ACCOUNT);
            for k in keys.into_iter().take(excess) {
                self.audit.remove(k).map_err(backend)?;
            }
        }
        Ok(())
    }

    fn recent_audit(&self, username: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let mut out = Vec::new();
        for kv in self.audit.scan_prefix(index_key(username, "")).rev() {
            let (_, v) = kv.map_err(backend)?;
            out.push(decode("audit", &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.durable()
    }

    fn export(&self) -> Result<Dump, StoreError> {
        let app_passwords = self
            .app_passwords
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect::<Result<Vec<AppPasswordRecord>, _>>()?;
        let audit = self
            .audit
            .iter()
            .map(|kv| {
                let (_, v) = kv.map_err(backend)?;
                decode("audit", &v)
            })
            .collect::<Result<Vec<AuditEvent>, _>>()?;
        Ok(Dump { schema_version: SCHEMA_VERSION, accounts: self.list_accounts()?, app_passwords, audit })
    }

    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        if dump.schema_version != SCHEMA_VERSION {
            return Err(StoreError::Schema { found: dump.schema_version });
        }
        if !self.accounts.is_empty() {
            return Err(StoreError::Conflict("the store is not empty; import only into a new data directory".into()));
        }
        for a in &dump.accounts {
            self.accounts.insert(a.username.as_bytes(), encode(a)?).map_err(backend)?;
        }
        for r in &dump.app_passwords {
            self.app_passwords.insert(r.id.as_bytes(), encode(r)?).map_err(backend)?;
            self.index.insert(index_key(&r.username, &r.id), &[][..]).map_err(backend)?;
        }
        for e in &dump.audit {
            self.append_audit(e)?;
        }
        self.durable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self as suite, account};
    use std::sync::Arc;

    fn open() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn accounts_and_app_passwords() {
        suite::accounts_and_app_passwords(&open().1);
    }

    #[test]
    fn app_password_cap() {
        suite::app_password_cap(&open().1);
    }

    #[test]
    fn audit_is_kept_per_account() {
        let (_d, s) = open();
        suite::audit_is_kept_per_account(&s);
        let kept = s.audit.scan_prefix(index_key("a@x", "")).count();
        assert!((MAX_AUDIT_PER_ACCOUNT..MAX_AUDIT_PER_ACCOUNT + 64).contains(&kept), "{kept}");
    }

    #[test]
    fn app_password_update_is_check_and_set() {
        let (_d, s) = open();
        suite::app_password_update_is_check_and_set(Arc::new(s), &[]);
    }

    #[test]
    fn update_is_check_and_set() {
        let (_d, s) = open();
        suite::update_is_check_and_set(Arc::new(s), &[]);
    }

    #[test]
    fn budgets_are_never_overdrawn() {
        let (_d, s) = open();
        suite::budgets_are_never_overdrawn(Arc::new(s), &[]);
    }

    #[test]
    fn concurrent_creation_keeps_the_cap() {
        let (_d, s) = open();
        suite::concurrent_creation_keeps_the_cap(Arc::new(s), &[]);
    }

    #[test]
    fn the_notice_queue() {
        suite::the_notice_queue(&open().1);
    }

    #[test]
    fn notices_are_claimed_once() {
        let (_d, s) = open();
        suite::notices_are_claimed_once(Arc::new(s), &[]);
    }

    #[test]
    fn export_import_round_trips() {
        let (_d, s) = open();
        let (_d2, t) = open();
        suite::export_import_round_trips(&s, &t);
    }

    #[test]
    fn reopen_keeps_data_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            s.create_account(&account("a@x")).unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert!(s.get_account("a@x").unwrap().is_some());
        s.db.open_tree("meta").unwrap().insert("schema_version", &7u32.to_be_bytes()).unwrap();
        drop(s);
        assert!(matches!(SledStore::open(dir.path()), Err(StoreError::Schema { found: 7 })));
    }
}
