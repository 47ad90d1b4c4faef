use super::*;

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
    SegmentKey { bucket, seq }
}

#[test]
fn segments_scan_in_bucket_order_and_ids_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let generated = protocol::generated_id(1_250);
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
fn refuses_an_unknown_format() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.insert(keys::FORMAT_KEY, &[9]).unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(&StoreOptions {
        path: dir.path().to_owned(),
        cache_capacity: 1 << 20,
    })
    .err()
    .expect("format 9 must be refused");
    assert!(matches!(err, StoreError::Format { found: 9, .. }), "{err}");
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
        .db
        .insert(key(200, 2).to_bytes(), b"garbage".as_slice())
        .unwrap();

    let found = store
        .scan(SegmentKey::start_of(0), UnixMs::MAX, 100)
        .unwrap();
    let keys: Vec<_> = found.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, [key(100, 1), key(300, 3)]);
    assert!(
        store.db.get(key(200, 2).to_bytes()).unwrap().is_some(),
        "left for inspection"
    );
}
