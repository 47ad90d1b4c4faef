//! A follower's life: it consumes the log into its store, and when it has taken the lease it
//! catches up to the log's end and appends a `lead` entry, which fences off the old leader.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{Context, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use std::sync::Arc;
use std::time::Duration;

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
    #[error(
        "the store holds schedules but follows no log (it was used in standalone mode): start \
         replicated mode on an empty store (moving schedules between modes takes export and \
         import, not built yet)"
    )]
    StandaloneStore,
    #[error(
        "the store was filled from another log than {stream:?} (it was deleted and made \
         again?): refusing to mix them; move the store away to start it afresh from this log"
    )]
    OtherLog { stream: String },
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
        // The log's identity: its name and creation time (a log made again is another log).
        let info = stream.cached_info();
        let id = format!(
            "{} {}",
            info.config.name,
            info.created.unix_timestamp_nanos()
        );
        let name = options.stream.clone();
        let applier = tokio::task::spawn_blocking(move || {
            match store.log_id()? {
                Some(known) if known == id.as_bytes() => {}
                // Nothing applied yet: nothing to mix, the store follows the log as it is now.
                // (nats-server 2.9 can answer two racing creates of a new stream with different
                // creation times, and keeps only one of them.)
                Some(_) if store.log_applied()? == 0 => store.set_log_id(id.as_bytes())?,
                Some(_) => return Err(FollowError::OtherLog { stream: name }),
                None if store.replicated_after(&[], 1)?.is_some() => {
                    return Err(FollowError::StandaloneStore);
                }
                None => store.set_log_id(id.as_bytes())?,
            }
            Ok(Applier::new(store)?)
        });
        let applier = applier
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
/// compacted away. Returns the applier and the log's first sequence.
async fn start_over_if_compacted(
    mut applier: Applier,
    stream: &stream::Stream,
) -> Result<(Applier, u64), Retry> {
    let mut stream = stream.clone();
    let first = match stream.info().await {
        Ok(info) => info.state.first_sequence,
        Err(err) => return Err(Retry::Later(applier, err.to_string())),
    };
    if applier.next() >= first {
        return Ok((applier, first));
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
    match restarted.await {
        Ok(Ok(applier)) => Ok((applier, first)),
        Ok(Err(err)) => Err(Retry::Never(err.into())),
        Err(err) => Err(Retry::Never(FollowError::Read(err.to_string()))),
    }
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
    let mut caught_up = false;
    // A gap just met: an error unless compaction explains it.
    let mut gap: Option<ApplyError> = None;
    loop {
        // Nobody waits for this follower any more (start-up gave up): let its store go.
        if stop_at.has_changed().is_err() {
            return Ok(applier);
        }
        if stop_at.borrow().is_some_and(|end| applier.read() >= end) {
            return Ok(applier);
        }
        let before = applier.next();
        let opened = match start_over_if_compacted(applier, &stream).await {
            Ok((back, first)) => {
                applier = back;
                match open_consumer(&stream, applier.next()).await {
                    Ok(messages) => Some(messages),
                    Err(error) => {
                        tracing::warn!(%error, first, "cannot read the log; retrying");
                        None
                    }
                }
            }
            Err(Retry::Later(back, error)) => {
                applier = back;
                tracing::warn!(%error, "cannot read the log; retrying");
                None
            }
            Err(Retry::Never(err)) => return Err(err),
        };
        if let Some(gap) = gap.take()
            && applier.next() == before
        {
            return Err(gap.into());
        }
        let Some(mut messages) = opened else {
            tokio::time::sleep(READ_RETRY).await;
            continue;
        };
        // A store that has applied the whole log gets no message to say so (a follower
        // restarted while the log is quiet): ask the log where it ends.
        if !caught_up
            && let Ok(last) = last_sequence(&mut stream.clone()).await
            && applier.read() >= last
        {
            metrics.set_log_lag(0);
            caught_up = reached_the_end(last);
        }
        loop {
            if stop_at.borrow().is_some_and(|end| applier.read() >= end) {
                return Ok(applier);
            }
            let message = tokio::select! {
                message = messages.next() => message,
                changed = stop_at.changed() => {
                    if changed.is_err() {
                        return Ok(applier);
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
            let Ok(info) = message.info() else {
                tracing::warn!("a log message without its stream sequence; reading on");
                break;
            };
            let (seq, lag) = (info.stream_sequence, info.pending);
            let payload = message.payload.clone();
            let applied = tokio::task::spawn_blocking(move || {
                let result = applier.apply(seq, &payload);
                (applier, result)
            });
            let (back, result) = applied
                .await
                .map_err(|e| FollowError::Read(e.to_string()))?;
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
                caught_up = reached_the_end(seq);
            }
        }
    }
}

/// Says that the follower has read the log up to its end, `seq`; returns `true`.
fn reached_the_end(seq: u64) -> bool {
    tracing::info!(log_sequence = seq, "caught up with the replicated log");
    crate::systemd::ready("following the replicated log, caught up");
    true
}

/// How long a follower waits before reading the log again after NATS failed it.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Why following could not go on now.
enum Retry {
    /// NATS failed (a node restarting, a reconnect): try again shortly.
    Later(Applier, String),
    /// The store failed.
    Never(FollowError),
}

/// An ordered consumer of the log from `start`.
async fn open_consumer(stream: &stream::Stream, start: u64) -> Result<pull::Ordered, String> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}
