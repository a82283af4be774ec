//! Secret values: passwords, app passwords, TOTP seeds, SASL payloads.
//!
//! A [`Secret`] never prints its value (`Debug` shows `[REDACTED]` in every build),
//! has no `Display` or `Serialize`, is wiped from memory when dropped and is compared
//! in constant time. Depends on nothing inside the crate.

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// A value that must never reach a log, an error message or `Debug` output.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// Gives access to the value. Every call site is a place where the secret is used on purpose.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Secret(self.0.clone())
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl<T: Zeroize + AsRef<[u8]>> PartialEq for Secret<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_ref().ct_eq(other.0.as_ref()).into()
    }
}

/// A secret byte string (a password as the client sent it).
pub type SecretBytes = Secret<Vec<u8>>;
/// A secret text (a password read from a file, a generated app password).
pub type SecretString = Secret<String>;

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Secret::new(v)
    }
}

impl From<String> for SecretString {
    fn from(v: String) -> Self {
        Secret::new(v)
    }
}

/// Why [`read_secret_line`] found no secret. The texts name the file, never its content;
/// each says it all (no `source()`), so a chain printed with `{:#}` says it once.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file could not be read.
    #[error("{}: {error}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why (in the text, so not also a `source()`).
        error: std::io::Error,
    },
    /// Its first line is empty.
    #[error("{} is empty", path.display())]
    Empty {
        /// The file.
        path: std::path::PathBuf,
    },
}

/// The first line of a file that holds a secret (a password, a URL with one), without
/// its line end. An empty first line is an error.
pub fn read_secret_line(path: &std::path::Path) -> Result<SecretString, SecretFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|error| SecretFileError::Read { path: path.to_path_buf(), error })?;
    let text = SecretString::from(text);
    let line = text.expose().lines().next().unwrap_or("").trim_end_matches('\r').to_string();
    if line.is_empty() {
        return Err(SecretFileError::Empty { path: path.to_path_buf() });
    }
    Ok(SecretString::from(line))
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretString::from("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert!(!format!("{s:#?}").contains("hunter2"));
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(SecretBytes::from(b"a".to_vec()), SecretBytes::from(b"a".to_vec()));
        assert_ne!(SecretBytes::from(b"a".to_vec()), SecretBytes::from(b"b".to_vec()));
    }
}
