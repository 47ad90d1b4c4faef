//! A series as the store keeps it, inside a schedule's record (see [`crate::record`]).
//!
//! | field  | encoding                                                         |
//! |--------|------------------------------------------------------------------|
//! | rule   | `u8` 1 = cron, then varint length + expression, varint length + zone name; 2 = interval, then varint ms |
//! | bounds | `u8` flags: bit 0 an until follows, bit 1 a count follows         |
//! | until  | if bit 0: varint Unix ms                                          |
//! | count  | if bit 1: varint                                                  |
//! | seq    | varint: the number of the occurrence the record is due at         |
//!
//! A cron rule is parsed again when read: the text is what the caller sent, so a reader
//! never depends on how a parser represents it.

use super::rule::Rule;
use super::series::Series;
use crate::record::{DecodeError, Reader, put_str, put_varint};

const RULE_CRON: u8 = 1;
const RULE_EVERY: u8 = 2;
const HAS_UNTIL: u8 = 1;
const HAS_COUNT: u8 = 2;

impl Series {
    /// Appends the stored form to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match &self.rule {
            Rule::Cron(rule) => {
                out.push(RULE_CRON);
                put_str(out, &rule.expr);
                put_str(out, &rule.zone_name);
            }
            Rule::Every(ms) => {
                out.push(RULE_EVERY);
                put_varint(out, *ms);
            }
        }
        let flags =
            u8::from(self.until.is_some()) * HAS_UNTIL + u8::from(self.count.is_some()) * HAS_COUNT;
        out.push(flags);
        if let Some(until) = self.until {
            put_varint(out, until);
        }
        if let Some(count) = self.count {
            put_varint(out, count);
        }
        put_varint(out, self.seq);
    }

    /// Reads the stored form, which must fill `bytes`.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Series, DecodeError> {
        let mut r = Reader(bytes);
        let rule = match r.u8()? {
            RULE_CRON => {
                let expr = r.str()?;
                let zone = r.str()?;
                Rule::cron(expr, Some(zone)).map_err(|e| DecodeError::Rule(e.to_string()))?
            }
            RULE_EVERY => match r.varint()? {
                0 => return Err(DecodeError::Rule("an interval of 0 ms".into())),
                ms => Rule::Every(ms),
            },
            other => return Err(DecodeError::Rule(format!("unknown rule kind {other}"))),
        };
        let flags = r.u8()?;
        let until = (flags & HAS_UNTIL != 0).then(|| r.varint()).transpose()?;
        let count = (flags & HAS_COUNT != 0).then(|| r.varint()).transpose()?;
        let seq = r.varint()?;
        if !r.0.is_empty() {
            return Err(DecodeError::TrailingBytes(r.0.len()));
        }
        Ok(Series::new(rule, until, count, seq))
    }
}
