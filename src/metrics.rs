//! Counters and the lateness histogram behind `<prefix>.stats`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster::ClusterStatus;
use crate::protocol::ApiError;

/// What the daemon counts since it started (and `pending`, which the store keeps).
pub struct Metrics {
    /// Schedules accepted (acknowledged, or committed without a reply subject).
    pub scheduled_total: AtomicU64,
    /// Schedules published and confirmed by the server.
    pub fired_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    /// Requests answered (or dropped) with an error.
    pub errors_total: AtomicU64,
    /// Delivery attempts that failed (the schedule stays stored and is retried).
    pub delivery_errors_total: AtomicU64,
    /// Schedules refused because natsched may not publish to their target (403).
    /// Intake stream messages terminated and published to `<prefix>.rejected`.
    pub rejected_total: AtomicU64,
    pub denied_total: AtomicU64,
    /// Schedules in the store, as the committer last wrote it.
    pub pending: AtomicU64,
    /// Pending schedules per quota, as the committer last wrote them.
    pub quotas: Mutex<Vec<QuotaUsage>>,
    /// Why the store cannot be written, while it cannot (new schedules get 503 meanwhile).
    pub store_error: Mutex<Option<String>>,
    /// This instance's role for its prefix (see `crate::cluster`).
    cluster: Mutex<ClusterStatus>,
    /// Publish time minus due time, in microseconds.
    lateness: Mutex<Histogram<u64>>,
    /// Per API endpoint, in [`Endpoint::ALL`] order.
    endpoints: [EndpointStats; 5],
}

/// The request subjects natsched answers, as the micro-service protocol reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Add,
    Cancel,
    Get,
    List,
    Stats,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Add,
        Endpoint::Cancel,
        Endpoint::Get,
        Endpoint::List,
        Endpoint::Stats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Add => "add",
            Endpoint::Cancel => "cancel",
            Endpoint::Get => "get",
            Endpoint::List => "list",
            Endpoint::Stats => "stats",
        }
    }

    /// The subject it listens on under `prefix`.
    pub fn subject(self, prefix: &str) -> String {
        match self {
            Endpoint::Add => format!("{prefix}.add.>"),
            other => format!("{prefix}.{}", other.name()),
        }
    }
}

/// Request and error counts of one endpoint.
#[derive(Default)]
pub struct EndpointStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Total time from receipt to answer, in nanoseconds.
    pub processing_ns: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// How full one `[[limits.quotas]]` entry is.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuotaUsage {
    pub subjects: String,
    pub pending: u64,
    pub max_pending: u64,
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
            delivery_errors_total: AtomicU64::new(0),
            denied_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            quotas: Mutex::default(),
            store_error: Mutex::default(),
            cluster: Mutex::default(),
            // 1 µs to 1 day at 3 significant digits; anything later is recorded as a day.
            lateness: Mutex::new(Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("bounds")),
            endpoints: Default::default(),
        }
    }
}

impl Metrics {
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an answered request (and, when `error` is given, an error) for `endpoint`.
    pub fn record_reply(&self, endpoint: Endpoint, elapsed: Duration, error: Option<ApiError>) {
        let stats = self.endpoint(endpoint);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats
            .processing_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if let Some(error) = error {
            self.errors_total.fetch_add(1, Ordering::Relaxed);
            stats.errors.fetch_add(1, Ordering::Relaxed);
            *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        }
    }

    /// Sets (or with `None` clears) why the store cannot be written.
    pub fn set_store_error(&self, error: Option<String>) {
        *self.store_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn store_error(&self) -> Option<String> {
        self.store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_cluster(&self, status: ClusterStatus) {
        *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Replicated mode: how many log entries this instance has still to apply.
    pub fn set_log_lag(&self, lag: u64) {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_lag = Some(lag);
    }

    pub fn cluster(&self) -> ClusterStatus {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn quotas(&self) -> Vec<QuotaUsage> {
        self.quotas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn endpoint(&self, endpoint: Endpoint) -> &EndpointStats {
        let index = Endpoint::ALL
            .iter()
            .position(|e| *e == endpoint)
            .expect("listed");
        &self.endpoints[index]
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
