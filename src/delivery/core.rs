//! Publishing due schedules to their target subjects.
//!
//! A batch counts as delivered only once the server has provably processed it: after the batch
//! natsched publishes a *fence* message to a private inbox it subscribes to, and waits for the
//! fence to come back. The server handles a connection's messages in order, so the fence's
//! return means every publish before it was routed. If the client reconnected meanwhile (the
//! server's client id changed), publishes may have died with the old socket, so the batch is
//! published again. Only then are the schedules' keys sent to the committer for deletion, so a
//! crash or outage at any point means a second delivery, never a lost one (at-least-once).
//!
//! A schedule NATS will not take is never deleted: the client refuses some publishes at once
//! (larger than the server's `max_payload`, an invalid subject), and the server refuses a
//! publish its permissions forbid with an `-ERR` that it sends before it processes the fence.
//! The (patched) client records such refusals before it dispatches anything read after them
//! (`Statistics::publish_denials`), so when the fence returns, every refusal of the batch is
//! known. Refused schedules go back to the wheel and are tried again after a backoff
//! ([`crate::retries`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::StoreCommand;
use crate::metrics::Metrics;
use crate::protocol;
use crate::record::{Delivery, Schedule};
use crate::retries::Retries;
use crate::scheduler::{Resident, WheelCommand};
use crate::time::{self, UnixMs};

use super::jetstream::JetStreamDelivery;

/// Most schedules published per fence.
const MAX_BATCH: usize = 4096;
/// How often to look for a reconnect while waiting for a fence.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);
/// How long to wait for a fence before reporting that NATS is not confirming.
const SLOW_FENCE: Duration = Duration::from_secs(5);
/// How long a shutdown waits for NATS to confirm what is being delivered. Unconfirmed
/// schedules stay in the store and fire after restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause before publishing a batch again after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// A failure that publishing the same message again will not cure by itself.
fn is_permanent(err: &async_nats::PublishError) -> bool {
    use async_nats::client::PublishErrorKind;
    matches!(
        err.kind(),
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject
    )
}

/// `Sched-Id` and `Sched-Due` as header names, made once: cloning one is a reference count,
/// where naming a header by `&str` checks and copies the name on every publish.
static ID_NAME: LazyLock<HeaderName> = LazyLock::new(|| protocol::ID.into_header_name());
static DUE_NAME: LazyLock<HeaderName> = LazyLock::new(|| protocol::DUE.into_header_name());
static SEQ_NAME: LazyLock<HeaderName> = LazyLock::new(|| protocol::SEQ.into_header_name());

/// The message a schedule is delivered as: its own headers plus `Sched-Id` and `Sched-Due`
/// (the occurrence's, for a series, with `Sched-Seq`). `due` is the text of
/// [`Schedule::occurrence`]'s due.
///
/// Built with the checking constructors (the plain ones assert): a stored header that is not
/// valid NATS header text (only a damaged store holds one) fails the delivery instead of
/// stopping natsched.
pub(crate) fn delivery_headers(schedule: &Schedule, due: &str) -> Result<HeaderMap, String> {
    let invalid = |what: &str, text: &str| format!("stored {what} {text:?} is not valid in NATS");
    let mut headers = HeaderMap::new();
    for (name, value) in &schedule.headers {
        let name: HeaderName = name.parse().map_err(|_| invalid("header name", name))?;
        let value: HeaderValue = value.parse().map_err(|_| invalid("header value", value))?;
        headers.append(name, value);
    }
    let id: HeaderValue = schedule
        .id
        .parse()
        .map_err(|_| invalid("id", &schedule.id))?;
    headers.insert(ID_NAME.clone(), id);
    headers.insert(DUE_NAME.clone(), due);
    if let (_, Some(seq)) = schedule.occurrence() {
        headers.insert(SEQ_NAME.clone(), HeaderValue::from(seq));
    }
    Ok(headers)
}

/// The `Sched-Due` text of the last due formatted: consecutive fires mostly share one.
#[derive(Default)]
pub(crate) struct DueText {
    due: Option<u64>,
    text: String,
}

impl DueText {
    pub(crate) fn of(&mut self, due: u64) -> &str {
        if self.due != Some(due) {
            self.due = Some(due);
            self.text = time::format_ms(due);
        }
        &self.text
    }
}

/// The publisher of due schedules, with its fence subscription.
pub struct Firing {
    client: Client,
    fence_subject: String,
    fences: Subscriber,
    fence_seq: u64,
    metrics: Arc<Metrics>,
    /// How late each publish of the current attempt was, in microseconds.
    lateness_us: Vec<u64>,
    due_text: DueText,
    retries: Arc<Retries>,
    /// Fences carry this, so a message someone else sends to the fence inbox cannot pass
    /// for one.
    fence_nonce: String,
    /// The publisher of schedules delivered through JetStream, run beside this one.
    jetstream: Option<JetStreamDelivery>,
}

/// Which server connection a publish went out on: a reconnect changes it.
fn session(client: &Client) -> (String, u64) {
    let info = client.server_info();
    (info.server_id, info.client_id)
}

/// Where firing sends what it is done with.
#[derive(Clone)]
pub struct FiringOutputs {
    /// The committer, which deletes delivered schedules.
    pub store: mpsc::Sender<StoreCommand>,
    /// The timer, which holds failed schedules until their next attempt.
    pub wheel: std::sync::mpsc::Sender<WheelCommand>,
    /// Schedules in memory: firing subtracts the ones it is done with.
    pub resident: Arc<AtomicUsize>,
}

impl FiringOutputs {
    /// Hands schedules back to the timer, each until its instant. Waiting there they do not
    /// count as resident (see the scheduler). If the timer has stopped (shutdown), they stay
    /// stored and are tried after restart.
    pub(crate) fn back_to_wheel(&self, again: Vec<(Resident, UnixMs)>) {
        if again.is_empty() {
            return;
        }
        self.resident.fetch_sub(again.len(), Ordering::Relaxed);
        if self.wheel.send(WheelCommand::Retry(again)).is_err() {
            tracing::warn!("timer stopped; undelivered schedules are retried after restart");
        }
    }

    /// Reports schedules NATS confirmed: counted, their failures forgotten, and sent to the
    /// store writer for deletion.
    pub(crate) async fn delivered(
        &self,
        delivered: Vec<Resident>,
        metrics: &Metrics,
        retries: &Retries,
    ) {
        if delivered.is_empty() {
            return;
        }
        self.resident.fetch_sub(delivered.len(), Ordering::Relaxed);
        Metrics::count(&metrics.fired_total, delivered.len() as u64);
        if retries.waiting() > 0 {
            for resident in &delivered {
                retries.forget(&resident.schedule.id);
            }
        }
        if self
            .store
            .send(StoreCommand::Fired(delivered))
            .await
            .is_err()
        {
            tracing::error!("store writer is gone; fired schedules will fire again after restart");
        }
    }
}

/// Counts a failed delivery attempt of `resident`; returns when to try it again and the wait
/// until then.
pub(crate) fn failed_attempt(
    resident: &Resident,
    error: &str,
    metrics: &Metrics,
    retries: &Retries,
) -> (UnixMs, std::time::Duration) {
    let s = &resident.schedule;
    let wait = retries.failed(&s.id, s.due, &s.subject, error);
    Metrics::count(&metrics.delivery_errors_total, 1);
    (time::now_ms().saturating_add(wait.as_millis() as u64), wait)
}

/// Completes `grace` after `stop` is cancelled: how long a shutdown waits for NATS.
pub(crate) async fn grace_after(stop: &CancellationToken, grace: Duration) {
    stop.cancelled().await;
    tokio::time::sleep(grace).await;
}

impl Firing {
    pub async fn new(
        client: Client,
        metrics: Arc<Metrics>,
        retries: Arc<Retries>,
    ) -> Result<Firing, async_nats::SubscribeError> {
        let fence_subject = client.new_inbox();
        let fences = client.subscribe(fence_subject.clone()).await?;
        Ok(Firing {
            client: client.clone(),
            fence_subject,
            fences,
            fence_seq: 0,
            metrics: metrics.clone(),
            lateness_us: Vec::new(),
            due_text: DueText::default(),
            jetstream: Some(
                JetStreamDelivery::new(client, metrics.clone(), retries.clone()).await?,
            ),
            retries,
            fence_nonce: ulid::Ulid::generate().to_string(),
        })
    }

    /// Publishes batches from the scheduler until it is gone, then returns once every batch
    /// handed over has been confirmed and reported to the committer — or, after `stop`, once
    /// `SHUTDOWN_GRACE` has passed without confirmation (NATS down): those batches are left
    /// in the store for the next start.
    pub async fn run(
        mut self,
        mut due: mpsc::UnboundedReceiver<Vec<Resident>>,
        out: FiringOutputs,
        stop: CancellationToken,
    ) {
        let grace_over = grace_after(&stop, SHUTDOWN_GRACE);
        tokio::pin!(grace_over);
        let (to_jetstream, jetstream_due) = mpsc::unbounded_channel();
        // Aborted with this task (if a shutdown gives up on it), never left running alone.
        let jetstream = self.jetstream.take().map(|jetstream| {
            AbortOnDrop(tokio::spawn(jetstream.run(
                jetstream_due,
                out.clone(),
                stop.clone(),
                SHUTDOWN_GRACE,
            )))
        });
        let mut abandoned = 0;
        let mut batch: Vec<Resident> = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = due.recv().await {
            batch.extend(first);
            while batch.len() < MAX_BATCH {
                match due.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            if !hand_back_early(&mut batch, time::now_ms(), &out) {
                continue;
            }
            if !split_off_jetstream(&mut batch, &to_jetstream) {
                continue;
            }
            let failed = match abandoned {
                0 => tokio::select! {
                    failed = self.deliver(&mut batch) => Some(failed),
                    () = &mut grace_over => None,
                },
                _ => None,
            };
            let Some(failed) = failed else {
                abandoned += batch.len();
                out.resident.fetch_sub(batch.len(), Ordering::Relaxed);
                batch.clear();
                continue;
            };
            self.metrics.record_lateness(self.lateness_us.drain(..));
            let mut delivered = Vec::with_capacity(batch.len());
            let mut retry = Vec::new();
            let mut failed = failed.into_iter().peekable();
            for (index, resident) in batch.drain(..).enumerate() {
                match failed.next_if(|(at, _)| *at == index) {
                    Some((_, error)) => retry.push((resident, error)),
                    None => delivered.push(resident),
                }
            }
            self.retry(retry, &out);
            out.delivered(delivered, &self.metrics, &self.retries).await;
        }
        if abandoned > 0 {
            tracing::warn!(
                count = abandoned,
                "stopped without confirmation from NATS; these fire again after restart"
            );
        }
        drop(to_jetstream);
        if let Some(mut jetstream) = jetstream
            && let Err(err) = (&mut jetstream.0).await
        {
            tracing::error!("JetStream delivery failed: {err}");
        }
    }

    /// Sends schedules that failed back to the wheel, to be tried again after their backoff.
    fn retry(&self, failed: Vec<(Resident, String)>, out: &FiringOutputs) {
        if failed.is_empty() {
            return;
        }
        let again: Vec<(Resident, u64)> = failed
            .into_iter()
            .map(|(resident, error)| {
                let (at, _) = failed_attempt(&resident, &error, &self.metrics, &self.retries);
                (resident, at)
            })
            .collect();
        out.back_to_wheel(again);
    }

    /// Publishes `batch` until one attempt is confirmed by its fence on an unbroken
    /// connection. Returns the schedules of that attempt that NATS would not take (by index,
    /// ascending) with the reason.
    async fn deliver(&mut self, batch: &mut [Resident]) -> Vec<(usize, String)> {
        loop {
            // A series publishes the latest occurrence due by this attempt: after a long
            // NATS outage, one catch-up fire rather than the stale one first handed out.
            let now = time::now_ms();
            for resident in batch.iter_mut() {
                resident.schedule.choose_occurrence(now);
            }
            let before = session(&self.client);
            match self.publish_with_fence(batch, &before).await {
                Ok(failed) if session(&self.client) == before => return failed,
                Ok(_) => tracing::warn!(
                    count = batch.len(),
                    "reconnected while delivering; publishing the batch again"
                ),
                Err(err) => {
                    tracing::warn!(error = %err, count = batch.len(), "publish failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// One attempt: publish everything, then the fence, and wait for the fence (or for a
    /// reconnect, which makes the attempt void). Returns the schedules NATS refused.
    async fn publish_with_fence(
        &mut self,
        batch: &[Resident],
        session_before: &(String, u64),
    ) -> Result<Vec<(usize, String)>, async_nats::Error> {
        self.lateness_us.clear();
        // Refusals recorded so far belong to earlier publishes (replies, earlier attempts).
        let denials = &self.client.statistics().publish_denials;
        let _ = denials.take();
        let mut failed = Vec::new();
        for (index, Resident { schedule, .. }) in batch.iter().enumerate() {
            let (due, _) = schedule.occurrence();
            self.lateness_us
                .push(time::now_us().saturating_sub(due.saturating_mul(1000)));
            let headers = match delivery_headers(schedule, self.due_text.of(due)) {
                Ok(headers) => headers,
                Err(error) => {
                    failed.push((index, error));
                    continue;
                }
            };
            let published = self
                .client
                .publish_with_headers(schedule.subject.clone(), headers, schedule.payload.clone())
                .await;
            match published {
                Ok(()) => {}
                // Intake refuses what cannot be delivered, but the server's limit can shrink
                // later. Retrying at once would block every schedule behind this one.
                Err(err) if is_permanent(&err) => failed.push((index, err.to_string())),
                Err(err) => return Err(err.into()),
            }
        }
        self.fence_seq += 1;
        let seq = format!("{}.{}", self.fence_nonce, self.fence_seq);
        self.client
            .publish(self.fence_subject.clone(), seq.clone().into())
            .await?;
        let started = tokio::time::Instant::now();
        let mut reported = false;
        loop {
            match tokio::time::timeout(RECONNECT_CHECK, self.fences.next()).await {
                Ok(Some(fence)) if fence.payload == seq.as_bytes() => {
                    return Ok(with_denials(batch, failed, denials.take()));
                }
                Ok(Some(_stale)) => {} // the fence of an earlier, abandoned attempt
                Ok(None) => return Err("fence subscription closed".into()),
                Err(_) if session(&self.client) != *session_before => {
                    return Ok(failed); // void: the caller sees the new session and retries
                }
                Err(_) if !reported && started.elapsed() >= SLOW_FENCE => {
                    reported = true;
                    tracing::warn!(
                        count = batch.len(),
                        "NATS has not confirmed due messages for {SLOW_FENCE:?} (server unreachable?); waiting"
                    );
                }
                Err(_) => {}
            }
        }
    }
}

/// Never early, and nothing due waits behind what is not: the wheel hands out nothing before
/// its due, but if the wall clock stepped back since, some of `batch` may not be due any more
/// at `now`. Those go back to the wheel (which re-bases on such a step) to come out again at
/// their due. Returns whether anything is left to publish.
fn hand_back_early(batch: &mut Vec<Resident>, now: UnixMs, out: &FiringOutputs) -> bool {
    if batch.iter().any(|r| r.schedule.due > now) {
        let (ready, early): (Vec<Resident>, Vec<Resident>) =
            batch.drain(..).partition(|r| r.schedule.due <= now);
        *batch = ready;
        let again: Vec<(Resident, UnixMs)> = early
            .into_iter()
            .map(|r| {
                let due = r.schedule.due;
                (r, due)
            })
            .collect();
        tracing::warn!(
            count = again.len(),
            "handed out before their due (the wall clock stepped back); they wait again"
        );
        out.back_to_wheel(again);
    }
    !batch.is_empty()
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands the schedules of `batch` delivered through JetStream to that publisher, which runs
/// beside this one: a JetStream delivery never waits for a core one (though a batch handed
/// over behind a core batch waiting for its fence waits for that). Returns whether anything
/// is left here.
fn split_off_jetstream(
    batch: &mut Vec<Resident>,
    to_jetstream: &mpsc::UnboundedSender<Vec<Resident>>,
) -> bool {
    let jetstream = |r: &Resident| r.schedule.delivery == Delivery::JetStream;
    if batch.iter().any(jetstream) {
        let (streamed, core): (Vec<Resident>, Vec<Resident>) = batch.drain(..).partition(jetstream);
        batch.extend(core);
        // The receiver lives until this task drops the sender.
        let _ = to_jetstream.send(streamed);
    }
    !batch.is_empty()
}

/// `failed` (by index, ascending) with the schedules of `batch` whose publish the server
/// refused added: `denied` is what it refused during the attempt, and whether it refused more
/// than the client kept (then every schedule of the batch is tried again: a second delivery
/// is allowed, a lost one is not).
fn with_denials(
    batch: &[Resident],
    mut failed: Vec<(usize, String)>,
    (denied, overflowed): (Vec<String>, bool),
) -> Vec<(usize, String)> {
    if denied.is_empty() && !overflowed {
        return failed;
    }
    let denied: std::collections::HashSet<&str> = denied.iter().map(String::as_str).collect();
    let already: std::collections::HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
    for (index, resident) in batch.iter().enumerate() {
        let subject = resident.schedule.subject.as_str();
        if !already.contains(&index) && (overflowed || denied.contains(subject)) {
            failed.push((
                index,
                format!(
                    "NATS refused the publish: Permissions Violation for Publish to {subject:?}"
                ),
            ));
        }
    }
    failed.sort_unstable_by_key(|(index, _)| *index);
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SegmentKey;

    fn resident(id: &str, due: UnixMs) -> Resident {
        Resident {
            segment: SegmentKey::start_of(0),
            schedule: Box::new(crate::record::test_schedule(id, due, true)),
        }
    }

    #[test]
    fn what_is_not_due_yet_goes_back_to_the_wheel_and_holds_nothing_up() {
        let (store, _store_rx) = mpsc::channel(1);
        let (wheel, wheel_rx) = std::sync::mpsc::channel();
        let out = FiringOutputs {
            store,
            wheel,
            resident: Arc::default(),
        };
        let mut batch = vec![resident("due", 100), resident("early", 3_600_100)];
        assert!(hand_back_early(&mut batch, 100, &out));
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].schedule.id, "due");
        match wheel_rx.try_recv().unwrap() {
            WheelCommand::Retry(again) => {
                assert_eq!(again.len(), 1);
                assert_eq!(
                    (again[0].0.schedule.id.as_str(), again[0].1),
                    ("early", 3_600_100)
                );
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        let mut none_due = vec![resident("early", 200)];
        assert!(!hand_back_early(&mut none_due, 100, &out));
        let mut all_due = vec![resident("a", 1), resident("b", 100)];
        assert!(hand_back_early(&mut all_due, 100, &out));
        assert_eq!(all_due.len(), 2);
    }

    #[test]
    fn refused_subjects_fail_their_schedules_only() {
        let batch = [resident("a", 1), resident("b", 2), resident("c", 3)];
        let mut with_b = batch[1].schedule.as_ref().clone();
        with_b.subject = "forbidden".into();
        let batch = [
            batch[0].clone(),
            Resident {
                schedule: Box::new(with_b),
                ..batch[1].clone()
            },
            batch[2].clone(),
        ];
        let failed = with_denials(
            &batch,
            vec![(2, "too big".into())],
            (vec!["forbidden".into()], false),
        );
        let indexes: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, [1, 2]);
        assert!(failed[0].1.contains("Permissions Violation"), "{failed:?}");
        assert_eq!(failed[1].1, "too big");
        let all = with_denials(&batch, vec![], (vec![], true));
        assert_eq!(all.len(), 3, "an overflow retries the whole batch");
        assert!(with_denials(&batch, vec![], (vec!["other".into()], false)).is_empty());
    }
}
