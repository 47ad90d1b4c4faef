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
use crate::store::SegmentKey;
use crate::time::{self, UnixMs};
use crate::wheel::{EntryKey, Wheel};

/// Most commands taken per wake-up, so a burst of inserts cannot delay firing for long.
const MAX_COMMANDS_PER_TURN: usize = 4096;

/// A schedule's identity in memory: its id and due instant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DueKey {
    pub due: UnixMs,
    pub id: String,
}

impl DueKey {
    pub fn new(due: UnixMs, id: &str) -> DueKey {
        DueKey {
            due,
            id: id.to_owned(),
        }
    }
}

/// A schedule held in memory, with the store segment it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub segment: SegmentKey,
    pub schedule: Schedule,
}

/// A change to the wheel's contents.
#[derive(Debug)]
pub enum WheelCommand {
    /// Hold this schedule until it is due. Ignored if the wheel already holds (or is firing)
    /// this id at this due: the committer may load a segment twice after moving its cursor
    /// back.
    Insert(Resident),
    /// Forget the schedule at this key (it was replaced); a no-op if it is not held or is
    /// already being fired.
    Remove(DueKey),
    /// These fired schedules are now deleted from the store, so can no longer be loaded again.
    Deleted(Vec<DueKey>),
}

/// Where a schedule the scheduler knows of is.
#[derive(Debug, Clone, Copy)]
struct Held {
    due: UnixMs,
    /// Its wheel entry; `None` once it has expired and is being fired.
    entry: Option<EntryKey>,
}

/// The wheel and an id index into it.
pub struct Scheduler {
    wheel: Wheel<Resident>,
    /// Every schedule in the wheel or being fired, by id. Firing ones stay until the store has
    /// deleted them, which is what makes a repeated load of the same key harmless.
    held: HashMap<String, Held>,
    /// Schedules in memory; this loop subtracts the ones it drops without firing.
    resident: Arc<AtomicUsize>,
}

impl Scheduler {
    pub fn new(resident: Arc<AtomicUsize>) -> Scheduler {
        Scheduler {
            wheel: Wheel::new(time::now_ms()),
            held: HashMap::new(),
            resident,
        }
    }

    /// Runs until `shutdown` or until the committer is gone. Due schedules go out on `fire` in
    /// due order, in batches.
    pub async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<WheelCommand>,
        fire: mpsc::UnboundedSender<Vec<Resident>>,
        shutdown: CancellationToken,
    ) {
        let mut received = Vec::with_capacity(MAX_COMMANDS_PER_TURN);
        let mut expired = Vec::new();
        loop {
            self.wheel.poll(time::now_ms(), &mut expired);
            if !expired.is_empty() {
                let batch = expired
                    .drain(..)
                    .map(|(_, s)| self.mark_firing(s))
                    .collect();
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
            WheelCommand::Insert(resident) => {
                let schedule = &resident.schedule;
                if let Some(held) = self.held.get(&schedule.id) {
                    if held.due == schedule.due {
                        // A reload of what is already held or firing.
                        self.resident.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    // The committer removes a replaced schedule before inserting its
                    // successor, so a different due here can only be an older copy that is
                    // already firing; the new one takes over the id.
                    debug_assert!(
                        held.entry.is_none(),
                        "two wheel entries for {}",
                        schedule.id
                    );
                    if let Some(entry) = held.entry {
                        self.drop_entry(entry);
                    }
                }
                let id = schedule.id.clone();
                let due = schedule.due;
                let entry = Some(self.wheel.insert(due, resident));
                self.held.insert(id, Held { due, entry });
            }
            WheelCommand::Remove(key) => {
                if let Some(&Held {
                    due,
                    entry: Some(entry),
                }) = self.held.get(&key.id)
                    && due == key.due
                {
                    self.held.remove(&key.id);
                    self.drop_entry(entry);
                }
            }
            WheelCommand::Deleted(keys) => {
                for key in keys {
                    if let Some(held) = self.held.get(&key.id)
                        && held.due == key.due
                        && held.entry.is_none()
                    {
                        self.held.remove(&key.id);
                    }
                }
            }
        }
    }

    fn drop_entry(&mut self, entry: EntryKey) {
        if self.wheel.remove(entry).is_some() {
            self.resident.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Marks an expired schedule as firing on its way out.
    fn mark_firing(&mut self, resident: Resident) -> Resident {
        let schedule = &resident.schedule;
        if let Some(held) = self.held.get_mut(&schedule.id)
            && held.due == schedule.due
        {
            held.entry = None;
        }
        resident
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Delivery;

    fn schedule(id: &str, due: UnixMs) -> Resident {
        Resident {
            segment: SegmentKey::start_of(0),
            schedule: Schedule {
                id: id.into(),
                due,
                subject: "t".into(),
                headers: vec![],
                payload: bytes::Bytes::new(),
                created: 0,
                delivery: Delivery::Core,
                recurrence: None,
                caller_id: true,
            },
        }
    }

    /// A scheduler whose resident count matches what the committer would have sent it.
    fn scheduler() -> (Scheduler, Arc<AtomicUsize>) {
        let resident = Arc::new(AtomicUsize::new(0));
        (Scheduler::new(resident.clone()), resident)
    }

    fn insert(s: &mut Scheduler, resident: &AtomicUsize, schedule: Resident) {
        resident.fetch_add(1, Ordering::Relaxed);
        s.apply(WheelCommand::Insert(schedule));
    }

    fn expire(s: &mut Scheduler, now: UnixMs) -> Vec<String> {
        let mut out = Vec::new();
        s.wheel.poll(now, &mut out);
        out.into_iter()
            .map(|(_, x)| s.mark_firing(x).schedule.id)
            .collect()
    }

    #[test]
    fn a_reloaded_key_is_held_once() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 50;
        insert(&mut s, &resident, schedule("a", due));
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(s.wheel.len(), 1);
        assert_eq!(resident.load(Ordering::Relaxed), 1);
        assert_eq!(expire(&mut s, due), ["a"]);
    }

    #[test]
    fn a_firing_key_is_not_reloaded_until_the_store_deleted_it() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(expire(&mut s, due), ["a"]);

        insert(&mut s, &resident, schedule("a", due));
        assert!(
            s.wheel.is_empty(),
            "a reload while firing must not fire twice"
        );
        // Replacing it while it fires cannot recall it either.
        s.apply(WheelCommand::Remove(DueKey::new(due, "a")));

        s.apply(WheelCommand::Deleted(vec![DueKey::new(due, "a")]));
        assert!(s.held.is_empty());
        // After deletion the same id and due is a genuinely new schedule.
        insert(&mut s, &resident, schedule("a", due));
        assert_eq!(s.wheel.len(), 1);
    }

    #[test]
    fn replacing_while_the_old_copy_fires_holds_the_new_one() {
        let (mut s, resident) = scheduler();
        let due = s.wheel.elapsed() + 5;
        insert(&mut s, &resident, schedule("a", due));
        expire(&mut s, due);
        s.apply(WheelCommand::Remove(DueKey::new(due, "a")));
        insert(&mut s, &resident, schedule("a", due + 100));
        // The old copy's deletion must not drop the new copy's index entry.
        s.apply(WheelCommand::Deleted(vec![DueKey::new(due, "a")]));
        s.apply(WheelCommand::Remove(DueKey::new(due + 100, "a")));
        assert!(
            s.wheel.is_empty(),
            "the new copy was still removable by its key"
        );
        assert_eq!(
            resident.load(Ordering::Relaxed),
            1,
            "only the firing copy is left"
        );
    }
}
