use super::*;

#[test]
fn greeting() {
    let mut s = Session::new("mail.example.com", false, true, 1_000_000);
    assert!(matches!(s.poll(), Action::Write(w) if w.starts_with(b"220 mail.example.com ESMTP")));
}
