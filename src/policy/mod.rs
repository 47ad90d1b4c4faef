//! Who may schedule what, and how much: every check a schedule passes before it is stored,
//! whichever way it entered (core NATS requests or the JetStream intake stream).
//!
//! * **Targets** ([`subjects`]): `[security] allow_subjects` / `deny_subjects`, on top of
//!   built-in denies for the server's own and natsched's own subjects. natsched publishes as
//!   itself, so without them a client allowed to publish only `sched.add.>` could make it
//!   publish anywhere natsched may.
//! * **Request limits**: `limits.max_headers_bytes` and `limits.max_horizon`, checked with
//!   the request alone ([`Policy::admit`]).
//! * **Capacity** ([`capacity`]): `limits.max_pending` and per-subject quotas, which need the
//!   store's counts and so are checked by the store writer ([`Capacity::room_for`]).
//!
//! Pure code: no clock (the receipt time is passed in), no I/O.

mod capacity;
mod subjects;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use capacity::{Capacity, Ledger};
pub(crate) use capacity::{MAX_QUOTAS, QuotaMask};
pub(crate) use subjects::Pattern;

use crate::config::Config;
use crate::protocol::{self, ApiError};
use crate::record::{Delivery, Schedule};
use crate::time::{self, UnixMs};
use capacity::Quota;
use subjects::{Origin, Refused, TargetRules};

/// Why a schedule is refused by policy. Each has its own reply code ([`PolicyError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "target subject {target:?} is not allowed: it matches no pattern of \
         security.allow_subjects"
    )]
    NotAllowed { target: String },
    #[error("target subject {target:?} is denied by {rule:?} ({})", origin_text(*.builtin))]
    Denied {
        target: String,
        rule: String,
        builtin: bool,
    },
    #[error("headers of {size} bytes exceed limits.max_headers_bytes ({max} bytes)")]
    HeadersTooLarge { size: usize, max: usize },
    #[error("due {due} is more than limits.max_horizon ({max}) ahead")]
    BeyondHorizon { due: String, max: String },
    #[error(
        "store full: {max} schedules are pending (limits.max_pending); retry once some have \
         fired or been cancelled"
    )]
    StoreFull { max: u64 },
    #[error("quota full: {max} schedules are pending for {subjects:?} (limits.quotas)")]
    QuotaFull { subjects: String, max: u64 },
}

fn origin_text(builtin: bool) -> &'static str {
    if builtin {
        "a built-in deny rule; to allow part of it, add a more specific pattern to \
         security.allow_subjects"
    } else {
        "security.deny_subjects"
    }
}

impl PolicyError {
    /// The reply code: 403 for a target natsched may not publish to, 431 for headers too
    /// large, 422 for a due time too far ahead, 503 for a full store, 429 for a full quota.
    pub fn code(&self) -> u16 {
        match self {
            PolicyError::NotAllowed { .. } | PolicyError::Denied { .. } => 403,
            PolicyError::HeadersTooLarge { .. } => 431,
            PolicyError::BeyondHorizon { .. } => 422,
            PolicyError::StoreFull { .. } => 503,
            PolicyError::QuotaFull { .. } => 429,
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(error: PolicyError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

/// The checks of a schedule request that need nothing but the request.
#[derive(Debug, Clone)]
pub struct Policy {
    targets: TargetRules,
    max_headers_bytes: usize,
    max_horizon: Duration,
    capacity: Capacity,
    /// `[delivery] jetstream_subjects`: targets delivered through JetStream by default.
    jetstream_subjects: Vec<Pattern>,
}

impl Policy {
    /// The policy `config` asks for (which [`Config::validate`] has checked).
    pub fn new(config: &Config) -> Result<Policy, crate::config::ConfigError> {
        let patterns = |key: &'static str, texts: &[String]| {
            texts
                .iter()
                .map(|text| {
                    Pattern::parse(text)
                        .map_err(|reason| crate::config::ConfigError::Invalid { key, reason })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let security = &config.security;
        let allow = patterns("security.allow_subjects", &security.allow_subjects)?;
        let deny = patterns("security.deny_subjects", &security.deny_subjects)?;
        let limits = &config.limits;
        let quotas = limits
            .quotas
            .iter()
            .map(|quota| {
                Ok(Quota {
                    subjects: patterns("limits.quotas", std::slice::from_ref(&quota.subjects))?
                        .remove(0),
                    max_pending: quota.max_pending,
                })
            })
            .collect::<Result<Vec<_>, crate::config::ConfigError>>()?;
        Ok(Policy {
            targets: TargetRules::new(&config.api.prefix, allow, deny),
            max_headers_bytes: limits.max_headers_bytes,
            max_horizon: limits.max_horizon,
            capacity: Capacity::new(limits.max_pending, quotas),
            jetstream_subjects: patterns(
                "delivery.jetstream_subjects",
                &config.delivery.jetstream_subjects,
            )?,
        })
    }

    /// The pending limits, which the store writer applies.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// How a schedule for `target` is delivered when its request does not say
    /// (`Sched-Deliver`): JetStream if `[delivery] jetstream_subjects` matches it.
    pub fn default_delivery(&self, target: &str) -> Delivery {
        if self.jetstream_subjects.iter().any(|p| p.matches(target)) {
            Delivery::JetStream
        } else {
            Delivery::Core
        }
    }

    /// Whether `schedule`, received at `now`, may be stored as far as the request alone
    /// tells: its target, the size of its headers, how far ahead it is due.
    pub fn admit(&self, schedule: &Schedule, now: UnixMs) -> Result<(), PolicyError> {
        let target = &schedule.subject;
        match self.targets.check(target) {
            Ok(()) => {}
            Err(Refused::NotAllowed) => {
                return Err(PolicyError::NotAllowed {
                    target: target.clone(),
                });
            }
            Err(Refused::Denied(rule, origin)) => {
                return Err(PolicyError::Denied {
                    target: target.clone(),
                    rule: rule.as_str().to_owned(),
                    builtin: origin == Origin::BuiltIn,
                });
            }
        }
        let size = protocol::headers_bytes(schedule);
        if size > self.max_headers_bytes {
            return Err(PolicyError::HeadersTooLarge {
                size,
                max: self.max_headers_bytes,
            });
        }
        let horizon = u64::try_from(self.max_horizon.as_millis()).unwrap_or(u64::MAX);
        if schedule.due.saturating_sub(now) > horizon {
            return Err(PolicyError::BeyondHorizon {
                due: time::format_ms(schedule.due),
                max: humantime::format_duration(self.max_horizon).to_string(),
            });
        }
        Ok(())
    }
}
