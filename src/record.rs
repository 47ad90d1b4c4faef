//! A schedule: the message natsched holds until it is due, and its versioned on-disk encoding.
//!
//! The id and due instant are kept beside the value in the store's segment entry (see
//! [`crate::store`]); the value holds the rest.
//! Value layout, format version 1 (all integers big-endian):
//!
//! | field        | encoding                                             |
//! |--------------|------------------------------------------------------|
//! | version      | `u8` = 1                                             |
//! | delivery     | `u8`: 0 = core NATS publish (JetStream comes later)  |
//! | created      | `u64` Unix ms when the schedule was accepted         |
//! | subject      | `u16` length + UTF-8                                 |
//! | recurrence   | `u8` 0 = none, 1 = `u16` length + UTF-8 rule (reserved: always none in v1) |
//! | headers      | `u16` count, then per header `u16` name length + name, `u32` value length + value |
//! | payload      | `u32` length + bytes                                 |
//!
//! A new field or meaning gets a new version byte; readers refuse versions they do not know rather
//! than guess, so a downgrade cannot misfire a record.

use bytes::Bytes;

use crate::time::UnixMs;

/// The value-format version written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// How a due schedule is handed to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// A plain core-NATS publish, confirmed by a client flush.
    #[default]
    Core,
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
    /// Reserved for recurring schedules (a cron or interval rule); `None` for one-shot schedules.
    pub recurrence: Option<String>,
    /// Whether the caller chose the id (`Sched-Id`). Caller ids are indexed in the store;
    /// generated ones are found from the due instant they encode. Kept in the store's
    /// segment entry, not in the value.
    pub caller_id: bool,
}

/// Why a stored value could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "record format version {0} is not supported by this build (it writes {FORMAT_VERSION})"
    )]
    UnknownVersion(u8),
    #[error("unknown delivery mode {0}")]
    UnknownDelivery(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("record field is not valid UTF-8")]
    NotUtf8,
}

impl Schedule {
    /// Encodes everything but the id and due (those are the key) into a store value.
    pub fn encode_value(&self) -> Vec<u8> {
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.len() + v.len())
            .sum();
        let mut out =
            Vec::with_capacity(16 + self.subject.len() + headers_len + self.payload.len() + 4 + 3);
        self.encode_value_into(&mut out);
        out
    }

    /// Appends the encoded value to `out` (what [`Schedule::encode_value`] returns), so a
    /// segment can be written without a buffer per schedule.
    pub fn encode_value_into(&self, out: &mut Vec<u8>) {
        out.push(FORMAT_VERSION);
        out.push(match self.delivery {
            Delivery::Core => 0,
        });
        out.extend_from_slice(&self.created.to_be_bytes());
        put_u16_str(out, &self.subject);
        match &self.recurrence {
            None => out.push(0),
            Some(rule) => {
                out.push(1);
                put_u16_str(out, rule);
            }
        }
        out.extend_from_slice(&(self.headers.len() as u16).to_be_bytes());
        for (name, value) in &self.headers {
            put_u16_str(out, name);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// The subject of an encoded value, without decoding the rest.
    pub fn peek_subject(value: &[u8]) -> Result<&str, DecodeError> {
        let mut r = Reader(value);
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        r.take(1 + 8)?; // delivery, created
        let len = u16::from_be_bytes(r.array()?) as usize;
        std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::NotUtf8)
    }

    /// Rebuilds a schedule from its key parts and stored value.
    pub fn decode(id: String, due: UnixMs, value: &[u8]) -> Result<Schedule, DecodeError> {
        let mut r = Reader(value);
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let delivery = match r.u8()? {
            0 => Delivery::Core,
            other => return Err(DecodeError::UnknownDelivery(other)),
        };
        let created = u64::from_be_bytes(r.array()?);
        let subject = r.u16_str()?;
        let recurrence = match r.u8()? {
            0 => None,
            _ => Some(r.u16_str()?),
        };
        let count = u16::from_be_bytes(r.array()?);
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = r.u16_str()?;
            let len = u32::from_be_bytes(r.array()?) as usize;
            let value = utf8(r.take(len)?)?;
            headers.push((name, value));
        }
        let len = u32::from_be_bytes(r.array()?) as usize;
        let payload = Bytes::copy_from_slice(r.take(len)?);
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(r.0.len()));
        }
        Ok(Schedule {
            id,
            due,
            subject,
            headers,
            payload,
            created,
            delivery,
            recurrence,
            caller_id: false,
        })
    }
}

fn put_u16_str(out: &mut Vec<u8>, s: &str) {
    // Subjects, header names and rules are far below 64 KiB: NATS caps a control line at 4 KiB.
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
}

/// A cursor over a value being decoded.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16_str(&mut self) -> Result<String, DecodeError> {
        let len = u16::from_be_bytes(self.array()?) as usize;
        utf8(self.take(len)?)
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
    use proptest::prelude::*;

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
        let back = Schedule::decode(s.id.clone(), s.due, &s.encode_value()).unwrap();
        assert_eq!(back, s);
        let with_rule = Schedule {
            recurrence: Some("*/5 * * * *".into()),
            ..sample()
        };
        let back = Schedule::decode(s.id.clone(), s.due, &with_rule.encode_value()).unwrap();
        assert_eq!(back, with_rule);
    }

    #[test]
    fn peeks_the_subject() {
        let value = sample().encode_value();
        assert_eq!(Schedule::peek_subject(&value), Ok("orders.expired"));
        assert!(Schedule::peek_subject(&value[..12]).is_err());
    }

    #[test]
    fn refuses_unknown_versions_and_damage() {
        let mut value = sample().encode_value();
        value[0] = 2;
        assert_eq!(
            Schedule::decode("x".into(), 0, &value),
            Err(DecodeError::UnknownVersion(2))
        );
        let value = sample().encode_value();
        for cut in 0..value.len() {
            assert_eq!(
                Schedule::decode("x".into(), 0, &value[..cut]),
                Err(DecodeError::Truncated),
                "cut at {cut}"
            );
        }
        let mut long = value.clone();
        long.push(0);
        assert_eq!(
            Schedule::decode("x".into(), 0, &long),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    proptest! {
        #[test]
        fn any_schedule_round_trips(
            subject in "[a-z.]{1,40}",
            headers in proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,60}"), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            created in any::<u64>(),
            rule in proptest::option::of("[ -~]{0,30}"),
        ) {
            let s = Schedule {
                id: "id".into(),
                due: 7,
                subject,
                headers,
                payload: Bytes::from(payload),
                created,
                delivery: Delivery::Core,
                recurrence: rule,
                caller_id: false,
            };
            prop_assert_eq!(Schedule::decode("id".into(), 7, &s.encode_value()).unwrap(), s);
        }
    }
}
