//! Delivery: publishing due schedules to their target subjects.
//!
//! `core.rs` publishes with core NATS and confirms each batch with a fence.

mod core;

pub use self::core::{Firing, FiringOutputs};
