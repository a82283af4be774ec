//! Composition root: opens the store, builds TLS and auth, binds the listeners and the
//! admin socket, and runs until shutdown. The only module that knows all the others.

use crate::admin;
use crate::auth::{Authenticator, crypto::SecretKey};
use crate::config::Config;
use crate::live::LiveSessions;
use crate::net::driver::{Front, serve_tcp};
use crate::net::gate::Gate;
use crate::net::imap::ImapService;
use crate::net::listener::{ConnLimits, accept_loop};
use crate::net::pop3::Pop3Service;
use crate::net::sieve::SieveService;
use crate::net::smtp::SmtpService;
use crate::net::upstream::{Connector, ImapUpstream, Pop3Upstream, SieveUpstream};
use crate::store::{Store, StoreError, sled_store::SledStore};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Why mailgate could not start (or stop cleanly). Each text is the whole message the
/// operator sees after `mailgate: `; the wrapped errors keep their own causes, so
/// main's `{:#}` prints the same chain as before.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// `data_dir` could not be made.
    #[error("cannot create data_dir {}: {error}", path.display())]
    DataDir {
        /// `data_dir`.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// root was about to open a `data_dir` that belongs to another user (the service's):
    /// files it made there would be root's, and the service could not open them.
    #[error(
        "{} belongs to the user {owner}, which runs the service: run this command as that user \
         (`runuser -u {owner} -- mailgate ...`), or the files it makes there as root would lock the service \
         out of its own store",
        path.display()
    )]
    DataDirOwner {
        /// `data_dir`.
        path: PathBuf,
        /// Its owner's name (or uid).
        owner: String,
    },
    /// `store.url_file` could not be read.
    #[error(transparent)]
    UrlFile(#[from] crate::config::UrlFileError),
    /// The PostgreSQL store did not open (connect, TLS, schema).
    #[error("cannot open the PostgreSQL store: {0}")]
    Postgres(StoreError),
    /// The store failed (opening sled, reading accounts, the last flush).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `[tls] acme`: the placeholder certificate could not be made.
    #[error(transparent)]
    Acme(#[from] crate::acme::AcmeError),
    /// `secret.key` is gone while stored TOTP secrets are sealed with it.
    #[error(
        "{} is missing, but {sealed} accounts have TOTP secrets encrypted with it: restore it from a backup \
         (without one: see docs/configuration.md, \"A lost secret.key\")",
        path.display()
    )]
    KeyMissing {
        /// The key file.
        path: PathBuf,
        /// Accounts with a sealed TOTP secret.
        sealed: usize,
    },
    /// `secret.key` could not be read or made.
    #[error(transparent)]
    Key(#[from] crate::auth::crypto::KeyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {error}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The configuration key that names it (`imap.listen_tls`, ...).
        what: &'static str,
        /// Why.
        error: std::io::Error,
    },
    /// A TLS configuration (the certificate, or an upstream's CA) is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The admin socket could not be made.
    #[error("cannot create admin socket {}: {error}", path.display())]
    AdminSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// Creates the data directory (0700) if missing. Refuses root a `data_dir` that another
/// user owns (the Debian package's `mailgate`): see [`AppError::DataDirOwner`].
pub fn prepare_data_dir(config: &Config) -> Result<(), AppError> {
    if rustix::process::geteuid().is_root()
        && let Some(owner) = crate::fsutil::owner_other_than_root(&config.data_dir)
    {
        return Err(AppError::DataDirOwner { path: config.data_dir.clone(), owner });
    }
    crate::fsutil::private_dir(&config.data_dir)
        .map_err(|error| AppError::DataDir { path: config.data_dir.clone(), error })
}

/// Opens the configured store: the embedded one in `data_dir` (made if needed), or the
/// shared PostgreSQL database (schema created or migrated).
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, AppError> {
    prepare_data_dir(config)?;
    match &config.store {
        crate::config::StoreBackend::Sled => Ok(Arc::new(SledStore::open(&config.store_path())?)),
        crate::config::StoreBackend::Postgres { url, ca_file } => {
            let url = url.resolve()?;
            let store = crate::store::pg_store::PgStore::open(&url, ca_file.as_deref()).map_err(AppError::Postgres)?;
            Ok(Arc::new(store))
        }
    }
}

/// Loads the key that seals TOTP secrets, making one only while no stored secret needs
/// the old one: a lost key file is reported, never silently replaced.
pub fn load_key(config: &Config, store: &dyn Store) -> Result<SecretKey, AppError> {
    let path = config.secret_key_path();
    if !path.exists() {
        let sealed = store.list_accounts()?.iter().filter(|a| a.totp.is_some()).count();
        if sealed > 0 {
            return Err(AppError::KeyMissing { path, sealed });
        }
    }
    Ok(SecretKey::load_or_create(&path)?)
}

/// Listeners bound before serving (so a test can bind port 0 and read the addresses).
pub struct Listeners {
    /// IMAP implicit TLS.
    pub imap_tls: Vec<TcpListener>,
    /// IMAP STARTTLS.
    pub imap_starttls: Vec<TcpListener>,
    /// SMTP submission, implicit TLS.
    pub smtp_tls: Vec<TcpListener>,
    /// SMTP submission, STARTTLS.
    pub smtp_starttls: Vec<TcpListener>,
    /// POP3, implicit TLS (none when POP3 is off).
    pub pop3_tls: Vec<TcpListener>,
    /// POP3, STLS (none when POP3 is off).
    pub pop3_starttls: Vec<TcpListener>,
    /// ManageSieve, STARTTLS (none when ManageSieve is off).
    pub sieve: Vec<TcpListener>,
    /// The web step (HTTPS).
    pub web: Vec<TcpListener>,
    /// Prometheus metrics (plain HTTP; `[metrics] listen`, off by default).
    pub metrics: Vec<TcpListener>,
}

impl Listeners {
    /// Binds every configured listener; fails naming the address.
    pub async fn bind(config: &Config) -> Result<Listeners, AppError> {
        async fn all(addrs: &[SocketAddr], what: &'static str) -> Result<Vec<TcpListener>, AppError> {
            let mut out = Vec::new();
            for &addr in addrs {
                out.push(TcpListener::bind(addr).await.map_err(|error| AppError::Listen { addr, what, error })?);
            }
            Ok(out)
        }
        Ok(Listeners {
            imap_tls: all(&config.imap_tls, "imap.listen_tls").await?,
            imap_starttls: all(&config.imap_starttls, "imap.listen_starttls").await?,
            smtp_tls: all(&config.smtp_tls, "smtp.listen_tls").await?,
            smtp_starttls: all(&config.smtp_starttls, "smtp.listen_starttls").await?,
            pop3_tls: all(&config.pop3_tls, "pop3.listen_tls").await?,
            pop3_starttls: all(&config.pop3_starttls, "pop3.listen_starttls").await?,
            sieve: all(&config.sieve_listen, "sieve.listen").await?,
            web: all(&config.web_listen, "web.listen").await?,
            metrics: all(config.metrics_listen.as_slice(), "metrics.listen").await?,
        })
    }
}

/// Open files that `max_connections` connections need: two sockets for a relayed session
/// (client and upstream), and 256 for everything else (listeners, the store, logs).
pub fn fds_needed(max_connections: usize) -> u64 {
    (max_connections as u64).saturating_mul(2).saturating_add(256)
}

/// What [`raise_fd_limit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimit {
    /// The soft limit already covered what `max_connections` needs.
    Enough,
    /// The soft limit was raised to cover it.
    Raised {
        /// The new soft limit.
        to: u64,
    },
    /// The hard limit (or a refused `setrlimit`) leaves the soft limit below the need.
    Short {
        /// The soft limit now.
        got: u64,
        /// What `max_connections` needs ([`fds_needed`]).
        needed: u64,
    },
}

impl FdLimit {
    /// The start-up warning, if one is due: only when the open-file limit is short of a
    /// `max_connections` the admin set (`configured`). A shortfall against the default
    /// (10,000 connections, 20,256 files; many machines have a hard limit of 20,000 or
    /// less) is no warning: nobody asked for that many, and [`raise_fd_limit`] logs it as
    /// information instead.
    pub fn warning(&self, configured: bool) -> Option<String> {
        match *self {
            FdLimit::Short { got, needed } if configured => Some(format!(
                "the open-file limit ({got}) is below what limits.max_connections needs ({needed}): about {} \
                 relayed sessions fit; raise it (systemd: LimitNOFILE=) or lower limits.max_connections",
                sessions_held(got)
            )),
            _ => None,
        }
    }
}

/// What every mail listener's accept loop shares ([`MailListeners::add`]).
struct MailListeners<'a> {
    tasks: &'a mut Vec<tokio::task::JoinHandle<()>>,
    limits: &'a Arc<ConnLimits>,
    stop: &'a tokio::sync::watch::Receiver<bool>,
    guard: &'a crate::net::listener::TaskGuard,
    proxy: &'a Arc<crate::net::listener::ProxyPolicy>,
}

impl MailListeners<'_> {
    /// Starts an accept loop on each of `list`, serving every connection with `front`;
    /// `proxy`: the PROXY protocol header comes first. Logs each address as `<what>
    /// listening`.
    fn add<F: Front>(&mut self, list: Vec<TcpListener>, front: &Arc<F>, implicit: bool, proxy: bool, what: &str) {
        for l in list {
            if let Ok(a) = l.local_addr() {
                let kind = match (implicit, what) {
                    (true, _) => "implicit TLS",
                    (false, "POP3") => "STLS",
                    (false, _) => "STARTTLS",
                };
                tracing::info!(address = %a, kind, "{what} listening");
            }
            let front = front.clone();
            self.tasks.push(tokio::spawn(accept_loop(
                l,
                self.limits.clone(),
                self.stop.clone(),
                proxy.then(|| self.proxy.clone()),
                self.guard.clone(),
                move |tcp, peer| serve_tcp(front.clone(), tcp, peer, implicit),
            )));
        }
    }
}

/// Relayed sessions that `open_files` file descriptors hold.
fn sessions_held(open_files: u64) -> u64 {
    open_files.saturating_sub(256) / 2
}

/// Raises the soft limit on open files towards what `max_connections` needs (a relayed
/// session holds two sockets), as far as the hard limit allows. systemd starts services
/// with a soft limit of 1024, which would cap mailgate at about 500 sessions whatever
/// `max_connections` says. Warns only when the result is short of a `max_connections`
/// the admin set (`configured`; see [`FdLimit::warning`]).
pub fn raise_fd_limit(max_connections: usize, configured: bool) -> FdLimit {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = fds_needed(max_connections);
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let soft = current.unwrap_or(u64::MAX);
    if soft >= want {
        return FdLimit::Enough;
    }
    let target = maximum.map_or(want, |hard| hard.min(want));
    let got = if target > soft && setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum }).is_ok() {
        target
    } else {
        soft
    };
    let found = if got < want { FdLimit::Short { got, needed: want } } else { FdLimit::Raised { to: got } };
    match (found.warning(configured), found) {
        (Some(w), _) => tracing::warn!("{w}"),
        (None, FdLimit::Short { got, .. }) => tracing::info!(
            open_files = got,
            sessions = sessions_held(got),
            "the open-file limit holds fewer relayed sessions than the default limits.max_connections"
        ),
        (None, _) => tracing::info!(open_files = got, "raised the open-file limit"),
    }
    found
}

/// Serves until `shutdown` completes. The store must be open already.
pub async fn run(
    config: Arc<Config>,
    store: Arc<dyn Store>,
    key: SecretKey,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    raise_fd_limit(config.limits.max_connections, config.limits.max_connections_set);
    // The one set of metrics; every store operation is timed through the wrapper.
    let metrics = crate::metrics::Metrics::new();
    let store: Arc<dyn Store> = Arc::new(crate::metrics::MeteredStore::new(store, metrics.clone()));
    // One certificate for every listener; SIGHUP or a change of its files replaces it.
    if let Some(acme) = &config.acme {
        crate::acme::ensure_placeholder(acme)?;
    }
    let certs = crate::tls::CertStore::load(&config.tls_cert, &config.tls_key)?;
    certs.register_metrics(&metrics);
    let cert_task = tokio::spawn(crate::tls::keep_current(certs.clone(), config.tls_reload_check));
    if config.acme.is_some() {
        // Before the listeners' configurations are built: they then accept `acme-tls/1`.
        certs.answer_acme_challenges();
    }
    // Before the listeners' configurations are built: which library encrypts their records.
    let record_crypto = crate::tls::choose_record_crypto(config.tls_record_crypto);
    tracing::info!(
        record_crypto = record_crypto.name(),
        configured = config.tls_record_crypto.name(),
        "TLS record encryption"
    );
    let acceptor = TlsAcceptor::from(crate::tls::server_config(&certs, &["imap"])?);
    let connector = ImapUpstream(Arc::new(Connector::new(&config.upstream_imap, config.limits.upstream_timeout)?));
    let sessions = LiveSessions::default();
    // Several nodes on one database: session-ending changes travel both ways.
    if let Some(mut events) = store.subscribe() {
        let publisher = store.clone();
        sessions.share_with(Arc::new(move |ev| publisher.publish(ev)));
        let local = sessions.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => {
                        let ended = local.apply(&ev);
                        if ended > 0 {
                            tracing::info!(?ev, ended, "sessions ended by a change on another node");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed session events from other nodes");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let key = Arc::new(key);
    let mut auth = Authenticator::new(store.clone(), config.limits.max_concurrent_hashes)
        .with_ipv6_prefix(config.limits.ipv6_prefix)
        .with_failure_delays(config.limits.auth_failure_delay, config.limits.ip_penalty_max)
        .with_shared_failure_counts(key.clone())
        .with_upstream_check(config.accounts.clone(), Arc::new(connector.clone()))
        .with_verify_cache(config.accounts.verify_cache)
        .with_metrics(metrics.clone())
        .with_policy(config.policy.clone());
    // Security notifications: queued by the changes (through the authenticator, which
    // the account service and the gate share), sent by one task.
    let notifier = crate::notify::Notifier::new(store.clone(), config.notify.clone());
    if config.notify.enabled {
        auth = auth.with_notifier(notifier.clone());
    }
    if config.oauth.enabled {
        auth = auth.with_oauth(key.clone());
    }
    let limits =
        ConnLimits::new(config.limits.max_connections, config.limits.max_connections_per_ip, config.limits.ipv6_prefix);
    let web_limits =
        ConnLimits::new(config.limits.max_connections, config.limits.max_connections_per_ip, config.limits.ipv6_prefix);
    let gate =
        Gate::new(auth.clone(), sessions.clone(), config.app_password_url(), config.limits.max_sessions_per_user_ip);
    let service = Arc::new(ImapService { config: config.clone(), acceptor, gate: gate.clone(), upstream: connector });
    let smtp_upstream = Arc::new(Connector::new(&config.upstream_smtp, config.limits.upstream_timeout)?);
    let smtp = Arc::new(SmtpService {
        config: config.clone(),
        acceptor: TlsAcceptor::from(crate::tls::server_config(&certs, &["smtp"])?),
        gate: gate.clone(),
        upstream: smtp_upstream.clone(),
        upstream_extensions: std::sync::RwLock::new(None),
    });
    let notify_task = config.notify.enabled.then(|| {
        tokio::spawn(crate::notify::run(crate::notify::Sender {
            notifier,
            config: config.clone(),
            upstream: smtp_upstream,
        }))
    });
    // POP3 is on only with `[upstream.pop3]` (config makes listeners without it an error).
    let pop3 = match &config.upstream_pop3 {
        Some(up) => Some(Arc::new(Pop3Service {
            config: config.clone(),
            acceptor: TlsAcceptor::from(crate::tls::server_config(&certs, &["pop3"])?),
            gate: gate.clone(),
            upstream: Pop3Upstream(Arc::new(Connector::new(up, config.limits.upstream_timeout)?)),
        })),
        None => None,
    };
    let sieve = match &config.upstream_sieve {
        Some(up) => Some(Arc::new(SieveService {
            config: config.clone(),
            acceptor: TlsAcceptor::from(crate::tls::server_config(&certs, &["managesieve"])?),
            gate,
            upstream: SieveUpstream::new(Arc::new(Connector::new(up, config.limits.upstream_timeout)?)),
        })),
        None => None,
    };
    if let Some(sieve) = &sieve {
        // Read upstream's Sieve extensions now, so the first client's greeting has them
        // and a wrong [upstream.sieve] shows up in the log at start.
        let up = sieve.upstream.clone();
        tokio::spawn(async move { up.listing().await });
    }
    if !(config.smtp_tls.is_empty() && config.smtp_starttls.is_empty()) {
        let probe = smtp.clone();
        tokio::spawn(async move { probe.probe_upstream().await });
    }

    let web = Arc::new(crate::web::Web {
        config: config.clone(),
        auth: auth.clone(),
        key: key.clone(),
        live: sessions.clone(),
        web_sessions: crate::web::WebSessions::new(store.clone(), key.clone())
            .with_ipv6_prefix(config.limits.ipv6_prefix),
        clock: Arc::new(crate::auth::clock::SystemClock),
        certs: Some(certs.clone()),
    });
    let router = crate::web::router(web);
    let web_acceptor = TlsAcceptor::from(crate::tls::server_config(&certs, &["h2", "http/1.1"])?);
    let admin_ctx = Arc::new(admin::Context {
        store: store.clone(),
        key,
        issuer: config.hostname.clone(),
        live: Some(sessions.clone()),
        hashing: Some(auth.clone()),
    });
    let socket_path = config.admin_socket_path();
    let admin_listener = admin::socket::bind(&socket_path)
        .map_err(|error| AppError::AdminSocket { path: socket_path.clone(), error })?;
    let admin_task = tokio::spawn(admin::socket::serve(admin_listener, admin_ctx));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (tasks_guard, all_done) = crate::net::listener::task_guard();
    let mut tasks = Vec::new();
    let pp = &config.proxy_protocol;
    let policy = Arc::new(crate::net::listener::ProxyPolicy {
        trusted: pp.trusted.clone(),
        timeout: config.limits.tls_handshake_timeout,
    });
    let proxy = |on: bool| on.then(|| policy.clone());
    let mut mail =
        MailListeners { tasks: &mut tasks, limits: &limits, stop: &stop_rx, guard: &tasks_guard, proxy: &policy };
    mail.add(listeners.imap_tls, &service, true, pp.imap, "IMAP");
    mail.add(listeners.imap_starttls, &service, false, pp.imap, "IMAP");
    mail.add(listeners.smtp_tls, &smtp, true, pp.smtp, "SMTP");
    mail.add(listeners.smtp_starttls, &smtp, false, pp.smtp, "SMTP");
    if let Some(pop3) = &pop3 {
        mail.add(listeners.pop3_tls, pop3, true, pp.pop3, "POP3");
        mail.add(listeners.pop3_starttls, pop3, false, pp.pop3, "POP3");
    }
    if let Some(sieve) = &sieve {
        mail.add(listeners.sieve, sieve, false, pp.sieve, "ManageSieve");
    }
    for l in listeners.web {
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, "web step listening (HTTPS)");
        }
        let router = router.clone();
        let acceptor = web_acceptor.clone();
        let handshake = config.limits.tls_handshake_timeout;
        // The web step counts its connections apart from IMAP and SMTP, so that browsers
        // (or someone holding HTTPS connections) cannot use up the mail connection slots.
        tasks.push(tokio::spawn(accept_loop(
            l,
            web_limits.clone(),
            stop_rx.clone(),
            proxy(pp.web),
            // Browsers keep idle connections open: shutdown does not wait for them.
            crate::net::listener::task_guard().0,
            move |tcp, peer| crate::web::serve_connection(router.clone(), acceptor.clone(), tcp, peer.ip(), handshake),
        )));
    }
    // Scrapes go on until the end (aborted after the sessions have ended).
    let mut metrics_tasks = Vec::new();
    for l in listeners.metrics {
        if let Ok(a) = l.local_addr() {
            tracing::info!(address = %a, kind = crate::metrics::describe(a), "metrics listening (plain HTTP, /metrics)");
        }
        metrics_tasks.push(tokio::spawn(crate::metrics::serve(l, metrics.clone())));
    }
    tracing::info!(
        upstream = %config.upstream_imap.address,
        data_dir = %config.data_dir.display(),
        admin_socket = %socket_path.display(),
        "mailgate serving"
    );
    crate::systemd::ready();
    let watchdog = crate::systemd::watchdog().map(tokio::spawn);
    // TLS-ALPN-01 is answered on the listeners, so the first order starts once they are up.
    let acme_task = config.acme.clone().map(|acme| tokio::spawn(crate::acme::keep_issued(acme, certs.clone())));
    shutdown.await;
    crate::systemd::stopping();
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    // Tell the clients of live sessions (IMAP `* BYE`, SMTP `421`, POP3 `-ERR`; those not logged in
    // saw the stop signal) and wait until every connection task has ended. Each goodbye
    // is bounded to 2 s; a session waiting on upstream (a message being accepted) is
    // given up after SHUTDOWN_WAIT.
    let ended = sessions.end_all();
    if ended > 0 {
        tracing::info!(sessions = ended, "ending live sessions");
    }
    drop(tasks_guard);
    if tokio::time::timeout(SHUTDOWN_WAIT, all_done.wait()).await.is_err() {
        tracing::warn!("some connections did not end in time; closing them");
    }
    admin_task.abort();
    cert_task.abort();
    // Notices not sent yet stay queued in the store for the next start.
    if let Some(t) = notify_task {
        t.abort();
    }
    if let Some(t) = acme_task {
        t.abort();
    }
    for t in metrics_tasks {
        t.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    store.flush()?;
    Ok(())
}

/// The longest shutdown waits for connections to say goodbye.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for one signal stream (forever if it could not be set up).
async fn wait(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a SIGTERM that arrives right after start-up (after
/// "mailgate serving" is logged, before `run` awaits this) must end mailgate cleanly,
/// not kill it with the signal's default action.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for {name} ({e})");
            None
        }
    };
    let mut term = listen(SignalKind::terminate(), "SIGTERM");
    let mut int = listen(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            _ = wait(term.as_mut()) => {}
            _ = wait(int.as_mut()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FdLimit, fds_needed};

    /// A SIGTERM that arrives after `shutdown_signal()` is called but before its future is
    /// first polled is seen by the future, not taken with the default action (which would
    /// kill this test process). Under load, that window was open between "mailgate
    /// serving" and the first poll: a test's SIGTERM killed serve instead of ending it.
    #[tokio::test]
    async fn a_sigterm_before_the_first_poll_ends_cleanly() {
        let stop = super::shutdown_signal();
        let sent = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()));
        let seen = tokio::time::timeout(std::time::Duration::from_secs(120), stop).await;
        assert!(seen.is_ok(), "the SIGTERM was not seen");
    }

    /// The open-file warning comes only when the limit is short of a `max_connections` the
    /// admin set; the default (10,000 → 20,256 files) on a machine whose hard limit is
    /// 20,000 starts without one.
    #[test]
    fn the_open_file_warning_is_for_limits_that_were_set() {
        assert_eq!(fds_needed(10_000), 20_256);
        let short = FdLimit::Short { got: 20_000, needed: fds_needed(10_000) };
        assert_eq!(short.warning(false), None, "the default on a normal machine");
        let w = short.warning(true).unwrap();
        assert!(w.contains("(20000)") && w.contains("(20256)") && w.contains("about 9872 relayed sessions"), "{w}");
        for fine in [FdLimit::Enough, FdLimit::Raised { to: 6256 }] {
            assert_eq!(fine.warning(true), None);
            assert_eq!(fine.warning(false), None);
        }
    }
}
