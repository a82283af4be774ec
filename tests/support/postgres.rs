//! Test support: run a private PostgreSQL 15 cluster on loopback.
//!
//! Every [`Postgres`] gets its own temporary directory, owned by the `postgres`
//! system user, holding the data directory (`data/`, made by `initdb`), the unix
//! socket (`.s.PGSQL.<port>`) and the server log (`postgres.log`, the postmaster's
//! stderr). The system cluster (/etc/postgresql, /var/lib/postgresql, port 5432)
//! and the system service are never used or touched; only the postmaster started
//! here (and its own child processes, on [`Postgres::kill`] or a hung stop) is
//! signalled.
//!
//! The cluster:
//! - `initdb --auth-local=trust --auth-host=scram-sha-256 -U postgres --locale=C
//!   --encoding=UTF8` with a superuser password file; pg_hba.conf is then replaced by
//!   `local all all trust` (socket in the private dir, used by [`Postgres::psql`]) and
//!   `host all all 127.0.0.1/32 scram-sha-256` (nothing else: no IPv6, no replication).
//! - Role `mailgate` (LOGIN, SCRAM password, not superuser) owns database `mailgate`.
//!   [`Postgres::url`] is `postgres://mailgate:<pw>@127.0.0.1:<port>/mailgate`.
//! - `listen_addresses = '127.0.0.1'`, `port` = a free loopback port (picked, and
//!   picked again if someone took it before the postmaster bound it),
//!   `unix_socket_directories` = the private dir, `shared_buffers = 16MB`. Durability
//!   settings (fsync, synchronous_commit, full_page_writes) keep their defaults so
//!   crash tests mean something; only initdb's final sync is skipped (`--no-sync`).
//!
//! Processes run as the `postgres` user (PostgreSQL refuses root) through
//! `std::os::unix::process::CommandExt::{uid, gid}`, not `runuser`: runuser stays
//! as a watching parent, so the spawned PID would not be the postmaster's. The
//! postmaster runs in the foreground (`postgres -D data`), so [`Postgres::pid`] is
//! its PID. All `PG*` environment variables are removed from the spawned commands.
//!
//! Requirements: PostgreSQL 15 binaries in `/usr/lib/postgresql/15/bin` (Debian
//! `postgresql-15`; override the directory with `MAILGATE_TEST_PG_BIN`), the
//! `postgres` system user (created by the package), and running as root.
//!
//! Only std and `tempfile` are used; the helpers shared with the other harnesses are in
//! [`super::daemon`].

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::daemon::{
    START_ATTEMPTS, StartError, check_running, child_processes, effective_uid, free_port, poll, proc_state, read_log,
    retry_start, signal, signal_and_wait, still_alive, tail, temp_dir, try_chown, try_poll, try_set_mode,
};

use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Default directory of the PostgreSQL binaries (Debian `postgresql-15`).
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Superuser name (trust over the private unix socket; password over TCP).
pub const SUPERUSER: &str = "postgres";
/// The application role and database.
pub const APP_USER: &str = "mailgate";
pub const APP_DB: &str = "mailgate";
/// How long a start waits until the server accepts TCP connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Postgres::stop`] waits after SIGINT (fast shutdown) before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A private PostgreSQL cluster; stopped and removed on drop.
pub struct Postgres {
    /// TCP port on 127.0.0.1 (also the unix socket's port number). Kept across
    /// [`Postgres::restart`].
    pub port: u16,
    /// Everything lives here (owned by the `postgres` user); removed on drop.
    pub dir: tempfile::TempDir,
    password: String,
    superuser_password: String,
    child: Option<Child>,
    pid: u32,
}

impl Postgres {
    /// Create, start and provision a cluster (role and database `mailgate`); wait
    /// (max 30 s) until it accepts TCP connections. Panics with the log tail on failure.
    pub fn start() -> Postgres {
        preflight();
        let (uid, gid) = postgres_ids();
        let dir = temp_dir("mailgate-postgres-").unwrap_or_else(|e| panic!("postgres: create temp dir: {e}"));
        let root = dir.path().to_path_buf();
        set_mode(&root, 0o700);
        chown(&root, uid, gid);

        let mut pg = Postgres {
            port: 0,
            dir,
            password: random_password(),
            superuser_password: random_password(),
            child: None,
            pid: 0,
        };
        pg.initdb();

        retry_start(|| {
            pg.port = free_port().unwrap_or_else(|e| panic!("postgres: pick a free port: {e}"));
            pg.spawn_and_wait()
        })
        .unwrap_or_else(|last| panic!("postgres: could not bind a free port after {START_ATTEMPTS} attempts\n{last}"));
        pg.provision();
        pg
    }

    /// `postgres://mailgate:<pw>@127.0.0.1:<port>/mailgate` (password auth over TCP).
    pub fn url(&self) -> String {
        format!("postgres://{APP_USER}:{}@127.0.0.1:{}/{APP_DB}", self.password, self.port)
    }

    /// Same as [`Postgres::url`] for the superuser `postgres` (database `mailgate`).
    pub fn superuser_url(&self) -> String {
        format!("postgres://{SUPERUSER}:{}@127.0.0.1:{}/{APP_DB}", self.superuser_password, self.port)
    }

    /// The `mailgate` role's password (URL-safe characters only).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// PID of the postmaster (changes on [`Postgres::restart`]; stale after stop/kill).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True while the postmaster started here has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The data directory (`<dir>/data`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the unix socket (the private dir).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log of every start so far (postmaster stderr: `%m [%p] ` prefixed
    /// lines, connections are logged), preceded by initdb's output if initdb failed.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// Poll the log until it contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.log().contains(needle))
    }

    /// Run `sql` (any number of statements; psql meta-commands allowed) with psql as
    /// the superuser over the unix socket, in database `mailgate`, with
    /// `ON_ERROR_STOP=1`, unaligned tuples-only output (`-At`, `|` between columns)
    /// and quiet (no command tags). Returns stdout; panics with stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db(APP_DB, sql)
    }

    /// [`Postgres::psql`] in another database (e.g. `postgres`).
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.bin_cmd("psql");
        cmd.arg("-h").arg(self.socket_dir()).arg("-p").arg(self.port.to_string());
        cmd.args(["-U", SUPERUSER, "-d", db]);
        run_psql(cmd, sql).unwrap_or_else(|e| panic!("postgres: psql as {SUPERUSER} on db {db} failed: {e}"))
    }

    /// Fast shutdown (SIGINT: abort transactions, disconnect clients, checkpoint);
    /// SIGKILL if it has not exited within 30 s. No-op when not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            let _ = child.wait();
            return;
        }
        if signal_and_wait(&mut child, "INT", STOP_TIMEOUT) {
            kill_with_children(&mut child);
        }
        let _ = child.wait();
    }

    /// Crash: SIGKILL the postmaster and its child processes (backends, checkpointer,
    /// walwriter, ...; the postmaster is SIGSTOPped while they are listed and killed
    /// first), so nothing is flushed or shut down cleanly, no backend gets to send an
    /// error, and every client connection just breaks (RST/EOF). Committed data survives in
    /// the WAL (fsync stays on); [`Postgres::restart`] then runs crash recovery.
    /// No-op when not running.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill_with_children(&mut child);
        let _ = child.wait();
    }

    /// Stop (fast shutdown, if running) and start again on the same port and data
    /// directory; waits until it accepts TCP connections. Also the way to bring the
    /// server back after [`Postgres::stop`] or [`Postgres::kill`]. Panics if the port
    /// stays taken (retries for ~5 s) or the server does not come up.
    pub fn restart(&mut self) {
        self.stop();
        let started = retry_start(|| {
            let r = self.spawn_and_wait();
            if matches!(r, Err(StartError::PortTaken(_))) {
                sleep(Duration::from_secs(1));
            }
            r
        });
        if let Err(last) = started {
            panic!("postgres: restart: port {} stays taken\n{last}", self.port);
        }
    }

    /// Turns TLS on (a certificate for 127.0.0.1 from a fresh test CA) and allows TCP
    /// connections only over TLS (`hostssl`); restarts. Returns the CA's PEM file.
    pub fn require_tls(&mut self) -> PathBuf {
        let (uid, gid) = postgres_ids();
        let pki = super::pki::make(self.dir.path(), "postgres", &["127.0.0.1", "localhost"]);
        for f in [&pki.cert, &pki.key, &pki.ca] {
            chown(f, uid, gid);
        }
        set_mode(&pki.key, 0o600);
        let conf_path = self.data_dir().join("postgresql.conf");
        let mut conf = fs::read_to_string(&conf_path).unwrap();
        conf.push_str(&format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            pki.cert.display(),
            pki.key.display()
        ));
        write_as_postgres(&conf_path, &conf);
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n";
        write_as_postgres(&self.data_dir().join("pg_hba.conf"), hba);
        self.restart();
        pki.ca
    }

    fn bin_cmd(&self, name: &str) -> Command {
        let mut cmd = Command::new(pg_bin().join(name));
        clean_env(&mut cmd);
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// A command that runs as the `postgres` user.
    fn pg_user_cmd(&self, name: &str) -> Command {
        let (uid, gid) = postgres_ids();
        let mut cmd = self.bin_cmd(name);
        cmd.uid(uid).gid(gid).env("HOME", self.dir.path()).env("USER", SUPERUSER).env("LOGNAME", SUPERUSER);
        cmd
    }

    fn initdb(&self) {
        let root = self.dir.path();
        let (uid, gid) = postgres_ids();
        let pwfile = root.join("superuser.pw");
        fs::write(&pwfile, format!("{}\n", self.superuser_password))
            .unwrap_or_else(|e| panic!("postgres: write {}: {e}", pwfile.display()));
        set_mode(&pwfile, 0o600);
        chown(&pwfile, uid, gid);
        let out = self
            .pg_user_cmd("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
            .output()
            .unwrap_or_else(|e| panic!("postgres: spawn {}: {e}", pg_bin().join("initdb").display()));
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            panic!(
                "postgres: initdb failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Exactly what the tests need, nothing from the package defaults.
        let hba = "# Generated by tests/support/postgres.rs -- test cluster, not for production.\n\
                   local all all trust\n\
                   host  all all 127.0.0.1/32 scram-sha-256\n";
        write_as_postgres(&self.data_dir().join("pg_hba.conf"), hba);

        let conf_path = self.data_dir().join("postgresql.conf");
        let mut conf =
            fs::read_to_string(&conf_path).unwrap_or_else(|e| panic!("postgres: read {}: {e}", conf_path.display()));
        conf.push_str(&format!(
            "\n# --- tests/support/postgres.rs (the port is given with -p) ---\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             shared_buffers = 16MB\n\
             password_encryption = 'scram-sha-256'\n\
             logging_collector = off\n\
             log_destination = 'stderr'\n\
             log_line_prefix = '%m [%p] '\n\
             log_connections = on\n\
             log_disconnections = on\n\
             lc_messages = 'C'\n",
            root.display()
        ));
        write_as_postgres(&conf_path, &conf);
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let fatal = |what: &str, e: std::io::Error| StartError::Fatal(format!("postgres: {what}: {e}"));
        let log_start = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let log =
            fs::OpenOptions::new().create(true).append(true).open(self.log_path()).map_err(|e| fatal("open log", e))?;
        let log_err = log.try_clone().map_err(|e| fatal("dup log", e))?;
        let child = self
            .pg_user_cmd("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| fatal(&format!("spawn {}", pg_bin().join("postgres").display()), e))?;
        self.pid = child.id();
        self.child = Some(child);

        match self.wait_ready(log_start) {
            Ok(()) => Ok(()),
            Err(reason) => {
                self.stop();
                let new_log = self.log().get(log_start as usize..).unwrap_or_default().to_owned();
                let msg = format!(
                    "postgres failed to start on 127.0.0.1:{} ({reason})\n--- log tail ---\n{}",
                    self.port,
                    tail(&new_log, 40)
                );
                Err(StartError::from_log(&new_log, msg))
            }
        }
    }

    /// Ready = our postmaster is alive, has logged "ready to accept connections" in
    /// this run (so a server answering on the port is ours), and `pg_isready` over TCP
    /// says it accepts connections.
    fn wait_ready(&mut self, log_start: u64) -> Result<(), String> {
        let ready = try_poll(START_TIMEOUT, Duration::from_millis(50), || {
            check_running(self.child.as_mut(), "postmaster")?;
            let ready_logged =
                self.log().get(log_start as usize..).is_some_and(|l| l.contains("ready to accept connections"));
            Ok::<bool, String>(ready_logged && self.pg_isready())
        })?;
        if ready { Ok(()) } else { Err(format!("not accepting TCP connections within {START_TIMEOUT:?}")) }
    }

    fn pg_isready(&self) -> bool {
        self.bin_cmd("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", SUPERUSER, "-d", "postgres", "-t", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn provision(&self) {
        // CREATE DATABASE cannot run in a transaction block: psql -f runs each
        // statement on its own (autocommit).
        self.psql_db(
            "postgres",
            &format!(
                "CREATE ROLE {APP_USER} LOGIN PASSWORD '{}';\nCREATE DATABASE {APP_DB} OWNER {APP_USER};\n",
                self.password
            ),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The TempDir field is dropped after this, i.e. after the server is gone.
        self.stop();
    }
}

/// Run psql against `url` (e.g. [`Postgres::url`]) with `sql` on stdin, never
/// prompting for a password; same output format as [`Postgres::psql`]. Ok(stdout),
/// or Err(status and stderr), e.g. for a wrong password.
pub fn psql_url(url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new(pg_bin().join("psql"));
    clean_env(&mut cmd);
    cmd.arg(url);
    run_psql(cmd, sql)
}

fn run_psql(mut cmd: Command, sql: &str) -> Result<String, String> {
    cmd.args(["-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn psql: {e}"))?;
    {
        let mut stdin = child.stdin.take().expect("psql stdin");
        // psql may exit early (e.g. connection refused): a broken pipe is not the error.
        let _ = stdin.write_all(sql.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("wait psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}\n--- stderr ---\n{}--- stdout ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// No PGHOST/PGPORT/PGPASSWORD/... from the caller's environment; English messages.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("LC_ALL", OsString::from("C.UTF-8"));
}

/// SIGKILL the (un-reaped, so its PID is still ours) postmaster together with its
/// direct children, identified by PID and start time. The postmaster is stopped
/// (SIGSTOP, and /proc shows it stopped) first so that it cannot fork a backend
/// between listing and killing. (A process group would not do: every PostgreSQL
/// child calls setsid().)
fn kill_with_children(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let master = child.id();
    signal(&[master], "STOP");
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && !matches!(proc_state(master), Some('T' | 't') | None) {
        sleep(Duration::from_millis(1));
    }
    let children = child_processes(master);
    // Children first: they notice the postmaster's death at once (and would answer
    // clients with "terminating connection due to unexpected postmaster exit").
    let pids: Vec<u32> = children.iter().map(|(p, _)| *p).collect();
    if !pids.is_empty() {
        signal(&pids, "KILL");
    }
    signal(&[master], "KILL");
    let _ = child.wait();
    // Children already exited or are dying; wait so the next start does not find
    // the old shared memory still attached.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !still_alive(&children).is_empty() {
        sleep(Duration::from_millis(20));
    }
}

fn pg_bin() -> PathBuf {
    std::env::var_os("MAILGATE_TEST_PG_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN))
}

fn preflight() {
    let bin = pg_bin();
    for name in ["initdb", "postgres", "psql", "pg_isready"] {
        if !bin.join(name).is_file() {
            panic!(
                "postgres: {} not found (install postgresql-15, or set MAILGATE_TEST_PG_BIN to the bin directory)",
                bin.join(name).display()
            );
        }
    }
    if effective_uid() != Some(0) {
        panic!(
            "postgres: the PostgreSQL test harness must run as root (it runs the server as \
             the postgres user); effective uid is {:?}",
            effective_uid()
        );
    }
    if lookup_passwd("postgres").is_none() {
        panic!("postgres: no `postgres` user in /etc/passwd (created by the postgresql-common package)");
    }
}

/// uid and primary gid of the `postgres` system user.
fn postgres_ids() -> (u32, u32) {
    lookup_passwd("postgres").expect("postgres user exists (checked in preflight)")
}

fn lookup_passwd(name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.first() != Some(&name) {
            return None;
        }
        Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
    })
}

/// 32 hex digits from the clock, the PID and a counter: unique per cluster, URL-safe.
fn random_password() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17);
    let mut out = String::from("pw");
    for _ in 0..2 {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.push_str(&format!("{z:016x}"));
    }
    out
}

fn write_as_postgres(path: &Path, content: &str) {
    let (uid, gid) = postgres_ids();
    fs::write(path, content).unwrap_or_else(|e| panic!("postgres: write {}: {e}", path.display()));
    set_mode(path, 0o600);
    chown(path, uid, gid);
}

/// chmod, panicking with a `postgres:` message.
fn set_mode(path: &Path, mode: u32) {
    try_set_mode(path, mode).unwrap_or_else(|e| panic!("postgres: {e}"));
}

/// chown, panicking with a `postgres:` message.
fn chown(path: &Path, uid: u32, gid: u32) {
    try_chown(path, uid, gid).unwrap_or_else(|e| panic!("postgres: {e}"));
}
