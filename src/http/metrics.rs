//! `/metrics`: the daemon's counters in the Prometheus text format (0.0.4), names prefixed
//! `natsched_`.
//!
//! Nothing is recorded twice: the counters are the ones `<prefix>.stats` shows (atomics the
//! daemon's threads bump anyway), read at scrape time by a `prometheus-client` collector. A
//! scrape also reads the store's size on disk and the NATS connection's state; it runs off the
//! async workers. The README's "Metrics" table lists every series.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::cluster::Role;
use crate::metrics::{ERROR_CODES, Endpoint, Metrics};

/// Upper bounds of the fire lateness histogram, in microseconds (1 ms to 5 min).
const LATENESS_BOUNDS_US: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// The registry a scrape encodes.
pub(super) struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub fn new(metrics: Arc<Metrics>) -> Exporter {
        let mut registry = Registry::with_prefix("natsched");
        registry.register_collector(Box::new(Counters { metrics }));
        Exporter { registry }
    }

    fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// `GET /metrics`.
pub(super) async fn scrape(State(exporter): State<Arc<Exporter>>) -> Response {
    // Reading the store's size touches the file system.
    match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}

/// Reads [`Metrics`] (and the live handles it keeps) at each scrape.
struct Counters {
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Counters")
    }
}

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.metrics;
        let sources = m.sources();
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let e = &mut encoder;

        gauge(
            e,
            "pending",
            "Schedules pending in the store.",
            load(&m.pending),
        )?;
        let resident = sources
            .resident
            .map_or(0, |r| r.load(Ordering::Relaxed) as u64);
        let help = "Schedules held in memory (timing wheel and in-flight publishes).";
        gauge(e, "resident", help, resident)?;
        let help = "Schedules accepted (durable before the reply).";
        counter(e, "scheduled", help, load(&m.scheduled_total))?;
        let help = "Publishes of due schedules confirmed by NATS (one per occurrence).";
        counter(e, "fired", help, load(&m.fired_total))?;
        counter(
            e,
            "cancelled",
            "Schedules cancelled.",
            load(&m.cancelled_total),
        )?;
        let help = "Delivery attempts NATS did not take; the schedule stays stored and is retried.";
        counter(e, "delivery_retries", help, load(&m.delivery_errors_total))?;
        let undeliverable = sources.retries.map_or(0, |r| r.waiting() as u64);
        let help = "Due schedules waiting for a delivery retry.";
        gauge(e, "undeliverable", help, undeliverable)?;
        let help = "JetStream intake messages refused and published to <prefix>.rejected.";
        counter(e, "intake_rejected", help, load(&m.rejected_total))?;

        let help = "Requests answered, by endpoint.";
        let mut family = e.encode_descriptor("requests", help, None, MetricType::Counter)?;
        for endpoint in Endpoint::ALL {
            let requests = load(&m.endpoint(endpoint).requests);
            family
                .encode_family(&[("endpoint", endpoint.name())])?
                .encode_counter::<NoLabelSet, _, u64>(&requests, None)?;
        }
        let help = "Requests refused, by endpoint and error code (400 malformed, 403 denied, \
                    404 unknown, 413 too large, 422 too far, 429 quota full, 431 headers too \
                    large, 500 damaged, 503 store full or unavailable).";
        let mut family = e.encode_descriptor("rejected", help, None, MetricType::Counter)?;
        for endpoint in Endpoint::ALL {
            let stats = m.endpoint(endpoint);
            let codes = ERROR_CODES.iter().map(|c| c.to_string());
            for (code, count) in codes.chain(["other".to_owned()]).zip(&stats.by_code) {
                family
                    .encode_family(&[("endpoint", endpoint.name()), ("code", &code)])?
                    .encode_counter::<NoLabelSet, _, u64>(&load(count), None)?;
            }
        }

        let seconds = Some(&Unit::Seconds);
        for (name, help, unit, scale, (sum, count, cumulative)) in [
            (
                "fire_lateness",
                "How late due schedules were published (publish time minus due time).",
                seconds,
                1e-6,
                m.lateness_buckets(&LATENESS_BOUNDS_US),
            ),
            (
                "commit_round_size",
                "Requests (adds and cancels) per store commit round.",
                None,
                1.0,
                m.round_sizes.snapshot(),
            ),
            (
                "commit_round_duration",
                "Duration of a store commit round, its write and fsync included.",
                seconds,
                1e-6,
                m.round_micros.snapshot(),
            ),
        ] {
            let buckets = per_bucket(&cumulative, scale);
            histogram(e, name, help, unit, sum as f64 * scale, count, &buckets)?;
        }

        if let Some(store) = &sources.store {
            // No sample rather than a false 0 while the store is being reopened.
            if let Ok(bytes) = store.size_on_disk() {
                let help = "Bytes the store occupies on disk.";
                gauge(e, "store_size_bytes", help, bytes)?;
            }
            let help = "Stored segments found damaged (their readable part was kept).";
            counter(e, "corrupt_segments", help, store.damaged_total())?;
        }
        let writable = u64::from(m.store_error().is_none());
        let help = "1 while the store accepts writes, 0 during an outage (new schedules get 503).";
        gauge(e, "store_writable", help, writable)?;
        let connected = sources.client.is_some_and(|client| {
            client.connection_state() == async_nats::connection::State::Connected
        });
        let help = "1 while connected to NATS.";
        gauge(e, "nats_connected", help, u64::from(connected))?;

        let cluster = m.cluster();
        let help = "This instance's role for its prefix: 1 for the current one.";
        let mut family = e.encode_descriptor("role", help, None, MetricType::Gauge)?;
        for role in Role::ALL {
            family
                .encode_family(&[("role", role.name())])?
                .encode_gauge(&u64::from(cluster.role == role))?;
        }
        if let Some(lag) = cluster.log_lag {
            let help = "Replicated mode: log entries this instance has still to apply.";
            gauge(e, "log_lag", help, lag)?;
        }
        let quotas = m.quotas();
        if !quotas.is_empty() {
            let help = "Schedules pending per [[limits.quotas]] entry.";
            let mut family = e.encode_descriptor("quota_pending", help, None, MetricType::Gauge)?;
            for quota in &quotas {
                family
                    .encode_family(&[("subjects", quota.subjects.as_str())])?
                    .encode_gauge(&quota.pending)?;
            }
            let help = "The max_pending of each [[limits.quotas]] entry.";
            let mut family =
                e.encode_descriptor("quota_max_pending", help, None, MetricType::Gauge)?;
            for quota in &quotas {
                family
                    .encode_family(&[("subjects", quota.subjects.as_str())])?
                    .encode_gauge(&quota.max_pending)?;
            }
        }
        let help = "The running build; always 1.";
        let mut family = e.encode_descriptor("build", help, None, MetricType::Info)?;
        family.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        Ok(())
    }
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn histogram(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    sum: f64,
    count: u64,
    buckets: &[(f64, u64)],
) -> fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, buckets, None)
}

/// Cumulative counts per integer bound to the encoder's per-bucket counts, bounds scaled.
fn per_bucket(cumulative: &[(u64, u64)], scale: f64) -> Vec<(f64, u64)> {
    let mut below = 0;
    cumulative
        .iter()
        .map(|(bound, up_to)| {
            let count = up_to.saturating_sub(below);
            below = below.max(*up_to);
            (*bound as f64 * scale, count)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_series() {
        let metrics = Arc::new(Metrics::default());
        metrics.set_log_lag(3);
        *metrics.quotas.lock().unwrap() = vec![crate::metrics::QuotaUsage {
            subjects: "a.>".to_owned(),
            pending: 1,
            max_pending: 10,
        }];
        let text = Exporter::new(metrics).render().unwrap();
        let readme = include_str!("../../README.md");
        let mut names = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let name = rest.split_whitespace().next().unwrap();
            assert!(readme.contains(&format!("`{name}")), "README: no {name}");
            names += 1;
        }
        assert!(names >= 20, "{text}");
    }

    #[test]
    fn per_bucket_counts_undo_the_cumulation() {
        let buckets = per_bucket(&[(1, 2), (10, 4), (100, 4), (1000, 9)], 1e-3);
        assert_eq!(buckets, [(0.001, 2), (0.01, 2), (0.1, 0), (1.0, 5)]);
    }

    #[test]
    fn a_scrape_shows_every_series_with_its_prefix_and_type() {
        let metrics = Arc::new(Metrics::default());
        metrics.pending.store(7, Ordering::Relaxed);
        metrics.record_lateness([500, 3_000, 2_000_000]);
        metrics.record_round(3, std::time::Duration::from_micros(700));
        metrics.record_reply(
            Endpoint::Add,
            std::time::Duration::from_millis(1),
            Some(crate::protocol::ApiError::new(429, "quota")),
        );
        let text = Exporter::new(metrics).render().unwrap();
        for line in [
            "# TYPE natsched_pending gauge",
            "natsched_pending 7",
            "# TYPE natsched_fired_total counter",
            "natsched_rejected_total{endpoint=\"add\",code=\"429\"} 1",
            "natsched_rejected_total{endpoint=\"cancel\",code=\"other\"} 0",
            "natsched_requests_total{endpoint=\"add\"} 1",
            "# TYPE natsched_fire_lateness_seconds histogram",
            "natsched_fire_lateness_seconds_bucket{le=\"0.001\"} 1",
            "natsched_fire_lateness_seconds_bucket{le=\"0.005\"} 2",
            "natsched_fire_lateness_seconds_bucket{le=\"+Inf\"} 3",
            "natsched_fire_lateness_seconds_count 3",
            "natsched_commit_round_size_bucket{le=\"5\"} 1",
            "natsched_commit_round_duration_seconds_bucket{le=\"0.001\"} 1",
            "natsched_nats_connected 0",
            "natsched_role{role=\"starting\"} 1",
            "natsched_role{role=\"leader\"} 0",
            "natsched_build_info{version=\"",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
