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
//! * [`delivery`] publishes due messages and reports them for deletion once confirmed.
//! * [`api`], [`listing`], [`service`] and [`metrics`] operate it: cancel, get, list, stats and
//!   micro-service discovery; `http` serves the metrics to Prometheus (`[metrics]`), and
//!   `systemd` tells systemd when the daemon is ready. [`client`] is the command-line client,
//!   [`loadgen`] the load generator behind `natsched bench`.
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

pub mod api;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod committer;
pub mod config;
pub mod connect;
pub mod delivery;
mod http;

pub mod intake;
pub mod listing;
pub mod loadgen;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod record;
pub mod recurrence;
pub mod replies;
pub mod retries;
pub mod scheduler;
pub mod service;
pub mod store;
mod systemd;
pub mod time;
pub mod wheel;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiOptions};
use crate::committer::{Committer, CommitterLinks, CommitterOptions};
use crate::config::{ClusterMode, Config, IntakeMode};
use crate::delivery::{Firing, FiringOutputs};
use crate::intake::{Intake, IntakeOptions, JetStreamIntake};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::retries::Retries;
use crate::scheduler::{Scheduler, WheelCommand};
use crate::service::MicroService;
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
    #[error("cannot set up the NATS connection: {0}")]
    ConnectSetup(#[from] connect::ConnectSetupError),
    #[error(transparent)]
    JetStreamIntake(#[from] intake::JetStreamSetupError),
    #[error(transparent)]
    Lease(#[from] cluster::LeaseError),
    #[error("replicated mode: {0}")]
    Follow(#[from] cluster::FollowError),
    /// Start-up could not finish taking over (the lease lost meanwhile, the log refusing the
    /// lead entry): `run` starts over as a follower.
    #[error("could not take over: {0}")]
    StartAgain(String),
    #[error("cannot subscribe to the API subjects: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("a natsched task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

/// Runs the daemon until `shutdown` completes, then stops intake, finishes in-flight acks and
/// publishes, makes the store durable and returns.
///
/// Schedules already overdue when it starts are fired first, oldest first.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    config.validate()?;
    let lasting = Lasting {
        metrics: Arc::new(Metrics::default()),
        watchdog: Arc::new(systemd::Watchdog::from_env()),
    };
    // Optional servers first: a port already taken is reported before anything else starts.
    let http = match &config.metrics {
        Some(metrics) => Some(
            http::HttpServer::start(http::HttpOptions {
                listen: metrics.listen,
                metrics: lasting.metrics.clone(),
            })
            .await?,
        ),
        None => None,
    };
    let feeding = CancellationToken::new();
    let feeder = tokio::spawn({
        let (watchdog, stop) = (lasting.watchdog.clone(), feeding.clone());
        async move {
            tokio::join!(
                watchdog.feed_between_timers(stop.clone()),
                systemd::extend_start_until_ready(stop),
            );
        }
    });
    let result = run_until_stopped(&config, shutdown, &lasting).await;
    feeding.cancel();
    let _ = feeder.await;
    if let Some(http) = http {
        http.stop().await;
    }
    result
}

/// What outlives a start-over (a lost lease, a failed takeover): the counters, which the
/// metrics page reads, and systemd's watchdog.
struct Lasting {
    metrics: Arc<Metrics>,
    watchdog: Arc<systemd::Watchdog>,
}

/// Starts, serves, and starts over when the lease is lost, until `shutdown`.
async fn run_until_stopped(
    config: &Config,
    shutdown: impl Future<Output = ()>,
    lasting: &Lasting,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    loop {
        // Until it serves, a stop request ends start-up at whatever stage it is (waiting for
        // the store's lock, for an unreachable NATS, or for another instance's lease):
        // nothing has been accepted yet.
        let Some(started) = until_stopped(&mut shutdown, start(config, lasting)).await else {
            tracing::info!("stopped before serving");
            return Ok(());
        };
        let started = match started {
            Err(RunError::StartAgain(reason)) => {
                tracing::warn!(%reason, "could not take over; following again");
                let pause = tokio::time::sleep(Duration::from_secs(1));
                if until_stopped(&mut shutdown, pause).await.is_none() {
                    return Ok(());
                }
                continue;
            }
            started => started?,
        };
        match serve(started, config, lasting, &mut shutdown).await? {
            Ended::Stopped => return Ok(()),
            Ended::LeaseLost => {
                tracing::warn!("stopped serving: the lease is lost; waiting to take it again");
                systemd::status("the lease was lost; waiting to take it again");
            }
        }
    }
}

/// Why serving ended without an error.
enum Ended {
    /// Asked to stop.
    Stopped,
    /// Another instance may serve now: start over and wait for the lease.
    LeaseLost,
}

/// Serves until asked to stop, a part fails, or the lease is lost; then stops intake,
/// finishes in-flight acks and publishes, makes the store durable, and (last) gives the lease
/// back.
async fn serve(
    started: Started,
    config: &Config,
    lasting: &Lasting,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Ended, RunError> {
    let Started {
        store,
        policy,
        client,
        metrics,
        retries,
        intake,
        stream_intake,
        api,
        firing,
        micro,
        mut lease,
        replication,
    } = started;
    let lease_lost = lease.lost.clone();
    if lease_lost.is_cancelled() {
        // Lost while start-up still waited (for NATS, for the intake stream): nothing was
        // handed to any task yet; what the subscriptions buffered is dropped unanswered.
        lease.give_back().await;
        return Ok(Ended::LeaseLost);
    }
    let (store_tx, store_rx) = mpsc::channel(INTAKE_QUEUE);
    let (wheel_tx, wheel_rx) = std::sync::mpsc::channel::<WheelCommand>();
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
            capacity: policy.capacity().clone(),
        },
        CommitterLinks {
            commands: store_rx,
            wheel: wheel_tx.clone(),
            acks: ack_tx,
            resident: resident.clone(),
            metrics: metrics.clone(),
            log: replication,
        },
    )?;
    let mut committer = committer;
    let loaded = committer.when_loaded();
    let runtime = tokio::runtime::Handle::current();
    let mut store_done = spawn_thread("natsched-store", move || committer.run(runtime))?;
    let scheduler = Scheduler::new(resident.clone(), retries.clone());
    let timer_stop = stop.clone();
    let watchdog = lasting.watchdog.clone();
    let mut scheduler = spawn_thread("natsched-timer", move || {
        scheduler.run(wheel_rx, fire_tx, timer_stop, &watchdog)
    })?;
    metrics.set_sources(|sources| sources.resident = Some(resident.clone()));

    let mut replies = tokio::spawn(replies::run(client.clone(), ack_rx, metrics.clone()));
    let outputs = FiringOutputs {
        store: store_tx.clone(),
        wheel: wheel_tx,
        resident: resident.clone(),
    };
    let mut firing = tokio::spawn(firing.run(fire_rx, outputs, stop.clone()));
    let mut micro = micro;
    let mut api = tokio::spawn(api.run(store_tx.clone(), resident.clone(), stop.clone()));
    let mut stream_intake = match stream_intake {
        Some(consumer) => tokio::spawn(consumer.run(store_tx.clone(), stop.clone())),
        None => tokio::spawn(stop.clone().cancelled_owned()),
    };
    let mut intake = tokio::spawn(intake.run(store_tx, stop.clone()));
    // Ready once the overdue and near schedules are in the wheel; the subscriptions exist
    // since `start`.
    let serving = format!(
        "serving prefix {:?} as {}",
        config.api.prefix,
        metrics.cluster().role.name()
    );
    let told_ready = tokio::spawn(async move {
        if loaded.await.is_ok() {
            systemd::ready(&serving);
        }
    });

    // Until asked to stop, watch for a part that stopped by itself (a store failure, a panic):
    // the daemon then shuts down and reports it rather than running on half-dead.
    let mut store_finished = false;
    let mut timer_finished = false;
    let mut lost = false;
    let failure = tokio::select! {
        () = shutdown.as_mut() => None,
        () = lease_lost.cancelled() => {
            lost = true;
            None
        }
        result = &mut store_done => {
            store_finished = true;
            Some(match result {
                Ok(Err(err)) => RunError::Store(err),
                _ => RunError::Task("the store writer stopped".into()),
            })
        }
        result = &mut intake => Some(stopped("intake", result)),
        result = &mut stream_intake => Some(stopped("JetStream intake", result)),
        result = &mut api => Some(stopped("api", result)),
        result = &mut micro.task => Some(stopped("service discovery", result)),
        _ = &mut scheduler => {
            timer_finished = true;
            Some(RunError::Task("the timer thread stopped".into()))
        }
        result = &mut firing => Some(stopped("firing", result)),
        result = &mut replies => Some(stopped("replies", result)),
    };
    told_ready.abort();
    systemd::status("stopping to serve");
    match &failure {
        None if lost => tracing::info!("stopping to serve: intake stops, in-flight work finishes"),
        None => tracing::info!("shutting down: intake stops, in-flight work finishes"),
        Some(err) => tracing::error!("{err}; shutting down"),
    }
    stop.cancel();
    micro.stop.cancel();
    if lost {
        // Another instance may already serve: publish nothing more, not even what firing
        // was handed (it stays in the store and fires again from there).
        firing.abort();
    }
    // Order matters: intake and the timer stop first; firing then drains what it was handed
    // and drops the last handle to the committer, which commits, fsyncs and exits; its acks
    // then drain through `replies`. Every wait is bounded, so shutdown is too. (A finished
    // oneshot must not be polled again, hence the flags.)
    join_bounded("intake", &mut intake).await;
    join_bounded("JetStream intake", &mut stream_intake).await;
    join_bounded("api", &mut api).await;
    join_bounded("service discovery", &mut micro.task).await;
    if !timer_finished {
        // It notices the cancellation within its idle wait.
        let _ = tokio::time::timeout(SHUTDOWN_STEP, &mut scheduler).await;
    }
    join_bounded("firing", &mut firing).await;
    let store_result = if store_finished {
        Ok(()) // its end is the failure reported above
    } else {
        match tokio::time::timeout(SHUTDOWN_STEP, &mut store_done).await {
            Ok(Ok(result)) => result.map_err(RunError::Store),
            Ok(Err(_)) => Err(RunError::Task("the store writer panicked".into())),
            Err(_) => Err(RunError::Task(
                "the store writer did not finish in time".into(),
            )),
        }
    };
    join_bounded("replies", &mut replies).await;
    metrics.set_sources(|sources| sources.resident = None);
    lease.give_back().await;
    if let Some(err) = failure {
        return Err(err);
    }
    store_result?;
    if lost {
        return Ok(Ended::LeaseLost);
    }
    tracing::info!("stopped cleanly");
    Ok(Ended::Stopped)
}

/// What start-up makes before the daemon serves.
struct Started {
    store: Store,
    policy: Arc<Policy>,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    retries: Arc<Retries>,
    intake: Intake,
    /// The JetStream intake, in `[intake] mode = "jetstream"`.
    stream_intake: Option<JetStreamIntake>,
    api: Api,
    firing: Firing,
    /// Service discovery, answering since start-up (a follower's role too).
    micro: MicroTask,
    /// The prefix's lease, kept since it was taken.
    lease: KeptLease,
    /// Replicated mode: the log the store writer appends to.
    replication: Option<cluster::Replication>,
}

/// Replicated mode: follows the log into `store` while waiting for the lease (`claim`), then
/// catches up to the log's end and appends a `lead` entry, after which no other instance can
/// extend the log. Returns the kept lease and the log for the store writer.
async fn follow_until_leading(
    client: &async_nats::Client,
    config: &Config,
    store: &Store,
    metrics: &Arc<Metrics>,
    claim: impl Future<Output = Result<cluster::Claimed, cluster::LeaseError>>,
) -> Result<(KeptLease, cluster::Replication), RunError> {
    let js = async_nats::jetstream::new(client.clone());
    let log = cluster::log_options(client, config);
    let mut follower = loop {
        let metrics = metrics.clone();
        match cluster::Follower::start(store.clone(), js.clone(), log.clone(), metrics).await {
            Ok(follower) => break follower,
            Err(cluster::FollowError::Log(err)) => {
                tracing::warn!(error = %err, "cannot open the replicated log yet; retrying");
                tokio::time::sleep(NATS_WAIT_REPORT).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    let claimed = tokio::select! {
        claimed = claim => claimed?,
        err = follower.failed() => return Err(err.into()),
    };
    let holder = match &claimed {
        cluster::Claimed::Lease(lease) => lease.holder(),
        cluster::Claimed::Unguarded => return Err(cluster::LeaseError::NoJetStream.into()),
    };
    let mut lease = KeptLease::keep(claimed);
    let led = tokio::select! {
        led = follower.lead(holder) => led.map_err(|e| e.to_string()),
        () = lease.lost.cancelled() => Err("the lease was lost while catching up".to_owned()),
    };
    let (appender, stream) = match led {
        Ok(led) => led,
        Err(reason) => {
            // Let another instance lead, and start over as a follower.
            lease.give_back().await;
            return Err(RunError::StartAgain(reason));
        }
    };
    let max_payload = client.server_info().max_payload;
    let replication = cluster::Replication::new(
        appender,
        stream,
        lease.lost.clone(),
        max_payload,
        config.cluster.log_slack,
        config.cluster.fsync,
    );
    Ok((lease, replication))
}

/// Service discovery running as a task; stopped when dropped (start-up given up) or by
/// `serve`'s stop sequence.
struct MicroTask {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl MicroTask {
    fn spawn(micro: MicroService, metrics: &Arc<Metrics>) -> MicroTask {
        let stop = CancellationToken::new();
        let task = tokio::spawn(micro.run(metrics.clone(), stop.clone()));
        MicroTask { task, stop }
    }
}

impl Drop for MicroTask {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A lease being renewed (or, on a server without JetStream, none).
struct KeptLease {
    /// Cancelled when the lease is lost.
    lost: CancellationToken,
    /// Cancel to give the lease back.
    release: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl KeptLease {
    fn keep(claimed: cluster::Claimed) -> KeptLease {
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        let keeper = match claimed {
            cluster::Claimed::Lease(lease) => {
                tokio::spawn(lease.keep(lost.clone(), release.clone()))
            }
            cluster::Claimed::Unguarded => tokio::spawn(async {}),
        };
        KeptLease {
            lost,
            release,
            keeper,
        }
    }

    /// Stops renewing the lease and gives it back (if still held), so another instance can
    /// take over at once.
    async fn give_back(&mut self) {
        self.release.cancel();
        join_bounded("lease", &mut self.keeper).await;
    }
}

/// Opens the store, connects, subscribes, and waits until NATS has the subscriptions.
async fn start(config: &Config, lasting: &Lasting) -> Result<Started, RunError> {
    // What a scrape read of the previous start lets go: its store must close before it can
    // be opened again (sled locks it), and its connection is done.
    lasting
        .metrics
        .set_sources(|sources| *sources = metrics::Sources::default());
    let store_options = StoreOptions {
        path: config.store.path.clone(),
        cache_capacity: config.store.cache_capacity,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&store_options))
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
    tracing::info!(path = %config.store.path.display(), "store open");

    let policy = Arc::new(Policy::new(config)?);
    let client = connect(config).await?;
    let metrics = lasting.metrics.clone();
    metrics.set_sources(|sources| {
        sources.store = Some(store.clone());
        sources.client = Some(client.clone());
    });
    // Nothing is subscribed before this instance holds the prefix, which needs the server.
    wait_for_nats(&client, config).await;
    let id_store = store.clone();
    let store_id = tokio::task::spawn_blocking(move || id_store.instance_id())
        .await
        .map_err(|e| RunError::Task(e.to_string()))??;
    let claim = cluster::claim(cluster::ClaimOptions {
        client: &client,
        config,
        store_id,
        metrics: &metrics,
    });
    let prefix = &config.api.prefix;
    let (lease, replication, micro) = match config.cluster.mode {
        // Renewed from now on, while start-up goes on, until everything has stopped serving.
        ClusterMode::Standalone => {
            let lease = KeptLease::keep(claim.await?);
            let micro = MicroService::subscribe(client.clone(), prefix).await?;
            (lease, None, MicroTask::spawn(micro, &metrics))
        }
        ClusterMode::Replicated => {
            // Followers answer service discovery too, with their role.
            let micro = MicroService::subscribe(client.clone(), prefix).await?;
            let micro = MicroTask::spawn(micro, &metrics);
            let (lease, log) =
                follow_until_leading(&client, config, &store, &metrics, claim).await?;
            (lease, Some(log), micro)
        }
    };
    let retries = Arc::new(Retries::new(config.delivery.max_backoff));
    metrics.set_sources(|sources| sources.retries = Some(retries.clone()));
    let intake_options = IntakeOptions {
        client: client.clone(),
        prefix,
        max_payload: config.api.max_payload,
        min_interval: config.recurring.min_interval,
        policy: policy.clone(),
        metrics: metrics.clone(),
        core_requests: config.intake.mode == IntakeMode::Core,
    };
    let stream_intake = match config.intake.mode {
        IntakeMode::Core => None,
        IntakeMode::Jetstream => Some(intake::Requests::new(&intake_options)),
    };
    let intake = Intake::subscribe(intake_options).await?;
    let firing = Firing::new(client.clone(), metrics.clone(), retries.clone()).await?;
    wait_for_nats(&client, config).await;
    // JetStream intake needs the server to set up its stream and consumer.
    let (stream_intake, barrier) = match stream_intake {
        None => (None, None),
        Some(requests) => {
            let (intake, barrier) = set_up_stream_intake(requests, config).await?;
            (Some(intake), Some(Arc::new(barrier)))
        }
    };
    let api = Api::subscribe(ApiOptions {
        client: client.clone(),
        prefix,
        store: store.clone(),
        metrics: metrics.clone(),
        retries: retries.clone(),
        barrier,
    })
    .await?;
    // The API's subscriptions are registered before natsched says it accepts schedules.
    wait_for_nats(&client, config).await;
    tracing::info!(
        prefix = %config.api.prefix,
        url = %config.nats.shown_url(),
        intake = ?config.intake.mode,
        "accepting schedules"
    );
    Ok(Started {
        store,
        policy,
        client,
        metrics,
        retries,
        intake,
        stream_intake,
        api,
        firing,
        micro,
        lease,
        replication,
    })
}

/// Sets up the JetStream intake, retrying while the server cannot (JetStream still starting,
/// the connection lost meanwhile); an existing stream unfit for it is an error at once.
async fn set_up_stream_intake(
    requests: intake::Requests,
    config: &Config,
) -> Result<(JetStreamIntake, intake::IntakeBarrier), RunError> {
    loop {
        match JetStreamIntake::start(requests.clone(), config).await {
            Ok(set_up) => return Ok(set_up),
            Err(err @ intake::JetStreamSetupError::Mismatch { .. }) => return Err(err.into()),
            Err(err) => {
                tracing::warn!(error = %err, "cannot set up the JetStream intake yet; retrying");
                tokio::time::sleep(NATS_WAIT_REPORT).await;
            }
        }
    }
}

/// Waits until the server has processed everything sent so far (our subscriptions); the
/// client keeps retrying an unreachable server by itself, and this says so while it does.
async fn wait_for_nats(client: &async_nats::Client, config: &Config) {
    loop {
        match tokio::time::timeout(NATS_WAIT_REPORT, client.flush()).await {
            Ok(Ok(())) => break,
            Ok(Err(err)) => {
                tracing::warn!(url = %config.nats.shown_url(), error = %err, "NATS flush failed; retrying")
            }
            Err(_) => tracing::warn!(
                url = %config.nats.shown_url(),
                "waiting for NATS: the server is unreachable; retrying (SIGTERM stops natsched)"
            ),
        }
    }
}

/// How often start-up reports that it still waits for NATS.
const NATS_WAIT_REPORT: Duration = Duration::from_secs(2);

/// `work`'s result, or `None` if `stop` completes first.
async fn until_stopped<T>(
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        result = work => Some(result),
        () = stop.as_mut() => None,
    }
}

/// How long each shutdown step may take before it is given up.
const SHUTDOWN_STEP: Duration = Duration::from_secs(10);

/// Runs `work` on a named OS thread; the receiver yields its result (or an error if it
/// panicked) without blocking the runtime.
fn spawn_thread<R: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<oneshot::Receiver<R>, RunError> {
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = done.send(work());
        })
        .map_err(|e| RunError::Task(format!("cannot start thread {name}: {e}")))?;
    Ok(result)
}

fn stopped(name: &str, result: Result<(), tokio::task::JoinError>) -> RunError {
    match result {
        Ok(()) => RunError::Task(format!("{name} stopped unexpectedly")),
        Err(err) => RunError::Task(format!("{name} failed: {err}")),
    }
}

/// Waits for a task that is stopping, giving up (and aborting it) after [`SHUTDOWN_STEP`].
async fn join_bounded(name: &str, task: &mut tokio::task::JoinHandle<()>) {
    if task.is_finished() {
        // Possibly already awaited by the watch above; a finished handle is not polled again.
        return;
    }
    match tokio::time::timeout(SHUTDOWN_STEP, &mut *task).await {
        Ok(Ok(())) => tracing::debug!("{name} stopped"),
        Ok(Err(err)) if err.is_cancelled() => tracing::debug!("{name} aborted"),
        Ok(Err(err)) => tracing::error!("{name} failed: {err}"),
        Err(_) => {
            tracing::warn!("{name} did not stop in time; aborting it");
            task.abort();
        }
    }
}

/// Connects, retrying until the server is reachable.
async fn connect(config: &Config) -> Result<async_nats::Client, RunError> {
    let options = async_nats::ConnectOptions::new();
    let (options, urls) = connect::for_daemon(&config.nats, options).await?;
    options
        .name(&config.nats.name)
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                // Permission refusals of deliveries are handled by firing; this logs them
                // (and every other server error), escaped.
                async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                    tracing::warn!(error = ?text, "NATS server error")
                }
                other => tracing::info!(event = %other, "NATS event"),
            }
        })
        .connect(urls)
        .await
        .map_err(|source| RunError::Connect {
            url: config.nats.shown_url(),
            source,
        })
}
