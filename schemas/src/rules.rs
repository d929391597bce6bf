//! Rate limits, budgets and guards compiled from the policy into one shape that the enforcer
//! (which counts) and the ingress (which acts) both evaluate the same way: which rules apply to a
//! request, and under which scope value.

use std::fmt;

use crate::decision::{Measure, RuleKind};
use crate::names::{Subject, SubjectKind, Target};
use crate::usage::Envelope;

/// A field of the identity envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Project,
    Team,
    UserId,
    SessionId,
    WorkflowTag,
    Environment,
    CostCenter,
}

impl Field {
    pub const ALL: [Field; 7] = [
        Field::Project,
        Field::Team,
        Field::UserId,
        Field::SessionId,
        Field::WorkflowTag,
        Field::Environment,
        Field::CostCenter,
    ];

    pub fn get(self, env: &Envelope) -> Option<&str> {
        match self {
            Field::Project => env.project.as_deref(),
            Field::Team => env.team.as_deref(),
            Field::UserId => env.user_id.as_deref(),
            Field::SessionId => env.session_id.as_deref(),
            Field::WorkflowTag => env.workflow_tag.as_deref(),
            Field::Environment => env.environment.as_deref(),
            Field::CostCenter => env.cost_center.as_deref(),
        }
    }

    /// The envelope field name (`EnvelopeConfig::FIELDS`).
    pub fn name(self) -> &'static str {
        match self {
            Field::Project => "project",
            Field::Team => "team",
            Field::UserId => "user_id",
            Field::SessionId => "session_id",
            Field::WorkflowTag => "workflow_tag",
            Field::Environment => "environment",
            Field::CostCenter => "cost_center",
        }
    }

    /// The prefix of scope values keyed on this field: `session:sess_1`.
    pub fn scope_prefix(self) -> &'static str {
        match self {
            Field::Project => "project",
            Field::Team => "team",
            Field::UserId => "user",
            Field::SessionId => "session",
            Field::WorkflowTag => "workflow",
            Field::Environment => "environment",
            Field::CostCenter => "cost_center",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    /// A rate limit's `scope:` word.
    pub fn from_scope_word(word: &str) -> Option<Field> {
        match word {
            "workflow_tag" => Some(Field::WorkflowTag),
            "user_id" => Some(Field::UserId),
            "session_id" => Some(Field::SessionId),
            w => Field::ALL.into_iter().find(|f| f.scope_prefix() == w),
        }
    }
}

/// What a rule's counters are kept per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One counter for all matching traffic.
    Global,
    /// One counter per value of an envelope field.
    Field(Field),
    /// One counter per API key id.
    ApiKey,
    /// One counter for all matching traffic, named after the matchers (budgets:
    /// `X-TFY-Project=platform-search`).
    Named(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// The last `seconds`, sliding.
    Sliding { seconds: u64 },
    /// The current calendar day, ISO week or month in `timezone` (IANA name).
    Calendar { period: Period, timezone: String },
}

/// Where a `fallback_to_<model>` sends the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackTarget {
    Virtual(String),
    Concrete(Target),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// 429 with `Retry-After`.
    HardBlock,
    /// Hold the request until headroom returns or `queue_timeout_ms` passes, then 429.
    QueueThen429,
    FallbackTo(FallbackTarget),
    /// The virtual model's cheapest fallback (see the ingress).
    FallbackToCheaper,
    /// A guard without `on_breach`: alerts only.
    AlertOnly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    pub at_pct: u32,
    pub notify: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub kind: RuleKind,
    /// Envelope fields that must equal these values (from `when.metadata` / `scope.metadata`).
    pub matchers: Vec<(Field, String)>,
    /// `when.subjects`: the API key's subject type and id.
    pub subject_kind: Option<SubjectKind>,
    pub subject_id: Option<String>,
    pub scope: Scope,
    pub measure: Measure,
    /// In units of `measure`; 0 for guards, whose limit the enforcer derives.
    pub limit: i64,
    pub window: Window,
    pub action: Action,
    /// `on_breach`/`on_exceed` as written.
    pub action_name: String,
    pub audit: bool,
    pub cut_streams: bool,
    pub queue_timeout_ms: u64,
    pub alerts: Vec<Threshold>,
}

impl Rule {
    /// Whether the rule governs a request with this envelope and key subject.
    pub fn applies(&self, env: &Envelope, subject: Option<&Subject>) -> bool {
        if let Some(kind) = self.subject_kind {
            if subject.is_none_or(|s| s.kind != kind) {
                return false;
            }
        }
        if let Some(id) = &self.subject_id {
            if subject.is_none_or(|s| &s.id != id) {
                return false;
            }
        }
        self.matchers.iter().all(|(f, v)| f.get(env) == Some(v.as_str()))
    }

    /// The scope value a request falls in, or `None` when the rule does not apply to it (or it
    /// lacks the field the rule is scoped on).
    pub fn scope_of(&self, env: &Envelope, api_key_id: Option<&str>, subject: Option<&Subject>) -> Option<String> {
        if !self.applies(env, subject) {
            return None;
        }
        match &self.scope {
            Scope::Global => Some("global".to_owned()),
            Scope::Named(n) => Some(n.clone()),
            Scope::Field(f) => f.get(env).map(|v| format!("{}:{v}", f.scope_prefix())),
            Scope::ApiKey => api_key_id.map(|k| format!("api_key:{k}")),
        }
    }
}

/// Rules by their first metadata matcher, so that a request is checked against the rules whose
/// first matcher it meets and those without one, not against every rule: with a thousand
/// per-team or per-project rules a request meets a handful. (Written here: a map of maps is all
/// it takes.) Hashed with foldhash: the values held are the policy's, so a caller's values can
/// only be looked up, never fill it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleIndex {
    /// Per field, per value, the positions of the rules whose first matcher is that.
    by_first: Vec<(Field, hashbrown::HashMap<String, Vec<usize>>)>,
    /// Rules without a metadata matcher.
    unconditional: Vec<usize>,
}

impl RuleIndex {
    /// Indexes `rules` by position.
    pub fn new(rules: &[Rule]) -> Self {
        let mut index = RuleIndex::default();
        for (i, rule) in rules.iter().enumerate() {
            match rule.matchers.first() {
                None => index.unconditional.push(i),
                Some((field, value)) => {
                    let at = match index.by_first.iter().position(|(f, _)| f == field) {
                        Some(at) => at,
                        None => {
                            index.by_first.push((*field, hashbrown::HashMap::new()));
                            index.by_first.len() - 1
                        }
                    };
                    index.by_first[at].1.entry(value.clone()).or_default().push(i);
                }
            }
        }
        index
    }

    /// The positions of the rules that may apply to `env` (each once, in no particular order):
    /// a superset of those `Rule::applies` accepts.
    pub fn candidates<'a>(&'a self, env: &'a Envelope) -> impl Iterator<Item = usize> + 'a {
        let matched = self
            .by_first
            .iter()
            .flat_map(move |(field, values)| field.get(env).and_then(|v| values.get(v)).into_iter().flatten().copied());
        self.unconditional.iter().copied().chain(matched)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::HardBlock => f.write_str("hard_block"),
            Action::QueueThen429 => f.write_str("queue_then_429"),
            Action::FallbackTo(FallbackTarget::Virtual(v)) => write!(f, "fallback_to {v}"),
            Action::FallbackTo(FallbackTarget::Concrete(t)) => write!(f, "fallback_to {t}"),
            Action::FallbackToCheaper => f.write_str("fallback_to_cheaper"),
            Action::AlertOnly => f.write_str("alert_only"),
        }
    }
}

/// Default wait of `queue_then_429`.
pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 5_000;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule(scope: Scope) -> Rule {
        Rule {
            id: "r".into(),
            kind: RuleKind::RateLimit,
            matchers: vec![(Field::Environment, "production".into())],
            subject_kind: Some(SubjectKind::User),
            subject_id: None,
            scope,
            measure: Measure::Tokens,
            limit: 10,
            window: Window::Sliding { seconds: 3600 },
            action: Action::HardBlock,
            action_name: "hard_block".into(),
            audit: false,
            cut_streams: false,
            queue_timeout_ms: DEFAULT_QUEUE_TIMEOUT_MS,
            alerts: vec![],
        }
    }

    #[test]
    fn scope_values_follow_matchers_and_subjects() {
        let env =
            Envelope { environment: Some("production".into()), session_id: Some("s1".into()), ..Envelope::default() };
        let user = Subject { kind: SubjectKind::User, id: "u".into() };
        let team = Subject { kind: SubjectKind::Team, id: "t".into() };
        let r = rule(Scope::Field(Field::SessionId));
        assert_eq!(r.scope_of(&env, None, Some(&user)).as_deref(), Some("session:s1"));
        assert_eq!(r.scope_of(&env, None, Some(&team)), None, "subject type must match");
        assert_eq!(r.scope_of(&env, None, None), None);
        let staging = Envelope { environment: Some("staging".into()), ..env.clone() };
        assert_eq!(r.scope_of(&staging, None, Some(&user)), None, "metadata must match");
        assert_eq!(rule(Scope::Field(Field::Team)).scope_of(&env, None, Some(&user)), None, "no team header");
        assert_eq!(rule(Scope::ApiKey).scope_of(&env, Some("k1"), Some(&user)).as_deref(), Some("api_key:k1"));
        assert_eq!(rule(Scope::Global).scope_of(&env, None, Some(&user)).as_deref(), Some("global"));
    }

    proptest::proptest! {
        /// Every rule that applies is a candidate, once; values come from a small set so that
        /// matchers and envelopes meet often.
        #[test]
        fn the_index_offers_every_rule_that_applies_once(
            matchers in proptest::collection::vec(proptest::collection::vec((0usize..7, 0u8..3), 0..3), 0..40),
            fields in proptest::collection::vec(proptest::option::of(0u8..3), 7),
        ) {
            let rules: Vec<Rule> = matchers
                .iter()
                .map(|m| Rule {
                    matchers: m.iter().map(|(f, v)| (Field::ALL[*f], format!("v{v}"))).collect(),
                    subject_kind: None,
                    ..rule(Scope::Global)
                })
                .collect();
            let value = |i: usize| fields[i].map(|v| format!("v{v}"));
            let env = Envelope {
                project: value(0),
                team: value(1),
                user_id: value(2),
                session_id: value(3),
                workflow_tag: value(4),
                environment: value(5),
                cost_center: value(6),
            };
            let index = RuleIndex::new(&rules);
            let mut offered: Vec<usize> = index.candidates(&env).collect();
            offered.sort_unstable();
            let n = offered.len();
            offered.dedup();
            proptest::prop_assert_eq!(n, offered.len(), "a rule offered twice");
            for (i, r) in rules.iter().enumerate() {
                if r.applies(&env, None) {
                    proptest::prop_assert!(offered.contains(&i), "rule {} applies but was not offered", i);
                }
            }
        }
    }
}
