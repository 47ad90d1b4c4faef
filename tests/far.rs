//! Sparse far-future schedules: stored in far segments, moved into the wheel's 100 ms segments
//! before the horizon reaches them, and fired on time, also when natsched was killed with
//! `kill -9` in between. The schedules must be more than about two minutes ahead to go to far
//! segments, so this test takes that long.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use natsched::protocol::far_parts;
use natsched::time::{format_ms, now_ms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_far_schedules_fire_on_time_after_kill_9() {
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "far.t").await;
    let daemon = harness.start().await;

    // With the default 10 s lookahead, anything 135 s ahead is past the far line (at most
    // 130 s ahead), and one schedule a second is sparse.
    let base = now_ms() + 135_000;
    let mut due_of = HashMap::new();
    for i in 0..20u64 {
        let at = format_ms(base + i * 1000);
        let (id, due) = schedule(&client, "far.t", &[("Sched-At", &at)]).await;
        assert_eq!(
            far_parts(&id).map(|(due, _, _)| due),
            Some(due),
            "{id} is in a far segment"
        );
        due_of.insert(id, due);
    }
    for (id, offset) in [("mine-1", 500), ("mine-2", 7_500)] {
        let at = format_ms(base + offset);
        let (_, due) = schedule(&client, "far.t", &[("Sched-At", &at), ("Sched-Id", id)]).await;
        due_of.insert(id.to_owned(), due);
    }
    let cancelled = due_of
        .keys()
        .find(|id| id.as_str() != "mine-1" && id.as_str() != "mine-2")
        .unwrap()
        .clone();
    let reply = client
        .request("sched.cancel", cancelled.clone().into())
        .await
        .unwrap();
    assert_eq!(error_code(&reply), None, "cancelled");
    due_of.remove(&cancelled);
    daemon.kill_9();

    // A fresh start: the far segments are found, moved in time, and fired.
    let daemon = harness.start().await;
    let last_due = *due_of.values().max().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(last_due - now_ms()) + WAIT;
    while !due_of.is_empty() {
        let message = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("every far schedule fires")
            .unwrap();
        let received = now_ms();
        let id = sched_id(&message);
        let due = due_of
            .remove(&id)
            .unwrap_or_else(|| panic!("unexpected {id}"));
        assert!(received >= due, "{id} fired early");
        assert!(
            received - due < 500,
            "{id} fired {} ms late",
            received - due
        );
    }
    assert_quiet(&mut sub, Duration::from_millis(500)).await;
    assert_eq!(daemon.terminate().code(), Some(0));
}
