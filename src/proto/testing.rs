//! The harness the machine tests share: run a machine the way the driver does and collect
//! what it wrote and what else it asked for, in a form tests compare. The front tests
//! (`imap_tests`, `pop3_tests`, `sieve_tests`) use [`pump`] and [`send`]; the upstream
//! login tests use [`pump_upstream`]; [`split_at`] cuts a session into reads.

use crate::proto::preauth::Action;
use crate::proto::{Machine, Next};

/// A non-`Write` action of a front, in a form tests can compare (`R`: its `AuthReply`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ev<R> {
    StartTls,
    Auth { user: String, pass: Vec<u8> },
    Refuse(R),
    Close,
}

/// The credentials event for `user` and `pass`.
pub(crate) fn auth<R>(user: &str, pass: &str) -> Ev<R> {
    Ev::Auth { user: user.to_string(), pass: pass.as_bytes().to_vec() }
}

/// Polls a front until it wants input (or closes). Returns everything written, as text,
/// and the other actions in order.
pub(crate) fn pump<R, M: Machine<Event = Action<R>>>(p: &mut M) -> (String, Vec<Ev<R>>) {
    let mut w = Vec::new();
    let mut ev = Vec::new();
    for _ in 0..100_000 {
        match p.next() {
            Next::Write(b) => {
                assert!(!b.is_empty(), "empty Write");
                w.extend(b);
            }
            Next::NeedInput => return (text(&w), ev),
            Next::StartTls => ev.push(Ev::StartTls),
            Next::Event(Action::Authenticate(c)) => {
                ev.push(Ev::Auth { user: c.username.clone(), pass: c.password.expose().clone() })
            }
            Next::Event(Action::Refuse(r)) => ev.push(Ev::Refuse(r)),
            Next::Close => {
                ev.push(Ev::Close);
                return (text(&w), ev);
            }
        }
    }
    panic!("next() did not settle");
}

/// An XOAUTH2 client response (`user=USER ^A auth=Bearer TOKEN ^A ^A`), base64.
pub(crate) fn xoauth2(user: &str, token: &str) -> String {
    crate::proto::imap::base64(format!("user={user}\x01auth=Bearer {token}\x01\x01").as_bytes())
}

/// An OAUTHBEARER client response (RFC 7628) naming `user`, as a client of `host:port`
/// sends it, base64.
pub(crate) fn oauthbearer(user: &str, host: &str, port: u16, token: &str) -> String {
    crate::proto::imap::base64(
        format!("n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01").as_bytes(),
    )
}

/// Feeds `bytes` to a front and expects bearer credentials (`user`, `token`) for the driver.
pub(crate) fn expect_bearer<R: std::fmt::Debug, M: Machine<Event = Action<R>>>(
    p: &mut M,
    bytes: &[u8],
    user: &str,
    token: &str,
) {
    p.feed(bytes);
    loop {
        match p.next() {
            Next::Write(_) => continue,
            Next::Event(Action::Authenticate(c)) => {
                assert_eq!(c.mechanism, crate::proto::sasl::Mechanism::Bearer);
                assert_eq!((c.username.as_str(), c.password.expose().as_slice()), (user, token.as_bytes()));
                return;
            }
            other => panic!("expected bearer credentials, got {other:?}"),
        }
    }
}

/// Bytes as text (invalid UTF-8 replaced).
pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `bytes` cut into reads at the positions `cuts` (each at most `bytes.len()`, any order).
pub(crate) fn split_at(bytes: &[u8], cuts: impl Iterator<Item = usize>) -> Vec<Vec<u8>> {
    let mut pos: Vec<usize> = cuts.collect();
    pos.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in pos {
        out.push(bytes[last..p].to_vec());
        last = p;
    }
    out.push(bytes[last..].to_vec());
    out
}

/// Feeds `bytes` to a front and polls until it needs input.
pub(crate) fn send<R, M: Machine<Event = Action<R>>>(p: &mut M, bytes: &[u8]) -> (String, Vec<Ev<R>>) {
    p.feed(bytes);
    pump(p)
}

/// Polls an upstream login until it needs upstream input, or to a final step. Returns what
/// was written and the other steps: `start_tls` for [`Next::StartTls`] (after which nothing
/// happens until `tls_started`), `event(e)` for an event.
pub(crate) fn pump_upstream<M: Machine, T>(u: &mut M, start_tls: T, event: fn(M::Event) -> T) -> (String, Vec<T>) {
    let mut w = Vec::new();
    let mut st = Vec::new();
    for _ in 0..10_000 {
        match u.next() {
            Next::Write(b) => {
                assert!(!b.is_empty());
                w.extend(b);
            }
            Next::NeedInput => break,
            Next::StartTls => {
                st.push(start_tls);
                // Until tls_started, nothing else happens.
                assert!(matches!(u.next(), Next::NeedInput));
                break;
            }
            Next::Event(e) => {
                st.push(event(e));
                break;
            }
            Next::Close => unreachable!("an upstream login never asks to close"),
        }
    }
    (text(&w), st)
}
