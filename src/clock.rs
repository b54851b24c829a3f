//! Time for the gate: a monotonic clock that matches GPIO kernel timestamps, and wall-clock
//! milliseconds for events.
//!
//! The gpiochip character device stamps edges with CLOCK_MONOTONIC (time since boot), so the
//! daemon measures every interval on that clock; pure cores receive `now` as an argument and never
//! read a clock themselves.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on CLOCK_MONOTONIC, as nanoseconds since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MonoTime(u64);

impl MonoTime {
    pub const fn from_nanos(ns: u64) -> MonoTime {
        MonoTime(ns)
    }

    pub fn from_duration(d: Duration) -> MonoTime {
        MonoTime(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The current time on CLOCK_MONOTONIC.
    pub fn now() -> MonoTime {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        // tv_sec and tv_nsec of CLOCK_MONOTONIC are never negative.
        MonoTime(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn saturating_sub(self, earlier: MonoTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// How long until `self` from `now` (zero if past), for sleeping.
    pub fn until(self, now: MonoTime) -> Duration {
        self.saturating_sub(now)
    }
}

impl Add<Duration> for MonoTime {
    type Output = MonoTime;
    fn add(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

impl Sub<Duration> for MonoTime {
    type Output = MonoTime;
    fn sub(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

/// Wall-clock time as Unix milliseconds (for event timestamps and validity windows).
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_moves_forward_and_arithmetic_saturates() {
        let a = MonoTime::now();
        let b = MonoTime::now();
        assert!(b >= a);
        assert_eq!(a.saturating_sub(b + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!((a + Duration::from_millis(5)).saturating_sub(a), Duration::from_millis(5));
        assert_eq!(MonoTime::from_nanos(3) - Duration::from_nanos(10), MonoTime::from_nanos(0));
    }
}
