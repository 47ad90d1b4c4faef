//! Recurring schedules (`Sched-Cron`, `Sched-Every`) against a real nats-server: occurrences
//! on their instants with `Sched-Seq`, bounds, cancel and replace, get and list, one store
//! record per series, restarts and `kill -9` mid-series, and catch-up after downtime.

mod common;

use std::time::Duration;

use async_nats::Message;
use common::*;
use futures::StreamExt;
use natsched::time::{format_ms, now_ms};

fn header(message: &Message, name: &str) -> String {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| panic!("no {name} header in {message:?}"))
}

fn seq(message: &Message) -> u64 {
    header(message, "Sched-Seq").parse().unwrap()
}

fn due(message: &Message) -> u64 {
    let ts: jiff::Timestamp = header(message, "Sched-Due").parse().unwrap();
    ts.as_millisecond() as u64
}

async fn get(client: &async_nats::Client, id: &str) -> Result<serde_json::Value, u16> {
    let reply = call(client, "sched.get", id).await;
    match error_code(&reply) {
        Some(code) => Err(code),
        None => Ok(serde_json::from_slice(&reply.payload).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_series_fires_on_its_instants_then_ends_at_its_count() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "t.tick").await;
    let (id, first) = schedule(
        &client,
        "t.tick",
        &[("Sched-Every", "1s"), ("Sched-Count", "3"), ("Trace", "x")],
    )
    .await;
    for n in 1..=3u64 {
        let message = next(&mut sub).await;
        let received = now_ms();
        assert_eq!(sched_id(&message), id);
        assert_eq!(seq(&message), n);
        assert_eq!(due(&message), first + (n - 1) * 1000, "occurrence {n}");
        assert!(received >= due(&message), "never early");
        assert_eq!(header(&message, "Trace"), "x", "its own headers every time");
        assert_eq!(message.payload.as_ref(), b"payload");
    }
    assert_quiet(&mut sub, Duration::from_millis(1500)).await;
    // Ended: nothing pending, and the id is gone.
    stats_when(&client, |s| s["pending"] == 0).await;
    assert_eq!(get(&client, &id).await, Err(404));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_series_with_seconds_fires_on_matching_seconds() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "t.cron").await;
    let (id, first) = schedule(
        &client,
        "t.cron",
        &[
            ("Sched-Cron", "*/2 * * * * *"),
            ("Sched-TZ", "Europe/Berlin"),
            ("Sched-Id", "every-2s"),
            ("Sched-Count", "3"),
        ],
    )
    .await;
    assert_eq!(id, "every-2s");
    assert_eq!(first % 2000, 0, "an even second");
    let dues: Vec<u64> = {
        let mut dues = Vec::new();
        for n in 1..=3 {
            let message = next(&mut sub).await;
            assert_eq!(seq(&message), n);
            dues.push(due(&message));
        }
        dues
    };
    assert_eq!(dues, [first, first + 2000, first + 4000]);
    assert_quiet(&mut sub, Duration::from_millis(2500)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_ends_a_series_and_a_start_is_its_first_occurrence() {
    let (_server, _store, daemon, client) = setup(|c| {
        c.recurring.min_interval = Duration::from_millis(500);
    })
    .await;
    let mut sub = subscribe(&client, "t.until").await;
    let start = now_ms() + 1000;
    let (_, first) = schedule(
        &client,
        "t.until",
        &[
            ("Sched-Every", "700ms"),
            ("Sched-At", &format_ms(start)),
            ("Sched-Until", &format_ms(start + 1400)),
        ],
    )
    .await;
    assert_eq!(first, start);
    let got: Vec<(u64, u64)> = {
        let mut got = Vec::new();
        for _ in 0..3 {
            let message = next(&mut sub).await;
            got.push((seq(&message), due(&message)));
        }
        got
    };
    assert_eq!(
        got,
        [(1, start), (2, start + 700), (3, start + 1400)],
        "until is inclusive"
    );
    assert_quiet(&mut sub, Duration::from_millis(1500)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_list_show_the_series_and_it_is_one_record() {
    let (_server, _store, daemon, client) = setup(|c| {
        c.recurring.min_interval = Duration::from_millis(200);
    })
    .await;
    let mut sub = subscribe(&client, "t.fast").await;
    schedule(
        &client,
        "t.slow",
        &[
            ("Sched-Cron", "30 9 * * MON-FRI"),
            ("Sched-TZ", "America/New_York"),
            ("Sched-Id", "standup"),
            ("Sched-Until", "2030-01-01T00:00:00Z"),
        ],
    )
    .await;
    let (fast, _) = schedule(&client, "t.fast", &[("Sched-Every", "200ms")]).await;
    let standup = get(&client, "standup").await.unwrap();
    let recurring = &standup["recurring"];
    assert_eq!(recurring["cron"], "30 9 * * MON-FRI");
    assert_eq!(recurring["tz"], "America/New_York");
    assert_eq!(recurring["next"], standup["due"]);
    assert_eq!(
        (recurring["next_seq"].as_u64(), recurring["fired"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(recurring["until"], "2030-01-01T00:00:00.000Z");
    // The fast one fires again and again, and stays one record: pending stays 2.
    for n in 1..=10 {
        assert_eq!(seq(&next(&mut sub).await), n);
    }
    let stats = stats(&client).await;
    assert_eq!(stats["pending"], 2, "{stats}");
    let view = get(&client, &fast).await.unwrap();
    assert_eq!(view["recurring"]["every"], "200ms");
    assert_eq!(view["recurring"]["every_ms"], 200);
    assert!(view["recurring"]["fired"].as_u64().unwrap() >= 9, "{view}");
    let list = call(&client, "sched.list", "{}").await;
    let list: serde_json::Value = serde_json::from_slice(&list.payload).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    assert!(
        items.iter().all(|item| item["recurring"].is_object()),
        "{list}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_the_series_and_the_same_id_replaces_it() {
    let (_server, _store, daemon, client) = setup(|c| {
        c.recurring.min_interval = Duration::from_millis(100);
    })
    .await;
    let mut sub = subscribe(&client, "t.>").await;
    schedule(
        &client,
        "t.a",
        &[("Sched-Every", "300ms"), ("Sched-Id", "s")],
    )
    .await;
    assert_eq!(seq(&next(&mut sub).await), 1);
    // Replaced by a series on another subject: the old one never fires again.
    schedule(
        &client,
        "t.b",
        &[("Sched-Every", "100ms"), ("Sched-Id", "s")],
    )
    .await;
    let (mut seen_b, mut last_b) = (0, 0);
    while seen_b < 5 {
        let message = next(&mut sub).await;
        if message.subject.as_str() == "t.b" {
            // From 1 up (a busy machine may catch up over one).
            seen_b += 1;
            assert!(seq(&message) > last_b && (seen_b > 1 || seq(&message) == 1));
            last_b = seq(&message);
        } else {
            // At most the occurrence that was already being delivered.
            assert!(
                seen_b == 0 && seq(&message) == 2,
                "the replaced series fired: {message:?}"
            );
        }
    }
    // Cancelled mid-series (an occurrence may be on its way): it ends.
    assert!(cancel(&client, "s").await.is_ok());
    let mut late = 0;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await
    {
        late += 1;
        assert!(late <= 1, "the series fired after its cancel: {message:?}");
    }
    assert_eq!(get(&client, "s").await, Err(404));
    stats_when(&client, |s| s["pending"] == 0).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_daemon_refuses_name_the_field_and_it_stays_up() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    for (headers, expected) in [
        (
            vec![("Sched-Cron", "* * * * *"), ("Sched-Every", "1s")],
            "not both",
        ),
        (vec![("Sched-Cron", "not cron")], "invalid Sched-Cron"),
        (
            vec![("Sched-Cron", "* * * * *"), ("Sched-TZ", "Nowhere/Land")],
            "invalid Sched-TZ",
        ),
        (
            vec![("Sched-Every", "1s"), ("Sched-Delay", "1s")],
            "Sched-Delay cannot be given",
        ),
        (vec![("Sched-Every", "10ms")], "shorter than"),
        (
            vec![("Sched-Delay", "1s"), ("Sched-Count", "2")],
            "Sched-Count applies only",
        ),
        (
            vec![("Sched-Every", "1s"), ("Sched-Count", "many")],
            "invalid Sched-Count",
        ),
        (
            vec![
                ("Sched-Every", "1s"),
                ("Sched-Until", "2001-01-01T00:00:00Z"),
            ],
            "Sched-Until is before",
        ),
        (vec![("Sched-Cron", "0 0 31 2 *")], "no occurrence"),
    ] {
        let (code, description) = try_add(&client, "t.x", &headers).await.expect("refused");
        assert_eq!(code, 400, "{headers:?}");
        assert!(description.contains(expected), "{headers:?}: {description}");
    }
    // Still serving.
    let (_, _) = schedule(&client, "t.x", &[("Sched-Delay", "1h")]).await;
    daemon.stop().await;
}

/// `kill -9` mid-series: the series goes on from where the store was, never skipping an
/// occurrence that was due while natsched was up (a repeat is within at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_series_skips_no_occurrence() {
    let harness = ProcessHarness::new();
    let client = connect(&harness.server).await;
    let mut sub = subscribe(&client, "t.k").await;
    let daemon = harness.start().await;
    schedule(
        &client,
        "t.k",
        &[
            ("Sched-Every", "2s"),
            ("Sched-Count", "4"),
            ("Sched-Id", "k"),
        ],
    )
    .await;
    assert_eq!(seq(&next(&mut sub).await), 1);
    daemon.kill_9();
    let daemon = harness.start().await;
    let mut seqs = Vec::new();
    while seqs.last() != Some(&4) {
        seqs.push(seq(&next(&mut sub).await));
    }
    // 1 again at most (fired, not yet advanced in the store), then 2, 3, 4 in order.
    seqs.retain(|&s| s != 1);
    assert_eq!(seqs, [2, 3, 4]);
    assert_quiet(&mut sub, Duration::from_millis(2500)).await;
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Down for several occurrences: one catch-up fire for the missed period (the latest missed
/// occurrence, numbered as if the others had fired), then the normal cadence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_catches_up_once_then_the_cadence_resumes() {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let client = connect(&server).await;
    let mut sub = subscribe(&client, "t.c").await;
    let daemon = Daemon::start(config(&server, store.path())).await;
    let (_, first) = schedule(&client, "t.c", &[("Sched-Every", "1s"), ("Sched-Id", "c")]).await;
    assert_eq!(seq(&next(&mut sub).await), 1);
    stats_when(&client, |s| s["pending"] == 1).await;
    daemon.stop().await;
    // Down for over four occurrences.
    let down_until = first + 5_500;
    tokio::time::sleep(Duration::from_millis(down_until.saturating_sub(now_ms()))).await;
    let daemon = Daemon::start(config(&server, store.path())).await;
    let catch_up = next(&mut sub).await;
    let restarted = now_ms();
    let caught = seq(&catch_up);
    assert!(
        caught >= 6,
        "the latest missed occurrence, not the oldest: {caught}"
    );
    assert_eq!(due(&catch_up), first + (caught - 1) * 1000);
    assert!(due(&catch_up) <= restarted && restarted - due(&catch_up) < 1000 + 1000);
    // Then the cadence: the next occurrence, on its own instant, never another stale one.
    for n in 1..=2 {
        let message = next(&mut sub).await;
        assert_eq!(seq(&message), caught + n);
        assert_eq!(due(&message), due(&catch_up) + n * 1000);
        assert!(now_ms() >= due(&message));
    }
    daemon.stop().await;
}
