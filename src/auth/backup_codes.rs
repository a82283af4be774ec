//! Backup codes: 10 single-use codes shown once after TOTP enrolment (or regeneration),
//! 16 characters from the app-password alphabet (≈ 79 bits each), shown in groups of
//! four. A new set replaces the old one at once.
//!
//! Each code is stored as a keyed hash: HMAC-SHA256 under a key derived from `secret.key`
//! (which is not in the store), so a typed code is checked with **one** HMAC, whatever
//! the number of codes, and never needs a hashing thread: with 79 bits per code a slow
//! hash adds nothing, and someone who reads the store cannot test guesses without the
//! key. Sets made by earlier versions hold argon2id hashes; they still work (one hash per
//! code left, on a hashing thread) until the next set replaces them.

use crate::auth::crypto::SecretKey;
use crate::auth::{app_password::ALPHABET, password};
use crate::secret::SecretString;
use crate::store::BackupCodes;
use base64::Engine as _;

/// Codes in a set.
pub const COUNT: usize = 10;
/// Characters per code.
pub const LEN: usize = 16;
/// How a keyed hash is marked in the store.
const KEYED: &str = "k1$";

/// Makes a new set: the codes to show (grouped) and the record to store.
pub fn generate(now: u64, key: &SecretKey) -> Result<(Vec<SecretString>, BackupCodes), getrandom::Error> {
    let mut shown = Vec::with_capacity(COUNT);
    let mut hashes = Vec::with_capacity(COUNT);
    for _ in 0..COUNT {
        let code = crate::auth::app_password::random_chars(LEN)?;
        hashes.push(keyed(key, &code));
        shown.push(crate::auth::app_password::group(&code));
    }
    Ok((shown, BackupCodes { generated_at: now, hashes }))
}

fn keyed(key: &SecretKey, code: &str) -> String {
    let tag = key.tag(&[b"mailgate backup code", code.as_bytes()]);
    format!("{KEYED}{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(tag))
}

/// Normalises what a person typed: without spaces and dashes, lower case.
pub fn normalize(input: &str) -> Option<String> {
    let s: String = input.chars().filter(|c| *c != ' ' && *c != '-').collect::<String>().to_ascii_lowercase();
    (s.len() == LEN && s.bytes().all(|b| ALPHABET.contains(&b))).then_some(s)
}

/// A typed code that matched an unused code of the set: which one, and its stored hash
/// (to spend it with [`spend`] only if it is still unused then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    index: usize,
    stored: String,
}

/// Finds the unused code of the set that `input` is. Costs one HMAC for a set of keyed
/// hashes (one argon2id per code left only for a set made before them: call it on a
/// hashing thread then, see [`needs_hashing`]). Never call it inside a store update.
pub fn find(codes: &BackupCodes, input: &str, key: &SecretKey) -> Option<Match> {
    let code = normalize(input)?;
    let mine = keyed(key, &code);
    let mut found = None;
    for (index, h) in codes.hashes.iter().enumerate() {
        let hit = if h.starts_with(KEYED) {
            // Compared in constant time, and every entry is compared.
            crate::secret::ct_eq(h.as_bytes(), mine.as_bytes())
        } else {
            !h.is_empty() && password::verify(code.as_bytes(), h)
        };
        if hit && found.is_none() {
            found = Some(Match { index, stored: h.clone() });
        }
    }
    found
}

/// Whether checking a code of this set needs argon2 (a set from an earlier version).
pub fn needs_hashing(codes: &BackupCodes) -> bool {
    codes.hashes.iter().any(|h| !h.is_empty() && !h.starts_with(KEYED))
}

/// Spends a found code if it is still unused (call inside `Store::update_account`, so a
/// code is spent once however many requests bring it at once); returns whether it was.
pub fn spend(codes: &mut BackupCodes, m: &Match) -> bool {
    match codes.hashes.get_mut(m.index) {
        Some(h) if !h.is_empty() && *h == m.stored => {
            h.clear();
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7u8; 32]).unwrap()
    }

    fn consume(set: &mut BackupCodes, input: &str) -> bool {
        find(set, input, &key()).is_some_and(|m| spend(set, &m))
    }

    #[test]
    fn each_code_works_once() {
        let (shown, mut set) = generate(1, &key()).unwrap();
        assert_eq!(shown.len(), COUNT);
        assert_eq!(shown[0].expose().len(), LEN + 3);
        assert!(!needs_hashing(&set));
        assert!(consume(&mut set, shown[3].expose()));
        assert!(!consume(&mut set, shown[3].expose()));
        assert_eq!(set.remaining(), COUNT - 1);
        assert!(consume(&mut set, &shown[4].expose().to_uppercase().replace(' ', "-")));
        assert!(!consume(&mut set, "aaaa bbbb cccc dddd"));
        assert!(!consume(&mut set, "short"));
        // Another server's key: no code matches.
        assert!(find(&set, shown[5].expose(), &SecretKey::from_bytes(&[8u8; 32]).unwrap()).is_none());
    }

    /// A wrong code costs one HMAC, no argon2 (SECURITY.md, issue 13 point 4); a found code
    /// that another request spent meanwhile is not spent twice.
    #[test]
    fn a_wrong_code_costs_no_hash_and_a_code_is_spent_once() {
        let (shown, mut set) = generate(1, &key()).unwrap();
        let before = password::evaluations_on_this_thread();
        assert!(find(&set, "aaaa bbbb cccc dddd", &key()).is_none());
        assert_eq!(password::evaluations_on_this_thread(), before);
        let m = find(&set, shown[0].expose(), &key()).unwrap();
        let mut other = set.clone();
        assert!(spend(&mut other, &m));
        assert!(!spend(&mut other, &m), "spent once");
        assert!(spend(&mut set, &m));
    }

    /// Sets made before keyed hashes (argon2id) still work.
    #[test]
    fn argon2_sets_still_work() {
        let code = "abcdefghjkmnpqrs";
        let mut set =
            BackupCodes { generated_at: 1, hashes: vec![String::new(), password::hash(code.as_bytes()).unwrap()] };
        assert!(needs_hashing(&set));
        assert!(consume(&mut set, "abcd efgh jkmn pqrs"));
        assert!(!consume(&mut set, code));
    }
}
