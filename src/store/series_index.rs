//! A series' index entry: where it was stored when indexed, and its *body*.
//!
//! A series moves from segment to segment as it fires, and its index entry is written only
//! when it is scheduled (or replaced, or its far segment migrated), not each time it fires
//! (see `Store::locate_series`). So the entry is also where the series' body is kept once:
//! its segment records are *thin*, its due and seq only (see [`super::segment`]), which is
//! what lets a series cost the store a few dozen bytes per occurrence however large its
//! message is.
//!
//! | layout (value of `i` · id)                                   | written by           |
//! |--------------------------------------------------------------|----------------------|
//! | segment key (17)                                             | a one-shot schedule  |
//! | segment key (17) · due (`u64` BE) · [stored series](crate::recurrence) | store format 5 |
//! | segment key (17) · due (`u64` BE) · `0` · [record value](crate::record), created base 0 | store format 6 |
//!
//! The due is the series' due where it was indexed. The body's own series holds the seq of
//! that moment; a thin record's seq and due replace it. (A stored series starts with its
//! rule kind, never 0.)

use std::cell::RefCell;

use super::segment::Bodies;
use super::{SegmentKey, Store, StoreError, keys};
use crate::record::Schedule;
use crate::recurrence::Series;
use crate::time::UnixMs;

/// Bytes of the segment key at the start of an index entry.
pub(super) const INDEXED_KEY_LEN: usize = 17;
/// Marks an entry holding the series' body (store format 6).
const BODY_MARK: u8 = 0;

/// The index entry of `schedule`, a series stored in segment `key`.
pub(super) fn encode(schedule: &Schedule, key: SegmentKey) -> Vec<u8> {
    let mut value = Vec::with_capacity(64 + schedule.subject.len() + schedule.payload.len());
    value.extend_from_slice(&key.to_bytes());
    value.extend_from_slice(&schedule.due.to_be_bytes());
    value.push(BODY_MARK);
    schedule.encode_value_into(&mut value, 0);
    value
}

/// What a series' index entry says after its segment key: its due there, its series, and its
/// body when the entry holds one.
pub(super) fn decode(id: &str, rest: &[u8]) -> Option<(UnixMs, Series, Option<Schedule>)> {
    let (due, rest) = rest.split_first_chunk::<8>()?;
    let due = u64::from_be_bytes(*due);
    match rest.split_first() {
        Some((&BODY_MARK, value)) => {
            let body = Schedule::decode(id.to_owned(), due, 0, value).ok()?;
            let series = Series::clone(body.recurrence.as_deref()?);
            Some((due, series, Some(body)))
        }
        _ => Some((due, Series::decode(rest).ok()?, None)),
    }
}

impl Store {
    /// The body of the series `id` (see [`Bodies`]): `None` if it is not indexed, or its
    /// entry holds no readable body.
    pub(crate) fn series_body(&self, id: &str) -> Result<Option<Schedule>, StoreError> {
        Ok(self.indexed_body(id)?.map(|(_, body)| body))
    }

    /// The body of the thin record of `id` read from segment `key` by a reader that is not
    /// the store writer: `None` also when the body is of a newer series under the same id
    /// (a replace since the segment was read). A series is indexed when it is scheduled,
    /// and its records are then only ever written to segments of later seqs, so a record in
    /// a segment older than the index entry's is a replaced series'.
    pub(crate) fn series_body_for(
        &self,
        id: &str,
        key: SegmentKey,
    ) -> Result<Option<Schedule>, StoreError> {
        Ok(self
            .indexed_body(id)?
            .filter(|(indexed, _)| key.seq >= indexed.seq)
            .map(|(_, body)| body))
    }

    /// Where the series `id` was indexed, and its body.
    fn indexed_body(&self, id: &str) -> Result<Option<(SegmentKey, Schedule)>, StoreError> {
        let Some(value) = self.db()?.get(keys::id_key(id))? else {
            return Ok(None);
        };
        let indexed = value
            .get(..INDEXED_KEY_LEN)
            .and_then(SegmentKey::from_bytes);
        let body = value
            .get(INDEXED_KEY_LEN..)
            .and_then(|rest| decode(id, rest))
            .and_then(|(_, _, body)| body);
        Ok(indexed.zip(body).map(|(indexed, mut body)| {
            body.caller_id = true;
            (indexed, body)
        }))
    }

    /// The bodies of thin records as this store's index holds them, for one decoding.
    pub(super) fn bodies(&self) -> IndexedBodies<'_> {
        IndexedBodies {
            store: self,
            failed: RefCell::new(None),
        }
    }
}

/// [`Bodies`] read from the index. A read that fails is not a missing body (which would be
/// taken for damage): it is kept, and [`IndexedBodies::check`] returns it after decoding.
pub(super) struct IndexedBodies<'a> {
    store: &'a Store,
    failed: RefCell<Option<StoreError>>,
}

impl IndexedBodies<'_> {
    /// The first error reading a body, if any.
    pub(super) fn check(self) -> Result<(), StoreError> {
        match self.failed.into_inner() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl Bodies for IndexedBodies<'_> {
    fn body(&self, id: &str) -> Option<Schedule> {
        match self.store.series_body(id) {
            Ok(body) => body,
            Err(error) => {
                self.failed.borrow_mut().get_or_insert(error);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_schedule;
    use proptest::prelude::*;

    proptest! {
        /// An entry holds the series' body as it was indexed; any other bytes after the
        /// segment key read as no entry, never a panic.
        #[test]
        fn entries_round_trip_and_damage_never_panics(
            due in 1_700_000_000_000u64..1_800_000_000_000,
            every in 1u64..1_000_000,
            seq in 1u64..1_000,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let schedule = Schedule {
                payload: payload.into(),
                recurrence: Some(Box::new(Series::every(every, seq))),
                ..test_schedule("s", due, true)
            };
            let key = SegmentKey::fine(due - due % 100, 7);
            let value = encode(&schedule, key);
            prop_assert_eq!(SegmentKey::from_bytes(&value[..INDEXED_KEY_LEN]), Some(key));
            let (indexed_due, series, body) = decode("s", &value[INDEXED_KEY_LEN..]).unwrap();
            prop_assert_eq!(indexed_due, due);
            prop_assert_eq!(&series, schedule.recurrence.as_deref().unwrap());
            let body = body.unwrap();
            prop_assert_eq!(
                (body.payload, body.due, body.subject),
                (schedule.payload, due, schedule.subject)
            );
            // Cut short, or followed by junk, or junk alone: no panic.
            let rest = &value[INDEXED_KEY_LEN..];
            let _ = decode("s", &rest[..cut.index(rest.len())]);
            let mut longer = rest.to_vec();
            longer.extend_from_slice(&junk);
            let _ = decode("s", &longer);
            let _ = decode("s", &junk);
        }
    }
}
