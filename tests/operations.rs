//! The operations API: `sched.cancel`, `sched.get`, `sched.list`, `sched.stats` and discovery.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use natsched::time::{format_ms, now_ms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_schedule_never_fires() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    schedule(
        &client,
        "orders.expired",
        &[("Sched-Id", "order-42"), ("Sched-Delay", "700ms")],
    )
    .await;
    let (generated, _) = schedule(&client, "orders.expired", &[("Sched-Delay", "700ms")]).await;
    // Far in the future, so only on disk.
    schedule(
        &client,
        "orders.expired",
        &[("Sched-Id", "far"), ("Sched-Delay", "1h")],
    )
    .await;
    let (kept, _) = schedule(&client, "orders.expired", &[("Sched-Delay", "900ms")]).await;

    let body = cancel(&client, "order-42").await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"id": "order-42", "cancelled": true})
    );
    assert_eq!(
        cancel(&client, &generated).await.unwrap()["cancelled"],
        true
    );
    assert_eq!(cancel(&client, "far").await.unwrap()["cancelled"], true);
    assert_eq!(
        cancel(&client, "order-42").await,
        Err(404),
        "already cancelled"
    );
    assert_eq!(cancel(&client, "never-existed").await, Err(404));
    assert_eq!(cancel(&client, "not an id").await, Err(400));

    // Only the one left fires.
    assert_eq!(sched_id(&next(&mut sub).await), kept);
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    assert_eq!(
        error_code(&call(&client, "sched.get", "far").await),
        Some(404)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_survives_restart_and_kill_9() {
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "t").await;

    let daemon = harness.start().await;
    let at = format_ms(now_ms() + 1500);
    for id in ["a", "b"] {
        schedule(&client, "t", &[("Sched-Id", id), ("Sched-At", &at)]).await;
    }
    cancel(&client, "a").await.unwrap();
    daemon.kill_9(); // right after the reply

    let daemon = harness.start().await;
    assert_eq!(sched_id(&next(&mut sub).await), "b");
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_at_the_due_instant_either_cancels_or_fires_never_both() {
    const COUNT: u64 = 30;
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "race").await;

    let base = now_ms() + 500;
    for i in 0..COUNT {
        let at = format_ms(base + i * 25);
        schedule(
            &client,
            "race",
            &[("Sched-Id", &format!("r{i}")), ("Sched-At", &at)],
        )
        .await;
    }
    let mut cancelled = BTreeSet::new();
    for i in 0..COUNT {
        // Aim each cancel at its schedule's due instant, give or take the scheduler's jitter.
        let due = base + i * 25;
        tokio::time::sleep(natsched::time::until(due, now_ms())).await;
        match cancel(&client, &format!("r{i}")).await {
            Ok(_) => {
                cancelled.insert(format!("r{i}"));
            }
            // The only acceptable refusal: too late, it is being delivered.
            Err(code) => assert_eq!(code, 404, "r{i}"),
        }
    }
    let mut fired = BTreeSet::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await
    {
        assert!(fired.insert(sched_id(&message)), "fired twice");
    }
    assert!(
        cancelled.is_disjoint(&fired),
        "cancelled and fired: {:?}",
        cancelled.intersection(&fired)
    );
    assert_eq!(
        cancelled.len() + fired.len(),
        COUNT as usize,
        "every one either fired or was cancelled"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_describes_a_pending_schedule() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let reply = request(
        &client,
        "sched.add.audit.trail",
        &[
            ("Sched-Id", "g1"),
            ("Sched-Delay", "1h"),
            ("Trace", "a"),
            ("Multi", "1"),
            ("Multi", "2"),
        ],
        b"12345",
    )
    .await;
    let added: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();

    let reply = call(&client, "sched.get", "g1").await;
    assert_eq!(error_code(&reply), None);
    let got: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(got["id"], "g1");
    assert_eq!(got["subject"], "audit.trail");
    assert_eq!(got["due"], added["due"]);
    assert_eq!(
        got["headers"],
        serde_json::json!({"Multi": ["1", "2"], "Trace": ["a"]})
    );
    assert_eq!(got["payload_size"], 5);

    assert_eq!(
        error_code(&call(&client, "sched.get", "unknown").await),
        Some(404)
    );
    assert_eq!(
        error_code(&call(&client, "sched.get", "bad id!").await),
        Some(400)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_what_happened_and_pending_survives_restart() {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "s.>").await;

    schedule(&client, "s.fire", &[("Sched-Delay", "100ms")]).await;
    schedule(
        &client,
        "s.cancel",
        &[("Sched-Id", "c"), ("Sched-Delay", "1h")],
    )
    .await;
    schedule(
        &client,
        "s.keep",
        &[("Sched-Id", "k"), ("Sched-Delay", "1h")],
    )
    .await;
    schedule(
        &client,
        "s.keep",
        &[("Sched-Id", "k"), ("Sched-Delay", "2h")],
    )
    .await; // replaces
    cancel(&client, "c").await.unwrap();
    let refused = request(&client, "sched.add.s.bad", &[], b"").await;
    assert_eq!(error_code(&refused), Some(400));
    next(&mut sub).await;

    let s = stats_when(&client, |s| s["pending"] == 1).await;
    assert_eq!(s["scheduled_total"], 4);
    assert_eq!(s["fired_total"], 1);
    assert_eq!(s["cancelled_total"], 1);
    // The bad request, and the harness's readiness probe (a bare `sched.add`, always a 400).
    assert_eq!(s["errors_total"], 2);
    assert!(s["store_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["lateness_ms"]["count"], 1);
    assert!(s["lateness_ms"]["max"].as_f64().unwrap() >= 0.0);
    daemon.stop().await;

    let daemon = Daemon::start(config(&server, store.path())).await;
    let s = stats(&client).await;
    assert_eq!(s["pending"], 1, "kept in the store, not counted by a scan");
    assert_eq!(s["fired_total"], 0, "totals count since start");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_in_due_order_with_a_subject_filter() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let base = now_ms() + 3_600_000;
    // 150 on l.a.<n> and 100 on l.b, due times interleaved and sent out of order.
    let requests = (0..250u64).rev().map(|i| {
        let client = client.clone();
        async move {
            let subject = if i % 5 < 3 {
                format!("l.a.{i}")
            } else {
                "l.b".to_owned()
            };
            let at = format_ms(base + (i * 7919) % 250 * 40);
            schedule(
                &client,
                &subject,
                &[("Sched-Id", &format!("i{i}")), ("Sched-At", &at)],
            )
            .await;
        }
    });
    futures::future::join_all(requests).await;

    let mut seen = Vec::new();
    let mut cursor = serde_json::Value::Null;
    let mut pages = Vec::new();
    loop {
        let body = serde_json::json!({"subject": "l.a.*", "limit": 60, "cursor": cursor});
        let reply = call(&client, "sched.list", &body.to_string()).await;
        assert_eq!(error_code(&reply), None, "{:?}", reply.payload);
        let page: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        let items = page["items"].as_array().unwrap();
        pages.push(items.len());
        for item in items {
            assert!(item["subject"].as_str().unwrap().starts_with("l.a."));
            seen.push((
                item["due"].as_str().unwrap().to_owned(),
                item["id"].as_str().unwrap().to_owned(),
            ));
        }
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(pages, [60, 60, 30]);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "due order across pages");
    sorted.dedup();
    assert_eq!(sorted.len(), 150);

    assert_eq!(
        list_ids(&client).await.len(),
        250,
        "one page holds them all"
    );
    assert_eq!(
        error_code(&call(&client, "sched.list", r#"{"limit":0}"#).await),
        Some(400)
    );
    daemon.stop().await;
}

/// Every answer to a discovery request within half a second.
async fn discover(client: &Client, subject: &str) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, Bytes::new())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), answers.next()).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_answers_micro_service_discovery() {
    let (server, _store, daemon, client) = setup(|_| {}).await;
    let other_store = tempfile::tempdir().unwrap();
    let mut other = config(&server, other_store.path());
    other.api.prefix = "other".into();
    let other = Daemon::start(other).await;

    let pings = discover(&client, "$SRV.PING.natsched").await;
    assert_eq!(pings.len(), 2, "{pings:?}");
    for ping in &pings {
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(ping["name"], "natsched");
        assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    }
    assert_eq!(discover(&client, "$SRV.PING").await.len(), 2);
    let id = pings[0]["id"].as_str().unwrap();
    assert_eq!(
        discover(&client, &format!("$SRV.PING.natsched.{id}"))
            .await
            .len(),
        1
    );

    let infos = discover(&client, "$SRV.INFO.natsched").await;
    // What async-nats' own micro-service client expects.
    for info in &infos {
        serde_json::from_value::<async_nats::service::Info>(info.clone()).expect("INFO parses");
    }
    let subjects: Vec<_> = infos
        .iter()
        .flat_map(|i| {
            i["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["subject"].as_str().unwrap().to_owned())
        })
        .collect();
    assert!(
        subjects.contains(&"sched.add.>".to_owned())
            && subjects.contains(&"other.cancel".to_owned()),
        "{subjects:?}"
    );

    // Counts per endpoint: two adds (one refused), one get of an unknown id.
    schedule(&client, "t", &[("Sched-Delay", "1h")]).await;
    request(&client, "sched.add.t", &[], b"").await;
    call(&client, "sched.get", "nope").await;
    let stats = discover(&client, "$SRV.STATS.natsched").await;
    let ours = stats
        .iter()
        .find(|s| s["endpoints"][0]["subject"] == "sched.add.>")
        .expect("this instance's stats");
    assert_eq!(ours["type"], "io.nats.micro.v1.stats_response");
    serde_json::from_value::<async_nats::service::Stats>(ours.clone()).expect("STATS parses");
    let endpoint = |name: &str| {
        ours["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    // The harness's readiness probe is one more refused add.
    assert_eq!(endpoint("add")["num_requests"], 3);
    assert_eq!(endpoint("add")["num_errors"], 2);
    assert_eq!(endpoint("get")["num_requests"], 1);
    assert_eq!(endpoint("get")["num_errors"], 1);
    assert!(
        endpoint("get")["last_error"]
            .as_str()
            .unwrap()
            .contains("404")
    );
    other.stop().await;
    daemon.stop().await;
}

/// The ids of every listed schedule, in listed order (one page of up to 1000).
async fn list_ids(client: &Client) -> Vec<String> {
    let reply = call(client, "sched.list", r#"{"limit":1000}"#).await;
    let page: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(page["next_cursor"].is_null());
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_far_future_schedules_can_be_got_listed_and_cancelled_after_kill_9() {
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let daemon = harness.start().await;

    // A day ahead and seconds apart: too sparse for a segment each, so stored in far
    // segments under ids that name them. One more, due first, with a random id.
    let base = now_ms() + 86_400_000;
    let mut ids = Vec::new();
    for i in 0..20u64 {
        let at = format_ms(base + i * 10_000);
        ids.push(schedule(&client, "far", &[("Sched-At", &at)]).await);
    }
    for (id, due) in &ids {
        let hint = natsched::protocol::far_parts(id).map(|(due, _, _)| due);
        assert_eq!(hint, Some(*due), "{id} is stored in a far segment");
    }
    let near = schedule(&client, "far", &[("Sched-Delay", "1h")]).await;
    let mut expected: Vec<(u64, String)> = ids.iter().map(|(id, due)| (*due, id.clone())).collect();
    expected.insert(0, (near.1, near.0.clone()));
    let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        list_ids(&client).await,
        expected,
        "due order across far and fine"
    );

    for (i, (id, _)) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        assert_eq!(cancel(&client, id).await.unwrap()["id"], id.as_str(), "{i}");
    }
    daemon.kill_9(); // right after the last reply

    let daemon = harness.start().await;
    for (i, (id, due)) in ids.iter().enumerate() {
        let reply = call(&client, "sched.get", id).await;
        if i % 2 == 0 {
            assert_eq!(error_code(&reply), Some(404), "{i} was cancelled");
        } else {
            assert_eq!(error_code(&reply), None, "{i}");
            let got: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(got["due"], format_ms(*due), "{i}");
        }
    }
    assert_eq!(list_ids(&client).await.len(), 11);
    assert_eq!(daemon.terminate().code(), Some(0));
}
