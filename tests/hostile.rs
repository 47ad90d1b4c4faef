//! Hostile input at the protocol level: header blocks no client library would send, published
//! raw over TCP to a real nats-server (which forwards them unchecked) on every subject natsched
//! subscribes to. natsched must stay up, on the same connection, and keep scheduling.

mod common;

use std::collections::BTreeSet;

use common::raw::RawClient;
use common::*;

/// The header blocks of the hostile cases, each (name, header block, expected add reply code).
fn hostile_headers() -> Vec<(&'static str, Vec<u8>)> {
    let mut many = b"NATS/1.0\r\n".to_vec();
    for i in 0..10_000 {
        many.extend_from_slice(format!("X-Many-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let mut big = b"NATS/1.0\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    vec![
        (
            "bare CR",
            b"NATS/1.0\r\nSched-Delay: 1s\r\nX: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "bare LF",
            b"NATS/1.0\r\nSched-Delay: 1s\r\nX: a\nb\r\n\r\n".to_vec(),
        ),
        (
            "non-UTF-8",
            b"NATS/1.0\r\nSched-Delay: 1s\r\nX: \xff\xfe\r\n\r\n".to_vec(),
        ),
        (
            "no colon",
            b"NATS/1.0\r\nSched-Delay: 1s\r\nnocolon\r\n\r\n".to_vec(),
        ),
        (
            "empty name",
            b"NATS/1.0\r\nSched-Delay: 1s\r\n: v\r\n\r\n".to_vec(),
        ),
        (
            "bad name",
            b"NATS/1.0\r\nSched-Delay: 1s\r\nA B: v\r\n\r\n".to_vec(),
        ),
        (
            "bad status",
            b"NATS/1.0 abc\r\nSched-Delay: 1s\r\n\r\n".to_vec(),
        ),
        (
            "no version line",
            b"HTTP/1.1 200\r\nSched-Delay: 1s\r\n\r\n".to_vec(),
        ),
        ("empty header block", b"\r\n\r\n".to_vec()),
        // Well-formed but large; without a time header, so an add is refused with 400.
        ("10 000 headers", many),
        ("1 MiB header", big),
    ]
}

/// A concrete subject a subscription to `filter` receives.
fn concrete(filter: &str) -> String {
    filter
        .split('.')
        .map(|t| match t {
            "*" => "x",
            ">" => "x.y",
            t => t,
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_header_blocks_on_every_subject_neither_crash_nor_disconnect() {
    let server = NatsServer::start_monitored("max_payload: 8MB\n");
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(config(&server, store.path())).await;
    let client = connect(&server).await;

    let natsched = |server: &NatsServer| {
        let mine: Vec<serde_json::Value> = server
            .connections()
            .into_iter()
            .filter(|c| c["name"] == "natsched")
            .collect();
        assert_eq!(mine.len(), 1, "one natsched connection: {mine:?}");
        mine[0].clone()
    };
    let before = natsched(&server);
    let subjects: Vec<String> = before["subscriptions_list"]
        .as_array()
        .expect("subscriptions listed")
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    // Every API subject, discovery, and firing's private fence inbox.
    assert!(subjects.iter().any(|s| s == "sched.add.>"), "{subjects:?}");
    assert!(subjects.iter().any(|s| s == "$SRV.PING"), "{subjects:?}");
    assert!(
        subjects.iter().any(|s| s.starts_with("_INBOX.")),
        "{subjects:?}"
    );

    let port = server.port;
    let cases = hostile_headers();
    let sent = subjects.clone();
    let (received, expected) = tokio::task::spawn_blocking(move || {
        let mut raw = RawClient::connect(port);
        raw.subscribe("_INBOX.raw.>", 1);
        let mut expected = BTreeSet::new();
        let mut n = 0;
        for filter in &sent {
            let subject = concrete(filter);
            for (_, header) in &cases {
                n += 1;
                let reply = format!("_INBOX.raw.{n}");
                raw.hpub(subject.as_bytes(), Some(reply.as_bytes()), header, b"");
                // natsched answers every request but the fences of its own inbox.
                if !filter.starts_with("_INBOX.") {
                    expected.insert(reply);
                }
            }
            raw.ping();
        }
        // Invalid UTF-8 in the subject and in the reply subject.
        raw.hpub(
            b"sched.add.a\xffb",
            Some(b"_INBOX.raw.utf8"),
            b"NATS/1.0\r\nSched-Delay: 1s\r\n\r\n",
            b"",
        );
        expected.insert("_INBOX.raw.utf8".to_owned());
        // Unicode whitespace in a subject (the server splits on spaces and tabs only): once
        // shifted the client's parse of the message (a forged sid, or a dropped connection).
        for (n, subject) in ["sched.add.a\u{a0}1", "sched.add.a\u{3000}1 2"]
            .into_iter()
            .enumerate()
        {
            let reply = format!("_INBOX.raw.space{n}");
            if subject.contains(' ') {
                continue; // not sendable: the server would split it too
            }
            raw.hpub(
                subject.as_bytes(),
                Some(reply.as_bytes()),
                b"NATS/1.0\r\nSched-Delay: 1h\r\n\r\n",
                b"",
            );
            expected.insert(reply);
        }
        raw.hpub(
            "sched.add.x\u{a0}1".as_bytes(),
            Some(b"_INBOX.raw.spoof"),
            b"NATS/1.0\r\nSched-Delay: 1h\r\n\r\n",
            b"",
        );
        expected.insert("_INBOX.raw.spoof".to_owned());
        raw.publish(b"sched.get", Some(b"_INBOX.raw.\xff"), b"some-id");
        raw.publish(b"sched.cancel\xff", Some(b"_INBOX.raw.x"), b"some-id");
        raw.ping();
        // Until every expected reply is in (others arrive too: the reply to a reply subject
        // of invalid UTF-8 goes to its repaired form, also under `_INBOX.raw.>`).
        raw.read_until(|got| {
            let replied: BTreeSet<String> = got
                .iter()
                .map(|m| String::from_utf8_lossy(&m.subject).into_owned())
                .collect();
            expected.is_subset(&replied)
        });
        (raw.received, expected)
    })
    .await
    .unwrap();

    let replied: BTreeSet<String> = received
        .iter()
        .map(|m| String::from_utf8_lossy(&m.subject).into_owned())
        .collect();
    let missing: Vec<&String> = expected.difference(&replied).collect();
    assert!(missing.is_empty(), "requests left unanswered: {missing:?}");
    // Every hostile add was refused (repaired headers, or no time header at all).
    let cases = hostile_headers();
    let add_index = subjects.iter().position(|s| s == "sched.add.>").unwrap();
    for (i, (name, _)) in cases.iter().enumerate() {
        let reply = format!("_INBOX.raw.{}", add_index * cases.len() + i + 1);
        let answer = received
            .iter()
            .find(|m| m.subject == reply.as_bytes())
            .unwrap_or_else(|| panic!("no answer to the add of case {name}"));
        assert_eq!(
            answer.error_code(),
            Some(400),
            "add, case {name}: {answer:?}"
        );
    }
    let utf8 = received
        .iter()
        .find(|m| m.subject == b"_INBOX.raw.utf8")
        .unwrap();
    assert_eq!(utf8.error_code(), Some(400), "{utf8:?}");

    // Still up, on the very same connection, and still scheduling and firing.
    let after = natsched(&server);
    assert_eq!(after["cid"], before["cid"], "natsched reconnected");
    let mut sub = subscribe(&client, "after.hostile").await;
    let (id, _) = schedule(&client, "after.hostile", &[("Sched-Delay", "100ms")]).await;
    assert_eq!(sched_id(&next(&mut sub).await), id);
    assert_eq!(natsched(&server)["cid"], before["cid"]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_text_with_control_characters_is_escaped_not_fatal() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    // A JSON-escaped newline in a key: the parser's error quotes the key.
    for body in [
        &br#"{"a\nb":1}"#[..],
        br#"{"a\rb":1}"#,
        br#"{"subject":"a\u0000b"}"#,
        br#"{"cursor":"\u001b[31m"}"#,
    ] {
        let reply = tokio::time::timeout(WAIT, client.request("sched.list", body.into()))
            .await
            .expect("an answer in time")
            .expect("request");
        assert_eq!(error_code(&reply), Some(400), "{reply:?}");
        let text = reply.headers.as_ref().unwrap().get("Nats-Service-Error");
        let text = text.unwrap().as_str();
        assert!(!text.contains(['\r', '\n', '\0', '\u{1b}']), "{text:?}");
    }
    // Still serving.
    let reply = client.request("sched.list", "".into()).await.unwrap();
    assert_eq!(error_code(&reply), None);
    daemon.stop().await;
}
