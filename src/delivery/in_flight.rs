//! The JetStream publishes waiting for their PubAck, by token.
//!
//! Each publish gets the next token (its reply subject ends with it), so tokens only grow and
//! the table is a queue: the oldest publish is at the front, where timeouts are found, and a
//! PubAck takes its entry out of the middle by index. Entries taken leave holes that the
//! front skips. A token not in the table (settled already, from before a reconnect, or made
//! up by someone else) finds nothing.
//!
//! Pure: no clock (callers pass instants), no I/O.

use std::collections::VecDeque;

/// A table of in-flight entries of type `T`, by token.
pub(crate) struct InFlight<T> {
    /// The token of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<T>>,
    live: usize,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            base: 1,
            slots: VecDeque::new(),
            live: 0,
        }
    }
}

impl<T> InFlight<T> {
    /// Adds `entry`; returns its token.
    pub(crate) fn push(&mut self, entry: T) -> u64 {
        let token = self.base + self.slots.len() as u64;
        self.slots.push_back(Some(entry));
        self.live += 1;
        token
    }

    /// Takes the entry of `token` out, if it is in the table.
    pub(crate) fn take(&mut self, token: u64) -> Option<T> {
        let index = usize::try_from(token.checked_sub(self.base)?).ok()?;
        let entry = self.slots.get_mut(index)?.take()?;
        self.live -= 1;
        self.trim();
        Some(entry)
    }

    /// The oldest entry still in the table.
    pub(crate) fn oldest(&self) -> Option<&T> {
        self.slots.front()?.as_ref()
    }

    /// Takes the oldest entry out.
    pub(crate) fn take_oldest(&mut self) -> Option<T> {
        let token = self.base;
        self.take(token)
    }

    /// Takes every entry out, oldest first.
    pub(crate) fn take_all(&mut self) -> Vec<T> {
        self.base += self.slots.len() as u64;
        self.live = 0;
        self.slots.drain(..).flatten().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Drops the holes at the front, so the front is the oldest live entry.
    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_find_their_entries_once() {
        let mut table = InFlight::default();
        let a = table.push("a");
        let b = table.push("b");
        let c = table.push("c");
        assert_eq!(table.take(b), Some("b"));
        assert_eq!(table.take(b), None, "settled already");
        assert_eq!(table.oldest(), Some(&"a"));
        assert_eq!(table.take_oldest(), Some("a"));
        assert_eq!(table.oldest(), Some(&"c"), "the hole of b is skipped");
        assert_eq!(table.take(a), None);
        assert_eq!(table.take(0), None);
        assert_eq!(table.take(u64::MAX), None);
        assert_eq!(table.len(), 1);
        assert_eq!(table.take(c), Some("c"));
        assert!(table.is_empty());
        let d = table.push("d");
        assert!(d > c, "tokens are never reused");
        assert_eq!(table.take_all(), vec!["d"]);
        assert_eq!(table.take(d), None);
    }

    proptest! {
        /// Against a model (a map from token to entry): any sequence of pushes, takes by any
        /// token, takes of the oldest and take-alls agrees with it.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u8..4, 0u64..40), 1..300)) {
            let mut table = InFlight::default();
            let mut model = std::collections::BTreeMap::new();
            let mut next = 0u32;
            for (op, token) in ops {
                match op {
                    0 => {
                        next += 1;
                        let t = table.push(next);
                        prop_assert!(model.insert(t, next).is_none());
                    }
                    1 => prop_assert_eq!(table.take(token), model.remove(&token)),
                    2 => {
                        let oldest = model.keys().next().copied();
                        prop_assert_eq!(table.oldest().copied(), oldest.map(|t| model[&t]));
                        prop_assert_eq!(table.take_oldest(), oldest.and_then(|t| model.remove(&t)));
                    }
                    _ => {
                        let all: Vec<u32> = std::mem::take(&mut model).into_values().collect();
                        prop_assert_eq!(table.take_all(), all);
                    }
                }
                prop_assert_eq!(table.len(), model.len());
            }
        }
    }
}
