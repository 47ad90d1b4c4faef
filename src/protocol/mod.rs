//! Wire protocol v1: how a NATS message becomes a [`Schedule`], and what natsched replies.
//!
//! This is a public contract (documented in the README); change it only compatibly.
//!
//! A schedule request is a message on `<prefix>.add.<target subject>` with exactly one of
//! [`AT`] (RFC 3339 instant) or [`DELAY`] (humantime duration or bare milliseconds), an optional
//! [`ID`], and any other headers plus the payload, which are delivered verbatim. Header names
//! beginning with `Sched-` (any case) are natsched's: an unknown one is refused, so a typo such as
//! `Sched-Dealy` cannot silently turn into a forwarded header.
//!
//! A successful request is answered, once durable, with `{"id":"…","due":"…"}`; a failed one with
//! the NATS micro-service error convention ([`ApiError`]).

use async_nats::HeaderMap;
use async_nats::header::HeaderValue;
use bytes::Bytes;
use jiff::Timestamp;
use serde::Serialize;

mod series;

use series::SeriesHeaders;

use crate::record::{Delivery, Schedule};
use crate::time::{self, UnixMs};

/// Absolute due instant, RFC 3339 with any offset, e.g. `2026-11-24T18:00:00.250Z`.
pub const AT: &str = "Sched-At";
/// Due relative to receipt: `15m`, `1h30m`, `250ms`, or a bare integer of milliseconds.
pub const DELAY: &str = "Sched-Delay";
/// The caller's key for the schedule; re-adding a pending id replaces it.
pub const ID: &str = "Sched-Id";
/// Added on delivery: the due instant in the reply's format.
pub const DUE: &str = "Sched-Due";
/// How to deliver: `core` or `jetstream`; overrides `[delivery] jetstream_subjects`.
pub const DELIVER: &str = "Sched-Deliver";
/// A recurring schedule: a crontab expression (5 fields, or 6 with seconds first) or an
/// alias (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`).
pub const CRON: &str = "Sched-Cron";
/// The IANA zone a `Sched-Cron` expression is read in (default UTC).
pub const TZ: &str = "Sched-TZ";
/// A recurring schedule: every interval (humantime or milliseconds).
pub const EVERY: &str = "Sched-Every";
/// A series' last instant (RFC 3339, inclusive).
pub const UNTIL: &str = "Sched-Until";
/// A series' number of occurrences.
pub const COUNT: &str = "Sched-Count";
/// Added on the delivery of a series' occurrence: its number, from 1. On a series' request,
/// with [`AT`]: the number of the occurrence due at `Sched-At`, which is kept as given (even
/// if past): how `natsched import` continues a series where it was.
pub const SEQ: &str = "Sched-Seq";
/// Added on JetStream delivery: `<id>:<due in Unix ms>`, the same on every attempt.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Names starting with this (case-insensitively) are reserved for natsched.
pub const RESERVED_PREFIX: &str = "sched-";
/// The error-code header of the NATS micro-service convention.
pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// The error-text header of the NATS micro-service convention.
pub const ERROR_HEADER: &str = "Nats-Service-Error";

/// A reply's error, as natsched sends it: the code and the description, as they came (both
/// text from the network: parse and escape before use). `None` for a reply that is no error.
pub fn reply_error(reply: &async_nats::Message) -> Option<(String, String)> {
    let header = |name| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let code = header(ERROR_CODE_HEADER)?;
    Some((code, header(ERROR_HEADER).unwrap_or_default()))
}
/// Longest error description sent; longer ones are cut short.
pub const MAX_DESCRIPTION: usize = 1024;
/// Longest accepted `Sched-Id`.
pub const MAX_ID_LEN: usize = 128;

/// An error reply: an HTTP-like code and a human-readable description.
///
/// Descriptions quote input with `{:?}`, and [`ApiError::new`] escapes any control character
/// left (a library's error text may quote input raw), so a description can always travel in
/// the `Nats-Service-Error` header: a header value cannot hold CR or LF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {description}")]
pub struct ApiError {
    pub code: u16,
    pub description: String,
}

impl ApiError {
    /// An error with this code; control characters in `description` are escaped, and a
    /// description longer than [`MAX_DESCRIPTION`] bytes (it may quote a huge input) is cut
    /// short, so the reply always fits the server's `max_payload`.
    pub fn new(code: u16, description: impl Into<String>) -> ApiError {
        let mut description = escape_controls(description.into());
        if description.len() > MAX_DESCRIPTION {
            let mut end = MAX_DESCRIPTION;
            while !description.is_char_boundary(end) {
                end -= 1;
            }
            description.truncate(end);
            description.push('…');
        }
        ApiError { code, description }
    }

    /// 400: the request is malformed.
    pub fn bad_request(description: impl Into<String>) -> ApiError {
        ApiError::new(400, description)
    }

    /// 413: the payload exceeds `api.max_payload`.
    pub fn too_large(size: usize, max: usize) -> ApiError {
        ApiError::new(
            413,
            format!("payload of {size} bytes exceeds the limit of {max} bytes"),
        )
    }

    /// 404: no pending schedule has this id.
    pub fn not_found(id: &str) -> ApiError {
        ApiError::new(404, format!("no pending schedule with id {id:?}"))
    }

    /// 503: the store could not make the schedule durable.
    pub fn unavailable(description: impl Into<String>) -> ApiError {
        ApiError::new(503, description)
    }

    /// The reply headers of the micro-service convention. Never panics, whatever the
    /// description holds (the fields are public, so it may not have come through
    /// [`ApiError::new`]).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ERROR_CODE_HEADER, HeaderValue::from(self.code));
        let description = escape_controls(self.description.clone());
        if let Ok(value) = description.parse::<HeaderValue>() {
            headers.insert(ERROR_HEADER, value);
        }
        headers
    }

    /// The reply body: `{"error":{"code":…,"description":"…"}}`.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: u16,
            description: &'a str,
        }
        let body = Body {
            error: Inner {
                code: self.code,
                description: &self.description,
            },
        };
        serde_json::to_vec(&body)
            .expect("plain struct serializes")
            .into()
    }
}

/// `text` with every control character (CR, LF, NUL, ESC, …) written as an escape such as
/// `\n` or `\u{1b}`: safe in a header value and in a log line.
pub fn escape_controls(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// The success reply to an add: `{"id":"…","due":"…"}`.
pub fn add_reply(id: &str, due: UnixMs) -> Bytes {
    // Written by hand: it is sent once per schedule, and neither part needs escaping (ids are
    // restricted to `A-Za-z0-9._:-`, the time to digits and `-:.TZ`).
    debug_assert!(validate_id(id).is_ok());
    let due = time::format_ms(due);
    let mut out = Vec::with_capacity(18 + id.len() + due.len());
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"due\":\"");
    out.extend_from_slice(due.as_bytes());
    out.extend_from_slice(b"\"}");
    out.into()
}

/// The success reply to a cancel: `{"id":"…","cancelled":true}`.
pub fn cancel_reply(id: &str) -> Bytes {
    debug_assert!(validate_id(id).is_ok());
    format!(r#"{{"id":"{id}","cancelled":true}}"#).into()
}

/// The id in the body of a `cancel` or `get` request.
pub fn parse_id_body(body: &[u8]) -> Result<String, ApiError> {
    let id = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the body must be a schedule id in UTF-8"))?
        .trim();
    Ok(validate_id(id)?.to_owned())
}

/// Limits and defaults applied to add requests.
#[derive(Debug, Clone, Copy)]
pub struct AddLimits {
    /// Largest accepted payload in bytes (`api.max_payload`).
    pub max_payload: usize,
    /// The server's `max_payload`: the delivered message, headers included, must fit in it.
    pub server_max_payload: usize,
    /// How to deliver when the request has no `Sched-Deliver` (from `[delivery]`).
    pub default_delivery: Delivery,
    /// Shortest `Sched-Every` (and gap among a cron rule's first occurrences) accepted, in
    /// ms (`[recurring] min_interval`).
    pub min_interval: UnixMs,
}

/// The JetStream message id of the delivery of schedule `id` due at `due`.
pub fn msg_id(id: &str, due: UnixMs) -> String {
    format!("{id}:{due}")
}

fn parse_deliver(value: &str) -> Result<Delivery, ApiError> {
    match value.trim() {
        v if v.eq_ignore_ascii_case("core") => Ok(Delivery::Core),
        v if v.eq_ignore_ascii_case("jetstream") => Ok(Delivery::JetStream),
        _ => Err(ApiError::bad_request(format!(
            "invalid {DELIVER} {value:?}: use core or jetstream"
        ))),
    }
}

/// Longest target subject or header name accepted (the store keeps their lengths in 16 bits).
pub const MAX_NAME_LEN: usize = u16::MAX as usize;
/// Most headers accepted on one request (the store keeps the count in 16 bits).
pub const MAX_HEADERS: usize = u16::MAX as usize;

/// Bytes the schedule's own headers take in the delivered message: `Name: value\r\n` each
/// (natsched's `Sched-Id` and `Sched-Due` not included).
pub fn headers_bytes(schedule: &Schedule) -> usize {
    schedule
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len() + ": \r\n".len())
        .sum()
}

/// Bytes the delivered message counts against the server's `max_payload`: the header block,
/// with natsched's `Sched-Id` and `Sched-Due` added, plus the payload.
pub fn delivered_size(schedule: &Schedule) -> usize {
    const LINE: usize = ": \r\n".len();
    let headers = headers_bytes(schedule);
    // A schedule without a caller's id gets its (ULID) id from the store writer.
    let id_len = if schedule.caller_id && !schedule.id.is_empty() {
        schedule.id.len()
    } else {
        ulid::ULID_LEN
    };
    let mut ours = ID.len() + id_len + LINE + DUE.len() + "2026-11-24T18:00:00.250Z".len() + LINE;
    if schedule.recurrence.is_some() {
        ours += SEQ.len() + u64::MAX.to_string().len() + LINE;
    }
    if schedule.delivery == Delivery::JetStream {
        ours += MSG_ID.len() + id_len + ":".len() + u64::MAX.to_string().len() + LINE;
    }
    "NATS/1.0\r\n".len() + headers + ours + "\r\n".len() + schedule.payload.len()
}

/// Turns an add request for `target` (the subject after `<prefix>.add.`) into a schedule.
///
/// `now` is the receipt time that `Sched-Delay` counts from.
pub fn parse_add(
    target: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    now: UnixMs,
    limits: AddLimits,
) -> Result<Schedule, ApiError> {
    validate_target(target)?;
    if target.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request("target subject is too long"));
    }
    if payload.len() > limits.max_payload {
        return Err(ApiError::too_large(payload.len(), limits.max_payload));
    }
    let mut at = None;
    let mut delay = None;
    let mut id = None;
    let mut deliver = None;
    let mut series = SeriesHeaders::default();
    let mut kept = Vec::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let name: &str = name.as_ref();
        if name.len() > MAX_NAME_LEN {
            return Err(ApiError::bad_request("header name is too long"));
        }
        if is_stream_control(name) {
            return Err(ApiError::bad_request(format!(
                "header {name:?} is not allowed: it would have a stream that captures the target \
                 act on natsched's authority (purge it, or refuse the message for good)"
            )));
        }
        if !is_reserved(name) {
            kept.extend(
                values
                    .iter()
                    .map(|v| (name.to_owned(), v.as_str().to_owned())),
            );
            continue;
        }
        let slot = if name.eq_ignore_ascii_case(AT) {
            &mut at
        } else if name.eq_ignore_ascii_case(DELAY) {
            &mut delay
        } else if name.eq_ignore_ascii_case(ID) {
            &mut id
        } else if name.eq_ignore_ascii_case(DELIVER) {
            &mut deliver
        } else if let Some(slot) = series.slot(name) {
            slot
        } else {
            return Err(ApiError::bad_request(format!(
                "unknown header {name:?}: names starting with Sched- are reserved \
                 (known: {AT}, {DELAY}, {ID}, {DELIVER}, {CRON}, {TZ}, {EVERY}, {UNTIL}, \
                 {COUNT}, {SEQ})"
            )));
        };
        match values.as_slice() {
            [value] if slot.is_none() => *slot = Some(value.as_str()),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{name:?} given more than once"
                )));
            }
        }
    }
    if kept.len() > MAX_HEADERS {
        return Err(ApiError::bad_request(format!(
            "more than {MAX_HEADERS} headers"
        )));
    }
    // The map's name order is arbitrary; sorting makes what is stored (and delivered) stable.
    // The sort is stable, so repeated values of one name keep their order.
    kept.sort_by(|a, b| a.0.cmp(&b.0));

    let (due, recurrence) = match series.rule(limits.min_interval)? {
        Some(rule) => series.start(rule, at, delay, now, limits.min_interval)?,
        None => {
            series.refuse_bounds_alone()?;
            (one_shot_due(at, delay, now)?, None)
        }
    };
    if due > time::MAX_MS {
        return Err(ApiError::bad_request(format!(
            "due time is after {}",
            time::format_ms(time::MAX_MS)
        )));
    }
    let delivery = match deliver {
        Some(value) => parse_deliver(value)?,
        None => limits.default_delivery,
    };
    let caller_id = id.is_some();
    let id = match id {
        Some(id) => validate_id(id)?.to_owned(),
        // The store writer gives the schedule its id (see `far_id`).
        None => String::new(),
    };
    let schedule = Schedule {
        id,
        due,
        subject: target.to_owned(),
        headers: kept,
        payload,
        created: now,
        delivery,
        recurrence,
        caller_id,
    };
    // Refused now rather than accepted and never deliverable.
    let size = delivered_size(&schedule);
    if size > limits.server_max_payload {
        return Err(ApiError::new(
            413,
            format!(
                "the delivered message ({size} bytes with headers, Sched-Id and Sched-Due) \
                 exceeds the server's max_payload of {} bytes",
                limits.server_max_payload
            ),
        ));
    }
    Ok(schedule)
}

/// The due instant of a one-shot schedule: exactly one of `Sched-At` and `Sched-Delay`.
fn one_shot_due(at: Option<&str>, delay: Option<&str>, now: UnixMs) -> Result<UnixMs, ApiError> {
    Ok(match (at, delay) {
        (Some(at), None) => parse_at(at)?,
        (None, Some(delay)) => now.saturating_add(parse_delay(delay)?),
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "missing {AT} or {DELAY} header (or {CRON} or {EVERY} for a recurring schedule)"
            )));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "give either {AT} or {DELAY}, not both"
            )));
        }
    })
}

/// A new unique id for a schedule due at `due`: a ULID whose timestamp is the due instant, so
/// the store can find the schedule from its id without indexing it.
pub fn generated_id(due: UnixMs) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(due);
    ulid::Ulid::from_datetime(at).to_string()
}

/// The due instant encoded in an id natsched generated (any 26-character ULID parses).
pub fn due_of_generated_id(id: &str) -> Option<UnixMs> {
    ulid::Ulid::from_string(id).ok().map(|u| u.timestamp_ms())
}

/// Marks the random part of a generated id that says where its segment is.
pub const FAR_MARK: u128 = 1 << 79;
const FAR_SEQ_BITS: u32 = 48;
/// Segment seqs from this on do not fit into a [`far_id`].
pub const FAR_SEQ_LIMIT: u64 = 1 << FAR_SEQ_BITS;
const FAR_SEQ_SHIFT: u32 = 16;

/// The id of the `index`-th schedule of segment `seq`, due at `due`: the id natsched gives
/// every schedule without a `Sched-Id` (the name is from when only far segments did). A ULID
/// whose timestamp is the due instant and whose 80 "random" bits are instead a mark bit, the
/// segment's seq (48 bits) and the index (16 bits), so the store finds the schedule with one
/// lookup however many share its bucket, and an id it did not make with none. Unique because
/// (seq, index) is. `None` if `seq` does not fit (after 2^48 segments; the schedule is then
/// indexed under a random id instead). Seqs only grow, so an id naming a segment already
/// written is never generated again: a caller may give such an id back as `Sched-Id` (to
/// replace the schedule it names), but the store writer refuses one naming a segment not
/// yet written.
pub fn far_id(due: UnixMs, seq: u64, index: u16) -> Option<String> {
    far_ulid(due, seq, index).map(|ulid| ulid.to_string())
}

/// [`far_id`] as a ULID, without its text.
pub fn far_ulid(due: UnixMs, seq: u64, index: u16) -> Option<ulid::Ulid> {
    if seq >= FAR_SEQ_LIMIT {
        return None;
    }
    let random = FAR_MARK | u128::from(seq) << FAR_SEQ_SHIFT | u128::from(index);
    Some(ulid::Ulid::from_parts(due, random))
}

/// The (seq, index) that [`far_ulid`] would make `ulid` from; `None` for any ULID it cannot
/// make. (A random ULID passes 1 time in 2^16; callers check the segment really holds it.)
pub fn far_layout(ulid: ulid::Ulid) -> Option<(u64, u16)> {
    let random = ulid.random();
    let seq = (random >> FAR_SEQ_SHIFT) as u64 & (FAR_SEQ_LIMIT - 1);
    let index = random as u16;
    (far_ulid(ulid.timestamp_ms(), seq, index)? == ulid).then_some((seq, index))
}

/// The (due, seq, index) an id made by [`far_id`] would be made from; `None` for any id
/// `far_id` cannot make. Such ids are predictable (ids are not secrets anyway: `list` shows
/// them), which is why a `Sched-Id` of this form naming a segment not yet written is refused.
pub fn far_parts(id: &str) -> Option<(UnixMs, u64, u16)> {
    let ulid = canonical_ulid(id)?;
    let (seq, index) = far_layout(ulid)?;
    Some((ulid.timestamp_ms(), seq, index))
}

/// The ULID `id` spells in canonical (upper-case) text, if it does: the text natsched
/// generates, so the ULID gives the same text back.
pub fn canonical_ulid(id: &str) -> Option<ulid::Ulid> {
    let ulid = ulid::Ulid::from_string(id).ok()?;
    let mut text = [0; ulid::ULID_LEN];
    (ulid.array_to_str(&mut text).as_bytes() == id.as_bytes()).then_some(ulid)
}

/// JetStream headers that act on the stream rather than describe the message: a rollup
/// purges it, an expectation makes a message undeliverable for good.
fn is_stream_control(name: &str) -> bool {
    let starts = |prefix: &str| {
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    name.eq_ignore_ascii_case("Nats-Rollup") || starts("Nats-Expected-")
}

pub(crate) fn is_reserved(name: &str) -> bool {
    name.len() >= RESERVED_PREFIX.len()
        && name.as_bytes()[..RESERVED_PREFIX.len()].eq_ignore_ascii_case(RESERVED_PREFIX.as_bytes())
}

pub(crate) fn validate_target(target: &str) -> Result<(), ApiError> {
    if target.is_empty() {
        return Err(ApiError::bad_request("empty target subject"));
    }
    for token in target.split('.') {
        match token {
            "" => {
                return Err(ApiError::bad_request(format!(
                    "target subject {target:?} has an empty token"
                )));
            }
            "*" | ">" => {
                return Err(ApiError::bad_request(format!(
                    "target subject {target:?} contains a wildcard"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn validate_id(id: &str) -> Result<&str, ApiError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(valid_char) {
        return Err(ApiError::bad_request(format!(
            "invalid {ID} {id:?}: use 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -"
        )));
    }
    Ok(id)
}

fn parse_at(value: &str) -> Result<UnixMs, ApiError> {
    let ts: Timestamp = value.trim().parse().map_err(|e: jiff::Error| {
        ApiError::bad_request(format!(
            "invalid {AT} {value:?}: expected RFC 3339 such as 2026-11-24T18:00:00.250Z ({:?})",
            e.to_string()
        ))
    })?;
    Ok(time::timestamp_to_ms(ts))
}

fn parse_delay(value: &str) -> Result<UnixMs, ApiError> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{DELAY} {value:?} is too large")));
    }
    let duration = humantime::parse_duration(value).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid {DELAY} {value:?}: expected e.g. 15m, 1h30m, 250ms or milliseconds ({:?})",
            e.to_string()
        ))
    })?;
    // Round up: a delay of 1.5 ms must not fire after 1 ms.
    let ms = duration.as_nanos().div_ceil(1_000_000);
    UnixMs::try_from(ms)
        .map_err(|_| ApiError::bad_request(format!("{DELAY} {value:?} is too large")))
}

#[cfg(test)]
mod tests;
