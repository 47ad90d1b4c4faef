//! A schedule: the message natsched holds until it is due, and its compact on-disk encoding.
//!
//! The id and due instant are kept beside the value in the store's segment entry (see
//! [`crate::store::segment`]); the value holds the rest. Its layout is versioned by the
//! segment's format version (version 2); varints are unsigned LEB128:
//!
//! | field        | encoding                                                          |
//! |--------------|-------------------------------------------------------------------|
//! | kind         | `u8`: bits 0-1 delivery (0 = core NATS publish, 1 = JetStream publish awaiting the stream's PubAck), bit 2: a series follows, bit 3: headers follow |
//! | created      | varint: zigzag of (created − base) in ms; the segment gives the base (its earliest `created`), so a round's schedules take a byte or two |
//! | subject      | varint length + UTF-8                                             |
//! | series       | if kind bit 2: varint length + the [stored series](crate::recurrence) (segment format 3 only) |
//! | headers      | if kind bit 3: varint count, then per header varint name length + name, varint value length + value |
//! | payload      | the rest of the value                                             |
//!
//! It is compact because a stored schedule's size is what the store's size is made of: every
//! byte saved is about two on disk under sled's space overhead. A new field or meaning gets a
//! new segment format version; readers refuse versions they do not know rather than guess,
//! so a downgrade cannot misfire a record.

use bytes::Bytes;

use crate::recurrence::Series;
use crate::time::UnixMs;

/// How a due schedule is handed to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// A plain core-NATS publish, confirmed by a fence (see [`crate::delivery`]).
    #[default]
    Core,
    /// A JetStream publish with `Nats-Msg-Id`, done once the stream's PubAck is back.
    JetStream,
}

/// One pending message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The caller's `Sched-Id`, or one natsched generated.
    pub id: String,
    /// When to publish, in Unix ms.
    pub due: UnixMs,
    /// Where to publish.
    pub subject: String,
    /// The request's own headers, verbatim and in order (repeated names are repeated entries).
    pub headers: Vec<(String, String)>,
    /// The request's payload, verbatim.
    pub payload: Bytes,
    /// When natsched accepted it, in Unix ms.
    pub created: UnixMs,
    /// How to deliver it.
    pub delivery: Delivery,
    /// A recurring schedule's rule and state (`due` is its next occurrence); `None` for a
    /// one-shot schedule. Boxed: most schedules are one-shot.
    pub recurrence: Option<Box<Series>>,
    /// Whether the caller chose the id (`Sched-Id`). Caller ids are indexed in the store;
    /// generated ones are found from the due instant they encode (so are not, except in the
    /// rare case that the committer has to index one: see `Committer::commit`). Kept in the
    /// store's segment entry, not in the value.
    pub caller_id: bool,
}

/// Why a stored value could not be read back.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("segment format version {0} is not supported by this build")]
    UnknownVersion(u8),
    #[error("unknown delivery mode {0}")]
    UnknownDelivery(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("record field is not valid UTF-8")]
    NotUtf8,
    #[error("record holds a malformed number")]
    BadVarint,
    #[error("record holds an unusable recurrence rule: {0}")]
    Rule(String),
    #[error("a recurring schedule's record whose body (kept in its index entry) is missing")]
    NoBody,
}

const KIND_DELIVERY: u8 = 0b0011;
const KIND_RECURRENCE: u8 = 0b0100;
const KIND_HEADERS: u8 = 0b1000;

impl Schedule {
    /// What a delivery of this schedule publishes: the due instant, and for a series the
    /// occurrence's number (the one firing chose, see [`Series::catch_up`], else the stored
    /// one).
    pub fn occurrence(&self) -> (UnixMs, Option<u64>) {
        match self.recurrence.as_deref() {
            None => (self.due, None),
            Some(series) => match series.publishing {
                Some(occurrence) => (occurrence.due, Some(occurrence.seq)),
                None => (self.due, Some(series.seq)),
            },
        }
    }

    /// For a series handed out at `now`: chooses the occurrence to publish (the latest one
    /// due, see [`Series::catch_up`]).
    pub fn choose_occurrence(&mut self, now: UnixMs) {
        let due = self.due;
        if let Some(series) = self.recurrence.as_deref_mut() {
            series.publishing = Some(series.catch_up(due, now));
        }
    }

    /// Encodes everything but the id and due (those are the segment entry's) into a value,
    /// with `created` stored relative to `created_base`.
    pub fn encode_value(&self, created_base: UnixMs) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.subject.len() + self.payload.len());
        self.encode_value_into(&mut out, created_base);
        out
    }

    /// Appends the encoded value to `out` (what [`Schedule::encode_value`] returns).
    pub fn encode_value_into(&self, out: &mut Vec<u8>, created_base: UnixMs) {
        let mut kind = match self.delivery {
            Delivery::Core => 0,
            Delivery::JetStream => 1,
        };
        if self.recurrence.is_some() {
            kind |= KIND_RECURRENCE;
        }
        if !self.headers.is_empty() {
            kind |= KIND_HEADERS;
        }
        out.push(kind);
        let created = (self.created as i64).wrapping_sub(created_base as i64);
        put_varint(out, zigzag(created));
        put_str(out, &self.subject);
        if let Some(series) = &self.recurrence {
            let mut stored = Vec::with_capacity(32);
            series.encode_into(&mut stored);
            put_varint(out, stored.len() as u64);
            out.extend_from_slice(&stored);
        }
        if !self.headers.is_empty() {
            put_varint(out, self.headers.len() as u64);
            for (name, value) in &self.headers {
                put_str(out, name);
                put_str(out, value);
            }
        }
        out.extend_from_slice(&self.payload);
    }

    /// The subject of an encoded value, without decoding the rest.
    pub fn peek_subject(value: &[u8]) -> Result<&str, DecodeError> {
        let mut r = Reader(value);
        r.u8()?; // kind
        r.varint()?; // created
        r.str()
    }

    /// Rebuilds a schedule from its segment entry's parts and stored value.
    pub fn decode(
        id: String,
        due: UnixMs,
        created_base: UnixMs,
        value: &[u8],
    ) -> Result<Schedule, DecodeError> {
        let mut r = Reader(value);
        let kind = r.u8()?;
        let delivery = match kind & KIND_DELIVERY {
            0 => Delivery::Core,
            1 => Delivery::JetStream,
            other => return Err(DecodeError::UnknownDelivery(other)),
        };
        let created = (created_base as i64).wrapping_add(unzigzag(r.varint()?)) as u64;
        let subject = r.str()?.to_owned();
        let recurrence = match kind & KIND_RECURRENCE {
            0 => None,
            _ => {
                let len = r.length()?;
                Some(Box::new(Series::decode(r.take(len)?)?))
            }
        };
        let mut headers = Vec::new();
        if kind & KIND_HEADERS != 0 {
            let count = r.varint()?;
            // Each header takes at least two bytes: a damaged count cannot make us allocate.
            headers.reserve(count.min(r.0.len() as u64 / 2) as usize);
            for _ in 0..count {
                let name = r.str()?.to_owned();
                let value = r.str()?.to_owned();
                headers.push((name, value));
            }
        }
        Ok(Schedule {
            id,
            due,
            subject,
            headers,
            payload: Bytes::copy_from_slice(r.0),
            created,
            delivery,
            recurrence,
            caller_id: false,
        })
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

/// Appends `n` as a varint (unsigned LEB128).
pub(crate) fn put_varint(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(unsigned_varint::encode::u64(
        n,
        &mut unsigned_varint::encode::u64_buffer(),
    ));
}

/// Appends `s` as a varint length and its bytes.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over a value or segment being decoded.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let (n, rest) = unsigned_varint::decode::u64(self.0).map_err(|e| match e {
            unsigned_varint::decode::Error::Insufficient => DecodeError::Truncated,
            _ => DecodeError::BadVarint,
        })?;
        self.0 = rest;
        Ok(n)
    }

    /// A length, which must fit what is left.
    pub fn length(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > self.0.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.length()?;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::NotUtf8)
    }
}

/// A small schedule for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_schedule(id: &str, due: UnixMs, caller_id: bool) -> Schedule {
    Schedule {
        id: id.into(),
        due,
        subject: "t".into(),
        headers: vec![],
        payload: Bytes::from_static(b"p"),
        created: 0,
        delivery: Delivery::Core,
        recurrence: None,
        caller_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recurrence::Rule;
    use proptest::prelude::*;

    /// A segment's created base.
    const BASE: UnixMs = 1_796_061_000_000;

    fn sample() -> Schedule {
        Schedule {
            id: "order-42".into(),
            due: 1_796_061_600_250,
            subject: "orders.expired".into(),
            headers: vec![
                ("Trace".into(), "abc".into()),
                ("Multi".into(), "1".into()),
                ("Multi".into(), "2".into()),
            ],
            payload: Bytes::from_static(b"{\"order\":42}"),
            created: 1_796_061_000_000,
            delivery: Delivery::Core,
            recurrence: None,
            caller_id: false,
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let back = Schedule::decode(s.id.clone(), s.due, BASE, &s.encode_value(BASE)).unwrap();
        assert_eq!(back, s);
        let with_rule = Schedule {
            recurrence: Some(Box::new(Series::new(
                Rule::cron("*/5 * * * *", Some("Europe/Berlin")).unwrap(),
                Some(1_800_000_000_000),
                None,
                7,
            ))),
            ..sample()
        };
        let back =
            Schedule::decode(s.id.clone(), s.due, BASE, &with_rule.encode_value(BASE)).unwrap();
        assert_eq!(back, with_rule);
    }

    #[test]
    fn peeks_the_subject() {
        let value = sample().encode_value(BASE);
        assert_eq!(Schedule::peek_subject(&value), Ok("orders.expired"));
        assert!(Schedule::peek_subject(&value[..12]).is_err());
    }

    #[test]
    fn refuses_damage() {
        let mut value = sample().encode_value(BASE);
        value[0] |= 3;
        assert_eq!(
            Schedule::decode("x".into(), 0, BASE, &value),
            Err(DecodeError::UnknownDelivery(3))
        );
        // Anything cut before the payload is truncated; a cut payload is just a shorter one
        // (the segment's record length catches that).
        let value = sample().encode_value(BASE);
        let payload_at = value.len() - sample().payload.len();
        for cut in 0..payload_at {
            assert!(
                Schedule::decode("x".into(), sample().due, BASE, &value[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn created_may_be_before_its_base_and_zigzag_round_trips() {
        for n in [0, 1, -1, i64::MAX, i64::MIN, 600_000, -600_000] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
        let earlier = Schedule {
            created: BASE - 5_000,
            ..sample()
        };
        let back = Schedule::decode(
            earlier.id.clone(),
            earlier.due,
            BASE,
            &earlier.encode_value(BASE),
        );
        assert_eq!(back.unwrap(), earlier);
    }

    #[test]
    fn a_small_schedule_is_small() {
        let small = Schedule {
            headers: vec![],
            created: BASE + 5,
            ..sample()
        };
        // kind + created (one byte: next to its base) + subject + payload.
        let expected = 1 + 1 + 1 + small.subject.len() + small.payload.len();
        assert_eq!(small.encode_value(BASE).len(), expected);
    }

    proptest! {
        #[test]
        fn any_schedule_round_trips(
            subject in "[a-z.]{1,40}",
            headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,60}"), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            created in any::<u64>(),
            rule in proptest::option::of((1u64..u64::MAX, proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()), any::<u64>())),
            jetstream in any::<bool>(),
        ) {
            let s = Schedule {
                id: "id".into(),
                due: 7,
                subject,
                headers,
                payload: Bytes::from(payload),
                created,
                delivery: if jetstream { Delivery::JetStream } else { Delivery::Core },
                recurrence: rule.map(|(every, until, count, seq)| {
                    Box::new(Series::new(Rule::Every(every), until, count, seq))
                }),
                caller_id: false,
            };
            prop_assert_eq!(Schedule::decode("id".into(), 7, BASE, &s.encode_value(BASE)).unwrap(), s);
        }
    }
}
