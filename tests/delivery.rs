//! Schedules fire on time with their payload and headers, and replacing by id fires once.

mod common;

use std::time::Duration;

use common::*;
use natsched::time::{format_ms, now_ms};

/// Generous for a loaded 2-core CI box; the target (1-2 ms) is measured by the benchmarks.
const MAX_LATENESS_MS: u64 = 50;

fn assert_on_time(due: u64, received: u64) {
    assert!(received >= due, "fired {} ms early", due - received);
    assert!(
        received - due <= MAX_LATENESS_MS,
        "fired {} ms late",
        received - due
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_absolute_time_fire_on_time() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    let (_, due) = schedule(&client, "orders.expired", &[("Sched-Delay", "300ms")]).await;
    let message = next(&mut sub).await;
    assert_on_time(due, now_ms());
    assert_eq!(message.payload.as_ref(), b"payload");

    let at = now_ms() + 400;
    let (_, due) = schedule(&client, "orders.expired", &[("Sched-At", &format_ms(at))]).await;
    assert_eq!(due, at);
    next(&mut sub).await;
    assert_on_time(due, now_ms());

    // Bare milliseconds, and an offset other than Z.
    let (_, due) = schedule(&client, "orders.expired", &[("Sched-Delay", "250")]).await;
    next(&mut sub).await;
    assert_on_time(due, now_ms());
    let at = now_ms() + 300;
    // The same instant written in UTC+02:00.
    let text = format_ms(at + 2 * 3600 * 1000).replace('Z', "+02:00");
    let (_, due) = schedule(&client, "orders.expired", &[("Sched-At", &text)]).await;
    assert_eq!(due, at);
    next(&mut sub).await;
    assert_on_time(due, now_ms());

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_headers_arrive_intact() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "audit.>").await;

    let payload: &'static [u8] = b"\x00\x01binary\xff\r\n{\"order\":42}";
    let reply = request(
        &client,
        "sched.add.audit.trail",
        &[
            ("Sched-Delay", "100ms"),
            ("Sched-Id", "order:42"),
            ("Trace-Id", "abc-123"),
            ("Multi", "first"),
            ("Multi", "second"),
        ],
        payload,
    )
    .await;
    assert_eq!(error_code(&reply), None);
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["id"], "order:42");
    let due = body["due"].as_str().unwrap().to_owned();
    assert!(
        due.ends_with('Z') && due.len() == "2026-11-24T18:00:00.250Z".len(),
        "{due}"
    );

    let message = next(&mut sub).await;
    assert_eq!(message.subject.as_str(), "audit.trail");
    assert_eq!(message.payload.as_ref(), payload);
    let headers = message.headers.expect("headers");
    assert_eq!(headers.get("Trace-Id").unwrap().as_str(), "abc-123");
    let multi: Vec<_> = headers
        .get_all("Multi")
        .map(|v| v.as_str().to_owned())
        .collect();
    assert_eq!(multi, ["first", "second"]);
    assert_eq!(headers.get("Sched-Id").unwrap().as_str(), "order:42");
    assert_eq!(headers.get("Sched-Due").unwrap().as_str(), due);
    assert!(
        headers.get("Sched-Delay").is_none(),
        "control headers are not forwarded"
    );

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_by_id_fires_once_at_the_new_time() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    // Later, then earlier, then later again: only the last one counts.
    let id = [("Sched-Id", "order-7")];
    schedule(&client, "orders.expired", &[id[0], ("Sched-Delay", "2s")]).await;
    schedule(
        &client,
        "orders.expired",
        &[id[0], ("Sched-Delay", "200ms")],
    )
    .await;
    let (_, due) = schedule(
        &client,
        "orders.expired",
        &[id[0], ("Sched-Delay", "700ms")],
    )
    .await;

    let message = next(&mut sub).await;
    assert_on_time(due, now_ms());
    assert_eq!(sched_id(&message), "order-7");
    // Past the first schedule's time too: nothing else may come.
    assert_quiet(&mut sub, Duration::from_millis(1800)).await;

    // Retries of the same request (same id) fire once.
    for _ in 0..5 {
        schedule(
            &client,
            "orders.expired",
            &[("Sched-Id", "retry"), ("Sched-Delay", "300ms")],
        )
        .await;
    }
    assert_eq!(sched_id(&next(&mut sub).await), "retry");
    assert_quiet(&mut sub, Duration::from_millis(700)).await;

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_times_fire_at_once_and_many_fire_in_due_order() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "t").await;

    schedule(&client, "t", &[("Sched-At", "2001-01-01T00:00:00Z")]).await;
    next(&mut sub).await;

    // 200 schedules sent in reverse due order arrive in due order.
    let base = now_ms() + 800;
    for i in (0..200u64).rev() {
        let at = format_ms(base + i * 2);
        schedule(
            &client,
            "t",
            &[("Sched-At", &at), ("Sched-Id", &format!("n{i}"))],
        )
        .await;
    }
    for i in 0..200u64 {
        assert_eq!(sched_id(&next(&mut sub).await), format!("n{i}"));
    }
    daemon.stop().await;
}
