//! Answers to requests. Acks of adds and cancels are published here, off the store thread, so
//! an fsync never waits on the network; every answer is counted per endpoint for `$SRV.STATS`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message, Subject};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::{Endpoint, Metrics};
use crate::protocol::ApiError;

/// Where to answer a request, and since when it waits.
#[derive(Debug)]
pub struct Reply {
    /// The reply subject of a request, or the ack subject of an intake stream message.
    pub subject: Subject,
    pub received: Instant,
    pub endpoint: Endpoint,
    pub via: Via,
}

/// How the request came.
#[derive(Debug)]
pub enum Via {
    /// A core NATS request: the answer is published to its reply subject.
    Request,
    /// A message of the JetStream intake stream: it is settled instead (see
    /// `intake/jetstream.rs`).
    Stream(Box<StreamOrigin>),
}

/// Where an intake stream message came from: for its rejection, and for the store writer to
/// know it again if it is delivered again.
#[derive(Debug)]
pub struct StreamOrigin {
    /// The subject it was published to.
    pub subject: Subject,
    pub sched_id: Option<String>,
    pub msg_id: Option<String>,
    /// `<prefix>.rejected`.
    pub rejected: Subject,
    /// The intake stream's creation time (Unix ms) and the message's sequence in it.
    pub stream_created: u64,
    pub sequence: u64,
    /// The stream's first sequence as intake last saw it: nothing below can come again.
    pub floor: u64,
    /// Where a 503 (redelivered later) is noted, for cancels to wait for it.
    pub awaiting: crate::intake::Awaiting,
}

impl Reply {
    /// The reply handle of `message`, if it asked for an answer.
    pub fn to(message: &Message, endpoint: Endpoint) -> Option<Reply> {
        Some(Reply {
            subject: message.reply.clone()?,
            received: Instant::now(),
            endpoint,
            via: Via::Request,
        })
    }
}

/// The outcome of one request that asked for a reply.
#[derive(Debug)]
pub struct Ack {
    pub reply: Reply,
    /// The reply body, or why the request failed.
    pub result: Result<Bytes, ApiError>,
}

/// Publishes a reply: the body, or `error` under the micro-service error convention; counts it.
pub async fn answer(
    client: &Client,
    reply: Reply,
    result: Result<Bytes, ApiError>,
    metrics: &Metrics,
) {
    if let Via::Stream(_) = reply.via {
        return crate::intake::settle(client, reply, result, metrics).await;
    }
    let published = match &result {
        Ok(body) => client.publish(reply.subject, body.clone()).await,
        Err(error) => {
            client
                .publish_with_headers(reply.subject, error.headers(), error.body())
                .await
        }
    };
    if let Err(err) = published {
        tracing::warn!(error = %err, "could not send reply");
    }
    metrics.record_reply(reply.endpoint, reply.received.elapsed(), result.err());
}

/// Publishes acks as they arrive until the committer is gone, then flushes.
pub async fn run(
    client: Client,
    mut acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    metrics: Arc<Metrics>,
) {
    while let Some(batch) = acks.recv().await {
        for ack in batch {
            answer(&client, ack.reply, ack.result, &metrics).await;
        }
    }
    // Bounded: with NATS unreachable the flush would never complete.
    match tokio::time::timeout(Duration::from_secs(2), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "could not flush replies"),
        Err(_) => tracing::warn!("NATS unreachable; last replies may not have been sent"),
    }
}
