//! Test harness: a real `nats-server` per test, and natsched in-process or as its binary.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod raw;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use natsched::config::Config;
use tempfile::TempDir;
use tokio::sync::oneshot;

/// Bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// The nats-server binary: `NATSCHED_NATS_SERVER`, else `PATH`, else `/usr/sbin/nats-server`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATSCHED_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"));
    assert!(
        path.is_file(),
        "no nats-server found: set NATSCHED_NATS_SERVER, put it on PATH, or `apt-get install nats-server`"
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A nats-server on a free loopback port, killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
    /// The HTTP monitoring port, if started with [`NatsServer::start_monitored`].
    pub monitor_port: Option<u16>,
    dir: TempDir,
    /// Its command-line arguments beyond address and port (kept for [`NatsServer::come_back`]).
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_on(free_port(), tempfile::tempdir().unwrap())
    }

    /// A server with its HTTP monitoring on (see [`NatsServer::connections`]) and the config
    /// file text `config` (e.g. `"max_payload: 8MB"`).
    pub fn start_monitored(config: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nats.conf"), config).unwrap();
        let monitor = free_port();
        let mut server = NatsServer::spawn(
            free_port(),
            dir,
            &["-m", &monitor.to_string(), "-c", "nats.conf"],
        );
        server.monitor_port = Some(monitor);
        wait_until("nats-server monitoring to listen", || {
            TcpStream::connect(("127.0.0.1", monitor)).is_ok()
        });
        server
    }

    /// A server started with the config file text `config`.
    pub fn start_with_config(config: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nats.conf"), config).unwrap();
        NatsServer::spawn(free_port(), dir, &["-c", "nats.conf"])
    }

    /// Restarts the server on the same port with the config file text `config` (clients see
    /// a reconnect).
    pub fn reconfigure(&mut self, config: &str) {
        self.go_down();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        std::fs::write(dir.path().join("nats.conf"), config).unwrap();
        *self = NatsServer::spawn(self.port, dir, &["-c", "nats.conf"]);
    }

    /// The server's client connections with their subscriptions (monitoring `/connz`).
    pub fn connections(&self) -> Vec<serde_json::Value> {
        let port = self.monitor_port.expect("started with monitoring");
        let body = raw::http_get(port, "/connz?subs=1&limit=1024");
        let connz: serde_json::Value = serde_json::from_slice(&body).unwrap();
        connz["connections"].as_array().cloned().unwrap_or_default()
    }

    pub fn start_on(port: u16, dir: TempDir) -> NatsServer {
        NatsServer::spawn(port, dir, &[])
    }

    /// A server with JetStream, storing in its own directory (kept when it goes down and
    /// comes back).
    pub fn start_jetstream() -> NatsServer {
        NatsServer::spawn(
            free_port(),
            tempfile::tempdir().unwrap(),
            &["-js", "-sd", "js"],
        )
    }

    fn spawn(port: u16, dir: TempDir, extra: &[&str]) -> NatsServer {
        // Its log goes to its directory, and is shown if it does not come up.
        let log_path = dir.path().join("nats-server.log");
        let log = std::fs::File::create(&log_path).expect("nats-server log file");
        let mut child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("--pid")
            .arg(dir.path().join("nats.pid"))
            .args(extra)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let url = format!("nats://127.0.0.1:{port}");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > WAIT {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("nats-server on port {port} did not come up ({exited:?}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        NatsServer {
            child,
            port,
            url,
            monitor_port: None,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Stops the server, as an outage would.
    pub fn go_down(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the server again on the same port after [`NatsServer::go_down`].
    pub fn come_back(&mut self) {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let extra = std::mem::take(&mut self.extra);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        *self = NatsServer::spawn(self.port, dir, &extra);
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(server: &NatsServer) -> Client {
    async_nats::connect(server.url.as_str()).await.unwrap()
}

/// A subscription that the server has registered (so nothing published after it is missed).
pub async fn subscribe(client: &Client, subject: &str) -> async_nats::Subscriber {
    let sub = client.subscribe(subject.to_owned()).await.unwrap();
    client.flush().await.unwrap();
    sub
}

/// The usual setup: a server, a store, natsched on them with `config` adjusted by `tweak`, and
/// a client.
pub async fn setup(tweak: impl FnOnce(&mut Config)) -> (NatsServer, TempDir, Daemon, Client) {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    tweak(&mut config);
    let daemon = Daemon::start(config).await;
    let client = connect(&server).await;
    (server, store, daemon, client)
}

/// A config for a test daemon against `server`, storing in `store`.
pub fn config(server: &NatsServer, store: &Path) -> Config {
    let mut config = Config::default();
    config.nats.url = server.url.clone();
    config.store.path = store.to_owned();
    config.store.cache_capacity = 16 * 1024 * 1024;
    config
}

/// natsched running in-process.
pub struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), natsched::RunError>>,
}

impl Daemon {
    /// Starts the daemon and waits until it answers requests.
    pub async fn start(config: Config) -> Daemon {
        // Logs show with `RUST_LOG=natsched=debug cargo test -- --nocapture`.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let prefix = config.api.prefix.clone();
        let (stop, stopped) = oneshot::channel();
        // Connected as natsched itself would be (credentials, TLS).
        let (options, urls) =
            natsched::connect::for_daemon(&config.nats, async_nats::ConnectOptions::new())
                .await
                .unwrap();
        let task = tokio::spawn(natsched::run(config, async {
            let _ = stopped.await;
        }));
        let client = options.connect(urls).await.unwrap();
        wait_ready(&client, &prefix).await;
        Daemon {
            stop: Some(stop),
            task,
        }
    }

    /// Graceful shutdown (as on SIGTERM); panics if the daemon reports an error.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("daemon stops in time")
            .expect("daemon task")
            .expect("daemon exits cleanly");
    }
}

/// Waits until a daemon answers on `prefix` (a bare `P.add` always gets a 400).
pub async fn wait_ready(client: &Client, prefix: &str) {
    let start = Instant::now();
    loop {
        let request = client.request(format!("{prefix}.add"), Bytes::new());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_millis(500), request).await
            && error_code(&reply).is_some()
        {
            return;
        }
        assert!(start.elapsed() < WAIT, "natsched did not start answering");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the natsched binary with `args` (off the async runtime: it blocks) and returns what
/// it printed and how it exited.
pub async fn run_cli<S: AsRef<std::ffi::OsStr> + Send + 'static>(
    args: Vec<S>,
) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_natsched"))
            .args(&args)
            .output()
            .expect("run natsched")
    })
    .await
    .unwrap()
}

/// natsched running as its own process (for kill -9 and signal tests).
pub struct DaemonProcess {
    child: Child,
    pub config_path: PathBuf,
    /// Everything it wrote to stderr so far (also echoed to the test's stderr).
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// The thread copying stderr into `log`; it ends when the process has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A nats-server and a store for natsched run as its binary, started and restarted (or
/// killed) by a test as often as it likes.
pub struct ProcessHarness {
    pub server: NatsServer,
    store: TempDir,
    dir: TempDir,
}

impl ProcessHarness {
    pub fn new() -> ProcessHarness {
        ProcessHarness {
            server: NatsServer::start(),
            store: tempfile::tempdir().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A harness around `server` (e.g. one with JetStream).
    pub fn with_server(server: NatsServer) -> ProcessHarness {
        ProcessHarness {
            server,
            store: tempfile::tempdir().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The store directory natsched runs on.
    pub fn store_path(&self) -> &Path {
        self.store.path()
    }

    /// The directory its config file goes to.
    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts natsched on this harness's store; waits until it answers.
    pub async fn start(&self) -> DaemonProcess {
        DaemonProcess::start(&self.server, self.store.path(), self.dir.path()).await
    }

    /// Starts natsched with `more` added to its config (see [`DaemonProcess::spawn_with`]);
    /// waits until it answers.
    pub async fn start_with(&self, more: &str) -> DaemonProcess {
        let daemon =
            DaemonProcess::spawn_with(&self.server.url, self.store.path(), self.dir.path(), more);
        wait_ready(&connect(&self.server).await, "sched").await;
        daemon
    }
}

/// How [`DaemonProcess::spawn_as`] starts natsched.
pub struct Spawn<'a> {
    /// A command natsched runs under (e.g. `ip netns exec NAME`, which execs it).
    pub wrapper: &'a [&'a str],
    /// Top-level keys of the config file (before every section).
    pub top: &'a str,
    /// Environment variables besides the test's own.
    pub env: &'a [(&'a str, &'a str)],
    /// `RUST_LOG`, or none (the config file's `log_level` decides).
    pub rust_log: Option<&'a str>,
}

impl Default for Spawn<'_> {
    fn default() -> Self {
        Spawn {
            wrapper: &[],
            top: "",
            env: &[],
            rust_log: Some("natsched=debug"),
        }
    }
}

impl DaemonProcess {
    /// Writes a config file into `dir` and starts the binary; waits until it answers.
    pub async fn start(server: &NatsServer, store: &Path, dir: &Path) -> DaemonProcess {
        let daemon = DaemonProcess::spawn(&server.url, store, dir);
        wait_ready(&connect(server).await, "sched").await;
        daemon
    }

    /// Writes a config file (NATS at `url`) into `dir` and starts the binary, without waiting.
    pub fn spawn(url: &str, store: &Path, dir: &Path) -> DaemonProcess {
        DaemonProcess::spawn_with(url, store, dir, "")
    }

    /// [`DaemonProcess::spawn`] with `more` (TOML: further keys of `[store]`, then further
    /// sections) appended to the config file.
    pub fn spawn_with(url: &str, store: &Path, dir: &Path, more: &str) -> DaemonProcess {
        DaemonProcess::spawn_wrapped(&[], url, store, dir, more)
    }

    /// [`DaemonProcess::spawn_with`], run through `wrapper` (e.g. `ip netns exec NAME`, which
    /// execs it, so the pid is natsched's).
    pub fn spawn_wrapped(
        wrapper: &[&str],
        url: &str,
        store: &Path,
        dir: &Path,
        more: &str,
    ) -> DaemonProcess {
        let spawn = Spawn {
            wrapper,
            ..Spawn::default()
        };
        DaemonProcess::spawn_as(spawn, url, store, dir, more)
    }

    /// [`DaemonProcess::spawn_with`] as `spawn` says.
    pub fn spawn_as(
        spawn: Spawn<'_>,
        url: &str,
        store: &Path,
        dir: &Path,
        more: &str,
    ) -> DaemonProcess {
        let Spawn {
            wrapper,
            top,
            env,
            rust_log,
        } = spawn;
        let config_path = dir.join("natsched.toml");
        std::fs::write(
            &config_path,
            format!(
                "{top}[nats]\nurl = \"{}\"\n[api]\nprefix = \"sched\"\n[store]\npath = \"{}\"\n{more}",
                url,
                store.display()
            ),
        )
        .unwrap();
        let binary = env!("CARGO_BIN_EXE_natsched");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.args(["run", "--config"]).arg(&config_path);
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn natsched");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        DaemonProcess {
            child,
            config_path,
            log,
            reader: Some(reader),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until its stderr holds `needle`; returns the log so far.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let mut log = String::new();
        wait_until(&format!("natsched to log {needle:?}"), || {
            log = self.log.lock().unwrap().clone();
            log.contains(needle)
        });
        log
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn kill_9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// Waits (bounded) for it to exit by itself; returns the status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Everything it wrote is in `log` once the reader has met the pipe's end.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(start.elapsed() < WAIT, "natsched did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < WAIT,
                "natsched did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The micro-service error code of a reply, if it is an error.
pub fn error_code(reply: &Message) -> Option<u16> {
    reply
        .headers
        .as_ref()?
        .get("Nats-Service-Error-Code")?
        .as_str()
        .parse()
        .ok()
}

/// Sends a schedule request and returns the reply.
pub async fn request(
    client: &Client,
    subject: &str,
    headers: &[(&str, &str)],
    payload: &'static [u8],
) -> Message {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(*name, *value);
    }
    tokio::time::timeout(
        WAIT,
        client.request_with_headers(subject.to_string(), map, Bytes::from_static(payload)),
    )
    .await
    .expect("reply in time")
    .expect("request")
}

/// Schedules on `sched.add.<target>` and returns the acked (id, due ms).
pub async fn schedule(client: &Client, target: &str, headers: &[(&str, &str)]) -> (String, u64) {
    let reply = request(client, &format!("sched.add.{target}"), headers, b"payload").await;
    assert_eq!(error_code(&reply), None, "refused: {:?}", reply.payload);
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    let due: jiff::Timestamp = body["due"].as_str().unwrap().parse().unwrap();
    (id, due.as_millisecond() as u64)
}

/// Receives the next message, failing after [`WAIT`].
pub async fn next(sub: &mut async_nats::Subscriber) -> Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message in time")
        .expect("subscription open")
}

/// Asserts nothing arrives on `sub` within `quiet`.
pub async fn assert_quiet(sub: &mut async_nats::Subscriber, quiet: Duration) {
    if let Ok(Some(message)) = tokio::time::timeout(quiet, sub.next()).await {
        panic!("unexpected message: {message:?}");
    }
}

/// The `Sched-Id` header of a delivered message.
pub fn sched_id(message: &Message) -> String {
    message
        .headers
        .as_ref()
        .unwrap()
        .get("Sched-Id")
        .unwrap()
        .as_str()
        .to_owned()
}

/// natsched's `stats` answer.
pub async fn stats(client: &Client) -> serde_json::Value {
    let request = client.request("sched.stats", Bytes::new());
    let reply = tokio::time::timeout(WAIT, request)
        .await
        .expect("reply in time")
        .expect("request");
    serde_json::from_slice(&reply.payload).unwrap()
}

/// Polls stats until `done` holds (the store counts a fired schedule out within 100 ms).
pub async fn stats_when(
    client: &Client,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = stats(client).await;
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < WAIT, "stats never got there: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `body` to `subject` as a request and returns the reply.
pub async fn call(client: &Client, subject: &str, body: &str) -> Message {
    let request = client.request(subject.to_owned(), Bytes::from(body.to_owned()));
    tokio::time::timeout(WAIT, request)
        .await
        .expect("reply in time")
        .expect("request")
}

/// Cancels `id`: the reply body, or the error code.
pub async fn cancel(client: &Client, id: &str) -> Result<serde_json::Value, u16> {
    let reply = call(client, "sched.cancel", id).await;
    match error_code(&reply) {
        Some(code) => Err(code),
        None => Ok(serde_json::from_slice(&reply.payload).unwrap()),
    }
}

/// Sends a schedule request onto `target`; returns the error code and description if it is
/// refused.
pub async fn try_add(
    client: &Client,
    target: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let reply = request(client, &format!("sched.add.{target}"), headers, b"x").await;
    let code = error_code(&reply)?;
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let description = body["error"]["description"].as_str().unwrap().to_owned();
    Some((code, description))
}

/// Three nats-server processes routed into one cluster on localhost, each with JetStream and
/// its own store directory.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream has a meta leader.
    pub async fn start() -> NatsCluster {
        NatsCluster::start_with(&[]).await
    }

    /// [`NatsCluster::start`] with `more` arguments for every node.
    async fn start_with(more: &[&str]) -> NatsCluster {
        // Six distinct ports (a port handed out twice would keep a node from starting).
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < 6 {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let (routes, clients) = ports.split_at(3);
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (0..3)
            .map(|i| {
                let args = [
                    "-js".to_owned(),
                    "-sd".to_owned(),
                    "js".to_owned(),
                    "-n".to_owned(),
                    format!("n{i}"),
                    "--cluster_name".to_owned(),
                    "natsched-test".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".to_owned(),
                    route_urls.clone(),
                ];
                let args: Vec<&str> = args
                    .iter()
                    .map(String::as_str)
                    .chain(more.iter().copied())
                    .collect();
                NatsServer::spawn(clients[i], tempfile::tempdir().unwrap(), &args)
            })
            .collect();
        let cluster = NatsCluster { nodes };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Like [`NatsCluster::start`], the nodes listening on every address (for clients in
    /// another network namespace).
    pub async fn start_on_all_addresses() -> NatsCluster {
        NatsCluster::start_with(&["-a", "0.0.0.0"]).await
    }

    /// Every node's URL at `host` instead of 127.0.0.1, comma-separated.
    pub fn urls_at(&self, host: &str) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://{host}:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's URL, comma-separated (for natsched's `[nats] url`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client connected to any node.
    pub async fn client(&self) -> Client {
        let addrs: Vec<async_nats::ServerAddr> =
            self.nodes.iter().map(|n| n.url.parse().unwrap()).collect();
        async_nats::connect(addrs).await.unwrap()
    }

    /// Waits until JetStream answers (a meta leader was elected).
    pub async fn wait_for_jetstream(&self) {
        let client = self.client().await;
        let start = Instant::now();
        loop {
            let answer = client.request("$JS.API.INFO", Bytes::new());
            if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), answer).await {
                let body: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                if body.get("error").is_none() && body.get("type").is_some() {
                    return;
                }
            }
            assert!(
                start.elapsed() < WAIT * 2,
                "JetStream never got a meta leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A network namespace joined to the host by a veth pair, for cutting a process off the
/// network (as root). Removed when dropped.
pub struct Netns {
    pub name: String,
    host_link: String,
    /// The host's address as seen from inside.
    pub host_ip: String,
}

impl Netns {
    /// Makes one, or `None` (with the reason printed) where the machine does not allow it.
    pub fn create() -> Option<Netns> {
        let tag = std::process::id() % 10_000;
        let name = format!("natsched-{tag}");
        let (host_link, inner_link) = (format!("nsh{tag}"), format!("nsi{tag}"));
        let subnet = format!("10.{}.{}", 100 + tag % 100, tag / 100 % 250);
        let host_ip = format!("{subnet}.1");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_link.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                inner_link.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                inner_link.clone(),
                "netns".into(),
                name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/24"),
                "dev".into(),
                host_link.clone(),
            ],
            vec!["link".into(), "set".into(), host_link.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{subnet}.2/24"),
                "dev".into(),
                inner_link.clone(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                inner_link.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        let netns = Netns {
            name,
            host_link,
            host_ip,
        };
        for step in steps {
            let output = Command::new("ip").args(&step).output();
            match output {
                Ok(output) if output.status.success() => {}
                Ok(output) => {
                    eprintln!(
                        "skipped: cannot make a network namespace (ip {}): {}",
                        step.join(" "),
                        String::from_utf8_lossy(&output.stderr)
                    );
                    return None;
                }
                Err(err) => {
                    eprintln!("skipped: no `ip` command: {err}");
                    return None;
                }
            }
        }
        Some(netns)
    }

    /// The command prefix that runs a program inside.
    pub fn exec(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }

    /// Cuts the namespace off the host's network (`false`), or joins it again (`true`).
    pub fn connect(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let status = Command::new("ip")
            .args(["link", "set", &self.host_link, state])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
