//! Counters and the lateness histogram behind `<prefix>.stats`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// What the daemon counts since it started (and `pending`, which the store keeps).
pub struct Metrics {
    /// Schedules accepted (acknowledged, or committed without a reply subject).
    pub scheduled_total: AtomicU64,
    /// Schedules published and confirmed by the server.
    pub fired_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    /// Requests answered (or dropped) with an error, and schedules that could never be published.
    pub errors_total: AtomicU64,
    /// Schedules in the store, as the committer last wrote it.
    pub pending: AtomicU64,
    /// Publish time minus due time, in microseconds.
    lateness: Mutex<Histogram<u64>>,
}

/// Lateness percentiles in milliseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct LatenessMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            scheduled_total: AtomicU64::new(0),
            fired_total: AtomicU64::new(0),
            cancelled_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            // 1 µs to 1 day at 3 significant digits; anything later is recorded as a day.
            lateness: Mutex::new(Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("bounds")),
        }
    }
}

impl Metrics {
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records how late each of a batch of publishes was, in microseconds.
    pub fn record_lateness(&self, lateness_us: impl IntoIterator<Item = u64>) {
        let mut histogram = self.lateness.lock().unwrap_or_else(|e| e.into_inner());
        for us in lateness_us {
            histogram.saturating_record(us.max(1));
        }
    }

    pub fn lateness(&self) -> LatenessMs {
        let histogram = self.lateness.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return LatenessMs {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                count: 0,
            };
        }
        LatenessMs {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            count: histogram.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_percentiles() {
        let metrics = Metrics::default();
        assert_eq!(metrics.lateness().count, 0);
        metrics.record_lateness((1..=1000).map(|ms| ms * 1000));
        let lateness = metrics.lateness();
        assert_eq!(lateness.count, 1000);
        assert!((lateness.p50 - 500.0).abs() < 1.0, "{lateness:?}");
        assert!((lateness.p99 - 990.0).abs() < 1.0, "{lateness:?}");
        assert!((lateness.max - 1000.0).abs() < 1.0, "{lateness:?}");
    }
}
