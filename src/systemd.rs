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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Whether `READY=1` was sent.
static READY: AtomicBool = AtomicBool::new(false);

/// Tells systemd the instance is ready, and what it does.
pub(crate) fn ready(status: &str) {
    READY.store(true, Ordering::Relaxed);
    let status = one_line(status);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// `STATUS=` text on one line: the protocol is a line per assignment, and a status may quote
/// what came from the network (a lease holder's name), which must not add assignments.
fn one_line(status: &str) -> String {
    crate::protocol::escape_controls(status.to_owned())
}

/// How often start-up asks systemd for more time, and how much.
const EXTEND_EVERY: Duration = Duration::from_secs(10);
const EXTEND_BY: Duration = Duration::from_secs(30);

/// Until `READY=1`, asks systemd every [`EXTEND_EVERY`] to wait [`EXTEND_BY`] more
/// (`EXTEND_TIMEOUT_USEC`): start-up may wait as long as NATS is unreachable, or a follower
/// catches up with a long log, and systemd should not kill a process that is waiting, only
/// one that stopped answering. Ends at `stop`.
pub(crate) async fn extend_start_until_ready(stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut ticks = tokio::time::interval(EXTEND_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if READY.load(Ordering::Relaxed) {
            return;
        }
        notify(&[NotifyState::ExtendTimeoutUsec(EXTEND_BY.as_micros() as u32)]);
    }
}

/// Tells systemd what the instance does now.
pub(crate) fn status(status: &str) {
    notify(&[NotifyState::Status(&one_line(status))]);
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
    /// Keep-alives sent (for tests: outside systemd nothing is sent, but they are counted).
    sent: AtomicU64,
    /// How many timer loops run and feed the watchdog themselves (a count, not a flag: a
    /// timer thread given up at shutdown may end after the next one started).
    fed_by_timer: AtomicUsize,
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

    /// One fed every `every` (tests).
    #[cfg(test)]
    pub fn fed_every(every: Duration) -> Watchdog {
        Watchdog::every(Some(every))
    }

    /// Keep-alives sent so far.
    #[cfg(test)]
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn every(every: Option<Duration>) -> Watchdog {
        Watchdog {
            every,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            fed_by_timer: AtomicUsize::new(0),
        }
    }

    /// Sends a keep-alive if the last one is a quarter period old. Cheap enough for every
    /// turn of the timer loop.
    pub fn feed(&self) {
        let Some(every) = self.every else { return };
        let now = self.epoch.elapsed().as_millis() as u64;
        if now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) >= every.as_millis() as u64 {
            self.last_ms.store(now, Ordering::Relaxed);
            self.sent.fetch_add(1, Ordering::Relaxed);
            notify(&[NotifyState::Watchdog]);
        }
    }

    /// The timer loop feeds the watchdog until the returned guard is dropped (when the loop
    /// ends, however it ends).
    pub fn fed_by_timer(&self) -> TimerFeeds<'_> {
        self.fed_by_timer.fetch_add(1, Ordering::Relaxed);
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
            if self.fed_by_timer.load(Ordering::Relaxed) == 0 {
                self.feed();
            }
        }
    }
}

/// See [`Watchdog::fed_by_timer`].
pub(crate) struct TimerFeeds<'a>(&'a Watchdog);

impl Drop for TimerFeeds<'_> {
    fn drop(&mut self) {
        self.0.fed_by_timer.fetch_sub(1, Ordering::Relaxed);
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
        let old = watchdog.fed_by_timer();
        let new = watchdog.fed_by_timer();
        drop(old);
        assert_eq!(
            watchdog.fed_by_timer.load(Ordering::Relaxed),
            1,
            "the new one feeds"
        );
        drop(new);
        assert_eq!(watchdog.fed_by_timer.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_status_stays_one_assignment() {
        assert_eq!(one_line("standby: a\nREADY=1"), "standby: a\\nREADY=1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_feeds_only_while_no_timer_loop_does() {
        let watchdog = std::sync::Arc::new(Watchdog::fed_every(Duration::from_millis(10)));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (watchdog, stop) = (watchdog.clone(), stop.clone());
            async move { watchdog.feed_between_timers(stop).await }
        });
        let feeds = watchdog.fed_by_timer();
        // Keep-alives are spaced by the real clock (a quarter period since the last): let it
        // pass one, so a task that fed now would send.
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            watchdog.sent(),
            0,
            "a timer loop feeds it: the task must not"
        );
        drop(feeds);
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(watchdog.sent() >= 1, "no timer loop: the task feeds it");
        stop.cancel();
        task.await.unwrap();
    }
}
