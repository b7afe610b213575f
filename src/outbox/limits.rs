//! One rate limiter per target key (governor), shared by everything that calls
//! the target. Quotas come from config; a target without a quota is not limited.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::RateQuota;

/// Permits are spaced 3 % wider than `per / requests`: the other side counts
/// requests when they arrive, after network and scheduling jitter that can
/// bring two of ours closer together; the slack keeps every window within quota.
const SAFETY_MARGIN: f64 = 1.03;

/// The limiters of one process, by target key. A target is gated either per job
/// (the engine takes one permit before running each job) or per request (its
/// client takes one permit per HTTP call, e.g. amoCRM, where a job may make
/// several calls); either way there is one limiter per target, shared by all.
#[derive(Default)]
pub struct Limiters {
    quotas: HashMap<String, RateQuota>,
    per_request: std::collections::HashSet<String>,
    /// Targets spaced wider than [`SAFETY_MARGIN`].
    margins: HashMap<String, f64>,
    limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

impl Limiters {
    pub fn new(quotas: impl IntoIterator<Item = (String, RateQuota)>) -> Self {
        Limiters {
            quotas: quotas.into_iter().collect(),
            per_request: Default::default(),
            margins: HashMap::new(),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// Gates `target` per request: its client takes the permits, the engine does not.
    pub fn with_per_request(mut self, target: impl Into<String>, quota: RateQuota) -> Self {
        let target = target.into();
        self.quotas.insert(target.clone(), quota);
        self.per_request.insert(target);
        self
    }

    /// Spaces `target`'s permits `margin` times wider than its quota (at
    /// least [`SAFETY_MARGIN`]): for an API whose excess costs more than the
    /// throughput given up (amoCRM blocks an account after repeated 429s).
    pub fn with_margin(mut self, target: impl Into<String>, margin: f64) -> Self {
        self.margins
            .insert(target.into(), margin.max(SAFETY_MARGIN));
        self
    }

    /// The limiter the engine waits on before running a job of `target`.
    pub fn job_gate(&self, target: &str) -> Option<Arc<DefaultDirectRateLimiter>> {
        if self.per_request.contains(target) {
            None
        } else {
            self.limiter(target)
        }
    }

    /// The quota of a target, if it has one.
    pub fn quota(&self, target: &str) -> Option<RateQuota> {
        self.quotas.get(target).copied()
    }

    /// How many jobs of a target may be claimed ahead of their permits: about two
    /// seconds of its quota, so waiting jobs never outlive their lease.
    pub fn claim_cap(&self, target: &str, unlimited: usize) -> usize {
        match self.quota(target) {
            None => unlimited,
            Some(q) => {
                let per_s = f64::from(q.requests) / q.per.as_secs_f64().max(1e-3);
                let two_seconds = (per_s * 2.0).ceil() as usize;
                two_seconds.max(q.burst as usize).clamp(1, unlimited.max(1))
            }
        }
    }

    /// The shared limiter of a target, or `None` when it is unlimited.
    pub fn limiter(&self, target: &str) -> Option<Arc<DefaultDirectRateLimiter>> {
        let quota = self.quota(target)?;
        let mut map = self
            .limiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(
            map.entry(target.to_string())
                .or_insert_with(|| {
                    let margin = self.margins.get(target).copied().unwrap_or(SAFETY_MARGIN);
                    Arc::new(RateLimiter::direct(spaced_quota(&quota, margin)))
                })
                .clone(),
        )
    }
}

/// Converts a config quota into governor's: one permit every `per / requests`
/// (plus the safety margin), at most `burst` at once.
pub fn governor_quota(quota: &RateQuota) -> Quota {
    spaced_quota(quota, SAFETY_MARGIN)
}

/// Like [`governor_quota`], with permits spaced `margin` times `per / requests`.
fn spaced_quota(quota: &RateQuota, margin: f64) -> Quota {
    let requests = quota.requests.max(1);
    let period = quota.per.mul_f64(margin) / requests;
    let period = period.max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(quota.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_claims_to_two_seconds_of_quota() {
        let limiters = Limiters::new([(
            "amocrm:main".to_string(),
            RateQuota {
                requests: 7,
                per: Duration::from_secs(1),
                burst: 1,
            },
        )]);
        assert_eq!(limiters.claim_cap("amocrm:main", 64), 14);
        assert_eq!(limiters.claim_cap("kaspi:shop", 64), 64);
        assert!(limiters.limiter("kaspi:shop").is_none());
        let a = limiters.limiter("amocrm:main");
        let b = limiters.limiter("amocrm:main");
        assert!(matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(&a, &b)));
    }

    #[test]
    fn quota_period_is_never_shorter_than_the_contract() {
        let q = governor_quota(&RateQuota {
            requests: 7,
            per: Duration::from_secs(1),
            burst: 1,
        });
        assert!(q.replenish_interval() * 7 > Duration::from_secs(1));
        assert_eq!(q.burst_size().get(), 1);
    }

    #[test]
    fn a_target_with_a_margin_is_spaced_wider_and_others_are_not() {
        let quota = RateQuota {
            requests: 7,
            per: Duration::from_secs(1),
            burst: 1,
        };
        let limiters = Limiters::new([("kaspi:a".to_string(), quota)])
            .with_per_request("amocrm:main", quota)
            .with_margin("amocrm:main", 1.10);
        let wide = spaced_quota(&quota, 1.10).replenish_interval();
        assert!(wide * 7 >= Duration::from_millis(1099), "{wide:?}");
        assert!(governor_quota(&quota).replenish_interval() < wide);
        // The limiters themselves: a second permit right after the first is
        // refused, for both, and the margin is the configured one.
        for target in ["kaspi:a", "amocrm:main"] {
            let limiter = limiters.limiter(target).unwrap();
            assert!(limiter.check().is_ok());
            assert!(limiter.check().is_err());
        }
        assert_eq!(limiters.margins.get("amocrm:main"), Some(&1.10));
        assert_eq!(limiters.margins.get("kaspi:a"), None);
    }
}
