//! Fuzzes natsched's request decoders: an add request (target subject, headers, payload) and
//! the bodies of `cancel`/`get` (an id) and `list` (JSON).
//!
//! Header names and values are structured enough that the fuzzer reaches past "missing
//! Sched-At or Sched-Delay" (natsched's own names, valid times and delays) but can be anything.
//! Pairs that are not valid NATS header text are skipped, as async-nats's `&str` constructors
//! assert on them. Asserts what the protocol promises: no panic, every refusal a 400 or 413
//! whose description is safe in a NATS header (no control character), every acceptance
//! faithful to the request.

#![no_main]

use arbitrary::Arbitrary;
use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use natsched::listing::{ListRequest, MAX_LIMIT};
use natsched::protocol::{self, AddLimits, ApiError};
use natsched::time::{self, MAX_MS};

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    At,
    Delay,
    Id,
    /// A `Sched-` name natsched does not know.
    Reserved(&'a str),
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
enum Value<'a> {
    /// A valid `Sched-At`, maybe pushed around by whitespace or a suffix.
    Instant(u64, &'a str),
    /// Milliseconds, bare or with a unit.
    Number(u64, &'a str),
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    target: &'a str,
    headers: Vec<(Name<'a>, Value<'a>)>,
    no_headers: bool,
    payload: &'a [u8],
    now: u64,
    max_payload: u16,
    server_max_payload: u32,
    body: &'a [u8],
}

fn name_text(name: &Name<'_>) -> String {
    match name {
        Name::At => protocol::AT.to_owned(),
        Name::Delay => protocol::DELAY.to_owned(),
        Name::Id => protocol::ID.to_owned(),
        Name::Reserved(rest) => format!("Sched-{rest}"),
        Name::Other(name) => (*name).to_owned(),
    }
}

fn value_text(value: &Value<'_>) -> String {
    match value {
        Value::Instant(ms, suffix) => format!("{}{suffix}", time::format_ms(*ms)),
        Value::Number(n, unit) => format!("{n}{unit}"),
        Value::Raw(raw) => (*raw).to_owned(),
    }
}

fn check_error(err: &ApiError, codes: &[u16]) {
    assert!(codes.contains(&err.code), "unexpected code: {err:?}");
    assert!(
        !err.description.chars().any(char::is_control),
        "control character in the description: {err:?}"
    );
    let headers = err.headers();
    assert_eq!(
        headers.get(protocol::ERROR_HEADER).map(HeaderValue::as_str),
        Some(err.description.as_str())
    );
}

fuzz_target!(|input: Input<'_>| {
    let mut map = HeaderMap::new();
    let mut held = Vec::new();
    for (name, value) in &input.headers {
        let (name, value) = (name_text(name), value_text(value));
        let (Ok(n), Ok(v)) = (name.parse::<HeaderName>(), value.parse::<HeaderValue>()) else {
            continue;
        };
        map.append(n, v);
        held.push((name, value));
    }
    let limits = AddLimits {
        max_payload: usize::from(input.max_payload),
        server_max_payload: input.server_max_payload as usize,
        default_delivery: natsched::record::Delivery::Core,
        min_interval: 1000,
    };
    let now = input.now % (MAX_MS + 1);
    let payload = Bytes::copy_from_slice(input.payload);
    let headers = (!input.no_headers).then_some(&map);
    match protocol::parse_add(input.target, headers, payload.clone(), now, limits) {
        Ok(s) => {
            assert_eq!(s.subject, input.target);
            assert!(
                input
                    .target
                    .split('.')
                    .all(|t| !t.is_empty() && t != "*" && t != ">")
            );
            assert_eq!(s.payload, payload);
            assert!(payload.len() <= limits.max_payload);
            assert!(protocol::delivered_size(&s) <= limits.server_max_payload);
            assert!(s.due <= MAX_MS);
            assert_eq!(s.created, now);
            assert!(!s.id.is_empty() && s.id.len() <= protocol::MAX_ID_LEN);
            // Every header kept is one that was sent, under a name that is not reserved.
            for (name, value) in &s.headers {
                assert!(!name.to_ascii_lowercase().starts_with("sched-"), "{name}");
                assert!(held.iter().any(|(n, v)| n == name && v == value));
            }
            let sent = held
                .iter()
                .filter(|(n, _)| !n.to_ascii_lowercase().starts_with("sched-"))
                .count();
            assert_eq!(s.headers.len(), if input.no_headers { 0 } else { sent });
        }
        Err(err) => check_error(&err, &[400, 413]),
    }

    match protocol::parse_id_body(input.body) {
        Ok(id) => {
            assert!(!id.is_empty() && id.len() <= protocol::MAX_ID_LEN);
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
            );
        }
        Err(err) => check_error(&err, &[400]),
    }

    match ListRequest::parse(input.body) {
        Ok(request) => assert!((1..=MAX_LIMIT).contains(&request.limit)),
        Err(err) => check_error(&err, &[400]),
    }
});
