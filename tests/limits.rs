//! `[limits]`: each breach gets its own code and message, stores nothing and disturbs nothing.

mod common;

use std::time::Duration;

use async_nats::Client;
use common::*;

async fn refused(client: &Client, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    try_add(client, target, headers).await.expect("refused")
}

#[tokio::test]
async fn headers_too_large_and_due_too_far_ahead_are_refused_with_their_own_codes() {
    let (_server, _store, daemon, client) = setup(|config| {
        config.limits.max_headers_bytes = 100;
        config.limits.max_horizon = Duration::from_secs(3600);
    })
    .await;
    let big = "v".repeat(100);
    let (code, description) = refused(
        &client,
        "orders.x",
        &[("Sched-Delay", "1s"), ("X-Big", &big)],
    )
    .await;
    assert_eq!(code, 431, "{description}");
    assert!(
        description.contains("limits.max_headers_bytes"),
        "{description}"
    );
    let (code, description) = refused(&client, "orders.x", &[("Sched-Delay", "2h")]).await;
    assert_eq!(code, 422, "{description}");
    assert!(description.contains("limits.max_horizon"), "{description}");
    let (code, _) = refused(&client, "orders.x", &[("Sched-At", "2100-01-01T00:00:00Z")]).await;
    assert_eq!(code, 422);
    // Just inside both limits: accepted, and delivered.
    let mut sub = subscribe(&client, "orders.x").await;
    let fits = "v".repeat(100 - "X-Big: \r\n".len());
    schedule(
        &client,
        "orders.x",
        &[("Sched-Delay", "0"), ("X-Big", &fits)],
    )
    .await;
    let delivered = next(&mut sub).await;
    assert_eq!(
        delivered.headers.unwrap().get("X-Big").unwrap().as_str(),
        fits
    );
    schedule(&client, "orders.x", &[("Sched-Delay", "59m")]).await;
    let stats = stats(&client).await;
    assert_eq!(stats["scheduled_total"], 2, "{stats}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_full_store_refuses_new_schedules_while_cancels_and_fires_go_on() {
    let (_server, _store, daemon, client) = setup(|config| config.limits.max_pending = 3).await;
    let (a, _) = schedule(&client, "later", &[("Sched-Delay", "1h")]).await;
    schedule(
        &client,
        "later",
        &[("Sched-Delay", "1h"), ("Sched-Id", "b")],
    )
    .await;
    let mut soon = subscribe(&client, "soon").await;
    schedule(&client, "soon", &[("Sched-Delay", "1500ms")]).await;
    let (code, description) = refused(&client, "later", &[("Sched-Delay", "1h")]).await;
    assert_eq!(code, 503, "{description}");
    assert!(description.contains("store full"), "{description}");
    // Replacing a pending id takes no room.
    schedule(
        &client,
        "later",
        &[("Sched-Delay", "2h"), ("Sched-Id", "b")],
    )
    .await;
    // A cancel makes room, and so does a fire.
    cancel(&client, &a).await.unwrap();
    schedule(&client, "later", &[("Sched-Delay", "1h")]).await;
    assert_eq!(
        refused(&client, "later", &[("Sched-Delay", "1h")]).await.0,
        503
    );
    next(&mut soon).await;
    stats_when(&client, |s| s["pending"] == 2).await;
    schedule(&client, "later", &[("Sched-Delay", "1h")]).await;
    assert_eq!(stats(&client).await["pending"], 3);
    daemon.stop().await;
}

#[tokio::test]
async fn quotas_limit_each_subject_pattern_and_their_counts_survive_a_restart() {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.limits.quotas = vec![natsched::config::QuotaConfig {
        subjects: "tenant-a.>".into(),
        max_pending: 2,
    }];
    let daemon = Daemon::start(config.clone()).await;
    let client = connect(&server).await;
    schedule(&client, "tenant-a.x", &[("Sched-Delay", "1h")]).await;
    schedule(&client, "tenant-a.y", &[("Sched-Delay", "1h")]).await;
    let (code, description) = refused(&client, "tenant-a.z", &[("Sched-Delay", "1h")]).await;
    assert_eq!(code, 429, "{description}");
    assert!(description.contains("\"tenant-a.>\""), "{description}");
    // Other subjects are not held back.
    schedule(&client, "tenant-b.x", &[("Sched-Delay", "1h")]).await;
    let shown = stats(&client).await;
    assert_eq!(shown["quotas"][0]["pending"], 2, "{shown}");
    assert_eq!(shown["quotas"][0]["max_pending"], 2, "{shown}");
    daemon.stop().await;

    let daemon = Daemon::start(config).await;
    assert_eq!(
        refused(&client, "tenant-a.z", &[("Sched-Delay", "1h")])
            .await
            .0,
        429
    );
    assert_eq!(stats(&client).await["pending"], 3);
    daemon.stop().await;
}
