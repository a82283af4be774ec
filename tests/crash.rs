//! Crash safety of the sled store under SIGKILL (issue 6 point 4, SECURITY.md §M case 96),
//! modelled on sled's own `tests/test_crash_recovery.rs`: a child process changes the
//! store in a loop and reports each change, the parent kills it with SIGKILL at a random
//! moment, reopens the store and checks that every acknowledged change is there.
//!
//! The child is `examples/crashloop.rs` (its protocol is described there). By default the
//! parent runs that code by re-executing this test binary (`crashloop_child` below), so it
//! is always built from the current sources: `cargo test --test integration` does not
//! build examples, and a stale `target/*/examples/crashloop` would test old code. Set
//! `MAILGATE_CRASH_BIN=target/debug/examples/crashloop` to run the example binary instead.
//!
//! The parent keeps an exact model of the account, built from the `ACK` lines of every
//! run so far. The child is sequential, so when it is killed at most one operation is in
//! flight (a `TRY` without `ACK`/`REFUSED`). After each kill the reopened store must equal
//! the model, or the model with that one operation applied; the observed state then
//! becomes the model. So: every acknowledged app password exists, byte for byte; no
//! revoked one comes back (every id ever used is checked); no spent backup code is
//! unspent again; the TOTP step never goes back; nothing appears that was never tried;
//! and the store opens every time. The child also tries, after each restart, to spend
//! codes already spent and to replay old TOTP steps; the store must refuse those.
//!
//! Knobs: `MAILGATE_CRASH_KILLS` (default 60), `MAILGATE_CRASH_SEED` (default: time).
//! On failure the directory with the store, the full transcript (`transcript.log`) and
//! the child's stderr is kept and named in the panic message.

#[allow(dead_code)]
#[path = "../examples/crashloop.rs"]
mod crashloop;

use crashloop::{CODES, Rng, USER};
use mailgate::store::Store;
use mailgate::store::sled_store::SledStore;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// Longest a child may take to reach its kill point (it normally takes < 200 ms).
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Entry point of the child when this test binary re-executes itself; a no-op otherwise.
#[test]
fn crashloop_child() {
    let Ok(spec) = std::env::var("MAILGATE_CRASH_CHILD") else { return };
    let parts: Vec<&str> = spec.split('\n').collect();
    let [dir, seed, run] = parts.as_slice() else { std::process::exit(2) };
    let (Ok(seed), Ok(run)) = (seed.parse(), run.parse()) else { std::process::exit(2) };
    if let Err(e) = crashloop::run(Path::new(dir), seed, run) {
        eprintln!("crashloop: {e}");
    }
    // Never return into the test harness (which would print more to stdout).
    std::process::exit(1);
}

/// One store operation as the child reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Account,
    Create(String),
    Revoke(String),
    Codes(u64),
    Spend(u64, usize),
    Step(u64),
}

fn parse_op(words: &[&str]) -> Option<Op> {
    Some(match words {
        ["account"] => Op::Account,
        ["create", id] => Op::Create(id.to_string()),
        ["revoke", id] => Op::Revoke(id.to_string()),
        ["codes", g] => Op::Codes(g.parse().ok()?),
        ["spend", g, i] => Op::Spend(g.parse().ok()?, i.parse().ok()?),
        ["step", n] => Op::Step(n.parse().ok()?),
        _ => return None,
    })
}

/// The security state of the test account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Model {
    account: bool,
    /// App passwords that exist.
    live: BTreeSet<String>,
    /// The backup-code set: generation and which codes are spent.
    codes: Option<(u64, Vec<bool>)>,
    /// TOTP last accepted step.
    step: u64,
}

impl Model {
    /// Applies an acknowledged operation; an error means it contradicts the state (the
    /// child saw a store that is not the one the parent checked, or the store accepted
    /// what it must refuse).
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        if !self.account && *op != Op::Account {
            return Err(format!("{op:?} acknowledged without an account"));
        }
        match op {
            Op::Account if self.account => return Err("account created twice".into()),
            Op::Account => self.account = true,
            Op::Create(id) => {
                if !self.live.insert(id.clone()) {
                    return Err(format!("app password {id} created twice"));
                }
            }
            Op::Revoke(id) => {
                if !self.live.remove(id) {
                    return Err(format!("revoked app password {id}, which did not exist"));
                }
            }
            Op::Codes(g) => self.codes = Some((*g, vec![false; CODES])),
            Op::Spend(g, i) => match &mut self.codes {
                Some((gen_now, spent)) if gen_now == g && spent.get(*i) == Some(&false) => spent[*i] = true,
                other => return Err(format!("backup code {g}/{i} accepted, but the set is {other:?}: spent twice")),
            },
            Op::Step(n) => {
                if *n <= self.step {
                    return Err(format!("TOTP step {n} accepted after step {}: the step went back", self.step));
                }
                self.step = *n;
            }
        }
        Ok(())
    }

    /// Checks that the store was right to refuse `op`.
    fn check_refusal(&self, op: &Op) -> Result<(), String> {
        let legit = match op {
            Op::Account => self.account,
            Op::Create(id) => self.live.contains(id),
            Op::Revoke(id) => !self.live.contains(id),
            Op::Codes(_) => false,
            Op::Spend(g, i) => {
                !matches!(&self.codes, Some((gen_now, spent)) if gen_now == g && spent.get(*i) == Some(&false))
            }
            Op::Step(n) => *n <= self.step,
        };
        if legit { Ok(()) } else { Err(format!("the store refused {op:?}, which the state allows: {self:?}")) }
    }
}

/// What differs between the expected and the observed state, in words.
fn differences(expected: &Model, found: &Model, revoked: &BTreeSet<String>) -> String {
    let mut out = Vec::new();
    if expected.account != found.account {
        out.push(format!("account exists: expected {}, found {}", expected.account, found.account));
    }
    for id in expected.live.difference(&found.live) {
        out.push(format!("acknowledged app password {id} is missing"));
    }
    for id in found.live.difference(&expected.live) {
        if revoked.contains(id) {
            out.push(format!("acknowledged revocation of app password {id} is lost: it is back"));
        } else {
            out.push(format!("app password {id} exists but its creation was never acknowledged nor in flight"));
        }
    }
    if expected.codes != found.codes {
        out.push(format!("backup codes: expected {:?}, found {:?}", expected.codes, found.codes));
    }
    if expected.step != found.step {
        out.push(format!("TOTP last step: expected {}, found {}", expected.step, found.step));
    }
    out.join("; ")
}

/// Reads the state from a reopened store and checks every record byte for byte.
fn observe(store: &SledStore, ever: &BTreeSet<String>) -> Result<Model, String> {
    let mut m = Model::default();
    let Some(a) = store.get_account(USER).map_err(|e| format!("get_account: {e}"))? else {
        let list = store.list_app_passwords(USER).map_err(|e| format!("list_app_passwords: {e}"))?;
        return if list.is_empty() { Ok(m) } else { Err("app passwords without an account".into()) };
    };
    m.account = true;
    let mut expected = crashloop::initial_account();
    expected.backup_codes = a.backup_codes.clone();
    if let (Some(t), Some(found)) = (expected.totp.as_mut(), a.totp.as_ref()) {
        t.last_step = found.last_step;
    }
    let (want, got) = (serde_json::to_value(&expected), serde_json::to_value(&a));
    if want.as_ref().ok() != got.as_ref().ok() {
        return Err(format!("account record changed in fields nobody wrote: {got:?}"));
    }
    m.step = a.totp.as_ref().map(|t| t.last_step).ok_or("TOTP state lost")?;
    if let Some(set) = &a.backup_codes {
        let g = set.generated_at;
        if set.hashes.len() != CODES {
            return Err(format!("backup-code set {g} has {} codes", set.hashes.len()));
        }
        let mut spent = Vec::with_capacity(CODES);
        for (i, h) in set.hashes.iter().enumerate() {
            if h.is_empty() {
                spent.push(true);
            } else if *h == crashloop::code_hash(g, i) {
                spent.push(false);
            } else {
                return Err(format!("backup code {g}/{i} is stored as {h:?}"));
            }
        }
        m.codes = Some((g, spent));
    }
    for r in store.list_app_passwords(USER).map_err(|e| format!("list_app_passwords: {e}"))? {
        let want = serde_json::to_value(crashloop::app_record(&r.id)).map_err(|e| e.to_string())?;
        let got = serde_json::to_value(&r).map_err(|e| e.to_string())?;
        if want != got {
            return Err(format!("app password record {} is not what was written: {got}", r.id));
        }
        m.live.insert(r.id);
    }
    // A record without its index entry would not be listed: look each id up directly.
    for id in ever.iter().filter(|id| !m.live.contains(*id)) {
        if store.get_app_password(id).map_err(|e| format!("get_app_password {id}: {e}"))?.is_some() {
            return Err(format!("app password {id} has a record but no index entry"));
        }
    }
    Ok(m)
}

/// A line from the child: its text, and whether it was complete (ended in a newline).
struct Line {
    text: String,
    complete: bool,
}

fn read_lines(stdout: impl std::io::Read + Send + 'static) -> Receiver<Line> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let complete = buf.last() == Some(&b'\n');
                    let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send(Line { text, complete }).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn spawn_child(dir: &Path, stderr: &Path, seed: u64, run: u64) -> Child {
    let mut cmd = match std::env::var_os("MAILGATE_CRASH_BIN") {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.arg(dir).arg(seed.to_string()).arg(run.to_string());
            c
        }
        None => {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args(["crash::crashloop_child", "--exact", "--nocapture", "--test-threads", "1"])
                .env("MAILGATE_CRASH_CHILD", format!("{}\n{seed}\n{run}", dir.display()));
            c
        }
    };
    let err = std::fs::File::create(stderr).unwrap();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err).spawn().unwrap()
}

/// When to kill the child.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after spawning (may hit the store's open and recovery).
    Delay(Duration),
    /// Right after reading the n-th `ACK` (the child is in its next operation).
    AfterAck(usize),
    /// This long after reading the n-th `TRY` (the child is inside a store call).
    AfterTry(usize, Duration),
}

/// Everything the test accumulates.
struct Run {
    root: PathBuf,
    db: PathBuf,
    transcript: std::fs::File,
    model: Model,
    ever: BTreeSet<String>,
    /// Ids whose revocation was acknowledged.
    revoked: BTreeSet<String>,
    acked: usize,
    refused: usize,
    in_flight: usize,
    in_flight_landed: usize,
    reopen_max: Duration,
}

impl Run {
    fn fail(&mut self, what: String) -> ! {
        let _ = self.transcript.flush();
        panic!(
            "{what}\nstore, transcript and child stderr kept in {} (reopen {} with SledStore::open to inspect)",
            self.root.display(),
            self.db.display()
        );
    }

    /// One child: spawn, kill at `at`, read everything it printed, reopen and check.
    fn iteration(&mut self, run: u64, seed: u64, at: KillAt) {
        let stderr_path = self.root.join("child-stderr.log");
        let mut child = spawn_child(&self.db, &stderr_path, seed, run);
        let started = Instant::now();
        let rx = read_lines(child.stdout.take().unwrap());
        let _ = writeln!(self.transcript, "== run {run} seed {seed} kill {at:?}");
        let mut lines = Vec::new();
        let (mut acks, mut tries) = (0usize, 0usize);
        let mut kill_time = match at {
            KillAt::Delay(d) => Some(started + d),
            _ => None,
        };
        let mut ended = false;
        loop {
            let now = Instant::now();
            if kill_time.is_some_and(|t| now >= t) {
                break;
            }
            if now >= started + RUN_TIMEOUT {
                break;
            }
            let wait = kill_time.unwrap_or(started + RUN_TIMEOUT).saturating_duration_since(now);
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    if line.text.starts_with("ACK ") {
                        acks += 1;
                        if matches!(at, KillAt::AfterAck(n) if n == acks) {
                            kill_time = Some(Instant::now());
                        }
                    } else if line.text.starts_with("TRY ") {
                        tries += 1;
                        if let KillAt::AfterTry(n, d) = at
                            && n == tries
                        {
                            kill_time = Some(Instant::now() + d);
                        }
                    }
                    lines.push(line);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        let _ = child.kill(); // SIGKILL
        let status = wait_timeout(&mut child, Duration::from_secs(10));
        // The rest of what it printed before it died.
        let drain_until = Instant::now() + Duration::from_secs(5);
        loop {
            match rx.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(format!("run {run}: child stdout still open 5 s after kill"))
                }
            }
        }
        for l in &lines {
            let _ = writeln!(self.transcript, "{}{}", l.text, if l.complete { "" } else { " <partial>" });
        }
        match status {
            Some(s) if s.signal() == Some(9) => {}
            None => self.fail(format!("run {run}: child still alive 10 s after SIGKILL")),
            Some(other) => {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                self.fail(format!(
                    "run {run}: child ended by itself ({other}, stdout closed before the kill: {ended}); stderr:\n{err}"
                ));
            }
        }

        // Replay what it acknowledged.
        let mut pending: Option<Op> = None;
        for l in lines.iter().filter(|l| l.complete) {
            let words: Vec<&str> = l.text.split(' ').collect();
            let (kind, rest) = match words.split_first() {
                Some((k, rest)) if ["TRY", "ACK", "REFUSED"].contains(k) => (*k, rest),
                _ => continue,
            };
            let Some(op) = parse_op(rest) else { self.fail(format!("run {run}: bad line {:?}", l.text)) };
            let result = match kind {
                "TRY" if pending.is_some() => Err(format!("{:?} while {pending:?} is in flight", l.text)),
                "TRY" => {
                    if let Op::Create(id) = &op
                        && !self.ever.insert(id.clone())
                    {
                        self.fail(format!("run {run}: app password id {id} reused"));
                    }
                    pending = Some(op);
                    Ok(())
                }
                _ if pending.as_ref() != Some(&op) => Err(format!("{:?} without TRY", l.text)),
                "ACK" => {
                    pending = None;
                    self.acked += 1;
                    if let Op::Revoke(id) = &op {
                        self.revoked.insert(id.clone());
                    }
                    self.model.apply(&op)
                }
                _ => {
                    pending = None;
                    self.refused += 1;
                    self.model.check_refusal(&op)
                }
            };
            if let Err(e) = result {
                self.fail(format!("run {run}: {e}"));
            }
        }

        // Reopen and compare.
        let t = Instant::now();
        let store = match SledStore::open(&self.db) {
            Ok(s) => s,
            Err(e) => self.fail(format!("run {run}: the store does not open after SIGKILL: {e}")),
        };
        self.reopen_max = self.reopen_max.max(t.elapsed());
        let found = match observe(&store, &self.ever) {
            Ok(m) => m,
            Err(e) => self.fail(format!("run {run}: {e}")),
        };
        drop(store);
        if found != self.model {
            let mut with_pending = self.model.clone();
            let landed = pending.as_ref().is_some_and(|op| with_pending.apply(op).is_ok() && found == with_pending);
            if !landed {
                let diff = differences(&self.model, &found, &self.revoked);
                self.fail(format!(
                    "run {run} (seed {seed}, kill {at:?}): ACKNOWLEDGED CHANGE LOST: {diff}\n(in flight at the kill: {pending:?})"
                ));
            }
            self.in_flight_landed += 1;
            self.model = found;
        }
        if pending.is_some() {
            self.in_flight += 1;
        }
        let _ = self.transcript.flush();
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

#[test]
fn acknowledged_changes_survive_sigkill() {
    let kills: u64 = std::env::var("MAILGATE_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let seed: u64 = std::env::var("MAILGATE_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id())
    });
    // Cargo makes this directory when it builds the test, not when it runs it.
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = tempfile::Builder::new().prefix("crash-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let db = root.path().join("db");
    let transcript = std::fs::File::create(root.path().join("transcript.log")).unwrap();
    eprintln!("crash loop: {kills} kills, MAILGATE_CRASH_SEED={seed}, dir {}", root.path().display());
    let mut run = Run {
        root: root.path().to_path_buf(),
        db,
        transcript,
        model: Model::default(),
        ever: BTreeSet::new(),
        revoked: BTreeSet::new(),
        acked: 0,
        refused: 0,
        in_flight: 0,
        in_flight_landed: 0,
        reopen_max: Duration::ZERO,
    };
    // Keep the directory if anything below panics.
    let root = root.keep();
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    for n in 0..kills {
        let at = match rng.below(3) {
            0 => KillAt::Delay(Duration::from_millis(5 + rng.below(146))),
            1 => KillAt::AfterAck(1 + rng.below(40) as usize),
            _ => KillAt::AfterTry(1 + rng.below(40) as usize, Duration::from_micros(rng.below(800))),
        };
        run.iteration(n, rng.next_u64(), at);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "crash loop: {kills} SIGKILLs in {:.1} s; {} changes acknowledged, {} refusals checked; {} kills with an \
         operation in flight, {} of those landed; final state: {} app passwords, TOTP step {}, {} ids checked for \
         revocation; slowest reopen {:?}",
        elapsed.as_secs_f64(),
        run.acked,
        run.refused,
        run.in_flight,
        run.in_flight_landed,
        run.model.live.len(),
        run.model.step,
        run.ever.len(),
        run.reopen_max,
    );
    assert!(run.acked as u64 >= kills, "too few acknowledged changes ({}) to mean anything", run.acked);
    // Passed: remove the directory.
    let _ = std::fs::remove_dir_all(&root);
}
