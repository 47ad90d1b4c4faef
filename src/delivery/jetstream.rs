//! JetStream delivery: a schedule whose delivery mode is JetStream is published with
//! `Nats-Msg-Id: <id>:<due in Unix ms>` and counts as delivered only once the stream's PubAck
//! is back; only then is it removed from the store.
//!
//! Publishes are pipelined: up to [`MAX_IN_FLIGHT`] wait for their PubAck at once, each on its
//! own, so no schedule waits for a slower one's PubAck. Every publish asks for its PubAck on
//! one wildcard inbox subscription, `<inbox>.<token>`, and the token finds it in the
//! [`InFlight`] table: no future, timer or subscription per message. The message id is the same
//! on every attempt and after a restart, so when a PubAck is lost after the stream stored the
//! message, the stream's duplicate window drops the second copy.
//!
//! What goes wrong is one of two kinds:
//!
//! * **NATS is away** (the connection is down, or reconnected while PubAcks were
//!   outstanding). Nothing is published meanwhile; the schedules wait here in memory (what the
//!   wheel hands out, bounded by `wheel.max_resident`) and go out oldest first once the
//!   connection is back. No attempt is counted: nothing is wrong with them.
//! * **The target refuses** (no stream captures the subject, the stream is full or refuses
//!   the message, or no PubAck within [`ACK_TIMEOUT`] on a live connection). The attempt is
//!   counted ([`Retries`]: attempts, last error, logged once a minute per subject,
//!   `delivery_errors_total`) and the schedule goes back to the wheel until its next attempt
//!   after a capped exponential backoff. A subject that failed recently gets at most
//!   [`MAX_IN_FLIGHT_FAILING`] publishes in flight; the rest of its due schedules wait in the
//!   wheel for a later attempt instead of filling the pipeline, so a failing target never holds
//!   up deliveries to others.
//!
//! A PubAck is only as trustworthy as the inbox: anyone who may publish to natsched's
//! `_INBOX.>` and sees a delivered message's reply subject (a subscriber of the target) could
//! forge one. NATS permissions close that (see `examples/nats-server/teams.conf`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
use async_nats::{Client, Message, StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::{DueText, FiringOutputs, delivery_headers, failed_attempt, grace_after};
use super::in_flight::InFlight;
use crate::metrics::Metrics;
use crate::protocol;
use crate::retries::{LOG_EVERY, Retries};
use crate::scheduler::Resident;
use crate::time;

/// Most publishes waiting for their PubAck at once.
pub(crate) const MAX_IN_FLIGHT: usize = 16_384;
/// Most publishes in flight to one subject that failed within the last [`LOG_EVERY`].
const MAX_IN_FLIGHT_FAILING: usize = 64;
/// How long a PubAck may take on a live connection before the attempt counts as failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to look for timeouts and at the connection while anything waits.
const TICK: Duration = Duration::from_millis(50);
/// Delivered schedules are reported to the store writer in batches of at most this many.
const REPORT_BATCH: usize = 4096;

/// `Nats-Msg-Id` as a header name, made once.
static MSG_ID_NAME: std::sync::LazyLock<HeaderName> =
    std::sync::LazyLock::new(|| protocol::MSG_ID.into_header_name());

/// A publish waiting for its PubAck.
struct Sent {
    resident: Resident,
    at: Instant,
}

/// A subject whose delivery failed within the last [`LOG_EVERY`].
struct Failing {
    since: Instant,
    in_flight: usize,
    backoff: Duration,
}

/// The JetStream publisher, run as its own task beside core delivery.
pub(crate) struct JetStreamDelivery {
    client: Client,
    /// `<inbox>.`: each publish's reply subject is this plus its token.
    inbox: String,
    acks: Subscriber,
    sent: InFlight<Sent>,
    metrics: Arc<Metrics>,
    retries: Arc<Retries>,
    due_text: DueText,
    /// Subjects that failed recently.
    failing: HashMap<String, Failing>,
}

impl JetStreamDelivery {
    pub(crate) async fn new(
        client: Client,
        metrics: Arc<Metrics>,
        retries: Arc<Retries>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let acks = client.subscribe(format!("{inbox}.*")).await?;
        Ok(JetStreamDelivery {
            inbox: format!("{inbox}."),
            client,
            acks,
            sent: InFlight::default(),
            metrics,
            retries,
            due_text: DueText::default(),
            failing: HashMap::new(),
        })
    }

    /// Publishes what arrives on `due` until it closes and everything handed over is done,
    /// or, after `stop`, until `grace` has passed (what is left stays stored).
    pub(crate) async fn run(
        mut self,
        mut due: mpsc::UnboundedReceiver<Vec<Resident>>,
        out: FiringOutputs,
        stop: CancellationToken,
        grace: Duration,
    ) {
        let grace_over = grace_after(&stop, grace);
        tokio::pin!(grace_over);
        let statistics = self.client.statistics();
        let mut connects = statistics.connects.load(Ordering::Relaxed);
        let mut waiting: VecDeque<Resident> = VecDeque::new();
        let mut unsorted = false;
        let mut delivered: Vec<Resident> = Vec::new();
        let mut open = true;
        let mut lateness = Vec::new();
        'running: loop {
            let now_connects = statistics.connects.load(Ordering::Relaxed);
            if now_connects != connects {
                // What went out on the old connection may have died with it: publish it
                // again (the same message id, so a stream that has it drops the copy).
                connects = now_connects;
                let voided = self.sent.take_all();
                unsorted |= !voided.is_empty();
                for sent in voided {
                    self.settled(&sent.resident.schedule.subject);
                    waiting.push_back(sent.resident);
                }
            }
            if unsorted {
                // Oldest first again.
                waiting.make_contiguous().sort_by_key(|r| r.schedule.due);
                unsorted = false;
            }
            let connected = self.client.connection_state() == State::Connected;
            if connected {
                let mut deferred = Vec::new();
                while self.sent.len() < MAX_IN_FLIGHT {
                    let Some(resident) = waiting.pop_front() else {
                        break;
                    };
                    if let Some(wait) = self.hold_back(&resident.schedule.subject) {
                        deferred.push((resident, wait));
                        continue;
                    }
                    lateness.push(
                        time::now_us()
                            .saturating_sub(resident.schedule.occurrence().0.saturating_mul(1000)),
                    );
                    // Raced with the grace period: a publish can wait for the client's queue
                    // while the connection breaks. (Cut off, it stays in `sent`.)
                    let published = tokio::select! {
                        published = self.publish(resident) => published,
                        () = &mut grace_over => break 'running,
                    };
                    match published {
                        Ok(()) => {}
                        Err((resident, Some(error))) => self.failed(resident, &error, &out),
                        Err((resident, None)) => {
                            // The client cannot send now (connection lost).
                            waiting.push_front(resident);
                            break;
                        }
                    }
                }
                self.metrics.record_lateness(lateness.drain(..));
                self.defer(deferred, &out);
                self.time_out(&out);
            }
            if !open && waiting.is_empty() && self.sent.is_empty() {
                break;
            }
            let ticking = !self.sent.is_empty() || !waiting.is_empty();
            tokio::select! {
                batch = due.recv(), if open => match batch {
                    Some(batch) => waiting.extend(batch),
                    None => open = false,
                },
                Some(ack) = self.acks.next() => {
                    let mut next = Some(ack);
                    let mut handled = 0;
                    while let Some(ack) = next {
                        self.settle(&ack, &mut delivered, &out);
                        handled += 1;
                        if delivered.len() >= REPORT_BATCH {
                            self.report(&mut delivered, &out).await;
                        }
                        next = match handled < MAX_IN_FLIGHT {
                            true => self.acks.next().now_or_never().flatten(),
                            false => None,
                        };
                    }
                    self.report(&mut delivered, &out).await;
                }
                () = tokio::time::sleep(TICK), if ticking => {}
                () = &mut grace_over => break,
            }
        }
        self.report(&mut delivered, &out).await;
        let left = waiting.len() + self.sent.len();
        if left > 0 {
            out.resident.fetch_sub(left, Ordering::Relaxed);
            tracing::warn!(
                count = left,
                "stopped before JetStream confirmed these deliveries; they fire again after \
                 restart (the stream's duplicate window drops copies it already holds)"
            );
        }
    }

    /// Publishes one schedule with its reply subject; it waits in the table for its PubAck.
    /// On failure, the schedule and the error: `None` when the connection is the problem.
    async fn publish(&mut self, mut resident: Resident) -> Result<(), (Resident, Option<String>)> {
        // Each attempt publishes the latest occurrence due by then (see `Firing::deliver`).
        resident.schedule.choose_occurrence(time::now_ms());
        let schedule = &resident.schedule;
        // A series' occurrences each get their own id: the occurrence's due tells them apart.
        let (due, _) = schedule.occurrence();
        let mut headers = match delivery_headers(schedule, self.due_text.of(due)) {
            Ok(headers) => headers,
            Err(error) => return Err((resident, Some(error))),
        };
        let Ok(msg_id) = protocol::msg_id(&schedule.id, due).parse::<HeaderValue>() else {
            return Err((resident, Some("stored id is not valid in NATS".into())));
        };
        headers.insert(MSG_ID_NAME.clone(), msg_id);
        let subject = schedule.subject.clone();
        let payload = schedule.payload.clone();
        if let Some(failing) = self.failing.get_mut(subject.as_str()) {
            failing.in_flight += 1;
        }
        let token = self.sent.push(Sent {
            resident,
            at: Instant::now(),
        });
        let reply = format!("{}{token}", self.inbox);
        let published = self
            .client
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await;
        let Err(error) = published else {
            return Ok(());
        };
        let Some(sent) = self.sent.take(token) else {
            return Ok(()); // cannot happen: nothing else takes entries meanwhile
        };
        self.settled(&sent.resident.schedule.subject);
        use async_nats::client::PublishErrorKind;
        match error.kind() {
            PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject => {
                Err((sent.resident, Some(error.to_string())))
            }
            _ => Err((sent.resident, None)),
        }
    }

    /// A PubAck (or no-responders status) came back: the schedule is delivered or failed.
    fn settle(&mut self, ack: &Message, delivered: &mut Vec<Resident>, out: &FiringOutputs) {
        let token = ack
            .subject
            .strip_prefix(self.inbox.as_str())
            .and_then(|token| token.parse::<u64>().ok());
        let Some(sent) = token.and_then(|token| self.sent.take(token)) else {
            return; // settled already, voided by a reconnect, or not ours
        };
        self.settled(&sent.resident.schedule.subject);
        match pub_ack_error(ack) {
            None => delivered.push(sent.resident),
            Some(error) => self.failed(sent.resident, &error, out),
        }
    }

    /// Fails the publishes whose PubAck is overdue on a live connection.
    fn time_out(&mut self, out: &FiringOutputs) {
        while self
            .sent
            .oldest()
            .is_some_and(|sent| sent.at.elapsed() >= ACK_TIMEOUT)
        {
            let Some(sent) = self.sent.take_oldest() else {
                break;
            };
            self.settled(&sent.resident.schedule.subject);
            let error = format!("no PubAck within {ACK_TIMEOUT:?} (is the stream available?)");
            self.failed(sent.resident, &error, out);
        }
    }

    /// `None` if another publish to `subject` may be in flight, else how long to hold the
    /// schedule back (see [`MAX_IN_FLIGHT_FAILING`]).
    fn hold_back(&mut self, subject: &str) -> Option<Duration> {
        if self.failing.is_empty() {
            return None;
        }
        match self.failing.get(subject) {
            Some(f) if f.since.elapsed() < LOG_EVERY => {
                (f.in_flight >= MAX_IN_FLIGHT_FAILING).then_some(f.backoff)
            }
            Some(_) => {
                self.failing.remove(subject);
                None
            }
            None => None,
        }
    }

    /// One publish to `subject` is done (delivered, failed or voided).
    fn settled(&mut self, subject: &str) {
        if let Some(failing) = self.failing.get_mut(subject) {
            failing.in_flight = failing.in_flight.saturating_sub(1);
        }
    }

    /// A failed attempt: counted, and the schedule waits in the wheel for its next one.
    fn failed(&mut self, resident: Resident, error: &str, out: &FiringOutputs) {
        let (at, wait) = failed_attempt(&resident, error, &self.metrics, &self.retries);
        let now = Instant::now();
        let failing = self
            .failing
            .entry(resident.schedule.subject.clone())
            .or_insert(Failing {
                since: now,
                in_flight: 0,
                backoff: wait,
            });
        failing.since = now;
        failing.backoff = wait;
        out.back_to_wheel(vec![(resident, at)]);
    }

    /// Schedules of a failing subject beyond its in-flight share: tried again after the
    /// subject's last backoff, without counting an attempt.
    fn defer(&mut self, deferred: Vec<(Resident, Duration)>, out: &FiringOutputs) {
        let now = time::now_ms();
        let again = deferred
            .into_iter()
            .map(|(r, wait)| (r, now.saturating_add(wait.as_millis() as u64)))
            .collect();
        out.back_to_wheel(again);
    }

    /// Tells the store writer to delete what JetStream has confirmed.
    async fn report(&mut self, delivered: &mut Vec<Resident>, out: &FiringOutputs) {
        let batch = std::mem::take(delivered);
        out.delivered(batch, &self.metrics, &self.retries).await;
    }
}

/// Why the stream did not take a message, from its reply; `None` for a PubAck.
fn pub_ack_error(reply: &Message) -> Option<String> {
    if reply.status == Some(StatusCode::NO_RESPONDERS) {
        return Some("no stream found for the subject (no responders)".into());
    }
    #[derive(Deserialize)]
    struct Reply {
        stream: Option<String>,
        error: Option<ReplyError>,
    }
    #[derive(Deserialize)]
    struct ReplyError {
        #[serde(default)]
        code: u16,
        #[serde(default)]
        description: String,
    }
    match serde_json::from_slice::<Reply>(&reply.payload) {
        // Bounded: the reply comes from the network and is kept per failing schedule.
        Ok(Reply {
            error: Some(error), ..
        }) => Some(format!(
            "JetStream refused the message: {:?} ({})",
            error.description.chars().take(200).collect::<String>(),
            error.code
        )),
        Ok(Reply {
            stream: Some(_), ..
        }) => None,
        _ => Some(format!(
            "unexpected reply to a JetStream publish: {:?}",
            String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &'static [u8], status: Option<StatusCode>) -> Message {
        Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: bytes::Bytes::from_static(payload),
            headers: None,
            status,
            description: None,
            length: payload.len(),
            sanitized: false,
        }
    }

    #[test]
    fn pub_acks_and_refusals_are_told_apart() {
        assert_eq!(
            pub_ack_error(&reply(br#"{"stream":"S","seq":1}"#, None)),
            None
        );
        let dup = br#"{"stream":"S","seq":1,"duplicate":true}"#;
        assert_eq!(pub_ack_error(&reply(dup, None)), None);
        let full =
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        let error = pub_ack_error(&reply(full, None)).unwrap();
        assert!(error.contains("maximum messages exceeded"), "{error}");
        let none = pub_ack_error(&reply(b"", Some(StatusCode::NO_RESPONDERS))).unwrap();
        assert!(none.contains("no stream"), "{none}");
        for hostile in [
            &b"\xff\xfe"[..],
            b"{}",
            b"[1,2]",
            b"{\"stream\":7}",
            b"null",
        ] {
            let message = Message {
                payload: bytes::Bytes::copy_from_slice(hostile),
                ..reply(b"", None)
            };
            assert!(pub_ack_error(&message).is_some(), "{hostile:?}");
        }
    }
}
