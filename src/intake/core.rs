//! Intake: turns requests on `<prefix>.add.<target>` into [`StoreCommand::Add`]s.
//!
//! Malformed requests are answered here at once and never reach the store. Well-formed ones are
//! handed to the committer, which acknowledges them after they are durable. The committer's queue
//! is bounded, so a flood of requests slows intake down instead of growing memory.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, Subscriber};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::committer::StoreCommand;
use crate::metrics::{Endpoint, Metrics};
use crate::policy::{Policy, PolicyError};
use crate::protocol::{self, AddLimits, ApiError};
use crate::replies::{self, Reply};
use crate::time;

/// How long a shutdown waits to unsubscribe and serve what the server had already sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Subscriptions of the intake, made before the daemon reports itself ready.
pub struct Intake {
    client: Client,
    /// `<prefix>.add.`: stripped from a request's subject to leave its target.
    add_prefix: String,
    /// `api.max_payload`.
    max_payload: usize,
    /// What may be scheduled: targets, header size, horizon.
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
    adds: Subscriber,
    /// `<prefix>.add` with no target: only ever answered with an error.
    bare: Subscriber,
}

/// What [`Intake::subscribe`] needs.
pub struct IntakeOptions<'a> {
    pub client: Client,
    /// `api.prefix`.
    pub prefix: &'a str,
    /// `api.max_payload`.
    pub max_payload: usize,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
}

impl Intake {
    pub async fn subscribe(
        options: IntakeOptions<'_>,
    ) -> Result<Intake, async_nats::SubscribeError> {
        let IntakeOptions {
            client,
            prefix,
            max_payload,
            policy,
            metrics,
        } = options;
        let adds = client.subscribe(format!("{prefix}.add.>")).await?;
        let bare = client.subscribe(format!("{prefix}.add")).await?;
        Ok(Intake {
            client,
            add_prefix: format!("{prefix}.add."),
            max_payload,
            policy,
            metrics,
            adds,
            bare,
        })
    }

    /// Serves requests until `shutdown`; then unsubscribes and still serves what the server had
    /// already delivered, so no request that reached natsched goes unanswered.
    pub async fn run(
        mut self,
        store: tokio::sync::mpsc::Sender<StoreCommand>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(message) = self.adds.next() => self.handle(message, &store).await,
                Some(message) = self.bare.next() => {
                    self.refuse(message, ApiError::bad_request("empty target subject")).await;
                }
                else => break,
            }
        }
        // Bounded: with NATS unreachable the client stops taking commands once its queue is
        // full, the drain is never confirmed and the stream never ends. A request cut off here
        // was not acknowledged, so its sender knows to retry.
        let serve_rest = async {
            let _ = self.bare.unsubscribe().await;
            if self.adds.drain().await.is_ok() {
                while let Some(message) = self.adds.next().await {
                    self.handle(message, &store).await;
                }
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, serve_rest)
            .await
            .is_err()
        {
            tracing::warn!("NATS did not confirm the unsubscribe in time; intake stopped anyway");
        }
    }

    async fn handle(&self, message: Message, store: &tokio::sync::mpsc::Sender<StoreCommand>) {
        if message.sanitized {
            // What the client library had to repair cannot be stored or delivered verbatim.
            let error = ApiError::bad_request(
                "the request is not valid NATS protocol text: invalid UTF-8 in its subject \
                 or headers, a bare CR or LF in a header, or a header line without a colon",
            );
            self.refuse(message, error).await;
            return;
        }
        let target = message
            .subject
            .strip_prefix(self.add_prefix.as_str())
            .unwrap_or_default();
        let now = time::now_ms();
        let parsed = protocol::parse_add(
            target,
            message.headers.as_ref(),
            message.payload.clone(),
            now,
            AddLimits {
                max_payload: self.max_payload,
                // Read per request: it is the server's, and can change on reconnect.
                server_max_payload: self.client.max_payload(),
            },
        )
        .and_then(|schedule| match self.policy.admit(&schedule, now) {
            Ok(()) => Ok(schedule),
            Err(refused) => {
                if matches!(
                    refused,
                    PolicyError::Denied { .. } | PolicyError::NotAllowed { .. }
                ) {
                    Metrics::count(&self.metrics.denied_total, 1);
                }
                Err(ApiError::from(refused))
            }
        });
        match parsed {
            Ok(schedule) => {
                let add = StoreCommand::Add {
                    schedule,
                    reply: Reply::to(&message, Endpoint::Add),
                };
                if store.send(add).await.is_err() {
                    tracing::error!("store writer is gone; request dropped unacknowledged");
                }
            }
            Err(error) => {
                tracing::debug!(subject = ?message.subject, %error, "refused schedule request");
                self.refuse(message, error).await;
            }
        }
    }

    async fn refuse(&self, message: Message, error: ApiError) {
        match Reply::to(&message, Endpoint::Add) {
            Some(reply) => replies::answer(&self.client, reply, Err(error), &self.metrics).await,
            None => Metrics::count(&self.metrics.errors_total, 1),
        }
    }
}
