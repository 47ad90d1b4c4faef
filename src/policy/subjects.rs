//! NATS subject patterns (`*` one token, `>` one or more trailing tokens) and the allow/deny
//! rules of `[security]` built from them.
//!
//! A target is allowed if an allow pattern matches it and every deny pattern that matches it
//! is overridden by a matching allow pattern *strictly more specific* than the deny: one whose
//! subjects are all the deny's, and not the other way round (`$JS.API.STREAM.INFO.>` inside
//! `$JS.>`). So deny wins, unless the operator carved an explicit exception out of it; the
//! default allow `>` never overrides anything. Which allows override which denies is worked
//! out once, when the rules are built, so a check is a few token comparisons per rule.

use std::fmt;

/// One token of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens; only ever last.
    Rest,
}

/// A subject pattern such as `orders.*.created` or `$JS.>`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    text: String,
    tokens: Vec<Token>,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub(crate) fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("empty subject pattern".to_owned());
        }
        let count = text.split('.').count();
        let mut tokens = Vec::with_capacity(count);
        for (at, token) in text.split('.').enumerate() {
            tokens.push(match token {
                "" => return Err(format!("{text:?} has an empty token")),
                "*" => Token::One,
                ">" if at + 1 == count => Token::Rest,
                ">" => return Err(format!("{text:?} has '>' before its last token")),
                literal if literal.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    return Err(format!(
                        "{text:?} contains white space or a control character"
                    ));
                }
                literal if literal.contains(['*', '>']) => {
                    return Err(format!("{text:?} has a wildcard inside a token"));
                }
                literal => Token::Literal(literal.to_owned()),
            });
        }
        Ok(Pattern {
            text: text.to_owned(),
            tokens,
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the subject `subject` (no wildcards) matches.
    pub(crate) fn matches(&self, subject: &str) -> bool {
        let mut parts = subject.split('.');
        for token in &self.tokens {
            let part = parts.next();
            match (token, part) {
                (_, None) => return false,
                (Token::Rest, Some(_)) => return true,
                (Token::One, Some(_)) => {}
                (Token::Literal(literal), Some(part)) if literal == part => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        parts.next().is_none()
    }

    /// Whether every subject this pattern matches, `other` matches too.
    pub(crate) fn is_within(&self, other: &Pattern) -> bool {
        let mut mine = self.tokens.iter();
        for theirs in &other.tokens {
            let token = mine.next();
            match (theirs, token) {
                (_, None) => return false,
                // Theirs takes one or more tokens, and this has at least one left.
                (Token::Rest, Some(_)) => return true,
                (Token::One, Some(Token::Literal(_) | Token::One)) => {}
                (Token::One, Some(Token::Rest)) => return false,
                (Token::Literal(a), Some(Token::Literal(b))) if a == b => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        mine.next().is_none()
    }

    /// Whether this pattern matches a subset of what `other` matches, and not all of it.
    pub(crate) fn is_strictly_within(&self, other: &Pattern) -> bool {
        self.is_within(other) && !other.is_within(self)
    }
}

/// Where a rule comes from, for the refusal's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The protected subjects natsched never publishes to unless told (see [`builtin_denies`]).
    BuiltIn,
    /// `security.allow_subjects` or `security.deny_subjects`.
    Config,
}

/// The allow and deny rules for target subjects.
#[derive(Debug, Clone)]
pub(crate) struct TargetRules {
    allow: Vec<Pattern>,
    deny: Vec<(Pattern, Origin)>,
    /// For each deny rule, the allow rules that override it (strictly more specific).
    exceptions: Vec<Vec<usize>>,
}

/// Why a target subject is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused<'a> {
    /// No allow pattern matches.
    NotAllowed,
    /// This deny pattern matches, and no more specific allow pattern does.
    Denied(&'a Pattern, Origin),
}

/// The targets natsched refuses unless explicitly allowed: the server's and JetStream's APIs,
/// key-value and object stores, micro-services, reply inboxes, and natsched's own subjects
/// under `prefix` (no scheduling onto the scheduler: no amplification loops).
pub(crate) fn builtin_denies(prefix: &str) -> Vec<Pattern> {
    ["$SYS.>", "$JS.>", "$KV.>", "$O.>", "$SRV.>", "_INBOX.>"]
        .iter()
        .map(|text| (*text).to_owned())
        .chain([format!("{prefix}.>")])
        .filter_map(|text| Pattern::parse(&text).ok())
        .collect()
}

impl TargetRules {
    /// The rules: `allow`, and `deny` after the built-in denies for `prefix`.
    pub(crate) fn new(prefix: &str, allow: Vec<Pattern>, deny: Vec<Pattern>) -> TargetRules {
        let deny: Vec<(Pattern, Origin)> = builtin_denies(prefix)
            .into_iter()
            .map(|p| (p, Origin::BuiltIn))
            .chain(deny.into_iter().map(|p| (p, Origin::Config)))
            .collect();
        let exceptions = deny
            .iter()
            .map(|(denied, _)| {
                (0..allow.len())
                    .filter(|&at| allow[at].is_strictly_within(denied))
                    .collect()
            })
            .collect();
        TargetRules {
            allow,
            deny,
            exceptions,
        }
    }

    /// Whether natsched may publish to `target`.
    pub(crate) fn check(&self, target: &str) -> Result<(), Refused<'_>> {
        if !self.allow.iter().any(|p| p.matches(target)) {
            return Err(Refused::NotAllowed);
        }
        for ((denied, origin), exceptions) in self.deny.iter().zip(&self.exceptions) {
            let excepted = || exceptions.iter().any(|&at| self.allow[at].matches(target));
            if denied.matches(target) && !excepted() {
                return Err(Refused::Denied(denied, *origin));
            }
        }
        Ok(())
    }
}
