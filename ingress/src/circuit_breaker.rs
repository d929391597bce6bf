//! Circuit breakers per target: open after `failure_threshold` failures within `window_seconds`,
//! stay open for `cooldown_seconds`, then let one probe through (half-open) that closes or reopens it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tollgate_schemas::policy::CircuitBreakerConfig;

use crate::clock::later;
use crate::metrics;

#[derive(Debug)]
enum State {
    Closed {
        failures: VecDeque<Instant>,
    },
    Open {
        until: Instant,
    },
    /// One probe is out since `since`; a probe that never reports is replaced after a cooldown.
    HalfOpen {
        since: Instant,
    },
}

/// Whether a request may go to a target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The breaker was open and this request is its one probe.
    Probe,
    No {
        retry_after: Duration,
    },
}

#[derive(Debug, Default)]
pub struct Breakers {
    states: Mutex<HashMap<String, State>>,
}

impl Breakers {
    pub fn admit(&self, target: &str, cfg: &CircuitBreakerConfig, now: Instant) -> Admit {
        let cooldown = Duration::from_secs(cfg.cooldown_seconds);
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = states.get_mut(target) else { return Admit::Yes };
        match state {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if now < *until => Admit::No { retry_after: *until - now },
            State::HalfOpen { since } if now < later(*since, cooldown) => {
                Admit::No { retry_after: later(*since, cooldown) - now }
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                *state = State::HalfOpen { since: now };
                metrics::breaker_state(target, 2);
                Admit::Probe
            }
        }
    }

    pub fn record(&self, target: &str, cfg: &CircuitBreakerConfig, ok: bool, now: Instant) {
        let window = Duration::from_secs(cfg.window_seconds);
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = states.entry(target.to_owned()).or_insert_with(|| State::Closed { failures: VecDeque::new() });
        let next = match state {
            State::HalfOpen { .. } if ok => Some(State::Closed { failures: VecDeque::new() }),
            State::HalfOpen { .. } => {
                Some(State::Open { until: later(now, Duration::from_secs(cfg.cooldown_seconds)) })
            }
            State::Closed { failures } if !ok => {
                failures.push_back(now);
                while failures.front().is_some_and(|t| now.duration_since(*t) > window) {
                    failures.pop_front();
                }
                (failures.len() >= cfg.failure_threshold.max(1) as usize)
                    .then(|| State::Open { until: later(now, Duration::from_secs(cfg.cooldown_seconds)) })
            }
            State::Closed { .. } | State::Open { .. } => None,
        };
        if let Some(next) = next {
            metrics::breaker_state(target, if matches!(next, State::Open { .. }) { 1 } else { 0 });
            *state = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitBreakerConfig {
        CircuitBreakerConfig { failure_threshold: 3, window_seconds: 60, cooldown_seconds: 30 }
    }

    #[test]
    fn opens_after_threshold_and_closes_after_a_good_probe() {
        let b = Breakers::default();
        let t0 = Instant::now();
        for i in 0..2 {
            b.record("a/m", &cfg(), false, t0 + Duration::from_secs(i));
            assert_eq!(b.admit("a/m", &cfg(), t0 + Duration::from_secs(i)), Admit::Yes);
        }
        b.record("a/m", &cfg(), false, t0 + Duration::from_secs(2));
        assert_eq!(
            b.admit("a/m", &cfg(), t0 + Duration::from_secs(3)),
            Admit::No { retry_after: Duration::from_secs(29) }
        );
        let after = t0 + Duration::from_secs(33);
        assert_eq!(b.admit("a/m", &cfg(), after), Admit::Probe);
        assert!(matches!(b.admit("a/m", &cfg(), after), Admit::No { .. }), "one probe at a time");
        b.record("a/m", &cfg(), true, after);
        assert_eq!(b.admit("a/m", &cfg(), after), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_reopens_and_old_failures_expire() {
        let b = Breakers::default();
        let t0 = Instant::now();
        b.record("a/m", &cfg(), false, t0);
        b.record("a/m", &cfg(), false, t0);
        b.record("a/m", &cfg(), false, t0 + Duration::from_secs(61));
        assert_eq!(
            b.admit("a/m", &cfg(), t0 + Duration::from_secs(61)),
            Admit::Yes,
            "two failures fell out of the window"
        );
        b.record("a/m", &cfg(), false, t0 + Duration::from_secs(62));
        b.record("a/m", &cfg(), false, t0 + Duration::from_secs(63));
        let probe_at = t0 + Duration::from_secs(94);
        assert_eq!(b.admit("a/m", &cfg(), probe_at), Admit::Probe);
        b.record("a/m", &cfg(), false, probe_at);
        assert!(matches!(b.admit("a/m", &cfg(), probe_at + Duration::from_secs(1)), Admit::No { .. }));
    }

    #[test]
    fn a_cooldown_of_u64_max_keeps_the_breaker_open_without_panicking() {
        let b = Breakers::default();
        let huge = CircuitBreakerConfig { failure_threshold: 1, window_seconds: u64::MAX, cooldown_seconds: u64::MAX };
        let t0 = Instant::now();
        b.record("a/m", &huge, false, t0);
        assert!(matches!(b.admit("a/m", &huge, t0 + Duration::from_secs(86_400)), Admit::No { .. }));
    }
}
