//! The replicated log's entries: the body of each message of the log stream (format 1).
//!
//! The log is *physical*: a commit round is logged as the store changes it made (a
//! [`WriteBatch`](crate::store::WriteBatch)'s key changes, in order), so a follower that
//! applies them holds the same bytes as the leader: segments, the id index, generated ids
//! naming their segments, the counts and the intake mark all carry over to a new leader as
//! they were. Applying is idempotent (each change sets or removes a key outright).
//!
//! ```text
//! message  = version:u8 (1) · kind:u8 · rest
//! kind 1   = a part of a round: last:u8 (0|1) · bytes      (a round's encoding, cut in parts)
//! kind 2   = lead: the JSON holder that took over
//! round    = count:varint · change*
//! change   = 0 · key_len:varint · key                      (remove)
//!          | 1 · key_len:varint · key · len:varint · value  (put)
//! ```
//!
//! A round is cut into parts no larger than the server's `max_payload` allows, appended one
//! after the other; a follower applies it when it reads the last part. A leader that dies
//! after appending some parts leaves an unfinished round, which the next `lead` entry voids.

use bytes::{BufMut, Bytes, BytesMut};

use crate::store::Change;

/// The format of entries this build writes and reads.
pub(crate) const FORMAT: u8 = 1;
const PART: u8 = 1;
const LEAD: u8 = 2;
/// Bytes of a part's own header (version, kind, last).
pub(crate) const PART_HEADER: usize = 3;

/// An entry read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// A part of a round's changes; `last` ends the round.
    Part { last: bool, bytes: &'a [u8] },
    /// An instance took over as leader: any unfinished round before it is void.
    Lead { holder: &'a [u8] },
}

/// Why an entry (or a round's changes) cannot be read. Never from this build's own entries:
/// from a newer format, or from someone else writing to the log's subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("log entry of format {0}, this build reads format {FORMAT}")]
    Format(u8),
    #[error("log entry of unknown kind {0}")]
    Kind(u8),
    #[error("log entry cut short")]
    Short,
    #[error("log entry with {0} bytes after its last change")]
    Trailing(usize),
}

/// The message bodies logging one round of `changes`, each at most `max_message` bytes.
///
/// The changes are borrowed (a round's segments are not copied before they are encoded).
pub(crate) fn encode_round<'a>(
    changes: impl Iterator<Item = &'a Change> + Clone,
    max_message: usize,
) -> Vec<Bytes> {
    let (count, size) = changes.clone().fold((0u64, 0), |(n, size), (k, v)| {
        (n + 1, size + change_size(k, v))
    });
    let mut round = Vec::with_capacity(size);
    put_varint(&mut round, count);
    for (key, value) in changes {
        round.push(u8::from(value.is_some()));
        put_varint(&mut round, key.len() as u64);
        round.extend_from_slice(key);
        if let Some(value) = value {
            put_varint(&mut round, value.len() as u64);
            round.extend_from_slice(value);
        }
    }
    let room = max_message.saturating_sub(PART_HEADER).max(1);
    let count = round.len().div_ceil(room).max(1);
    let mut parts = Vec::with_capacity(count);
    let mut chunks = round.chunks(room).peekable();
    if chunks.peek().is_none() {
        parts.push(part(true, &[]));
    }
    while let Some(chunk) = chunks.next() {
        parts.push(part(chunks.peek().is_none(), chunk));
    }
    parts
}

fn part(last: bool, bytes: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(PART_HEADER + bytes.len());
    body.put_u8(FORMAT);
    body.put_u8(PART);
    body.put_u8(u8::from(last));
    body.put_slice(bytes);
    body.freeze()
}

/// The body of a `lead` entry.
pub(crate) fn encode_lead(holder: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(2 + holder.len());
    body.put_u8(FORMAT);
    body.put_u8(LEAD);
    body.put_slice(holder);
    body.freeze()
}

fn change_size(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    1 + 10 + key.len() + value.as_ref().map_or(0, |v| 10 + v.len())
}

/// Reads one message body.
pub(crate) fn decode(body: &[u8]) -> Result<Entry<'_>, EntryError> {
    match body {
        [FORMAT, PART, last @ (0 | 1), bytes @ ..] => Ok(Entry::Part {
            last: *last == 1,
            bytes,
        }),
        [FORMAT, PART, ..] => Err(EntryError::Short),
        [FORMAT, LEAD, holder @ ..] => Ok(Entry::Lead { holder }),
        [FORMAT, kind, ..] => Err(EntryError::Kind(*kind)),
        [FORMAT] => Err(EntryError::Short),
        [format, ..] => Err(EntryError::Format(*format)),
        [] => Err(EntryError::Short),
    }
}

/// Reads a whole round (its parts' bytes, joined).
pub(crate) fn decode_round(mut bytes: &[u8]) -> Result<Vec<Change>, EntryError> {
    let count = take_varint(&mut bytes)?;
    // Bounded by the bytes at hand (each change takes at least two), not by the count.
    let mut changes = Vec::with_capacity((count as usize).min(bytes.len() / 2));
    for _ in 0..count {
        let (&tag, rest) = bytes.split_first().ok_or(EntryError::Short)?;
        bytes = rest;
        let key = take_bytes(&mut bytes)?.to_vec();
        let value = match tag {
            0 => None,
            1 => Some(take_bytes(&mut bytes)?.to_vec()),
            other => return Err(EntryError::Kind(other)),
        };
        changes.push((key, value));
    }
    match bytes.len() {
        0 => Ok(changes),
        n => Err(EntryError::Trailing(n)),
    }
}

fn put_varint(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(unsigned_varint::encode::u64(
        n,
        &mut unsigned_varint::encode::u64_buffer(),
    ));
}

fn take_varint(bytes: &mut &[u8]) -> Result<u64, EntryError> {
    let (n, rest) = unsigned_varint::decode::u64(bytes).map_err(|_| EntryError::Short)?;
    *bytes = rest;
    Ok(n)
}

fn take_bytes<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], EntryError> {
    let len = take_varint(bytes)?;
    let len = usize::try_from(len).map_err(|_| EntryError::Short)?;
    if len > bytes.len() {
        return Err(EntryError::Short);
    }
    let (taken, rest) = bytes.split_at(len);
    *bytes = rest;
    Ok(taken)
}

/// Joins the parts of rounds as they are read from the log, in order.
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    /// The parts of the unfinished round so far.
    pending: Vec<u8>,
    /// Whether a part of an unfinished round was read.
    open: bool,
}

impl Rounds {
    /// Takes the next entry; returns a round's changes when `entry` finished one.
    pub fn feed(&mut self, entry: Entry<'_>) -> Result<Option<Vec<Change>>, EntryError> {
        match entry {
            Entry::Lead { .. } => {
                // A leader that died mid-round: what it appended of the round never counted.
                self.pending.clear();
                self.open = false;
                Ok(None)
            }
            Entry::Part { last: false, bytes } => {
                self.pending.extend_from_slice(bytes);
                self.open = true;
                Ok(None)
            }
            Entry::Part { last: true, bytes } => {
                let round = match self.open {
                    true => {
                        self.pending.extend_from_slice(bytes);
                        decode_round(&self.pending)
                    }
                    false => decode_round(bytes),
                };
                self.pending.clear();
                self.open = false;
                round.map(Some)
            }
        }
    }

    /// Whether a round was begun and not finished.
    #[cfg(test)]
    pub fn is_open(&self) -> bool {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn changes() -> impl Strategy<Value = Vec<Change>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            ),
            0..30,
        )
    }

    proptest! {
        #[test]
        fn a_round_reads_back_as_written_in_parts_of_any_size(
            changes in changes(),
            max in 1usize..400,
        ) {
            let parts = encode_round(changes.iter(), max);
            let mut rounds = Rounds::default();
            let mut got = None;
            for (i, body) in parts.iter().enumerate() {
                prop_assert!(body.len() <= max.max(PART_HEADER + 1));
                let fed = rounds.feed(decode(body).unwrap()).unwrap();
                prop_assert_eq!(fed.is_some(), i + 1 == parts.len());
                got = fed.or(got);
            }
            prop_assert_eq!(got.unwrap(), changes);
            prop_assert!(!rounds.is_open());
        }

        #[test]
        fn a_lead_voids_an_unfinished_round(
            dead in changes(),
            next in changes(),
        ) {
            let mut rounds = Rounds::default();
            let dead_parts = encode_round(dead.iter(), 16);
            // The dead leader appended all but the last part.
            for body in &dead_parts[..dead_parts.len() - 1] {
                prop_assert_eq!(rounds.feed(decode(body).unwrap()).unwrap(), None);
            }
            rounds.feed(decode(&encode_lead(b"{}")).unwrap()).unwrap();
            prop_assert!(!rounds.is_open());
            let mut got = None;
            for body in encode_round(next.iter(), 16) {
                got = rounds.feed(decode(&body).unwrap()).unwrap().or(got);
            }
            prop_assert_eq!(got.unwrap(), next);
        }

        #[test]
        fn any_bytes_decode_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&body);
            let _ = decode_round(&body);
            let mut rounds = Rounds::default();
            if let Ok(entry) = decode(&body) {
                let _ = rounds.feed(entry);
            }
        }
    }

    #[test]
    fn foreign_and_damaged_entries_are_refused() {
        assert_eq!(decode(&[2, 1, 1]), Err(EntryError::Format(2)));
        assert_eq!(decode(&[1, 9]), Err(EntryError::Kind(9)));
        assert_eq!(decode(&[1, 1]), Err(EntryError::Short));
        assert_eq!(decode(&[1, 1, 7]), Err(EntryError::Short));
        assert_eq!(decode(&[]), Err(EntryError::Short));
        assert_eq!(decode(&[1]), Err(EntryError::Short));
        // A count far beyond the bytes at hand allocates nothing big and fails.
        let mut huge = Vec::new();
        put_varint(&mut huge, u64::MAX);
        assert_eq!(decode_round(&huge), Err(EntryError::Short));
        let round = encode_round([(b"k".to_vec(), Some(b"v".to_vec()))].iter(), 100);
        let mut body = round[0].to_vec();
        body.push(0);
        let Entry::Part { bytes, .. } = decode(&body).unwrap() else {
            panic!("a part")
        };
        assert_eq!(decode_round(bytes), Err(EntryError::Trailing(1)));
    }
}
