//! Applying the log to a follower's store.
//!
//! Entries are applied in stream order. A round's changes and the sequence of its last part
//! go into the store in one atomic batch, so after a crash the follower continues from the
//! last round it applied (re-reading the parts of a round it had begun). Applying is
//! idempotent: an entry at or below what was applied is skipped, and each change sets or
//! removes a key outright. An entry missing in between (the log was compacted past this
//! store) is an error: the store must be rebuilt from a snapshot.

use crate::store::{Store, StoreError, WriteBatch, is_local_key};

use super::entry::{self, EntryError, Rounds};

/// Why a log entry could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the log skips from sequence {read} to {got}: entries this store needs are gone")]
    Gap { read: u64, got: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies the log to a store, in order.
pub(crate) struct Applier {
    store: Store,
    rounds: Rounds,
    /// The last sequence read (a round may be open at it); the last one whose effect is in
    /// the store is the store's own `log_applied`.
    read: u64,
}

impl Applier {
    /// Continues from what `store` applied last.
    pub fn new(store: Store) -> Result<Applier, StoreError> {
        let applied = store.log_applied()?;
        Ok(Applier {
            store,
            rounds: Rounds::default(),
            read: applied,
        })
    }

    /// The last sequence read.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// Where reading must go on from.
    pub fn next(&self) -> u64 {
        self.read + 1
    }

    /// Empties the store and goes on from `first`, the log's first entry now: the entries
    /// this store needed next were compacted away (see `compaction.rs`), and the log from its
    /// first entry holds the whole state.
    pub fn start_over_at(&mut self, first: u64) -> Result<(), StoreError> {
        let before = first.saturating_sub(1);
        self.store.clear_replicated(before)?;
        self.rounds = Rounds::default();
        self.read = before;
        Ok(())
    }

    /// Applies the entry at `seq` (with `body`).
    pub fn apply(&mut self, seq: u64, body: &[u8]) -> Result<(), ApplyError> {
        if seq <= self.read {
            return Ok(()); // read again after a reconnect
        }
        if seq != self.read + 1 {
            return Err(ApplyError::Gap {
                read: self.read,
                got: seq,
            });
        }
        // Anyone allowed to publish on the log's subject can append to it (the README says
        // to forbid that). What natsched did not write is skipped: it cannot be undone, but
        // it must not stop the follower. (It also fails the leader's next append, whose
        // expected sequence it took: the leader steps down and a new one takes over.)
        let skip = |source: EntryError| {
            tracing::error!(seq, error = %source, "skipping a log entry natsched did not write");
        };
        let entry = match entry::decode(body) {
            Ok(entry) => entry,
            Err(source) => {
                skip(source);
                self.read = seq;
                return Ok(());
            }
        };
        let is_lead = matches!(entry, entry::Entry::Lead { .. });
        let round = match self.rounds.feed(entry) {
            Ok(round) => round,
            Err(source) => {
                skip(source);
                None
            }
        };
        self.read = seq;
        let mut batch = match round {
            Some(changes) => WriteBatch::from_changes(
                changes
                    .into_iter()
                    .filter(|(key, _)| !is_local_key(key))
                    .collect(),
            ),
            // A lead entry finishes nothing, but nothing before it needs reading again.
            None if is_lead => WriteBatch::default(),
            None => return Ok(()),
        };
        batch.set_log_applied(seq);
        self.store.commit(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::test_schedule;
    use crate::store::{SegmentKey, StoreOptions};

    fn open(dir: &std::path::Path) -> Store {
        Store::open(&StoreOptions {
            path: dir.to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap()
    }

    /// Commits `batch` to the leader's store and returns the log entries of it.
    fn lead(leader: &Store, batch: WriteBatch, max_message: usize) -> Vec<bytes::Bytes> {
        let changes: Vec<_> = batch
            .changes()
            .iter()
            .filter(|(key, _)| !is_local_key(key))
            .cloned()
            .collect();
        leader.commit(batch).unwrap();
        entry::encode_round(changes.iter(), max_message)
    }

    fn replicated(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .entries()
            .into_iter()
            .filter(|(key, _)| !is_local_key(key))
            .collect()
    }

    #[test]
    fn a_follower_holds_what_the_leader_holds_and_resumes_after_a_crash() {
        let (leader_dir, follower_dir) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(leader_dir.path());
        let mut log: Vec<bytes::Bytes> = vec![entry::encode_lead(b"{}")];
        let key = |bucket, seq| SegmentKey::fine(bucket, seq);
        let mut round = WriteBatch::default();
        let schedules: Vec<_> = (0..50)
            .map(|i| test_schedule(&format!("order-{i}"), 1_000_000, i % 2 == 0))
            .collect();
        round.put_new_segment(key(1_000_000, 1), &schedules);
        round.set_next_seq(2);
        round.set_pending(50);
        log.extend(lead(&leader, round, 256));
        let mut round = WriteBatch::default();
        round.put_segment(key(1_000_000, 1), &schedules[..10]);
        for schedule in schedules[10..].iter().filter(|s| s.caller_id) {
            round.unindex(&schedule.id);
        }
        round.set_pending(10);
        log.extend(lead(&leader, round, 256));
        // A dead leader's unfinished round, voided by the next lead.
        let mut dead = WriteBatch::default();
        dead.set_pending(999);
        dead.put_segment(key(2_000_000, 5), &schedules[..5]);
        let dead_parts = entry::encode_round(dead.changes().iter(), 8);
        assert!(dead_parts.len() > 1);
        log.extend(dead_parts[..dead_parts.len() - 1].iter().cloned());
        log.push(entry::encode_lead(b"{}"));
        let mut round = WriteBatch::default();
        round.put_segment(key(1_000_000, 1), std::iter::empty());
        round.set_pending(0);
        log.extend(lead(&leader, round, 256));

        // The follower crashes part-way (in the middle of a round's parts), then resumes.
        let follower = open(follower_dir.path());
        let mut applier = Applier::new(follower.clone()).unwrap();
        let crash_at = 4;
        assert!(!matches!(
            entry::decode(&log[crash_at - 1]),
            Ok(entry::Entry::Part { last: true, .. })
        ));
        for (i, body) in log.iter().enumerate().take(crash_at) {
            applier.apply(i as u64 + 1, body).unwrap();
        }
        let durable = follower.log_applied().unwrap();
        assert!(durable < crash_at as u64, "an open round is not applied");
        drop(applier);
        let mut applier = Applier::new(follower.clone()).unwrap();
        assert_eq!(applier.next(), durable + 1);
        for (i, body) in log.iter().enumerate() {
            // Entries already applied come again after a reconnect: skipped.
            applier.apply(i as u64 + 1, body).unwrap();
        }
        assert_eq!(applier.read(), log.len() as u64);
        assert_eq!(replicated(&follower), replicated(&leader));
        assert_eq!(follower.pending().unwrap(), 0);
        assert_eq!(follower.log_applied().unwrap(), log.len() as u64);
    }

    #[test]
    fn a_gap_is_refused_and_a_foreign_entry_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut applier = Applier::new(store.clone()).unwrap();
        applier.apply(1, &entry::encode_lead(b"{}")).unwrap();
        assert!(matches!(
            applier.apply(3, &entry::encode_lead(b"{}")),
            Err(ApplyError::Gap { read: 1, got: 3 })
        ));
        applier.apply(2, b"not an entry").unwrap();
        // A part that decodes but whose round does not.
        applier.apply(3, &[1, 1, 1, 0xff, 0xff]).unwrap();
        assert_eq!(applier.read(), 3);
        let mut round = WriteBatch::default();
        round.set_pending(7);
        for (i, body) in entry::encode_round(round.changes().iter(), 100)
            .iter()
            .enumerate()
        {
            applier.apply(4 + i as u64, body).unwrap();
        }
        assert_eq!(store.pending().unwrap(), 7);
    }
}
