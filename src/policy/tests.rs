use proptest::prelude::*;

use super::subjects::{Pattern, Refused, TargetRules};
use super::*;

fn pattern(text: &str) -> Pattern {
    Pattern::parse(text).unwrap()
}

/// The model: a pattern as a list of tokens matched recursively against a subject's tokens.
fn model_matches(pattern: &[&str], subject: &[&str]) -> bool {
    match (pattern.split_first(), subject.split_first()) {
        (None, None) => true,
        (Some((&">", rest)), Some(_)) => rest.is_empty(),
        (Some((&"*", rest)), Some((_, tail))) => model_matches(rest, tail),
        (Some((p, rest)), Some((s, tail))) => p == s && model_matches(rest, tail),
        _ => false,
    }
}

/// Every subject of 1 to 5 tokens from `a`, `b` and `c` (patterns use only `a` and `b`, so
/// `c` stands for every other token).
fn universe() -> Vec<String> {
    let mut all = vec![String::new()];
    let mut out = Vec::new();
    for _ in 0..5 {
        all = all
            .iter()
            .flat_map(|s| {
                ["a", "b", "c"].map(|t| {
                    if s.is_empty() {
                        t.to_owned()
                    } else {
                        format!("{s}.{t}")
                    }
                })
            })
            .collect();
        out.extend(all.iter().cloned());
    }
    out
}

fn pattern_text() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..4),
        any::<bool>(),
    )
        .prop_filter_map("a pattern has a token", |(mut tokens, rest)| {
            if rest {
                tokens.push(">");
            }
            (!tokens.is_empty()).then(|| tokens.join("."))
        })
}

proptest! {
    /// Any text (a config value) parses or is refused with a reason, and what parses can be
    /// matched against any subject and compared with any other pattern without a panic.
    #[test]
    fn parsing_and_matching_never_panic(text in any::<String>(), subject in any::<String>()) {
        if let Ok(pattern) = Pattern::parse(&text) {
            let _ = pattern.matches(&subject);
            let other = Pattern::parse(">").unwrap();
            let _ = (pattern.is_within(&other), other.is_within(&pattern));
            prop_assert_eq!(pattern.as_str(), text.as_str());
        }
    }

    #[test]
    fn matching_agrees_with_the_model(p in pattern_text(), s in "[abc](\\.[abc]){0,4}") {
        let tokens: Vec<&str> = p.split('.').collect();
        let parts: Vec<&str> = s.split('.').collect();
        prop_assert_eq!(pattern(&p).matches(&s), model_matches(&tokens, &parts), "{} {}", p, s);
    }

    #[test]
    fn within_means_every_subject_it_matches_the_other_matches(
        a in pattern_text(),
        b in pattern_text(),
    ) {
        let (pa, pb) = (pattern(&a), pattern(&b));
        let subset = universe().iter().all(|s| !pa.matches(s) || pb.matches(s));
        prop_assert_eq!(pa.is_within(&pb), subset, "{} within {}", a, b);
    }

    /// The rule semantics, against a model that reads them off the definition: allowed iff
    /// some allow matches, and each matching deny has a matching allow strictly inside it.
    #[test]
    fn rules_agree_with_the_model(
        allow in prop::collection::vec(pattern_text(), 1..4),
        deny in prop::collection::vec(pattern_text(), 0..4),
    ) {
        let allow: Vec<Pattern> = allow.iter().map(|t| pattern(t)).collect();
        let deny: Vec<Pattern> = deny.iter().map(|t| pattern(t)).collect();
        // The prefix's built-in deny `zz.>` cannot match the universe.
        let rules = TargetRules::new("zz", allow.clone(), deny.clone());
        for s in universe() {
            let allowed = allow.iter().any(|a| a.matches(&s))
                && deny.iter().filter(|d| d.matches(&s)).all(|d| {
                    allow.iter().any(|a| {
                        a.matches(&s) && a.is_within(d) && !d.is_within(a)
                    })
                });
            prop_assert_eq!(rules.check(&s).is_ok(), allowed, "{}", s);
        }
    }
}

#[test]
fn invalid_patterns_are_refused_with_a_reason() {
    for text in [
        "", "a..b", ".a", "a.", "a.>.b", "a.b*", "a.>x", "a b", "a.\tb", "a\u{1}",
    ] {
        assert!(Pattern::parse(text).is_err(), "{text:?}");
    }
    for text in [">", "*", "a.*.b", "$SYS.>", "orders.>", "a-b_c:d"] {
        assert!(Pattern::parse(text).is_ok(), "{text:?}");
    }
}

#[test]
fn builtin_denies_hold_unless_a_more_specific_allow_carves_them_out() {
    let rules = TargetRules::new("sched", vec![pattern(">")], Vec::new());
    for target in [
        "$SYS.REQ.SERVER.PING",
        "$JS.API.STREAM.DELETE.X",
        "$KV.config.key",
        "$O.bucket.x",
        "$SRV.PING",
        "_INBOX.abc.1",
        "sched.add.orders.x",
        "sched.cancel",
    ] {
        let refused = rules.check(target).unwrap_err();
        assert!(
            matches!(refused, Refused::Denied(_, subjects::Origin::BuiltIn)),
            "{target}"
        );
    }
    assert!(rules.check("orders.expired").is_ok());
    assert!(
        rules.check("$SYSTEM.x").is_ok(),
        "only the token $SYS is denied"
    );
    assert!(
        rules.check("schedules.x").is_ok(),
        "only the token sched is denied"
    );

    let rules = TargetRules::new(
        "sched",
        vec![
            pattern("orders.>"),
            pattern("$JS.API.STREAM.INFO.*"),
            pattern("$SYS.>"),
        ],
        vec![pattern("orders.secret.>")],
    );
    assert!(rules.check("$JS.API.STREAM.INFO.ORDERS").is_ok());
    assert_eq!(
        rules.check("$JS.API.STREAM.DELETE.ORDERS"),
        Err(Refused::NotAllowed),
        "matches no allow"
    );
    // An allow equal to a deny is not more specific: deny wins.
    assert!(matches!(
        rules.check("$SYS.REQ.SERVER.PING"),
        Err(Refused::Denied(..))
    ));
    assert!(matches!(
        rules.check("orders.secret.x"),
        Err(Refused::Denied(_, subjects::Origin::Config))
    ));
    assert_eq!(rules.check("billing.x"), Err(Refused::NotAllowed));
}

fn schedule(subject: &str, due: UnixMs, headers: &[(&str, &str)]) -> Schedule {
    Schedule {
        id: "x".into(),
        due,
        subject: subject.into(),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).into(), (*v).into()))
            .collect(),
        payload: bytes::Bytes::new(),
        created: 0,
        delivery: crate::record::Delivery::Core,
        recurrence: None,
        caller_id: true,
    }
}

#[test]
fn admit_gives_each_breach_its_own_code_and_names_the_rule() {
    let config = Config::from_toml(
        "[security]\ndeny_subjects = [\"billing.>\"]\n\
         [limits]\nmax_headers_bytes = 20\nmax_horizon = \"1day\"\n",
    )
    .unwrap();
    let policy = Policy::new(&config).unwrap();
    let now = 1_000_000;
    assert_eq!(
        policy.admit(&schedule("orders.x", now + 5, &[("A", "b")]), now),
        Ok(())
    );

    let error = policy
        .admit(&schedule("$SYS.REQ.SERVER.PING", now, &[]), now)
        .unwrap_err();
    let api: ApiError = error.into();
    assert_eq!(api.code, 403);
    assert!(
        api.description.contains("\"$SYS.>\""),
        "{}",
        api.description
    );
    assert!(api.description.contains("built-in"), "{}", api.description);

    let error = policy
        .admit(&schedule("billing.x", now, &[]), now)
        .unwrap_err();
    assert_eq!(error.code(), 403);
    assert!(
        error.to_string().contains("security.deny_subjects"),
        "{error}"
    );

    // "Name: value\r\n" is 13 bytes and "B: \r\n" 5: 18 fits in 20, 13 + 8 does not.
    let fits = schedule("a", now, &[("Name", "value"), ("B", "")]);
    assert_eq!(protocol::headers_bytes(&fits), 13 + 5);
    assert_eq!(policy.admit(&fits, now), Ok(()));
    let error = policy
        .admit(&schedule("a", now, &[("Name", "value"), ("Bb", "cc")]), now)
        .unwrap_err();
    assert_eq!(error, PolicyError::HeadersTooLarge { size: 21, max: 20 });
    assert_eq!(error.code(), 431);

    let day = 86_400_000;
    assert_eq!(policy.admit(&schedule("a", now + day, &[]), now), Ok(()));
    let error = policy
        .admit(&schedule("a", now + day + 1, &[]), now)
        .unwrap_err();
    assert_eq!(error.code(), 422);
    assert!(error.to_string().contains("1day"), "{error}");
    // Due in the past is "due now", never beyond the horizon.
    assert_eq!(policy.admit(&schedule("a", 0, &[]), now), Ok(()));

    // The injected target's text is quoted, escaped, in the description.
    let error = policy
        .admit(&schedule("$SYS.\u{1b}x", now, &[]), now)
        .unwrap_err();
    let api: ApiError = error.into();
    assert!(api.description.contains("\\u{1b}"), "{}", api.description);
}

fn quotas(list: &[(&str, u64)], max_pending: u64) -> Capacity {
    let quotas = list
        .iter()
        .map(|(p, max)| capacity::Quota {
            subjects: pattern(p),
            max_pending: *max,
        })
        .collect();
    Capacity::new(max_pending, quotas)
}

#[test]
fn capacity_counts_each_matching_quota_and_lets_replacements_through() {
    let capacity = quotas(&[("orders.>", 2), ("*.eu", 1)], 3);
    let mut ledger = Ledger {
        pending: 0,
        used: vec![0, 0],
    };
    let orders = capacity.mask("orders.eu");
    assert_eq!(orders, 0b11);
    assert_eq!(capacity.mask("billing.us"), 0);
    capacity.room_for(&ledger, orders, None).unwrap();
    ledger.add(orders);
    assert_eq!(
        ledger,
        Ledger {
            pending: 1,
            used: vec![1, 1]
        }
    );
    let error = capacity
        .room_for(&ledger, capacity.mask("billing.eu"), None)
        .unwrap_err();
    assert_eq!(
        error,
        PolicyError::QuotaFull {
            subjects: "*.eu".into(),
            max: 1
        }
    );
    assert_eq!(error.code(), 429);
    // Replacing the orders.eu schedule by another orders.eu one takes no new room.
    capacity.room_for(&ledger, orders, Some(orders)).unwrap();
    let us = capacity.mask("orders.us");
    capacity.room_for(&ledger, us, None).unwrap();
    ledger.add(us);
    assert!(
        capacity.room_for(&ledger, us, None).is_err(),
        "orders.> holds 2"
    );
    ledger.add(0);
    assert_eq!(ledger.pending, 3);
    let error = capacity.room_for(&ledger, 0, None).unwrap_err();
    assert_eq!(error, PolicyError::StoreFull { max: 3 });
    assert_eq!(error.code(), 503);
    // A replacement at the limit is not a new schedule.
    capacity.room_for(&ledger, 0, Some(0)).unwrap();
    ledger.remove(orders);
    assert_eq!(
        ledger,
        Ledger {
            pending: 2,
            used: vec![1, 0]
        }
    );
    capacity
        .room_for(&ledger, capacity.mask("billing.eu"), None)
        .unwrap();
    ledger.lose(5);
    assert_eq!(
        ledger,
        Ledger {
            pending: 0,
            used: vec![1, 0]
        }
    );
}
