//! Turns rate-limit, budget and guard documents into `rules::Rule`s, reporting every problem with
//! the file, line and field it came from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::load::Builder;
use super::{Guard, Mode, SubjectKind, Target, parse_window_seconds};
use crate::decision::{Measure, RuleKind};
use crate::rules::{Action, DEFAULT_QUEUE_TIMEOUT_MS, FallbackTarget, Field, Period, Rule, Scope, Threshold, Window};

type Origin = (PathBuf, usize);

impl Builder {
    pub(super) fn compile_rules(&mut self) {
        let mut rules: Vec<Rule> = Vec::new();
        let mut problems: Vec<(Origin, String, String)> = Vec::new();
        let mut seen: BTreeMap<String, ()> = BTreeMap::new();
        let mut unique = |id: &str, at: &Origin, field: String, problems: &mut Vec<(Origin, String, String)>| {
            if id.is_empty() || id.contains('/') {
                // A decision's key is `rule_id/scope`, split at the first `/`: such an id would
                // load and never be enforced.
                problems.push((at.clone(), field, format!("rule id {id:?} must be non-empty and without '/'")));
            } else if seen.insert(id.to_owned(), ()).is_some() {
                problems.push((at.clone(), field, format!("rule id {id:?} is used by another rule, budget or guard")));
            }
        };

        for (ci, cfg) in self.policy.rate_limits.iter().enumerate() {
            let at = self.rate_origin.get(ci).cloned().unwrap_or_default();
            for (i, r) in cfg.rules.iter().enumerate() {
                let f = |name: &str| format!("rules[{i}].{name}");
                unique(&r.id, &at, f("id"), &mut problems);
                let matchers = self.matchers(&r.when.metadata, &at, &f("when.metadata"), &mut problems);
                let (mut subject_kind, mut subject_id) = (None, None);
                for (k, v) in &r.when.subjects {
                    match k.as_str() {
                        "type" => match v.as_str() {
                            "user" => subject_kind = Some(SubjectKind::User),
                            "team" => subject_kind = Some(SubjectKind::Team),
                            _ => problems.push((at.clone(), f("when.subjects.type"), "expected user or team".into())),
                        },
                        "id" => subject_id = Some(v.clone()),
                        _ => problems.push((
                            at.clone(),
                            f("when.subjects"),
                            format!("unknown key {k:?}; expected type or id"),
                        )),
                    }
                }
                let scope = match r.limit.scope.as_deref() {
                    None | Some("global") => Scope::Global,
                    Some("api_key") => Scope::ApiKey,
                    Some(w) => match Field::from_scope_word(w) {
                        Some(field) => Scope::Field(field),
                        None => {
                            problems.push((at.clone(), f("limit.scope"), format!("unknown scope {w:?}; expected session, user, team, project, workflow, environment, cost_center, api_key or global")));
                            Scope::Global
                        }
                    },
                };
                let (measure, limit) = match (r.limit.tokens, r.limit.requests) {
                    (Some(t), _) => (Measure::Tokens, t),
                    (None, Some(n)) => (Measure::Requests, n),
                    (None, None) => (Measure::Requests, 0), // reported by the document check
                };
                let seconds = parse_window_seconds(&r.limit.window).unwrap_or(3600);
                let action = self.action(&r.on_breach, &at, &f("on_breach"), &mut problems);
                rules.push(Rule {
                    id: r.id.clone(),
                    kind: RuleKind::RateLimit,
                    matchers,
                    subject_kind,
                    subject_id,
                    scope,
                    measure,
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    window: Window::Sliding { seconds },
                    action,
                    action_name: r.on_breach.clone(),
                    audit: r.mode == Mode::Audit,
                    cut_streams: r.cut_streams,
                    queue_timeout_ms: r.queue_timeout_ms.unwrap_or(DEFAULT_QUEUE_TIMEOUT_MS),
                    alerts: vec![],
                });
            }
        }

        for (ci, cfg) in self.policy.budgets.iter().enumerate() {
            let at = self.budget_origin.get(ci).cloned().unwrap_or_default();
            for (i, b) in cfg.budgets.iter().enumerate() {
                let f = |name: &str| format!("budgets[{i}].{name}");
                unique(&b.id, &at, f("id"), &mut problems);
                let matchers = self.matchers(&b.scope.metadata, &at, &f("scope.metadata"), &mut problems);
                let scope = if b.scope.metadata.is_empty() {
                    Scope::Global
                } else {
                    Scope::Named(b.scope.metadata.iter().map(|(h, v)| format!("{h}={v}")).collect::<Vec<_>>().join(","))
                };
                let period = match b.window.as_str() {
                    "daily" => Period::Daily,
                    "weekly" => Period::Weekly,
                    _ => Period::Monthly, // anything else is reported by the document check
                };
                let timezone = b.timezone.clone().unwrap_or_else(|| "UTC".to_owned());
                if let Err(e) = jiff::tz::TimeZone::get(&timezone) {
                    problems.push((at.clone(), f("timezone"), format!("unknown time zone {timezone:?}: {e}")));
                }
                if b.ceiling_usd <= 0 {
                    problems.push((at.clone(), f("ceiling_usd"), "must be above zero".into()));
                }
                let mut alerts = Vec::new();
                for (j, a) in b.alerts.iter().enumerate() {
                    if a.at_pct == 0 || a.at_pct > 1000 {
                        problems.push((at.clone(), f(&format!("alerts[{j}].at_pct")), "expected 1 to 1000".into()));
                    }
                    self.check_notify(&a.notify, &at, &f(&format!("alerts[{j}].notify")), &mut problems);
                    alerts.push(Threshold { at_pct: a.at_pct, notify: a.notify.clone() });
                }
                alerts.sort_by_key(|a| a.at_pct);
                let action = self.action(&b.on_exceed, &at, &f("on_exceed"), &mut problems);
                rules.push(Rule {
                    id: b.id.clone(),
                    kind: RuleKind::Budget,
                    matchers,
                    subject_kind: None,
                    subject_id: None,
                    scope,
                    measure: Measure::CostNanos,
                    limit: b.ceiling_usd,
                    window: Window::Calendar { period, timezone },
                    action,
                    action_name: b.on_exceed.clone(),
                    audit: b.mode == Mode::Audit,
                    cut_streams: b.cut_streams,
                    queue_timeout_ms: b.queue_timeout_ms.unwrap_or(DEFAULT_QUEUE_TIMEOUT_MS),
                    alerts,
                });
            }
        }

        for (i, g) in self.policy.guards.iter().enumerate() {
            let at = self.guard_origin.get(i).cloned().unwrap_or_default();
            let f = |name: &str| format!("guards[{i}].{name}");
            unique(g.id(), &at, f("id"), &mut problems);
            self.check_notify(g.notify(), &at, &f("notify"), &mut problems);
            let (scope, seconds) = match g {
                Guard::Loop(l) => {
                    if l.multiplier == 0 {
                        problems.push((at.clone(), f("multiplier"), "must be at least 1".into()));
                    }
                    if !(1..=100).contains(&l.percentile) {
                        problems.push((at.clone(), f("percentile"), "expected 1 to 100".into()));
                    }
                    (Field::SessionId, 3600)
                }
                Guard::ContextStuffing(c) => {
                    (Field::WorkflowTag, self.window(&c.window, &at, &f("window"), &mut problems))
                }
                Guard::FrontierCostShare(c) => {
                    if c.max_share_pct == 0 || c.max_share_pct > 100 {
                        problems.push((at.clone(), f("max_share_pct"), "expected 1 to 100".into()));
                    }
                    (Field::WorkflowTag, self.window(&c.window, &at, &f("window"), &mut problems))
                }
                Guard::TokenizerDrift(_) => (Field::WorkflowTag, 3600),
            };
            if g.notify().is_empty() && g.on_breach().is_none() {
                problems.push((at.clone(), f("notify"), "a guard needs `notify`, `on_breach` or both".into()));
            }
            if let Some(name) = g.on_breach() {
                let action = self.action(name, &at, &f("on_breach"), &mut problems);
                rules.push(Rule {
                    id: g.id().to_owned(),
                    kind: RuleKind::Guard,
                    matchers: vec![],
                    subject_kind: None,
                    subject_id: None,
                    scope: Scope::Field(scope),
                    measure: Measure::Tokens,
                    limit: 0,
                    window: Window::Sliding { seconds },
                    action,
                    action_name: name.to_owned(),
                    audit: g.mode() == Mode::Audit,
                    cut_streams: false,
                    queue_timeout_ms: DEFAULT_QUEUE_TIMEOUT_MS,
                    alerts: vec![],
                });
            }
        }

        for ((file, line), field, message) in problems {
            self.err(&file, line, field, message);
        }
        self.policy.rule_index = crate::rules::RuleIndex::new(&rules);
        self.policy.rules = rules;
    }

    fn window(&self, w: &str, at: &Origin, field: &str, problems: &mut Vec<(Origin, String, String)>) -> u64 {
        parse_window_seconds(w).unwrap_or_else(|m| {
            problems.push((at.clone(), field.to_owned(), m));
            3600
        })
    }

    /// `X-TFY-Project: platform-search` → (Project, "platform-search"). Header names compare
    /// case-insensitively against the envelope document's names; envelope field names work too.
    fn matchers(
        &self,
        metadata: &BTreeMap<String, String>,
        at: &Origin,
        field: &str,
        problems: &mut Vec<(Origin, String, String)>,
    ) -> Vec<(Field, String)> {
        let headers = self.policy.envelope.headers();
        metadata
            .iter()
            .filter_map(|(h, v)| {
                let found = headers
                    .iter()
                    .find(|(name, header)| header.eq_ignore_ascii_case(h) || *name == h)
                    .and_then(|(name, _)| Field::from_name(name));
                if found.is_none() {
                    let known: Vec<&str> = headers.iter().map(|(_, h)| *h).collect();
                    problems.push((
                        at.clone(),
                        format!("{field}.{h}"),
                        format!("not an envelope header; expected one of {known:?}"),
                    ));
                }
                found.map(|f| (f, v.clone()))
            })
            .collect()
    }

    fn check_notify(&self, notify: &[String], at: &Origin, field: &str, problems: &mut Vec<(Origin, String, String)>) {
        for (i, n) in notify.iter().enumerate() {
            if !self.policy.alert_channels.contains_key(n) {
                problems.push((
                    at.clone(),
                    format!("{field}[{i}]"),
                    format!("no channel {n:?}; define it in a tollgate-alert-channels document"),
                ));
            }
        }
    }

    /// Resolves `on_breach`/`on_exceed`. `fallback_to_<m>` names a virtual model, a priced model,
    /// or a word of priced models' names (`haiku` → the cheapest priced `…-haiku-…`).
    fn action(&self, name: &str, at: &Origin, field: &str, problems: &mut Vec<(Origin, String, String)>) -> Action {
        match name {
            "hard_block" => return Action::HardBlock,
            "queue_then_429" => return Action::QueueThen429,
            "fallback_to_cheaper" => return Action::FallbackToCheaper,
            _ => {}
        }
        let Some(wanted) = name.strip_prefix("fallback_to_") else {
            problems.push((
                at.clone(),
                field.to_owned(),
                format!("unknown action {name:?}; expected hard_block, queue_then_429, fallback_to_<model> or fallback_to_cheaper"),
            ));
            return Action::HardBlock;
        };
        if self.policy.virtual_models.contains_key(wanted) {
            return Action::FallbackTo(FallbackTarget::Virtual(wanted.to_owned()));
        }
        let prices = self.policy.price_card.as_ref().map(|c| c.prices.as_slice()).unwrap_or_default();
        let candidates = prices.iter().filter(|p| self.policy.providers.contains_key(&p.provider));
        let exact = candidates.clone().filter(|p| p.model == wanted || format!("{}/{}", p.provider, p.model) == wanted);
        let by_word = candidates.filter(|p| p.model.split(['-', '.', '/']).any(|w| w == wanted));
        let best = exact
            .min_by_key(|p| p.output_usd_per_mtok.0)
            .or_else(|| by_word.min_by_key(|p| (p.output_usd_per_mtok.0, p.input_usd_per_mtok.0)));
        match best {
            Some(p) => Action::FallbackTo(FallbackTarget::Concrete(Target {
                provider: p.provider.clone(),
                model: p.model.clone(),
            })),
            None => {
                problems.push((
                    at.clone(),
                    field.to_owned(),
                    format!("{name}: no virtual model, priced model or model-name word {wanted:?} (with a configured provider)"),
                ));
                Action::HardBlock
            }
        }
    }
}
