//! Publishing due schedules to their target subjects.
//!
//! A batch counts as delivered only once the server has provably processed it: after the batch
//! natsched publishes a *fence* message to a private inbox it subscribes to, and waits for the
//! fence to come back. The server handles a connection's messages in order, so the fence's
//! return means every publish before it was routed. If the client reconnected meanwhile (the
//! server's client id changed), publishes may have died with the old socket, so the batch is
//! published again. Only then are the schedules' keys sent to the committer for deletion, so a
//! crash or outage at any point means a second delivery, never a lost one (at-least-once).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_nats::header::{HeaderName, IntoHeaderName};
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::StoreCommand;
use crate::metrics::Metrics;
use crate::protocol;
use crate::record::Schedule;
use crate::scheduler::Resident;
use crate::time;

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

/// The message a schedule is delivered as: its own headers plus `Sched-Id` and `Sched-Due`.
pub fn delivery_headers(schedule: &Schedule, due: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &schedule.headers {
        headers.append(name.as_str(), value.as_str());
    }
    headers.insert(ID_NAME.clone(), schedule.id.as_str());
    headers.insert(DUE_NAME.clone(), due);
    headers
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
}

/// Which server connection a publish went out on: a reconnect changes it.
fn session(client: &Client) -> (String, u64) {
    let info = client.server_info();
    (info.server_id, info.client_id)
}

impl Firing {
    pub async fn new(
        client: Client,
        metrics: Arc<Metrics>,
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
        })
    }

    /// Publishes batches from the scheduler until it is gone, then returns once every batch
    /// handed over has been confirmed and reported to the committer — or, after `stop`, once
    /// `SHUTDOWN_GRACE` has passed without confirmation (NATS down): those batches are left
    /// in the store for the next start.
    pub async fn run(
        mut self,
        mut due: mpsc::UnboundedReceiver<Vec<Resident>>,
        store: mpsc::Sender<StoreCommand>,
        resident: Arc<AtomicUsize>,
        stop: CancellationToken,
    ) {
        let grace_over = async {
            stop.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::pin!(grace_over);
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
            let fired = batch.len();
            let delivered = abandoned == 0
                && tokio::select! {
                    () = self.deliver(&batch) => true,
                    () = &mut grace_over => false,
                };
            if !delivered {
                abandoned += fired;
                resident.fetch_sub(fired, Ordering::Relaxed);
                batch.clear();
                continue;
            }
            resident.fetch_sub(fired, Ordering::Relaxed);
            Metrics::count(&self.metrics.fired_total, fired as u64);
            self.metrics.record_lateness(self.lateness_us.drain(..));
            if store
                .send(StoreCommand::Fired(batch.split_off(0)))
                .await
                .is_err()
            {
                tracing::error!(
                    "store writer is gone; fired schedules will fire again after restart"
                );
            }
        }
        if abandoned > 0 {
            tracing::warn!(
                count = abandoned,
                "stopped without confirmation from NATS; these fire again after restart"
            );
        }
    }

    /// Publishes `batch` until one attempt is confirmed by its fence on an unbroken connection.
    async fn deliver(&mut self, batch: &[Resident]) {
        loop {
            let before = session(&self.client);
            match self.publish_with_fence(batch, &before).await {
                Ok(()) if session(&self.client) == before => return,
                Ok(()) => tracing::warn!(
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
    /// reconnect, which makes the attempt void).
    async fn publish_with_fence(
        &mut self,
        batch: &[Resident],
        session_before: &(String, u64),
    ) -> Result<(), async_nats::Error> {
        // The wheel hands out nothing before its due, but if the wall clock was stepped back
        // since, "due" may be in the future again: never publish early.
        let latest = batch.iter().map(|r| r.schedule.due).max().unwrap_or(0);
        if time::now_ms() < latest {
            tokio::time::sleep_until(time::instant_of(latest).into()).await;
        }
        self.lateness_us.clear();
        for Resident { schedule, .. } in batch {
            self.lateness_us
                .push(time::now_us().saturating_sub(schedule.due.saturating_mul(1000)));
            let published = self
                .client
                .publish_with_headers(
                    schedule.subject.clone(),
                    delivery_headers(schedule, self.due_text.of(schedule.due)),
                    schedule.payload.clone(),
                )
                .await;
            match published {
                Ok(()) => {}
                // Intake refuses what cannot be delivered, but the server's limit can shrink
                // later. Retrying would block every schedule behind this one forever.
                Err(err) if is_permanent(&err) => {
                    Metrics::count(&self.metrics.errors_total, 1);
                    tracing::error!(
                        id = %schedule.id,
                        subject = %schedule.subject,
                        error = %err,
                        "schedule can never be published; dropping it"
                    )
                }
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
                Ok(Some(fence)) if fence.payload == seq.as_bytes() => return Ok(()),
                Ok(Some(_stale)) => {} // the fence of an earlier, abandoned attempt
                Ok(None) => return Err("fence subscription closed".into()),
                Err(_) if session(&self.client) != *session_before => {
                    return Ok(()); // void: the caller sees the new session and retries
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
