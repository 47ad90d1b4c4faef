//! JetStream delivery: a schedule whose delivery mode is JetStream is published with
//! `Nats-Msg-Id: <id>:<due in Unix ms>` and counts as delivered only once the stream's PubAck
//! is back; only then is it removed from the store.
//!
//! Publishes are pipelined: up to [`MAX_IN_FLIGHT`] wait for their PubAck at once, each on its
//! own, so no schedule waits for a slower one's PubAck. The message id is the same on every
//! attempt and after a restart, so when a PubAck is lost after the stream stored the message,
//! the stream's duplicate window drops the second copy.
//!
//! What goes wrong is one of two kinds:
//!
//! * **NATS is away** (the connection is down, or broke while PubAcks were outstanding).
//!   Nothing is published meanwhile; the schedules wait here in memory (what the wheel hands
//!   out, bounded by `wheel.max_resident`) and go out oldest first once the connection is back.
//!   No attempt is counted: nothing is wrong with them.
//! * **The target refuses** (no stream captures the subject, the stream is full or refuses
//!   the message, or no PubAck within [`ACK_TIMEOUT`] on a live connection). The attempt is
//!   counted ([`Retries`]: attempts, last error, logged once a minute per subject,
//!   `delivery_errors_total`) and the schedule goes back to the wheel until its next attempt
//!   after a capped exponential backoff. A subject that failed recently gets at most
//!   [`MAX_IN_FLIGHT_FAILING`] publishes in flight; the rest of its due schedules wait in the
//!   wheel for a later attempt instead of filling the pipeline, so a failing target never holds
//!   up deliveries to others.

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::connection::State;
use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
use async_nats::jetstream::context::{Context, ContextBuilder, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::core::{DueText, FiringOutputs, delivery_headers};
use crate::committer::StoreCommand;
use crate::metrics::Metrics;
use crate::protocol;
use crate::retries::{LOG_EVERY, Retries};
use crate::scheduler::{Resident, WheelCommand};
use crate::time::{self, UnixMs};

/// Most publishes waiting for their PubAck at once.
pub(crate) const MAX_IN_FLIGHT: usize = 16_384;
/// Most publishes in flight to one subject that failed within the last [`LOG_EVERY`].
const MAX_IN_FLIGHT_FAILING: usize = 64;
/// How long a PubAck may take on a live connection before the attempt counts as failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to look at the connection while NATS is away.
const RECONNECT_CHECK: Duration = Duration::from_millis(50);
/// Delivered schedules are reported to the store writer in batches of at most this many.
const REPORT_BATCH: usize = 4096;

/// `Nats-Msg-Id` as a header name, made once.
static MSG_ID_NAME: std::sync::LazyLock<HeaderName> =
    std::sync::LazyLock::new(|| protocol::MSG_ID.into_header_name());

type Outcome = (Resident, u64, Result<PublishAck, PublishError>);

/// A subject whose delivery failed within the last [`LOG_EVERY`].
struct Failing {
    since: Instant,
    in_flight: usize,
    backoff: Duration,
}

/// The JetStream publisher, run as its own task beside core delivery.
pub(crate) struct JetStreamDelivery {
    client: Client,
    context: Context,
    metrics: Arc<Metrics>,
    retries: Arc<Retries>,
    due_text: DueText,
    /// Subjects that failed recently: when, how many of their publishes are in flight, and
    /// the last backoff one of them got.
    failing: HashMap<String, Failing>,
}

impl JetStreamDelivery {
    pub(crate) fn new(client: Client, metrics: Arc<Metrics>, retries: Arc<Retries>) -> Self {
        let context = ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            // Our own bound applies (MAX_IN_FLIGHT); the context's must never make a publish
            // wait for a PubAck that only this task's polling can complete.
            .max_ack_inflight(MAX_IN_FLIGHT * 2)
            .backpressure_on_inflight(false)
            .build(client.clone());
        JetStreamDelivery {
            client,
            context,
            metrics,
            retries,
            due_text: DueText::default(),
            failing: HashMap::new(),
        }
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
        let grace_over = async {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(grace_over);
        let mut waiting: VecDeque<Resident> = VecDeque::new();
        let mut unsorted = false;
        let mut in_flight: FuturesUnordered<Pin<Box<dyn Future<Output = Outcome> + Send>>> =
            FuturesUnordered::new();
        let mut delivered: Vec<Resident> = Vec::new();
        let mut open = true;
        let mut lateness = Vec::new();
        loop {
            if unsorted {
                // Back from a broken connection: oldest first again.
                waiting.make_contiguous().sort_by_key(|r| r.schedule.due);
                unsorted = false;
            }
            let connected = self.client.connection_state() == State::Connected;
            if connected {
                let connects = self.client.statistics().connects.load(Ordering::Relaxed);
                let mut deferred = Vec::new();
                while in_flight.len() < MAX_IN_FLIGHT {
                    let Some(resident) = waiting.pop_front() else {
                        break;
                    };
                    if let Some(wait) = self.hold_back(&resident.schedule.subject) {
                        deferred.push((resident, wait));
                        continue;
                    }
                    lateness.push(
                        time::now_us().saturating_sub(resident.schedule.due.saturating_mul(1000)),
                    );
                    match self.publish(&resident).await {
                        Ok(ack) => in_flight.push(Box::pin(
                            ack.into_future().map(move |r| (resident, connects, r)),
                        )),
                        Err(error) if self.connection_lost(&error, connects) => {
                            waiting.push_front(resident);
                            break;
                        }
                        Err(error) => self.failed(resident, &error.to_string(), &out),
                    }
                }
                self.metrics.record_lateness(lateness.drain(..));
                self.defer(deferred, &out);
            }
            if !open && waiting.is_empty() && in_flight.is_empty() {
                break;
            }
            tokio::select! {
                batch = due.recv(), if open => match batch {
                    Some(batch) => waiting.extend(batch),
                    None => open = false,
                },
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                    let mut next = Some(outcome);
                    while let Some((resident, connects, result)) = next {
                        match result {
                            Ok(_ack) => delivered.push(resident),
                            Err(error) if self.connection_lost(&error, connects) => {
                                waiting.push_back(resident);
                                unsorted = true;
                            }
                            Err(error) => self.failed(resident, &error.to_string(), &out),
                        }
                        if delivered.len() >= REPORT_BATCH {
                            self.report(&mut delivered, &out).await;
                        }
                        next = in_flight.next().now_or_never().flatten();
                    }
                    self.report(&mut delivered, &out).await;
                }
                () = tokio::time::sleep(RECONNECT_CHECK), if !connected && !waiting.is_empty() => {}
                () = &mut grace_over => break,
            }
        }
        self.report(&mut delivered, &out).await;
        let left = waiting.len() + in_flight.len();
        if left > 0 {
            out.resident.fetch_sub(left, Ordering::Relaxed);
            tracing::warn!(
                count = left,
                "stopped before JetStream confirmed these deliveries; they fire again after \
                 restart (the stream's duplicate window drops copies it already holds)"
            );
        }
    }

    /// Publishes one schedule; the future completes with its PubAck.
    async fn publish(
        &mut self,
        resident: &Resident,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, PublishError> {
        let schedule = &resident.schedule;
        let mut headers = delivery_headers(schedule, self.due_text.of(schedule.due))
            .map_err(|error| PublishError::with_source(PublishErrorKind::Other, error))?;
        let msg_id: HeaderValue = protocol::msg_id(&schedule.id, schedule.due)
            .parse()
            .map_err(|_| PublishError::new(PublishErrorKind::Other))?;
        headers.insert(MSG_ID_NAME.clone(), msg_id);
        if let Some(failing) = self.failing.get_mut(schedule.subject.as_str()) {
            failing.in_flight += 1;
        }
        self.context
            .publish_with_headers(schedule.subject.clone(), headers, schedule.payload.clone())
            .await
    }

    /// Whether `error` means the connection went away (rather than the target refusing):
    /// the connection is not up, or it reconnected since the publish.
    fn connection_lost(&self, error: &PublishError, connects_at_publish: u64) -> bool {
        matches!(
            error.kind(),
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
        ) && (self.client.connection_state() != State::Connected
            || self.client.statistics().connects.load(Ordering::Relaxed) != connects_at_publish)
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

    /// One publish to `subject` is done (delivered or failed).
    fn settled(&mut self, subject: &str) {
        if let Some(failing) = self.failing.get_mut(subject) {
            failing.in_flight = failing.in_flight.saturating_sub(1);
        }
    }

    /// A failed attempt: counted, and the schedule waits in the wheel for its next one.
    fn failed(&mut self, resident: Resident, error: &str, out: &FiringOutputs) {
        let s = &resident.schedule;
        self.settled(&s.subject);
        let wait = self.retries.failed(&s.id, s.due, &s.subject, error);
        let failing = self.failing.entry(s.subject.clone()).or_insert(Failing {
            since: Instant::now(),
            in_flight: 0,
            backoff: wait,
        });
        failing.since = Instant::now();
        failing.backoff = wait;
        Metrics::count(&self.metrics.delivery_errors_total, 1);
        let at = time::now_ms().saturating_add(wait.as_millis() as u64);
        back_to_wheel(vec![(resident, at)], out);
    }

    /// Schedules of a failing subject beyond its in-flight share: tried again after the
    /// subject's last backoff, without counting an attempt.
    fn defer(&mut self, deferred: Vec<(Resident, Duration)>, out: &FiringOutputs) {
        if deferred.is_empty() {
            return;
        }
        let now = time::now_ms();
        let again = deferred
            .into_iter()
            .map(|(r, wait)| (r, now.saturating_add(wait.as_millis() as u64)))
            .collect();
        back_to_wheel(again, out);
    }

    /// Tells the store writer to delete what JetStream has confirmed.
    async fn report(&mut self, delivered: &mut Vec<Resident>, out: &FiringOutputs) {
        if delivered.is_empty() {
            return;
        }
        for resident in delivered.iter() {
            self.settled(&resident.schedule.subject);
        }
        let batch = std::mem::take(delivered);
        out.resident.fetch_sub(batch.len(), Ordering::Relaxed);
        Metrics::count(&self.metrics.fired_total, batch.len() as u64);
        if self.retries.waiting() > 0 {
            for resident in &batch {
                self.retries.forget(&resident.schedule.id);
            }
        }
        if out.store.send(StoreCommand::Fired(batch)).await.is_err() {
            tracing::error!("store writer is gone; fired schedules will fire again after restart");
        }
    }
}

/// Hands schedules back to the timer until `at` (they stop counting as resident meanwhile).
fn back_to_wheel(again: Vec<(Resident, UnixMs)>, out: &FiringOutputs) {
    out.resident.fetch_sub(again.len(), Ordering::Relaxed);
    if out.wheel.send(WheelCommand::Retry(again)).is_err() {
        tracing::warn!("timer stopped; undelivered schedules are retried after restart");
    }
}
