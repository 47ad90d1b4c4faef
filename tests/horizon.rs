//! Schedules beyond the in-memory horizon wait on disk and are loaded as it advances, with no
//! more than `wheel.max_resident` in memory at a time.

mod common;

use std::time::Duration;

use common::*;
use natsched::time::{format_ms, now_ms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_schedules_load_from_disk_in_bounded_chunks() {
    const COUNT: u64 = 3000;
    let (_server, _store, daemon, client) = setup(|c| {
        c.wheel.lookahead = Duration::from_millis(200);
        c.wheel.max_resident = 1000;
    })
    .await;
    let mut sub = subscribe(&client, "far").await;

    // All beyond the 200 ms horizon when accepted; three times the memory cap in total.
    let base = now_ms() + 1500;
    let requests = (0..COUNT).rev().map(|i| {
        let client = client.clone();
        async move {
            let at = format_ms(base + i / 3);
            schedule(
                &client,
                "far",
                &[("Sched-At", &at), ("Sched-Id", &format!("f{i:05}"))],
            )
            .await
        }
    });
    futures::future::join_all(requests).await;
    assert!(now_ms() < base, "intake too slow for the test's premise");

    let mut last_due = 0;
    for i in 0..COUNT {
        let message = next(&mut sub).await;
        let id = sched_id(&message);
        let due = base + id[1..].parse::<u64>().unwrap() / 3;
        assert!(now_ms() >= due, "{id} fired early");
        assert!(due >= last_due, "{id} out of due order after {i} messages");
        last_due = due;
    }
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    daemon.stop().await;
}
