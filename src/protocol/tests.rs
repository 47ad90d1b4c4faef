use super::*;

const NOW: UnixMs = 1_796_061_600_000;
const LIMITS: AddLimits = AddLimits {
    max_payload: 16,
    server_max_payload: 1024 * 1024,
    default_delivery: Delivery::Core,
    min_interval: 1000,
};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, *value);
    }
    map
}

fn add(target: &str, pairs: &[(&str, &str)]) -> Result<Schedule, ApiError> {
    parse_add(
        target,
        Some(&headers(pairs)),
        Bytes::from_static(b"p"),
        NOW,
        LIMITS,
    )
}

fn code(result: Result<Schedule, ApiError>) -> u16 {
    result.expect_err("must be refused").code
}

#[test]
fn delay_forms() {
    for (delay, ms) in [
        ("250", 250),
        ("0", 0),
        ("250ms", 250),
        ("15m", 900_000),
        ("1h30m", 5_400_000),
        ("1h 30m", 5_400_000),
        ("2s", 2_000),
    ] {
        let s = add("orders.expired", &[(DELAY, delay)]).unwrap();
        assert_eq!(s.due, NOW + ms, "{delay}");
        assert_eq!(s.created, NOW);
    }
}

#[test]
fn at_forms_and_past_times() {
    let s = add("t", &[(AT, "2026-11-30T18:00:00.250Z")]).unwrap();
    assert_eq!(s.due, 1_796_061_600_250);
    let s = add("t", &[(AT, "2026-11-30T19:00:00.250+01:00")]).unwrap();
    assert_eq!(s.due, 1_796_061_600_250);
    let past = add("t", &[(AT, "2001-01-01T00:00:00Z")]).unwrap();
    assert!(past.due < NOW, "a past time is accepted and simply due now");
}

#[test]
fn keeps_other_headers_and_payload_verbatim() {
    let s = add(
        "orders.expired",
        &[
            (DELAY, "1s"),
            ("Trace-Id", "abc"),
            ("Multi", "1"),
            ("Multi", "2"),
        ],
    )
    .unwrap();
    assert_eq!(s.subject, "orders.expired");
    assert_eq!(s.payload, Bytes::from_static(b"p"));
    assert_eq!(
        s.headers,
        [
            ("Multi".to_owned(), "1".to_owned()),
            ("Multi".to_owned(), "2".to_owned()),
            ("Trace-Id".to_owned(), "abc".to_owned()),
        ]
    );
}

#[test]
fn ids_are_taken_or_generated() {
    let s = add("t", &[(DELAY, "1s"), (ID, "order:42_x-y.z")]).unwrap();
    assert_eq!(s.id, "order:42_x-y.z");
    let a = add("t", &[(DELAY, "1s")]).unwrap();
    assert!(!a.caller_id && a.id.is_empty(), "named by the store writer");
    let longest = "a".repeat(MAX_ID_LEN);
    assert_eq!(
        add("t", &[(DELAY, "1s"), (ID, &longest)]).unwrap().id,
        longest
    );
}

#[test]
fn far_ids_carry_their_segment() {
    let due = 1_796_061_600_250;
    let id = far_id(due, 123_456_789, 7).unwrap();
    assert_eq!(id.len(), 26, "a ULID");
    assert_eq!(due_of_generated_id(&id), Some(due));
    assert_eq!(far_parts(&id), Some((due, 123_456_789, 7)));
    let largest = (1 << 48) - 1;
    assert_eq!(
        far_parts(&far_id(due, largest, u16::MAX).unwrap()),
        Some((due, largest, u16::MAX))
    );
    assert_eq!(far_id(due, 1 << 48, 0), None);
    // Unique per (seq, index).
    assert_ne!(far_id(due, 1, 0), far_id(due, 1, 1));
    assert_ne!(far_id(due, 1, 0), far_id(due, 2, 0));
    assert_eq!(far_parts("order-42"), None);
    let unmarked = ulid::Ulid::from_parts(due, 5).to_string();
    assert_eq!(far_parts(&unmarked), None);
    // Marked, but with bits set that a far id leaves clear.
    let marked_but_random = ulid::Ulid::from_parts(due, (1 << 79) | (1 << 70) | (5 << 16) | 3);
    assert_eq!(far_parts(&marked_but_random.to_string()), None);
    assert_eq!(
        far_parts(&id.to_lowercase()),
        None,
        "only the canonical text"
    );
}

#[test]
fn reserved_names_match_any_case() {
    let s = add("t", &[("sched-delay", "5"), ("SCHED-ID", "x")]).unwrap();
    assert_eq!((s.due, s.id.as_str()), (NOW + 5, "x"));
    assert!(s.headers.is_empty());
}

#[test]
fn malformed_requests_are_400() {
    let too_long = "a".repeat(MAX_ID_LEN + 1);
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("t", &[]),
        ("t", &[(AT, "2026-11-30T18:00:00Z"), (DELAY, "1s")]),
        ("t", &[(AT, "tomorrow")]),
        ("t", &[(AT, "2026-11-30T18:00:00")]),
        ("t", &[(DELAY, "soon")]),
        ("t", &[(DELAY, "-5")]),
        ("t", &[(DELAY, "")]),
        ("t", &[(DELAY, "99999999999999999999999")]),
        ("t", &[(AT, "10000-01-01T00:00:00Z")]),
        ("t", &[(DELAY, "1s"), ("Sched-Dealy", "1s")]),
        ("t", &[(DELAY, "1s"), (DELAY, "2s")]),
        ("t", &[(DELAY, "1s"), (ID, "")]),
        ("t", &[(DELAY, "1s"), (ID, "has space")]),
        ("t", &[(DELAY, "1s"), (ID, "slash/no")]),
        ("t", &[(DELAY, "1s"), (ID, &too_long)]),
        ("", &[(DELAY, "1s")]),
        ("orders.*", &[(DELAY, "1s")]),
        ("orders.>", &[(DELAY, "1s")]),
        ("orders..x", &[(DELAY, "1s")]),
    ];
    for (target, pairs) in cases {
        assert_eq!(code(add(target, pairs)), 400, "{target:?} {pairs:?}");
    }
}

#[test]
fn oversized_payload_is_413() {
    let big = Bytes::from(vec![0; LIMITS.max_payload + 1]);
    let err = parse_add("t", Some(&headers(&[(DELAY, "1s")])), big, NOW, LIMITS).unwrap_err();
    assert_eq!(err.code, 413);
    let fits = Bytes::from(vec![0; LIMITS.max_payload]);
    assert!(parse_add("t", Some(&headers(&[(DELAY, "1s")])), fits, NOW, LIMITS).is_ok());
}

#[test]
fn reply_bodies() {
    assert_eq!(
        add_reply("x", 1_796_061_600_250),
        Bytes::from_static(br#"{"id":"x","due":"2026-11-30T18:00:00.250Z"}"#)
    );
    let err = ApiError::bad_request("missing \"header\"");
    assert_eq!(
        err.body(),
        Bytes::from_static(br#"{"error":{"code":400,"description":"missing \"header\""}}"#)
    );
    let headers = err.headers();
    assert_eq!(headers.get(ERROR_CODE_HEADER).unwrap().as_str(), "400");
    assert_eq!(
        headers.get(ERROR_HEADER).unwrap().as_str(),
        "missing \"header\""
    );
}

#[test]
fn a_message_too_big_to_deliver_is_413() {
    // The payload passes api.max_payload but not with the headers added on delivery.
    let limits = AddLimits {
        max_payload: 1000,
        server_max_payload: 200,
        default_delivery: Delivery::Core,
        min_interval: 1000,
    };
    let fits = parse_add(
        "t",
        Some(&headers(&[(DELAY, "1s")])),
        Bytes::new(),
        NOW,
        limits,
    )
    .unwrap();
    let room = limits.server_max_payload - delivered_size(&fits);
    let just = Bytes::from(vec![0; room]);
    let s = parse_add("t", Some(&headers(&[(DELAY, "1s")])), just, NOW, limits).unwrap();
    assert_eq!(delivered_size(&s), limits.server_max_payload);
    let over = Bytes::from(vec![0; room + 1]);
    let err = parse_add("t", Some(&headers(&[(DELAY, "1s")])), over, NOW, limits).unwrap_err();
    assert_eq!(err.code, 413);
}

#[test]
fn delivered_size_matches_what_async_nats_sends() {
    let s = add("t", &[(DELAY, "1s"), ("A", "bc")]).unwrap();
    let mut wire = HeaderMap::new();
    wire.insert("A", "bc");
    // The id the store writer gives it.
    wire.insert(ID, far_id(s.due, 1, 0).unwrap().as_str());
    wire.insert(DUE, time::format_ms(s.due).as_str());
    // "NATS/1.0\r\n" + each "name: value\r\n" + "\r\n", as the NATS header block is framed.
    let block: usize = 10
        + wire
            .iter()
            .map(|(n, v)| AsRef::<str>::as_ref(n).len() + 4 + v[0].as_str().len())
            .sum::<usize>()
        + 2;
    assert_eq!(delivered_size(&s), block + s.payload.len());
}

#[test]
fn oversized_names_are_400() {
    let long = "h".repeat(MAX_NAME_LEN + 1);
    assert_eq!(code(add("t", &[(DELAY, "1s"), (&long, "v")])), 400);
}

#[test]
fn error_descriptions_are_escaped_and_bounded() {
    // A huge Sched-At is quoted in the error: cut short so the reply still fits.
    let huge = "x".repeat(1_200_000);
    let err = code_and_text(add("t", &[(AT, &huge)]));
    assert_eq!(err.0, 400);
    assert!(
        err.1.len() <= MAX_DESCRIPTION + "…".len(),
        "{}",
        err.1.len()
    );
    let err = ApiError::new(400, "é".repeat(2000) + "\n");
    assert!(err.description.len() <= MAX_DESCRIPTION + "…".len());
    let err = ApiError::new(400, "a\nb\r\u{1b}");
    assert_eq!(err.description, "a\\nb\\r\\u{1b}");
}

fn code_and_text(result: Result<Schedule, ApiError>) -> (u16, String) {
    let err = result.expect_err("must be refused");
    (err.code, err.description)
}

#[test]
fn stream_control_headers_are_refused() {
    for name in [
        "Nats-Rollup",
        "nats-rollup",
        "Nats-Expected-Last-Sequence",
        "NATS-EXPECTED-STREAM",
    ] {
        let error = parse_add(
            "t",
            Some(&headers(&[("Sched-Delay", "1s"), (name, "x")])),
            Bytes::new(),
            NOW,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(error.code, 400, "{name}");
        assert!(error.description.contains(name), "{}", error.description);
    }
    let kept = parse_add(
        "t",
        Some(&headers(&[
            ("Sched-Delay", "1s"),
            ("Nats-TTL", "1h"),
            ("Nats-Msg-Id", "m"),
        ])),
        Bytes::new(),
        NOW,
        LIMITS,
    )
    .unwrap();
    assert_eq!(kept.headers.len(), 2);
}

fn refusal(pairs: &[(&str, &str)]) -> String {
    let error = add("t", pairs).expect_err("must be refused");
    assert_eq!(error.code, 400, "{pairs:?}: {error}");
    error.description
}

#[test]
fn recurring_requests() {
    // NOW is 2026-11-30T18:00:00Z.
    let s = add("t", &[(CRON, "*/5 * * * *")]).unwrap();
    assert_eq!(s.due, NOW + 300_000);
    let series = s.recurrence.as_deref().unwrap();
    assert_eq!((series.seq, series.rule().zone()), (1, Some("UTC")));
    let s = add("t", &[(CRON, "0 9 * * *"), (TZ, "Europe/Berlin")]).unwrap();
    assert_eq!(s.due, 1_796_112_000_000, "09:00 CET on Dec 1 is 08:00Z");
    let s = add("t", &[(CRON, "@daily"), (AT, "2027-01-01T00:00:00Z")]).unwrap();
    assert_eq!(s.due, 1_798_761_600_000);
    let s = add(
        "t",
        &[
            (EVERY, "90s"),
            (COUNT, "3"),
            (UNTIL, "2027-01-01T00:00:00Z"),
        ],
    )
    .unwrap();
    assert_eq!(s.due, NOW + 90_000);
    let series = s.recurrence.as_deref().unwrap();
    assert_eq!(
        (series.count, series.until),
        (Some(3), Some(1_798_761_600_000))
    );
    let s = add("t", &[(EVERY, "1500"), (AT, "2026-11-30T18:00:10Z")]).unwrap();
    assert_eq!(s.due, NOW + 10_000, "a start is the first occurrence");
    // Names are case-insensitive, like every Sched- header.
    assert!(add("t", &[("sched-every", "1s"), ("SCHED-COUNT", "1")]).is_ok());
}

#[test]
fn recurring_conflicts_and_bad_values_name_the_field() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[(CRON, "* * * * *"), (EVERY, "1s")],
            "either Sched-Cron or Sched-Every",
        ),
        (
            &[(CRON, "* * * * *"), (DELAY, "1s")],
            "Sched-Delay cannot be given with Sched-Cron",
        ),
        (
            &[(EVERY, "1s"), (DELAY, "1s")],
            "Sched-Delay cannot be given with Sched-Every",
        ),
        (
            &[(EVERY, "1s"), (TZ, "UTC")],
            "Sched-TZ applies to Sched-Cron only",
        ),
        (
            &[(AT, "2027-01-01T00:00:00Z"), (COUNT, "2")],
            "Sched-Count applies only",
        ),
        (
            &[(DELAY, "1s"), (UNTIL, "2027-01-01T00:00:00Z")],
            "Sched-Until applies only",
        ),
        (&[(DELAY, "1s"), (TZ, "UTC")], "Sched-TZ applies only"),
        (&[(TZ, "UTC")], "Sched-TZ applies only"),
        (&[(CRON, "61 * * * *")], "invalid Sched-Cron \"61 * * * *\""),
        (&[(CRON, "* * *")], "invalid Sched-Cron"),
        (
            &[(CRON, "0 0 30 2 *")],
            "invalid Sched-Cron: the rule has no occurrence",
        ),
        (
            &[(CRON, "* * * * *"), (TZ, "Mars/Base")],
            "invalid Sched-TZ \"Mars/Base\"",
        ),
        (
            &[(CRON, "* * * * *"), (TZ, "../../etc/passwd")],
            "invalid Sched-TZ",
        ),
        (&[(EVERY, "soon")], "invalid Sched-Every \"soon\""),
        (
            &[(EVERY, "999ms")],
            "shorter than the shortest interval allowed, 1s",
        ),
        (&[(EVERY, "0")], "shorter than"),
        (&[(EVERY, "1s"), (COUNT, "0")], "invalid Sched-Count \"0\""),
        (&[(EVERY, "1s"), (COUNT, "-1")], "invalid Sched-Count"),
        (
            &[(EVERY, "1s"), (UNTIL, "tomorrow")],
            "invalid Sched-Until \"tomorrow\"",
        ),
        (
            &[(EVERY, "1s"), (UNTIL, "2026-11-30T18:00:00.500Z")],
            "Sched-Until is before the series' first occurrence",
        ),
        (
            &[(CRON, "* * * * *"), (CRON, "@daily")],
            "given more than once",
        ),
    ];
    for (pairs, expected) in cases {
        let description = refusal(pairs);
        assert!(
            description.contains(expected),
            "{pairs:?}: {description:?} lacks {expected:?}"
        );
    }
    // A hostile expression is quoted, escaped, and cut short.
    let description = refusal(&[(CRON, &"\u{1b}[31m*".repeat(3000))]);
    assert!(!description.chars().any(char::is_control));
    assert!(description.len() <= MAX_DESCRIPTION + '…'.len_utf8());
}

#[test]
fn a_series_counts_its_sequence_header_in_the_delivered_size() {
    let one_shot = add("t", &[(DELAY, "1s")]).unwrap();
    let series = add("t", &[(EVERY, "1s")]).unwrap();
    assert_eq!(
        delivered_size(&series) - delivered_size(&one_shot),
        SEQ.len() + u64::MAX.to_string().len() + ": \r\n".len()
    );
}

#[test]
fn a_cron_rule_finer_than_min_interval_is_refused_and_a_past_start_starts_now() {
    let strict = AddLimits {
        min_interval: 60_000,
        ..LIMITS
    };
    let add_with = |pairs: &[(&str, &str)]| {
        parse_add(
            "t",
            Some(&headers(pairs)),
            Bytes::from_static(b"p"),
            NOW,
            strict,
        )
    };
    let error = add_with(&[(CRON, "*/10 * * * * *")]).unwrap_err();
    assert!(error.description.contains("fires 10s apart"), "{error}");
    assert!(add_with(&[(CRON, "* * * * *")]).is_ok());
    // A start in the past: the series begins after receipt, in the start's phase.
    let s = add("t", &[(EVERY, "7s"), (AT, "2026-11-30T17:00:00Z")]).unwrap();
    assert_eq!(s.due, NOW + 5_000, "515 periods of 7 s after the start");
    let s = add("t", &[(CRON, "@hourly"), (AT, "2001-01-01T00:00:00Z")]).unwrap();
    assert_eq!(s.due, NOW + 3_600_000);
}

#[test]
fn sched_seq_continues_a_series_at_its_occurrence_even_when_past() {
    // NOW is 2026-11-30T18:00:00Z. Sched-At is occurrence Sched-Seq's due, as given.
    let s = add(
        "t",
        &[
            (EVERY, "7s"),
            (AT, "2026-11-30T17:00:00.250Z"),
            (SEQ, "7"),
            (COUNT, "10"),
        ],
    )
    .unwrap();
    assert_eq!(
        s.due,
        NOW - 3_600_000 + 250,
        "overdue, not moved after receipt"
    );
    let series = s.recurrence.as_deref().unwrap();
    assert_eq!((series.seq, series.count), (7, Some(10)));
    let s = add(
        "t",
        &[
            (CRON, "0 6 * * *"),
            (TZ, "Europe/Berlin"),
            (AT, "2026-12-01T05:00:00Z"),
            (SEQ, "3"),
            (UNTIL, "2026-12-31T05:00:00Z"),
        ],
    )
    .unwrap();
    assert_eq!(s.due, NOW + 11 * 3_600_000);
    let series = s.recurrence.as_deref().unwrap();
    assert_eq!(
        (series.seq, series.rule().zone(), series.until),
        (3, Some("Europe/Berlin"), Some(1_798_693_200_000))
    );
    let at = (AT, "2026-11-30T19:00:00Z");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[(EVERY, "1s"), (SEQ, "2")], "Sched-Seq needs Sched-At"),
        (
            &[at, (SEQ, "2")],
            "Sched-Seq applies only to a recurring schedule",
        ),
        (&[(EVERY, "1s"), at, (SEQ, "0")], "invalid Sched-Seq \"0\""),
        (&[(EVERY, "1s"), at, (SEQ, "x")], "invalid Sched-Seq \"x\""),
        (
            &[(EVERY, "1s"), at, (SEQ, "4"), (COUNT, "3")],
            "Sched-Seq 4 is past the series' last occurrence (Sched-Count 3)",
        ),
        (
            &[
                (EVERY, "1s"),
                at,
                (SEQ, "2"),
                (UNTIL, "2026-11-30T18:30:00Z"),
            ],
            "Sched-Until is before the series' first occurrence",
        ),
        (
            &[(EVERY, "1s"), at, (SEQ, "2"), (SEQ, "3")],
            "given more than once",
        ),
        (
            &[(CRON, "0 6 * * *"), at, (SEQ, "2")],
            "with Sched-Seq, Sched-At must be an occurrence of Sched-Cron",
        ),
    ];
    for (pairs, expected) in cases {
        let description = refusal(pairs);
        assert!(
            description.contains(expected),
            "{pairs:?}: {description:?} lacks {expected:?}"
        );
    }
}
