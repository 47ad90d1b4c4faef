//! A segment: the schedules of one commit round that are due in one time bucket, stored as one
//! value.
//!
//! Layout (integers big-endian):
//!
//! | field    | encoding                                                              |
//! |----------|-----------------------------------------------------------------------|
//! | version  | `u8` = 1                                                              |
//! | count    | `u32`                                                                 |
//! | records  | per schedule: `u8` flags (bit 0: the id was given by the caller and is indexed), `u64` due, `u16` id length + id, `u32` value length + [record value](crate::record) |

use crate::record::{DecodeError, Schedule};

const SEGMENT_FORMAT: u8 = 1;
const FLAG_CALLER_ID: u8 = 1;

/// Encodes `schedules` as one segment value.
pub fn encode<'a>(schedules: impl IntoIterator<Item = &'a Schedule>) -> Vec<u8> {
    let mut out = vec![SEGMENT_FORMAT, 0, 0, 0, 0];
    let mut count: u32 = 0;
    for schedule in schedules {
        count += 1;
        out.push(if schedule.caller_id {
            FLAG_CALLER_ID
        } else {
            0
        });
        out.extend_from_slice(&schedule.due.to_be_bytes());
        out.extend_from_slice(&(schedule.id.len() as u16).to_be_bytes());
        out.extend_from_slice(schedule.id.as_bytes());
        // The value's length goes before it: reserve it, write the value, then fill it in.
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        schedule.encode_value_into(&mut out);
        let length = (out.len() - length_at - 4) as u32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
    }
    out[1..5].copy_from_slice(&count.to_be_bytes());
    out
}

/// Decodes every schedule of a segment value.
pub fn decode(bytes: &[u8]) -> Result<Vec<Schedule>, DecodeError> {
    let mut out = Vec::new();
    for_each(bytes, |flags, due, id, value| {
        let mut schedule = Schedule::decode(utf8(id)?, due, value)?;
        schedule.caller_id = flags & FLAG_CALLER_ID != 0;
        out.push(schedule);
        Ok(())
    })?;
    Ok(out)
}

/// Whether the segment holds a schedule with this id that was *not* indexed (a generated id).
pub fn holds_generated_id(bytes: &[u8], wanted: &str) -> Result<bool, DecodeError> {
    let mut found = false;
    for_each(bytes, |flags, _, id, _| {
        found |= flags & FLAG_CALLER_ID == 0 && id == wanted.as_bytes();
        Ok(())
    })?;
    Ok(found)
}

/// The segment `bytes` without the schedules whose id `drop` matches, still encoded (`None` if
/// nothing is left), and how many were dropped.
pub fn without(
    bytes: &[u8],
    drop: impl Fn(&str) -> bool,
) -> Result<(Option<Vec<u8>>, u32), DecodeError> {
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&[SEGMENT_FORMAT, 0, 0, 0, 0]);
    let (mut count, mut dropped): (u32, u32) = (0, 0);
    for_each_raw(bytes, |id, record| {
        if drop(std::str::from_utf8(id).map_err(|_| DecodeError::NotUtf8)?) {
            dropped += 1;
        } else {
            count += 1;
            out.extend_from_slice(record);
        }
        Ok(())
    })?;
    if count == 0 {
        return Ok((None, dropped));
    }
    out[1..5].copy_from_slice(&count.to_be_bytes());
    Ok((Some(out), dropped))
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
}

/// One schedule of a segment, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub due: u64,
    pub id: &'a str,
    flags: u8,
    value: &'a [u8],
}

impl Entry<'_> {
    /// Decodes the whole schedule.
    pub fn decode(&self) -> Result<Schedule, DecodeError> {
        let mut schedule = Schedule::decode(self.id.to_owned(), self.due, self.value)?;
        schedule.caller_id = self.flags & FLAG_CALLER_ID != 0;
        Ok(schedule)
    }

    /// The target subject, read without decoding the rest.
    pub fn subject(&self) -> Result<&str, DecodeError> {
        Schedule::peek_subject(self.value)
    }
}

/// The schedules of a segment as cheap [`Entry`]s borrowing from `bytes`.
pub fn entries(bytes: &[u8]) -> Result<Vec<Entry<'_>>, DecodeError> {
    let mut out = Vec::new();
    for_each(bytes, |flags, due, id, value| {
        let id = std::str::from_utf8(id).map_err(|_| DecodeError::NotUtf8)?;
        out.push(Entry {
            due,
            id,
            flags,
            value,
        });
        Ok(())
    })?;
    Ok(out)
}

fn for_each<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(u8, u64, &'a [u8], &'a [u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    for_each_raw(bytes, |_, record| {
        // The layout was checked by `for_each_raw`; these reads cannot fail.
        let flags = record[0];
        let due = u64::from_be_bytes(record[1..9].try_into().expect("8 bytes"));
        let id_len = u16::from_be_bytes(record[9..11].try_into().expect("2 bytes")) as usize;
        let id = &record[11..11 + id_len];
        let value = &record[11 + id_len + 4..];
        visit(flags, due, id, value)
    })
}

/// Calls `visit(id, whole encoded record)` for each record, checking the layout.
fn for_each_raw<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(&'a [u8], &'a [u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], DecodeError> {
        if rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let version = take(1)?[0];
    if version != SEGMENT_FORMAT {
        return Err(DecodeError::UnknownVersion(version));
    }
    let count = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes"));
    for _ in 0..count {
        let header = take(11)?; // flags, due, id length
        let id_len = u16::from_be_bytes(header[9..11].try_into().expect("2 bytes")) as usize;
        let id = take(id_len)?;
        let value_len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        take(value_len)?;
        let record_len = 11 + id_len + 4 + value_len;
        // The record is the bytes just taken, contiguous in the input.
        let start = id.as_ptr() as usize - bytes.as_ptr() as usize - 11;
        visit(id, &bytes[start..start + record_len])?;
    }
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Delivery;
    use bytes::Bytes;

    fn schedule(id: &str, due: u64, caller_id: bool) -> Schedule {
        Schedule {
            id: id.into(),
            due,
            subject: "orders.expired".into(),
            headers: vec![("H".into(), "v".into())],
            payload: Bytes::from_static(b"{}"),
            created: 5,
            delivery: Delivery::Core,
            recurrence: None,
            caller_id,
        }
    }

    #[test]
    fn round_trips_with_flags() {
        let all = [
            schedule("a", 10, true),
            schedule("b", 11, false),
            schedule("c", 11, true),
        ];
        let bytes = encode(&all);
        assert_eq!(decode(&bytes).unwrap(), all);
        assert!(holds_generated_id(&bytes, "b").unwrap());
        assert!(
            !holds_generated_id(&bytes, "a").unwrap(),
            "caller ids are found via the index"
        );
        assert!(!holds_generated_id(&bytes, "zz").unwrap());
        assert_eq!(decode(&encode(&[])).unwrap(), []);
    }

    #[test]
    fn without_filters_encoded_records() {
        let all = [
            schedule("a", 10, true),
            schedule("b", 11, false),
            schedule("c", 12, true),
        ];
        let bytes = encode(&all);
        let (kept, dropped) = without(&bytes, |id| id == "b").unwrap();
        assert_eq!(
            decode(&kept.unwrap()).unwrap(),
            [all[0].clone(), all[2].clone()]
        );
        assert_eq!(dropped, 1);
        assert_eq!(
            without(&bytes, |_| false).unwrap(),
            (Some(bytes.clone()), 0)
        );
        assert_eq!(without(&bytes, |_| true).unwrap(), (None, 3));
        assert!(without(&bytes[..bytes.len() - 1], |_| false).is_err());
    }

    #[test]
    fn refuses_damage() {
        let bytes = encode(&[schedule("a", 10, true)]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::TrailingBytes(1)));
        let mut other = bytes;
        other[0] = 9;
        assert_eq!(decode(&other), Err(DecodeError::UnknownVersion(9)));
    }
}
