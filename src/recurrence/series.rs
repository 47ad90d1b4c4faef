//! A series: a rule, its bounds, and where it stands. What to publish when an occurrence is
//! due (catch-up), and what comes next.

use super::rule::Rule;
use crate::time::UnixMs;

/// Most occurrences of a cron rule one catch-up counts one by one (see [`Series::catch_up`]):
/// it bounds the CPU a fire takes after a long downtime of a dense rule (about 4 ms).
pub(crate) const MAX_CATCH_UP_STEPS: u64 = 10_000;

/// A recurring schedule's rule and state. The schedule's `due` is the occurrence numbered
/// `seq`: the next one to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub(crate) rule: Rule,
    /// No occurrence after this instant (inclusive bound).
    pub(crate) until: Option<UnixMs>,
    /// No occurrence numbered above this.
    pub(crate) count: Option<u64>,
    /// The 1-based number of the occurrence the schedule is due at.
    pub(crate) seq: u64,
    /// Set by firing, never stored: the occurrence the attempt under way publishes (see
    /// [`Series::catch_up`]), which the store writer advances from once it is confirmed.
    pub(crate) publishing: Option<Occurrence>,
    /// Never stored: whether the store keeps the series' body (everything but its due and
    /// seq) in its index entry, so its segment records hold only due and seq (*thin*
    /// records, see `crate::store::segment`). Set for series this build scheduled and kept
    /// as they move on; a series stored by an earlier build keeps whole records.
    pub(crate) body_indexed: bool,
}

/// One occurrence of a series: when, and its 1-based number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    pub due: UnixMs,
    pub seq: u64,
}

/// Why a series cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StartError {
    #[error("the rule has no occurrence")]
    NoOccurrence,
    #[error("the first occurrence is after Sched-Until")]
    EndsBeforeStart,
}

impl Series {
    pub(crate) fn new(rule: Rule, until: Option<UnixMs>, count: Option<u64>, seq: u64) -> Series {
        Series {
            rule,
            until,
            count,
            seq,
            publishing: None,
            body_indexed: false,
        }
    }

    /// A new series and its first occurrence: a cron rule's first match after `received`
    /// (at or after `start` if given); an interval's `start`, or one interval after
    /// `received`. A start already past when received starts the series now: a cron rule's
    /// first match after `received`, an interval's first occurrence after it in the start's
    /// phase (never a catch-up fire for what was never pending).
    pub(crate) fn start(
        rule: Rule,
        start: Option<UnixMs>,
        received: UnixMs,
        until: Option<UnixMs>,
        count: Option<u64>,
    ) -> Result<(Series, UnixMs), StartError> {
        let first = match (start, &rule) {
            (Some(start), _) if start >= received => rule.first_from(start),
            (Some(start), Rule::Every(interval)) => {
                let periods = (received - start).div_ceil(*interval).max(1);
                start.checked_add(periods.checked_mul(*interval).unwrap_or(UnixMs::MAX))
            }
            (_, Rule::Every(_)) => rule.after(received),
            (_, Rule::Cron(_)) => rule.first_from(received.saturating_add(1)),
        }
        .ok_or(StartError::NoOccurrence)?;
        if until.is_some_and(|until| first > until) {
            return Err(StartError::EndsBeforeStart);
        }
        Ok((Series::new(rule, until, count, 1), first))
    }

    /// A series every `interval_ms`, unbounded, at its occurrence number `seq`.
    pub fn every(interval_ms: UnixMs, seq: u64) -> Series {
        Series::new(Rule::Every(interval_ms.max(1)), None, None, seq)
    }

    /// Roughly what the series adds to its record in the store.
    pub(crate) fn approximate_size(&self) -> usize {
        let rule = match &self.rule {
            Rule::Cron(rule) => rule.expr.len() + rule.zone_name.len(),
            Rule::Every(_) => 0,
        };
        24 + rule
    }

    /// Whether `occurrence` is inside the series' bounds.
    fn allows(&self, occurrence: Occurrence) -> bool {
        self.until.is_none_or(|until| occurrence.due <= until)
            && self.count.is_none_or(|count| occurrence.seq <= count)
    }

    /// The occurrence to publish when the one due at `due` (numbered `self.seq`) is handed
    /// out at `now`: the latest occurrence at or before `now` within the bounds. Occurrences
    /// missed while natsched could not fire (down, or NATS unreachable) are thus published
    /// once, as the latest of them, and counted in its number; on time, it is `due` itself.
    /// A cron rule's missed occurrences are counted one by one up to [`MAX_CATCH_UP_STEPS`];
    /// past that the latest is found directly and the rest of the count is estimated from
    /// the average period of those counted.
    pub(crate) fn catch_up(&self, due: UnixMs, now: UnixMs) -> Occurrence {
        let mut current = Occurrence { due, seq: self.seq };
        if let Rule::Every(interval) = self.rule {
            // Arithmetic: how many whole intervals fit, then the bounds.
            let mut steps = now.saturating_sub(due) / interval.max(1);
            if let Some(until) = self.until {
                steps = steps.min(until.saturating_sub(due) / interval.max(1));
            }
            if let Some(count) = self.count {
                steps = steps.min(count.saturating_sub(self.seq));
            }
            return Occurrence {
                due: due.saturating_add(steps.saturating_mul(interval)),
                seq: self.seq.saturating_add(steps),
            };
        }
        for _ in 0..MAX_CATCH_UP_STEPS {
            match self.next(current) {
                Some(next) if next.due <= now => current = next,
                _ => return current,
            }
        }
        let limit = self.until.map_or(now, |until| until.min(now));
        let Some(latest) = self.rule.latest_at_or_before(limit, current.due) else {
            return current;
        };
        let counted = current.seq - self.seq;
        let period = ((current.due - due) / counted.max(1)).max(1);
        let seq = current
            .seq
            .saturating_add(((latest - current.due) / period).max(1));
        Occurrence {
            due: latest,
            seq: self.count.map_or(seq, |count| seq.min(count)),
        }
    }

    /// The occurrence after `fired`, if the series has one.
    pub(crate) fn next(&self, fired: Occurrence) -> Option<Occurrence> {
        let next = Occurrence {
            due: self.rule.after(fired.due)?,
            seq: fired.seq.checked_add(1)?,
        };
        self.allows(next).then_some(next)
    }

    /// The series after `fired` was published: its next occurrence and the series state to
    /// store with it, or `None` when the series has ended.
    pub(crate) fn advanced(&self, fired: Occurrence) -> Option<(Series, UnixMs)> {
        let next = self.next(fired)?;
        let series = Series {
            seq: next.seq,
            publishing: None,
            ..self.clone()
        };
        Some((series, next.due))
    }

    pub(crate) fn rule(&self) -> &Rule {
        &self.rule
    }
}
