//! The timer loop: owns the in-memory [`Wheel`], sleeps until the next expiration, and hands due
//! schedules to firing.
//!
//! It never touches the store. What enters the wheel comes from the committer (new schedules
//! inside the loaded horizon, and horizon loads); what leaves goes to [`crate::firing`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::record::Schedule;
use crate::store::DueKey;
use crate::time::{self, UnixMs};
use crate::wheel::{EntryKey, Wheel};

/// Most commands taken per wake-up, so a burst of inserts cannot delay firing for long.
const MAX_COMMANDS_PER_TURN: usize = 4096;

/// A change to the wheel's contents.
#[derive(Debug)]
pub enum WheelCommand {
    /// Hold this schedule until it is due.
    Insert(Schedule),
    /// Forget the schedule at this key (it was replaced); a no-op if it already fired.
    Remove(DueKey),
}

/// The wheel and an id index into it.
pub struct Scheduler {
    wheel: Wheel<Schedule>,
    by_id: HashMap<String, (UnixMs, EntryKey)>,
    /// Schedules in memory; this loop subtracts the ones it drops without firing.
    resident: Arc<AtomicUsize>,
}

impl Scheduler {
    pub fn new(resident: Arc<AtomicUsize>) -> Scheduler {
        Scheduler {
            wheel: Wheel::new(time::now_ms()),
            by_id: HashMap::new(),
            resident,
        }
    }

    /// Runs until `shutdown` or until the committer is gone. Due schedules go out on `fire` in
    /// due order, in batches.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<WheelCommand>,
        fire: mpsc::UnboundedSender<Vec<Schedule>>,
        shutdown: CancellationToken,
    ) {
        let mut received = Vec::with_capacity(MAX_COMMANDS_PER_TURN);
        let mut expired = Vec::new();
        loop {
            self.wheel.poll(time::now_ms(), &mut expired);
            if !expired.is_empty() {
                let batch = expired.drain(..).map(|(_, s)| self.forget(s)).collect();
                if fire.send(batch).is_err() {
                    return;
                }
            }
            let sleep = async {
                match self.wheel.next_expiration() {
                    Some(next) => {
                        let at = tokio::time::Instant::from_std(time::instant_of(next));
                        tokio::time::sleep_until(at).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                n = commands.recv_many(&mut received, MAX_COMMANDS_PER_TURN) => {
                    if n == 0 {
                        return;
                    }
                    for command in received.drain(..) {
                        self.apply(command);
                    }
                }
                _ = sleep => {}
            }
        }
    }

    fn apply(&mut self, command: WheelCommand) {
        match command {
            WheelCommand::Insert(schedule) => {
                if let Some((_, old)) = self.by_id.remove(&schedule.id) {
                    // The committer removes a replaced schedule before inserting its successor,
                    // so this only guards the invariant "one entry per id".
                    debug_assert!(false, "second wheel entry for id {}", schedule.id);
                    self.drop_entry(old);
                }
                let id = schedule.id.clone();
                let due = schedule.due;
                let key = self.wheel.insert(due, schedule);
                self.by_id.insert(id, (due, key));
            }
            WheelCommand::Remove(key) => {
                if let Some(&(due, entry)) = self.by_id.get(key.id())
                    && due == key.due()
                {
                    self.by_id.remove(key.id());
                    self.drop_entry(entry);
                }
            }
        }
    }

    fn drop_entry(&mut self, entry: EntryKey) {
        if self.wheel.remove(entry).is_some() {
            self.resident.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Removes an expired schedule from the id index on its way out.
    fn forget(&mut self, schedule: Schedule) -> Schedule {
        if self
            .by_id
            .get(&schedule.id)
            .is_some_and(|(due, _)| *due == schedule.due)
        {
            self.by_id.remove(&schedule.id);
        }
        schedule
    }
}
