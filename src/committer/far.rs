//! Far segments (see [`crate::store`]): where sparse far-future schedules may go, and how
//! far buckets are migrated into fine segments before the horizon reaches them.

use std::collections::BTreeMap;

use super::{Committer, LOAD_CHUNK};
use crate::protocol;
use crate::record::Schedule;
use crate::store::{FAR_BUCKET_MS, SegmentKey, StoreError, WriteBatch, bucket_of, far_bucket_of};
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
        self.store.commit(batch)?;
        // A bucket cut short by the chunk is resumed from its start: what was moved is gone
        // from it.
        self.far_cursor = match last_bucket {
            Some(bucket) if full => bucket,
            _ => before,
        };
        Ok(full)
    }

    /// While the store cannot be written nothing migrates, but the migration cursor still
    /// moves past far buckets that hold nothing (this only reads), so loading waits only for
    /// far segments that really need migrating: sparse far-future schedules coming due
    /// during an outage wait for the store to take writes again.
    pub(super) fn pass_empty_far(&mut self) -> Result<bool, StoreError> {
        let before = self.migrate_before(time::now_ms());
        if self.far_cursor >= before {
            return Ok(false);
        }
        let next = self
            .store
            .scan(SegmentKey::far(self.far_cursor, 0), before, 1)?;
        self.far_cursor = match next.first() {
            Some((key, _)) => key.bucket,
            None => before,
        };
        Ok(false)
    }
}
