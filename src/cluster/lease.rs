//! The lease: which instance serves a prefix.
//!
//! One key, `leader`, in a JetStream KV bucket with history 1 and `max_age` equal to the
//! lease. An instance takes the lease with `create` (refused while the key exists) and keeps
//! it by `update` with the revision it last wrote, every third of the lease: a failed
//! compare-and-set means another instance holds it now. A holder that dies stops renewing and
//! its key ages out on the server after `max_age`; the others try `create` every
//! [`RETRY`], so one of them takes over within the lease plus that. A holder that stops
//! cleanly deletes the key (with its revision), and the next one takes over at once.
//!
//! **Time.** The key ages on the server's clock from when the server stored the last update;
//! the holder counts its lease on its own monotonic clock from *before* it sent that update,
//! so the server's count starts later than the holder's. The holder gives up serving
//! [`margin`] (a fifth of the lease, 1 s for 5 s) before its own count ends, when renewals
//! failed meanwhile. Two instances can serve at once only if the holder's clock runs slower
//! than the server's by more than that margin over one lease (20 %), or a process pause
//! (SIGSTOP, a VM stall) outlasts the lease, or the server's wall clock (on a replicated
//! bucket, that of whichever server leads it, which may change) steps forward by more than
//! the margin; the pause is what the replicated log's fencing is for.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::holder::Holder;

/// The key the holder writes.
const KEY: &str = "leader";
/// How often an instance waiting for the lease tries to take it.
pub(crate) const RETRY: Duration = Duration::from_millis(250);
/// How long one request to the bucket may take when no deadline is nearer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the lease bucket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Retried: JetStream may be starting, or another instance creating the bucket.
    #[error("cannot open the lease bucket {bucket:?}: {reason}")]
    Bucket { bucket: String, reason: String },
    /// Replicated mode needs JetStream.
    #[error("replicated mode needs JetStream, and the NATS server has none")]
    NoJetStream,
    /// The bucket exists and cannot hold a lease.
    #[error("the lease bucket {bucket:?} cannot be used: {reason}")]
    Unfit { bucket: String, reason: String },
}

/// How long before its own count of the lease ends a holder stops serving.
pub(crate) fn margin(lease: Duration) -> Duration {
    lease / 5
}

/// Opens the lease bucket `name`, creating it with `lease` as its `max_age` if absent.
/// Returns the bucket and the lease it really has: an existing bucket keeps its own
/// `max_age` (an instance configured differently follows the bucket, and says so).
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    lease: Duration,
    replicas: usize,
) -> Result<(kv::Store, Duration), LeaseError> {
    let failed = |reason: String| LeaseError::Bucket {
        bucket: name.to_owned(),
        reason,
    };
    let store = match js.get_key_value(name).await {
        Ok(store) => store,
        Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            let config = kv::Config {
                bucket: name.to_owned(),
                description: "natsched: which instance serves the prefix".to_owned(),
                history: 1,
                max_age: lease,
                num_replicas: replicas,
                ..Default::default()
            };
            js.create_key_value(config)
                .await
                .map_err(|e| failed(e.to_string()))?
        }
        Err(err) => return Err(failed(err.to_string())),
    };
    let actual = store
        .status()
        .await
        .map_err(|e| failed(e.to_string()))?
        .max_age();
    if actual.is_zero() {
        return Err(LeaseError::Unfit {
            bucket: name.to_owned(),
            reason: "it has no max_age, so a dead holder's lease would never end".into(),
        });
    }
    if actual != lease {
        tracing::warn!(
            bucket = name,
            configured = ?lease,
            bucket_max_age = ?actual,
            "the lease bucket exists with another max_age; following the bucket"
        );
    }
    Ok((store, actual))
}

/// A lease held by this process.
pub(crate) struct Lease {
    bucket: kv::Store,
    me: Holder,
    /// The revision of the key this process last wrote.
    revision: u64,
    /// When the last successful write was sent (its lease counts from there).
    renewed_at: Instant,
    lease: Duration,
}

/// What [`acquire`] reports while it waits.
pub(crate) trait Waiting {
    /// Another instance holds the lease: `shown` names it (escaped), or says why its value
    /// cannot be read.
    fn held_by(&mut self, shown: &str);
}

/// Takes the lease, waiting as long as another instance holds it.
pub(crate) async fn acquire(
    bucket: kv::Store,
    me: Holder,
    lease: Duration,
    waiting: &mut impl Waiting,
) -> Lease {
    let value = me.encode();
    let mut last_error = None::<String>;
    loop {
        if let Some((revision, sent)) =
            try_take(&bucket, &me, &value, &mut last_error, waiting).await
        {
            return Lease {
                bucket,
                me,
                revision,
                renewed_at: sent,
                lease,
            };
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One attempt to take the lease: the revision written and when it was sent, if taken.
async fn try_take(
    bucket: &kv::Store,
    me: &Holder,
    value: &bytes::Bytes,
    last_error: &mut Option<String>,
    waiting: &mut impl Waiting,
) -> Option<(u64, Instant)> {
    let sent = Instant::now();
    let attempt = tokio::time::timeout(REQUEST_TIMEOUT, bucket.create(KEY, value.clone()));
    match attempt.await {
        Ok(Ok(revision)) => return Some((revision, sent)),
        Ok(Err(err)) if err.kind() == kv::CreateErrorKind::AlreadyExists => *last_error = None,
        failed => {
            let error = match failed {
                Ok(Err(err)) => err.to_string(),
                _ => "timed out".to_owned(),
            };
            if last_error.as_ref() != Some(&error) {
                tracing::warn!(%error, "cannot take the lease yet; retrying");
            }
            *last_error = Some(error);
            return None;
        }
    }
    let entry = tokio::time::timeout(REQUEST_TIMEOUT, bucket.entry(KEY)).await;
    // (A delete marker: the holder just gave it back; `create` takes it next.)
    let Ok(Ok(Some(entry))) = entry else {
        return None;
    };
    if entry.operation != kv::Operation::Put {
        return None;
    }
    match Holder::decode(&entry.value) {
        Ok(holder) if me.same_store(&holder) => {
            // This store's previous process died holding it: take it over.
            let sent = Instant::now();
            let update = bucket.update(KEY, value.clone(), entry.revision);
            let Ok(Ok(revision)) = tokio::time::timeout(REQUEST_TIMEOUT, update).await else {
                return None;
            };
            tracing::info!(
                previous_pid = holder.pid,
                "took over the lease this store's previous process held"
            );
            Some((revision, sent))
        }
        Ok(holder) => {
            waiting.held_by(&holder.describe());
            None
        }
        Err(shown) => {
            waiting.held_by(&shown);
            None
        }
    }
}

impl Lease {
    /// The holder's value: this process.
    pub fn holder(&self) -> bytes::Bytes {
        self.me.encode()
    }

    /// Renews the lease until `stop` (then gives it back) or until it is lost: another
    /// instance took it, or renewals failed until [`margin`] before it would end. Then
    /// `lost` is cancelled and this returns.
    pub async fn keep(mut self, lost: CancellationToken, stop: CancellationToken) {
        let value = self.me.encode();
        let mut retry_at = None;
        loop {
            let deadline = self.renewed_at + self.lease - margin(self.lease);
            let next = retry_at
                .unwrap_or(self.renewed_at + self.lease / 3)
                .min(deadline);
            tokio::select! {
                () = stop.cancelled() => return self.release().await,
                () = tokio::time::sleep_until(next) => {}
            }
            let sent = Instant::now();
            if sent >= deadline {
                tracing::error!(
                    lease = ?self.lease,
                    "the lease could not be renewed in time; stopping to serve"
                );
                return lost.cancel();
            }
            let update = self.bucket.update(KEY, value.clone(), self.revision);
            match tokio::time::timeout(deadline - sent, update).await {
                Ok(Ok(revision)) => {
                    self.revision = revision;
                    self.renewed_at = sent;
                    retry_at = None;
                }
                Ok(Err(err)) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // An earlier renewal whose answer was lost may have been stored: then the
                    // key holds our own value at a newer revision, and the lease is ours.
                    if let Some(revision) = self.own_revision(&value).await {
                        self.revision = revision;
                        retry_at = Some(Instant::now());
                        continue;
                    }
                    tracing::error!(
                        "another instance took the lease (ours had ended); stopping to serve"
                    );
                    return lost.cancel();
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "cannot renew the lease; retrying");
                    retry_at = Some(Instant::now() + RETRY);
                }
                Err(_) => retry_at = Some(Instant::now()),
            }
        }
    }

    /// The key's revision if it holds exactly `value` (ours).
    async fn own_revision(&self, value: &[u8]) -> Option<u64> {
        let entry = tokio::time::timeout(REQUEST_TIMEOUT, self.bucket.entry(KEY)).await;
        match entry {
            Ok(Ok(Some(entry)))
                if entry.operation == kv::Operation::Put && entry.value.as_ref() == value =>
            {
                Some(entry.revision)
            }
            _ => None,
        }
    }

    /// Gives the lease back, so another instance takes over at once.
    async fn release(self) {
        let delete = self.bucket.delete_expect_revision(KEY, Some(self.revision));
        match tokio::time::timeout(REQUEST_TIMEOUT, delete).await {
            Ok(Ok(())) => tracing::info!("gave the lease back"),
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot give the lease back; it ages out"),
            Err(_) => tracing::warn!("giving the lease back timed out; it ages out"),
        }
    }
}
