//! Far segments (see [`crate::store`]): where sparse far-future schedules may go, and how
//! far buckets are migrated into fine segments before the horizon reaches them.

use std::collections::BTreeMap;

use std::sync::atomic::Ordering;

use super::{Committer, LOAD_CHUNK};
use crate::protocol;
use crate::record::Schedule;
use crate::scheduler::{Resident, WheelCommand};
use crate::store::{
    BUCKET_MS, FAR_BUCKET_MS, SegmentKey, StoreError, WriteBatch, bucket_of, far_bucket_of,
};
use crate::time::{self, UnixMs};

impl Committer {
    /// Far buckets starting before this are migrated (or being migrated) to fine segments:
    /// everything up to two far buckets past the horizon.
    pub(super) fn migrate_before(&self, now: UnixMs) -> UnixMs {
        let horizon = now.saturating_add(self.options.lookahead.as_millis() as u64);
        far_bucket_of(horizon).saturating_add(2 * FAR_BUCKET_MS)
    }

    /// The first fine bucket whose sparse schedules may go to a far segment: one whose far
    /// bucket the migration has not passed (nor will soon). Never, once segment seqs no longer
    /// fit into a far id.
    pub(super) fn far_from(&self, now: UnixMs) -> UnixMs {
        if self.next_seq >= protocol::FAR_SEQ_LIMIT / 2 {
            return UnixMs::MAX;
        }
        self.far_cursor.max(self.migrate_before(now))
    }

    /// Moves the far segments of buckets that the horizon approaches into fine segments, up to
    /// one chunk of schedules. Returns whether more is waiting to migrate now.
    pub(super) fn migrate_far(&mut self) -> Result<bool, StoreError> {
        let before = self.migrate_before(time::now_ms());
        if self.far_cursor >= before {
            return Ok(false);
        }
        let from = SegmentKey::far(self.far_cursor, 0);
        let segments = self.store.scan(from, before, LOAD_CHUNK)?;
        let count: usize = segments.iter().map(|(_, s)| s.len()).sum();
        let full = count >= LOAD_CHUNK;
        let last_bucket = segments.last().map(|(key, _)| key.bucket);
        let mut batch = WriteBatch::default();
        // Each far segment's schedules move to fine segments of the same seq, one per fine
        // bucket: a generated id names its segment's seq, and the store finds it under that
        // seq in either tier. The fine keys are free: a seq is used by one segment only.
        let mut fine: BTreeMap<SegmentKey, Vec<Schedule>> = BTreeMap::new();
        for (key, schedules) in segments {
            batch.put_raw_segment(key, None);
            for schedule in schedules {
                fine.entry(SegmentKey::fine(bucket_of(schedule.due), key.seq))
                    .or_default()
                    .push(schedule);
            }
        }
        for (key, schedules) in fine {
            // A far segment holds at most about 2 KiB, so this needs no splitting.
            batch.put_new_segment(key, &schedules);
            // The loader stops at the migration cursor, so it has not passed these yet;
            // should it have, pulling its cursor back makes it load them.
            self.cursor = self.cursor.min(key);
        }
        self.write(batch)?;
        // A bucket cut short by the chunk is resumed from its start: what was moved is gone
        // from it.
        self.far_cursor = match last_bucket {
            Some(bucket) if full => bucket,
            _ => before,
        };
        // Everything loaded unmigrated during an outage has its fine keys now.
        if self
            .far_held_until
            .is_some_and(|until| self.far_cursor >= until)
        {
            self.far_held_until = None;
        }
        Ok(full)
    }

    /// While the store cannot be written nothing migrates; instead the far segments the
    /// horizon reaches are loaded into the wheel as they are, so what is stored keeps firing.
    /// Each schedule is loaded under the fine key its migration will give it
    /// ([`SegmentKey::migrated`]): once the store takes writes again, the migration writes
    /// exactly that key and the wheel takes the reload for the copy it holds. Until then a
    /// removal after firing, a cancel or a replace finds the schedule in its far segment (see
    /// `Round::holder_of_fired` and `Round::cancel`). Returns whether more is waiting now.
    pub(super) fn load_far_unmigrated(&mut self) -> Result<bool, StoreError> {
        let Some(from) = self.outage.as_ref().map(|outage| outage.far_loaded) else {
            return Ok(false);
        };
        let horizon = time::now_ms().saturating_add(self.options.lookahead.as_millis() as u64);
        // The loader needs every far bucket starting before the end of the horizon's bucket.
        let end = bucket_of(horizon).saturating_add(BUCKET_MS);
        let resident = self.resident.load(Ordering::Relaxed);
        if from.bucket >= end || resident >= self.options.max_resident {
            return Ok(false);
        }
        let limit = LOAD_CHUNK.min(self.options.max_resident - resident);
        let segments = self.store.scan(from, end, limit)?;
        let count: usize = segments.iter().map(|(_, s)| s.len()).sum();
        let full = count >= limit;
        let next = match segments.last() {
            Some((last, _)) if full => last.successor(),
            _ => SegmentKey::far(end, 0),
        };
        let highest = segments.last().map(|(last, _)| last.bucket);
        let mut residents = Vec::with_capacity(count);
        for (key, schedules) in segments {
            residents.extend(schedules.into_iter().map(|schedule| Resident {
                segment: key.migrated(schedule.due),
                schedule: Box::new(schedule),
            }));
        }
        residents.sort_by_key(|r| r.schedule.due);
        self.resident.fetch_add(count, Ordering::Relaxed);
        if !residents.is_empty() {
            let _ = self.wheel.send(WheelCommand::Insert(residents));
        }
        // The loader may pass the far buckets loaded whole.
        self.far_cursor = self.far_cursor.max(next.bucket);
        if let Some(highest) = highest {
            let until = self.far_held_until.unwrap_or(0).max(highest + 1);
            self.far_held_until = Some(until);
        }
        if let Some(outage) = &mut self.outage {
            outage.far_loaded = next;
        }
        Ok(full)
    }
}
