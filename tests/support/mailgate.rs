//! Runs the real `mailgate` binary with a config in a temporary directory, as an admin
//! would, and stops it (by PID) on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailgate")
}

/// A free loopback port for a server to listen on ([`super::daemon::pick_ports`]).
pub fn free_port() -> u16 {
    super::daemon::free_port().unwrap()
}

/// How to configure the mailgate under test.
pub struct Options {
    /// Upstream IMAP address.
    pub upstream: String,
    /// `[upstream.imap]` extra lines (tls, login, ca_file, …).
    pub upstream_extra: String,
    /// Master password written to the secret file.
    pub master_password: String,
    /// Extra `[limits]` lines.
    pub limits: String,
    /// `[server] public_url`; `{web}` is replaced by the web step's address.
    pub public_url: String,
    /// `[server] hostname`.
    pub hostname: String,
    /// Upstream SMTP address.
    pub smtp_upstream: String,
    /// `[upstream.smtp]` extra lines.
    pub smtp_upstream_extra: String,
    /// `[smtp]` extra lines.
    pub smtp_extra: String,
    /// Whole extra sections appended at the end (e.g. `[accounts]`).
    pub extra_sections: String,
    /// The `[notify]` lines. Off by default here (`enabled = false`), so the security
    /// notifications of a test's own changes never land in a sink it counts; the
    /// notification tests (tests/notify.rs) set their own.
    pub notify: String,
    /// `[web]` extra lines (e.g. `organisation = "…"`).
    pub web_extra: String,
    /// Upstream POP3 address: with it, `[upstream.pop3]` and the two POP3 listeners
    /// ([`Mailgate::pop3s`], [`Mailgate::pop3`]). `None`: POP3 off.
    pub pop3_upstream: Option<String>,
    /// `[upstream.pop3]` extra lines (e.g. `xclient = true`).
    pub pop3_upstream_extra: String,
    /// Upstream ManageSieve address: with it, `[upstream.sieve]` and the ManageSieve
    /// listener ([`Mailgate::sieve`]). `None`: ManageSieve off.
    pub sieve_upstream: Option<String>,
    /// `[upstream.sieve]` extra lines (e.g. `xclient = true`).
    pub sieve_upstream_extra: String,
    /// `[tls]` extra lines (e.g. `reload_check_secs = 1`).
    pub tls_extra: String,
    /// Extra environment of `mailgate serve` (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upstream: format!("127.0.0.1:{}", free_port()),
            upstream_extra: String::new(),
            master_password: "master-secret".into(),
            limits: "auth_failure_delay_ms = 200\n".into(),
            public_url: "https://mail.example.test".into(),
            hostname: "mail.example.test".into(),
            smtp_upstream: format!("127.0.0.1:{}", free_port()),
            smtp_upstream_extra: String::new(),
            smtp_extra: String::new(),
            extra_sections: String::new(),
            notify: "enabled = false".into(),
            web_extra: String::new(),
            pop3_upstream: None,
            pop3_upstream_extra: String::new(),
            sieve_upstream: None,
            sieve_upstream_extra: String::new(),
            tls_extra: String::new(),
            env: Vec::new(),
        }
    }
}

/// A running mailgate.
pub struct Mailgate {
    child: Option<Child>,
    /// Its working directory (config/, certs/, data/).
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// IMAP implicit TLS.
    pub imaps: SocketAddr,
    /// IMAP STARTTLS.
    pub imap: SocketAddr,
    /// SMTP submission, implicit TLS.
    pub smtps: SocketAddr,
    /// SMTP submission, STARTTLS.
    pub submission: SocketAddr,
    /// The web step (HTTPS).
    pub web: SocketAddr,
    /// POP3 implicit TLS (with [`Options::pop3_upstream`]).
    pub pop3s: Option<SocketAddr>,
    /// POP3 STLS (with [`Options::pop3_upstream`]).
    pub pop3: Option<SocketAddr>,
    /// ManageSieve, STARTTLS (with [`Options::sieve_upstream`]).
    pub sieve: Option<SocketAddr>,
    /// CA the test clients trust.
    pub ca: PathBuf,
    /// The server's certificate chain (`[tls] cert`; its CA can sign another:
    /// [`super::pki::another_leaf`] with prefix `mailgate` in `certs/`).
    pub cert: PathBuf,
    /// The server's key (`[tls] key`).
    pub key: PathBuf,
    log: PathBuf,
    /// [`Options::env`], kept for restarts.
    env: Vec<(String, String)>,
}

impl Mailgate {
    /// Writes the config, makes a CA-signed certificate, starts `mailgate serve` and waits
    /// until both IMAP ports accept connections.
    pub fn start(opts: Options) -> Mailgate {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        let pki = super::pki::make(&dir.path().join("certs"), "mailgate", &["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("config/master.secret"), format!("{}\n", opts.master_password)).unwrap();
        let config = dir.path().join("config/mailgate.toml");
        let log = dir.path().join("mailgate.log");
        let write_config = |imaps: SocketAddr,
                            imap: SocketAddr,
                            smtps: SocketAddr,
                            submission: SocketAddr,
                            web: SocketAddr,
                            pop3: Option<(SocketAddr, SocketAddr)>,
                            sieve: Option<SocketAddr>| {
            let sieve = match (&opts.sieve_upstream, sieve) {
                (Some(up), Some(listen)) => format!(
                    "[sieve]\nlisten = [\"{listen}\"]\n\
                     [upstream.sieve]\naddress = \"{up}\"\nmaster_user = \"mailgate\"\n\
                     master_password_file = \"config/master.secret\"\n{}\n",
                    opts.sieve_upstream_extra
                ),
                _ => String::new(),
            };
            let pop3 = match (&opts.pop3_upstream, pop3) {
                (Some(up), Some((tls, plain))) => format!(
                    "[pop3]\nlisten_tls = [\"{tls}\"]\nlisten_starttls = [\"{plain}\"]\n\
                         [upstream.pop3]\naddress = \"{up}\"\nmaster_user = \"mailgate\"\n\
                         master_password_file = \"config/master.secret\"\n{}\n",
                    opts.pop3_upstream_extra
                ),
                _ => String::new(),
            };
            let text = format!(
                r#"[server]
hostname = "{hostname}"
public_url = "{public_url}"
data_dir = "data"
[tls]
cert = "{cert}"
key = "{key}"
{tls_extra}
[imap]
listen_tls = ["{imaps}"]
listen_starttls = ["{imap}"]
[web]
listen = ["{web}"]
{web_extra}
[smtp]
listen_tls = ["{smtps}"]
listen_starttls = ["{submission}"]
{smtp_extra}
[upstream.smtp]
address = "{smtp_upstream}"
master_user = "mailgate"
master_password_file = "config/master.secret"
{smtp_upstream_extra}
[upstream.imap]
address = "{upstream}"
master_user = "mailgate"
master_password_file = "config/master.secret"
{extra}
[limits]
{limits}
{pop3}
{sieve}
[notify]
{notify}
{extra_sections}
"#,
                public_url = opts.public_url.replace("{web}", &web.to_string()),
                hostname = opts.hostname,
                cert = pki.cert.display(),
                key = pki.key.display(),
                upstream = opts.upstream,
                extra = opts.upstream_extra,
                limits = opts.limits,
                smtp_extra = opts.smtp_extra,
                smtp_upstream = opts.smtp_upstream,
                smtp_upstream_extra = opts.smtp_upstream_extra,
                extra_sections = opts.extra_sections,
                notify = opts.notify,
                web_extra = opts.web_extra,
                tls_extra = opts.tls_extra,
            );
            std::fs::write(&config, text).unwrap();
        };
        // Free ports are checked by binding and letting go, so another test may take one in
        // between (rarely: see `pick_ports`): then try again with new ports.
        let mut attempt = 0;
        loop {
            let p = super::daemon::pick_ports(8).unwrap();
            let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], p[i]));
            let (imaps, imap, smtps, submission, web) = (at(0), at(1), at(2), at(3), at(4));
            let pop3 = opts.pop3_upstream.as_ref().map(|_| (at(5), at(6)));
            let sieve = opts.sieve_upstream.as_ref().map(|_| at(7));
            write_config(imaps, imap, smtps, submission, web, pop3, sieve);
            match spawn_child(dir.path(), &config, &log, imaps, imap, &opts.env) {
                Ok(child) => {
                    return Mailgate {
                        child: Some(child),
                        dir,
                        config,
                        imaps,
                        imap,
                        smtps,
                        submission,
                        web,
                        pop3s: pop3.map(|p| p.0),
                        pop3: pop3.map(|p| p.1),
                        sieve,
                        ca: pki.ca,
                        cert: pki.cert,
                        key: pki.key,
                        log,
                        env: opts.env.clone(),
                    };
                }
                Err(text) if attempt < 5 && text.contains("cannot listen on") => attempt += 1,
                Err(text) => panic!("mailgate did not start:\n{text}"),
            }
        }
    }

    /// Starts the server on its config. If a listen port was taken while it was stopped
    /// (rare: see [`super::daemon::pick_ports`]), moves every listener to new ports in the
    /// config and tries again.
    fn spawn(&mut self) {
        let mut attempt = 0;
        loop {
            match spawn_child(self.dir.path(), &self.config, &self.log, self.imaps, self.imap, &self.env) {
                Ok(child) => return self.child = Some(child),
                Err(text) if attempt < 5 && text.contains("cannot listen on") => attempt += 1,
                Err(text) => panic!("mailgate did not start:\n{text}"),
            }
            let mut config = std::fs::read_to_string(&self.config).unwrap();
            let p = super::daemon::pick_ports(8).unwrap();
            let mut fresh = p.into_iter().map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
            let mut moved = |old: &mut SocketAddr| {
                let new = fresh.next().unwrap();
                config = config.replace(&format!("\"{old}\""), &format!("\"{new}\""));
                *old = new;
            };
            for a in [&mut self.imaps, &mut self.imap, &mut self.smtps, &mut self.submission, &mut self.web] {
                moved(a);
            }
            for a in [self.pop3s.as_mut(), self.pop3.as_mut(), self.sieve.as_mut()].into_iter().flatten() {
                moved(a);
            }
            std::fs::write(&self.config, config).unwrap();
        }
    }

    /// The server's directory (config, data, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGTERM, then SIGKILL) and starts it again on the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the server and starts it again on the same config and data with `env` as its
    /// extra environment (in place of [`Options::env`], kept for later restarts too), e.g.
    /// libfaketime's `LD_PRELOAD` and `FAKETIME` to move its clock.
    pub fn restart_with_env(&mut self, env: Vec<(String, String)>) {
        self.stop();
        self.env = env;
        self.spawn();
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        let _ = self.terminate();
    }

    /// SIGTERM, then waits for the server to end by itself: its exit status, or `None` if
    /// it had not ended after 30 s (then it is killed). A hang guard, not a measurement:
    /// a clean shutdown takes well under a second, and nothing but a hang takes 30 s.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Kills the server at once (SIGKILL): a node that dies.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGHUP (what `systemctl reload mailgate` does).
    pub fn hup(&self) {
        let pid = self.pid().expect("mailgate is not running");
        assert!(Command::new("kill").arg("-HUP").arg(pid.to_string()).status().unwrap().success());
    }

    /// Waits until the log holds `needle` at least `count` times; panics (with the log)
    /// if it does not within `wait`, a hang guard.
    pub fn wait_log(&self, needle: &str, count: usize, wait: Duration) {
        let deadline = Instant::now() + wait;
        while self.log().matches(needle).count() < count {
            assert!(Instant::now() < deadline, "no {count}× {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Peak resident memory of the server so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `mailgate --config … ARGS` in the server's directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, "")
    }

    /// The same, with standard input.
    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        cli_in(self.dir.path(), &self.config, args, stdin)
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "mailgate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Adds a user with an account password.
    pub fn add_user(&self, email: &str, password: &str) {
        let out = self.cli_stdin(&["user", "add", email, "--password-stdin"], &format!("{password}\n"));
        assert!(out.status.success(), "user add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// [`webclient`] against this server's web step.
    pub fn web(&self, user: &str, password: &str, actions: &[&str]) -> serde_json::Value {
        webclient(self.web.port(), &self.ca, user, password, actions)
            .unwrap_or_else(|e| panic!("web client: {e}\nmailgate: {}", self.log()))
    }

    /// Creates an app password and returns it (the last line of stdout).
    pub fn app_password(&self, email: &str, label: &str, scope: &str) -> String {
        let out = self.ok(&["app-password", "create", email, "--label", label, "--scope", scope]);
        out.lines().last().unwrap().to_string()
    }
}

/// Starts `mailgate serve` and waits until both ports accept connections; `Err(log)` if it
/// exits or does not come up within 20 s.
fn spawn_child(
    dir: &Path,
    config: &Path,
    log: &Path,
    imaps: SocketAddr,
    imap: SocketAddr,
    env: &[(String, String)],
) -> Result<Child, String> {
    let served_before = std::fs::read_to_string(log).unwrap_or_default().matches("mailgate serving").count();
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child = Command::new(bin())
        .current_dir(dir)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "debug,sled=info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}:\n{}", std::fs::read_to_string(log).unwrap_or_default()));
        }
        // "mailgate serving" is logged once every listener is bound, so a port that some other
        // process holds is never mistaken for ours.
        let up = std::fs::read_to_string(log).unwrap_or_default().matches("mailgate serving").count() > served_before;
        if up && TcpStream::connect(imaps).is_ok() && TcpStream::connect(imap).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("not up after 20 s:\n{}", std::fs::read_to_string(log).unwrap_or_default()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The web step's real pages without a browser: `tests/support/webclient.py` against
/// `https://localhost:{port}` (its actions: signin, enrol, totp:SECRET, app-password:LABEL,
/// account). What it learnt, or its output when it failed.
pub fn webclient(
    port: u16,
    ca: &Path,
    user: &str,
    password: &str,
    actions: &[&str],
) -> Result<serde_json::Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/webclient.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("https://localhost:{port}"))
        .arg(ca)
        .args([user, password])
        .args(actions)
        .output()
        .map_err(|e| e.to_string())?;
    let text = || format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(text());
    }
    serde_json::from_slice(&out.stdout).map_err(|_| text())
}

/// Runs the CLI with a config, in a directory.
pub fn cli_in(dir: &Path, config: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin())
        .current_dir(dir)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses before reading its stdin closes the pipe: that is an answer too.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

impl Drop for Mailgate {
    fn drop(&mut self) {
        self.stop();
    }
}
