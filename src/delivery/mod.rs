//! Delivery: publishing due schedules to their target subjects.
//!
//! * `core.rs` publishes with core NATS and confirms each batch with a fence; it hands the
//!   schedules delivered through JetStream to
//! * `jetstream.rs`, which publishes them with a `Nats-Msg-Id` and waits for each PubAck,
//!   pipelined, in a task of its own, so neither kind of delivery waits for the other.
//!
//! Either way a schedule is deleted only after NATS confirmed it (at-least-once), and one NATS
//! will not take stays stored and is tried again after a backoff ([`crate::retries`]).

mod core;
mod in_flight;
mod jetstream;

pub use self::core::{Firing, FiringOutputs};
