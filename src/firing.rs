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
//! (larger than the server's `max_payload`, an invalid subject), and the server reports a
//! publish its permissions refuse only afterwards, as an `-ERR` beside the message stream.
//! So a confirmed batch *settles* for [`SETTLE`] before its schedules are reported for
//! deletion, and a refusal that arrives meanwhile takes the schedules to that subject back.
//! Either way they return to the wheel and are tried again after a backoff
//! ([`crate::retries`]). (A refusal reported later than [`SETTLE`] after the confirmation
//! cannot be matched any more; it is logged with its subject.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_nats::header::{HeaderName, HeaderValue, IntoHeaderName};
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::StoreCommand;
use crate::metrics::Metrics;
use crate::protocol;
use crate::record::Schedule;
use crate::retries::Retries;
use crate::scheduler::{Resident, WheelCommand};
use crate::time::{self, UnixMs};

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
/// How long a confirmed batch waits for a permissions refusal from the server before its
/// schedules are reported for deletion. The server sends the refusal before it processes the
/// fence, so it is normally read before the fence returns; this is the margin for the client
/// library's event task to hand it over.
pub const SETTLE: Duration = Duration::from_millis(100);

/// A failure that publishing the same message again will not cure by itself.
fn is_permanent(err: &async_nats::PublishError) -> bool {
    use async_nats::client::PublishErrorKind;
    matches!(
        err.kind(),
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject
    )
}

/// The server refused a publish to `subject` (NATS permissions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishDenial {
    pub subject: String,
    /// The server's error text.
    pub error: String,
}

impl PublishDenial {
    /// Reads a server error such as `Permissions Violation for Publish to "orders.x"`.
    pub fn from_server_error(text: &str) -> Option<PublishDenial> {
        const PREFIX: &str = "permissions violation for publish to ";
        let head = text.get(..PREFIX.len())?;
        if !head.eq_ignore_ascii_case(PREFIX) {
            return None;
        }
        let subject = text[PREFIX.len()..].trim().trim_matches('"');
        (!subject.is_empty()).then(|| PublishDenial {
            subject: subject.to_owned(),
            error: text.to_owned(),
        })
    }
}

/// `Sched-Id` and `Sched-Due` as header names, made once: cloning one is a reference count,
/// where naming a header by `&str` checks and copies the name on every publish.
static ID_NAME: LazyLock<HeaderName> = LazyLock::new(|| protocol::ID.into_header_name());
static DUE_NAME: LazyLock<HeaderName> = LazyLock::new(|| protocol::DUE.into_header_name());

/// The message a schedule is delivered as: its own headers plus `Sched-Id` and `Sched-Due`.
///
/// Built with the checking constructors (the plain ones assert): a stored header that is not
/// valid NATS header text (only a damaged store holds one) fails the delivery instead of
/// stopping natsched.
pub fn delivery_headers(schedule: &Schedule, due: &str) -> Result<HeaderMap, String> {
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
    Ok(headers)
}

/// The `Sched-Due` text of the last due formatted: consecutive fires mostly share one.
#[derive(Default)]
struct DueText {
    due: Option<u64>,
    text: String,
}

impl DueText {
    fn of(&mut self, due: u64) -> &str {
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
    /// Publishes the server refused, from the client's event callback.
    denials: mpsc::UnboundedReceiver<PublishDenial>,
    /// Confirmed batches, oldest first, waiting out [`SETTLE`].
    settling: VecDeque<(Instant, Vec<Resident>)>,
}

/// Which server connection a publish went out on: a reconnect changes it.
fn session(client: &Client) -> (String, u64) {
    let info = client.server_info();
    (info.server_id, info.client_id)
}

/// Where firing sends what it is done with.
pub struct FiringOutputs {
    /// The committer, which deletes delivered schedules.
    pub store: mpsc::Sender<StoreCommand>,
    /// The timer, which holds failed schedules until their next attempt.
    pub wheel: std::sync::mpsc::Sender<WheelCommand>,
    /// Schedules in memory: firing subtracts the ones it is done with.
    pub resident: Arc<AtomicUsize>,
}

impl Firing {
    pub async fn new(
        client: Client,
        metrics: Arc<Metrics>,
        retries: Arc<Retries>,
        denials: mpsc::UnboundedReceiver<PublishDenial>,
    ) -> Result<Firing, async_nats::SubscribeError> {
        let fence_subject = client.new_inbox();
        let fences = client.subscribe(fence_subject.clone()).await?;
        Ok(Firing {
            client,
            fence_subject,
            fences,
            fence_seq: 0,
            metrics,
            lateness_us: Vec::new(),
            due_text: DueText::default(),
            retries,
            denials,
            settling: VecDeque::new(),
        })
    }

    /// Publishes batches from the scheduler until it is gone, then returns once every batch
    /// handed over has been confirmed, settled and reported to the committer — or, after
    /// `stop`, once `SHUTDOWN_GRACE` has passed without confirmation (NATS down): those
    /// batches are left in the store for the next start.
    pub async fn run(
        mut self,
        mut due: mpsc::UnboundedReceiver<Vec<Resident>>,
        out: FiringOutputs,
        stop: CancellationToken,
    ) {
        let grace_over = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::pin!(grace_over);
        let mut abandoned = 0;
        let mut batch: Vec<Resident> = Vec::with_capacity(MAX_BATCH);
        loop {
            let settled_at = self.settling.front().map(|(at, _)| *at + SETTLE);
            let first = tokio::select! {
                first = due.recv() => match first {
                    Some(first) => first,
                    None => break,
                },
                () = sleep_until_some(settled_at) => {
                    self.settle(&out, false).await;
                    continue;
                }
            };
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
            let failed = match abandoned {
                0 => tokio::select! {
                    failed = self.deliver(&batch) => Some(failed),
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
            let mut confirmed = Vec::with_capacity(batch.len());
            let mut retry = Vec::new();
            let mut failed = failed.into_iter().peekable();
            for (index, resident) in batch.drain(..).enumerate() {
                match failed.next_if(|(at, _)| *at == index) {
                    Some((_, error)) => retry.push((resident, error)),
                    None => confirmed.push(resident),
                }
            }
            self.retry(retry, &out);
            self.settling.push_back((Instant::now(), confirmed));
            self.settle(&out, false).await;
        }
        // Whatever is still settling gets its full margin, then goes.
        if let Some(last) = self.settling.back().map(|(at, _)| *at + SETTLE) {
            tokio::time::sleep_until(last.into()).await;
        }
        self.settle(&out, true).await;
        if abandoned > 0 {
            tracing::warn!(
                count = abandoned,
                "stopped without confirmation from NATS; these fire again after restart"
            );
        }
    }

    /// Takes schedules whose publish the server refused out of the settling batches, and
    /// reports the batches that have settled (all of them if `all`) for deletion.
    async fn settle(&mut self, out: &FiringOutputs, all: bool) {
        while let Ok(denial) = self.denials.try_recv() {
            let mut refused = Vec::new();
            for (_, batch) in &mut self.settling {
                let mut i = 0;
                while i < batch.len() {
                    if batch[i].schedule.subject == denial.subject {
                        refused.push((batch.swap_remove(i), denial.error.clone()));
                    } else {
                        i += 1;
                    }
                }
            }
            if refused.is_empty() {
                tracing::debug!(
                    subject = ?denial.subject,
                    error = ?denial.error,
                    "NATS refused a publish that is not settling (already retried, or \
                     reported after the settling margin)"
                );
            }
            self.retry(refused, out);
        }
        let now = Instant::now();
        while let Some((at, _)) = self.settling.front() {
            if !all && now < *at + SETTLE {
                break;
            }
            let Some((_, batch)) = self.settling.pop_front() else {
                break;
            };
            if batch.is_empty() {
                continue;
            }
            out.resident.fetch_sub(batch.len(), Ordering::Relaxed);
            Metrics::count(&self.metrics.fired_total, batch.len() as u64);
            if self.retries.waiting() > 0 {
                for resident in &batch {
                    self.retries.forget(&resident.schedule.id);
                }
            }
            if out.store.send(StoreCommand::Fired(batch)).await.is_err() {
                tracing::error!(
                    "store writer is gone; fired schedules will fire again after restart"
                );
            }
        }
    }

    /// Sends schedules that failed back to the wheel, to be tried again after their backoff.
    fn retry(&self, failed: Vec<(Resident, String)>, out: &FiringOutputs) {
        if failed.is_empty() {
            return;
        }
        let now = time::now_ms();
        let again: Vec<(Resident, u64)> = failed
            .into_iter()
            .map(|(resident, error)| {
                let s = &resident.schedule;
                let wait = self.retries.failed(&s.id, s.due, &s.subject, &error);
                Metrics::count(&self.metrics.delivery_errors_total, 1);
                let at = now.saturating_add(wait.as_millis() as u64);
                (resident, at)
            })
            .collect();
        if out.wheel.send(WheelCommand::Retry(again)).is_err() {
            // The timer has stopped (shutdown): they stay stored and are tried after restart.
            tracing::warn!("timer stopped; undelivered schedules are retried after restart");
        }
    }

    /// Publishes `batch` until one attempt is confirmed by its fence on an unbroken
    /// connection. Returns the schedules of that attempt that NATS would not take (by index,
    /// ascending) with the reason.
    async fn deliver(&mut self, batch: &[Resident]) -> Vec<(usize, String)> {
        loop {
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
        let mut failed = Vec::new();
        for (index, Resident { schedule, .. }) in batch.iter().enumerate() {
            self.lateness_us
                .push(time::now_us().saturating_sub(schedule.due.saturating_mul(1000)));
            let headers = match delivery_headers(schedule, self.due_text.of(schedule.due)) {
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
        let seq = self.fence_seq.to_string();
        self.client
            .publish(self.fence_subject.clone(), seq.clone().into())
            .await?;
        let started = tokio::time::Instant::now();
        let mut reported = false;
        loop {
            match tokio::time::timeout(RECONNECT_CHECK, self.fences.next()).await {
                Ok(Some(fence)) if fence.payload == seq.as_bytes() => return Ok(failed),
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
        if out.wheel.send(WheelCommand::Retry(again)).is_err() {
            tracing::warn!("timer stopped; they fire after restart");
        }
    }
    !batch.is_empty()
}

/// Completes at `at`, or never if there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
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
    fn publish_denials_name_their_subject() {
        let denial =
            PublishDenial::from_server_error("Permissions Violation for Publish to \"orders.x\"");
        assert_eq!(denial.map(|d| d.subject), Some("orders.x".to_owned()));
        for other in [
            "Permissions Violation for Subscription to \"a\"",
            "Maximum Payload Violation",
            "permissions violation for publish to",
            "",
        ] {
            assert_eq!(PublishDenial::from_server_error(other), None, "{other}");
        }
    }
}
