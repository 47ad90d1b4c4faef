//! The log stream, and appending to it with fencing.
//!
//! The log is one JetStream stream with one subject. Only one writer can extend it: every
//! append carries `Nats-Expected-Last-Sequence`, the sequence the writer believes is last,
//! and the parts of a round go one at a time (see [`Appender::append`]). Once a new leader has appended its
//! `lead` entry, the old leader's next append is refused by the server: it learns it was
//! deposed, refuses the round (503) and steps down. Nothing it acknowledged is missing from
//! the log, because it acknowledges a round only after the round's PubAcks.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, StorageType};
use bytes::Bytes;

/// How long a round's PubAcks may take before the leader gives up on the round and steps
/// down (it cannot tell whether the round is in the log: reading it back as a follower tells).
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the log stream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log stream {stream:?}: {reason}")]
    Stream { stream: String, reason: String },
}

/// Why an append failed. Either way the round is not acknowledged and the leader steps down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("another leader appended to the log (it expected sequence {expected} to be last)")]
    Deposed { expected: u64 },
    #[error("cannot append to the log: {0}")]
    Failed(String),
}

/// What the log stream is called and where it is.
#[derive(Debug, Clone)]
pub(crate) struct LogOptions {
    pub stream: String,
    pub subject: String,
    pub replicas: usize,
}

/// Gets the log stream, creating it if absent: file storage, limits retention, nothing
/// expires (compaction purges it, see `compaction.rs`).
pub(crate) async fn open(js: &Context, options: &LogOptions) -> Result<stream::Stream, LogError> {
    let config = stream::Config {
        name: options.stream.clone(),
        description: Some("natsched: the replicated log of a prefix".to_owned()),
        subjects: vec![options.subject.clone()],
        storage: StorageType::File,
        num_replicas: options.replicas,
        ..Default::default()
    };
    let failed = |reason: String| LogError::Stream {
        stream: options.stream.clone(),
        reason,
    };
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let subjects = &stream.cached_info().config.subjects;
    if subjects != std::slice::from_ref(&options.subject) {
        return Err(failed(format!(
            "its subjects are {subjects:?}, not just {:?}",
            options.subject
        )));
    }
    Ok(stream)
}

/// Appends to the log as its only writer.
pub(crate) struct Appender {
    js: Context,
    subject: String,
    /// The log's last sequence, as this writer believes.
    last: u64,
}

impl Appender {
    /// A writer that believes `last` is the log's last sequence (what it read to the end).
    pub fn new(js: Context, subject: String, last: u64) -> Appender {
        Appender { js, subject, last }
    }

    /// Appends `bodies` in order; returns the sequence of the last one once the log has all.
    ///
    /// One at a time: were the parts of a round pipelined, a deposed writer's first part could
    /// be refused and a later one (expecting the sequence the new leader's `lead` entry took)
    /// accepted after it, leaving a stray part in the log. Rounds of more than one part (over
    /// the server's `max_payload`) are rare, so waiting costs little.
    pub async fn append(&mut self, bodies: Vec<Bytes>) -> Result<u64, AppendError> {
        for body in bodies {
            let expected = self.last;
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                expected.to_string().as_str(),
            );
            let acked = async {
                let ack = self
                    .js
                    .publish_with_headers(self.subject.clone(), headers, body)
                    .await
                    .map_err(|e| AppendError::Failed(e.to_string()))?;
                match ack.await {
                    Ok(ack) if ack.sequence == expected + 1 => Ok(()),
                    Ok(ack) => Err(AppendError::Failed(format!(
                        "the log took an entry at sequence {}, expected {}",
                        ack.sequence,
                        expected + 1
                    ))),
                    Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                        Err(AppendError::Deposed { expected })
                    }
                    Err(err) => Err(AppendError::Failed(err.to_string())),
                }
            };
            match tokio::time::timeout(APPEND_TIMEOUT, acked).await {
                Ok(Ok(())) => self.last = expected + 1,
                Ok(Err(err)) => return Err(err),
                Err(_) => return Err(AppendError::Failed("no PubAck in time".to_owned())),
            }
        }
        Ok(self.last)
    }
}

/// The store writer's side of the log: appends each batch before the store applies it, and
/// keeps the log compacted (see `compaction.rs`).
pub struct Replication {
    appender: Appender,
    stream: stream::Stream,
    runtime: tokio::runtime::Handle,
    /// Cancelled when an append failed: this instance must stop leading.
    deposed: tokio_util::sync::CancellationToken,
    /// Largest message body (the server's `max_payload` less room for headers).
    max_message: usize,
    compaction: super::compaction::Compaction,
    /// Whether rounds are also fsynced locally (`[cluster] fsync`).
    fsync: bool,
}

impl Replication {
    pub(crate) fn new(
        appender: Appender,
        stream: stream::Stream,
        deposed: tokio_util::sync::CancellationToken,
        max_payload: usize,
        slack_bytes: u64,
        fsync: bool,
    ) -> Replication {
        Replication {
            appender,
            stream,
            runtime: tokio::runtime::Handle::current(),
            deposed,
            max_message: max_payload.saturating_sub(1024).max(1024),
            compaction: super::compaction::Compaction::new(slack_bytes),
            fsync,
        }
    }

    /// Whether rounds are also fsynced locally before they are acknowledged.
    pub(crate) fn fsync(&self) -> bool {
        self.fsync
    }

    /// Appends `batch`'s replicated changes as one round; returns the sequences of its first
    /// and last parts. Blocks the calling (non-runtime) thread until the log has all of it.
    /// On error this instance is done leading: `deposed` is cancelled.
    pub(crate) fn append(
        &mut self,
        batch: &crate::store::WriteBatch,
    ) -> Result<(u64, u64), AppendError> {
        let changes = batch
            .changes()
            .iter()
            .filter(|(key, _)| !crate::store::is_local_key(key));
        let bodies = super::entry::encode_round(changes, self.max_message);
        let parts = bodies.len() as u64;
        let result = self.runtime.block_on(self.appender.append(bodies));
        if result.is_err() {
            self.deposed.cancel();
        }
        result.map(|last| (last + 1 - parts, last))
    }

    /// Ends this instance's leadership: the store failed.
    pub(crate) fn step_down(&self) {
        self.deposed.cancel();
    }

    /// Does the next step of compacting the log, if one is due (see `compaction.rs`).
    pub(crate) fn compact(
        &mut self,
        store: &crate::store::Store,
    ) -> Result<(), crate::store::StoreError> {
        let mut compaction = std::mem::take(&mut self.compaction);
        let result = compaction.step(self, store);
        self.compaction = compaction;
        result
    }

    /// The log stream's size in bytes.
    pub(crate) fn log_bytes(&mut self) -> Result<u64, String> {
        let info = self.runtime.block_on(self.stream.info());
        Ok(info.map_err(|e| e.to_string())?.state.bytes)
    }

    /// Removes every entry below `seq` from the log.
    pub(crate) fn purge_below(&mut self, seq: u64) -> Result<u64, String> {
        let purge = self
            .runtime
            .block_on(self.stream.purge().sequence(seq).into_future());
        purge.map(|p| p.purged).map_err(|e| e.to_string())
    }
}
