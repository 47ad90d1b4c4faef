//! Intake: where schedule requests come in.
//!
//! * `core.rs` answers requests on `<prefix>.add.>` over core NATS request/reply.
//! * `jetstream.rs` consumes them from a work-queue stream and acknowledges each message once
//!   its schedule is durable (`[intake] mode = "jetstream"`).
//!
//! Both turn a message into a schedule the same way ([`Requests::schedule_of`]).

mod core;
mod jetstream;

use std::sync::Arc;

use async_nats::{Client, Message};

use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyError};
use crate::protocol::{self, AddLimits, ApiError};
use crate::record::Schedule;
use crate::time::UnixMs;

pub use self::core::{Intake, IntakeOptions};
pub(crate) use self::jetstream::{Awaiting, settle};
pub use self::jetstream::{IntakeBarrier, JetStreamIntake, JetStreamSetupError};

/// What turns an add request into a schedule, or refuses it.
#[derive(Clone)]
pub(crate) struct Requests {
    client: Client,
    /// `<prefix>.add.`: stripped from a request's subject to leave its target.
    add_prefix: String,
    /// `api.max_payload`.
    max_payload: usize,
    /// `[recurring] min_interval`, in ms.
    min_interval: UnixMs,
    /// What may be scheduled: targets, header size, horizon, delivery by default.
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
}

impl Requests {
    pub(crate) fn new(options: &IntakeOptions<'_>) -> Requests {
        Requests {
            client: options.client.clone(),
            add_prefix: format!("{}.add.", options.prefix),
            max_payload: options.max_payload,
            min_interval: options.min_interval.as_millis() as UnixMs,
            policy: options.policy.clone(),
            metrics: options.metrics.clone(),
        }
    }

    /// The schedule `message`, received at `now`, asks for, or why it is refused (denied
    /// targets are counted).
    fn schedule_of(&self, message: &Message, now: UnixMs) -> Result<Schedule, ApiError> {
        if message.sanitized {
            // What the client library had to repair cannot be stored or delivered verbatim.
            return Err(ApiError::bad_request(
                "the request is not valid NATS protocol text: invalid UTF-8 in its subject \
                 or headers, a bare CR or LF in a header, or a header line without a colon",
            ));
        }
        let target = message
            .subject
            .strip_prefix(self.add_prefix.as_str())
            .unwrap_or_default();
        let schedule = protocol::parse_add(
            target,
            message.headers.as_ref(),
            message.payload.clone(),
            now,
            AddLimits {
                max_payload: self.max_payload,
                // Read per request: it is the server's, and can change on reconnect.
                server_max_payload: self.client.max_payload(),
                default_delivery: self.policy.default_delivery(target),
                min_interval: self.min_interval,
            },
        )?;
        self.policy.admit(&schedule, now).map_err(|refused| {
            if matches!(
                refused,
                PolicyError::Denied { .. } | PolicyError::NotAllowed { .. }
            ) {
                Metrics::count(&self.metrics.denied_total, 1);
            }
            ApiError::from(refused)
        })?;
        Ok(schedule)
    }
}
