//! Operating the scheduler: `<prefix>.cancel`, `<prefix>.get`, `<prefix>.list` (see
//! [`crate::listing`]) and `<prefix>.stats`.
//!
//! Cancel and get take the schedule id as the request body and answer with JSON, or with the
//! same micro-service error convention as `<prefix>.add` (400 for a malformed id, 404 for an
//! unknown one, 503 when the store fails). A cancel goes through the committer, like an add, and
//! is answered once the removal is durable; a get reads the store directly. Stats answers with
//! the counters of [`Metrics`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::StoreCommand;
use crate::intake::IntakeBarrier;
use crate::listing::{self, ListRequest};
use crate::metrics::{Endpoint, LatenessMs, Metrics, QuotaUsage};
use crate::protocol::{self, ApiError};
use crate::record::Schedule;
use crate::replies::{self, Reply};
use crate::retries::Retries;
use crate::store::{Store, StoreError};
use crate::time;

/// Most cancels waiting for the JetStream intake at once.
const MAX_BARRIER_WAITS: usize = 256;

/// The subscriptions of the operations API.
pub struct Api {
    client: Client,
    store: Store,
    metrics: Arc<Metrics>,
    retries: Arc<Retries>,
    /// With the JetStream intake: what a cancel waits for before it goes to the store writer.
    barrier: Option<Arc<IntakeBarrier>>,
    /// Cancels waiting at the barrier at once, at most [`MAX_BARRIER_WAITS`].
    barrier_waits: Arc<tokio::sync::Semaphore>,
    cancels: Subscriber,
    gets: Subscriber,
    lists: Subscriber,
    stats: Subscriber,
}

/// What [`Api::subscribe`] needs.
pub struct ApiOptions<'a> {
    pub client: Client,
    /// `api.prefix`.
    pub prefix: &'a str,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub retries: Arc<Retries>,
    pub barrier: Option<Arc<IntakeBarrier>>,
}

impl Api {
    pub async fn subscribe(options: ApiOptions<'_>) -> Result<Api, async_nats::SubscribeError> {
        let ApiOptions {
            client,
            prefix,
            store,
            metrics,
            retries,
            barrier,
        } = options;
        Ok(Api {
            cancels: client.subscribe(format!("{prefix}.cancel")).await?,
            gets: client.subscribe(format!("{prefix}.get")).await?,
            lists: client.subscribe(format!("{prefix}.list")).await?,
            stats: client.subscribe(format!("{prefix}.stats")).await?,
            client,
            store,
            metrics,
            retries,
            barrier,
            barrier_waits: Arc::new(tokio::sync::Semaphore::new(MAX_BARRIER_WAITS)),
        })
    }

    /// Serves requests until `shutdown`.
    pub async fn run(
        mut self,
        commands: mpsc::Sender<StoreCommand>,
        resident: Arc<AtomicUsize>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(message) = self.cancels.next() => self.cancel(message, &commands).await,
                Some(message) = self.gets.next() => self.get(message).await,
                Some(message) = self.lists.next() => self.list(message).await,
                Some(message) = self.stats.next() => {
                    let reply = Reply::to(&message, Endpoint::Stats);
                    let body = self.stats(resident.load(Ordering::Relaxed)).await;
                    self.answer(reply, Ok(body)).await;
                }
                else => break,
            }
        }
        let _ = self.cancels.unsubscribe().await;
        let _ = self.gets.unsubscribe().await;
        let _ = self.lists.unsubscribe().await;
        let _ = self.stats.unsubscribe().await;
    }

    async fn stats(&self, resident: usize) -> Bytes {
        #[derive(Serialize)]
        struct Stats {
            pending: u64,
            resident: usize,
            scheduled_total: u64,
            fired_total: u64,
            cancelled_total: u64,
            errors_total: u64,
            denied_total: u64,
            rejected_total: u64,
            delivery_errors_total: u64,
            undeliverable: usize,
            corrupt_segments_total: u64,
            store_bytes: u64,
            store_error: Option<String>,
            quotas: Vec<QuotaUsage>,
            lateness_ms: LatenessMs,
            #[serde(flatten)]
            cluster: crate::cluster::ClusterStatus,
        }
        let store = self.store.clone();
        let store_bytes = tokio::task::spawn_blocking(move || store.size_on_disk())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        let m = &self.metrics;
        let stats = Stats {
            pending: m.pending.load(Ordering::Relaxed),
            resident,
            scheduled_total: m.scheduled_total.load(Ordering::Relaxed),
            fired_total: m.fired_total.load(Ordering::Relaxed),
            cancelled_total: m.cancelled_total.load(Ordering::Relaxed),
            errors_total: m.errors_total.load(Ordering::Relaxed),
            denied_total: m.denied_total.load(Ordering::Relaxed),
            rejected_total: m.rejected_total.load(Ordering::Relaxed),
            delivery_errors_total: m.delivery_errors_total.load(Ordering::Relaxed),
            undeliverable: self.retries.waiting(),
            corrupt_segments_total: self.store.damaged_total(),
            store_bytes,
            store_error: m.store_error(),
            quotas: m.quotas(),
            lateness_ms: m.lateness(),
            cluster: m.cluster(),
        };
        serde_json::to_vec(&stats)
            .expect("plain struct serializes")
            .into()
    }

    async fn cancel(&self, message: Message, commands: &mpsc::Sender<StoreCommand>) {
        match protocol::parse_id_body(&message.payload) {
            Ok(id) => {
                let reply = Reply::to(&message, Endpoint::Cancel);
                let Some(barrier) = self.barrier.clone() else {
                    send_cancel(id, reply, commands).await;
                    return;
                };
                // Waits for intake to reach the adds published before it, without holding up
                // the other requests.
                let commands = commands.clone();
                let client = self.client.clone();
                let metrics = self.metrics.clone();
                // Bounded: a flood of cancels waits here instead of piling up tasks.
                let Ok(permit) = self.barrier_waits.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    match barrier.wait().await {
                        Ok(()) => send_cancel(id, reply, &commands).await,
                        Err(error) => {
                            if let Some(reply) = reply {
                                replies::answer(&client, reply, Err(error), &metrics).await;
                            }
                        }
                    }
                });
            }
            Err(error) => {
                self.answer(Reply::to(&message, Endpoint::Cancel), Err(error))
                    .await
            }
        }
    }

    async fn get(&self, message: Message) {
        let reply = Reply::to(&message, Endpoint::Get);
        let result = match protocol::parse_id_body(&message.payload) {
            Err(error) => Err(error),
            Ok(id) => self
                .read(move |store| store.get(&id).map(|found| (found, id)))
                .await
                .and_then(|(found, id)| match found {
                    Some(schedule) => Ok(describe(&schedule, &self.retries)),
                    None => Err(ApiError::not_found(&id)),
                }),
        };
        self.answer(reply, result).await;
    }

    async fn list(&self, message: Message) {
        let reply = Reply::to(&message, Endpoint::List);
        let result = match ListRequest::parse(&message.payload) {
            Err(error) => Err(error),
            Ok(request) => self
                .read(move |store| listing::page(store, &request))
                .await
                .map(|(items, next)| page_json(&items, next, &self.retries)),
        };
        self.answer(reply, result).await;
    }

    /// Runs a store read off the async workers (it may touch the disk).
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || read(&store)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err @ StoreError::Corrupt { .. })) => Err(ApiError::new(500, err.to_string())),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "store read failed");
                Err(ApiError::unavailable(format!(
                    "store unavailable: {}",
                    err.brief()
                )))
            }
            Err(err) => Err(ApiError::unavailable(format!("store read failed: {err}"))),
        }
    }

    async fn answer(&self, reply: Option<Reply>, result: Result<Bytes, ApiError>) {
        if let Some(reply) = reply {
            replies::answer(&self.client, reply, result, &self.metrics).await;
        }
    }
}

/// `{"items":[…],"next_cursor":…}`, the items as [`describe`] writes them.
fn page_json(items: &[Schedule], next_cursor: Option<String>, retries: &Retries) -> Bytes {
    let mut out = b"{\"items\":[".to_vec();
    for (i, schedule) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&describe(schedule, retries));
    }
    out.extend_from_slice(b"],\"next_cursor\":");
    out.extend_from_slice(&serde_json::to_vec(&next_cursor).expect("string serializes"));
    out.push(b'}');
    out.into()
}

async fn send_cancel(id: String, reply: Option<Reply>, commands: &mpsc::Sender<StoreCommand>) {
    if commands
        .send(StoreCommand::Cancel { id, reply })
        .await
        .is_err()
    {
        tracing::error!("store writer is gone; cancel dropped unanswered");
    }
}

/// The JSON a get answers with: the schedule, and its failed delivery attempts (counted since
/// natsched started) with the last error, if any.
pub fn describe(schedule: &Schedule, retries: &Retries) -> Bytes {
    #[derive(Serialize)]
    struct Description<'a> {
        id: &'a str,
        subject: &'a str,
        due: String,
        created: String,
        headers: BTreeMap<&'a str, Vec<&'a str>>,
        payload_size: usize,
        delivery: &'static str,
        attempts: u32,
        last_error: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recurring: Option<Recurring<'a>>,
    }
    /// A series: its rule, bounds and progress (`next` is `due`).
    #[derive(Serialize)]
    struct Recurring<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        cron: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tz: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        every: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        every_ms: Option<u64>,
        next: String,
        next_seq: u64,
        /// Occurrences past: published, or covered by a catch-up's one fire.
        fired: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        until: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
    }
    let recurring = schedule.recurrence.as_deref().map(|series| {
        let rule = series.rule();
        let every_ms = rule.interval();
        Recurring {
            cron: every_ms.is_none().then(|| rule.describe()),
            tz: rule.zone(),
            every: every_ms.map(|_| rule.describe()),
            every_ms,
            next: time::format_ms(schedule.due),
            next_seq: series.seq,
            fired: series.seq.saturating_sub(1),
            until: series.until.map(time::format_ms),
            count: series.count,
        }
    });
    let failure = retries.get(&schedule.id, schedule.due);
    let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, value) in &schedule.headers {
        headers.entry(name).or_default().push(value);
    }
    let description = Description {
        id: &schedule.id,
        subject: &schedule.subject,
        due: time::format_ms(schedule.due),
        created: time::format_ms(schedule.created),
        headers,
        payload_size: schedule.payload.len(),
        delivery: match schedule.delivery {
            crate::record::Delivery::Core => "core",
            crate::record::Delivery::JetStream => "jetstream",
        },
        attempts: failure.as_ref().map_or(0, |f| f.attempts),
        last_error: failure.map(|f| f.last_error),
        recurring,
    };
    serde_json::to_vec(&description)
        .expect("plain struct serializes")
        .into()
}
