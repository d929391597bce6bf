//! Counters over time: sliding buckets for rate limits, calendar windows for budgets. The
//! enforcer counts everyone's usage with them, each ingress its own admissions, so both agree on
//! what a window holds.

use std::collections::VecDeque;

use crate::rules::{Period, Window};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};

const US: i64 = 1_000_000;

/// How many buckets a sliding window is cut into: the window's resolution is 1/60 of its length
/// (a minute for `1h`), and a bucket leaves the window whole, so a count stays up to one bucket
/// longer than exactly `window` — the conservative side for a limit.
pub const BUCKETS_PER_WINDOW: i64 = 60;

/// Bucket length, in seconds, of a sliding window of `window_s` seconds.
pub fn bucket_seconds(window_s: u64) -> i64 {
    (i64::try_from(window_s).unwrap_or(i64::MAX) / BUCKETS_PER_WINDOW).max(1)
}

#[derive(Debug, Clone)]
pub enum Counter {
    Sliding(Sliding),
    Calendar(Calendar),
}

impl Counter {
    pub fn new(window: &Window) -> Counter {
        match window {
            Window::Sliding { seconds } => Counter::Sliding(Sliding::new(*seconds)),
            Window::Calendar { period, timezone } => Counter::Calendar(Calendar::new(*period, timezone)),
        }
    }

    pub fn add(&mut self, at_us: i64, amount: i64, now_us: i64) {
        match self {
            Counter::Sliding(s) => s.add(at_us, amount, now_us),
            Counter::Calendar(c) => c.add(at_us, amount, now_us),
        }
    }

    /// The total in the window that contains `now_us`.
    pub fn value(&mut self, now_us: i64) -> i64 {
        match self {
            Counter::Sliding(s) => s.value(now_us),
            Counter::Calendar(c) => c.value(now_us),
        }
    }

    /// (start, end) of the window at `now_us`.
    pub fn bounds(&self, now_us: i64) -> (i64, i64) {
        match self {
            Counter::Sliding(s) => (now_us - s.window_s * US, now_us),
            Counter::Calendar(c) => c.bounds(now_us),
        }
    }

    /// When the total falls below `limit` if nothing more is added.
    pub fn lifts_at(&mut self, now_us: i64, limit: i64) -> i64 {
        match self {
            Counter::Sliding(s) => s.lifts_at(now_us, limit),
            Counter::Calendar(c) => c.bounds(now_us).1,
        }
    }

    /// Nothing left to remember.
    pub fn is_empty(&mut self, now_us: i64) -> bool {
        self.value(now_us) == 0
    }

    /// When the total next changes if nothing more is added: the oldest bucket leaves the
    /// window, or the calendar window ends (`i64::MAX` when nothing is counted).
    pub fn next_change_us(&self) -> i64 {
        match self {
            Counter::Sliding(s) => {
                s.buckets.front().map_or(i64::MAX, |&(idx, _)| s.expires_at_s(idx).saturating_mul(US))
            }
            Counter::Calendar(c) if c.total != 0 => c.end_us,
            Counter::Calendar(_) => i64::MAX,
        }
    }

    /// When everything counted so far has left the window (0 when nothing is counted): the
    /// counter can be forgotten from then on unless more is added.
    pub fn drained_at_us(&self) -> i64 {
        match self {
            Counter::Sliding(s) => s.buckets.back().map_or(0, |&(idx, _)| s.expires_at_s(idx).saturating_mul(US)),
            Counter::Calendar(c) if c.total != 0 => c.end_us,
            Counter::Calendar(_) => 0,
        }
    }
}

/// Buckets of `bucket_s` seconds; a bucket counts while any of it is inside the window.
#[derive(Debug, Clone)]
pub struct Sliding {
    window_s: i64,
    bucket_s: i64,
    /// (bucket index = second / bucket_s, amount), ascending by index.
    buckets: VecDeque<(i64, i64)>,
    total: i64,
}

impl Sliding {
    pub fn new(window_s: u64) -> Self {
        Sliding {
            window_s: i64::try_from(window_s).unwrap_or(i64::MAX / US),
            bucket_s: bucket_seconds(window_s),
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    /// The bucket's last moment inside the window: it counts until `(idx + 1) * bucket_s + window`.
    fn expires_at_s(&self, idx: i64) -> i64 {
        (idx + 1) * self.bucket_s + self.window_s
    }

    fn expire(&mut self, now_us: i64) {
        let now_s = now_us.div_euclid(US);
        while let Some(&(idx, amount)) = self.buckets.front() {
            if self.expires_at_s(idx) > now_s {
                break;
            }
            self.total -= amount;
            self.buckets.pop_front();
        }
    }

    pub fn add(&mut self, at_us: i64, amount: i64, now_us: i64) {
        let idx = at_us.div_euclid(US) / self.bucket_s;
        if self.expires_at_s(idx) <= now_us.div_euclid(US) {
            return; // already outside the window
        }
        // Amounts come from the usage topic: a sum saturates rather than wrap (release) or
        // panic (debug) on an absurd figure.
        self.total = self.total.saturating_add(amount);
        match self.buckets.back_mut() {
            Some(back) if back.0 == idx => back.1 = back.1.saturating_add(amount),
            Some(back) if back.0 > idx => {
                // Out of order (a late event): keep the deque sorted.
                let pos = self.buckets.partition_point(|(i, _)| *i < idx);
                match self.buckets.get_mut(pos) {
                    Some(b) if b.0 == idx => b.1 = b.1.saturating_add(amount),
                    _ => self.buckets.insert(pos, (idx, amount)),
                }
            }
            _ => self.buckets.push_back((idx, amount)),
        }
    }

    pub fn value(&mut self, now_us: i64) -> i64 {
        self.expire(now_us);
        self.total
    }

    pub fn lifts_at(&mut self, now_us: i64, limit: i64) -> i64 {
        let mut total = self.value(now_us);
        for &(idx, amount) in &self.buckets {
            if total < limit {
                break;
            }
            total -= amount;
            if total < limit {
                return self.expires_at_s(idx) * US;
            }
        }
        now_us
    }
}

/// The current calendar day, ISO week (from Monday) or month in a time zone.
#[derive(Debug, Clone)]
pub struct Calendar {
    period: Period,
    tz: TimeZone,
    start_us: i64,
    end_us: i64,
    total: i64,
}

impl Calendar {
    pub fn new(period: Period, timezone: &str) -> Self {
        // The policy check rejects unknown zones; UTC is the fallback of last resort.
        let tz = TimeZone::get(timezone).unwrap_or(TimeZone::UTC);
        Calendar { period, tz, start_us: 0, end_us: 0, total: 0 }
    }

    pub fn bounds(&self, at_us: i64) -> (i64, i64) {
        if (self.start_us..self.end_us).contains(&at_us) {
            return (self.start_us, self.end_us);
        }
        calendar_bounds(self.period, &self.tz, at_us)
    }

    pub fn add(&mut self, at_us: i64, amount: i64, now_us: i64) {
        self.roll(now_us.max(at_us));
        if (self.start_us..self.end_us).contains(&at_us) {
            self.total = self.total.saturating_add(amount);
        }
    }

    fn roll(&mut self, now_us: i64) {
        if now_us >= self.end_us {
            let (s, e) = calendar_bounds(self.period, &self.tz, now_us);
            self.start_us = s;
            self.end_us = e;
            self.total = 0;
        }
    }

    pub fn value(&mut self, now_us: i64) -> i64 {
        self.roll(now_us);
        self.total
    }
}

/// [start, end) in microseconds of the calendar period that contains `at_us`.
pub fn calendar_bounds(period: Period, tz: &TimeZone, at_us: i64) -> (i64, i64) {
    let fallback = (at_us, at_us + 86_400 * US);
    let Ok(ts) = Timestamp::from_microsecond(at_us) else { return fallback };
    let z = ts.to_zoned(tz.clone());
    let start = match period {
        Period::Daily => z.start_of_day(),
        Period::Weekly => {
            let back = i64::from(z.weekday().to_monday_zero_offset());
            z.checked_sub(back.days()).and_then(|d| d.start_of_day())
        }
        Period::Monthly => z.first_of_month().and_then(|d| d.start_of_day()),
    };
    let Ok(start) = start else { return fallback };
    let end = match period {
        Period::Daily => start.checked_add(1.day()),
        Period::Weekly => start.checked_add(1.week()),
        Period::Monthly => start.checked_add(1.month()),
    };
    match end {
        Ok(end) => (start.timestamp().as_microsecond(), end.timestamp().as_microsecond()),
        Err(_) => fallback,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const H: i64 = 3600 * US;

    #[test]
    fn sliding_window_forgets_whole_buckets() {
        let mut s = Sliding::new(3600); // minute buckets
        let t0 = 1_000 * H;
        s.add(t0, 10, t0);
        s.add(t0 + 30 * 60 * US, 5, t0 + 30 * 60 * US);
        assert_eq!(s.value(t0 + 59 * 60 * US), 15);
        assert_eq!(s.value(t0 + H + 59 * US), 15, "the first minute's bucket still overlaps the window");
        assert_eq!(s.value(t0 + H + 60 * US), 5);
        assert_eq!(s.value(t0 + H + 31 * 60 * US), 0);
    }

    #[test]
    fn absurd_amounts_saturate_instead_of_overflowing() {
        let t0 = 1_000 * H;
        let mut s = Sliding::new(3600);
        s.add(t0, i64::MAX, t0);
        s.add(t0 + US, 5, t0 + US);
        assert_eq!(s.value(t0 + US), i64::MAX);
        let mut c = Calendar::new(Period::Daily, "UTC");
        c.add(t0, i64::MAX, t0);
        c.add(t0 + US, 5, t0 + US);
        assert_eq!(c.value(t0 + US), i64::MAX);
    }

    #[test]
    fn sliding_lifts_when_enough_old_usage_leaves() {
        let mut s = Sliding::new(3600);
        let t0 = 1_000 * H;
        s.add(t0, 60, t0);
        s.add(t0 + 10 * 60 * US, 50, t0 + 10 * 60 * US);
        let now = t0 + 20 * 60 * US;
        assert_eq!(s.lifts_at(now, 100), t0 + H + 60 * US, "dropping the first bucket brings 110 under 100");
        assert_eq!(s.lifts_at(now, 40), t0 + H + 11 * 60 * US, "both buckets must go");
    }

    #[test]
    fn calendar_months_follow_the_time_zone() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-11-30T23:30:00Z is already December 1st in Berlin.
        let at = Timestamp::from_second(1_796_081_400).unwrap().as_microsecond();
        let (s, e) = calendar_bounds(Period::Monthly, &berlin, at);
        assert_eq!(Timestamp::from_microsecond(s).unwrap().to_string(), "2026-11-30T23:00:00Z");
        assert_eq!(Timestamp::from_microsecond(e).unwrap().to_string(), "2026-12-31T23:00:00Z");
        let (s, e) = calendar_bounds(Period::Monthly, &TimeZone::UTC, at);
        assert_eq!(Timestamp::from_microsecond(s).unwrap().to_string(), "2026-11-01T00:00:00Z");
        assert_eq!(Timestamp::from_microsecond(e).unwrap().to_string(), "2026-12-01T00:00:00Z");
        let (s, _) = calendar_bounds(Period::Weekly, &TimeZone::UTC, at);
        assert_eq!(Timestamp::from_microsecond(s).unwrap().to_string(), "2026-11-30T00:00:00Z", "a Monday");
    }

    #[test]
    fn a_counter_is_drained_when_its_last_amount_leaves_the_window() {
        let t0 = 1_000 * H;
        let mut s = Counter::new(&Window::Sliding { seconds: 3600 });
        assert_eq!(s.drained_at_us(), 0);
        s.add(t0, 3, t0);
        s.add(t0 + 90 * US, 1, t0 + 90 * US);
        let drained = s.drained_at_us();
        assert_eq!(drained, t0 + H + 120 * US, "the minute bucket of t0+90s leaves at t0+1h+2min");
        assert_eq!(s.value(drained - 1), 1);
        assert_eq!(s.value(drained), 0);
        let mut c = Counter::new(&Window::Calendar { period: Period::Daily, timezone: "UTC".into() });
        c.add(t0, 5, t0);
        assert_eq!(c.drained_at_us(), calendar_bounds(Period::Daily, &TimeZone::UTC, t0).1);
    }

    #[test]
    fn calendar_resets_when_the_period_rolls_over() {
        let mut c = Calendar::new(Period::Daily, "UTC");
        let day = 24 * H;
        let t = 20_000 * day + 5 * H;
        c.add(t, 7, t);
        c.add(t - day, 100, t); // yesterday's late event: not today's spend
        assert_eq!(c.value(t + H), 7);
        assert_eq!(c.value(t + day), 0);
    }

    proptest! {
        /// The sliding counter equals a brute-force sum over the events whose bucket is in the window.
        #[test]
        fn sliding_matches_brute_force(
            events in proptest::collection::vec((0i64..7200, 1i64..1000), 1..200),
            probe in 0i64..10_000,
        ) {
            let base = 500 * H;
            let mut s = Sliding::new(3600);
            let mut sorted = events.clone();
            sorted.sort();
            for (sec, amount) in &events {
                s.add(base + sec * US, *amount, base);
            }
            let now_s = base / US + probe;
            let want: i64 = sorted
                .iter()
                .filter(|(sec, _)| {
                    let idx = (base / US + sec) / 60;
                    (idx + 1) * 60 + 3600 > now_s
                })
                .map(|(_, a)| a)
                .sum();
            prop_assert_eq!(s.value(now_s * US), want);
        }
    }
}
