//! Running as a service: the Prometheus page, JSON logs, SIGHUP, and systemd's notify
//! protocol (a test socket stands in for systemd). Real nats-server, natsched as a process.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// `GET /metrics` over plain HTTP/1.0: the status line and the body.
fn scrape(port: u16) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// The samples of a scrape by series (name and labels, as written).
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// Scrapes until `done` holds.
fn scrape_until(
    port: u16,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let start = Instant::now();
    loop {
        let samples = samples(&scrape(port).1);
        if done(&samples) {
            return samples;
        }
        assert!(start.elapsed() < WAIT, "{what}: {samples:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_page_shows_the_counters_move() {
    let harness = ProcessHarness::new();
    let port = free_port();
    let _daemon = harness
        .start_with(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"))
        .await;
    let (head, body) = scrape(port);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let before = samples(&body);
    assert_eq!(before["natsched_scheduled_total"], 0.0);
    assert_eq!(before["natsched_nats_connected"], 1.0);
    assert_eq!(before["natsched_role{role=\"unguarded\"}"], 1.0, "{body}");
    assert!(before["natsched_store_size_bytes"] > 0.0);
    for line in [
        "# TYPE natsched_fire_lateness_seconds histogram",
        "# TYPE natsched_commit_round_duration_seconds histogram",
        "# TYPE natsched_rejected_total counter",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }

    let client = connect(&harness.server).await;
    let mut fired = subscribe(&client, "metrics.fired").await;
    for _ in 0..3 {
        schedule(&client, "metrics.fired", &[("Sched-Delay", "50ms")]).await;
    }
    let (later, _) = schedule(&client, "metrics.later", &[("Sched-Delay", "1h")]).await;
    cancel(&client, &later).await.unwrap();
    let refused = request(
        &client,
        "sched.add.metrics.bad",
        &[("Sched-Delay", "soon")],
        b"",
    )
    .await;
    assert_eq!(error_code(&refused), Some(400));
    for _ in 0..3 {
        next(&mut fired).await;
    }
    // The store counts a fired schedule out within 100 ms of its publish.
    let after = scrape_until(port, "three fired and counted out", |s| {
        s["natsched_fired_total"] == 3.0 && s["natsched_pending"] == 0.0
    });
    assert_eq!(after["natsched_scheduled_total"], 4.0);
    assert_eq!(after["natsched_cancelled_total"], 1.0);
    // (`wait_ready`'s probe was refused with a 400 before `before`.)
    let code_400 = "natsched_rejected_total{endpoint=\"add\",code=\"400\"}";
    assert_eq!(after[code_400], before[code_400] + 1.0);
    assert_eq!(
        after["natsched_rejected_total{endpoint=\"add\",code=\"403\"}"],
        0.0
    );
    assert_eq!(after["natsched_requests_total{endpoint=\"cancel\"}"], 1.0);
    assert_eq!(after["natsched_fire_lateness_seconds_count"], 3.0);
    assert_eq!(
        after["natsched_fire_lateness_seconds_bucket{le=\"+Inf\"}"],
        3.0
    );
    assert!(
        after["natsched_commit_round_size_count"] >= 2.0,
        "{after:?}"
    );
    assert!(after["natsched_commit_round_size_sum"] >= 5.0, "{after:?}");
    assert!(after["natsched_commit_round_duration_seconds_count"] >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_http_clients_cost_the_metrics_page_a_wait_and_the_daemon_nothing() {
    let harness = ProcessHarness::new();
    let port = free_port();
    let daemon = harness
        .start_with(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n"))
        .await;
    // Garbage, an endless header line, a request to another path: answered or closed.
    for bytes in [
        b"\x00\xff\r\n\r\n".to_vec(),
        [
            b"GET /metrics HTTP/1.1\r\nX: ".to_vec(),
            vec![b'a'; 1 << 20],
        ]
        .concat(),
        b"GET /../../etc/passwd HTTP/1.0\r\n\r\n".to_vec(),
    ] {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let _ = stream.write_all(&bytes);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            !String::from_utf8_lossy(&answer).contains(" 200 "),
            "{answer:?}"
        );
    }
    // More slow clients than it serves at once, each sending half a request and waiting.
    let slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x")
                .unwrap();
            stream
        })
        .collect();
    // Scheduling and firing go on meanwhile, and the page answers once their headers time out.
    let client = connect(&harness.server).await;
    let mut fired = subscribe(&client, "slow.fired").await;
    schedule(&client, "slow.fired", &[("Sched-Delay", "10ms")]).await;
    next(&mut fired).await;
    let (head, body) = scrape(port);
    assert!(head.contains(" 200 "), "{head}");
    assert!(body.contains("natsched_fired_total 1"), "{body}");
    // A client that never finishes its request is closed (the header timeout), not kept.
    let mut first = &slow[0];
    first.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    match first.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(err) => assert!(
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a slow client is still connected after {WAIT:?}"
        ),
    }
    drop(slow);
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_metrics_port_already_taken_stops_start_up_with_the_reason() {
    let harness = ProcessHarness::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let more = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut daemon = DaemonProcess::spawn_with(
        &harness.server.url,
        harness.store_path(),
        harness.dir_path(),
        &more,
    );
    assert!(!daemon.wait_exit().success());
    // (Its last lines may still be on their way from the pipe.)
    daemon.wait_for_log(&format!("cannot listen on 127.0.0.1:{port} for [metrics]"));
}

/// Starts natsched with the config's own log settings (no RUST_LOG).
fn spawn_logging(harness: &ProcessHarness, top: &str, env: &[(&str, &str)]) -> DaemonProcess {
    let spawn = Spawn {
        top,
        env,
        rust_log: None,
        ..Spawn::default()
    };
    DaemonProcess::spawn_as(
        spawn,
        &harness.server.url,
        harness.store_path(),
        harness.dir_path(),
        "",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_lines_parse_and_carry_level_and_message() {
    let harness = ProcessHarness::new();
    let daemon = spawn_logging(&harness, "log_format = \"json\"\n", &[]);
    let client = connect(&harness.server).await;
    wait_ready(&client, "sched").await;
    let log = daemon.wait_for_log("accepting schedules");
    let mut fired = subscribe(&client, "json.fired").await;
    let lines_before = log.lines().count();
    for _ in 0..50 {
        schedule(&client, "json.fired", &[("Sched-Delay", "10ms")]).await;
    }
    for _ in 0..50 {
        next(&mut fired).await;
    }
    let log = daemon.log();
    // At info, natsched logs its life, never a line per message.
    assert!(log.lines().count() < lines_before + 5, "{log}");
    let mut messages = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        messages.push(
            event["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    assert!(messages.iter().any(|m| m == "store open"), "{messages:?}");
    assert!(
        messages.iter().any(|m| m == "accepting schedules"),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_log_level_and_survives_a_broken_config() {
    let harness = ProcessHarness::new();
    let daemon = spawn_logging(&harness, "log_level = \"warn\"\n", &[]);
    let client = connect(&harness.server).await;
    wait_ready(&client, "sched").await;
    assert!(
        !daemon.log().contains("accepting schedules"),
        "{}",
        daemon.log()
    );

    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    let info = config.replace("log_level = \"warn\"", "log_level = \"info\"");
    std::fs::write(&daemon.config_path, &info).unwrap();
    let hangup = |pid: u32| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hangup(daemon.pid());
    daemon.wait_for_log("SIGHUP: log level reloaded");

    std::fs::write(&daemon.config_path, format!("{info}\nnot toml at all")).unwrap();
    hangup(daemon.pid());
    daemon.wait_for_log("SIGHUP: the config file is not valid; nothing changed");
    // Still serving.
    schedule(&client, "hup.later", &[("Sched-Delay", "1h")]).await;
    assert!(daemon.terminate().success());
}

/// A stand-in for systemd's notify socket, and what natsched sent to it.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next datagram within `bound`, if any.
    fn next(&self, bound: Duration) -> Option<String> {
        let start = Instant::now();
        let mut buffer = [0u8; 4096];
        while start.elapsed() < bound {
            if let Ok(n) = self.socket.recv(&mut buffer) {
                return Some(String::from_utf8_lossy(&buffer[..n]).into_owned());
            }
        }
        None
    }

    /// Reads datagrams until one contains `needle`; returns it.
    fn wait_for(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let left = WAIT.saturating_sub(start.elapsed());
            match self.next(left) {
                Some(message) if message.contains(needle) => return message,
                Some(_) => {}
                None => panic!("no {needle:?} from natsched within {WAIT:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_once_it_serves_watchdog_beats_and_stopping() {
    let harness = ProcessHarness::new();
    let notify = NotifySocket::bind();
    let socket = notify.path.to_str().unwrap().to_owned();
    let env = [
        ("NOTIFY_SOCKET", socket.as_str()),
        ("WATCHDOG_USEC", "400000"),
    ];
    let daemon = spawn_logging(&harness, "", &env);
    let ready = notify.wait_for("READY=1");
    assert!(
        ready.contains("STATUS=serving prefix \"sched\" as unguarded"),
        "{ready}"
    );
    // Ready means the subscriptions exist: a request right away is answered.
    let client = connect(&harness.server).await;
    let reply = request(
        &client,
        "sched.add.ready.later",
        &[("Sched-Delay", "1h")],
        b"",
    )
    .await;
    assert_eq!(error_code(&reply), None);
    // Keep-alives every quarter of the period (100 ms): several within a second.
    let start = Instant::now();
    let mut beats = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if notify
            .next(Duration::from_millis(200))
            .is_some_and(|m| m.contains("WATCHDOG=1"))
        {
            beats += 1;
        }
    }
    assert!(beats >= 3, "{beats} keep-alives in a second");
    let pid = daemon.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    notify.wait_for("STOPPING=1");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_instance_is_ready_and_says_whom_it_waits_for() {
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let _serving = harness.start_with("[cluster]\nlease = \"2s\"\n").await;
    let notify = NotifySocket::bind();
    let socket = notify.path.to_str().unwrap().to_owned();
    let env = [("NOTIFY_SOCKET", socket.as_str())];
    let (store, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spawn = Spawn {
        env: &env,
        ..Spawn::default()
    };
    let _standby = DaemonProcess::spawn_as(
        spawn,
        &harness.server.url,
        store.path(),
        dir.path(),
        "[cluster]\nlease = \"2s\"\n",
    );
    let ready = notify.wait_for("READY=1");
    assert!(ready.contains("STATUS=standby: "), "{ready}");
    assert!(ready.contains("waiting for its lease"), "{ready}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_restarted_on_a_quiet_log_is_ready_at_once() {
    let replicated = "[cluster]\nmode = \"replicated\"\nreplicas = 1\nlease = \"2s\"\n";
    let harness = ProcessHarness::with_server(NatsServer::start_jetstream());
    let _leader = harness.start_with(replicated).await;
    let client = connect(&harness.server).await;
    schedule(&client, "quiet.later", &[("Sched-Delay", "1h")]).await;
    let (store, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let follow = |notify: &NotifySocket| {
        let socket = notify.path.to_str().unwrap().to_owned();
        let env = [("NOTIFY_SOCKET", socket.as_str())];
        let spawn = Spawn {
            env: &env,
            ..Spawn::default()
        };
        DaemonProcess::spawn_as(
            spawn,
            &harness.server.url,
            store.path(),
            dir.path(),
            replicated,
        )
    };
    let notify = NotifySocket::bind();
    let follower = follow(&notify);
    let ready = notify.wait_for("READY=1");
    assert!(
        ready.contains("STATUS=following the replicated log, caught up"),
        "{ready}"
    );
    assert!(follower.terminate().success());
    // Nothing new in the log: no entry comes to say it is caught up.
    let notify = NotifySocket::bind();
    let _follower = follow(&notify);
    let ready = notify.wait_for("READY=1");
    assert!(ready.contains("caught up"), "{ready}");
}
