//! A segment: the schedules of one commit round that are due in one time bucket, stored as one
//! value.
//!
//! Layout, format version 2, 3 or 4 (fixed-size integers big-endian, varints unsigned LEB128).
//! Version 3 is version 2 whose records may hold a recurring schedule's series; version 4
//! is version 3 whose records may be *thin* (below). Each is written only for segments that
//! need it, so a build that knows only an earlier version refuses them (rather than firing
//! a series once as if it were a one-shot schedule) and still reads every other segment:
//!
//! | field    | encoding                                                              |
//! |----------|-----------------------------------------------------------------------|
//! | version  | `u8` = 2                                                              |
//! | count    | `u32`                                                                 |
//! | base     | `u64` Unix ms: the earliest due of the segment when written           |
//! | created  | varint Unix ms: the earliest `created` of the segment when written (the record values' base) |
//! | far seq  | varint: the seq of the far segment whose ids the records may carry (see below), 0 if none |
//! | records  | per schedule: `u8` flags, varint due − base, the id, varint value length + [record value](crate::record) |
//!
//! Flags: bit 0, the id was given by the caller (and is indexed). Bit 3: a *thin* record, a
//! recurring schedule's state only: its value is varint seq (the number of the occurrence
//! due), and everything else (subject, headers, payload, rule) is its *body*, kept once in
//! the series' index entry (see `Store::series_body`) instead of in every segment the
//! series moves through as it fires. How the id is stored:
//! * bit 2 set: a [far id](crate::protocol::far_id) of the header's far seq, stored as its
//!   varint index (the due is the record's);
//! * bit 1 set: a *compact* id, a ULID natsched generated whose timestamp is the due instant,
//!   stored as its 10 random bytes;
//! * neither: varint length + UTF-8.
//!
//! Ids natsched generates thus take 1 or 10 bytes instead of 26 characters: at 10 million
//! schedules that is a large share of the store.
//!
//! Records can be dropped from an encoded segment without decoding them ([`without`]), which
//! is how fired schedules leave the store.

use ulid::Ulid;

use crate::protocol;
use crate::record::{DecodeError, Reader, Schedule, put_varint};

const SEGMENT_FORMAT: u8 = 2;
/// [`SEGMENT_FORMAT`] for a segment holding a recurring schedule.
const SEGMENT_FORMAT_SERIES: u8 = 3;
/// [`SEGMENT_FORMAT`] for a segment holding a thin record.
const SEGMENT_FORMAT_THIN: u8 = 4;
const FLAG_CALLER_ID: u8 = 1;
const FLAG_COMPACT_ID: u8 = 2;
const FLAG_FAR_ID: u8 = 4;
const FLAG_THIN: u8 = 8;

/// Bytes of a compact id: a ULID's random part.
const COMPACT_ID_LEN: usize = 10;
const ULID_LEN: usize = ulid::ULID_LEN;
/// The segment formats this build reads.
const FORMATS: [u8; 3] = [SEGMENT_FORMAT, SEGMENT_FORMAT_SERIES, SEGMENT_FORMAT_THIN];

/// Where the bodies of thin records are (the series' index entries): what decoding a
/// segment needs besides its bytes.
pub trait Bodies {
    /// The body of the series `id` (a schedule whose due and seq are not this record's), or
    /// `None` if it has none.
    fn body(&self, id: &str) -> Option<Schedule>;
}

/// For segments known to hold no thin record (and tests): no bodies.
pub struct NoBodies;

impl Bodies for NoBodies {
    fn body(&self, _: &str) -> Option<Schedule> {
        None
    }
}

/// Whether `schedule` is stored as a thin record.
pub fn is_thin(schedule: &Schedule) -> bool {
    schedule
        .recurrence
        .as_deref()
        .is_some_and(|series| series.body_indexed)
}

/// Encodes `schedules` as one segment value.
pub fn encode<'a>(schedules: impl IntoIterator<Item = &'a Schedule>) -> Vec<u8> {
    let schedules: Vec<&Schedule> = schedules.into_iter().collect();
    let base = schedules.iter().map(|s| s.due).min().unwrap_or(0);
    let created_base = schedules.iter().map(|s| s.created).min().unwrap_or(0);
    // Each id is parsed once: a generated one is stored as a far index or compactly.
    let generated: Vec<Option<Ulid>> = schedules.iter().map(|s| generated_ulid(s)).collect();
    // The far seq of the first far id (a far segment's ids all share it); 0 means none.
    let far_seq = generated
        .iter()
        .flatten()
        .find_map(|ulid| {
            protocol::far_layout(*ulid)
                .map(|(seq, _)| seq)
                .filter(|seq| *seq != 0)
        })
        .unwrap_or(0);
    let mut out = Vec::with_capacity(32 + 128 * schedules.len());
    let series = schedules.iter().any(|s| s.recurrence.is_some());
    let thin = schedules.iter().any(|s| is_thin(s));
    out.push(match (thin, series) {
        (true, _) => SEGMENT_FORMAT_THIN,
        (false, true) => SEGMENT_FORMAT_SERIES,
        (false, false) => SEGMENT_FORMAT,
    });
    out.extend_from_slice(&(schedules.len() as u32).to_be_bytes());
    out.extend_from_slice(&base.to_be_bytes());
    put_varint(&mut out, created_base);
    put_varint(&mut out, far_seq);
    let mut value = Vec::new();
    for (schedule, ulid) in schedules.into_iter().zip(generated) {
        let thin = is_thin(schedule);
        let caller = u8::from(schedule.caller_id) * FLAG_CALLER_ID + u8::from(thin) * FLAG_THIN;
        let far_index = ulid
            .and_then(protocol::far_layout)
            .filter(|(seq, _)| far_seq != 0 && *seq == far_seq);
        match (far_index, ulid) {
            (Some((_, index)), _) => {
                out.push(caller | FLAG_FAR_ID);
                put_varint(&mut out, schedule.due - base);
                put_varint(&mut out, u64::from(index));
            }
            (None, Some(ulid)) => {
                out.push(caller | FLAG_COMPACT_ID);
                put_varint(&mut out, schedule.due - base);
                out.extend_from_slice(&ulid.to_bytes()[16 - COMPACT_ID_LEN..]);
            }
            (None, None) => {
                out.push(caller);
                put_varint(&mut out, schedule.due - base);
                put_varint(&mut out, schedule.id.len() as u64);
                out.extend_from_slice(schedule.id.as_bytes());
            }
        }
        value.clear();
        match schedule.recurrence.as_deref() {
            Some(series) if thin => put_varint(&mut value, series.seq),
            _ => schedule.encode_value_into(&mut value, created_base),
        }
        put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(&value);
    }
    out
}

/// The ULID of a generated id that can be stored without its text: canonical, with the due
/// instant as its timestamp.
fn generated_ulid(schedule: &Schedule) -> Option<Ulid> {
    if schedule.caller_id || schedule.id.len() != ULID_LEN {
        return None;
    }
    protocol::canonical_ulid(&schedule.id).filter(|ulid| ulid.timestamp_ms() == schedule.due)
}

/// Decodes every schedule of a segment.
pub fn decode(bytes: &[u8], bodies: &impl Bodies) -> Result<Vec<Schedule>, DecodeError> {
    let mut out = Vec::new();
    for_each(bytes, |entry, _| {
        out.push(entry.decode(bodies)?);
        Ok(())
    })?;
    Ok(out)
}

/// Whether the segment holds a schedule with this id that was *not* indexed (a generated id).
pub fn holds_generated_id(bytes: &[u8], wanted: &str) -> Result<bool, DecodeError> {
    let mut found = false;
    for_each(bytes, |entry, _| {
        found |= entry.flags & FLAG_CALLER_ID == 0 && entry.id() == wanted;
        Ok(())
    })?;
    Ok(found)
}

/// The segment `bytes` without the schedules whose id `drop` matches, still encoded (`None` if
/// nothing is left), and how many were dropped.
pub fn without(
    bytes: &[u8],
    mut drop: impl FnMut(&str) -> bool,
) -> Result<(Option<Vec<u8>>, u32), DecodeError> {
    let mut out = Vec::with_capacity(bytes.len());
    let (mut count, mut dropped): (u32, u32) = (0, 0);
    for_each(bytes, |entry, record| {
        if out.is_empty() {
            // The header, unchanged but for the count: the records keep their meaning.
            let header_len = record.as_ptr() as usize - bytes.as_ptr() as usize;
            out.extend_from_slice(&bytes[..header_len]);
        }
        if drop(entry.id()) {
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

/// One schedule of a segment, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub due: u64,
    id: EntryId<'a>,
    flags: u8,
    created_base: u64,
    value: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
enum EntryId<'a> {
    Text(&'a str),
    /// A compact id, rendered as its ULID text.
    Compact([u8; ULID_LEN]),
}

impl Entry<'_> {
    pub fn id(&self) -> &str {
        match &self.id {
            EntryId::Text(id) => id,
            EntryId::Compact(text) => std::str::from_utf8(text).expect("ULID text is ASCII"),
        }
    }

    /// Decodes the whole schedule; a thin record's body comes from `bodies`.
    pub fn decode(&self, bodies: &impl Bodies) -> Result<Schedule, DecodeError> {
        if self.is_thin() {
            let body = bodies.body(self.id()).ok_or(DecodeError::NoBody)?;
            return self.decode_thin(body);
        }
        let mut schedule = Schedule::decode(
            self.id().to_owned(),
            self.due,
            self.created_base,
            self.value,
        )?;
        schedule.caller_id = self.flags & FLAG_CALLER_ID != 0;
        Ok(schedule)
    }

    /// Decodes a thin record whose body is `body`.
    pub fn decode_thin(&self, mut body: Schedule) -> Result<Schedule, DecodeError> {
        let seq = self.thin_seq()?;
        let series = body.recurrence.as_deref_mut().ok_or(DecodeError::NoBody)?;
        series.seq = seq;
        series.publishing = None;
        series.body_indexed = true;
        body.due = self.due;
        body.caller_id = self.flags & FLAG_CALLER_ID != 0;
        Ok(body)
    }

    /// Whether this is a thin record: its body is elsewhere (see [`Bodies`]).
    pub fn is_thin(&self) -> bool {
        self.flags & FLAG_THIN != 0
    }

    fn thin_seq(&self) -> Result<u64, DecodeError> {
        let mut r = Reader(self.value);
        let seq = r.varint()?;
        match r.0.len() {
            0 => Ok(seq),
            trailing => Err(DecodeError::TrailingBytes(trailing)),
        }
    }

    /// The target subject, read without decoding the rest; `None` for a thin record (its
    /// subject is in its body).
    pub fn subject(&self) -> Option<Result<&str, DecodeError>> {
        (!self.is_thin()).then(|| Schedule::peek_subject(self.value))
    }
}

/// The schedules of a segment as cheap [`Entry`]s borrowing from `bytes`.
pub fn entries(bytes: &[u8]) -> Result<Vec<Entry<'_>>, DecodeError> {
    let mut out = Vec::new();
    for_each(bytes, |entry, _| {
        out.push(entry);
        Ok(())
    })?;
    Ok(out)
}

/// Calls `visit(entry, whole encoded record)` for each record, checking the layout.
fn for_each<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(Entry<'a>, &'a [u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    records(bytes, |entry, record| visit(entry?, record)).map(|_| ())
}

/// Calls `visit(entry or why it is unreadable, whole encoded record)` for each record; returns
/// the record count of the header. An unreadable id is a record's own problem (the framing
/// says where the next record starts); unreadable framing ends the walk with an error.
fn records<'a>(
    bytes: &'a [u8],
    mut visit: impl FnMut(Result<Entry<'a>, DecodeError>, &'a [u8]) -> Result<(), DecodeError>,
) -> Result<u32, DecodeError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if !FORMATS.contains(&version) {
        return Err(DecodeError::UnknownVersion(version));
    }
    let count = u32::from_be_bytes(r.array()?);
    let base = u64::from_be_bytes(r.array()?);
    let created_base = r.varint()?;
    let far_seq = r.varint()?;
    for _ in 0..count {
        let record_start = r.0;
        let flags = r.u8()?;
        let due = base
            .checked_add(r.varint()?)
            .ok_or(DecodeError::BadVarint)?;
        let id = if flags & FLAG_FAR_ID != 0 {
            let index = u16::try_from(r.varint()?).map_err(|_| DecodeError::BadVarint);
            index.and_then(|index| {
                let ulid = protocol::far_ulid(due, far_seq, index).ok_or(DecodeError::BadVarint)?;
                let mut text = [0; ULID_LEN];
                ulid.array_to_str(&mut text);
                Ok(EntryId::Compact(text))
            })
        } else if flags & FLAG_COMPACT_ID != 0 {
            let random: [u8; COMPACT_ID_LEN] = r.array()?;
            let mut bytes = [0; 16];
            bytes[16 - COMPACT_ID_LEN..].copy_from_slice(&random);
            let random = u128::from_be_bytes(bytes);
            let mut text = [0; ULID_LEN];
            ulid::Ulid::from_parts(due, random).array_to_str(&mut text);
            Ok(EntryId::Compact(text))
        } else {
            let len = r.length()?;
            std::str::from_utf8(r.take(len)?)
                .map(EntryId::Text)
                .map_err(|_| DecodeError::NotUtf8)
        };
        let len = r.length()?;
        let value = r.take(len)?;
        let record = &record_start[..record_start.len() - r.0.len()];
        // A thin record in a segment that does not say it may hold one is damage, not a
        // record of an earlier format.
        let id = match flags & FLAG_THIN != 0 && version != SEGMENT_FORMAT_THIN {
            true => Err(DecodeError::UnknownVersion(version)),
            false => id,
        };
        let entry = id.map(|id| Entry {
            due,
            id,
            flags,
            created_base,
            value,
        });
        visit(entry, record)?;
    }
    if !r.0.is_empty() {
        return Err(DecodeError::TrailingBytes(r.0.len()));
    }
    Ok(count)
}

/// What could be read of a damaged segment.
#[derive(Debug)]
pub struct Salvage {
    /// Every schedule that decodes, in stored order.
    pub schedules: Vec<Schedule>,
    /// How many records could not be read: the header's count minus the readable ones, or
    /// `None` when the header itself is unreadable.
    pub lost: Option<u32>,
    /// The first thing found wrong.
    pub error: DecodeError,
}

/// Decodes a segment, keeping what is readable if it is damaged: a record whose id or value
/// does not decode is skipped (its length says where the next one starts), and damage to the
/// framing ends the reading there. `Ok` if nothing is damaged.
pub fn decode_salvaging(bytes: &[u8], bodies: &impl Bodies) -> Result<Vec<Schedule>, Salvage> {
    let mut schedules = Vec::new();
    let mut first_error = None;
    let walked = records(bytes, |entry, _| {
        match entry.and_then(|entry| entry.decode(bodies)) {
            Ok(schedule) => schedules.push(schedule),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
        Ok(())
    });
    let count = match walked {
        Ok(_) if first_error.is_none() => return Ok(schedules),
        Ok(count) => Some(count),
        Err(error) => {
            first_error.get_or_insert(error);
            header_count(bytes)
        }
    };
    Err(Salvage {
        lost: count.map(|count| count.saturating_sub(schedules.len() as u32)),
        schedules,
        error: first_error.unwrap_or(DecodeError::Truncated),
    })
}

/// The record count of a segment's header, if the header is readable.
fn header_count(bytes: &[u8]) -> Option<u32> {
    let mut r = Reader(bytes);
    FORMATS.contains(&r.u8().ok()?).then_some(())?;
    Some(u32::from_be_bytes(r.array().ok()?))
}

/// The readable entries of a segment, and the first thing found unreadable, if anything (see
/// [`decode_salvaging`]; an entry's value is not checked here).
pub fn entries_salvaging(bytes: &[u8]) -> (Vec<Entry<'_>>, Option<DecodeError>) {
    let mut out = Vec::new();
    let mut damage = None;
    let walked = records(bytes, |entry, _| {
        match entry {
            Ok(entry) => out.push(entry),
            Err(error) => {
                damage.get_or_insert(error);
            }
        }
        Ok(())
    });
    if let Err(error) = walked {
        damage.get_or_insert(error);
    }
    (out, damage)
}

/// Whether the readable part of the segment holds a schedule with this id, however its id is
/// stored. Never fails: damage elsewhere in the segment does not hide it.
pub fn holds_id(bytes: &[u8], wanted: &str) -> bool {
    let mut found = false;
    let _ = records(bytes, |entry, _| {
        found |= entry.is_ok_and(|e| e.id() == wanted);
        Ok(())
    });
    found
}

/// Whether the readable part of the segment holds a schedule with this id that was *not*
/// indexed (a generated id). Never fails: damage elsewhere in the segment does not hide it.
pub fn finds_generated_id(bytes: &[u8], wanted: &str) -> bool {
    let mut found = false;
    let _ = records(bytes, |entry, _| {
        found |= entry.is_ok_and(|e| e.flags & FLAG_CALLER_ID == 0 && e.id() == wanted);
        Ok(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Delivery;
    use bytes::Bytes;

    /// Decodes a segment without thin records.
    fn decode(bytes: &[u8]) -> Result<Vec<Schedule>, DecodeError> {
        super::decode(bytes, &NoBodies)
    }

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
    fn generated_ids_are_stored_compactly() {
        let due = 1_796_061_600_250;
        let generated = crate::protocol::generated_id(due);
        let far = crate::protocol::far_id(due + 7, 3, 1).unwrap();
        let all = [
            schedule(&generated, due, false),
            schedule(&far, due + 7, false),
            // Not compact: chosen by the caller, or not carrying the due instant.
            schedule(&crate::protocol::generated_id(due), due, true),
            schedule(&crate::protocol::generated_id(due - 1), due, false),
            schedule(&generated.to_lowercase(), due, false),
        ];
        let bytes = encode(&all);
        assert_eq!(decode(&bytes).unwrap(), all);
        let entries = entries(&bytes).unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id()).collect();
        let expected: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, expected);
        let one = |s: &Schedule| encode([s]).len();
        assert_eq!(
            one(&all[0]) + 17,
            one(&all[3]),
            "10 bytes instead of 1 + 26"
        );
        assert!(holds_generated_id(&bytes, &far).unwrap());
        // A far id of the segment's own far seq takes a byte: its index.
        let far_alone = schedule(&far, due + 7, false);
        assert_eq!(one(&far_alone) + 9, one(&all[0]), "1 byte instead of 10");
        let (kept, dropped) = without(&bytes, |id| id == generated || id == far).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(decode(&kept.unwrap()).unwrap(), all[2..]);
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

    /// Bodies kept in a map, as the index keeps them.
    struct Indexed(std::collections::HashMap<String, Schedule>);

    impl Bodies for Indexed {
        fn body(&self, id: &str) -> Option<Schedule> {
            self.0.get(id).cloned()
        }
    }

    fn thin_series(id: &str, due: u64, seq: u64) -> Schedule {
        let mut series = crate::recurrence::Series::every(1_000, seq);
        series.body_indexed = true;
        Schedule {
            payload: Bytes::from(vec![b'x'; 2_000]),
            recurrence: Some(Box::new(series)),
            ..schedule(id, due, true)
        }
    }

    #[test]
    fn a_thin_record_holds_due_and_seq_and_takes_its_body_from_the_index() {
        let fired = thin_series("s", 5_000, 5);
        let plain = schedule("p", 5_010, true);
        let bytes = encode([&fired, &plain]);
        assert!(
            bytes.len() < encode([&plain]).len() + 16,
            "the series' 2 000 bytes are not in its record ({} bytes)",
            bytes.len()
        );
        // The index keeps the body as it was scheduled: another due and seq.
        let body = Schedule {
            recurrence: Some(Box::new(crate::recurrence::Series::every(1_000, 1))),
            ..thin_series("s", 1_000, 1)
        };
        let bodies = Indexed([("s".to_owned(), body)].into());
        assert_eq!(
            super::decode(&bytes, &bodies).unwrap(),
            [fired.clone(), plain.clone()]
        );
        // A series scheduled by an earlier build keeps its whole record.
        let mut whole = fired.clone();
        whole.recurrence.as_deref_mut().unwrap().body_indexed = false;
        let whole_bytes = encode([&whole]);
        assert!(whole_bytes.len() > 2_000);
        assert_eq!(whole_bytes[0], SEGMENT_FORMAT_SERIES);
        assert_eq!(decode(&whole_bytes).unwrap(), [whole]);
        // Without its body the record is lost, and only it.
        let salvage = decode_salvaging(&bytes, &NoBodies).unwrap_err();
        assert_eq!(salvage.schedules, [plain]);
        assert_eq!(
            (salvage.lost, salvage.error),
            (Some(1), DecodeError::NoBody)
        );
        // A body that is not a series' is no body for it.
        let one_shot = Indexed([("s".to_owned(), schedule("s", 1, true))].into());
        assert!(super::decode(&bytes, &one_shot).is_err());
        // A thin record in a segment of an earlier format is damage.
        let mut older = bytes.clone();
        older[0] = SEGMENT_FORMAT_SERIES;
        assert_eq!(
            super::decode(&older, &bodies),
            Err(DecodeError::UnknownVersion(SEGMENT_FORMAT_SERIES))
        );
        // Records are dropped from it as from any segment.
        let (kept, dropped) = without(&bytes, |id| id == "p").unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(super::decode(&kept.unwrap(), &bodies).unwrap(), [fired]);
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

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::record::test_schedule;
    use proptest::prelude::*;

    /// Decodes a segment without thin records.
    fn decode(bytes: &[u8]) -> Result<Vec<Schedule>, DecodeError> {
        super::decode(bytes, &NoBodies)
    }

    /// A schedule with an id of any kind the store sees: caller-chosen, generated, a far id
    /// (of one of two segments), or a ULID-looking id that is not the due's.
    fn any_schedule() -> impl Strategy<Value = Schedule> {
        let due = 1_700_000_000_000u64..1_700_100_000_000;
        let created = 1_690_000_000_000u64..1_710_000_000_000;
        (
            due,
            created,
            0u8..5,
            1u64..3,
            any::<u16>(),
            "[a-z0-9]{1,20}",
        )
            .prop_map(|(due, created, kind, seq, index, text)| {
                let (id, caller_id) = match kind {
                    0 => (text, true),
                    1 => (crate::protocol::generated_id(due), false),
                    2 => (crate::protocol::far_id(due, seq, index).unwrap(), false),
                    3 => (crate::protocol::generated_id(due + 1), false),
                    _ => (text, false),
                };
                Schedule {
                    created,
                    ..test_schedule(&id, due, caller_id)
                }
            })
    }

    proptest! {
        #[test]
        fn any_segment_round_trips_and_filters(
            schedules in proptest::collection::vec(any_schedule(), 0..40),
            drop_mask in any::<u64>(),
        ) {
            let bytes = encode(&schedules);
            prop_assert_eq!(decode(&bytes).unwrap(), schedules.clone());
            let dropped_ids: Vec<&str> = schedules
                .iter()
                .enumerate()
                .filter(|(i, _)| drop_mask >> i & 1 == 1)
                .map(|(_, s)| s.id.as_str())
                .collect();
            let kept: Vec<Schedule> = schedules
                .iter()
                .filter(|s| !dropped_ids.contains(&s.id.as_str()))
                .cloned()
                .collect();
            let (rest, dropped) = without(&bytes, |id| dropped_ids.contains(&id)).unwrap();
            prop_assert_eq!(dropped as usize, schedules.len() - kept.len());
            let rest = rest.map(|r| decode(&r).unwrap()).unwrap_or_default();
            prop_assert_eq!(rest, kept);
        }
    }
}
