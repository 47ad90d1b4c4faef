//! The two services of the expiration example. They share no memory, only NATS subjects with
//! JSON bodies:
//!
//! ```text
//!           order.created {id, expiresAt}
//!  orders ─────────────────────────────────▶ expiration ──sched.add.expiration.complete──▶ natsched
//!    ▲  ▲   expiration.complete {orderId}, at expiresAt                                     │
//!    │  └───────────────────────────────────────────────────────────────────────────────────┘
//!    └── order.paid {id} (from payments)      orders ──sched.cancel──▶ natsched
//! ```
//!
//! `main.rs` runs a demo with them; `tests/expiration.rs` includes this file to test the same
//! code against a real nats-server and natsched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::HeaderValue;
use async_nats::{Client, HeaderMap, Message};
use futures::StreamExt;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const ORDER_CREATED: &str = "order.created";
pub const ORDER_PAID: &str = "order.paid";
pub const EXPIRATION_COMPLETE: &str = "expiration.complete";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCreated {
    pub id: String,
    /// RFC 3339: when the order is given up unless paid.
    pub expires_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct OrderPaid {
    pub id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpirationComplete {
    pub order_id: String,
}

/// The natsched id of an order's expiration. One per order: a re-sent `order.created`, or a
/// retried request, replaces the pending expiration instead of adding a second one, and the
/// orders service can cancel it knowing only the order id.
pub fn expiration_id(order_id: &str) -> String {
    format!("expiration-{order_id}")
}

/// Why a request to natsched failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// natsched answered with an error (the codes are in the README's *Errors* table).
    #[error("natsched refused: {code} {description}")]
    Refused { code: u16, description: String },
    /// No answer: natsched is not running ("no responders") or did not answer in time.
    #[error("no answer from natsched: {}", .0.kind())]
    NoAnswer(#[from] async_nats::RequestError),
    #[error("invalid header value: {0}")]
    Header(#[from] async_nats::header::ParseHeaderValueError),
}

/// Sends a request to natsched. Errors come back as replies with the NATS micro-service
/// error headers, so a reply is only a success if it has none.
async fn call(
    client: &Client,
    subject: String,
    headers: HeaderMap,
    body: String,
) -> Result<bytes::Bytes, CallError> {
    let reply = client
        .request_with_headers(subject, headers, body.into())
        .await?;
    let header = |name| Some(reply.headers.as_ref()?.get(name)?.as_str().to_owned());
    match header("Nats-Service-Error-Code") {
        None => Ok(reply.payload),
        Some(code) => Err(CallError::Refused {
            code: code.parse().unwrap_or(0),
            description: header("Nats-Service-Error").unwrap_or_default(),
        }),
    }
}

/// Starts the expiration service: every `order.created` becomes a schedule of
/// `expiration.complete` at the order's `expiresAt`. It keeps no state of its own: natsched
/// keeps the timers, durably, so this service (and natsched) may restart at any time.
pub async fn expiration_service(client: Client, prefix: &str) -> Result<(), Error> {
    // A queue group: with several instances running, each order is scheduled by one of them.
    let mut created = client
        .queue_subscribe(ORDER_CREATED, "expiration".into())
        .await?;
    client.flush().await?; // the server has the subscription before any order is created
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        while let Some(message) = created.next().await {
            match serde_json::from_slice::<OrderCreated>(&message.payload) {
                // A task per order, so that one waiting for natsched holds up no other.
                Ok(order) => {
                    tokio::spawn(schedule_expiration(client.clone(), prefix.clone(), order));
                }
                Err(err) => {
                    tracing::warn!("[expiration] ignoring a malformed order.created: {err}")
                }
            }
        }
    });
    Ok(())
}

/// How often, and how long, the expiration service retries a schedule natsched did not take.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const RETRIES: u32 = 60;

async fn schedule_expiration(client: Client, prefix: String, order: OrderCreated) {
    let id = &order.id;
    let request = || -> Result<(HeaderMap, String), CallError> {
        let mut headers = HeaderMap::new();
        // Parsed, not converted: async-nats panics on a header value holding CR or LF, and
        // these come from someone else's message. natsched checks the rest (400 otherwise).
        headers.insert("Sched-At", order.expires_at.parse::<HeaderValue>()?);
        headers.insert("Sched-Id", expiration_id(id).parse::<HeaderValue>()?);
        let body = ExpirationComplete {
            order_id: id.clone(),
        };
        Ok((headers, serde_json::to_string(&body).expect("serializable")))
    };
    let subject = format!("{prefix}.add.{EXPIRATION_COMPLETE}");
    for attempt in 1..=RETRIES {
        let result = match request() {
            Ok((headers, body)) => call(&client, subject.clone(), headers, body).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(reply) => {
                // {"id":"expiration-…","due":"…"}, sent once the schedule is on disk.
                let reply = String::from_utf8_lossy(&reply);
                tracing::info!("[expiration] order {id}: expiration scheduled {reply}");
                return;
            }
            // natsched is down or restarting, or its store cannot write for now: core NATS
            // keeps no request, so send it again. Should the first one have been stored after
            // all, the same Sched-Id makes the second replace it: one expiration either way.
            Err(err @ (CallError::NoAnswer(_) | CallError::Refused { code: 503, .. }))
                if attempt < RETRIES =>
            {
                tracing::warn!("[expiration] order {id}: {err}; retrying in {RETRY_EVERY:?}");
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(err) => {
                // Refused for good (a malformed expiresAt or id): retrying cannot help.
                tracing::error!("[expiration] order {id}: cannot schedule its expiration: {err}");
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    Created,
    Paid,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Order {
    pub state: OrderState,
    pub expires_at: Timestamp,
    /// When it entered its state.
    pub since: Timestamp,
}

/// The orders service: creates orders and settles each one, paid or cancelled. Its orders live
/// in memory here; a real one keeps them in its database (see [`Orders::settle`]).
#[derive(Clone)]
pub struct Orders {
    client: Client,
    prefix: String,
    orders: Arc<Mutex<HashMap<String, Order>>>,
}

impl Orders {
    /// Starts the service; it listens for payments and expirations from now on.
    pub async fn start(client: Client, prefix: &str) -> Result<Orders, Error> {
        let paid = client.subscribe(ORDER_PAID).await?;
        let expired = client.subscribe(EXPIRATION_COMPLETE).await?;
        client.flush().await?;
        let service = Orders {
            client,
            prefix: prefix.to_owned(),
            orders: Arc::default(),
        };
        let handler = service.clone();
        tokio::spawn(async move {
            let mut events = futures::stream::select(paid, expired);
            while let Some(message) = events.next().await {
                handler.handle(&message);
            }
        });
        Ok(service)
    }

    /// Creates an order that is cancelled at `expires_at` unless paid before.
    pub async fn create(&self, id: &str, expires_at: Timestamp) -> Result<(), Error> {
        // Recorded before it is announced, so its expiration always finds it.
        let order = Order {
            state: OrderState::Created,
            expires_at,
            since: Timestamp::now(),
        };
        self.orders.lock().unwrap().insert(id.to_owned(), order);
        tracing::info!("[orders] order {id}: created, expires at {expires_at}");
        let event = OrderCreated {
            id: id.to_owned(),
            expires_at: expires_at.to_string(),
        };
        let body = serde_json::to_vec(&event)?;
        self.client.publish(ORDER_CREATED, body.into()).await?;
        Ok(())
    }

    /// The order's current state.
    pub fn get(&self, id: &str) -> Option<Order> {
        self.orders.lock().unwrap().get(id).cloned()
    }

    fn handle(&self, message: &Message) {
        if message.subject.as_str() == ORDER_PAID {
            match serde_json::from_slice::<OrderPaid>(&message.payload) {
                Ok(paid) => self.paid(&paid.id),
                Err(err) => tracing::warn!("[orders] ignoring a malformed order.paid: {err}"),
            }
        } else {
            match serde_json::from_slice::<ExpirationComplete>(&message.payload) {
                Ok(expired) => self.expired(&expired.order_id),
                Err(err) => {
                    tracing::warn!("[orders] ignoring a malformed expiration.complete: {err}")
                }
            }
        }
    }

    fn paid(&self, id: &str) {
        match self.settle(id, OrderState::Paid) {
            Ok(()) => tracing::info!("[orders] order {id}: paid"),
            Err(Some(OrderState::Cancelled)) => {
                // The expiration came first: too late, the tickets are gone. Refund it.
                tracing::warn!("[orders] order {id}: paid after it was cancelled; refund it");
                return;
            }
            Err(Some(state)) => {
                tracing::info!("[orders] order {id}: payment ignored, {state:?} already");
                return;
            }
            Err(None) => {
                tracing::warn!("[orders] order {id}: payment for an unknown order ignored");
                return;
            }
        }
        // The expiration is moot now: cancel it, so natsched does not deliver it. Only
        // housekeeping: `expired` leaves a paid order alone anyway, so a failed cancel (natsched
        // down) is logged, not retried.
        let (client, subject, id) = (
            self.client.clone(),
            format!("{}.cancel", self.prefix),
            id.to_owned(),
        );
        tokio::spawn(async move {
            match call(&client, subject, HeaderMap::new(), expiration_id(&id)).await {
                Ok(_) => tracing::info!("[orders] order {id}: expiration cancelled"),
                // It fired already (it is on its way to us) or was never scheduled: nothing
                // left to cancel, and `expired` will ignore it.
                Err(CallError::Refused { code: 404, .. }) => {
                    tracing::info!("[orders] order {id}: no pending expiration to cancel")
                }
                Err(err) => tracing::warn!("[orders] order {id}: expiration not cancelled: {err}"),
            }
        });
    }

    fn expired(&self, id: &str) {
        match self.settle(id, OrderState::Cancelled) {
            Ok(()) => tracing::info!("[orders] order {id}: cancelled, not paid in time"),
            // Never cancel a completed order: the payment won the race (or its cancel did not
            // reach natsched). A repeated delivery (natsched delivers at least once) finds the
            // order cancelled already and changes nothing either.
            Err(Some(state)) => {
                tracing::info!("[orders] order {id}: expiration ignored, {state:?} already")
            }
            Err(None) => tracing::warn!("[orders] order {id}: expiration of an unknown order"),
        }
    }

    /// Moves a created order to `to`: `Err` with its state if it was not `Created` (or `None`
    /// if unknown). The check and the change happen under one lock, so of a payment and an
    /// expiration arriving together exactly one settles the order. With a database this is
    /// one conditional update: `UPDATE orders SET state = $to WHERE id = $id AND state =
    /// 'created'`.
    fn settle(&self, id: &str, to: OrderState) -> Result<(), Option<OrderState>> {
        let mut orders = self.orders.lock().unwrap();
        match orders.get_mut(id) {
            Some(order) if order.state == OrderState::Created => {
                order.state = to;
                order.since = Timestamp::now();
                Ok(())
            }
            other => Err(other.map(|order| order.state)),
        }
    }
}
