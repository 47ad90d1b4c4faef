//! `natsched import`: an export file scheduled through a running natsched (see the module
//! above).
//!
//! Lines are read and checked one at a time and each request is sent at once as its own task,
//! so requests are pipelined on the one connection: at most `--in-flight` (and about
//! [`MAX_BYTES_IN_FLIGHT`] of payload) wait for their answers at a time, which keeps 100 000
//! schedules from costing 100 000 round trips in series and memory bounded whatever the file
//! holds.
//!
//! A request that gets no answer, or 503, may have been stored all the same, and may even have
//! fired since. Sending it again blindly could fire it twice (a one-shot no longer pending is
//! stored anew; a series that moved on is put back), so first `get` asks: pending means
//! imported; not pending and due later means it was not stored, and it is sent again; not
//! pending and due already is reported as uncertain, not sent again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::line::{FORMAT, Line, LineError, Mark, Request, VERSION, shown};
use crate::client::Connection;
use crate::protocol;
use crate::time;

/// Longest line read beyond the server's `max_payload` in base64; the rest of a longer one is
/// skipped (reported as too long). A line's payload must fit the server's `max_payload`, so
/// anything longer could not be scheduled anyway, and a hostile file costs at most this.
const LINE_SLACK: usize = 1 << 20;
/// About how many payload bytes may wait for answers at once (one request always may).
const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// How long one request waits for natsched's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a request without an answer, or answered 503, is sent.
const ATTEMPTS: u32 = 3;

/// `natsched import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The export file; `-` reads standard input.
    pub file: PathBuf,
    /// Most requests waiting for an answer at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub in_flight: u64,
}

/// Why an import could not be made (problems with single lines are [`Problem`]s instead).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ToolConnectError),
    #[error("no natsched answers on {subject} ({reason}); is it running with this prefix?")]
    NoDaemon { subject: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a natsched export: line {line} is not its header ({reason})")]
    NotAnExport {
        path: String,
        line: u64,
        reason: String,
    },
    #[error(
        "{path}, line {line}: an export of format {format} version {version}; this build \
         reads {FORMAT} version {VERSION}"
    )]
    Version {
        path: String,
        line: u64,
        format: String,
        version: u32,
    },
}

/// A line that was not imported, or something wrong with the file as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Problem {
    /// The line is not a schedule this build can send (skipped).
    #[error("line {line}: {error}")]
    Malformed { line: u64, error: LineError },
    /// natsched refused it, or never answered.
    #[error("line {line} (id {id}): {reason}")]
    Failed {
        line: u64,
        id: String,
        reason: String,
    },
    /// The file is not whole: cut short, or the export left something out.
    #[error("line {line}: {what}")]
    Incomplete { line: u64, what: String },
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Imported {
    /// Schedules natsched stored (or replaced by themselves).
    pub imported: u64,
    /// Schedules taken by the JetStream intake's stream (`[intake] mode = "jetstream"`):
    /// stored once natsched consumes them; a refusal then goes to `P.rejected`.
    pub queued: u64,
    /// Schedules refused, or without an answer.
    pub failed: u64,
    /// Lines skipped as malformed.
    pub malformed: u64,
    /// Problems with the file as a whole (cut short, or an export that left records out).
    pub incomplete: u64,
    /// Failures by kind (e.g. `refused 400`, `no answer`).
    pub reasons: BTreeMap<String, u64>,
}

impl Imported {
    /// Whether everything in the file was imported (or queued).
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.malformed == 0 && self.incomplete == 0
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let mut out = format!("imported {}", self.imported);
        if self.queued > 0 {
            out.push_str(&format!(
                ", queued {} in the JetStream intake (refusals go to P.rejected)",
                self.queued
            ));
        }
        out.push_str(&format!(", failed {}", self.failed));
        if !self.reasons.is_empty() {
            let reasons: Vec<String> = self
                .reasons
                .iter()
                .map(|(reason, n)| format!("{reason}: {n}"))
                .collect();
            out.push_str(&format!(" ({})", reasons.join(", ")));
        }
        out.push_str(&format!(", malformed lines {}", self.malformed));
        if self.incomplete > 0 {
            out.push_str(&format!(", file problems {}", self.incomplete));
        }
        out
    }
}

/// Imports the export `args.file` through the natsched at `connection`; `report` is told
/// each problem as it is found.
pub async fn import(
    args: &ImportArgs,
    connection: &Connection,
    report: &mut dyn FnMut(&Problem),
) -> Result<Imported, ImportError> {
    let path = args.file.display().to_string();
    let read_error = |source| ImportError::Read {
        path: path.clone(),
        source,
    };
    let mut reader: Box<dyn AsyncBufRead + Unpin + Send> = if path == "-" {
        Box::new(tokio::io::BufReader::with_capacity(
            1 << 20,
            tokio::io::stdin(),
        ))
    } else {
        let file = tokio::fs::File::open(&args.file)
            .await
            .map_err(read_error)?;
        Box::new(tokio::io::BufReader::with_capacity(1 << 20, file))
    };
    let client = crate::connect::for_tool(&connection.server).await?;
    probe(&client, &connection.prefix).await?;
    let max_line = client.server_info().max_payload.saturating_mul(4) / 3 + LINE_SLACK;
    let mut run = Run {
        client,
        prefix: connection.prefix.clone(),
        max_in_flight: usize::try_from(args.in_flight).unwrap_or(1).max(1),
        in_flight: FuturesUnordered::new(),
        bytes_in_flight: 0,
        imported: Imported::default(),
        report,
    };
    let mut section = Section::Before;
    let (mut line, mut buffer) = (0u64, Vec::new());
    // An error that ends the reading once requests may be in flight: their answers are
    // still taken (and reported) before it is returned.
    let mut fatal = None;
    loop {
        let too_long = match read_line(&mut reader, &mut buffer, max_line).await {
            Ok(Some(too_long)) => too_long,
            Ok(None) => break,
            Err(error) => {
                fatal = Some(read_error(error));
                break;
            }
        };
        line += 1;
        if !too_long && buffer.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match too_long {
            true => Err(LineError::TooLong(max_line)),
            false => parse(&buffer),
        };
        match (&mut section, parsed) {
            (Section::Before, Ok(Parsed::Mark(mark))) if !mark.end => {
                check_version(&mark, &path, line)?;
                section = Section::In { lines: 0 };
            }
            (Section::Before, parsed) => {
                let reason = match parsed {
                    Err(error) => error.to_string(),
                    Ok(_) => "it is a schedule or an end line".to_owned(),
                };
                return Err(ImportError::NotAnExport { path, line, reason });
            }
            (_, Ok(Parsed::Mark(mark))) => {
                if let Err(error) = check_version(&mark, &path, line) {
                    fatal = Some(error);
                    break;
                }
                let previous = std::mem::replace(&mut section, Section::Ended);
                match (previous, mark.end) {
                    (Section::In { lines }, true) => {
                        run.check_end(&mark, lines, line);
                    }
                    (Section::In { .. }, false) => {
                        run.incomplete(line, "a header before the previous export's end line: that export was cut short");
                        section = Section::In { lines: 0 };
                    }
                    (_, true) => run.malformed(line, LineError::EndWithoutHeader),
                    (_, false) => section = Section::In { lines: 0 },
                }
            }
            (Section::Ended, _) => run.malformed(line, LineError::AfterEnd),
            (Section::In { lines }, Ok(Parsed::Schedule(schedule))) => {
                *lines += 1;
                match schedule.request() {
                    Ok(request) => run.send(line, request).await,
                    Err(error) => run.malformed(line, error),
                }
            }
            (Section::In { lines }, Err(error)) => {
                *lines += 1;
                run.malformed(line, error);
            }
        }
    }
    if let Some(error) = fatal {
        while run.answered().await {}
        return Err(error);
    }
    match section {
        Section::Before => {
            return Err(ImportError::NotAnExport {
                path,
                line: line + 1,
                reason: "the file is empty".into(),
            });
        }
        Section::In { .. } => {
            run.incomplete(line, "the file ends without its end line: it was cut short")
        }
        Section::Ended => {}
    }
    while run.answered().await {}
    Ok(run.imported)
}

/// Where the reading is.
enum Section {
    /// Before the first header.
    Before,
    /// After a header: its schedule lines so far.
    In { lines: u64 },
    /// After an end line.
    Ended,
}

enum Parsed {
    Mark(Mark),
    Schedule(Line),
}

fn parse(bytes: &[u8]) -> Result<Parsed, LineError> {
    // Which kind of line, read without building anything (a hostile line of a million
    // values costs no memory), then read into its own type, which stops at an unknown field.
    #[derive(serde::Deserialize)]
    struct Kind {
        format: Option<serde::de::IgnoredAny>,
    }
    let kind: Kind = serde_json::from_slice(bytes).map_err(|e| LineError::json(&e))?;
    match kind.format {
        Some(_) => serde_json::from_slice(bytes)
            .map(Parsed::Mark)
            .map_err(|e| LineError::json(&e)),
        None => serde_json::from_slice(bytes)
            .map(Parsed::Schedule)
            .map_err(|e| LineError::json(&e)),
    }
}

fn check_version(mark: &Mark, path: &str, line: u64) -> Result<(), ImportError> {
    if mark.format == FORMAT && mark.version == VERSION {
        return Ok(());
    }
    Err(ImportError::Version {
        path: path.to_owned(),
        line,
        format: shown(&mark.format),
        version: mark.version,
    })
}

/// Reads the next line, without its `\n`, into `line`: `None` at the end of the input,
/// `Some(true)` for a line longer than `max_line` (read to its end, not kept).
async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin + ?Sized),
    line: &mut Vec<u8>,
    max_line: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let (mut read_any, mut too_long) = (false, false);
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read_any.then_some(too_long));
        }
        read_any = true;
        let end = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..end.unwrap_or(available.len())];
        if !too_long && line.len() + chunk.len() <= max_line {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = end.map_or(available.len(), |end| end + 1);
        reader.consume(used);
        if end.is_some() {
            return Ok(Some(too_long));
        }
    }
}

/// Checks that a natsched answers on `prefix` before anything is sent.
async fn probe(client: &Client, prefix: &str) -> Result<(), ImportError> {
    let subject = format!("{prefix}.stats");
    let request = client.request(subject.clone(), Bytes::new());
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(ImportError::NoDaemon {
            subject,
            reason: error.to_string(),
        }),
        Err(_) => Err(ImportError::NoDaemon {
            subject,
            reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
        }),
    }
}

/// The state of one import.
struct Run<'a> {
    client: Client,
    prefix: String,
    max_in_flight: usize,
    in_flight: FuturesUnordered<tokio::task::JoinHandle<Sent>>,
    bytes_in_flight: usize,
    imported: Imported,
    report: &'a mut dyn FnMut(&Problem),
}

/// A request's answer.
struct Sent {
    line: u64,
    id: String,
    size: usize,
    outcome: Outcome,
}

enum Outcome {
    Stored,
    Queued,
    /// The kind (for the summary) and the whole reason.
    Failed(String, String),
}

impl Run<'_> {
    /// Sends `request` as a task of its own, once there is room.
    async fn send(&mut self, line: u64, request: Request) {
        let size = request.size;
        while self.in_flight.len() >= self.max_in_flight
            || (!self.in_flight.is_empty() && self.bytes_in_flight + size > MAX_BYTES_IN_FLIGHT)
        {
            self.answered().await;
        }
        self.bytes_in_flight += size;
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        self.in_flight.push(tokio::spawn(async move {
            let outcome = schedule(&client, &prefix, &request).await;
            Sent {
                line,
                id: request.id,
                size,
                outcome,
            }
        }));
    }

    /// Takes the next answer; `false` once none is awaited.
    async fn answered(&mut self) -> bool {
        let Some(joined) = self.in_flight.next().await else {
            return false;
        };
        let sent = match joined {
            Ok(sent) => sent,
            Err(error) => {
                // Only a bug can get here: the task holds no panicking code path.
                self.imported.failed += 1;
                *self.imported.reasons.entry("internal".into()).or_default() += 1;
                tracing::error!(%error, "an import request task failed");
                return true;
            }
        };
        self.bytes_in_flight -= sent.size;
        match sent.outcome {
            Outcome::Stored => self.imported.imported += 1,
            Outcome::Queued => self.imported.queued += 1,
            Outcome::Failed(kind, reason) => {
                self.imported.failed += 1;
                *self.imported.reasons.entry(kind).or_default() += 1;
                (self.report)(&Problem::Failed {
                    line: sent.line,
                    id: shown(&sent.id),
                    reason,
                });
            }
        }
        true
    }

    fn malformed(&mut self, line: u64, error: LineError) {
        self.imported.malformed += 1;
        (self.report)(&Problem::Malformed { line, error });
    }

    fn incomplete(&mut self, line: u64, what: &str) {
        self.imported.incomplete += 1;
        (self.report)(&Problem::Incomplete {
            line,
            what: what.to_owned(),
        });
    }

    /// Checks an end line against the section it ends.
    fn check_end(&mut self, end: &Mark, lines: u64, line: u64) {
        if end.schedules != Some(lines) {
            let said = end.schedules.map_or("no".to_owned(), |n| n.to_string());
            self.incomplete(
                line,
                &format!("the end line says {said} schedules, the export holds {lines} lines"),
            );
        }
        if let Some(left_out) = end.unreadable.filter(|n| *n > 0) {
            self.incomplete(
                line,
                &format!(
                    "the export left out what it could not read ({left_out} problems, \
                     reported when it was made)"
                ),
            );
        }
    }
}

/// Sends one schedule request, again while there is no answer or a 503 and it is sure not
/// to have been stored (see the module's doc).
async fn schedule(client: &Client, prefix: &str, request: &Request) -> Outcome {
    let subject = format!("{prefix}.add.{}", request.subject);
    let mut outcome = Outcome::Failed("no answer".into(), "no answer".into());
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            match is_pending(client, prefix, &request.id).await {
                Some(true) => return Outcome::Stored,
                Some(false) if request.due > time::now_ms() + SAFE_AHEAD_MS => {}
                Some(false) => {
                    let reason = "no answer, and it is not pending: it may have been stored \
                                  and fired already, so it is not sent again (check the \
                                  target before scheduling it by hand)";
                    return Outcome::Failed("uncertain".into(), reason.to_owned());
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    continue;
                }
            }
        }
        let sent = client.request_with_headers(
            subject.clone(),
            request.headers.clone(),
            request.payload.clone(),
        );
        let (outcome_now, again) = match tokio::time::timeout(REQUEST_TIMEOUT, sent).await {
            Ok(Ok(reply)) => answer(&reply, request),
            Ok(Err(error)) => {
                use async_nats::RequestErrorKind;
                let again = matches!(
                    error.kind(),
                    RequestErrorKind::TimedOut | RequestErrorKind::NoResponders
                );
                let reason = format!("no answer: {error}");
                (Outcome::Failed("no answer".into(), reason), again)
            }
            Err(_) => {
                let reason = format!("no answer within {REQUEST_TIMEOUT:?}");
                (Outcome::Failed("no answer".into(), reason), true)
            }
        };
        outcome = outcome_now;
        if !again || attempt == ATTEMPTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
    }
    outcome
}

/// A schedule due later than this is sent again when `get` does not find it: it cannot have
/// fired (the first attempt, still on its way, would be replaced by the same schedule).
const SAFE_AHEAD_MS: u64 = 2_000;

/// Whether natsched has `id` pending (`get`); `None` when it does not say.
async fn is_pending(client: &Client, prefix: &str, id: &str) -> Option<bool> {
    let asked = client.request(format!("{prefix}.get"), Bytes::from(id.to_owned()));
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, asked)
        .await
        .ok()?
        .ok()?;
    match protocol::reply_error(&reply) {
        None => Some(true),
        Some((code, _)) if code == "404" => Some(false),
        Some(_) => None,
    }
}

/// What natsched's reply says, and whether to ask again.
fn answer(reply: &Message, request: &Request) -> (Outcome, bool) {
    if let Some((code, description)) = protocol::reply_error(reply) {
        let reason = format!(
            "refused: {} {}",
            shown_code(&code),
            protocol::escape_controls(description)
        );
        let kind = format!("refused {}", shown_code(&code));
        return (Outcome::Failed(kind, reason), code == "503");
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        id: Option<String>,
        due: Option<String>,
        stream: Option<String>,
    }
    let unexpected = || {
        let body = String::from_utf8_lossy(&reply.payload);
        let reason = format!("unexpected reply {}", shown(&body));
        (Outcome::Failed("unexpected reply".into(), reason), false)
    };
    let Ok(body) = serde_json::from_slice::<Reply>(&reply.payload) else {
        return unexpected();
    };
    match body {
        Reply {
            id: Some(id),
            due: Some(due),
            ..
        } => {
            let expected = time::format_ms(request.due);
            if id == request.id && due == expected {
                (Outcome::Stored, false)
            } else {
                let reason = format!(
                    "stored as {} due {}, not due {expected}",
                    shown(&id),
                    shown(&due)
                );
                (Outcome::Failed("stored differently".into(), reason), false)
            }
        }
        // `[intake] mode = "jetstream"`: the stream's PubAck.
        Reply {
            stream: Some(_), ..
        } => (Outcome::Queued, false),
        _ => unexpected(),
    }
}

/// An error code as received, which should be a number.
fn shown_code(code: &str) -> String {
    match code.parse::<u16>() {
        Ok(code) => code.to_string(),
        Err(_) => shown(code),
    }
}
