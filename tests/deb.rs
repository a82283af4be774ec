//! The Debian package (issue 19, points 2 and 3), as an admin would use it: `cargo deb`
//! packs the binary this test run built (`--no-build --profile dev`), `dpkg -i` installs
//! it, and then the installed layout is checked: the files, owners and modes, the user
//! `mailgate`, what `mailgate init` made on first install, the systemd unit
//! (`systemd-analyze verify`, exposure ≤ 2.0, not enabled). The unit's `ExecStart` runs
//! as `mailgate` with the unit's capability (setpriv), on a copy of the installed
//! configuration with loopback ports (the web step on a port below 1024) and a test
//! Dovecot upstream: it answers IMAP over TLS with the certificate init made, and the
//! admin commands work as `mailgate` (through the admin socket and on the store).
//! `dpkg --remove` keeps the data, `dpkg --purge` deletes it.
//!
//! The package is purged on drop, also when the test fails. A mailgate package that this
//! test did not install (no marker file) is left alone and the test does nothing. No
//! other test uses /usr/bin/mailgate, /etc/mailgate, /var/lib/mailgate or the user
//! `mailgate`.

use crate::support::client::{Client, tls_config};
use crate::support::daemon::{lookup_id, pick_ports, poll, tail};
use crate::support::dovecot::{Dovecot, DovecotOptions};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const UNIT: &str = "/usr/lib/systemd/system/mailgate.service";
const CONFIG: &str = "/etc/mailgate/mailgate.toml";
const FAIL2BAN_FILTER: &str = "/etc/fail2ban/filter.d/mailgate.conf";
const FAIL2BAN_JAIL: &str = "/etc/fail2ban/jail.d/mailgate.conf";
const DATA: &str = "/var/lib/mailgate";
/// Written before `dpkg -i`, removed after the purge: a package found installed with it
/// is a leftover of this test (purged first); without it, someone else's (left alone).
const MARKER: &str = "/var/tmp/mailgate-deb-test.installed";
/// The systemd unit's exposure level must stay at or below this.
const MAX_EXPOSURE: f64 = 2.0;

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What dpkg knows of the package: `None` if nothing (not installed, no config files left).
fn dpkg_status() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", "mailgate"]));
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty() && s != "un").then_some(s)
}

fn purge() -> Output {
    run(Command::new("dpkg").args(["--purge", "mailgate"]).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The installed package: `mailgate serve` stopped and the package purged on drop.
struct Installed {
    serve: Option<Child>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let out = purge();
        if out.status.success() {
            let _ = std::fs::remove_file(MARKER);
        } else {
            eprintln!("deb test: dpkg --purge mailgate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// (mode & 0o7777, owner name, group name) of `path`.
fn stat(path: &str) -> (u32, String, String) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let name = |file: &str, id: u32| {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == id.to_string()).then(|| f[0].to_string())
            })
            .unwrap_or_else(|| id.to_string())
    };
    (m.permissions().mode() & 0o7777, name("/etc/passwd", m.uid()), name("/etc/group", m.gid()))
}

fn assert_stat(path: &str, mode: u32, owner: &str, group: &str) {
    assert_eq!(stat(path), (mode, owner.to_string(), group.to_string()), "{path}: (mode, owner, group)");
}

/// `mailgate ARGS` as the user mailgate (as an admin is told to run it), with `stdin`.
fn as_mailgate(config: &str, args: &[&str], stdin: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("runuser")
        .args(["-u", "mailgate", "--", "/usr/bin/mailgate", "--config", config])
        .args(args)
        .current_dir(DATA)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn as_mailgate_ok(config: &str, args: &[&str], stdin: &str) -> String {
    let out = as_mailgate(config, args, stdin);
    assert!(out.status.success(), "mailgate {args:?} as mailgate: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A free loopback port below 1024, which only CAP_NET_BIND_SERVICE may bind.
fn privileged_port() -> u16 {
    (600..1000).rev().find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok()).expect("no free port below 1024")
}

/// Exposure level that `systemd-analyze security --offline=true` gives the unit.
fn exposure(unit: &str) -> f64 {
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=true", "--no-pager", unit]));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let after = line.split(':').nth(1).unwrap_or_default().trim();
    after.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_debian_package_installs_serves_as_mailgate_and_purges() {
    if crate::support::daemon::effective_uid() != Some(0) {
        eprintln!("deb test: skipped, needs root (dpkg -i)");
        return;
    }
    if dpkg_status().is_some() || Path::new(CONFIG).exists() || Path::new(DATA).exists() {
        if !Path::new(MARKER).exists() {
            eprintln!("deb test: skipped: a mailgate package (or its data) that this test did not install is here");
            return;
        }
        let out = purge();
        assert!(out.status.success(), "purging the leftover: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Build the .deb from the binary this run built (CARGO_BIN_EXE_mailgate is
    // target/debug/mailgate), quickly compressed, into a temporary directory.
    let out_dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_mailgate"));
    assert!(bin.ends_with("debug/mailgate"), "cargo deb --profile dev packs target/debug/mailgate, not {bin:?}");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = ok(Command::new(cargo)
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "--locked", "--output"])
        .arg(out_dir.path())
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let deb = built.lines().last().unwrap().trim().to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "cargo deb printed {built:?}");

    std::fs::write(MARKER, "installed by tests/deb.rs; removed after the purge\n").unwrap();
    let mut installed = Installed { serve: None };
    let out = ok(Command::new("dpkg").args(["-i", &deb]).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(out.contains("made secret key: /var/lib/mailgate/secret.key"), "postinst ran init:\n{out}");
    assert!(out.contains("made upstream master password: /etc/mailgate/upstream-master.secret"), "{out}");

    // Files, owners, modes.
    assert_eq!(dpkg_status().as_deref(), Some("ii"));
    assert_stat("/usr/bin/mailgate", 0o755, "root", "root");
    assert!(ok(Command::new("/usr/bin/mailgate").arg("--version")).starts_with("mailgate "));
    assert_stat("/etc/mailgate", 0o750, "root", "mailgate");
    assert_stat(CONFIG, 0o640, "root", "mailgate");
    for made in ["/etc/mailgate/cert.pem", "/etc/mailgate/key.pem", "/etc/mailgate/upstream-master.secret"] {
        assert_stat(made, 0o640, "root", "mailgate");
    }
    assert_stat(DATA, 0o700, "mailgate", "mailgate");
    assert_stat("/var/lib/mailgate/secret.key", 0o600, "mailgate", "mailgate");
    let (_, owner, group) = stat("/var/lib/mailgate/store");
    assert_eq!((owner.as_str(), group.as_str()), ("mailgate", "mailgate"), "the store init made is mailgate's");
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "mailgate"]));
    assert!(conffiles.contains(CONFIG), "{CONFIG} is a conffile: {conffiles}");
    // The fail2ban filter and jail (docs/operations.md), conffiles too, the jail off.
    for f in [FAIL2BAN_FILTER, FAIL2BAN_JAIL] {
        assert!(conffiles.contains(f), "{f} is a conffile: {conffiles}");
    }
    let jail = std::fs::read_to_string(FAIL2BAN_JAIL).unwrap();
    assert!(jail.contains("\nenabled  = false\n") && jail.contains("\nfilter   = mailgate\n"), "{jail}");
    let passwd = ok(Command::new("getent").args(["passwd", "mailgate"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "a system user: {passwd}");
    assert_eq!((fields[5], fields[6]), (DATA, "/usr/sbin/nologin"), "{passwd}");

    // The unit: valid, hardened, installed but neither enabled nor started.
    assert_stat(UNIT, 0o644, "root", "root");
    let verify = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let level = exposure(UNIT);
    eprintln!("deb test: systemd-analyze security exposure of mailgate.service: {level}");
    assert!(level <= MAX_EXPOSURE, "exposure {level} > {MAX_EXPOSURE}");
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/mailgate.service").exists());
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert_eq!(exec, "/usr/bin/mailgate --config /etc/mailgate/mailgate.toml serve");
    for line in ["Type=notify", "User=mailgate", "Group=mailgate", "WorkingDirectory=/var/lib/mailgate"] {
        assert!(unit.lines().any(|l| l == line), "{line} in the unit");
    }

    // The installed configuration with loopback ports, a test Dovecot upstream that takes
    // the master password init made, and the web step below 1024 (the unit's capability).
    let master = std::fs::read_to_string("/etc/mailgate/upstream-master.secret").unwrap().trim().to_string();
    let dovecot = Dovecot::start(DovecotOptions { master_password: master, ..Default::default() });
    let ports = pick_ports(7).unwrap();
    let web = privileged_port();
    let mut config = std::fs::read_to_string(CONFIG).unwrap();
    for (public, port) in [993, 143, 465, 587, 995, 110, 4190].into_iter().zip(&ports) {
        config = config.replace(&format!("\"0.0.0.0:{public}\""), &format!("\"127.0.0.1:{port}\""));
    }
    config = config.replace("\"0.0.0.0:443\"", &format!("\"127.0.0.1:{web}\""));
    config = config.replace("\"127.0.0.1:1143\"", &format!("\"127.0.0.1:{}\"", dovecot.port));
    assert!(!config.contains("0.0.0.0"), "every listener moved:\n{config}");
    let test_config = "/etc/mailgate/test.toml";
    std::fs::write(test_config, config).unwrap();
    ok(Command::new("chgrp").args(["mailgate", test_config]));
    std::fs::set_permissions(test_config, std::fs::Permissions::from_mode(0o640)).unwrap();

    // init on the installed layout, as mailgate: everything is there already.
    let init = as_mailgate_ok(test_config, &["init"], "");
    assert_eq!(init.lines().filter(|l| l.starts_with("kept ")).count(), 4, "{init}");

    // ExecStart as the unit runs it: user and group mailgate, CAP_NET_BIND_SERVICE only.
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("serve.log");
    let logfile = std::fs::File::create(&log).unwrap();
    let argv: Vec<String> = exec.replace(CONFIG, test_config).split_whitespace().map(String::from).collect();
    let child = Command::new("setpriv")
        .args(["--reuid=mailgate", "--regid=mailgate", "--init-groups"])
        .args(["--inh-caps=-all,+net_bind_service", "--ambient-caps=-all,+net_bind_service"])
        .args(["--bounding-set=-all,+net_bind_service", "--no-new-privs", "--"])
        .args(&argv)
        .current_dir(DATA)
        .stdin(Stdio::null())
        .stdout(logfile.try_clone().unwrap())
        .stderr(logfile)
        .spawn()
        .unwrap();
    installed.serve = Some(child);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let imaps = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let up = poll(Duration::from_secs(30), || {
        read_log().contains("mailgate serving") || installed.serve.as_mut().unwrap().try_wait().unwrap().is_some()
    });
    assert!(up && read_log().contains("mailgate serving"), "serve did not come up:\n{}", tail(&read_log(), 40));
    assert!(read_log().contains(&format!("web step on https://127.0.0.1:{web}")), "{}", read_log());
    let pid = installed.serve.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = lookup_id("/etc/passwd", "mailgate").unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some(&uid.to_string())));

    // Admin commands as mailgate while serve runs (through the admin socket).
    as_mailgate_ok(test_config, &["user", "add", "alice@example.com", "--password-stdin"], "a-long-account-password\n");
    let created =
        as_mailgate_ok(test_config, &["app-password", "create", "alice@example.com", "--label", "deb test"], "");
    let app = created.lines().last().unwrap().to_string();
    assert!(as_mailgate_ok(test_config, &["app-password", "list", "alice@example.com"], "").contains("deb test"));

    // IMAP over TLS with the certificate init made, logged in upstream as alice.
    let mut c = Client::tls(imaps, tls_config(Path::new("/etc/mailgate/cert.pem"), &["imap"]))
        .unwrap_or_else(|e| panic!("TLS to the installed mailgate: {e}\n{}", read_log()));
    let greeting = c.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let r = c.cmd("a", &format!("LOGIN alice@example.com \"{app}\""));
    assert!(r.last().unwrap().starts_with("a OK"), "{r:?}\n{}", tail(&read_log(), 30));
    let r = c.cmd("b", "SELECT INBOX");
    assert!(r.last().unwrap().starts_with("b OK"), "{r:?}");
    drop(c);

    // Stopped: root is sent to the right user instead of making root-owned files in the
    // store; as mailgate the command opens the store itself.
    let mut serve = installed.serve.take().unwrap();
    ok(Command::new("kill").args(["-TERM", &serve.id().to_string()]));
    assert!(serve.wait().unwrap().success(), "serve did not stop cleanly:\n{}", tail(&read_log(), 30));
    let as_root = run(Command::new("/usr/bin/mailgate").args(["--config", test_config, "user", "list"]));
    let err = String::from_utf8_lossy(&as_root.stderr);
    assert!(!as_root.status.success() && err.contains("runuser -u mailgate"), "{err}");
    assert!(as_mailgate_ok(test_config, &["user", "list"], "").contains("alice@example.com"));

    // Upgrade (the package installed over itself, as an upgrade runs its scripts): the
    // admin's edit of the conffile stays, init does not run again (the key is the same
    // bytes), the accounts are still there, and serve still starts on them.
    let key_before = std::fs::read("/var/lib/mailgate/secret.key").unwrap();
    let mut edited = std::fs::read_to_string(CONFIG).unwrap();
    edited.push_str("\n# edited by the admin (deb test)\n");
    std::fs::write(CONFIG, &edited).unwrap();
    let out = ok(Command::new("dpkg").args(["-i", "--force-confold", &deb]).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(!out.contains("made upstream master password"), "init ran again on upgrade: {out}");
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited, "the admin's conffile edit is kept");
    assert_eq!(std::fs::read("/var/lib/mailgate/secret.key").unwrap(), key_before, "secret.key is kept");
    assert_stat(DATA, 0o700, "mailgate", "mailgate");
    assert!(as_mailgate_ok(test_config, &["user", "list"], "").contains("alice@example.com"));

    // Remove keeps the data and the configuration; purge deletes both.
    ok(Command::new("dpkg").args(["--remove", "mailgate"]).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(!Path::new("/usr/bin/mailgate").exists());
    assert!(!Path::new(UNIT).exists());
    assert!(Path::new("/var/lib/mailgate/secret.key").exists() && Path::new("/var/lib/mailgate/store").exists());
    assert!(Path::new(CONFIG).exists() && Path::new("/etc/mailgate/key.pem").exists());
    let out = purge();
    assert!(out.status.success(), "dpkg --purge: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!Path::new(DATA).exists(), "purge deletes {DATA}");
    assert!(!Path::new(FAIL2BAN_JAIL).exists() && !Path::new(FAIL2BAN_FILTER).exists(), "purge deletes conffiles");
    assert!(!Path::new("/etc/mailgate").exists(), "purge deletes /etc/mailgate");
    assert_eq!(dpkg_status(), None);
    drop(installed);
    assert!(!Path::new(MARKER).exists());
}
