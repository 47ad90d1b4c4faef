//! The headers of a recurring schedule request, and the rules for combining them with the
//! one-shot ones.
//!
//! Valid: exactly one of `Sched-At`/`Sched-Delay` (one-shot), or one of `Sched-Cron`/
//! `Sched-Every` with an optional `Sched-At` as the series' start; `Sched-TZ` only with
//! `Sched-Cron`; `Sched-Until` and `Sched-Count` only with a rule; `Sched-Seq` only with a
//! rule and `Sched-At`. Anything else is refused with a description naming the conflict.
//!
//! `Sched-Seq` continues a series rather than starting one (what `natsched import` sends):
//! `Sched-At` is then the due instant of occurrence number `Sched-Seq`, kept as given, not
//! searched for and not moved when it is past. A past one is overdue and fires at once, as
//! a stored series would after a downtime (the latest occurrence due, numbered as if the
//! skipped ones had fired: see `crate::recurrence`); `Sched-Count` counts from occurrence 1
//! as always.

use super::{AT, ApiError, COUNT, CRON, DELAY, EVERY, SEQ, TZ, UNTIL, parse_at, parse_delay};
use crate::recurrence::{Rule, Series, StartError};
use crate::time::UnixMs;

/// How many of a cron rule's first occurrences are checked against `[recurring]
/// min_interval`.
const GAP_SAMPLE: usize = 32;

/// The series headers of one request, as given.
#[derive(Default)]
pub(super) struct SeriesHeaders<'a> {
    cron: Option<&'a str>,
    tz: Option<&'a str>,
    every: Option<&'a str>,
    until: Option<&'a str>,
    count: Option<&'a str>,
    seq: Option<&'a str>,
}

impl<'a> SeriesHeaders<'a> {
    /// Where the value of header `name` goes, if it is a series header.
    pub(super) fn slot(&mut self, name: &str) -> Option<&mut Option<&'a str>> {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        Some(match () {
            () if is(CRON) => &mut self.cron,
            () if is(TZ) => &mut self.tz,
            () if is(EVERY) => &mut self.every,
            () if is(UNTIL) => &mut self.until,
            () if is(COUNT) => &mut self.count,
            () if is(SEQ) => &mut self.seq,
            () => return None,
        })
    }

    /// The rule asked for, if any.
    pub(super) fn rule(&self, min_interval: UnixMs) -> Result<Option<Rule>, ApiError> {
        match (self.cron, self.every) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(format!(
                "give either {CRON} or {EVERY}, not both"
            ))),
            (Some(expr), None) => {
                let rule =
                    Rule::cron(expr, self.tz).map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(Some(rule))
            }
            (None, Some(every)) => {
                if self.tz.is_some() {
                    return Err(ApiError::bad_request(format!(
                        "{TZ} applies to {CRON} only: an interval does not depend on a zone"
                    )));
                }
                let ms = parse_delay(every).map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid {EVERY} {every:?}: expected e.g. 30s, 15m, 1h or milliseconds"
                    ))
                })?;
                if ms < min_interval.max(1) {
                    return Err(ApiError::bad_request(format!(
                        "{EVERY} {every:?} is shorter than the shortest interval allowed, {} \
                         ([recurring] min_interval)",
                        humantime::format_duration(std::time::Duration::from_millis(
                            min_interval.max(1)
                        ))
                    )));
                }
                Ok(Some(Rule::Every(ms)))
            }
            (None, None) => Ok(None),
        }
    }

    /// A one-shot request must not carry series headers.
    pub(super) fn refuse_bounds_alone(&self) -> Result<(), ApiError> {
        for (name, given) in [
            (TZ, self.tz),
            (UNTIL, self.until),
            (COUNT, self.count),
            (SEQ, self.seq),
        ] {
            if given.is_some() {
                return Err(ApiError::bad_request(format!(
                    "{name} applies only to a recurring schedule ({CRON} or {EVERY})"
                )));
            }
        }
        Ok(())
    }

    /// The series and its first due instant, `Sched-At` being its start (or, with
    /// `Sched-Seq`, the due of that occurrence).
    pub(super) fn start(
        &self,
        rule: Rule,
        at: Option<&str>,
        delay: Option<&str>,
        now: UnixMs,
        min_interval: UnixMs,
    ) -> Result<(UnixMs, Option<Box<Series>>), ApiError> {
        let name = if self.cron.is_some() { CRON } else { EVERY };
        if delay.is_some() {
            return Err(ApiError::bad_request(format!(
                "{DELAY} cannot be given with {name}: a series starts one interval after \
                 receipt, or at {AT}"
            )));
        }
        let start = at.map(parse_at).transpose()?;
        let until = self.until.map(parse_until).transpose()?;
        let count = self.count.map(parse_count).transpose()?;
        let (series, first) = match self.seq {
            Some(seq) => continued(rule, start, parse_seq(seq)?, until, count)?,
            None => Series::start(rule, start, now, until, count).map_err(|e| match e {
                StartError::NoOccurrence => ApiError::bad_request(format!(
                    "invalid {name}: the rule has no occurrence{}",
                    match start {
                        Some(_) => format!(" at or after {AT}"),
                        None => String::new(),
                    }
                )),
                StartError::EndsBeforeStart => ends_before_start(),
            })?,
        };
        if self.cron.is_some()
            && let Some(gap) = series.rule().shortest_gap(first, GAP_SAMPLE)
            && gap < min_interval
        {
            return Err(ApiError::bad_request(format!(
                "{CRON} fires {} apart, less than the shortest interval allowed, {} \
                 ([recurring] min_interval)",
                humantime::format_duration(std::time::Duration::from_millis(gap)),
                humantime::format_duration(std::time::Duration::from_millis(min_interval))
            )));
        }
        Ok((first, Some(Box::new(series))))
    }
}

/// A series continued at occurrence `seq`, due at `start` (see the module's doc).
fn continued(
    rule: Rule,
    start: Option<UnixMs>,
    seq: u64,
    until: Option<UnixMs>,
    count: Option<u64>,
) -> Result<(Series, UnixMs), ApiError> {
    let Some(due) = start else {
        return Err(ApiError::bad_request(format!(
            "{SEQ} needs {AT}: the due instant of occurrence number {SEQ}"
        )));
    };
    if let Some(count) = count
        && seq > count
    {
        return Err(ApiError::bad_request(format!(
            "{SEQ} {seq} is past the series' last occurrence ({COUNT} {count})"
        )));
    }
    if until.is_some_and(|until| due > until) {
        return Err(ends_before_start());
    }
    // What an export wrote is an occurrence of its rule; anything else would be a series
    // that never fires on its own rule's instants again until its first catch-up.
    if matches!(rule, Rule::Cron(_)) && rule.first_from(due) != Some(due) {
        return Err(ApiError::bad_request(format!(
            "with {SEQ}, {AT} must be an occurrence of {CRON}: the due of occurrence {seq}"
        )));
    }
    Ok((Series::new(rule, until, count, seq), due))
}

fn ends_before_start() -> ApiError {
    ApiError::bad_request(format!("{UNTIL} is before the series' first occurrence"))
}

fn parse_seq(value: &str) -> Result<u64, ApiError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "invalid {SEQ} {value:?}: expected an occurrence number, at least 1"
        ))),
    }
}

fn parse_until(value: &str) -> Result<UnixMs, ApiError> {
    parse_at(value).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid {UNTIL} {value:?}: expected RFC 3339 such as 2026-12-31T23:59:59Z"
        ))
    })
}

fn parse_count(value: &str) -> Result<u64, ApiError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(ApiError::bad_request(format!(
            "invalid {COUNT} {value:?}: expected a whole number of occurrences, at least 1"
        ))),
    }
}
