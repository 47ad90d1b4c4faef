//! Bad requests get a clear micro-service error reply and disturb nothing else.

mod common;

use std::time::Duration;

use common::*;

async fn assert_refused(
    client: &async_nats::Client,
    subject: &str,
    headers: &[(&str, &str)],
    code: u16,
) {
    let reply = request(client, subject, headers, b"x").await;
    assert_eq!(
        error_code(&reply),
        Some(code),
        "{subject} {headers:?}: {:?}",
        reply.payload
    );
    let text = reply
        .headers
        .as_ref()
        .unwrap()
        .get("Nats-Service-Error")
        .unwrap()
        .as_str()
        .to_owned();
    assert!(!text.is_empty());
    let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body["error"]["code"], code);
    assert_eq!(body["error"]["description"], text.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_disturb_nothing() {
    let (_server, _store, daemon, client) = setup(|c| c.api.max_payload = 64).await;
    let mut sub = subscribe(&client, ">").await;

    // A good schedule pending across all the bad ones.
    let (good, _) = schedule(&client, "good", &[("Sched-Delay", "1500ms")]).await;

    let at = "2030-01-01T00:00:00Z";
    let long_id = "x".repeat(129);
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("sched.add.t", &[]),
        ("sched.add.t", &[("Sched-At", at), ("Sched-Delay", "1s")]),
        ("sched.add.t", &[("Sched-At", "next tuesday")]),
        ("sched.add.t", &[("Sched-At", "2030-01-01T00:00:00")]),
        ("sched.add.t", &[("Sched-Delay", "soon")]),
        ("sched.add.t", &[("Sched-Delay", "-1")]),
        (
            "sched.add.t",
            &[("Sched-Delay", "1s"), ("Sched-Dealy", "1s")],
        ),
        (
            "sched.add.t",
            &[("Sched-Delay", "1s"), ("Sched-Id", "no spaces")],
        ),
        (
            "sched.add.t",
            &[("Sched-Delay", "1s"), ("Sched-Id", &long_id)],
        ),
        ("sched.add", &[("Sched-Delay", "1s")]),
        ("sched.add.orders.*", &[("Sched-Delay", "1s")]),
        ("sched.add.orders.>", &[("Sched-Delay", "1s")]),
    ];
    for (subject, headers) in cases {
        assert_refused(&client, subject, headers, 400).await;
    }
    let big = vec![b'x'; 65];
    let reply = client
        .request_with_headers(
            "sched.add.t",
            [("Sched-Delay", "1s")]
                .into_iter()
                .map(|(k, v)| (k.parse().unwrap(), v.into()))
                .collect(),
            big.into(),
        )
        .await
        .unwrap();
    assert_eq!(error_code(&reply), Some(413));

    // A plain publish (no reply subject) that is malformed is dropped quietly.
    client
        .publish("sched.add.t", "no headers".into())
        .await
        .unwrap();

    // The good schedule still fires, once, and nothing refused was scheduled.
    loop {
        let message = next(&mut sub).await;
        if message.subject.as_str() == "good" {
            assert_eq!(sched_id(&message), good);
            break;
        }
        assert!(
            message.subject.starts_with("sched.") || message.subject.starts_with("_INBOX."),
            "refused request was delivered: {message:?}"
        );
    }
    assert_quiet_except_api(&mut sub, Duration::from_millis(500)).await;
    daemon.stop().await;
}

async fn assert_quiet_except_api(sub: &mut async_nats::Subscriber, quiet: Duration) {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, sub.next()).await {
        assert!(
            message.subject.starts_with("sched.") || message.subject.starts_with("_INBOX."),
            "unexpected delivery: {message:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_big_to_deliver_is_refused_and_blocks_nothing() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let mut sub = subscribe(&client, "t.>").await;

    // Fits the server's max_payload as a request, but not once Sched-Id and Sched-Due are
    // added on delivery: refused up front instead of wedging firing later.
    let max = client.server_info().max_payload;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Sched-Delay", "100");
    let payload = vec![b'x'; max - 40];
    let reply = client
        .request_with_headers("sched.add.t.big", headers, payload.into())
        .await
        .unwrap();
    assert_eq!(error_code(&reply), Some(413), "{:?}", reply.payload);

    let (small, _) = schedule(&client, "t.small", &[("Sched-Delay", "200")]).await;
    assert_eq!(sched_id(&next(&mut sub).await), small);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_longer_than_the_store_allows_are_refused() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let long = "X".repeat(70_000);
    let reply = request(
        &client,
        "sched.add.t",
        &[("Sched-Delay", "1s"), (&long, "v")],
        b"",
    )
    .await;
    assert_eq!(error_code(&reply), Some(400));
    daemon.stop().await;
}
