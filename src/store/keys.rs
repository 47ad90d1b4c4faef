//! The store's key layout: one sled tree, three key spaces told apart by their first byte.
//!
//! | key                                   | value                          | why                                     |
//! |---------------------------------------|--------------------------------|-----------------------------------------|
//! | `d` · due (`u64` BE Unix ms) · id     | encoded [`Schedule`] value      | byte order = due order: "what is due next" is a range scan from a cursor |
//! | `i` · id                              | due (`u64` BE)                 | find a schedule by id (replace, cancel)  |
//! | `m` · name                            | metadata (e.g. format version) |                                          |
//!
//! Both index entries of a schedule are written and removed in one atomic sled batch, so they can
//! never disagree after a crash.
//!
//! [`Schedule`]: crate::record::Schedule

use crate::time::UnixMs;

const DUE_PREFIX: u8 = b'd';
const ID_PREFIX: u8 = b'i';
/// Where the store's format version is kept.
pub(crate) const FORMAT_KEY: &[u8] = b"mformat";

/// A position in the due-ordered key space: the key of one schedule, or a boundary between keys.
///
/// Ordering is byte order, which is (due, id) order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueKey(Vec<u8>);

impl DueKey {
    /// The key of the schedule `id` due at `due`.
    pub fn new(due: UnixMs, id: &str) -> DueKey {
        let mut key = Vec::with_capacity(9 + id.len());
        key.push(DUE_PREFIX);
        key.extend_from_slice(&due.to_be_bytes());
        key.extend_from_slice(id.as_bytes());
        DueKey(key)
    }

    /// The boundary before every schedule due at or after `due`.
    pub fn start_of(due: UnixMs) -> DueKey {
        DueKey::new(due, "")
    }

    /// The boundary after every due key: the end of the key space.
    pub fn end() -> DueKey {
        DueKey(vec![DUE_PREFIX + 1])
    }

    /// The smallest key greater than this one.
    pub fn successor(&self) -> DueKey {
        let mut key = self.0.clone();
        key.push(0);
        DueKey(key)
    }

    /// Wraps raw key bytes read from the store, if they are a due key.
    pub fn from_bytes(bytes: &[u8]) -> Option<DueKey> {
        (bytes.len() >= 9 && bytes[0] == DUE_PREFIX).then(|| DueKey(bytes.to_vec()))
    }

    /// The due instant of the key (for a boundary: the due it starts).
    pub fn due(&self) -> UnixMs {
        match self.0.get(1..9) {
            Some(bytes) => u64::from_be_bytes(bytes.try_into().expect("8 bytes")),
            None => UnixMs::MAX,
        }
    }

    /// The id part of the key (empty for a boundary).
    pub fn id(&self) -> &str {
        self.0
            .get(9..)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .unwrap_or("")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The id-index key of `id`.
pub fn id_key(id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(ID_PREFIX);
    key.extend_from_slice(id.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_is_due_then_id_order() {
        let keys = [
            DueKey::start_of(0),
            DueKey::new(0, "a"),
            DueKey::new(1, ""),
            DueKey::new(1, "a"),
            DueKey::new(1, "a").successor(),
            DueKey::new(1, "b"),
            DueKey::new(255, "a"),
            DueKey::new(256, "a"),
            DueKey::new(u64::MAX, "zzz"),
            DueKey::end(),
        ];
        for pair in keys.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?}");
        }
    }

    #[test]
    fn parts_round_trip() {
        let key = DueKey::new(1_796_061_600_250, "order-42");
        assert_eq!(key.due(), 1_796_061_600_250);
        assert_eq!(key.id(), "order-42");
        assert_eq!(DueKey::from_bytes(key.as_bytes()), Some(key));
        assert_eq!(DueKey::from_bytes(&id_key("x")), None);
        assert!(id_key("x").as_slice() > DueKey::end().as_bytes());
    }
}
