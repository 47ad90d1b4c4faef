use super::*;
use crate::protocol;
use crate::scheduler::Withdrawal;
use crate::store::{StoreOptions, WriteBatch};
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap();
        let mut batch = WriteBatch::default();
        for (seq, s) in existing.iter().enumerate() {
            let key = SegmentKey {
                bucket: bucket_of(s.due),
                seq: seq as u64 + 1,
            };
            batch.put_segment(key, [s]);
            batch.index(&s.id, key);
        }
        batch.set_next_seq(existing.len() as u64 + 1);
        store.commit(batch).unwrap();
        let (commands_tx, commands) = mpsc::channel(16);
        let (wheel_tx, wheel) = std::sync::mpsc::channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let options = CommitterOptions {
            max_batch: 16,
            // Long, so that a slow test machine never sees a near-future schedule come due.
            lookahead: Duration::from_secs(60),
            max_resident,
        };
        let resident = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let committer = Committer::new(
            store, options, commands, wheel_tx, acks_tx, resident, metrics,
        )
        .unwrap();
        Harness {
            committer,
            wheel,
            acks,
            _commands: commands_tx,
            _dir: dir,
        }
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
                WheelCommand::Remove(k) => out.push((false, k.due, k.id)),
                WheelCommand::Deleted(_) | WheelCommand::Withdraw(..) => {}
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

    fn fire(&mut self, residents: Vec<Resident>) {
        let fired = StoreCommand::Fired(residents);
        self.committer.round(std::iter::once(fired), true);
    }

    fn stored(&self) -> Vec<(UnixMs, String)> {
        let segments = self
            .committer
            .store
            .scan(SegmentKey::start_of(0), UnixMs::MAX, 1000);
        let mut all: Vec<_> = segments
            .unwrap()
            .into_iter()
            .flat_map(|(_, s)| s)
            .map(|s| (s.due, s.id))
            .collect();
        all.sort();
        all
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
    assert!(!h.committer.load_horizon().unwrap());
    let ids: Vec<_> = h.told().into_iter().map(|(_, _, id)| id).collect();
    assert_eq!(
        ids,
        ["older", "overdue", "near"],
        "due order, far one left on disk"
    );
    assert_eq!(h.committer.resident.load(Ordering::Relaxed), 3);
    // The cursor now sits at the horizon: nothing more to load until time moves on.
    assert!(h.committer.cursor.bucket > now + 100);
    assert!(!h.committer.load_horizon().unwrap());
    assert!(h.told().is_empty());
}

#[test]
fn never_holds_more_than_max_resident() {
    let now = time::now_ms();
    let many: Vec<_> = (0..50)
        .map(|i| schedule(&format!("s{i:02}"), now + 1000 * i))
        .collect();
    let mut h = Harness::new(20, &many);
    assert!(
        h.committer.load_horizon().unwrap(),
        "a full chunk means more may wait"
    );
    assert_eq!(h.told().len(), 20);
    assert!(!h.committer.load_horizon().unwrap());
    assert!(h.told().is_empty(), "at the cap nothing more is loaded");

    // Firing 15 of them makes room for exactly 15 more, continuing in due order.
    h.committer.resident.fetch_sub(15, Ordering::Relaxed);
    h.committer.load_horizon().unwrap();
    let told = h.told();
    assert_eq!(told.len(), 15);
    assert_eq!(told[0].2, "s20");
}

#[test]
fn adds_inside_the_horizon_go_to_the_wheel_and_replaces_move_them() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.committer.load_horizon().unwrap();

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
    let id = protocol::generated_id(now + DAY);
    h.add(Schedule {
        caller_id: false,
        ..schedule(&id, now + DAY)
    });
    h.add(schedule(&id, now + 2 * DAY));
    assert_eq!(h.stored(), [(now + 2 * DAY, id.clone())]);
    assert_eq!(
        h.committer.store.get(&id).unwrap().unwrap().due,
        now + 2 * DAY
    );
}

#[test]
fn a_fired_copy_never_deletes_its_replacement() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("x", now - 10)]);
    h.committer.load_horizon().unwrap();
    let [old] = h.inserted().try_into().expect("x was loaded");
    // x fired at its old time while a replacement arrived; the old copy's deletion comes later.
    h.add(schedule("x", now + DAY));
    h.fire(vec![old]);
    assert_eq!(h.committer.store.get("x").unwrap().unwrap().due, now + DAY);
    assert_eq!(h.stored(), [(now + DAY, "x".to_owned())]);

    let segment = h.committer.store.locate("x").unwrap().unwrap();
    let new = Resident {
        segment,
        schedule: schedule("x", now + DAY),
    };
    h.fire(vec![new]);
    assert_eq!(h.committer.store.get("x").unwrap(), None);
    assert!(h.stored().is_empty());
}

#[test]
fn fired_schedules_leave_their_segment_and_it_goes_when_empty() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[]);
    h.committer.load_horizon().unwrap();
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

#[test]
fn a_full_wheel_leaves_new_near_schedules_on_disk_until_there_is_room() {
    let now = time::now_ms();
    let many: Vec<_> = (0..20)
        .map(|i| schedule(&format!("s{i:02}"), now + 40_000 + i))
        .collect();
    let mut h = Harness::new(20, &many);
    h.committer.load_horizon().unwrap();
    assert_eq!(h.told().len(), 20);

    // Inside the horizon, but memory is full: stored, not inserted; the cursor moves back.
    h.add(schedule("late", now + 30_000));
    assert!(h.told().is_empty());
    assert_eq!(h.committer.cursor.bucket, bucket_of(now + 30_000));
    assert!(h.committer.store.get("late").unwrap().is_some());
    // Something already due still goes straight to the wheel: it leaves memory at once.
    h.add(schedule("now", now - 1000));
    assert_eq!(h.told(), [(true, now - 1000, "now".to_owned())]);

    // Room again: the loader resumes from the pulled-back cursor, "late" first, then segments
    // the wheel holds already and ignores (the scan completes the bucket it stops in).
    h.committer.resident.store(0, Ordering::Relaxed);
    h.committer.load_horizon().unwrap();
    let told = h.told();
    assert_eq!(told[0], (true, now + 30_000, "late".to_owned()));
    assert_eq!(told[1], (true, now + 40_000, "s00".to_owned()));
    assert_eq!(told.len(), 21);
}

#[test]
fn a_same_due_replacement_survives_the_old_copy_firing() {
    let now = time::now_ms();
    let due = now - 10;
    let mut h = Harness::new(1000, &[schedule("x", due)]);
    h.committer.load_horizon().unwrap();
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

fn cancel_command(id: &str) -> StoreCommand {
    let reply = crate::replies::Reply {
        subject: "reply".into(),
        received: std::time::Instant::now(),
        endpoint: crate::metrics::Endpoint::Cancel,
    };
    StoreCommand::Cancel {
        id: id.into(),
        reply: Some(reply),
    }
}

#[test]
fn a_cancel_during_shutdown_is_refused_not_claimed() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("x", now - 10)]);
    h.committer.load_horizon().unwrap();
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
    h.committer.load_horizon().unwrap();
    let [held] = h.inserted().try_into().expect("a was loaded");
    // "b" points at an unreadable segment, so adding b fails the round after a's cancel.
    let broken = SegmentKey {
        bucket: bucket_of(now + 9000),
        seq: 999,
    };
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(broken, Some(b"garbage".to_vec()));
    batch.index("b", broken);
    h.committer.store.commit(batch).unwrap();
    // A stand-in timer thread that hands the copy over.
    let (wheel_tx, wheel_rx) = std::sync::mpsc::channel();
    h.committer.wheel = wheel_tx;
    let timer = std::thread::spawn(move || {
        let mut inserted_back = Vec::new();
        while let Ok(command) = wheel_rx.recv() {
            match command {
                WheelCommand::Withdraw(_, answer) => {
                    let _ = answer.send(Withdrawal::Withdrawn(Box::new(held.clone())));
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
    h.committer
        .round([cancel_command("a"), add_b].into_iter(), false);
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
    h.committer.load_horizon().unwrap();
    let fired = h.inserted();
    // "b" points at an unreadable segment: adding it fails the round that flushes a's removal.
    let broken = SegmentKey {
        bucket: bucket_of(now + 9000),
        seq: 999,
    };
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(broken, Some(b"garbage".to_vec()));
    batch.index("b", broken);
    h.committer.store.commit(batch).unwrap();

    let add_b = StoreCommand::Add {
        schedule: schedule("b", now + 9000),
        reply: None,
    };
    h.committer
        .round([StoreCommand::Fired(fired), add_b].into_iter(), true);
    assert!(
        h.committer.store.get("a").unwrap().is_some(),
        "the round failed"
    );
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
