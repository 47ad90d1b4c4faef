//! Ten thousand malformed requests mixed at random with a thousand valid schedules, all sent raw
//! over TCP (so nothing a client library would repair or refuse is out of reach): natsched must
//! stay up on its one NATS connection, answer every request that has to be refused with a
//! micro-service error, answer the garbage sent to `stats` (and the list requests that happen
//! to be valid), drop malformed plain publishes (counting them), and fire every valid schedule
//! exactly once, verbatim.
//!
//! The bad requests cover the raw-protocol cases (header blocks with a bare CR or LF, invalid
//! UTF-8, lines without a colon, 10 000 headers, a 1 MiB header, broken framing), oversized and
//! random headers, invalid ids (bad characters, too long, empty, not UTF-8, of natsched's
//! generated-id layout naming a segment too far ahead to reserve), unknown `Sched-*` headers, empty and huge payloads, wildcard,
//! empty-token, over-long and non-UTF-8 targets, targets natsched may not publish to (403, with
//! control characters to escape), garbage, far-future and overflowing times,
//! missing, doubled and repeated time headers, and garbage to cancel, get, list and stats.
//! Each bad add has exactly one defect on an otherwise valid request, so the code the protocol
//! gives it is known (400, 403 for a denied target, or 413 for size). What counts as bad is what the README's protocol
//! refuses: a far-past time is valid (due now), so the valid schedules include some.
//!
//! nats-server (2.9 at least) routes a subject with an empty token (`sched.add.a..b`) to no
//! subscriber at all, so natsched never sees such a request: a witness subscribed to `>` finds
//! out per subject shape before the run, and those requests must then go unanswered (or, if
//! the server does route them, be refused).
//!
//! The mix comes from a seeded PRNG; set `NATSCHED_MALFORMED_SEED` to replay a seed (it is
//! printed with every failure, which lists every problem found by kind, with examples). Add
//! `-- --nocapture` to see the class counts and timings.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::raw::{RawClient, RawMessage};
use common::*;
use natsched::protocol::far_id;

const BAD: usize = 10_000;
const VALID: usize = 1_000;
/// Requests sent between two PINGs.
const CHUNK: usize = 100;
const DEFAULT_SEED: u64 = 0x6d61_6c66_6f72_6d64;
/// natsched's `api.max_payload` here: "huge" payloads need not be large.
const API_MAX_PAYLOAD: usize = 4096;
/// The server's `max_payload` (8MB in its config), so a 1 MiB header reaches natsched.
const SERVER_MAX_PAYLOAD: usize = 8 * 1024 * 1024;
const SERVER_CONFIG: &str = "max_payload: 8MB\nmax_control_line: 256KB\n";
/// How long the sender waits for the previous chunk's replies before sending on anyway.
const PACE: Duration = Duration::from_secs(1);
/// How long after the last delivery nothing more may arrive.
const QUIET: Duration = Duration::from_millis(500);

const SID_REPLY: u64 = 1;
const SID_VALID: u64 = 2;
const SID_BAD: u64 = 3;
const SID_STATS: u64 = 4;
const REPLY_PREFIX: &str = "_INBOX.m.";
const STATS_PREFIX: &str = "_INBOX.s.";

// ---------------------------------------------------------------------------------------------
// A small deterministic PRNG (splitmix64): `rand` is not a dependency.
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// Header-name characters.
    fn token(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-";
        (0..len).map(|_| self.pick(CHARS) as char).collect()
    }

    /// Printable ASCII with interior spaces: a header value that travels unchanged.
    fn text(&mut self, len: usize) -> String {
        (0..len)
            .map(|k| {
                if k > 0 && k + 1 < len && self.one_in(8) {
                    ' '
                } else {
                    self.range(0x21, 0x7e) as u8 as char
                }
            })
            .collect()
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn token_in(&mut self, lo: usize, hi: usize) -> String {
        let len = self.range(lo, hi);
        self.token(len)
    }

    fn text_in(&mut self, lo: usize, hi: usize) -> String {
        let len = self.range(lo, hi);
        self.text(len)
    }

    fn bytes_in(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let len = self.range(lo, hi);
        self.bytes(len)
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and what the protocol says about them
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Must be refused: an error reply, with this code where the protocol fixes it.
    Refused(Option<u16>),
    /// Valid schedule number n: a success reply naming it, and one delivery.
    Scheduled(usize),
    /// Must be answered without an error, with a JSON object holding this key.
    Answered(&'static str),
    /// Must be answered, error or not (a get of a schedule that may have fired).
    AnyReply,
    /// A malformed add published without a reply subject: dropped, counted in errors_total.
    Dropped,
    /// nats-server routes the subject to no one (an empty token): no reply can come.
    Unroutable,
}

struct Request {
    class: &'static str,
    subject: Vec<u8>,
    /// `Some`: sent with HPUB and exactly this header block.
    header: Option<Vec<u8>>,
    payload: Vec<u8>,
    reply: bool,
    /// Appended to the reply subject `_INBOX.m.<index>`.
    reply_tail: &'static str,
    expect: Expect,
}

/// What a valid schedule must be delivered with.
struct ValidSpec {
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// The bookkeeping of one sent request.
struct Sent {
    class: &'static str,
    expect: Expect,
    description: String,
}

fn header_block(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut block = b"NATS/1.0\r\n".to_vec();
    for line in lines {
        block.extend_from_slice(line);
        block.extend_from_slice(b"\r\n");
    }
    block.extend_from_slice(b"\r\n");
    block
}

fn line(name: &str, value: &str) -> Vec<u8> {
    format!("{name}: {value}").into_bytes()
}

fn show(bytes: &[u8]) -> String {
    const MAX: usize = 160;
    let shown = bytes[..bytes.len().min(MAX)].escape_ascii().to_string();
    if bytes.len() > MAX {
        format!("b\"{shown}\"... ({} bytes)", bytes.len())
    } else {
        format!("b\"{shown}\"")
    }
}

fn describe(index: usize, request: &Request) -> String {
    let reply = if request.reply {
        format!(
            " {REPLY_PREFIX}{index}{}",
            request.reply_tail.escape_default()
        )
    } else {
        String::new()
    };
    match &request.header {
        Some(header) => format!(
            "#{index} HPUB {}{reply} header={} payload={}",
            show(&request.subject),
            show(header),
            show(&request.payload)
        ),
        None => format!(
            "#{index} PUB {}{reply} payload={}",
            show(&request.subject),
            show(&request.payload)
        ),
    }
}

/// An add to `bad.<i>` with the header `lines` (one of them its defect): refused with 400
/// unless the caller says otherwise.
fn refused_add(class: &'static str, i: usize, lines: Vec<Vec<u8>>, payload: Vec<u8>) -> Request {
    Request {
        class,
        subject: format!("sched.add.bad.{i}").into_bytes(),
        header: Some(header_block(&lines)),
        payload,
        reply: true,
        reply_tail: "",
        expect: Expect::Refused(Some(400)),
    }
}

fn refused_op(class: &'static str, op: &str, body: Vec<u8>, code: Option<u16>) -> Request {
    Request {
        class,
        subject: format!("sched.{op}").into_bytes(),
        header: None,
        payload: body,
        reply: true,
        reply_tail: "",
        expect: Expect::Refused(code),
    }
}

// ---------------------------------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------------------------------

/// Shapes of targets with an empty token; nats-server may route such subjects to no one.
const EMPTY_TOKEN_SHAPES: usize = 4;

/// A subject of empty-token shape `shape`, under `prefix` (`sched` for requests).
fn empty_token_subject(prefix: &str, shape: usize, i: usize) -> Vec<u8> {
    match shape {
        0 => format!("{prefix}.add.bad.{i}..x"),
        1 => format!("{prefix}.add.bad.{i}."),
        2 => format!("{prefix}.add..bad.{i}"),
        _ => format!("{prefix}.add."),
    }
    .into_bytes()
}

struct Gen {
    rng: Rng,
    /// Whether nats-server routes each empty-token shape (found out before the run).
    routed: [bool; EMPTY_TOKEN_SHAPES],
    /// Valid schedules sent so far.
    valid_sent: usize,
}

type Generator = fn(&mut Gen, usize) -> Request;

/// Random bad-request classes and their weights (a request is drawn per weight).
const CLASSES: &[(Generator, u32)] = &[
    (Gen::bare_cr, 300),
    (Gen::bare_lf, 300),
    (Gen::invalid_utf8, 250),
    (Gen::no_colon, 200),
    (Gen::broken_framing, 200),
    (Gen::many_headers, 10),
    (Gen::big_header, 4),
    (Gen::long_header_name, 12),
    (Gen::unknown_sched_header, 300),
    (Gen::at_garbage, 350),
    (Gen::at_far_future, 250),
    (Gen::delay_overflow, 250),
    (Gen::delay_negative, 150),
    (Gen::delay_garbage, 250),
    (Gen::both_times, 150),
    (Gen::no_time, 150),
    (Gen::repeated_time, 150),
    (Gen::id_bad_chars, 250),
    (Gen::id_too_long, 150),
    (Gen::id_empty, 80),
    (Gen::id_generated_layout, 150),
    (Gen::payload_too_large, 200),
    (Gen::no_headers, 150),
    (Gen::wildcard_target, 250),
    (Gen::denied_target, 250),
    (Gen::empty_token_target, 200),
    (Gen::long_target, 4),
    (Gen::target_invalid_utf8, 120),
    (Gen::unicode_whitespace, 120),
    (Gen::bare_add, 80),
    (Gen::cancel_garbage, 500),
    (Gen::get_garbage, 500),
    (Gen::list_garbage, 700),
    (Gen::list_valid, 100),
    (Gen::stats_garbage, 150),
    (Gen::get_known, 80),
    (Gen::hostile_on_ops, 150),
];

impl Gen {
    fn random_bad(&mut self, i: usize) -> Request {
        let total: u32 = CLASSES.iter().map(|(_, w)| w).sum();
        let mut draw = self.rng.below(total as usize) as u32;
        for (generate, weight) in CLASSES {
            if draw < *weight {
                let request = generate(self, i);
                return self.finish(request);
            }
            draw -= weight;
        }
        unreachable!()
    }

    /// One malformed add in ten goes out as a plain publish (no reply subject).
    fn finish(&mut self, mut request: Request) -> Request {
        let add = request.subject.starts_with(b"sched.add");
        if add && matches!(request.expect, Expect::Refused(_)) && self.rng.one_in(10) {
            request.reply = false;
            request.expect = Expect::Dropped;
        }
        request
    }

    /// A valid `Sched-Delay` (200 ms to 3 s) in one of its spellings.
    fn delay_line(&mut self) -> Vec<u8> {
        let ms = self.rng.range(200, 3000);
        let name = self
            .rng
            .pick(&["Sched-Delay", "sched-delay", "SCHED-DELAY"]);
        let value = match self.rng.below(3) {
            0 => ms.to_string(),
            1 => format!("{ms}ms"),
            _ => format!("{}s {}ms", ms / 1000, ms % 1000),
        };
        line(name, &value)
    }

    fn extra_headers(&mut self, max: usize) -> Vec<Vec<u8>> {
        (0..self.rng.range(0, max))
            .map(|k| {
                let name = format!("X-{k}-{}", self.rng.token_in(1, 12));
                let len = self.rng.range(1, 40);
                line(&name, &self.rng.text(len))
            })
            .collect()
    }

    fn small_payload(&mut self) -> Vec<u8> {
        let len = self.rng.range(0, 64);
        self.rng.bytes(len)
    }

    /// The lines of a valid add (random headers and a `Sched-Delay`), with `defect` inserted
    /// at a random place.
    fn with_defect(&mut self, defect: Vec<u8>) -> Vec<Vec<u8>> {
        let mut lines = self.extra_headers(3);
        lines.push(self.delay_line());
        let at = self.rng.range(0, lines.len());
        lines.insert(at, defect);
        lines
    }

    /// The lines of a valid add.
    fn with_delay(&mut self) -> Vec<Vec<u8>> {
        let delay = self.delay_line();
        self.with_time(delay)
    }

    /// The lines of a valid add without its time header, plus `time`.
    fn with_time(&mut self, time: Vec<u8>) -> Vec<Vec<u8>> {
        let mut lines = self.extra_headers(3);
        let at = self.rng.range(0, lines.len());
        lines.insert(at, time);
        lines
    }

    fn bare_cr(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let (class, defect): (&'static str, &[u8]) = self.rng.pick(&[
            ("bare CR inside a value", &b"X-Cr: a\rb"[..]),
            ("bare CR ending a value", b"X-Cr: a\r"),
            ("bare CR starting a value", b"X-Cr: \ra"),
            ("bare CR inside a name", b"X-\rCr: v"),
            ("bare CR as a line", b"\r"),
            ("bare CR ending the version line", b""),
        ]);
        if defect.is_empty() {
            let lines = self.with_delay();
            let mut request = refused_add(class, i, lines, payload);
            let header = request.header.as_mut().unwrap();
            header.splice(..b"NATS/1.0".len(), b"NATS/1.0\r".iter().copied());
            return request;
        }
        let lines = self.with_defect(defect.to_vec());
        refused_add(class, i, lines, payload)
    }

    fn bare_lf(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let (class, defect): (&'static str, &[u8]) = self.rng.pick(&[
            ("bare LF before text without a colon", &b"X-Lf: a\nb"[..]),
            ("bare LF before another header", b"X-Lf: a\nX-Injected: b"),
            ("bare LF before a continuation", b"X-Lf: a\n b"),
            ("bare LF ending a value", b"X-Lf: a\n"),
            ("bare LF as a line", b"\n"),
            ("bare LF ending the version line", b""),
        ]);
        if defect.is_empty() {
            let lines = self.with_delay();
            let mut request = refused_add(class, i, lines, payload);
            let header = request.header.as_mut().unwrap();
            header.splice(..b"NATS/1.0\r\n".len(), b"NATS/1.0\n".iter().copied());
            return request;
        }
        let lines = self.with_defect(defect.to_vec());
        refused_add(class, i, lines, payload)
    }

    fn invalid_utf8(&mut self, i: usize) -> Request {
        let class = "invalid UTF-8 in the header block";
        let payload = self.small_payload();
        let defect: Vec<u8> = match self.rng.below(6) {
            0 => b"X-Bytes: \xff\xfe".to_vec(),
            1 => b"X-\xc3\x28: v".to_vec(),
            2 => b"Sched-Id: v-\xed\xa0\x80".to_vec(),
            3 => b"X-Overlong: \xc0\xaf".to_vec(),
            4 => b"X-Truncated: \xe2\x82".to_vec(),
            _ => {
                // Random bytes, never CR or LF, with at least one invalid sequence.
                let mut value: Vec<u8> = self
                    .rng
                    .bytes_in(1, 40)
                    .into_iter()
                    .filter(|b| !matches!(b, b'\r' | b'\n'))
                    .collect();
                let at = self.rng.range(0, value.len());
                value.insert(at, 0xff);
                let mut defect = b"X-Junk: a".to_vec();
                defect.extend_from_slice(&value);
                defect
            }
        };
        let lines = self.with_defect(defect);
        refused_add(class, i, lines, payload)
    }

    fn no_colon(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let defect = match self.rng.below(3) {
            0 => b"nocolon".to_vec(),
            1 => format!("X-{} value", self.rng.token(6)).into_bytes(),
            _ => self.rng.token_in(1, 30).into_bytes(),
        };
        let lines = self.with_defect(defect);
        refused_add("a header line without a colon", i, lines, payload)
    }

    fn broken_framing(&mut self, i: usize) -> Request {
        let class = "broken header framing (version, status, name)";
        let payload = self.small_payload();
        let lines = self.with_delay();
        let mut request = refused_add(class, i, lines, payload);
        let header = request.header.as_mut().unwrap();
        let version_len = b"NATS/1.0\r\n".len();
        let version: &[u8] = match self.rng.below(7) {
            0 => b"NATS/1.0 abc\r\n",
            1 => b"NATS/2.0\r\n",
            2 => b"HTTP/1.1 200\r\n",
            3 => b"\r\n",
            4 => b"NATS/1.0\r\n: v\r\n",
            5 => b"NATS/1.0\r\nA B: v\r\n",
            _ => b"NATS/1.0\r\n\xc3\x84: v\r\n",
        };
        header.splice(..version_len, version.iter().copied());
        request
    }

    fn many_headers(&mut self, i: usize) -> Request {
        let mut lines: Vec<Vec<u8>> = (0..10_000)
            .map(|k| format!("X-Many-{k}: v").into_bytes())
            .collect();
        // Well-formed, so a defect of its own: no time header, an unknown one, or both.
        match self.rng.below(3) {
            0 => {}
            1 => lines.push(b"Sched-Qux: 1".to_vec()),
            _ => {
                lines.push(self.delay_line());
                lines.push(b"Sched-At: 2030-01-01T00:00:00Z".to_vec());
            }
        }
        refused_add("10 000 headers", i, lines, Vec::new())
    }

    fn big_header(&mut self, i: usize) -> Request {
        let mut big = b"X-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        let lines = if self.rng.one_in(2) {
            vec![big]
        } else {
            big[512 * 1024] = b'\r';
            vec![big, self.delay_line()]
        };
        refused_add("1 MiB header", i, lines, Vec::new())
    }

    fn long_header_name(&mut self, i: usize) -> Request {
        let len = self.rng.range(65_536, 70_000);
        let defect = format!("X{}: v", "n".repeat(len - 1)).into_bytes();
        let lines = self.with_defect(defect);
        refused_add("header name over 65 535 bytes", i, lines, Vec::new())
    }

    fn unknown_sched_header(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let name = if self.rng.one_in(2) {
            format!("Sched-Q{}", self.rng.token_in(0, 10))
        } else {
            self.rng
                .pick(&[
                    "Sched-Dealy",
                    "Sched-Due",
                    "SCHED-IDS",
                    "sched-",
                    "Sched-At-Utc",
                    "sched-delay2",
                    "Sched-Cron",
                    "sCHED-tIMEZONE",
                ])
                .to_owned()
        };
        let value = self.rng.text_in(1, 20);
        // Random headers around it, as a real request might have.
        let mut lines = self.with_defect(line(&name, &value));
        lines.extend(self.extra_headers(6));
        refused_add("unknown Sched-* header", i, lines, payload)
    }

    fn at_garbage(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let value = if self.rng.one_in(3) {
            format!("~{}", self.rng.text_in(1, 40))
        } else {
            self.rng
                .pick(&[
                    "next tuesday",
                    "2030-01-01T00:00:00",
                    "2030-13-01T00:00:00Z",
                    "2030-02-30T00:00:00Z",
                    "2030-01-01",
                    "2030-01-01T25:00:00Z",
                    "1700000000",
                    "",
                    "Z",
                    "2030-01-01T00:00:00ZZ",
                    "2030-01-01T00:00:00+26:00",
                    "0000-00-00T00:00:00Z",
                    "now",
                ])
                .to_owned()
        };
        let lines = self.with_time(line("Sched-At", &value));
        refused_add("Sched-At garbage", i, lines, payload)
    }

    fn at_far_future(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let value = self.rng.pick(&[
            "9999-12-31T23:59:59Z",
            "9999-12-30T22:00:01Z",
            "9999-12-30T22:00:00.9991Z",
            "+275760-09-13T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "+010000-01-01T00:00:00Z",
            "99999-12-31T23:59:59Z",
        ]);
        let lines = self.with_time(line("Sched-At", value));
        refused_add("Sched-At after 9999", i, lines, payload)
    }

    fn delay_overflow(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let value = self.rng.pick(&[
            "99999999999999999999999",
            "18446744073709551616",
            "18446744073709551615",
            "9223372036854775807",
            "253402207200999",
            "300000y",
            "600000000y",
            "99999999999999999999h",
            "18446744073709551615s",
        ]);
        let lines = self.with_time(line("Sched-Delay", value));
        refused_add("Sched-Delay overflowing", i, lines, payload)
    }

    fn delay_negative(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let value = self
            .rng
            .pick(&["-1", "-1000", "-5m", "-250ms", "- 1s", "\u{2212}1s"]);
        let lines = self.with_time(line("Sched-Delay", value));
        refused_add("Sched-Delay negative", i, lines, payload)
    }

    fn delay_garbage(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let value = if self.rng.one_in(3) {
            format!("~{}", self.rng.text_in(1, 30))
        } else {
            self.rng
                .pick(&[
                    "soon",
                    "1parsec",
                    "PT15M",
                    "0x10",
                    "1h30",
                    "ms",
                    "",
                    "1e3",
                    "1_000",
                    "NaN",
                    "1 fortnight",
                    "\u{221e}",
                ])
                .to_owned()
        };
        let lines = self.with_time(line("Sched-Delay", &value));
        refused_add("Sched-Delay garbage", i, lines, payload)
    }

    fn both_times(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let lines = self.with_defect(line("Sched-At", "2030-01-01T00:00:00Z"));
        refused_add("both Sched-At and Sched-Delay", i, lines, payload)
    }

    fn no_time(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let mut lines = self.extra_headers(4);
        if self.rng.one_in(3) {
            lines.push(line("Sched-Id", &format!("nt-{i}")));
        }
        refused_add("neither Sched-At nor Sched-Delay", i, lines, payload)
    }

    fn repeated_time(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let repeat = match self.rng.below(3) {
            0 => line("Sched-Delay", "1000"),
            1 => line("sched-delay", "2s"),
            _ => line("SCHED-DELAY", "1500ms"),
        };
        let lines = self.with_defect(repeat);
        refused_add("a time header given twice", i, lines, payload)
    }

    fn id_defect(&mut self, i: usize, class: &'static str, id: &str) -> Request {
        let payload = self.small_payload();
        let lines = self.with_defect(line("Sched-Id", id));
        refused_add(class, i, lines, payload)
    }

    fn bad_id_chars(&mut self) -> String {
        let bad = self.rng.pick(&[
            " ", "/", "*", ">", ",", "#", "\"", "'", "!", "@", "$", "%", "&", "(", "=", "+", "~",
            "\t", "\u{fc}", "\u{20ac}", "\u{1}", "\u{7f}", "\\",
        ]);
        format!("v{}{bad}{}", self.rng.token(4), self.rng.token(4))
    }

    fn id_bad_chars(&mut self, i: usize) -> Request {
        let id = self.bad_id_chars();
        self.id_defect(i, "Sched-Id with invalid characters", &id)
    }

    fn id_too_long(&mut self, i: usize) -> Request {
        let len = if self.rng.one_in(20) {
            10_000
        } else {
            self.rng.range(129, 512)
        };
        let id: String = (0..len)
            .map(|k| if k % 7 == 3 { '.' } else { 'i' })
            .collect();
        self.id_defect(i, "Sched-Id over 128 characters", &id)
    }

    fn id_empty(&mut self, i: usize) -> Request {
        let id = self.rng.pick(&["", " ", "   "]);
        self.id_defect(i, "Sched-Id empty", id)
    }

    fn id_generated_layout(&mut self, i: usize) -> Request {
        // A segment seq natsched has not written, and too far ahead to reserve (2^46 on; one
        // below is an id another store generated, which an import brings: it is reserved).
        let due = self.rng.next() % (1 << 48);
        let seq = (1 << 46) + self.rng.next() % ((1 << 48) - (1 << 46));
        let index = self.rng.next() as u16;
        let id = far_id(due, seq, index).expect("seq fits");
        self.id_defect(i, "Sched-Id of the generated-id layout, too far ahead", &id)
    }

    fn payload_too_large(&mut self, i: usize) -> Request {
        let len = self.rng.range(API_MAX_PAYLOAD + 1, 64 * 1024);
        let payload = self.rng.bytes(len);
        let lines = self.with_delay();
        let mut request = refused_add("payload over api.max_payload", i, lines, payload);
        request.expect = Expect::Refused(Some(413));
        request
    }

    fn no_headers(&mut self, i: usize) -> Request {
        let payload = if self.rng.one_in(2) {
            Vec::new()
        } else {
            self.small_payload()
        };
        let mut request = refused_add("no header block (PUB)", i, Vec::new(), payload);
        request.header = None;
        request
    }

    /// A target natsched may not publish to (a built-in deny rule), with odd characters in it
    /// that its 403 description must quote escaped.
    fn denied_target(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let odd = ["", "\u{1b}[31m", "\u{7f}", "\u{200b}", "\u{e9}", "\u{1}"][self.rng.below(6)];
        let target = match self.rng.below(7) {
            0 => format!("$SYS.REQ.SERVER.PING{odd}"),
            1 => format!("$JS.API.STREAM.DELETE.S{i}{odd}"),
            2 => format!("$KV.bucket.k{i}{odd}"),
            3 => format!("$O.store.{i}{odd}"),
            4 => format!("$SRV.PING{odd}"),
            5 => format!("_INBOX.{i}{odd}"),
            _ => format!("sched.add.loop.{i}{odd}"),
        };
        let lines = self.with_delay();
        let mut request = refused_add("denied target", i, lines, payload);
        request.subject = format!("sched.add.{target}").into_bytes();
        request.expect = Expect::Refused(Some(403));
        request
    }

    fn wildcard_target(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let target = match self.rng.below(7) {
            0 => format!("bad.{i}.*"),
            1 => format!("bad.{i}.>"),
            2 => "*".to_owned(),
            3 => ">".to_owned(),
            4 => format!("bad.*.{i}"),
            5 => format!("*.bad.{i}"),
            _ => format!("bad.{i}.>.x"),
        };
        let lines = self.with_delay();
        let mut request = refused_add("wildcard target", i, lines, payload);
        request.subject = format!("sched.add.{target}").into_bytes();
        request
    }

    fn empty_token_target(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let shape = self.rng.below(EMPTY_TOKEN_SHAPES);
        let lines = self.with_delay();
        let mut request = refused_add("empty-token target", i, lines, payload);
        request.subject = empty_token_subject("sched", shape, i);
        if !self.routed[shape] {
            request.expect = Expect::Unroutable;
        }
        request
    }

    fn long_target(&mut self, i: usize) -> Request {
        let len = self.rng.range(65_536, 70_000);
        let lines = self.with_delay();
        let mut request = refused_add("target over 65 535 bytes", i, lines, Vec::new());
        request.subject = format!("sched.add.bad.{i}.{}", "t".repeat(len)).into_bytes();
        request
    }

    fn target_invalid_utf8(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let lines = self.with_delay();
        let mut request = refused_add("target of invalid UTF-8", i, lines, payload);
        let junk: &[u8] =
            self.rng
                .pick(&[&b"\xff"[..], b"\xc3\x28", b"a\xe2\x82", b"\xed\xa0\x80"]);
        let mut subject = format!("sched.add.bad.{i}.").into_bytes();
        subject.extend_from_slice(junk);
        request.subject = subject;
        request
    }

    /// Unicode whitespace in a subject: one token to nats-server, which separates protocol
    /// arguments by spaces and tabs only, so a client splitting on any whitespace misreads the
    /// message. The add itself lacks its time header.
    fn unicode_whitespace(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let space = self
            .rng
            .pick(&["\u{a0}", "\u{2003}", "\u{3000}", "\u{85}", "\u{2028}"]);
        let mut request = refused_add("Unicode whitespace in a subject", i, Vec::new(), payload);
        match self.rng.below(3) {
            0 => request.subject = format!("sched.add.bad.{i}.a{space}b").into_bytes(),
            1 => {
                request.reply_tail = self.rng.pick(&[".\u{a0}", ".x\u{2003}y", ".\u{3000}"]);
            }
            _ => {
                request.subject = format!("sched.add.bad.{i}.{space}").into_bytes();
                request.reply_tail = ".\u{a0}";
            }
        }
        request
    }

    fn bare_add(&mut self, i: usize) -> Request {
        let payload = self.small_payload();
        let lines = self.with_delay();
        let mut request = refused_add("no target (bare sched.add)", i, lines, payload);
        request.subject = b"sched.add".to_vec();
        request
    }

    /// A body that is no schedule id, and the code it gets (`None`: some error).
    fn garbage_id(&mut self, i: usize) -> (Vec<u8>, Option<u16>) {
        match self.rng.below(9) {
            0 => {
                let mut body = self.rng.bytes_in(0, 40);
                let at = self.rng.range(0, body.len());
                body.insert(at, 0xff);
                (body, Some(400))
            }
            1 => (Vec::new(), Some(400)),
            2 => (
                self.rng.pick(&[&b" "[..], b"\t\r\n", b"  \n"]).to_vec(),
                Some(400),
            ),
            3 => (
                "i".repeat(self.rng.range(129, 2000)).into_bytes(),
                Some(400),
            ),
            4 => (format!("nx {i}").into_bytes(), Some(400)),
            5 => (self.bad_id_chars().into_bytes(), Some(400)),
            6 => (
                self.rng
                    .pick(&[&b"a\x00b"[..], b"\x1b[31m", b"a\rb", b"a\nb"])
                    .to_vec(),
                Some(400),
            ),
            7 => (format!("nx-{i}").into_bytes(), Some(404)),
            _ => {
                let id = far_id(self.rng.next() % (1 << 47), self.rng.next() % 1000, 7);
                (id.expect("seq fits").into_bytes(), None)
            }
        }
    }

    fn cancel_garbage(&mut self, i: usize) -> Request {
        let (body, code) = self.garbage_id(i);
        refused_op("cancel: not a pending id", "cancel", body, code)
    }

    fn get_garbage(&mut self, i: usize) -> Request {
        let (body, code) = self.garbage_id(i);
        refused_op("get: not a pending id", "get", body, code)
    }

    fn list_garbage(&mut self, _: usize) -> Request {
        let body: Vec<u8> = match self.rng.below(6) {
            0 => self
                .rng
                .pick(&[
                    "not json",
                    "{",
                    "}",
                    "[1,2]",
                    "null",
                    "true",
                    "1",
                    "\"x\"",
                    "{\"subject\":}",
                    "{\"limit\":1,}",
                    "{'limit':1}",
                    "{\"subjct\":\"a\"}",
                    "{\"limit\":1,\"extra\":true}",
                ])
                .as_bytes()
                .to_vec(),
            1 => format!("x{}", self.rng.text_in(0, 60)).into_bytes(),
            // Control characters in keys and values, escaped and raw; invalid UTF-8.
            2 => self
                .rng
                .pick(&[
                    &br#"{"a\nb":1}"#[..],
                    br#"{"a\rb":1}"#,
                    br#"{"\u0000":1}"#,
                    br#"{"\u001b[31m":1}"#,
                    b"{\"a\x01b\":1}",
                    b"{\"subject\":\"\xff\"}",
                    b"{\"\xc3\x28\":1}",
                ])
                .to_vec(),
            3 => {
                let limit = self.rng.pick(&[
                    "0",
                    "1001",
                    "-1",
                    "1e99",
                    "18446744073709551616",
                    "1.5",
                    "\"10\"",
                    "null",
                    "true",
                    "[]",
                    "99999999999999999999999999",
                ]);
                format!("{{\"subject\":\"valid.>\",\"limit\":{limit}}}").into_bytes()
            }
            4 => {
                let cursor = self.rng.pick(&[
                    "\"nope\"",
                    "\"abc:x\"",
                    "\":x\"",
                    "\"99999999999999999999:x\"",
                    "\"-1:x\"",
                    "\"\"",
                    "\"1.5:x\"",
                    "\" 1:x\"",
                    "\"1\"",
                    "5",
                    "{}",
                ]);
                format!("{{\"limit\":5,\"cursor\":{cursor}}}").into_bytes()
            }
            _ => {
                let filter = self.rng.pick(&[
                    "\"a..b\"",
                    "\"\"",
                    "\"a.>.b\"",
                    "\">.a\"",
                    "\"a b\"",
                    "\"a\\tb\"",
                    "\".\"",
                    "\"a.\"",
                    "\".a\"",
                    "\"a.\\u0000\"",
                    "\"a\\u001b\"",
                    "\"\\u00a0\"",
                    "5",
                ]);
                format!("{{\"subject\":{filter},\"limit\":10}}").into_bytes()
            }
        };
        refused_op("list: invalid request", "list", body, Some(400))
    }

    fn list_valid(&mut self, _: usize) -> Request {
        let body = self.rng.pick(&[
            "",
            "  \n",
            "{}",
            "{\"limit\":1}",
            "{\"limit\":1000,\"subject\":\"nomatch.>\"}",
            "{\"subject\":\"valid.*\",\"limit\":5}",
            "{\"subject\":\"bad.>\",\"limit\":3}",
            "{\"cursor\":\"0:\",\"limit\":2}",
            "{\"cursor\":\"12:x:y\",\"limit\":2}",
            " { \"subject\" : \">\" , \"limit\" : 3 } ",
        ]);
        Request {
            class: "list: valid request",
            subject: b"sched.list".to_vec(),
            header: None,
            payload: body.as_bytes().to_vec(),
            reply: true,
            reply_tail: "",
            expect: Expect::Answered("items"),
        }
    }

    fn stats_garbage(&mut self, _: usize) -> Request {
        let payload = match self.rng.below(4) {
            0 => self.rng.bytes_in(0, 200),
            1 => b"\xff\xfe{}".to_vec(),
            2 => self
                .rng
                .pick(&[&b"{}"[..], b"null", b"please", b""])
                .to_vec(),
            _ => self.rng.bytes(64 * 1024),
        };
        Request {
            class: "stats: garbage body",
            subject: b"sched.stats".to_vec(),
            header: None,
            payload,
            reply: true,
            reply_tail: "",
            expect: Expect::Answered("pending"),
        }
    }

    fn get_known(&mut self, _: usize) -> Request {
        let n = self.rng.below(self.valid_sent.max(1));
        let body = if self.rng.one_in(2) {
            format!("v-{n}")
        } else {
            format!(" v-{n}\n")
        };
        Request {
            class: "get: a valid schedule's id",
            subject: b"sched.get".to_vec(),
            header: None,
            payload: body.into_bytes(),
            reply: true,
            reply_tail: "",
            expect: Expect::AnyReply,
        }
    }

    fn hostile_on_ops(&mut self, _: usize) -> Request {
        let header: &[u8] = self.rng.pick(&[
            &b"NATS/1.0\r\nX: a\rb\r\n\r\n"[..],
            b"NATS/1.0\r\nX: \xff\xfe\r\n\r\n",
            b"NATS/1.0\r\nnocolon\r\n\r\n",
            b"NATS/1.0\r\nX: a\nY: b\r\n\r\n",
            b"HTTP/1.1 200\r\n\r\n",
        ]);
        let (op, body, expect): (&str, &[u8], Expect) = self.rng.pick(&[
            ("cancel", &b"a b"[..], Expect::Refused(Some(400))),
            ("get", b"", Expect::Refused(Some(400))),
            ("list", b"{", Expect::Refused(Some(400))),
            ("stats", b"", Expect::Answered("pending")),
        ]);
        Request {
            class: "hostile header block to cancel/get/list/stats",
            subject: format!("sched.{op}").into_bytes(),
            header: Some(header.to_vec()),
            payload: body.to_vec(),
            reply: true,
            reply_tail: "",
            expect,
        }
    }

    /// Valid schedule `n`: to `valid.<n>` as `v-<n>`, due in 1 to 3 s (a few long overdue).
    fn valid(&mut self, n: usize) -> (Request, ValidSpec) {
        let id = line(
            self.rng.pick(&["Sched-Id", "sched-id", "SCHED-ID"]),
            &format!("v-{n}"),
        );
        let ms = self.rng.range(1000, 3000);
        let time = match self.rng.below(100) {
            0..=69 => {
                let value = match self.rng.below(3) {
                    0 => ms.to_string(),
                    1 => format!("{ms}ms"),
                    _ => format!("{}s {}ms", ms / 1000, ms % 1000),
                };
                line(self.rng.pick(&["Sched-Delay", "sched-delay"]), &value)
            }
            70..=94 => {
                let offset_minutes = self.rng.pick(&[0i32, 60, -300, 330, 545, -720, 840]);
                let offset = jiff::tz::Offset::from_seconds(offset_minutes * 60).unwrap();
                let due = jiff::Timestamp::now()
                    .checked_add(jiff::SignedDuration::from_micros(ms as i64 * 1000 + 250))
                    .unwrap();
                let value = due.display_with_offset(offset).to_string();
                line(self.rng.pick(&["Sched-At", "sched-at"]), &value)
            }
            95..=96 => line("Sched-Delay", "0"),
            _ => {
                let past = self.rng.pick(&[
                    "0001-01-01T00:00:00Z",
                    "1969-07-20T20:17:40Z",
                    "-000001-01-01T00:00:00Z",
                    "1970-01-01T00:00:00.000Z",
                    "1999-12-31T23:59:59.999+14:00",
                ]);
                line("Sched-At", past)
            }
        };
        let headers: Vec<(String, String)> = (0..self.rng.range(0, 2))
            .map(|k| {
                let name = format!("X-V{k}-{}", self.rng.token_in(1, 8));
                (name, self.rng.text_in(1, 30))
            })
            .collect();
        let mut lines: Vec<Vec<u8>> = headers.iter().map(|(n, v)| line(n, v)).collect();
        lines.push(id);
        lines.push(time);
        let swap = self.rng.below(lines.len());
        let last = lines.len() - 1;
        lines.swap(swap, last);
        let payload = match self.rng.below(10) {
            0 => Vec::new(),
            1 => self.rng.bytes(API_MAX_PAYLOAD),
            _ => self.small_payload(),
        };
        self.valid_sent = self.valid_sent.max(n + 1);
        let request = Request {
            class: "valid schedule",
            subject: format!("sched.add.valid.{n}").into_bytes(),
            header: Some(header_block(&lines)),
            payload: payload.clone(),
            reply: true,
            reply_tail: "",
            expect: Expect::Scheduled(n),
        };
        (request, ValidSpec { payload, headers })
    }
}

/// Fixed cases: every raw-protocol case of the issue, the size limits, and the edge cases the
/// random classes only sometimes reach. Each is sent once, at a random place in the mix.
const FIXED: usize = 27;

fn fixed(j: usize, i: usize) -> Request {
    let delay = || b"Sched-Delay: 1500".to_vec();
    let hostile = |class: &'static str, defect: &[u8]| {
        refused_add(class, i, vec![delay(), defect.to_vec()], Vec::new())
    };
    let block_of = |version: &[u8], class: &'static str| {
        let mut header = version.to_vec();
        header.extend_from_slice(b"Sched-Delay: 1500\r\n\r\n");
        let mut request = refused_add(class, i, Vec::new(), Vec::new());
        request.header = Some(header);
        request
    };
    // 700 000 DEL bytes: a control character, escaped to 6 bytes in an error description that
    // quotes it; the error reply (header and body) outgrows the server's max_payload.
    let dels = || "\u{7f}".repeat(700_000);
    match j {
        0 => hostile("fixed: bare CR", b"X: a\rb"),
        1 => hostile("fixed: bare LF", b"X: a\nb"),
        2 => hostile("fixed: invalid UTF-8", b"X: \xff\xfe"),
        3 => hostile("fixed: a line without a colon", b"nocolon"),
        4 => {
            let lines = (0..10_000)
                .map(|k| format!("X-Many-{k}: v").into_bytes())
                .collect();
            refused_add("fixed: 10 000 headers", i, lines, Vec::new())
        }
        5 => {
            let big = format!("X-Big: {}", "a".repeat(1024 * 1024)).into_bytes();
            refused_add("fixed: a 1 MiB header", i, vec![big], Vec::new())
        }
        6 => hostile("fixed: bare LF before another header", b"X: a\nY: b"),
        7 => hostile("fixed: bare LF before a continuation", b"X: a\n b"),
        8 => block_of(b"NATS/1.0\n", "fixed: bare LF ending the version line"),
        9 => hostile("fixed: bare LF ending a value", b"X: a\n"),
        10 => hostile("fixed: bare CR ending a value", b"X: a\r"),
        11 => hostile("fixed: bare CR starting a value", b"X: \ra"),
        12 => block_of(b"NATS/1.0\r\r\n", "fixed: bare CR ending the version line"),
        13 => {
            let mut lines: Vec<Vec<u8>> = (0..70_000)
                .map(|k| format!("X-{k}: v").into_bytes())
                .collect();
            lines.push(delay());
            refused_add("fixed: 70 000 headers", i, lines, Vec::new())
        }
        14 => hostile(
            "fixed: a header name of 70 000 bytes",
            format!("{}: v", "N".repeat(70_000)).as_bytes(),
        ),
        15 => {
            // Fits the server as a request, but not once Sched-Id and Sched-Due are added.
            let overhead = "NATS/1.0\r\nSched-Delay: 1500\r\nX-Fill: \r\n\r\n".len();
            let fill = "f".repeat(SERVER_MAX_PAYLOAD - 10 - overhead);
            let lines = vec![delay(), line("X-Fill", &fill)];
            let mut request = refused_add(
                "fixed: delivered size over the server's max_payload",
                i,
                lines,
                Vec::new(),
            );
            request.expect = Expect::Refused(Some(413));
            request
        }
        16 => {
            let mut request = refused_add(
                "fixed: a 2 MiB payload",
                i,
                vec![delay()],
                vec![b'p'; 2 * 1024 * 1024],
            );
            request.expect = Expect::Refused(Some(413));
            request
        }
        17 => {
            let mut request = refused_add(
                "fixed: a target of 70 000 bytes",
                i,
                vec![delay()],
                Vec::new(),
            );
            request.subject = format!("sched.add.{}", "t".repeat(70_000)).into_bytes();
            request
        }
        18 => refused_add(
            "fixed: Sched-At of 700 000 control characters",
            i,
            vec![line("Sched-At", &dels())],
            Vec::new(),
        ),
        19 => hostile(
            "fixed: Sched-Id of 700 000 control characters",
            &line("Sched-Id", &dels()),
        ),
        20 => refused_op(
            "fixed: get body of 700 000 control characters",
            "get",
            dels().into_bytes(),
            Some(400),
        ),
        21 => refused_op(
            "fixed: list filter of 700 000 control characters",
            "list",
            format!("{{\"subject\":\"{}\"}}", dels()).into_bytes(),
            Some(400),
        ),
        22 => refused_op(
            "fixed: get body of 1 MiB",
            "get",
            vec![b'i'; 1024 * 1024],
            Some(400),
        ),
        23 => refused_add(
            "fixed: Sched-At +275760-09-13T00:00:00Z",
            i,
            vec![line("Sched-At", "+275760-09-13T00:00:00Z")],
            Vec::new(),
        ),
        24 => refused_add(
            "fixed: Sched-Delay 99999999999999999999999",
            i,
            vec![line("Sched-Delay", "99999999999999999999999")],
            Vec::new(),
        ),
        25 => hostile(
            "fixed: Sched-Id of the generated-id layout, too far ahead",
            &line("Sched-Id", &far_id(1_796_061_600_000, 1 << 46, 7).unwrap()),
        ),
        _ => {
            let mut request = refused_add("fixed: bare sched.add", i, vec![delay()], b"x".to_vec());
            request.subject = b"sched.add".to_vec();
            request
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What came back
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    /// Replies, per request.
    replies: Vec<Vec<RawMessage>>,
    /// Deliveries, per valid schedule.
    deliveries: Vec<Vec<RawMessage>>,
    /// Deliveries no valid schedule explains (on `bad.>`, or on `valid.>` to a wrong subject).
    strays: Vec<RawMessage>,
    /// Replies to subjects no request used.
    unknown_replies: Vec<RawMessage>,
    stats: BTreeMap<usize, RawMessage>,
    /// Requests whose reply the pacing waits for.
    window: BTreeSet<usize>,
    /// Requests that must be answered and are not yet.
    outstanding: BTreeSet<usize>,
    /// Valid schedules not delivered yet.
    undelivered: BTreeSet<usize>,
}

/// The number after `prefix` in `subject`, up to the next `.`.
fn index_after(subject: &[u8], prefix: &str) -> Option<usize> {
    let rest = subject.strip_prefix(prefix.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'.').unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

impl Seen {
    fn absorb(&mut self, messages: Vec<RawMessage>) {
        for message in messages {
            match message.sid {
                SID_REPLY => match index_after(&message.subject, REPLY_PREFIX) {
                    Some(i) if i < self.replies.len() => {
                        self.window.remove(&i);
                        self.outstanding.remove(&i);
                        self.replies[i].push(message);
                    }
                    _ => self.unknown_replies.push(message),
                },
                SID_VALID => match index_after(&message.subject, "valid.") {
                    Some(n) if n < VALID => {
                        self.undelivered.remove(&n);
                        self.deliveries[n].push(message);
                    }
                    _ => self.strays.push(message),
                },
                SID_STATS => match index_after(&message.subject, STATS_PREFIX) {
                    Some(k) => {
                        self.stats.insert(k, message);
                    }
                    None => self.unknown_replies.push(message),
                },
                _ => self.strays.push(message),
            }
        }
    }
}

/// Reads until `done` or `deadline`; returns whether `done`.
fn pump(
    raw: &mut RawClient,
    seen: &mut Seen,
    deadline: Instant,
    done: impl Fn(&Seen) -> bool,
) -> bool {
    loop {
        seen.absorb(std::mem::take(&mut raw.received));
        if done(seen) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        raw.read_until(|got| !got.is_empty() || Instant::now() >= deadline);
    }
}

/// natsched's counters, asked over the raw connection.
fn stats(raw: &mut RawClient, seen: &mut Seen, k: usize) -> serde_json::Value {
    let reply = format!("{STATS_PREFIX}{k}");
    raw.publish(b"sched.stats", Some(reply.as_bytes()), b"");
    let answered = pump(raw, seen, Instant::now() + WAIT, |s| {
        s.stats.contains_key(&k)
    });
    assert!(answered, "no answer to sched.stats");
    serde_json::from_slice(&seen.stats[&k].payload).expect("stats are JSON")
}

fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {stats}"))
}

/// Header lines of a raw header block, as (name, value).
fn header_lines(block: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(block)
        .split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Problems found, by kind, with examples.
#[derive(Default)]
struct Problems(BTreeMap<String, Vec<String>>);

impl Problems {
    fn add(&mut self, kind: impl Into<String>, example: impl Into<String>) {
        self.0.entry(kind.into()).or_default().push(example.into());
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for (kind, examples) in &self.0 {
            out.push_str(&format!("\n* {kind}: {} case(s)\n", examples.len()));
            for example in examples.iter().take(3) {
                out.push_str(&format!("    {example}\n"));
            }
        }
        out
    }
}

fn natsched_connection(server: &NatsServer) -> serde_json::Value {
    let mine: Vec<serde_json::Value> = server
        .connections()
        .into_iter()
        .filter(|c| c["name"] == "natsched")
        .collect();
    assert_eq!(mine.len(), 1, "exactly one natsched connection: {mine:?}");
    mine[0].clone()
}

/// Everything the raw sender learnt, for the checks.
struct Run {
    sent: Vec<Sent>,
    specs: Vec<Option<ValidSpec>>,
    seen: Seen,
    before: serde_json::Value,
    after: serde_json::Value,
    settled: bool,
    send_time: Duration,
    /// From the end of sending until every answer and delivery was in.
    collect_time: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_requests_mixed_with_a_thousand_valid_schedules() {
    let seed = std::env::var("NATSCHED_MALFORMED_SEED")
        .ok()
        .map(|s| s.parse().expect("NATSCHED_MALFORMED_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED);
    // Shown with any failure (libtest prints a failed test's output).
    println!("seed {seed} (replay with NATSCHED_MALFORMED_SEED={seed})");
    let started = Instant::now();
    let server = NatsServer::start_monitored(SERVER_CONFIG);
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.api.max_payload = API_MAX_PAYLOAD;
    let daemon = Daemon::start(config).await;
    let connection_before = natsched_connection(&server);

    let port = server.port;
    let run = tokio::task::spawn_blocking(move || send_everything(port, seed))
        .await
        .expect("the raw sender panicked (natsched or the server closed the connection?)");
    let connection_after = natsched_connection(&server);

    let mut problems = check(&run);
    if connection_after["cid"] != connection_before["cid"] {
        problems.add(
            "natsched's NATS connection changed (a reconnect)",
            format!("before {connection_before}, after {connection_after}"),
        );
    }

    if !problems.0.is_empty() {
        // Printed now, in case what follows fails first.
        println!("problems found:{}", problems.report());
    }

    // Still scheduling and firing.
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "after.malformed").await;
    let (id, _) = schedule(&client, "after.malformed", &[("Sched-Delay", "100ms")]).await;
    assert_eq!(sched_id(&next(&mut sub).await), id);
    assert_eq!(
        natsched_connection(&server)["cid"],
        connection_before["cid"],
        "natsched reconnected"
    );
    daemon.stop().await;

    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for sent in &run.sent {
        *classes.entry(sent.class).or_default() += 1;
    }
    let summary: String = classes
        .iter()
        .map(|(class, n)| format!("  {n:5}  {class}\n"))
        .collect();
    println!(
        "seed {seed}: {} requests ({BAD} bad, {VALID} valid) sent in {:.1?}, all answers and \
         deliveries in {:.1?} later, test took {:.1?}\n{summary}",
        run.sent.len(),
        run.send_time,
        run.collect_time,
        started.elapsed()
    );
    assert!(
        problems.0.is_empty(),
        "seed {seed} (replay with NATSCHED_MALFORMED_SEED={seed}):{}",
        problems.report()
    );
}

/// Sends the whole mix over one raw connection, paced by PINGs and replies, then collects
/// until every answer and delivery is in and the quiet period is over.
fn send_everything(port: u16, seed: u64) -> Run {
    let mut raw = RawClient::connect(port);
    raw.subscribe(&format!("{REPLY_PREFIX}>"), SID_REPLY);
    raw.subscribe("valid.>", SID_VALID);
    raw.subscribe("bad.>", SID_BAD);
    raw.subscribe(&format!("{STATS_PREFIX}>"), SID_STATS);
    raw.ping();
    let total = BAD + VALID;
    let mut seen = Seen {
        replies: vec![Vec::new(); total],
        deliveries: vec![Vec::new(); VALID],
        undelivered: (0..VALID).collect(),
        ..Seen::default()
    };

    // Which empty-token shapes nats-server routes at all: a witness subscribed to everything
    // (under another prefix, so natsched sees none of it either way).
    let mut routed = [false; EMPTY_TOKEN_SHAPES];
    {
        let mut witness = RawClient::connect(port);
        witness.subscribe(">", 1);
        witness.ping();
        for shape in 0..EMPTY_TOKEN_SHAPES {
            raw.publish(&empty_token_subject("witness", shape, 0), None, b"probe");
        }
        raw.ping();
        witness.ping();
        for (shape, routed) in routed.iter_mut().enumerate() {
            let subject = empty_token_subject("witness", shape, 0);
            *routed = witness.received.iter().any(|m| m.subject == subject);
        }
    }

    let before = stats(&mut raw, &mut seen, 0);

    // The mix: which position gets a valid schedule, a fixed case or a random bad request.
    #[derive(Clone, Copy)]
    enum Slot {
        Valid(usize),
        Fixed(usize),
        Random,
    }
    let mut rng = Rng(seed);
    let mut slots: Vec<Slot> = (0..VALID).map(Slot::Valid).collect();
    slots.extend((0..FIXED).map(Slot::Fixed));
    slots.extend(std::iter::repeat_n(Slot::Random, BAD - FIXED));
    for k in (1..slots.len()).rev() {
        slots.swap(k, rng.below(k + 1));
    }
    // Valid schedules keep their numbers in sending order.
    let mut next_valid = 0;
    for slot in &mut slots {
        if let Slot::Valid(n) = slot {
            *n = next_valid;
            next_valid += 1;
        }
    }
    let mut generator = Gen {
        rng,
        routed,
        valid_sent: 0,
    };

    let sending = Instant::now();
    let mut sent = Vec::with_capacity(total);
    let mut specs: Vec<Option<ValidSpec>> = (0..VALID).map(|_| None).collect();
    for chunk_start in (0..total).step_by(CHUNK) {
        for (i, slot) in slots
            .iter()
            .enumerate()
            .take((chunk_start + CHUNK).min(total))
            .skip(chunk_start)
        {
            let request = match *slot {
                Slot::Valid(n) => {
                    let (request, spec) = generator.valid(n);
                    specs[n] = Some(spec);
                    request
                }
                Slot::Fixed(j) => fixed(j, i),
                Slot::Random => generator.random_bad(i),
            };
            let reply = format!("{REPLY_PREFIX}{i}{}", request.reply_tail);
            let reply = request.reply.then_some(reply.as_bytes());
            match &request.header {
                Some(header) => raw.hpub(&request.subject, reply, header, &request.payload),
                None => raw.publish(&request.subject, reply, &request.payload),
            }
            if request.reply && request.expect != Expect::Unroutable {
                seen.window.insert(i);
                seen.outstanding.insert(i);
            }
            sent.push(Sent {
                class: request.class,
                expect: request.expect,
                description: describe(i, &request),
            });
        }
        raw.ping();
        // Pacing: the previous chunks are answered before more is sent (a request never
        // answered stops holding the pace after PACE; it is reported at the end).
        let paced = pump(&mut raw, &mut seen, Instant::now() + PACE, |s| {
            s.window.first().is_none_or(|&i| i >= chunk_start)
        });
        if !paced {
            seen.window.retain(|&i| i >= chunk_start);
        }
    }
    let send_time = sending.elapsed();

    // Every answer and every delivery, then a quiet period for duplicates.
    let collecting = Instant::now();
    pump(&mut raw, &mut seen, Instant::now() + WAIT, |s| {
        s.outstanding.is_empty() && s.undelivered.is_empty()
    });
    let collect_time = collecting.elapsed();
    pump(&mut raw, &mut seen, Instant::now() + QUIET, |_| false);

    // The counters settle once everything scheduled has fired and left the store.
    let mut k = 1;
    let deadline = Instant::now() + WAIT;
    let (after, settled) = loop {
        let after = stats(&mut raw, &mut seen, k);
        k += 1;
        let scheduled = counter(&after, "scheduled_total") - counter(&before, "scheduled_total");
        let fired = counter(&after, "fired_total") - counter(&before, "fired_total");
        let settled = counter(&after, "pending") == 0 && fired >= scheduled;
        if settled || Instant::now() >= deadline {
            break (after, settled);
        }
        pump(
            &mut raw,
            &mut seen,
            Instant::now() + Duration::from_millis(50),
            |_| false,
        );
    };
    Run {
        sent,
        specs,
        seen,
        before,
        after,
        settled,
        send_time,
        collect_time,
    }
}

fn check(run: &Run) -> Problems {
    let mut problems = Problems::default();
    let seen = &run.seen;
    let mut error_replies = 0u64;
    let mut dropped = 0u64;
    let mut dropped_by_class: BTreeMap<&str, u64> = BTreeMap::new();
    for (i, sent) in run.sent.iter().enumerate() {
        let replies = &seen.replies[i];
        let what = &sent.description;
        let class = sent.class;
        for reply in replies {
            if let Some(code) = reply.error_code() {
                error_replies += 1;
                let body: Option<serde_json::Value> = serde_json::from_slice(&reply.payload).ok();
                let body_code = body.as_ref().and_then(|b| b["error"]["code"].as_u64());
                if body_code != Some(u64::from(code)) {
                    problems.add(
                        format!("error reply whose body does not match its code [{class}]"),
                        format!("{what} -> {code} {}", show(&reply.payload)),
                    );
                }
            }
        }
        if replies.len() > 1 {
            problems.add(
                format!("answered more than once [{class}]"),
                format!("{what}: {} replies", replies.len()),
            );
        }
        let reply = replies.first();
        match (sent.expect, reply) {
            (Expect::Unroutable, None) => {}
            (Expect::Unroutable, Some(reply)) => problems.add(
                format!("answered although nats-server should not route it [{class}]"),
                format!("{what} -> {:?}", reply.error_code()),
            ),
            (Expect::Dropped, None) => {
                dropped += 1;
                *dropped_by_class.entry(class).or_default() += 1;
            }
            (Expect::Dropped, Some(_)) => {
                problems.add(format!("reply without a reply subject [{class}]"), what)
            }
            (_, None) => problems.add(format!("no reply [{class}]"), what.clone()),
            (Expect::Refused(code), Some(reply)) => match reply.error_code() {
                None => problems.add(
                    format!("accepted, must be refused [{class}]"),
                    format!("{what} -> {}", show(&reply.payload)),
                ),
                Some(got) if code.is_some_and(|code| code != got) => problems.add(
                    format!("refused with {got}, expected {} [{class}]", code.unwrap()),
                    format!("{what} -> {}", show(&reply.payload)),
                ),
                Some(_) => {}
            },
            (Expect::Scheduled(n), Some(reply)) => {
                let body: Option<serde_json::Value> = serde_json::from_slice(&reply.payload).ok();
                let due_ok = body
                    .as_ref()
                    .and_then(|b| b["due"].as_str())
                    .is_some_and(|due| due.parse::<jiff::Timestamp>().is_ok());
                let id_ok = body
                    .as_ref()
                    .is_some_and(|b| b["id"] == format!("v-{n}").as_str());
                if reply.error_code().is_some() || !due_ok || !id_ok {
                    problems.add(
                        "valid schedule not acknowledged",
                        format!(
                            "{what} -> {:?} {}",
                            reply.error_code(),
                            show(&reply.payload)
                        ),
                    );
                }
            }
            (Expect::Answered(key), Some(reply)) => {
                let body: Option<serde_json::Value> = serde_json::from_slice(&reply.payload).ok();
                if reply.error_code().is_some()
                    || body.as_ref().is_none_or(|b| b.get(key).is_none())
                {
                    problems.add(
                        format!("not answered as expected [{class}]"),
                        format!(
                            "{what} -> {:?} {}",
                            reply.error_code(),
                            show(&reply.payload)
                        ),
                    );
                }
            }
            (Expect::AnyReply, Some(_)) => {}
        }
    }
    for reply in &seen.unknown_replies {
        problems.add("reply to an unknown subject", show(&reply.subject));
    }

    // Every valid schedule exactly once, on its own subject, verbatim.
    for (n, deliveries) in seen.deliveries.iter().enumerate() {
        let spec = run.specs[n]
            .as_ref()
            .expect("every valid schedule was sent");
        match deliveries.len() {
            0 => problems.add("valid schedule never delivered", format!("v-{n}")),
            1 => {}
            k => problems.add(
                "valid schedule delivered more than once",
                format!("v-{n}: {k} times"),
            ),
        }
        for delivery in deliveries {
            let headers = header_lines(delivery.header.as_deref().unwrap_or_default());
            let id = headers.iter().find(|(name, _)| name == "Sched-Id");
            let mut wrong = Vec::new();
            if id.is_none_or(|(_, id)| *id != format!("v-{n}")) {
                wrong.push(format!("Sched-Id {id:?}"));
            }
            if delivery.payload != spec.payload {
                wrong.push(format!("payload {}", show(&delivery.payload)));
            }
            for header in &spec.headers {
                if !headers.contains(header) {
                    wrong.push(format!("header {header:?} missing"));
                }
            }
            if !wrong.is_empty() {
                problems.add(
                    "valid schedule delivered altered",
                    format!("v-{n}: {}", wrong.join(", ")),
                );
            }
        }
    }
    for stray in &seen.strays {
        let headers = String::from_utf8_lossy(stray.header.as_deref().unwrap_or_default());
        problems.add(
            "delivery no valid schedule explains (a refused request was scheduled)",
            format!("{} {headers:?}", show(&stray.subject)),
        );
    }

    // The counters agree: every error answered or dropped is counted, only the valid were
    // scheduled, and all of them fired.
    let delta = |name: &str| counter(&run.after, name) - counter(&run.before, name);
    if delta("errors_total") != error_replies + dropped {
        problems.add(
            "errors_total disagrees",
            format!(
                "grew by {}, expected {error_replies} error replies received + {dropped} \
                 malformed publishes dropped (a refused request left unanswered, a malformed \
                 publish accepted, or one dropped uncounted makes the difference); the \
                 dropped publishes by class: {dropped_by_class:?}",
                delta("errors_total")
            ),
        );
    }
    // Every denied target is counted as such, answered or not.
    let denied = run
        .sent
        .iter()
        .filter(|s| s.class == "denied target")
        .count() as u64;
    if delta("denied_total") != denied {
        problems.add(
            "denied_total disagrees",
            format!("grew by {}, expected {denied}", delta("denied_total")),
        );
    }
    if delta("scheduled_total") != VALID as u64 {
        problems.add(
            "scheduled_total disagrees (refused requests were scheduled)",
            format!("grew by {}, expected {VALID}", delta("scheduled_total")),
        );
    }
    if !run.settled || delta("fired_total") != delta("scheduled_total") {
        problems.add(
            "fired_total / pending did not settle",
            format!(
                "fired_total grew by {}, scheduled_total by {}; pending {}",
                delta("fired_total"),
                delta("scheduled_total"),
                run.after["pending"]
            ),
        );
    }
    problems
}
