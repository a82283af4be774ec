//! systemd's service notifications (sd_notify(3)) for `Type=notify`
//! (debian/mailgate.service): `READY=1` once every listener serves, `STOPPING=1` when
//! shutdown begins, `RELOADING=1` … `READY=1` around a certificate reload asked for with
//! SIGHUP (`systemctl reload mailgate`), and `WATCHDOG=1` at half of `WATCHDOG_USEC`
//! when the unit sets `WatchdogSec=`.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd, or not as
//! `Type=notify`) every call does nothing. A notification that cannot be sent is logged
//! and otherwise ignored: it never stops mailgate from serving.

use sd_notify::NotifyState;
use std::time::Duration;

/// Sends `states` as one datagram to `$NOTIFY_SOCKET`, if set; logs a failure.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        let what: Vec<String> = states.iter().map(|s| s.to_string()).collect();
        tracing::warn!("cannot notify the service manager ({}): {e}", what.join(" "));
    }
}

/// Every listener is bound and serving.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Shutdown has begun (connections are being told goodbye).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// A reload asked for with SIGHUP starts. systemd ≥ 253 wants the monotonic time with
/// it (`Type=notify-reload`); older versions ignore the field.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is over (done or refused: the service serves either way).
pub fn reloaded() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// How often to ping a watchdog of `timeout`: half of it, as sd_watchdog_enabled(3)
/// advises, and never more than once per millisecond.
pub fn watchdog_interval(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_millis(1))
}

/// Pings systemd's watchdog (`WATCHDOG=1`) at half of `WATCHDOG_USEC` for as long as
/// the returned future runs; `None` when systemd set no watchdog for this process.
/// Run on the same runtime as the listeners, so a runtime that stops making progress
/// stops the pings and systemd restarts the service.
pub fn watchdog() -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let every = watchdog_interval(sd_notify::watchdog_enabled()?);
    Some(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::watchdog_interval;
    use std::time::Duration;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        assert_eq!(watchdog_interval(Duration::from_secs(30)), Duration::from_secs(15));
        assert_eq!(watchdog_interval(Duration::from_micros(1)), Duration::from_millis(1));
    }
}
