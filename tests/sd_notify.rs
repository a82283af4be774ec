//! systemd's service notifications (issue 19, point 1): `mailgate serve` started with
//! `NOTIFY_SOCKET`, as systemd starts a `Type=notify` unit, sends `READY=1` once it
//! serves, `RELOADING=1` then `READY=1` around a SIGHUP (`systemctl reload`), `WATCHDOG=1`
//! at half of `WATCHDOG_USEC`, and `STOPPING=1` when SIGTERM begins the shutdown; in
//! that order. Every other test runs without `NOTIFY_SOCKET`, where nothing is sent.

use crate::support::mailgate::{Mailgate, Options};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// The notification socket a service manager would listen on, and what arrived on it.
struct Manager {
    socket: UnixDatagram,
    /// Every state line received, in order, without the watchdog pings.
    states: Vec<String>,
    /// `WATCHDOG=1` lines received.
    pings: usize,
}

impl Manager {
    fn bind(path: &std::path::Path) -> Manager {
        let socket = UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Manager { socket, states: Vec::new(), pings: 0 }
    }

    /// Reads datagrams until `done` holds; panics with what arrived after `wait`.
    fn until(&mut self, wait: Duration, done: impl Fn(&Manager) -> bool) {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while !done(self) {
            assert!(Instant::now() < deadline, "still waiting; received {:?}, {} pings", self.states, self.pings);
            let Ok(n) = self.socket.recv(&mut buf) else { continue };
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                match line {
                    "WATCHDOG=1" => self.pings += 1,
                    // The status text and the reload's timestamp go with the states.
                    l if l.starts_with("STATUS=") || l.starts_with("MONOTONIC_USEC=") => {}
                    l => self.states.push(l.to_string()),
                }
            }
        }
    }
}

#[test]
fn ready_reloading_watchdog_and_stopping_reach_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let mut manager = Manager::bind(&path);
    let mut mg = Mailgate::start(Options {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            // 400 ms: a ping every 200 ms.
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..Default::default()
    });
    manager.until(Duration::from_secs(20), |m| !m.states.is_empty());
    assert_eq!(manager.states, ["READY=1"], "{}", mg.log());

    manager.until(Duration::from_secs(20), |m| m.pings >= 3);

    mg.hup();
    manager.until(Duration::from_secs(20), |m| m.states.len() >= 3);
    assert_eq!(manager.states, ["READY=1", "RELOADING=1", "READY=1"], "{}", mg.log());
    mg.wait_log("TLS certificate reloaded", 1, Duration::from_secs(20));

    let status = mg.terminate().expect("mailgate did not stop within 30 s");
    assert!(status.success(), "{status}: {}", mg.log());
    manager.until(Duration::from_secs(5), |m| m.states.len() >= 4);
    assert_eq!(manager.states, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], "{}", mg.log());
}
