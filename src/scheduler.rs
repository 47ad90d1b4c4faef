//! The timer loop: owns the in-memory [`Wheel`], sleeps until the next expiration, and hands due
//! schedules to firing.
//!
//! It runs on a thread of its own and never touches the store. What enters the wheel comes from the committer (new schedules
//! inside the loaded horizon, and horizon loads); what leaves goes to [`crate::firing`].

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::record::Schedule;
use crate::retries::Retries;
use crate::store::SegmentKey;
use crate::systemd::Watchdog;
use crate::time::{Clock, SystemClock, UnixMs};
use crate::wheel::{EntryKey, Wheel};

/// Most commands taken per wake-up, so a burst of inserts cannot delay firing for long.
const MAX_COMMANDS_PER_TURN: usize = 4096;
/// A difference between wall-clock and monotonic progress beyond this is a clock step.
const STEP: Duration = Duration::from_millis(100);
/// Longest wait without looking at the clock and the shutdown signal.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// One stored copy of a schedule: its id, due instant and segment. A replacement always lands
/// in a new segment, so this tells two copies of an id apart even when their dues are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleRef {
    pub segment: SegmentKey,
    pub due: UnixMs,
    pub id: String,
}

impl ScheduleRef {
    pub fn of(segment: SegmentKey, schedule: &Schedule) -> ScheduleRef {
        ScheduleRef {
            segment,
            due: schedule.due,
            id: schedule.id.clone(),
        }
    }
}

/// A schedule held in memory, with the store segment it came from.
///
/// The schedule is boxed: a resident is moved from the loader's batch through the channel,
/// the wheel's slab, the expired list and firing's batch, and a pointer moves cheaply where
/// the whole schedule (about 150 bytes) made those moves and the vectors' regrowth a tenth of
/// a backlog drain's CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub segment: SegmentKey,
    pub schedule: Box<Schedule>,
}

/// A change to the wheel's contents.
#[derive(Debug)]
pub enum WheelCommand {
    /// Hold these schedules until they are due. A copy the wheel already holds (or is firing)
    /// is ignored: the committer may load a segment twice after moving its cursor back.
    Insert(Vec<Resident>),
    /// Forget this copy (it was replaced); a no-op if it is not held or is already being fired.
    Remove(ScheduleRef),
    /// These fired copies are now deleted from the store, so can no longer be loaded again.
    Deleted(Vec<ScheduleRef>),
    /// A series was cancelled while this copy of it was being fired: forget it, so that a
    /// failed delivery of it is not retried.
    Forget(ScheduleRef),
    /// Take this copy out unless it is already being fired, and say which happened: the one
    /// place where "cancelled" and "fired" are decided, so a cancel never both succeeds and
    /// fires.
    Withdraw(ScheduleRef, std::sync::mpsc::SyncSender<Withdrawal>),
    /// Let go of up to `count` of the latest-due schedules held, due at or after `from`, to
    /// make room for earlier ones: they are on disk, and the committer loads them again.
    /// Answers with how many it let go and the earliest due among them.
    Evict {
        count: usize,
        from: UnixMs,
        answer: std::sync::mpsc::SyncSender<(usize, Option<UnixMs>)>,
    },
    /// These copies, handed out for firing, could not be delivered: hold them again and hand
    /// them out at the given instant (see [`crate::retries`]). Until then a cancel or a
    /// replace can take them out like any other.
    Retry(Vec<(Resident, UnixMs)>),
    /// The store was reopened after a write failure and lost every segment from this seq on
    /// (writes it had taken but not made durable; none was acknowledged): forget the copies
    /// loaded from them, unless they are already being fired.
    Unwritten { from_seq: u64 },
}

/// The answer to [`WheelCommand::Withdraw`].
#[derive(Debug, PartialEq)]
pub enum Withdrawal {
    /// It was in the wheel and is no longer; here it is, in case the cancel fails to commit.
    Withdrawn(Resident),
    /// The wheel does not hold it (it is only on disk).
    NotHeld,
    /// It is being published or already was: too late to cancel.
    Firing,
    /// The timer thread has stopped (shutdown) while firing may still publish: no answer.
    Undecided,
}

/// Where a schedule the scheduler knows of is.
#[derive(Debug, Clone, Copy)]
struct Held {
    due: UnixMs,
    segment: SegmentKey,
    /// Its wheel entry; `None` once it has expired and is being fired.
    entry: Option<EntryKey>,
    /// It failed to deliver and waits for its next attempt (or was handed back before its
    /// due): not counted as resident, so undeliverable schedules never stop the loader or
    /// eviction, and never let go of by eviction (that would skip its backoff).
    retrying: bool,
}

impl Held {
    fn is(&self, copy: &ScheduleRef) -> bool {
        self.due == copy.due && self.segment == copy.segment
    }
}

/// The wheel and an id index into it.
pub struct Scheduler {
    wheel: Wheel<Resident>,
    /// Every schedule in the wheel or being fired, by id. Firing ones stay until the store has
    /// deleted them, which is what makes a repeated load of the same key harmless.
    /// (foldhash: randomly seeded like std's SipHash, so ids cannot be crafted to collide
    /// predictably, but several times faster on this per-schedule path. hashbrown's map for
    /// `entry_ref`: one lookup, and the id copied only when it is new, where a series'
    /// successor replaces its fired copy 100 000 times a second.)
    held: HashMap<String, Held, foldhash::fast::RandomState>,
    /// Schedules in memory; this loop subtracts the ones it drops without firing.
    resident: Arc<AtomicUsize>,
    /// Failed deliveries, forgotten when a retrying schedule is cancelled.
    retries: Arc<Retries>,
    clock: Arc<dyn Clock>,
}

impl Scheduler {
    pub fn new(resident: Arc<AtomicUsize>, retries: Arc<Retries>) -> Scheduler {
        Scheduler::with_clock(resident, retries, Arc::new(SystemClock))
    }

    /// A scheduler reading the wall clock from `clock`.
    pub fn with_clock(
        resident: Arc<AtomicUsize>,
        retries: Arc<Retries>,
        clock: Arc<dyn Clock>,
    ) -> Scheduler {
        Scheduler {
            wheel: Wheel::new(clock.now().as_millis() as UnixMs),
            held: HashMap::default(),
            resident,
            retries,
            clock,
        }
    }

    /// Runs on its own thread until `shutdown` or until the committer is gone. Due schedules go
    /// out on `fire` in due order, in batches.
    ///
    /// A thread of its own rather than a task, because a tokio timer rounds every deadline up
    /// to its 1 ms tick; a channel wait with a timeout wakes within tens of microseconds.
    ///
    /// Each turn feeds systemd's `watchdog` (a turn ends within [`IDLE_WAIT`]), so a loop
    /// that gets stuck is noticed.
    pub(crate) fn run(
        mut self,
        commands: std::sync::mpsc::Receiver<WheelCommand>,
        fire: mpsc::UnboundedSender<Vec<Resident>>,
        shutdown: CancellationToken,
        watchdog: &Watchdog,
    ) {
        let _feeds = watchdog.fed_by_timer();
        let mut expired = Vec::new();
        let mut last = (self.clock.now(), Instant::now());
        loop {
            watchdog.feed();
            let wall = self.clock.now();
            last = self.follow_clock(wall, last);
            self.wheel.poll(wall.as_millis() as UnixMs, &mut expired);
            if !expired.is_empty() {
                let batch = expired
                    .drain(..)
                    .map(|(_, s)| self.mark_firing(s))
                    .collect();
                if fire.send(batch).is_err() {
                    return;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            // Computed at sub-millisecond precision, so a wait never ends a millisecond late.
            let wait = match self.wheel.next_expiration() {
                Some(next) => Duration::from_millis(next).saturating_sub(self.clock.now()),
                None => IDLE_WAIT,
            };
            match commands.recv_timeout(wait.min(IDLE_WAIT)) {
                Ok(command) => {
                    self.apply(command);
                    for command in commands.try_iter().take(MAX_COMMANDS_PER_TURN) {
                        self.apply(command);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Notices a step of the wall clock (NTP, a VM resumed) against the monotonic clock since
    /// `last`, and re-bases the wheel when the wall clock went back: entries the wheel took
    /// for due are due again only when the wall clock says so. A step forward needs no help
    /// (the next poll fires what is due by the wall clock). Returns the new reference.
    fn follow_clock(&mut self, wall: Duration, last: (Duration, Instant)) -> (Duration, Instant) {
        let mono = Instant::now();
        let expected = last.0 + mono.duration_since(last.1);
        if wall + STEP < expected {
            tracing::warn!(
                back_ms = (expected - wall).as_millis() as u64,
                "the wall clock stepped back; re-basing the timing wheel"
            );
        } else if wall > expected + STEP {
            tracing::warn!(
                forward_ms = (wall - expected).as_millis() as u64,
                "the wall clock stepped forward; firing what is due by it"
            );
        }
        // Also for steps below the threshold: the wheel must never run ahead of the clock.
        self.wheel.rebase(wall.as_millis() as UnixMs);
        (wall, mono)
    }

    pub(crate) fn apply(&mut self, command: WheelCommand) {
        match command {
            WheelCommand::Insert(residents) => {
                for resident in residents {
                    self.insert(resident);
                }
            }
            WheelCommand::Remove(copy) => {
                if let Some(held) = self.held.get(&copy.id).copied()
                    && held.is(&copy)
                    && let Some(entry) = held.entry
                {
                    self.held.remove(&copy.id);
                    self.drop_entry(entry, held);
                    if held.retrying {
                        self.retries.forget(&copy.id); // its replacement starts afresh
                    }
                }
            }
            WheelCommand::Withdraw(copy, answer) => {
                let outcome = match self.held.get(&copy.id).copied() {
                    Some(held) if held.is(&copy) => match held.entry {
                        Some(entry) => {
                            self.held.remove(&copy.id);
                            match self.wheel.remove(entry) {
                                Some((_, resident)) => {
                                    if !held.retrying {
                                        self.resident.fetch_sub(1, Ordering::Relaxed);
                                    }
                                    self.retries.forget(&copy.id);
                                    Withdrawal::Withdrawn(resident)
                                }
                                None => Withdrawal::NotHeld,
                            }
                        }
                        None => Withdrawal::Firing,
                    },
                    _ => Withdrawal::NotHeld,
                };
                let _ = answer.send(outcome);
            }
            WheelCommand::Evict {
                count,
                from,
                answer,
            } => {
                let _ = answer.send(self.evict(count, from));
            }
            WheelCommand::Retry(residents) => {
                for (resident, at) in residents {
                    self.retry(resident, at);
                }
            }
            WheelCommand::Unwritten { from_seq } => {
                let lost: Vec<(String, Held)> = self
                    .held
                    .iter()
                    .filter(|(_, held)| held.segment.seq >= from_seq && held.entry.is_some())
                    .map(|(id, held)| (id.clone(), *held))
                    .collect();
                for (id, held) in lost {
                    self.held.remove(&id);
                    if let Some(entry) = held.entry {
                        self.drop_entry(entry, held);
                    }
                    if held.retrying {
                        self.retries.forget(&id);
                    }
                }
            }
            WheelCommand::Forget(copy) => {
                if let Some(held) = self.held.get(&copy.id).copied()
                    && held.is(&copy)
                {
                    self.held.remove(&copy.id);
                    if let Some(entry) = held.entry {
                        self.drop_entry(entry, held);
                    }
                    self.retries.forget(&copy.id);
                }
            }
            WheelCommand::Deleted(copies) => {
                for copy in copies {
                    // Unless the id has another copy now (a replacement, a series'
                    // successor) or it is in the wheel again.
                    if let EntryRef::Occupied(slot) = self.held.entry_ref(copy.id.as_str())
                        && slot.get().is(&copy)
                        && slot.get().entry.is_none()
                    {
                        slot.remove();
                    }
                }
            }
        }
    }

    fn insert(&mut self, resident: Resident) {
        let (due, segment) = (resident.schedule.due, resident.segment);
        let slot = match self.held.entry_ref(resident.schedule.id.as_str()) {
            EntryRef::Vacant(slot) => slot.insert_entry(Held {
                due,
                segment,
                entry: None,
                retrying: false,
            }),
            EntryRef::Occupied(slot) => {
                let held = *slot.get();
                if held.due == due && held.segment == segment {
                    // A reload of the copy already held or firing.
                    self.resident.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                // The committer removes a replaced copy before inserting its successor, so
                // a different copy here can only be an older one that is already firing;
                // the new one takes over the id.
                debug_assert!(
                    held.entry.is_none(),
                    "two wheel entries for {}",
                    resident.schedule.id
                );
                if let Some(entry) = held.entry
                    && self.wheel.remove(entry).is_some()
                    && !held.retrying
                {
                    self.resident.fetch_sub(1, Ordering::Relaxed);
                }
                slot
            }
        };
        let entry = self.wheel.insert(due, resident);
        *slot.into_mut() = Held {
            due,
            segment,
            entry: Some(entry),
            retrying: false,
        };
    }

    /// Lets go of up to `count` of the latest schedules due at or after `from`; returns how
    /// many and the earliest due let go. One waiting for a retry after a failed delivery
    /// (held in the wheel at another time than its due) stays: reloading it would skip its
    /// backoff.
    fn evict(&mut self, count: usize, from: UnixMs) -> (usize, Option<UnixMs>) {
        let mut out = Vec::new();
        let evictable = |at: u64, resident: &Resident| at == resident.schedule.due;
        self.wheel.evict_latest(count, from, evictable, &mut out);
        let mut earliest = None;
        let mut evicted = 0;
        for (at, resident) in out {
            if let Some(held) = self.held.remove(&resident.schedule.id)
                && held.retrying
            {
                continue; // handed back before its due: it was not counted
            }
            self.resident.fetch_sub(1, Ordering::Relaxed);
            evicted += 1;
            earliest = Some(earliest.map_or(at, |e: UnixMs| e.min(at)));
        }
        (evicted, earliest)
    }

    /// Holds a copy that failed to deliver (or was handed out before its due) again, to
    /// expire at `at`; dropped if it is no longer the copy held for its id (replaced, or
    /// cancelled, meanwhile). Firing no longer counts it as resident.
    fn retry(&mut self, resident: Resident, at: UnixMs) {
        let copy = ScheduleRef::of(resident.segment, &resident.schedule);
        if let Some(held) = self.held.get_mut(&copy.id)
            && held.is(&copy)
            && held.entry.is_none()
        {
            held.entry = Some(self.wheel.insert(at, resident));
            held.retrying = true;
        }
    }

    /// Drops the wheel entry of `held`, counting it out of memory unless it was not counted.
    fn drop_entry(&mut self, entry: EntryKey, held: Held) {
        if self.wheel.remove(entry).is_some() && !held.retrying {
            self.resident.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Hands out what is due at `now`, as the timer loop does.
    #[cfg(test)]
    pub(crate) fn poll_for_tests(&mut self, now: UnixMs, out: &mut Vec<Resident>) {
        let mut expired = Vec::new();
        self.wheel.poll(now, &mut expired);
        out.extend(expired.into_iter().map(|(_, r)| self.mark_firing(r)));
    }

    /// The ids held in the wheel (not those being fired), sorted.
    #[cfg(test)]
    pub(crate) fn ids_in_wheel(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .held
            .iter()
            .filter(|(_, held)| held.entry.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Marks an expired schedule as firing on its way out (counted as resident again if it
    /// was waiting for a retry).
    fn mark_firing(&mut self, resident: Resident) -> Resident {
        if let Some(held) = self.held.get_mut(&resident.schedule.id)
            && held.due == resident.schedule.due
            && held.segment == resident.segment
        {
            held.entry = None;
            if held.retrying {
                held.retrying = false;
                self.resident.fetch_add(1, Ordering::Relaxed);
            }
        }
        resident
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Delivery;

    fn schedule(id: &str, due: UnixMs) -> Resident {
        Resident {
            segment: SegmentKey::start_of(0),
            schedule: Box::new(Schedule {
                id: id.into(),
                due,
                subject: "t".into(),
                headers: vec![],
                payload: bytes::Bytes::new(),
                created: 0,
                delivery: Delivery::Core,
                recurrence: None,
                caller_id: true,
            }),
        }
    }

    /// A scheduler whose resident count matches what the committer would have sent it.
    fn scheduler() -> (Scheduler, Arc<AtomicUsize>) {
        let resident = Arc::new(AtomicUsize::new(0));
        (
            Scheduler::new(resident.clone(), Arc::new(Retries::default())),
            resident,
        )
    }

    fn insert(s: &mut Scheduler, resident: &AtomicUsize, schedule: Resident) {
        resident.fetch_add(1, Ordering::Relaxed);
        s.apply(WheelCommand::Insert(vec![schedule]));
    }

    fn expire(s: &mut Scheduler, now: UnixMs) -> Vec<String> {
        let mut out = Vec::new();
        s.wheel.poll(now, &mut out);
        out.into_iter()
            .map(|(_, x)| s.mark_firing(x).schedule.id)
            .collect()
    }

    #[test]
    fn a_reloaded_key_is_held_once() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 50;
        insert(&mut s, &resident, schedule("a", due));
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(s.wheel.len(), 1);
        assert_eq!(resident.load(Ordering::Relaxed), 1);
        assert_eq!(expire(&mut s, due), ["a"]);
    }

    #[test]
    fn a_firing_key_is_not_reloaded_until_the_store_deleted_it() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(expire(&mut s, due), ["a"]);

        insert(&mut s, &resident, schedule("a", due));
        assert!(
            s.wheel.is_empty(),
            "a reload while firing must not fire twice"
        );
        // Replacing it while it fires cannot recall it either.
        s.apply(WheelCommand::Remove(ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("a", due).schedule,
        )));

        s.apply(WheelCommand::Deleted(vec![ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("a", due).schedule,
        )]));
        assert!(s.held.is_empty());
        // After deletion the same id and due is a genuinely new schedule.
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(s.wheel.len(), 1);
    }

    #[test]
    fn replacing_while_the_old_copy_fires_holds_the_new_one() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        insert(&mut s, &resident, schedule("a", due));
        expire(&mut s, due);
        s.apply(WheelCommand::Remove(ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("a", due).schedule,
        )));
        insert(&mut s, &resident, schedule("a", due + 100));
        // The old copy's deletion must not drop the new copy's index entry.
        s.apply(WheelCommand::Deleted(vec![ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("a", due).schedule,
        )]));
        s.apply(WheelCommand::Remove(ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("a", due + 100).schedule,
        )));
        assert!(
            s.wheel.is_empty(),
            "the new copy was still removable by its key"
        );
        assert_eq!(
            resident.load(Ordering::Relaxed),
            1,
            "only the firing copy is left"
        );
    }

    #[test]
    fn a_same_due_replacement_while_the_old_copy_fires_is_held() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        let old = schedule("a", due);
        let new = Resident {
            segment: SegmentKey::fine(0, 9),
            ..schedule("a", due)
        };
        insert(&mut s, &resident, old.clone());
        expire(&mut s, due);
        s.apply(WheelCommand::Remove(ScheduleRef::of(
            old.segment,
            &old.schedule,
        )));
        insert(&mut s, &resident, new.clone());
        assert_eq!(s.wheel.len(), 1, "same id and due, but a new copy: held");
        s.apply(WheelCommand::Deleted(vec![ScheduleRef::of(
            old.segment,
            &old.schedule,
        )]));
        assert_eq!(
            expire(&mut s, due + 1),
            ["a"],
            "the old copy's deletion left it alone"
        );
    }

    #[test]
    fn the_timer_loop_itself_feeds_the_watchdog() {
        let scheduler = Scheduler::new(Arc::default(), Arc::default());
        let watchdog = Arc::new(Watchdog::fed_every(Duration::from_millis(1)));
        let (_commands, received) = std::sync::mpsc::channel();
        let (fire, _fired) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let timer = std::thread::spawn({
            let (stop, watchdog) = (stop.clone(), watchdog.clone());
            move || scheduler.run(received, fire, stop, &watchdog)
        });
        // Nobody else feeds it here: the keep-alives are the loop's (an idle turn is 50 ms).
        let start = Instant::now();
        while watchdog.sent() < 3 {
            assert!(start.elapsed() < Duration::from_secs(10), "no keep-alives");
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.cancel();
        timer.join().unwrap();
    }

    #[test]
    fn a_clock_step_back_rebases_the_wheel_and_nothing_fires_early() {
        const HOUR: UnixMs = 3_600_000;
        let t0: UnixMs = 1_796_061_600_000;
        let clock = Arc::new(crate::time::ManualClock::at(t0));
        let resident = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler::with_clock(resident.clone(), Arc::default(), clock.clone());
        let (commands, received) = std::sync::mpsc::channel();
        let (fire, mut fired) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let timer = std::thread::spawn({
            let stop = stop.clone();
            move || scheduler.run(received, fire, stop, &Watchdog::disabled())
        });
        let insert = |id: &str, due: UnixMs| {
            resident.fetch_add(1, Ordering::Relaxed);
            let resident = schedule(id, due);
            commands.send(WheelCommand::Insert(vec![resident])).unwrap();
        };
        let next_fired = |fired: &mut mpsc::UnboundedReceiver<Vec<Resident>>| {
            let start = Instant::now();
            loop {
                if let Ok(batch) = fired.try_recv() {
                    return batch.into_iter().map(|r| r.schedule.id).collect::<Vec<_>>();
                }
                assert!(start.elapsed() < Duration::from_secs(10), "nothing fired");
                std::thread::sleep(Duration::from_millis(1));
            }
        };

        insert("c", t0 + 10);
        // The wall clock steps back an hour; "d" and "e" are due within that hour. The wheel
        // had already passed their due by its own time: without re-basing they would fire
        // at once, an hour early.
        clock.set(t0 - HOUR);
        insert("d", t0 - HOUR + 200);
        insert("e", t0 - HOUR + 100_000);
        // A cancel finds "e" waiting, not firing.
        let (answer, outcome) = std::sync::mpsc::sync_channel(1);
        let copy = ScheduleRef::of(
            SegmentKey::start_of(0),
            &schedule("e", t0 - HOUR + 100_000).schedule,
        );
        commands.send(WheelCommand::Withdraw(copy, answer)).unwrap();
        assert!(matches!(outcome.recv().unwrap(), Withdrawal::Withdrawn(_)));
        // A round trip through the timer thread: it has polled since taking those commands.
        let (answer, outcome) = std::sync::mpsc::sync_channel(1);
        let nobody = ScheduleRef::of(SegmentKey::start_of(0), &schedule("x", 1).schedule);
        commands
            .send(WheelCommand::Withdraw(nobody, answer))
            .unwrap();
        assert_eq!(outcome.recv().unwrap(), Withdrawal::NotHeld);
        assert!(
            fired.try_recv().is_err(),
            "nothing is due by the wall clock"
        );

        // When the wall clock reaches "d", it fires; "c" (due an hour later) does not.
        clock.set(t0 - HOUR + 200);
        assert_eq!(next_fired(&mut fired), ["d"]);
        assert!(fired.try_recv().is_err());
        // A step forward past "c" fires it.
        clock.set(t0 + 10);
        assert_eq!(next_fired(&mut fired), ["c"]);

        stop.cancel();
        timer.join().unwrap();
    }

    #[test]
    fn a_schedule_waiting_for_a_retry_is_not_resident_nor_evicted() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(expire(&mut s, due), ["a"]);
        // Firing failed to deliver it: it stops counting it and hands it back.
        resident.fetch_sub(1, Ordering::Relaxed);
        s.apply(WheelCommand::Retry(vec![(schedule("a", due), due + 100)]));
        assert_eq!(s.wheel.len(), 1);
        assert_eq!(resident.load(Ordering::Relaxed), 0);
        assert_eq!(s.evict(10, 0), (0, None), "not let go of by eviction");
        // Its next attempt counts it again.
        assert_eq!(expire(&mut s, due + 100), ["a"]);
        assert_eq!(resident.load(Ordering::Relaxed), 1);
        // Waiting again, a cancel takes it without counting it out twice.
        resident.fetch_sub(1, Ordering::Relaxed);
        s.apply(WheelCommand::Retry(vec![(schedule("a", due), due + 300)]));
        let (answer, outcome) = std::sync::mpsc::sync_channel(1);
        let copy = ScheduleRef::of(SegmentKey::start_of(0), &schedule("a", due).schedule);
        s.apply(WheelCommand::Withdraw(copy, answer));
        assert!(matches!(outcome.recv().unwrap(), Withdrawal::Withdrawn(_)));
        assert_eq!(resident.load(Ordering::Relaxed), 0);
        assert!(s.wheel.is_empty());
    }
}
