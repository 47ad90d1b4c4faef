//! A full disk: new schedules get 503 while stored ones keep firing, and natsched recovers by
//! itself once there is room again. The store is on a small tmpfs filled for real; where the
//! test may not mount one (not root), it says so and stops, and the committer's unit tests
//! cover the same path with an injected write error.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs of `size` mounted on a new directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_new_schedules_keeps_firing_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount("48m") else {
        eprintln!("cannot mount a tmpfs here (needs root); covered by the committer's unit tests");
        return;
    };
    let server = NatsServer::start();
    let mut config = config(&server, &disk.path().join("store"));
    config.store.cache_capacity = 4 * 1024 * 1024;
    let daemon = Daemon::start(config).await;
    let client = connect(&server).await;

    // Acked before the disk fills, due while it is full.
    let mut kept = subscribe(&client, "kept").await;
    let mut acked = std::collections::HashSet::new();
    for i in 0..50 {
        let delay = format!("{}ms", 2500 + i * 20);
        acked.insert(
            schedule(&client, "kept", &[("Sched-Delay", &delay)])
                .await
                .0,
        );
    }
    let filler = disk.fill();

    // Writes fail now: a new schedule gets 503 (sled may still take a few into its buffers).
    let started = Instant::now();
    let refusal = loop {
        let reply = request(
            &client,
            "sched.add.new",
            &[("Sched-Delay", "1h")],
            &[0; 4096],
        )
        .await;
        if let Some(code) = error_code(&reply) {
            break (code, String::from_utf8_lossy(&reply.payload).into_owned());
        }
        assert!(started.elapsed() < WAIT, "the full disk was never noticed");
    };
    assert_eq!(refusal.0, 503, "{}", refusal.1);
    assert!(refusal.1.contains("store unavailable"), "{}", refusal.1);
    let during = stats(&client).await;
    assert!(during["store_error"].is_string(), "{during}");
    // Refused at once, not after trying: a cancel too.
    let cancel = client
        .request("sched.cancel", "whatever".into())
        .await
        .unwrap();
    assert_eq!(error_code(&cancel), Some(503));

    // What was stored keeps firing meanwhile.
    let mut fired = std::collections::HashSet::new();
    while fired.len() < acked.len() {
        fired.insert(sched_id(&next(&mut kept).await));
    }
    assert_eq!(fired, acked);
    assert!(
        stats(&client).await["store_error"].is_string(),
        "still full"
    );

    // Room again: natsched notices by itself and takes schedules again.
    std::fs::remove_file(filler).unwrap();
    let recovered = stats_when(&client, |s| s["store_error"].is_null()).await;
    eprintln!("recovered: {recovered}");
    let mut after = subscribe(&client, "after").await;
    schedule(&client, "after", &[("Sched-Delay", "100ms")]).await;
    next(&mut after).await;
    // The fired schedules are gone from the store; nothing acknowledged is left behind.
    let settled = stats_when(&client, |s| s["pending"].as_u64() == Some(0)).await;
    assert!(settled["store_error"].is_null(), "{settled}");
    assert_quiet(&mut kept, Duration::from_millis(300)).await;
    daemon.stop().await;
}
