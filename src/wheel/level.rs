//! One level of the timing wheel plus the pure arithmetic that places an entry.
//! The algorithm itself is described once, in `super` (mod.rs).

use super::{List, Node};

/// Slots per level; a power of two so a slot index is a bit field of the due time.
pub(super) const LEVEL_MULT: usize = 64;
/// `log2(LEVEL_MULT)`: each level consumes this many bits of the due time.
pub(super) const SLOT_BITS: u32 = 6;
pub(super) const NUM_LEVELS: usize = 6;
/// The span covered by all levels together: 2^36 ms (about 795 days).
pub(super) const MAX_SPAN: u64 = 1 << (SLOT_BITS * NUM_LEVELS as u32);

/// The level an entry due at `when` belongs to while the wheel stands at `elapsed`:
/// the highest 6-bit group in which the two times differ. Times that differ above bit 35
/// are clamped into the top level, whose slots then act as a ring (see mod.rs).
pub(super) fn level_for(elapsed: u64, when: u64) -> usize {
    // OR-ing in the level-0 mask makes equal times map to level 0 rather than
    // hitting `leading_zeros() == 64`.
    let masked = ((elapsed ^ when) | (LEVEL_MULT as u64 - 1)).min(MAX_SPAN - 1);
    let significant = 63 - masked.leading_zeros();
    (significant / SLOT_BITS) as usize
}

/// The slot of `when` within `level`: the level's 6-bit group of the due time.
/// Depends only on `when`, so every entry with the same due shares one slot.
pub(super) fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (level as u32 * SLOT_BITS)) & (LEVEL_MULT as u64 - 1)) as usize
}

/// Width of one slot of `level` in milliseconds.
pub(super) fn slot_range(level: usize) -> u64 {
    1 << (level as u32 * SLOT_BITS)
}

/// Width of a whole rotation of `level` (all 64 slots) in milliseconds.
pub(super) fn level_range(level: usize) -> u64 {
    slot_range(level) << SLOT_BITS
}

pub(super) struct Level {
    level: usize,
    /// Bit `i` is set iff `slots[i]` is non-empty; lets a poll skip empty time in O(1).
    occupied: u64,
    slots: [List; LEVEL_MULT],
}

impl Level {
    pub(super) fn new(level: usize) -> Self {
        debug_assert!(level < NUM_LEVELS);
        Level {
            level,
            occupied: 0,
            slots: [List::EMPTY; LEVEL_MULT],
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.occupied == 0
    }

    /// The first occupied slot strictly after `elapsed`'s own slot, with the time at which
    /// it starts (its deadline). Entries never sit in the current slot of a level below
    /// the top, because they would then belong to a lower level; at the top level an entry
    /// in or before the current slot is a far-future entry parked for the next rotation,
    /// so searching strictly after the current slot also ranks it last, correctly.
    pub(super) fn next_occupied_slot(&self, elapsed: u64) -> Option<(usize, u64)> {
        if self.occupied == 0 {
            return None;
        }
        let current = slot_for(elapsed, self.level);
        let start = (current + 1) % LEVEL_MULT;
        let distance = self.occupied.rotate_right(start as u32).trailing_zeros() as usize;
        let slot = (start + distance) % LEVEL_MULT;

        let level_start = elapsed & !(level_range(self.level) - 1);
        let mut deadline = level_start + slot as u64 * slot_range(self.level);
        if slot <= current {
            debug_assert_eq!(
                self.level,
                NUM_LEVELS - 1,
                "wrapped slot below the top level"
            );
            // Cannot overflow: a wrapped entry is due at or after the next rotation's start.
            deadline += level_range(self.level);
        }
        debug_assert!(deadline > elapsed);
        Some((slot, deadline))
    }

    /// Every occupied slot with its deadline, latest deadline first (see
    /// [`Level::next_occupied_slot`] for how a wrapped top-level slot ranks).
    pub(super) fn occupied_latest_first(&self, elapsed: u64) -> Vec<(usize, u64)> {
        let current = slot_for(elapsed, self.level);
        let level_start = elapsed & !(level_range(self.level) - 1);
        let mut slots: Vec<(usize, u64)> = (0..LEVEL_MULT)
            .filter(|slot| self.occupied & (1 << slot) != 0)
            .map(|slot| {
                let mut deadline = level_start + slot as u64 * slot_range(self.level);
                if slot <= current {
                    deadline = deadline.saturating_add(level_range(self.level));
                }
                (slot, deadline)
            })
            .collect();
        slots.sort_unstable_by_key(|&(_, deadline)| std::cmp::Reverse(deadline));
        slots
    }

    pub(super) fn push_back<T>(&mut self, slot: usize, idx: usize, nodes: &mut [Node<T>]) {
        self.slots[slot].push_back(idx, nodes);
        self.occupied |= 1 << slot;
    }

    pub(super) fn unlink<T>(&mut self, slot: usize, idx: usize, nodes: &mut [Node<T>]) {
        self.slots[slot].unlink(idx, nodes);
        if self.slots[slot].is_empty() {
            self.occupied &= !(1 << slot);
        }
    }

    /// Detaches the whole list of `slot`. The nodes keep their links to each other, so
    /// the caller walks the returned list and must relink or free every node.
    pub(super) fn take(&mut self, slot: usize) -> List {
        self.occupied &= !(1 << slot);
        std::mem::replace(&mut self.slots[slot], List::EMPTY)
    }

    #[cfg(test)]
    pub(super) fn slot(&self, slot: usize) -> List {
        debug_assert_eq!(
            self.occupied & (1 << slot) != 0,
            !self.slots[slot].is_empty(),
            "occupancy bit out of sync"
        );
        self.slots[slot]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: the lowest level whose next-higher group of bits agrees.
    fn ref_level(elapsed: u64, when: u64) -> usize {
        (0..NUM_LEVELS - 1)
            .find(|&l| {
                let shift = 6 * (l as u32 + 1);
                elapsed >> shift == when >> shift
            })
            .unwrap_or(NUM_LEVELS - 1)
    }

    fn ref_slot(when: u64, level: usize) -> usize {
        ((when / 64u64.pow(level as u32)) % 64) as usize
    }

    fn elapsed_samples() -> Vec<u64> {
        vec![
            0,
            1,
            63,
            64,
            4095,
            4096,
            1_700_000_000_000,
            (1 << 36) - 1,
            1 << 36,
            (1 << 36) + 12_345,
            u64::MAX / 3,
            u64::MAX - (1 << 14),
        ]
    }

    #[test]
    fn level_and_slot_for_every_small_distance() {
        for elapsed in elapsed_samples() {
            for d in 0..(1u64 << 13) {
                let Some(when) = elapsed.checked_add(d) else {
                    break;
                };
                let level = level_for(elapsed, when);
                assert_eq!(
                    level,
                    ref_level(elapsed, when),
                    "elapsed {elapsed} when {when}"
                );
                if d < 64 && elapsed / 64 == when / 64 {
                    assert_eq!(level, 0);
                }
                for l in 0..NUM_LEVELS {
                    assert_eq!(slot_for(when, l), ref_slot(when, l));
                }
            }
        }
    }

    #[test]
    fn level_and_slot_for_power_of_two_boundaries() {
        let mut checked = 0;
        for elapsed in elapsed_samples() {
            for bit in 0..64u32 {
                for delta in [-1i128, 0, 1] {
                    let d = (1i128 << bit) + delta;
                    let Ok(when) = u64::try_from(elapsed as i128 + d) else {
                        continue;
                    };
                    let level = level_for(elapsed, when);
                    assert_eq!(
                        level,
                        ref_level(elapsed, when),
                        "elapsed {elapsed} bit {bit}"
                    );
                    for l in 0..NUM_LEVELS {
                        assert_eq!(slot_for(when, l), ref_slot(when, l));
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 1500);
        // Distances at or beyond the wheel span always clamp into the top level.
        assert_eq!(level_for(0, MAX_SPAN - 1), NUM_LEVELS - 1);
        assert_eq!(level_for(0, MAX_SPAN), NUM_LEVELS - 1);
        assert_eq!(level_for(0, u64::MAX), NUM_LEVELS - 1);
        assert_eq!(level_for(u64::MAX, u64::MAX), 0);
        assert_eq!(slot_for(u64::MAX, NUM_LEVELS - 1), 63);
    }

    #[test]
    fn ranges() {
        assert_eq!(slot_range(0), 1);
        assert_eq!(level_range(0), 64);
        assert_eq!(slot_range(5), 1 << 30);
        assert_eq!(level_range(5), MAX_SPAN);
    }

    fn nodes(n: usize) -> Vec<Node<()>> {
        (0..n).map(|_| Node::vacant(usize::MAX)).collect()
    }

    #[test]
    fn next_occupied_slot_finds_first_slot_after_current() {
        let mut ns = nodes(3);
        let mut level = Level::new(1);
        assert_eq!(level.next_occupied_slot(0), None);
        // elapsed = 64 * 10 + 5: current slot at level 1 is 10.
        let elapsed = 645;
        level.push_back(40, 0, &mut ns);
        level.push_back(12, 1, &mut ns);
        assert_eq!(level.next_occupied_slot(elapsed), Some((12, 12 * 64)));
        level.unlink(12, 1, &mut ns);
        assert_eq!(level.next_occupied_slot(elapsed), Some((40, 40 * 64)));
        let list = level.take(40);
        assert_eq!((list.head, list.tail), (0, 0));
        assert!(level.is_empty());
        assert_eq!(level.next_occupied_slot(elapsed), None);
    }

    #[test]
    fn top_level_wraps_into_next_rotation() {
        let mut ns = nodes(3);
        let mut top = Level::new(5);
        // Current top-level slot is 7 in rotation 3.
        let elapsed = 3 * MAX_SPAN + 7 * (1 << 30) + 99;
        top.push_back(7, 0, &mut ns);
        top.push_back(2, 1, &mut ns);
        // Slot 2 wrapped: next rotation. Slot 7 (the current one) is a full rotation away.
        assert_eq!(
            top.next_occupied_slot(elapsed),
            Some((2, 4 * MAX_SPAN + 2 * (1 << 30)))
        );
        top.push_back(9, 2, &mut ns);
        assert_eq!(
            top.next_occupied_slot(elapsed),
            Some((9, 3 * MAX_SPAN + 9 * (1 << 30)))
        );
        top.unlink(9, 2, &mut ns);
        top.unlink(2, 1, &mut ns);
        assert_eq!(
            top.next_occupied_slot(elapsed),
            Some((7, 4 * MAX_SPAN + 7 * (1 << 30)))
        );
        assert_eq!(top.slot(7).head, 0);
        assert!(top.slot(2).is_empty());
    }
}
