//! Publishing due schedules to their target subjects.
//!
//! A batch is published, the client is flushed, and only then are the schedules' keys sent to
//! the committer for deletion. A crash between publish and delete therefore means a second
//! delivery after restart, never a lost one (at-least-once). While NATS is unreachable the
//! flush does not complete; the batch waits, and is published again if the client reports the
//! flush failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use tokio::sync::mpsc;

use crate::committer::StoreCommand;
use crate::protocol;
use crate::record::Schedule;
use crate::store::DueKey;
use crate::time;

/// Most schedules published per flush.
const MAX_BATCH: usize = 4096;
/// How long a flush may take before it is reported (it keeps waiting).
const SLOW_FLUSH: Duration = Duration::from_secs(5);
/// Pause before publishing a batch again after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The message a schedule is delivered as: its own headers plus `Sched-Id` and `Sched-Due`.
pub fn delivery_headers(schedule: &Schedule) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &schedule.headers {
        headers.append(name.as_str(), value.as_str());
    }
    headers.insert(protocol::ID, schedule.id.as_str());
    headers.insert(protocol::DUE, time::format_ms(schedule.due).as_str());
    headers
}

/// Publishes batches from the scheduler until it is gone, then returns once every batch handed
/// over has been flushed and reported to the committer.
pub async fn run(
    client: Client,
    mut due: mpsc::UnboundedReceiver<Vec<Schedule>>,
    store: mpsc::Sender<StoreCommand>,
    resident: Arc<AtomicUsize>,
) {
    let mut batch: Vec<Schedule> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = due.recv().await {
        batch.extend(first);
        while batch.len() < MAX_BATCH {
            match due.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        publish_until_flushed(&client, &batch).await;
        let fired = batch.len();
        let keys = batch.drain(..).map(|s| DueKey::new(s.due, &s.id)).collect();
        resident.fetch_sub(fired, Ordering::Relaxed);
        tracing::trace!(fired, "published");
        if store.send(StoreCommand::Fired(keys)).await.is_err() {
            tracing::error!("store writer is gone; fired schedules will fire again after restart");
        }
    }
}

async fn publish_until_flushed(client: &Client, batch: &[Schedule]) {
    loop {
        match publish_batch(client, batch).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, count = batch.len(), "publish failed; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

async fn publish_batch(client: &Client, batch: &[Schedule]) -> Result<(), async_nats::Error> {
    let now = time::now_ms();
    for schedule in batch {
        debug_assert!(schedule.due <= now, "never early");
        client
            .publish_with_headers(
                schedule.subject.clone(),
                delivery_headers(schedule),
                schedule.payload.clone(),
            )
            .await?;
    }
    let flush = client.flush();
    tokio::pin!(flush);
    loop {
        match tokio::time::timeout(SLOW_FLUSH, &mut flush).await {
            Ok(result) => return Ok(result?),
            Err(_) => tracing::warn!(
                count = batch.len(),
                "NATS flush is slow (server unreachable?); due messages are waiting"
            ),
        }
    }
}
