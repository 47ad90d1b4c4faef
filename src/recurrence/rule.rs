//! A recurrence rule: a cron expression read in a time zone, or a fixed interval.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::wall::Wall;
use crate::time::{self, UnixMs};

/// The zone a cron expression is read in when none is given: never the host's.
pub(crate) const DEFAULT_ZONE: &str = "UTC";

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RuleError {
    #[error("invalid Sched-Cron {expr:?}: {reason}")]
    Cron { expr: String, reason: String },
    #[error("invalid Sched-TZ {0:?}: not a known IANA time zone such as Europe/Berlin or UTC")]
    Zone(String),
}

/// When a series recurs.
#[derive(Debug, Clone)]
pub(crate) enum Rule {
    /// A crontab expression, 5 fields or 6 with seconds first, or an alias such as `@daily`,
    /// matched against the wall clock of `zone`.
    Cron(Box<CronRule>),
    /// Every this many milliseconds, counted from the series' first occurrence.
    Every(UnixMs),
}

#[derive(Debug, Clone)]
pub(crate) struct CronRule {
    /// As the caller wrote it (trimmed): what `get` shows and the store keeps.
    pub(super) expr: String,
    /// The zone's IANA name.
    pub(super) zone_name: String,
    cron: Cron,
    zone: TimeZone,
}

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        match (self, other) {
            (Rule::Cron(a), Rule::Cron(b)) => a.expr == b.expr && a.zone_name == b.zone_name,
            (Rule::Every(a), Rule::Every(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Rule {}

impl Rule {
    /// Parses a cron expression (5 or 6 fields, or an alias `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`) to be read in `zone` (an IANA name; UTC if `None`).
    pub(crate) fn cron(expr: &str, zone: Option<&str>) -> Result<Rule, RuleError> {
        let expr = expr.trim();
        let refuse = |reason: String| RuleError::Cron {
            expr: expr.to_owned(),
            reason,
        };
        let fields = expr.split_whitespace().count();
        if !expr.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(refuse(format!(
                "{fields} fields; use 5 (minute hour day-of-month month day-of-week) or 6 \
                 (seconds first)"
            )));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(expr).map_err(|e| refuse(e.to_string()))?;
        let zone_name = zone.map_or(DEFAULT_ZONE, str::trim);
        let tz = zone_of(zone_name)?;
        let zone_name = tz.iana_name().unwrap_or(zone_name).to_owned();
        Ok(Rule::Cron(Box::new(CronRule {
            expr: expr.to_owned(),
            zone_name,
            cron,
            zone: tz,
        })))
    }

    /// The occurrence after occurrence `at` (for an interval, `at` must be one), if any before
    /// [`time::MAX_MS`].
    pub(crate) fn after(&self, at: UnixMs) -> Option<UnixMs> {
        let next = match self {
            Rule::Every(interval) => at.checked_add(*interval)?,
            Rule::Cron(rule) => rule.search(at, false)?,
        };
        (next <= time::MAX_MS).then_some(next)
    }

    /// The first occurrence at or after `from` (a cron rule's; an interval's first occurrence
    /// is wherever its series starts).
    pub(crate) fn first_from(&self, from: UnixMs) -> Option<UnixMs> {
        let first = match self {
            Rule::Every(_) => from,
            Rule::Cron(rule) => rule.search(from, true)?,
        };
        (first <= time::MAX_MS).then_some(first)
    }

    /// The expression or the interval as text, e.g. `*/5 * * * *` or `90s`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Rule::Cron(rule) => rule.expr.clone(),
            Rule::Every(ms) => {
                humantime::format_duration(std::time::Duration::from_millis(*ms)).to_string()
            }
        }
    }

    /// An interval rule's interval, in ms.
    pub(crate) fn interval(&self) -> Option<UnixMs> {
        match self {
            Rule::Every(ms) => Some(*ms),
            Rule::Cron(_) => None,
        }
    }

    /// The zone a cron rule is read in.
    pub(crate) fn zone(&self) -> Option<&str> {
        match self {
            Rule::Cron(rule) => Some(&rule.zone_name),
            Rule::Every(_) => None,
        }
    }
}

impl CronRule {
    /// The first match after `at` (or at it, if `inclusive`). croner works in whole seconds:
    /// an instant inside a second is searched from that second, exclusively when inclusive
    /// would find the second's start, which is before `at`.
    fn search(&self, at: UnixMs, inclusive: bool) -> Option<UnixMs> {
        let inclusive = inclusive && at.is_multiple_of(1000);
        let seconds = i64::try_from(at / 1000).ok()?;
        let start = Wall::at(Timestamp::from_second(seconds).ok()?, &self.zone);
        let found = self.cron.find_next_occurrence(&start, inclusive).ok()?;
        u64::try_from(found.0.timestamp().as_millisecond()).ok()
    }
}

/// The time zone named `name`, from the system's zone database or the bundled copy.
fn zone_of(name: &str) -> Result<TimeZone, RuleError> {
    // jiff refuses names that are not zone names (paths, `..`); an empty name would mean the
    // host's zone, which a rule must never depend on.
    if name.is_empty() || name.len() > 64 {
        return Err(RuleError::Zone(name.to_owned()));
    }
    TimeZone::get(name).map_err(|_| RuleError::Zone(name.to_owned()))
}
