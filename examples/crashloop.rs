//! Crash-loop child for the SIGKILL test (`tests/crash.rs`, SECURITY.md §M case 96).
//!
//! `crashloop <data-dir> <seed> <run>` opens the sled store in `<data-dir>`, makes sure
//! the test account exists, then changes it forever through the `Store` API, the way the
//! server does: it creates and revokes app passwords, sets new backup-code sets, spends
//! backup codes and moves the TOTP step forward (check-and-set inside `update_account`).
//! It also tries to spend a code that is already spent and to accept a TOTP step that is
//! not later than the last one; both must be refused.
//!
//! Every operation prints `TRY <op>` before the store call and then either `ACK <op>`
//! (the call returned `Ok`, so the change is durable) or `REFUSED <op>` (the store
//! refused it; nothing changed). Operations:
//!
//! * `account`: the test account was created;
//! * `create <id>` / `revoke <id>`: an app password;
//! * `codes <generation>`: a new set of [`CODES`] backup codes replaced the old one;
//! * `spend <generation> <index>`: that code was marked used (its hash emptied);
//! * `step <n>`: the TOTP last step was set to `n`.
//!
//! Each line is written with one `write` and flushed, so the parent reads whole lines
//! only. The parent SIGKILLs this process at random moments. The child stops by itself if
//! stdout is closed (the parent is gone) or after [`MAX_RUNTIME`].
//!
//! Ids and values are derived from `<run>` and a counter, so the parent can check each
//! record byte for byte: app password `r<run>o<n>` has label `crash r<run>o<n>` and hash
//! `$dummy$r<run>o<n>`; code `i` of set `g` is stored as `bc-<g>-<i>`.

use mailgate::store::sled_store::SledStore;
use mailgate::store::{
    Account, AppPasswordRecord, BackupCodes, MAX_APP_PASSWORDS, Scope, Store, StoreError, TotpState,
};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The account every operation changes.
pub const USER: &str = "crash@example.org";
/// Codes in a backup-code set.
pub const CODES: usize = 10;
/// A child never runs longer than this, even if nobody kills it.
pub const MAX_RUNTIME: Duration = Duration::from_secs(60);

/// The account as first created.
pub fn initial_account() -> Account {
    Account {
        username: USER.into(),
        addresses: vec![],
        password_hash: None,
        totp: Some(TotpState { secret_enc: "sealed-test-secret".into(), enabled_at: 1, last_step: 0 }),
        second_factor_required: true,
        backup_codes: None,
        created_at: 1,
        updated_at: 1,
    }
}

/// The record stored for app password `id`.
pub fn app_record(id: &str) -> AppPasswordRecord {
    AppPasswordRecord {
        id: id.into(),
        username: USER.into(),
        label: format!("crash {id}"),
        scopes: vec![Scope::Imap, Scope::Smtp],
        hash: format!("$dummy${id}"),
        created_at: 1,
        created_by: "web".into(),
        last_used: None,
        last_used_by: Default::default(),
        oauth: None,
        expires_at: None,
        allow: vec![],
        narrow: None,
    }
}

/// The stored value of code `index` of set `generation`.
pub fn code_hash(generation: u64, index: usize) -> String {
    format!("bc-{generation}-{index}")
}

/// xorshift64*: deterministic per seed, no extra crates.
pub struct Rng(u64);

impl Rng {
    /// A generator; any seed (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Rng {
        // splitmix64 scrambles small or similar seeds.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Writes one protocol line in a single `write` and flushes it; an error means the
/// parent is gone.
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{line}\n").as_bytes()).and_then(|_| out.flush()).map_err(|e| format!("stdout: {e}"))
}

/// Runs one store operation between `TRY` and `ACK` / `REFUSED`. Refusals the store is
/// expected to give (`Conflict`, `NotFound`) are reported; other errors stop the child.
fn op<T>(name: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<bool, String> {
    say(&format!("TRY {name}"))?;
    match f() {
        Ok(_) => {
            say(&format!("ACK {name}"))?;
            Ok(true)
        }
        Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => {
            say(&format!("REFUSED {name}"))?;
            Ok(false)
        }
        Err(e) => Err(format!("{name}: {e}")),
    }
}

/// The crash loop. Returns only on an error, or after [`MAX_RUNTIME`].
pub fn run(dir: &Path, seed: u64, run_no: u64) -> Result<(), String> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let store = SledStore::open(dir).map_err(|e| format!("open: {e}"))?;
    say("OPEN")?;
    if store.get_account(USER).map_err(|e| e.to_string())?.is_none() {
        op("account", || store.create_account(&initial_account()))?;
    }
    let mut counter = 0u64;
    while started.elapsed() < MAX_RUNTIME {
        counter += 1;
        let account = store.get_account(USER).map_err(|e| e.to_string())?.ok_or("account is gone")?;
        let live: Vec<String> =
            store.list_app_passwords(USER).map_err(|e| e.to_string())?.into_iter().map(|r| r.id).collect();
        let roll = rng.below(100);
        if (roll < 30 && live.len() + 5 < MAX_APP_PASSWORDS) || live.is_empty() {
            // Create an app password.
            let id = format!("r{run_no}o{counter}");
            op(&format!("create {id}"), || store.create_app_password(&app_record(&id)))?;
        } else if roll < 50 || live.len() + 5 >= MAX_APP_PASSWORDS {
            // Revoke one.
            let id = &live[rng.below(live.len() as u64) as usize];
            op(&format!("revoke {id}"), || store.revoke_app_password(USER, id))?;
        } else if roll < 75 {
            // Spend a backup code: mostly an unused one, sometimes one already spent
            // (which must be refused). A missing or used-up set gets replaced first.
            let set = account.backup_codes.as_ref().filter(|s| s.remaining() > 0);
            let Some(set) = set else {
                new_codes(&store, run_no, counter)?;
                continue;
            };
            let generation = set.generated_at;
            let unused: Vec<usize> = (0..set.hashes.len()).filter(|i| !set.hashes[*i].is_empty()).collect();
            let used: Vec<usize> = (0..set.hashes.len()).filter(|i| set.hashes[*i].is_empty()).collect();
            let index = if !used.is_empty() && rng.below(5) == 0 {
                used[rng.below(used.len() as u64) as usize]
            } else {
                unused[rng.below(unused.len() as u64) as usize]
            };
            // Check-and-set inside update_account, as the web step does: the code must be
            // in the current set and unused.
            let expected = code_hash(generation, index);
            op(&format!("spend {generation} {index}"), || {
                store.update_account(USER, &mut |a: &mut Account| {
                    let slot = a
                        .backup_codes
                        .as_mut()
                        .filter(|s| s.generated_at == generation)
                        .and_then(|s| s.hashes.get_mut(index))
                        .filter(|h| **h == expected);
                    match slot {
                        Some(h) => {
                            h.clear();
                            Ok(())
                        }
                        None => Err(StoreError::Conflict("wrong code".into())),
                    }
                })
            })?;
        } else if roll < 80 {
            new_codes(&store, run_no, counter)?;
        } else {
            // Accept a TOTP code: mostly a later step, sometimes a replay of the last one
            // or an earlier one (which must be refused).
            let last = account.totp.as_ref().map(|t| t.last_step).unwrap_or(0);
            let step = if rng.below(5) == 0 { last.saturating_sub(rng.below(3)) } else { last + 1 + rng.below(3) };
            op(&format!("step {step}"), || {
                store.update_account(USER, &mut |a: &mut Account| match a.totp.as_mut() {
                    Some(t) if step > t.last_step => {
                        t.last_step = step;
                        Ok(())
                    }
                    _ => Err(StoreError::Conflict("wrong code".into())),
                })
            })?;
        }
    }
    Ok(())
}

/// Replaces the backup-code set (generation `run_no * 1_000_000 + counter`, always new).
fn new_codes(store: &SledStore, run_no: u64, counter: u64) -> Result<(), String> {
    let generation = run_no * 1_000_000 + counter;
    let set = BackupCodes { generated_at: generation, hashes: (0..CODES).map(|i| code_hash(generation, i)).collect() };
    op(&format!("codes {generation}"), || {
        store.update_account(USER, &mut |a: &mut Account| {
            a.backup_codes = Some(set.clone());
            Ok(())
        })
    })?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match args.as_slice() {
        [_, dir, seed, run] => seed.parse::<u64>().ok().zip(run.parse::<u64>().ok()).map(|(s, r)| (dir, s, r)),
        _ => None,
    };
    let Some((dir, seed, run_no)) = parsed else {
        eprintln!("usage: crashloop <data-dir> <seed> <run>");
        std::process::exit(2);
    };
    if let Err(e) = run(Path::new(dir), seed, run_no) {
        eprintln!("crashloop: {e}");
        std::process::exit(1);
    }
}
