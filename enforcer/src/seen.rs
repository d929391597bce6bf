//! Which usage events the enforcer has counted: each event once, however late a copy comes back.
//!
//! The ingress re-sends an event whose delivery it could not confirm (same `event_id`, same key,
//! so the same partition, at a later offset), after a broker outage or its own restart, at any
//! time later. Memory keeps the ids of the events counted, each until the meter has recorded its
//! position in `event_positions` (the meter's checkpoint is past it) and it is at least
//! `min_age` old; then it is forgotten, and the partition's `forgot_until_us` rises to that
//! event's `ended_at_us`. A copy carries its event's `ended_at_us`, so an event that ended after
//! every forgotten one cannot be a copy of one: memory decides it. An event that ended at or
//! before (a late event, or any event right after a start, when nothing is in memory) is
//! *doubtful*: it waits until the meter's checkpoint reaches its offset, so every earlier
//! position is in `event_positions`, and is counted only if none is there. Clocks only decide
//! which path an event takes, never whether it counts.
//!
//! Past `max_ids`, the oldest ids are forgotten before the meter has passed them (counted in
//! `tollgate_enforcer_seen_ids_evicted_total`); their copies then wait for the meter too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use hashbrown::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// A copy's place in the usage topic.
pub type Position = (i32, i64);

/// What to do with a consumed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Count it (it is remembered).
    New,
    /// Another copy was counted: skip it.
    Duplicate,
    /// Memory cannot tell: ask `event_positions` once the meter has passed its offset.
    Doubtful,
}

struct Remembered {
    offset: i64,
    /// Shared with `ids`: one allocation per id.
    id: Arc<str>,
    ended_at_us: i64,
    at: Instant,
}

pub struct Seen {
    /// Counted ids by the position of the copy counted. foldhash: the ids are the ingress's
    /// (UUIDs it makes), and the enforcer answers no caller whose timing could probe the map.
    ids: HashMap<Arc<str>, Position>,
    /// Per partition, the remembered ids in the order counted (offsets rise).
    order: BTreeMap<i32, VecDeque<Remembered>>,
    /// Per partition, the latest `ended_at_us` of any event forgotten (or counted before this
    /// run, from ClickHouse); `default_forgot_until_us` for partitions not named.
    forgot_until_us: BTreeMap<i32, i64>,
    default_forgot_until_us: i64,
    min_age: Duration,
    max_ids: usize,
}

impl Seen {
    /// Nothing in memory. Events before this run are in ClickHouse; `forgot_until_us` names, per
    /// partition, the latest `ended_at_us` among them, and `default_forgot_until_us` applies to
    /// every other partition (the start time, so that events already in flight are checked).
    pub fn new(
        forgot_until_us: BTreeMap<i32, i64>,
        default_forgot_until_us: i64,
        min_age: Duration,
        max_ids: usize,
    ) -> Self {
        Self {
            ids: HashMap::default(),
            order: BTreeMap::new(),
            forgot_until_us,
            default_forgot_until_us,
            min_age,
            max_ids: max_ids.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether a copy of `id` was counted and is still remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    fn forgot_until(&self, partition: i32) -> i64 {
        self.forgot_until_us.get(&partition).copied().unwrap_or(self.default_forgot_until_us)
    }

    /// The verdict on the copy of `id` at `at` that ended at `ended_at_us`; a `New` one is
    /// remembered.
    pub fn check(&mut self, id: &str, at: Position, ended_at_us: i64, now: Instant) -> Verdict {
        if self.ids.contains_key(id) {
            // Another copy, or the counted one read again: either way it is counted already.
            return Verdict::Duplicate;
        }
        if ended_at_us > self.forgot_until(at.0) {
            self.remember(id, at, ended_at_us, now);
            return Verdict::New;
        }
        Verdict::Doubtful
    }

    /// Remembers a counted copy (a `Doubtful` one that `event_positions` showed to be first).
    pub fn remember(&mut self, id: &str, at: Position, ended_at_us: i64, now: Instant) {
        if !self.ids.contains_key(id) {
            let id: Arc<str> = Arc::from(id);
            self.ids.insert(Arc::clone(&id), at);
            self.order.entry(at.0).or_default().push_back(Remembered { offset: at.1, id, ended_at_us, at: now });
        }
    }

    /// Forgets what the meter has recorded (`durable`: the meter's next offset per partition)
    /// and is older than `min_age`, then the oldest ids past `max_ids`. Returns (forgotten,
    /// evicted before the meter passed them).
    pub fn prune(&mut self, durable: &BTreeMap<i32, i64>, now: Instant) -> (usize, usize) {
        let mut forgotten = 0;
        for (p, queue) in &mut self.order {
            let Some(next) = durable.get(p) else { continue };
            while let Some(r) = queue.front() {
                if r.offset >= *next || now.duration_since(r.at) < self.min_age {
                    break;
                }
                let Some(r) = queue.pop_front() else { break };
                self.ids.remove(&r.id);
                let f = self.forgot_until_us.entry(*p).or_insert(self.default_forgot_until_us);
                *f = (*f).max(r.ended_at_us);
                forgotten += 1;
            }
        }
        let mut evicted = 0;
        while self.ids.len() > self.max_ids {
            // The partition whose front was remembered first.
            let Some(p) = self.order.iter().filter_map(|(p, q)| Some((q.front()?.at, *p))).min().map(|(_, p)| p) else {
                break;
            };
            let Some(r) = self.order.get_mut(&p).and_then(VecDeque::pop_front) else { break };
            self.ids.remove(&r.id);
            let f = self.forgot_until_us.entry(p).or_insert(self.default_forgot_until_us);
            *f = (*f).max(r.ended_at_us);
            evicted += 1;
        }
        self.order.retain(|_, q| !q.is_empty());
        (forgotten, evicted)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T0: i64 = 1_800_000_000_000_000;

    fn seen() -> Seen {
        Seen::new(BTreeMap::from([(0, T0)]), T0, Duration::ZERO, 1_000)
    }

    #[test]
    fn copies_of_a_remembered_event_are_duplicates() {
        let mut s = seen();
        let now = Instant::now();
        assert_eq!(s.check("a", (0, 10), T0 + 1, now), Verdict::New);
        assert_eq!(s.check("a", (0, 11), T0 + 1, now), Verdict::Duplicate);
        assert_eq!(s.check("a", (0, 10), T0 + 1, now), Verdict::Duplicate, "a replay of the same copy");
    }

    #[test]
    fn events_that_ended_before_the_start_are_doubtful() {
        let mut s = seen();
        let now = Instant::now();
        assert_eq!(s.check("old", (0, 1), T0, now), Verdict::Doubtful);
        assert_eq!(s.check("other-partition", (5, 1), T0 - 1, now), Verdict::Doubtful);
        s.remember("old", (0, 1), T0, now);
        assert_eq!(s.check("old", (0, 2), T0, now), Verdict::Duplicate);
    }

    #[test]
    fn forgetting_waits_for_the_meter_and_makes_older_copies_doubtful() {
        let mut s = seen();
        let now = Instant::now();
        for i in 0..10 {
            assert_eq!(s.check(&format!("e{i}"), (0, i), T0 + 100 + i, now), Verdict::New);
        }
        assert_eq!(s.prune(&BTreeMap::new(), now), (0, 0), "the meter has not passed them");
        assert_eq!(s.prune(&BTreeMap::from([(0, 4)]), now), (4, 0), "offsets 0..3 are recorded");
        assert_eq!(s.len(), 6);
        assert_eq!(s.check("e2", (0, 50), T0 + 102, now), Verdict::Doubtful, "a copy of a forgotten event");
        assert_eq!(s.check("e5", (0, 51), T0 + 105, now), Verdict::Duplicate, "still remembered");
        assert_eq!(s.check("fresh", (0, 52), T0 + 104, now), Verdict::New, "ended after every forgotten one");
    }

    #[test]
    fn young_ids_are_kept_even_once_recorded() {
        let mut s = Seen::new(BTreeMap::new(), T0, Duration::from_secs(600), 1_000);
        let now = Instant::now();
        s.check("a", (0, 0), T0 + 1, now);
        assert_eq!(s.prune(&BTreeMap::from([(0, 100)]), now), (0, 0));
        assert_eq!(s.prune(&BTreeMap::from([(0, 100)]), now + Duration::from_secs(601)), (1, 0));
    }

    #[test]
    fn past_the_cap_the_oldest_are_evicted_and_counted() {
        let mut s = Seen::new(BTreeMap::new(), T0, Duration::ZERO, 3);
        let now = Instant::now();
        for i in 0..5u8 {
            let at = now + Duration::from_millis(u64::from(i));
            s.check(&format!("e{i}"), (i32::from(i % 2 == 0), i64::from(i)), T0 + 10 + i64::from(i), at);
        }
        assert_eq!(s.prune(&BTreeMap::new(), now), (0, 2), "e0 and e1, the first remembered");
        assert_eq!(s.len(), 3);
        assert_eq!(s.check("e0", (1, 9), T0 + 10, now), Verdict::Doubtful, "evicted: asked of ClickHouse");
    }
}
