//! The end-to-end load generator behind `natsched bench`.
//!
//! It starts nothing: it talks to a NATS server (and through it to a running natsched), drives
//! the benchmark workload, and reports one JSON line. The workload: `count` schedules with
//! `Sched-At` and 64-byte payloads (starting with the schedule's index), spread over `subjects` target subjects, due at evenly spaced
//! instants so that they fire at `rate` per second, sent as requests with `in_flight`
//! outstanding. Every request must be acknowledged (that is, durable) before it counts. A
//! second connection subscribes to the targets and records each message's lateness (receipt
//! time minus due time) in an HDR histogram.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::protocol;
use crate::time::{self, UnixMs};

/// Options of one benchmark run.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub server: String,
    /// natsched's API prefix.
    #[arg(long, default_value = "sched")]
    pub prefix: String,
    /// Schedules to send.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Fire rate in messages per second (due times are spread to give it).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Requests outstanding at once.
    #[arg(long, default_value_t = 1024)]
    pub in_flight: usize,
    /// Number of distinct target subjects.
    #[arg(long, default_value_t = 64)]
    pub subjects: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Time from the start of intake to the first due instant (default: 1 s + 10 µs per
    /// schedule, so intake finishes before firing starts).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub lead: Option<Duration>,
    /// How long after the last due instant to wait for stragglers.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub grace: Duration,
    /// Give every request a `Sched-Id` (exercises the id index; the standard workload has none).
    #[arg(long)]
    pub with_id: bool,
    /// What to do: schedule and receive (default), only schedule (then print the run id and
    /// first due for a later `receive`), or only receive an earlier run's deliveries.
    #[arg(long, value_enum, default_value_t = Stage::Both)]
    pub stage: Stage,
    /// The run to receive (with `--stage receive`), as printed by the schedule stage.
    #[arg(long)]
    pub run_id: Option<String>,
    /// The first due instant (Unix ms) of the run to receive (with `--stage receive`).
    #[arg(long)]
    pub first_due: Option<u64>,
    /// Deliver through JetStream (each request carries `Sched-Deliver: jetstream`).
    #[arg(long)]
    pub jetstream_delivery: bool,
    /// Create this file stream capturing `bench.>` if absent (for JetStream delivery), and
    /// report how many messages it gained.
    #[arg(long)]
    pub stream: Option<String>,
    /// natsched takes requests from its JetStream intake stream: a request counts as
    /// scheduled once natsched's `pending` has grown by it (not at the server's PubAck).
    #[arg(long)]
    pub jetstream_intake: bool,
    /// Compare with nats-server's own message schedules (2.12 or later) instead of natsched:
    /// each schedule is a message in this stream (made if absent: `allow_msg_schedules`,
    /// file storage, `--native-replicas`) on its own subject `nsched.<run>.<i>`, with
    /// `Nats-Schedule: @at <due>` and `Nats-Schedule-Target: ntarget.<run>.<n>`; the stream
    /// republishes `ntarget.>` to `bench.>`, where the deliveries are received as natsched's
    /// are. A request counts as scheduled at its PubAck.
    #[arg(long)]
    pub native: Option<String>,
    /// Replicas of the `--native` stream.
    #[arg(long, default_value_t = 1)]
    pub native_replicas: usize,
    /// Recurring workload: each schedule is a series `Sched-Every: DURATION` starting at its
    /// due instant (`Sched-At`), and the run receives its occurrences for `--for`; `count`
    /// series at a 1 s interval thus fire `count` times a second. Lateness is measured
    /// against each occurrence's due (from its `Sched-Seq`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// With `--every`: how long after the first due instant to receive occurrences.
    #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// natsched's pid, to report its memory.
    #[arg(long)]
    pub pid: Option<u32>,
    /// A label copied into the report.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// Which half of the workload a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    Both,
    Schedule,
    Receive,
}

/// Lateness percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Lateness {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The result of one run, printed as one JSON line.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub label: String,
    pub run_id: String,
    /// Unix ms of the first due instant.
    pub first_due: u64,
    pub count: u64,
    /// Deliveries the run waited for: `count`, or with `--every` the occurrences due in its
    /// window.
    pub expected: u64,
    pub rate: u64,
    pub in_flight: usize,
    pub intake_secs: f64,
    pub intake_per_sec: f64,
    /// Requests answered with an error.
    pub refused: u64,
    /// Requests with no reply within a minute.
    pub unanswered: u64,
    pub fired: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub early: u64,
    /// Schedules whose due instant had passed before their ack came back (intake too slow for
    /// the chosen lead): their lateness includes intake time.
    pub due_before_ack: u64,
    pub lateness_ms: Lateness,
    /// Unix ms at which the first delivery arrived.
    pub first_receipt_ms: Option<u64>,
    /// Deliveries per second between the first and the last one.
    pub fire_per_sec: Option<f64>,
    pub rss_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// Messages the `--stream` gained during the run.
    pub stream_gained: Option<u64>,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("invalid options: {0}")]
    Options(&'static str),
    #[error(transparent)]
    ConnectSetup(crate::connect::ConnectSetupError),
    #[error("{0}")]
    Request(String),
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Runs the workload once.
pub async fn run(options: &LoadOptions) -> Result<LoadReport, LoadError> {
    if options.count == 0 || options.rate == 0 || options.in_flight == 0 || options.subjects == 0 {
        return Err(LoadError::Options(
            "count, rate, in-flight and subjects must be > 0",
        ));
    }
    let (_, urls) = crate::connect::for_urls(&options.server).map_err(LoadError::ConnectSetup)?;
    let connect = |name: &'static str| {
        let urls = urls.clone();
        async move {
            let (connect_options, _) =
                crate::connect::for_urls(&options.server).map_err(LoadError::ConnectSetup)?;
            connect_options
                .name(name)
                .subscription_capacity(1 << 20)
                .connect(urls)
                .await
                .map_err(|source| LoadError::Connect {
                    url: crate::connect::mask_credentials(&options.server),
                    source,
                })
        }
    };
    let sender = connect("natsched-bench-intake").await?;
    let receiver = connect("natsched-bench-receive").await?;

    let run_id = options
        .run_id
        .clone()
        .unwrap_or_else(|| ulid::Ulid::generate().to_string().to_lowercase());
    let mut deliveries = receiver.subscribe(format!("bench.{run_id}.>")).await?;
    receiver.flush().await.ok();
    let jetstream = async_nats::jetstream::new(sender.clone());
    let stream_before = match &options.stream {
        Some(name) => Some(bench_stream(&jetstream, name).await?),
        None => None,
    };
    if let Some(name) = &options.native {
        native_stream(&jetstream, name, options.native_replicas).await?;
    }
    let pending_before = match options.jetstream_intake {
        true => pending(&sender, &options.prefix).await?,
        false => 0,
    };

    let lead = options
        .lead
        .unwrap_or(Duration::from_secs(1) + Duration::from_micros(10 * options.count));
    let first_due = options
        .first_due
        .unwrap_or_else(|| time::now_ms() + lead.as_millis() as u64);
    let count = options.count;
    let rate = options.rate;
    let due_of = move |i: u64| -> UnixMs { first_due + i * 1000 / rate };
    let every = options.every.map(|d| (d.as_millis() as u64).max(1));
    // With `--every`, occurrences due up to `window_end` count; later ones are ignored.
    let window_end = first_due + options.duration.as_millis() as u64;
    let last_due = match every {
        Some(_) => window_end,
        None => due_of(count - 1),
    };
    // What the run expects to receive: one per schedule, or each series' occurrences due
    // within the window.
    let expected: u64 = match every {
        None => count,
        Some(every) => (0..count)
            .map(|i| window_end.saturating_sub(due_of(i)) / every + 1)
            .sum(),
    };

    // Receive concurrently with intake: nothing is due before `lead`, but be ready anyway.
    let grace = options.grace;
    let receiving = options.stage != Stage::Schedule;
    let receive = tokio::spawn(async move {
        let mut seen = vec![false; count as usize];
        // With `--every`: the highest occurrence number received per series.
        let mut last_seq = vec![0u64; every.map_or(0, |_| count as usize)];
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        let (mut fired, mut duplicates, mut early) = (0u64, 0u64, 0u64);
        let (mut first, mut last) = (None, 0);
        let deadline = tokio::time::Instant::now() + time::until(last_due, time::now_ms()) + grace;
        while receiving && fired < expected {
            let message = match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(message)) => message,
                _ => break,
            };
            let received = now_micros();
            first.get_or_insert(received);
            last = received;
            // The payload starts with the schedule's index.
            let index = message
                .payload
                .split(|b| *b == b' ')
                .next()
                .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<u64>().ok());
            let Some(i) = index.filter(|i| *i < count) else {
                continue;
            };
            let due = match every {
                None => {
                    if std::mem::replace(&mut seen[i as usize], true) {
                        duplicates += 1;
                        continue;
                    }
                    due_of(i)
                }
                Some(every) => {
                    let seq = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(protocol::SEQ))
                        .and_then(|v| v.as_str().parse::<u64>().ok())
                        .unwrap_or(0);
                    let due = due_of(i) + seq.saturating_sub(1) * every;
                    if seq == 0 || due > window_end {
                        continue;
                    }
                    if std::mem::replace(&mut last_seq[i as usize], seq) >= seq {
                        duplicates += 1;
                        continue;
                    }
                    due
                }
            };
            fired += 1;
            let due = due * 1000;
            if received < due {
                early += 1;
            }
            histogram.saturating_record(received.saturating_sub(due).max(1));
        }
        (fired, duplicates, early, histogram, first, last)
    });

    // Requests are pipelined by hand: published with a reply subject under one wildcard
    // subscription, `in_flight` at a time. (A `request()` per schedule would cost the client
    // more CPU than the daemon, on cores they share.)
    let inbox = format!("_INBOX.natsched-bench.{run_id}");
    let mut replies = sender.subscribe(format!("{inbox}.*")).await?;
    sender.flush().await.ok();
    let permits = Arc::new(tokio::sync::Semaphore::new(options.in_flight));
    let to_send = if options.stage == Stage::Receive {
        0
    } else {
        count
    };
    let native = options.native.is_some();
    let acked = {
        let permits = permits.clone();
        tokio::spawn(async move {
            let (mut acked, mut refused, mut late) = (0u64, 0u64, 0u64);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60) + lead;
            while acked + refused < to_send {
                let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await
                else {
                    break;
                };
                permits.add_permits(1);
                let refused_reply = match native {
                    // A PubAck, or a JetStream error.
                    true => {
                        reply.payload.starts_with(b"{\"error\"") || !reply.payload.starts_with(b"{")
                    }
                    false => reply
                        .headers
                        .as_ref()
                        .is_some_and(|h| h.get(protocol::ERROR_CODE_HEADER).is_some()),
                };
                let index = reply
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|i| i.parse::<u64>().ok());
                match index {
                    _ if refused_reply => refused += 1,
                    Some(i) if time::now_ms() >= due_of(i) => {
                        acked += 1;
                        late += 1;
                    }
                    _ => acked += 1,
                }
            }
            (acked, refused, late)
        })
    };
    let started = Instant::now();
    let mut payload = Vec::with_capacity(options.payload);
    for i in 0..to_send {
        permits.acquire().await.expect("never closed").forget();
        let mut headers = HeaderMap::new();
        if native {
            headers.insert(
                "Nats-Schedule",
                format!("@at {}", time::format_ms(due_of(i))).as_str(),
            );
            let target = format!("ntarget.{run_id}.{}", i % options.subjects);
            headers.insert("Nats-Schedule-Target", target.as_str());
        } else {
            headers.insert(protocol::AT, time::format_ms(due_of(i)).as_str());
            if let Some(every) = every {
                headers.insert(protocol::EVERY, every.to_string().as_str());
            }
        }
        if options.with_id {
            headers.insert(protocol::ID, format!("b{run_id}-{i}").as_str());
        }
        if options.jetstream_delivery {
            headers.insert(protocol::DELIVER, "jetstream");
        }
        payload.clear();
        payload.extend_from_slice(format!("{i} ").as_bytes());
        payload.resize(options.payload.max(payload.len()), b'x');
        let subject = match native {
            true => format!("nsched.{run_id}.{i}"),
            false => format!(
                "{}.add.bench.{run_id}.{}",
                options.prefix,
                i % options.subjects
            ),
        };
        let reply = format!("{inbox}.{i}");
        if sender
            .publish_with_reply_and_headers(
                subject,
                reply,
                headers,
                Bytes::copy_from_slice(&payload),
            )
            .await
            .is_err()
        {
            break;
        }
    }
    let (acked, refused, due_before_ack) = acked.await.expect("reply task");
    if options.jetstream_intake {
        // The PubAcks say the stream has them; natsched has them once they are pending.
        let deadline = Instant::now() + Duration::from_secs(120);
        while pending(&sender, &options.prefix).await? < pending_before + acked
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let intake_secs = started.elapsed().as_secs_f64();

    let (fired, duplicates, early, histogram, first, last) = receive.await.expect("receiver task");
    let fire_per_sec = first
        .filter(|first| last > *first)
        .map(|first| fired as f64 / ((last - first) as f64 / 1e6));
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let (rss_mib, peak_rss_mib) = options.pid.map(process_memory).unwrap_or((None, None));
    let stream_gained = match (&options.stream, stream_before) {
        (Some(name), Some(before)) => {
            // A message reaches subscribers before the stream has stored it: wait until the
            // stream has them all, or stops growing for a second.
            let mut gained = 0;
            let mut still_since = Instant::now();
            loop {
                let now = bench_stream(&jetstream, name).await?.saturating_sub(before);
                if now != gained {
                    still_since = Instant::now();
                }
                gained = now;
                if gained >= count || still_since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(gained)
        }
        _ => None,
    };
    Ok(LoadReport {
        label: options.label.clone(),
        run_id,
        first_due,
        count,
        expected,
        rate,
        in_flight: options.in_flight,
        intake_secs,
        intake_per_sec: to_send as f64 / intake_secs,
        refused,
        unanswered: to_send - acked - refused,
        fired,
        missing: expected.saturating_sub(fired),
        duplicates,
        early,
        due_before_ack,
        lateness_ms: Lateness {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: histogram.max() as f64 / 1000.0,
        },
        first_receipt_ms: first.map(|us| us / 1000),
        fire_per_sec,
        rss_mib,
        peak_rss_mib,
        stream_gained,
    })
}

/// Gets or creates the file stream `name` capturing `bench.>`; returns its message count.
async fn bench_stream(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
) -> Result<u64, LoadError> {
    use async_nats::jetstream::stream;
    let mut stream = jetstream
        .get_or_create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec!["bench.>".into()],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| LoadError::Request(format!("bench stream: {e}")))?;
    let info = stream
        .info()
        .await
        .map_err(|e| LoadError::Request(e.to_string()))?;
    Ok(info.state.messages)
}

/// Gets or creates the stream of `--native`: schedules on `nsched.>`, their deliveries on
/// `ntarget.>` republished to `bench.>` (deliveries of message schedules stay inside the
/// stream otherwise).
async fn native_stream(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<(), LoadError> {
    use async_nats::jetstream::stream;
    jetstream
        .get_or_create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec!["nsched.>".into(), "ntarget.>".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_message_schedules: true,
            allow_rollup: true,
            republish: Some(stream::Republish {
                source: "ntarget.>".into(),
                destination: "bench.>".into(),
                headers_only: false,
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| LoadError::Request(format!("native stream: {e}")))?;
    Ok(())
}

/// natsched's `pending` from its stats.
async fn pending(client: &async_nats::Client, prefix: &str) -> Result<u64, LoadError> {
    let reply = client
        .request(format!("{prefix}.stats"), Bytes::new())
        .await
        .map_err(|e| LoadError::Request(format!("stats request: {e}")))?;
    let stats: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| LoadError::Request(format!("stats reply: {e}")))?;
    Ok(stats["pending"].as_u64().unwrap_or(0))
}

/// Current and peak resident memory of a process, from `/proc/<pid>/status`, in MiB.
pub fn process_memory(pid: u32) -> (Option<f64>, Option<f64>) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (None, None);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map(|kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
