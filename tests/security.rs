//! Who may schedule what: natsched's `[security]` rules, and NATS account permissions on top.

mod common;

use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use common::*;
use futures::StreamExt;

/// Schedules onto `target` due now; returns the error code and description, if refused.
async fn try_schedule(client: &Client, target: &str) -> Option<(u16, String)> {
    try_add(client, target, &[("Sched-Delay", "0")]).await
}

#[tokio::test]
async fn protected_targets_are_refused_by_default_and_store_nothing() {
    let (_server, _store, daemon, client) = setup(|_| {}).await;
    let cases = [
        ("$SYS.REQ.SERVER.PING", "$SYS.>"),
        ("$JS.API.STREAM.DELETE.X", "$JS.>"),
        ("$KV.config.key", "$KV.>"),
        ("$O.bucket.x", "$O.>"),
        ("$SRV.PING", "$SRV.>"),
        ("_INBOX.someone.1", "_INBOX.>"),
        // No scheduling onto the scheduler: no amplification loops.
        ("sched.add.orders.x", "sched.>"),
        ("sched.cancel", "sched.>"),
    ];
    let mut sys = subscribe(&client, "$SYS.>").await;
    for (target, rule) in cases {
        let (code, description) = try_schedule(&client, target).await.expect("refused");
        assert_eq!(code, 403, "{target}: {description}");
        assert!(
            description.contains(&format!("{rule:?}")),
            "{target}: {description}"
        );
        assert!(description.contains("built-in"), "{description}");
    }
    let stats = stats(&client).await;
    assert_eq!(stats["denied_total"], cases.len(), "{stats}");
    assert_eq!(stats["pending"], 0, "{stats}");
    assert_eq!(stats["scheduled_total"], 0, "{stats}");
    // Anything else still goes through.
    let mut orders = subscribe(&client, "orders.x").await;
    assert_eq!(try_schedule(&client, "orders.x").await, None);
    next(&mut orders).await;
    assert_quiet(&mut sys, Duration::from_millis(300)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn an_allow_more_specific_than_a_deny_carves_it_out() {
    let (_server, _store, daemon, client) = setup(|config| {
        config.security.allow_subjects = vec![
            "orders.>".into(),
            "billing.>".into(),
            "$JS.API.STREAM.INFO.*".into(),
            "$SYS.>".into(),
        ];
        config.security.deny_subjects = vec!["billing.secret.>".into()];
    })
    .await;
    let mut info = subscribe(&client, "$JS.API.STREAM.INFO.*").await;
    assert_eq!(
        try_schedule(&client, "$JS.API.STREAM.INFO.ORDERS").await,
        None
    );
    let delivered = next(&mut info).await;
    assert_eq!(delivered.subject.as_str(), "$JS.API.STREAM.INFO.ORDERS");

    let (code, description) = try_schedule(&client, "$JS.API.STREAM.DELETE.ORDERS")
        .await
        .unwrap();
    assert_eq!(code, 403);
    assert!(
        description.contains("security.allow_subjects"),
        "{description}"
    );
    // An allow equal to a built-in deny is not more specific: the deny wins.
    let (code, description) = try_schedule(&client, "$SYS.REQ.SERVER.PING").await.unwrap();
    assert_eq!(code, 403);
    assert!(description.contains("\"$SYS.>\""), "{description}");
    let (code, description) = try_schedule(&client, "billing.secret.x").await.unwrap();
    assert_eq!(code, 403);
    assert!(
        description.contains("security.deny_subjects"),
        "{description}"
    );
    assert!(
        description.contains("\"billing.secret.>\""),
        "{description}"
    );
    let (code, _) = try_schedule(&client, "payments.x").await.unwrap();
    assert_eq!(code, 403, "matches no allow");
    assert_eq!(try_schedule(&client, "billing.invoice").await, None);
    let stats = stats_when(&client, |s| s["pending"] == 0).await;
    assert_eq!(stats["denied_total"], 4, "{stats}");
    daemon.stop().await;
}

/// The shipped two-team nats-server config: each team can schedule onto its own subjects
/// only, because its publish permission names the targets.
#[tokio::test]
async fn with_the_example_server_config_each_team_schedules_onto_its_own_subjects_only() {
    let conf = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nats-server/teams.conf"),
    )
    .unwrap();
    let server = NatsServer::start_with_config(&conf);
    let store = tempfile::tempdir().unwrap();
    let mut config = config(&server, store.path());
    config.nats.user = Some("natsched".into());
    config.nats.password = Some(natsched::config::Secret::new("natsched-example-password"));
    let daemon = Daemon::start(config).await;
    let user = |name: &'static str| {
        let url = server.url.clone();
        async move {
            async_nats::ConnectOptions::with_user_and_password(
                name.into(),
                format!("{name}-example-password"),
            )
            .custom_inbox_prefix(format!("_INBOX_{name}"))
            .connect(url.as_str())
            .await
            .unwrap()
        }
    };
    let (orders, billing) = (user("orders").await, user("billing").await);
    let admin = async_nats::ConnectOptions::with_user_and_password(
        "natsched".into(),
        "natsched-example-password".into(),
    )
    .connect(server.url.as_str())
    .await
    .unwrap();

    let mut orders_inbox = subscribe(&orders, "orders.>").await;
    let mut billing_inbox = subscribe(&billing, "billing.>").await;
    assert_eq!(try_schedule(&orders, "orders.expired").await, None);
    assert_eq!(try_schedule(&billing, "billing.due").await, None);
    assert_eq!(
        next(&mut orders_inbox).await.subject.as_str(),
        "orders.expired"
    );
    assert_eq!(
        next(&mut billing_inbox).await.subject.as_str(),
        "billing.due"
    );

    // Onto the other team's subjects: the server refuses the publish, natsched never sees it.
    let before = stats(&admin).await;
    for (client, target) in [(&orders, "billing.due"), (&billing, "orders.expired")] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sched-Delay", "0");
        let attempt = client.request_with_headers(
            format!("sched.add.{target}"),
            headers,
            Bytes::from_static(b"x"),
        );
        let answer = tokio::time::timeout(Duration::from_secs(2), attempt).await;
        assert!(
            !matches!(answer, Ok(Ok(_))),
            "{target}: the server let the request through: {answer:?}"
        );
    }
    assert_quiet(&mut orders_inbox, Duration::from_millis(300)).await;
    assert_quiet(&mut billing_inbox, Duration::from_millis(300)).await;
    // Nor can a team listen in on another's replies or on natsched's fences.
    // (A request's reply, and a delivery's fence, would be overheard.)
    for (client, subject, requester, target) in [
        (&orders, "_INBOX_billing.>", &billing, "billing.ping"),
        (&billing, "_INBOX.>", &admin, "orders.ping"),
    ] {
        let mut sub = client.subscribe(subject).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(try_schedule(requester, target).await, None);
        let overheard = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(
            !matches!(overheard, Ok(Some(_))),
            "{subject}: {overheard:?}"
        );
    }
    let stats = stats_when(&admin, |s| s["pending"] == 0).await;
    assert_eq!(stats["scheduled_total"], 4, "{stats}");
    assert_eq!(stats["errors_total"], before["errors_total"], "{stats}");
    daemon.stop().await;
}
