//! The expiration example (`examples/expiration/`) against a real nats-server and the natsched
//! binary: an unpaid order is cancelled at its expiry, exactly once; a paid one never, and its
//! expiration is cancelled; both also across a restart of natsched.
//!
//! This file includes the example's `services.rs`, so it tests the example's own services, each
//! on a connection of its own as in the demo. The demo driver (`main.rs`: arguments, two
//! orders, printing) is not run here.

mod common;
#[allow(dead_code)] // the demo uses parts of it that these tests do not
#[path = "../examples/expiration/services.rs"]
mod services;

use std::time::{Duration, Instant};

use async_nats::{Client, Subscriber};
use common::*;
use jiff::{SignedDuration, Timestamp, ToSpan};
use services::{EXPIRATION_COMPLETE, ExpirationComplete, Order, OrderState, Orders};

/// How long the tests' orders may stay unpaid, in milliseconds.
const EXPIRE_AFTER: i64 = 1500;

/// Starts the example's two services against `server`; returns the orders service and a
/// client for the test (which plays the payments service).
async fn start_services(server: &NatsServer) -> (Orders, Client) {
    // The services' logs show with `RUST_LOG=expiration=info cargo test --test expiration --
    // --nocapture`.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    services::expiration_service(connect(server).await, "sched")
        .await
        .unwrap();
    let orders = Orders::start(connect(server).await, "sched").await.unwrap();
    (orders, connect(server).await)
}

/// An expiry `ms` milliseconds from now, in whole milliseconds (natsched's resolution).
fn expiry(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(Timestamp::now().as_millisecond() + ms).unwrap()
}

/// How long from now until `instant` (zero if past).
fn until(instant: Timestamp) -> Duration {
    instant
        .duration_since(Timestamp::now())
        .try_into()
        .unwrap_or_default()
}

/// What the payments service would send.
async fn pay(client: &Client, id: &str) {
    let event = serde_json::to_vec(&services::OrderPaid { id: id.into() }).unwrap();
    client
        .publish(services::ORDER_PAID, event.into())
        .await
        .unwrap();
}

/// Waits (bounded) until the orders service has settled order `id` one way or the other.
async fn settled(orders: &Orders, id: &str) -> Order {
    let start = Instant::now();
    loop {
        let order = orders.get(id).expect("order created");
        if order.state != OrderState::Created {
            return order;
        }
        assert!(start.elapsed() < WAIT, "order {id} never settled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts `order` was cancelled by its expiration: not before its expiry, at most `within`
/// after it.
fn assert_cancelled(order: &Order, within: SignedDuration) {
    assert_eq!(order.state, OrderState::Cancelled, "{order:?}");
    let late = order.since.duration_since(order.expires_at);
    assert!(!late.is_negative(), "cancelled {late:?} early: {order:?}");
    assert!(
        late <= within,
        "cancelled {late:?} after its expiry: {order:?}"
    );
}

/// Receives `count` deliveries of `expiration.complete`, then asserts no more come: their
/// order ids in arrival order.
async fn expirations(deliveries: &mut Subscriber, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let message = next(deliveries).await;
        let event: ExpirationComplete = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(sched_id(&message), services::expiration_id(&event.order_id));
        ids.push(event.order_id);
    }
    assert_quiet(deliveries, Duration::from_millis(300)).await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_order_is_cancelled_once_at_its_expiry() {
    let harness = ProcessHarness::new();
    let _daemon = harness.start().await;
    let (orders, client) = start_services(&harness.server).await;
    let mut deliveries = subscribe(&client, EXPIRATION_COMPLETE).await;

    let expires_at = expiry(EXPIRE_AFTER);
    orders.create("A", expires_at).await.unwrap();
    // order.created again, as an upstream retry would send it: the same Sched-Id replaces the
    // pending expiration, so there is still one.
    let again = services::OrderCreated {
        id: "A".into(),
        expires_at: expires_at.to_string(),
    };
    let again = serde_json::to_vec(&again).unwrap();
    client
        .publish(services::ORDER_CREATED, again.into())
        .await
        .unwrap();
    stats_when(&client, |s| s["scheduled_total"] == 2 && s["pending"] == 1).await;

    assert_cancelled(&settled(&orders, "A").await, SignedDuration::from_secs(1));
    assert_eq!(expirations(&mut deliveries, 1).await, ["A"]);
    assert_eq!(orders.get("A").unwrap().state, OrderState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_order_is_never_cancelled_and_its_expiration_is_gone() {
    let harness = ProcessHarness::new();
    let _daemon = harness.start().await;
    let (orders, client) = start_services(&harness.server).await;
    let mut deliveries = subscribe(&client, EXPIRATION_COMPLETE).await;

    let expires_at = expiry(EXPIRE_AFTER);
    orders.create("B", expires_at).await.unwrap();
    stats_when(&client, |s| s["pending"] == 1).await;
    pay(&client, "B").await;
    assert_eq!(settled(&orders, "B").await.state, OrderState::Paid);

    // The orders service cancelled the expiration: natsched holds nothing for B any more.
    stats_when(&client, |s| s["cancelled_total"] == 1 && s["pending"] == 0).await;
    let reply = call(&client, "sched.get", &services::expiration_id("B")).await;
    assert_eq!(error_code(&reply), Some(404));
    assert_quiet(&mut deliveries, until(expires_at + 500.milliseconds())).await;
    assert_eq!(orders.get("B").unwrap().state, OrderState::Paid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natsched_restarting_in_the_middle() {
    let harness = ProcessHarness::new();
    let daemon = harness.start().await;
    let (orders, client) = start_services(&harness.server).await;
    let mut deliveries = subscribe(&client, EXPIRATION_COMPLETE).await;

    // Scheduled while natsched runs; both expire while it is down.
    let early = expiry(EXPIRE_AFTER);
    orders.create("U1", early).await.unwrap();
    orders.create("P", early).await.unwrap();
    stats_when(&client, |s| s["pending"] == 2).await;
    assert!(daemon.terminate().success());

    // While it is down, P is paid: its cancel finds no natsched and is given up, so P's
    // expiration will be delivered. And U2 is created: the expiration service retries its
    // schedule until natsched is back; it expires after the restart.
    pay(&client, "P").await;
    assert_eq!(settled(&orders, "P").await.state, OrderState::Paid);
    let late = expiry(EXPIRE_AFTER * 2);
    orders.create("U2", late).await.unwrap();
    // Past the early expiry nothing happened: the timers are natsched's, and it is down.
    assert_quiet(&mut deliveries, until(early + 200.milliseconds())).await;
    assert_eq!(orders.get("U1").unwrap().state, OrderState::Created);

    let _daemon = harness.start().await;
    // U1 and P at once, as overdue, then U2 at its expiry: each exactly once.
    let mut ids = expirations(&mut deliveries, 3).await;
    assert_eq!(ids.pop().as_deref(), Some("U2"));
    ids.sort();
    assert_eq!(ids, ["P", "U1"]);
    // The orders service handles expirations in their order of arrival: with U2's done, so
    // are P's and U1's.
    // (Within 2 s: should natsched take long to start, U2's schedule lands up to a retry
    // interval after it is back, perhaps after U2's expiry; it then fires at once.)
    assert_cancelled(&settled(&orders, "U2").await, SignedDuration::from_secs(2));
    assert_cancelled(&orders.get("U1").unwrap(), SignedDuration::from_secs(10));
    // P's expiration did come (its cancel failed), and left the paid order alone.
    assert_eq!(orders.get("P").unwrap().state, OrderState::Paid);
}
