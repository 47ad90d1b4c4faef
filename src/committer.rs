//! The store's single writer: group commit, replace-by-id, removal of fired schedules, and
//! loading the wheel's horizon from disk.
//!
//! One OS thread owns every mutation of the store, which is what keeps three things simple:
//!
//! * **Group commit.** Requests queue up while an fsync runs; the next round takes all of them
//!   (up to `store.max_batch`), applies them as one atomic batch, fsyncs once, and only then
//!   acknowledges each of them.
//! * **Replace by id** is a read-modify-write of the id index that no other writer can interleave.
//! * **The horizon.** The store's due keys split at a cursor: every schedule keyed below it has
//!   been handed to the wheel, everything at or above it is only on disk. Because the loader
//!   that advances the cursor and the intake that decides "wheel or disk only" for a new
//!   schedule are the same thread, no schedule can fall between the two.
//!
//! The wheel stays bounded: the loader stops while `wheel.max_resident` schedules are in memory
//! and never loads past `now + wheel.lookahead`, and a new schedule inside the horizon that
//! would exceed the bound stays on disk (the cursor moves back to it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::Subject;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::protocol::ApiError;
use crate::record::Schedule;
use crate::replies::Ack;
use crate::scheduler::WheelCommand;
use crate::store::{DueKey, Store, StoreError, WriteBatch};
use crate::time::{self, UnixMs};

/// How often an idle committer checks whether the horizon needs loading.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// Most schedules loaded from disk per round, so loading never stalls group commits for long.
const LOAD_CHUNK: usize = 8192;

/// What the committer is asked to do.
#[derive(Debug)]
pub enum StoreCommand {
    /// Store (or replace by id) a schedule, then acknowledge it on `reply` if given.
    Add {
        schedule: Schedule,
        reply: Option<Subject>,
    },
    /// These schedules were published and flushed: delete them.
    Fired(Vec<DueKey>),
}

/// Tuning of the committer.
#[derive(Debug, Clone, Copy)]
pub struct CommitterOptions {
    pub max_batch: usize,
    pub lookahead: Duration,
    pub max_resident: usize,
}

/// The store-writer thread's state.
pub struct Committer {
    store: Store,
    options: CommitterOptions,
    commands: mpsc::Receiver<StoreCommand>,
    wheel: mpsc::UnboundedSender<WheelCommand>,
    acks: mpsc::UnboundedSender<Vec<Ack>>,
    /// Schedules in memory: in the wheel, on their way to it, or being published.
    resident: Arc<AtomicUsize>,
    /// Every due key below this has been handed to the wheel.
    cursor: DueKey,
}

/// The result of staging one round of commands.
#[derive(Default)]
struct Round {
    batch: WriteBatch,
    wheel: Vec<WheelCommand>,
    /// How many of `wheel` are inserts.
    inserts: usize,
    acks: Vec<(Option<Subject>, String, UnixMs)>,
    /// The id index as this round leaves it, for ids the round touched.
    ids: HashMap<String, Option<UnixMs>>,
}

impl Committer {
    pub fn new(
        store: Store,
        options: CommitterOptions,
        commands: mpsc::Receiver<StoreCommand>,
        wheel: mpsc::UnboundedSender<WheelCommand>,
        acks: mpsc::UnboundedSender<Vec<Ack>>,
        resident: Arc<AtomicUsize>,
    ) -> Committer {
        Committer {
            store,
            options,
            commands,
            wheel,
            acks,
            resident,
            cursor: DueKey::start_of(0),
        }
    }

    /// Runs on the calling (non-runtime) thread until every command sender is gone, then makes
    /// everything durable.
    pub fn run(mut self, runtime: Handle) -> Result<(), StoreError> {
        let mut commands = Vec::with_capacity(self.options.max_batch);
        loop {
            let more_to_load = self.load_horizon()?;
            let wait = if more_to_load {
                Duration::ZERO
            } else {
                IDLE_TICK
            };
            let received = runtime.block_on(async {
                tokio::time::timeout(
                    wait,
                    self.commands
                        .recv_many(&mut commands, self.options.max_batch),
                )
                .await
            });
            match received {
                Ok(0) => break,
                Ok(_) => self.apply(commands.drain(..)),
                Err(_elapsed) => {}
            }
        }
        self.store.flush()
    }

    /// Applies one round: stage, commit atomically, fsync if anything awaits an ack, then tell
    /// the wheel and the requesters.
    fn apply(&mut self, commands: impl Iterator<Item = StoreCommand>) {
        let mut round = Round::default();
        let mut failed = None;
        for command in commands {
            if failed.is_none() {
                if let Err(err) = self.stage(&mut round, command) {
                    failed = Some(err);
                }
            } else if let StoreCommand::Add { schedule, reply } = command {
                round.acks.push((reply, schedule.id, schedule.due));
            }
        }
        let needs_fsync = !round.acks.is_empty();
        let result = match failed {
            Some(err) => Err(err),
            None => self.store.commit(round.batch).and_then(|()| {
                // The batch is in sled now whether or not the fsync succeeds, so the wheel
                // must hear about it either way; only the acks depend on the fsync.
                let inserts = round
                    .wheel
                    .iter()
                    .filter(|c| matches!(c, WheelCommand::Insert(_)));
                self.resident.fetch_add(inserts.count(), Ordering::Relaxed);
                for command in round.wheel.drain(..) {
                    let _ = self.wheel.send(command);
                }
                if needs_fsync {
                    self.store.flush()
                } else {
                    Ok(())
                }
            }),
        };
        if let Err(err) = &result {
            tracing::error!(error = %err, "store write failed");
        }
        let acks: Vec<Ack> = round
            .acks
            .into_iter()
            .filter_map(|(reply, id, due)| {
                let reply = reply?;
                let result = match &result {
                    Ok(()) => Ok((id, due)),
                    Err(err) => Err(ApiError::unavailable(format!("store unavailable: {err}"))),
                };
                Some(Ack { reply, result })
            })
            .collect();
        if !acks.is_empty() {
            let _ = self.acks.send(acks);
        }
    }

    /// Adds one command's writes to the round.
    fn stage(&mut self, round: &mut Round, command: StoreCommand) -> Result<(), StoreError> {
        match command {
            StoreCommand::Add { schedule, reply } => {
                if let Some(previous) = self.current_due(round, &schedule.id)? {
                    let old = DueKey::new(previous, &schedule.id);
                    round.batch.remove_due_only(&old);
                    // Sent even for a key above the cursor: after a pull-back (below) the
                    // wheel may hold keys there too. A no-op when it does not.
                    round.wheel.push(WheelCommand::Remove(old));
                }
                round.batch.put(&schedule);
                round.ids.insert(schedule.id.clone(), Some(schedule.due));
                round.acks.push((reply, schedule.id.clone(), schedule.due));
                let key = DueKey::new(schedule.due, &schedule.id);
                if key < self.cursor {
                    if self.memory_full(round) && schedule.due > time::now_ms() {
                        // Keep memory bounded under a flood of near-future schedules: leave
                        // this one on disk and pull the cursor back to it, so the loader
                        // picks it up once there is room. Everything already popped for
                        // firing is due by now, hence below the new cursor and never
                        // reloaded; the wheel ignores reloads of what it already holds.
                        self.cursor = key;
                    } else {
                        round.inserts += 1;
                        round.wheel.push(WheelCommand::Insert(schedule));
                    }
                }
            }
            StoreCommand::Fired(keys) => {
                for key in &keys {
                    // A replace may have moved the id on since this copy was loaded; then only
                    // the fired copy goes and the id keeps pointing at its new schedule.
                    if self.current_due(round, key.id())? == Some(key.due()) {
                        round.ids.insert(key.id().to_owned(), None);
                        round.batch.remove(key);
                    } else {
                        round.batch.remove_due_only(key);
                    }
                }
                round.wheel.push(WheelCommand::Deleted(keys));
            }
        }
        Ok(())
    }

    /// Whether the wheel is at `wheel.max_resident`, counting this round's inserts.
    fn memory_full(&self, round: &Round) -> bool {
        self.resident.load(Ordering::Relaxed) + round.inserts >= self.options.max_resident
    }

    fn current_due(&self, round: &Round, id: &str) -> Result<Option<UnixMs>, StoreError> {
        match round.ids.get(id) {
            Some(due) => Ok(*due),
            None => self.store.due_of(id),
        }
    }

    /// Moves the cursor forward by up to one chunk. Returns whether more is waiting to load now.
    fn load_horizon(&mut self) -> Result<bool, StoreError> {
        let horizon = time::now_ms().saturating_add(self.options.lookahead.as_millis() as u64);
        let resident = self.resident.load(Ordering::Relaxed);
        if self.cursor.due() >= horizon || resident >= self.options.max_resident {
            return Ok(false);
        }
        let limit = LOAD_CHUNK.min(self.options.max_resident - resident);
        let loaded = self.store.scan(&self.cursor, horizon, limit)?;
        let full = loaded.len() == limit;
        self.cursor = match loaded.last() {
            Some((last, _)) if full => last.successor(),
            _ => DueKey::start_of(horizon),
        };
        self.resident.fetch_add(loaded.len(), Ordering::Relaxed);
        for (_, schedule) in loaded {
            let _ = self.wheel.send(WheelCommand::Insert(schedule));
        }
        Ok(full)
    }
}

#[cfg(test)]
mod tests;
