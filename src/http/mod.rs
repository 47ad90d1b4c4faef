//! The optional HTTP server: Prometheus metrics at `/metrics` ([`metrics`]). It runs only when
//! `[metrics]` is configured, once per process: it keeps answering while the daemon waits for
//! its lease, follows, serves or starts over, and stops last.

mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Connections served at once; more wait in the listen queue. Bounds the descriptors and
/// memory a flood of connections can take from the daemon.
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this (slow clients holding connections open).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, kept alive or not (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address} for [metrics]: {source}")]
pub struct HttpError {
    address: SocketAddr,
    source: std::io::Error,
}

/// What the HTTP server needs.
pub(crate) struct HttpOptions {
    pub listen: SocketAddr,
    pub metrics: Arc<Metrics>,
}

/// The running server; [`HttpServer::stop`] ends it.
pub(crate) struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl HttpServer {
    /// Binds at once (a taken port is a start-up error) and serves in a task.
    pub async fn start(options: HttpOptions) -> Result<HttpServer, HttpError> {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| HttpError {
                address: options.listen,
                source,
            })?;
        let address = listener.local_addr().unwrap_or(options.listen);
        let router = Router::new()
            .route("/metrics", get(metrics::scrape))
            .with_state(Arc::new(metrics::Exporter::new(options.metrics)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept(listener, router, stop.clone()));
        tracing::info!(%address, "serving metrics at /metrics");
        Ok(HttpServer { task, stop })
    }

    /// Stops accepting and waits (bounded) for the requests in progress.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Accepts connections (at most [`MAX_CONNECTIONS`] at once) until `stop`, each served by
/// hyper with a header timeout and a bounded lifetime.
async fn accept(listener: tokio::net::TcpListener, router: Router, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %err, "the metrics server cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
        });
    }
}
