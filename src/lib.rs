//! natsched: a durable scheduled-message broker for NATS.
//!
//! A service publishes a message on `sched.add.<subject>` with a `Sched-At` or `Sched-Delay`
//! header; natsched stores it durably and publishes it to `<subject>` when it is due. The
//! protocol is in [`protocol`] and the README.
//!
//! How a schedule flows, one module each:
//!
//! ```text
//!  NATS ──▶ intake ──▶ committer ──(fsync)──▶ replies ──▶ NATS
//!                        │   ▲  store (sled)
//!              horizon   ▼   │ fired keys
//!                     scheduler (wheel) ──▶ firing ──▶ NATS
//! ```
//!
//! * [`intake`] parses requests and refuses bad ones.
//! * [`committer`] is the store's only writer: group commit, replace-by-id, deletes, and loading
//!   the near future from disk into the wheel.
//! * [`scheduler`] runs the pure timing [`wheel`] against the clock.
//! * [`firing`] publishes due messages and reports them for deletion once flushed.
//!
//! # Running in-process
//!
//! ```no_run
//! # async fn example() -> Result<(), natsched::RunError> {
//! let config = natsched::config::Config::from_toml(r#"
//!     [nats]
//!     url = "nats://127.0.0.1:4222"
//!     [store]
//!     path = "/tmp/natsched-example"
//! "#)?;
//! natsched::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

pub mod committer;
pub mod config;
pub mod firing;
pub mod intake;
pub mod loadgen;
pub mod protocol;
pub mod record;
pub mod replies;
pub mod scheduler;
pub mod store;
pub mod time;
pub mod wheel;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::committer::{Committer, CommitterOptions};
use crate::config::Config;
use crate::firing::Firing;
use crate::intake::Intake;
use crate::protocol::AddLimits;
use crate::scheduler::Scheduler;
use crate::store::{Store, StoreError, StoreOptions};

/// How many accepted requests may wait for the committer before intake pauses.
const INTAKE_QUEUE: usize = 16 * 1024;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot subscribe to the API subjects: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("a natsched task failed: {0}")]
    Task(String),
}

/// Runs the daemon until `shutdown` completes, then stops intake, finishes in-flight acks and
/// publishes, makes the store durable and returns.
///
/// Schedules already overdue when it starts are fired first, oldest first.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    config.validate()?;
    let store_path = config.store.path.clone();
    let store = tokio::task::spawn_blocking(move || {
        Store::open(&StoreOptions {
            path: store_path,
            cache_capacity: config.store.cache_capacity,
        })
    })
    .await
    .map_err(|e| RunError::Task(e.to_string()))??;
    tracing::info!(path = %config.store.path.display(), "store open");

    let client = connect(&config).await?;
    let limits = AddLimits {
        max_payload: config.api.max_payload,
    };
    let intake = Intake::subscribe(client.clone(), &config.api.prefix, limits).await?;
    let firing = Firing::new(client.clone()).await?;
    client.flush().await.ok();
    tracing::info!(prefix = %config.api.prefix, url = %config.nats.url, "accepting schedules");

    let (store_tx, store_rx) = mpsc::channel(INTAKE_QUEUE);
    let (wheel_tx, wheel_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (fire_tx, fire_rx) = mpsc::unbounded_channel();
    let resident = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();

    let committer = Committer::new(
        store,
        CommitterOptions {
            max_batch: config.store.max_batch,
            lookahead: config.wheel.lookahead,
            max_resident: config.wheel.max_resident,
        },
        store_rx,
        wheel_tx,
        ack_tx,
        resident.clone(),
    )?;
    let runtime = tokio::runtime::Handle::current();
    let committer = std::thread::Builder::new()
        .name("natsched-store".into())
        .spawn(move || committer.run(runtime))
        .map_err(|e| RunError::Task(format!("cannot start the store thread: {e}")))?;

    let replies = tokio::spawn(replies::run(client.clone(), ack_rx));
    let scheduler =
        tokio::spawn(Scheduler::new(resident.clone()).run(wheel_rx, fire_tx, stop.clone()));
    let firing = tokio::spawn(firing.run(fire_rx, store_tx.clone(), resident, stop.clone()));
    let intake = tokio::spawn(intake.run(store_tx, stop.clone()));

    shutdown.await;
    tracing::info!("shutting down: intake stops, in-flight work finishes");
    stop.cancel();
    // Order matters: intake and the scheduler stop first; firing then drains what it was handed
    // and drops the last handle to the committer, which commits, fsyncs and exits; its acks
    // then drain through `replies`.
    for (name, task) in [
        ("intake", intake),
        ("scheduler", scheduler),
        ("firing", firing),
    ] {
        task.await
            .map_err(|e| RunError::Task(format!("{name}: {e}")))?;
        tracing::debug!("{name} stopped");
    }
    tokio::task::spawn_blocking(move || committer.join())
        .await
        .map_err(|e| RunError::Task(e.to_string()))?
        .map_err(|_| RunError::Task("store thread panicked".into()))??;
    replies
        .await
        .map_err(|e| RunError::Task(format!("replies: {e}")))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn connect(config: &Config) -> Result<async_nats::Client, RunError> {
    async_nats::ConnectOptions::new()
        .name(&config.nats.name)
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        })
        .connect(config.nats.url.as_str())
        .await
        .map_err(|source| RunError::Connect {
            url: config.nats.url.clone(),
            source,
        })
}
