//! Unit tests of the decision cache: versions, tombstones and replays, `Watch` admission,
//! settling and local breaches, and stream cuts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;

use tollgate_schemas::decision::{BreachDecision, DecisionState, Measure};

use super::*;

fn decision(state: DecisionState, measure: Measure, headroom: i64, version: i64) -> BreachDecision {
    BreachDecision {
        measure,
        limit: 100,
        observed: 100 - headroom,
        headroom,
        ..BreachDecision::example("r", "session:s1", state, version)
    }
}

const KEY: &str = "r/session:s1";

fn watch_of(cache: &Arc<DecisionCache>, cut_streams: bool) -> Vec<WatchHold> {
    vec![WatchHold { key: KEY.into(), entry: cache.get(KEY).unwrap(), cut_streams }]
}

#[test]
fn versions_only_move_forward_and_tombstones_remove() {
    let cache = DecisionCache::new(false);
    assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 5))), Applied::Stored);
    assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 4))), Applied::Stale);
    assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 5))), Applied::Stale);
    assert!(cache.get(KEY).unwrap().breached(), "the lower and equal versions did not apply");
    assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 6))), Applied::Stored);
    assert!(!cache.get(KEY).unwrap().breached());
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.apply(KEY, None), Applied::Removed);
    assert!(cache.get(KEY).is_none());
    assert_eq!(cache.apply(KEY, None), Applied::Absent);
    // After a tombstone the key starts afresh (the topic's order is the truth).
    assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 1))), Applied::Stored);
    assert!(cache.get(KEY).unwrap().breached());
}

#[test]
fn a_replay_in_any_compaction_state_ends_with_the_last_decision() {
    // The same history, uncompacted and compacted, gives the same cache.
    let history = [
        (KEY, Some(decision(DecisionState::Watch, Measure::Tokens, 10, 1))),
        (KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 2))),
        ("r/session:s2", Some(decision(DecisionState::Breached, Measure::Tokens, 0, 1))),
        (KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 60, 3))),
        ("r/session:s2", None),
    ];
    let full = DecisionCache::new(false);
    for (k, d) in history.clone() {
        full.apply(k, d);
    }
    let compacted = DecisionCache::new(false);
    compacted.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 60, 3)));
    assert_eq!(full.len(), compacted.len());
    assert_eq!(full.get(KEY).unwrap().decision, compacted.get(KEY).unwrap().decision);
}

#[test]
fn watch_requests_are_admitted_up_to_the_headroom_then_breached_until_a_newer_decision() {
    let cache = DecisionCache::new(false);
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Requests, 3, 1)));
    let watches = watch_of(&cache, false);
    let tickets: Vec<Ticket> = (0..3).map(|_| cache.admit(&[], &watches, res(0)).unwrap()).collect();
    assert!(cache.get(KEY).unwrap().locally_breached());
    assert_eq!(
        cache.admit(&[], &watches, res(0)).err(),
        Some(Exhausted::Watch(0)),
        "the fourth request finds the headroom used up"
    );
    assert_eq!(cache.get(KEY).unwrap().observed(), 100, "observed = the enforcer's 97 + 3 admitted here");
    for t in &tickets {
        t.settle(crate::clock::now_us(), 1_000, 1_000);
    }
    assert_eq!(cache.get(KEY).unwrap().local(), 3, "settling changes nothing for a request count");
    // A newer decision that has not seen these requests' events yet keeps them counted…
    let mut stale = decision(DecisionState::Watch, Measure::Requests, 3, 2);
    stale.covered_until_us = crate::clock::now_us() - 60_000_000;
    cache.apply(KEY, Some(stale));
    assert_eq!(cache.get(KEY).unwrap().local(), 3, "not covered yet: still counted here");
    assert!(cache.get(KEY).unwrap().breached());
    // …one that covers them starts the count afresh.
    let mut fresh = decision(DecisionState::Watch, Measure::Requests, 3, 3);
    fresh.covered_until_us = crate::clock::now_us();
    cache.apply(KEY, Some(fresh));
    assert_eq!(cache.get(KEY).unwrap().local(), 0, "covered by the enforcer: dropped here");
    assert!(!cache.get(KEY).unwrap().breached());
}

#[test]
fn a_request_in_flight_across_decisions_is_counted_under_the_newer_one() {
    let cache = DecisionCache::new(false);
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::CostNanos, 1_000, 1)));
    let in_flight = cache.admit(&[], &watch_of(&cache, false), res(0)).unwrap();
    let mut next = decision(DecisionState::Watch, Measure::CostNanos, 1_000, 2);
    next.covered_until_us = crate::clock::now_us();
    cache.apply(KEY, Some(next));
    in_flight.settle(crate::clock::now_us(), 0, 1_200);
    assert_eq!(cache.get(KEY).unwrap().local(), 1_200, "settled into the key, not the replaced entry");
    assert!(cache.get(KEY).unwrap().locally_breached());
}

#[test]
fn watch_tokens_count_the_estimate_then_settle_to_the_real_total() {
    let cache = DecisionCache::new(false);
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Tokens, 1_000, 1)));
    let watches = watch_of(&cache, false);
    let entry = cache.get(KEY).unwrap();
    let a = cache.admit(&[], &watches, res(300)).unwrap();
    assert_eq!(entry.local(), 300);
    a.settle(crate::clock::now_us(), 450, 0);
    assert_eq!(entry.local(), 450, "estimate 300 replaced by the real 450");
    a.settle(crate::clock::now_us(), 100, 0);
    assert_eq!(entry.local(), 550, "a retry's tokens add to the first attempt's");
    let b = cache.admit(&[], &watches, res(600)).unwrap();
    assert_eq!(entry.local(), 1_150);
    assert!(entry.locally_breached());
    assert!(cache.admit(&[], &watches, res(1)).is_err());
    let mut rx = cache.subscribe();
    rx.borrow_and_update();
    drop(b); // never reached a provider: its estimate is taken back
    assert_eq!(entry.local(), 550);
    assert!(!entry.locally_breached());
    assert!(rx.has_changed().unwrap(), "headroom coming back wakes queued requests");
}

#[test]
fn watch_cost_reserves_the_worst_case_then_settles_to_the_real_cost() {
    let cache = DecisionCache::new(false);
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::CostNanos, 5_000, 1)));
    let watches = watch_of(&cache, true);
    let entry = cache.get(KEY).unwrap();
    let a = cache.admit(&[], &watches, res(999)).unwrap();
    assert_eq!(entry.local(), 999, "the worst-case cost is reserved at admission");
    let mut cut = cache.register_stream("r", "session:s1");
    a.settle(crate::clock::now_us(), 999, 5_000);
    assert_eq!(entry.local(), 5_000);
    assert!(entry.locally_breached());
    let waker = futures::task::noop_waker();
    assert!(cut.poll_cut(&mut Context::from_waker(&waker)), "the local breach cut the registered stream");
}

#[test]
fn concurrent_admissions_never_pass_a_request_headroom() {
    let cache = DecisionCache::new(false);
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Requests, 100, 1)));
    let watches = watch_of(&cache, false);
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    if let Ok(t) = cache.admit(&[], &watches, res(0)) {
                        t.settle(crate::clock::now_us(), 1, 1);
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 100);
}

#[test]
fn a_failed_admission_takes_back_what_it_added_to_other_keys() {
    let cache = DecisionCache::new(false);
    cache.apply("a/global", Some(decision(DecisionState::Watch, Measure::Requests, 10, 1)));
    cache.apply("b/global", Some(decision(DecisionState::Watch, Measure::Requests, 0, 1)));
    let watches = vec![
        WatchHold { key: "a/global".into(), entry: cache.get("a/global").unwrap(), cut_streams: false },
        WatchHold { key: "b/global".into(), entry: cache.get("b/global").unwrap(), cut_streams: false },
    ];
    assert_eq!(cache.admit(&[], &watches, res(0)).err(), Some(Exhausted::Watch(1)));
    assert_eq!(cache.get("a/global").unwrap().local(), 0);
}

#[test]
fn breached_decisions_with_cut_streams_cut_registered_streams_only_of_their_key() {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let cache = DecisionCache::new(false);
    let mut mine = cache.register_stream("r", "session:s1");
    let mut other = cache.register_stream("r", "session:s2");
    assert_eq!(cache.streams_registered(KEY), 1);
    let mut d = decision(DecisionState::Breached, Measure::CostNanos, 0, 1);
    cache.apply(KEY, Some(d.clone()));
    assert!(!mine.poll_cut(&mut cx), "a decision without cut_streams leaves streams alone");
    d.cut_streams = true;
    d.audit = true;
    d.version = 2;
    cache.apply(KEY, Some(d.clone()));
    assert!(!mine.poll_cut(&mut cx), "an audit decision never cuts");
    d.audit = false;
    d.version = 3;
    cache.apply(KEY, Some(d.clone()));
    assert!(mine.poll_cut(&mut cx));
    assert!(!other.poll_cut(&mut cx));
    assert_eq!(mine.version(), 3);
    drop(mine);
    drop(other);
    assert_eq!(cache.streams_registered("r/session:s2"), 0, "registrations end with their stream");

    let audit_only = DecisionCache::new(true);
    let mut s = audit_only.register_stream("r", "session:s1");
    d.version = 4;
    audit_only.apply(KEY, Some(d));
    assert!(!s.poll_cut(&mut cx), "--audit-only never cuts");
}

fn res(n: i64) -> Reservation {
    Reservation { tokens: n, cost_nanos: n }
}

#[test]
fn own_counts_refuse_at_the_limit_without_any_decision() {
    use tollgate_schemas::rules::Window;
    let cache = DecisionCache::new(false);
    let hold = |limit: i64, measure: Measure| OwnHold {
        count: cache.own_counts().get("r/team:a", &Window::Sliding { seconds: 60 }),
        measure,
        limit,
    };
    let owns = [hold(30, Measure::Requests)];
    let tickets: Vec<Ticket> = (0..30).map(|_| cache.admit(&owns, &[], res(0)).unwrap()).collect();
    let refused = cache.admit(&owns, &[], res(0)).err();
    assert!(matches!(refused, Some(Exhausted::Own(0, r)) if r.observed == 30), "{refused:?}");
    // A request that never reached a provider gives its place back; one that did keeps it, and a
    // retry counts as one more request, as its usage event does at the enforcer.
    let mut rx = cache.subscribe();
    rx.borrow_and_update();
    let mut tickets = tickets.into_iter();
    drop(tickets.next());
    assert!(rx.has_changed().unwrap(), "room coming back wakes queued requests");
    let retried = tickets.next().unwrap();
    retried.settle(crate::clock::now_us(), 0, 0);
    retried.settle(crate::clock::now_us(), 0, 0);
    assert_eq!(owns[0].count.value(crate::clock::now_us()), 30);
}

#[test]
fn own_cost_counts_reserve_the_worst_case() {
    use tollgate_schemas::rules::Window;
    let cache = DecisionCache::new(false);
    let owns = [OwnHold {
        count: cache.own_counts().get("budget/project:p", &Window::Sliding { seconds: 3600 }),
        measure: Measure::CostNanos,
        limit: 10_000,
    }];
    let a = cache.admit(&owns, &[], Reservation { tokens: 100, cost_nanos: 6_000 }).unwrap();
    let b = cache.admit(&owns, &[], Reservation { tokens: 100, cost_nanos: 6_000 }).unwrap();
    assert!(cache.admit(&owns, &[], Reservation { tokens: 100, cost_nanos: 6_000 }).is_err(), "12,000 reserved");
    a.settle(crate::clock::now_us(), 100, 1_000);
    b.settle(crate::clock::now_us(), 100, 1_000);
    assert_eq!(owns[0].count.value(crate::clock::now_us()), 2_000, "settled to what the two used");
    assert!(cache.admit(&owns, &[], Reservation { tokens: 100, cost_nanos: 6_000 }).is_ok());
}

#[test]
fn a_worst_case_beyond_the_whole_limit_reserves_the_limit() {
    use tollgate_schemas::rules::Window;
    let cache = DecisionCache::new(false);
    let owns = [OwnHold {
        count: cache.own_counts().get("budget/team:t", &Window::Sliding { seconds: 3600 }),
        measure: Measure::CostNanos,
        limit: 10_000,
    }];
    cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::CostNanos, 5_000, 1)));
    let watches = watch_of(&cache, false);
    let earlier = cache.admit(&owns, &watches, res(3_000)).unwrap();
    // A caller's `max_tokens` of 10^12 priced at the output rate saturates the cost.
    let huge = cache.admit(&owns, &watches, Reservation { tokens: 10, cost_nanos: i64::MAX }).unwrap();
    let now = crate::clock::now_us();
    assert_eq!(owns[0].count.value(now), 13_000, "the limit is added, not i64::MAX");
    assert_eq!(cache.get(KEY).unwrap().local(), 8_000, "the headroom is added");
    assert!(cache.admit(&owns, &[], res(1)).is_err(), "the scope is held while it is in flight");
    huge.settle(now, 10, 700);
    earlier.settle(now, 10, 2_900);
    assert_eq!(owns[0].count.value(now), 3_600, "settled to what both used: nothing counted before was lost");
    assert_eq!(cache.get(KEY).unwrap().local(), 3_600);
    assert!(cache.admit(&owns, &watches, res(1)).is_ok(), "and the scope has room again");
}
