//! The NATS micro-service protocol: natsched answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`
//! (and their `.natsched` and `.natsched.<id>` forms) like any service built with a NATS
//! client's `micro` package, so `nats micro ls` and friends see every running instance.
//!
//! Written out here rather than with async-nats' `service` module because that module answers
//! an error with an empty body, and natsched's errors carry a JSON body by contract.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::SelectAll;
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Endpoint, Metrics};
use crate::time;

/// The service name instances register under.
pub const NAME: &str = "natsched";

/// The discovery subscriptions of one instance.
pub struct MicroService {
    client: Client,
    id: String,
    prefix: String,
    started: String,
    requests: SelectAll<Subscriber>,
}

#[derive(Clone, Copy)]
enum Verb {
    Ping,
    Info,
    Stats,
}

impl MicroService {
    pub async fn subscribe(
        client: Client,
        prefix: &str,
    ) -> Result<MicroService, async_nats::SubscribeError> {
        let id = ulid::Ulid::generate().to_string();
        let mut requests = SelectAll::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{NAME}"),
                format!("$SRV.{verb}.{NAME}.{id}"),
            ] {
                requests.push(client.subscribe(subject).await?);
            }
        }
        Ok(MicroService {
            client,
            id,
            prefix: prefix.to_owned(),
            started: time::format_ms(time::now_ms()),
            requests,
        })
    }

    /// Answers discovery requests until `shutdown`.
    pub async fn run(mut self, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = self.requests.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let verb = match message.subject.split('.').nth(1) {
                Some("PING") => Verb::Ping,
                Some("INFO") => Verb::Info,
                _ => Verb::Stats,
            };
            if let Some(reply) = message.reply {
                let body = self.describe(verb, &metrics);
                if let Err(err) = self.client.publish(reply, body).await {
                    tracing::warn!(error = %err, "could not answer a service discovery request");
                }
            }
        }
    }

    fn describe(&self, verb: Verb, metrics: &Metrics) -> Bytes {
        #[derive(Serialize)]
        struct Common<'a> {
            name: &'a str,
            id: &'a str,
            version: &'a str,
            metadata: serde_json::Map<String, serde_json::Value>,
        }
        // Which instance of the prefix this is: its role, and whom it takes as the leader.
        let cluster = metrics.cluster();
        let mut metadata = serde_json::Map::new();
        if let serde_json::Value::String(role) = json!(cluster.role) {
            metadata.insert("role".into(), role.into());
        }
        if let Some(leader) = cluster.leader {
            metadata.insert("leader".into(), leader.into());
        }
        let common = Common {
            name: NAME,
            id: &self.id,
            version: env!("CARGO_PKG_VERSION"),
            metadata,
        };
        let mut body = serde_json::to_value(&common).expect("plain struct serializes");
        let extra = match verb {
            Verb::Ping => json!({"type": "io.nats.micro.v1.ping_response"}),
            Verb::Info => json!({
                "type": "io.nats.micro.v1.info_response",
                "description": "Durable scheduled messages for NATS",
                "endpoints": Endpoint::ALL.map(|e| json!({
                    "name": e.name(),
                    "subject": e.subject(&self.prefix),
                    // Plain subscriptions: every instance answers every request.
                    "queue_group": "",
                    "metadata": null,
                })),
            }),
            Verb::Stats => json!({
                "type": "io.nats.micro.v1.stats_response",
                "started": self.started,
                "endpoints": Endpoint::ALL.map(|e| {
                    let stats = metrics.endpoint(e);
                    let requests = stats.requests.load(Ordering::Relaxed);
                    let processing = stats.processing_ns.load(Ordering::Relaxed);
                    let last_error = stats.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    json!({
                        "name": e.name(),
                        "subject": e.subject(&self.prefix),
                        "queue_group": "",
                        "num_requests": requests,
                        "num_errors": stats.errors.load(Ordering::Relaxed),
                        "last_error": last_error.unwrap_or_default(),
                        "processing_time": processing,
                        "average_processing_time": processing.checked_div(requests).unwrap_or(0),
                    })
                }),
            }),
        };
        if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        serde_json::to_vec(&body).expect("json serializes").into()
    }
}
