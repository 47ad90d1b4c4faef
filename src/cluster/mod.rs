//! Instances serving one prefix: who serves, and (in replicated mode) how the others keep a
//! copy of its store.
//!
//! # One writer per prefix
//!
//! Every instance of a prefix, in every mode, first takes the prefix's *lease*: a key in a
//! JetStream KV bucket (see `lease.rs`). Only the holder subscribes to the request subjects
//! and fires schedules; a second instance logs an error naming the holder and waits without
//! subscribing, taking over when the holder stops (at once) or dies (when its lease ages
//! out). The holder renews the lease every third of `[cluster] lease`, and stops serving when
//! another instance took it or it could not renew it in time. On a server without JetStream
//! the lease cannot exist: natsched serves anyway and warns that a second instance would not
//! be noticed.
//!
//! A holder that died is recognised by its successor on the same store (same store id,
//! directory and host): a restarted natsched takes its own lease over at once instead of
//! waiting for it to age out.
//!
//! # Replicated mode
//!
//! With `[cluster] mode = "replicated"` the lease holder is the *leader* and the others are
//! *followers*, each with its own store, kept as a hot copy through a *log*: a JetStream
//! stream (`[cluster] log_stream`, R3 on a cluster) of the leader's store changes.
//!
//! ```text
//!  leader:   round ──▶ append to the log ──(PubAck)──▶ apply to sled ──▶ wheel, acks
//!  follower: log ──▶ apply to sled (with the entry's sequence, one batch)
//! ```
//!
//! * **The log is physical** (`entry.rs`): a round is logged as the key changes its
//!   `WriteBatch` makes, so a follower's store is the leader's byte for byte (generated ids
//!   name their segments, counts and the intake mark carry over). One round is one entry, cut
//!   into parts only when larger than the server's `max_payload`.
//! * **Durability is the log's**: the leader acknowledges a round only after the log's
//!   PubAck, and applies it to its own store only then, so its store never holds anything
//!   the log lacks. No local fsync is needed; a crashed instance re-reads the log from the
//!   last entry its store recorded.
//! * **Fencing** (`log.rs`): every append expects the log's last sequence. A new leader reads
//!   the log to its end and appends a `lead` entry (`replica.rs`); from then on the old
//!   leader's appends are refused, it answers 503, stops serving and follows again.
//! * **Followers** (`follower.rs`, `replica.rs`) apply entries in order, idempotently, with
//!   the last applied sequence in the same batch; an unfinished round before a `lead` entry
//!   is void.
//! * **Compaction** (`compaction.rs`): the leader re-appends the live state as a checkpoint
//!   and purges the log before it, so the log stays near the live data's size; a follower
//!   that fell behind a purge, or a new instance, reads the log from its first entry.
//! * **Taking over**: a follower that gets the lease catches up, appends `lead`, and starts
//!   the same pipeline as a standalone instance: overdue schedules fire first, oldest first.
//!   What the old leader had published but not yet logged as fired fires again
//!   (at-least-once; with JetStream delivery the target stream's duplicate window keeps one).

mod compaction;
mod entry;
mod follower;
mod holder;
mod lease;
mod log;
mod replica;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;

use crate::config::{ClusterMode, Config};
use crate::metrics::Metrics;

pub(crate) use lease::Lease;
pub use lease::LeaseError;
pub(crate) use log::LogOptions;
pub use log::{AppendError, LogError, Replication};
pub use replica::FollowError;
pub(crate) use replica::Follower;

use holder::Holder;

/// What an instance is doing for its prefix, as `stats` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Starting up: it does not serve yet.
    #[default]
    Starting,
    /// Serving without a lease: the server has no JetStream.
    Unguarded,
    /// Holding the lease and serving.
    Leader,
    /// Waiting for the lease another instance holds.
    Standby,
    /// Replicated mode: applying the leader's log to its own store, ready to take over.
    Follower,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Starting,
        Role::Unguarded,
        Role::Leader,
        Role::Standby,
        Role::Follower,
    ];

    /// As `stats` and the metrics show it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Unguarded => "unguarded",
            Role::Leader => "leader",
            Role::Standby => "standby",
            Role::Follower => "follower",
        }
    }
}

/// The role and the lease holder, shared with `stats` and `$SRV` discovery.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub role: Role,
    /// The instance holding the lease, as known to this one.
    pub leader: Option<String>,
    /// Replicated mode: log entries this instance has still to apply (0 for the leader).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_lag: Option<u64>,
}

/// What [`claim`] needs.
pub(crate) struct ClaimOptions<'a> {
    pub client: &'a async_nats::Client,
    pub config: &'a Config,
    /// The store's id (`Store::instance_id`).
    pub store_id: String,
    pub metrics: &'a Arc<Metrics>,
}

/// How this instance may serve.
pub(crate) enum Claimed {
    /// It holds the lease; keep it with [`Lease::keep`].
    Lease(Box<Lease>),
    /// The server has no JetStream: no lease can guard the prefix.
    Unguarded,
}

/// Takes the prefix's lease, waiting while another instance holds it.
pub(crate) async fn claim(options: ClaimOptions<'_>) -> Result<Claimed, LeaseError> {
    let ClaimOptions {
        client,
        config,
        store_id,
        metrics,
    } = options;
    let js = jetstream::new(client.clone());
    let replicated = config.cluster.mode == ClusterMode::Replicated;
    if !has_jetstream(client).await {
        if replicated {
            return Err(LeaseError::NoJetStream);
        }
        tracing::warn!(
            "the NATS server has no JetStream: no lease guards the prefix, so a second natsched \
             serving it would store and fire every schedule again undetected"
        );
        metrics.set_cluster(ClusterStatus {
            role: Role::Unguarded,
            leader: None,
            log_lag: None,
        });
        return Ok(Claimed::Unguarded);
    }
    let cluster = &config.cluster;
    let prefix = &config.api.prefix;
    let replicas = replicas(client, config);
    let name = cluster.bucket(prefix);
    let (bucket, lease) = loop {
        match lease::open_bucket(&js, &name, cluster.lease, replicas).await {
            Ok(opened) => break opened,
            Err(err @ LeaseError::Unfit { .. }) => return Err(err),
            Err(err) => {
                tracing::warn!(error = %err, "retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let me = Holder::this_process(store_id, &config.store.path, crate::time::now_ms());
    let shown = me.describe();
    let mut waiting = Standby {
        metrics,
        last: None,
        prefix,
        role: match replicated {
            true => Role::Follower,
            false => Role::Standby,
        },
    };
    let lease = lease::acquire(bucket, me, lease, &mut waiting).await;
    tracing::info!(bucket = %name, "holding the lease of the prefix");
    metrics.set_cluster(ClusterStatus {
        role: Role::Leader,
        leader: Some(shown),
        log_lag: replicated.then_some(0),
    });
    Ok(Claimed::Lease(Box::new(lease)))
}

/// Replicas of the lease bucket and the log: as configured, else 3 on a NATS cluster and 1
/// on a single server.
pub(crate) fn replicas(client: &async_nats::Client, config: &Config) -> usize {
    config
        .cluster
        .replicas
        .unwrap_or(match client.server_info().cluster {
            Some(_) => 3,
            None => 1,
        })
}

/// The log of `config`'s prefix.
pub(crate) fn log_options(client: &async_nats::Client, config: &Config) -> LogOptions {
    let prefix = &config.api.prefix;
    LogOptions {
        stream: config.cluster.log_stream(prefix),
        subject: config.cluster.log_subject(prefix),
        replicas: replicas(client, config),
    }
}

/// Whether the account has JetStream; waits while the server cannot tell. (Asked directly:
/// async-nats's account info does not parse the answer of nats-server 2.9.)
async fn has_jetstream(client: &async_nats::Client) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<AnswerError>,
    }
    #[derive(serde::Deserialize)]
    struct AnswerError {
        err_code: Option<u64>,
    }
    /// "JetStream not enabled", "JetStream not enabled for account".
    const NOT_ENABLED: [u64; 2] = [10076, 10039];
    loop {
        let request = client.request("$JS.API.INFO", bytes::Bytes::new());
        let failure = match tokio::time::timeout(Duration::from_secs(5), request).await {
            Ok(Ok(reply)) => match serde_json::from_slice::<Answer>(&reply.payload) {
                Ok(Answer { error: None }) => return true,
                Ok(Answer {
                    error:
                        Some(AnswerError {
                            err_code: Some(code),
                        }),
                }) if NOT_ENABLED.contains(&code) => return false,
                _ => format!(
                    "unexpected answer {:?}",
                    String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(200)])
                ),
            },
            Ok(Err(err)) if err.kind() == async_nats::RequestErrorKind::NoResponders => {
                return false;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(error = %failure, "cannot ask the server about JetStream; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reports the holder while waiting: an error each time it changes.
struct Standby<'a> {
    metrics: &'a Metrics,
    last: Option<String>,
    prefix: &'a str,
    role: Role,
}

impl lease::Waiting for Standby<'_> {
    fn held_by(&mut self, shown: &str) {
        if self.last.as_deref() == Some(shown) {
            return;
        }
        match self.role {
            Role::Follower => tracing::info!(
                prefix = %self.prefix,
                leader = %shown,
                "following the leader of this prefix"
            ),
            _ => tracing::error!(
                prefix = %self.prefix,
                holder = %shown,
                "another natsched serves this prefix; waiting for its lease without serving"
            ),
        }
        self.last = Some(shown.to_owned());
        match self.role {
            // Ready once caught up (see `replica`).
            Role::Follower => crate::systemd::status(&format!("following {shown}")),
            // Of use as it is: it takes over when the holder goes.
            _ => crate::systemd::ready(&format!(
                "standby: {shown} serves prefix {:?}; waiting for its lease",
                self.prefix
            )),
        }
        let log_lag = self.metrics.cluster().log_lag;
        self.metrics.set_cluster(ClusterStatus {
            role: self.role,
            leader: Some(shown.to_owned()),
            log_lag,
        });
    }
}
