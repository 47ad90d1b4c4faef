//! Keeping the log's size near the live data's: checkpoints written into the log itself.
//!
//! Every change in the log sets or removes a key outright, so the state at any point is the
//! last value each key was given. A *checkpoint* re-appends every live replicated key with its
//! current value, a chunk at a time, by the store writer between its rounds. Because that
//! thread is the only writer, each chunk holds the values as of its own place in the log, and
//! the rounds around it keep their order: applying the log from the checkpoint's first entry
//! onto an empty store gives exactly the leader's state. Once the checkpoint is complete,
//! everything before its first entry is purged. A follower behind the purge (its next entry
//! is gone) empties its store and reads from the log's first entry; a new instance does the
//! same. So bootstrap and catch-up are one mechanism, and no separate snapshot store exists.
//!
//! A checkpoint starts when the log holds more than twice the live data (as the last
//! checkpoint measured it) plus `[cluster] log_slack` bytes, checked every few seconds, so
//! copying amortises to a constant per byte appended, and after churn the log returns to
//! about the live data plus the slack.

use std::time::{Duration, Instant};

use crate::store::{Store, StoreError, WriteBatch};

use super::log::Replication;

/// How often the leader looks at the log's size.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// About how many bytes of keys and values one checkpoint chunk re-appends.
const CHUNK_BYTES: usize = 512 * 1024;

/// The state of compaction, owned by the store writer.
#[derive(Debug, Default)]
pub(crate) struct Compaction {
    slack: u64,
    /// What the last complete checkpoint wrote: the live data then.
    live: u64,
    next_check: Option<Instant>,
    running: Option<Checkpoint>,
}

#[derive(Debug)]
struct Checkpoint {
    /// The log sequence of its first chunk.
    start: Option<u64>,
    /// The last key it re-appended.
    cursor: Vec<u8>,
    bytes: u64,
}

impl Compaction {
    pub fn new(slack: u64) -> Compaction {
        Compaction {
            slack,
            ..Default::default()
        }
    }

    /// Whether a log of `log_bytes` should be compacted.
    fn due(&self, log_bytes: u64) -> bool {
        log_bytes > self.live.saturating_mul(2).saturating_add(self.slack)
    }

    /// Starts a checkpoint if one is due, or appends its next chunk, or finishes it.
    pub fn step(&mut self, log: &mut Replication, store: &Store) -> Result<(), StoreError> {
        let Some(checkpoint) = &mut self.running else {
            let now = Instant::now();
            if self.next_check.is_some_and(|at| now < at) {
                return Ok(());
            }
            self.next_check = Some(now + CHECK_EVERY);
            match log.log_bytes() {
                Ok(bytes) if self.due(bytes) => {
                    tracing::info!(
                        log_bytes = bytes,
                        live_bytes = self.live,
                        "compacting the replicated log"
                    );
                    self.running = Some(Checkpoint {
                        start: None,
                        cursor: Vec::new(),
                        bytes: 0,
                    });
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot read the log's size"),
            }
            return Ok(());
        };
        match store.replicated_after(&checkpoint.cursor, CHUNK_BYTES)? {
            Some(changes) => {
                if let Some((key, _)) = changes.last() {
                    checkpoint.cursor = key.clone();
                }
                checkpoint.bytes += changes
                    .iter()
                    .map(|(k, v)| (k.len() + v.as_ref().map_or(0, Vec::len)) as u64)
                    .sum::<u64>();
                let (first, last) = log
                    .append(&WriteBatch::from_changes(changes))
                    .map_err(|e| StoreError::Log(e.to_string()))?;
                checkpoint.start.get_or_insert(first);
                // The values are the store's own: only its place in the log moves.
                let mut applied = WriteBatch::default();
                applied.set_log_applied(last);
                store.commit(applied)?;
            }
            None => {
                let done = self.running.take();
                if let Some(Checkpoint {
                    start: Some(start),
                    bytes,
                    ..
                }) = done
                {
                    self.live = bytes;
                    match log.purge_below(start) {
                        Ok(purged) => tracing::info!(
                            purged,
                            first = start,
                            live_bytes = bytes,
                            "compacted the replicated log"
                        ),
                        Err(error) => tracing::warn!(%error, "cannot purge the replicated log"),
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_above_twice_the_live_data_plus_the_slack() {
        let mut compaction = Compaction::new(1000);
        assert!(!compaction.due(1000));
        assert!(compaction.due(1001));
        compaction.live = 500;
        assert!(!compaction.due(2000));
        assert!(compaction.due(2001));
        compaction.live = u64::MAX;
        assert!(!compaction.due(u64::MAX));
    }
}
