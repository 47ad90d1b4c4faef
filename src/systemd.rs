//! systemd's notify protocol (`Type=notify`): `READY=1` once this instance is of use, a
//! `STATUS=` line saying what it does, and `WATCHDOG=1` keep-alives. (`STOPPING=1` is sent by
//! the binary when a stop signal arrives.) Outside systemd (no `NOTIFY_SOCKET`) every call
//! does nothing.
//!
//! Ready means: serving (the store open, overdue schedules handed to the wheel, the
//! subscriptions made), or waiting usefully — a standby instance waiting for another's lease,
//! a replicated follower caught up with the log. Both are states `systemctl start` should
//! not wait out.
//!
//! The watchdog (`WatchdogSec=`) is fed by the timer loop itself while the instance serves,
//! so a stuck timer stops the keep-alives and systemd restarts natsched; while it does not
//! serve (starting, standing by, following, stopping), a task feeds it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the instance is ready, and what it does.
pub(crate) fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd what the instance does now.
pub(crate) fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "cannot notify systemd");
    }
}

/// The keep-alives of `WatchdogSec=`.
pub(crate) struct Watchdog {
    /// How often to send one: a quarter of the watchdog's period. `None`: no watchdog.
    every: Option<Duration>,
    epoch: Instant,
    /// When the last one was sent, in ms since `epoch`.
    last_ms: AtomicU64,
    /// Set while the timer loop runs and feeds the watchdog itself.
    fed_by_timer: AtomicBool,
}

impl Watchdog {
    /// As systemd asks (`WATCHDOG_USEC`, for this process).
    pub fn from_env() -> Watchdog {
        Watchdog::every(sd_notify::watchdog_enabled().map(|period| period / 4))
    }

    /// None at all (tests).
    #[cfg(test)]
    pub fn disabled() -> Watchdog {
        Watchdog::every(None)
    }

    fn every(every: Option<Duration>) -> Watchdog {
        Watchdog {
            every,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            fed_by_timer: AtomicBool::new(false),
        }
    }

    /// Sends a keep-alive if the last one is a quarter period old. Cheap enough for every
    /// turn of the timer loop.
    pub fn feed(&self) {
        let Some(every) = self.every else { return };
        let now = self.epoch.elapsed().as_millis() as u64;
        if now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) >= every.as_millis() as u64 {
            self.last_ms.store(now, Ordering::Relaxed);
            notify(&[NotifyState::Watchdog]);
        }
    }

    /// The timer loop feeds the watchdog until the returned guard is dropped (when the loop
    /// ends, however it ends).
    pub fn fed_by_timer(&self) -> TimerFeeds<'_> {
        self.fed_by_timer.store(true, Ordering::Relaxed);
        TimerFeeds(self)
    }

    /// Feeds the watchdog whenever the timer loop does not, until `stop`.
    pub async fn feed_between_timers(&self, stop: CancellationToken) {
        let Some(every) = self.every else { return };
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if !self.fed_by_timer.load(Ordering::Relaxed) {
                self.feed();
            }
        }
    }
}

/// See [`Watchdog::fed_by_timer`].
pub(crate) struct TimerFeeds<'a>(&'a Watchdog);

impl Drop for TimerFeeds<'_> {
    fn drop(&mut self) {
        self.0.fed_by_timer.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_watchdog_nothing_is_fed_or_handed_over() {
        let watchdog = Watchdog::every(None);
        watchdog.feed();
        assert_eq!(watchdog.last_ms.load(Ordering::Relaxed), 0);
        let feeds = watchdog.fed_by_timer();
        assert!(watchdog.fed_by_timer.load(Ordering::Relaxed));
        drop(feeds);
        assert!(!watchdog.fed_by_timer.load(Ordering::Relaxed));
    }
}
