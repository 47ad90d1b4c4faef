//! Exactly-once intake from the JetStream intake stream, without an index.
//!
//! The intake consumer acks a message only after its schedule is durable, so a crash between
//! the commit and the ack delivers the message again (to the next start: the consumer is
//! re-created then). Storing it again would add a second copy under a new id. Instead the
//! store writer keeps a *mark*: the stream sequence up to which every message is stored,
//! written in the same atomic batch as the schedules, and acks a message at or below it
//! without storing it again.
//!
//! Why one number is enough: one consumer delivers the stream in sequence order, and intake
//! hands messages to this thread in the order it got them, so when a message is committed,
//! every earlier one was committed or refused before it. The exception is a message refused
//! with 503 (store unavailable or full): it is delivered again later, out of order, and must
//! then be stored. Those wait in `retry`, and the mark written stays below the lowest of them
//! (a crash then may store a few messages twice, never drop one). A refusal other than 503
//! terminates the message: it never comes back.
//!
//! The mark belongs to one incarnation of the stream (its creation time): a stream deleted
//! and made again starts its sequences over, and the mark with it.
//!
//! Pure bookkeeping: no I/O (the committer reads and writes the mark with its batches).

use std::collections::BTreeSet;

/// The JetStream intake's mark (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct IntakeMark {
    /// The stream incarnation (creation time, Unix ms) the sequences belong to.
    stream: u64,
    /// The highest sequence committed (in memory: ahead of the durable mark until the batch
    /// that carries it is written).
    committed: u64,
    /// Sequences refused with 503 that will be delivered again.
    retry: BTreeSet<u64>,
}

impl IntakeMark {
    /// The mark as recorded in the store (`None`: nothing recorded yet).
    pub(crate) fn from_record(record: Option<(u64, u64)>) -> IntakeMark {
        let (stream, committed) = record.unwrap_or_default();
        IntakeMark {
            stream,
            committed,
            retry: BTreeSet::new(),
        }
    }

    /// Whether message `sequence` of the stream created at `stream` is stored already (a
    /// redelivery whose ack was lost). A new stream incarnation starts the mark over.
    pub(crate) fn is_stored(&mut self, stream: u64, sequence: u64) -> bool {
        if stream != self.stream {
            *self = IntakeMark {
                stream,
                ..IntakeMark::default()
            };
        }
        sequence <= self.committed && !self.retry.contains(&sequence)
    }

    /// Message `sequence` is staged in the round about to be committed.
    pub(crate) fn stored(&mut self, sequence: u64) {
        self.committed = self.committed.max(sequence);
        self.retry.remove(&sequence);
    }

    /// Message `sequence` was refused with 503 and will be delivered again.
    pub(crate) fn refused_for_now(&mut self, sequence: u64) {
        self.retry.insert(sequence);
    }

    /// The round did not commit: back to what is durable.
    pub(crate) fn revert_to(&mut self, durable: &IntakeMark) {
        self.committed = durable.committed.min(self.committed);
    }

    /// What to record: (stream, sequence up to which everything is stored).
    pub(crate) fn record(&self) -> (u64, u64) {
        let below_retry = self.retry.first().map_or(u64::MAX, |r| r.saturating_sub(1));
        (self.stream, self.committed.min(below_retry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redeliveries_at_or_below_the_mark_are_stored_already() {
        let mut mark = IntakeMark::from_record(Some((7, 10)));
        assert!(mark.is_stored(7, 10));
        assert!(mark.is_stored(7, 1));
        assert!(!mark.is_stored(7, 11));
        mark.stored(11);
        assert!(mark.is_stored(7, 11));
        assert_eq!(mark.record(), (7, 11));
    }

    #[test]
    fn a_503_keeps_the_recorded_mark_below_it_until_stored() {
        let mut mark = IntakeMark::from_record(None);
        assert!(!mark.is_stored(1, 5));
        mark.refused_for_now(5);
        mark.stored(6);
        mark.stored(7);
        assert!(!mark.is_stored(1, 5), "refused, so not stored");
        assert!(mark.is_stored(1, 6));
        assert_eq!(mark.record(), (1, 4));
        mark.stored(5);
        assert_eq!(mark.record(), (1, 7));
    }

    #[test]
    fn a_new_stream_starts_over() {
        let mut mark = IntakeMark::from_record(Some((1, 1000)));
        assert!(!mark.is_stored(2, 3), "another incarnation of the stream");
        assert_eq!(mark.record(), (2, 0));
    }

    #[test]
    fn a_failed_round_goes_back_to_the_durable_mark() {
        let durable = IntakeMark::from_record(Some((1, 10)));
        let mut mark = durable.clone();
        mark.stored(20);
        mark.revert_to(&durable);
        assert!(!mark.is_stored(1, 15));
        assert!(mark.is_stored(1, 10));
    }

    proptest! {
        /// Against a model: a message delivered in order, stored or refused (with 503 or
        /// for good), then delivered again, is reported stored exactly when the model stored
        /// it; and the recorded mark never claims a message that is not stored.
        #[test]
        fn matches_a_model(outcomes in proptest::collection::vec(0u8..3, 1..200), again in proptest::collection::vec(any::<proptest::sample::Index>(), 0..50)) {
            let mut mark = IntakeMark::from_record(None);
            let mut model = std::collections::HashMap::new();
            for (i, outcome) in outcomes.iter().enumerate() {
                let seq = i as u64 + 1;
                prop_assert!(!mark.is_stored(9, seq));
                match outcome {
                    0 => { mark.stored(seq); model.insert(seq, true); }
                    1 => { mark.refused_for_now(seq); model.insert(seq, false); }
                    _ => { model.insert(seq, false); } // terminated: never delivered again
                }
                let (_, recorded) = mark.record();
                for s in 1..=recorded {
                    prop_assert!(model[&s] || outcomes[s as usize - 1] == 2, "mark {recorded} claims {s}");
                }
            }
            // Redeliveries of 503-refused messages: stored the second time.
            for index in again {
                let seq = index.index(outcomes.len()) as u64 + 1;
                if outcomes[seq as usize - 1] != 1 { continue; }
                let stored = model[&seq];
                prop_assert_eq!(mark.is_stored(9, seq), stored);
                if !stored { mark.stored(seq); model.insert(seq, true); }
            }
        }
    }
}
