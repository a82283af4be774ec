//! The security notice on the account page: wrong second-factor codes entered after the
//! right account password, which the owner has not seen yet.
//!
//! Everything it needs is in the account's audit log, written by the sign-in handlers:
//!
//! * `second_factor_failed`, detail `TOTP code from 192.0.2.1` (or `backup code from …`):
//!   a wrong code, compared after the right password;
//! * `web_sign_in`, detail `from 192.0.2.1` or `from 192.0.2.1 after 2 wrong codes`: a
//!   full sign-in, and how many wrong codes that same sign-in (one browser session) had
//!   before its right one: those were the person's own typos;
//! * `security_notice_seen`, detail `wrong codes up to 1800000010`: the person dismissed
//!   the notice that showed wrong codes up to that time (Unix seconds).
//!
//! A wrong code is shown if it is recent ([`WINDOW_SECS`]), newer than the last dismissal,
//! and not one of the typos of a sign-in that then succeeded from the same address. Typos
//! are counted, not named: when someone else at the same address (behind one NAT) entered
//! wrong codes within the same five minutes, as many of that address's failures as the
//! sign-in had typos are left out, and the others are shown. Events written before the
//! address was recorded (detail `TOTP code`) are shown without one. A wrong code pushed
//! out of the store's audit log (the newest [`EVENTS_READ`] events of the account) is not
//! shown any more. Depends on store only.

use crate::store::AuditEvent;
use std::net::IpAddr;

/// A wrong code after the right password.
pub(super) const FAILED: &str = "second_factor_failed";
/// A full sign-in on the web step.
pub(super) const SIGN_IN: &str = "web_sign_in";
/// The person dismissed the notice.
pub(super) const SEEN: &str = "security_notice_seen";
/// Wrong codes older than this are not shown (30 days).
pub(super) const WINDOW_SECS: u64 = 30 * 24 * 3600;
/// Audit events read for the notice (newest first): all the store keeps, since every
/// IMAP/SMTP login adds one, and a busy phone would push a wrong code out of a shorter
/// window within a day.
pub(super) const EVENTS_READ: usize = crate::store::MAX_AUDIT_PER_ACCOUNT;

/// Detail of a [`FAILED`] event.
pub(super) fn failed_detail(backup: bool, ip: IpAddr) -> String {
    format!("{} from {ip}", if backup { "backup code" } else { "TOTP code" })
}

/// Detail of a [`SIGN_IN`] event: from where, and how many wrong codes of this sign-in
/// came before its right one.
pub(super) fn sign_in_detail(ip: IpAddr, typos: u32) -> String {
    match typos {
        0 => format!("from {ip}"),
        1 => format!("from {ip} after 1 wrong code"),
        n => format!("from {ip} after {n} wrong codes"),
    }
}

/// Detail of a [`SEEN`] event.
pub(super) fn seen_detail(up_to: u64) -> String {
    format!("wrong codes up to {up_to}")
}

/// A wrong code to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WrongCode {
    /// Unix seconds.
    pub at: u64,
    /// "TOTP code" or "backup code".
    pub what: String,
    /// The client's address, if it was recorded.
    pub from: Option<String>,
}

/// What the notice shows.
#[derive(Debug, Default)]
pub(super) struct Unseen {
    /// Newest first.
    pub codes: Vec<WrongCode>,
    /// The time up to which the person has dismissed wrong codes (0: never).
    pub seen_up_to: u64,
}

/// The wrong codes to show, from the account's `events` (newest first, as
/// `Store::recent_audit` gives them), at `now`. `pending_secs`: how long a sign-in may
/// wait for its second factor (its typos are at most that much older than its success).
pub(super) fn unseen(events: &[AuditEvent], now: u64, pending_secs: u64) -> Unseen {
    let since = now.saturating_sub(WINDOW_SECS);
    let seen_up_to = events
        .iter()
        .filter(|e| e.kind == SEEN)
        .filter_map(|e| e.detail.strip_prefix("wrong codes up to ")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    // Typos still to match: (address, how many, when that sign-in succeeded).
    let mut typos: Vec<(&str, u32, u64)> = Vec::new();
    let mut codes = Vec::new();
    for e in events {
        if e.at < since || e.at <= seen_up_to {
            break;
        }
        if e.kind == SIGN_IN {
            if let Some((from, n)) = parse_sign_in(&e.detail)
                && n > 0
            {
                typos.push((from, n, e.at));
            }
        } else if e.kind == FAILED {
            let (what, from) = match e.detail.split_once(" from ") {
                Some((what, from)) => (what, Some(from)),
                None => (e.detail.as_str(), None),
            };
            let own = from.and_then(|from| {
                typos
                    .iter_mut()
                    .find(|(a, n, ok_at)| *a == from && *n > 0 && *ok_at >= e.at && *ok_at - e.at <= pending_secs)
            });
            match own {
                Some((_, n, _)) => *n -= 1,
                None => codes.push(WrongCode { at: e.at, what: what.to_string(), from: from.map(str::to_string) }),
            }
        }
    }
    Unseen { codes, seen_up_to }
}

/// (address, typos) of a [`SIGN_IN`] detail.
fn parse_sign_in(detail: &str) -> Option<(&str, u32)> {
    let rest = detail.strip_prefix("from ")?;
    match rest.split_once(" after ") {
        None => Some((rest, 0)),
        Some((from, n)) => Some((from, n.split(' ').next()?.parse().ok()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "192.0.2.1";
    const B: &str = "198.51.100.7";

    fn ev(at: u64, kind: &str, detail: String) -> AuditEvent {
        AuditEvent { at, username: "a@x".into(), kind: kind.into(), detail }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Newest first, as the store gives them.
    fn newest_first(mut v: Vec<AuditEvent>) -> Vec<AuditEvent> {
        v.sort_by_key(|e| std::cmp::Reverse(e.at));
        v
    }

    fn shown(events: Vec<AuditEvent>, now: u64) -> Vec<(u64, Option<String>)> {
        unseen(&newest_first(events), now, 300).codes.into_iter().map(|c| (c.at, c.from)).collect()
    }

    #[test]
    fn details_read_back() {
        assert_eq!(parse_sign_in(&sign_in_detail(ip(A), 0)), Some((A, 0)));
        assert_eq!(parse_sign_in(&sign_in_detail(ip(A), 1)), Some((A, 1)));
        assert_eq!(parse_sign_in(&sign_in_detail("2001:db8::1".parse().unwrap(), 3)), Some(("2001:db8::1", 3)));
        assert_eq!(parse_sign_in(""), None, "sign-ins recorded before the address was");
        let e = ev(10, FAILED, failed_detail(true, ip(B)));
        assert_eq!(
            unseen(&[e], 20, 300).codes,
            vec![WrongCode { at: 10, what: "backup code".into(), from: Some(B.into()) }]
        );
    }

    #[test]
    fn a_sign_ins_own_typos_are_left_out_and_others_shown() {
        let events = vec![
            ev(100, FAILED, failed_detail(false, ip(B))), // someone else
            ev(200, FAILED, failed_detail(false, ip(A))), // the owner's typo …
            ev(230, SIGN_IN, sign_in_detail(ip(A), 1)),   // … in the sign-in that then succeeded
        ];
        assert_eq!(shown(events, 1000), vec![(100, Some(B.into()))]);
    }

    #[test]
    fn typos_are_counted_per_address_within_the_pending_time() {
        let events = vec![
            ev(100, FAILED, failed_detail(false, ip(A))), // same address, more than 5 min before
            ev(500, FAILED, failed_detail(false, ip(A))), // a sign-in from A that gave up
            ev(510, FAILED, failed_detail(false, ip(A))),
            ev(520, FAILED, failed_detail(false, ip(B))), // another address
            ev(600, SIGN_IN, sign_in_detail(ip(A), 1)),   // one typo of its own
            ev(700, FAILED, failed_detail(false, ip(A))), // after the sign-in
        ];
        assert_eq!(
            shown(events, 1000),
            vec![(700, Some(A.into())), (520, Some(B.into())), (500, Some(A.into())), (100, Some(A.into()))]
        );
        // A sign-in without typos hides nothing.
        let events = vec![ev(100, FAILED, failed_detail(false, ip(A))), ev(120, SIGN_IN, sign_in_detail(ip(A), 0))];
        assert_eq!(shown(events, 1000), vec![(100, Some(A.into()))]);
    }

    #[test]
    fn dismissed_and_old_codes_are_not_shown() {
        let day = 24 * 3600;
        let events = vec![
            ev(10, FAILED, failed_detail(false, ip(A))),
            ev(40 * day, FAILED, failed_detail(false, ip(A))),
            ev(41 * day, FAILED, failed_detail(true, ip(B))),
            ev(42 * day, SEEN, seen_detail(41 * day)),
            ev(42 * day, FAILED, failed_detail(false, ip(B))), // after what the page showed
            ev(43 * day, FAILED, "TOTP code".into()),          // before addresses were recorded
        ];
        let u = unseen(&newest_first(events.clone()), 50 * day, 300);
        assert_eq!(u.seen_up_to, 41 * day);
        assert_eq!(
            u.codes.iter().map(|c| (c.at, c.from.clone())).collect::<Vec<_>>(),
            vec![(43 * day, None), (42 * day, Some(B.into()))]
        );
        // Two tabs dismissing: an older page's dismissal does not bring codes back.
        let mut more = events;
        more.push(ev(44 * day, SEEN, seen_detail(43 * day)));
        more.push(ev(45 * day, SEEN, seen_detail(40 * day)));
        assert!(shown(more, 50 * day).is_empty());
        // 30 days.
        assert!(shown(vec![ev(10, FAILED, failed_detail(false, ip(A)))], WINDOW_SECS + 11).is_empty());
    }
}
