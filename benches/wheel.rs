//! Micro-benchmarks of the hierarchical timing wheel ([`natsched::wheel::Wheel`]).
//!
//! Every benchmark works on 1,000,000 entries and reports throughput in entries per second.
//! The value stored per entry is a plain `u64`, so the numbers are the wheel's own cost (slab,
//! intrusive lists, cascades), not the cost of the value the scheduler keeps in it. Dues come
//! from a fixed-seed generator, so every run measures the same workload.
//!
//! Group `wheel`:
//!
//! * `insert_1m/1h`, `insert_1m/30d`: insert 1M entries into a fresh wheel, dues uniform over
//!   the next hour / the next 30 days. The empty wheel is created outside the timed region.
//! * `cancel_1m/1h`, `cancel_1m/30d`: remove 1M live entries by key, in random order, from a
//!   wheel filled outside the timed region.
//! * `advance_expire_1m/10s_by_1ms`: 1M entries due over 10 s (100 per ms on average), polled
//!   millisecond by millisecond until past the last due.
//! * `advance_expire_1m/1h_by_1s`: 1M entries due over 1 h, polled in 1 s jumps.
//!
//! Each benchmark asserts the number of entries inserted, removed or returned, so it cannot
//! silently measure a no-op.
//!
//! Run with `cargo bench --bench wheel` (about a minute on two cores).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use natsched::wheel::{EntryKey, Wheel};

/// Number of entries in every benchmark.
const N: usize = 1_000_000;
/// The wheel's starting clock: a realistic Unix ms instant (not aligned to any slot width).
const START: u64 = 1_796_061_600_123;

const SECOND: u64 = 1_000;
const HOUR: u64 = 3_600 * SECOND;
const DAY: u64 = 24 * HOUR;

/// SplitMix64: a tiny deterministic generator, good enough to spread dues.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `N` dues uniform over `START + 1 ..= START + span`, in random order.
fn dues(span: u64, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix(seed);
    (0..N).map(|_| START + 1 + rng.next() % span).collect()
}

/// A wheel at `START` holding one entry per due (value = its position), and the entry keys.
fn filled(dues: &[u64]) -> (Wheel<u64>, Vec<EntryKey>) {
    let mut wheel = Wheel::new(START);
    let keys = dues
        .iter()
        .enumerate()
        .map(|(i, &due)| wheel.insert(due, i as u64))
        .collect();
    (wheel, keys)
}

fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Polls `wheel` at `START + step`, `START + 2 * step`, ... until `end` is passed and returns
/// how many entries came out.
fn drain(wheel: &mut Wheel<u64>, step: u64, end: u64) -> usize {
    let mut out = Vec::with_capacity(64 * 1024);
    let mut total = 0;
    let mut now = START;
    while now < end {
        now += step;
        total += wheel.poll(black_box(now), &mut out);
        black_box(&out);
        out.clear();
    }
    total
}

fn wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(N as u64));

    let spans = [("1h", HOUR), ("30d", 30 * DAY)];

    for (name, span) in spans {
        let dues = dues(span, 1);
        group.bench_function(format!("insert_1m/{name}"), |b| {
            b.iter_batched(
                || Wheel::<u64>::new(START),
                |mut wheel| {
                    for (i, &due) in dues.iter().enumerate() {
                        black_box(wheel.insert(due, i as u64));
                    }
                    assert_eq!(wheel.len(), N);
                    // Returned, so dropping the 1M entries happens outside the timed region.
                    wheel
                },
                BatchSize::PerIteration,
            )
        });
    }

    for (name, span) in spans {
        let dues = dues(span, 2);
        group.bench_function(format!("cancel_1m/{name}"), |b| {
            b.iter_batched(
                || {
                    let (wheel, mut keys) = filled(&dues);
                    shuffle(&mut keys, 3);
                    (wheel, keys)
                },
                |(mut wheel, keys)| {
                    let mut removed = 0;
                    for key in keys {
                        if let Some(entry) = wheel.remove(key) {
                            black_box(entry);
                            removed += 1;
                        }
                    }
                    assert_eq!(removed, N);
                    assert!(wheel.is_empty());
                    wheel
                },
                BatchSize::PerIteration,
            )
        });
    }

    // Dense: 10 s of dues, 100 per ms on average, every millisecond polled.
    let dense = dues(10 * SECOND, 4);
    group.bench_function("advance_expire_1m/10s_by_1ms", |b| {
        b.iter_batched(
            || filled(&dense).0,
            |mut wheel| {
                let fired = drain(&mut wheel, 1, START + 10 * SECOND);
                assert_eq!(fired, N);
                assert!(wheel.is_empty());
                wheel
            },
            BatchSize::PerIteration,
        )
    });

    // Sparse in time: 1 h of dues (~0.28 per ms), polled in 1 s jumps.
    let hour = dues(HOUR, 5);
    group.bench_function("advance_expire_1m/1h_by_1s", |b| {
        b.iter_batched(
            || filled(&hour).0,
            |mut wheel| {
                let fired = drain(&mut wheel, SECOND, START + HOUR);
                assert_eq!(fired, N);
                assert!(wheel.is_empty());
                wheel
            },
            BatchSize::PerIteration,
        )
    });

    group.finish();
}

criterion_group!(benches, wheel);
criterion_main!(benches);
