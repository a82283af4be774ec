//! Backup codes: 10 single-use codes shown once after TOTP enrolment (or regeneration),
//! 16 characters from the app-password alphabet (≈ 79 bits each), shown in groups of
//! four, stored as argon2id hashes. A new set replaces the old one at once.

use crate::auth::{app_password::ALPHABET, password};
use crate::secret::SecretString;
use crate::store::BackupCodes;

/// Codes in a set.
pub const COUNT: usize = 10;
/// Characters per code.
pub const LEN: usize = 16;

/// Makes a new set: the codes to show (grouped) and the record to store.
pub fn generate(now: u64) -> Result<(Vec<SecretString>, BackupCodes), String> {
    let mut shown = Vec::with_capacity(COUNT);
    let mut hashes = Vec::with_capacity(COUNT);
    for _ in 0..COUNT {
        let code = random(LEN)?;
        hashes.push(password::hash(code.as_bytes())?);
        shown.push(crate::auth::app_password::group(&code));
    }
    Ok((shown, BackupCodes { generated_at: now, hashes }))
}

fn random(n: usize) -> Result<String, String> {
    let mut out = String::with_capacity(n);
    let limit = 256 - (256 % ALPHABET.len());
    while out.len() < n {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("no OS randomness: {e}"))?;
        for b in bytes {
            if (b as usize) < limit && out.len() < n {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// Normalises what a person typed: without spaces and dashes, lower case.
pub fn normalize(input: &str) -> Option<String> {
    let s: String = input.chars().filter(|c| *c != ' ' && *c != '-').collect::<String>().to_ascii_lowercase();
    (s.len() == LEN && s.bytes().all(|b| ALPHABET.contains(&b))).then_some(s)
}

/// Marks the code used if it is one of the set's unused codes; returns whether it was.
/// Call inside `Store::update_account`, so that one code is spent once.
pub fn consume(codes: &mut BackupCodes, input: &str) -> bool {
    let Some(code) = normalize(input) else { return false };
    for h in codes.hashes.iter_mut() {
        if !h.is_empty() && password::verify(code.as_bytes(), h) {
            h.clear();
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_works_once() {
        let (shown, mut set) = generate(1).unwrap();
        assert_eq!(shown.len(), COUNT);
        assert_eq!(shown[0].expose().len(), LEN + 3);
        assert!(consume(&mut set, shown[3].expose()));
        assert!(!consume(&mut set, shown[3].expose()));
        assert_eq!(set.remaining(), COUNT - 1);
        assert!(consume(&mut set, &shown[4].expose().to_uppercase().replace(' ', "-")));
        assert!(!consume(&mut set, "aaaa bbbb cccc dddd"));
        assert!(!consume(&mut set, "short"));
    }
}
