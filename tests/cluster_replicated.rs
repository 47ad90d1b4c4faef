//! Replicated mode on a real 3-node nats-server cluster (three processes routed on localhost,
//! JetStream, R3 log and lease) with three natsched processes.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures::StreamExt;

const REPLICATED: &str = "[cluster]\nmode = \"replicated\"\n";
const LEASE: Duration = Duration::from_secs(5);

/// One cluster test at a time: each runs three nats-servers and three or four natsched on a
/// small machine, and measures takeover times.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Instances {
    daemons: Vec<Option<DaemonProcess>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Instances {
    fn start(cluster: &NatsCluster, count: usize) -> Instances {
        Instances::start_with(cluster, count, "")
    }

    /// `count` replicated instances, `more` added to their config.
    fn start_with(cluster: &NatsCluster, count: usize, more: &str) -> Instances {
        let mut instances = Instances {
            daemons: Vec::new(),
            _dirs: Vec::new(),
        };
        for _ in 0..count {
            instances.add(cluster, more);
        }
        instances
    }

    /// Starts one more instance, on an empty store; returns its index.
    fn add(&mut self, cluster: &NatsCluster, more: &str) -> usize {
        let (store, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = format!("{REPLICATED}{more}");
        let daemon = DaemonProcess::spawn_with(&cluster.urls(), store.path(), dir.path(), &config);
        self.daemons.push(Some(daemon));
        self._dirs.extend([store, dir]);
        self.daemons.len() - 1
    }

    fn get(&self, i: usize) -> &DaemonProcess {
        self.daemons[i].as_ref().unwrap()
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.get(i).pid().to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The index of the instance that leads (waits until one says so).
    fn leader(&self) -> usize {
        self.leader_besides(&[])
    }

    /// The index of the instance that leads, not counting `former` leaders.
    fn leader_besides(&self, former: &[usize]) -> usize {
        let start = Instant::now();
        loop {
            let leading: Vec<usize> = (0..self.daemons.len())
                .filter(|i| !former.contains(i))
                .filter(|&i| self.daemons[i].as_ref().is_some_and(|d| leads(&d.log())))
                .collect();
            if let [one] = leading[..] {
                return one;
            }
            assert!(leading.len() < 2, "two instances lead: {leading:?}");
            assert!(start.elapsed() < WAIT * 2, "no instance leads");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the instance that wrote `log` leads now: it appended a lead entry and has not
/// stopped serving since. (Leadership may pass between survivors during a failover: two of
/// them can take the lease in the same instant on nats-server 2.9, whose KV `create` is not
/// atomic across a cluster; the log's compare-and-set fences the one that lost, which then
/// stops at its next renewal.)
fn leads(log: &str) -> bool {
    let Some(led) = log.rfind("leading: appended the lead entry") else {
        return false;
    };
    let stopped = ["stopping to serve", "could not take over"]
        .iter()
        .filter_map(|line| log.rfind(line))
        .max();
    stopped.is_none_or(|stopped| stopped < led)
}

/// Makes the R3 target stream `name` capturing `subjects`, with a duplicate window.
async fn target_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subjects: &str,
) -> async_nats::jetstream::stream::Stream {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        num_replicas: 3,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Waits until `stream` holds `count` messages, failing if it ever holds more.
async fn wait_holds_exactly(stream: &mut async_nats::jetstream::stream::Stream, count: usize) {
    let start = Instant::now();
    loop {
        // (The test's own connection may be moving to another node.)
        let Ok(info) = stream.info().await else {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the stream never answered"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let messages = info.state.messages;
        assert!(
            messages <= count as u64,
            "{messages} messages for {count} schedules"
        );
        if messages == count as u64 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {messages} of {count} arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a deposed leader has stopped serving and follows the log again.
async fn wait_follows_again(daemon: &DaemonProcess) {
    daemon.wait_for_log("stopped serving: the lease is lost");
    let start = Instant::now();
    while daemon.log().matches("following the replicated log").count() < 2 {
        assert!(
            start.elapsed() < WAIT * 2,
            "the deposed leader does not follow again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Delivered messages of `subject`: id -> (times delivered, first receipt).
type Deliveries = Arc<Mutex<HashMap<String, (u32, Instant)>>>;

async fn record(client: &async_nats::Client, subject: &str) -> Deliveries {
    let mut sub = subscribe(client, subject).await;
    let seen: Deliveries = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let id = sched_id(&message);
            let now = Instant::now();
            let mut seen = sink.lock().unwrap();
            seen.entry(id).or_insert((0, now)).0 += 1;
        }
    });
    seen
}

/// Schedules `count` messages on `target`, due from `first` (Unix ms) `spacing_us` apart;
/// returns id -> due for every acknowledged one (all must be).
async fn schedule_many(
    client: &async_nats::Client,
    target: &str,
    count: usize,
    first: u64,
    spacing_us: u64,
) -> HashMap<String, u64> {
    schedule_many_at_once(client, target, count, first, spacing_us, 128).await
}

/// [`schedule_many`] with `in_flight` requests waiting at once.
async fn schedule_many_at_once(
    client: &async_nats::Client,
    target: &str,
    count: usize,
    first: u64,
    spacing_us: u64,
    in_flight: usize,
) -> HashMap<String, u64> {
    let subject = format!("sched.add.{target}");
    let acked = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let subject = subject.clone();
            async move {
                let due = first + (i as u64 * spacing_us) / 1000;
                let at = jiff::Timestamp::from_millisecond(due as i64)
                    .unwrap()
                    .to_string();
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Sched-At", at.as_str());
                let reply = tokio::time::timeout(
                    WAIT,
                    client.request_with_headers(subject, headers, Bytes::from_static(b"x")),
                )
                .await
                .expect("ack in time")
                .expect("request");
                assert_eq!(error_code(&reply), None, "refused: {:?}", reply.payload);
                let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
                (body["id"].as_str().unwrap().to_owned(), due)
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    acked.into_iter().collect()
}

/// Waits until every id of `wanted` was delivered.
async fn wait_delivered(seen: &Deliveries, wanted: &HashMap<String, u64>, bound: Duration) {
    let start = Instant::now();
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            wanted.keys().filter(|id| !seen.contains_key(*id)).count()
        };
        if missing == 0 {
            return;
        }
        assert!(
            start.elapsed() < bound,
            "{missing} of {} acknowledged schedules never delivered",
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_the_leader_loses_nothing_and_a_follower_fires_within_lease_plus_2s() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let mut instances = Instances::start(&cluster, 3);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    let leader = instances.leader();
    for i in 0..3 {
        if i != leader {
            instances
                .get(i)
                .wait_for_log("following the leader of this prefix");
        }
    }
    // Service discovery shows every instance with its role.
    let mut roles = discovered_roles(&client).await;
    roles.sort();
    assert_eq!(roles, ["follower", "follower", "leader"]);
    let seen = record(&client, "ha.fired").await;

    // 20 000 schedules due over 10 s, starting once they are all in.
    let count = 20_000;
    let first = natsched::time::now_ms() + 12_000;
    let wanted = schedule_many(&client, "ha.fired", count, first, 500).await;
    assert_eq!(wanted.len(), count);
    let now = natsched::time::now_ms();
    assert!(
        now < first,
        "scheduling took too long to test a kill mid-way"
    );

    // Kill the leader mid-way through the due span.
    tokio::time::sleep(Duration::from_millis(first + 5_000 - now)).await;
    let killed_at = natsched::time::now_ms();
    let killed = Instant::now();
    instances.daemons[leader].take().unwrap().kill_9();

    wait_delivered(&seen, &wanted, Duration::from_secs(60)).await;
    // The first schedule due after the kill could only be fired by the new leader.
    let seen = seen.lock().unwrap();
    let first_fire = wanted
        .iter()
        .filter(|&(_, &due)| due > killed_at + 50)
        .map(|(id, _)| seen[id].1)
        .min()
        .expect("schedules due after the kill");
    let takeover = first_fire.duration_since(killed);
    let twice = seen.values().filter(|(n, _)| *n > 1).count();
    eprintln!("takeover: {takeover:?} after kill -9; delivered twice: {twice} of {count}");
    assert!(
        takeover <= LEASE + Duration::from_secs(2),
        "the new leader fired first {takeover:?} after the kill"
    );
    let new_leader = instances.leader();
    assert_ne!(new_leader, leader);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_joining_with_an_empty_disk_catches_up_and_fires_everything_alone() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let mut instances = Instances::start(&cluster, 2);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    let seen = record(&client, "join.fired").await;
    let count = 5_000;
    let first = natsched::time::now_ms() + 20_000;
    let wanted = schedule_many(&client, "join.fired", count, first, 1000).await;

    let fresh = instances.add(&cluster, "");
    instances
        .get(fresh)
        .wait_for_log("caught up with the replicated log");
    for i in 0..2 {
        instances.daemons[i].take().unwrap().kill_9();
    }
    assert!(
        natsched::time::now_ms() < first,
        "the test was too slow to kill before due"
    );
    assert_eq!(instances.leader(), fresh);
    wait_delivered(&seen, &wanted, Duration::from_secs(60)).await;
    let seen = seen.lock().unwrap();
    assert!(
        seen.values().all(|(n, _)| *n == 1),
        "none fired twice: nothing was in flight"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_fenced_off_and_the_target_stream_holds_each_message_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = target_stream(&js, "HA_TARGET", "ha.js.>").await;
    let more = "[delivery]\njetstream_subjects = [\"ha.js.>\"]\n";
    let instances = Instances::start_with(&cluster, 3, more);
    wait_ready(&client, "sched").await;
    let old = instances.leader();
    let count = 3_000;
    let first = natsched::time::now_ms() + 8_000;
    let wanted = schedule_many(&client, "ha.js.fired", count, first, 3000).await;
    assert_eq!(wanted.len(), count);

    // Paused (a long GC pause, a VM stall) while its schedules come due.
    let now = natsched::time::now_ms();
    tokio::time::sleep(Duration::from_millis(first + 1_000 - now)).await;
    instances.signal(old, "-STOP");
    tokio::time::sleep(LEASE + Duration::from_secs(3)).await;
    let new = instances.leader_besides(&[old]);
    instances.signal(old, "-CONT");

    // Everything reaches the target stream exactly once, whoever published it.
    wait_holds_exactly(&mut stream, count).await;
    // The old leader stepped down, appended nothing the new one had to refuse, and follows.
    wait_follows_again(instances.get(old)).await;
    let new_log = instances.get(new).log();
    assert!(
        !new_log.contains("the replicated log refused a change"),
        "{new_log}"
    );
    assert_eq!(stream.info().await.unwrap().state.messages, count as u64);
    assert_eq!(instances.leader_besides(&[old]), new);
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_one_nats_server_loses_nothing() {
    // Counted in an R3 target stream through JetStream delivery: core NATS itself may drop a
    // message in flight through a node that dies (and a subscriber on it misses what is
    // published while it reconnects), so only the stream shows what natsched guarantees.
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start().await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = target_stream(&js, "NODE_TARGET", "node.fired.>").await;
    let more = "[delivery]\njetstream_subjects = [\"node.fired.>\"]\n";
    let _instances = Instances::start_with(&cluster, 3, more);
    wait_ready(&client, "sched").await;
    let count = 10_000;
    let first = natsched::time::now_ms() + 10_000;
    let wanted = schedule_many(&client, "node.fired.x", count, first, 1000).await;
    assert_eq!(wanted.len(), count);
    let now = natsched::time::now_ms();
    tokio::time::sleep(Duration::from_millis(first + 4_000 - now)).await;
    cluster.nodes[0].go_down();
    wait_holds_exactly(&mut stream, count).await;
}

/// The log stream's size in bytes.
async fn log_bytes(client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("natsched_log_sched").await.unwrap();
    stream.info().await.unwrap().state.bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn churn_leaves_a_log_near_the_live_data_and_a_new_instance_boots_from_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    const SLACK: u64 = 1024 * 1024;
    let more = format!("[cluster]\nlog_slack = {SLACK}\n");
    let more = more.replacen("[cluster]\n", "", 1); // REPLICATED opens [cluster] already
    let cluster = NatsCluster::start().await;
    let mut instances = Instances::start_with(&cluster, 3, &more);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;

    // Live data: schedules due in an hour.
    let live = 1_000;
    let later = natsched::time::now_ms() + 3_600_000;
    let kept = schedule_many(&client, "churn.later", live, later, 1000).await;
    // Churn: schedules in and out (each due a second after it is made).
    let churn: usize = std::env::var("NATSCHED_CHURN")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let started = Instant::now();
    let mut peak = 0;
    for chunk in 0..churn.div_ceil(50_000) {
        let n = 50_000.min(churn - chunk * 50_000);
        let due = natsched::time::now_ms() + 1_000;
        schedule_many_at_once(&client, "churn.now", n, due, 0, 2048).await;
        peak = peak.max(log_bytes(&client).await);
    }
    eprintln!(
        "churned {churn} in {:?}; log peaked at >= {peak} bytes",
        started.elapsed()
    );
    let s = stats_when(&client, |s| s["pending"] == live as u64).await;
    assert_eq!(s["role"], "leader");

    // The log comes back near the live data (a checkpoint of it, plus the slack).
    let start = Instant::now();
    let bytes = loop {
        let bytes = log_bytes(&client).await;
        if bytes <= 2 * SLACK {
            break bytes;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the log still holds {bytes} bytes after churn"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let js = async_nats::jetstream::new(client.clone());
    let mut log = js.get_stream("natsched_log_sched").await.unwrap();
    let state = log.info().await.unwrap().state.clone();
    eprintln!(
        "log after churn: {bytes} bytes, entries {}..={} (peak seen >= {peak})",
        state.first_sequence, state.last_sequence
    );
    // Without compaction every entry would still be there.
    assert!(state.first_sequence > state.last_sequence / 2, "{state:?}");

    // A new instance boots from the compacted log, and alone it holds exactly the live data.
    let fresh = instances.add(&cluster, &more);
    instances
        .get(fresh)
        .wait_for_log("caught up with the replicated log");
    for i in 0..3 {
        instances.daemons[i].take().unwrap().kill_9();
    }
    assert_eq!(instances.leader(), fresh);
    wait_ready(&client, "sched").await;
    let s = stats_when(&client, |s| s["role"] == "leader").await;
    assert_eq!(s["pending"], live as u64, "{s}");
    let id = kept.keys().next().unwrap();
    let got = call(&client, "sched.get", id).await;
    assert_eq!(error_code(&got), None, "{:?}", got.payload);
}

/// The `role` of every instance answering `$SRV.INFO.natsched` within a second.
async fn discovered_roles(client: &async_nats::Client) -> Vec<String> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.INFO.natsched", inbox, Bytes::new())
        .await
        .unwrap();
    let mut roles = Vec::new();
    while let Ok(Some(answer)) = tokio::time::timeout(Duration::from_secs(1), answers.next()).await
    {
        let info: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
        roles.push(info["metadata"]["role"].as_str().unwrap_or("?").to_owned());
    }
    roles
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_stopped_with_sigterm_hands_over_at_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let mut instances = Instances::start(&cluster, 3);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    let old = instances.leader();
    let seen = record(&client, "handover.fired").await;
    let first = natsched::time::now_ms() + 4_000;
    let wanted = schedule_many(&client, "handover.fired", 2_000, first, 2000).await;
    // What is measured is the handover, not start-up: every instance follows first (one whose
    // first request met a forming JetStream cluster retries after its timeout).
    for i in 0..3 {
        instances
            .get(i)
            .wait_for_log("following the replicated log");
    }
    let stopped = Instant::now();
    assert!(instances.daemons[old].take().unwrap().terminate().success());
    let new = instances.leader();
    let took = stopped.elapsed();
    eprintln!("handover took {took:?} (SIGTERM to the new leader's lead entry)");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_ne!(new, old);
    wait_delivered(&seen, &wanted, Duration::from_secs(30)).await;
    let seen = seen.lock().unwrap();
    assert!(
        seen.values().all(|(n, _)| *n == 1),
        "a clean handover fires nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_appended_to_the_log_stops_nobody_and_loses_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let instances = Instances::start(&cluster, 3);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    instances.leader();
    let seen = record(&client, "garbage.fired").await;
    let first = natsched::time::now_ms() + 6_000;
    let mut wanted = schedule_many(&client, "garbage.fired", 1_000, first, 1000).await;
    // Someone allowed to publish on the log's subject appends what natsched never wrote.
    let js = async_nats::jetstream::new(client.clone());
    for body in [
        &b""[..],
        b"\x01",
        b"\x01\x01\x01\xff\xff\xff",
        b"\x07junk",
        b"\x01\x02{}",
    ] {
        js.publish("$NATSCHED.sched.log", Bytes::copy_from_slice(body))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The leader's next append fails (the log moved under it): it steps down, and whoever
    // leads next reads past the garbage. Requests keep being served.
    let start = Instant::now();
    let more = loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sched-Delay", "1s");
        let subject = "sched.add.garbage.fired";
        let reply = client
            .request_with_headers(subject, headers, Bytes::from_static(b"x"))
            .await;
        if let Ok(reply) = reply
            && error_code(&reply).is_none()
        {
            let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            break body;
        }
        assert!(
            start.elapsed() < WAIT * 2,
            "nobody serves after garbage in the log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wanted.insert(more["id"].as_str().unwrap().to_owned(), 0);
    wait_delivered(&seen, &wanted, Duration::from_secs(40)).await;
    for i in 0..3 {
        let log = instances.get(i).log();
        // The binary's last words on an error start its line with "natsched: ".
        let exited = log.lines().any(|line| line.starts_with("natsched: "));
        assert!(!exited, "instance {i} exited: {log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_cut_off_the_network_is_fenced_off_and_the_target_stream_holds_each_message_once()
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(netns) = Netns::create() else {
        return; // the reason was printed: not root, or no iproute2
    };
    let cluster = NatsCluster::start_on_all_addresses().await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = target_stream(&js, "HA_CUT", "ha.cut.>").await;
    let more = "[delivery]\njetstream_subjects = [\"ha.cut.>\"]\n";
    // The first instance runs in the namespace and leads; two more run on the host.
    let (store, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let inside = DaemonProcess::spawn_wrapped(
        &netns.exec(),
        &cluster.urls_at(&netns.host_ip),
        store.path(),
        dir.path(),
        &format!("{REPLICATED}{more}"),
    );
    inside.wait_for_log("leading: appended the lead entry");
    wait_ready(&client, "sched").await;
    let mut instances = Instances::start_with(&cluster, 2, more);
    for i in 0..2 {
        instances
            .get(i)
            .wait_for_log("following the leader of this prefix");
    }
    let count = 3_000;
    let first = natsched::time::now_ms() + 8_000;
    let wanted = schedule_many(&client, "ha.cut.fired", count, first, 3000).await;
    assert_eq!(wanted.len(), count);

    // Cut off while its schedules come due; joined again after another instance leads.
    let now = natsched::time::now_ms();
    tokio::time::sleep(Duration::from_millis(first + 1_000 - now)).await;
    netns.connect(false);
    let new = instances.leader();
    // It stops serving while still cut off: its own count of the lease ran out.
    inside.wait_for_log("stopped serving: the lease is lost");
    netns.connect(true);

    wait_holds_exactly(&mut stream, count).await;
    // Back on the network, the old leader follows; the new one never had an append refused.
    wait_follows_again(&inside).await;
    let new_log = instances.get(new).log();
    assert!(
        !new_log.contains("the replicated log refused a change"),
        "{new_log}"
    );
    // Whatever it still had buffered reached the stream as duplicates, and was dropped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stream.info().await.unwrap().state.messages, count as u64);
    instances.daemons.clear();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_jetstream_intake_requests_sent_during_a_failover_wait_and_all_fire() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let intake = "[intake]\nmode = \"jetstream\"\nreplicas = 3\n";
    let mut instances = Instances::start_with(&cluster, 3, intake);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    let leader = instances.leader();
    let seen = record(&client, "ji.fired").await;
    let js = async_nats::jetstream::new(client.clone());
    let start = Instant::now();
    while js.get_stream("SCHED_INTAKE").await.is_err() {
        assert!(
            start.elapsed() < WAIT,
            "the leader never made the intake stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Requests keep coming, published into the intake stream; the leader dies among them.
    let count = 3_000;
    let mut wanted = HashMap::new();
    for i in 0..count {
        if i == count / 3 {
            instances.daemons[leader].take().unwrap().kill_9();
        }
        let id = format!("req-{i}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sched-Delay", "2s");
        headers.insert("Sched-Id", id.as_str());
        let ack = js
            .publish_with_headers("sched.add.ji.fired", headers, Bytes::from_static(b"x"))
            .await
            .unwrap();
        tokio::time::timeout(WAIT, ack)
            .await
            .expect("PubAck in time")
            .expect("the intake stream takes requests during the failover");
        wanted.insert(id, 0);
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wait_delivered(&seen, &wanted, Duration::from_secs(60)).await;
    assert_ne!(instances.leader(), leader);
}

/// A series is one replicated record: after `kill -9` of the leader the new leader goes on
/// from the state the old one recorded through the log (its numbering, not from 1), with one
/// catch-up fire for the occurrences due during the takeover, then the cadence.
#[tokio::test(flavor = "multi_thread")]
async fn a_series_goes_on_from_its_replicated_state_after_the_leader_dies() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = NatsCluster::start().await;
    let mut instances = Instances::start(&cluster, 2);
    let client = cluster.client().await;
    wait_ready(&client, "sched").await;
    let leader = instances.leader();
    let mut sub = client.subscribe("series.ha").await.unwrap();
    client.flush().await.unwrap();
    let seq = |m: &async_nats::Message| -> u64 {
        m.headers
            .as_ref()
            .unwrap()
            .get("Sched-Seq")
            .unwrap()
            .as_str()
            .parse()
            .unwrap()
    };
    let due = |m: &async_nats::Message| -> u64 {
        let ts: jiff::Timestamp = m
            .headers
            .as_ref()
            .unwrap()
            .get("Sched-Due")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        ts.as_millisecond() as u64
    };
    schedule(
        &client,
        "series.ha",
        &[("Sched-Every", "1s"), ("Sched-Id", "ha")],
    )
    .await;
    let mut last = 0;
    while last < 3 {
        last = seq(&next(&mut sub).await);
    }
    instances.daemons[leader].take().unwrap().kill_9();
    // The old leader's last occurrence may come again (fired, its successor not yet in the
    // log); then one catch-up fire numbered past everything before, then the cadence.
    let mut message = next(&mut sub).await;
    while seq(&message) <= last {
        message = next(&mut sub).await;
    }
    let caught = seq(&message);
    assert!(caught > last, "numbering went on: {caught} after {last}");
    for n in 1..=2 {
        let following = next(&mut sub).await;
        assert_eq!(seq(&following), caught + n, "no burst of stale fires");
        assert_eq!(due(&following), due(&message) + n * 1000);
    }
    assert_ne!(instances.leader(), leader);
}
