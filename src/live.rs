//! Live proxied sessions, so that revoking an app password or removing an account
//! ends the sessions that used it at once.

use crate::auth::Authenticated;
use crate::store::LiveEvent;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

struct Entry {
    username: String,
    app_password_id: Option<String>,
    ip: Option<std::net::IpAddr>,
    kill: oneshot::Sender<EndReason>,
    /// The session in `mailgate_sessions`, with its protocol's byte counters (set by the
    /// gate, which knows the protocol): counted while the entry is here. Kept here, not
    /// in the guard, so a session's task grows by nothing (PERFORMANCE.md M1).
    counted: Option<crate::metrics::SessionGauge>,
}

/// Why a live session is ended from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its app password was revoked, its account removed or its password changed.
    Revoked,
    /// mailgate is shutting down.
    Shutdown,
}

/// The registry of live sessions.
#[derive(Clone)]
pub struct LiveSessions {
    inner: Arc<Mutex<HashMap<u64, Entry>>>,
    next: Arc<AtomicU64>,
    /// Turns true at shutdown, for connections that have not logged in yet.
    stopping: Arc<watch::Sender<bool>>,
    /// Tells the other nodes sharing the store (see [`LiveSessions::share_with`]).
    others: Arc<std::sync::OnceLock<Publisher>>,
}

type Publisher = Arc<dyn Fn(&LiveEvent) + Send + Sync>;

impl Default for LiveSessions {
    fn default() -> Self {
        LiveSessions {
            inner: Arc::default(),
            next: Arc::default(),
            stopping: Arc::new(watch::channel(false).0),
            others: Arc::default(),
        }
    }
}

/// Held by a connection that has not logged in yet: completes when mailgate shuts down,
/// so the client gets a goodbye (`* BYE`, `421`) instead of a bare close.
pub struct StopNotice(watch::Receiver<bool>);

impl StopNotice {
    /// Completes once mailgate is shutting down; never otherwise.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|stopping| *stopping).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Held by a live session; dropping it unregisters the session.
pub struct LiveGuard {
    id: u64,
    live: LiveSessions,
    /// Fires when the session must end.
    pub(crate) killed: oneshot::Receiver<EndReason>,
}

impl LiveGuard {
    /// Counts the session in the metrics while it is registered (until the guard is
    /// dropped, or the session is ended from outside).
    pub fn count(&self, gauge: crate::metrics::SessionGauge) {
        if let Ok(mut m) = self.live.inner.lock()
            && let Some(e) = m.get_mut(&self.id)
        {
            e.counted = Some(gauge);
        }
    }

    /// The byte counters of the session's protocol (`None`: not counted, or ended).
    pub fn relay_meter(&self) -> Option<crate::metrics::RelayMeter> {
        let m = self.live.inner.lock().ok()?;
        m.get(&self.id)?.counted.as_ref().map(|c| c.relay().clone())
    }

    /// Completes when the session must end, with the reason.
    pub async fn ended(&mut self) -> EndReason {
        (&mut self.killed).await.unwrap_or(EndReason::Revoked)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.live.inner.lock() {
            m.remove(&self.id);
        }
    }
}

impl LiveSessions {
    /// Registers a session of `username` (opened with app password `app_password_id`, if any).
    #[cfg(test)]
    pub(crate) fn register(&self, username: &str, app_password_id: Option<&str>) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.inner.lock() {
            m.insert(
                id,
                Entry {
                    username: username.to_string(),
                    app_password_id: app_password_id.map(str::to_string),
                    ip: None,
                    kill: tx,
                    counted: None,
                },
            );
        }
        LiveGuard { id, live: self.clone(), killed: rx }
    }

    /// Registers the session of a verified login from `ip`, unless its account already
    /// has `max` live sessions from that address (Dovecot's `mail_max_userip_connections`);
    /// `None` then. Only a verified login ([`Authenticated`]) can be registered.
    pub fn register_from(&self, who: &Authenticated, ip: std::net::IpAddr, max: usize) -> Option<LiveGuard> {
        let (username, app_password_id) = (who.username(), who.app_password_id());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut m = self.inner.lock().ok()?;
        let live = m.values().filter(|e| e.username == username && e.ip == Some(ip)).count();
        if live >= max {
            return None;
        }
        m.insert(
            id,
            Entry {
                username: username.to_string(),
                app_password_id: app_password_id.map(str::to_string),
                ip: Some(ip),
                kill: tx,
                counted: None,
            },
        );
        drop(m);
        Some(LiveGuard { id, live: self.clone(), killed: rx })
    }

    /// Ends the sessions of `username`; with `app_password_id`, only those opened with it,
    /// here and on the other nodes sharing the store. Returns how many were ended here.
    pub fn kill(&self, username: &str, app_password_id: Option<&str>) -> usize {
        let ev =
            LiveEvent::End { username: username.to_string(), app_password_id: app_password_id.map(str::to_string) };
        self.tell_others(&ev);
        self.apply(&ev)
    }

    /// Ends the sessions of `username` that were opened with the account password, here
    /// and on the other nodes sharing the store.
    pub fn kill_account_password_sessions(&self, username: &str) -> usize {
        let ev = LiveEvent::EndAccountPassword { username: username.to_string() };
        self.tell_others(&ev);
        self.apply(&ev)
    }

    /// Ends the local sessions an event names (an event from another node, or our own).
    pub fn apply(&self, ev: &LiveEvent) -> usize {
        match ev {
            LiveEvent::End { username, app_password_id } => self.kill_where(|e| {
                &e.username == username
                    && app_password_id.as_deref().is_none_or(|id| e.app_password_id.as_deref() == Some(id))
            }),
            LiveEvent::EndAccountPassword { username } => {
                self.kill_where(|e| &e.username == username && e.app_password_id.is_none())
            }
        }
    }

    /// Several nodes share the store: session-ending changes made here are also sent to
    /// them with `publish`.
    pub fn share_with(&self, publish: Publisher) {
        let _ = self.others.set(publish);
    }

    fn tell_others(&self, ev: &LiveEvent) {
        if let Some(publish) = self.others.get() {
            publish(ev);
        }
    }

    /// A notice for a connection that has not logged in yet (see [`StopNotice`]).
    pub fn stop_notice(&self) -> StopNotice {
        StopNotice(self.stopping.subscribe())
    }

    /// Ends every live session and tells connections still logging in (shutdown);
    /// returns how many connections were told.
    pub fn end_all(&self) -> usize {
        self.stopping.send_replace(true);
        let waiting = self.stopping.receiver_count();
        self.kill_where_because(|_| true, EndReason::Shutdown) + waiting
    }

    fn kill_where(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        self.kill_where_because(pred, EndReason::Revoked)
    }

    fn kill_where_because(&self, pred: impl Fn(&Entry) -> bool, reason: EndReason) -> usize {
        let Ok(mut m) = self.inner.lock() else { return 0 };
        let ids: Vec<u64> = m.iter().filter(|(_, e)| pred(e)).map(|(k, _)| *k).collect();
        for id in &ids {
            if let Some(e) = m.remove(id) {
                let _ = e.kill.send(reason);
            }
        }
        ids.len()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_by_app_password_and_by_account() {
        let s = LiveSessions::default();
        let mut a = s.register("a", Some("p1"));
        let mut b = s.register("a", Some("p2"));
        let _c = s.register("b", None);
        assert_eq!(s.kill("a", Some("p1")), 1);
        assert!(a.killed.try_recv().is_ok());
        assert!(b.killed.try_recv().is_err());
        assert_eq!(s.kill("a", None), 1);
        assert!(b.killed.try_recv().is_ok());
        drop(_c);
        assert!(s.is_empty());
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let (u, v) = (Authenticated::for_tests("u", None), Authenticated::for_tests("v", None));
        let g1 = s.register_from(&u, ip, 2).unwrap();
        let _g2 = s.register_from(&u, ip, 2).unwrap();
        assert!(s.register_from(&u, ip, 2).is_none(), "third from the same address");
        assert!(s.register_from(&u, "192.0.2.2".parse().unwrap(), 2).is_some(), "another address");
        assert!(s.register_from(&v, ip, 2).is_some(), "another user");
        drop(g1);
        assert!(s.register_from(&u, ip, 2).is_some(), "a slot came free");
        let mut pw = s.register("a", None);
        let mut app = s.register("a", Some("p3"));
        assert_eq!(s.kill_account_password_sessions("a"), 1);
        assert!(pw.killed.try_recv().is_ok());
        assert!(app.killed.try_recv().is_err());
    }
}
