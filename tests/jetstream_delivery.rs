//! JetStream delivery against a real nats-server with JetStream: message ids, overrides,
//! a missing stream, `kill -9` mid-delivery, and a NATS outage.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use common::*;
use futures::StreamExt;

/// Bound on waits for a stream to fill (a debug build delivers a few thousand per second).
const FILL: Duration = Duration::from_secs(90);

async fn create_stream(js: &jetstream::Context, name: &str, subject: &str) {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn stream_count(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Waits until stream `name` holds at least `count` messages.
async fn wait_count(js: &jetstream::Context, name: &str, count: u64) {
    let start = Instant::now();
    loop {
        let have = stream_count(js, name).await;
        if have >= count {
            return;
        }
        assert!(
            start.elapsed() < FILL,
            "stream {name} holds {have} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message of stream `name`, in stream order.
async fn read_all(js: &jetstream::Context, name: &str) -> Vec<async_nats::Message> {
    let stream = js.get_stream(name).await.unwrap();
    let count = stream.cached_info().state.messages as usize;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut all = Vec::with_capacity(count);
    while all.len() < count {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("stream message in time")
            .unwrap()
            .unwrap();
        all.push(message.message);
    }
    all
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn delivers_through_jetstream_with_a_stable_message_id_unless_told_core() {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.delivery.jetstream_subjects = vec!["orders.>".into()];
    let daemon = Daemon::start(config).await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    create_stream(&js, "ORDERS", "orders.>").await;

    let (streamed, due) = schedule(
        &client,
        "orders.expired",
        &[("Sched-Delay", "100ms"), ("Nats-Msg-Id", "the caller's")],
    )
    .await;
    let (forced_core, _) = schedule(
        &client,
        "orders.core",
        &[("Sched-Delay", "100ms"), ("Sched-Deliver", "core")],
    )
    .await;
    wait_count(&js, "ORDERS", 2).await;
    let all = read_all(&js, "ORDERS").await;
    let by_id = |id: &str| all.iter().find(|m| sched_id(m) == id).unwrap();
    let expected = format!("{streamed}:{due}");
    assert_eq!(
        header(by_id(&streamed), "Nats-Msg-Id"),
        Some(expected.as_str())
    );
    assert_eq!(header(by_id(&forced_core), "Nats-Msg-Id"), None);

    // A request can ask for JetStream on a subject the config leaves to core; unknown
    // modes are refused.
    let (asked, _) = schedule(
        &client,
        "other.x",
        &[("Sched-Delay", "1h"), ("Sched-Deliver", "JetStream")],
    )
    .await;
    let got = call(&client, "sched.get", &asked).await;
    let got: serde_json::Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(got["delivery"], "jetstream");
    let refused = try_add(
        &client,
        "orders.x",
        &[
            ("Sched-Delay", "1s"),
            ("Sched-Deliver", "carrier\u{7f}pigeon"),
        ],
    )
    .await;
    let (code, description) = refused.expect("unknown mode refused");
    assert_eq!(code, 400);
    assert!(description.contains("Sched-Deliver"), "{description}");
    assert!(!description.contains('\u{7f}'), "escaped: {description}");
    stats_when(&client, |s| s["pending"] == 1).await;
    daemon.stop().await;
}

/// Issue test 4: a stream that does not exist yet, then is created; core deliveries due
/// meanwhile are on time.
#[tokio::test]
async fn a_missing_stream_holds_back_only_its_own_schedules() {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.delivery.jetstream_subjects = vec!["late.>".into()];
    let daemon = Daemon::start(config).await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());

    const STREAMED: usize = 50;
    let mut ids = BTreeSet::new();
    for i in 0..STREAMED {
        let id = format!("late-{i}");
        schedule(
            &client,
            "late.x",
            &[("Sched-Delay", "200ms"), ("Sched-Id", &id)],
        )
        .await;
        ids.insert(id);
    }
    let mut plain = subscribe(&client, "plain.y").await;
    const CORE: u64 = 20;
    for i in 0..CORE {
        schedule(
            &client,
            "plain.y",
            &[("Sched-Delay", &format!("{}ms", 300 + i * 100))],
        )
        .await;
    }
    let mut worst = 0;
    for _ in 0..CORE {
        let message = next(&mut plain).await;
        let due: jiff::Timestamp = header(&message, "Sched-Due").unwrap().parse().unwrap();
        let late = jiff::Timestamp::now().duration_since(due).as_millis();
        worst = worst.max(late);
    }
    assert!(worst < 250, "core deliveries were {worst} ms late");

    // The core ones leave the store within 100 ms of firing; the streamed ones stay.
    stats_when(&client, |s| {
        s["delivery_errors_total"].as_u64() >= Some(50) && s["pending"] == STREAMED as u64
    })
    .await;
    let got = call(&client, "sched.get", "late-0").await;
    let got: serde_json::Value = serde_json::from_slice(&got.payload).unwrap();
    assert!(got["attempts"].as_u64() >= Some(1), "{got}");
    let error = got["last_error"].as_str().unwrap();
    assert!(error.contains("no stream"), "{error}");

    create_stream(&js, "LATE", "late.>").await;
    wait_count(&js, "LATE", STREAMED as u64).await;
    stats_when(&client, |s| s["pending"] == 0).await;
    let all = read_all(&js, "LATE").await;
    let delivered: BTreeSet<String> = all.iter().map(sched_id).collect();
    assert_eq!(all.len(), STREAMED, "each once");
    assert_eq!(delivered, ids);
    daemon.stop().await;
}

/// Schedules `count` ids `<tag>-<i>` onto `target`, due spread over `spread_ms` from
/// `start_ms` ahead; returns the ids.
async fn schedule_spread(
    client: &async_nats::Client,
    target: &str,
    tag: &str,
    count: usize,
    start_ms: u64,
    spread_ms: u64,
) -> BTreeSet<String> {
    let base = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(start_ms as i64);
    let mut ids = BTreeSet::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let requests = chunk.iter().map(|&i| {
            let client = client.clone();
            let offset = spread_ms * i as u64 / count as u64;
            let due = (base + jiff::SignedDuration::from_millis(offset as i64)).to_string();
            let id = format!("{tag}-{i}");
            async move {
                schedule(&client, target, &[("Sched-At", &due), ("Sched-Id", &id)]).await;
                id
            }
        });
        ids.extend(futures::future::join_all(requests).await);
    }
    ids
}

/// Reads the stream once natsched has nothing pending and checks it holds each id once.
async fn assert_each_once(
    client: &async_nats::Client,
    js: &jetstream::Context,
    name: &str,
    ids: &BTreeSet<String>,
) -> Vec<async_nats::Message> {
    wait_count(js, name, ids.len() as u64).await;
    stats_when(client, |s| s["pending"] == 0).await;
    let all = read_all(js, name).await;
    let delivered: BTreeSet<String> = all.iter().map(sched_id).collect();
    assert_eq!(all.len(), ids.len(), "the stream holds each message once");
    assert_eq!(&delivered, ids);
    all
}

const JETSTREAM_ORDERS: &str = "[delivery]\njetstream_subjects = [\"orders.>\"]\n";

/// Issue test 1: `kill -9` while 20 000 acked schedules come due; after restart the stream
/// holds each exactly once.
#[tokio::test]
async fn kill_9_mid_delivery_leaves_each_message_once_in_the_stream() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let client = connect(&harness.server).await;
    let js = jetstream::new(client.clone());
    create_stream(&js, "ORDERS", "orders.>").await;
    let daemon = harness.start_with(JETSTREAM_ORDERS).await;
    const COUNT: usize = 20_000;
    let ids = schedule_spread(&client, "orders.expired", "o", COUNT, 3_000, 3_000).await;
    assert_eq!(ids.len(), COUNT);
    wait_count(&js, "ORDERS", COUNT as u64 / 4).await;
    daemon.kill_9();
    let before = stream_count(&js, "ORDERS").await;
    assert!(before < COUNT as u64, "killed before the end ({before})");

    let daemon = harness.start_with(JETSTREAM_ORDERS).await;
    assert_each_once(&client, &js, "ORDERS", &ids).await;
    daemon.terminate();
}

/// Issue test 2: nats-server is down for 4 s while 2 000 events come due; once it is back,
/// the stream holds all of them, each once, oldest first.
#[tokio::test]
async fn a_nats_outage_delays_deliveries_and_loses_none() {
    let mut harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let client = connect(&harness.server).await;
    let js = jetstream::new(client.clone());
    create_stream(&js, "ORDERS", "orders.>").await;
    let daemon = harness.start_with(JETSTREAM_ORDERS).await;
    const COUNT: usize = 2_000;
    let ids = schedule_spread(&client, "orders.expired", "e", COUNT, 1_500, 3_000).await;
    let went_down = Instant::now();
    harness.server.go_down();
    // The outage itself: the scenario, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(4)).await;
    harness.server.come_back();
    let client = connect(&harness.server).await;
    let js = jetstream::new(client.clone());
    let all = assert_each_once(&client, &js, "ORDERS", &ids).await;
    assert!(went_down.elapsed() >= Duration::from_secs(4));
    let dues: Vec<String> = all
        .iter()
        .map(|m| header(m, "Sched-Due").unwrap().to_owned())
        .collect();
    let mut sorted = dues.clone();
    sorted.sort();
    assert!(dues == sorted, "delivered oldest first");
    daemon.terminate();
}

/// Each occurrence of a series has its own `Nats-Msg-Id`, `<id>:<due ms>`, so the stream's
/// duplicate window drops re-sends of one occurrence but keeps every occurrence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_gives_each_occurrence_its_own_message_id() {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.recurring.min_interval = Duration::from_millis(200);
    let daemon = Daemon::start(config).await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    create_stream(&js, "TICKS", "ticks.>").await;
    let (id, first) = schedule(
        &client,
        "ticks.a",
        &[
            ("Sched-Every", "200ms"),
            ("Sched-Count", "4"),
            ("Sched-Deliver", "jetstream"),
        ],
    )
    .await;
    wait_count(&js, "TICKS", 4).await;
    let all = read_all(&js, "TICKS").await;
    let got: Vec<(String, String)> = all
        .iter()
        .map(|m| {
            let seq = header(m, "Sched-Seq").unwrap().to_owned();
            (header(m, "Nats-Msg-Id").unwrap().to_owned(), seq)
        })
        .collect();
    let expected: Vec<(String, String)> = (0..4u64)
        .map(|n| (format!("{id}:{}", first + n * 200), (n + 1).to_string()))
        .collect();
    assert_eq!(got, expected);
    stats_when(&client, |s| s["pending"] == 0).await;
    daemon.stop().await;
}
