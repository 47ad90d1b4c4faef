//! A follower's life: it consumes the log into its store, and when it has taken the lease it
//! catches up to the log's end and appends a `lead` entry, which fences off the old leader.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{Context, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

use super::entry;
use super::follower::{Applier, ApplyError};
use super::log::{self, AppendError, Appender, LogError, LogOptions};

/// How often taking over may find that another leader appended meanwhile before it gives up.
const LEAD_ATTEMPTS: usize = 10;

/// Why following (or taking over) failed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the log: {0}")]
    Read(String),
    #[error("cannot take over: {0}")]
    Lead(#[from] AppendError),
}

/// A store following the log.
pub(crate) struct Follower {
    metrics: Arc<Metrics>,
    js: Context,
    options: LogOptions,
    stream: stream::Stream,
    /// Tells the consuming task where to stop.
    until: watch::Sender<Option<u64>>,
    task: tokio::task::JoinHandle<Result<Applier, FollowError>>,
}

impl Follower {
    /// Opens (or creates) the log and starts applying it to `store` from where it left off.
    pub async fn start(
        store: Store,
        js: Context,
        options: LogOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Follower, FollowError> {
        let stream = log::open(&js, &options).await?;
        let applier = tokio::task::spawn_blocking(move || Applier::new(store))
            .await
            .map_err(|e| FollowError::Read(e.to_string()))??;
        tracing::info!(
            stream = %options.stream,
            from = applier.next(),
            "following the replicated log"
        );
        let (until, stop_at) = watch::channel(None);
        let task = tokio::spawn(follow(applier, stream.clone(), stop_at, metrics.clone()));
        Ok(Follower {
            metrics,
            js,
            options,
            stream,
            until,
            task,
        })
    }

    /// Completes only if following fails (it runs until asked to stop otherwise).
    pub async fn failed(&mut self) -> FollowError {
        match (&mut self.task).await {
            Ok(Err(err)) => err,
            Ok(Ok(_)) => FollowError::Read("following stopped".to_owned()),
            Err(err) => FollowError::Read(err.to_string()),
        }
    }

    /// Catches up to the log's end and appends a `lead` entry naming `holder`; returns the
    /// writer, which alone can extend the log from now on.
    pub async fn lead(self, holder: Bytes) -> Result<(Appender, stream::Stream), FollowError> {
        let Follower {
            metrics,
            js,
            options,
            mut stream,
            until,
            task,
        } = self;
        let read_error = |e: String| FollowError::Read(e);
        let mut last = last_sequence(&mut stream).await?;
        let _ = until.send(Some(last));
        let mut applier = task.await.map_err(|e| read_error(e.to_string()))??;
        let body = entry::encode_lead(&holder);
        for _ in 0..LEAD_ATTEMPTS {
            let mut appender = Appender::new(js.clone(), options.subject.clone(), last);
            match appender.append(vec![body.clone()]).await {
                Ok(seq) => {
                    let applied = tokio::task::spawn_blocking(move || {
                        let result = applier.apply(seq, &body);
                        result.map(|()| applier)
                    });
                    applied.await.map_err(|e| read_error(e.to_string()))??;
                    tracing::info!(log_sequence = seq, "leading: appended the lead entry");
                    return Ok((appender, stream));
                }
                Err(AppendError::Deposed { .. }) => {
                    // The old leader appended after we read the end: read on.
                    last = last_sequence(&mut stream).await?;
                    let (_until, stop_at) = watch::channel(Some(last));
                    applier = follow(applier, stream.clone(), stop_at, metrics.clone()).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Err(FollowError::Read(format!(
            "the log kept growing under another writer for {LEAD_ATTEMPTS} attempts"
        )))
    }
}

/// Empties the store to read the log from its start, when the entries it needs next were
/// compacted away. A gap that compaction does not explain is an error.
async fn start_over_if_compacted(
    mut applier: Applier,
    stream: &stream::Stream,
) -> Result<Applier, FollowError> {
    let mut stream = stream.clone();
    let first = stream
        .info()
        .await
        .map_err(|e| FollowError::Read(e.to_string()))?
        .state
        .first_sequence;
    if applier.next() >= first {
        return Ok(applier);
    }
    tracing::warn!(
        next = applier.next(),
        first,
        "the log was compacted past this store; reading it again from its first entry"
    );
    let restarted = tokio::task::spawn_blocking(move || {
        let result = applier.start_over_at(first);
        result.map(|()| applier)
    });
    Ok(restarted
        .await
        .map_err(|e| FollowError::Read(e.to_string()))??)
}

async fn last_sequence(stream: &mut stream::Stream) -> Result<u64, FollowError> {
    let info = stream
        .info()
        .await
        .map_err(|e| FollowError::Read(e.to_string()))?;
    Ok(info.state.last_sequence)
}

/// Applies the log from where `applier` is until `stop_at` names a sequence it has read (or
/// forever). An ordered consumer delivers every entry once, in order, and is made anew when
/// the connection hiccups.
async fn follow(
    mut applier: Applier,
    stream: stream::Stream,
    mut stop_at: watch::Receiver<Option<u64>>,
    metrics: Arc<Metrics>,
) -> Result<Applier, FollowError> {
    let read_error = |e: String| FollowError::Read(e);
    let mut caught_up = false;
    // A gap just met: an error unless compaction explains it.
    let mut gap: Option<ApplyError> = None;
    loop {
        if stop_at.borrow().is_some_and(|end| applier.read() >= end) {
            return Ok(applier);
        }
        let before = applier.next();
        applier = start_over_if_compacted(applier, &stream).await?;
        if let Some(gap) = gap.take()
            && applier.next() == before
        {
            return Err(gap.into());
        }
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: applier.next(),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| read_error(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| read_error(e.to_string()))?;
        loop {
            if stop_at.borrow().is_some_and(|end| applier.read() >= end) {
                return Ok(applier);
            }
            let message = tokio::select! {
                message = messages.next() => message,
                changed = stop_at.changed() => {
                    if changed.is_err() {
                        // Nobody will say where to stop: follow on.
                        std::future::pending::<()>().await;
                    }
                    continue;
                }
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "reading the log failed; reading on");
                    break;
                }
                None => break,
            };
            let info = message.info().map_err(|e| read_error(e.to_string()))?;
            let (seq, lag) = (info.stream_sequence, info.pending);
            let payload = message.payload.clone();
            let applied = tokio::task::spawn_blocking(move || {
                let result = applier.apply(seq, &payload);
                (applier, result)
            });
            let (back, result) = applied.await.map_err(|e| read_error(e.to_string()))?;
            applier = back;
            match result {
                // Compacted past this store while it read: start over from the log's start.
                Err(err @ ApplyError::Gap { .. }) => {
                    gap = Some(err);
                    break;
                }
                result => result?,
            }
            metrics.set_log_lag(lag);
            if lag == 0 && !caught_up {
                caught_up = true;
                tracing::info!(log_sequence = seq, "caught up with the replicated log");
            }
        }
    }
}
