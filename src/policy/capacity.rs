//! How many schedules may be pending: in all (`limits.max_pending`) and per quota
//! (`[[limits.quotas]]`, a subject pattern and its own `max_pending`).
//!
//! A schedule counts against every quota whose pattern matches its target. The counts live
//! in a [`Ledger`] that the store writer keeps beside the pending count, changes in the same
//! round as the schedules and persists in the same batch, so they agree with the store after
//! any crash. A quota is a bit in a [`QuotaMask`], worked out once per schedule, so keeping
//! the ledger is a few additions per schedule and nothing at all without quotas.

use super::PolicyError;
use super::subjects::Pattern;

/// Most quotas one natsched can have: a [`QuotaMask`] has a bit for each.
pub(crate) const MAX_QUOTAS: usize = 64;

/// The quotas a target counts against, one bit each in configuration order.
pub(crate) type QuotaMask = u64;

/// One `[[limits.quotas]]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Quota {
    pub(crate) subjects: Pattern,
    pub(crate) max_pending: u64,
}

/// Pending schedules, in all and per quota (in configuration order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub pending: u64,
    pub used: Vec<u64>,
}

impl Ledger {
    /// One more pending schedule, counting against the quotas of `mask`.
    pub fn add(&mut self, mask: QuotaMask) {
        self.pending += 1;
        self.change(mask, |n| n.saturating_add(1));
    }

    /// One fewer pending schedule, that counted against the quotas of `mask`.
    pub fn remove(&mut self, mask: QuotaMask) {
        self.pending = self.pending.saturating_sub(1);
        self.change(mask, |n| n.saturating_sub(1));
    }

    /// `count` schedules lost whose quotas are unknown (a damaged segment): they leave the
    /// pending count, and stay counted against their quotas (the safe side) until recounted.
    pub fn lose(&mut self, count: u64) {
        self.pending = self.pending.saturating_sub(count);
    }

    fn change(&mut self, mask: QuotaMask, f: impl Fn(u64) -> u64) {
        let mut bits = mask;
        while bits != 0 {
            let at = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if let Some(used) = self.used.get_mut(at) {
                *used = f(*used);
            }
        }
    }
}

/// The pending limits.
#[derive(Debug, Clone)]
pub struct Capacity {
    max_pending: u64,
    quotas: Vec<Quota>,
}

impl Capacity {
    pub(crate) fn new(max_pending: u64, quotas: Vec<Quota>) -> Capacity {
        debug_assert!(quotas.len() <= MAX_QUOTAS, "validated by the config");
        Capacity {
            max_pending,
            quotas,
        }
    }

    /// No limit at all (tests and tools).
    pub fn unlimited() -> Capacity {
        Capacity::new(u64::MAX, Vec::new())
    }

    /// The quotas' patterns (the names their counts are kept under) and limits, in order.
    pub fn quotas(&self) -> impl Iterator<Item = (&str, u64)> {
        self.quotas
            .iter()
            .map(|q| (q.subjects.as_str(), q.max_pending))
    }

    pub fn has_quotas(&self) -> bool {
        !self.quotas.is_empty()
    }

    /// The quotas a schedule to `target` counts against.
    pub fn mask(&self, target: &str) -> QuotaMask {
        let mut mask = 0;
        for (at, quota) in self.quotas.iter().enumerate() {
            if quota.subjects.matches(target) {
                mask |= 1 << at;
            }
        }
        mask
    }

    /// Whether one more schedule counting against `mask` fits, given what is pending. When it
    /// replaces a pending one (counting against `replaced`), the total does not grow, nor do
    /// the quotas the two share.
    pub fn room_for(
        &self,
        ledger: &Ledger,
        mask: QuotaMask,
        replaced: Option<QuotaMask>,
    ) -> Result<(), PolicyError> {
        if replaced.is_none() && ledger.pending >= self.max_pending {
            return Err(PolicyError::StoreFull {
                max: self.max_pending,
            });
        }
        let growing = mask & !replaced.unwrap_or(0);
        for (at, quota) in self.quotas.iter().enumerate() {
            let used = ledger.used.get(at).copied().unwrap_or(0);
            if growing & (1 << at) != 0 && used >= quota.max_pending {
                return Err(PolicyError::QuotaFull {
                    subjects: quota.subjects.as_str().to_owned(),
                    max: quota.max_pending,
                });
            }
        }
        Ok(())
    }
}
