use super::*;
use crate::recurrence::Series;

fn schedule(id: &str, due: UnixMs, caller_id: bool) -> Schedule {
    crate::record::test_schedule(id, due, caller_id)
}

fn open(dir: &Path) -> Store {
    Store::open(&StoreOptions {
        path: dir.to_owned(),
        cache_capacity: 1 << 20,
    })
    .unwrap()
}

fn key(bucket: UnixMs, seq: u64) -> SegmentKey {
    SegmentKey::fine(bucket, seq)
}

#[test]
fn segments_scan_in_bucket_order_and_ids_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let generated = protocol::far_id(1_250, 3, 1).unwrap();
    let mut batch = WriteBatch::default();
    batch.put_segment(
        key(1_200, 3),
        &[
            schedule("late", 1_250, true),
            schedule(&generated, 1_250, false),
        ],
    );
    batch.index("late", key(1_200, 3));
    batch.put_segment(key(1_000, 4), &[schedule("early", 1_010, true)]);
    batch.index("early", key(1_000, 4));
    batch.put_segment(key(1_000, 2), &[schedule("first", 1_090, true)]);
    batch.index("first", key(1_000, 2));
    batch.set_next_seq(5);
    store.commit(batch).unwrap();
    assert_eq!(store.next_seq().unwrap(), 5);

    let all = store
        .scan(SegmentKey::start_of(0), UnixMs::MAX, 100)
        .unwrap();
    let keys: Vec<_> = all.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, [key(1_000, 2), key(1_000, 4), key(1_200, 3)]);
    assert_eq!(all[2].1.len(), 2);
    assert!(
        all[2].1[0].caller_id && !all[2].1[1].caller_id,
        "flags survive"
    );

    // Bucket bound is exclusive; the schedule limit stops after a whole bucket.
    let scan = |from, before, max| store.scan(from, before, max).unwrap().len();
    assert_eq!(scan(SegmentKey::start_of(0), 1_200, 100), 2);
    assert_eq!(scan(SegmentKey::start_of(0), UnixMs::MAX, 1), 2);
    assert_eq!(scan(key(1_000, 4), UnixMs::MAX, 1), 1);
    assert_eq!(
        store.scan(key(1_000, 3), UnixMs::MAX, 100).unwrap().len(),
        2
    );

    assert_eq!(store.locate("early").unwrap(), Some(key(1_000, 4)));
    assert_eq!(
        store.locate(&generated).unwrap(),
        Some(key(1_200, 3)),
        "found without an index"
    );
    assert_eq!(store.get(&generated).unwrap().unwrap().due, 1_250);
    assert_eq!(store.locate(&protocol::generated_id(1_260)).unwrap(), None);
    assert_eq!(
        store
            .locate(&protocol::far_id(1_250, 4, 1).unwrap())
            .unwrap(),
        None
    );
    assert_eq!(store.locate("nope").unwrap(), None);

    // Rewriting a segment without a schedule, and removing an emptied one.
    let mut batch = WriteBatch::default();
    batch.put_segment(key(1_200, 3), &[schedule(&generated, 1_250, false)]);
    batch.unindex("late");
    batch.put_segment(key(1_000, 4), &[]);
    batch.unindex("early");
    store.commit(batch).unwrap();
    assert_eq!(store.get("late").unwrap(), None);
    assert_eq!(store.get("early").unwrap(), None);
    assert_eq!(
        store
            .scan(SegmentKey::start_of(0), UnixMs::MAX, 100)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn survives_reopen_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let mut batch = WriteBatch::default();
        batch.put_segment(key(0, 1), &[schedule("x", 5, true)]);
        batch.index("x", key(0, 1));
        store.commit(batch).unwrap();
        store.flush().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.get("x").unwrap(), Some(schedule("x", 5, true)));
}

#[test]
fn refuses_other_formats() {
    for format in [1, 9] {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(keys::FORMAT_KEY, &[format]).unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .err()
        .expect("must be refused");
        assert!(
            matches!(err, StoreError::Format { found, .. } if found == format),
            "{err}"
        );
    }
}

#[test]
fn an_unreadable_segment_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut batch = WriteBatch::default();
    batch.put_segment(key(100, 1), &[schedule("a", 150, true)]);
    batch.put_segment(key(300, 3), &[schedule("c", 350, true)]);
    store.commit(batch).unwrap();
    store
        .db()
        .unwrap()
        .insert(key(200, 2).to_bytes(), b"garbage".as_slice())
        .unwrap();

    let found = store
        .scan(SegmentKey::start_of(0), UnixMs::MAX, 100)
        .unwrap();
    let keys: Vec<_> = found.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, [key(100, 1), key(300, 3)]);
    assert_eq!(
        store.db().unwrap().get(key(200, 2).to_bytes()).unwrap(),
        None
    );
    assert_eq!(
        store
            .db()
            .unwrap()
            .get(keys::quarantine_key(key(200, 2)))
            .unwrap()
            .unwrap(),
        b"garbage".as_slice(),
        "kept for inspection"
    );
    assert_eq!(store.damaged_total(), 1);
}

#[test]
fn a_damaged_segment_keeps_its_readable_schedules_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let schedules = [
        schedule(&protocol::far_id(150, 7, 0).unwrap(), 150, false),
        schedule("mid", 160, true),
        schedule("last", 170, true),
    ];
    let mut raw = segment::encode(&schedules);
    // Damage the middle record's value only: its subject's bytes stop being UTF-8.
    let entries = segment::entries(&raw).unwrap();
    let subject_at = |n: usize| {
        let value = entries[n].subject().unwrap().unwrap().as_ptr() as usize;
        value - raw.as_ptr() as usize
    };
    let at = subject_at(1);
    drop(entries);
    raw[at] = 0xff;
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(key(100, 7), Some(raw.clone()));
    batch.index("mid", key(100, 7));
    batch.index("last", key(100, 7));
    batch.set_pending(3);
    store.commit(batch).unwrap();

    // Readers see what is readable; the writer's scan keeps it in place and the rest aside.
    assert_eq!(store.get("last").unwrap().unwrap().due, 170);
    assert!(
        matches!(store.get("mid"), Err(StoreError::Corrupt { key: k, .. }) if k == key(100, 7))
    );
    let found = store
        .scan(SegmentKey::start_of(0), UnixMs::MAX, 100)
        .unwrap();
    let ids: Vec<&str> = found[0].1.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [schedules[0].id.as_str(), "last"]);
    assert_eq!(store.take_lost(), 1);
    assert_eq!(store.pending().unwrap(), 2);
    assert_eq!(
        store
            .db()
            .unwrap()
            .get(keys::quarantine_key(key(100, 7)))
            .unwrap()
            .unwrap(),
        raw.as_slice()
    );
    assert_eq!(
        store.locate(&schedules[0].id).unwrap(),
        Some(key(100, 7)),
        "ids still find them"
    );
    assert_eq!(
        store.segment(key(100, 7)).unwrap().len(),
        2,
        "no longer damaged"
    );
    assert_eq!(store.damaged_total(), 1, "reported once");
}

#[test]
fn damaged_metadata_is_an_error_not_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .db()
        .unwrap()
        .insert(keys::NEXT_SEQ_KEY, b"\x01".as_slice())
        .unwrap();
    assert!(matches!(
        store.next_seq(),
        Err(StoreError::CorruptMeta { .. })
    ));
}

#[test]
fn windows_merge_far_buckets_with_the_fine_buckets_they_span() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let far_id = protocol::far_id(60_010, 5, 0).unwrap();
    let mut batch = WriteBatch::default();
    batch.put_segment(key(59_900, 1), &[schedule("before", 59_950, true)]);
    batch.put_segment(key(60_000, 2), &[schedule("fine-a", 60_000, true)]);
    batch.put_segment(key(119_900, 3), &[schedule("fine-b", 119_999, true)]);
    batch.put_segment(key(120_000, 4), &[schedule("after", 120_000, true)]);
    batch.put_segment(
        SegmentKey::far(60_000, 5),
        &[
            schedule(&far_id, 60_010, false),
            schedule("far-b", 90_000, true),
        ],
    );
    batch.put_segment(
        SegmentKey::far(180_000, 6),
        &[schedule("far-c", 200_000, true)],
    );
    store.commit(batch).unwrap();

    let windows: Vec<(UnixMs, UnixMs, Vec<String>)> = store
        .windows_from(0)
        .map(|w| {
            let w = w.unwrap();
            let mut ids: Vec<String> = w
                .segments
                .iter()
                .flat_map(|(_, raw)| segment::decode(raw.as_ref(), &segment::NoBodies).unwrap())
                .map(|s| s.id)
                .collect();
            ids.sort();
            (w.start, w.end, ids)
        })
        .collect();
    let ids = |list: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        windows,
        [
            (59_900, 60_000, ids(&["before"])),
            (
                60_000,
                120_000,
                ids(&[&far_id, "far-b", "fine-a", "fine-b"])
            ),
            (120_000, 120_100, ids(&["after"])),
            (180_000, 240_000, ids(&["far-c"])),
        ]
    );
    // Starting inside a far window starts with that whole window.
    let first = store.windows_from(90_000).next().unwrap().unwrap();
    assert_eq!((first.start, first.end), (60_000, 120_000));

    // A far id is found through the segment it names.
    assert_eq!(
        store.locate(&far_id).unwrap(),
        Some(SegmentKey::far(60_000, 5))
    );
    assert_eq!(store.get(&far_id).unwrap().unwrap().due, 60_010);
    // Naming a segment that does not hold it (e.g. moved to a fine one): not found there.
    let moved = protocol::far_id(60_010, 6, 0).unwrap();
    assert_eq!(store.locate(&moved).unwrap(), None);
}

#[test]
fn an_id_natsched_did_not_make_is_unknown_without_reading_its_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // A bucket holding a readable and an unreadable segment: reading the bucket would fail.
    let mut batch = WriteBatch::default();
    let ours = protocol::far_id(1_250, 3, 0).unwrap();
    batch.put_segment(key(1_200, 3), &[schedule(&ours, 1_250, false)]);
    batch.put_raw_segment(key(1_200, 4), Some(vec![2, 0, 0, 0, 9]));
    batch.set_next_seq(5);
    store.commit(batch).unwrap();
    // A ULID due in that bucket that natsched never made (any random one): one index lookup,
    // no bucket read, so the corrupt segment is never touched.
    assert_eq!(store.locate(&protocol::generated_id(1_250)).unwrap(), None);
    assert_eq!(store.locate(&ours).unwrap(), Some(key(1_200, 3)));
    // A made-up id in our layout names one segment: only that one is read.
    let made_up = protocol::far_id(1_250, 4, 0).unwrap();
    assert_eq!(store.locate(&made_up).unwrap(), None);
}

#[test]
fn format_2_stores_are_upgraded_and_their_random_ids_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = protocol::generated_id(1_250);
    let caller_shaped = protocol::far_id(9_999, 77, 0).unwrap();
    {
        // A format 2 store: random generated ids, and a caller id of the new form.
        let store = open(dir.path());
        let mut batch = WriteBatch::default();
        batch.put_segment(key(1_200, 3), &[schedule(&legacy, 1_250, false)]);
        batch.put_new_segment(key(9_900, 4), &[schedule(&caller_shaped, 9_999, true)]);
        batch.set_next_seq(5);
        store.commit(batch).unwrap();
        store.db().unwrap().insert(keys::FORMAT_KEY, &[2]).unwrap();
        store.db().unwrap().remove(keys::LEGACY_IDS_KEY).unwrap();
        store.flush().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store
            .db()
            .unwrap()
            .get(keys::FORMAT_KEY)
            .unwrap()
            .unwrap()
            .as_ref(),
        [STORE_FORMAT]
    );
    assert_eq!(store.legacy_ids_until, 10_000, "the end of the last bucket");
    assert_eq!(store.locate(&legacy).unwrap(), Some(key(1_200, 3)));
    assert_eq!(store.locate(&caller_shaped).unwrap(), Some(key(9_900, 4)));
    assert_eq!(store.next_seq().unwrap(), 78, "seq 77 is never handed out");
    // Ids due after the last legacy bucket are never searched for.
    assert_eq!(store.locate(&protocol::generated_id(10_050)).unwrap(), None);
}

#[test]
fn format_3_stores_are_marked_5_and_others_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store.db().unwrap().insert(keys::FORMAT_KEY, &[3]).unwrap();
        store.flush().unwrap();
    }
    let format = |store: &Store| store.db().unwrap().get(keys::FORMAT_KEY).unwrap().unwrap();
    {
        let store = open(dir.path());
        assert_eq!(format(&store).as_ref(), [STORE_FORMAT]);
        store.db().unwrap().insert(keys::FORMAT_KEY, &[4]).unwrap();
        store.flush().unwrap();
    }
    let refused = Store::open(&StoreOptions {
        path: dir.path().to_owned(),
        cache_capacity: 1 << 20,
    });
    assert!(matches!(refused, Err(StoreError::Format { found: 4, .. })));
}

/// A series every `every` ms at its occurrence `seq`, due at `due`.
fn series(id: &str, due: UnixMs, every: UnixMs, seq: u64) -> Schedule {
    Schedule {
        recurrence: Some(Box::new(Series::every(every, seq))),
        ..schedule(id, due, true)
    }
}

/// Moves the series `id` from `from` to a new segment of its due, as the store writer does
/// when it fires: without touching the index.
fn move_series(store: &Store, id: &str, from: SegmentKey, to: Schedule, seq: u64) -> SegmentKey {
    let to_key = key(bucket_of(to.due), seq);
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(from, None);
    batch.put_new_segment_indexing(to_key, &[to], |s| s.id != id);
    store.commit(batch).unwrap();
    to_key
}

#[test]
fn a_series_is_found_after_it_moved_on_without_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = time::now_ms();
    // Scheduled an hour ago, every 10 s: indexed where it began.
    let start = now - 3_600_000;
    let first = key(bucket_of(start), 1);
    let mut batch = WriteBatch::default();
    batch.put_new_segment(first, &[series("s", start, 10_000, 1)]);
    batch.put_new_segment(key(bucket_of(start), 2), &[schedule("plain", start, true)]);
    store.commit(batch).unwrap();
    assert_eq!(store.locate("s").unwrap(), Some(first));

    // Fired on time ever since: now at its first occurrence after now.
    let next = start + (3_600_000 / 10_000 + 1) * 10_000;
    let moved = move_series(&store, "s", first, series("s", next, 10_000, 362), 3);
    assert_eq!(store.locate("s").unwrap(), Some(moved));
    assert_eq!(store.get("s").unwrap().unwrap().due, next);
    assert_eq!(store.locate_indexed("s").unwrap(), Some(moved));

    // Overdue (firing, or NATS was away): somewhere between where it began and now.
    let overdue = start + 1_800_000;
    let stuck = move_series(&store, "s", moved, series("s", overdue, 10_000, 181), 4);
    assert_eq!(store.locate("s").unwrap(), Some(stuck));

    // Gone (ended, or cancelled without unindexing yet): not found anywhere, and the
    // one-shot schedules' entries are as they were.
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(stuck, None);
    store.commit(batch).unwrap();
    assert_eq!(store.locate("s").unwrap(), None);
    assert_eq!(store.get("s").unwrap(), None);
    assert_eq!(
        store.locate("plain").unwrap(),
        Some(key(bucket_of(start), 2))
    );
}

/// A store of format 5 indexed a series without its body (key · due · stored series) and kept
/// its whole record in every segment: it is still found and read, and stays whole.
#[test]
fn a_series_indexed_by_store_format_5_is_still_found_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = time::now_ms();
    let start = now - 60_000;
    let first = key(bucket_of(start), 1);
    let old = series("old", start, 1_000, 1);
    let mut value = first.to_bytes().to_vec();
    value.extend_from_slice(&start.to_be_bytes());
    old.recurrence.as_deref().unwrap().encode_into(&mut value);
    let mut batch = WriteBatch::default();
    batch.put_segment(first, [&old]);
    batch.insert(keys::id_key("old"), value);
    store.commit(batch).unwrap();
    assert_eq!(
        store.series_body("old").unwrap(),
        None,
        "no body in its entry"
    );
    assert_eq!(store.get("old").unwrap(), Some(old.clone()));
    // Moved on as the writer moves it (whole: it has no body to be thin with).
    let next = start + 61_000;
    let moved = move_series(&store, "old", first, series("old", next, 1_000, 62), 2);
    assert_eq!(store.locate("old").unwrap(), Some(moved));
    let read = store.get("old").unwrap().unwrap();
    assert_eq!((read.due, read.recurrence.unwrap().seq), (next, 62));
}

/// A reader that read a thin record before the writer replaced its series (same id, new
/// body) does not join the old record to the new body.
#[test]
fn a_thin_record_read_before_its_series_was_replaced_gets_no_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = time::now_ms();
    let mut thin = series("s", now + 1_000, 1_000, 1);
    thin.recurrence.as_deref_mut().unwrap().body_indexed = true;
    let first = key(bucket_of(thin.due), 1);
    let mut batch = WriteBatch::default();
    batch.put_new_segment(first, std::slice::from_ref(&thin));
    store.commit(batch).unwrap();
    // Fired and moved on to a later segment, its index untouched.
    let next = Schedule {
        due: now + 2_000,
        ..thin.clone()
    };
    let moved = move_series(&store, "s", first, next, 2);
    assert!(store.series_body_for("s", moved).unwrap().is_some());
    assert_eq!(store.get("s").unwrap().unwrap().due, now + 2_000);
    // Replaced: the new series is indexed at a newer segment, with another subject.
    let replacement = Schedule {
        subject: "other.subject".into(),
        ..thin.clone()
    };
    let mut batch = WriteBatch::default();
    batch.put_raw_segment(moved, None);
    batch.put_new_segment(key(bucket_of(thin.due), 3), &[replacement]);
    store.commit(batch).unwrap();
    assert_eq!(
        store.series_body_for("s", moved).unwrap(),
        None,
        "the record read from the older segment is not the replacement's"
    );
    assert_eq!(store.get("s").unwrap().unwrap().subject, "other.subject");
}

#[test]
fn a_cron_series_is_found_at_its_next_match() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = time::now_ms();
    let rule = crate::recurrence::Rule::cron("*/2 * * * * *", Some("Asia/Kolkata")).unwrap();
    let started = Schedule {
        recurrence: Some(Box::new(Series::new(rule.clone(), None, None, 1))),
        ..schedule("c", now - 60_000 - now % 2_000, true)
    };
    let first = key(bucket_of(started.due), 1);
    let mut batch = WriteBatch::default();
    batch.put_new_segment(first, std::slice::from_ref(&started));
    store.commit(batch).unwrap();
    let next = rule.after(now).unwrap();
    let moved = Schedule {
        due: next,
        ..started
    };
    let at = move_series(&store, "c", first, moved, 2);
    assert_eq!(store.locate("c").unwrap(), Some(at));
}

#[test]
fn a_series_is_found_when_the_wall_clock_is_behind_the_writer_s() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = time::now_ms();
    let start = now - 60_000;
    let first = key(bucket_of(start), 1);
    let mut batch = WriteBatch::default();
    batch.put_new_segment(first, &[series("s", start, 1_000, 1)]);
    store.commit(batch).unwrap();
    // The writer's clock was 30 s ahead when it moved the series on (then stepped back).
    let ahead = now + 30_000;
    let next = start + ((ahead - start) / 1_000 + 1) * 1_000;
    let moved = move_series(&store, "s", first, series("s", next, 1_000, 92), 2);
    assert_eq!(
        store.locate("s").unwrap(),
        None,
        "30 intervals ahead of this clock"
    );
    let mut batch = WriteBatch::default();
    batch.set_clock_mark(ahead);
    store.commit(batch).unwrap();
    assert_eq!(store.locate("s").unwrap(), Some(moved));
}

/// The sled patch's threadpool hunk: a task handed to sled's threadpool wakes one waiting
/// thread, not all of them. Writers flushing at once from several threads (each flush hands
/// the log buffers it seals to the threadpool, and waits for them to be written) all finish:
/// no write waits for a wake-up that went to another thread.
#[test]
fn sled_runs_every_task_while_waking_one_thread_per_task() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let (finished, done) = std::sync::mpsc::channel();
    for writer in 0..8u64 {
        let (db, finished) = (db.clone(), finished.clone());
        std::thread::spawn(move || {
            for i in 0..100u64 {
                let key = (writer << 32 | i).to_be_bytes();
                db.insert(key, vec![7u8; 100]).unwrap();
                db.flush().unwrap();
            }
            finished.send(writer).unwrap();
        });
    }
    for _ in 0..8 {
        done.recv_timeout(Duration::from_secs(120))
            .expect("a flush waited for ever on a log write handed to sled's threadpool");
    }
    assert_eq!(db.len(), 800);
}

/// The sled patch (`packaging/patches/sled`): a page stored as one blob (a leaf over a
/// quarter of sled's segment size) that is consolidated again or freed gives its blob file
/// back. Unpatched sled 0.34.7 kept every such file until the next restart, so a store
/// whose segments come and go grew without end.
#[test]
fn sled_gives_back_the_blobs_of_replaced_pages() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let blobs = || std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
    let value = vec![7u8; 40 * 1024];
    let mut most = 0;
    for round in 0..80u64 {
        // Leaves of up to 16 keys of 40 KiB: over the 128 KiB blob threshold.
        for i in 0..48u64 {
            db.insert((round * 1000 + i).to_be_bytes(), value.as_slice())
                .unwrap();
        }
        db.flush().unwrap();
        for i in 0..48u64 {
            db.remove((round * 1000 + i).to_be_bytes()).unwrap();
        }
        db.flush().unwrap();
        most = most.max(blobs());
    }
    let left = blobs();
    assert!(
        left <= 20,
        "{left} blob files left after 80 rounds (at most {most} at once)"
    );
}

/// [`Store::open_to_read`], retried while the lock of a store just dropped in this process
/// is still held by sled's background threads.
fn open_to_read(dir: &Path) -> Result<Store, StoreError> {
    let options = StoreOptions {
        path: dir.to_owned(),
        cache_capacity: 1 << 20,
    };
    let started = Instant::now();
    loop {
        match Store::open_to_read(&options) {
            Err(StoreError::Locked { .. }) if started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            result => return result,
        }
    }
}

#[test]
fn opening_to_read_creates_nothing_and_refuses_what_is_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent");
    let refused = open_to_read(&absent).err().expect("no store");
    assert!(matches!(refused, StoreError::Missing { .. }), "{refused}");
    assert!(!absent.exists(), "nothing is created");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let refused = open_to_read(&empty).err().expect("no store");
    assert!(matches!(refused, StoreError::Missing { .. }), "{refused}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "still empty");

    // A sled database natsched never opened.
    let foreign = dir.path().join("foreign");
    {
        let db = sled::open(&foreign).unwrap();
        db.insert(b"x", b"y").unwrap();
        db.flush().unwrap();
    }
    let refused = open_to_read(&foreign).err().expect("not natsched's");
    assert!(matches!(refused, StoreError::Missing { .. }), "{refused}");

    // A format this build does not read.
    let later = dir.path().join("later");
    {
        let store = open(&later);
        store.db().unwrap().insert(keys::FORMAT_KEY, &[9]).unwrap();
        store.flush().unwrap();
    }
    let refused = open_to_read(&later).err().expect("a later format");
    assert!(
        matches!(refused, StoreError::Format { found: 9, .. }),
        "{refused}"
    );
}

#[test]
fn opening_to_read_writes_nothing_and_refuses_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    {
        // A format 5 store (read as it is), without a watermark or an instance id yet.
        let store = open(dir.path());
        let mut batch = WriteBatch::default();
        batch.put_new_segment(key(1_000, 1), &[schedule("x", 1_050, true)]);
        batch.set_next_seq(2);
        store.commit(batch).unwrap();
        store.db().unwrap().insert(keys::FORMAT_KEY, &[5]).unwrap();
        store.flush().unwrap();
    }
    std::fs::remove_file(dir.path().join(watermark::FILE)).unwrap();
    let before = open_to_read(dir.path()).unwrap().entries();
    let store = open_to_read(dir.path()).unwrap();
    assert_eq!(store.get("x").unwrap(), Some(schedule("x", 1_050, true)));
    // While it is open, natsched cannot open it, nor can another reader.
    let in_use = Store::open_to_read(&StoreOptions {
        path: dir.path().to_owned(),
        cache_capacity: 1 << 20,
    });
    assert!(matches!(in_use, Err(StoreError::Locked { .. })));
    drop(store);
    let after = open_to_read(dir.path()).unwrap().entries();
    assert_eq!(after, before, "nothing written");
    assert!(
        after
            .iter()
            .any(|(k, v)| k == keys::FORMAT_KEY && v == &[5])
    );
    assert!(!after.iter().any(|(k, _)| k == keys::INSTANCE_KEY));
    assert!(!dir.path().join(watermark::FILE).exists(), "no watermark");
}
