use super::*;
use crate::record::Delivery;
use crate::store::StoreOptions;
use bytes::Bytes;

const DAY: UnixMs = 86_400_000;

fn schedule(id: &str, due: UnixMs) -> Schedule {
    Schedule {
        id: id.into(),
        due,
        subject: "t".into(),
        headers: vec![],
        payload: Bytes::from_static(b"p"),
        created: 0,
        delivery: Delivery::Core,
        recurrence: None,
    }
}

struct Harness {
    committer: Committer,
    wheel: mpsc::UnboundedReceiver<WheelCommand>,
    _acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    _commands: mpsc::Sender<StoreCommand>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(max_resident: usize, existing: &[Schedule]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap();
        let mut batch = WriteBatch::default();
        for s in existing {
            batch.put(s);
        }
        store.commit(batch).unwrap();
        let (commands_tx, commands) = mpsc::channel(16);
        let (wheel_tx, wheel) = mpsc::unbounded_channel();
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let options = CommitterOptions {
            max_batch: 16,
            // Long, so that a slow test machine never sees a near-future schedule come due.
            lookahead: Duration::from_secs(60),
            max_resident,
        };
        let resident = Arc::new(AtomicUsize::new(0));
        Harness {
            committer: Committer::new(store, options, commands, wheel_tx, acks_tx, resident),
            wheel,
            _acks: acks,
            _commands: commands_tx,
            _dir: dir,
        }
    }

    /// What the committer has told the wheel since the last call, as (insert?, due, id).
    fn told(&mut self) -> Vec<(bool, UnixMs, String)> {
        let mut out = Vec::new();
        while let Ok(command) = self.wheel.try_recv() {
            out.push(match command {
                WheelCommand::Insert(s) => (true, s.due, s.id),
                WheelCommand::Remove(k) => (false, k.due(), k.id().to_owned()),
                WheelCommand::Deleted(_) => continue,
            });
        }
        out
    }

    fn add(&mut self, schedule: Schedule) {
        let add = StoreCommand::Add {
            schedule,
            reply: None,
        };
        self.committer.apply(std::iter::once(add));
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
    let told = h.told();
    let ids: Vec<_> = told.iter().map(|(_, _, id)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["older", "overdue", "near"],
        "due order, far one left on disk"
    );
    assert_eq!(h.committer.resident.load(Ordering::Relaxed), 3);
    // The cursor now sits at the horizon: nothing more to load until time moves on.
    assert!(h.committer.cursor.due() > now + 100);
    assert!(!h.committer.load_horizon().unwrap());
    assert!(h.told().is_empty());
}

#[test]
fn never_holds_more_than_max_resident() {
    let now = time::now_ms();
    let many: Vec<_> = (0..50)
        .map(|i| schedule(&format!("s{i:02}"), now + i))
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
    assert_eq!(h.committer.store.due_of("far").unwrap(), Some(now + 50));
    assert_eq!(h.committer.store.get("far").unwrap().unwrap().due, now + 50);
    let everything = h
        .committer
        .store
        .scan(&DueKey::start_of(0), UnixMs::MAX, 10)
        .unwrap();
    assert_eq!(everything.len(), 2, "replaced copies are gone");
}

#[test]
fn a_fired_copy_never_deletes_its_replacement() {
    let now = time::now_ms();
    let mut h = Harness::new(1000, &[schedule("x", now - 10)]);
    h.committer.load_horizon().unwrap();
    // x fired at its old time while a replacement arrived; the old copy's deletion comes later.
    h.add(schedule("x", now + DAY));
    let fired = StoreCommand::Fired(vec![DueKey::new(now - 10, "x")]);
    h.committer.apply(std::iter::once(fired));
    assert_eq!(h.committer.store.due_of("x").unwrap(), Some(now + DAY));
    assert!(h.committer.store.get("x").unwrap().is_some());

    let fired = StoreCommand::Fired(vec![DueKey::new(now + DAY, "x")]);
    h.committer.apply(std::iter::once(fired));
    assert_eq!(h.committer.store.due_of("x").unwrap(), None);
    assert!(
        h.committer
            .store
            .scan(&DueKey::start_of(0), UnixMs::MAX, 10)
            .unwrap()
            .is_empty()
    );
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
    assert_eq!(h.committer.cursor, DueKey::new(now + 30_000, "late"));
    assert!(h.committer.store.get("late").unwrap().is_some());
    // Something already due still goes straight to the wheel: it leaves memory at once.
    h.add(schedule("now", now - 1));
    assert_eq!(h.told(), [(true, now - 1, "now".to_owned())]);

    // Room again: the loader resumes from the pulled-back cursor, "late" first, then keys the
    // wheel holds already and ignores; still no more than max_resident at once.
    h.committer.resident.store(0, Ordering::Relaxed);
    h.committer.load_horizon().unwrap();
    let told = h.told();
    assert_eq!(told[0], (true, now + 30_000, "late".to_owned()));
    assert_eq!(told[1], (true, now + 40_000, "s00".to_owned()));
    assert_eq!(told.len(), 20);
}
