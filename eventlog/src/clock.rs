//! Where the writer gets `now`. The domain never reads a clock; the writer
//! reads this one, so tests can drive time by hand instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time in microseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_us(&self) -> i64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_us: AtomicI64,
}

impl ManualClock {
    pub fn new(start_us: i64) -> Self {
        Self { now_us: AtomicI64::new(start_us) }
    }
    pub fn advance_ms(&self, ms: i64) {
        self.now_us.fetch_add(ms * 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.now_us.load(Ordering::SeqCst)
    }
}
