//! No room to write: new schedules get 503 while stored ones keep firing, and natsched
//! recovers by itself once there is room again. Two real ways to take the room away: a small
//! tmpfs filled up (needs root to mount it), and a file-size limit on natsched's process
//! (`prlimit`, any user; writes then fail with EFBIG). Both run the natsched binary.

mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
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

/// Sets natsched's file-size limit (soft; the hard one stays unlimited, so it can be raised
/// again).
fn limit_file_size(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={soft}:unlimited"),
        ])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit failed");
}

/// The scenario: 50 schedules acked, then the room is taken away (`take`), then given back
/// (`give`). The schedules come due during the outage, beyond the wheel's horizon when it
/// began, so they are loaded from the store while it cannot be written.
async fn no_room_then_room_again(
    store: &Path,
    take: impl FnOnce(&DaemonProcess),
    give: impl FnOnce(&DaemonProcess),
) {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tuning = "cache_capacity = 4194304\n[wheel]\nlookahead = \"100ms\"\n";
    let daemon = DaemonProcess::spawn_with(&server.url, store, dir.path(), tuning);
    let client = connect(&server).await;
    wait_ready(&client, "sched").await;

    let mut kept = subscribe(&client, "kept").await;
    let mut acked = HashSet::new();
    for i in 0..50 {
        let delay = format!("{}ms", 2500 + i * 20);
        acked.insert(
            schedule(&client, "kept", &[("Sched-Delay", &delay)])
                .await
                .0,
        );
    }
    take(&daemon);

    // Writes fail now: a new schedule gets 503 (sled may still take a few into free space).
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
        assert!(
            started.elapsed() < WAIT,
            "the lack of room was never noticed"
        );
    };
    assert_eq!(refusal.0, 503, "{}", refusal.1);
    assert!(refusal.1.contains("store unavailable"), "{}", refusal.1);
    assert!(
        !refusal.1.contains(&store.display().to_string()),
        "no paths: {}",
        refusal.1
    );
    let during = stats(&client).await;
    assert!(during["store_error"].is_string(), "{during}");
    // Refused at once, not after trying: a cancel too.
    let cancel = client
        .request("sched.cancel", Bytes::from("whatever"))
        .await
        .unwrap();
    assert_eq!(error_code(&cancel), Some(503));

    // What was stored keeps firing meanwhile: loaded from the store during the outage.
    let mut fired = HashSet::new();
    while fired.len() < acked.len() {
        fired.insert(sched_id(&next(&mut kept).await));
    }
    assert_eq!(fired, acked);
    let still = stats(&client).await;
    assert!(still["store_error"].is_string(), "no room yet: {still}");

    // Room again: natsched notices by itself and takes schedules again.
    give(&daemon);
    stats_when(&client, |s| s["store_error"].is_null()).await;
    let mut after = subscribe(&client, "after").await;
    schedule(&client, "after", &[("Sched-Delay", "100ms")]).await;
    next(&mut after).await;
    // What fired during the outage leaves the store now.
    stats_when(&client, |s| s["pending"].as_u64() == Some(0)).await;
    assert!(daemon.terminate().success(), "a clean stop");

    // A restart fires nothing again, and the store is consistent.
    let daemon = DaemonProcess::spawn_with(&server.url, store, dir.path(), tuning);
    wait_ready(&client, "sched").await;
    assert_quiet(&mut kept, Duration::from_millis(500)).await;
    assert_eq!(stats(&client).await["pending"], 0);
    assert!(daemon.terminate().success());
}

#[tokio::test]
async fn a_full_disk_refuses_new_schedules_keeps_firing_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount("48m") else {
        // The file-size limit test below covers the same path without root.
        eprintln!("cannot mount a tmpfs here (needs root): skipped");
        return;
    };
    let filler = std::cell::RefCell::new(None);
    no_room_then_room_again(
        &disk.path().join("store"),
        |_| *filler.borrow_mut() = Some(disk.fill()),
        |_| std::fs::remove_file(filler.borrow_mut().take().unwrap()).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn a_file_size_limit_refuses_new_schedules_keeps_firing_and_recovers_by_itself() {
    let store = tempfile::tempdir().unwrap();
    let db = store.path().join("db");
    no_room_then_room_again(
        store.path(),
        // No file of the store may grow any more (the probe file cannot be written either).
        |daemon| {
            let size = std::fs::metadata(&db).unwrap().len();
            limit_file_size(daemon.pid(), &size.to_string());
        },
        |daemon| limit_file_size(daemon.pid(), "unlimited"),
    )
    .await;
}
