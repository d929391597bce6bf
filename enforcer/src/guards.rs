//! Anomaly guards, one per failure mode of the reference: agent loops, context stuffing,
//! tokenizer drift and frontier-model cost share. Each watches the usage stream, alerts its
//! channels once per scope and window, and (loop and context-stuffing guards with `on_breach`)
//! publishes a decision the ingress acts on while the guard fires.

use std::collections::{BTreeMap, HashMap, HashSet};

use tollgate_schemas::decision::{Alert, AlertKind, DecisionState, Measure, Severity};
use tollgate_schemas::measures;
use tollgate_schemas::policy::{
    ContextStuffingGuard, FrontierCostShareGuard, Guard, LoopGuard, Policy, TokenizerDriftGuard, parse_window_seconds,
};
use tollgate_schemas::price::ModelTier;
use tollgate_schemas::rules::Rule;
use tollgate_schemas::usage::UsageEvent;

use crate::engine::{Engine, Output, Verdict, usd};
use tollgate_schemas::window::Sliding;

const US: i64 = 1_000_000;
const HOUR_US: i64 = 3600 * US;

/// One request as the guards see it (or, when rebuilding, several summed).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at_us: i64,
    pub session_id: String,
    pub workflow: String,
    pub provider: String,
    pub model: String,
    pub model_version: String,
    /// Requests the context-stuffing measure counts.
    pub requests: i64,
    /// Input plus output tokens of the requests the loop measure counts (what `session_hours`
    /// sums, the loop guard's baseline).
    pub io_tokens: i64,
    /// Everything the model read, of the requests the context-stuffing measure counts
    /// (`requests` is how many those are).
    pub prompt_tokens: i64,
    /// `prompt_tokens` of the requests the drift measure counts.
    pub referenced_prompt_tokens: i64,
    /// The tiktoken estimate of those prompts.
    pub reference_tokens: i64,
    /// Requests the drift measure counts.
    pub referenced_requests: i64,
    pub cost_nanos: i64,
}

impl Sample {
    pub fn of(ev: &UsageEvent) -> Option<Sample> {
        if !measures::attempted(ev) {
            return None;
        }
        // Which requests each measure counts is `measures`' (shared with the views and reports).
        let (stuffing, drift) = (measures::stuffing_counts(ev), measures::drift_counts(ev));
        Some(Sample {
            at_us: ev.ended_at_us,
            session_id: ev.envelope.session_id.clone().unwrap_or_default(),
            workflow: ev.envelope.workflow_tag.clone().unwrap_or_default(),
            provider: ev.provider.clone(),
            model: ev.model.clone(),
            model_version: ev.model_version.clone().unwrap_or_default(),
            requests: i64::from(stuffing),
            io_tokens: if measures::loop_counts(ev) { ev.total_tokens() } else { 0 },
            prompt_tokens: if stuffing { ev.prompt_tokens() } else { 0 },
            referenced_prompt_tokens: if drift { ev.prompt_tokens() } else { 0 },
            reference_tokens: if drift { ev.reference_input_tokens.unwrap_or(0) } else { 0 },
            referenced_requests: i64::from(drift),
            cost_nanos: ev.cost_nanos,
        })
    }
}

/// Per workflow: the p-th percentile of its session-hours' tokens and how many it is over.
pub type Baseline = HashMap<String, (i64, u64)>;

struct LoopState {
    cfg: LoopGuard,
    rule: Option<Rule>,
    baseline: Baseline,
    /// session → (hour start, workflow, tokens this hour)
    sessions: HashMap<String, (i64, String, i64)>,
    dirty: HashSet<String>,
    /// The hour the last sweep saw: within an hour a session's verdict changes only when it
    /// counts (dirty) or the baseline moves (`set_baseline`), so the sessions of past hours are
    /// dropped and the sessions in force judged again once per hour, not every second.
    swept_hour: i64,
}

struct StuffingState {
    cfg: ContextStuffingGuard,
    rule: Option<Rule>,
    window_s: u64,
    /// workflow → (requests, prompt tokens)
    workflows: HashMap<String, (Sliding, Sliding)>,
    dirty: HashSet<String>,
}

#[derive(Default, Clone, Copy)]
struct VersionStats {
    first_seen_us: i64,
    requests: i64,
    prompt: i64,
    reference: i64,
}

struct DriftState {
    cfg: TokenizerDriftGuard,
    /// provider/model → version → stats
    models: HashMap<String, BTreeMap<String, VersionStats>>,
    dirty: HashSet<String>,
}

struct FrontierState {
    cfg: FrontierCostShareGuard,
    window_s: u64,
    /// workflow → (all cost, frontier cost)
    workflows: HashMap<String, (Sliding, Sliding)>,
    dirty: HashSet<String>,
}

pub struct Guards {
    loops: Vec<LoopState>,
    stuffing: Vec<StuffingState>,
    drift: Vec<DriftState>,
    frontier: Vec<FrontierState>,
    tiers: HashMap<(String, String), ModelTier>,
}

fn window_s(w: &str) -> u64 {
    parse_window_seconds(w).unwrap_or(3600)
}

impl Guards {
    pub fn new(policy: &Policy) -> Guards {
        let rule = |id: &str| policy.rules.iter().find(|r| r.id == id).cloned();
        let mut g = Guards {
            loops: vec![],
            stuffing: vec![],
            drift: vec![],
            frontier: vec![],
            tiers: policy
                .price_card
                .iter()
                .flat_map(|c| c.prices.iter())
                .map(|p| ((p.provider.clone(), p.model.clone()), p.tier))
                .collect(),
        };
        for guard in &policy.guards {
            match guard {
                Guard::Loop(c) => g.loops.push(LoopState {
                    cfg: c.clone(),
                    rule: rule(&c.id),
                    baseline: Baseline::new(),
                    sessions: HashMap::new(),
                    dirty: HashSet::new(),
                    swept_hour: i64::MIN,
                }),
                Guard::ContextStuffing(c) => g.stuffing.push(StuffingState {
                    cfg: c.clone(),
                    rule: rule(&c.id),
                    window_s: window_s(&c.window),
                    workflows: HashMap::new(),
                    dirty: HashSet::new(),
                }),
                Guard::TokenizerDrift(c) => {
                    g.drift.push(DriftState { cfg: c.clone(), models: HashMap::new(), dirty: HashSet::new() })
                }
                Guard::FrontierCostShare(c) => g.frontier.push(FrontierState {
                    cfg: c.clone(),
                    window_s: window_s(&c.window),
                    workflows: HashMap::new(),
                    dirty: HashSet::new(),
                }),
            }
        }
        g
    }

    pub fn is_empty(&self) -> bool {
        self.loops.is_empty() && self.stuffing.is_empty() && self.drift.is_empty() && self.frontier.is_empty()
    }

    /// The loop guards' baseline windows: (guard index, percentile, days).
    pub fn baselines_wanted(&self) -> Vec<(usize, u32, u32)> {
        self.loops.iter().enumerate().map(|(i, l)| (i, l.cfg.percentile, l.cfg.baseline_days)).collect()
    }

    pub fn set_baseline(&mut self, guard: usize, baseline: Baseline) {
        if let Some(l) = self.loops.get_mut(guard) {
            l.baseline = baseline;
            l.dirty.extend(l.sessions.keys().cloned());
        }
    }

    /// The longest look-back any guard needs, in seconds (for the rebuild).
    pub fn lookback_s(&self) -> i64 {
        let sliding = self.stuffing.iter().map(|s| s.window_s).chain(self.frontier.iter().map(|f| f.window_s));
        let longest = sliding.max().unwrap_or(0) as i64;
        let drift = if self.drift.is_empty() { 0 } else { 30 * 86_400 };
        longest.max(drift).max(if self.loops.is_empty() { 0 } else { 3600 })
    }

    pub fn observe(&mut self, s: &Sample, now_us: i64) {
        for l in &mut self.loops {
            if s.session_id.is_empty() || s.io_tokens == 0 {
                continue;
            }
            let hour = s.at_us.div_euclid(HOUR_US) * HOUR_US;
            if hour != now_us.div_euclid(HOUR_US) * HOUR_US {
                continue; // only the current hour is judged
            }
            let e = l.sessions.entry(s.session_id.clone()).or_insert_with(|| (hour, s.workflow.clone(), 0));
            if e.0 != hour {
                *e = (hour, s.workflow.clone(), 0);
            }
            e.2 += s.io_tokens;
            l.dirty.insert(s.session_id.clone());
        }
        for st in &mut self.stuffing {
            if s.workflow.is_empty() || s.requests == 0 {
                continue;
            }
            let w = st.window_s;
            let e = st.workflows.entry(s.workflow.clone()).or_insert_with(|| (Sliding::new(w), Sliding::new(w)));
            e.0.add(s.at_us, s.requests, now_us);
            e.1.add(s.at_us, s.prompt_tokens, now_us);
            st.dirty.insert(s.workflow.clone());
        }
        for d in &mut self.drift {
            if s.model_version.is_empty() || s.referenced_requests == 0 {
                continue;
            }
            let model = format!("{}/{}", s.provider, s.model);
            let v = d.models.entry(model.clone()).or_default().entry(s.model_version.clone()).or_default();
            if v.requests == 0 || s.at_us < v.first_seen_us {
                v.first_seen_us = s.at_us;
            }
            v.requests += s.referenced_requests;
            v.prompt += s.referenced_prompt_tokens;
            v.reference += s.reference_tokens;
            d.dirty.insert(model);
        }
        for f in &mut self.frontier {
            if s.workflow.is_empty() || s.cost_nanos == 0 {
                continue;
            }
            let w = f.window_s;
            let frontier = self.tiers.get(&(s.provider.clone(), s.model.clone())) == Some(&ModelTier::Frontier);
            let e = f.workflows.entry(s.workflow.clone()).or_insert_with(|| (Sliding::new(w), Sliding::new(w)));
            e.0.add(s.at_us, s.cost_nanos, now_us);
            if frontier {
                e.1.add(s.at_us, s.cost_nanos, now_us);
            }
            f.dirty.insert(s.workflow.clone());
        }
    }

    /// Decides and alerts for what changed; `sweep` also re-judges everything (hour rollovers,
    /// windows sliding past old usage).
    /// Forgets the workflows whose stuffing and frontier windows hold nothing any more and whose
    /// stuffing decision is not in force (workflow tags are chosen by callers); returns how many.
    /// The loop guard keeps only the current hour's sessions as it goes.
    pub fn gc(&mut self, engine: &Engine, now_us: i64) -> usize {
        let mut removed = 0;
        // Past hours' sessions (the evaluation's hourly sweep drops them too, but a standby does
        // not evaluate), and what is marked to evaluate without anything left to evaluate.
        let hour = now_us.div_euclid(HOUR_US) * HOUR_US;
        for l in &mut self.loops {
            l.sessions.retain(|_, (h, _, _)| *h == hour);
            let sessions = &l.sessions;
            l.dirty.retain(|s| sessions.contains_key(s));
        }
        for st in &mut self.stuffing {
            let before = st.workflows.len();
            let id = st.cfg.id.clone();
            st.workflows.retain(|w, (req, tok)| {
                req.value(now_us) != 0
                    || tok.value(now_us) != 0
                    || engine.in_force_key(&tollgate_schemas::decision::decision_key(&id, &format!("workflow:{w}")))
            });
            removed += before - st.workflows.len();
            let workflows = &st.workflows;
            st.dirty.retain(|w| workflows.contains_key(w));
        }
        for f in &mut self.frontier {
            let before = f.workflows.len();
            f.workflows.retain(|_, (all, top)| all.value(now_us) != 0 || top.value(now_us) != 0);
            removed += before - f.workflows.len();
            let workflows = &f.workflows;
            f.dirty.retain(|w| workflows.contains_key(w));
        }
        removed
    }

    pub fn evaluate(&mut self, engine: &mut Engine, now_us: i64, sweep: bool, out: &mut Output) {
        let hour = now_us.div_euclid(HOUR_US) * HOUR_US;
        for l in &mut self.loops {
            if sweep && l.swept_hour != hour {
                l.swept_hour = hour;
                l.sessions.retain(|_, (h, _, _)| *h == hour);
                if let Some(rule) = &l.rule {
                    for scope in engine.in_force(&rule.id) {
                        let session = scope.strip_prefix("session:").unwrap_or(&scope).to_owned();
                        l.dirty.insert(session);
                    }
                }
            }
            for session in std::mem::take(&mut l.dirty) {
                let (tokens, workflow) = match l.sessions.get(&session) {
                    Some((_, w, t)) => (*t, w.clone()),
                    None => (0, String::new()),
                };
                let (p, samples) = l.baseline.get(&workflow).copied().unwrap_or((0, 0));
                let limit = p.saturating_mul(i64::from(l.cfg.multiplier));
                let firing = samples >= u64::from(l.cfg.min_samples) && p > 0 && tokens > limit;
                let scope = format!("session:{session}");
                if let Some(rule) = &l.rule {
                    let state = if firing { DecisionState::Breached } else { DecisionState::Clear };
                    let v = Verdict {
                        state,
                        observed: tokens,
                        limit,
                        window_start_us: hour,
                        window_end_us: hour + HOUR_US,
                        covered_until_us: now_us,
                    };
                    out.decisions.extend(engine.decide(rule, &scope, v, now_us));
                }
                if firing {
                    let id = Alert::id_for(
                        &l.cfg.id,
                        &scope,
                        hour,
                        i32::try_from(l.cfg.multiplier * 100).unwrap_or(i32::MAX),
                    );
                    if !l.cfg.notify.is_empty()
                        && engine.first_time(&id, Alert::kept_until_us(AlertKind::LoopGuard, hour, hour + HOUR_US))
                    {
                        out.alerts.push(Alert {
                            alert_id: id,
                            rule_id: l.cfg.id.clone(),
                            kind: AlertKind::LoopGuard,
                            severity: Severity::Critical,
                            scope: scope.clone(),
                            threshold_pct: i32::try_from(l.cfg.multiplier * 100).unwrap_or(i32::MAX),
                            measure: Measure::Tokens,
                            limit,
                            observed: tokens,
                            window_start_us: hour,
                            window_end_us: hour + HOUR_US,
                            raised_at_us: now_us,
                            summary: format!(
                                "{}: session {session} ({workflow}) used {tokens} tokens this hour, over {}x the p{} of its workflow ({p}){}",
                                l.cfg.id,
                                l.cfg.multiplier,
                                l.cfg.percentile,
                                l.rule.as_ref().map(|r| format!("; action: {}", r.action_name)).unwrap_or_default()
                            ),
                            notify: l.cfg.notify.clone(),
                        });
                    }
                }
            }
        }
        for st in &mut self.stuffing {
            if sweep {
                st.dirty.extend(st.workflows.keys().cloned());
            }
            let start = now_us - st.window_s as i64 * US;
            let period = now_us.div_euclid(st.window_s as i64 * US) * st.window_s as i64 * US;
            for workflow in std::mem::take(&mut st.dirty) {
                let Some((req, tok)) = st.workflows.get_mut(&workflow) else { continue };
                let (requests, tokens) = (req.value(now_us), tok.value(now_us));
                if requests == 0 {
                    st.workflows.remove(&workflow);
                }
                let avg = if requests > 0 { tokens / requests } else { 0 };
                let limit = i64::try_from(st.cfg.max_avg_input_tokens).unwrap_or(i64::MAX);
                let firing = requests >= i64::from(st.cfg.min_requests) && avg > limit;
                let scope = format!("workflow:{workflow}");
                if let Some(rule) = &st.rule {
                    let state = if firing { DecisionState::Breached } else { DecisionState::Clear };
                    let v = Verdict {
                        state,
                        observed: avg,
                        limit,
                        window_start_us: start,
                        window_end_us: now_us,
                        covered_until_us: now_us,
                    };
                    out.decisions.extend(engine.decide(rule, &scope, v, now_us));
                }
                let id = Alert::id_for(&st.cfg.id, &scope, period, 100);
                if firing
                    && !st.cfg.notify.is_empty()
                    && engine.first_time(&id, Alert::kept_until_us(AlertKind::ContextStuffing, start, now_us))
                {
                    out.alerts.push(Alert {
                        alert_id: id,
                        rule_id: st.cfg.id.clone(),
                        kind: AlertKind::ContextStuffing,
                        severity: Severity::Warning,
                        scope,
                        threshold_pct: 100,
                        measure: Measure::Tokens,
                        limit,
                        observed: avg,
                        window_start_us: start,
                        window_end_us: now_us,
                        raised_at_us: now_us,
                        summary: format!(
                            "{}: workflow {workflow} averages {avg} input tokens per request over the last {} ({requests} requests), above {limit}",
                            st.cfg.id, st.cfg.window
                        ),
                        notify: st.cfg.notify.clone(),
                    });
                }
            }
        }
        for d in &mut self.drift {
            for model in std::mem::take(&mut d.dirty) {
                let Some(versions) = d.models.get(&model) else { continue };
                let mut ordered: Vec<(&String, &VersionStats)> = versions.iter().collect();
                ordered.sort_by_key(|(v, s)| (s.first_seen_us, (*v).clone()));
                let min = i64::from(d.cfg.min_requests);
                for pair in ordered.windows(2) {
                    let ((_, prev), (version, cur)) = (pair[0], pair[1]);
                    if prev.requests < min || cur.requests < min || prev.reference == 0 || cur.reference == 0 {
                        continue;
                    }
                    // cur.prompt / cur.reference > prev.prompt / prev.reference × (1 + pct/100)
                    let lhs = i128::from(cur.prompt) * i128::from(prev.reference) * 100;
                    let rhs = i128::from(prev.prompt)
                        * i128::from(cur.reference)
                        * (100 + i128::from(d.cfg.max_increase_pct));
                    if lhs <= rhs {
                        continue;
                    }
                    let ratio_pm = |s: &VersionStats| s.prompt * 1000 / s.reference.max(1);
                    let scope = format!("model:{model}@{version}");
                    let id = Alert::id_for(
                        &d.cfg.id,
                        &scope,
                        cur.first_seen_us,
                        i32::try_from(d.cfg.max_increase_pct).unwrap_or(i32::MAX),
                    );
                    if engine
                        .first_time(&id, Alert::kept_until_us(AlertKind::TokenizerDrift, cur.first_seen_us, now_us))
                    {
                        let (p, c) = (ratio_pm(prev), ratio_pm(cur));
                        out.alerts.push(Alert {
                            alert_id: id,
                            rule_id: d.cfg.id.clone(),
                            kind: AlertKind::TokenizerDrift,
                            severity: Severity::Warning,
                            scope,
                            threshold_pct: i32::try_from(d.cfg.max_increase_pct).unwrap_or(i32::MAX),
                            measure: Measure::Tokens,
                            limit: p,
                            observed: c,
                            window_start_us: cur.first_seen_us,
                            window_end_us: now_us,
                            raised_at_us: now_us,
                            summary: format!(
                                "{}: {model} version {version} counts {}.{:03} provider tokens per reference token, up from {}.{:03} ({}%, threshold {}%)",
                                d.cfg.id,
                                c / 1000,
                                c % 1000,
                                p / 1000,
                                p % 1000,
                                (c - p) * 100 / p.max(1),
                                d.cfg.max_increase_pct
                            ),
                            notify: d.cfg.notify.clone(),
                        });
                    }
                }
            }
        }
        for f in &mut self.frontier {
            if sweep {
                f.dirty.extend(f.workflows.keys().cloned());
            }
            let period = now_us.div_euclid(f.window_s as i64 * US) * f.window_s as i64 * US;
            for workflow in std::mem::take(&mut f.dirty) {
                let Some((all, frontier)) = f.workflows.get_mut(&workflow) else { continue };
                let (total, top) = (all.value(now_us), frontier.value(now_us));
                if total == 0 {
                    f.workflows.remove(&workflow);
                    continue;
                }
                let over = i128::from(top) * 100 > i128::from(total) * i128::from(f.cfg.max_share_pct);
                if !over || total < f.cfg.min_cost_usd {
                    continue;
                }
                let scope = format!("workflow:{workflow}");
                let id =
                    Alert::id_for(&f.cfg.id, &scope, period, i32::try_from(f.cfg.max_share_pct).unwrap_or(i32::MAX));
                let window_start = now_us - f.window_s as i64 * US;
                if engine.first_time(&id, Alert::kept_until_us(AlertKind::FrontierCostShare, window_start, now_us)) {
                    out.alerts.push(Alert {
                        alert_id: id,
                        rule_id: f.cfg.id.clone(),
                        kind: AlertKind::FrontierCostShare,
                        severity: Severity::Warning,
                        scope,
                        threshold_pct: i32::try_from(f.cfg.max_share_pct).unwrap_or(i32::MAX),
                        measure: Measure::CostNanos,
                        limit: total * i64::from(f.cfg.max_share_pct) / 100,
                        observed: top,
                        window_start_us: now_us - f.window_s as i64 * US,
                        window_end_us: now_us,
                        raised_at_us: now_us,
                        summary: format!(
                            "{}: frontier models took {}% of workflow {workflow}'s spend over the last {} ({} of {}), above {}%",
                            f.cfg.id,
                            i128::from(top) * 100 / i128::from(total),
                            f.cfg.window,
                            usd(top),
                            usd(total),
                            f.cfg.max_share_pct
                        ),
                        notify: f.cfg.notify.clone(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
