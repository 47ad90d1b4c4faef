//! Answers to requests, published off the store thread so an fsync never waits on the network.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Subject};
use tokio::sync::mpsc;

use bytes::Bytes;

use crate::metrics::Metrics;
use crate::protocol::ApiError;

/// The outcome of one request that asked for a reply.
#[derive(Debug)]
pub struct Ack {
    pub reply: Subject,
    /// The reply body, or why the request failed.
    pub result: Result<Bytes, ApiError>,
}

/// Publishes `error` as a micro-service error reply (and counts it).
pub async fn send_error(client: &Client, reply: Subject, error: &ApiError, metrics: &Metrics) {
    Metrics::count(&metrics.errors_total, 1);
    if let Err(err) = client
        .publish_with_headers(reply, error.headers(), error.body())
        .await
    {
        tracing::warn!(error = %err, "could not send error reply");
    }
}

/// Publishes acks as they arrive until the committer is gone, then flushes.
pub async fn run(
    client: Client,
    mut acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = acks.recv().await {
        for ack in batch {
            match ack.result {
                Ok(body) => {
                    if let Err(err) = client.publish(ack.reply, body).await {
                        tracing::warn!(error = %err, "could not send reply");
                    }
                }
                Err(error) => send_error(&client, ack.reply, &error, &metrics).await,
            }
        }
    }
    // Bounded: with NATS unreachable the flush would never complete.
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "could not flush replies"),
        Err(_) => tracing::warn!("NATS unreachable; last replies may not have been sent"),
    }
}
