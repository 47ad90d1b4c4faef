//! Acknowledged schedules survive restarts, `kill -9` and NATS outages; SIGTERM exits cleanly.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use natsched::time::{format_ms, now_ms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_fires_pending_and_overdue_oldest_first() {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "t.>").await;

    let daemon = Daemon::start(config(&server, store.path())).await;
    let base = now_ms();
    // These come due while the daemon is down; scheduled newest first to prove the order.
    for i in (0..5u64).rev() {
        let at = format_ms(base + 600 + i * 10);
        schedule(
            &client,
            "t.overdue",
            &[("Sched-At", &at), ("Sched-Id", &format!("o{i}"))],
        )
        .await;
    }
    // This one is still pending after the restart.
    let (_, pending_due) = schedule(
        &client,
        "t.pending",
        &[("Sched-At", &format_ms(base + 3000))],
    )
    .await;
    daemon.stop().await;
    assert_quiet(&mut sub, Duration::from_millis(900)).await; // nothing fires while down

    let daemon = Daemon::start(config(&server, store.path())).await;
    for i in 0..5 {
        let message = next(&mut sub).await;
        assert_eq!(message.subject.as_str(), "t.overdue");
        assert_eq!(sched_id(&message), format!("o{i}"));
    }
    let message = next(&mut sub).await;
    assert_eq!(message.subject.as_str(), "t.pending");
    assert!(now_ms() >= pending_due);
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    daemon.stop().await;

    // Fired schedules are gone from the store: a third start delivers nothing.
    let daemon = Daemon::start(config(&server, store.path())).await;
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_acks_loses_nothing() {
    const COUNT: usize = 500;
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    let daemon = harness.start().await;
    let due = format_ms(now_ms() + 2500);
    // Pipelined requests, as a busy client would send them, so they share fsyncs.
    let requests = (0..COUNT).map(|i| {
        let client = client.clone();
        let due = due.clone();
        async move {
            let id = format!("order-{i}");
            schedule(
                &client,
                "orders.expired",
                &[("Sched-At", &due), ("Sched-Id", &id)],
            )
            .await;
            id
        }
    });
    let acked: BTreeSet<String> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect();
    assert_eq!(acked.len(), COUNT);
    daemon.kill_9();

    let daemon = harness.start().await;
    let mut fired = BTreeSet::new();
    while fired.len() < COUNT {
        let message = next(&mut sub).await;
        assert!(fired.insert(sched_id(&message)), "duplicate delivery");
    }
    assert_eq!(fired, acked);
    assert_eq!(daemon.terminate().code(), Some(0), "SIGTERM exits 0");
}

/// `kill -9` while schedules are being fired: whatever was not yet delivered, and whatever was
/// delivered but not yet deleted from the store, fires after restart. Every acked schedule
/// arrives; a repeat is only ever of a message the killed process had already published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_firing_loses_nothing() {
    const COUNT: usize = 4000;
    const SPREAD_MS: u64 = 2000;
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    let daemon = harness.start().await;
    let start = now_ms() + 1500;
    // Due times spread over two seconds, half with caller ids and half with generated ones.
    let requests = (0..COUNT).map(|i| {
        let client = client.clone();
        async move {
            let due = format_ms(start + i as u64 * SPREAD_MS / COUNT as u64);
            let id = format!("order-{i}");
            let mut headers = vec![("Sched-At", due.as_str())];
            if i % 2 == 0 {
                headers.push(("Sched-Id", &id));
            }
            schedule(&client, "orders.expired", &headers).await.0
        }
    });
    let acked: BTreeSet<String> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect();
    assert_eq!(acked.len(), COUNT);

    let mut before_kill = BTreeSet::new();
    while before_kill.len() < COUNT / 4 {
        before_kill.insert(sched_id(&next(&mut sub).await));
    }
    daemon.kill_9();
    // Whatever the killed process published is already queued for `sub`: drain it, so that
    // only the new process's deliveries are counted below.
    let killed_at = now_ms();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await
    {
        before_kill.insert(sched_id(&message));
    }
    assert!(
        before_kill.len() < COUNT,
        "everything fired before the kill at {killed_at}: the test did not kill mid-firing"
    );

    let daemon = harness.start().await;
    let mut after_restart = BTreeSet::new();
    while !acked
        .iter()
        .all(|id| before_kill.contains(id) || after_restart.contains(id))
    {
        let id = sched_id(&next(&mut sub).await);
        assert!(acked.contains(&id), "unknown id {id}");
        assert!(
            after_restart.insert(id.clone()),
            "{id} delivered twice by one process"
        );
    }
    let repeats = after_restart.intersection(&before_kill).count();
    eprintln!(
        "{} before the kill, {} after restart, {repeats} of them again",
        before_kill.len(),
        after_restart.len()
    );
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    assert_eq!(daemon.terminate().code(), Some(0), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_keeps_pending() {
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "later").await;

    let daemon = harness.start().await;
    let (id, _) = schedule(&client, "later", &[("Sched-Delay", "1500ms")]).await;
    assert_eq!(daemon.terminate().code(), Some(0));

    let _daemon = harness.start().await;
    assert_eq!(sched_id(&next(&mut sub).await), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_messages_wait_out_a_nats_outage() {
    let mut server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;
    let (id, due) = schedule(&client, "after.outage", &[("Sched-Delay", "500ms")]).await;
    drop(client);

    // The server is down when the schedule comes due.
    server.go_down();
    std::thread::sleep(Duration::from_millis(1500));
    server.come_back();
    // The test's subscriber connects at once; natsched reconnects after its backoff and then
    // publishes again (its first attempt was made while the server was down).
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "after.outage").await;
    let message = next(&mut sub).await;
    assert_eq!(sched_id(&message), id);
    assert!(now_ms() > due);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_an_outage_keeps_what_was_not_delivered() {
    let mut server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;
    let (id, _) = schedule(&client, "kept", &[("Sched-Delay", "300ms")]).await;
    drop(client);

    server.go_down();
    tokio::time::sleep(Duration::from_millis(600)).await; // due while NATS is down
    daemon.stop().await; // bounded: does not wait for NATS forever

    server.come_back();
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "kept").await;
    let daemon = Daemon::start(config(&server, store.path())).await;
    assert_eq!(sched_id(&next(&mut sub).await), id);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_many_due_during_an_outage() {
    let mut server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;
    // More due at once than the client's command queue holds while it cannot reach NATS.
    let at = format_ms(now_ms() + 1500);
    for _ in 0..5000 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sched-At", at.as_str());
        client
            .publish_with_headers("sched.add.t", headers, "x".into())
            .await
            .unwrap();
    }
    schedule(&client, "t", &[("Sched-At", &at)]).await; // all earlier ones are in by now
    server.go_down();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.stop().await; // panics unless it stops cleanly within the harness's bound
}
