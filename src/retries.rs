//! Schedules whose delivery failed, and when to try them again.
//!
//! A schedule NATS would not take (larger than the server's `max_payload` after the limit was
//! lowered or on a cluster member with a smaller one, an invalid subject, a publish refused
//! by NATS permissions) is never deleted: it stays stored and goes back into the wheel to be
//! tried again after a capped exponential backoff ([`backoff`]). Its attempts and last error
//! are kept here, in memory (they count since start), for `get`, `list` and `stats`, and each
//! subject's failures are logged at most once per [`LOG_EVERY`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::time::UnixMs;

/// The wait before the first retry; it doubles with every failed attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts unless `[delivery] max_backoff` says otherwise.
pub const MAX_BACKOFF: Duration = crate::config::DEFAULT_MAX_BACKOFF;
/// How often one subject's delivery failures are logged at most.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// How long to wait after the `attempts`-th failed attempt (1 or more), at most `max`.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    FIRST_BACKOFF.saturating_mul(1 << doublings).min(max)
}

/// What went wrong with one schedule so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The due instant of the copy that failed (a replacement under the same id starts over).
    pub due: UnixMs,
    pub attempts: u32,
    pub last_error: String,
}

/// The failed schedules, by id.
pub struct Retries {
    inner: Mutex<Inner>,
    max_backoff: Duration,
}

impl Default for Retries {
    fn default() -> Self {
        Retries::new(MAX_BACKOFF)
    }
}

#[derive(Default)]
struct Inner {
    failures: HashMap<String, Failure>,
    /// When each subject's failure was last logged.
    logged: HashMap<String, Instant>,
}

impl Retries {
    /// No failures yet; waits between attempts grow to `max_backoff`.
    pub fn new(max_backoff: Duration) -> Retries {
        Retries {
            inner: Mutex::default(),
            max_backoff,
        }
    }

    /// Records a failed attempt to deliver schedule `id` (due at `due`) to `subject`; logs it
    /// unless that subject's failures were logged within [`LOG_EVERY`]. Returns how long to
    /// wait before the next attempt.
    pub fn failed(&self, id: &str, due: UnixMs, subject: &str, error: &str) -> Duration {
        let mut inner = self.lock();
        let failure = inner
            .failures
            .entry(id.to_owned())
            .or_insert_with(|| Failure {
                due,
                attempts: 0,
                last_error: String::new(),
            });
        if failure.due != due {
            failure.due = due;
            failure.attempts = 0;
        }
        failure.attempts = failure.attempts.saturating_add(1);
        failure.last_error = error.to_owned();
        let attempts = failure.attempts;
        let now = Instant::now();
        let log = inner
            .logged
            .get(subject)
            .is_none_or(|last| now.duration_since(*last) >= LOG_EVERY);
        if log {
            inner.logged.insert(subject.to_owned(), now);
            inner
                .logged
                .retain(|_, last| now.duration_since(*last) < LOG_EVERY);
            tracing::error!(
                subject = ?subject,
                id = ?id,
                attempts,
                error = ?error,
                "cannot deliver a schedule; it stays stored and is retried \
                 (logged once a minute per subject)"
            );
        }
        backoff(attempts, self.max_backoff)
    }

    /// Schedule `id` was delivered, cancelled or replaced: forget its failures.
    pub fn forget(&self, id: &str) {
        let mut inner = self.lock();
        if !inner.failures.is_empty() {
            inner.failures.remove(id);
        }
    }

    /// The failures of the copy of `id` due at `due`, if it has failed.
    pub fn get(&self, id: &str, due: UnixMs) -> Option<Failure> {
        let inner = self.lock();
        inner.failures.get(id).filter(|f| f.due == due).cloned()
    }

    /// How many schedules wait for another attempt.
    pub fn waiting(&self) -> usize {
        self.lock().failures.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100_ms_to_30_s() {
        let waits: Vec<u64> = (1..=12)
            .map(|a| backoff(a, MAX_BACKOFF).as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        assert_eq!(backoff(u32::MAX, MAX_BACKOFF), MAX_BACKOFF);
        assert_eq!(backoff(4, Duration::from_millis(250)).as_millis(), 250);
    }

    #[test]
    fn failures_count_per_copy_and_are_forgotten() {
        let retries = Retries::default();
        assert_eq!(retries.failed("a", 10, "t", "too big"), FIRST_BACKOFF);
        assert_eq!(
            retries.failed("a", 10, "t", "still too big"),
            2 * FIRST_BACKOFF
        );
        let failure = retries.get("a", 10).unwrap();
        assert_eq!(
            (failure.attempts, failure.last_error.as_str()),
            (2, "still too big")
        );
        assert_eq!(retries.get("a", 11), None, "another copy of the id");
        assert_eq!(retries.waiting(), 1);
        // A replacement under the same id starts over.
        assert_eq!(retries.failed("a", 11, "t", "x"), FIRST_BACKOFF);
        retries.forget("a");
        assert_eq!(retries.get("a", 11), None);
        assert_eq!(retries.waiting(), 0);
    }
}
