//! Wall-clock time as natsched sees it: whole milliseconds since the Unix epoch.
//!
//! Every due instant is stored and compared as a `u64` of Unix milliseconds. Converting *to* that
//! unit rounds up, so a request for `…00.2501Z` is due at `…00.251Z` and is never fired early;
//! reading the clock rounds down, so "now ≥ due" only holds once the due instant has passed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;

/// Unix milliseconds, the one time unit of the store, the wheel and the protocol.
pub type UnixMs = u64;

/// Where the wall clock is read: the system's ([`SystemClock`]), or one a test sets.
pub trait Clock: Send + Sync + 'static {
    /// The time since the Unix epoch (zero before it).
    fn now(&self) -> Duration;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }
}

/// A wall clock a test sets and steps by hand.
#[cfg(test)]
#[derive(Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

#[cfg(test)]
impl ManualClock {
    pub fn at(ms: UnixMs) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicU64::new(ms))
    }

    pub fn set(&self, ms: UnixMs) {
        self.0.store(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// The current wall-clock time, rounded down to the millisecond.
pub fn now_ms() -> UnixMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as UnixMs)
        .unwrap_or(0)
}

/// The current wall-clock time in microseconds since the Unix epoch (for measuring lateness).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// How long from `now` until `due` (zero when it has passed).
pub fn until(due: UnixMs, now: UnixMs) -> Duration {
    Duration::from_millis(due.saturating_sub(now))
}

/// Converts a parsed timestamp to Unix milliseconds, rounding sub-millisecond parts up.
/// Instants before the epoch clamp to 0: they are simply "due now".
pub fn timestamp_to_ms(ts: Timestamp) -> UnixMs {
    let nanos = ts.as_nanosecond();
    if nanos <= 0 {
        return 0;
    }
    let ms = (nanos as u128).div_ceil(1_000_000);
    UnixMs::try_from(ms).unwrap_or(UnixMs::MAX)
}

/// Formats a due instant the way every reply and header carries it: RFC 3339, UTC, exactly three
/// fractional digits, `Z` (e.g. `2026-11-24T18:00:00.250Z`).
pub fn format_ms(ms: UnixMs) -> String {
    // humantime's formatter writes exactly this form and is several times faster than a
    // strftime pattern; it is on the path of every ack and every delivery.
    let at = UNIX_EPOCH + Duration::from_millis(ms.min(MAX_MS));
    humantime::format_rfc3339_millis(at).to_string()
}

/// The latest instant the protocol can express, `9999-12-30T22:00:00.999Z` (the end of the
/// timestamp range every offset can write); later times are refused.
pub const MAX_MS: UnixMs = 253_402_207_200_999;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millisecond_precision_in_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_796_061_600_250), "2026-11-30T18:00:00.250Z");
        assert_eq!(format_ms(MAX_MS), "9999-12-30T22:00:00.999Z");
        assert_eq!(MAX_MS as i64, Timestamp::MAX.as_millisecond());
    }

    #[test]
    fn parsing_rounds_sub_millisecond_up_and_honours_offsets() {
        let ts: Timestamp = "2026-11-30T18:00:00.250Z".parse().unwrap();
        assert_eq!(timestamp_to_ms(ts), 1_796_061_600_250);
        let ts: Timestamp = "2026-11-30T18:00:00.2500001Z".parse().unwrap();
        assert_eq!(timestamp_to_ms(ts), 1_796_061_600_251);
        let ts: Timestamp = "2026-11-30T20:00:00.250+02:00".parse().unwrap();
        assert_eq!(timestamp_to_ms(ts), 1_796_061_600_250);
        let ts: Timestamp = "1960-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(timestamp_to_ms(ts), 0);
    }

    #[test]
    fn round_trips_through_the_wire_format() {
        for ms in [0, 1, 999, 1_000, 1_796_061_600_250, MAX_MS] {
            let ts: Timestamp = format_ms(ms).parse().unwrap();
            assert_eq!(timestamp_to_ms(ts), ms);
        }
    }

    #[test]
    fn until_saturates() {
        assert_eq!(until(10, 20), Duration::ZERO);
        assert_eq!(until(20, 10), Duration::from_millis(10));
    }
}
