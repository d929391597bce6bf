//! Time on the request path: wall-clock microseconds for events and decisions, and deadlines
//! that a policy's figure cannot overflow.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Longest wait a deadline is given. A policy may say more (`cooldown_seconds: 1e19` is valid
/// YAML for "practically never"); `Instant + Duration` panics on overflow, so such a figure is
/// held to this instead.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `now + wait`, with `wait` held to [`MAX_WAIT`].
pub fn later(now: Instant, wait: Duration) -> Instant {
    now + wait.min(MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_wait_is_a_far_deadline_not_a_panic() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::MAX), now + MAX_WAIT);
        assert_eq!(later(now, Duration::from_secs(u64::MAX)), now + MAX_WAIT);
        assert_eq!(later(now, Duration::from_secs(3)), now + Duration::from_secs(3));
    }
}
