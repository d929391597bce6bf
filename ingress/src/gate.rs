//! The request gate over breach decisions: what a request under one gets — a 429, a wait for
//! headroom, another model, or (audit) a pass with a record of what would have happened.
//!
//! Every rule of the policy that applies to the request gives a scope value; the decision held
//! for `rule_id/scope` is `Breached` (act), `Watch` (count what is admitted; act once the local
//! count reaches the headroom, see `decisions`) or `Clear`. When several breached rules apply
//! the strictest action wins — `hard_block`, then `queue_then_429`, then the fallbacks — and
//! between equals the rule written first. Rules in audit (`mode: audit`, an audit decision or
//! `--audit-only`) never act; the strictest of them is recorded when no enforced rule acts.
//!
//! The usage event's `decision.action` says what was done:
//!
//! | action | the request |
//! |---|---|
//! | `hard_block` | refused: 429 |
//! | `queue_then_429` | held for `queue_timeout_ms` without headroom coming back, then 429 |
//! | `queue_then_429:released` | held, then let through by a newer decision |
//! | `fallback_to_<model>` (as written) | sent to that virtual model or concrete model |
//! | `fallback_to_cheaper` | sent to the cheapest of its virtual model's `fallbacks` |
//! | `fallback_to_cheaper:already_cheapest` | passed: no fallback is cheaper than its target |
//! | `audit:<action>` | passed; `<action>` is what an enforced rule would have done |
//! | `cut_stream` | a stream ended mid-way by a `cut_streams` breach (status `client_abort`: it consumed tokens, unlike a `rejected` request) |
//!
//! A rerouted request's usage event keeps the virtual model the client asked for in
//! `virtual_model`; `provider` and `model` say where it ran. A refused request's event has no
//! provider or model, zero tokens and cost, status `rejected` and HTTP status 429.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tollgate_schemas::decision::{BreachDecision, DecisionState, Measure, RuleKind};
use tollgate_schemas::policy::{ApiKey, Policy, Target, VirtualModel};
use tollgate_schemas::rules::{Action, FallbackTarget, Rule};
use tollgate_schemas::usage::{AppliedDecision, Envelope};

use crate::clock::now_us;
use crate::decisions::{DecisionCache, Entry, Exhausted, OwnHold, Reservation, StreamCut, Ticket, WatchHold};
use crate::metrics;

/// A request refused by a breach decision: what the 429 body and the usage event say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule_id: String,
    pub rule_kind: RuleKind,
    pub scope: String,
    pub measure: Measure,
    pub limit: i64,
    /// The enforcer's figure plus what this ingress admitted since, or (for a breach of this
    /// ingress's own count) what it admitted in the rule's window.
    pub observed: i64,
    /// `hard_block` or `queue_then_429`.
    pub action: String,
    pub retry_after_secs: u64,
    /// Breached by this ingress's count: against a `Watch` headroom, or its own count against
    /// the rule's limit.
    pub local: bool,
    /// How long `queue_then_429` held the request before refusing it.
    pub waited_ms: Option<u64>,
    /// Refused at once because too many requests were already waiting.
    pub queue_full: bool,
}

impl Blocked {
    pub fn message(&self) -> String {
        let what = match self.rule_kind {
            RuleKind::RateLimit => "rate limit",
            RuleKind::Budget => "budget",
            RuleKind::Guard => "anomaly guard",
        };
        let amount = |n: i64| match self.measure {
            Measure::Tokens => format!("{n} tokens"),
            Measure::Requests => format!("{n} requests"),
            Measure::CostNanos => usd(n),
        };
        let mut m = format!(
            "{what} {} exceeded for {}: {} of {}",
            self.rule_id,
            self.scope,
            amount(self.observed),
            amount(self.limit)
        );
        if self.local {
            m.push_str(" (counted by this gateway, ahead of the enforcer's next decision)");
        }
        if self.queue_full {
            m.push_str("; too many requests are already waiting for headroom");
        } else if let Some(ms) = self.waited_ms {
            m.push_str(&format!("; waited {ms} ms for headroom"));
        }
        m.push_str(&format!("; retry in {} s", self.retry_after_secs));
        m
    }

    fn applied(&self, version: i64) -> AppliedDecision {
        AppliedDecision {
            rule_id: self.rule_id.clone(),
            scope: self.scope.clone(),
            action: self.action.clone(),
            version,
        }
    }
}

pub use tollgate_schemas::price::usd;

/// Seconds until `window_end_us`, rounded up, at least 1.
pub fn retry_after_secs(window_end_us: i64, now_us: i64) -> u64 {
    let us = window_end_us.saturating_sub(now_us).max(0).unsigned_abs();
    us.div_ceil(1_000_000).max(1)
}

/// The request as rules see it.
pub struct RequestView<'a> {
    pub envelope: &'a Envelope,
    pub api_key: Option<&'a ApiKey>,
    /// The virtual model asked for (`None` for a concrete `provider/model`).
    pub vm: Option<&'a VirtualModel>,
    /// The target the request would go to first.
    pub target: Option<&'a Target>,
    pub stream: bool,
}

/// Where a fallback sends the request instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reroute {
    Virtual(String),
    Concrete(Target),
}

/// A request allowed through, possibly shaped by a decision.
#[derive(Default)]
pub struct Pass {
    pub reroute: Option<Reroute>,
    /// For the usage event.
    pub applied: Option<AppliedDecision>,
    /// What it added to `Watch` counts; settled when the request ends.
    pub ticket: Option<Arc<Ticket>>,
    /// Its registrations under `cut_streams` rules (streaming requests only).
    pub cuts: Vec<StreamCut>,
}

/// A request refused; it is still recorded as one usage event.
#[derive(Debug)]
pub struct Refusal {
    pub blocked: Blocked,
    pub applied: AppliedDecision,
}

/// Requests waiting in `queue_then_429`, with their bound.
#[derive(Debug)]
pub struct Queue {
    waiting: AtomicUsize,
    max: usize,
}

impl Queue {
    pub fn new(max: usize) -> Self {
        Self { waiting: AtomicUsize::new(0), max }
    }

    fn enter(&self) -> Option<QueueSlot<'_>> {
        let n = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.max {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        metrics::queued_requests(n);
        Some(QueueSlot(self))
    }
}

struct QueueSlot<'q>(&'q Queue);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        let n = self.0.waiting.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        metrics::queued_requests(n);
    }
}

/// A breached key a request falls in.
struct Hit<'p> {
    order: usize,
    rule: &'p Rule,
    scope: String,
    entry: Arc<Entry>,
    audit: bool,
}

impl Hit<'_> {
    fn rank(&self) -> u8 {
        match self.rule.action {
            Action::HardBlock => 0,
            Action::QueueThen429 => 1,
            Action::FallbackTo(_) | Action::FallbackToCheaper => 2,
            Action::AlertOnly => 3,
        }
    }

    fn applied(&self, action: String) -> AppliedDecision {
        AppliedDecision {
            rule_id: self.rule.id.clone(),
            scope: self.scope.clone(),
            action,
            version: self.entry.decision.version,
        }
    }

    fn blocked(&self, action: &str) -> Blocked {
        let d = &self.entry.decision;
        Blocked {
            rule_id: self.rule.id.clone(),
            rule_kind: d.rule_kind,
            scope: self.scope.clone(),
            measure: d.measure,
            limit: d.limit,
            observed: self.entry.observed(),
            action: action.to_owned(),
            retry_after_secs: retry_after_secs(d.window_end_us, now_us()),
            local: self.entry.locally_breached(),
            waited_ms: None,
            queue_full: false,
        }
    }
}

/// What the cache says about one request.
struct Evaluation<'p> {
    hits: Vec<Hit<'p>>,
    /// `Watch` keys with headroom left, with the rule order.
    watches: Vec<(usize, &'p Rule, String, WatchHold)>,
    /// The enforced limits the request falls in, counted by this ingress itself.
    owns: Vec<(usize, &'p Rule, String, OwnHold)>,
    /// (rule id, scope) of the `cut_streams` rules a streaming request falls in.
    cut_scopes: Vec<(&'p str, String)>,
}

/// Whether this ingress counts its own admissions under `rule`: the limits it enforces (rate
/// limits and budgets; not the anomaly guards, which are no count against a limit; not rules in
/// audit, which never refuse).
fn counted_here(rule: &Rule, audit_only: bool) -> bool {
    rule.kind != RuleKind::Guard && rule.action != Action::AlertOnly && !rule.audit && !audit_only
}

fn evaluate<'p>(cache: &DecisionCache, policy: &'p Policy, req: &RequestView<'_>) -> Evaluation<'p> {
    let mut ev = Evaluation { hits: Vec::new(), watches: Vec::new(), owns: Vec::new(), cut_scopes: Vec::new() };
    let audit_only = cache.audit_only();
    let wants_cuts = req.stream && !audit_only && policy.rules.iter().any(|r| r.cut_streams && !r.audit);
    if cache.is_empty() && !wants_cuts && !policy.rules.iter().any(|r| counted_here(r, audit_only)) {
        return ev;
    }
    let key_id = req.api_key.map(|k| k.id.as_str());
    let subject = req.api_key.map(|k| &k.subject);
    let mut key = String::with_capacity(64);
    let mut lookups = 0;
    // The rules that may apply, in policy order (the order decides among hits).
    let mut candidates: Vec<usize> = policy.rule_index.candidates(req.envelope).collect();
    candidates.sort_unstable();
    for (order, rule) in candidates.into_iter().filter_map(|i| Some((i, policy.rules.get(i)?))) {
        if rule.action == Action::AlertOnly {
            continue;
        }
        let Some(scope) = rule.scope_of(req.envelope, key_id, subject) else { continue };
        if wants_cuts && rule.cut_streams && !rule.audit {
            ev.cut_scopes.push((rule.id.as_str(), scope.clone()));
        }
        tollgate_schemas::decision::decision_key_into(&mut key, &rule.id, &scope);
        if counted_here(rule, audit_only) {
            let count = cache.own_counts().get(&key, &rule.window);
            ev.owns.push((order, rule, scope.clone(), OwnHold { count, measure: rule.measure, limit: rule.limit }));
        }
        lookups += 1;
        let Some(entry) = cache.get(&key) else { continue };
        let audit = rule.audit || entry.decision.audit || cache.audit_only();
        if entry.breached() {
            ev.hits.push(Hit { order, rule, scope, entry, audit });
        } else if entry.decision.state == tollgate_schemas::decision::DecisionState::Watch {
            let hold = WatchHold { key: key.clone(), entry, cut_streams: rule.cut_streams && !audit };
            ev.watches.push((order, rule, scope, hold));
        }
    }
    metrics::decision_lookups(lookups);
    ev
}

/// The cheapest of `vm.fallbacks` by the price card, if it is cheaper than `current`.
///
/// "Cheapest" orders priced targets by output price per million tokens, then input price per
/// million tokens, then the order the fallbacks are written in — the same order
/// `fallback_to_<word>` uses to pick among priced models (output dominates the bill of a
/// generation, input breaks ties). Fallbacks without a price (`unpriced_ok`) are not candidates:
/// nothing says they are cheaper. A `current` target without a price is never replaced, for
/// the same reason; nor is one whose price is no higher than the cheapest fallback's.
pub fn cheaper_fallback<'p>(
    policy: &'p Policy,
    vm: Option<&'p VirtualModel>,
    current: Option<&Target>,
) -> Option<&'p Target> {
    let price_key = |t: &Target| policy.price(t).map(|p| (p.output_usd_per_mtok, p.input_usd_per_mtok));
    let (cheapest, key) = vm?
        .fallbacks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| price_key(t).map(|k| (i, t, k)))
        .min_by_key(|(i, _, k)| (*k, *i))
        .map(|(_, t, k)| (t, k))?;
    let current_key = price_key(current?)?;
    (key < current_key).then_some(cheapest)
}

/// The breach this ingress's own count found for `rule`/`scope`, as a decision for the request
/// that found it (the version of the enforcer's decision for the key, if one is held).
fn own_breach(cache: &DecisionCache, rule: &Rule, scope: &str, reached: crate::decisions::own::Reached) -> Entry {
    let now = now_us();
    let key = tollgate_schemas::decision::decision_key(&rule.id, scope);
    Entry::own_breach(BreachDecision {
        rule_id: rule.id.clone(),
        rule_kind: rule.kind,
        scope: scope.to_owned(),
        state: DecisionState::Breached,
        action: rule.action_name.clone(),
        audit: false,
        cut_streams: rule.cut_streams,
        measure: rule.measure,
        limit: rule.limit,
        observed: reached.observed,
        headroom: 0,
        window_start_us: now,
        window_end_us: reached.lifts_at_us,
        decided_at_us: now,
        covered_until_us: now,
        version: cache.get(&key).map_or(0, |e| e.decision.version),
    })
}

/// Decides what the request gets. Waits (without a thread) while `queue_then_429` holds it.
/// `reserve` is called at most once, when a count on tokens or cost needs the request's
/// reservation (its input estimate and worst-case cost).
pub async fn gate(
    cache: &Arc<DecisionCache>,
    policy: &Policy,
    req: &RequestView<'_>,
    queue: &Queue,
    reserve: &mut (dyn FnMut() -> Reservation + Send),
) -> Result<Pass, Refusal> {
    // Subscribed only once a request is to be held (then evaluated again, so no change between
    // the evaluation and the wait is missed): the common path touches no channel.
    let mut changes: Option<tokio::sync::watch::Receiver<u64>> = None;
    let mut waiting: Option<(QueueSlot<'_>, tokio::time::Instant, tokio::time::Instant)> = None;
    let mut held_by: Option<AppliedDecision> = None;
    let mut reservation: Option<Reservation> = None;
    loop {
        if let Some(c) = changes.as_mut() {
            c.borrow_and_update();
        }
        let ev = evaluate(cache, policy, req);
        let mut hits = ev.hits;
        let mut watches = ev.watches;
        let mut owns = ev.owns;
        // Admission can find a Watch used up by a concurrent request: it becomes a hit.
        let queued = loop {
            let enforcing = hits
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.audit)
                .min_by_key(|(_, h)| (h.rank(), h.order))
                .map(|(i, _)| i);
            let mut pass = Pass::default();
            match enforcing.map(|i| (i, &hits[i], &hits[i].rule.action)) {
                Some((_, h, Action::HardBlock)) => {
                    let blocked = h.blocked("hard_block");
                    metrics::breach_action(&h.rule.id, "hard_block");
                    return Err(Refusal { applied: blocked.applied(h.entry.decision.version), blocked });
                }
                Some((i, _, Action::QueueThen429)) => break i,
                Some((_, h, Action::FallbackTo(target))) => {
                    pass.reroute = Some(match target {
                        FallbackTarget::Virtual(name) => Reroute::Virtual(name.clone()),
                        FallbackTarget::Concrete(t) => Reroute::Concrete(t.clone()),
                    });
                    pass.applied = Some(h.applied(h.rule.action_name.clone()));
                }
                Some((_, h, Action::FallbackToCheaper)) => match cheaper_fallback(policy, req.vm, req.target) {
                    Some(t) => {
                        pass.reroute = Some(Reroute::Concrete(t.clone()));
                        pass.applied = Some(h.applied("fallback_to_cheaper".into()));
                    }
                    None => pass.applied = Some(h.applied("fallback_to_cheaper:already_cheapest".into())),
                },
                Some((_, _, Action::AlertOnly)) | None => {
                    let audited = hits.iter().filter(|h| h.audit).min_by_key(|h| (h.rank(), h.order));
                    pass.applied = match (audited, held_by.take()) {
                        (_, Some(released)) => Some(released),
                        (Some(h), None) => Some(h.applied(format!("audit:{}", h.rule.action_name))),
                        (None, None) => None,
                    };
                }
            }
            // Count the request into its own counts and the Watch keys it falls in (not those it
            // is shaped by).
            let holds: Vec<WatchHold> = watches.iter().map(|(_, _, _, w)| w.clone()).collect();
            let own_holds: Vec<OwnHold> = owns.iter().map(|(_, _, _, o)| o.clone()).collect();
            let measures = holds.iter().map(|w| w.entry.decision.measure).chain(own_holds.iter().map(|o| o.measure));
            let reserved = if measures.into_iter().any(|m| m != Measure::Requests) {
                *reservation.get_or_insert_with(&mut *reserve)
            } else {
                Reservation::default()
            };
            match cache.admit(&own_holds, &holds, reserved) {
                Ok(ticket) => {
                    if let Some(a) = &pass.applied {
                        metrics::breach_action(&a.rule_id, &a.action);
                    }
                    if !ticket.is_empty() {
                        pass.ticket = Some(Arc::new(ticket));
                    }
                    pass.cuts = ev.cut_scopes.iter().map(|(rule, scope)| cache.register_stream(rule, scope)).collect();
                    return Ok(pass);
                }
                Err(Exhausted::Watch(i)) => {
                    let (order, rule, scope, w) = watches.remove(i);
                    let audit = rule.audit || w.entry.decision.audit || cache.audit_only();
                    hits.push(Hit { order, rule, scope, entry: w.entry, audit });
                }
                Err(Exhausted::Own(i, reached)) => {
                    let (order, rule, scope, _) = owns.remove(i);
                    let entry = Arc::new(own_breach(cache, rule, &scope, reached));
                    hits.push(Hit { order, rule, scope, entry, audit: false });
                }
            }
        };
        let queued = &hits[queued];
        // queue_then_429: wait for a change of any decision, then look again.
        let Some(changes) = changes.as_mut() else {
            changes = Some(cache.subscribe());
            continue;
        };
        let now = tokio::time::Instant::now();
        if waiting.is_none() {
            let Some(slot) = queue.enter() else {
                let mut blocked = queued.blocked("queue_then_429");
                blocked.queue_full = true;
                metrics::breach_action(&queued.rule.id, "queue_then_429");
                return Err(Refusal { applied: blocked.applied(queued.entry.decision.version), blocked });
            };
            let deadline = crate::clock::later(now.into_std(), Duration::from_millis(queued.rule.queue_timeout_ms));
            waiting = Some((slot, now, tokio::time::Instant::from_std(deadline)));
        }
        let (since, deadline) = waiting.as_ref().map_or((now, now), |(_, s, d)| (*s, *d));
        held_by = Some(queued.applied("queue_then_429:released".into()));
        let mut blocked = queued.blocked("queue_then_429");
        let version = queued.entry.decision.version;
        // An own count also makes room as its window moves on: look again then.
        let wake = if queued.entry.is_own() {
            let us = queued.entry.decision.window_end_us.saturating_sub(now_us()).max(0).unsigned_abs();
            deadline.min(crate::clock::later(now.into_std(), Duration::from_micros(us)).into())
        } else {
            deadline
        };
        let changed = tokio::time::timeout_at(wake, changes.changed()).await;
        let moved_on = changed.is_err() && wake < deadline;
        if !matches!(changed, Ok(Ok(()))) && !moved_on {
            blocked.waited_ms = Some(u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX));
            if let Some(end) = queued_window_end(&blocked, cache) {
                blocked.retry_after_secs = retry_after_secs(end, now_us());
            }
            metrics::breach_action(&blocked.rule_id, "queue_then_429");
            return Err(Refusal { applied: blocked.applied(version), blocked });
        }
    }
}

/// The window end of the decision held for a blocked key now (it may have changed while
/// waiting); `None` when the enforcer decided nothing for it (an own count refused).
fn queued_window_end(b: &Blocked, cache: &DecisionCache) -> Option<i64> {
    let key = tollgate_schemas::decision::decision_key(&b.rule_id, &b.scope);
    cache.get(&key).map(|e| e.decision.window_end_us)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::path::Path;
    use tollgate_schemas::decision::{BreachDecision, DecisionState};

    fn demo() -> Policy {
        Policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy")).unwrap()
    }

    fn decision(rule: &str, scope: &str, state: DecisionState, version: i64) -> BreachDecision {
        BreachDecision {
            limit: 200_000,
            observed: 200_100,
            window_end_us: now_us() + 90_500_000,
            decided_at_us: now_us(),
            ..BreachDecision::example(rule, scope, state, version)
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            project: Some("platform-search".into()),
            session_id: Some("s1".into()),
            workflow_tag: Some("classify-intent".into()),
            environment: Some("production".into()),
            user_id: Some("u_8f1c2d".into()),
            ..Envelope::default()
        }
    }

    async fn run(
        cache: &Arc<DecisionCache>,
        policy: &Policy,
        env: &Envelope,
        key: Option<&ApiKey>,
    ) -> Result<Pass, Refusal> {
        let vm = &policy.virtual_models["intent-fast"];
        let req =
            RequestView { envelope: env, api_key: key, vm: Some(vm), target: Some(&vm.rules[0].target), stream: false };
        gate(cache, policy, &req, &Queue::new(10), &mut || Reservation { tokens: 10, cost_nanos: 10 }).await
    }

    #[test]
    fn money_and_retry_after_are_exact() {
        assert_eq!(usd(500_000_000_000), "$500.00");
        assert_eq!(usd(500_123_000_000), "$500.123");
        assert_eq!(usd(1), "$0.000000001");
        assert_eq!(retry_after_secs(10_000_001, 0), 11);
        assert_eq!(retry_after_secs(0, 5_000_000), 1, "a window already over still says 1");
    }

    #[tokio::test]
    async fn the_strictest_breached_rule_wins_and_audit_only_records() {
        let policy = demo();
        let cache = DecisionCache::new(false);
        let env = envelope();
        // classify-intent-soft-cap (fallback_to_haiku, global) and per-session-loop-guard (hard_block).
        cache.apply(
            "classify-intent-soft-cap/global",
            Some(decision("classify-intent-soft-cap", "global", DecisionState::Breached, 1)),
        );
        let pass = run(&cache, &policy, &env, None).await.unwrap();
        assert_eq!(
            pass.reroute,
            Some(Reroute::Concrete(Target { provider: "anthropic".into(), model: "claude-haiku-4-5".into() }))
        );
        assert_eq!(pass.applied.as_ref().unwrap().action, "fallback_to_haiku");
        cache.apply(
            "per-session-loop-guard/session:s1",
            Some(decision("per-session-loop-guard", "session:s1", DecisionState::Breached, 7)),
        );
        let refused = run(&cache, &policy, &env, None).await.err().unwrap();
        assert_eq!(refused.blocked.rule_id, "per-session-loop-guard");
        assert!((89..=91).contains(&refused.blocked.retry_after_secs), "{}", refused.blocked.retry_after_secs);
        assert_eq!(refused.applied.version, 7);
        assert!(refused.blocked.message().contains("200100 tokens of 200000 tokens"), "{}", refused.blocked.message());

        let audit = DecisionCache::new(true);
        audit.apply(
            "per-session-loop-guard/session:s1",
            Some(decision("per-session-loop-guard", "session:s1", DecisionState::Breached, 7)),
        );
        let pass = run(&audit, &policy, &env, None).await.unwrap();
        assert!(pass.reroute.is_none());
        assert_eq!(pass.applied.unwrap().action, "audit:hard_block");
    }

    #[tokio::test]
    async fn queue_then_429_is_released_by_a_clear_or_refused_after_its_wait() {
        let mut policy = demo();
        for r in &mut policy.rules {
            r.queue_timeout_ms = 300;
        }
        let key = policy.api_keys.values().find(|k| k.id == "demo-search").unwrap().clone();
        let env = envelope();
        let cache = DecisionCache::new(false);
        cache.apply(
            "per-user-burst/user:u_8f1c2d",
            Some(decision("per-user-burst", "user:u_8f1c2d", DecisionState::Breached, 1)),
        );
        let started = std::time::Instant::now();
        let refused = run(&cache, &policy, &env, Some(&key)).await.err().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(290));
        assert_eq!(refused.blocked.action, "queue_then_429");
        assert!(refused.blocked.waited_ms.unwrap() >= 290);

        let c2 = Arc::clone(&cache);
        let lift = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c2.apply(
                "per-user-burst/user:u_8f1c2d",
                Some(decision("per-user-burst", "user:u_8f1c2d", DecisionState::Clear, 2)),
            );
        });
        let pass = run(&cache, &policy, &env, Some(&key)).await.unwrap();
        lift.await.unwrap();
        let applied = pass.applied.unwrap();
        assert_eq!((applied.action.as_str(), applied.version), ("queue_then_429:released", 1));
    }

    #[test]
    fn the_cheapest_fallback_is_by_output_then_input_price() {
        let policy = demo();
        let vm = &policy.virtual_models["intent-fast"];
        let haiku = &vm.rules[0].target;
        let cheapest = cheaper_fallback(&policy, Some(vm), Some(haiku)).unwrap();
        assert_eq!(cheapest.to_string(), "vertex/gemini-2.0-flash");
        assert!(cheaper_fallback(&policy, Some(vm), Some(cheapest)).is_none(), "already the cheapest");
        assert!(cheaper_fallback(&policy, None, Some(haiku)).is_none(), "no virtual model, no fallbacks");
    }
}
