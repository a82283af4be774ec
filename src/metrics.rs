//! Prometheus metrics (issue 19, point 4): what is counted, and the `/metrics` listener.
//!
//! One [`Metrics`] is made by `app::run` and shared (cloning shares it): the
//! [`crate::auth::Authenticator`] carries it to the login gate, the fronts and the web
//! step; the store is wrapped once in [`MeteredStore`]; the hashing pool and the
//! certificate store own their gauges and `app` registers them here. Components made
//! without it (tests, the admin CLI) count into a registry nobody reads.
//!
//! Labels come only from small fixed sets (protocol, method, result, direction, store
//! operation, route template, status code): never a user name, an address or an app
//! password id, for privacy and so the number of series stays bounded whatever clients
//! send.
//!
//! Where each figure is counted:
//! * logins: [`Metrics::login`], called by `Authenticator::log_login` with the values of
//!   the login line itself, for every attempt (also those whose line is aggregated), so
//!   the log and the counters never disagree;
//! * live sessions: a [`SessionGauge`] the gate puts in the session's `LiveSessions`
//!   entry (`LiveGuard::count`; up at admission, down when the entry goes: the guard is
//!   dropped, or the session is ended from outside);
//! * relayed bytes: the [`RelayMeter`] the same `SessionGauge` carries (taken once per
//!   session); the relay adds each read's length (one relaxed atomic add per read of up
//!   to 64 KiB, no lock, no allocation); SMTP counts what it sends upstream and the
//!   replies it reads;
//! * upstream logins: the gate times `Upstream::open` and `open_as_user`,
//!   `Authenticator::check_upstream` the upstream password check (not its cache hits);
//! * hashing: the pool's own gauges and wait histogram (`auth::hashing`);
//! * certificate expiry: `tls::CertStore`'s gauge, set at load and reload;
//! * store operations: [`MeteredStore`], around every [`Store`] method;
//! * web requests: [`count_web_request`], an axum middleware labelling by the route
//!   template (`MatchedPath`), never the raw path.

use crate::store::{
    Account, AppPasswordRecord, AuditEvent, Budget, Dump, LastUse, LiveEvent, Notice, SharedFailureCounts,
    SharedWebSessions, Store, StoreError,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `Content-Type` of the scrape: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets of the login and upstream-login latency (seconds): an argon2id check is
/// ~12 ms, an upstream login a few ms on a LAN; the long tail is queueing.
const LOGIN_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Buckets of the hashing-queue wait (seconds): zero when a thread is free.
const WAIT_BUCKETS: [f64; 10] = [0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0];
/// Buckets of store operations (seconds): sled answers in microseconds, PostgreSQL in
/// a round trip.
const STORE_BUCKETS: [f64; 10] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25, 1.0];

fn login_histogram() -> Histogram {
    Histogram::new(LOGIN_BUCKETS)
}

fn store_histogram() -> Histogram {
    Histogram::new(STORE_BUCKETS)
}

/// A new histogram for the hashing-queue wait.
pub fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    protocol: &'static str,
    method: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    protocol: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    protocol: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebLabels {
    route: String,
    status: u16,
}

/// A protocol label from the fixed set (anything else is `other`, so a label can never
/// carry a value from outside).
fn protocol_label(protocol: &str) -> &'static str {
    match protocol {
        "imap" => "imap",
        "smtp" => "smtp",
        "pop3" => "pop3",
        "sieve" => "sieve",
        "web" => "web",
        _ => "other",
    }
}

/// What came of an upstream login, for `mailgate_upstream_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    /// Logged in.
    Ok,
    /// Upstream refused the user's own password (`password_check = "upstream"`).
    Refused,
    /// Upstream could not be reached, or refused mailgate's own login.
    Failed,
}

impl UpstreamResult {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamResult::Ok => "ok",
            UpstreamResult::Refused => "refused",
            UpstreamResult::Failed => "failed",
        }
    }
}

struct Families {
    logins: Family<LoginLabels, Counter>,
    login_seconds: Family<ProtocolLabel, Histogram, fn() -> Histogram>,
    sessions: Family<ProtocolLabel, Gauge>,
    relayed: Family<RelayLabels, Counter>,
    upstream_logins: Family<UpstreamLabels, Counter>,
    upstream_seconds: Family<ProtocolLabel, Histogram, fn() -> Histogram>,
    store_seconds: Family<StoreLabel, Histogram, fn() -> Histogram>,
    store_errors: Family<StoreLabel, Counter>,
    web_requests: Family<WebLabels, Counter>,
}

/// The metrics of one mailgate process. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    f: Arc<Families>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Every family registered, all empty.
    pub fn new() -> Metrics {
        let f = Families {
            logins: Family::default(),
            login_seconds: Family::new_with_constructor(login_histogram),
            sessions: Family::default(),
            relayed: Family::default(),
            upstream_logins: Family::default(),
            upstream_seconds: Family::new_with_constructor(login_histogram),
            store_seconds: Family::new_with_constructor(store_histogram),
            store_errors: Family::default(),
            web_requests: Family::default(),
        };
        let mut r = Registry::with_prefix("mailgate");
        r.register(
            "logins",
            "Login attempts by protocol, method and result (the login line's values)",
            f.logins.clone(),
        );
        r.register(
            "login_duration_seconds",
            "Time to decide a login (the failure delay not included)",
            f.login_seconds.clone(),
        );
        r.register("sessions", "Logged-in mail sessions now", f.sessions.clone());
        r.register(
            "relayed_bytes",
            "Bytes relayed after login, from_client (to upstream) and to_client",
            f.relayed.clone(),
        );
        r.register("upstream_logins", "Upstream logins by result (ok, refused, failed)", f.upstream_logins.clone());
        r.register(
            "upstream_login_duration_seconds",
            "Time of an upstream login (connect, TLS, login)",
            f.upstream_seconds.clone(),
        );
        r.register("store_operation_duration_seconds", "Time of a store operation", f.store_seconds.clone());
        r.register("store_errors", "Store operations that failed", f.store_errors.clone());
        r.register("web_requests", "Web step requests by route template and status", f.web_requests.clone());
        Metrics { registry: Arc::new(Mutex::new(r)), f: Arc::new(f) }
    }

    /// Registers a metric a component owns (the hashing pool's gauges, the certificate's
    /// expiry), under the `mailgate_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// The scrape: every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &r);
        }
        out
    }

    /// The sum of the samples whose line starts with `series` (a name, or a name with
    /// the first labels: `mailgate_sessions{protocol="imap"`); 0 if none.
    #[cfg(test)]
    pub fn sample(&self, series: &str) -> f64 {
        let text = self.render();
        let matching = text.lines().filter(|l| !l.starts_with('#') && l.starts_with(series));
        // A bare name must not match a longer one (`x` vs `x_total`).
        let matching = matching.filter(|l| l[series.len()..].starts_with([' ', '{', ',', '}']));
        matching.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// One login attempt, from the values of its login line (`method` and `result` are
    /// the line's fixed words: `Method::as_str`, `Outcome::as_str`).
    pub fn login(&self, protocol: &str, method: &'static str, result: &'static str, took: Duration) {
        let protocol = protocol_label(protocol);
        self.f.logins.get_or_create(&LoginLabels { protocol, method, result }).inc();
        self.f.login_seconds.get_or_create(&ProtocolLabel { protocol }).observe(took.as_secs_f64());
    }

    /// A live session of `protocol`, counted until the guard is dropped; it carries the
    /// protocol's byte counters for the relay.
    pub fn session(&self, protocol: &str) -> SessionGauge {
        let gauge = self.f.sessions.get_or_create(&ProtocolLabel { protocol: protocol_label(protocol) }).clone();
        gauge.inc();
        SessionGauge { gauge, relay: self.relay(protocol) }
    }

    /// The byte counters of `protocol`'s relayed sessions.
    pub fn relay(&self, protocol: &str) -> RelayMeter {
        let protocol = protocol_label(protocol);
        let counter = |direction| self.f.relayed.get_or_create(&RelayLabels { protocol, direction }).clone();
        RelayMeter(Arc::new(RelayCounters { from_client: counter("from_client"), to_client: counter("to_client") }))
    }

    /// One upstream login of `protocol` that took `took`.
    pub fn upstream_login(&self, protocol: &str, result: UpstreamResult, took: Duration) {
        let protocol = protocol_label(protocol);
        self.f.upstream_logins.get_or_create(&UpstreamLabels { protocol, result: result.as_str() }).inc();
        self.f.upstream_seconds.get_or_create(&ProtocolLabel { protocol }).observe(took.as_secs_f64());
    }

    /// One store operation.
    fn store_op(&self, operation: &'static str, took: Duration, failed: bool) {
        let label = StoreLabel { operation };
        self.f.store_seconds.get_or_create(&label).observe(took.as_secs_f64());
        if failed {
            self.f.store_errors.get_or_create(&label).inc();
        }
    }

    /// One web request, by its route template (`None`: no route matched).
    pub fn web_request(&self, route: Option<&str>, status: u16) {
        let route = route.unwrap_or("unmatched").to_string();
        self.f.web_requests.get_or_create(&WebLabels { route, status }).inc();
    }
}

/// One live session in `mailgate_sessions`; dropping it takes the session off.
#[derive(Debug)]
pub struct SessionGauge {
    gauge: Gauge,
    relay: RelayMeter,
}

impl SessionGauge {
    /// The byte counters of the session's protocol.
    pub fn relay(&self) -> &RelayMeter {
        &self.relay
    }
}

impl Drop for SessionGauge {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A protocol's two byte counters, one pointer wide (a relayed session's task stays
/// small: PERFORMANCE.md M1). Adding is one relaxed atomic add on a shared counter.
#[derive(Debug, Clone, Default)]
pub struct RelayMeter(Arc<RelayCounters>);

/// The counters behind a [`RelayMeter`].
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Client → upstream.
    pub from_client: Counter,
    /// Upstream → client.
    pub to_client: Counter,
}

impl std::ops::Deref for RelayMeter {
    type Target = RelayCounters;
    fn deref(&self) -> &RelayCounters {
        &self.0
    }
}

/// axum middleware: counts each web request by route template and status.
pub async fn count_web_request(
    axum::extract::State(metrics): axum::extract::State<Metrics>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_string());
    let response = next.run(req).await;
    metrics.web_request(route.as_deref(), response.status().as_u16());
    response
}

/// Serves `GET /metrics` on `listener` (plain HTTP, meant for loopback or a private
/// network) until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use axum::routing::get;
    let router = axum::Router::new().route(
        "/metrics",
        get(|axum::extract::State(m): axum::extract::State<Metrics>| async move {
            ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], m.render())
        }),
    );
    let router = router.with_state(metrics);
    if let Err(e) = axum::serve(listener, router).await {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}

/// The address `[metrics] listen` names, for the start-up line.
pub fn describe(addr: SocketAddr) -> &'static str {
    if addr.ip().is_loopback() { "loopback" } else { "not loopback: plain HTTP, no authentication" }
}

/// The store, timing every operation into `mailgate_store_operation_duration_seconds`
/// and counting failures (the database failing, not answers such as "no such record")
/// into `mailgate_store_errors_total`: wrapped once, for both backends.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    metrics: Metrics,
}

impl MeteredStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, metrics: Metrics) -> MeteredStore {
        MeteredStore { inner, metrics }
    }

    fn timed<T>(&self, operation: &'static str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let started = Instant::now();
        let r = f();
        self.metrics.store_op(operation, started.elapsed(), r.as_ref().is_err_and(failed));
        r
    }
}

/// Whether `e` is the store failing (counted in `mailgate_store_errors_total`), not an
/// answer about the data (no such record, a duplicate, a limit, a refused change).
fn failed(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(_) | StoreError::Corrupt(_) | StoreError::Schema { .. })
}

impl Store for MeteredStore {
    fn get_account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        self.timed("get_account", || self.inner.get_account(username))
    }
    fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        self.timed("create_account", || self.inner.create_account(account))
    }
    fn create_accounts(&self, accounts: &[Account]) -> Result<(), StoreError> {
        self.timed("create_accounts", || self.inner.create_accounts(accounts))
    }
    fn update_account(
        &self,
        username: &str,
        change: &mut dyn FnMut(&mut Account) -> Result<(), StoreError>,
    ) -> Result<Account, StoreError> {
        self.timed("update_account", || self.inner.update_account(username, change))
    }
    fn remove_account(&self, username: &str) -> Result<(), StoreError> {
        self.timed("remove_account", || self.inner.remove_account(username))
    }
    fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.timed("list_accounts", || self.inner.list_accounts())
    }
    fn create_app_password(&self, record: &AppPasswordRecord) -> Result<(), StoreError> {
        self.timed("create_app_password", || self.inner.create_app_password(record))
    }
    fn get_app_password(&self, id: &str) -> Result<Option<AppPasswordRecord>, StoreError> {
        self.timed("get_app_password", || self.inner.get_app_password(id))
    }
    fn list_app_passwords(&self, username: &str) -> Result<Vec<AppPasswordRecord>, StoreError> {
        self.timed("list_app_passwords", || self.inner.list_app_passwords(username))
    }
    fn revoke_app_password(&self, username: &str, id: &str) -> Result<AppPasswordRecord, StoreError> {
        self.timed("revoke_app_password", || self.inner.revoke_app_password(username, id))
    }
    fn update_app_password(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut AppPasswordRecord) -> Result<(), StoreError>,
    ) -> Result<AppPasswordRecord, StoreError> {
        self.timed("update_app_password", || self.inner.update_app_password(id, change))
    }
    fn record_app_password_use(&self, id: &str, used: &LastUse) -> Result<(), StoreError> {
        self.timed("record_app_password_use", || self.inner.record_app_password_use(id, used))
    }
    fn append_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.timed("append_audit", || self.inner.append_audit(event))
    }
    fn recent_audit(&self, username: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        self.timed("recent_audit", || self.inner.recent_audit(username, limit))
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.timed("flush", || self.inner.flush())
    }
    fn export(&self) -> Result<Dump, StoreError> {
        self.timed("export", || self.inner.export())
    }
    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        self.timed("import", || self.inner.import(dump))
    }
    fn publish(&self, event: &LiveEvent) {
        self.inner.publish(event)
    }
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<LiveEvent>> {
        self.inner.subscribe()
    }
    fn web_sessions(&self) -> Option<&dyn SharedWebSessions> {
        self.inner.web_sessions()
    }
    fn take_attempt(&self, budgets: &[Budget], now: u64) -> Result<Option<usize>, StoreError> {
        self.timed("take_attempt", || self.inner.take_attempt(budgets, now))
    }
    fn give_back_attempt(&self, budgets: &[Budget], now: u64) -> Result<(), StoreError> {
        self.timed("give_back_attempt", || self.inner.give_back_attempt(budgets, now))
    }
    fn clear_attempts(&self, keys: &[String]) -> Result<(), StoreError> {
        self.timed("clear_attempts", || self.inner.clear_attempts(keys))
    }
    fn remember_familiar(&self, key: &str, now: u64) -> Result<(), StoreError> {
        self.timed("remember_familiar", || self.inner.remember_familiar(key, now))
    }
    fn familiar_since(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.timed("familiar_since", || self.inner.familiar_since(key))
    }
    fn enqueue_notice(&self, notice: &Notice) -> Result<(), StoreError> {
        self.timed("enqueue_notice", || self.inner.enqueue_notice(notice))
    }
    fn claim_notices(&self, now: u64, lease_secs: u64, limit: usize) -> Result<Vec<Notice>, StoreError> {
        self.timed("claim_notices", || self.inner.claim_notices(now, lease_secs, limit))
    }
    fn reschedule_notice(&self, id: &str, due_at: u64, attempts: u32) -> Result<(), StoreError> {
        self.timed("reschedule_notice", || self.inner.reschedule_notice(id, due_at, attempts))
    }
    fn delete_notice(&self, id: &str) -> Result<(), StoreError> {
        self.timed("delete_notice", || self.inner.delete_notice(id))
    }
    fn failure_counts(&self) -> Option<&dyn SharedFailureCounts> {
        self.inner.failure_counts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;

    /// The sample lines of `text` whose name and labels start with `series`, e.g.
    /// `mailgate_logins_total{protocol="imap"`: their values.
    fn values(text: &str, series: &str) -> Vec<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    }

    fn value(text: &str, series: &str) -> f64 {
        let v = values(text, series);
        assert_eq!(v.len(), 1, "{series}: {v:?}\n{text}");
        v[0]
    }

    #[test]
    fn logins_are_counted_by_protocol_method_and_result_with_their_time() {
        let m = Metrics::new();
        let ms = Duration::from_millis;
        m.login("imap", "app-password", "ok", ms(3));
        m.login("imap", "app-password", "ok", ms(4));
        m.login("smtp", "account-password", "wrong", ms(30));
        m.login("imap", "account-password", "needs_app_password", ms(20));
        // A protocol outside the fixed set cannot make a label of its own.
        m.login("alice@example.com", "account-password", "throttled", ms(0));
        let text = m.render();
        let logins = |labels: &str| value(&text, &format!("mailgate_logins_total{{{labels}}}"));
        assert_eq!(logins(r#"protocol="imap",method="app-password",result="ok""#), 2.0);
        assert_eq!(logins(r#"protocol="smtp",method="account-password",result="wrong""#), 1.0);
        assert_eq!(logins(r#"protocol="imap",method="account-password",result="needs_app_password""#), 1.0);
        assert_eq!(logins(r#"protocol="other",method="account-password",result="throttled""#), 1.0);
        assert!(!text.contains("alice"), "{text}");
        assert_eq!(value(&text, r#"mailgate_login_duration_seconds_count{protocol="imap"}"#), 3.0);
        let sum = value(&text, r#"mailgate_login_duration_seconds_sum{protocol="imap"}"#);
        assert!((sum - 0.027).abs() < 1e-9, "{sum}");
        assert_eq!(value(&text, r#"mailgate_login_duration_seconds_bucket{protocol="imap",le="0.005"}"#), 2.0);
        assert!(text.contains("# TYPE mailgate_logins_total counter"), "{text}");
        assert!(text.contains("# TYPE mailgate_login_duration_seconds histogram"), "{text}");
    }

    #[test]
    fn a_session_is_counted_while_its_gauge_lives() {
        let m = Metrics::new();
        let a = m.session("imap");
        let b = m.session("imap");
        let c = m.session("pop3");
        assert_eq!(value(&m.render(), r#"mailgate_sessions{protocol="imap"}"#), 2.0);
        drop((a, c));
        let text = m.render();
        assert_eq!(value(&text, r#"mailgate_sessions{protocol="imap"}"#), 1.0);
        assert_eq!(value(&text, r#"mailgate_sessions{protocol="pop3"}"#), 0.0);
        drop(b);
        assert_eq!(value(&m.render(), r#"mailgate_sessions{protocol="imap"}"#), 0.0);
    }

    #[test]
    fn relay_meters_of_one_protocol_share_their_counters() {
        let m = Metrics::new();
        let one = m.relay("imap");
        let two = m.relay("imap");
        one.from_client.inc_by(100);
        two.from_client.inc_by(20);
        two.to_client.inc_by(5_000);
        m.relay("pop3").to_client.inc_by(7);
        let text = m.render();
        let bytes = |labels: &str| value(&text, &format!("mailgate_relayed_bytes_total{{{labels}}}"));
        assert_eq!(bytes(r#"protocol="imap",direction="from_client""#), 120.0);
        assert_eq!(bytes(r#"protocol="imap",direction="to_client""#), 5_000.0);
        assert_eq!(bytes(r#"protocol="pop3",direction="to_client""#), 7.0);
    }

    #[test]
    fn upstream_logins_and_component_metrics_are_rendered() {
        let m = Metrics::new();
        m.upstream_login("imap", UpstreamResult::Ok, Duration::from_millis(2));
        m.upstream_login("imap", UpstreamResult::Failed, Duration::from_millis(1));
        let g: Gauge = Gauge::default();
        g.set(1_900_000_000);
        m.register("tls_certificate_expiry_timestamp_seconds", "help", g);
        let text = m.render();
        assert_eq!(value(&text, r#"mailgate_upstream_logins_total{protocol="imap",result="ok"}"#), 1.0);
        assert_eq!(value(&text, r#"mailgate_upstream_logins_total{protocol="imap",result="failed"}"#), 1.0);
        assert_eq!(value(&text, r#"mailgate_upstream_login_duration_seconds_count{protocol="imap"}"#), 2.0);
        assert_eq!(value(&text, "mailgate_tls_certificate_expiry_timestamp_seconds"), 1_900_000_000.0);
    }

    #[test]
    fn the_store_wrapper_times_every_operation_and_counts_failures() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new();
        let store = MeteredStore::new(Arc::new(SledStore::open(&dir.path().join("s")).unwrap()), m.clone());
        assert!(store.get_account("nobody@example.com").unwrap().is_none());
        assert!(store.get_account("nobody@example.com").unwrap().is_none());
        // "No such app password" is an answer, not the store failing.
        assert!(matches!(store.revoke_app_password("nobody@example.com", "abcdef"), Err(StoreError::NotFound(_))));
        m.store_op("flush", Duration::from_millis(1), true);
        let text = m.render();
        let op = |name: &str, op: &str| value(&text, &format!("{name}{{operation=\"{op}\"}}"));
        assert_eq!(op("mailgate_store_operation_duration_seconds_count", "get_account"), 2.0);
        assert_eq!(op("mailgate_store_operation_duration_seconds_count", "revoke_app_password"), 1.0);
        assert_eq!(op("mailgate_store_errors_total", "flush"), 1.0);
        assert!(values(&text, r#"mailgate_store_errors_total{operation="revoke_app_password"}"#).is_empty(), "{text}");
        assert!(failed(&StoreError::Backend("disk".into())) && failed(&StoreError::Corrupt("x".into())));
        assert!(!failed(&StoreError::NotFound("x".into())) && !failed(&StoreError::Conflict("x".into())));
        assert!(!failed(&StoreError::Limit("x".into())));
    }

    /// Web requests are labelled by route template and status, never by the raw path.
    #[tokio::test]
    async fn web_requests_are_counted_by_route_template() {
        use tower::ServiceExt as _;
        let m = Metrics::new();
        let router = axum::Router::new()
            .route("/app-passwords/{id}/revoke", axum::routing::post(|| async { "revoked" }))
            .layer(axum::middleware::from_fn_with_state(m.clone(), count_web_request));
        let request = |method: &str, path: &str| {
            axum::http::Request::builder().method(method).uri(path).body(axum::body::Body::empty()).unwrap()
        };
        for (method, path) in [
            ("POST", "/app-passwords/abc123/revoke"),
            ("POST", "/app-passwords/zzz999/revoke"),
            ("GET", "/app-passwords/abc123/revoke"),
            ("GET", "/secret-user-name@example.com"),
        ] {
            router.clone().oneshot(request(method, path)).await.unwrap();
        }
        let text = m.render();
        let requests = |labels: &str| value(&text, &format!("mailgate_web_requests_total{{{labels}}}"));
        assert_eq!(requests(r#"route="/app-passwords/{id}/revoke",status="200""#), 2.0);
        assert_eq!(requests(r#"route="/app-passwords/{id}/revoke",status="405""#), 1.0);
        assert_eq!(requests(r#"route="unmatched",status="404""#), 1.0);
        assert!(!text.contains("abc123") && !text.contains("example.com"), "{text}");
    }
}
