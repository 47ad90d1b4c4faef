//! The store's single writer: group commit, replace-by-id, removal of fired schedules, and
//! loading the wheel's horizon from disk.
//!
//! One OS thread owns every mutation of the store, which is what keeps three things simple:
//!
//! * **Group commit.** Requests queue up while an fsync runs; the next round takes all of them
//!   (up to `store.max_batch`), writes them as one segment per time bucket in one atomic batch,
//!   fsyncs once, and only then acknowledges each of them.
//! * **Replace by id** is a read-modify-write (find the old copy, rewrite its segment without
//!   it) that no other writer can interleave.
//! * **The horizon.** Segment keys split at a cursor: every segment below it has been handed to
//!   the wheel, everything at or above it is only on disk. Because the loader that advances the
//!   cursor and the intake that decides "wheel or disk only" for a new segment are the same
//!   thread, no schedule can fall between the two.
//!
//! Memory stays bounded: the loader stops while `wheel.max_resident` schedules are in memory
//! and never loads past `now + wheel.lookahead`, and a new segment inside the horizon that
//! would exceed the bound stays on disk (the cursor moves back to it).
//!
//! **Far segments** (see [`crate::store`]) keep disk use low for sparse far-future schedules:
//! a round's schedules of one fine bucket that are few (under `SPARSE_BYTES`, 1 KiB) and
//! due at least two far buckets past the horizon are written into far segments instead, a
//! 1-minute bucket at a time, and their generated ids name that far segment. Far buckets are
//! *migrated* before the horizon reaches them: a second cursor sweeps them in order, and each
//! far segment is rewritten as fine segments in one atomic batch (no fsync needed: a crash
//! leaves the far segment in place). The loader never passes the migration cursor, so it
//! cannot miss a schedule still waiting in a far segment.
//!
//! Fired schedules are removed from their segments in bulk every `FIRED_FLUSH`, once their
//! fine bucket has ended: deletions need no fsync of their own (a crash only means a second
//! delivery), and batching them turns many small segment rewrites into few, mostly whole
//! deletions. A fired occurrence of a recurring schedule is replaced by its successor in the
//! same batch (see [`crate::recurrence`]).
//!
//! **Limits** (`limits.max_pending`, quotas) are checked here, against the pending counts
//! the writer keeps in a [`Ledger`] and persists with every round (see [`crate::policy`]).
//!
//! **A store that cannot be written** (a full disk, an I/O error) does not stop natsched: the
//! writer enters an *outage* (see `outage.rs`). New schedules and cancels get 503 at once,
//! while what is loaded keeps firing and loading reads on; every second it checks whether
//! the disk takes writes again, and if so reopens the store and carries on by itself.

mod far;
mod intake_mark;
mod outage;
mod round;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::cluster::Replication;
use crate::metrics::{Metrics, QuotaUsage};
use crate::policy::{Capacity, Ledger};
use crate::protocol::{self, ApiError};
use crate::record::Schedule;
use crate::recurrence::{Occurrence, Series};
use crate::replies::{Ack, Reply, Via};
use crate::scheduler::{Resident, ScheduleRef, WheelCommand, Withdrawal};
use crate::store::{
    BUCKET_MS, SegmentKey, Store, StoreError, Tier, WriteBatch, bucket_of, far_bucket_of,
};
use crate::time::{self, UnixMs};

use intake_mark::IntakeMark;
use outage::Outage;
use round::{Fired, MAX_FAR_SEGMENT_BYTES, MAX_SEGMENT_BYTES, Round, SPARSE_BYTES, split};

/// Segment seqs a caller's id may reserve (see `Committer::reserve_id`): far below where
/// generated ids stop fitting ([`protocol::FAR_SEQ_LIMIT`], and half of it for far
/// segments), so no request can push the store there. No store writes 2^46 segments.
const RESERVABLE_SEQS: u64 = protocol::FAR_SEQ_LIMIT / 4;
/// How often an idle committer checks whether the horizon needs loading.
const IDLE_TICK: Duration = Duration::from_millis(20);
/// Most schedules loaded from disk per round, so loading never stalls group commits for long.
const LOAD_CHUNK: usize = 16_384;
/// A fired series whose successor is due within this is removed (and moved on) at the next
/// flush, even if its bucket has not ended.
const SUCCESSOR_SOON: UnixMs = 500;
/// How long fired schedules may wait before they are removed from the store.
const FIRED_FLUSH: Duration = Duration::from_millis(100);
/// While the store cannot be written, loading stops once this many times
/// `wheel.max_resident` fired schedules wait for their removal (each is remembered until then).
const OUTAGE_FIRED_FACTOR: usize = 4;

/// What the committer is asked to do.
#[derive(Debug)]
pub enum StoreCommand {
    /// Store (or replace by id) a schedule, then acknowledge it on `reply` if given.
    Add {
        schedule: Schedule,
        reply: Option<Reply>,
    },
    /// These schedules were published and confirmed: delete them.
    Fired(Vec<Resident>),
    /// Cancel the pending schedule `id`, then answer on `reply` if given.
    Cancel { id: String, reply: Option<Reply> },
}

/// Tuning of the committer.
#[derive(Debug, Clone)]
pub struct CommitterOptions {
    pub max_batch: usize,
    pub lookahead: Duration,
    pub max_resident: usize,
    /// `limits.max_pending` and the quotas.
    pub capacity: Capacity,
}

/// What the committer talks to.
pub struct CommitterLinks {
    /// Requests and fired schedules.
    pub commands: mpsc::Receiver<StoreCommand>,
    /// The timer thread's wheel.
    pub wheel: std::sync::mpsc::Sender<WheelCommand>,
    /// Replies to send once durable.
    pub acks: mpsc::UnboundedSender<Vec<Ack>>,
    /// Schedules in memory, shared with the timer thread and firing.
    pub resident: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    /// Replicated mode: the log every change is appended to before the store applies it.
    pub log: Option<Replication>,
}

/// The store-writer thread's state.
pub struct Committer {
    store: Store,
    options: CommitterOptions,
    commands: mpsc::Receiver<StoreCommand>,
    wheel: std::sync::mpsc::Sender<WheelCommand>,
    acks: mpsc::UnboundedSender<Vec<Ack>>,
    /// Schedules in memory: in the wheel, on their way to it, or being published.
    resident: Arc<AtomicUsize>,
    /// Every fine segment below this has been handed to the wheel.
    cursor: SegmentKey,
    /// Every far bucket starting before this has been migrated into fine segments.
    far_cursor: UnixMs,
    /// The sequence number of the next segment written.
    next_seq: u64,
    /// Fired schedules still in the store, by segment, and since when the oldest waits.
    fired: foldhash::HashMap<SegmentKey, Vec<Fired>>,
    fired_since: Option<Instant>,
    /// Schedules in the store, in all and per quota, as of the last commit.
    ledger: Ledger,
    /// Set while the store cannot be written.
    outage: Option<Outage>,
    /// Far buckets before this may have schedules in the wheel under their fine keys while
    /// their far segment is still stored (loaded unmigrated during an outage, or migrated by
    /// a write the outage lost), until the migration passes them: cancels must ask the wheel
    /// about such far copies too.
    far_held_until: Option<UnixMs>,
    /// When the store last recovered from an outage, and how long the last outage began
    /// waiting between checks (see [`Committer::fail`]).
    recovered_at: Option<Instant>,
    check_every: Duration,
    metrics: Arc<Metrics>,
    /// The JetStream intake's mark, with this round's changes, and as last committed.
    intake: IntakeMark,
    intake_durable: IntakeMark,
    /// Whether this round changed the mark (then its batch records it).
    intake_changed: bool,
    /// Replicated mode: the log (see [`Committer::write`]).
    log: Option<Replication>,
    /// Set once the log refused a change: this instance no longer leads, and refuses
    /// everything until it is stopped.
    deposed: bool,
    /// Replicated mode: counts corrected at start, recorded through the log first thing on
    /// the writer's thread (standalone, they are recorded at once).
    ledger_fix: Option<WriteBatch>,
    /// The latest wall-clock reading committed (see `WriteBatch::set_clock_mark`).
    clock_mark: UnixMs,
    /// Whether a flush leaves fired copies of unfinished buckets for later (not at shutdown,
    /// nor in tests that call `round` directly).
    hold_unfinished: bool,
    /// Told once the first load is done (see [`Committer::when_loaded`]).
    loaded: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Committer {
    pub fn new(
        store: Store,
        options: CommitterOptions,
        links: CommitterLinks,
    ) -> Result<Committer, StoreError> {
        let CommitterLinks {
            commands,
            wheel,
            acks,
            resident,
            metrics,
            log,
        } = links;
        let (ledger, mut ledger_fix) = read_ledger(&store, &options.capacity)?;
        if log.is_none()
            && let Some(fix) = ledger_fix.take()
        {
            store.commit(fix)?;
            store.flush()?;
        }
        let intake = IntakeMark::decode(store.intake_mark()?.as_deref());
        // A new writer starts without an outage (the counters outlive a start-over).
        metrics.set_store_error(None);
        let committer = Committer {
            intake_durable: intake.clone(),
            intake,
            intake_changed: false,
            ledger,
            outage: None,
            far_held_until: None,
            recovered_at: None,
            check_every: outage::CHECK_EVERY,
            metrics,
            next_seq: store.next_seq()?,
            store,
            options,
            commands,
            wheel,
            acks,
            resident,
            cursor: SegmentKey::start_of(0),
            far_cursor: 0,
            fired: foldhash::HashMap::default(),
            fired_since: None,
            log,
            deposed: false,
            ledger_fix,
            clock_mark: 0,
            hold_unfinished: false,
            loaded: None,
        };
        committer.publish_ledger();
        Ok(committer)
    }

    /// Completes once the first load has handed the wheel everything due within the
    /// lookahead (overdue schedules first), or as much as `max_resident` allows.
    pub fn when_loaded(&mut self) -> tokio::sync::oneshot::Receiver<()> {
        let (loaded, when) = tokio::sync::oneshot::channel();
        self.loaded = Some(loaded);
        when
    }

    fn publish_ledger(&self) {
        self.metrics
            .pending
            .store(self.ledger.pending, Ordering::Relaxed);
        let capacity = &self.options.capacity;
        if capacity.has_quotas() {
            let usage = capacity
                .quotas()
                .zip(&self.ledger.used)
                .map(|((subjects, max_pending), &pending)| QuotaUsage {
                    subjects: subjects.to_owned(),
                    pending,
                    max_pending,
                })
                .collect();
            *self
                .metrics
                .quotas
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = usage;
        }
    }

    /// Runs on the calling (non-runtime) thread until every command sender is gone, then makes
    /// everything durable.
    pub fn run(mut self, runtime: Handle) -> Result<(), StoreError> {
        if let Some(fix) = self.ledger_fix.take() {
            self.write(fix)?;
            self.store.flush()?;
        }
        let mut commands = Vec::with_capacity(self.options.max_batch);
        loop {
            if self.outage.as_ref().is_some_and(Outage::due_for_check) {
                self.try_recover();
            }
            let more_to_load = self.advance();
            if !more_to_load && let Some(loaded) = self.loaded.take() {
                let _ = loaded.send(());
            }
            let wait = if more_to_load {
                Duration::ZERO
            } else {
                IDLE_TICK
            };
            let received = runtime.block_on(async {
                let recv = self
                    .commands
                    .recv_many(&mut commands, self.options.max_batch);
                tokio::time::timeout(wait, recv).await
            });
            let closed = received == Ok(0);
            let flush_fired = closed
                || self
                    .fired_since
                    .is_some_and(|since| since.elapsed() >= FIRED_FLUSH);
            // Until shutdown, fired copies of a bucket still being handed out wait.
            self.hold_unfinished = !closed;
            if !commands.is_empty() || flush_fired {
                self.round(commands.drain(..), flush_fired);
            }
            self.compact();
            if closed {
                break;
            }
        }
        self.store.close()
    }

    /// Takes the fired copies out of fine segments whose bucket has not ended yet, but for
    /// those holding a series whose next occurrence is near (its successor must not wait).
    fn unfinished_buckets(&mut self) -> Vec<(SegmentKey, Vec<Fired>)> {
        let now = time::now_ms();
        let soon = now + SUCCESSOR_SOON;
        self.fired
            .extract_if(|key, fired| {
                key.tier == Tier::Fine
                    && key.bucket + BUCKET_MS > now
                    && fired
                        .iter()
                        .all(|f| f.next.as_ref().is_none_or(|next| next.due > soon))
            })
            .collect()
    }

    /// Applies one round of commands atomically; see [`Round`].
    fn round(&mut self, commands: impl Iterator<Item = StoreCommand>, flush_fired: bool) {
        let refusal = match self.deposed {
            true => Some(ApiError::unavailable(
                "this natsched stopped leading its prefix; retry".to_owned(),
            )),
            false => self.outage.as_ref().map(Outage::refusal),
        };
        if let Some(refusal) = refusal {
            // Nothing is tried: sled refuses every write until the store is reopened.
            let mut round = Round::new(self.ledger.clone());
            for command in commands {
                match command {
                    StoreCommand::Fired(residents) => self.note_fired(residents),
                    StoreCommand::Add { reply, .. } | StoreCommand::Cancel { reply, .. } => {
                        round.refuse_with(reply, refusal.clone())
                    }
                }
            }
            self.send_acks(&mut round, None);
            return;
        }
        let started = Instant::now();
        let mut round = Round::new(self.ledger.clone());
        let mut failed = None;
        let mut requests = 0;
        for command in commands {
            requests += u64::from(!matches!(command, StoreCommand::Fired(_)));
            match command {
                StoreCommand::Fired(residents) => self.note_fired(residents),
                StoreCommand::Add { schedule, reply } if failed.is_none() => {
                    let position = stream_position(&reply);
                    if let Some((stream, sequence, floor)) = position {
                        if self.intake.is_stored(stream, sequence) {
                            round.already_stored(reply);
                            continue;
                        }
                        self.intake.forget_below(floor);
                        self.intake_changed = true;
                    }
                    if let Some(error) = self.reserve_id(&schedule) {
                        round.refuse_with(reply, error);
                    } else if let Err(err) =
                        round.add(&self.store, &self.options.capacity, schedule, reply)
                    {
                        failed = Some(err);
                    } else if let Some((_, sequence, _)) = position
                        && round.last_was_added()
                    {
                        // Known at once, so a redelivery later in this round is known too.
                        self.intake.stored(sequence);
                    }
                }
                StoreCommand::Cancel { id, reply } if failed.is_none() => {
                    let wheel = &self.wheel;
                    let far_held = self.far_held_until.is_some();
                    let withdraw = |copy, tier| {
                        // A far segment's schedule is in the wheel only after an outage,
                        // until migrated again (see `far_held_until`).
                        if tier == Tier::Far && !far_held {
                            return Withdrawal::NotHeld;
                        }
                        let (answer, outcome) = std::sync::mpsc::sync_channel(1);
                        // Once the timer thread has stopped, firing may still be publishing
                        // what it was handed: nobody can tell "cancelled" from "fired".
                        match wheel.send(WheelCommand::Withdraw(copy, answer)) {
                            Ok(()) => outcome.recv().unwrap_or(Withdrawal::Undecided),
                            Err(_) => Withdrawal::Undecided,
                        }
                    };
                    let capacity = &self.options.capacity;
                    if let Err(err) = round.cancel(&self.store, capacity, id, reply, withdraw) {
                        failed = Some(err);
                    }
                }
                StoreCommand::Add { reply, .. } | StoreCommand::Cancel { reply, .. } => {
                    round.refuse(reply)
                }
            }
        }
        // Fired copies of a fine bucket that is still being handed out (this round's too)
        // wait for it to end: its segment then leaves whole, instead of being rewritten
        // half-fired first (at 100 000 fires a second of series, a third of what the store
        // writes).
        let unfinished = match flush_fired && self.hold_unfinished {
            true => self.unfinished_buckets(),
            false => Vec::new(),
        };
        if flush_fired
            && failed.is_none()
            && let Err(err) =
                round.remove_fired(&self.store, &self.options.capacity, &mut self.fired)
        {
            failed = Some(err);
        }
        let result = match failed {
            Some(err) => Err(err),
            None => self.commit(&mut round),
        };
        if requests > 0 {
            self.metrics.record_round(requests, started.elapsed());
        }
        if result.is_err() && !round.applied() {
            // The fired copies are still stored: the next try stores their successors.
            let left = round.take_new().into_values().flatten();
            round.give_back_successors(left, &mut self.fired);
        }
        if std::mem::take(&mut self.intake_changed) {
            match &result {
                Ok(()) => self.intake_durable = self.intake.clone(),
                Err(_) => self.intake = self.intake_durable.clone(),
            }
        }
        if result.is_ok() && flush_fired {
            // Gone from the store now, so they can no longer be loaded again: the wheel may
            // forget them.
            self.fired_since = None;
            let deleted: Vec<ScheduleRef> = std::mem::take(&mut self.fired)
                .into_values()
                .flatten()
                .map(|fired| fired.copy)
                .collect();
            if !deleted.is_empty() {
                let _ = self.wheel.send(WheelCommand::Deleted(deleted));
            }
        }
        if !unfinished.is_empty() {
            for (key, fired) in unfinished {
                self.fired.entry(key).or_default().extend(fired);
            }
            self.fired_since.get_or_insert_with(Instant::now);
        }
        if result.is_err() && !round.applied() && self.log.is_none() {
            // Cancels of this round did not happen: give the wheel back what they took.
            // (Replicated, they may be in the log all the same: this leader stops, and the
            // next one settles them from the log.)
            let back = round.take_withdrawn();
            if !back.is_empty() {
                self.resident.fetch_add(back.len(), Ordering::Relaxed);
                let _ = self.wheel.send(WheelCommand::Insert(back));
            }
        }
        // The outage is on record (stats) before anyone hears of its first 503.
        if let Err(err) = &result {
            self.fail(err);
        }
        self.send_acks(&mut round, result.as_ref().err());
    }

    /// Sends the round's replies, given how it ended.
    fn send_acks(&mut self, round: &mut Round, failure: Option<&StoreError>) {
        let acks = round.acks(failure);
        for code in round.unanswered_errors() {
            self.metrics.record_unanswered(*code);
        }
        if !acks.is_empty() {
            let _ = self.acks.send(acks);
        }
    }

    /// Applies `batch` to the store; in replicated mode it is appended to the log first, and
    /// the store records the log sequence it got to in the same batch.
    fn write(&mut self, mut batch: WriteBatch) -> Result<(), StoreError> {
        if let Some(log) = &mut self.log
            && !batch.is_empty()
        {
            let (_, last) = log
                .append(&batch)
                .map_err(|e| StoreError::Log(e.to_string()))?;
            batch.set_log_applied(last);
        }
        self.store.commit(batch)
    }

    /// Replicated mode: a step of keeping the log compacted, between rounds.
    fn compact(&mut self) {
        if self.deposed || self.outage.is_some() {
            return;
        }
        let Some(log) = &mut self.log else { return };
        if let Err(err) = log.compact(&self.store) {
            self.fail(&err);
        }
    }

    /// A store operation failed: the outage begins, or goes on.
    fn fail(&mut self, error: &StoreError) {
        if let Some(log) = &self.log {
            // Replicated: the log refused a change (another leader, or no answer), or the
            // store failed after the log took one. Either way this instance stops leading
            // (no outage, no reopen in place: a reopened store could lack what the log has);
            // it follows the log again, and another instance may lead meanwhile.
            if !self.deposed {
                match error {
                    StoreError::Log(reason) => tracing::error!(
                        %reason,
                        "the replicated log refused a change; stopping to lead"
                    ),
                    other => tracing::error!(
                        error = %other,
                        "the store failed; stopping to lead, to follow the log again"
                    ),
                }
            }
            self.deposed = true;
            log.step_down();
            return;
        }
        match &mut self.outage {
            Some(outage) => outage.note(error),
            None => {
                // A store that fails again soon after it recovered (it takes a small write
                // but not real rounds) is checked less and less often.
                self.check_every = match self.recovered_at {
                    Some(at) if at.elapsed() < outage::FLAP_WINDOW => {
                        (self.check_every * 2).min(outage::MAX_CHECK_EVERY)
                    }
                    _ => outage::CHECK_EVERY,
                };
                let outage = Outage::begin(error, self.far_cursor, self.check_every);
                self.outage = Some(outage);
            }
        }
        self.show_outage();
    }

    fn show_outage(&self) {
        let shown = self.outage.as_ref().map(Outage::describe);
        self.metrics.set_store_error(shown);
    }

    /// Checks whether the store takes writes again; if so, reopens it and resumes as after
    /// a start: counts and seq from the store (what sled had taken but not written is gone),
    /// both cursors back to the start (the loader finds again what a lost write had moved;
    /// the wheel ignores what it already holds).
    fn try_recover(&mut self) {
        let failed = |committer: &mut Committer, error: StoreError, probed: bool| {
            if let Some(outage) = &mut committer.outage {
                outage.check_failed(&error, probed);
            }
            committer.show_outage();
        };
        if let Err(error) = self.store.probe_room() {
            return failed(self, error, false);
        }
        let durable = match self.store.reopen().and_then(|()| self.store.next_seq()) {
            Ok(durable) => durable,
            Err(error) => return failed(self, error, true),
        };
        // Segments from the durable seq on were lost with the writes sled had taken but not
        // written: what the wheel loaded from them must not fire (none was acknowledged).
        // Sent at once (a later step may fail, and the next attempt finds a higher seq), and
        // before anything is loaded again.
        let _ = self
            .wheel
            .send(WheelCommand::Unwritten { from_seq: durable });
        match self.resume_after_reopen(durable) {
            Ok((ledger, next_seq)) => {
                self.ledger = ledger;
                self.next_seq = next_seq;
                // A migration lost with the failed writes comes back as its far segment while
                // the wheel may hold its schedules under their fine keys: cancels ask the
                // wheel about far copies until the migration has passed them again.
                let until = self.far_held_until.unwrap_or(0).max(self.far_cursor);
                self.far_held_until = Some(until);
                self.cursor = SegmentKey::start_of(0);
                self.far_cursor = 0;
                self.publish_ledger();
                self.metrics.set_store_error(None);
                self.recovered_at = Some(Instant::now());
                if let Some(outage) = self.outage.take() {
                    outage.ended();
                }
            }
            Err(error) => failed(self, error, true),
        }
    }

    /// After reopening: the counts as stored, and a write (with fsync) of the next seq, which
    /// never goes back (lost seqs are not handed out again).
    fn resume_after_reopen(&mut self, durable: u64) -> Result<(Ledger, u64), StoreError> {
        let (ledger, fix) = read_ledger(&self.store, &self.options.capacity)?;
        if let Some(fix) = fix {
            self.write(fix)?;
        }
        let next_seq = self.next_seq.max(durable);
        let mut batch = WriteBatch::default();
        batch.set_next_seq(next_seq);
        self.write(batch)?;
        self.store.flush()?;
        Ok((ledger, next_seq))
    }

    /// A caller's `Sched-Id` of the form of a generated id that names a segment not written
    /// yet: an id another store generated (`natsched import` brings such ids). natsched could
    /// generate the same id once it writes that segment, so the segment's seq is reserved
    /// instead: the next seq moves past it (stored with the round), and that segment is
    /// never written. Refused (400) from [`RESERVABLE_SEQS`] on.
    fn reserve_id(&mut self, schedule: &Schedule) -> Option<ApiError> {
        let (_, seq, _) = protocol::far_parts(&schedule.id).filter(|_| schedule.caller_id)?;
        if seq < self.next_seq {
            return None;
        }
        if seq >= RESERVABLE_SEQS {
            return Some(ApiError::bad_request(format!(
                "invalid Sched-Id {:?}: it has the form of an id natsched generates, for a \
                 schedule that does not exist; choose another",
                schedule.id
            )));
        }
        self.next_seq = seq + 1;
        None
    }

    fn note_fired(&mut self, residents: Vec<Resident>) {
        if self.fired_since.is_none() {
            self.fired_since = Some(Instant::now());
        }
        let capacity = &self.options.capacity;
        for Resident {
            segment,
            mut schedule,
        } in residents
        {
            let quotas = capacity.mask(&schedule.subject);
            let caller_id = schedule.caller_id;
            let series = schedule.recurrence.is_some();
            let (copy, next) = match successor(&schedule) {
                // A series goes on: the schedule becomes its successor.
                Some((series, due)) => {
                    let copy = ScheduleRef::of(segment, &schedule);
                    schedule.due = due;
                    schedule.recurrence = Some(Box::new(series));
                    (copy, Some(schedule))
                }
                // The rest of the schedule is done with: keep only its id (moved, not copied).
                None => {
                    let copy = ScheduleRef {
                        segment,
                        due: schedule.due,
                        id: schedule.id,
                    };
                    (copy, None)
                }
            };
            self.fired.entry(segment).or_default().push(Fired {
                copy,
                caller_id,
                quotas,
                next,
                series,
            });
        }
    }

    /// Writes the round's new segments, commits, tells the wheel, and fsyncs if anyone waits
    /// for an ack.
    fn commit(&mut self, round: &mut Round) -> Result<(), StoreError> {
        let now = time::now_ms();
        let far_from = self.far_from(now);
        let mut far: BTreeMap<UnixMs, Vec<Schedule>> = BTreeMap::new();
        // The new segments, and whether the wheel takes them once they are stored.
        let mut written: Vec<(SegmentKey, Vec<Schedule>, bool)> = Vec::new();
        let mut to_insert = 0;
        // The wheel holds nothing due from here on that it could let go of (see below).
        let mut nothing_from = UnixMs::MAX;
        for (bucket, schedules) in round.take_new() {
            if bucket >= far_from
                && schedules.iter().map(round::approximate_size).sum::<usize>() < SPARSE_BYTES
            {
                far.entry(far_bucket_of(bucket))
                    .or_default()
                    .extend(schedules);
                continue;
            }
            for mut schedules in split(schedules, MAX_SEGMENT_BYTES) {
                let key = SegmentKey::fine(bucket, self.take_seq());
                round.name_generated(key, &mut schedules);
                round.write_segment(key, &schedules);
                if key >= self.cursor {
                    written.push((key, schedules, false));
                    continue; // the loader will bring it in
                }
                let wanted = self.resident.load(Ordering::Relaxed) + to_insert + schedules.len();
                let over = wanted.saturating_sub(self.options.max_resident);
                let later = bucket + BUCKET_MS;
                // Only something loaded from a later bucket can make room, and once the wheel
                // had nothing from some bucket on, later buckets of the round need not ask.
                let may_evict = self.cursor.bucket >= later && later < nothing_from;
                let full = over > 0 && {
                    let evicted = if may_evict {
                        self.make_room(over, later)
                    } else {
                        0
                    };
                    if evicted < over {
                        nothing_from = nothing_from.min(later);
                    }
                    evicted < over
                };
                if full && bucket > now {
                    // Keep memory bounded under a flood of near-future schedules: leave the
                    // segment on disk and pull the cursor back to it; the loader brings it in
                    // once there is room. Everything already popped for firing is due by now,
                    // so it sits in earlier buckets and is never loaded again; the wheel
                    // ignores reloads of what it already holds.
                    self.cursor = key;
                    written.push((key, schedules, false));
                } else {
                    to_insert += schedules.len();
                    written.push((key, schedules, true));
                }
            }
        }
        for (far_bucket, schedules) in far {
            for mut schedules in split(schedules, MAX_FAR_SEGMENT_BYTES) {
                let key = SegmentKey::far(far_bucket, self.take_seq());
                round.name_generated(key, &mut schedules);
                round.write_segment(key, &schedules);
                written.push((key, schedules, false));
            }
        }
        let (mut batch, mut wheel_commands) = round.finish(self.next_seq, &self.options.capacity);
        // Never back: finding a series that moved on counts from it (see
        // `Store::locate_series`).
        self.clock_mark = self.clock_mark.max(now);
        batch.set_clock_mark(self.clock_mark);
        if self.intake_changed {
            batch.set_intake_mark(&self.intake.encode());
        }
        if let Err(err) = self.write(batch) {
            let left = written.into_iter().flat_map(|(_, schedules, _)| schedules);
            round.give_back_successors(left, &mut self.fired);
            return Err(err);
        }
        round.mark_applied();
        // Replicated, the log's PubAck made it durable (on the log's replicas); a local fsync
        // is a choice (`[cluster] fsync`).
        let fsync = round.awaits_ack() && self.log.as_ref().is_none_or(Replication::fsync);
        // Should the fsync fail, the batch may be lost when the store is reopened, and the
        // fired copies of series with it: the next try then needs their successors again.
        let successors: Vec<Schedule> = match fsync {
            true => written
                .iter()
                .flat_map(|(_, schedules, _)| schedules)
                .filter(|schedule| round.is_successor(schedule))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        let mut inserts = Vec::with_capacity(to_insert);
        for (key, schedules, _) in written.into_iter().filter(|(_, _, insert)| *insert) {
            inserts.extend(schedules.into_iter().map(|schedule| Resident {
                segment: key,
                schedule: Box::new(schedule),
            }));
        }
        self.ledger = round.ledger().clone();
        self.publish_ledger();
        // The batch is in sled now whether or not the fsync succeeds, so the wheel must hear
        // about it either way; only the acks depend on the fsync.
        self.resident.fetch_add(inserts.len(), Ordering::Relaxed);
        if !inserts.is_empty() {
            wheel_commands.push(WheelCommand::Insert(inserts));
        }
        for command in wheel_commands {
            let _ = self.wheel.send(command);
        }
        if fsync && let Err(err) = self.store.flush() {
            round.give_back_successors(successors, &mut self.fired);
            return Err(err);
        }
        let (added, cancelled) = round.counts();
        Metrics::count(&self.metrics.scheduled_total, added);
        Metrics::count(&self.metrics.cancelled_total, cancelled);
        Ok(())
    }

    /// Makes room in memory for `count` schedules by letting the wheel go of as many of its
    /// latest ones, if they are due at or after `from` (later than what needs the room): the
    /// schedules in memory are always the earliest due. What it lets go stays on disk, and
    /// the cursor moves back so the loader brings it in again once there is room. Returns
    /// how many it let go.
    fn make_room(&mut self, count: usize, from: UnixMs) -> usize {
        let (answer, evicted) = std::sync::mpsc::sync_channel(1);
        let asked = WheelCommand::Evict {
            count,
            from,
            answer,
        };
        if self.wheel.send(asked).is_err() {
            return 0;
        }
        let (count, earliest) = evicted.recv().unwrap_or((0, None));
        if let Some(earliest) = earliest {
            self.cursor = self.cursor.min(SegmentKey::start_of(bucket_of(earliest)));
        }
        count
    }

    /// Migrates and loads what the horizon needs, a chunk of each. Returns whether more is
    /// waiting now. While the store cannot be written only loading goes on (it only reads),
    /// so what is stored keeps firing (see `load_far_unmigrated`).
    fn advance(&mut self) -> bool {
        if self.deposed {
            return false;
        }
        if let Some(outage) = &mut self.outage {
            // What fired cannot leave the store, and is remembered until it can: loading
            // stops here, so memory stays bounded however long the outage lasts. (Counted
            // only during an outage: otherwise `fired` is emptied every 100 ms.)
            let waiting: usize = self.fired.values().map(Vec::len).sum();
            if waiting >= OUTAGE_FIRED_FACTOR * self.options.max_resident {
                outage.firing_paused(waiting);
                return false;
            }
        }
        let migrated = match self.outage {
            Some(_) => self.load_far_unmigrated(),
            None => self.migrate_far(),
        };
        // Both get their turn, whatever the other did.
        let loaded = self.load_horizon();
        // The scans repaired damaged segments, recording the new count themselves.
        let lost = self.store.take_lost();
        if lost > 0 {
            self.ledger.lose(lost);
            self.publish_ledger();
        }
        match (migrated, loaded) {
            (Ok(migrated), Ok(loaded)) => migrated || loaded,
            (Err(err), _) | (_, Err(err)) => {
                self.fail(&err);
                false
            }
        }
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Moves the cursor forward by up to one chunk. Returns whether more is waiting to load now.
    fn load_horizon(&mut self) -> Result<bool, StoreError> {
        let horizon = time::now_ms().saturating_add(self.options.lookahead.as_millis() as u64);
        // Never past the migration: a far segment may still hold schedules due beyond it.
        let horizon_end = bucket_of(horizon)
            .saturating_add(BUCKET_MS)
            .min(self.far_cursor);
        let resident = self.resident.load(Ordering::Relaxed);
        if self.cursor.bucket >= horizon_end || resident >= self.options.max_resident {
            return Ok(false);
        }
        let limit = LOAD_CHUNK.min(self.options.max_resident - resident);
        let loaded = self.store.scan(self.cursor, horizon_end, limit)?;
        let count: usize = loaded.iter().map(|(_, s)| s.len()).sum();
        let full = count >= limit;
        self.cursor = match loaded.last() {
            Some((last, _)) if full => last.successor(),
            _ => SegmentKey::start_of(horizon_end),
        };
        let mut residents = Vec::with_capacity(count);
        for (segment, schedules) in loaded {
            residents.extend(schedules.into_iter().map(|schedule| Resident {
                segment,
                schedule: Box::new(schedule),
            }));
        }
        // Overdue schedules fire in the order they reach the wheel, so hand them over oldest
        // first (the scan returned whole buckets, so nothing earlier is left behind).
        residents.sort_by_key(|r| r.schedule.due);
        self.resident.fetch_add(count, Ordering::Relaxed);
        if !residents.is_empty() {
            let _ = self.wheel.send(WheelCommand::Insert(residents));
        }
        Ok(full)
    }
}

/// A series' state and due after the occurrence firing published (see
/// [`crate::recurrence`]); `None` for a one-shot schedule, or a series that has ended.
fn successor(schedule: &Schedule) -> Option<(Series, UnixMs)> {
    let series = schedule.recurrence.as_deref()?;
    let fired = series.publishing.unwrap_or(Occurrence {
        due: schedule.due,
        seq: series.seq,
    });
    series.advanced(fired)
}

/// The pending counts as the store recorded them. They are counted afresh (one read of the
/// whole store) and recorded when the record lacks a configured quota, or when damage found
/// earlier may have put them off; the record per quota is dropped when no quota is
/// configured, so a quota configured again later is counted afresh.
/// Where an add from the JetStream intake stream sits in it: (stream creation ms, sequence,
/// the stream's first sequence as intake last saw it).
fn stream_position(reply: &Option<Reply>) -> Option<(u64, u64, u64)> {
    match &reply.as_ref()?.via {
        Via::Stream(origin) => Some((origin.stream_created, origin.sequence, origin.floor)),
        Via::Request => None,
    }
}

fn read_ledger(
    store: &Store,
    capacity: &Capacity,
) -> Result<(Ledger, Option<WriteBatch>), StoreError> {
    let pending = store.pending()?;
    let recorded = store.quota_counts()?;
    let names: Vec<&str> = capacity.quotas().map(|(name, _)| name).collect();
    let found: Option<Vec<u64>> = recorded.as_ref().and_then(|recorded| {
        names
            .iter()
            .map(|name| recorded.iter().find(|(n, _)| n == name).map(|(_, c)| *c))
            .collect()
    });
    let recount = store.recount_requested()?;
    match found {
        _ if !recount && names.is_empty() => {
            let fix = recorded.is_some().then(|| {
                let mut batch = WriteBatch::default();
                batch.clear_quota_counts();
                batch
            });
            let ledger = Ledger {
                pending,
                used: Vec::new(),
            };
            return Ok((ledger, fix));
        }
        Some(used) if !recount => return Ok((Ledger { pending, used }, None)),
        _ => {}
    }
    let started = Instant::now();
    let mut counted = Ledger {
        pending: 0,
        used: vec![0; names.len()],
    };
    store.for_each_pending(|schedule| counted.add(capacity.mask(&schedule.subject)))?;
    let Ledger {
        pending: counted,
        used,
    } = counted;
    tracing::info!(
        schedules = counted,
        secs = started.elapsed().as_secs_f64(),
        "counted the pending schedules (quotas newly configured, or damage found before)"
    );
    if counted != pending {
        tracing::warn!(
            recorded = pending,
            counted,
            "the pending count was off; corrected"
        );
    }
    let mut batch = WriteBatch::default();
    batch.set_pending(counted);
    match names.is_empty() {
        true => batch.clear_quota_counts(),
        false => batch.set_quota_counts(names.iter().copied().zip(used.iter().copied())),
    }
    batch.clear_recount();
    let ledger = Ledger {
        pending: counted,
        used,
    };
    Ok((ledger, Some(batch)))
}

#[cfg(test)]
mod tests;
