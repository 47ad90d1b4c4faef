//! The optional HTTP server: Prometheus metrics at `/metrics` ([`metrics`]). It runs only when
//! `[metrics]` is configured, once per process: it keeps answering while the daemon waits for
//! its lease, follows, serves or starts over, and stops last.

mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

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
        let stopped = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %err, "the metrics server stopped");
            }
        });
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
