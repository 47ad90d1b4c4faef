//! Exactly-once intake from the JetStream intake stream, without a per-schedule index.
//!
//! The intake consumer acks a message only after its schedule is durable, so a crash (or a
//! lost connection) between the commit and the ack delivers the message again: at the next
//! start, where the consumer is re-created, or after the ack wait. Storing it again would add
//! a second copy under a new id. Instead the store writer keeps the *mark*: the stream
//! sequences it has stored, as ranges, written in the same atomic batch as the schedules. A
//! message whose sequence is in the mark is acked without being stored again.
//!
//! No order is assumed: a message lost on the way (a connection dropped after the server sent
//! it) is simply not in the mark when it comes again, and a message refused for now (503) is
//! not in it either. The mark only forgets what can never come again: sequences below the
//! stream's first sequence (a work queue removes a message once acked, so everything below
//! its first message is gone). Sequences are stored mostly in runs, so the ranges are few; if
//! they ever exceed [`MAX_RANGES`], the oldest are dropped (such a message, if it came again,
//! would be stored twice: never lost).
//!
//! The mark belongs to one incarnation of the stream (its creation time): a stream deleted
//! and made again starts its sequences over, and the mark with it.
//!
//! Pure bookkeeping: no I/O (the committer reads and writes the mark with its batches).

use std::collections::BTreeMap;

use crate::record::{Reader, put_varint};

/// Most ranges kept (a few KiB in each commit batch at worst).
pub(crate) const MAX_RANGES: usize = 4096;

/// The JetStream intake's mark (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IntakeMark {
    /// The stream incarnation (creation time, Unix ms) the sequences belong to.
    stream: u64,
    /// Stored sequences: disjoint, non-adjacent ranges, first → last (inclusive).
    stored: BTreeMap<u64, u64>,
}

impl IntakeMark {
    /// The mark as recorded; an unreadable record gives an empty mark (then a message may
    /// be stored twice, never dropped).
    pub(crate) fn decode(record: Option<&[u8]>) -> IntakeMark {
        let Some(record) = record else {
            return IntakeMark::default();
        };
        let decoded = (|| {
            let mut r = Reader(record);
            let stream = u64::from_be_bytes(r.array().ok()?);
            let count = r.varint().ok()?;
            let mut stored = BTreeMap::new();
            let mut last = 0u64;
            for _ in 0..count.min(MAX_RANGES as u64) {
                let first = last.checked_add(r.varint().ok()?)?;
                let end = first.checked_add(r.varint().ok()?)?;
                stored.insert(first, end);
                last = end.saturating_add(2); // ranges are disjoint and not adjacent
            }
            (r.0.is_empty()).then_some(IntakeMark { stream, stored })
        })();
        decoded.unwrap_or_else(|| {
            tracing::warn!(
                len = record.len(),
                "the JetStream intake mark is damaged; ignored (redelivered requests may be \
                 stored twice)"
            );
            IntakeMark::default()
        })
    }

    /// The record: stream, range count, then each range as (gap from the previous end + 2,
    /// length − 1), varints.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 4 * self.stored.len());
        out.extend_from_slice(&self.stream.to_be_bytes());
        put_varint(&mut out, self.stored.len() as u64);
        let mut last = 0u64;
        for (&first, &end) in &self.stored {
            put_varint(&mut out, first.saturating_sub(last));
            put_varint(&mut out, end - first);
            last = end.saturating_add(2);
        }
        out
    }

    /// Whether message `sequence` of the stream created at `stream` is stored already (a
    /// redelivery). A new stream incarnation starts the mark over.
    pub(crate) fn is_stored(&mut self, stream: u64, sequence: u64) -> bool {
        if stream != self.stream {
            *self = IntakeMark {
                stream,
                stored: BTreeMap::new(),
            };
        }
        self.stored
            .range(..=sequence)
            .next_back()
            .is_some_and(|(_, &end)| sequence <= end)
    }

    /// Message `sequence` is stored (with the batch about to be committed).
    pub(crate) fn stored(&mut self, sequence: u64) {
        let before = self
            .stored
            .range(..=sequence)
            .next_back()
            .map(|(&f, &e)| (f, e));
        if let Some((_, end)) = before
            && sequence <= end
        {
            return;
        }
        let mut first = sequence;
        let mut end = sequence;
        if let Some((f, e)) = before
            && e.checked_add(1) == Some(sequence)
        {
            first = f;
        }
        if let Some(next_end) = sequence
            .checked_add(1)
            .and_then(|next| self.stored.remove(&next))
        {
            end = next_end;
        }
        self.stored.insert(first, end);
        while self.stored.len() > MAX_RANGES {
            self.stored.pop_first();
        }
    }

    /// Forgets sequences below `floor`: the stream holds none of them any more.
    pub(crate) fn forget_below(&mut self, floor: u64) {
        while let Some(entry) = self.stored.first_entry() {
            let (first, end) = (*entry.key(), *entry.get());
            if end < floor {
                entry.remove();
            } else {
                if first < floor {
                    entry.remove();
                    self.stored.insert(floor, end);
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stored_sequences_are_known_again_and_others_are_not() {
        let mut mark = IntakeMark::default();
        assert!(!mark.is_stored(7, 5));
        for sequence in [6, 7, 9, 5] {
            mark.stored(sequence);
        }
        assert!(mark.is_stored(7, 5));
        assert!(mark.is_stored(7, 7));
        assert!(!mark.is_stored(7, 8), "lost on the way: not stored");
        assert!(mark.is_stored(7, 9));
        assert_eq!(mark.stored.len(), 2, "5-7 and 9");
        mark.stored(8);
        assert_eq!(mark.stored.len(), 1, "merged into 5-9");
        let back = IntakeMark::decode(Some(&mark.encode()));
        assert_eq!(back, mark);
    }

    #[test]
    fn a_new_stream_starts_over_and_the_floor_forgets() {
        let mut mark = IntakeMark::default();
        mark.is_stored(1, 1);
        mark.stored(10);
        mark.stored(20);
        mark.forget_below(15);
        assert!(!mark.is_stored(1, 10));
        assert!(mark.is_stored(1, 20));
        assert!(!mark.is_stored(2, 20), "another incarnation of the stream");
        assert_eq!(mark.encode().len(), 9);
    }

    #[test]
    fn damage_gives_an_empty_mark() {
        let mut mark = IntakeMark::default();
        mark.is_stored(3, 1);
        mark.stored(4);
        let record = mark.encode();
        for cut in 0..record.len() {
            let decoded = IntakeMark::decode(Some(&record[..cut]));
            assert!(decoded.stored.is_empty(), "cut at {cut}");
        }
        assert_eq!(IntakeMark::decode(Some(&[0xff; 40])), IntakeMark::default());
    }

    proptest! {
        /// Against a model (a set of sequences): stores, floors and lookups agree, and the
        /// record round-trips.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u8..3, 0u64..300), 1..400)) {
            let mut mark = IntakeMark::default();
            mark.is_stored(1, 0);
            let mut model = std::collections::BTreeSet::new();
            for (op, sequence) in ops {
                match op {
                    0 => { mark.stored(sequence); model.insert(sequence); }
                    1 => { mark.forget_below(sequence / 4); model.retain(|s| *s >= sequence / 4); }
                    _ => prop_assert_eq!(mark.is_stored(1, sequence), model.contains(&sequence)),
                }
            }
            for sequence in 0..300 {
                prop_assert_eq!(mark.is_stored(1, sequence), model.contains(&sequence));
            }
            prop_assert_eq!(IntakeMark::decode(Some(&mark.encode())), mark);
        }
    }
}
