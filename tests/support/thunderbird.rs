//! The real Thunderbird, driven by the shared tool `../shared/tools/thunderbird.py`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

/// The shared tool's path (beside the repository).
pub fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/thunderbird.py")
}

/// Runs the tool with `args`. One Thunderbird at a time in this test binary: it is the
/// heaviest client the tests start. A run that ended before any mail step because the
/// tool could not drive Thunderbird's start (its `FAIL harness` line; the tool waits a
/// fixed 15 s for each Marionette answer, which a machine loaded by parallel tests can
/// exceed) is run again, up to three runs; a mail step's failure never is.
pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// [`run`] with extra environment (inherited by the `--oauth-browser` program).
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let script = script();
    assert!(script.exists(), "{} is missing", script.display());
    let mut runs = 0;
    loop {
        runs += 1;
        let out = Command::new("python3").arg(&script).args(args).envs(env.iter().copied()).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let harness_only = stdout.contains("FAIL harness") && !stdout.contains("PASS ");
        if out.status.success() || !harness_only || runs == 3 {
            return out;
        }
        eprintln!("thunderbird.py could not drive Thunderbird's start (run {runs}), trying again:\n{stdout}");
    }
}
