//! The store's key layout: one sled tree, key spaces told apart by their first byte.
//!
//! | key                                          | value                                  |
//! |----------------------------------------------|----------------------------------------|
//! | `s` · bucket (`u64` BE Unix ms) · seq (`u64` BE) | a [segment](super::segment): the schedules of one commit round due in that bucket |
//! | `i` · id                                     | the segment key holding that id        |
//! | `m` · name                                   | metadata: format version, next segment seq, pending count |
//!
//! Schedules are stored in *segments*, not one key each: a commit round writes one value per
//! [`BUCKET_MS`]-wide time bucket its schedules fall in. That makes intake, loading and
//! deletion cost per segment instead of per schedule (sled copies a whole leaf node on every
//! key it inserts). Byte order of segment keys is bucket order, so "what is due next" is a
//! range scan from a cursor.
//!
//! Only ids given by callers (`Sched-Id`) are indexed under `i`. Ids natsched generates are
//! ULIDs whose timestamp is the due instant, so their bucket, and from it their segment, can be
//! found without an index entry.

use crate::time::UnixMs;

/// Width of a time bucket.
pub const BUCKET_MS: UnixMs = 100;

const SEGMENT_PREFIX: u8 = b's';
const ID_PREFIX: u8 = b'i';
/// Where the store's format version is kept.
pub(crate) const FORMAT_KEY: &[u8] = b"mformat";
/// Where the next segment sequence number is kept.
pub(crate) const NEXT_SEQ_KEY: &[u8] = b"mnextseq";
/// Where the number of pending schedules is kept.
pub(crate) const PENDING_KEY: &[u8] = b"mpending";

/// The start of the bucket `due` falls in.
pub fn bucket_of(due: UnixMs) -> UnixMs {
    due - due % BUCKET_MS
}

/// The key of a segment, or a boundary between segment keys. Ordered as (bucket, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentKey {
    /// Start of the bucket the segment's schedules are due in.
    pub bucket: UnixMs,
    /// Unique, increasing per segment written.
    pub seq: u64,
}

impl SegmentKey {
    /// The boundary before every segment of `bucket` and later.
    pub fn start_of(bucket: UnixMs) -> SegmentKey {
        SegmentKey { bucket, seq: 0 }
    }

    /// The smallest key greater than this one.
    pub fn successor(self) -> SegmentKey {
        match self.seq.checked_add(1) {
            Some(seq) => SegmentKey { seq, ..self },
            None => SegmentKey::start_of(self.bucket.saturating_add(1)),
        }
    }

    pub fn to_bytes(self) -> [u8; 17] {
        let mut key = [0; 17];
        key[0] = SEGMENT_PREFIX;
        key[1..9].copy_from_slice(&self.bucket.to_be_bytes());
        key[9..].copy_from_slice(&self.seq.to_be_bytes());
        key
    }

    /// Parses a segment key read from the store (or an id-index value).
    pub fn from_bytes(bytes: &[u8]) -> Option<SegmentKey> {
        let bytes: &[u8; 17] = bytes.try_into().ok()?;
        (bytes[0] == SEGMENT_PREFIX).then(|| SegmentKey {
            bucket: u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(bytes[9..].try_into().expect("8 bytes")),
        })
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
    fn byte_order_is_bucket_then_seq_order() {
        let keys = [
            SegmentKey::start_of(0),
            SegmentKey { bucket: 0, seq: 1 },
            SegmentKey {
                bucket: 0,
                seq: 256,
            },
            SegmentKey::start_of(100),
            SegmentKey {
                bucket: 100,
                seq: u64::MAX,
            },
            SegmentKey::start_of(25_600),
            SegmentKey {
                bucket: u64::MAX - 15,
                seq: 3,
            },
        ];
        for pair in keys.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?}");
            assert!(pair[0].to_bytes() < pair[1].to_bytes(), "{pair:?}");
            assert!(pair[0].successor() <= pair[1], "{pair:?}");
        }
        // Index and metadata keys sort before every segment key, so no segment range scan
        // can run into them.
        assert!(id_key("~~~~").as_slice() < SegmentKey::start_of(0).to_bytes().as_slice());
        assert!(NEXT_SEQ_KEY < SegmentKey::start_of(0).to_bytes().as_slice());
    }

    #[test]
    fn round_trips_and_rejects_other_keys() {
        let key = SegmentKey {
            bucket: 1_796_061_600_200,
            seq: 42,
        };
        assert_eq!(SegmentKey::from_bytes(&key.to_bytes()), Some(key));
        assert_eq!(SegmentKey::from_bytes(&id_key("0123456789abcdef")), None);
        assert_eq!(SegmentKey::from_bytes(b"s"), None);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(99), 0);
        assert_eq!(bucket_of(100), 100);
        assert_eq!(bucket_of(1_796_061_600_250), 1_796_061_600_200);
    }
}
