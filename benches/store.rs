//! Micro-benchmarks of the durable store ([`natsched::store`]) and of the sled layout it avoids.
//!
//! All stores live in fresh temporary directories (`tempfile`, on the default temp dir, so
//! `flush` is a real fsync on whatever disk that is) with a 64 MiB sled cache. Schedules look
//! like what intake produces for a generated-id request: a ULID id carrying the due instant
//! (not indexed), subject `bench.t`, no headers, a 64-byte payload. Their dues advance like a
//! steady intake of 40,000 requests/s with a fixed 60 s delay (one ms of due every 40
//! schedules), so a round of 4096 spans two or three 100 ms buckets.
//!
//! Group `store`:
//!
//! * `segment_insert_flush/256`, `segment_insert_flush/4096`: the group-commit path. One round
//!   of that many schedules is staged as segments (one per bucket, at most 250 schedules, i.e.
//!   at most 32 KiB, each, with increasing seq), committed and flushed (fsync). The schedules
//!   are generated outside the timed region; segment encoding, commit and fsync are timed. The
//!   store keeps growing across iterations, as it does under load.
//! * `range_pop`: a store pre-filled (outside the timed region, fresh per iteration) with
//!   200,000 schedules in segments is emptied the way due schedules leave it: `scan` from a
//!   cursor in chunks of 16,384 schedules, every returned segment deleted in one commit (no
//!   flush), until the scan comes back empty.
//! * `sled_key_per_schedule_flush/4096`: the baseline the segment layout replaces. Raw sled, one
//!   key per schedule (`d` · due BE · id → 130-byte value) plus one index key (`i` · id → due,
//!   8 bytes), 4096 schedules per `sled::Batch`, `apply_batch` + `flush` per round.
//!
//! Each benchmark asserts how many schedules it wrote or popped, and the write benchmarks
//! count what ended up on disk afterwards, so none can silently measure a no-op.
//!
//! Run with `cargo bench --bench store` (a couple of minutes on two cores).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use natsched::protocol::generated_id;
use natsched::record::{Delivery, Schedule};
use natsched::store::{SegmentKey, Store, StoreOptions, WriteBatch, bucket_of};
use tempfile::TempDir;

type Group<'a> = BenchmarkGroup<'a, WallTime>;

const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
/// At most this many schedules per segment: 250 of these schedules encode to just under
/// 32 KiB, the production segment limit.
const SEGMENT_SCHEDULES: usize = 250;
/// Accepted-at clock of the first generated schedule (Unix ms).
const START: u64 = 1_796_061_600_000;
/// Delay between acceptance and due.
const DELAY_MS: u64 = 60_000;
/// Schedules accepted per millisecond of the simulated intake (40,000/s).
const PER_MS: u64 = 40;
/// Round size of the per-key baseline.
const SLED_ROUND: usize = 4096;
/// Schedules pre-filled for `range_pop`.
const POP_TOTAL: usize = 200_000;
/// Scan chunk of `range_pop`.
const POP_CHUNK: usize = 16_384;
/// Round size used to pre-fill `range_pop`.
const PREFILL_ROUND: usize = 4096;

/// Generates schedules in acceptance order, with dues advancing like a steady intake.
struct Intake {
    accepted: u64,
    payload: Bytes,
}

impl Intake {
    fn new() -> Intake {
        Intake {
            accepted: 0,
            payload: Bytes::from(vec![0x5a; 64]),
        }
    }

    fn round(&mut self, n: usize) -> Vec<Schedule> {
        (0..n)
            .map(|_| {
                let created = START + self.accepted / PER_MS;
                self.accepted += 1;
                let due = created + DELAY_MS;
                Schedule {
                    id: generated_id(due),
                    due,
                    subject: "bench.t".to_owned(),
                    headers: Vec::new(),
                    payload: self.payload.clone(),
                    created,
                    delivery: Delivery::Core,
                    recurrence: None,
                    caller_id: false,
                }
            })
            .collect()
    }
}

fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("create temp dir")
}

fn open_store(dir: &TempDir) -> Store {
    Store::open(&StoreOptions {
        path: dir.path().join("store"),
        cache_capacity: CACHE_CAPACITY,
    })
    .expect("open store")
}

/// Stages `schedules` (in due order) as new segments the way a commit round does: one segment
/// per bucket, split every `SEGMENT_SCHEDULES`, each with the next seq. Returns how many
/// schedules were staged.
fn stage_round(batch: &mut WriteBatch, schedules: &[Schedule], next_seq: &mut u64) -> usize {
    let mut staged = 0;
    for bucket in schedules.chunk_by(|a, b| bucket_of(a.due) == bucket_of(b.due)) {
        for segment in bucket.chunks(SEGMENT_SCHEDULES) {
            let key = SegmentKey::fine(bucket_of(segment[0].due), *next_seq);
            *next_seq += 1;
            batch.put_segment(key, segment);
            staged += segment.len();
        }
    }
    batch.set_next_seq(*next_seq);
    staged
}

/// Counts every stored schedule by scanning the whole segment key space.
fn count_stored(store: &Store) -> usize {
    let mut cursor = SegmentKey::start_of(0);
    let mut total = 0;
    loop {
        let segments = store.scan(cursor, u64::MAX, POP_CHUNK).expect("scan");
        let Some(&(last, _)) = segments.last() else {
            return total;
        };
        total += segments.iter().map(|(_, s)| s.len()).sum::<usize>();
        cursor = last.successor();
    }
}

fn segment_insert_flush(group: &mut Group<'_>) {
    for round in [256usize, 4096] {
        let dir = temp_dir();
        let store = open_store(&dir);
        let mut intake = Intake::new();
        let mut next_seq = store.next_seq().expect("next seq");
        let mut written = 0usize;
        group.throughput(Throughput::Elements(round as u64));
        group.bench_function(BenchmarkId::new("segment_insert_flush", round), |b| {
            b.iter_batched(
                || intake.round(round),
                |schedules| {
                    let mut batch = WriteBatch::default();
                    let staged = stage_round(&mut batch, &schedules, &mut next_seq);
                    assert_eq!(staged, round);
                    store.commit(batch).expect("commit");
                    store.flush().expect("flush");
                    written += staged;
                    schedules
                },
                BatchSize::PerIteration,
            )
        });
        assert_eq!(
            count_stored(&store),
            written,
            "every committed round is stored"
        );
    }
}

/// A fresh store holding `POP_TOTAL` schedules, written in rounds like intake writes them.
fn prefilled() -> (Store, TempDir) {
    let dir = temp_dir();
    let store = open_store(&dir);
    let mut intake = Intake::new();
    let mut next_seq = store.next_seq().expect("next seq");
    let mut left = POP_TOTAL;
    while left > 0 {
        let n = left.min(PREFILL_ROUND);
        let mut batch = WriteBatch::default();
        assert_eq!(stage_round(&mut batch, &intake.round(n), &mut next_seq), n);
        store.commit(batch).expect("commit");
        left -= n;
    }
    store.flush().expect("flush");
    (store, dir)
}

fn range_pop(group: &mut Group<'_>) {
    group.throughput(Throughput::Elements(POP_TOTAL as u64));

    group.bench_function("range_pop", |b| {
        b.iter_batched(
            prefilled,
            |(store, dir)| {
                let mut cursor = SegmentKey::start_of(0);
                let mut popped = 0;
                loop {
                    let segments = store.scan(cursor, u64::MAX, POP_CHUNK).expect("scan");
                    let Some(&(last, _)) = segments.last() else {
                        break;
                    };
                    let mut batch = WriteBatch::default();
                    for (key, schedules) in &segments {
                        popped += schedules.len();
                        batch.put_segment(*key, &[]);
                    }
                    black_box(&segments);
                    store.commit(batch).expect("commit");
                    cursor = last.successor();
                }
                assert_eq!(popped, POP_TOTAL);
                // Returned, so closing and removing the store happen outside the timed region.
                (store, dir)
            },
            BatchSize::PerIteration,
        )
    });
}

/// The layout the store avoids, measured to cap durable intake near 50,000 schedules/s: one
/// sled key per schedule (`d` · due BE · id → 130-byte value) plus one index key per schedule
/// (`i` · id → due BE, 8 bytes). sled 0.34 copies a leaf node for every key it inserts, so the
/// cost grows with the number of keys, not bytes.
fn sled_key_per_schedule_flush(group: &mut Group<'_>) {
    group.throughput(Throughput::Elements(SLED_ROUND as u64));

    let dir = temp_dir();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .cache_capacity(CACHE_CAPACITY)
        .open()
        .expect("open sled");
    let mut intake = Intake::new();
    let mut written = 0usize;
    group.bench_function(
        BenchmarkId::new("sled_key_per_schedule_flush", SLED_ROUND),
        |b| {
            b.iter_batched(
                || intake.round(SLED_ROUND),
                |schedules| {
                    let mut batch = sled::Batch::default();
                    for schedule in &schedules {
                        let mut key = Vec::with_capacity(9 + schedule.id.len());
                        key.push(b'd');
                        key.extend_from_slice(&schedule.due.to_be_bytes());
                        key.extend_from_slice(schedule.id.as_bytes());
                        let mut value = schedule.encode_value(schedule.created);
                        value.resize(130, 0);
                        batch.insert(key, value);

                        let mut index = Vec::with_capacity(1 + schedule.id.len());
                        index.push(b'i');
                        index.extend_from_slice(schedule.id.as_bytes());
                        batch.insert(index, &schedule.due.to_be_bytes());
                    }
                    db.apply_batch(batch).expect("apply batch");
                    db.flush().expect("flush");
                    written += schedules.len();
                    schedules
                },
                BatchSize::PerIteration,
            )
        },
    );
    assert_eq!(
        db.scan_prefix(b"d").count(),
        written,
        "one key per schedule"
    );
    assert_eq!(
        db.scan_prefix(b"i").count(),
        written,
        "one index key per schedule"
    );
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sampling_mode(SamplingMode::Flat);
    segment_insert_flush(&mut group);
    range_pop(&mut group);
    sled_key_per_schedule_flush(&mut group);
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
