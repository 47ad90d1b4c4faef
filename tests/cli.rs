//! The command-line client against a running daemon, and `check-config`.

mod common;

use std::process::Output;

use common::*;

async fn natsched(args: Vec<String>) -> Output {
    run_cli(args).await
}

fn args(list: &[&str], server: &NatsServer) -> Vec<String> {
    let mut out: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    out.extend(["--server".to_owned(), server.url.clone()]);
    out
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_get_cancel_from_the_command_line() {
    let (server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "orders.expired").await;

    let out = natsched(args(
        &[
            "schedule",
            "orders.expired",
            "{\"order\":7}",
            "--in",
            "1h",
            "--id",
            "o7",
            "-H",
            "Trace: x",
        ],
        &server,
    ))
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("scheduled o7 for "),
        "{}",
        stdout(&out)
    );

    let out = natsched(args(&["get", "o7", "--json"], &server)).await;
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["subject"], "orders.expired");
    assert_eq!(got["headers"]["Trace"], serde_json::json!(["x"]));
    let out = natsched(args(&["get", "o7"], &server)).await;
    assert!(
        stdout(&out).contains("subject: orders.expired"),
        "{}",
        stdout(&out)
    );

    let out = natsched(args(&["list", "--subject", "orders.*"], &server)).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("  o7  orders.expired"),
        "{}",
        stdout(&out)
    );
    let out = natsched(args(&["stats", "--json"], &server)).await;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["pending"], 1);
    let out = natsched(args(&["stats"], &server)).await;
    assert!(stdout(&out).contains("pending: 1"), "{}", stdout(&out));

    let out = natsched(args(&["cancel", "o7"], &server)).await;
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), "cancelled o7");
    // The daemon's error comes back with its code, and a non-zero exit.
    let out = natsched(args(&["cancel", "o7"], &server)).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );

    // --json prints the reply as is; a near schedule arrives.
    let out = natsched(args(
        &[
            "schedule",
            "orders.expired",
            "now",
            "--in",
            "100ms",
            "--json",
        ],
        &server,
    ))
    .await;
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = next(&mut sub).await;
    assert_eq!(sched_id(&message), reply["id"].as_str().unwrap());
    assert_eq!(message.payload.as_ref(), b"now");

    // A header NATS cannot carry is refused by the client itself, cleanly.
    let out = natsched(args(
        &["schedule", "x", "--in", "1m", "-H", "Tracé: x"],
        &server,
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid header"));

    // Refused by the daemon: a bad duration.
    let out = natsched(args(&["schedule", "x", "--in", "soon"], &server)).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_the_examples_and_names_a_bad_key() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let out = natsched(vec!["check-config".into(), path.display().to_string()]).await;
        assert!(out.status.success(), "{}: {out:?}", path.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\npaht = \"/tmp/x\"\n").unwrap();
    let out = natsched(vec!["check-config".into(), bad.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("paht"),
        "{out:?}"
    );
    // What start-up would refuse before connecting is refused here too.
    let missing = dir.path().join("missing.creds");
    let refused = [
        format!("[nats]\ncreds_file = \"{}\"\n", missing.display()),
        "[nats]\nurl = \"nats://a:b@127.0.0.1:4222\"\ntoken = \"t\"\n".to_owned(),
    ];
    for (text, named) in refused.iter().zip(["missing.creds", "token"]) {
        std::fs::write(&bad, text).unwrap();
        let out = natsched(vec!["check-config".into(), bad.display().to_string()]).await;
        assert_eq!(out.status.code(), Some(1), "{text}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(named), "{text}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_schedules_from_the_command_line() {
    let (server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "beat").await;
    let out = natsched(args(
        &[
            "schedule",
            "reports.daily",
            "r",
            "--cron",
            "0 6 * * MON-FRI",
            "--tz",
            "Europe/Berlin",
            "--id",
            "daily",
            "--until",
            "2030-01-01T00:00:00Z",
        ],
        &server,
    ))
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = natsched(args(&["get", "daily"], &server)).await;
    let shown = stdout(&out);
    for line in [
        "cron: 0 6 * * MON-FRI",
        "tz: Europe/Berlin",
        "next_seq: 1",
        "fired: 0",
    ] {
        assert!(shown.contains(line), "{line:?} in {shown}");
    }
    let out = natsched(args(
        &[
            "schedule", "beat", "b", "--every", "1s", "--count", "2", "--json",
        ],
        &server,
    ))
    .await;
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for seq in ["1", "2"] {
        let message = next(&mut sub).await;
        assert_eq!(sched_id(&message), reply["id"].as_str().unwrap());
        let headers = message.headers.as_ref().unwrap();
        assert_eq!(headers.get("Sched-Seq").unwrap().as_str(), seq);
    }
    // --tz needs --cron (clap), and the daemon refuses what does not combine.
    let out = natsched(args(
        &["schedule", "x", "--every", "1s", "--tz", "UTC"],
        &server,
    ))
    .await;
    assert!(!out.status.success());
    let out = natsched(args(
        &["schedule", "x", "--every", "1s", "--in", "1s"],
        &server,
    ))
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400"),
        "{out:?}"
    );
    // A value NATS cannot carry is refused by the client itself, cleanly.
    let out = natsched(args(
        &["schedule", "x", "--cron", "* * * * *\r\nX: y"],
        &server,
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid header"),
        "{out:?}"
    );
    daemon.stop().await;
}

#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    // `natsched list | head -1`: the reader has gone before natsched writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/natsched.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natsched"))
        .arg("check-config")
        .arg(&config)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert!(out.status.success(), "{out:?}");
}
