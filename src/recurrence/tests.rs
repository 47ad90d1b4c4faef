use proptest::prelude::*;

use super::rule::{Rule, RuleError};
use super::series::{MAX_CATCH_UP_STEPS, Occurrence, Series, StartError};
use crate::time::{self, UnixMs};

/// Unix ms of an RFC 3339 instant.
fn at(text: &str) -> UnixMs {
    time::timestamp_to_ms(text.parse().unwrap())
}

fn cron(expr: &str, zone: &str) -> Rule {
    Rule::cron(expr, Some(zone)).unwrap()
}

/// The occurrences after `from`, `n` of them.
fn following(rule: &Rule, from: UnixMs, n: usize) -> Vec<UnixMs> {
    let mut out = Vec::new();
    let mut t = from;
    for _ in 0..n {
        t = rule.after(t).unwrap();
        out.push(t);
    }
    out
}

#[test]
fn berlin_spring_forward_fires_a_skipped_time_once_right_after_the_gap() {
    // 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00Z); 02:30 does not exist that day.
    let rule = cron("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        following(&rule, at("2026-03-28T01:30:00Z"), 2),
        [at("2026-03-29T01:00:00Z"), at("2026-03-30T00:30:00Z")]
    );
    // A rule over every hour simply has no occurrence in the missing hour.
    let hourly = cron("@hourly", "Europe/Berlin");
    assert_eq!(
        following(&hourly, at("2026-03-28T23:30:00Z"), 3),
        [
            at("2026-03-29T00:00:00Z"), // 01:00 CET
            at("2026-03-29T01:00:00Z"), // 03:00 CEST
            at("2026-03-29T02:00:00Z"), // 04:00 CEST
        ]
    );
}

#[test]
fn berlin_fall_back_fires_a_repeated_time_once() {
    // 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00Z); 02:30 happens at 00:30Z and 01:30Z.
    let rule = cron("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        following(&rule, at("2026-10-24T00:30:00Z"), 2),
        [at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")]
    );
    // With seconds, the same.
    let rule = cron("15 30 2 * * *", "Europe/Berlin");
    assert_eq!(
        following(&rule, at("2026-10-24T00:30:15Z"), 2),
        [at("2026-10-25T00:30:15Z"), at("2026-10-26T01:30:15Z")]
    );
}

#[test]
fn new_york_spring_forward_and_fall_back() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT (07:00Z).
    let daily = cron("30 2 * * *", "America/New_York");
    assert_eq!(
        following(&daily, at("2026-03-07T07:30:00Z"), 2),
        [at("2026-03-08T07:00:00Z"), at("2026-03-09T06:30:00Z")]
    );
    // 2026-11-01: 02:00 EDT becomes 01:00 EST (06:00Z); 01:30 happens twice, fires once.
    let daily = cron("30 1 * * *", "America/New_York");
    assert_eq!(
        following(&daily, at("2026-10-31T05:30:00Z"), 2),
        [at("2026-11-01T05:30:00Z"), at("2026-11-02T06:30:00Z")]
    );
    // An hourly rule keeps real time: the repeated 01:00 is two real hours.
    let hourly = cron("0 * * * *", "America/New_York");
    assert_eq!(
        following(&hourly, at("2026-11-01T04:30:00Z"), 3),
        [
            at("2026-11-01T05:00:00Z"), // 01:00 EDT
            at("2026-11-01T06:00:00Z"), // 01:00 EST
            at("2026-11-01T07:00:00Z"), // 02:00 EST
        ]
    );
}

#[test]
fn the_zone_defaults_to_utc_and_names_are_canonical() {
    let rule = Rule::cron("0 12 * * *", None).unwrap();
    assert_eq!(rule.zone(), Some("UTC"));
    assert_eq!(
        rule.after(at("2026-06-01T12:00:00Z")),
        Some(at("2026-06-02T12:00:00Z"))
    );
    let rule = cron("0 12 * * *", "europe/berlin");
    assert_eq!(rule.zone(), Some("Europe/Berlin"));
    assert_eq!(
        rule.after(at("2026-06-01T00:00:00Z")),
        Some(at("2026-06-01T10:00:00Z"))
    );
}

#[test]
fn aliases_and_six_fields() {
    let from = at("2026-06-15T10:20:30.500Z");
    for (expr, next) in [
        ("@hourly", "2026-06-15T11:00:00Z"),
        ("@daily", "2026-06-16T00:00:00Z"),
        ("@weekly", "2026-06-21T00:00:00Z"),
        ("@monthly", "2026-07-01T00:00:00Z"),
        ("@yearly", "2027-01-01T00:00:00Z"),
        ("*/10 * * * * *", "2026-06-15T10:20:40Z"),
        ("* * * * * *", "2026-06-15T10:20:31Z"),
        ("* * * * *", "2026-06-15T10:21:00Z"),
    ] {
        assert_eq!(
            Rule::cron(expr, None).unwrap().after(from),
            Some(at(next)),
            "{expr}"
        );
    }
    // At or after: an instant inside a second starts at the next whole second.
    let every_second = Rule::cron("* * * * * *", None).unwrap();
    assert_eq!(
        every_second.first_from(from),
        Some(at("2026-06-15T10:20:31Z"))
    );
    assert_eq!(
        every_second.first_from(at("2026-06-15T10:20:31Z")),
        Some(at("2026-06-15T10:20:31Z"))
    );
}

#[test]
fn bad_expressions_and_zones_are_refused_by_name() {
    for expr in [
        "",
        &"1,".repeat(200),
        "* * * *",
        "* * * * * * *",
        "61 * * * *",
        "* 25 * * *",
        "a b c d e",
        "@sometimes",
        "*/0 * * * *",
        "\u{0} * * * *",
    ] {
        assert!(
            matches!(Rule::cron(expr, None), Err(RuleError::Cron { .. })),
            "{expr:?}"
        );
    }
    for zone in [
        "",
        "Mars/Olympus",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        &"A".repeat(200),
    ] {
        assert_eq!(
            Rule::cron("* * * * *", Some(zone)),
            Err(RuleError::Zone(zone.to_owned())),
            "{zone:?}"
        );
    }
}

#[test]
fn a_rule_that_never_matches_cannot_start() {
    // February 30th.
    let rule = cron("0 0 30 2 *", "UTC");
    assert_eq!(
        Series::start(rule, None, at("2026-01-01T00:00:00Z"), None, None),
        Err(StartError::NoOccurrence)
    );
}

#[test]
fn an_interval_starts_one_interval_after_receipt_or_at_its_start() {
    let received = at("2026-06-01T00:00:00.123Z");
    let (series, first) = Series::start(Rule::Every(1_500), None, received, None, None).unwrap();
    assert_eq!((first, series.seq), (received + 1_500, 1));
    let start = at("2026-06-02T00:00:00Z");
    let (_, first) = Series::start(Rule::Every(1_500), Some(start), received, None, None).unwrap();
    assert_eq!(first, start);
    // A cron rule from a start: its first match at or after it.
    let (_, first) =
        Series::start(cron("0 * * * *", "UTC"), Some(start), received, None, None).unwrap();
    assert_eq!(first, start);
    assert_eq!(
        Series::start(
            Rule::Every(1_000),
            Some(start),
            received,
            Some(start - 1),
            None
        ),
        Err(StartError::EndsBeforeStart)
    );
}

#[test]
fn until_and_count_end_a_series() {
    let start = at("2026-06-01T00:00:00Z");
    let series = Series::new(Rule::Every(1_000), Some(start + 2_000), None, 1);
    let one = Occurrence { due: start, seq: 1 };
    let two = series.next(one).unwrap();
    assert_eq!(
        two,
        Occurrence {
            due: start + 1_000,
            seq: 2
        }
    );
    let three = series.next(two).unwrap();
    assert_eq!(three.due, start + 2_000, "until is inclusive");
    assert_eq!(series.next(three), None);

    let series = Series::new(cron("* * * * * *", "UTC"), None, Some(2), 1);
    let two = series.next(one).unwrap();
    assert_eq!(series.next(two), None);
    let (advanced, due) = series.advanced(one).unwrap();
    assert_eq!((advanced.seq, due), (2, start + 1_000));
    assert_eq!(advanced.advanced(two), None);
}

#[test]
fn a_late_fire_catches_up_once_with_the_skipped_ones_counted() {
    let start = at("2026-06-01T00:00:00Z");
    let every = Series::new(Rule::Every(1_000), None, None, 5);
    // On time, or late by less than an interval: the due occurrence itself.
    assert_eq!(
        every.catch_up(start, start),
        Occurrence { due: start, seq: 5 }
    );
    assert_eq!(
        every.catch_up(start, start + 999),
        Occurrence { due: start, seq: 5 }
    );
    // Down for an hour: the latest missed occurrence, numbered as if all had fired.
    assert_eq!(
        every.catch_up(start, start + 3_600_500),
        Occurrence {
            due: start + 3_600_000,
            seq: 3_605
        }
    );
    // Bounds hold: the last occurrence before Until, or number Count.
    let until = Series::new(Rule::Every(1_000), Some(start + 10_500), None, 5);
    assert_eq!(
        until.catch_up(start, start + 3_600_000),
        Occurrence {
            due: start + 10_000,
            seq: 15
        }
    );
    let counted = Series::new(Rule::Every(1_000), None, Some(8), 5);
    assert_eq!(
        counted.catch_up(start, start + 3_600_000),
        Occurrence {
            due: start + 3_000,
            seq: 8
        }
    );
    // A cron rule, the same by stepping.
    let minutely = Series::new(cron("* * * * *", "Europe/Berlin"), None, None, 1);
    assert_eq!(
        minutely.catch_up(start, start + 3_600_000 + 59_000),
        Occurrence {
            due: start + 3_600_000,
            seq: 61
        }
    );
    // A gap longer than the counted steps: still the latest occurrence, in one fire, its
    // number estimated from the period (exact for a regular rule).
    let secondly = Series::new(cron("* * * * * *", "UTC"), None, None, 1);
    let far = secondly.catch_up(start, start + 10 * MAX_CATCH_UP_STEPS * 1_000 + 500);
    assert_eq!(
        far,
        Occurrence {
            due: start + 10 * MAX_CATCH_UP_STEPS * 1_000,
            seq: 10 * MAX_CATCH_UP_STEPS + 1
        }
    );
    // ... and within Until.
    let until = Series::new(
        cron("* * * * * *", "UTC"),
        Some(start + 20 * MAX_CATCH_UP_STEPS * 1_000),
        None,
        1,
    );
    assert_eq!(
        until
            .catch_up(start, start + 30 * MAX_CATCH_UP_STEPS * 1_000)
            .due,
        start + 20 * MAX_CATCH_UP_STEPS * 1_000
    );
}

#[test]
fn a_start_already_past_starts_the_series_now() {
    let received = at("2026-06-01T12:00:00.300Z");
    let start = at("2026-06-01T11:00:00Z");
    // An interval keeps its phase: the first occurrence after receipt.
    let (series, first) =
        Series::start(Rule::Every(7_000), Some(start), received, None, None).unwrap();
    assert_eq!((first, series.seq), (start + 515 * 7_000, 1));
    assert!(first >= received && first - received < 7_000);
    // A cron rule: its first match after receipt.
    let (_, first) =
        Series::start(cron("* * * * *", "UTC"), Some(start), received, None, None).unwrap();
    assert_eq!(first, at("2026-06-01T12:01:00Z"));
}

#[test]
fn impossible_rules_are_found_out_quickly_and_gaps_measured() {
    let from = at("2026-01-01T00:00:00Z");
    for expr in ["0 0 30 2 *", "0 0 31 4 *", "0 0 31 6,9,11 *"] {
        let rule = cron(expr, "UTC");
        assert_eq!(rule.first_from(from), None, "{expr}");
        assert_eq!(
            Series::start(rule, None, from, None, None),
            Err(StartError::NoOccurrence)
        );
    }
    // Feb 29th on a Monday (day-of-month AND day-of-week): rare, but there (2044).
    let rule = cron("0 0 29 2 +MON", "UTC");
    assert_eq!(rule.first_from(from), Some(at("2044-02-29T00:00:00Z")));
    assert_eq!(
        cron("*/10 * * * * *", "UTC").shortest_gap(from, 32),
        Some(10_000)
    );
    assert_eq!(
        cron("0,1 0 * * *", "UTC").shortest_gap(from, 32),
        Some(60_000)
    );
    assert_eq!(Rule::Every(1_500).shortest_gap(from, 32), Some(1_500));
}

#[test]
fn the_stored_form_round_trips_and_refuses_damage() {
    for series in [
        Series::new(cron("*/5 * * * *", "America/New_York"), Some(7), Some(9), 3),
        Series::new(Rule::Every(250), None, None, 1),
    ] {
        let mut bytes = Vec::new();
        series.encode_into(&mut bytes);
        assert_eq!(Series::decode(&bytes).unwrap(), series);
        for cut in 0..bytes.len() {
            assert!(Series::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
    assert!(Series::decode(&[9, 0, 1]).is_err());
    assert!(Series::decode(&[2, 0, 0, 1]).is_err(), "an interval of 0");
}

/// Zones with DST rules of several kinds (Lord Howe moves by 30 minutes).
const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kolkata",
];
const EXPRESSIONS: &[&str] = &[
    "* * * * *",
    "30 2 * * *",
    "0 1-3 * * *",
    "*/7 * * * * *",
    "15 45 1,2,3 * * *",
    "@hourly",
    "@daily",
    "0 0 * * SUN",
    "0 12 L * *",
    "*/20 2 * * *",
];

proptest! {
    #[test]
    fn the_next_occurrence_is_always_strictly_later(
        zone in proptest::sample::select(ZONES),
        expr in proptest::sample::select(EXPRESSIONS),
        // 2020 to 2035, to the millisecond.
        from in 1_577_836_800_000u64..2_082_758_400_000,
    ) {
        let rule = cron(expr, zone);
        let next = rule.after(from).unwrap();
        prop_assert!(next > from);
        prop_assert!(rule.after(next).unwrap() > next);
        let first = rule.first_from(from).unwrap();
        prop_assert!(first >= from && first <= next);
    }

    /// In UTC, a minute-level rule against a model that checks every minute.
    #[test]
    fn utc_minute_rules_match_a_model(
        minute_step in 1u64..=30,
        hour_step in 1u64..=12,
        from in 1_577_836_800_000u64..2_082_758_400_000,
    ) {
        let rule = cron(&format!("*/{minute_step} */{hour_step} * * *"), "UTC");
        let mut t = (from / 60_000 + 1) * 60_000;
        let model = loop {
            let minute = t / 60_000 % 60;
            let hour = t / 3_600_000 % 24;
            if minute % minute_step == 0 && hour % hour_step == 0 {
                break t;
            }
            t += 60_000;
        };
        prop_assert_eq!(rule.after(from), Some(model));
    }

    /// Catch-up against a model that steps one occurrence at a time.
    #[test]
    fn catch_up_matches_stepping(
        every in 1u64..5_000,
        late in 0u64..200_000,
        until in proptest::option::of(0u64..300_000),
        count in proptest::option::of(1u64..100),
        seq in 1u64..50,
    ) {
        let due = 1_800_000_000_000;
        let count = count.map(|c| c + seq - 1); // the stored occurrence is within bounds
        let until = until.map(|u| due + u);
        let series = Series::new(Rule::Every(every), until, count, seq);
        let mut model = Occurrence { due, seq };
        while let Some(next) = series.next(model).filter(|n| n.due <= due + late) {
            model = next;
        }
        prop_assert_eq!(series.catch_up(due, due + late), model);
    }
}
