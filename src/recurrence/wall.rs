//! croner's view of an instant in a time zone, through jiff (croner's own jiff support is
//! for jiff 0.2; natsched uses jiff 1).
//!
//! croner searches on wall-clock time and asks this adapter to turn a wall-clock time back
//! into instants: one, two (a repeated range when clocks go back) or none (a gap when they
//! go forward). What croner then does with two or none is the DST rule described in
//! [`super`].

use std::cmp::Ordering;

use croner::errors::CronError;
use croner::{CivilDate, CivilDateTime, CivilTime, CronDateTime, Resolution, Weekday};
use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp, ZonedDateTime};

/// An instant and the zone its wall clock is read in.
#[derive(Clone, Debug)]
pub(crate) struct Wall(pub(crate) ZonedDateTime);

impl Wall {
    pub(crate) fn at(ts: Timestamp, zone: &TimeZone) -> Wall {
        Wall(ts.to_zoned_datetime(zone.clone()))
    }
}

fn to_civil(dt: DateTime) -> CivilDateTime {
    // jiff keeps every part in range.
    CivilDateTime::new(
        CivilDate::from_parts_unchecked(i32::from(dt.year()), dt.month() as u32, dt.day() as u32),
        CivilTime::from_parts_unchecked(dt.hour() as u32, dt.minute() as u32, dt.second() as u32),
    )
}

fn to_jiff(civil: CivilDateTime) -> Result<DateTime, CronError> {
    let year = i16::try_from(civil.year()).map_err(|_| CronError::InvalidDate)?;
    let part = |n: u32| i8::try_from(n).map_err(|_| CronError::InvalidDate);
    DateTime::new(
        year,
        part(civil.month())?,
        part(civil.day())?,
        part(civil.hour())?,
        part(civil.minute())?,
        part(civil.second())?,
        0,
    )
    .map_err(|_| CronError::InvalidDate)
}

impl CronDateTime for Wall {
    fn to_civil(&self) -> CivilDateTime {
        to_civil(self.0.datetime())
    }

    fn civil_weekday(&self) -> Weekday {
        Weekday::from_days_from_sunday(self.0.weekday().to_sunday_zero_offset() as u32)
    }

    fn resolve_civil(&self, civil: CivilDateTime) -> Result<Resolution<Self>, CronError> {
        let ambiguous = self
            .0
            .time_zone()
            .to_ambiguous_zoned_datetime(to_jiff(civil)?);
        let invalid = |_| CronError::InvalidTime;
        Ok(match ambiguous.offset() {
            AmbiguousOffset::Unambiguous { .. } => {
                Resolution::Single(Wall(ambiguous.unambiguous().map_err(invalid)?))
            }
            AmbiguousOffset::Fold { .. } => Resolution::Ambiguous(
                Wall(ambiguous.clone().earlier().map_err(invalid)?),
                Wall(ambiguous.later().map_err(invalid)?),
            ),
            AmbiguousOffset::Gap { .. } => Resolution::Gap,
        })
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0
            .checked_add(SignedDuration::from_secs(seconds))
            .ok()
            .map(Wall)
    }

    fn cmp_instant(&self, other: &Self) -> Ordering {
        self.0.timestamp().cmp(&other.0.timestamp())
    }
}
