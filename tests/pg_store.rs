//! The PostgreSQL store (issue 8): the store suite that sled passes, against a real
//! PostgreSQL 15 the tests start on loopback; two stores on one database standing for
//! two nodes; concurrent migrations; a database outage; cross-node session events.

use crate::support::postgres::Postgres;
use mailgate::store::conformance as suite;
use mailgate::store::pg_store::PgStore;
use mailgate::store::{SessionEvent, Store, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static DBS: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty database in `pg` owned by mailgate; its URL.
fn fresh_db(pg: &Postgres) -> String {
    let name = format!("t{}_{}", std::process::id(), DBS.fetch_add(1, Ordering::SeqCst));
    pg.psql(&format!("CREATE DATABASE {name} OWNER mailgate"));
    let url = pg.url();
    let (base, _db) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn open(url: &str) -> Arc<dyn Store> {
    Arc::new(PgStore::open(url, None).unwrap_or_else(|e| panic!("open {e}")))
}

#[test]
fn the_store_suite_passes_on_postgres() {
    let pg = Postgres::start();
    suite::accounts_and_app_passwords(open(&fresh_db(&pg)).as_ref());
    suite::app_password_cap(open(&fresh_db(&pg)).as_ref());
    suite::audit_is_kept_per_account(open(&fresh_db(&pg)).as_ref());
    suite::export_import_round_trips(open(&fresh_db(&pg)).as_ref(), open(&fresh_db(&pg)).as_ref());
    // Two nodes on one database: compare-and-set and the cap hold across them.
    let url = fresh_db(&pg);
    suite::update_is_check_and_set(open(&url), &[open(&url), open(&url)]);
    let url = fresh_db(&pg);
    suite::concurrent_creation_keeps_the_cap(open(&url), &[open(&url)]);
}

#[test]
fn nodes_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let url = fresh_db(&pg);
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::open(&url, None).map(|_| ()).map_err(|e| e.to_string()))
        })
        .collect();
    for n in nodes {
        n.join().unwrap().unwrap();
    }
    let db = url.rsplit('/').next().unwrap().to_string();
    let versions = pg.psql_db(&db, "SELECT count(*) FROM mailgate_schema");
    assert_eq!(versions.trim(), "1", "migrations applied {versions} times");
    pg.psql_db(&db, "INSERT INTO mailgate_schema VALUES (99)");
    match PgStore::open(&url, None) {
        Err(StoreError::Schema { found: 99 }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[test]
fn an_unreachable_database_is_a_clear_error_and_an_outage_refuses_then_recovers() {
    // Start-up: nothing listens.
    let started = Instant::now();
    let e = PgStore::open("postgres://mailgate:pw@127.0.0.1:1/mailgate", None).err().map(|e| e.to_string());
    let e = e.expect("opened a database that does not exist");
    assert!(e.contains("database unavailable"), "{e}");
    assert!(!e.contains("pw@"), "the URL's password leaked: {e}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // Running: the database goes away and comes back.
    let mut pg = Postgres::start();
    let store = open(&fresh_db(&pg));
    store.create_account(&suite::account("a@x")).unwrap();
    pg.stop();
    let started = Instant::now();
    assert!(matches!(store.get_account("a@x"), Err(StoreError::Backend(_))), "no error while the database is down");
    assert!(started.elapsed() < Duration::from_secs(12), "took {:?}", started.elapsed());
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.get_account("a@x") {
            Ok(Some(a)) => {
                assert_eq!(a.username, "a@x");
                break;
            }
            other => assert!(Instant::now() < deadline, "not back after the restart: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn session_events_reach_the_other_nodes() {
    let pg = Postgres::start();
    let url = fresh_db(&pg);
    let a = open(&url);
    let b = open(&url);
    let mut events = a.subscribe().expect("postgres stores share session events");
    b.create_account(&suite::account("a@x")).unwrap();
    b.create_app_password(&suite::app("id1", "a@x", "Phone")).unwrap();
    // LISTEN is set up in the background: allow it a moment.
    std::thread::sleep(Duration::from_millis(500));
    b.revoke_app_password("a@x", "id1").unwrap();
    b.publish(&SessionEvent::EndAccountPassword { username: "a@x".into() });
    b.remove_account("a@x").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got = rt.block_on(async {
        let mut got = Vec::new();
        while got.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Ok(ev)) => got.push(ev),
                _ => break,
            }
        }
        got
    });
    // The revocation and the removal are sent by the store in their transactions; the
    // published event is sent on its own, so the order may differ.
    let mut got: Vec<String> = got.iter().map(|e| format!("{e:?}")).collect();
    got.sort();
    let mut want: Vec<String> = [
        SessionEvent::End { username: "a@x".into(), app_password_id: Some("id1".into()) },
        SessionEvent::EndAccountPassword { username: "a@x".into() },
        SessionEvent::End { username: "a@x".into(), app_password_id: None },
    ]
    .iter()
    .map(|e| format!("{e:?}"))
    .collect();
    want.sort();
    assert_eq!(got, want);
}
