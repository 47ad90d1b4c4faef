use super::*;
use level::LEVEL_MULT;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

const START: u64 = 1_700_000_000_123;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

impl<T> Wheel<T> {
    /// Walks every list and checks links, placement, `len` and the free list.
    fn check_invariants(&self) {
        let mut seen = 0;
        let mut walk = |list: List, home: Home, check: &dyn Fn(u64)| {
            let (mut prev, mut idx) = (NIL, list.head);
            while idx != NIL {
                let node = &self.nodes[idx];
                assert_eq!(node.home, home);
                assert_eq!(node.prev, prev, "broken back link");
                assert!(node.value.is_some());
                check(node.due);
                seen += 1;
                (prev, idx) = (idx, node.next);
            }
            assert_eq!(list.tail, prev, "tail out of sync");
        };
        walk(self.ready, Home::Ready, &|due| assert!(due <= self.elapsed));
        let earliest = self.next_slot().map(|(_, _, deadline)| deadline);
        for (l, level) in self.levels.iter().enumerate() {
            for s in 0..LEVEL_MULT {
                let home = Home::Slot {
                    level: l as u8,
                    slot: s as u8,
                };
                walk(level.slot(s), home, &|due| {
                    assert!(due > self.elapsed);
                    assert_eq!(level_for(self.elapsed, due), l);
                    assert_eq!(slot_for(due, l), s);
                    assert!(earliest.is_some_and(|e| e <= due));
                });
            }
        }
        assert_eq!(seen, self.len);
        let (mut free, mut idx) = (0, self.free);
        while idx != NIL {
            assert_eq!(self.nodes[idx].home, Home::Free);
            assert!(self.nodes[idx].value.is_none());
            free += 1;
            idx = self.nodes[idx].next;
        }
        assert_eq!(free + self.len, self.nodes.len());
    }
}

fn poll<T>(w: &mut Wheel<T>, now: u64) -> Vec<(u64, T)> {
    let mut out = Vec::new();
    let n = w.poll(now, &mut out);
    assert_eq!(n, out.len());
    w.check_invariants();
    out
}

/// Tiny deterministic PRNG so the non-proptest tests need no extra dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Geometric steps towards `due`, then 1 ms steps; only `due` itself releases `value`.
fn approach(w: &mut Wheel<u32>, due: u64, value: u32) {
    let mut t = w.elapsed();
    while due - t > 200 {
        t += (due - t) / 3;
        assert_eq!(poll(w, t), vec![], "early at {t} for due {due}");
    }
    for t in t..due {
        assert_eq!(poll(w, t), vec![], "early at {t} for due {due}");
    }
    assert_eq!(poll(w, due), vec![(due, value)]);
}

const FAR: [u64; 6] = [
    HOUR,
    DAY,
    100 * DAY,
    MAX_SPAN + 12_345,
    5 * MAX_SPAN + 777,
    (1 << 50) + 3,
];

#[test]
fn cascading_entries_come_out_exactly_at_due() {
    for d in FAR {
        let due = START + d;
        let mut w = Wheel::new(START);
        w.insert(due, 7);
        approach(&mut w, due, 7);
        assert!(w.is_empty());

        // One jump to just before the due, then the due.
        let mut w = Wheel::new(START);
        w.insert(due, 7);
        assert_eq!(poll(&mut w, due - 1), vec![]);
        assert_eq!(w.next_expiration(), Some(due));
        assert_eq!(poll(&mut w, due), vec![(due, 7)]);

        // Fixed steps just under the span: exercises top-level re-parking, no rebuild.
        let mut w = Wheel::new(START);
        w.insert(due, 7);
        let step = MAX_SPAN - 3;
        let mut t = START;
        while t + step < due {
            t += step;
            assert_eq!(poll(&mut w, t), vec![]);
        }
        assert_eq!(poll(&mut w, due - 1), vec![]);
        // Overshooting still reports the entry's own due.
        assert_eq!(poll(&mut w, due + 1_000), vec![(due, 7)]);
    }
}

#[test]
fn many_far_entries_in_one_wheel() {
    let mut w = Wheel::new(START);
    for (i, d) in FAR.iter().enumerate() {
        w.insert(START + d, i as u32);
    }
    for (i, d) in FAR.iter().enumerate() {
        approach(&mut w, START + d, i as u32);
    }
    assert!(w.is_empty());
}

#[test]
fn millisecond_steps_release_each_due_in_insertion_order() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut w = Wheel::new(START);
    let mut expected: BTreeMap<(u64, u32), ()> = BTreeMap::new();
    for i in 0..3_000u32 {
        let due = START + 1 + rng.next() % 20_000;
        w.insert(due, i);
        expected.insert((due, i), ());
    }
    let mut got = Vec::new();
    for t in START..=START + 20_001 {
        let mut out = Vec::new();
        w.poll(t, &mut out);
        assert!(out.iter().all(|&(due, _)| due == t));
        got.extend(out);
        if t % 1_000 == 0 {
            w.check_invariants();
        }
    }
    assert_eq!(got, expected.into_keys().collect::<Vec<_>>());
    assert!(w.is_empty());
}

#[test]
fn ready_first_then_due_order_with_equal_dues_in_insertion_order() {
    let mut w = Wheel::new(1_000);
    w.insert(1_500, "p1");
    w.insert(900, "r1");
    w.insert(1_000, "r2");
    w.insert(1_200, "p0");
    w.insert(1_500, "p2");
    let expected = [
        (900, "r1"),
        (1_000, "r2"),
        (1_200, "p0"),
        (1_500, "p1"),
        (1_500, "p2"),
    ];
    assert_eq!(poll(&mut w, 2_000), expected);

    // Same due inserted at different times, hence first placed at different levels.
    let due = 1 << 33;
    let mut w = Wheel::new(0);
    w.insert(due, 0);
    assert_eq!(poll(&mut w, due - 1_000_000), vec![]);
    w.insert(due, 1);
    assert_eq!(poll(&mut w, due - 100), vec![]);
    w.insert(due, 2);
    w.insert(due - 50, 3);
    assert_eq!(
        poll(&mut w, due),
        [(due - 50, 3), (due, 0), (due, 1), (due, 2)]
    );
}

#[test]
fn removed_entries_never_come_out() {
    let mut w = Wheel::new(START);
    let keys: Vec<_> = (0..200u64)
        .map(|i| {
            let due = START + (i * 7_919) % (3 * DAY);
            (due, i, w.insert(due, i))
        })
        .collect();
    for &(due, i, key) in keys.iter().filter(|k| k.1 % 3 == 0) {
        assert_eq!(w.remove(key), Some((due, i)));
        assert_eq!(w.remove(key), None, "second remove of the same key");
    }
    w.check_invariants();
    let mut expected: Vec<_> = keys
        .iter()
        .filter(|k| k.1 % 3 != 0)
        .map(|k| (k.0, k.1))
        .collect();
    expected.sort();
    assert_eq!(w.len(), expected.len());
    let mut got = poll(&mut w, START + DAY);
    got.extend(poll(&mut w, START + 3 * DAY));
    assert_eq!(got, expected);
    for &(_, _, key) in &keys {
        assert_eq!(w.remove(key), None, "key stale after poll");
    }
    assert!(w.is_empty());
}

#[test]
fn stale_keys_do_not_disturb_newer_entries() {
    let mut w = Wheel::new(0);
    let a = w.insert(10, "a");
    let b = w.insert(10, "b");
    let _c = w.insert(10, "c");
    assert_eq!(w.remove(b), Some((10, "b")));
    // The freed node is reused; the old key must not reach the new entry.
    let d = w.insert(10, "d");
    assert_eq!(d.index, b.index);
    assert_ne!(d, b);
    assert_eq!(w.remove(b), None);
    assert_eq!(w.len(), 3);
    assert_eq!(poll(&mut w, 10), [(10, "a"), (10, "c"), (10, "d")]);

    assert_eq!(w.remove(a), None);
    let e = w.insert(20, "e");
    assert!([a.index, d.index].contains(&e.index));
    assert_eq!(w.remove(a), None);
    assert_eq!(w.remove(d), None);
    // Ready entries are removable too.
    let r = w.insert(5, "r");
    assert_eq!(w.remove(r), Some((5, "r")));
    // A key whose index this wheel never allocated.
    let mut other = Wheel::new(0);
    let foreign = (0..10).map(|i| other.insert(i, "x")).last().unwrap();
    assert_eq!(w.remove(foreign), None);
    assert_eq!(w.len(), 1);
    w.check_invariants();
    assert_eq!(poll(&mut w, 20), [(20, "e")]);
    assert_eq!(w.remove(e), None);
}

#[test]
fn clock_going_back_returns_nothing_new() {
    let mut w = Wheel::new(10_000);
    w.insert(10_500, 1);
    w.insert(12_000, 2);
    w.insert(10_000 + 3 * DAY, 3);
    assert_eq!(poll(&mut w, 11_000), [(10_500, 1)]);
    assert_eq!(poll(&mut w, 5_000), vec![]);
    assert_eq!(w.elapsed(), 11_000);
    assert_eq!(poll(&mut w, 0), vec![]);
    assert_eq!(w.elapsed(), 11_000);
    // Due at or before elapsed: ready, returned by the next poll whatever its time.
    w.insert(10_800, 4);
    w.insert(11_000, 5);
    w.insert(11_500, 6);
    assert_eq!(w.next_expiration(), Some(11_000));
    assert_eq!(poll(&mut w, 3_000), [(10_800, 4), (11_000, 5)]);
    // A level-1 cascade point may come first; it must lie in (elapsed, due].
    assert!(
        w.next_expiration()
            .is_some_and(|t| t > 11_000 && t <= 11_500)
    );
    assert_eq!(poll(&mut w, 11_499), vec![]);
    assert_eq!(poll(&mut w, 11_500), [(11_500, 6)]);
    assert_eq!(poll(&mut w, 11_000), vec![]);
    assert_eq!(
        poll(&mut w, 10_000 + 3 * DAY),
        [(12_000, 2), (10_000 + 3 * DAY, 3)]
    );
    assert!(w.is_empty());
}

#[test]
fn next_expiration_is_a_lower_bound_and_polling_at_it_progresses() {
    let mut w: Wheel<u64> = Wheel::new(START);
    assert_eq!(w.next_expiration(), None);
    let mut rng = XorShift(12_345);
    let mut pending = Vec::new();
    for i in 0..500 {
        let d = match i % 4 {
            0 => rng.next() % 5_000,
            1 => rng.next() % (30 * DAY),
            2 => rng.next() % (4 * MAX_SPAN),
            _ => rng.next() % 70,
        };
        w.insert(START + d, i);
        pending.push((START + d, i));
    }
    pending.sort();
    let mut got = Vec::new();
    let mut steps = 0;
    while let Some(t) = w.next_expiration() {
        steps += 1;
        // Equal to elapsed only while ready entries wait.
        assert!(t >= w.elapsed());
        assert!(t <= pending[got.len()].0);
        let before = w.elapsed();
        let out = poll(&mut w, t);
        assert!(!out.is_empty() || w.elapsed() > before);
        assert!(out.iter().all(|&(due, _)| due == t));
        got.extend(out);
    }
    assert_eq!(got, pending);
    // Each entry cascades through at most every level, plus a few top-level re-parkings.
    assert!(steps <= pending.len() * (NUM_LEVELS + 8), "{steps} steps");

    w.insert(START, 1);
    assert_eq!(w.next_expiration(), Some(w.elapsed()));
}

#[test]
fn cost_follows_occupied_slots_not_elapsed_time() {
    let mut w = Wheel::new(START);
    for i in 0..10 {
        w.insert(START + i * DAY + 17, i);
    }
    let out = poll(&mut w, START + 30 * DAY);
    assert_eq!(
        out,
        (0..10)
            .map(|i| (START + i * DAY + 17, i))
            .collect::<Vec<_>>()
    );
    assert!(
        w.slots_processed <= 10 * NUM_LEVELS,
        "{}",
        w.slots_processed
    );
}

#[test]
fn extreme_times() {
    let mut w = Wheel::new(u64::MAX - 100);
    w.insert(u64::MAX, 'a');
    w.insert(u64::MAX - 100, 'r');
    assert_eq!(poll(&mut w, u64::MAX - 1), [(u64::MAX - 100, 'r')]);
    assert_eq!(poll(&mut w, u64::MAX), [(u64::MAX, 'a')]);

    // Jumps across the whole u64 range take the rebuild path and stay ordered.
    let mut rng = XorShift(777);
    let mut w = Wheel::new(0);
    let mut expected: Vec<_> = (0..1_000u32).map(|i| (rng.next() | 1, i)).collect();
    for &(due, i) in &expected {
        w.insert(due, i);
    }
    w.insert(u64::MAX, 1_000);
    expected.sort();
    let mut got = poll(&mut w, u64::MAX / 2);
    assert!(got.iter().all(|&(due, _)| due <= u64::MAX / 2));
    got.extend(poll(&mut w, u64::MAX - 1));
    assert_eq!(got, expected);
    assert_eq!(poll(&mut w, u64::MAX), [(u64::MAX, 1_000)]);

    // A rebuild must keep equal dues in insertion order across many duplicates.
    let mut w = Wheel::new(START);
    let dues = [
        START + 5 * DAY,
        START + 1,
        START + 3 * MAX_SPAN,
        START + 70,
        START + 5 * DAY + 1,
    ];
    let mut expected: Vec<_> = (0..1_000u32)
        .map(|i| (dues[(i * 7 % 5) as usize], i))
        .collect();
    for &(due, i) in &expected {
        w.insert(due, i);
    }
    expected.sort();
    assert_eq!(poll(&mut w, START + 4 * MAX_SPAN), expected);
}

#[derive(Clone, Debug)]
enum Op {
    InsertNear(u64),
    InsertPast(u64),
    InsertFar(u64),
    InsertAny(u64),
    Remove(usize),
    PollBy(u64),
    PollBack(u64),
    PollTo(u64),
    PollNextExpiration,
    /// Evict this many of the latest entries due at or after elapsed + the offset.
    EvictLatest(usize, u64),
    /// Move time back by this much.
    Rebase(u64),
}

/// Decodes a cheap `(selector, raw)` pair; proptest's `prop_oneof!` is costly to
/// generate in debug builds. Weights are the selector ranges.
fn op() -> impl Strategy<Value = Op> {
    (0u8..26, any::<u64>()).prop_map(|(sel, raw)| match sel {
        25 => Op::Rebase(raw % 10_000),
        23..=24 => Op::EvictLatest((raw % 8) as usize, (raw >> 8) % 6_000),
        0..=5 => Op::InsertNear(raw % 5_000),
        6 => Op::InsertPast(raw % 5_000),
        7..=8 => Op::InsertFar(raw % (1 << 40)),
        9 => Op::InsertAny(raw),
        10..=12 => Op::Remove(raw as usize),
        13..=16 => Op::PollBy(raw % 3_000),
        17..=18 => Op::PollBy(raw % (1 << 37)),
        19 => Op::PollBack(raw % 10_000),
        20 => Op::PollTo(raw),
        _ => Op::PollNextExpiration,
    })
}

/// Reference model: ready entries by insertion sequence, pending ones by (due, seq).
#[derive(Default)]
struct Model {
    elapsed: u64,
    ready: BTreeMap<u64, u64>,
    pending: BTreeMap<(u64, u64), ()>,
    live: HashMap<u64, u64>,
}

fn run_against_model(start: u64, ops: Vec<Op>) {
    let mut w = Wheel::new(start);
    let mut m = Model {
        elapsed: start,
        ..Model::default()
    };
    let mut keys: Vec<(EntryKey, u64)> = Vec::new();
    for (seq, op) in (0u64..).zip(ops) {
        let insert_at = match op {
            Op::InsertNear(d) => Some(m.elapsed.saturating_add(d)),
            Op::InsertPast(d) => Some(m.elapsed.saturating_sub(d)),
            Op::InsertFar(d) => Some(m.elapsed.saturating_add(d)),
            Op::InsertAny(due) => Some(due),
            _ => None,
        };
        let poll_to = match op {
            Op::PollBy(d) => Some(m.elapsed.saturating_add(d)),
            Op::PollBack(d) => Some(m.elapsed.saturating_sub(d)),
            Op::PollTo(t) => Some(t),
            Op::PollNextExpiration => w.next_expiration(),
            _ => None,
        };
        if let Some(due) = insert_at {
            keys.push((w.insert(due, seq), seq));
            m.live.insert(seq, due);
            if due <= m.elapsed {
                m.ready.insert(seq, due);
            } else {
                m.pending.insert((due, seq), ());
            }
        }
        if let (Op::Remove(i), false) = (&op, keys.is_empty()) {
            let (key, s) = keys[i % keys.len()];
            let expected = m.live.remove(&s).map(|due| (due, s));
            if let Some((due, s)) = expected {
                m.ready.remove(&s);
                m.pending.remove(&(due, s));
            }
            assert_eq!(w.remove(key), expected);
        }
        if let Op::EvictLatest(count, offset) = op {
            let min_due = m.elapsed.saturating_add(offset);
            let mut out = Vec::new();
            let n = w.evict_latest(count, min_due, |_, seq| seq % 5 != 0, &mut out);
            assert_eq!(n, out.len());
            // The latest `count` of the pending entries due at or after `min_due` (which of
            // equal dues is the wheel's choice: check the dues, then take what it took).
            let mut latest: Vec<u64> = m
                .pending
                .keys()
                .rev()
                .filter(|(due, s)| *due >= min_due && s % 5 != 0)
                .take(count)
                .map(|(due, _)| *due)
                .collect();
            let mut got: Vec<u64> = out.iter().map(|(due, _)| *due).collect();
            latest.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, latest, "evict_latest({count}, {min_due})");
            for (due, s) in out {
                assert_eq!(m.live.remove(&s), Some(due));
                assert!(
                    m.pending.remove(&(due, s)).is_some(),
                    "evicted a ready entry"
                );
            }
        }
        if let Op::Rebase(back) = op {
            let now = m.elapsed.saturating_sub(back);
            w.rebase(now);
            m.elapsed = now;
            // Ready entries due after the new time are pending again.
            let (still, again): (BTreeMap<u64, u64>, BTreeMap<u64, u64>) =
                std::mem::take(&mut m.ready)
                    .into_iter()
                    .partition(|(_, due)| *due <= now);
            m.ready = still;
            m.pending
                .extend(again.into_iter().map(|(s, due)| ((due, s), ())));
        }
        if let Some(now) = poll_to {
            let mut expected: Vec<(u64, u64)> = std::mem::take(&mut m.ready)
                .into_iter()
                .map(|(s, due)| (due, s))
                .collect();
            if now > m.elapsed {
                let later = m.pending.split_off(&(now, u64::MAX));
                expected.extend(std::mem::replace(&mut m.pending, later).into_keys());
                m.elapsed = now;
            }
            for (_, s) in &expected {
                m.live.remove(s);
            }
            let mut out = Vec::new();
            assert_eq!(w.poll(now, &mut out), expected.len());
            assert_eq!(out, expected, "poll({now})");
        }
        w.check_invariants();
        assert_eq!(w.len(), m.live.len());
        assert_eq!(w.elapsed(), m.elapsed);
        let bound = match (m.ready.is_empty(), m.pending.first_key_value()) {
            (false, _) => Some(m.elapsed),
            (true, Some((&(due, _), _))) => Some(due),
            (true, None) => None,
        };
        match (w.next_expiration(), bound) {
            (Some(t), Some(b)) => assert!(t <= b, "next_expiration {t} > {b}"),
            (got, b) => assert_eq!(got, b),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn behaves_like_a_sorted_map(
        start in prop_oneof![0u64..1 << 42, Just(u64::MAX - 20_000), any::<u64>()],
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        run_against_model(start, ops);
    }
}

#[test]
fn evicts_the_latest_across_top_level_rotations_and_at_the_end_of_time() {
    // Entries more than one top-level rotation apart share the top level's ring.
    let mut w = Wheel::new(START);
    let rotation = 1u64 << 36;
    w.insert(START + 3 * rotation + 5, "far");
    w.insert(START + 20 * DAY, "near");
    w.insert(START + 5 * rotation, "farthest");
    let mut out = Vec::new();
    assert_eq!(w.evict_latest(1, START, |_, _| true, &mut out), 1);
    assert_eq!(out[0].1, "farthest");
    w.check_invariants();
    // Dues at u64::MAX.
    let mut w = Wheel::new(u64::MAX - 20);
    w.insert(u64::MAX, 1);
    w.insert(u64::MAX, 2);
    w.insert(u64::MAX - 1, 3);
    let mut out = Vec::new();
    assert_eq!(w.evict_latest(5, u64::MAX, |_, _| true, &mut out), 2);
    w.check_invariants();
    assert_eq!(poll(&mut w, u64::MAX), [(u64::MAX - 1, 3)]);
}
