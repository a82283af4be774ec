//! `mailgate user import`: a Dovecot passwd-file with mixed schemes (hashes made by the
//! real `doveadm pw`), all or nothing; imported users sign in with their old passwords.

use crate::support::mailgate::{Mailgate, Options};
use std::process::Command;

fn doveadm(scheme: &str, pw: &str) -> String {
    let out = Command::new("doveadm").args(["pw", "-s", scheme, "-p", pw]).output().unwrap();
    assert!(out.status.success(), "doveadm pw -s {scheme}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn import_of_a_dovecot_passwd_file_with_mixed_schemes() {
    let mg = Mailgate::start(Options::default());
    let users = [
        ("argon@example.com", "ARGON2ID", "pw for argon2id users"),
        ("blf@example.com", "BLF-CRYPT", "pw for bcrypt users!!"),
        ("sha@example.com", "SHA512-CRYPT", "pw for sha512-crypt users"),
        ("ssha", "SSHA512", "pw for ssha512 users ok"),
    ];
    let mut file = String::from("# exported from Dovecot\n\n");
    for (user, scheme, pw) in users {
        file.push_str(&format!("{user}:{}::::::\n", doveadm(scheme, pw)));
    }
    let path = mg.dir.path().join("users.passwd");
    std::fs::write(&path, &file).unwrap();
    // A line with an unknown scheme: the error names it and nothing is imported.
    let bad = mg.dir.path().join("bad.passwd");
    std::fs::write(&bad, format!("{file}old@example.com:{}\n", doveadm("MD5-CRYPT", "x"))).unwrap();
    let out = mg.cli(&["user", "import", bad.to_str().unwrap(), "--domain", "example.com"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MD5-CRYPT") && err.contains("line 7"), "{err}");
    assert!(!mg.ok(&["user", "list"]).contains("example.com"), "half imported");
    // Names without a domain need --domain.
    let out = mg.cli(&["user", "import", path.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("ssha"));
    let out = mg.ok(&["user", "import", path.to_str().unwrap(), "--domain", "example.com"]);
    assert!(out.contains("imported 4 accounts"), "{out}");
    // Importing again: every account exists; nothing changes.
    let out = mg.cli(&["user", "import", path.to_str().unwrap(), "--domain", "example.com"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("exist already"));
    for (user, _, pw) in users {
        let user = if user.contains('@') { user.to_string() } else { format!("{user}@example.com") };
        let got = mg.web(&user, pw, &["signin"]);
        assert_eq!(got["signin"][1], "/app-passwords", "{user} could not sign in with the old password");
        let got = mg.web(&user, "not the password", &["signin"]);
        assert_eq!(got["signin"][0], 401, "{user}");
        // The hash was upgraded to argon2id on that sign-in; the password still works.
        let got = mg.web(&user, pw, &["signin"]);
        assert_eq!(got["signin"][1], "/app-passwords", "{user} after the upgrade");
    }
}
