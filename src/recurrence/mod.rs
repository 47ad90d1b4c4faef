//! Recurring schedules: when a series' occurrences fall, what a late fire publishes, and what
//! comes next. Pure: nothing here reads a clock or does I/O; callers pass the instants.
//!
//! # Rules
//!
//! * **Cron** (`Sched-Cron`): a crontab expression of 5 fields (minute hour day-of-month
//!   month day-of-week) or 6 (seconds first), or an alias (`@hourly`, `@daily`, `@weekly`,
//!   `@monthly`, `@yearly`), parsed by croner with its Vixie-cron semantics (day-of-month and
//!   day-of-week match when either does). It is matched against the wall clock of an IANA
//!   zone (`Sched-TZ`, UTC by default, never the host's zone), with jiff's zone database.
//!   Occurrences are whole seconds.
//! * **Interval** (`Sched-Every`): every `n` ms from the first occurrence, which is the start
//!   (`Sched-At`) or one interval after receipt. Wall clocks and zones play no part.
//!
//! # Daylight saving time (cron rules)
//!
//! croner decides, on the wall clock of the rule's zone, as Vixie cron does:
//! * A wall-clock time skipped when clocks go forward: a rule with a fixed second, minute
//!   and hour fires once, at the first instant after the gap (`30 2 * * *` fires at 03:00 on
//!   the spring-forward day of Europe/Berlin); a rule that steps or ranges over the hour
//!   simply has no occurrence in the missing hour.
//! * A wall-clock time repeated when clocks go back: a fixed-time rule fires once, at the
//!   first of the two instants; a rule that steps or ranges over the hour (`@hourly`,
//!   `*/15 * * * *`) keeps its cadence in real time, so it fires in both halves, as the hours
//!   really pass.
//!
//! # A series in the store
//!
//! A series is one record however often it fires: the schedule's `due` is its next
//! occurrence and [`Series::seq`] that occurrence's number. When an occurrence has been
//! published and confirmed, the store writer replaces the record by its successor
//! ([`Series::advanced`]) in the same atomic batch that removes the fired copy (one log
//! entry in replicated mode): a crash before it repeats the occurrence (at least once), a
//! crash after it never loses the next.
//!
//! # Catch-up
//!
//! An occurrence handed out late (natsched was down, the store could not be written, NATS
//! could not be reached) publishes the latest occurrence due by then within the series'
//! bounds, numbered as if the skipped ones had fired ([`Series::catch_up`]); the series then
//! goes on from there. So a downtime costs one stale fire, never a burst. A series whose
//! `Sched-Until` passed during the downtime publishes its last occurrence before the bound
//! once, then ends; one whose `Sched-Count` was reached likewise publishes occurrence
//! number `count` once.

mod rule;
mod series;
mod stored;
mod wall;

pub(crate) use rule::Rule;
pub(crate) use series::StartError;
pub use series::{Occurrence, Series};

#[cfg(test)]
mod tests;
