//! Fuzzes the store's decoders on raw bytes: a segment value (`segment::decode`, `entries`,
//! `without`, `holds_generated_id`), a record value (`Schedule::decode`, `peek_subject`) and a
//! segment key. What is on disk may be damaged: every reader must refuse it with an error,
//! never panic, and the readers must agree with each other.

#![no_main]

use libfuzzer_sys::fuzz_target;
use natsched::record::{Delivery, Schedule};
use natsched::store::{SegmentKey, segment};

/// Bodies for thin records: every id has one (a series every second), as the index would.
struct AnyBody;

impl segment::Bodies for AnyBody {
    fn body(&self, id: &str) -> Option<Schedule> {
        Some(Schedule {
            id: id.to_owned(),
            due: 1,
            subject: "body.subject".to_owned(),
            headers: vec![("H".to_owned(), "v".to_owned())],
            payload: bytes::Bytes::from_static(b"body"),
            created: 1,
            delivery: Delivery::Core,
            recurrence: Some(Box::new(natsched::recurrence::Series::every(1_000, 1))),
            caller_id: true,
        })
    }
}

fuzz_target!(|bytes: &[u8]| {
    let decoded = segment::decode(bytes, &AnyBody);
    let entries = segment::entries(bytes);
    let kept = segment::without(bytes, |_| false);
    let holds = segment::holds_generated_id(bytes, "01ARZ3NDEKTSV4RRFFQ69G5FAV");
    assert_eq!(entries.is_ok(), kept.is_ok());
    assert_eq!(entries.is_ok(), holds.is_ok());
    match &entries {
        Ok(entries) => {
            let each: Result<Vec<Schedule>, _> =
                entries.iter().map(|e| e.decode(&AnyBody)).collect();
            assert_eq!(decoded, each);
            let (kept, dropped) = kept.unwrap();
            assert_eq!(dropped, 0);
            assert_eq!(kept.as_deref(), (!entries.is_empty()).then_some(bytes));
            // Drop every other record: the rest stays readable, in order.
            let ids: Vec<&str> = entries.iter().map(|e| e.id()).collect();
            let dropped_ids: Vec<&str> = ids.iter().copied().skip(1).step_by(2).collect();
            let (rest, n) = segment::without(bytes, |id| dropped_ids.contains(&id)).unwrap();
            let want: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !dropped_ids.contains(id))
                .collect();
            assert_eq!(n as usize, ids.len() - want.len());
            let got: Vec<String> = rest
                .as_deref()
                .map(|r| segment::entries(r).unwrap())
                .unwrap_or_default()
                .iter()
                .map(|e| e.id().to_owned())
                .collect();
            assert_eq!(got, want);
            for entry in entries {
                if let Ok(s) = entry.decode(&AnyBody) {
                    // A thin record's subject is its body's.
                    match entry.subject() {
                        Some(subject) => assert_eq!(subject, Ok(s.subject.as_str())),
                        None => assert_eq!(s.subject, "body.subject"),
                    }
                }
            }
            // What decodes re-encodes to the same schedules.
            if let Ok(schedules) = &decoded {
                assert_eq!(
                    segment::decode(&segment::encode(schedules), &AnyBody).as_ref(),
                    Ok(schedules)
                );
            }
        }
        Err(_) => assert!(decoded.is_err()),
    }

    // The same bytes as one record value.
    let subject = Schedule::peek_subject(bytes);
    if let Ok(s) = Schedule::decode("id".into(), 7, 1_000, bytes) {
        assert_eq!(subject, Ok(s.subject.as_str()));
        let again = Schedule::decode("id".into(), 7, 1_000, &s.encode_value(1_000));
        assert_eq!(again, Ok(s));
    }

    if let Some(key) = SegmentKey::from_bytes(bytes) {
        assert_eq!(&key.to_bytes()[..], bytes);
    }
});
