//! One writer per prefix in standalone mode: the lease in a JetStream KV bucket keeps a second
//! instance from serving (and firing its own store) while the first lives, and lets it take
//! over when the first stops, at once, or dies, once the lease ages out. Real nats-server,
//! natsched as processes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;

/// A short lease keeps the test quick; the default is 5 s.
const LEASE: &str = "[cluster]\nlease = \"2s\"\n";
const LEASE_MS: u64 = 2000;

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_waits_and_never_fires_while_the_first_lives() {
    let server = NatsServer::start_jetstream();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (store_a, dir_a, store_b, dir_b) = (&dirs[0], &dirs[1], &dirs[2], &dirs[3]);
    let client = connect(&server).await;
    let mut fired = subscribe(&client, "standalone.fired").await;

    // B first, alone: it stores schedules due a few seconds later, then stops cleanly.
    let b = DaemonProcess::spawn_with(&server.url, store_b.path(), dir_b.path(), LEASE);
    wait_ready(&client, "sched").await;
    let due_in = 4000u64;
    let mut b_due = Vec::new();
    for _ in 0..20 {
        let delay = format!("{due_in}ms");
        let (_, due) = schedule(&client, "standalone.fired", &[("Sched-Delay", &delay)]).await;
        b_due.push(due);
    }
    assert!(b.terminate().success());

    // A takes the lease at once (B gave it back), and B, started again, waits.
    let a = DaemonProcess::spawn_with(&server.url, store_a.path(), dir_a.path(), LEASE);
    wait_ready(&client, "sched").await;
    let a_log = a.wait_for_log("holding the lease of the prefix");
    assert!(!a_log.contains("waiting for its lease"), "{a_log}");
    let b = DaemonProcess::spawn_with(&server.url, store_b.path(), dir_b.path(), LEASE);
    let b_log = b.wait_for_log("another natsched serves this prefix");
    assert!(
        b_log.contains(&format!("pid {}", a.pid())),
        "the error names the holder: {b_log}"
    );
    let s = stats(&client).await;
    assert_eq!(s["role"], "leader", "{s}");
    assert!(
        s["leader"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", a.pid()))
    );

    // B's schedules come due while A lives: none fires, A has none of them.
    let latest = *b_due.iter().max().unwrap();
    let wait_past = latest.saturating_sub(natsched::time::now_ms()) + 1500;
    assert_quiet(&mut fired, Duration::from_millis(wait_past)).await;
    // A answers everything; B subscribed nothing (a stats request gets one answer).
    let replies = client.new_inbox();
    let mut answers = client.subscribe(replies.clone()).await.unwrap();
    client
        .publish_with_reply("sched.stats", replies, "".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, answers.next())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first.payload).contains("leader"));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), answers.next())
            .await
            .is_err(),
        "only the lease holder answers"
    );

    // A stops cleanly: B takes over at once and fires its overdue schedules.
    let stopped = Instant::now();
    assert!(a.terminate().success());
    let mut got = 0;
    while got < b_due.len() {
        let message = next(&mut fired).await;
        assert_eq!(message.subject.as_str(), "standalone.fired");
        got += 1;
    }
    assert!(
        stopped.elapsed() < Duration::from_millis(LEASE_MS),
        "B took over at once after A gave the lease back: {:?}",
        stopped.elapsed()
    );
    b.wait_for_log("holding the lease of the prefix");
    assert_quiet(&mut fired, Duration::from_millis(300)).await;

    // B dies: A, started again, waits until B's lease ages out, then serves.
    let b_pid = b.pid();
    b.kill_9();
    let killed = Instant::now();
    let a = DaemonProcess::spawn_with(&server.url, store_a.path(), dir_a.path(), LEASE);
    let a_log = a.wait_for_log("holding the lease of the prefix");
    let took = killed.elapsed();
    assert!(
        a_log.contains(&format!("pid {b_pid}")),
        "A named the dead holder while it waited: {a_log}"
    );
    assert!(
        took <= Duration::from_millis(LEASE_MS + 2000),
        "A took over within lease + 2 s: {took:?}"
    );
    wait_ready(&client, "sched").await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_on_the_same_store_takes_its_own_lease_at_once() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let first = harness.start_with(LEASE).await;
    first.wait_for_log("holding the lease of the prefix");
    first.kill_9();
    // Its lease is still live on the server, but it was this store's.
    let restarted = Instant::now();
    let second = harness.start_with(LEASE).await;
    let log = second.wait_for_log("holding the lease of the prefix");
    assert!(
        log.contains("took over the lease this store's previous process held"),
        "{log}"
    );
    assert!(!log.contains("waiting for its lease"), "{log}");
    assert!(
        restarted.elapsed() < Duration::from_millis(LEASE_MS),
        "{:?}",
        restarted.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_jetstream_it_serves_and_warns_once() {
    let harness = ProcessHarness::new();
    let daemon = harness.start_with(LEASE).await;
    let log = daemon.wait_for_log("the NATS server has no JetStream");
    assert_eq!(log.matches("the NATS server has no JetStream").count(), 1);
    let client = connect(&harness.server).await;
    let mut fired = subscribe(&client, "unguarded.fired").await;
    schedule(&client, "unguarded.fired", &[("Sched-Delay", "50ms")]).await;
    next(&mut fired).await;
    assert_eq!(stats(&client).await["role"], "unguarded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_holder_whose_lease_is_taken_stops_serving_and_waits_for_it_again() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let daemon = harness.start_with(LEASE).await;
    daemon.wait_for_log("holding the lease of the prefix");
    let client = connect(&harness.server).await;
    // Someone else writes the lease key (as a successor would after the lease ended).
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js.get_key_value("natsched_sched").await.unwrap();
    let intruder = r#"{"host":"elsewhere","pid":4242,"store":"x","path":"/x","since":0}"#;
    bucket.put("leader", intruder.into()).await.unwrap();
    daemon.wait_for_log("another instance took the lease");
    let log = daemon.wait_for_log("another natsched serves this prefix");
    assert!(log.contains("pid 4242"), "{log}");
    // It does not answer meanwhile.
    let request = client.request("sched.stats", "".into());
    let answer = tokio::time::timeout(Duration::from_millis(LEASE_MS / 2), request).await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "a deposed holder answered: {answer:?}"
    );
    // The intruder never renews: its lease ages out and the daemon serves again.
    daemon.wait_for_log("stopped serving: the lease is lost");
    wait_ready(&client, "sched").await;
    let mut fired = subscribe(&client, "again.fired").await;
    schedule(&client, "again.fired", &[("Sched-Delay", "50ms")]).await;
    next(&mut fired).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_store_is_refused_in_replicated_mode_rather_than_lost() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let daemon = harness.start_with(LEASE).await;
    let client = connect(&harness.server).await;
    schedule(&client, "later.fired", &[("Sched-Delay", "1h")]).await;
    assert!(daemon.terminate().success());
    let mut replicated = DaemonProcess::spawn_with(
        &harness.server.url,
        harness.store_path(),
        harness.dir_path(),
        "[cluster]\nmode = \"replicated\"\n",
    );
    assert!(!replicated.wait_exit().success());
    let log = replicated.log();
    assert!(log.contains("used in standalone mode"), "{log}");
    // The store is left as it was: standalone again, the schedule is still there.
    let daemon = harness.start_with(LEASE).await;
    assert_eq!(stats(&client).await["pending"], 1);
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_filled_from_a_log_refuses_the_log_made_again() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let config = "[cluster]\nmode = \"replicated\"\nreplicas = 1\nlease = \"2s\"\n";
    let daemon = harness.start_with(config).await;
    let client = connect(&harness.server).await;
    schedule(&client, "later.fired", &[("Sched-Delay", "1h")]).await;
    assert!(daemon.terminate().success());
    // Someone deletes the log; the next start makes a new, empty one.
    let js = async_nats::jetstream::new(client.clone());
    js.delete_stream("natsched_log_sched").await.unwrap();
    let mut again = DaemonProcess::spawn_with(
        &harness.server.url,
        harness.store_path(),
        harness.dir_path(),
        config,
    );
    assert!(!again.wait_exit().success());
    let log = again.log();
    assert!(log.contains("filled from another log"), "{log}");
}
