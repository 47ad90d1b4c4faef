//! `<prefix>.list`: pending schedules in due order, a page at a time, filtered by subject.
//!
//! Request body (JSON, every field optional): `{"subject": FILTER, "limit": N, "cursor": C}`
//! with FILTER a NATS subject filter (`*` and `>` allowed, default `>`), N in 1..=1000
//! (default 100), and C the `next_cursor` of the previous page. Reply:
//! `{"items": [<as get>], "next_cursor": C or null}`.
//!
//! A page costs what it reads, never the whole store: reading starts at the cursor's time
//! window (see [`Store::windows_from`]), and stops after [`SCAN_BUDGET`] schedules even if
//! fewer than N matched (a sparse filter then returns a short page with a cursor to continue
//! from). A window is ordered as a whole, from its entries' due, id and subject only;
//! schedules are decoded when listed.

use serde::Deserialize;

use crate::protocol::ApiError;
use crate::record::{DecodeError, Schedule};
use crate::store::{Store, StoreError, segment};
use crate::time::UnixMs;

/// Most schedules one list request reads.
pub const SCAN_BUDGET: usize = 100_000;
/// Largest page.
pub const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;

/// A parsed list request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    #[serde(default = "any_subject")]
    pub subject: String,
    #[serde(default = "default_limit")]
    pub limit: usize,
    #[serde(default)]
    pub cursor: Option<String>,
}

fn any_subject() -> String {
    ">".to_owned()
}

fn default_limit() -> usize {
    DEFAULT_LIMIT
}

/// Where a page ended: after the schedule `id` due at `due`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    due: UnixMs,
    id: String,
}

impl Cursor {
    fn encode(&self) -> String {
        format!("{}:{}", self.due, self.id)
    }

    fn decode(text: &str) -> Option<Cursor> {
        let (due, id) = text.split_once(':')?;
        Some(Cursor {
            due: due.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

impl ListRequest {
    /// Parses a request body (an empty body means all defaults).
    pub fn parse(body: &[u8]) -> Result<ListRequest, ApiError> {
        let body = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}".as_slice()
        } else {
            body
        };
        let request: ListRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("invalid list request: {:?}", e.to_string()))
        })?;
        if !(1..=MAX_LIMIT).contains(&request.limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be 1 to {MAX_LIMIT}"
            )));
        }
        if !valid_filter(&request.subject) {
            return Err(ApiError::bad_request(format!(
                "invalid subject filter {:?}",
                request.subject
            )));
        }
        if let Some(cursor) = &request.cursor
            && Cursor::decode(cursor).is_none()
        {
            return Err(ApiError::bad_request("invalid cursor"));
        }
        Ok(request)
    }
}

/// One page: the schedules, and the cursor of the next page (`None` on the last).
pub fn page(
    store: &Store,
    request: &ListRequest,
) -> Result<(Vec<Schedule>, Option<String>), StoreError> {
    let after = request.cursor.as_deref().and_then(Cursor::decode);
    let start = after.as_ref().map_or(0, |c| c.due);
    let mut items = Vec::new();
    let mut scanned = 0;
    for window in store.windows_from(start) {
        let window = window?;
        let mut entries = Vec::new();
        for (key, raw) in &window.segments {
            // A damaged segment's readable schedules are listed; the writer repairs it
            // (keeping the rest aside) once it touches it.
            let (segment_entries, damage) = segment::entries_salvaging(raw.as_ref());
            if damage.is_some() {
                store.report_damage(*key, "listed what is readable");
            }
            entries.extend(segment_entries.into_iter().map(|entry| (key, entry)));
        }
        entries.sort_unstable_by(|(_, a), (_, b)| (a.due, a.id()).cmp(&(b.due, b.id())));
        // A schedule that moved from a far to a fine segment while this window was read can
        // be seen twice.
        entries.dedup_by(|(_, a), (_, b)| (a.due, a.id()) == (b.due, b.id()));
        for (&key, entry) in entries {
            if after
                .as_ref()
                .is_some_and(|c| (entry.due, entry.id()) <= (c.due, c.id.as_str()))
            {
                continue;
            }
            // A thin record's subject is in its series' body, read with it. A body gone since
            // the segment was read is a series that ended, was cancelled or was replaced
            // meanwhile.
            let thin = match entry.is_thin() {
                true => match store.read_entry(&entry, key)? {
                    Some(decoded) => Some(decoded),
                    None => continue,
                },
                false => None,
            };
            let subject = match &thin {
                Some(Ok(schedule)) => Ok(schedule.subject.as_str()),
                Some(Err(error)) => Err(error.clone()),
                None => entry.subject().unwrap_or(Err(DecodeError::NoBody)),
            };
            let Ok(subject) = subject else {
                store.report_damage(key, "a record's value is unreadable; not listed");
                continue;
            };
            if subject_matches(&request.subject, subject) {
                if items.len() == request.limit {
                    // One more exists: the page is full and is not the last.
                    let last: &Schedule = items.last().expect("limit >= 1");
                    let cursor = Cursor {
                        due: last.due,
                        id: last.id.clone(),
                    };
                    return Ok((items, Some(cursor.encode())));
                }
                match thin.unwrap_or_else(|| entry.decode(&segment::NoBodies)) {
                    Ok(schedule) => items.push(schedule),
                    Err(_) => {
                        store.report_damage(key, "a record's value is unreadable; not listed")
                    }
                }
            } else if scanned + 1 >= SCAN_BUDGET {
                // Out of budget on a sparse filter: continue from here next time.
                let cursor = Cursor {
                    due: entry.due,
                    id: entry.id().to_owned(),
                };
                return Ok((items, Some(cursor.encode())));
            }
            scanned += 1;
        }
    }
    Ok((items, None))
}

/// Whether `filter` is a valid subscription subject: non-empty tokens, `>` only last.
fn valid_filter(filter: &str) -> bool {
    let tokens: Vec<&str> = filter.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && !t.chars().any(|c| c.is_whitespace() || c.is_control())
            && (*t != ">" || i == tokens.len() - 1)
    })
}

/// NATS subject matching: `*` matches one token, a final `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(s)) if literal == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_filters() {
        for (filter, subject, matches) in [
            (">", "a", true),
            (">", "a.b.c", true),
            ("orders.>", "orders.expired", true),
            ("orders.>", "orders", false),
            ("orders.*", "orders.expired", true),
            ("orders.*", "orders.expired.now", false),
            ("*.expired", "orders.expired", true),
            ("orders.expired", "orders.expired", true),
            ("orders.expired", "orders.expire", false),
            ("orders", "orders.expired", false),
        ] {
            assert_eq!(
                subject_matches(filter, subject),
                matches,
                "{filter} {subject}"
            );
        }
        assert!(valid_filter("a.*.>"));
        assert!(!valid_filter("a.>.b"));
        assert!(!valid_filter("a..b"));
        assert!(!valid_filter(""));
        assert!(!valid_filter("a\0b"));
    }

    #[test]
    fn a_damaged_segment_is_reported_and_the_rest_listed() {
        use crate::record::test_schedule;
        use crate::store::{SegmentKey, StoreOptions, WriteBatch};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreOptions {
            path: dir.path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap();
        // A far window holding a good fine segment and a corrupt far one.
        let (fine, far) = (SegmentKey::fine(60_100, 1), SegmentKey::far(60_000, 2));
        let mut batch = WriteBatch::default();
        batch.put_segment(fine, &[test_schedule("a", 60_150, true)]);
        batch.put_raw_segment(far, Some(vec![2, 0, 0, 0, 9]));
        store.commit(batch).unwrap();

        let request = ListRequest::parse(b"").unwrap();
        let (items, next) = page(&store, &request).unwrap();
        let ids: Vec<&str> = items.iter().map(|s| s.id.as_str()).collect();
        assert_eq!((ids, next), (vec!["a"], None), "the readable one is listed");
        assert_eq!(store.damaged_total(), 1, "the damaged one is reported");
    }

    #[test]
    fn requests_and_cursors() {
        let r = ListRequest::parse(b"").unwrap();
        assert_eq!((r.subject.as_str(), r.limit, r.cursor), (">", 100, None));
        let r = ListRequest::parse(br#"{"subject":"a.*","limit":5,"cursor":"12:x:y"}"#).unwrap();
        assert_eq!(r.limit, 5);
        assert_eq!(
            Cursor::decode(r.cursor.as_deref().unwrap()),
            Some(Cursor {
                due: 12,
                id: "x:y".into()
            })
        );
        for bad in [
            r#"{"limit":0}"#,
            r#"{"limit":1001}"#,
            r#"{"subject":"a.>.b"}"#,
            r#"{"cursor":"nope"}"#,
            r#"{"subjct":"a"}"#,
            "not json",
        ] {
            assert_eq!(
                ListRequest::parse(bad.as_bytes()).unwrap_err().code,
                400,
                "{bad}"
            );
        }
    }
}
