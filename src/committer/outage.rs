//! The writer's state while the store cannot be written (a full disk, an I/O error).
//!
//! sled 0.34 refuses every write after one of its log writes failed, until the database is
//! opened again, so waiting is not enough: the writer checks every [`CHECK_EVERY`] whether the
//! store's directory takes writes ([`crate::store::Store::probe_room`]) and only then reopens
//! the store; should the reopened store still fail, the checks back off up to
//! [`MAX_CHECK_EVERY`] (a reopen costs a few fsyncs). Meanwhile requests that need a write
//! get 503 at once (trying would only fail again), and the failure is logged when it starts,
//! once a minute while it lasts, and when it ends. Loading goes on, reading only: far
//! segments the horizon reaches are loaded as they are (see `load_far_unmigrated`), from
//! `far_loaded` on.

use std::time::{Duration, Instant};

use crate::protocol::ApiError;
use crate::store::{SegmentKey, StoreError};

/// How often the writer checks whether the store takes writes again.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest wait between checks, once reopening the store has failed again and again.
pub(super) const MAX_CHECK_EVERY: Duration = Duration::from_secs(30);
/// An outage beginning this soon after the last one ended starts with checks twice as far
/// apart as that one did (a store that takes a small write but not real rounds).
pub(super) const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// How often a lasting outage is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Outage {
    since: Instant,
    /// When it began, as RFC 3339 text.
    began: String,
    /// The latest failure: in full (logs and `stats`) and in words safe to tell a client.
    error: String,
    brief: String,
    next_check: Instant,
    check_every: Duration,
    last_report: Instant,
    /// The next far segment to load into memory unmigrated.
    pub(super) far_loaded: SegmentKey,
    /// Whether loading was stopped for the fired schedules waiting (logged once).
    paused: bool,
}

impl Outage {
    /// The outage starting with `error`, checked every `check_every` at first; far buckets
    /// before `far_cursor` are migrated.
    pub(super) fn begin(error: &StoreError, far_cursor: u64, check_every: Duration) -> Outage {
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
            brief: error.brief(),
            next_check: now + check_every,
            check_every,
            last_report: now,
            far_loaded: SegmentKey::far(far_cursor, 0),
            paused: false,
        }
    }

    /// A check failed; `probed` if the directory took the probe (so reopening failed, which
    /// costs more: the checks back off).
    pub(super) fn check_failed(&mut self, error: &StoreError, probed: bool) {
        self.check_every = match probed {
            true => (self.check_every * 2).min(MAX_CHECK_EVERY),
            false => CHECK_EVERY,
        };
        self.next_check = Instant::now() + self.check_every;
        self.note(error);
    }

    /// Another store operation failed meanwhile (loading, say): recorded, and logged once a
    /// minute; it does not put the next check off.
    pub(super) fn note(&mut self, error: &StoreError) {
        let now = Instant::now();
        self.error = error.to_string();
        self.brief = error.brief();
        if now.duration_since(self.last_report) >= REPORT_EVERY {
            self.last_report = now;
            tracing::error!(
                %error,
                for_secs = self.since.elapsed().as_secs(),
                "the store still cannot be written; new schedules get 503"
            );
        }
    }

    /// Loading stopped: `count` fired schedules wait for their removal.
    pub(super) fn firing_paused(&mut self, count: usize) {
        if !self.paused {
            self.paused = true;
            tracing::error!(
                waiting = count,
                "fired schedules cannot leave the store while it cannot be written: loading \
                 (and so firing) pauses until it can, to keep memory bounded"
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
            "store unavailable since {}: {}; natsched recovers by itself, retry the request \
             later",
            self.began, self.brief
        ))
    }

    /// The text `stats` shows.
    pub(super) fn describe(&self) -> String {
        format!("{} (since {})", self.error, self.began)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_checks_put_the_next_check_off_and_reopen_failures_back_off() {
        let error = StoreError::Reopening;
        let mut outage = Outage::begin(&error, 0, CHECK_EVERY);
        let first = outage.next_check;
        // The loader failing every few milliseconds must not keep recovery from running.
        for _ in 0..100 {
            outage.note(&error);
        }
        assert_eq!(outage.next_check, first);
        outage.check_failed(&error, true);
        outage.check_failed(&error, true);
        assert_eq!(outage.check_every, 4 * CHECK_EVERY);
        for _ in 0..10 {
            outage.check_failed(&error, true);
        }
        assert_eq!(outage.check_every, MAX_CHECK_EVERY);
        outage.check_failed(&error, false);
        assert_eq!(
            outage.check_every, CHECK_EVERY,
            "a full disk is checked every second"
        );
        assert!(
            !outage.refusal().description.contains('/'),
            "no paths to clients"
        );
    }
}
