use super::*;

#[test]
fn cookie_name_is_host_prefixed() {
    assert!(COOKIE.starts_with("__Host-"));
}
