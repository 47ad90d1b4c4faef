//! One commit round: the changes of a batch of commands, staged so they apply atomically.

use std::collections::BTreeMap;
use std::collections::hash_map::Entry;
use std::fmt::Write as _;

// Per-schedule maps hash with foldhash: randomly seeded like std's SipHash, several times faster.
use foldhash::{HashMap, HashSet};

use crate::policy::{Capacity, Ledger, QuotaMask};
use crate::protocol::{self, ApiError};
use crate::record::Schedule;
use crate::replies::{Ack, Reply};
use crate::scheduler::{Resident, ScheduleRef, WheelCommand, Withdrawal};
use crate::store::{SegmentKey, Store, StoreError, Tier, WriteBatch, bucket_of, segment};
use crate::time::UnixMs;

/// Largest fine segment written, roughly. sled 0.34 writes a page over 128 KiB as a separate
/// blob file, which costs far more than a few more keys; a segment of 32 KiB leaves room for
/// several in one leaf page.
pub const MAX_SEGMENT_BYTES: usize = 32 * 1024;
/// Largest far segment written, roughly. Far segments stay on disk for long, and sled's
/// space overhead grows with value size (it rewrites whole leaf pages): measured with sled
/// 0.34, 1-2 KiB values cost about 1.4x their size on disk, 32 KiB values about 1.75x, and
/// one small value per key about 3x.
pub const MAX_FAR_SEGMENT_BYTES: usize = 2 * 1024;
/// A round's schedules of one fine bucket that take less than this are *sparse*: if they are
/// far enough ahead, they go to a far segment instead of a fine segment of their own.
pub const SPARSE_BYTES: usize = 1024;

/// Roughly what a schedule takes in a segment.
pub fn approximate_size(schedule: &Schedule) -> usize {
    if segment::is_thin(schedule) {
        return 16 + schedule.id.len();
    }
    let headers: usize = schedule
        .headers
        .iter()
        .map(|(n, v)| 6 + n.len() + v.len())
        .sum();
    let series = schedule
        .recurrence
        .as_deref()
        .map_or(0, |s| s.approximate_size());
    40 + schedule.id.len() + schedule.subject.len() + headers + schedule.payload.len() + series
}

/// `schedules` cut into runs of at most about `max_bytes` each (a larger schedule alone).
pub fn split(schedules: Vec<Schedule>, max_bytes: usize) -> Vec<Vec<Schedule>> {
    let mut out = Vec::new();
    let mut segment = Vec::new();
    let mut bytes = 0;
    for schedule in schedules {
        let size = approximate_size(&schedule);
        if bytes + size > max_bytes && !segment.is_empty() {
            out.push(std::mem::take(&mut segment));
            bytes = 0;
        }
        bytes += size;
        segment.push(schedule);
    }
    if !segment.is_empty() {
        out.push(segment);
    }
    out
}

/// Where an id the round touched is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In the new segment of this bucket, written at the end of the round.
    New(UnixMs),
    /// Like `New`: a series' successor, moved out of its fired copy (which fired from
    /// segment `from`), written without touching its index entry (see [`Round::advance`]).
    Advanced { bucket: UnixMs, from: SegmentKey },
    /// In a stored segment.
    Stored(SegmentKey),
    /// Nowhere: removed by this round.
    Gone,
}

/// A fired schedule still in the store: what removing it needs.
pub struct Fired {
    pub copy: ScheduleRef,
    /// Whether its id is a caller's (indexed).
    pub caller_id: bool,
    /// The quotas it counts against.
    pub quotas: QuotaMask,
    /// A series' successor: the same schedule due at its next occurrence, stored in its place
    /// by the same batch that removes it (none when the series has ended). A round moves it
    /// out, and gives it back if it fails (see [`Round::give_back_successors`]).
    pub next: Option<Box<Schedule>>,
    /// Whether it is a series (ended, if `next` is `None`).
    pub series: bool,
}

/// The pending schedule a new one replaces: where it is, and the quotas it counts against.
struct Replaced {
    place: Place,
    quotas: QuotaMask,
}

/// The staged changes of one round.
#[derive(Default)]
pub struct Round {
    batch: WriteBatch,
    /// New schedules by bucket: each becomes one segment.
    new: BTreeMap<UnixMs, Vec<Schedule>>,
    /// Stored segments this round changes, with what they will hold.
    rewrites: HashMap<SegmentKey, Vec<Schedule>>,
    /// Ids this round touched.
    places: HashMap<String, Place>,
    /// Wheel changes to send once committed (removals; inserts are added by the committer).
    wheel: Vec<WheelCommand>,
    acks: Vec<(Option<Reply>, Outcome)>,
    /// Pending schedules, in all and per quota, as of the changes staged so far.
    ledger: Ledger,
    /// Copies the wheel gave up for this round's cancels.
    withdrawn: Vec<Resident>,
    /// Whether the batch reached the store (even if its fsync then failed).
    applied: bool,
    /// Damaged segments this round rewrote from what was readable.
    damaged: HashSet<SegmentKey>,
    /// Requests without a reply subject that were refused.
    /// The codes of the errors refused requests without a reply subject got.
    unanswered_errors: Vec<u16>,
}

/// What a request's reply will say if the round commits.
enum Outcome {
    Added {
        id: String,
        due: UnixMs,
    },
    /// Added under the id natsched gave it (see [`Round::name_generated`]).
    Named {
        id: ulid::Ulid,
        due: UnixMs,
    },
    Cancelled {
        id: String,
    },
    /// An intake stream message delivered again whose schedule is stored already.
    AlreadyStored,
    /// Refused whatever the commit does (e.g. cancelling an unknown id).
    Refused(ApiError),
}

impl Round {
    /// A round starting from what is pending (`ledger`).
    pub fn new(ledger: Ledger) -> Round {
        Round {
            ledger,
            ..Round::default()
        }
    }

    /// Stages a new schedule, removing the pending copy of its id, if any; or refuses it
    /// when it does not fit `capacity`.
    pub fn add(
        &mut self,
        store: &Store,
        capacity: &Capacity,
        mut schedule: Schedule,
        reply: Option<Reply>,
    ) -> Result<(), StoreError> {
        let quotas = capacity.mask(&schedule.subject);
        // A new series' body goes to its index entry, written with its segment (see
        // `Round::write_segment`): its records are thin from the start.
        if let Some(series) = schedule.recurrence.as_deref_mut() {
            series.body_indexed = true;
        }
        // A generated id is new by construction; only a caller's id can already be pending.
        let replaced = match schedule.caller_id {
            true => self.pending_copy(store, capacity, &schedule.id)?,
            false => None,
        };
        if let Err(refused) =
            capacity.room_for(&self.ledger, quotas, replaced.as_ref().map(|r| r.quotas))
        {
            self.refuse_with(reply, refused.into());
            return Ok(());
        }
        if let Some(replaced) = replaced {
            match replaced.place {
                Place::New(bucket) | Place::Advanced { bucket, .. } => {
                    if let Some(schedules) = self.new.get_mut(&bucket) {
                        schedules.retain(|s| s.id != schedule.id);
                    }
                }
                Place::Stored(key) => {
                    let remaining = self.rewrite(store, key)?;
                    if let Some(at) = remaining.iter().position(|s| s.id == schedule.id) {
                        let old = remaining.remove(at);
                        let copy = ScheduleRef::of(key.migrated(old.due), &old);
                        self.wheel.push(WheelCommand::Remove(copy));
                    }
                }
                Place::Gone => {}
            }
            self.ledger.remove(replaced.quotas);
        }
        self.ledger.add(quotas);
        let bucket = bucket_of(schedule.due);
        let due = schedule.due;
        if schedule.caller_id {
            // Only a caller's id can come again in this round; a generated one is unique.
            self.places.insert(schedule.id.clone(), Place::New(bucket));
            let id = schedule.id.clone();
            self.acks.push((reply, Outcome::Added { id, due }));
        } else {
            // Named once its segment is known; until then its id holds where its reply is
            // (in a buffer the size of the final id, which then reuses it).
            let mut placeholder = String::with_capacity(ulid::ULID_LEN);
            let _ = write!(placeholder, "{}", self.acks.len());
            schedule.id = placeholder;
            let id = String::new();
            self.acks.push((reply, Outcome::Added { id, due }));
        }
        self.new.entry(bucket).or_default().push(schedule);
        Ok(())
    }

    /// The pending schedule under the caller's id `id`, if any. A caller's id is indexed
    /// when pending; one of the form of a generated id may name a schedule stored under it
    /// as generated.
    fn pending_copy(
        &mut self,
        store: &Store,
        capacity: &Capacity,
        id: &str,
    ) -> Result<Option<Replaced>, StoreError> {
        let place = if protocol::far_parts(id).is_some() {
            self.place_of(store, id)?
        } else {
            self.place_of_caller(store, id)?
        };
        let old = match place {
            Place::New(bucket) | Place::Advanced { bucket, .. } => self
                .new
                .get(&bucket)
                .and_then(|schedules| schedules.iter().find(|s| s.id == id)),
            Place::Stored(key) => self.rewrite(store, key)?.iter().find(|s| s.id == id),
            Place::Gone => None,
        };
        Ok(old.map(|old| Replaced {
            place,
            quotas: capacity.mask(&old.subject),
        }))
    }

    /// Acknowledges an intake stream message whose schedule is stored already.
    pub fn already_stored(&mut self, reply: Option<Reply>) {
        self.acks.push((reply, Outcome::AlreadyStored));
    }

    /// Whether the last request staged was an add that will be stored if the round commits.
    pub fn last_was_added(&self) -> bool {
        matches!(
            self.acks.last(),
            Some((_, Outcome::Added { .. } | Outcome::Named { .. }))
        )
    }

    /// Records a request that could not be staged (an earlier one failed): it gets a 503.
    pub fn refuse(&mut self, reply: Option<Reply>) {
        let error =
            ApiError::unavailable("store unavailable: an earlier write in its batch failed");
        self.refuse_with(reply, error);
    }

    /// Records a request refused with `error`, whatever the commit does.
    pub fn refuse_with(&mut self, reply: Option<Reply>, error: ApiError) {
        self.acks.push((reply, Outcome::Refused(error)));
    }

    /// Stages the cancellation of the pending schedule `id`. `withdraw` asks the wheel to let
    /// go of a copy it may hold; a copy already being fired cannot be cancelled.
    pub fn cancel(
        &mut self,
        store: &Store,
        capacity: &Capacity,
        id: String,
        reply: Option<Reply>,
        withdraw: impl FnOnce(ScheduleRef, Tier) -> Withdrawal,
    ) -> Result<(), StoreError> {
        let outcome = match self.place_of(store, &id)? {
            Place::Gone => {
                // An index entry that finds nothing (a series lost to a damaged segment) is
                // dropped, so it does not linger for good.
                if !self.places.contains_key(&id) && store.is_indexed(&id)? {
                    self.batch.unindex(&id);
                }
                Outcome::Refused(ApiError::not_found(&id))
            }
            Place::New(bucket) | Place::Advanced { bucket, .. } => {
                // Added earlier in this very round: it never reached the wheel. If that add
                // replaced a stored copy, the index still points there.
                let schedules = self.new.entry(bucket).or_default();
                if let Some(at) = schedules.iter().position(|s| s.id == id) {
                    let cancelled = schedules.remove(at);
                    self.ledger.remove(capacity.mask(&cancelled.subject));
                }
                self.batch.unindex(&id);
                self.places.insert(id.clone(), Place::Gone);
                Outcome::Cancelled { id }
            }
            Place::Stored(key) => {
                let (remaining, damaged) = self.staged(store, key)?;
                let found = remaining.iter().position(|s| s.id == id);
                // A far segment's schedule is in the wheel only if it was loaded during a
                // store outage, under the key its migration will give it.
                let decided = found.map(|at| {
                    let copy = &remaining[at];
                    withdraw(ScheduleRef::of(key.migrated(copy.due), copy), key.tier)
                });
                match found.zip(decided) {
                    None if damaged => Outcome::Refused(ApiError::new(
                        500,
                        format!(
                            "schedule {id:?} was in stored segment {key:?}, which is damaged; \
                             its record is unreadable (the segment's original bytes are kept \
                             for inspection)"
                        ),
                    )),
                    None => Outcome::Refused(ApiError::not_found(&id)),
                    // A series ends even while an occurrence is being delivered: that one
                    // still goes out, and its successor is never stored.
                    Some((at, Withdrawal::Firing)) if remaining[at].recurrence.is_none() => {
                        Outcome::Refused(ApiError::new(
                            404,
                            format!("schedule {id:?} is already being delivered"),
                        ))
                    }
                    Some((_, Withdrawal::Undecided)) => Outcome::Refused(ApiError::unavailable(
                        "natsched is shutting down; retry the cancel",
                    )),
                    Some((at, decided)) => {
                        let cancelled = remaining.remove(at);
                        match decided {
                            Withdrawal::Withdrawn(resident) => self.withdrawn.push(resident),
                            // A series' occurrence on its way out: should it fail, it must
                            // not be retried (the series is over).
                            Withdrawal::Firing => self.wheel.push(WheelCommand::Forget(
                                ScheduleRef::of(key.migrated(cancelled.due), &cancelled),
                            )),
                            Withdrawal::NotHeld | Withdrawal::Undecided => {}
                        }
                        self.ledger.remove(capacity.mask(&cancelled.subject));
                        if cancelled.caller_id {
                            self.batch.unindex(&id);
                        }
                        self.places.insert(id.clone(), Place::Gone);
                        Outcome::Cancelled { id }
                    }
                }
            }
        };
        self.acks.push((reply, outcome));
        Ok(())
    }

    /// Removes fired schedules from their segments, and their ids from the index unless the
    /// id has moved on to a newer schedule; moves the successors of series out of `fired`
    /// into the round. (The caller keeps `fired` until the round has committed, so a failed
    /// round leaves them to the next try, once it has given their successors back: see
    /// [`Round::give_back_successors`].)
    pub fn remove_fired(
        &mut self,
        store: &Store,
        capacity: &Capacity,
        fired: &mut HashMap<SegmentKey, Vec<Fired>>,
    ) -> Result<(), StoreError> {
        // Grouped by the segment that holds them: the fine keys of one unmigrated far segment
        // all lead to it, and it must be filtered once, for all of them.
        let mut held: HashMap<SegmentKey, Vec<&mut Fired>> = HashMap::default();
        for (&fired_key, schedules) in fired.iter_mut() {
            let holder = self.holder_of_fired(store, fired_key)?;
            held.entry(holder).or_default().extend(schedules.iter_mut());
        }
        for (key, mut schedules) in held {
            // An id is unique within a segment, so the id alone names the fired copy. Only
            // what is still there leaves the counts (a replaced or cancelled copy left
            // already), and only a series whose fired copy is still there goes on.
            let gone: HashMap<&str, usize> = schedules
                .iter()
                .enumerate()
                .map(|(at, f)| (f.copy.id.as_str(), at))
                .collect();
            let mut dropped: Vec<usize> = Vec::new();
            if let Some(remaining) = self.rewrites.get_mut(&key) {
                remaining.retain(|s| match gone.get(s.id.as_str()) {
                    Some(&at) => {
                        dropped.push(at);
                        false
                    }
                    None => true,
                });
            } else if let Some(raw) = store.raw_segment(key)? {
                // The common case, on the firing hot path: filter the encoded segment without
                // decoding its schedules; a fully fired one is removed.
                let filtered = segment::without(raw.as_ref(), |id| match gone.get(id) {
                    Some(&at) => {
                        dropped.push(at);
                        true
                    }
                    None => false,
                });
                match filtered {
                    Ok((kept, _)) => self.batch.put_raw_segment(key, kept),
                    // Damaged since it was loaded: rewritten from what is readable.
                    Err(_) => {
                        dropped.clear();
                        let remaining = self.rewrite(store, key)?;
                        remaining.retain(|s| match gone.get(s.id.as_str()) {
                            Some(&at) => {
                                dropped.push(at);
                                false
                            }
                            None => true,
                        });
                    }
                }
            }
            let mut ended = vec![false; schedules.len()];
            for at in dropped {
                let fired = &mut *schedules[at];
                self.ledger.remove(fired.quotas);
                match fired.next.take() {
                    Some(next) => self.advance(capacity, *next, fired.copy.segment),
                    // A series still where it fired from was not replaced: its index entry
                    // is its own, wherever it points (see `Store::locate_series`).
                    None if fired.series => ended[at] = true,
                    None => {}
                }
            }
            for (fired, ended) in schedules.iter().zip(ended) {
                let id = &fired.copy.id;
                let gone = match ended {
                    true => !self.places.contains_key(id),
                    false => {
                        fired.caller_id
                            && !fired.series
                            && self.place_of_caller(store, id)? == Place::Stored(key)
                    }
                };
                if gone {
                    self.places.insert(id.clone(), Place::Gone);
                    self.batch.unindex(id);
                }
            }
        }
        Ok(())
    }

    /// Stages a series' successor (see [`Fired::next`]), moved out of its fired copy (which
    /// fired from segment `from`): like an add, but nothing to replace (its fired copy was
    /// just removed) and nobody to answer.
    fn advance(&mut self, capacity: &Capacity, next: Schedule, from: SegmentKey) {
        self.ledger.add(capacity.mask(&next.subject));
        let bucket = bucket_of(next.due);
        self.places
            .insert(next.id.clone(), Place::Advanced { bucket, from });
        self.new.entry(bucket).or_default().push(next);
    }

    /// Whether `schedule` is a series' successor this round moved out of its fired copy.
    pub fn is_successor(&self, schedule: &Schedule) -> bool {
        advanced(&self.places, &schedule.id)
    }

    /// After the round failed: gives the successors it moved out of `fired` back to their
    /// fired copies, for the next try. `schedules` are the round's new schedules still held
    /// (its own, or given back by a commit that failed).
    pub fn give_back_successors(
        &self,
        schedules: impl IntoIterator<Item = Schedule>,
        fired: &mut HashMap<SegmentKey, Vec<Fired>>,
    ) {
        for schedule in schedules {
            let Some(&Place::Advanced { from, .. }) = self.places.get(schedule.id.as_str()) else {
                continue;
            };
            let copy = fired.get_mut(&from).and_then(|copies| {
                copies
                    .iter_mut()
                    .find(|f| f.copy.id == schedule.id && f.series && f.next.is_none())
            });
            match copy {
                Some(copy) => copy.next = Some(Box::new(schedule)),
                // Cannot happen: a failed round's fired copies stay where they were.
                None => tracing::error!(
                    id = %schedule.id.escape_debug(),
                    "a series' successor found no fired copy to go back to"
                ),
            }
        }
    }

    /// The segment holding what fired from `key`: `key`, unless it is a fine key that a
    /// schedule was loaded under before its far segment was migrated (during a store outage)
    /// and the migration has not happened yet: then its far segment.
    fn holder_of_fired(&self, store: &Store, key: SegmentKey) -> Result<SegmentKey, StoreError> {
        let exists = |key: SegmentKey| -> Result<bool, StoreError> {
            Ok(self.rewrites.contains_key(&key) || store.raw_segment(key)?.is_some())
        };
        if key.tier == Tier::Fine && !exists(key)? && exists(key.far_origin())? {
            return Ok(key.far_origin());
        }
        Ok(key)
    }

    /// The new schedules, by fine bucket (taken out of the round).
    pub fn take_new(&mut self) -> BTreeMap<UnixMs, Vec<Schedule>> {
        std::mem::take(&mut self.new)
    }

    /// Gives the new schedules of segment `key` that have no caller-chosen id their final
    /// id: the [`protocol::far_id`] of their place in the segment, which is what lets the
    /// store find them with one lookup. Their replies carry it. Should the segment's seq or
    /// the index not fit into such an id (after 2^48 segments), a schedule gets a random id
    /// instead and is indexed like a caller's.
    pub fn name_generated(&mut self, key: SegmentKey, schedules: &mut [Schedule]) {
        for (index, schedule) in schedules.iter_mut().enumerate() {
            if schedule.caller_id {
                continue;
            }
            let Ok(ack) = schedule.id.parse::<usize>() else {
                debug_assert!(false, "not a placeholder from Round::add: {}", schedule.id);
                continue;
            };
            // A series moves from segment to segment as it fires: its id cannot say where it
            // is, so it is random and indexed like a caller's.
            let id = u16::try_from(index)
                .ok()
                .filter(|_| schedule.recurrence.is_none())
                .and_then(|index| protocol::far_ulid(schedule.due, key.seq, index))
                .unwrap_or_else(|| {
                    schedule.caller_id = true;
                    // Never of the form of a generated id (see `protocol::far_layout`), which
                    // a caller could not give back as `Sched-Id`.
                    ulid::Ulid::from_parts(schedule.due, rand_bits() & !protocol::FAR_MARK)
                });
            schedule.id.clear();
            schedule
                .id
                .push_str(id.array_to_str(&mut [0; ulid::ULID_LEN]));
            let due = schedule.due;
            self.acks[ack].1 = match schedule.caller_id {
                true => Outcome::Added {
                    id: schedule.id.clone(),
                    due,
                },
                false => Outcome::Named { id, due },
            };
        }
    }

    /// Stages the write of a new segment and the index entries of its caller ids (but for
    /// series moving on: their entries stay, see `Store::locate_indexed`).
    pub fn write_segment(&mut self, key: SegmentKey, schedules: &[Schedule]) {
        let places = &self.places;
        self.batch
            .put_new_segment_indexing(key, schedules, |s| !advanced(places, &s.id));
    }

    /// The batch to commit and the wheel changes to send after it. The batch records the
    /// pending counts after the round ([`Round::ledger`]), per quota of `capacity` too.
    pub fn finish(
        &mut self,
        next_seq: u64,
        capacity: &Capacity,
    ) -> (WriteBatch, Vec<WheelCommand>) {
        for (key, remaining) in self.rewrites.drain() {
            self.batch.put_segment(key, &remaining);
        }
        self.batch.set_next_seq(next_seq);
        self.batch.set_pending(self.ledger.pending);
        if capacity.has_quotas() {
            let names = capacity.quotas().map(|(name, _)| name);
            self.batch
                .set_quota_counts(names.zip(self.ledger.used.iter().copied()));
        }
        (
            std::mem::take(&mut self.batch),
            std::mem::take(&mut self.wheel),
        )
    }

    /// How many schedules this round added and cancelled, for the counters.
    pub fn counts(&self) -> (u64, u64) {
        let added = self
            .acks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Added { .. } | Outcome::Named { .. }));
        let cancelled = self
            .acks
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Cancelled { .. }));
        (added.count() as u64, cancelled.count() as u64)
    }

    /// Pending schedules, in all and per quota, with this round's changes.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn mark_applied(&mut self) {
        self.applied = true;
    }

    pub fn applied(&self) -> bool {
        self.applied
    }

    /// The copies this round's cancels took out of the wheel (to give back if it failed).
    pub fn take_withdrawn(&mut self) -> Vec<Resident> {
        std::mem::take(&mut self.withdrawn)
    }

    /// Whether any request of this round waits for its ack (which needs the fsync).
    pub fn awaits_ack(&self) -> bool {
        !self.acks.is_empty()
    }

    /// The replies of the round's requests, given how the round ended.
    pub fn acks(&mut self, failure: Option<&StoreError>) -> Vec<Ack> {
        let mut acks = Vec::with_capacity(self.acks.len());
        for (reply, outcome) in std::mem::take(&mut self.acks) {
            let result = match (outcome, failure) {
                (Outcome::Refused(error), _) => Err(error),
                (_, Some(err)) => Err(ApiError::unavailable(format!(
                    "store unavailable: {}",
                    err.brief()
                ))),
                (Outcome::Added { id, due }, None) => Ok(protocol::add_reply(&id, due)),
                (Outcome::Named { id, due }, None) => Ok(protocol::add_reply(
                    id.array_to_str(&mut [0; ulid::ULID_LEN]),
                    due,
                )),
                (Outcome::Cancelled { id }, None) => Ok(protocol::cancel_reply(&id)),
                (Outcome::AlreadyStored, None) => Ok(bytes::Bytes::new()),
            };
            match (reply, result) {
                (Some(reply), result) => acks.push(Ack { reply, result }),
                (None, Err(error)) => {
                    // A plain publish has nobody to tell: counted and logged, like intake's.
                    self.unanswered_errors.push(error.code);
                    tracing::debug!(%error, "refused a request without a reply subject");
                }
                (None, Ok(_)) => {}
            }
        }
        acks
    }

    /// The error codes of the requests without a reply subject this round refused (see
    /// [`Round::acks`]).
    pub fn unanswered_errors(&self) -> &[u16] {
        &self.unanswered_errors
    }

    /// Where the caller-chosen id `id` is: in this round, or as the index says (one lookup,
    /// whatever form the id has).
    fn place_of_caller(&self, store: &Store, id: &str) -> Result<Place, StoreError> {
        if let Some(place) = self.places.get(id) {
            return Ok(*place);
        }
        Ok(store.locate_indexed(id)?.map_or(Place::Gone, Place::Stored))
    }

    fn place_of(&self, store: &Store, id: &str) -> Result<Place, StoreError> {
        if let Some(place) = self.places.get(id) {
            return Ok(*place);
        }
        Ok(store.locate(id)?.map_or(Place::Gone, Place::Stored))
    }

    /// The staged contents of stored segment `key`, read on first use. A damaged segment is
    /// staged with its readable schedules, its original bytes go to quarantine and the lost
    /// ones leave the pending count: a damaged value costs nothing but what it lost.
    fn rewrite(
        &mut self,
        store: &Store,
        key: SegmentKey,
    ) -> Result<&mut Vec<Schedule>, StoreError> {
        Ok(self.staged(store, key)?.0)
    }

    /// [`Round::rewrite`], and whether the segment was found damaged.
    fn staged(
        &mut self,
        store: &Store,
        key: SegmentKey,
    ) -> Result<(&mut Vec<Schedule>, bool), StoreError> {
        let schedules = match self.rewrites.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let (schedules, damaged) = store.read_segment(key)?;
                if let Some(damaged) = damaged {
                    self.batch.quarantine(key, &damaged.raw);
                    // What it lost may be uncounted (unreadable header) and its quotas are
                    // unknown: the next start counts again.
                    self.batch.request_recount();
                    self.ledger.lose(u64::from(damaged.lost.unwrap_or(0)));
                    self.damaged.insert(key);
                }
                entry.insert(schedules)
            }
        };
        Ok((schedules, self.damaged.contains(&key)))
    }
}

/// Whether `places` says `id` is a series' successor moved on by the round.
fn advanced(places: &HashMap<String, Place>, id: &str) -> bool {
    matches!(places.get(id), Some(Place::Advanced { .. }))
}

/// 80 random bits for an id (see [`Round::name_generated`]).
fn rand_bits() -> u128 {
    ulid::Ulid::generate().random()
}
