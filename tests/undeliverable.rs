//! Schedules NATS will not take are never deleted: they stay stored, are retried with backoff,
//! and show their attempts and last error.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The `get` answer for `id`.
async fn get(client: &async_nats::Client, id: &str) -> serde_json::Value {
    let reply = tokio::time::timeout(WAIT, client.request("sched.get", id.to_owned().into()))
        .await
        .expect("an answer in time")
        .expect("request");
    assert_eq!(error_code(&reply), None, "{reply:?}");
    serde_json::from_slice(&reply.payload).unwrap()
}

async fn stats(client: &async_nats::Client) -> serde_json::Value {
    let reply = client.request("sched.stats", "".into()).await.unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Polls `get` until `done` holds for its answer (bounded by [`WAIT`]).
async fn wait_for_get(
    client: &async_nats::Client,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let got = get(client, id).await;
        if done(&got) {
            return got;
        }
        assert!(start.elapsed() < WAIT, "get never showed it: {got}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_a_lowered_max_payload_is_kept_retried_and_delivered_later() {
    let mut server = NatsServer::start_with_config("max_payload: 65536\n");
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Sched-Delay", "2s");
    headers.insert("Sched-Id", "big");
    let reply = client
        .request_with_headers("sched.add.big.target", headers, vec![b'x'; 40_000].into())
        .await
        .unwrap();
    assert_eq!(error_code(&reply), None, "{reply:?}");

    // The limit shrinks below the message before it is due.
    server.reconfigure("max_payload: 8192\n");
    let client = connect(&server).await;
    wait_ready(&client, "sched").await;
    let got = wait_for_get(&client, "big", |g| g["attempts"].as_u64() >= Some(2)).await;
    let error = got["last_error"].as_str().unwrap();
    assert!(error.contains("payload"), "{error}");
    let s = stats(&client).await;
    assert_eq!(s["pending"], 1, "still stored: {s}");
    assert!(s["delivery_errors_total"].as_u64() >= Some(2), "{s}");
    assert_eq!(s["undeliverable"], 1, "{s}");

    // Others are not held up behind it.
    let mut sub = subscribe(&client, "small.target").await;
    let (small, _) = schedule(&client, "small.target", &[("Sched-Delay", "50ms")]).await;
    assert_eq!(sched_id(&next(&mut sub).await), small);

    // Once the limit allows it again, it is delivered, once.
    server.reconfigure("max_payload: 65536\n");
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "big.target").await;
    let message = next(&mut sub).await;
    assert_eq!(sched_id(&message), "big");
    assert_eq!(message.payload.len(), 40_000);
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    let s = stats(&client).await;
    assert_eq!(
        (s["pending"].as_u64(), s["undeliverable"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_by_nats_permissions_is_kept_and_retried() {
    let server = NatsServer::start_with_config(
        r#"
        authorization {
          users = [
            { user: natsched, password: secret, permissions: { publish: { deny: ["forbidden.>"] } } }
            { user: app, password: secret }
          ]
        }
        # natsched connects without credentials (config for them comes with secured NATS).
        no_auth_user: natsched
        "#,
    );
    let store = tempfile::tempdir().unwrap();
    let daemon = {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(natsched::run(config(&server, store.path()), async {
            let _ = stopped.await;
        }));
        (stop, task)
    };
    let client = async_nats::ConnectOptions::with_user_and_password("app".into(), "secret".into())
        .connect(server.url.as_str())
        .await
        .unwrap();
    wait_ready(&client, "sched").await;

    let mut forbidden = subscribe(&client, "forbidden.x").await;
    schedule(
        &client,
        "forbidden.x",
        &[("Sched-Delay", "50ms"), ("Sched-Id", "denied")],
    )
    .await;
    let got = wait_for_get(&client, "denied", |g| g["attempts"].as_u64() >= Some(2)).await;
    let error = got["last_error"].as_str().unwrap();
    assert!(error.contains("Permissions Violation"), "{error}");
    assert_eq!(stats(&client).await["pending"], 1);

    // Allowed subjects are delivered meanwhile; the refused one never arrives, and can be
    // cancelled while it waits for its next attempt.
    let mut allowed = subscribe(&client, "allowed.x").await;
    let (ok, _) = schedule(&client, "allowed.x", &[("Sched-Delay", "50ms")]).await;
    assert_eq!(sched_id(&next(&mut allowed).await), ok);
    assert_quiet(&mut forbidden, Duration::from_millis(200)).await;
    let start = Instant::now();
    loop {
        let reply = client
            .request("sched.cancel", "denied".into())
            .await
            .unwrap();
        match error_code(&reply) {
            None => break,
            // Caught mid-attempt: "already being delivered"; the next try finds it waiting.
            Some(404) if start.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("cancel failed: {other:?} {reply:?}"),
        }
    }
    let s = stats(&client).await;
    assert_eq!(
        (s["pending"].as_u64(), s["undeliverable"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );

    let (stop, task) = daemon;
    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
