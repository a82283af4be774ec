//! Time, injected so TOTP windows, session expiry and step-up freshness can be tested.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Unix time in seconds.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        crate::fsutil::now_unix()
    }
}

/// A clock tests set by hand.
#[derive(Debug, Default, Clone)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// At `t`.
    pub fn at(t: u64) -> FakeClock {
        FakeClock(Arc::new(AtomicU64::new(t)))
    }
    /// Moves to `t`.
    pub fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
    /// Moves on by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
