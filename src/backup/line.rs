//! One line of an export file: its JSON shapes, a schedule written as one, and a line read
//! back, checked, as the request that schedules it again.

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::protocol;
use crate::record::{Delivery, Schedule};
use crate::time::{self, UnixMs};

/// The `format` of the header and end lines.
pub(crate) const FORMAT: &str = "natsched-export";
/// The version of the file format this build writes and reads.
pub(crate) const VERSION: u32 = 1;
/// Longest value quoted in a problem report.
const SHOWN: usize = 100;

/// The first line (the header) or the last (the end) of an export. Fields it does not know
/// are ignored: a later version is told by its `version`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub format: String,
    pub version: u32,
    /// The end line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end: bool,
    /// Header: when the export began, and the build that wrote it (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_by: Option<String>,
    /// End: how many schedule lines the file holds, and how many problems left something
    /// out (each reported on stderr when exporting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedules: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<u64>,
}

impl Mark {
    pub(crate) fn header(now: UnixMs) -> Mark {
        Mark {
            format: FORMAT.to_owned(),
            version: VERSION,
            end: false,
            exported_at: Some(time::format_ms(now)),
            written_by: Some(format!("natsched {}", env!("CARGO_PKG_VERSION"))),
            schedules: None,
            unreadable: None,
        }
    }

    pub(crate) fn end(schedules: u64, unreadable: u64) -> Mark {
        Mark {
            format: FORMAT.to_owned(),
            version: VERSION,
            end: true,
            exported_at: None,
            written_by: None,
            schedules: Some(schedules),
            unreadable: Some(unreadable),
        }
    }
}

/// A pending schedule.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Line {
    pub id: String,
    pub subject: String,
    /// RFC 3339 in UTC with milliseconds: exact, natsched's unit being the millisecond.
    pub due: String,
    /// `[name, value]` pairs in the stored (and delivered) order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Base64, standard alphabet, padded.
    #[serde(default)]
    pub payload: String,
    #[serde(default)]
    pub delivery: DeliveryName,
    /// When natsched accepted it (informational: an import is accepted anew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleLine>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DeliveryName {
    #[default]
    Core,
    Jetstream,
}

/// A series' rule, bounds and progress.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// The number of the occurrence due at the line's `due`.
    pub next_seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl Line {
    /// `schedule` as a line.
    pub(crate) fn of(schedule: &Schedule) -> Line {
        let rule = schedule.recurrence.as_deref().map(|series| {
            let rule = series.rule();
            RuleLine {
                cron: rule.interval().is_none().then(|| rule.describe()),
                tz: rule.zone().map(str::to_owned),
                every_ms: rule.interval(),
                next_seq: series.seq,
                until: series.until.map(time::format_ms),
                count: series.count,
            }
        });
        Line {
            id: schedule.id.clone(),
            subject: schedule.subject.clone(),
            due: time::format_ms(schedule.due),
            headers: schedule.headers.clone(),
            payload: BASE64.encode(&schedule.payload),
            delivery: match schedule.delivery {
                Delivery::Core => DeliveryName::Core,
                Delivery::JetStream => DeliveryName::Jetstream,
            },
            created: Some(time::format_ms(schedule.created)),
            rule,
        }
    }

    /// The request that schedules this line again, checked so that nothing in it can make
    /// the NATS client panic (async-nats asserts on a header name or value it cannot send).
    pub(crate) fn request(self) -> Result<Request, LineError> {
        protocol::validate_id(&self.id).map_err(|_| LineError::Id(shown(&self.id)))?;
        if self.subject.len() > MAX_SUBJECT
            || self
                .subject
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            || protocol::validate_target(&self.subject).is_err()
        {
            return Err(LineError::Subject(shown(&self.subject)));
        }
        let due = instant(&self.due).ok_or_else(|| LineError::Due(shown(&self.due)))?;
        let mut size = self.subject.len() + 256;
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            if protocol::is_reserved(name) {
                return Err(LineError::Reserved(shown(name)));
            }
            // An empty name parses, and makes a header line natsched refuses.
            let header: HeaderName = Some(name)
                .filter(|name| !name.is_empty())
                .and_then(|name| name.parse().ok())
                .ok_or_else(|| LineError::HeaderName(shown(name)))?;
            let parsed: HeaderValue = value.parse().map_err(|_| LineError::HeaderValue {
                name: shown(name),
                value: shown(value),
            })?;
            headers.append(header, parsed);
            size += name.len() + value.len();
        }
        let payload = BASE64
            .decode(self.payload.as_bytes())
            .map_err(|e| LineError::Payload(e.to_string()))?;
        let mut ours = vec![
            (protocol::ID, self.id.clone()),
            (protocol::AT, time::format_ms(due)),
            (
                protocol::DELIVER,
                match self.delivery {
                    DeliveryName::Core => "core",
                    DeliveryName::Jetstream => "jetstream",
                }
                .to_owned(),
            ),
        ];
        if let Some(rule) = &self.rule {
            ours.extend(rule.headers()?);
        }
        for (name, value) in ours {
            let value: HeaderValue = value.parse().map_err(|_| {
                LineError::Rule(format!("{name} {} cannot be a header value", shown(&value)))
            })?;
            headers.insert(name, value);
        }
        Ok(Request {
            size: size + payload.len(),
            id: self.id,
            subject: self.subject,
            due,
            headers,
            payload: payload.into(),
        })
    }
}

impl RuleLine {
    /// The series headers that continue this series where it was.
    fn headers(&self) -> Result<Vec<(&'static str, String)>, LineError> {
        let refuse = |what: &str| Err(LineError::Rule(what.to_owned()));
        let mut out = Vec::new();
        match (&self.cron, self.every_ms) {
            (Some(cron), None) => {
                out.push((protocol::CRON, cron.clone()));
                if let Some(tz) = &self.tz {
                    out.push((protocol::TZ, tz.clone()));
                }
            }
            (None, Some(0)) => return refuse("every_ms must be at least 1"),
            (None, Some(_)) if self.tz.is_some() => return refuse("tz applies to cron only"),
            (None, Some(every)) => out.push((protocol::EVERY, every.to_string())),
            _ => return refuse("give exactly one of cron and every_ms"),
        }
        if self.next_seq == 0 {
            return refuse("next_seq must be at least 1");
        }
        out.push((protocol::SEQ, self.next_seq.to_string()));
        if let Some(until) = &self.until {
            let until = instant(until)
                .ok_or_else(|| LineError::Rule(format!("invalid until {}", shown(until))))?;
            out.push((protocol::UNTIL, time::format_ms(until)));
        }
        if let Some(count) = self.count {
            out.push((protocol::COUNT, count.to_string()));
        }
        Ok(out)
    }
}

/// Longest target subject sent: the request's protocol line (`HPUB <prefix>.add.<subject>
/// <inbox> <sizes>`) must fit nats-server's default `max_control_line` (4 KiB), or the server
/// closes the connection and every request in flight with it.
const MAX_SUBJECT: usize = 3 * 1024;

/// A line checked and ready to send: `P.add.<subject>` with these headers and payload.
#[derive(Debug)]
pub(crate) struct Request {
    pub id: String,
    pub subject: String,
    /// The due instant natsched must answer with.
    pub due: UnixMs,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// Roughly the bytes it holds while in flight.
    pub size: usize,
}

/// An RFC 3339 instant in Unix ms (rounded up, as the protocol does), if it is one natsched
/// can schedule at.
fn instant(text: &str) -> Option<UnixMs> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    let ms = time::timestamp_to_ms(ts);
    (ms <= time::MAX_MS).then_some(ms)
}

/// `text` quoted for a report: escaped (no control character reaches a terminal or a log)
/// and cut short.
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}…", &text[..end]),
    }
}

/// Why a line of an export cannot be imported. Every quoted value is escaped and cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a line of an export: {0}")]
    Json(String),
    #[error("the line is longer than {0} bytes")]
    TooLong(usize),
    #[error("invalid id {0}: use 1-128 characters of A-Z a-z 0-9 . _ : -")]
    Id(String),
    #[error("invalid subject {0}")]
    Subject(String),
    #[error("invalid due {0}: expected an RFC 3339 instant such as 2026-11-24T18:00:00.250Z")]
    Due(String),
    #[error("header {0} is natsched's own (Sched-*), not one a schedule delivers")]
    Reserved(String),
    #[error("invalid header name {0}: printable ASCII without ':'")]
    HeaderName(String),
    #[error("header {name}: invalid value {value} (a value cannot hold CR or LF)")]
    HeaderValue { name: String, value: String },
    #[error("invalid payload: not base64 (standard alphabet): {0}")]
    Payload(String),
    #[error("invalid rule: {0}")]
    Rule(String),
    #[error("a schedule after the end line (lines of another export follow its header)")]
    AfterEnd,
    #[error("an end line after an end line")]
    EndWithoutHeader,
}

impl LineError {
    /// A JSON parse error, its text escaped (serde quotes unknown field names as read).
    pub(crate) fn json(error: &serde_json::Error) -> LineError {
        // serde's text quotes the input (an unknown key, say): escaped and cut short.
        let full = error.to_string();
        let end = full
            .char_indices()
            .nth(4 * SHOWN)
            .map_or(full.len(), |(end, _)| end);
        let mut text = protocol::escape_controls(full[..end].to_owned());
        if end < full.len() {
            text.push('…');
        }
        LineError::Json(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recurrence::{Rule, Series};
    use proptest::prelude::*;

    fn schedule() -> Schedule {
        Schedule {
            id: "order-42".into(),
            due: 1_796_061_600_250,
            subject: "orders.expired".into(),
            headers: vec![
                ("Multi".into(), "1".into()),
                ("Multi".into(), "2".into()),
                ("Trace".into(), "abc".into()),
            ],
            payload: Bytes::from_static(b"\x00\xffbinary"),
            created: 1_796_061_000_000,
            delivery: Delivery::JetStream,
            recurrence: None,
            caller_id: true,
        }
    }

    fn header(request: &Request, name: &str) -> Option<String> {
        request.headers.get(name).map(|v| v.as_str().to_owned())
    }

    #[test]
    fn a_schedule_round_trips_through_its_line_into_the_request_that_makes_it_again() {
        let text = serde_json::to_string(&Line::of(&schedule())).unwrap();
        assert_eq!(
            text,
            r#"{"id":"order-42","subject":"orders.expired","due":"2026-11-30T18:00:00.250Z","headers":[["Multi","1"],["Multi","2"],["Trace","abc"]],"payload":"AP9iaW5hcnk=","delivery":"jetstream","created":"2026-11-30T17:50:00.000Z"}"#
        );
        let line: Line = serde_json::from_str(&text).unwrap();
        let request = line.request().unwrap();
        assert_eq!(request.due, schedule().due);
        assert_eq!(request.payload, schedule().payload);
        let multi: Vec<&str> = request
            .headers
            .get_all("Multi")
            .map(|v| v.as_str())
            .collect();
        assert_eq!(multi, ["1", "2"], "repeated names survive, in order");
        for (name, value) in [
            ("Sched-Id", "order-42"),
            ("Sched-At", "2026-11-30T18:00:00.250Z"),
            ("Sched-Deliver", "jetstream"),
            ("Trace", "abc"),
        ] {
            assert_eq!(header(&request, name).as_deref(), Some(value), "{name}");
        }
        assert_eq!(header(&request, "Sched-Seq"), None);
    }

    #[test]
    fn a_series_continues_at_its_occurrence() {
        let mut series = Series::new(
            Rule::cron("0 6 * * MON-FRI", Some("Europe/Berlin")).unwrap(),
            Some(1_800_000_000_000),
            Some(10),
            4,
        );
        series.body_indexed = true;
        let cron = Schedule {
            recurrence: Some(Box::new(series)),
            ..schedule()
        };
        let line = Line::of(&cron);
        let text = serde_json::to_string(&line.rule).unwrap();
        assert_eq!(
            text,
            r#"{"cron":"0 6 * * MON-FRI","tz":"Europe/Berlin","next_seq":4,"until":"2027-01-15T08:00:00.000Z","count":10}"#
        );
        let request = line.request().unwrap();
        for (name, value) in [
            ("Sched-Cron", "0 6 * * MON-FRI"),
            ("Sched-TZ", "Europe/Berlin"),
            ("Sched-Seq", "4"),
            ("Sched-Until", "2027-01-15T08:00:00.000Z"),
            ("Sched-Count", "10"),
        ] {
            assert_eq!(header(&request, name).as_deref(), Some(value), "{name}");
        }
        let every = Schedule {
            recurrence: Some(Box::new(Series::every(90_000, 2))),
            ..schedule()
        };
        let line = Line::of(&every);
        assert_eq!(
            serde_json::to_string(&line.rule).unwrap(),
            r#"{"every_ms":90000,"next_seq":2}"#
        );
        let request = line.request().unwrap();
        assert_eq!(header(&request, "Sched-Every").as_deref(), Some("90000"));
        assert_eq!(header(&request, "Sched-TZ"), None);
    }

    fn refused(text: &str) -> LineError {
        let line: Line = serde_json::from_str(text).unwrap();
        line.request().expect_err("must be refused")
    }

    #[test]
    fn hostile_lines_are_refused_with_their_values_escaped() {
        let base = |field: &str| {
            format!(r#"{{"id":"a","subject":"s","due":"2026-11-30T18:00:00Z",{field}}}"#)
        };
        let cases = [
            (
                base(r#""headers":[["X","a\r\nSched-At: now"]]"#),
                r#"header "X": invalid value "a\r\nSched-At: now""#,
            ),
            (
                base(r#""headers":[["X\u001b[31m","v"]]"#),
                r#"invalid header name "X\u{1b}[31m""#,
            ),
            (base(r#""headers":[["X:Y","v"]]"#), "invalid header name"),
            (base(r#""headers":[["","v"]]"#), "invalid header name"),
            (
                format!(
                    r#"{{"id":"a","subject":"{}","due":"2026-11-30T18:00:00Z"}}"#,
                    "s".repeat(MAX_SUBJECT + 1)
                ),
                "invalid subject",
            ),
            (base(r#""headers":[["sched-at","v"]]"#), "natsched's own"),
            (base(r#""payload":"%%%""#), "invalid payload"),
            (
                base(r#""rule":{"cron":"* * * * *\r\nX: y","next_seq":1}"#),
                "cannot be a header value",
            ),
            (
                base(r#""rule":{"cron":"* * * * *","every_ms":5,"next_seq":1}"#),
                "exactly one of cron and every_ms",
            ),
            (base(r#""rule":{"every_ms":5,"next_seq":0}"#), "next_seq"),
            (base(r#""rule":{"every_ms":0,"next_seq":1}"#), "every_ms"),
            (
                r#"{"id":"a b","subject":"s","due":"2026-11-30T18:00:00Z"}"#.to_owned(),
                r#"invalid id "a b""#,
            ),
            (
                r#"{"id":"a","subject":"s.*","due":"2026-11-30T18:00:00Z"}"#.to_owned(),
                "invalid subject",
            ),
            (
                r#"{"id":"a","subject":"s\n","due":"2026-11-30T18:00:00Z"}"#.to_owned(),
                r#"invalid subject "s\n""#,
            ),
            (
                r#"{"id":"a","subject":"s","due":"soon"}"#.to_owned(),
                r#"invalid due "soon""#,
            ),
        ];
        for (text, expected) in cases {
            let error = refused(&text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.chars().any(char::is_control), "{error:?}");
        }
        let long = "x".repeat(10_000);
        let error = refused(&base(&format!(r#""headers":[["X","{long}\n"]]"#))).to_string();
        assert!(error.len() < 400, "cut short: {}", error.len());
    }

    proptest! {
        /// Whatever a line holds, reading it never panics.
        #[test]
        fn any_line_is_read_or_refused_without_panicking(
            id in "\\PC{0,20}|[A-Za-z0-9._:-]{1,10}",
            subject in "\\PC{0,20}|[a-z.]{1,10}",
            name in any::<String>(),
            value in any::<String>(),
            cron in any::<String>(),
            tz in any::<String>(),
            payload in any::<String>(),
        ) {
            let line = serde_json::json!({
                "id": id, "subject": subject, "due": "2026-11-30T18:00:00Z",
                "headers": [[name, value]], "payload": payload,
                "rule": {"cron": cron, "tz": tz, "next_seq": 1},
            });
            if let Ok(line) = serde_json::from_value::<Line>(line) {
                let _ = line.request();
            }
        }
    }
}
