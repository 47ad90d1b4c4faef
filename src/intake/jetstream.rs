//! JetStream intake (`[intake] mode = "jetstream"`): schedule requests wait in a work-queue
//! stream until natsched has stored them.
//!
//! A client publishes to `<prefix>.add.<target>` as always; the stream captures it and the
//! server answers the publish with a PubAck (so a client using request/reply gets the PubAck
//! as its answer), whether natsched runs or not. natsched consumes the stream through one
//! durable pull consumer and settles each message once the store writer has answered:
//!
//! | store writer's answer             | message   | also                                       |
//! |-----------------------------------|-----------|--------------------------------------------|
//! | stored (durable)                  | `+ACK`    |                                            |
//! | 503 (store unavailable or full)   | `-NAK` with a delay: delivered again later |  |
//! | any other refusal (400, 403, 429…) | `+TERM`  | the error published to `<prefix>.rejected` |
//!
//! A request refused by intake itself (a bad header, a denied target) is terminated and
//! published to `<prefix>.rejected` at once. Terminated messages leave the work queue, so a
//! bad request is never redelivered forever.
//!
//! **Exactly once.** Acks are sent after the commit, so a crash between the two delivers the
//! message again. The store writer knows it by its stream sequence and acks it without
//! storing a second copy (see `committer/intake_mark.rs`). A client's `Nats-Msg-Id` lets the
//! stream itself drop the client's own re-sends.
//!
//! **Catching up.** On start natsched deletes and re-creates its consumer: every message still
//! in the work queue (never delivered, or delivered to a natsched that died before acking it)
//! is delivered at once instead of after the ack wait.
//!
//! **Cancel before consume.** A `<prefix>.cancel` must cancel an add whose PubAck came
//! before it, even if natsched has not consumed that add yet. [`IntakeBarrier::wait`] reads
//! the stream's last sequence and waits until intake has handed every message up to it to
//! the store writer; the cancel, queued behind them, then finds the add.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Requests;
use crate::committer::StoreCommand;
use crate::config::Config;
use crate::metrics::{Endpoint, Metrics};
use crate::protocol::{self, ApiError};
use crate::replies::{Reply, StreamOrigin, Via};
use crate::time;

/// The durable consumer natsched reads the intake stream with.
pub const CONSUMER: &str = "natsched";
/// Messages requested per pull.
const PULL_BATCH: usize = 2048;
/// How long one pull waits on the server: a pull lost in a server restart is replaced
/// within this, so intake resumes within seconds.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Heartbeats of a waiting pull; missing ones mean the server lost it.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Bytes requested per pull at most: with large requests, what waits in memory stays bounded.
const PULL_BYTES: usize = 8 * 1024 * 1024;
/// Messages delivered but not yet settled, at most (the store writer's queue holds 16 Ki).
const MAX_ACK_PENDING: i64 = 65_536;
/// How long the server waits for a settlement before delivering a message again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a message the store could not take (503) waits before its next delivery.
const NAK_DELAY: Duration = Duration::from_secs(1);
/// How long a cancel waits for intake to reach the adds published before it.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the stream's first sequence is read (for the intake mark).
const FLOOR_REFRESH: Duration = Duration::from_secs(5);
/// Pause before pulling again after the pull failed (NATS away).
const PULL_RETRY: Duration = Duration::from_millis(500);

/// Why the intake stream or its consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamSetupError {
    #[error("cannot get or create the intake stream {stream:?}: {reason}")]
    Stream { stream: String, reason: String },
    #[error(
        "the existing stream {stream:?} cannot be natsched's intake: {reason} (delete it, or \
         name another with [intake] stream)"
    )]
    Mismatch { stream: String, reason: String },
    #[error("cannot create the consumer {CONSUMER:?} on stream {stream:?}: {reason}")]
    Consumer { stream: String, reason: String },
}

/// Lets a cancel wait until intake has handed over every add published before it.
pub struct IntakeBarrier {
    context: Context,
    stream: String,
    /// The highest stream sequence handed to the store writer (or refused) so far.
    handed: watch::Receiver<u64>,
    /// Sequences refused for now (503), to be delivered again.
    awaiting: Awaiting,
}

impl IntakeBarrier {
    /// Waits until every message the intake stream held when called has been handed to the
    /// store writer; 503 if that takes longer than [`BARRIER_TIMEOUT`] or the stream cannot
    /// be read.
    pub async fn wait(&self) -> Result<(), ApiError> {
        let unavailable = |why: String| {
            ApiError::unavailable(format!(
                "cannot cancel now: {why}; an add published before this cancel may not have \
                 been consumed yet (retry)"
            ))
        };
        let wait = async {
            let stream = self
                .context
                .get_stream(&self.stream)
                .await
                .map_err(|e| unavailable(format!("intake stream unreadable ({e})")))?;
            let state = &stream.cached_info().state;
            if state.messages == 0 {
                return Ok(()); // every add was consumed and settled
            }
            let last = state.last_sequence;
            let mut handed = self.handed.clone();
            handed
                .wait_for(|seq| *seq >= last)
                .await
                .map_err(|_| unavailable("intake stopped".into()))?;
            // An add refused for now comes again later: the cancel must not overtake it.
            let waiting_again = self
                .awaiting
                .lock()
                .map(|awaiting| awaiting.first().is_some_and(|first| *first <= last))
                .unwrap_or(false);
            match waiting_again {
                true => Err(unavailable("an earlier add waits to be stored".into())),
                false => Ok(()),
            }
        };
        tokio::time::timeout(BARRIER_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| Err(unavailable("intake is behind".into())))
    }
}

/// The consumer of the intake stream.
pub struct JetStreamIntake {
    requests: Requests,
    client: Client,
    context: Context,
    /// The intake stream as natsched wants it (to make it again if it disappears).
    wanted: stream::Config,
    consumer: PullConsumer,
    /// The stream's creation time (ms): which incarnation of it the sequences belong to.
    created_ms: u64,
    /// The stream's first sequence as last read: nothing below it can come again.
    floor: u64,
    /// `<prefix>.rejected`.
    rejected: Subject,
    handed: watch::Sender<u64>,
    /// Sequences refused for now (503) and not yet delivered again.
    awaiting: Awaiting,
    metrics: Arc<Metrics>,
}

/// Intake stream sequences refused for now (503) that the server will deliver again.
pub(crate) type Awaiting = Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>;

/// The durable consumer's settings.
fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// The creation time of a stream, in Unix ms.
fn created_ms(info: &stream::Info) -> u64 {
    u64::try_from(info.created.unix_timestamp_nanos() / 1_000_000).unwrap_or_default()
}

impl JetStreamIntake {
    /// Gets or creates the stream and (re)creates the durable consumer.
    pub(crate) async fn start(
        requests: Requests,
        config: &Config,
    ) -> Result<(JetStreamIntake, IntakeBarrier), JetStreamSetupError> {
        let client = requests.client.clone();
        let context = jetstream::new(client.clone());
        let intake = &config.intake;
        let name = intake.stream.clone();
        let subject = format!("{}.add.>", config.api.prefix);
        let wanted = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: intake.replicas,
            duplicate_window: intake.duplicate_window,
            ..Default::default()
        };
        let stream_error = |reason: String| JetStreamSetupError::Stream {
            stream: name.clone(),
            reason,
        };
        let stream = context
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        let info = stream.cached_info();
        let mismatch = |reason: String| JetStreamSetupError::Mismatch {
            stream: name.clone(),
            reason,
        };
        if info.config.retention != RetentionPolicy::WorkQueue {
            return Err(mismatch(format!(
                "its retention is {:?}, not work-queue",
                info.config.retention
            )));
        }
        if !info.config.subjects.contains(&subject) {
            return Err(mismatch(format!(
                "its subjects {:?} do not include {subject:?}",
                info.config.subjects
            )));
        }
        if info.config.num_replicas != intake.replicas {
            tracing::warn!(
                stream = %name,
                replicas = info.config.num_replicas,
                configured = intake.replicas,
                "the intake stream exists with another replica count; keeping it"
            );
        }
        let created_ms = created_ms(info);
        let floor = info.state.first_sequence;
        // Re-created, so that what an earlier natsched took but never settled comes at once.
        let _ = stream.delete_consumer(CONSUMER).await;
        let consumer_error = |reason: String| JetStreamSetupError::Consumer {
            stream: name.clone(),
            reason,
        };
        let consumer: PullConsumer = stream
            .create_consumer(consumer_config())
            .await
            .map_err(|e| consumer_error(e.to_string()))?;
        tracing::info!(
            stream = %name,
            subject = %subject,
            waiting = info.state.messages,
            "consuming schedule requests from JetStream"
        );
        let (handed, handed_rx) = watch::channel(0);
        let awaiting = Awaiting::default();
        let barrier = IntakeBarrier {
            context: context.clone(),
            stream: name,
            handed: handed_rx,
            awaiting: awaiting.clone(),
        };
        let metrics = requests.metrics.clone();
        Ok((
            JetStreamIntake {
                rejected: Subject::from(format!("{}.rejected", config.api.prefix)),
                requests,
                client,
                context,
                wanted,
                consumer,
                created_ms,
                floor,
                handed,
                awaiting,
                metrics,
            },
            barrier,
        ))
    }

    /// Consumes requests until `shutdown`. Messages taken but not handed over are left to
    /// the server, which delivers them again (to the next start at the latest). If the
    /// consumer or the stream disappears, it is made again.
    pub async fn run(mut self, store: mpsc::Sender<StoreCommand>, shutdown: CancellationToken) {
        let mut refresh = tokio::time::interval(FLOOR_REFRESH);
        'pulling: loop {
            let messages = tokio::select! {
                _ = shutdown.cancelled() => break,
                messages = self
                    .consumer
                    .stream()
                    .max_messages_per_batch(PULL_BATCH)
                    .max_bytes_per_batch(PULL_BYTES)
                    .expires(PULL_EXPIRES)
                    .heartbeat(PULL_HEARTBEAT)
                    .messages() => messages,
            };
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot pull from the intake stream; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        () = tokio::time::sleep(PULL_RETRY) => {}
                    }
                    self.set_up_again().await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pulling,
                    _ = refresh.tick() => self.refresh().await,
                    next = messages.next() => match next {
                        Some(Ok(message)) => self.handle(message, &store).await,
                        Some(Err(err)) => {
                            use async_nats::jetstream::consumer::pull::MessagesErrorKind;
                            match err.kind() {
                                MessagesErrorKind::ConsumerDeleted => {
                                    tracing::warn!("the intake consumer was deleted; making it again");
                                    self.set_up_again().await;
                                    continue 'pulling;
                                }
                                // A pull the server lost (it restarted): pull anew.
                                MessagesErrorKind::MissingHeartbeat => continue 'pulling,
                                _ => {}
                            }
                            // Missed heartbeats and the like: the pull stream carries on.
                            tracing::debug!(error = %err, "intake pull");
                        }
                        None => continue 'pulling,
                    },
                }
            }
        }
    }

    /// Reads the stream's first sequence (the intake mark forgets what is below it); notices
    /// a stream made anew.
    async fn refresh(&mut self) {
        if let Ok(stream) = self.context.get_stream(&self.wanted.name).await {
            let info = stream.cached_info();
            self.floor = info.state.first_sequence;
            if created_ms(info) != self.created_ms {
                tracing::warn!(stream = %self.wanted.name, "the intake stream was made anew");
                self.set_up_again().await;
            }
        }
    }

    /// Gets or makes the stream and the consumer again (after either disappeared).
    async fn set_up_again(&mut self) {
        let stream = match self.context.get_or_create_stream(self.wanted.clone()).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot get the intake stream; retrying");
                return;
            }
        };
        match stream
            .get_or_create_consumer(CONSUMER, consumer_config())
            .await
        {
            Ok(consumer) => {
                let info = stream.cached_info();
                self.created_ms = created_ms(info);
                self.floor = info.state.first_sequence;
                self.consumer = consumer;
            }
            Err(err) => tracing::warn!(error = %err, "cannot make the intake consumer; retrying"),
        }
    }

    async fn handle(&self, message: jetstream::Message, store: &mpsc::Sender<StoreCommand>) {
        // Only what the server delivers for this consumer: the ack subject names both.
        let delivered = message.info().ok().and_then(|info| {
            let ours = info.stream == self.wanted.name && info.consumer == CONSUMER;
            let published = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000);
            ours.then_some((info.stream_sequence, published.unwrap_or_default()))
        });
        let jetstream::Message { message, .. } = message;
        let (Some(ack), Some((sequence, published))) = (message.reply.clone(), delivered) else {
            tracing::warn!(
                subject = ?message.subject,
                "a message on the intake inbox that this consumer did not deliver; ignored"
            );
            return;
        };
        if let Ok(mut awaiting) = self.awaiting.lock() {
            awaiting.remove(&sequence);
        }
        let header = |name: &str| {
            let value = message.headers.as_ref()?.get(name)?;
            Some(value.as_str().to_owned())
        };
        let origin = Box::new(StreamOrigin {
            subject: message.subject.clone(),
            sched_id: header(protocol::ID),
            msg_id: header(protocol::MSG_ID),
            rejected: self.rejected.clone(),
            stream_created: self.created_ms,
            sequence,
            floor: self.floor,
            awaiting: self.awaiting.clone(),
        });
        let reply = Reply {
            subject: ack,
            received: Instant::now(),
            endpoint: Endpoint::Add,
            via: Via::Stream(origin),
        };
        // `Sched-Delay` counts from when the client published, not from when natsched
        // (perhaps down meanwhile) consumed it.
        let now = time::now_ms();
        match self.requests.schedule_of(&message, published.min(now)) {
            Ok(schedule) => {
                let add = StoreCommand::Add {
                    schedule,
                    reply: Some(reply),
                };
                if store.send(add).await.is_err() {
                    tracing::error!("store writer is gone; the request stays in the stream");
                    return;
                }
            }
            Err(error) => {
                tracing::debug!(subject = ?message.subject, %error, "refused schedule request");
                settle(&self.client, reply, Err(error), &self.metrics).await;
            }
        }
        self.handed.send_if_modified(|handed| {
            let moved = sequence > *handed;
            *handed = (*handed).max(sequence);
            moved
        });
    }
}

/// Settles an intake stream message with the store writer's answer (see the module docs).
pub(crate) async fn settle(
    client: &Client,
    reply: Reply,
    result: Result<Bytes, ApiError>,
    metrics: &Metrics,
) {
    let Via::Stream(origin) = &reply.via else {
        return;
    };
    let settlement = match &result {
        Ok(_) => Bytes::from_static(b"+ACK"),
        Err(error) if error.code == 503 => {
            if let Ok(mut awaiting) = origin.awaiting.lock() {
                awaiting.insert(origin.sequence);
            }
            Bytes::from(format!("-NAK {{\"delay\":{}}}", NAK_DELAY.as_nanos()))
        }
        Err(error) => {
            let rejection = rejection(origin, error);
            if let Err(err) = client
                .publish_with_headers(origin.rejected.clone(), error.headers(), rejection)
                .await
            {
                tracing::warn!(error = %err, "could not publish a rejection");
            }
            Metrics::count(&metrics.rejected_total, 1);
            Bytes::from_static(b"+TERM")
        }
    };
    if let Err(err) = client.publish(reply.subject.clone(), settlement).await {
        tracing::warn!(error = %err, "could not settle an intake message");
    }
    metrics.record_reply(reply.endpoint, reply.received.elapsed(), result.err());
}

/// What `<prefix>.rejected` carries: the error as a reply would, plus where it came from.
fn rejection(origin: &StreamOrigin, error: &ApiError) -> Bytes {
    #[derive(Serialize)]
    struct Rejection<'a> {
        error: Inner<'a>,
        subject: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        sched_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        nats_msg_id: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Inner<'a> {
        code: u16,
        description: &'a str,
    }
    let rejection = Rejection {
        error: Inner {
            code: error.code,
            description: &error.description,
        },
        subject: &origin.subject,
        sched_id: origin.sched_id.as_deref(),
        nats_msg_id: origin.msg_id.as_deref(),
    };
    serde_json::to_vec(&rejection)
        .expect("plain struct serializes")
        .into()
}
