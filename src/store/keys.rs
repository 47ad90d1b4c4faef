//! The store's key layout: one sled tree, key spaces told apart by their first byte.
//!
//! | key                                          | value                                  |
//! |----------------------------------------------|----------------------------------------|
//! | `f` · bucket (`u64` BE Unix ms) · seq (`u64` BE) | a *far* [segment](super::segment): sparse schedules of one commit round due in that [`FAR_BUCKET_MS`] bucket |
//! | `i` · id                                     | the segment key holding that id; for a series also its due there and its body (see `series_index.rs`) |
//! | `m` · name                                   | metadata: format version, next segment seq, pending count (in all and per quota) |
//! | `q` · segment key                            | the original bytes of a damaged segment, kept for inspection (see `Store::scan`) |
//! | `s` · bucket (`u64` BE Unix ms) · seq (`u64` BE) | a *fine* [segment](super::segment): the schedules of one commit round due in that [`BUCKET_MS`] bucket |
//!
//! Schedules are stored in *segments*, not one key each: a commit round writes one value per
//! time bucket its schedules fall in. That makes intake, loading and deletion cost per segment
//! instead of per schedule (sled copies a whole leaf node on every key it inserts, and costs
//! a few hundred bytes of disk per key). Byte order of segment keys is bucket order, so "what
//! is due next" is a range scan from a cursor.
//!
//! Two tiers, because one bucket width cannot suit both dense and sparse schedules:
//!
//! * **Fine** segments (100 ms buckets) are what the wheel loads and what firing deletes
//!   from: a bucket fires within 100 ms, so a fired segment is usually deleted whole instead
//!   of being rewritten again and again.
//! * **Far** segments (1 min buckets) hold schedules too sparse to fill a fine segment (a few
//!   per 100 ms, e.g. 10 million spread over 30 days) while they are still far from due; one
//!   key per schedule would cost sled several times the schedule's own size. Before the
//!   wheel's horizon reaches a far bucket, the store's writer moves its schedules into fine
//!   segments (see `crate::committer`).
//!
//! Only ids given by callers (`Sched-Id`) are indexed under `i`. Ids natsched generates are
//! ULIDs whose timestamp is the due instant, so their fine bucket can be found without an
//! index entry; a generated id of a far schedule also carries its far segment's seq (see
//! [`crate::protocol::far_id`]).

use crate::time::UnixMs;

/// Width of a fine time bucket.
pub const BUCKET_MS: UnixMs = 100;
/// Width of a far time bucket.
pub const FAR_BUCKET_MS: UnixMs = 60_000;

const FAR_PREFIX: u8 = b'f';
const ID_PREFIX: u8 = b'i';
const QUARANTINE_PREFIX: u8 = b'q';
const FINE_PREFIX: u8 = b's';
/// Where the store's format version is kept.
pub(crate) const FORMAT_KEY: &[u8] = b"mformat";
/// Where the next segment sequence number is kept.
pub(crate) const NEXT_SEQ_KEY: &[u8] = b"mnextseq";
/// Where the number of pending schedules is kept.
pub(crate) const PENDING_KEY: &[u8] = b"mpending";
/// Where the pending counts per quota are kept (JSON: `[[pattern, count], …]`), when quotas
/// are configured.
pub(crate) const QUOTAS_KEY: &[u8] = b"mquotas";
/// Where the JetStream intake's mark is kept: the intake stream's creation time and the
/// stream sequences stored, as ranges (see `committer/intake_mark.rs`).
pub(crate) const INTAKE_MARK_KEY: &[u8] = b"mintake";
/// Present when the pending counts may be off (a damaged segment lost schedules whose number
/// or quotas are unknown): the next start counts them again.
pub(crate) const RECOUNT_KEY: &[u8] = b"mrecount";
/// Where the end of the last bucket that may hold ids of store format 2 is kept (see
/// `Store::locate`).
pub(crate) const LEGACY_IDS_KEY: &[u8] = b"mlegacyids";
/// Where the first segment seq written by store format 3 is kept: only segments below it can
/// hold ids of store format 2.
pub(crate) const LEGACY_SEQS_KEY: &[u8] = b"mlegacyseqs";
/// Where this store's own id is kept: made once, never copied to another store (the lease of
/// `crate::cluster` knows its holder by it).
pub(crate) const INSTANCE_KEY: &[u8] = b"minstance";
/// Where a replicated store keeps the sequence of the last log entry it applied (see
/// `crate::cluster`): written in the same batch as the entry's changes.
pub(crate) const LOG_APPLIED_KEY: &[u8] = b"mlogapplied";

/// Where the store writer keeps the latest wall-clock reading it committed (Unix ms; see
/// `Store::locate_series`).
pub(crate) const CLOCK_MARK_KEY: &[u8] = b"mclock";

/// Where a replicated store keeps which log it follows (the log stream's name and creation
/// time): a store never follows another log than the one it was filled from.
pub(crate) const LOG_ID_KEY: &[u8] = b"mlogid";

/// Whether `key` belongs to this store alone and is never replicated: its id, its format
/// (each store writes its own when opened), its place in the log, and what its own damage
/// left (a recount to do, quarantined bytes).
pub(crate) fn is_local(key: &[u8]) -> bool {
    [
        INSTANCE_KEY,
        FORMAT_KEY,
        LOG_APPLIED_KEY,
        LOG_ID_KEY,
        RECOUNT_KEY,
    ]
    .contains(&key)
        || key.first() == Some(&QUARANTINE_PREFIX)
}

/// The first byte of every id-index key.
pub(crate) const ID_KEYS: &[u8] = &[ID_PREFIX];

/// The start of the fine bucket `due` falls in.
pub fn bucket_of(due: UnixMs) -> UnixMs {
    due - due % BUCKET_MS
}

/// The start of the far bucket `due` falls in.
pub fn far_bucket_of(due: UnixMs) -> UnixMs {
    due - due % FAR_BUCKET_MS
}

/// Which kind of segment a key names. Ordered like the key bytes: far before fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Far,
    Fine,
}

/// The key of a segment, or a boundary between segment keys. Ordered as (tier, bucket, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentKey {
    pub tier: Tier,
    /// Start of the bucket the segment's schedules are due in.
    pub bucket: UnixMs,
    /// Unique, increasing per segment written (shared by both tiers); a far segment's
    /// schedules move to fine segments of its seq (one per fine bucket), so the ids that name
    /// the seq stay valid.
    pub seq: u64,
}

impl SegmentKey {
    /// The fine segment `seq` of `bucket`.
    pub fn fine(bucket: UnixMs, seq: u64) -> SegmentKey {
        SegmentKey {
            tier: Tier::Fine,
            bucket,
            seq,
        }
    }

    /// The far segment `seq` of `bucket`.
    pub fn far(bucket: UnixMs, seq: u64) -> SegmentKey {
        SegmentKey {
            tier: Tier::Far,
            bucket,
            seq,
        }
    }

    /// The boundary before every segment of `tier` (all of its keys are above it).
    pub fn first_of(tier: Tier) -> SegmentKey {
        SegmentKey {
            tier,
            bucket: 0,
            seq: 0,
        }
    }

    /// The fine segment that a schedule due at `due` in this far segment moves to when the
    /// segment is migrated (the same seq, the due's bucket): the key the wheel knows the
    /// schedule by even if it was loaded before the migration (during a store outage). A fine
    /// key is its own.
    pub fn migrated(self, due: UnixMs) -> SegmentKey {
        match self.tier {
            Tier::Far => SegmentKey::fine(bucket_of(due), self.seq),
            Tier::Fine => self,
        }
    }

    /// The far segment this fine segment's schedules were migrated from, if they were (the
    /// same seq; a seq names one segment only, so for any other fine segment there is none).
    pub fn far_origin(self) -> SegmentKey {
        SegmentKey::far(far_bucket_of(self.bucket), self.seq)
    }

    /// The boundary before every fine segment of `bucket` and later.
    pub fn start_of(bucket: UnixMs) -> SegmentKey {
        SegmentKey::fine(bucket, 0)
    }

    /// The smallest key of the same tier greater than this one.
    pub fn successor(self) -> SegmentKey {
        match self.seq.checked_add(1) {
            Some(seq) => SegmentKey { seq, ..self },
            None => SegmentKey {
                bucket: self.bucket.saturating_add(1),
                seq: 0,
                ..self
            },
        }
    }

    pub fn to_bytes(self) -> [u8; 17] {
        let mut key = [0; 17];
        key[0] = match self.tier {
            Tier::Far => FAR_PREFIX,
            Tier::Fine => FINE_PREFIX,
        };
        key[1..9].copy_from_slice(&self.bucket.to_be_bytes());
        key[9..].copy_from_slice(&self.seq.to_be_bytes());
        key
    }

    /// Parses a segment key read from the store (or an id-index value).
    pub fn from_bytes(bytes: &[u8]) -> Option<SegmentKey> {
        let bytes: &[u8; 17] = bytes.try_into().ok()?;
        let tier = match bytes[0] {
            FAR_PREFIX => Tier::Far,
            FINE_PREFIX => Tier::Fine,
            _ => return None,
        };
        Some(SegmentKey {
            tier,
            bucket: u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(bytes[9..].try_into().expect("8 bytes")),
        })
    }
}

/// Where the original bytes of the damaged segment `key` are kept once its readable
/// schedules have been rewritten without the rest: out of every segment range, for
/// inspection, never loaded or listed.
pub fn quarantine_key(key: SegmentKey) -> [u8; 18] {
    let mut out = [0; 18];
    out[0] = QUARANTINE_PREFIX;
    out[1..].copy_from_slice(&key.to_bytes());
    out
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
            SegmentKey::fine(0, 1),
            SegmentKey::fine(0, 256),
            SegmentKey::start_of(100),
            SegmentKey::fine(100, u64::MAX),
            SegmentKey::start_of(25_600),
            SegmentKey::fine(u64::MAX - 15, 3),
        ];
        for pair in keys.windows(2) {
            assert!(pair[0] < pair[1], "{pair:?}");
            assert!(pair[0].to_bytes() < pair[1].to_bytes(), "{pair:?}");
            assert!(pair[0].successor() <= pair[1], "{pair:?}");
        }
        // Index and metadata keys sort between the far and the fine segment keys, so no
        // segment range scan can run into them.
        let last_far = SegmentKey::far(u64::MAX, u64::MAX).to_bytes();
        let first_fine = SegmentKey::start_of(0).to_bytes();
        let quarantined = quarantine_key(SegmentKey::fine(u64::MAX, u64::MAX)).to_vec();
        for key in [
            id_key(""),
            id_key("~~~~"),
            NEXT_SEQ_KEY.to_vec(),
            quarantined,
        ] {
            assert!(last_far.as_slice() < key.as_slice(), "{key:?}");
            assert!(key.as_slice() < first_fine.as_slice(), "{key:?}");
        }
        assert!(SegmentKey::far(5, 0) < SegmentKey::start_of(0));
    }

    #[test]
    fn round_trips_and_rejects_other_keys() {
        for key in [
            SegmentKey::fine(1_796_061_600_200, 42),
            SegmentKey::far(1_796_061_560_000, 43),
        ] {
            assert_eq!(SegmentKey::from_bytes(&key.to_bytes()), Some(key));
        }
        assert_eq!(SegmentKey::from_bytes(&id_key("0123456789abcdef")), None);
        assert_eq!(SegmentKey::from_bytes(b"s"), None);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(99), 0);
        assert_eq!(bucket_of(100), 100);
        assert_eq!(bucket_of(1_796_061_600_250), 1_796_061_600_200);
        assert_eq!(far_bucket_of(59_999), 0);
        assert_eq!(far_bucket_of(1_796_061_600_250), 1_796_061_600_000);
    }
}
