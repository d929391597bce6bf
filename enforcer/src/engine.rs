//! The rule engine: counts usage per rule and scope and turns the counts into breach decisions
//! and budget alerts. Pure and synchronous; the caller feeds it events and the clock and publishes
//! what it returns.

use std::borrow::Cow;
use std::collections::BTreeSet;

// foldhash (hashbrown's default), not SipHash, though scope values are callers' choice: the
// enforcer answers no caller, so its hash timing cannot be probed, and every map here is pruned
// when its window passes (`gc`). SipHash was a seventh of the enforcer's profile.
use hashbrown::{HashMap, HashSet};
use std::sync::Arc;

use tollgate_schemas::decision::{Alert, AlertKind, BreachDecision, DecisionState, Measure, RuleKind, Severity};
use tollgate_schemas::policy::{Policy, Subject};
use tollgate_schemas::rules::Rule;
use tollgate_schemas::usage::{Envelope, UsageEvent};

use tollgate_schemas::window::Counter;

/// Usage as the engine counts it: one event (borrowed from it), or (when rebuilding from
/// ClickHouse) the sum of many events that share a time bucket and the dimensions rules look at.
#[derive(Debug, Clone, Default)]
pub struct Usage<'a> {
    pub at_us: i64,
    pub envelope: Cow<'a, Envelope>,
    pub api_key_id: Option<Cow<'a, str>>,
    pub requests: i64,
    pub tokens: i64,
    pub cost_nanos: i64,
}

impl<'a> Usage<'a> {
    /// `None` for requests Tollgate refused: they reached no provider and cost nothing.
    pub fn of(ev: &'a UsageEvent) -> Option<Usage<'a>> {
        if !tollgate_schemas::measures::attempted(ev) {
            return None;
        }
        Some(Usage {
            at_us: ev.ended_at_us,
            envelope: Cow::Borrowed(&ev.envelope),
            api_key_id: ev.api_key_id.as_deref().map(Cow::Borrowed),
            requests: 1,
            // What a token limit counts: everything the model read or wrote, cache included once.
            tokens: ev.total_tokens(),
            cost_nanos: ev.cost_nanos,
        })
    }

    fn amount(&self, m: Measure) -> i64 {
        match m {
            Measure::Tokens => self.tokens,
            Measure::Requests => self.requests,
            Measure::CostNanos => self.cost_nanos,
        }
    }
}

/// A breached scope's count and lift time, and a watched scope's headroom (unless it shrank by a
/// tenth of the limit), are republished at most this often: ingresses act on the state and count
/// their own admissions since the decision they hold, so a fresher figure only tightens what is
/// already bounded, while each republish is one more record every ingress reads at start.
pub const BREACHED_REFRESH_US: i64 = 1_000_000;

/// What a rule's count says about a scope now.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub state: DecisionState,
    pub observed: i64,
    pub limit: i64,
    pub window_start_us: i64,
    pub window_end_us: i64,
    /// The latest end time of the usage `observed` counts.
    pub covered_until_us: i64,
}

/// The last decision published for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub state: DecisionState,
    pub decided_at_us: i64,
    pub observed: i64,
    pub window_end_us: i64,
    pub version: i64,
}

#[derive(Debug)]
struct ScopeState {
    rule_id: String,
    scope: String,
    counter: Counter,
    /// The latest end time of the usage counted in.
    last_at_us: i64,
}

#[derive(Debug, Default)]
pub struct Output {
    pub decisions: Vec<BreachDecision>,
    pub alerts: Vec<Alert>,
    /// Keys the evaluation looked at (counted into, or due).
    pub evaluated: usize,
}

pub struct Engine {
    policy: Arc<Policy>,
    subjects: HashMap<String, Subject>,
    states: HashMap<String, ScopeState>,
    /// Keys counted into since the last evaluation.
    dirty: HashSet<String>,
    /// Keys whose last word is not `Clear`, each once, by when their verdict can next change
    /// with time alone (usage leaving the window, a refresh falling due): an evaluation looks at
    /// the keys counted into and the keys due, not at every key in force.
    due: BTreeSet<(i64, String)>,
    due_at: HashMap<String, i64>,
    /// What was last published per key (from the compacted topic at start, then our own).
    published: HashMap<String, Published>,
    /// Alert ids already raised (from the alerts topic at start, then our own), each with the
    /// time it can be forgotten (`Alert::kept_until_us`).
    alerted: HashMap<String, i64>,
    last_version: i64,
    /// Each counted rule's position in `policy.rules`, by id (the guards' are not counted here).
    rule_at: HashMap<String, usize>,
    /// Rules whose decisions the anomaly guards make (not counted here).
    guard_ids: HashSet<String>,
    /// A scope at or above this percentage of its limit is published as `Watch` with its headroom.
    watch_pct: i64,
}

impl Engine {
    pub fn new(policy: Arc<Policy>, watch_pct: u32) -> Engine {
        let rule_at = policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind != RuleKind::Guard)
            .map(|(i, r)| (r.id.clone(), i))
            .collect();
        let subjects = policy.api_keys.values().map(|k| (k.id.clone(), k.subject.clone())).collect();
        let guard_ids = policy.guards.iter().map(|g| g.id().to_owned()).collect();
        Engine {
            policy,
            rule_at,
            subjects,
            states: HashMap::new(),
            dirty: HashSet::new(),
            due: BTreeSet::new(),
            due_at: HashMap::new(),
            published: HashMap::new(),
            alerted: HashMap::new(),
            last_version: 0,
            guard_ids,
            watch_pct: i64::from(watch_pct.min(100)),
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Remembers a decision read back from the breaches topic (the last one per key wins).
    pub fn seed_published(&mut self, d: &BreachDecision) {
        self.last_version = self.last_version.max(d.version);
        let p = published_of(d);
        match self.published.get(&d.key()) {
            Some(old) if old.version >= d.version => {}
            _ => {
                if p.state != DecisionState::Clear {
                    // Looked at by the first evaluation (its breach may have lifted meanwhile).
                    schedule(&mut self.due, &mut self.due_at, &d.key(), i64::MIN);
                }
                self.published.insert(d.key(), p);
            }
        }
    }

    pub fn seed_alerted(&mut self, alert: &Alert) {
        self.alerted.insert(alert.alert_id.clone(), alert.remembered_until_us());
    }

    /// Counts one unit of usage into every rule and scope it falls in.
    pub fn observe(&mut self, u: &Usage, now_us: i64) {
        self.observe_rules(u, now_us, |_| true);
    }

    /// Counts one unit of usage into the rules `take` accepts, in every scope it falls in.
    pub fn observe_rules(&mut self, u: &Usage, now_us: i64, take: impl Fn(&Rule) -> bool) {
        let subject = u.api_key_id.as_deref().and_then(|k| self.subjects.get(k));
        // One buffer for the keys; a key is copied only into a map that does not hold it yet.
        let mut key = String::new();
        // The policy's rule index: an event is checked against the few rules that may apply.
        let policy = &*self.policy;
        let candidates = policy.rule_index.candidates(&u.envelope).filter_map(|i| policy.rules.get(i));
        for rule in candidates.filter(|r| r.kind != RuleKind::Guard && take(r)) {
            let Some(scope) = rule.scope_of(&u.envelope, u.api_key_id.as_deref(), subject) else { continue };
            let amount = u.amount(rule.measure);
            if amount == 0 {
                continue;
            }
            tollgate_schemas::decision::decision_key_into(&mut key, &rule.id, &scope);
            let state = self.states.entry_ref(key.as_str()).or_insert_with(|| ScopeState {
                rule_id: rule.id.clone(),
                scope,
                counter: Counter::new(&rule.window),
                last_at_us: 0,
            });
            state.counter.add(u.at_us, amount, now_us);
            state.last_at_us = state.last_at_us.max(u.at_us);
            self.dirty.get_or_insert_with(key.as_str(), ToOwned::to_owned);
        }
    }

    /// Decisions and alerts for every scope counted into since the last call, and for every scope
    /// in force (last word not `Clear`) whose verdict time alone may have changed since.
    pub fn evaluate(&mut self, now_us: i64) -> Output {
        // Each key once: the due ones not also counted into, then those counted into.
        let mut keys: Vec<String> = Vec::with_capacity(self.dirty.len());
        while let Some((at, _)) = self.due.first() {
            if *at > now_us {
                break;
            }
            let Some((_, key)) = self.due.pop_first() else { break };
            self.due_at.remove(&key);
            if !self.dirty.contains(&key) {
                keys.push(key);
            }
        }
        keys.extend(self.dirty.drain());
        // In key order, so that what one evaluation publishes comes out the same way every run.
        keys.sort_unstable();
        let Engine {
            policy, rule_at, states, published, alerted, last_version, guard_ids, watch_pct, due, due_at, ..
        } = self;
        let mut out = Output::default();
        for key in keys {
            let Some((rule_id, scope)) = key.split_once('/') else { continue };
            if guard_ids.contains(rule_id) {
                continue; // the guards decide these
            }
            out.evaluated += 1;
            let Some(rule) = rule_at.get(rule_id).and_then(|i| policy.rules.get(*i)) else {
                // The rule left the policy: lift what it had decided.
                if let Some(p) = published.get(&key).copied() {
                    if p.state != DecisionState::Clear {
                        let d = clear_for_removed(rule_id, scope, now_us, next_version(last_version, now_us));
                        published.insert(key.clone(), published_of(&d));
                        out.decisions.push(d);
                    }
                }
                unschedule(due, due_at, &key);
                continue;
            };
            let (observed, bounds, lifts_at, covered) = match states.get_mut(&key) {
                Some(s) => {
                    let v = s.counter.value(now_us);
                    let lifts = if v >= rule.limit { s.counter.lifts_at(now_us, rule.limit) } else { now_us };
                    (v, s.counter.bounds(now_us), lifts, s.last_at_us)
                }
                None => (0, Counter::new(&rule.window).bounds(now_us), now_us, 0),
            };
            let state = if observed >= rule.limit {
                DecisionState::Breached
            } else if observed * 100 >= rule.limit * *watch_pct && observed > 0 {
                DecisionState::Watch
            } else {
                DecisionState::Clear
            };
            let window_end_us = match state {
                DecisionState::Breached => lifts_at,
                _ => bounds.1,
            };
            let verdict = Verdict {
                state,
                observed,
                limit: rule.limit,
                window_start_us: bounds.0,
                window_end_us,
                covered_until_us: covered,
            };
            if let Some(d) = decide(published, last_version, rule, scope, verdict, now_us) {
                out.decisions.push(d);
            }
            // In force: look again when time alone can change the verdict, or when a change the
            // refresh interval held back falls due.
            match published.get(&key) {
                Some(p) if p.state != DecisionState::Clear => {
                    let next = states.get(&key).map_or(i64::MAX, |s| s.counter.next_change_us());
                    let held_back =
                        if p.observed == observed { i64::MAX } else { p.decided_at_us + BREACHED_REFRESH_US };
                    schedule(due, due_at, &key, next.min(held_back).max(now_us + 1));
                }
                _ => unschedule(due, due_at, &key),
            }
            for t in &rule.alerts {
                if observed.saturating_mul(100) < rule.limit.saturating_mul(i64::from(t.at_pct)) {
                    break; // thresholds are sorted
                }
                let pct = i32::try_from(t.at_pct).unwrap_or(i32::MAX);
                let id = Alert::id_for(&rule.id, scope, bounds.0, pct);
                if !alerted.contains_key(&id) {
                    alerted.insert(id.clone(), Alert::kept_until_us(AlertKind::BudgetThreshold, bounds.0, bounds.1));
                    out.alerts.push(Alert {
                        alert_id: id,
                        rule_id: rule.id.clone(),
                        kind: AlertKind::BudgetThreshold,
                        severity: match t.at_pct {
                            100.. => Severity::Critical,
                            80.. => Severity::Warning,
                            _ => Severity::Info,
                        },
                        scope: scope.to_owned(),
                        threshold_pct: pct,
                        measure: rule.measure,
                        limit: rule.limit,
                        observed,
                        window_start_us: bounds.0,
                        window_end_us: bounds.1,
                        raised_at_us: now_us,
                        summary: summary(rule, scope, t.at_pct, observed),
                        notify: t.notify.clone(),
                    });
                }
            }
        }
        out
    }

    /// A decision for `rule`/`scope` if the verdict differs from what was last published (or a
    /// breached scope's figures moved and the last word is over a second old), with the next
    /// version. Guards decide through this too, so every key's versions move forward together.
    pub fn decide(&mut self, rule: &Rule, scope: &str, v: Verdict, now_us: i64) -> Option<BreachDecision> {
        decide(&mut self.published, &mut self.last_version, rule, scope, v, now_us)
    }

    /// Whether `alert_id` is new; remembers it until `kept_until_us` (`Alert::kept_until_us`).
    pub fn first_time(&mut self, alert_id: &str, kept_until_us: i64) -> bool {
        if self.alerted.contains_key(alert_id) {
            return false;
        }
        self.alerted.insert(alert_id.to_owned(), kept_until_us);
        true
    }

    /// Whether the last decision published for `key` is not `Clear`.
    pub fn in_force_key(&self, key: &str) -> bool {
        self.published.get(key).is_some_and(|p| p.state != DecisionState::Clear)
    }

    /// Keys of `rule_id` whose last published decision is not `Clear`.
    pub fn in_force(&self, rule_id: &str) -> Vec<String> {
        self.published
            .iter()
            .filter(|(k, p)| p.state != DecisionState::Clear && k.split_once('/').is_some_and(|(r, _)| r == rule_id))
            .map(|(k, _)| k.split_once('/').map(|(_, s)| s.to_owned()).unwrap_or_default())
            .collect()
    }

    /// Forgets scopes with nothing counted and nothing in force, and returns the keys to
    /// tombstone: those whose last word was `Clear` and whose window holds nothing any more (or
    /// whose rule is gone). Their tombstones let the compacted topic and every ingress's cache
    /// shrink back instead of holding a `Clear` per scope ever seen; a key that counts again later
    /// starts over with a fresh, higher version. Work is proportional to the scopes held.
    pub fn gc(&mut self, now_us: i64) -> Vec<String> {
        self.gc_standby(now_us);
        let Engine { states, published, .. } = self;
        let mut tombstones = Vec::new();
        published.retain(|k, p| {
            let idle = p.state == DecisionState::Clear && !states.contains_key(k);
            if idle {
                tombstones.push(k.clone());
            }
            !idle
        });
        tombstones.sort();
        tombstones
    }

    /// As [`Engine::gc`] for a standby: forgets scopes and alert ids whose time has passed, but
    /// not what was published (the active's tombstones take that away, read back as
    /// [`Engine::seed_tombstone`]).
    pub fn gc_standby(&mut self, now_us: i64) {
        let before = self.alerted.len();
        self.alerted.retain(|_, until| *until > now_us);
        crate::metrics::alert_ids_expired((before - self.alerted.len()) as u64);
        let Engine { states, published, dirty, .. } = self;
        states.retain(|k, s| {
            !s.counter.is_empty(now_us) || published.get(k).is_some_and(|p| p.state != DecisionState::Clear)
        });
        // A standby counts without evaluating: keys counted into whose scope is gone have
        // nothing left to evaluate.
        dirty.retain(|k| states.contains_key(k.as_str()));
    }

    /// A tombstone read back from the breaches topic: the key's last word is forgotten.
    pub fn seed_tombstone(&mut self, key: &str) {
        self.published.remove(key);
        unschedule(&mut self.due, &mut self.due_at, key);
    }

    /// A tombstone for `key` was not published: remember its `Clear` so the next sweep tries
    /// again.
    pub fn untombstone(&mut self, key: String, now_us: i64) {
        self.published.entry(key).or_insert(Published {
            state: DecisionState::Clear,
            decided_at_us: now_us,
            observed: 0,
            window_end_us: now_us,
            version: self.last_version,
        });
    }

    /// A publish failed: forget that it happened so the next evaluation publishes again.
    pub fn unpublish(&mut self, d: &BreachDecision) {
        let key = d.key();
        if self.published.get(&key).is_some_and(|p| p.version == d.version) {
            self.published.remove(&key);
            self.dirty.insert(key);
        }
    }

    pub fn unalert(&mut self, a: &Alert) {
        self.alerted.remove(&a.alert_id);
        let key = tollgate_schemas::decision::decision_key(&a.rule_id, &a.scope);
        self.dirty.insert(key);
    }

    pub fn scopes(&self) -> usize {
        self.states.len()
    }

    /// The current count of a key, for tests and diagnostics.
    pub fn observed(&mut self, key: &str, now_us: i64) -> Option<i64> {
        self.states.get_mut(key).map(|s| s.counter.value(now_us))
    }

    /// Every live key with its rule, scope and count.
    pub fn snapshot(&mut self, now_us: i64) -> Vec<(String, String, i64)> {
        let mut v: Vec<_> =
            self.states.values_mut().map(|s| (s.rule_id.clone(), s.scope.clone(), s.counter.value(now_us))).collect();
        v.sort();
        v
    }
}

fn decide(
    published: &mut HashMap<String, Published>,
    last_version: &mut i64,
    rule: &Rule,
    scope: &str,
    v: Verdict,
    now_us: i64,
) -> Option<BreachDecision> {
    let key = tollgate_schemas::decision::decision_key(&rule.id, scope);
    let changed = match published.get(&key) {
        None => v.state != DecisionState::Clear,
        Some(p) => {
            p.state != v.state
                || (v.state == DecisionState::Watch
                    && p.observed != v.observed
                    && (now_us - p.decided_at_us >= BREACHED_REFRESH_US
                        || (v.observed - p.observed).saturating_mul(10) >= v.limit))
                || (v.state == DecisionState::Breached
                    && (p.window_end_us != v.window_end_us || p.observed != v.observed)
                    && now_us - p.decided_at_us >= BREACHED_REFRESH_US)
        }
    };
    if !changed {
        return None;
    }
    let d = BreachDecision {
        rule_id: rule.id.clone(),
        rule_kind: rule.kind,
        scope: scope.to_owned(),
        state: v.state,
        action: rule.action_name.clone(),
        audit: rule.audit,
        cut_streams: rule.cut_streams,
        measure: rule.measure,
        limit: v.limit,
        observed: v.observed,
        headroom: (v.limit - v.observed).max(0),
        window_start_us: v.window_start_us,
        window_end_us: v.window_end_us,
        decided_at_us: now_us,
        covered_until_us: v.covered_until_us,
        version: next_version(last_version, now_us),
    };
    published.insert(key, published_of(&d));
    Some(d)
}

/// (Re)schedules `key` for the evaluation at or after `at_us`; one entry per key.
fn schedule(due: &mut BTreeSet<(i64, String)>, due_at: &mut HashMap<String, i64>, key: &str, at_us: i64) {
    if let Some(old) = due_at.insert(key.to_owned(), at_us) {
        if old == at_us {
            return;
        }
        due.remove(&(old, key.to_owned()));
    }
    due.insert((at_us, key.to_owned()));
}

fn unschedule(due: &mut BTreeSet<(i64, String)>, due_at: &mut HashMap<String, i64>, key: &str) {
    if let Some(old) = due_at.remove(key) {
        due.remove(&(old, key.to_owned()));
    }
}

fn next_version(last: &mut i64, now_us: i64) -> i64 {
    *last = (*last + 1).max(now_us);
    *last
}

fn published_of(d: &BreachDecision) -> Published {
    Published {
        state: d.state,
        decided_at_us: d.decided_at_us,
        observed: d.observed,
        window_end_us: d.window_end_us,
        version: d.version,
    }
}

fn clear_for_removed(rule_id: &str, scope: &str, now_us: i64, version: i64) -> BreachDecision {
    BreachDecision {
        rule_id: rule_id.to_owned(),
        rule_kind: RuleKind::RateLimit,
        scope: scope.to_owned(),
        state: DecisionState::Clear,
        action: String::new(),
        audit: false,
        cut_streams: false,
        measure: Measure::Requests,
        limit: 0,
        observed: 0,
        headroom: 0,
        window_start_us: now_us,
        window_end_us: now_us,
        decided_at_us: now_us,
        covered_until_us: now_us,
        version,
    }
}

pub use tollgate_schemas::price::usd;

fn summary(rule: &Rule, scope: &str, pct: u32, observed: i64) -> String {
    let (obs, lim) = match rule.measure {
        Measure::CostNanos => (usd(observed), usd(rule.limit)),
        m => (format!("{observed} {}", m.as_str()), format!("{} {}", rule.limit, m.as_str())),
    };
    format!("{} for {scope} reached {pct}%: {obs} of {lim}; on exceed: {}", rule.id, rule.action_name)
}

#[cfg(test)]
mod tests;
