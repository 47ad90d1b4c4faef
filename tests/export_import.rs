//! `natsched export` and `natsched import` with the real binary against a real nats-server:
//! a store's schedules (one-shots with headers and binary payloads, a generated id, cron and
//! interval series with bounds and progress) round-trip through a stopped store's export into
//! a fresh natsched on an empty store, idempotently; what was due fires once with its message,
//! a series goes on with its numbering; an export refuses a store in use and a path without a
//! store; an import reports a hostile file's lines and keeps going.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use natsched::time::{format_ms, now_ms};
use serde_json::Value;

async fn natsched(args: &[&str]) -> Output {
    run_cli(args.iter().map(|a| a.to_string()).collect()).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `natsched export --store STORE --output FILE`, which must succeed.
async fn export(store: &Path, file: &Path) {
    let out = natsched(&[
        "export",
        "--store",
        &store.display().to_string(),
        "--output",
        &file.display().to_string(),
    ])
    .await;
    assert!(out.status.success(), "export: {}", stderr(&out));
}

/// `natsched import FILE` against `server`.
async fn import(server: &NatsServer, file: &Path) -> Output {
    natsched(&[
        "import",
        &file.display().to_string(),
        "--server",
        &server.url,
    ])
    .await
}

/// The schedule lines of an export, by id, without what an import does not keep.
fn schedules(file: &Path) -> std::collections::BTreeMap<String, Value> {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["format"], "natsched-export", "a header first");
    let end = lines.last().unwrap();
    assert_eq!(end["end"], true, "an end line last");
    assert_eq!(end["schedules"], lines.len() as u64 - 2);
    lines[1..lines.len() - 1]
        .iter()
        .map(|line| {
            let mut line = line.clone();
            line.as_object_mut().unwrap().remove("created");
            (line["id"].as_str().unwrap().to_owned(), line)
        })
        .collect()
}

async fn get(client: &async_nats::Client, id: &str) -> Value {
    let reply = call(client, "sched.get", id).await;
    assert_eq!(error_code(&reply), None, "get {id}: {:?}", reply.payload);
    let mut got: Value = serde_json::from_slice(&reply.payload).unwrap();
    // Made anew by an import.
    got.as_object_mut().unwrap().remove("created");
    got
}

/// Sends an add with a binary payload; returns the id.
async fn add(
    client: &async_nats::Client,
    target: &str,
    headers: &[(&str, &str)],
    payload: &'static [u8],
) -> String {
    let reply = request(client, &format!("sched.add.{target}"), headers, payload).await;
    assert_eq!(error_code(&reply), None, "refused: {:?}", reply.payload);
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    body["id"].as_str().unwrap().to_owned()
}

const BINARY: &[u8] = b"\x00\xff\r\n{\"order\":42}\x1b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_round_trips_through_export_and_import_idempotently() {
    let old = ProcessHarness::new();
    let daemon = old.start().await;
    let client = connect(&old.server).await;
    let hour = now_ms() + 3_600_000;
    let mut ids = vec![
        add(
            &client,
            "orders.expired",
            &[
                ("Sched-Id", "order-42"),
                ("Sched-At", &format_ms(hour + 250)),
                ("Trace", "abc"),
                ("Multi", "1"),
                ("Multi", "2"),
                ("Sched-Deliver", "jetstream"),
            ],
            BINARY,
        )
        .await,
        // A generated id, in a far segment: its place is reserved in the new store.
        add(
            &client,
            "orders.later",
            &[("Sched-At", &format_ms(hour + 2 * 86_400_000))],
            b"",
        )
        .await,
        add(
            &client,
            "reports.daily",
            &[
                ("Sched-Id", "daily"),
                ("Sched-Cron", "0 6 * * MON-FRI"),
                ("Sched-TZ", "Europe/Berlin"),
                ("Sched-Until", "2030-01-01T00:00:00Z"),
                ("Sched-Count", "100"),
            ],
            b"report",
        )
        .await,
        add(
            &client,
            "heartbeat",
            &[
                ("Sched-Id", "beat"),
                ("Sched-Every", "1h"),
                ("Sched-Count", "10"),
                ("Sched-Until", "2031-01-01T00:00:00.500Z"),
            ],
            b"",
        )
        .await,
        // A series six occurrences in.
        add(
            &client,
            "heartbeat",
            &[
                ("Sched-Id", "beat-7"),
                ("Sched-Every", "90s"),
                ("Sched-At", &format_ms(hour)),
                ("Sched-Seq", "7"),
                ("Sched-Count", "10"),
            ],
            b"seven",
        )
        .await,
    ];
    ids.sort();
    assert!(
        natsched::protocol::far_parts(&ids[0]).is_some(),
        "a generated id: {ids:?}"
    );
    let mut before = Vec::new();
    for id in &ids {
        before.push(get(&client, id).await);
    }
    assert_eq!(before[2]["recurring"]["next_seq"], 7, "{}", before[2]);
    assert!(daemon.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    export(old.store_path(), &file).await;
    let exported = schedules(&file);
    assert_eq!(exported.keys().cloned().collect::<Vec<_>>(), ids);
    let order = &exported["order-42"];
    assert_eq!(
        order["headers"],
        serde_json::json!([["Multi", "1"], ["Multi", "2"], ["Trace", "abc"]])
    );
    assert_eq!(order["payload"], "AP8NCnsib3JkZXIiOjQyfRs=");
    assert_eq!(order["delivery"], "jetstream");
    assert_eq!(
        exported["beat-7"]["rule"],
        serde_json::json!({"every_ms": 90_000, "next_seq": 7, "count": 10})
    );

    // A fresh natsched on an empty store.
    let (store, config_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fresh = DaemonProcess::start(&old.server, store.path(), config_dir.path()).await;
    let out = import(&old.server, &file).await;
    assert!(out.status.success(), "import: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "imported 5, failed 0, malformed lines 0"
    );
    for (id, was) in ids.iter().zip(&before) {
        assert_eq!(&get(&client, id).await, was, "{id}");
    }
    assert_eq!(stats(&client).await["pending"], 5);
    // Again: each schedule replaces itself.
    let out = import(&old.server, &file).await;
    assert!(out.status.success(), "import: {}", stderr(&out));
    assert_eq!(stats(&client).await["pending"], 5);
    for (id, was) in ids.iter().zip(&before) {
        assert_eq!(&get(&client, id).await, was, "{id}");
    }
    // A new schedule without an id gets one the imported id never collides with.
    let new = add(
        &client,
        "orders.later",
        &[("Sched-At", &format_ms(hour + 2 * 86_400_000))],
        b"",
    )
    .await;
    assert_ne!(new, ids[0]);
    assert_eq!(stats(&client).await["pending"], 6);
    assert!(fresh.terminate().success());

    // And out again: the same lines (but the new one).
    let again = dir.path().join("again.jsonl");
    export(store.path(), &again).await;
    let mut reexported = schedules(&again);
    assert!(reexported.remove(&new).is_some());
    assert_eq!(reexported, exported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_due_fires_once_after_an_import_and_a_series_keeps_its_numbering() {
    let old = ProcessHarness::new();
    let daemon = old.start().await;
    let client = connect(&old.server).await;
    let mut once = subscribe(&client, "t.once").await;
    let mut beat = subscribe(&client, "t.beat").await;
    // Far enough ahead that the old natsched (stopped after the series fired twice, about
    // 2 s from now) never fires it, even on a loaded machine.
    let due = now_ms() + 8_000;
    add(
        &client,
        "t.once",
        &[
            ("Sched-Id", "once"),
            ("Sched-At", &format_ms(due)),
            ("Trace", "x"),
            ("Multi", "1"),
            ("Multi", "2"),
        ],
        BINARY,
    )
    .await;
    add(
        &client,
        "t.beat",
        &[
            ("Sched-Id", "beat"),
            ("Sched-Every", "1s"),
            ("Sched-Count", "5"),
        ],
        b"b",
    )
    .await;
    let seq = |m: &async_nats::Message| -> u64 {
        let headers = m.headers.as_ref().unwrap();
        headers.get("Sched-Seq").unwrap().as_str().parse().unwrap()
    };
    assert_eq!(seq(&next(&mut beat).await), 1);
    assert_eq!(seq(&next(&mut beat).await), 2);
    assert!(daemon.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.jsonl");
    export(old.store_path(), &file).await;
    let exported = schedules(&file);
    assert!(exported.contains_key("once"), "not fired before the stop");
    // What fired before the stop (a third occurrence, on a slow machine) is what the export
    // says is past: each of those arrives, and the one before `next_seq` last.
    let last = exported["beat"]["rule"]["next_seq"].as_u64().unwrap() - 1;
    assert!(last >= 2, "{last}");
    let mut arrived = 2;
    while arrived < last {
        arrived = seq(&next(&mut beat).await);
    }
    assert_eq!(arrived, last);

    let (store, config_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fresh = DaemonProcess::start(&old.server, store.path(), config_dir.path()).await;
    let out = import(&old.server, &file).await;
    assert!(out.status.success(), "import: {}", stderr(&out));

    let message = next(&mut once).await;
    assert!(now_ms() >= due, "never early");
    assert_eq!(sched_id(&message), "once");
    assert_eq!(message.payload.as_ref(), BINARY);
    let headers = message.headers.as_ref().unwrap();
    let multi: Vec<&str> = headers.get_all("Multi").map(|v| v.as_str()).collect();
    assert_eq!(multi, ["1", "2"]);
    assert_eq!(headers.get("Trace").unwrap().as_str(), "x");
    assert_eq!(headers.get("Sched-Due").unwrap().as_str(), format_ms(due));
    // The series goes on where it was (a catch-up fire for what it missed while stopped,
    // numbered as if those had fired), up to its count, and ends.
    let mut seqs = Vec::new();
    while seqs.last() != Some(&5) {
        let message = next(&mut beat).await;
        assert_eq!(sched_id(&message), "beat");
        seqs.push(seq(&message));
    }
    assert!(seqs[0] > last, "{seqs:?} after {last}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_quiet(&mut once, std::time::Duration::from_millis(1200)).await;
    assert_quiet(&mut beat, std::time::Duration::from_millis(100)).await;
    stats_when(&client, |s| s["pending"] == 0).await;
    assert!(fresh.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_refuses_a_store_in_use_and_a_path_without_a_store() {
    let harness = ProcessHarness::new();
    let daemon = harness.start().await;
    let client = connect(&harness.server).await;
    schedule(&client, "t", &[("Sched-Delay", "1h")]).await;
    let store = harness.store_path().display().to_string();
    let out = natsched(&["export", "--store", &store]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is in use"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert_eq!(stats(&client).await["pending"], 1, "the daemon is unharmed");
    assert!(daemon.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = natsched(&["export", "--store", &missing.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no natsched store"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists(), "nothing is created");
    let out = natsched(&["export", "--store", &dir.path().display().to_string()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no natsched store"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // The stopped store exports, to stdout.
    let out = natsched(&["export", "--store", &store]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);

    // A damaged segment is reported with its key and left out; the rest is exported, and
    // the export exits 1.
    {
        use natsched::store::{SegmentKey, Store, StoreOptions, WriteBatch};
        let opened = Store::open(&StoreOptions {
            path: harness.store_path().to_owned(),
            cache_capacity: 1 << 20,
        })
        .unwrap();
        let mut batch = WriteBatch::default();
        batch.put_raw_segment(SegmentKey::fine(1_000, 1 << 30), Some(vec![2, 0, 0, 0, 9]));
        opened.commit(batch).unwrap();
        opened.close().unwrap();
    }
    let started = std::time::Instant::now();
    let out = loop {
        // sled's threads in this process let go of the store's lock a moment after.
        let out = natsched(&["export", "--store", &store]).await;
        if !stderr(&out).contains("is in use") || started.elapsed() > WAIT {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "unreadable in segment SegmentKey { tier: Fine, bucket: 1000, seq: 1073741824 }"
        ),
        "{}",
        stderr(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.ends_with("\"schedules\":1,\"unreadable\":1}\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_import_is_reported_line_by_line_and_harms_nothing() {
    let harness = ProcessHarness::new();
    let daemon = harness.start().await;
    let client = connect(&harness.server).await;
    let due = format_ms(now_ms() + 3_600_000);
    let line =
        |id: &str, rest: &str| format!(r#"{{"id":"{id}","subject":"t.x","due":"{due}"{rest}}}"#);
    let lines = [
        r#"{"format":"natsched-export","version":1}"#.to_owned(),
        line("good", r#","headers":[["A","1"]],"payload":"eA==""#),
        "{not json".to_owned(),
        line("b64", r#","payload":"%%%""#),
        line(
            "crlf",
            r#","headers":[["X","a\r\nSched-At: 2001-01-01T00:00:00Z"]]"#,
        ),
        line("name", r#","headers":[["X\u001b[31m","v"]]"#),
        line("ours", r#","headers":[["Sched-Delay","1s"]]"#),
        line("bad id", ""),
        r#"{"id":"w","subject":"t.*","due":"2030-01-01T00:00:00Z"}"#.to_owned(),
        line("rule", r#","rule":{"cron":"* * * * *\n","next_seq":1}"#),
        line("nope", r#","payload":"","surprise":1"#),
        "\u{1b}[2J\u{0}garbage".to_owned(),
        // Refused by natsched itself.
        line("refused", r#","rule":{"every_ms":1,"next_seq":1}"#),
        line("good-2", ""),
        r#"{"format":"natsched-export","version":1,"end":true,"schedules":99,"unreadable":0}"#
            .to_owned(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = import(&harness.server, &file).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for expected in [
        "line 3: not a line of an export",
        "line 4: invalid payload",
        r#"line 5: header "X": invalid value "a\r\nSched-At: 2001-01-01T00:00:00Z""#,
        r#"line 6: invalid header name "X\u{1b}[31m""#,
        r#"line 7: header "Sched-Delay" is natsched's own"#,
        r#"line 8: invalid id "bad id""#,
        r#"line 9: invalid subject "t.*""#,
        "line 10: invalid rule",
        "line 11: not a line of an export: unknown field `surprise`",
        "line 12: not a line of an export",
        r#"line 13 (id "refused"): refused: 400"#,
        "line 15: the end line says 99 schedules, the export holds 13 lines",
    ] {
        assert!(err.contains(expected), "{expected:?} in:\n{err}");
    }
    assert!(
        !err.chars().any(|c| c.is_control() && c != '\n'),
        "escaped: {err:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("imported 2, failed 1 (refused 400: 1), malformed lines 10"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        get(&client, "good").await["headers"]["A"],
        serde_json::json!(["1"])
    );
    get(&client, "good-2").await;
    assert_eq!(stats(&client).await["pending"], 2, "natsched is unharmed");

    // Not an export at all, or one of a later version: refused before anything is sent.
    std::fs::write(&file, line("x", "") + "\n").unwrap();
    let out = import(&harness.server, &file).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is not a natsched export: line 1 is not its header"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&file, "{\"format\":\"natsched-export\",\"version\":2}\n").unwrap();
    let out = import(&harness.server, &file).await;
    assert!(stderr(&out).contains("version 2"), "{}", stderr(&out));
    assert_eq!(stats(&client).await["pending"], 2);
    assert!(daemon.terminate().success());
}
