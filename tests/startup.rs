//! Start-up and its failures: an unreachable NATS, a stop request at any stage, and a store
//! natsched must not use.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_nats_is_unreachable_exits_cleanly() {
    let store = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let daemon = DaemonProcess::spawn(
        &format!("nats://127.0.0.1:{port}"),
        store.path(),
        dir.path(),
    );
    daemon.wait_for_log("waiting for NATS");
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_once_an_unreachable_nats_comes_up() {
    let store = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let daemon = DaemonProcess::spawn(
        &format!("nats://127.0.0.1:{port}"),
        store.path(),
        dir.path(),
    );
    daemon.wait_for_log("waiting for NATS");
    let server = NatsServer::start_on(port, tempfile::tempdir().unwrap());
    let client = connect(&server).await;
    wait_ready(&client, "sched").await;
    let mut sub = subscribe(&client, "late.start").await;
    let (id, _) = schedule(&client, "late.start", &[("Sched-Delay", "100ms")]).await;
    assert_eq!(sched_id(&next(&mut sub).await), id);
    assert!(daemon.terminate().success());
}

/// Every key and value of the sled database at `path`.
fn dump(path: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = sled::open(path).unwrap();
    let all = db
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect();
    drop(db);
    all
}

/// Runs natsched on a new store, schedules `count` messages an hour ahead, stops it.
async fn used_store(count: usize) -> (NatsServer, tempfile::TempDir, tempfile::TempDir) {
    let server = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let daemon = DaemonProcess::start(&server, store.path(), dir.path()).await;
    let client = connect(&server).await;
    for _ in 0..count {
        schedule(&client, "later", &[("Sched-Delay", "1h")]).await;
    }
    assert!(daemon.terminate().success());
    (server, store, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_another_format_version_is_refused_and_left_alone() {
    let (server, store, dir) = used_store(3).await;
    {
        let db = sled::open(store.path()).unwrap();
        db.insert(b"mformat", &[9]).unwrap();
        db.flush().unwrap();
    }
    let before = dump(store.path());

    let mut daemon = DaemonProcess::spawn(&server.url, store.path(), dir.path());
    let status = daemon.wait_exit();
    assert!(!status.success(), "started on a store of format 9");
    let log = daemon.log();
    let path = store.path().display().to_string();
    assert!(log.contains(&path), "the message names the path: {log}");
    assert!(
        log.contains("format version 9")
            && log.contains(&format!("reads version {}", natsched::store::STORE_FORMAT)),
        "the message names both versions: {log}"
    );
    assert_eq!(dump(store.path()), before, "the refused store was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_is_refused_and_left_alone() {
    let (server, store, dir) = used_store(200).await;
    // Cut the database's log short, as a partial copy or a bad disk would.
    let db_file = store.path().join("db");
    let len = std::fs::metadata(&db_file).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&db_file)
        .unwrap();
    file.set_len(len / 3).unwrap();
    drop(file);
    let mark = std::fs::read(store.path().join("natsched.watermark")).unwrap();

    for _ in 0..2 {
        // Refused, and refused again: the first refusal repaired nothing.
        let mut daemon = DaemonProcess::spawn(&server.url, store.path(), dir.path());
        let status = daemon.wait_exit();
        assert!(!status.success(), "started on a truncated store");
        let log = daemon.log();
        assert!(log.contains("has lost writes"), "{log}");
        assert!(log.contains(&store.path().display().to_string()), "{log}");
        assert_eq!(
            std::fs::read(store.path().join("natsched.watermark")).unwrap(),
            mark
        );
    }

    // An emptied store directory (the database gone, the mark left) is refused too, and is
    // not turned into a new empty store.
    for entry in std::fs::read_dir(store.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "natsched.watermark" {
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    let mut daemon = DaemonProcess::spawn(&server.url, store.path(), dir.path());
    assert!(!daemon.wait_exit().success(), "started on an emptied store");
    assert!(daemon.log().contains("has lost writes"));
}
