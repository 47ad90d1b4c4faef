//! Core intake: turns requests on `<prefix>.add.<target>` into [`StoreCommand::Add`]s.
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
use crate::policy::Policy;
use crate::protocol::ApiError;
use crate::replies::{self, Reply};

use super::Requests;

/// How long a shutdown waits to unsubscribe and serve what the server had already sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Subscriptions of the intake, made before the daemon reports itself ready.
pub struct Intake {
    client: Client,
    requests: Requests,
    metrics: Arc<Metrics>,
    /// `<prefix>.add.>`; `None` when the requests come through the JetStream intake stream.
    adds: Option<Subscriber>,
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
    /// `[recurring] min_interval`.
    pub min_interval: std::time::Duration,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    /// Whether to take requests on `<prefix>.add.>` here (core mode) or leave them to the
    /// JetStream intake stream (then only `<prefix>.add`, never valid, is answered here).
    pub core_requests: bool,
}

impl Intake {
    pub async fn subscribe(
        options: IntakeOptions<'_>,
    ) -> Result<Intake, async_nats::SubscribeError> {
        let client = options.client.clone();
        let prefix = options.prefix;
        let adds = match options.core_requests {
            true => Some(client.subscribe(format!("{prefix}.add.>")).await?),
            false => None,
        };
        let bare = client.subscribe(format!("{prefix}.add")).await?;
        Ok(Intake {
            requests: Requests::new(&options),
            metrics: options.metrics,
            client,
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
                Some(message) = next_add(&mut self.adds) => self.handle(message, &store).await,
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
            if let Some(mut adds) = self.adds.take()
                && adds.drain().await.is_ok()
            {
                while let Some(message) = adds.next().await {
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
        match self.requests.schedule_of(&message, crate::time::now_ms()) {
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
            None => self.metrics.record_unanswered(error.code),
        }
    }
}

/// The next request on `<prefix>.add.>`; never, when those go to the intake stream.
async fn next_add(adds: &mut Option<Subscriber>) -> Option<Message> {
    match adds {
        Some(adds) => adds.next().await,
        None => std::future::pending().await,
    }
}
