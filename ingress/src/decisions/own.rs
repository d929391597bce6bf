//! What this ingress itself admitted under each rule and scope, in the rule's own window.
//!
//! The enforcer learns of a request only from its usage event, published when the request ends,
//! and answers a decision later still; a burst shorter than that delay would otherwise be
//! admitted whole. So every ingress counts its own admissions for every enforced rule and scope
//! it evaluates, from the first request, with the enforcer's window arithmetic
//! (`tollgate_schemas::window`), and refuses once its own count reaches the rule's limit. With one
//! ingress that count is the scope's whole usage, so a request limit is exact and a token or cost
//! limit is passed by at most what requests already in flight add beyond their admission amount.
//! With several, each ingress's count is a lower bound and the enforcer's figure (with the
//! `Watch` headroom the cache counts against) is the bound across them.
//!
//! **Bounded.** Scopes are often chosen by callers (sessions, users), so the counts are a map
//! with a cap: each key leaves once everything it counted has left its window (a sweep pops
//! only the keys that are due, from a heap ordered by that time), and a new key beyond the cap
//! evicts the key due soonest — the one idle longest relative to its window. Both are counted
//! (`tollgate_ingress_own_counts_expired_total`, `…_evicted_total`); an evicted key's count
//! starts again from zero, so the enforcer's decisions bound it from then on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tollgate_schemas::rules::Window;
use tollgate_schemas::window::Counter;

use crate::metrics;

/// Default most keys held: about 300 bytes each (the key, its counter and buckets, its map and heap
/// entries), so about 75 MB at the cap.
pub const DEFAULT_MAX_KEYS: usize = 250_000;

/// One key's count of what this ingress admitted.
#[derive(Debug)]
pub struct OwnCount {
    key: Arc<str>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window: Window,
    counter: Counter,
    /// `counter.drained_at_us()` as of the last change: when the key may be forgotten.
    due_us: i64,
}

/// A refusal by the own count: its figure and when it falls below the limit with nothing added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    pub observed: i64,
    pub lifts_at_us: i64,
}

impl OwnCount {
    fn new(key: Arc<str>, window: &Window) -> Self {
        let state = State { window: window.clone(), counter: Counter::new(window), due_us: 0 };
        Self { key, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `amount` at `now_us`, at most `limit`, unless the count already reached the limit
    /// (check and add under one lock: two concurrent requests never both take the last unit).
    /// Returns what was added. A worst case above the whole limit (a caller's `max_tokens` of
    /// 10^12 prices at `i64::MAX`) takes the limit: enough to hold the scope while the request is
    /// in flight, and the sum cannot saturate and lose what was counted before it.
    pub fn try_admit(&self, amount: i64, limit: i64, now_us: i64) -> Result<i64, Reached> {
        let mut s = self.state();
        let observed = s.counter.value(now_us);
        if observed >= limit {
            return Err(Reached { observed, lifts_at_us: s.counter.lifts_at(now_us, limit) });
        }
        let added = amount.min(limit);
        s.counter.add(now_us, added, now_us);
        s.due_us = s.counter.drained_at_us();
        Ok(added)
    }

    /// Corrects what a request admitted at `at_us` counted (its estimate replaced by what it
    /// used, or taken back). Returns whether the count fell from at or above `limit` to below.
    pub fn adjust(&self, at_us: i64, delta: i64, limit: i64, now_us: i64) -> bool {
        if delta == 0 {
            return false;
        }
        let mut s = self.state();
        let before = s.counter.value(now_us);
        s.counter.add(at_us, delta, now_us);
        s.due_us = s.due_us.max(s.counter.drained_at_us());
        before >= limit && s.counter.value(now_us) < limit
    }

    /// The count now.
    pub fn value(&self, now_us: i64) -> i64 {
        self.state().counter.value(now_us)
    }
}

/// A key in the sweep heap with the time it was due when pushed.
#[derive(Debug)]
struct Due(i64, Arc<OwnCount>);

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// Every key's own count, bounded. Locks are taken map → heap or map → key, never the other way,
/// and a key's lock is never held while the heap's is taken.
#[derive(Debug)]
pub struct OwnCounts {
    keys: RwLock<HashMap<Arc<str>, Arc<OwnCount>>>,
    /// One entry per key, at the time it was due when pushed; a key whose count moved on since
    /// is pushed again at its new time when it comes up.
    due: Mutex<BinaryHeap<Reverse<Due>>>,
    max_keys: usize,
}

impl OwnCounts {
    pub fn new(max_keys: usize) -> Self {
        Self { keys: RwLock::new(HashMap::new()), due: Mutex::new(BinaryHeap::new()), max_keys: max_keys.max(1) }
    }

    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn heap(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<Due>>> {
        self.due.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The count of `key` under a rule with `window`, made (and the cap kept) when new. A key
    /// whose rule changed its window since starts again.
    pub fn get(&self, key: &str, window: &Window) -> Arc<OwnCount> {
        let held = self.keys.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned();
        if let Some(c) = held {
            let mut s = c.state();
            if s.window != *window {
                *s = State { window: window.clone(), counter: Counter::new(window), due_us: 0 };
            }
            drop(s);
            return c;
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = keys.get(key) {
            return Arc::clone(c);
        }
        while keys.len() >= self.max_keys {
            if !self.evict_one(&mut keys) {
                break;
            }
        }
        let key: Arc<str> = Arc::from(key);
        let count = Arc::new(OwnCount::new(Arc::clone(&key), window));
        keys.insert(key, Arc::clone(&count));
        // Due at once: the first sweep after it finds its real time (or forgets a key that never
        // counted anything, such as one whose only request was refused).
        self.heap().push(Reverse(Due(0, Arc::clone(&count))));
        metrics::own_counts(keys.len());
        count
    }

    /// Removes the key due soonest. False when the heap is empty.
    fn evict_one(&self, keys: &mut HashMap<Arc<str>, Arc<OwnCount>>) -> bool {
        loop {
            let Some(Reverse(Due(at, count))) = self.heap().pop() else { return false };
            if !keys.get(&count.key).is_some_and(|held| Arc::ptr_eq(held, &count)) {
                continue; // already gone
            }
            let due = count.state().due_us;
            if due > at {
                // It moved on since it was pushed: back in at its real time, unless every key
                // did (then evict it anyway rather than loop).
                let mut heap = self.heap();
                let next_at = heap.peek().map_or(i64::MAX, |Reverse(d)| d.0);
                if due <= next_at {
                    drop(heap);
                } else {
                    heap.push(Reverse(Due(due, count)));
                    continue;
                }
            }
            keys.remove(&count.key);
            metrics::own_count_evicted();
            return true;
        }
    }

    /// Forgets every key whose counted amounts have all left their window by `now_us`; returns
    /// how many. Work is proportional to the keys due, not to the keys held.
    pub fn sweep(&self, now_us: i64) -> usize {
        let mut removed = 0;
        loop {
            let count = {
                let mut heap = self.heap();
                match heap.peek() {
                    Some(Reverse(Due(at, _))) if *at <= now_us => heap.pop().map(|Reverse(Due(_, c))| c),
                    _ => None,
                }
            };
            let Some(count) = count else { break };
            let due = count.state().due_us;
            if due > now_us {
                self.heap().push(Reverse(Due(due, count)));
                continue;
            }
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            if !keys.get(&count.key).is_some_and(|held| Arc::ptr_eq(held, &count)) {
                continue; // evicted meanwhile
            }
            // Again under the map's lock: a request may have counted into it since, or hold it
            // (between finding and counting, or in flight with a ticket to settle): the map and
            // this sweep are its only other holders when it can go.
            let due = count.state().due_us;
            if due > now_us || Arc::strong_count(&count) > 2 {
                drop(keys);
                self.heap().push(Reverse(Due(due.max(now_us.saturating_add(1_000_000)), count)));
                continue;
            }
            keys.remove(&count.key);
            removed += 1;
            metrics::own_counts(keys.len());
        }
        if removed > 0 {
            metrics::own_counts_expired(removed);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const US: i64 = 1_000_000;
    const T0: i64 = 1_800_000_000 * US;

    fn minute() -> Window {
        Window::Sliding { seconds: 60 }
    }

    #[test]
    fn admits_up_to_the_limit_then_refuses_until_the_window_moves() {
        let counts = OwnCounts::new(10);
        let c = counts.get("r/team:a", &minute());
        for i in 0..30 {
            c.try_admit(1, 30, T0 + i * 1_000).unwrap();
        }
        let reached = c.try_admit(1, 30, T0 + 31_000).unwrap_err();
        assert_eq!(reached.observed, 30);
        // One-second buckets: T0's bucket leaves the window at T0 + 61 s.
        assert_eq!(reached.lifts_at_us, T0 + 61 * US);
        assert!(c.try_admit(1, 30, T0 + 61 * US).is_ok());
    }

    #[test]
    fn an_estimate_settled_lower_gives_headroom_back() {
        let counts = OwnCounts::new(10);
        let c = counts.get("r/session:s", &minute());
        c.try_admit(1_000, 1_000, T0).unwrap();
        assert!(c.try_admit(1, 1_000, T0 + 1).is_err());
        assert!(c.adjust(T0, -400, 1_000, T0 + 2), "back under the limit");
        assert_eq!(c.value(T0 + 2), 600);
        assert!(!c.adjust(T0, 100, 1_000, T0 + 3));
    }

    #[test]
    fn keys_are_forgotten_once_their_window_has_passed() {
        let counts = OwnCounts::new(100);
        for i in 0..50 {
            counts.get(&format!("r/session:{i}"), &minute()).try_admit(1, 5, T0 + i).unwrap();
        }
        let busy = counts.get("r/session:busy", &minute());
        busy.try_admit(1, 5, T0).unwrap();
        assert_eq!(counts.sweep(T0 + 30 * US), 0, "every key still counts something");
        busy.try_admit(1, 5, T0 + 30 * US).unwrap();
        assert_eq!(counts.sweep(T0 + 61 * US), 50);
        assert_eq!(counts.len(), 1, "the key used again later stays until its own window passes");
        drop(busy);
        assert_eq!(counts.sweep(T0 + 91 * US), 1);
        assert!(counts.is_empty());
    }

    #[test]
    fn past_the_cap_the_key_due_soonest_is_evicted() {
        let counts = OwnCounts::new(3);
        for (i, at) in [(0, T0), (1, T0 + 10 * US), (2, T0 + 20 * US)] {
            counts.get(&format!("r/session:{i}"), &minute()).try_admit(1, 5, at).unwrap();
        }
        counts.sweep(T0 + 20 * US);
        // session:0 was used again last: session:1 is now the one due soonest.
        counts.get("r/session:0", &minute()).try_admit(1, 5, T0 + 25 * US).unwrap();
        counts.get("r/session:3", &minute()).try_admit(1, 5, T0 + 26 * US).unwrap();
        assert_eq!(counts.len(), 3);
        let held: Vec<String> = counts.keys.read().unwrap().keys().map(|k| k.to_string()).collect();
        assert!(!held.contains(&"r/session:1".to_owned()), "{held:?}");
    }

    #[test]
    fn a_rule_whose_window_changed_counts_again() {
        let counts = OwnCounts::new(10);
        counts.get("r/global", &minute()).try_admit(5, 10, T0).unwrap();
        let c = counts.get("r/global", &Window::Sliding { seconds: 3600 });
        assert_eq!(c.value(T0), 0);
    }
}
