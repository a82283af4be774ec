//! The shared store on PostgreSQL, for several mailgate nodes (`[store] backend = "postgres"`).
//!
//! Tables (schema managed by mailgate, see [`MIGRATIONS`]):
//! * `mailgate_schema(version)`: the migrations applied.
//! * `accounts(username PK, data, version)`: JSON [`Account`]; `version` counts changes,
//!   so a read-check-write ([`Store::update_account`]: a TOTP step, a backup code, a
//!   failure count) is one compare-and-set statement. Two nodes accepting the same TOTP
//!   code at once: one update wins, the other re-reads and finds the step used.
//! * `app_passwords(id PK, username → accounts ON DELETE CASCADE, label_key, data,
//!   last_used, last_used_by)`: JSON [`AppPasswordRecord`]; `UNIQUE(username, label_key)`.
//!   The last uses are columns of their own, so recording one is a single UPDATE that
//!   never rewrites the record (`last_used_by` is a JSON object: protocol → last use).
//! * `audit(seq, username, data)`.
//! * `web_sessions(key PK, sealed, username, anonymous, last_seen, expires_at, version,
//!   client_key)`: the web step's sessions, so any node serves any request
//!   ([`SharedWebSessions`]); `key` is a hash of the session id, `sealed` the state sealed
//!   with `secret.key`, `client_key` the client's address key (`inet`; an IPv6 prefix is
//!   stored as its first address) for the cap on anonymous sessions per client.
//! * `failure_counts(key PK, failures, last_at, last_tag)`: per-address and per-account
//!   failure counts for the login delays ([`SharedFailureCounts`]); `last_tag` is an HMAC
//!   under a key derived from `secret.key`, never a hash of the password alone.
//! * `attempts(key PK, used, at, until)`: budgets of guesses ([`Budget`]), taken in one
//!   transaction with the rows locked, so nodes taking at once never overdraw one.
//! * `familiar(key PK, at)`: addresses an account signed in from.
//! * `notices(id PK, username, due_at, attempts, data)`: the queue of security
//!   notifications ([`Notice`]); a claim takes due rows `FOR UPDATE SKIP LOCKED` and moves
//!   their `due_at` by the lease in the same statement, so two nodes never send one twice.
//!
//! Every change is committed before the call returns (PostgreSQL's commit is durable with
//! the default `synchronous_commit`). Session-ending events are sent with `NOTIFY` on the
//! channel `mailgate_sessions` so every node ends the affected live sessions.
//!
//! The [`Store`] trait is synchronous (it is called from the hashing threads and from
//! async code alike); the queries run on a small runtime of the store's own, and callers
//! wait on a channel, at most [`OP_TIMEOUT`]. An unreachable database is a
//! [`StoreError::Backend`] error, which refuses logins as "temporarily unavailable".

use super::*;
use std::future::Future;
use std::time::Duration;
use tokio_postgres::error::SqlState;

/// The longest one store operation may take (queueing for a connection included).
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per node.
const POOL_SIZE: usize = 16;
/// Compare-and-set rounds before an update gives up under contention.
const CAS_ROUNDS: usize = 50;
/// The NOTIFY channel for [`LiveEvent`]s.
const CHANNEL: &str = "mailgate_sessions";
/// Advisory lock key held while migrating (any constant shared by all nodes).
const MIGRATION_LOCK: i64 = 0x6d61_696c_6761_7465; // "mailgate"

/// Versioned migrations, applied in order, each once, in one transaction under an
/// advisory lock, so several nodes starting at once migrate exactly once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE accounts (
        username text PRIMARY KEY,
        data text NOT NULL,
        version bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE app_passwords (
        id text PRIMARY KEY,
        username text NOT NULL REFERENCES accounts(username) ON DELETE CASCADE,
        label_key text NOT NULL,
        data text NOT NULL,
        last_used text,
        UNIQUE (username, label_key)
    );
    CREATE TABLE audit (
        seq bigserial PRIMARY KEY,
        username text NOT NULL,
        data text NOT NULL
    );
    CREATE INDEX audit_by_user ON audit (username, seq);",
    ),
    (
        2,
        "CREATE TABLE web_sessions (
        key text PRIMARY KEY,
        sealed text NOT NULL,
        username text,
        anonymous boolean NOT NULL,
        last_seen bigint NOT NULL,
        expires_at bigint NOT NULL,
        version bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX web_sessions_by_user ON web_sessions (username);
    CREATE INDEX web_sessions_by_expiry ON web_sessions (expires_at);
    CREATE INDEX web_sessions_anonymous ON web_sessions (last_seen) WHERE anonymous;
    CREATE TABLE failure_counts (
        key text PRIMARY KEY,
        failures integer NOT NULL,
        last_at bigint NOT NULL,
        last_tag bytea NOT NULL
    );
    CREATE INDEX failure_counts_by_age ON failure_counts (last_at);",
    ),
    (
        3,
        "ALTER TABLE web_sessions ADD COLUMN client_key inet;
    CREATE INDEX web_sessions_anonymous_by_client ON web_sessions (client_key, last_seen) WHERE anonymous;",
    ),
    (
        4,
        "CREATE TABLE attempts (
        key text PRIMARY KEY,
        used integer NOT NULL,
        at bigint NOT NULL,
        until bigint NOT NULL
    );
    CREATE INDEX attempts_by_until ON attempts (until);
    CREATE TABLE familiar (
        key text PRIMARY KEY,
        at bigint NOT NULL
    );
    CREATE INDEX familiar_by_at ON familiar (at);",
    ),
    (5, "ALTER TABLE app_passwords ADD COLUMN last_used_by text NOT NULL DEFAULT '{}';"),
    (
        6,
        "CREATE TABLE notices (
        id text PRIMARY KEY,
        username text NOT NULL,
        due_at bigint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        data text NOT NULL
    );
    CREATE INDEX notices_by_due ON notices (due_at);",
    ),
];

/// Refilled budget entries (and familiar addresses too old to count) are purged on one
/// take in this many.
const PURGE_EVERY: u64 = 1024;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    // The database's own message, never the connection string.
    match e.as_db_error() {
        Some(db) => StoreError::Backend(format!("database: {}", db.message())),
        None => StoreError::Backend(format!("database unavailable: {}", unreachable(&e))),
    }
}

/// Why the database could not be reached, with the causes (a TLS failure says which
/// check failed) and, for TLS, what to change.
fn unreachable(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    if text.contains("TLS") {
        text.push_str(
            " (the database offered TLS and its certificate was checked: set [store] ca_file to the CA \
             that signed it, or sslmode=disable in the URL for a database reached without TLS)",
        );
    }
    text
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt(what.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(backend)
}

fn label_key(label: &str) -> String {
    label.to_ascii_lowercase()
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// PostgreSQL-backed [`Store`].
pub struct PgStore {
    pool: deadpool_postgres::Pool,
    runtime: Option<tokio::runtime::Runtime>,
    events: tokio::sync::broadcast::Sender<LiveEvent>,
    /// Budget takes, for the occasional purge.
    takes: std::sync::atomic::AtomicU64,
}

impl PgStore {
    /// Connects, checks the server is reachable and migrates the schema. `url` is a
    /// libpq-style URL (`postgres://user:password@host/db?sslmode=require`); TLS is used
    /// when its `sslmode` asks, with the system roots or `ca_file`.
    pub fn open(url: &str, ca_file: Option<&std::path::Path>) -> Result<PgStore, StoreError> {
        let (store, config, tls) = PgStore::connect(url, ca_file)?;
        store.run(migrate)?;
        store.listen(config, tls);
        Ok(store)
    }

    /// Connects without touching the schema and without listening for other nodes'
    /// events: for `mailgate check`, which must not migrate a database that other nodes
    /// of an older version still use. Read the versions with [`PgStore::schema_versions`].
    pub fn open_unmigrated(url: &str, ca_file: Option<&std::path::Path>) -> Result<PgStore, StoreError> {
        Ok(PgStore::connect(url, ca_file)?.0)
    }

    /// The database's schema version and the one this mailgate migrates to. The first is
    /// 0 when mailgate has never run on the database.
    pub fn schema_versions(&self) -> Result<(u32, u32), StoreError> {
        let current = self.run(|c| async move {
            // (Two statements: one naming a table that does not exist would not parse.)
            let exists = c.query_one("SELECT to_regclass('mailgate_schema') IS NOT NULL", &[]).await.map_err(pg)?;
            if !exists.get::<_, bool>(0) {
                return Ok(0);
            }
            let row = c.query_one("SELECT coalesce(max(version), 0) FROM mailgate_schema", &[]).await.map_err(pg)?;
            Ok(row.get::<_, i32>(0))
        })?;
        let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        Ok((u32::try_from(current).unwrap_or(0), u32::try_from(latest).unwrap_or(0)))
    }

    #[allow(clippy::type_complexity)]
    fn connect(
        url: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<(PgStore, tokio_postgres::Config, tokio_postgres_rustls::MakeRustlsConnect), StoreError> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Backend(format!("the database URL is not valid: {e}")))?;
        let tls_config = crate::tls::client_config(ca_file).map_err(backend)?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mailgate-db")
            .enable_all()
            .build()
            .map_err(backend)?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = deadpool_postgres::Pool::builder(manager).max_size(POOL_SIZE).build().map_err(backend)?;
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let store = PgStore { pool, runtime: Some(runtime), events, takes: Default::default() };
        Ok((store, config, tls))
    }

    /// Runs `f` with a connection from the pool on the store's runtime and waits for its
    /// result, at most [`OP_TIMEOUT`] (waiting for a connection included).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let Some(rt) = &self.runtime else { return Err(backend("store closed")) };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pool = self.pool.clone();
        rt.spawn(async move {
            let _ = tx.send(with_client(pool, f).await);
        });
        rx.recv_timeout(OP_TIMEOUT + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(backend("database unavailable: no answer in time")))
    }

    /// Runs `f` with a connection in the background, for a change nobody waits for; a
    /// failure is logged as `what`.
    fn run_in_background<F, Fut>(&self, what: &'static str, f: F)
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let Some(rt) = &self.runtime else { return };
        let pool = self.pool.clone();
        rt.spawn(async move {
            if let Err(e) = with_client(pool, f).await {
                tracing::warn!(error = %e, "{what}");
            }
        });
    }

    /// Keeps one connection LISTENing for other nodes' session events (reconnecting
    /// after a database outage) and hands them to [`Store::subscribe`]rs.
    fn listen(&self, config: tokio_postgres::Config, tls: tokio_postgres_rustls::MakeRustlsConnect) {
        let Some(rt) = &self.runtime else { return };
        let events = self.events.clone();
        rt.spawn(async move {
            loop {
                match config.connect(tls.clone()).await {
                    Ok((client, mut connection)) => {
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                        let driver = tokio::spawn(async move {
                            while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                                match msg {
                                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                        let _ = tx.send(n.payload().to_string());
                                    }
                                    Ok(_) => {}
                                    Err(_) => break,
                                }
                            }
                        });
                        if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                            while let Some(payload) = rx.recv().await {
                                if let Ok(ev) = serde_json::from_str::<LiveEvent>(&payload) {
                                    let _ = events.send(ev);
                                }
                            }
                        }
                        driver.abort();
                        tracing::warn!(
                            "lost the database connection that listens for other nodes' events; reconnecting"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for other nodes' events; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn client(pool: &deadpool_postgres::Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
            // Refused by the server (password, missing database, permissions): its words.
            Some(db) => StoreError::Backend(format!("database unavailable: {}", db.message())),
            None => StoreError::Backend(format!("database unavailable: {}", unreachable(&e))),
        },
        e => StoreError::Backend(format!("database unavailable: {e}")),
    })
}

/// A pooled connection.
type Client = deadpool_postgres::Object;

/// `f` with a connection from `pool`, at most [`OP_TIMEOUT`] (waiting for the connection
/// included).
async fn with_client<T, F, Fut>(pool: deadpool_postgres::Pool, f: F) -> Result<T, StoreError>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    match tokio::time::timeout(OP_TIMEOUT, async { f(client(&pool).await?).await }).await {
        Ok(r) => r,
        Err(_) => Err(backend("database unavailable: no answer in time")),
    }
}

async fn migrate(mut c: Client) -> Result<(), StoreError> {
    let tx = c.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS mailgate_schema (version integer NOT NULL)").await.map_err(pg)?;
    let row = tx.query_one("SELECT coalesce(max(version), 0) FROM mailgate_schema", &[]).await.map_err(pg)?;
    let current: i32 = row.get(0);
    let latest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > latest {
        return Err(StoreError::Schema { found: current as u32 });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute("INSERT INTO mailgate_schema (version) VALUES ($1)", &[version]).await.map_err(pg)?;
        tracing::info!(version, "database schema migrated");
    }
    tx.commit().await.map_err(pg)
}

/// Sends a session event to every node (delivered when the transaction commits).
async fn notify(c: &impl deadpool_postgres::GenericClient, ev: &LiveEvent) -> Result<(), StoreError> {
    let payload = encode(ev)?;
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await.map_err(pg)?;
    Ok(())
}

/// An app password from its row: `data`, `last_used`, `last_used_by`.
fn app_record(
    data: &str,
    last_used: Option<String>,
    last_used_by: &str,
    id: &str,
) -> Result<AppPasswordRecord, StoreError> {
    let mut rec: AppPasswordRecord = decode(id, data)?;
    rec.last_used = match last_used {
        Some(l) => Some(decode(id, &l)?),
        None => None,
    };
    rec.last_used_by = decode(id, last_used_by)?;
    Ok(rec)
}

impl Store for PgStore {
    fn get_account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let username = username.to_string();
        self.run(move |c| async move {
            let row = c.query_opt("SELECT data FROM accounts WHERE username = $1", &[&username]).await.map_err(pg)?;
            row.map(|r| decode(&username, r.get::<_, &str>(0))).transpose()
        })
    }

    fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        self.create_accounts(std::slice::from_ref(account)).map_err(|e| match e {
            StoreError::Conflict(_) => StoreError::Conflict(format!("account {} already exists", account.username)),
            e => e,
        })
    }

    fn create_accounts(&self, accounts: &[Account]) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> =
            accounts.iter().map(|a| Ok((a.username.clone(), encode(a)?))).collect::<Result<_, StoreError>>()?;
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
            let existing = tx
                .query("SELECT username FROM accounts WHERE username = ANY($1) ORDER BY username", &[&names])
                .await
                .map_err(pg)?;
            if !existing.is_empty() {
                let names: Vec<String> = existing.iter().map(|r| r.get(0)).collect();
                return Err(StoreError::Conflict(format!("these accounts exist already: {}", names.join(", "))));
            }
            for (name, data) in &rows {
                if let Err(e) = tx.execute("INSERT INTO accounts (username, data) VALUES ($1, $2)", &[name, data]).await
                {
                    return Err(if is_unique_violation(&e) {
                        StoreError::Conflict(format!("these accounts exist already: {name}"))
                    } else {
                        pg(e)
                    });
                }
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn update_account(
        &self,
        username: &str,
        change: &mut dyn FnMut(&mut Account) -> Result<(), StoreError>,
    ) -> Result<Account, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let name = username.to_string();
            let current = self.run(move |c| async move {
                let row = c
                    .query_opt("SELECT data, version FROM accounts WHERE username = $1", &[&name])
                    .await
                    .map_err(pg)?;
                Ok(row.map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))))
            })?;
            let Some((data, version)) = current else {
                return Err(StoreError::NotFound(format!("unknown user {username}")));
            };
            let mut account: Account = decode(username, &data)?;
            change(&mut account)?;
            let (name, data) = (username.to_string(), encode(&account)?);
            let swapped = self.run(move |c| async move {
                c.execute(
                    "UPDATE accounts SET data = $2, version = version + 1 WHERE username = $1 AND version = $3",
                    &[&name, &data, &version],
                )
                .await
                .map_err(pg)
            })?;
            if swapped == 1 {
                return Ok(account);
            }
            // Changed by someone else meanwhile (another node): read again and re-check.
        }
        Err(StoreError::Conflict(format!("{username} was changed at the same time; try again")))
    }

    fn remove_account(&self, username: &str) -> Result<(), StoreError> {
        let name = username.to_string();
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            let n = tx.execute("DELETE FROM accounts WHERE username = $1", &[&name]).await.map_err(pg)?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("unknown user {name}")));
            }
            notify(&tx, &LiveEvent::End { username: name.clone(), app_password_id: None }).await?;
            tx.commit().await.map_err(pg)
        })
    }

    fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.run(move |c| async move {
            let rows = c.query("SELECT username, data FROM accounts ORDER BY username", &[]).await.map_err(pg)?;
            rows.iter().map(|r| decode(r.get::<_, &str>(0), r.get::<_, &str>(1))).collect()
        })
    }

    fn create_app_password(&self, record: &AppPasswordRecord) -> Result<(), StoreError> {
        let mut stored = record.clone();
        stored.last_used = None;
        stored.last_used_by.clear();
        let (id, name, key, data) =
            (record.id.clone(), record.username.clone(), label_key(&record.label), encode(&stored)?);
        let label = record.label.clone();
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            // The account row is locked: creations for one account (on any node) queue,
            // so the count and label checks hold.
            let exists =
                tx.query_opt("SELECT 1 FROM accounts WHERE username = $1 FOR UPDATE", &[&name]).await.map_err(pg)?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("unknown user {name}")));
            }
            let row = tx
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE label_key = $2) FROM app_passwords WHERE username = $1",
                    &[&name, &key],
                )
                .await
                .map_err(pg)?;
            let (count, same_label): (i64, i64) = (row.get(0), row.get(1));
            if count as usize >= MAX_APP_PASSWORDS {
                return Err(StoreError::Limit(format!(
                    "{name} already has {MAX_APP_PASSWORDS} app passwords; revoke one first"
                )));
            }
            if same_label > 0 {
                return Err(StoreError::Conflict(format!("{name} already has an app password labelled \"{label}\"")));
            }
            if let Err(e) = tx
                .execute(
                    "INSERT INTO app_passwords (id, username, label_key, data) VALUES ($1, $2, $3, $4)",
                    &[&id, &name, &key, &data],
                )
                .await
            {
                return Err(if is_unique_violation(&e) { StoreError::Conflict("id collision".into()) } else { pg(e) });
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn get_app_password(&self, id: &str) -> Result<Option<AppPasswordRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |c| async move {
            let row = c
                .query_opt("SELECT data, last_used, last_used_by FROM app_passwords WHERE id = $1", &[&id])
                .await
                .map_err(pg)?;
            row.map(|r| app_record(r.get(0), r.get(1), r.get(2), &id)).transpose()
        })
    }

    fn list_app_passwords(&self, username: &str) -> Result<Vec<AppPasswordRecord>, StoreError> {
        let name = username.to_string();
        self.run(move |c| async move {
            let rows = c
                .query("SELECT id, data, last_used, last_used_by FROM app_passwords WHERE username = $1", &[&name])
                .await
                .map_err(pg)?;
            let mut out = rows
                .iter()
                .map(|r| app_record(r.get(1), r.get(2), r.get(3), r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
            Ok(out)
        })
    }

    fn revoke_app_password(&self, username: &str, id: &str) -> Result<AppPasswordRecord, StoreError> {
        let (name, id) = (username.to_string(), id.to_string());
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            let row = tx
                .query_opt(
                    "DELETE FROM app_passwords WHERE id = $1 AND username = $2 RETURNING data, last_used, last_used_by",
                    &[&id, &name],
                )
                .await
                .map_err(pg)?;
            let Some(row) = row else {
                return Err(StoreError::NotFound(format!("{name} has no app password with id {id}")));
            };
            let rec = app_record(row.get(0), row.get(1), row.get(2), &id)?;
            notify(&tx, &LiveEvent::End { username: name.clone(), app_password_id: Some(id.clone()) }).await?;
            tx.commit().await.map_err(pg)?;
            Ok(rec)
        })
    }

    fn update_app_password(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut AppPasswordRecord) -> Result<(), StoreError>,
    ) -> Result<AppPasswordRecord, StoreError> {
        for _ in 0..CAS_ROUNDS {
            let key = id.to_string();
            let current = self.run(move |c| async move {
                let row = c
                    .query_opt("SELECT data, last_used, last_used_by FROM app_passwords WHERE id = $1", &[&key])
                    .await
                    .map_err(pg)?;
                Ok(row.map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1), r.get::<_, String>(2))))
            })?;
            let Some((data, last_used, last_used_by)) = current else {
                return Err(StoreError::NotFound(format!("no app password with id {id}")));
            };
            let mut rec = app_record(&data, last_used, &last_used_by, id)?;
            change(&mut rec)?;
            let mut stored = rec.clone();
            stored.last_used = None;
            stored.last_used_by.clear();
            let (key, new) = (id.to_string(), encode(&stored)?);
            // The row's data is only written by creation and by this compare-and-set (last
            // uses have their own columns), so equal data means nobody changed it.
            let swapped = self.run(move |c| async move {
                c.execute("UPDATE app_passwords SET data = $2 WHERE id = $1 AND data = $3", &[&key, &new, &data])
                    .await
                    .map_err(pg)
            })?;
            if swapped == 1 {
                return Ok(rec);
            }
        }
        Err(StoreError::Conflict(format!("app password {id} was changed at the same time; try again")))
    }

    fn record_app_password_use(&self, id: &str, used: &LastUse) -> Result<(), StoreError> {
        let protocol = used.protocol.map(|p| p.as_str()).unwrap_or("");
        let (id, used) = (id.to_string(), encode(used)?);
        self.run(move |c| async move {
            // One statement: two nodes recording uses over two protocols at once keep both.
            c.execute(
                "UPDATE app_passwords SET last_used = $2::text,
                   last_used_by = CASE WHEN $3::text = '' THEN last_used_by
                                  ELSE (last_used_by::jsonb || jsonb_build_object($3::text, $2::text::jsonb))::text END
                 WHERE id = $1",
                &[&id, &used, &protocol],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
    }

    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        let (name, data) = (event.username.clone(), encode(event)?);
        self.run(move |c| async move {
            let row = c
                .query_one("INSERT INTO audit (username, data) VALUES ($1, $2) RETURNING seq", &[&name, &data])
                .await
                .map_err(pg)?;
            let seq: i64 = row.get(0);
            // Keep the newest MAX_AUDIT_PER_ACCOUNT events of each account, checked every
            // 64th event so the cost stays small.
            if seq % 64 == 0 {
                c.execute(
                    "DELETE FROM audit WHERE username = $1 AND seq <= (SELECT seq FROM audit WHERE username = $1 \
                     ORDER BY seq DESC OFFSET $2 LIMIT 1)",
                    &[&name, &(MAX_AUDIT_PER_ACCOUNT as i64)],
                )
                .await
                .map_err(pg)?;
            }
            Ok(())
        })
    }

    fn recent_audit(&self, username: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let name = username.to_string();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(move |c| async move {
            let rows = c
                .query("SELECT data FROM audit WHERE username = $1 ORDER BY seq DESC LIMIT $2", &[&name, &limit])
                .await
                .map_err(pg)?;
            rows.iter().map(|r| decode("audit", r.get::<_, &str>(0))).collect()
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every change was committed (durable) before its call returned.
        Ok(())
    }

    fn export(&self) -> Result<Dump, StoreError> {
        let accounts = self.list_accounts()?;
        self.run(move |c| async move {
            let rows = c
                .query("SELECT id, data, last_used, last_used_by FROM app_passwords ORDER BY id", &[])
                .await
                .map_err(pg)?;
            let app_passwords = rows
                .iter()
                .map(|r| app_record(r.get(1), r.get(2), r.get(3), r.get(0)))
                .collect::<Result<Vec<_>, _>>()?;
            let rows = c.query("SELECT data FROM audit ORDER BY username, seq", &[]).await.map_err(pg)?;
            let audit = rows.iter().map(|r| decode("audit", r.get::<_, &str>(0))).collect::<Result<Vec<_>, _>>()?;
            Ok(Dump { schema_version: SCHEMA_VERSION, accounts, app_passwords, audit })
        })
    }

    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        if dump.schema_version != SCHEMA_VERSION {
            return Err(StoreError::Schema { found: dump.schema_version });
        }
        let dump = dump.clone();
        self.run(move |mut c| async move {
            let tx = c.transaction().await.map_err(pg)?;
            let any = tx.query_opt("SELECT 1 FROM accounts LIMIT 1", &[]).await.map_err(pg)?;
            if any.is_some() {
                return Err(StoreError::Conflict("the store is not empty; import only into a new database".into()));
            }
            for a in &dump.accounts {
                tx.execute("INSERT INTO accounts (username, data) VALUES ($1, $2)", &[&a.username, &encode(a)?])
                    .await
                    .map_err(pg)?;
            }
            for r in &dump.app_passwords {
                let mut stored = r.clone();
                stored.last_used = None;
                stored.last_used_by.clear();
                let last = r.last_used.as_ref().map(encode).transpose()?;
                let by = encode(&r.last_used_by)?;
                tx.execute(
                    "INSERT INTO app_passwords (id, username, label_key, data, last_used, last_used_by)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&r.id, &r.username, &label_key(&r.label), &encode(&stored)?, &last, &by],
                )
                .await
                .map_err(pg)?;
            }
            for e in &dump.audit {
                tx.execute("INSERT INTO audit (username, data) VALUES ($1, $2)", &[&e.username, &encode(e)?])
                    .await
                    .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn take_attempt(&self, budgets: &[Budget], now: u64) -> Result<Option<usize>, StoreError> {
        if self.takes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            let (now, keep) = (secs(now), secs(FAMILIAR_KEEP_SECS));
            self.run_in_background("cannot purge attempt budgets", move |c| async move {
                c.execute("DELETE FROM attempts WHERE until <= $1", &[&now]).await.map_err(pg)?;
                c.execute("DELETE FROM familiar WHERE at <= $1::bigint - $2::bigint", &[&now, &keep])
                    .await
                    .map_err(pg)?;
                Ok(())
            });
        }
        let budgets = budgets.to_vec();
        self.run(move |mut c| async move {
            let keys: Vec<String> = budgets.iter().map(|b| b.key.clone()).collect();
            let tx = c.transaction().await.map_err(pg)?;
            tx.execute(
                "INSERT INTO attempts (key, used, at, until) SELECT k, 0, $2, 0 FROM unnest($1::text[]) AS k \
                 ON CONFLICT (key) DO NOTHING",
                &[&keys, &secs(now)],
            )
            .await
            .map_err(pg)?;
            // The rows stay locked until the commit: a concurrent taker (any node) waits
            // and then sees this take.
            let rows = tx
                .query("SELECT key, used, at FROM attempts WHERE key = ANY($1) ORDER BY key FOR UPDATE", &[&keys])
                .await
                .map_err(pg)?;
            let current = |key: &str| {
                rows.iter().find(|r| r.get::<_, &str>(0) == key).map(|r| BudgetUse {
                    used: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
                    at: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                })
            };
            let mut new = Vec::with_capacity(budgets.len());
            for (i, b) in budgets.iter().enumerate() {
                match current(&b.key).unwrap_or_default().take(b, now) {
                    Some(u) => new.push(u),
                    None => return Ok(Some(i)), // dropping the transaction rolls it back
                }
            }
            for (b, u) in budgets.iter().zip(new) {
                tx.execute(
                    "UPDATE attempts SET used = $2, at = $3, until = $4 WHERE key = $1",
                    &[&b.key, &(u.used as i32), &secs(u.at), &secs(u.empty_at(b.refill_secs))],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(None)
        })
    }

    fn give_back_attempt(&self, budgets: &[Budget], now: u64) -> Result<(), StoreError> {
        let budgets = budgets.to_vec();
        self.run(move |mut c| async move {
            let keys: Vec<String> = budgets.iter().map(|b| b.key.clone()).collect();
            let tx = c.transaction().await.map_err(pg)?;
            let rows = tx
                .query("SELECT key, used, at FROM attempts WHERE key = ANY($1) ORDER BY key FOR UPDATE", &[&keys])
                .await
                .map_err(pg)?;
            for r in &rows {
                let key: &str = r.get(0);
                let Some(b) = budgets.iter().find(|b| b.key == key) else { continue };
                let cur = BudgetUse {
                    used: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
                    at: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                };
                let u = cur.give_back(b, now);
                tx.execute(
                    "UPDATE attempts SET used = $2, at = $3, until = $4 WHERE key = $1",
                    &[&b.key, &(u.used as i32), &secs(u.at), &secs(u.empty_at(b.refill_secs))],
                )
                .await
                .map_err(pg)?;
            }
            tx.commit().await.map_err(pg)
        })
    }

    fn clear_attempts(&self, keys: &[String]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.run(move |c| async move {
            c.execute("DELETE FROM attempts WHERE key = ANY($1)", &[&keys]).await.map_err(pg)?;
            Ok(())
        })
    }

    fn remember_familiar(&self, key: &str, now: u64) -> Result<(), StoreError> {
        let key = key.to_string();
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO familiar (key, at) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET at = $2",
                &[&key, &secs(now)],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
    }

    fn familiar_since(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        self.run(move |c| async move {
            let row = c.query_opt("SELECT at FROM familiar WHERE key = $1", &[&key]).await.map_err(pg)?;
            Ok(row.map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
        })
    }

    fn enqueue_notice(&self, notice: &Notice) -> Result<(), StoreError> {
        let (id, user, due, attempts, data) = (
            notice.id.clone(),
            notice.username.clone(),
            secs(notice.due_at),
            i32::try_from(notice.attempts).unwrap_or(i32::MAX),
            encode(notice)?,
        );
        self.run(move |c| async move {
            match c
                .execute(
                    "INSERT INTO notices (id, username, due_at, attempts, data) VALUES ($1, $2, $3, $4, $5)",
                    &[&id, &user, &due, &attempts, &data],
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("notice {id} exists already"))),
                Err(e) => Err(pg(e)),
            }
        })
    }

    fn claim_notices(&self, now: u64, lease_secs: u64, limit: usize) -> Result<Vec<Notice>, StoreError> {
        let (now, until, limit) = (secs(now), secs(now.saturating_add(lease_secs)), limit.min(10_000) as i64);
        self.run(move |c| async move {
            // One statement: the due rows are locked (rows another node is claiming right
            // now are skipped, not waited for) and leased before anyone else can see them.
            let rows = c
                .query(
                    "UPDATE notices SET due_at = $2 WHERE id IN (SELECT id FROM notices WHERE due_at <= $1 \
                     ORDER BY due_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id, due_at, attempts, data",
                    &[&now, &until, &limit],
                )
                .await
                .map_err(pg)?;
            let mut out = rows
                .iter()
                .map(|r| {
                    let mut n: Notice = decode(r.get::<_, &str>(0), r.get::<_, &str>(3))?;
                    n.due_at = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
                    n.attempts = u32::try_from(r.get::<_, i32>(2)).unwrap_or(0);
                    Ok(n)
                })
                .collect::<Result<Vec<Notice>, StoreError>>()?;
            out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
            Ok(out)
        })
    }

    fn reschedule_notice(&self, id: &str, due_at: u64, attempts: u32) -> Result<(), StoreError> {
        let (id, due, attempts) = (id.to_string(), secs(due_at), i32::try_from(attempts).unwrap_or(i32::MAX));
        self.run(move |c| async move {
            c.execute("UPDATE notices SET due_at = $2, attempts = $3 WHERE id = $1", &[&id, &due, &attempts])
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn delete_notice(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.run(move |c| async move {
            c.execute("DELETE FROM notices WHERE id = $1", &[&id]).await.map_err(pg)?;
            Ok(())
        })
    }

    fn publish(&self, event: &LiveEvent) {
        // Not awaited: the caller (a web request, an admin command) does not wait for it.
        let ev = event.clone();
        self.run_in_background("could not tell the other nodes to end sessions", move |c| async move {
            notify(&c, &ev).await
        });
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<LiveEvent>> {
        Some(self.events.subscribe())
    }

    fn web_sessions(&self) -> Option<&dyn SharedWebSessions> {
        Some(self)
    }

    fn failure_counts(&self) -> Option<&dyn SharedFailureCounts> {
        Some(self)
    }
}

fn secs(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

impl SharedWebSessions for PgStore {
    fn insert_web_session(
        &self,
        key: &str,
        row: &WebSessionRow,
        now: u64,
        max_per_client: usize,
        purge: Option<usize>,
    ) -> Result<(), StoreError> {
        let (key, row) = (key.to_string(), row.clone());
        self.run(move |c| async move {
            if let Some(max_anonymous) = purge {
                let keep = i64::try_from(max_anonymous.saturating_sub(1)).unwrap_or(i64::MAX);
                c.execute("DELETE FROM web_sessions WHERE expires_at < $1", &[&secs(now)]).await.map_err(pg)?;
                c.execute(
                    "DELETE FROM web_sessions WHERE key IN (SELECT key FROM web_sessions WHERE anonymous \
                     ORDER BY last_seen DESC OFFSET $1)",
                    &[&keep],
                )
                .await
                .map_err(pg)?;
            }
            c.execute(
                "INSERT INTO web_sessions (key, sealed, username, anonymous, last_seen, expires_at, client_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &key,
                    &row.sealed,
                    &row.username,
                    &row.anonymous,
                    &secs(row.last_seen),
                    &secs(row.expires_at),
                    &row.client_key,
                ],
            )
            .await
            .map_err(pg)?;
            // The cap per client, after the insert: of concurrent inserts for one client
            // (on any node) each trims after its own row is in, so once they are done the
            // client has at most `max_per_client`. The new row is kept first, then the most
            // recently seen (the index on (client_key, last_seen) WHERE anonymous serves it).
            if let (true, Some(client)) = (row.anonymous, row.client_key) {
                let keep = i64::try_from(max_per_client).unwrap_or(i64::MAX);
                c.execute(
                    "DELETE FROM web_sessions WHERE key IN (SELECT key FROM web_sessions \
                     WHERE anonymous AND client_key = $1 ORDER BY key = $2 DESC, last_seen DESC OFFSET $3)",
                    &[&client, &key, &keep],
                )
                .await
                .map_err(pg)?;
            }
            Ok(())
        })
    }

    fn get_web_session(&self, key: &str) -> Result<Option<(WebSessionRow, i64)>, StoreError> {
        let key = key.to_string();
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT sealed, username, anonymous, last_seen, expires_at, version, client_key \
                     FROM web_sessions WHERE key = $1",
                    &[&key],
                )
                .await
                .map_err(pg)?;
            Ok(row.map(|r| {
                let row = WebSessionRow {
                    sealed: r.get(0),
                    username: r.get(1),
                    anonymous: r.get(2),
                    client_key: r.get(6),
                    last_seen: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                    expires_at: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                };
                (row, r.get(5))
            }))
        })
    }

    fn replace_web_session(&self, key: &str, version: i64, row: &WebSessionRow) -> Result<bool, StoreError> {
        let (key, row) = (key.to_string(), row.clone());
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE web_sessions SET sealed = $3, username = $4, anonymous = $5, last_seen = $6, \
                     expires_at = $7, client_key = $8, version = version + 1 WHERE key = $1 AND version = $2",
                    &[
                        &key,
                        &version,
                        &row.sealed,
                        &row.username,
                        &row.anonymous,
                        &secs(row.last_seen),
                        &secs(row.expires_at),
                        &row.client_key,
                    ],
                )
                .await
                .map_err(pg)?;
            Ok(n == 1)
        })
    }

    fn rename_web_session(&self, old: &str, new: &str) -> Result<bool, StoreError> {
        let (old, new) = (old.to_string(), new.to_string());
        self.run(move |c| async move {
            let n = c
                .execute("UPDATE web_sessions SET key = $2, version = version + 1 WHERE key = $1", &[&old, &new])
                .await
                .map_err(pg)?;
            Ok(n == 1)
        })
    }

    fn delete_web_session(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.run(move |c| async move {
            c.execute("DELETE FROM web_sessions WHERE key = $1", &[&key]).await.map_err(pg)?;
            Ok(())
        })
    }

    fn delete_web_sessions_of(&self, username: &str, keep: Option<&str>) -> Result<(), StoreError> {
        let (username, keep) = (username.to_string(), keep.map(str::to_string));
        self.run(move |c| async move {
            c.execute("DELETE FROM web_sessions WHERE username = $1 AND key IS DISTINCT FROM $2", &[&username, &keep])
                .await
                .map_err(pg)?;
            Ok(())
        })
    }
}

impl SharedFailureCounts for PgStore {
    fn count_failures(&self, keys: &[String], tag: &[u8], now: u64, forget_after: u64) -> Result<Vec<u32>, StoreError> {
        let (keys, tag) = (keys.to_vec(), tag.to_vec());
        let (now, forget) = (secs(now), secs(forget_after));
        self.run(move |c| async move {
            c.execute("DELETE FROM failure_counts WHERE last_at <= $1::bigint - $2::bigint", &[&now, &forget])
                .await
                .map_err(pg)?;
            let mut counts = Vec::with_capacity(keys.len());
            for key in &keys {
                let row = c
                    .query_one(
                        "INSERT INTO failure_counts AS f (key, failures, last_at, last_tag) VALUES ($1, 1, $2, $3) \
                         ON CONFLICT (key) DO UPDATE SET \
                         failures = CASE WHEN f.last_at <= $2::bigint - $4::bigint THEN 1 \
                                         WHEN f.last_tag = $3 THEN f.failures \
                                         ELSE f.failures + 1 END, \
                         last_at = $2, last_tag = $3 \
                         RETURNING failures",
                        &[key, &now, &tag, &forget],
                    )
                    .await
                    .map_err(pg)?;
                counts.push(u32::try_from(row.get::<_, i32>(0)).unwrap_or(0));
            }
            Ok(counts)
        })
    }

    fn clear_failures(&self, keys: Vec<String>) {
        // A login does not wait for this: it is sent and done in the background.
        self.run_in_background("cannot clear failure counts", move |c| async move {
            c.execute("DELETE FROM failure_counts WHERE key = ANY($1)", &[&keys]).await.map_err(pg)?;
            Ok(())
        });
    }
}
