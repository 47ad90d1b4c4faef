//! The writer's state while the store cannot be written (a full disk, an I/O error).
//!
//! sled 0.34 refuses every write after one of its log writes failed, until the database is
//! opened again, so waiting is not enough: the writer checks every [`CHECK_EVERY`] whether the
//! store's directory takes writes ([`crate::store::Store::probe_room`]) and only then reopens
//! the store. Meanwhile requests that need a write get 503 at once (trying would only fail
//! again), and the failure is logged when it starts, once a minute while it lasts, and when
//! it ends.

use std::time::{Duration, Instant};

use crate::protocol::ApiError;
use crate::store::StoreError;

/// How often the writer checks whether the store takes writes again.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a lasting outage is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Outage {
    since: Instant,
    /// When it began, as RFC 3339 text.
    began: String,
    /// The latest failure, as text (escaped when it is sent).
    error: String,
    next_check: Instant,
    last_report: Instant,
}

impl Outage {
    pub(super) fn begin(error: &StoreError) -> Outage {
        let now = Instant::now();
        tracing::error!(
            %error,
            "the store cannot be written: new schedules and cancels get 503 until it can; \
             what is stored keeps firing; natsched checks every second and recovers by itself"
        );
        Outage {
            since: now,
            began: crate::time::format_ms(crate::time::now_ms()),
            error: error.to_string(),
            next_check: now + CHECK_EVERY,
            last_report: now,
        }
    }

    /// A check (or a write) failed again.
    pub(super) fn failed_again(&mut self, error: &StoreError) {
        let now = Instant::now();
        self.error = error.to_string();
        self.next_check = now + CHECK_EVERY;
        if now.duration_since(self.last_report) >= REPORT_EVERY {
            self.last_report = now;
            tracing::error!(
                %error,
                for_secs = self.since.elapsed().as_secs(),
                "the store still cannot be written; new schedules get 503"
            );
        }
    }

    pub(super) fn due_for_check(&self) -> bool {
        Instant::now() >= self.next_check
    }

    pub(super) fn ended(self) {
        tracing::info!(
            after_secs = self.since.elapsed().as_secs_f64(),
            "the store takes writes again: accepting schedules"
        );
    }

    /// What a request that needs a write is told meanwhile.
    pub(super) fn refusal(&self) -> ApiError {
        ApiError::unavailable(format!(
            "store unavailable for {} s: {}; natsched retries it every second, retry the request \
             later",
            self.since.elapsed().as_secs(),
            self.error
        ))
    }

    /// The text `stats` shows.
    pub(super) fn describe(&self) -> String {
        format!("{} (since {})", self.error, self.began)
    }
}
