//! Intake: where schedule requests come in.
//!
//! `core.rs` answers requests on `<prefix>.add.>` over core NATS request/reply.

mod core;

pub use self::core::{Intake, IntakeOptions};
