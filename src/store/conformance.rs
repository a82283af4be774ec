//! The store test suite: the same checks for every [`Store`] backend, so sled and
//! PostgreSQL keep the same semantics. Run on sled by the unit tests and on a real
//! PostgreSQL by the integration tests (`tests/pg_store.rs`). Each check takes an empty
//! store (or stores sharing one database, for the concurrency checks) and panics on a
//! difference. It lives in the library so that both test kinds can use it, but only in
//! test builds: under `cfg(test)` for the unit tests, and with the `test-support` feature
//! for the integration tests (`scripts/test.sh` passes `--features test-support`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use std::sync::Arc;

/// An account record with nothing set.
pub fn account(name: &str) -> Account {
    Account::new(name, 1)
}

/// An app password record (the hash is not a real one: stores do not look at it).
pub fn app(id: &str, user: &str, label: &str) -> AppPasswordRecord {
    AppPasswordRecord {
        id: id.into(),
        username: user.into(),
        label: label.into(),
        scopes: vec![Scope::Imap],
        hash: "h".into(),
        created_at: 5,
        created_by: "admin".into(),
        last_used: None,
        last_used_by: Default::default(),
        oauth: None,
        expires_at: None,
        allow: vec![],
        narrow: None,
    }
}

/// Accounts and app passwords: conflicts, not-found, last use, revocation, removal.
pub fn accounts_and_app_passwords(s: &dyn Store) {
    s.create_account(&account("a@x")).unwrap();
    assert!(matches!(s.create_account(&account("a@x")), Err(StoreError::Conflict(_))));
    assert!(matches!(s.update_account("nobody@x", &mut |_| Ok(())), Err(StoreError::NotFound(_))));
    s.create_accounts(&[account("c@x"), account("d@x")]).unwrap();
    match s.create_accounts(&[account("e@x"), account("c@x")]) {
        Err(StoreError::Conflict(m)) => assert!(m.contains("c@x"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(s.get_account("e@x").unwrap().is_none(), "all or none");
    let names: Vec<String> = s.list_accounts().unwrap().into_iter().map(|a| a.username).collect();
    assert_eq!(names, ["a@x", "c@x", "d@x"]);
    s.create_app_password(&app("id1", "a@x", "Phone")).unwrap();
    assert!(matches!(s.create_app_password(&app("id2", "a@x", "phone")), Err(StoreError::Conflict(_))));
    assert!(matches!(s.create_app_password(&app("id3", "b@x", "L")), Err(StoreError::NotFound(_))));
    assert!(matches!(s.create_app_password(&app("id1", "c@x", "Other")), Err(StoreError::Conflict(_))));
    assert_eq!(s.list_app_passwords("a@x").unwrap().len(), 1);
    s.record_app_password_use("id1", &LastUse { at: 9, ip: "1.2.3.4".into(), client: None, protocol: None }).unwrap();
    assert_eq!(s.get_app_password("id1").unwrap().unwrap().last_used.unwrap().at, 9);
    assert_eq!(s.list_app_passwords("a@x").unwrap()[0].last_used.as_ref().unwrap().ip, "1.2.3.4");
    // Each protocol keeps its own last use; the newest of all is `last_used`.
    let over = |at, p| LastUse { at, ip: "1.2.3.4".into(), client: None, protocol: Some(p) };
    s.record_app_password_use("id1", &over(11, Scope::Imap)).unwrap();
    s.record_app_password_use("id1", &over(12, Scope::Pop3)).unwrap();
    s.record_app_password_use("id1", &over(13, Scope::Imap)).unwrap();
    let rec = s.get_app_password("id1").unwrap().unwrap();
    assert_eq!(rec.last_used.as_ref().map(|u| u.at), Some(13));
    let by: Vec<(Scope, u64)> = rec.last_used_by.iter().map(|(p, u)| (*p, u.at)).collect();
    assert_eq!(by, [(Scope::Imap, 13), (Scope::Pop3, 12)]);
    assert_eq!(s.list_app_passwords("a@x").unwrap()[0].last_used_by.len(), 2);
    assert!(matches!(s.revoke_app_password("b@x", "id1"), Err(StoreError::NotFound(_))));
    assert_eq!(s.revoke_app_password("a@x", "id1").unwrap().label, "Phone");
    assert!(s.get_app_password("id1").unwrap().is_none());
    assert!(matches!(s.revoke_app_password("a@x", "id1"), Err(StoreError::NotFound(_))));
    s.record_app_password_use("id1", &LastUse { at: 10, ip: "x".into(), client: None, protocol: None }).unwrap();
    assert!(s.get_app_password("id1").unwrap().is_none(), "a use does not bring a revoked record back");
    s.create_app_password(&app("id4", "a@x", "Laptop")).unwrap();
    s.remove_account("a@x").unwrap();
    assert!(matches!(s.remove_account("a@x"), Err(StoreError::NotFound(_))));
    assert!(s.get_app_password("id4").unwrap().is_none());
    assert!(s.list_app_passwords("a@x").unwrap().is_empty());
}

/// A notice for `user` made at `at`, due then.
pub fn notice(id: &str, user: &str, at: u64) -> Notice {
    Notice {
        id: id.into(),
        username: user.into(),
        kind: "app_password_created".into(),
        facts: vec![("label".into(), "Phone".into())],
        created_at: at,
        due_at: at,
        attempts: 0,
    }
}

/// The notice queue: enqueue (no duplicate ids), claim what is due (oldest first, up to
/// the limit) with a lease that hides it from later claims until it runs out, reschedule
/// with a count of attempts, delete.
pub fn the_notice_queue(s: &dyn Store) {
    s.enqueue_notice(&notice("n1", "a@x", 100)).unwrap();
    s.enqueue_notice(&notice("n2", "a@x", 90)).unwrap();
    s.enqueue_notice(&notice("n3", "b@x", 500)).unwrap();
    assert!(matches!(s.enqueue_notice(&notice("n1", "a@x", 1)), Err(StoreError::Conflict(_))));
    assert!(s.claim_notices(80, 60, 10).unwrap().is_empty(), "nothing due yet");
    let got = s.claim_notices(200, 60, 1).unwrap();
    assert_eq!(got.len(), 1, "the limit holds");
    assert_eq!((got[0].id.as_str(), got[0].due_at), ("n2", 260), "oldest due first, leased");
    assert_eq!(got[0].facts, notice("n2", "a@x", 90).facts, "the facts come back as written");
    let got = s.claim_notices(200, 60, 10).unwrap();
    assert_eq!(got.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["n1"], "n2 is leased, n3 not due");
    assert!(s.claim_notices(259, 60, 10).unwrap().is_empty(), "both leased");
    // A failed send: back in 60 s, one attempt counted.
    s.reschedule_notice("n2", 320, 1).unwrap();
    s.delete_notice("n1").unwrap();
    s.delete_notice("n1").unwrap();
    s.reschedule_notice("gone", 1, 1).unwrap();
    assert!(s.claim_notices(300, 60, 10).unwrap().is_empty());
    let got = s.claim_notices(600, 60, 10).unwrap();
    let ids: Vec<(&str, u32)> = got.iter().map(|n| (n.id.as_str(), n.attempts)).collect();
    assert_eq!(ids, [("n2", 1), ("n3", 0)]);
    s.delete_notice("n2").unwrap();
    s.delete_notice("n3").unwrap();
    assert!(s.claim_notices(u64::MAX >> 2, 60, 10).unwrap().is_empty(), "nothing left");
}

/// Many threads (or nodes, with `others`) claiming at once: each notice is claimed by
/// exactly one of them.
pub fn notices_are_claimed_once(s: Arc<dyn Store>, others: &[Arc<dyn Store>]) {
    for n in 0..60 {
        s.enqueue_notice(&notice(&format!("n{n:02}"), "a@x", 10)).unwrap();
    }
    let stores: Vec<Arc<dyn Store>> = std::iter::once(s.clone()).chain(others.iter().cloned()).collect();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for _ in 0..20 {
                    mine.extend(store.claim_notices(100, 300, 4).unwrap().into_iter().map(|n| n.id));
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(all.len(), 60, "every notice claimed");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 60, "none twice");
}

/// At most [`MAX_APP_PASSWORDS`] per account.
pub fn app_password_cap(s: &dyn Store) {
    s.create_account(&account("a@x")).unwrap();
    for n in 0..MAX_APP_PASSWORDS {
        s.create_app_password(&app(&format!("id{n}"), "a@x", &format!("l{n}"))).unwrap();
    }
    assert!(matches!(s.create_app_password(&app("idz", "a@x", "z")), Err(StoreError::Limit(_))));
}

/// The newest [`MAX_AUDIT_PER_ACCOUNT`] events per account are kept, newest first.
pub fn audit_is_kept_per_account(s: &dyn Store) {
    for n in 0..(MAX_AUDIT_PER_ACCOUNT + 200) {
        let ev = AuditEvent { at: n as u64, username: "a@x".into(), kind: "login".into(), detail: String::new() };
        s.append_audit(&ev).unwrap();
    }
    let ev = AuditEvent { at: 0, username: "b@x".into(), kind: "login".into(), detail: String::new() };
    s.append_audit(&ev).unwrap();
    let kept = s.recent_audit("a@x", usize::MAX >> 1).unwrap().len();
    assert!((MAX_AUDIT_PER_ACCOUNT..MAX_AUDIT_PER_ACCOUNT + 64).contains(&kept), "{kept}");
    assert_eq!(s.recent_audit("a@x", 1).unwrap()[0].at, (MAX_AUDIT_PER_ACCOUNT + 199) as u64);
    assert_eq!(s.recent_audit("b@x", 5).unwrap().len(), 1);
}

/// `update_account` is a check-and-set: many threads (or nodes, with `others`) taking
/// the same TOTP step at once, exactly one wins; increments are not lost.
pub fn update_is_check_and_set(s: Arc<dyn Store>, others: &[Arc<dyn Store>]) {
    let mut a = account("t@x");
    a.totp = Some(TotpState { secret_enc: "sealed".into(), enabled_at: 1, last_step: 100 });
    s.create_account(&a).unwrap();
    let stores: Vec<Arc<dyn Store>> = std::iter::once(s.clone()).chain(others.iter().cloned()).collect();
    let mut threads = Vec::new();
    for i in 0..8 {
        let store = stores[i % stores.len()].clone();
        threads.push(std::thread::spawn(move || {
            // Every thread presents the code of step 101.
            let accepted = store.update_account("t@x", &mut |acc| {
                let totp = acc.totp.as_mut().unwrap();
                if totp.last_step >= 101 {
                    return Err(StoreError::Conflict("code used".into()));
                }
                totp.last_step = 101;
                Ok(())
            });
            // And counts a failure.
            for _ in 0..5 {
                store
                    .update_account("t@x", &mut |acc| {
                        acc.addresses.push(String::new());
                        Ok(())
                    })
                    .unwrap();
            }
            accepted.is_ok()
        }));
    }
    let winners = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(winners, 1, "one TOTP code accepted {winners} times");
    let a = s.get_account("t@x").unwrap().unwrap();
    assert_eq!(a.totp.unwrap().last_step, 101);
    assert_eq!(a.addresses.len(), 40, "lost updates");
    assert!(matches!(s.update_account("nobody@x", &mut |_| Ok(())), Err(StoreError::NotFound(_))));
    // A refused change writes nothing.
    let before = s.get_account("t@x").unwrap().unwrap().addresses.len();
    let r = s.update_account("t@x", &mut |acc| {
        acc.addresses.clear();
        Err(StoreError::Conflict("no".into()))
    });
    assert!(r.is_err());
    assert_eq!(s.get_account("t@x").unwrap().unwrap().addresses.len(), before);
}

/// An app password's compare-and-set (an OAuth refresh-token rotation): of many
/// rotations of one generation at once (threads or nodes), one wins; last-use writes in
/// between are neither lost nor make the change fail; a refused change writes nothing.
pub fn app_password_update_is_check_and_set(s: Arc<dyn Store>, others: &[Arc<dyn Store>]) {
    s.create_account(&account("g@x")).unwrap();
    let mut rec = app("grant1", "g@x", "Thunderbird (grant1)");
    rec.oauth = Some(OAuthGrant {
        client_id: "thunderbird".into(),
        client_name: "Thunderbird".into(),
        refresh_generation: 0,
        refresh_hash: "h0".into(),
        retired: vec![],
        refreshed_at: 1,
        user_agent: None,
    });
    s.create_app_password(&rec).unwrap();
    let stores: Vec<Arc<dyn Store>> = std::iter::once(s.clone()).chain(others.iter().cloned()).collect();
    let mut threads = Vec::new();
    for i in 0..8 {
        let store = stores[i % stores.len()].clone();
        threads.push(std::thread::spawn(move || {
            let used = LastUse { at: 50 + i as u64, ip: "1.2.3.4".into(), client: None, protocol: Some(Scope::Imap) };
            store.record_app_password_use("grant1", &used).unwrap();
            store
                .update_app_password("grant1", &mut |r| {
                    let g = r.oauth.as_mut().unwrap();
                    if g.refresh_generation != 0 {
                        return Err(StoreError::Conflict("rotated already".into()));
                    }
                    g.refresh_generation = 1;
                    g.refresh_hash = format!("h1-{i}");
                    Ok(())
                })
                .is_ok()
        }));
    }
    let winners = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(winners, 1, "one refresh token rotated {winners} times");
    let got = s.get_app_password("grant1").unwrap().unwrap();
    assert_eq!(got.oauth.as_ref().unwrap().refresh_generation, 1);
    assert!(got.last_used.is_some(), "last use kept");
    let r = s.update_app_password("grant1", &mut |r| {
        r.label = "changed".into();
        Err(StoreError::Conflict("no".into()))
    });
    assert!(r.is_err());
    assert_eq!(s.get_app_password("grant1").unwrap().unwrap().label, "Thunderbird (grant1)");
    assert!(matches!(s.update_app_password("nothing", &mut |_| Ok(())), Err(StoreError::NotFound(_))));
}

/// Creating app passwords at once from many threads (or nodes): never past the cap,
/// never two with one label.
pub fn concurrent_creation_keeps_the_cap(s: Arc<dyn Store>, others: &[Arc<dyn Store>]) {
    s.create_account(&account("c@x")).unwrap();
    let stores: Vec<Arc<dyn Store>> = std::iter::once(s.clone()).chain(others.iter().cloned()).collect();
    let threads: Vec<_> = (0..(MAX_APP_PASSWORDS + 20))
        .map(|n| {
            let store = stores[n % stores.len()].clone();
            // Labels repeat: 10 threads per label for the last 20.
            let label = if n < MAX_APP_PASSWORDS - 2 { format!("l{n}") } else { format!("dup{}", n % 2) };
            std::thread::spawn(move || store.create_app_password(&app(&format!("id{n}"), "c@x", &label)).is_ok())
        })
        .collect();
    let made = threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count();
    let list = s.list_app_passwords("c@x").unwrap();
    assert_eq!(list.len(), made);
    assert!(made <= MAX_APP_PASSWORDS);
    let mut labels: Vec<String> = list.iter().map(|r| r.label.to_lowercase()).collect();
    labels.sort();
    let n = labels.len();
    labels.dedup();
    assert_eq!(labels.len(), n, "two app passwords with one label");
}

/// Export from one store, import into an empty one: everything comes across; not into a
/// store that has accounts; not from another schema version.
pub fn export_import_round_trips(s: &dyn Store, empty: &dyn Store) {
    let mut a = account("a@x");
    a.totp = Some(TotpState { secret_enc: "sealed".into(), enabled_at: 3, last_step: 77 });
    a.backup_codes = Some(BackupCodes { generated_at: 4, hashes: vec!["h1".into(), String::new()] });
    s.create_account(&a).unwrap();
    s.create_app_password(&app("id1", "a@x", "Phone")).unwrap();
    let used = LastUse { at: 9, ip: "1.2.3.4".into(), client: Some("TB".into()), protocol: Some(Scope::Sieve) };
    s.record_app_password_use("id1", &used).unwrap();
    s.append_audit(&AuditEvent { at: 5, username: "a@x".into(), kind: "login".into(), detail: String::new() }).unwrap();
    let dump = s.export().unwrap();
    let mut other = dump.clone();
    other.schema_version = 9;
    assert!(matches!(empty.import(&other), Err(StoreError::Schema { found: 9 })));
    empty.import(&dump).unwrap();
    let got = empty.get_account("a@x").unwrap().unwrap();
    assert_eq!(got.totp.unwrap().last_step, 77);
    assert_eq!(got.backup_codes.unwrap().remaining(), 1);
    let apps = empty.list_app_passwords("a@x").unwrap();
    assert_eq!(apps[0].label, "Phone");
    assert_eq!(apps[0].last_used.as_ref().unwrap().client.as_deref(), Some("TB"));
    assert_eq!(apps[0].last_used_by.get(&Scope::Sieve), Some(&used), "the per-protocol last use comes across");
    assert_eq!(empty.recent_audit("a@x", 5).unwrap().len(), 1);
    assert!(matches!(empty.import(&dump), Err(StoreError::Conflict(_))), "not into a non-empty store");
    assert!(matches!(empty.create_app_password(&app("id2", "a@x", "phone")), Err(StoreError::Conflict(_))));
}

/// Web sessions behave the same in memory on one node and in a shared store: `a` and `b`
/// are two nodes (the same value for one node). A change on one is seen on the other; a
/// new id ends the old one; signing out everywhere keeps the current session; sessions
/// expire; concurrent changes to one session are not lost.
pub fn web_sessions(a: &crate::web::WebSessions, b: &crate::web::WebSessions) {
    use crate::web::session::{IDLE_SECS, SECOND_FACTOR_SECS, Stage};
    let t = 1_000_000;
    let id = a.create(t, VISITOR).unwrap();
    let csrf = a.with(&id, t, |s| s.csrf.clone()).unwrap();
    assert_eq!(b.with(&id, t, |s| s.csrf.clone()), Some(csrf));
    assert!(b.with("no-such-session", t, |_| ()).is_none());
    b.with(&id, t + 1, |s| {
        s.stage = Stage::SecondFactor { username: "a@x".into(), since: t + 1 };
        s.pending_totp = Some(("JBSWY3DPEHPK3PXP".to_string().into(), t + 1));
        s.notice = Some("hello".into());
    })
    .unwrap();
    let new = a.rotate(&id).unwrap();
    assert!(b.with(&id, t + 2, |_| ()).is_none(), "the old id still works");
    let (stage, pending, notice) = b
        .with(&new, t + 2, |s| {
            (s.stage.clone(), s.pending_totp.as_ref().map(|(p, _)| p.expose().clone()), s.notice.take())
        })
        .unwrap();
    assert_eq!(stage, Stage::SecondFactor { username: "a@x".into(), since: t + 1 });
    assert_eq!(pending.as_deref(), Some("JBSWY3DPEHPK3PXP"));
    assert_eq!(notice.as_deref(), Some("hello"));
    assert_eq!(a.with(&new, t + 2, |s| s.notice.clone()), Some(None), "a taken notice came back");
    // A pending second factor ends after SECOND_FACTOR_SECS.
    assert!(a.with(&new, t + 2 + SECOND_FACTOR_SECS, |_| ()).is_none());
    assert!(b.with(&new, t + 3, |_| ()).is_none(), "an expired session came back");

    // Signed in twice; "sign out everywhere else" from one keeps it and ends the other.
    let signed = |n: &crate::web::WebSessions| {
        let id = n.create(t, VISITOR).unwrap();
        n.with(&id, t, |s| s.stage = Stage::SignedIn { username: "a@x".into(), auth_at: t }).unwrap();
        id
    };
    let (one, two, other) = (signed(a), signed(b), a.create(t, VISITOR).unwrap());
    a.with(&other, t, |s| s.stage = Stage::SignedIn { username: "b@x".into(), auth_at: t }).unwrap();
    b.end_all_of("a@x", Some(&two));
    assert!(a.with(&one, t + 1, |_| ()).is_none(), "the other session of a@x lives on");
    assert!(a.with(&two, t + 1, |_| ()).is_some());
    assert!(b.with(&other, t + 1, |_| ()).is_some(), "b@x was signed out");
    // Idle timeout (a shared store records a request that changes nothing to within
    // half a minute), then sign-out.
    assert!(a.with(&two, t + IDLE_SECS - 60, |_| ()).is_some(), "idle for less than the limit");
    assert!(b.with(&two, t + 2 * IDLE_SECS, |_| ()).is_none(), "idle past the limit");
    b.remove(&other);
    assert!(a.with(&other, t + 2, |_| ()).is_none());

    // Requests of one browser changing its session at once, on both nodes: no change lost.
    let id = a.create(t, VISITOR).unwrap();
    std::thread::scope(|scope| {
        for n in [a, b, a, b] {
            let id = &id;
            scope.spawn(move || {
                for _ in 0..10 {
                    n.with(id, t, |s| s.wrong_codes += 1).unwrap();
                }
            });
        }
    });
    assert_eq!(a.with(&id, t, |s| s.wrong_codes), Some(40), "lost changes");
}

/// Guess budgets: many threads (or nodes, with `others`) taking from the same budgets at
/// once never take more than the burst, a take is all or none over its budgets, given-back
/// and refilled slots can be taken again, and familiar addresses are remembered.
pub fn budgets_are_never_overdrawn(s: Arc<dyn Store>, others: &[Arc<dyn Store>]) {
    let shared = Budget { key: "pw-user:a@x".into(), burst: 7, refill_secs: 100 };
    let stores: Vec<Arc<dyn Store>> = std::iter::once(s.clone()).chain(others.iter().cloned()).collect();
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                let own = Budget { key: format!("pw-ip:192.0.2.{i}"), burst: 3, refill_secs: 100 };
                (0..3).filter(|_| store.take_attempt(&[own.clone(), shared.clone()], 1000).unwrap().is_none()).count()
            })
        })
        .collect();
    let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(taken, 7, "the shared budget was overdrawn or under-used");
    // All or none: the shared budget is empty, so an address with room takes nothing.
    let fresh = Budget { key: "pw-ip:203.0.113.1".into(), burst: 1, refill_secs: 100 };
    assert_eq!(s.take_attempt(&[fresh.clone(), shared.clone()], 1000).unwrap(), Some(1));
    assert_eq!(s.take_attempt(std::slice::from_ref(&fresh), 1000).unwrap(), None, "nothing was taken before");
    // One slot back after a refill period, one given back.
    assert_eq!(s.take_attempt(std::slice::from_ref(&shared), 1099).unwrap(), Some(0));
    assert_eq!(s.take_attempt(std::slice::from_ref(&shared), 1100).unwrap(), None);
    assert_eq!(s.take_attempt(std::slice::from_ref(&shared), 1100).unwrap(), Some(0));
    s.give_back_attempt(std::slice::from_ref(&shared), 1100).unwrap();
    assert_eq!(s.take_attempt(std::slice::from_ref(&shared), 1100).unwrap(), None);
    s.clear_attempts(std::slice::from_ref(&shared.key)).unwrap();
    for _ in 0..7 {
        assert_eq!(s.take_attempt(std::slice::from_ref(&shared), 1100).unwrap(), None);
    }
    assert!(s.familiar_since("a@x 192.0.2.1").unwrap().is_none());
    s.remember_familiar("a@x 192.0.2.1", 500).unwrap();
    for o in &stores {
        assert_eq!(o.familiar_since("a@x 192.0.2.1").unwrap(), Some(500));
    }
}

/// The address of the web sessions of [`web_sessions`].
const VISITOR: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));

/// Anonymous web sessions are capped per client, in memory and in a shared store alike
/// (issue 13 item 9): a flood of sign-in page visits from the addresses of one IPv6 /64,
/// spread over both nodes `a` and `b`, keeps only the flood's newest
/// [`MAX_ANONYMOUS_PER_CLIENT`](crate::web::session::MAX_ANONYMOUS_PER_CLIENT) sessions,
/// and leaves alone both a visitor from another address (the least recently seen session
/// of all) and a signed-in session of the flooding client.
pub fn anonymous_web_sessions_are_capped_per_client(a: &crate::web::WebSessions, b: &crate::web::WebSessions) {
    use crate::web::session::{MAX_ANONYMOUS_PER_CLIENT, Stage};
    let flooder = |n: usize| std::net::IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, (n >> 16) as u16, n as u16]);
    let t = 2_000_000;
    let visitor = a.create(t, VISITOR).unwrap();
    let signed = b.create(t, flooder(0)).unwrap();
    b.with(&signed, t, |s| s.stage = Stage::SignedIn { username: "a@x".into(), auth_at: t }).unwrap();
    let flood: Vec<String> = (0..MAX_ANONYMOUS_PER_CLIENT + 40)
        .map(|n| {
            let node = if n % 2 == 0 { a } else { b };
            node.create(t + 1 + n as u64, flooder(n)).unwrap()
        })
        .collect();
    let now = t + 1 + flood.len() as u64;
    assert_eq!(b.with(&visitor, now, |s| s.stage.clone()), Some(Stage::Anonymous), "another client's visitor went");
    assert!(a.with(&signed, now, |_| ()).is_some(), "a signed-in session went");
    let live: Vec<bool> = flood.iter().map(|id| a.with(id, now, |_| ()).is_some()).collect();
    let (dropped, kept) = live.split_at(flood.len() - MAX_ANONYMOUS_PER_CLIENT);
    assert!(kept.iter().all(|l| *l), "the flood's newest sessions were not all kept: {live:?}");
    assert!(dropped.iter().all(|l| !*l), "the flood kept more than its cap: {live:?}");
}
