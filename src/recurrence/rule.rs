//! A recurrence rule: a cron expression read in a time zone, or a fixed interval.

use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, Weekday};
use jiff::Timestamp;
use jiff::tz::{TimeZone, TimeZoneDatabase};

use super::wall::Wall;
use crate::time::{self, UnixMs};

/// The zone a cron expression is read in when none is given: never the host's.
pub(crate) const DEFAULT_ZONE: &str = "UTC";
/// Longest cron expression accepted: every real one is far shorter, and a rule is parsed
/// again whenever its record is read.
pub(crate) const MAX_EXPR_LEN: usize = 256;
/// A rule must match a day within this many years of its start. Weekdays and dates repeat
/// every 28 years between 1901 and 2099, so a rule matching no day in 28 years matches none
/// in that range; checking days first keeps an impossible rule (`0 0 30 2 *`) from a search
/// to croner's year 5000.
const FEASIBLE_YEARS: i16 = 28;
/// Times croner's search is tried again, a day later, when it fails (it gives up on a
/// fixed-time rule inside a DST gap longer than 2 hours, as when a zone skipped a day).
const SEARCH_RETRIES: u64 = 3;

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
        if expr.len() > MAX_EXPR_LEN {
            return Err(refuse(format!("longer than {MAX_EXPR_LEN} bytes")));
        }
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

    /// The first occurrence after instant `at` of a series that had an occurrence at
    /// `anchor` (an interval's occurrences are `anchor` plus whole intervals).
    pub(crate) fn next_after(&self, anchor: UnixMs, at: UnixMs) -> Option<UnixMs> {
        match self {
            Rule::Every(_) if at < anchor => Some(anchor),
            Rule::Every(interval) => {
                let periods = ((at - anchor) / interval.max(&1)).checked_add(1)?;
                anchor.checked_add(periods.checked_mul(*interval)?)
            }
            Rule::Cron(_) => self.after(at),
        }
    }

    /// The first occurrence at or after `from` (a cron rule's; an interval's first occurrence
    /// is wherever its series starts). `None` also for a cron rule matching no day within
    /// 28 years of `from`.
    pub(crate) fn first_from(&self, from: UnixMs) -> Option<UnixMs> {
        let first = match self {
            Rule::Every(_) => from,
            Rule::Cron(rule) if !rule.matches_a_day_after(from) => return None,
            Rule::Cron(rule) => rule.search(from, true)?,
        };
        (first <= time::MAX_MS).then_some(first)
    }

    /// The latest occurrence at or before `at`, if there is one after `floor` (cron rules
    /// only: an interval's is arithmetic).
    pub(crate) fn latest_at_or_before(&self, at: UnixMs, floor: UnixMs) -> Option<UnixMs> {
        let Rule::Cron(rule) = self else { return None };
        let seconds = i64::try_from(at / 1000).ok()?;
        let start = Wall::at(Timestamp::from_second(seconds).ok()?, &rule.zone);
        let found = rule.cron.find_previous_occurrence(&start, true).ok()?;
        let found = u64::try_from(found.0.timestamp().as_millisecond()).ok()?;
        (found > floor && found <= at).then_some(found)
    }

    /// The shortest time between two of the first `n` occurrences from occurrence `first`.
    pub(crate) fn shortest_gap(&self, first: UnixMs, n: usize) -> Option<UnixMs> {
        if let Rule::Every(ms) = self {
            return Some(*ms);
        }
        let mut at = first;
        let mut shortest = None;
        for _ in 1..n {
            let Some(next) = self.after(at) else { break };
            shortest = Some(shortest.map_or(next - at, |s: UnixMs| s.min(next - at)));
            at = next;
        }
        shortest
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
        for retry in 0..=SEARCH_RETRIES {
            let from = at.checked_add(retry * 86_400_000)?;
            let seconds = i64::try_from(from / 1000).ok()?;
            let start = Wall::at(Timestamp::from_second(seconds).ok()?, &self.zone);
            match self
                .cron
                .find_next_occurrence(&start, inclusive && retry == 0)
            {
                Ok(found) => return u64::try_from(found.0.timestamp().as_millisecond()).ok(),
                Err(croner::errors::CronError::TimeSearchLimitExceeded) if retry == 0 => {
                    // No match before year 5000, or a gap croner cannot cross: a day later
                    // tells the two apart.
                    if !self.matches_a_day_after(from) {
                        return None;
                    }
                }
                Err(_) => {}
            }
        }
        None
    }

    /// Whether some day within [`FEASIBLE_YEARS`] of `from` matches the rule's date fields
    /// (about 10 000 cheap checks, where croner would search to year 5000).
    fn matches_a_day_after(&self, from: UnixMs) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(from as i64) else {
            return false;
        };
        let mut date = ts.to_zoned_datetime(self.zone.clone()).date();
        let Ok(end) = date.checked_add(jiff::Span::new().years(FEASIBLE_YEARS)) else {
            return false;
        };
        let pattern = &self.cron.pattern;
        while date <= end {
            let weekday =
                Weekday::from_days_from_sunday(date.weekday().to_sunday_zero_offset() as u32);
            let year = i32::from(date.year());
            let (month, day) = (date.month() as u32, date.day() as u32);
            if pattern.month_match(month).unwrap_or(false)
                && pattern
                    .day_match(year, month, day, weekday)
                    .unwrap_or(false)
            {
                return true;
            }
            match date.tomorrow() {
                Ok(next) => date = next,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The time zone named `name`, from the system's zone database, else the copy built in: a
/// system database can lack a name another had (Debian 12 moved links such as `US/Eastern`
/// to `tzdata-legacy`), and a stored rule must read the same on every machine.
fn zone_of(name: &str) -> Result<TimeZone, RuleError> {
    // jiff refuses names that are not zone names (paths, `..`); an empty name would mean the
    // host's zone, which a rule must never depend on.
    if name.is_empty() || name.len() > 64 {
        return Err(RuleError::Zone(name.to_owned()));
    }
    TimeZone::get(name)
        .or_else(|_| TimeZoneDatabase::bundled().get(name))
        .map_err(|_| RuleError::Zone(name.to_owned()))
}
