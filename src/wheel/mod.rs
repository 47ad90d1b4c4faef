//! A pure hierarchical timing wheel (Varghese & Lauck), in the style of tokio's timer wheel.
//!
//! Time is whatever `u64` millisecond clock the caller passes in; the wheel never reads a
//! clock itself. It keeps `elapsed`, the instant up to which it has been polled.
//!
//! # Levels
//!
//! Six levels of 64 slots each. A slot of level `L` covers `64^L` ms and a full rotation of
//! level `L` covers `64^(L+1)` ms, so together the levels span 2^36 ms:
//!
//! | level | slot width          | level range (one rotation) |
//! |-------|---------------------|----------------------------|
//! | 0     | 1 ms                | 64 ms                      |
//! | 1     | 64 ms               | ~4.1 s (2^12 ms)           |
//! | 2     | ~4.1 s (2^12 ms)    | ~4.4 min (2^18 ms)         |
//! | 3     | ~4.4 min (2^18 ms)  | ~4.7 h (2^24 ms)           |
//! | 4     | ~4.7 h (2^24 ms)    | ~12.4 days (2^30 ms)       |
//! | 5     | ~12.4 days (2^30 ms)| ~795 days (2^36 ms)        |
//!
//! # Placement
//!
//! An entry due at `when > elapsed` lives at level `level_for(elapsed, when)`: the highest
//! 6-bit group in which `when` and `elapsed` differ. Its slot is that group of `when`
//! (`slot_for`). Consequences the code relies on:
//!
//! * Below the top level an entry's slot is strictly after `elapsed`'s slot in the same
//!   rotation, so the start of the slot (its *deadline*) is `> elapsed` and `<= when`.
//! * Entries due more than one top-level rotation ahead are clamped into the top level.
//!   Its slots then act as a ring: an occupied top slot at or before `elapsed`'s own slot
//!   belongs to the next rotation. When such a slot is processed its entries are simply
//!   re-inserted; one that is still far away lands in the same slot again, one rotation on.
//! * The slot depends only on `when`, so all entries with equal due share a slot, and since
//!   slots are FIFO lists, equal dues keep their insertion order through every cascade.
//! * The lowest occupied level holds the earliest deadline: everything at level `L` is due
//!   before the next slot boundary of level `L + 1`, where the earliest higher deadline is.
//!
//! Entries inserted with `when <= elapsed` go to a separate FIFO *ready* list instead.
//!
//! # Polling
//!
//! `poll(now)` first drains the ready list. Then it repeatedly takes the earliest deadline
//! (lowest occupied level, first set bit of its occupancy bitmap after the current slot);
//! if it is `<= now`, it sets `elapsed` to that deadline, detaches the slot and walks it:
//! entries due exactly at the deadline are returned, the rest are re-inserted relative to
//! the new `elapsed`, which moves them to a lower level (a *cascade*). Advancing `elapsed`
//! to a deadline keeps every other entry validly placed because all other deadlines are
//! later. Deadlines strictly increase within a poll and everything returned is due at the
//! current deadline, which yields the required output order. Cost is proportional to the
//! slots visited (at most one per level per cascade step), never to the milliseconds crossed.
//!
//! A jump of at least the whole wheel span (2^36 ms) instead rebuilds: every entry is
//! detached, the due ones are stably sorted by due and returned, the rest re-inserted. That
//! bounds the work for absurd jumps, where the ring behaviour of the top level would
//! otherwise revisit a far-future slot once per 2^36 ms crossed.
//!
//! # Storage
//!
//! Entries live in a slab (`Vec<Node>` plus a free list); each slot and the ready list is an
//! intrusive doubly linked list of slab indices, giving O(1) insert and remove. Keys carry
//! the node's generation, bumped whenever a node is freed, so a stale key is recognised.

mod level;

use level::{Level, MAX_SPAN, NUM_LEVELS, level_for, slot_for};
use std::fmt;

/// Null link in the intrusive lists and the free list.
const NIL: usize = usize::MAX;

/// Opaque handle for removing an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    index: usize,
    generation: u64,
}

/// Which list a slab node is currently linked into; lets `remove` unlink in O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Home {
    Free,
    Ready,
    Slot { level: u8, slot: u8 },
}

struct Node<T> {
    generation: u64,
    due: u64,
    prev: usize,
    /// Next node in the node's list, or, for a free node, the next free node.
    next: usize,
    home: Home,
    value: Option<T>,
}

impl<T> Node<T> {
    fn vacant(next_free: usize) -> Self {
        Node {
            generation: 0,
            due: 0,
            prev: NIL,
            next: next_free,
            home: Home::Free,
            value: None,
        }
    }
}

/// Head and tail of an intrusive FIFO list threaded through the slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct List {
    head: usize,
    tail: usize,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
    };

    fn is_empty(&self) -> bool {
        self.head == NIL
    }

    fn push_back<T>(&mut self, idx: usize, nodes: &mut [Node<T>]) {
        nodes[idx].prev = self.tail;
        nodes[idx].next = NIL;
        if self.tail == NIL {
            self.head = idx;
        } else {
            nodes[self.tail].next = idx;
        }
        self.tail = idx;
    }

    fn unlink<T>(&mut self, idx: usize, nodes: &mut [Node<T>]) {
        let (prev, next) = (nodes[idx].prev, nodes[idx].next);
        if prev == NIL {
            debug_assert_eq!(self.head, idx);
            self.head = next;
        } else {
            nodes[prev].next = next;
        }
        if next == NIL {
            debug_assert_eq!(self.tail, idx);
            self.tail = prev;
        } else {
            nodes[next].prev = prev;
        }
        nodes[idx].prev = NIL;
        nodes[idx].next = NIL;
    }
}

/// Hierarchical timing wheel holding values of type `T`, each due at a `u64` ms instant.
pub struct Wheel<T> {
    elapsed: u64,
    len: usize,
    levels: [Level; NUM_LEVELS],
    ready: List,
    nodes: Vec<Node<T>>,
    free: usize,
    /// Slots processed by `poll`, so tests can check that cost tracks occupancy, not time.
    #[cfg(test)]
    slots_processed: usize,
}

impl<T> fmt::Debug for Wheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("elapsed", &self.elapsed)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T> Wheel<T> {
    pub fn new(now_ms: u64) -> Self {
        Wheel {
            elapsed: now_ms,
            len: 0,
            levels: std::array::from_fn(Level::new),
            ready: List::EMPTY,
            nodes: Vec::new(),
            free: NIL,
            #[cfg(test)]
            slots_processed: 0,
        }
    }

    /// The time up to which the wheel has been polled.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts `value` due at `due_ms`. An entry with `due_ms <= elapsed` is ready: the next
    /// poll returns it (ready entries come out first, in insertion order). Any `u64` due works.
    pub fn insert(&mut self, due_ms: u64, value: T) -> EntryKey {
        let idx = if self.free == NIL {
            self.nodes.push(Node::vacant(NIL));
            self.nodes.len() - 1
        } else {
            let idx = self.free;
            self.free = self.nodes[idx].next;
            idx
        };
        let node = &mut self.nodes[idx];
        debug_assert_eq!(node.home, Home::Free);
        node.due = due_ms;
        node.value = Some(value);
        let key = EntryKey {
            index: idx,
            generation: node.generation,
        };
        if due_ms <= self.elapsed {
            self.nodes[idx].home = Home::Ready;
            self.ready.push_back(idx, &mut self.nodes);
        } else {
            self.link(idx);
        }
        self.len += 1;
        key
    }

    /// Removes a pending entry, returning its due and value; `None` if the key is stale
    /// (its entry was already returned by `poll` or removed). O(1).
    pub fn remove(&mut self, key: EntryKey) -> Option<(u64, T)> {
        let node = self.nodes.get(key.index)?;
        if node.generation != key.generation {
            return None;
        }
        match node.home {
            Home::Free => return None,
            Home::Ready => self.ready.unlink(key.index, &mut self.nodes),
            Home::Slot { level, slot } => {
                let (level, slot) = (level as usize, slot as usize);
                debug_assert_eq!(level, level_for(self.elapsed, node.due));
                debug_assert_eq!(slot, slot_for(node.due, level));
                self.levels[level].unlink(slot, key.index, &mut self.nodes)
            }
        }
        Some(self.release(key.index))
    }

    /// The earliest time at which `poll` may have work: at most the smallest pending due
    /// (it may be an earlier cascade point of a higher level), `elapsed` if ready entries
    /// exist, `None` if the wheel is empty.
    pub fn next_expiration(&self) -> Option<u64> {
        if !self.ready.is_empty() {
            return Some(self.elapsed);
        }
        self.next_slot().map(|(_, _, deadline)| deadline)
    }

    /// Advances the wheel to `now_ms` and appends every entry due at or before it to `out`
    /// as `(due_ms, value)`, returning how many were appended: ready entries first in
    /// insertion order, then by non-decreasing due, equal dues in insertion order. A
    /// `now_ms` below `elapsed` is treated as `elapsed`.
    pub fn poll(&mut self, now_ms: u64, out: &mut Vec<(u64, T)>) -> usize {
        let before = out.len();
        while !self.ready.is_empty() {
            let idx = self.ready.head;
            self.ready.unlink(idx, &mut self.nodes);
            out.push(self.release(idx));
        }
        if now_ms > self.elapsed {
            if now_ms - self.elapsed >= MAX_SPAN {
                self.rebuild(now_ms, out);
            } else {
                while let Some((level, slot, deadline)) = self.next_slot() {
                    if deadline > now_ms {
                        break;
                    }
                    self.process_slot(level, slot, deadline, out);
                }
                // Valid because every remaining deadline is beyond `now_ms`.
                self.elapsed = now_ms;
            }
        }
        debug_assert!(
            self.len != 0 || (self.ready.is_empty() && self.levels.iter().all(Level::is_empty))
        );
        debug_assert!(self.len <= self.nodes.len());
        out.len() - before
    }

    /// Removes the `count` latest pending entries due at or after `min_due` for which
    /// `evictable(due, value)` holds (fewer if there are not as many), appending them to `out`
    /// as `(due, value)`; returns how many. Ready entries are never taken. The kept entries
    /// keep their order.
    ///
    /// Every entry of a level is due before any of a higher level (see *Placement*), and
    /// slots of a level are ordered by deadline, so walking levels from the top and slots
    /// from the latest finds the latest entries first; within a slot (entries are unsorted
    /// there) the latest are picked by due. (Entries clamped into the top level from more
    /// than one rotation ahead rank by their slot only.)
    pub fn evict_latest(
        &mut self,
        count: usize,
        min_due: u64,
        evictable: impl Fn(u64, &T) -> bool,
        out: &mut Vec<(u64, T)>,
    ) -> usize {
        let mut taken = 0;
        'levels: for level in (0..NUM_LEVELS).rev() {
            let slots = self.levels[level].occupied_latest_first(self.elapsed);
            // The top level's slots are a ring that may mix rotations, so they are searched
            // as one group; below it, slot by slot from the latest.
            let groups: Vec<Vec<(usize, u64)>> = if level == NUM_LEVELS - 1 {
                vec![slots]
            } else {
                slots.into_iter().map(|slot| vec![slot]).collect()
            };
            for group in groups {
                if taken >= count {
                    break 'levels;
                }
                if level < NUM_LEVELS - 1
                    && let Some(&(_, deadline)) = group.first()
                    && deadline
                        .checked_add(level::slot_range(level))
                        .is_some_and(|end| end <= min_due)
                {
                    // Everything earlier is due before `min_due` too.
                    break 'levels;
                }
                // The group's nodes in list order.
                let mut order = Vec::new();
                for (slot, _) in group {
                    let mut idx = self.levels[level].take(slot).head;
                    while idx != NIL {
                        order.push(idx);
                        idx = self.nodes[idx].next;
                    }
                }
                // Positions in `order` of the qualifying nodes, latest due first; of equal
                // dues the later inserted first (the sort is stable).
                let mut evicted: Vec<usize> = (0..order.len())
                    .rev()
                    .filter(|&p| {
                        let node = &self.nodes[order[p]];
                        node.due >= min_due
                            && node.value.as_ref().is_some_and(|v| evictable(node.due, v))
                    })
                    .collect();
                evicted.sort_by_key(|&p| std::cmp::Reverse(self.nodes[order[p]].due));
                evicted.truncate(count - taken);
                let mut chosen = vec![false; order.len()];
                for &p in &evicted {
                    chosen[p] = true;
                }
                // The rest go back in list order, so equal dues keep their insertion order.
                for (p, &idx) in order.iter().enumerate() {
                    if !chosen[p] {
                        self.link(idx);
                    }
                }
                let evicted: Vec<usize> = evicted.into_iter().map(|p| order[p]).collect();
                for idx in evicted {
                    out.push(self.release(idx));
                    taken += 1;
                }
            }
        }
        taken
    }

    /// Moves the wheel's time back to `now_ms` (after the wall clock stepped back), keeping
    /// every entry and its key: an entry that was ready but is due after `now_ms` is pending
    /// again. A `now_ms` at or after `elapsed` changes nothing (`poll` moves forward). O(len).
    pub fn rebase(&mut self, now_ms: u64) {
        if now_ms >= self.elapsed {
            return;
        }
        let mut all = Vec::with_capacity(self.len);
        let mut idx = std::mem::replace(&mut self.ready, List::EMPTY).head;
        while idx != NIL {
            all.push(idx);
            idx = self.nodes[idx].next;
        }
        self.detach_slots(&mut all);
        debug_assert_eq!(all.len(), self.len);
        self.elapsed = now_ms;
        for idx in all {
            if self.nodes[idx].due <= now_ms {
                self.nodes[idx].home = Home::Ready;
                self.ready.push_back(idx, &mut self.nodes);
            } else {
                self.link(idx);
            }
        }
    }

    /// The earliest occupied slot as `(level, slot, deadline)`.
    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        self.levels.iter().enumerate().find_map(|(level, l)| {
            l.next_occupied_slot(self.elapsed)
                .map(|(slot, deadline)| (level, slot, deadline))
        })
    }

    fn process_slot(&mut self, level: usize, slot: usize, deadline: u64, out: &mut Vec<(u64, T)>) {
        #[cfg(test)]
        {
            self.slots_processed += 1;
        }
        debug_assert!(deadline > self.elapsed);
        // The lowest occupied level holds the earliest deadline.
        debug_assert!(self.levels[..level].iter().all(Level::is_empty));
        let list = self.levels[level].take(slot);
        self.elapsed = deadline;
        let mut idx = list.head;
        while idx != NIL {
            let next = self.nodes[idx].next;
            let due = self.nodes[idx].due;
            debug_assert!(
                due >= deadline,
                "entry due {due} before its slot deadline {deadline}"
            );
            debug_assert!(level > 0 || due == deadline);
            if due == deadline {
                out.push(self.release(idx));
            } else {
                self.link(idx);
            }
            idx = next;
        }
    }

    /// Handles a jump of at least the whole span in one pass over all entries (see top doc).
    fn rebuild(&mut self, now_ms: u64, out: &mut Vec<(u64, T)>) {
        let mut all = Vec::with_capacity(self.len);
        self.detach_slots(&mut all);
        debug_assert_eq!(
            all.len(),
            self.len,
            "ready list must be drained before a rebuild"
        );
        self.elapsed = now_ms;
        let mut due = Vec::new();
        for idx in all {
            if self.nodes[idx].due <= now_ms {
                due.push(idx);
            } else {
                self.link(idx);
            }
        }
        // Stable: equal dues come from one slot list, already in insertion order.
        due.sort_by_key(|&idx| self.nodes[idx].due);
        for idx in due {
            out.push(self.release(idx));
        }
    }

    /// Detaches every slot's list, appending its nodes to `all`; the caller relinks or frees
    /// each of them.
    fn detach_slots(&mut self, all: &mut Vec<usize>) {
        for level in &mut self.levels {
            for slot in 0..level::LEVEL_MULT {
                let mut idx = level.take(slot).head;
                while idx != NIL {
                    all.push(idx);
                    idx = self.nodes[idx].next;
                }
            }
        }
    }

    /// Links a detached node into the slot its due maps to from the current `elapsed`.
    fn link(&mut self, idx: usize) {
        let due = self.nodes[idx].due;
        debug_assert!(
            due > self.elapsed,
            "only future entries belong in the wheel"
        );
        let level = level_for(self.elapsed, due);
        let slot = slot_for(due, level);
        self.nodes[idx].home = Home::Slot {
            level: level as u8,
            slot: slot as u8,
        };
        self.levels[level].push_back(slot, idx, &mut self.nodes);
    }

    /// Frees a node that is already unlinked from its list and hands back its contents.
    fn release(&mut self, idx: usize) -> (u64, T) {
        let node = &mut self.nodes[idx];
        let value = node.value.take().expect("released node must be occupied");
        node.home = Home::Free;
        // Invalidates every outstanding key for this node.
        node.generation += 1;
        node.prev = NIL;
        node.next = self.free;
        self.free = idx;
        self.len -= 1;
        (node.due, value)
    }
}

#[cfg(test)]
mod tests;
