//! JetStream intake against a real nats-server with JetStream: requests published while
//! natsched is down, rejections, idempotent re-sends, and a cancel that overtakes its add.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use natsched::config::{Config, IntakeMode};

fn jetstream_config(server: &NatsServer, store: &Path) -> Config {
    let mut config = config(server, store);
    config.intake.mode = IntakeMode::Jetstream;
    config
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, *value);
    }
    map
}

/// Publishes a request into the intake stream and waits for the server's PubAck.
async fn publish(
    js: &jetstream::Context,
    target: &str,
    pairs: &[(&str, &str)],
) -> jetstream::publish::PublishAck {
    js.publish_with_headers(
        format!("sched.add.{target}"),
        headers(pairs),
        Bytes::from_static(b"payload"),
    )
    .await
    .expect("published")
    .await
    .expect("PubAck")
}

async fn intake_messages(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream("SCHED_INTAKE").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// A JetStream server whose intake stream natsched has made (started once, then stopped),
/// a store, and a client.
async fn intake_stream_without_natsched() -> (
    NatsServer,
    tempfile::TempDir,
    async_nats::Client,
    jetstream::Context,
) {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    Daemon::start(jetstream_config(&server, store.path()))
        .await
        .stop()
        .await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    (server, store, client, js)
}

/// Issue test 3: requests published while natsched is stopped are acknowledged by the
/// server and all fire once natsched starts.
#[tokio::test]
async fn requests_published_while_natsched_is_down_all_fire() {
    let (server, store, client, js) = intake_stream_without_natsched().await;
    let mut fired = subscribe(&client, "orders.expired").await;
    const COUNT: usize = 1_000;
    let mut ids = BTreeSet::new();
    let acks = (0..COUNT).map(|i| {
        let js = js.clone();
        async move {
            let id = format!("down-{i}");
            let ack = publish(
                &js,
                "orders.expired",
                &[("Sched-Delay", "500ms"), ("Sched-Id", &id)],
            )
            .await;
            assert_eq!(ack.stream, "SCHED_INTAKE");
            id
        }
    });
    ids.extend(futures::future::join_all(acks).await);
    assert_eq!(intake_messages(&js).await, COUNT as u64);
    let published_by = jiff::Timestamp::now();
    // natsched stays down a little longer: the scenario, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let daemon = Daemon::start(jetstream_config(&server, store.path())).await;
    let mut delivered = BTreeSet::new();
    while delivered.len() < COUNT {
        let message = next(&mut fired).await;
        assert!(delivered.insert(sched_id(&message)), "fired twice");
        // Sched-Delay counts from the publish, not from when natsched consumed it.
        let due = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Sched-Due"))
            .unwrap();
        let due: jiff::Timestamp = due.as_str().parse().unwrap();
        let latest = published_by + jiff::SignedDuration::from_millis(500);
        assert!(
            due <= latest,
            "due {due} counted from consumption, not the publish"
        );
    }
    assert_eq!(delivered, ids);
    stats_when(&client, |s| s["pending"] == 0).await;
    assert_eq!(intake_messages(&js).await, 0, "every request was acked");
    daemon.stop().await;
}

/// A target, request headers, and the code it is refused with.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16);

/// A refused request is terminated (not delivered again) and published to
/// `sched.rejected` with where it came from; hostile text comes out escaped.
#[tokio::test]
async fn refused_requests_are_terminated_and_published_to_rejected() {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(jetstream_config(&server, store.path())).await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let mut rejected = subscribe(&client, "sched.rejected").await;

    let cases: [Case; 4] = [
        (
            "orders.x",
            &[("Sched-At", "not\u{1b}[31m a time"), ("Sched-Id", "bad-at")],
            400,
        ),
        (
            "orders.y",
            &[
                ("Sched-Delay", "1s"),
                ("Sched-Deliver", "pigeon"),
                ("Nats-Msg-Id", "m-2"),
            ],
            400,
        ),
        ("$SYS.x", &[("Sched-Delay", "1s"), ("Sched-Id", "sys")], 403),
        (
            "orders.z",
            &[("Sched-Delay", "1s"), ("Sched-Id", "bad id!")],
            400,
        ),
    ];
    for (target, pairs, _) in &cases {
        publish(&js, target, pairs).await;
    }
    for (target, pairs, code) in &cases {
        let message = next(&mut rejected).await;
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(body["error"]["code"], *code, "{body}");
        assert_eq!(body["subject"], format!("sched.add.{target}"), "{body}");
        let text = String::from_utf8(message.payload.to_vec()).unwrap();
        assert!(!text.contains('\u{1b}'), "escaped: {text}");
        let given = |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        assert_eq!(body["sched_id"].as_str(), given("Sched-Id"), "{body}");
        assert_eq!(body["nats_msg_id"].as_str(), given("Nats-Msg-Id"), "{body}");
    }
    let stats = stats_when(&client, |s| s["rejected_total"] == 4).await;
    assert_eq!(stats["pending"], 0);
    assert_eq!(stats["denied_total"], 1);
    assert_eq!(
        intake_messages(&js).await,
        0,
        "terminated, not waiting for redelivery"
    );
    // Still serving.
    publish(
        &js,
        "orders.ok",
        &[("Sched-Delay", "1h"), ("Sched-Id", "ok")],
    )
    .await;
    stats_when(&client, |s| s["pending"] == 1).await;
    daemon.stop().await;
}

/// A client re-sending with the same `Nats-Msg-Id` schedules once; a core request gets the
/// server's PubAck as its answer.
#[tokio::test]
async fn resends_with_one_message_id_schedule_once() {
    let server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(jetstream_config(&server, store.path())).await;
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let first = publish(
        &js,
        "orders.x",
        &[("Sched-Delay", "1h"), ("Nats-Msg-Id", "once")],
    )
    .await;
    let again = publish(
        &js,
        "orders.x",
        &[("Sched-Delay", "1h"), ("Nats-Msg-Id", "once")],
    )
    .await;
    assert!(!first.duplicate);
    assert!(again.duplicate, "the stream drops the re-send");
    let reply = request(
        &client,
        "sched.add.orders.y",
        &[("Sched-Delay", "1h")],
        b"x",
    )
    .await;
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(ack["stream"], "SCHED_INTAKE", "{ack}");
    let stats = stats_when(&client, |s| s["pending"] == 2).await;
    assert_eq!(stats["rejected_total"], 0);
    let page = call(&client, "sched.list", "{}").await;
    let page: serde_json::Value = serde_json::from_slice(&page.payload).unwrap();
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{page}");
    daemon.stop().await;
}

/// A cancel sent after its add's PubAck cancels it, even when natsched has a backlog of
/// requests to consume first.
#[tokio::test]
async fn a_cancel_after_the_pub_ack_cancels_an_add_not_yet_consumed() {
    let (server, store, client, js) = intake_stream_without_natsched().await;
    const BACKLOG: usize = 20_000;
    for chunk in (0..BACKLOG).collect::<Vec<_>>().chunks(2_000) {
        let acks = chunk.iter().map(|i| {
            let js = js.clone();
            async move {
                let id = format!("b-{i}");
                publish(
                    &js,
                    "orders.later",
                    &[("Sched-Delay", "1h"), ("Sched-Id", &id)],
                )
                .await;
            }
        });
        futures::future::join_all(acks).await;
    }
    publish(
        &js,
        "orders.later",
        &[("Sched-Delay", "1h"), ("Sched-Id", "the-one")],
    )
    .await;

    let daemon = Daemon::start(jetstream_config(&server, store.path())).await;
    let cancelled = cancel(&client, "the-one").await;
    assert!(cancelled.is_ok(), "cancel found the add: {cancelled:?}");
    let stats = stats_when(&client, |s| s["pending"] == BACKLOG as u64).await;
    assert_eq!(stats["rejected_total"], 0);
    let got = call(&client, "sched.get", "the-one").await;
    assert_eq!(error_code(&got), Some(404));
    daemon.stop().await;
}

/// Requests keep their place while NATS is away: the consumer resumes after a restart of
/// the server, and nothing published before the outage is lost.
#[tokio::test]
async fn intake_resumes_after_a_nats_restart() {
    let mut server = NatsServer::start_jetstream();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(jetstream_config(&server, store.path())).await;
    {
        let client = connect(&server).await;
        let js = jetstream::new(client.clone());
        publish(&js, "orders.a", &[("Sched-Delay", "1h"), ("Sched-Id", "a")]).await;
        stats_when(&client, |s| s["pending"] == 1).await;
    }
    server.go_down();
    server.come_back();
    let client = connect(&server).await;
    let js = jetstream::new(client.clone());
    let mut fired = subscribe(&client, "orders.b").await;
    publish(
        &js,
        "orders.b",
        &[("Sched-Delay", "100ms"), ("Sched-Id", "b")],
    )
    .await;
    // A pull the restarted server lost is replaced within 5 s (its expiry).
    let message = tokio::time::timeout(Duration::from_secs(10), fired.next())
        .await
        .expect("fired within seconds of the server coming back")
        .unwrap();
    assert_eq!(sched_id(&message), "b");
    stats_when(&client, |s| s["pending"] == 1).await;
    daemon.stop().await;
}

/// `kill -9` while natsched consumes a backlog of requests without `Sched-Id`: after the
/// restart every request fires exactly once (a message whose ack the kill lost is known by
/// its stream sequence, not stored twice).
#[tokio::test]
async fn kill_9_while_consuming_stores_each_request_once() {
    const INTAKE: &str = "[intake]\nmode = \"jetstream\"\n";
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let client = connect(&harness.server).await;
    let js = jetstream::new(client.clone());
    harness.start_with(INTAKE).await.terminate();
    let mut fired = subscribe(&client, "orders.once").await;
    const COUNT: usize = 20_000;
    let due = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(8)).to_string();
    for chunk in (0..COUNT).collect::<Vec<_>>().chunks(2_000) {
        let acks = chunk.iter().map(|i| {
            let js = js.clone();
            let due = due.clone();
            async move {
                js.publish_with_headers(
                    "sched.add.orders.once",
                    headers(&[("Sched-At", &due)]),
                    Bytes::from(i.to_string()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
        });
        futures::future::join_all(acks).await;
    }
    let daemon = harness.start_with(INTAKE).await;
    stats_when(&client, |s| {
        s["scheduled_total"].as_u64() >= Some(COUNT as u64 / 4)
    })
    .await;
    daemon.kill_9();
    let daemon = harness.start_with(INTAKE).await;
    let mut seen = BTreeSet::new();
    while seen.len() < COUNT {
        let message = tokio::time::timeout(Duration::from_secs(30), fired.next())
            .await
            .expect("all fire")
            .unwrap();
        let index = String::from_utf8(message.payload.to_vec()).unwrap();
        assert!(seen.insert(index.clone()), "request {index} fired twice");
    }
    assert_quiet(&mut fired, Duration::from_millis(500)).await;
    stats_when(&client, |s| s["pending"] == 0).await;
    assert_eq!(intake_messages(&js).await, 0);
    daemon.terminate();
}
