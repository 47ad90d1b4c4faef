use super::*;
use crate::protocol;
use crate::scheduler::Withdrawal;
use crate::store::{StoreOptions, Tier, WriteBatch, far_bucket_of};
use bytes::Bytes;

const DAY: UnixMs = 86_400_000;
use crate::time::UnixMs;

fn schedule(id: &str, due: UnixMs) -> Schedule {
    crate::record::test_schedule(id, due, true)
}

struct Harness {
    committer: Committer,
    wheel: std::sync::mpsc::Receiver<WheelCommand>,
    acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    _commands: mpsc::Sender<StoreCommand>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A committer over a store that already holds `existing` (one segment each).
    fn new(max_resident: usize, existing: &[Schedule]) -> Harness {
        Harness::with_capacity(max_resident, existing, Capacity::unlimited())
    }

    /// [`Harness::new`] with pending limits.
    fn with_capacity(max_resident: usize, existing: &[Schedule], capacity: Capacity) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness::in_dir(dir, max_resident, existing, capacity)
    }

    fn in_dir(
        dir: tempfile::TempDir,
        max_resident: usize,
        existing: &[Schedule],
        capacity: Capacity,
    ) -> Harness {
        let store = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap();
        let mut batch = WriteBatch::default();
        for (seq, s) in existing.iter().enumerate() {
            let key = SegmentKey::fine(bucket_of(s.due), seq as u64 + 1);
            batch.put_segment(key, [s]);
            batch.index_schedule(s, key);
        }
        if !existing.is_empty() {
            batch.set_next_seq(existing.len() as u64 + 1);
            batch.set_pending(existing.len() as u64);
            store.commit(batch).unwrap();
        }
        let (commands_tx, commands) = mpsc::channel(16);
        let (wheel_tx, wheel) = std::sync::mpsc::channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let options = CommitterOptions {
            max_batch: 16,
            // Long, so that a slow test machine never sees a near-future schedule come due.
            lookahead: Duration::from_secs(60),
            max_resident,
            capacity,
        };
        let resident = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let links = CommitterLinks {
            commands,
            wheel: wheel_tx,
            acks: acks_tx,
            resident,
            metrics,
            log: None,
        };
        let committer = Committer::new(store, options, links).unwrap();
        Harness {
            committer,
            wheel,
            acks,
            _commands: commands_tx,
            _dir: dir,
        }
    }

    /// The same store opened again by a new committer with `capacity`, as after a restart.
    fn restart(self, capacity: Capacity) -> Harness {
        let Harness {
            committer, _dir, ..
        } = self;
        drop(committer);
        Harness::in_dir(_dir, 1000, &[], capacity)
    }

    /// Sends `command` alone in a round and returns its reply.
    fn request(&mut self, command: StoreCommand) -> Result<Bytes, ApiError> {
        self.committer.round(std::iter::once(command), false);
        let mut acks = self.acks.try_recv().unwrap();
        assert_eq!(acks.len(), 1);
        acks.remove(0).result
    }

    fn add_answered(&mut self, schedule: Schedule) -> Result<Bytes, ApiError> {
        self.request(StoreCommand::Add {
            schedule,
            reply: Some(reply()),
        })
    }

    /// Loads and migrates a chunk, as the run loop does; the store must take it.
    fn advance(&mut self) -> bool {
        let more = self.committer.advance();
        assert!(self.committer.outage.is_none(), "the store failed");
        more
    }

    /// What the committer told the wheel since the last call, as (insert?, due, id); the
    /// `Deleted` notices are left out.
    fn told(&mut self) -> Vec<(bool, UnixMs, String)> {
        let mut out = Vec::new();
        while let Ok(command) = self.wheel.try_recv() {
            match command {
                WheelCommand::Insert(residents) => out.extend(
                    residents
                        .into_iter()
                        .map(|r| (true, r.schedule.due, r.schedule.id)),
                ),
                WheelCommand::Remove(k) | WheelCommand::Forget(k) => out.push((false, k.due, k.id)),
                WheelCommand::Deleted(_)
                | WheelCommand::Withdraw(..)
                | WheelCommand::Retry(_)
                | WheelCommand::Unwritten { .. }
                | WheelCommand::Evict { .. } => {}
            }
        }
        out
    }

    /// The schedules inserted into the wheel since the last call.
    fn inserted(&mut self) -> Vec<Resident> {
        std::iter::from_fn(|| self.wheel.try_recv().ok())
            .flat_map(|command| match command {
                WheelCommand::Insert(residents) => residents,
                _ => Vec::new(),
            })
            .collect()
    }

    fn add(&mut self, schedule: Schedule) {
        let add = StoreCommand::Add {
            schedule,
            reply: None,
        };
        self.committer.round(std::iter::once(add), false);
    }

    /// Adds `schedule` in a round of its own, as a request would (so a series is stored
    /// thin), loads it, and returns the copy the wheel got.
    fn add_and_load(&mut self, schedule: Schedule) -> Resident {
        let id = schedule.id.clone();
        self.add(schedule);
        self.advance();
        let [loaded] = self
            .inserted()
            .try_into()
            .unwrap_or_else(|got| panic!("{id} was not loaded alone: {got:?}"));
        loaded
    }

    fn fire(&mut self, residents: Vec<Resident>) {
        let fired = StoreCommand::Fired(residents);
        self.committer.round(std::iter::once(fired), true);
    }

    /// Every stored schedule, fine and far, as (due, id) in that order.
    fn stored(&self) -> Vec<(UnixMs, String)> {
        let store = &self.committer.store;
        let fine = store.scan(SegmentKey::start_of(0), UnixMs::MAX, 1000);
        let far = store.scan(SegmentKey::far(0, 0), UnixMs::MAX, 1000);
        let mut all: Vec<_> = fine
            .unwrap()
            .into_iter()
            .chain(far.unwrap())
            .flat_map(|(_, s)| s)
            .map(|s| (s.due, s.id))
            .collect();
        all.sort();
        all
    }

    /// The keys of the stored segments, far ones first.
    fn segment_keys(&self) -> Vec<SegmentKey> {
        let store = &self.committer.store;
        let far = store.scan(SegmentKey::far(0, 0), UnixMs::MAX, 1000);
        let fine = store.scan(SegmentKey::start_of(0), UnixMs::MAX, 1000);
        far.unwrap()
            .into_iter()
            .chain(fine.unwrap())
            .map(|(key, _)| key)
            .collect()
    }
}

#[test]
fn loads_overdue_and_near_schedules_but_leaves_the_far_future_on_disk() {
    let now = time::now_ms();
    let mut h = Harness::new(
        1000,
        &[
            schedule("far", now + 30 * DAY),
            schedule("near", now + 100),
            schedule("overdue", now - 5000),
            schedule("older", now - 9000),
        ],
    );
    assert!(!h.advance());
    let ids: Vec<_> = h.told().into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(
        ids,
        ["older", "overdue", "near"],
        "due order, far one left on disk"
    );
    assert_eq!(h.committer.resident.load(Ordering::Relaxed), 3);
    // The cursor now sits at the horizon: nothing more to load until time moves on.
    assert!(h.committer.cursor.bucket > now + 100);
    assert!(!h.advance());
    assert!(h.told().is_empty());
}

#[test]
fn never_holds_more_than_max_resident() {
    let now = time::now_ms();
    let many: Vec<_> = (0..50)
        .map(|i| schedule(&format!("s{i:02}"), now + 1000 * i))
        .collect();
    let mut h = Harness::new(20, &many);
    assert!(h.advance(), "a full chunk means more may wait");
    assert_eq!(h.told().len(), 20);
    assert!(!h.advance());
    assert!(h.told().is_empty(), "at the cap nothing more is loaded");

    // Firing 15 of them makes room for exactly 15 more, continuing in due order.
    h.committer.resident.fetch_sub(15, Ordering::Relaxed);
    h.advance();
    let told = h.told();
    assert_eq!(told.len(), 15);
    assert_eq!(told[0].2, "s20");
}

#[test]
fn adds_inside_the_horizon_go_to_the_wheel_and_replaces_move_them() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.advance();

    h.add(schedule("a", now + 200));
    assert_eq!(h.told(), [(true, now + 200, "a".to_owned())]);
    h.add(schedule("far", now + DAY));
    assert!(h.told().is_empty(), "beyond the horizon: disk only");

    // Replacing moves the wheel entry; replacing a disk-only one into the horizon inserts it.
    h.add(schedule("a", now + 300));
    assert_eq!(
        h.told(),
        [
            (false, now + 200, "a".to_owned()),
            (true, now + 300, "a".to_owned())
        ]
    );
    h.add(schedule("far", now + 50));
    assert_eq!(
        h.told(),
        [
            (false, now + DAY, "far".to_owned()),
            (true, now + 50, "far".to_owned())
        ],
        "the remove of a disk-only key is a no-op for the wheel"
    );
    assert_eq!(h.committer.store.get("far").unwrap().unwrap().due, now + 50);
    assert_eq!(
        h.stored(),
        [(now + 50, "far".to_owned()), (now + 300, "a".to_owned())],
        "replaced copies are gone"
    );
}

#[test]
fn a_generated_id_given_back_as_sched_id_replaces_it() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.advance();
    // One near (its id stays as generated), one far ahead (stored under a far id).
    for due in [now + 1000, now + DAY] {
        h.add(Schedule {
            caller_id: false,
            ..schedule(&protocol::generated_id(due), due)
        });
        let [(_, id)] = h.stored().try_into().expect("one stored");
        h.add(schedule(&id, due + DAY));
        assert_eq!(h.stored(), [(due + DAY, id.clone())]);
        assert_eq!(h.committer.store.get(&id).unwrap().unwrap().due, due + DAY);
        // Cancelled the way a fired copy is removed: gone from the store.
        h.fire(vec![Resident {
            segment: h.committer.store.locate(&id).unwrap().unwrap(),
            schedule: Box::new(schedule(&id, due + DAY)),
        }]);
        assert!(h.stored().is_empty());
    }
}

#[test]
fn a_fired_copy_never_deletes_its_replacement() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("x", now - 10)]);
    h.advance();
    let [old] = h.inserted().try_into().expect("x was loaded");
    // x fired at its old time while a replacement arrived; the old copy's deletion comes later.
    h.add(schedule("x", now + DAY));
    h.fire(vec![old]);
    assert_eq!(h.committer.store.get("x").unwrap().unwrap().due, now + DAY);
    assert_eq!(h.stored(), [(now + DAY, "x".to_owned())]);

    let segment = h.committer.store.locate("x").unwrap().unwrap();
    let new = Resident {
        segment,
        schedule: Box::new(schedule("x", now + DAY)),
    };
    h.fire(vec![new]);
    assert_eq!(h.committer.store.get("x").unwrap(), None);
    assert!(h.stored().is_empty());
}

#[test]
fn fired_schedules_leave_their_segment_and_it_goes_when_empty() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.advance();
    // One round, one bucket: one segment of three.
    let adds = ["a", "b", "c"].map(|id| StoreCommand::Add {
        schedule: schedule(id, now + 20_000),
        reply: None,
    });
    h.committer.round(adds.into_iter(), false);
    let residents = h.inserted();
    assert_eq!(residents.len(), 3);
    assert!(residents.iter().all(|r| r.segment == residents[0].segment));

    // Fired notices wait for the periodic flush; then only the fired ones go.
    let fired = StoreCommand::Fired(residents[..2].to_vec());
    h.committer.round(std::iter::once(fired), false);
    assert_eq!(h.stored().len(), 3, "not yet flushed");
    h.committer.round(std::iter::empty(), true);
    assert_eq!(h.stored(), [(now + 20_000, "c".to_owned())]);
    assert_eq!(h.committer.store.get("a").unwrap(), None);
    assert!(h.committer.store.get("c").unwrap().is_some());

    h.fire(residents[2..].to_vec());
    assert!(h.stored().is_empty());
    let raw = h
        .committer
        .store
        .scan(SegmentKey::start_of(0), UnixMs::MAX, 10)
        .unwrap();
    assert!(raw.is_empty(), "the emptied segment is deleted");
}

/// A real timer-thread scheduler behind the committer, as in the daemon (without firing).
fn real_scheduler(h: &mut Harness) -> Arc<std::sync::Mutex<crate::scheduler::Scheduler>> {
    let scheduler = Arc::new(std::sync::Mutex::new(crate::scheduler::Scheduler::new(
        h.committer.resident.clone(),
        Arc::default(),
    )));
    let (wheel_tx, wheel_rx) = std::sync::mpsc::channel();
    h.committer.wheel = wheel_tx;
    let shared = scheduler.clone();
    std::thread::spawn(move || {
        while let Ok(command) = wheel_rx.recv() {
            shared.lock().unwrap().apply(command);
        }
    });
    scheduler
}

/// Waits (bounded) until the scheduler holds exactly `ids`.
fn wait_for_wheel(scheduler: &std::sync::Mutex<crate::scheduler::Scheduler>, ids: &[String]) {
    let start = std::time::Instant::now();
    loop {
        let held = scheduler.lock().unwrap().ids_in_wheel();
        if held == ids {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "wheel holds {held:?}, expected {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_earlier_arrival_evicts_the_latest_resident_which_loads_again_later() {
    let now = time::now_ms();
    let many: Vec<_> = (0..20)
        .map(|i| schedule(&format!("s{i:02}"), now + 40_000 + i))
        .collect();
    let mut h = Harness::new(20, &many);
    let scheduler = real_scheduler(&mut h);
    h.advance();
    let mut expected: Vec<String> = (0..20).map(|i| format!("s{i:02}")).collect();
    wait_for_wheel(&scheduler, &expected);

    // Memory is full, but "early" is due before all of them: the latest one (s19) makes room
    // and waits on disk instead; the cursor moves back to it.
    h.add(schedule("early", now + 30_000));
    expected.pop();
    expected.insert(0, "early".to_owned());
    wait_for_wheel(&scheduler, &expected);
    assert_eq!(h.committer.resident.load(Ordering::Relaxed), 20);
    assert!(h.committer.cursor.bucket <= bucket_of(now + 40_019));

    // One due after everything held finds nothing later to evict: it stays on disk.
    h.add(schedule("late", now + 50_000));
    wait_for_wheel(&scheduler, &expected);
    assert!(h.committer.store.get("late").unwrap().is_some());
    // Something already due goes straight to the wheel, making room like any earlier one.
    h.add(schedule("now", now - 1000));
    expected.pop();
    expected.push("now".to_owned());
    expected.sort();
    wait_for_wheel(&scheduler, &expected);

    // Room again (three cancelled): the loader brings back s18, s19 and "late".
    let cancels = ["s00", "s01", "now"].map(cancel_command);
    h.committer.round(cancels.into_iter(), false);
    let acks = h.acks.try_recv().unwrap();
    assert!(acks.iter().all(|a| a.result.is_ok()), "{acks:?}");
    expected.retain(|id| !["s00", "s01", "now"].contains(&id.as_str()));
    expected.extend(["s18".to_owned(), "s19".to_owned(), "late".to_owned()]);
    expected.sort();
    // The loader re-reads the evicted bucket (the wheel ignores what it holds already) as
    // the timer thread confirms what it ignored: step it until it settles.
    let start = std::time::Instant::now();
    while scheduler.lock().unwrap().ids_in_wheel() != expected
        && start.elapsed() < Duration::from_secs(10)
    {
        h.advance();
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_for_wheel(&scheduler, &expected);
}

#[test]
fn a_same_due_replacement_survives_the_old_copy_firing() {
    let now = time::now_ms();
    let due = now - 10;
    let mut h = Harness::new(1000, &[schedule("x", due)]);
    h.advance();
    let [old] = h.inserted().try_into().expect("x was loaded");
    let new = Schedule {
        payload: Bytes::from_static(b"NEW"),
        ..schedule("x", due)
    };
    h.add(new);
    let [inserted] = h
        .inserted()
        .try_into()
        .expect("the new copy goes to the wheel");
    assert_ne!(
        inserted.segment, old.segment,
        "a new copy lives in a new segment"
    );

    h.fire(vec![old]);
    let kept = h
        .committer
        .store
        .get("x")
        .unwrap()
        .expect("the new copy is kept");
    assert_eq!(kept.payload, Bytes::from_static(b"NEW"));
}

fn reply() -> crate::replies::Reply {
    crate::replies::Reply {
        subject: "reply".into(),
        received: std::time::Instant::now(),
        endpoint: crate::metrics::Endpoint::Cancel,
        via: crate::replies::Via::Request,
    }
}

fn cancel_command(id: &str) -> StoreCommand {
    StoreCommand::Cancel {
        id: id.into(),
        reply: Some(reply()),
    }
}

#[test]
fn a_cancel_during_shutdown_is_refused_not_claimed() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("x", now - 10)]);
    h.advance();
    // The timer thread has stopped; firing may still be publishing x.
    h.wheel = std::sync::mpsc::channel().1;
    h.committer
        .round(std::iter::once(cancel_command("x")), false);
    let acks = h.acks.try_recv().unwrap();
    assert_eq!(acks[0].result.as_ref().unwrap_err().code, 503);
    assert!(
        h.committer.store.get("x").unwrap().is_some(),
        "not cancelled"
    );
}

#[test]
fn a_failed_round_gives_the_wheel_back_what_its_cancels_took() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("a", now + 5000)]);
    h.advance();
    let [held] = h.inserted().try_into().expect("a was loaded");
    // "b" points at an unreadable segment, so adding b fails the round after a's cancel.
    // A stand-in timer thread that hands the copy over.
    let (wheel_tx, wheel_rx) = std::sync::mpsc::channel();
    h.committer.wheel = wheel_tx;
    let timer = std::thread::spawn(move || {
        let mut inserted_back = Vec::new();
        while let Ok(command) = wheel_rx.recv() {
            match command {
                WheelCommand::Withdraw(_, answer) => {
                    let _ = answer.send(Withdrawal::Withdrawn(held.clone()));
                }
                WheelCommand::Insert(back) => inserted_back.extend(back),
                _ => {}
            }
        }
        inserted_back
    });
    let add_b = StoreCommand::Add {
        schedule: schedule("b", now + 9000),
        reply: None,
    };
    h.committer.store.fail_writes(true);
    h.committer
        .round([cancel_command("a"), add_b].into_iter(), false);
    h.committer.store.fail_writes(false);
    let acks = h.acks.try_recv().unwrap();
    assert_eq!(acks[0].result.as_ref().unwrap_err().code, 503);
    assert!(
        h.committer.store.get("a").unwrap().is_some(),
        "the cancel did not happen"
    );
    drop(h.committer);
    let back = timer.join().unwrap();
    assert_eq!(back.len(), 1, "a is back in the wheel");
    assert_eq!(back[0].schedule.id, "a");
}

#[test]
fn fired_removals_of_a_failed_round_are_retried() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("a", now - 10)]);
    h.advance();
    let fired = h.inserted();
    // The disk fails during the round that flushes a's removal.
    let add_b = StoreCommand::Add {
        schedule: schedule("b", now + 9000),
        reply: None,
    };
    h.committer.store.fail_writes(true);
    h.committer
        .round([StoreCommand::Fired(fired), add_b].into_iter(), true);
    h.committer.store.fail_writes(false);
    assert!(
        h.committer.store.get("a").unwrap().is_some(),
        "the round failed"
    );
    h.committer.try_recover();
    h.committer.round(std::iter::empty(), true);
    assert_eq!(
        h.committer.store.get("a").unwrap(),
        None,
        "removed on the next flush"
    );
    let deleted = std::iter::from_fn(|| h.wheel.try_recv().ok())
        .any(|c| matches!(c, WheelCommand::Deleted(d) if d.iter().any(|r| r.id == "a")));
    assert!(deleted, "and only then is the wheel told");
}

#[test]
fn a_series_fired_in_a_failed_round_moves_on_at_the_next_try() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    let first = h.add_and_load(series("s", now - 10, 1_000, None));
    // The round storing its successor fails: the successor goes back to its fired copy.
    h.committer.store.fail_writes(true);
    h.fire(vec![first]);
    h.committer.store.fail_writes(false);
    let stored = h.committer.store.get("s").unwrap().unwrap();
    assert_eq!(stored.recurrence.unwrap().seq, 1, "the round failed");
    assert!(h.inserted().is_empty(), "nothing went to the wheel");
    h.committer.try_recover();
    h.committer.round(std::iter::empty(), true);
    let stored = h.committer.store.get("s").unwrap().unwrap();
    assert_eq!(
        (stored.due, stored.recurrence.unwrap().seq),
        (now + 990, 2),
        "moved on, not ended"
    );
    // (After reopening the store, the loader brings in what it holds again.)
    h.advance();
    let [second] = h
        .inserted()
        .try_into()
        .expect("the successor went to the wheel");
    assert_eq!(second.schedule.recurrence.as_ref().unwrap().seq, 2);
    assert!(h.committer.store.is_indexed("s").unwrap());
}

#[test]
fn a_series_whose_round_was_applied_but_not_made_durable_keeps_its_successor() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    let first = h.add_and_load(series("s", now - 10, 1_000, None));
    let fired_copy = first.schedule.as_ref().clone();
    let fired_key = first.segment;
    // Fired in a round that also answers an add, so it fsyncs; the fsync fails.
    h.committer.store.fail_flushes(true);
    let add = StoreCommand::Add {
        schedule: schedule("other", now + DAY),
        reply: Some(reply()),
    };
    h.committer
        .round([StoreCommand::Fired(vec![first]), add].into_iter(), true);
    h.committer.store.fail_flushes(false);
    assert!(h.committer.outage.is_some(), "the round failed");
    let successors: Vec<Option<u64>> = h
        .committer
        .fired
        .values()
        .flatten()
        .map(|f| f.next.as_ref().map(|n| n.recurrence.as_ref().unwrap().seq))
        .collect();
    assert_eq!(successors, [Some(2)], "its successor went back to it");
    // The batch is lost with the store (as a reopen may find): the fired copy is back, the
    // successor gone. The next try stores the successor again.
    let moved_to = h.committer.store.locate("s").unwrap().unwrap();
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(moved_to, None);
    batch.put_segment(fired_key, [&fired_copy]);
    h.committer.store.commit(batch).unwrap();
    h.committer.try_recover();
    h.committer.round(std::iter::empty(), true);
    let stored = h.committer.store.get("s").unwrap().unwrap();
    assert_eq!((stored.due, stored.recurrence.unwrap().seq), (now + 990, 2));
    assert!(h.committer.store.is_indexed("s").unwrap());
}

fn generated(due: UnixMs) -> Schedule {
    crate::record::test_schedule(&protocol::generated_id(due), due, false)
}

fn add_all(h: &mut Harness, schedules: Vec<Schedule>) {
    let adds = schedules.into_iter().map(|schedule| StoreCommand::Add {
        schedule,
        reply: None,
    });
    h.committer.round(adds, false);
}

#[test]
fn sparse_far_ahead_schedules_go_to_far_segments_under_far_ids() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.advance();
    // Sparse: a few per fine bucket, far ahead, generated and caller ids.
    let mut sparse: Vec<Schedule> = (0..50).map(|i| generated(now + DAY + i * 1000)).collect();
    sparse.push(schedule("mine", now + DAY + 5));
    // Dense: one bucket's worth that fills more than a small segment.
    let dense: Vec<Schedule> = (0..40).map(|_| generated(now + 2 * DAY)).collect();
    // Near: inside the horizon, so it stays fine (and goes to the wheel).
    let near = generated(now + 5_000);
    add_all(
        &mut h,
        sparse.into_iter().chain(dense).chain([near]).collect(),
    );

    let keys = h.segment_keys();
    let far: Vec<_> = keys.iter().filter(|k| k.tier == Tier::Far).collect();
    assert!(!far.is_empty() && far.len() < 10, "grouped: {far:?}");
    assert_eq!(
        keys.len() - far.len(),
        2,
        "the dense bucket and the near one"
    );
    let stored = h.stored();
    assert_eq!(stored.len(), 92);
    for (due, id) in &stored {
        let key = h.committer.store.locate(id).unwrap().expect("findable");
        let dense_or_near = *due == now + 2 * DAY || *due == now + 5_000;
        assert_eq!(key.tier == Tier::Fine, dense_or_near, "{id}");
        if id != "mine" {
            // Every generated id, fine or far, names its segment.
            let (named_due, seq, _) = protocol::far_parts(id).expect("renamed");
            assert_eq!((named_due, seq), (*due, key.seq));
        }
    }
    assert_eq!(h.inserted().len(), 1, "only the near one is loaded");
}

#[test]
fn far_buckets_move_to_fine_segments_before_the_horizon_reaches_them() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    // Written long ago: a far segment now due within the horizon, and one still far off.
    let soon = now + 20_000;
    let soon_bucket = far_bucket_of(soon);
    let later = now + DAY;
    let far_soon = SegmentKey::far(soon_bucket, 7);
    let far_later = SegmentKey::far(far_bucket_of(later), 8);
    let generated_id = protocol::far_id(soon + 1, far_soon.seq, 0).unwrap();
    let mut batch = WriteBatch::default();
    batch.put_segment(
        far_soon,
        &[
            Schedule {
                caller_id: false,
                ..schedule(&generated_id, soon + 1)
            },
            schedule("caller", soon + 500),
        ],
    );
    batch.index("caller", far_soon);
    batch.put_segment(far_later, &[schedule("later", later)]);
    batch.index("later", far_later);
    batch.set_next_seq(9);
    h.committer.store.commit(batch).unwrap();

    // The first step after a start migrates what the horizon needs, then loads it.
    while h.advance() {}
    let mut loaded: Vec<_> = h.inserted().into_iter().map(|r| r.schedule.id).collect();
    loaded.sort();
    let mut expected = [generated_id.clone(), "caller".to_owned()];
    expected.sort();
    assert_eq!(loaded, expected);
    assert_eq!(
        h.segment_keys().iter().filter(|k| **k == far_soon).count(),
        0
    );
    for id in [&generated_id, "caller"] {
        let key = h
            .committer
            .store
            .locate(id)
            .unwrap()
            .expect("still findable");
        assert_eq!(key.tier, Tier::Fine, "{id}");
        assert_eq!(
            key.seq, far_soon.seq,
            "the far segment's seq, which its ids name"
        );
        assert_eq!(
            key.bucket,
            bucket_of(h.committer.store.get(id).unwrap().unwrap().due)
        );
    }
    assert_eq!(h.committer.store.locate("later").unwrap(), Some(far_later));
    assert_eq!(h.stored().len(), 3, "nothing lost or doubled");
}

#[test]
fn a_damaged_segment_costs_only_the_requests_that_need_what_it_lost() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    // "b" and "c" are indexed into a segment that is now garbage; "a" is fine elsewhere.
    let broken = SegmentKey::fine(bucket_of(now + DAY), 999);
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(broken, Some(b"garbage".to_vec()));
    batch.index("b", broken);
    batch.index("c", broken);
    batch.set_next_seq(1000);
    h.committer.store.commit(batch).unwrap();
    h.add(schedule("a", now + DAY));

    // One round: replace b, cancel c, add d. Only the cancel of c (lost) is refused.
    let commands = [
        StoreCommand::Add {
            schedule: schedule("b", now + DAY + 1),
            reply: Some(reply()),
        },
        StoreCommand::Cancel {
            id: "c".into(),
            reply: Some(reply()),
        },
        StoreCommand::Add {
            schedule: schedule("d", now + DAY + 2),
            reply: Some(reply()),
        },
    ];
    h.committer.round(commands.into_iter(), false);
    let acks = h.acks.try_recv().unwrap();
    assert!(acks[0].result.is_ok(), "{:?}", acks[0].result);
    let refused = acks[1].result.as_ref().unwrap_err();
    assert_eq!(refused.code, 500);
    assert!(
        refused.description.contains(&format!("{broken:?}")),
        "{refused:?}"
    );
    assert!(acks[2].result.is_ok(), "{:?}", acks[2].result);
    let ids: Vec<String> = h.stored().into_iter().map(|(_, id)| id).collect();
    assert_eq!(ids, ["a", "b", "d"]);
    assert_eq!(h.committer.store.damaged_total(), 1);
}

#[test]
fn a_sched_id_naming_a_segment_not_written_yet_reserves_it() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    // An id another store generated (an import): its segment's seq is never handed out.
    let seq = h.committer.next_seq + 5;
    let imported = protocol::far_id(now + DAY, seq, 0).unwrap();
    let add = StoreCommand::Add {
        schedule: schedule(&imported, now + DAY),
        reply: Some(reply()),
    };
    h.committer.round(std::iter::once(add), false);
    let acks = h.acks.try_recv().unwrap();
    assert!(acks[0].result.is_ok(), "{:?}", acks[0].result);
    assert_eq!(h.stored(), [(now + DAY, imported.clone())]);
    assert!(h.segment_keys().iter().all(|key| key.seq > seq));
    assert_eq!(h.committer.store.next_seq().unwrap(), h.committer.next_seq);
    assert!(h.committer.next_seq > seq + 1, "past it, durably");
    assert!(h.committer.store.get(&imported).unwrap().is_some());
    // Beyond what may be reserved: refused.
    let far_ahead = protocol::far_id(now + DAY, RESERVABLE_SEQS, 0).unwrap();
    let add = StoreCommand::Add {
        schedule: schedule(&far_ahead, now + DAY),
        reply: Some(reply()),
    };
    h.committer.round(std::iter::once(add), false);
    let acks = h.acks.try_recv().unwrap();
    assert_eq!(acks[0].result.as_ref().unwrap_err().code, 400);
    assert_eq!(h.stored().len(), 1);
}

fn capacity(toml: &str) -> Capacity {
    let config = crate::config::Config::from_toml(toml).unwrap();
    crate::policy::Policy::new(&config)
        .unwrap()
        .capacity()
        .clone()
}

fn to(subject: &str, id: &str, due: UnixMs) -> Schedule {
    let mut schedule = schedule(id, due);
    schedule.subject = subject.into();
    schedule
}

#[test]
fn a_full_store_refuses_new_schedules_but_takes_replacements_cancels_and_fires() {
    let now = time::now_ms();
    let mut h = Harness::with_capacity(1000, &[], capacity("[limits]\nmax_pending = 2\n"));
    h.add_answered(schedule("a", now - 10)).unwrap();
    h.add_answered(schedule("b", now + DAY)).unwrap();
    let full = h.add_answered(schedule("c", now + DAY)).unwrap_err();
    assert_eq!(full.code, 503, "{full:?}");
    assert!(full.description.contains("store full"), "{full:?}");
    assert_eq!(h.committer.store.get("c").unwrap(), None, "stores nothing");
    // Replacing a pending id adds nothing.
    h.add_answered(schedule("b", now + 2 * DAY)).unwrap();
    h.request(cancel_command("b")).unwrap();
    h.add_answered(schedule("c", now + DAY)).unwrap();
    // Firing makes room.
    h.advance();
    let fired = h.inserted();
    assert_eq!(fired.len(), 1);
    h.fire(fired);
    h.add_answered(schedule("d", now + DAY)).unwrap();
    assert_eq!(h.committer.ledger.pending, 2);
    assert_eq!(h.committer.store.pending().unwrap(), 2);
    assert_eq!(h.stored().len(), 2);
}

#[test]
fn quotas_count_every_matching_pattern_and_survive_restarts() {
    let quotas = "[[limits.quotas]]\nsubjects = \"orders.>\"\nmax_pending = 2\n\
                  [[limits.quotas]]\nsubjects = \"*.eu\"\nmax_pending = 1\n";
    let mut h = Harness::with_capacity(1000, &[], capacity(quotas));
    let due = time::now_ms() + DAY;
    h.add_answered(to("orders.us", "o1", due)).unwrap();
    h.add_answered(to("orders.eu", "o2", due)).unwrap();
    let eu = h.add_answered(to("billing.eu", "b1", due)).unwrap_err();
    assert_eq!(eu.code, 429);
    assert!(eu.description.contains("\"*.eu\""), "{eu:?}");
    let orders = h.add_answered(to("orders.x", "o3", due)).unwrap_err();
    assert!(orders.description.contains("\"orders.>\""), "{orders:?}");
    h.add_answered(to("billing.us", "b2", due)).unwrap();
    // A replacement in the same quotas fits; moving o2 out of both frees them.
    h.add_answered(to("orders.eu", "o2", due + 1)).unwrap();
    h.add_answered(to("billing.us", "o2", due)).unwrap();
    h.add_answered(to("x.eu", "e1", due)).unwrap();
    h.request(cancel_command("o1")).unwrap();
    assert_eq!(h.committer.ledger.used, [0, 1]);
    assert_eq!(h.committer.ledger.pending, 3);
    let usage = h.committer.metrics.quotas();
    assert_eq!((usage[1].subjects.as_str(), usage[1].pending), ("*.eu", 1));

    // A restart reads the counts back.
    let mut h = h.restart(capacity(quotas));
    assert_eq!(h.committer.ledger.used, [0, 1]);
    assert_eq!(h.add_answered(to("y.eu", "e2", due)).unwrap_err().code, 429);
    // A quota configured anew is counted from the store.
    let more = format!("{quotas}[[limits.quotas]]\nsubjects = \"billing.*\"\nmax_pending = 9\n");
    let h = h.restart(capacity(&more));
    assert_eq!(h.committer.ledger.used, [0, 1, 2]);
    assert_eq!(h.committer.ledger.pending, 3);
    // Without quotas the record goes, so that a later quota is counted afresh.
    let h = h.restart(Capacity::unlimited());
    assert_eq!(h.committer.store.quota_counts().unwrap(), None);
    assert_eq!(h.committer.ledger.pending, 3);
}

#[test]
fn fired_schedules_leave_their_quotas() {
    let now = time::now_ms();
    let quotas = "[[limits.quotas]]\nsubjects = \"orders.>\"\nmax_pending = 1\n";
    let mut h = Harness::with_capacity(1000, &[], capacity(quotas));
    h.add_answered(to("orders.x", "o1", now - 10)).unwrap();
    assert_eq!(
        h.add_answered(to("orders.y", "o2", now)).unwrap_err().code,
        429
    );
    h.advance();
    let fired = h.inserted();
    h.fire(fired);
    assert_eq!(h.committer.ledger.used, [0]);
    h.add_answered(to("orders.y", "o2", now + DAY)).unwrap();
    let h = h.restart(capacity(quotas));
    assert_eq!(h.committer.ledger.used, [1]);
}

#[test]
fn a_store_that_cannot_be_written_refuses_at_once_keeps_firing_and_recovers() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("old", now - 10)]);
    h.committer.store.fail_writes(true);
    let failed = h.add_answered(schedule("a", now + DAY)).unwrap_err();
    assert_eq!(failed.code, 503);
    assert!(h.committer.metrics.store_error().is_some());
    // Until the next check nothing is tried, even though the disk works again.
    h.committer.store.fail_writes(false);
    let refused = h.add_answered(schedule("b", now + DAY)).unwrap_err();
    assert_eq!(refused.code, 503);
    assert!(
        refused.description.contains("store unavailable since"),
        "{refused:?}"
    );
    assert_eq!(h.request(cancel_command("old")).unwrap_err().code, 503);
    // Loading only reads: what is stored still reaches the wheel and fires.
    h.committer.advance();
    let fired = h.inserted();
    assert_eq!(fired.len(), 1);
    h.fire(fired);
    assert!(
        h.committer.store.get("old").unwrap().is_some(),
        "not removed yet"
    );

    h.committer.try_recover();
    assert!(h.committer.outage.is_none());
    assert_eq!(h.committer.metrics.store_error(), None);
    h.add_answered(schedule("c", now + DAY)).unwrap();
    h.committer.round(std::iter::empty(), true);
    assert_eq!(
        h.committer.store.get("old").unwrap(),
        None,
        "removed once it works"
    );
    assert_eq!(h.stored(), [(now + DAY, "c".to_owned())]);
    assert_eq!(h.committer.ledger.pending, 1);
}

#[test]
fn a_recovery_check_that_fails_keeps_the_outage() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.committer.store.fail_writes(true);
    assert_eq!(
        h.add_answered(schedule("a", now + DAY)).unwrap_err().code,
        503
    );
    h.committer.try_recover();
    assert!(h.committer.outage.is_some());
    // The database stayed open for readers.
    assert_eq!(h.committer.store.get("a").unwrap(), None);
    h.committer.store.fail_writes(false);
    h.committer.try_recover();
    assert!(h.committer.outage.is_none());
    h.add_answered(schedule("a", now + DAY)).unwrap();
}

/// A stand-in timer thread with a real scheduler, applying what the committer tells the
/// wheel (nothing expires: the test fires by hand). Joined, it gives the scheduler back.
fn timer_thread(h: &mut Harness) -> std::thread::JoinHandle<crate::scheduler::Scheduler> {
    let resident = h.committer.resident.clone();
    let (wheel_tx, wheel_rx) = std::sync::mpsc::channel();
    h.committer.wheel = wheel_tx;
    std::thread::spawn(move || {
        let retries = Arc::new(crate::retries::Retries::default());
        let mut scheduler = crate::scheduler::Scheduler::new(resident, retries);
        while let Ok(command) = wheel_rx.recv() {
            scheduler.apply(command);
        }
        scheduler
    })
}

#[test]
fn during_an_outage_far_segments_load_unmigrated_and_stay_cancellable_and_removable() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    // A far segment (seq 100) of the next minute, within the horizon: its migration would
    // need a write. Its schedules fall into three fine buckets.
    let minute = far_bucket_of(now) + crate::store::FAR_BUCKET_MS;
    let named = |due, index| {
        let id = protocol::far_id(due, 100, index).unwrap();
        crate::record::test_schedule(&id, due, false)
    };
    let (a, b, c) = (
        named(minute + 100, 0),
        named(minute + 600, 1),
        named(minute + 1200, 2),
    );
    let far = SegmentKey::far(minute, 100);
    let mut batch = WriteBatch::default();
    batch.put_new_segment(far, &[a.clone(), b.clone(), c.clone()]);
    batch.set_next_seq(101);
    batch.set_pending(3);
    h.committer.store.commit(batch).unwrap();
    (h.committer.next_seq, h.committer.ledger.pending) = (101, 3);
    let timer = timer_thread(&mut h);

    h.committer.store.fail_writes(true);
    assert_eq!(
        h.add_answered(schedule("x", now + DAY)).unwrap_err().code,
        503
    );
    h.committer.store.fail_writes(false);
    assert!(h.committer.outage.is_some());
    while h.committer.advance() {}
    assert!(
        h.committer.far_cursor > minute,
        "loaded past the far bucket"
    );
    // Firing takes a and b under the fine keys their migration will give them: two fine
    // keys of one far segment.
    let fired: Vec<Resident> = [&a, &b]
        .into_iter()
        .map(|s| Resident {
            segment: far.migrated(s.due),
            schedule: Box::new(s.clone()),
        })
        .collect();
    assert_eq!(fired[0].segment, SegmentKey::fine(bucket_of(a.due), 100));
    assert_ne!(fired[0].segment, fired[1].segment);
    h.fire(fired);

    h.committer.try_recover();
    assert!(h.committer.outage.is_none());
    // Cancelling c (still in its far segment) takes it out of the wheel too.
    h.request(cancel_command(&c.id)).unwrap();
    // Both fired ones leave their far segment, which is then gone.
    h.committer.round(std::iter::empty(), true);
    assert_eq!(h.stored(), []);
    assert_eq!(h.committer.ledger.pending, 0);
    assert_eq!(h.committer.store.pending().unwrap(), 0);
    h.advance();
    assert_eq!(h.committer.far_held_until, None, "migrated past it");
    drop(h.committer);
    let scheduler = timer.join().unwrap();
    let mut expected = vec![a.id, b.id];
    expected.sort();
    assert_eq!(scheduler.ids_in_wheel(), expected, "c was withdrawn");
}

#[test]
fn during_an_outage_a_damaged_segment_does_not_stop_loading() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("a", now + 1000)]);
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(
        SegmentKey::fine(bucket_of(now + 500), 50),
        Some(b"junk".to_vec()),
    );
    h.committer.store.commit(batch).unwrap();
    h.committer.store.fail_writes(true);
    assert_eq!(
        h.add_answered(schedule("x", now + DAY)).unwrap_err().code,
        503
    );
    // Its repair would be a write; what comes after it loads all the same.
    while h.committer.advance() {}
    let loaded: Vec<String> = h.inserted().into_iter().map(|r| r.schedule.id).collect();
    assert_eq!(loaded, ["a"]);
    h.committer.store.fail_writes(false);
    h.committer.try_recover();
    h.advance();
    assert_eq!(h.committer.store.damaged_total(), 1);
}

#[test]
fn during_a_long_outage_loading_pauses_while_too_many_fired_wait() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("due", now - 10)]);
    h.committer.store.fail_writes(true);
    assert_eq!(
        h.add_answered(schedule("x", now + DAY)).unwrap_err().code,
        503
    );
    let waiting: Vec<Resident> = (0..4000)
        .map(|i| Resident {
            segment: SegmentKey::fine(bucket_of(now - DAY), 1),
            schedule: Box::new(schedule(&format!("f{i}"), now - DAY)),
        })
        .collect();
    h.fire(waiting);
    assert!(!h.committer.advance());
    assert!(
        h.inserted().is_empty(),
        "nothing loads while 4 x max_resident wait"
    );
    h.committer.store.fail_writes(false);
    h.committer.try_recover();
    h.committer.round(std::iter::empty(), true);
    h.advance();
    let loaded: Vec<String> = h.inserted().into_iter().map(|r| r.schedule.id).collect();
    assert_eq!(loaded, ["due"]);
}

#[test]
fn a_store_failing_again_soon_after_recovering_is_checked_less_often() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    for expected in [1, 2, 4] {
        h.committer.store.fail_writes(true);
        assert_eq!(
            h.add_answered(schedule("a", now + DAY)).unwrap_err().code,
            503
        );
        assert_eq!(h.committer.check_every, Duration::from_secs(expected));
        h.committer.store.fail_writes(false);
        h.committer.try_recover();
        assert!(h.committer.outage.is_none());
    }
}

#[test]
fn what_a_lost_write_had_loaded_is_forgotten_after_reopening() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("kept", now + 5000)]);
    let timer = timer_thread(&mut h);
    h.advance();
    h.committer.store.fail_writes(true);
    assert_eq!(
        h.add_answered(schedule("x", now + 1000)).unwrap_err().code,
        503
    );
    // As if sled had taken a write into memory and lost it: the wheel holds a copy from a
    // segment the store does not have (the next seq).
    let phantom = Resident {
        segment: SegmentKey::fine(bucket_of(now + 3000), h.committer.next_seq),
        schedule: Box::new(schedule("phantom", now + 3000)),
    };
    h.committer
        .wheel
        .send(WheelCommand::Insert(vec![phantom]))
        .unwrap();
    h.committer.store.fail_writes(false);
    h.committer.try_recover();
    drop(h.committer);
    let scheduler = timer.join().unwrap();
    assert_eq!(scheduler.ids_in_wheel(), ["kept"]);
}

#[test]
fn damage_of_unknown_extent_is_counted_again_at_the_next_start() {
    let now = time::now_ms();
    let quotas = "[[limits.quotas]]\nsubjects = \"q.>\"\nmax_pending = 10\n";
    let mut h = Harness::with_capacity(1000, &[], capacity(quotas));
    h.add_answered(to("q.a", "a", now + DAY)).unwrap();
    h.add_answered(to("q.b", "b", now + DAY)).unwrap();
    // b's segment turns to garbage, header and all: nobody can tell what it held.
    let key = h.committer.store.locate_indexed("b").unwrap().unwrap();
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(key, Some(b"garbage".to_vec()));
    h.committer.store.commit(batch).unwrap();
    assert_eq!(h.request(cancel_command("b")).unwrap_err().code, 500);
    assert_eq!(h.committer.ledger.pending, 2, "the loss is of unknown size");
    assert!(h.committer.store.recount_requested().unwrap());
    let h = h.restart(capacity(quotas));
    assert_eq!(
        h.committer.ledger,
        Ledger {
            pending: 1,
            used: vec![1]
        }
    );
    assert!(!h.committer.store.recount_requested().unwrap());
    assert_eq!(h.committer.store.pending().unwrap(), 1);
}

/// A series every `every` ms, at its occurrence number `seq`, due at `due`.
fn series(id: &str, due: UnixMs, every: UnixMs, count: Option<u64>) -> Schedule {
    let rule = crate::recurrence::Rule::Every(every);
    Schedule {
        recurrence: Some(Box::new(crate::recurrence::Series::new(
            rule, None, count, 1,
        ))),
        ..schedule(id, due)
    }
}

#[test]
fn a_fired_series_is_replaced_by_its_successor_in_one_batch() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[series("s", now - 10, 1_000, Some(3))]);
    h.advance();
    let [first] = h.inserted().try_into().expect("s was loaded");
    let pending = h.committer.ledger.pending;
    // Published: its successor is stored and handed to the wheel in the removal's round.
    h.fire(vec![first]);
    assert_eq!(h.stored(), [(now + 990, "s".to_owned())]);
    assert_eq!(h.committer.ledger.pending, pending, "still one record");
    let stored = h.committer.store.get("s").unwrap().unwrap();
    assert_eq!(stored.recurrence.as_ref().unwrap().seq, 2);
    let [second] = h
        .inserted()
        .try_into()
        .expect("the successor went to the wheel");
    assert_eq!(
        (second.schedule.due, second.segment),
        (now + 990, h.committer.store.locate("s").unwrap().unwrap())
    );
    // The third occurrence is the last (Count 3).
    h.fire(vec![second]);
    let [third] = h.inserted().try_into().unwrap();
    assert_eq!(third.schedule.recurrence.as_ref().unwrap().seq, 3);
    h.fire(vec![third]);
    assert!(h.stored().is_empty());
    assert_eq!(h.committer.store.get("s").unwrap(), None);
    assert_eq!(h.committer.ledger.pending, pending - 1);
}

#[test]
fn a_series_scheduled_now_is_stored_thin_and_fires_on_with_its_body() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    let scheduled = Schedule {
        payload: Bytes::from(vec![b'x'; 4_000]),
        ..series("s", now - 10, 1_000, Some(3))
    };
    let first = h.add_and_load(scheduled.clone());
    assert_eq!(first.schedule.payload, scheduled.payload);
    h.fire(vec![first]);
    // Its successor's record holds its due and seq; the 4 000 bytes are in its index entry.
    let store = &h.committer.store;
    let key = store.locate("s").unwrap().unwrap();
    let record = store.raw_segment(key).unwrap().unwrap().as_ref().len();
    assert!(record < 64, "{record} bytes");
    let stored = store.get("s").unwrap().unwrap();
    assert_eq!(
        (stored.due, stored.recurrence.as_ref().unwrap().seq),
        (now + 990, 2)
    );
    assert_eq!(stored.payload, scheduled.payload);
    assert_eq!(stored.subject, scheduled.subject);
    let [second] = h.inserted().try_into().unwrap();
    assert_eq!(second.schedule.payload, scheduled.payload);
    // After a restart it loads whole from its thin record and its body, and goes on.
    let mut h = h.restart(Capacity::unlimited());
    h.advance();
    let [loaded] = h.inserted().try_into().expect("s was loaded again");
    assert_eq!(*loaded.schedule, stored);
    h.fire(vec![loaded]);
    let [third] = h.inserted().try_into().unwrap();
    assert_eq!(third.schedule.recurrence.as_ref().unwrap().seq, 3);
    assert_eq!(third.schedule.payload, scheduled.payload);
    h.fire(vec![third]);
    assert!(h.stored().is_empty());
    assert!(
        !h.committer.store.is_indexed("s").unwrap(),
        "ended: body gone"
    );
}

#[test]
fn a_caught_up_fire_advances_from_the_occurrence_it_published() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[series("s", now - 10_500, 1_000, None)]);
    h.advance();
    let [mut late] = h.inserted().try_into().unwrap();
    late.schedule.choose_occurrence(now);
    assert_eq!(late.schedule.occurrence(), (now - 500, Some(11)));
    h.fire(vec![late]);
    let stored = h.committer.store.get("s").unwrap().unwrap();
    assert_eq!(
        (stored.due, stored.recurrence.unwrap().seq),
        (now + 500, 12)
    );
}

#[test]
fn a_cancelled_or_replaced_series_never_comes_back_from_its_firing_copy() {
    let now = time::now_ms();
    let mut h = Harness::new(
        1000,
        &[
            series("c", now - 10, 1_000, None),
            series("r", now - 10, 1_000, None),
        ],
    );
    let scheduler = real_scheduler(&mut h);
    h.advance();
    wait_for_wheel(&scheduler, &["c".to_owned(), "r".to_owned()]);
    // Both are handed out for firing.
    let mut firing = Vec::new();
    scheduler.lock().unwrap().poll_for_tests(now, &mut firing);
    assert_eq!(firing.len(), 2);
    // A series being fired can still be cancelled: the series ends.
    h.committer
        .round(std::iter::once(cancel_command("c")), false);
    let acks = h.acks.try_recv().unwrap();
    assert!(acks[0].result.is_ok(), "{:?}", acks[0].result);
    // And replaced by a one-shot.
    h.add(schedule("r", now + DAY));
    h.fire(firing);
    assert_eq!(h.stored(), [(now + DAY, "r".to_owned())]);
    assert_eq!(h.committer.store.get("c").unwrap(), None);
}

#[test]
fn a_cancel_of_a_series_lost_to_damage_drops_its_index_entry() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[series("lost", now + DAY, 1_000, None)]);
    // Its segment is gone (as if damage had lost it); the index entry is left.
    let key = h.committer.store.locate("lost").unwrap().unwrap();
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(key, None);
    h.committer.store.commit(batch).unwrap();
    assert!(h.committer.store.is_indexed("lost").unwrap());
    h.committer
        .round(std::iter::once(cancel_command("lost")), false);
    let acks = h.acks.try_recv().unwrap();
    assert_eq!(acks[0].result.as_ref().unwrap_err().code, 404);
    assert!(!h.committer.store.is_indexed("lost").unwrap());
}
