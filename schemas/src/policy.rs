//! The policy language: YAML documents in a directory, parsed as written and checked into a `Policy`.
//!
//! A file may hold several documents separated by `---`; each names its kind with `type:`. The
//! reference's `gateway-*-config` documents parse unchanged; Tollgate adds `tollgate-providers`,
//! `tollgate-price-card` and `tollgate-envelope`. This module is the document model; `load` reads
//! a directory into it (files, documents, checks) and `compile` turns its rules into
//! `rules::Rule`s.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub use crate::names::{Subject, SubjectKind, Target};
use crate::price::ModelPrice;

/// One problem in a policy directory, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() { "." } else { &self.field };
        write!(f, "{}:{}: {}: {}", self.file.display(), self.line, field, self.message)
    }
}

/// Every problem found in a policy directory (loading never stops at the first one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI Chat Completions, or any server that speaks it (vLLM, Ollama, Azure OpenAI).
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Base URL up to and including the version segment, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Name of the environment variable that holds the provider credential.
    #[serde(default)]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvidersDoc {
    #[serde(rename = "type")]
    _type: String,
    providers: Vec<ProviderConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceCard {
    #[serde(rename = "type")]
    _type: String,
    /// Recorded on every usage event so a cost can always be traced to the card that priced it.
    pub version: String,
    pub prices: Vec<ModelPrice>,
    /// Targets allowed to run without a price (self-hosted models), as `provider/model`.
    #[serde(default)]
    pub unpriced_ok: Vec<String>,
}

impl PriceCard {
    pub fn price(&self, provider: &str, model: &str) -> Option<&ModelPrice> {
        self.prices.iter().find(|p| p.provider == provider && p.model == model)
    }
}

/// Header names of the identity envelope and which of them a request must carry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvelopeConfig {
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub session_id: String,
    pub workflow_tag: String,
    pub environment: String,
    pub cost_center: String,
    /// Envelope fields (by the names above: `project`, `team`, …) a request must carry.
    pub required: Vec<String>,
}

impl Default for EnvelopeConfig {
    fn default() -> Self {
        Self {
            project: "X-TFY-Project".into(),
            team: "X-TFY-Team".into(),
            user_id: "X-TFY-User-ID".into(),
            session_id: "X-TFY-Session-ID".into(),
            workflow_tag: "X-TFY-Workflow-Tag".into(),
            environment: "X-TFY-Environment".into(),
            cost_center: "X-TFY-Cost-Center".into(),
            required: Vec::new(),
        }
    }
}

impl EnvelopeConfig {
    pub const FIELDS: [&'static str; 7] =
        ["project", "team", "user_id", "session_id", "workflow_tag", "environment", "cost_center"];

    /// The header name of envelope `field` (one of `FIELDS`).
    pub fn header_of(&self, field: &str) -> &str {
        self.headers().into_iter().find(|(f, _)| *f == field).map_or("", |(_, h)| h)
    }

    /// (field, header name) pairs in envelope order.
    pub fn headers(&self) -> [(&'static str, &str); 7] {
        [
            ("project", &self.project),
            ("team", &self.team),
            ("user_id", &self.user_id),
            ("session_id", &self.session_id),
            ("workflow_tag", &self.workflow_tag),
            ("environment", &self.environment),
            ("cost_center", &self.cost_center),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeDoc {
    #[serde(rename = "type")]
    _type: String,
    #[serde(flatten)]
    envelope: EnvelopeConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbRuleType {
    WeightBased,
    PriorityBased,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LbRule {
    pub id: String,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub priority: Option<u32>,
    pub target: Target,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    pub failure_threshold: u32,
    pub window_seconds: u64,
    pub cooldown_seconds: u64,
}

/// A virtual model (`type: gateway-load-balancing-config`), as in the reference.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualModel {
    pub name: String,
    #[serde(rename = "type")]
    _type: String,
    pub rule_type: LbRuleType,
    pub rules: Vec<LbRule>,
    #[serde(default)]
    pub fallbacks: Vec<Target>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Tollgate: tries of the same target before moving on (default: one try, no retry).
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    /// Tollgate: provider statuses that move a request on to the next target (connection
    /// errors and timeouts always do). Default: 429 and 5xx.
    #[serde(default)]
    pub fallback_on: Option<Vec<u16>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra tries of the same target after the first.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    100
}

impl VirtualModel {
    /// Whether a provider status moves the request on to the next target.
    pub fn falls_back_on(&self, status: u16) -> bool {
        match &self.fallback_on {
            Some(list) => list.contains(&status),
            None => status == 429 || status >= 500,
        }
    }
}

/// One gateway API key. Only its SHA-256 is stored; the key itself never is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Recorded on usage events; never the key.
    pub id: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
    pub subject: Subject,
    /// What the key may call: virtual model names, concrete `provider/model` names (with
    /// `direct_models`), or `"*"` for all.
    pub models: Vec<String>,
    /// Whether the key may name a concrete `provider/model` (one its `models` lists, or any with
    /// `"*"`) instead of a virtual model.
    #[serde(default)]
    pub direct_models: bool,
    /// The key's own envelope values, by header name: authoritative. A request may leave such a
    /// header out or repeat the value; a different value is refused (403) unless the field is in
    /// `caller_sets`, where the value is only a default.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Envelope fields (`project`, `team`, `user_id`, `session_id`, `workflow_tag`,
    /// `environment`, `cost_center`) whose headers the caller may set. Absent: every field the
    /// key does not declare itself (a user's key declares `user_id`: its subject). Given: only
    /// these, so a header for any other field is refused.
    #[serde(default)]
    pub caller_sets: Option<Vec<String>>,
}

/// Why a request's envelope header is refused for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeConflict {
    /// The key declares another value for this field.
    Pinned { header: String, key_value: String },
    /// The key does not let its caller set this field.
    NotCallers { header: String },
}

impl ApiKey {
    /// Whether the key may call `model`: a virtual model it lists, or (with `direct_models`) a
    /// concrete `provider/model` it lists; `"*"` allows every one of either kind.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// The key's own value for the envelope `field` whose header is `header`: its metadata, or for
    /// `user_id` of a user's key, the user.
    pub fn declared(&self, field: &str, header: &str) -> Option<&str> {
        let meta = self.metadata.iter().find(|(k, _)| k.eq_ignore_ascii_case(header)).map(|(_, v)| v.as_str());
        meta.or_else(|| {
            (field == "user_id" && self.subject.kind == SubjectKind::User).then_some(self.subject.id.as_str())
        })
    }

    /// Whether a request's header may set `field` (see `caller_sets`).
    pub fn caller_may_set(&self, field: &str, declared: bool) -> bool {
        match &self.caller_sets {
            None => !declared,
            Some(fields) => fields.iter().any(|f| f == field),
        }
    }

    /// The value of envelope `field` (header `header`) for a request that sent `sent`: the
    /// caller's where the key lets it set the field, else the key's; a conflict is refused.
    pub fn resolve_field(
        &self,
        field: &str,
        header: &str,
        sent: Option<String>,
    ) -> Result<Option<String>, EnvelopeConflict> {
        let declared = self.declared(field, header);
        match sent {
            None => Ok(declared.map(str::to_owned)),
            Some(v) if declared == Some(v.as_str()) => Ok(Some(v)),
            Some(v) if self.caller_may_set(field, declared.is_some()) => Ok(Some(v)),
            Some(_) => Err(match declared {
                Some(d) => EnvelopeConflict::Pinned { header: header.to_owned(), key_value: d.to_owned() },
                None => EnvelopeConflict::NotCallers { header: header.to_owned() },
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeysDoc {
    #[serde(rename = "type")]
    _type: String,
    /// Serve requests that present no key (an open gateway); off unless said here.
    #[serde(default)]
    allow_anonymous: bool,
    #[serde(default)]
    keys: Vec<ApiKey>,
}

/// `when:` of a rate-limit rule: metadata header matchers and subject matchers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub subjects: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub requests: Option<u64>,
    /// `30s`, `1m`, `1h`, `1d`.
    pub window: String,
    /// session, user, team, project, workflow, api_key, global (the default).
    #[serde(default)]
    pub scope: Option<String>,
}

/// Whether a rule acts or only records what it would have done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Decisions are published and recorded on usage events, but requests pass.
    Audit,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    pub id: String,
    #[serde(default)]
    pub when: When,
    pub limit: Limit,
    /// hard_block, queue_then_429, fallback_to_<model>, fallback_to_cheaper.
    pub on_breach: String,
    /// Tollgate: `audit` records without acting.
    #[serde(default)]
    pub mode: Mode,
    /// Tollgate: end the scope's in-flight streams when the rule is breached.
    #[serde(default)]
    pub cut_streams: bool,
    /// Tollgate: for `queue_then_429`, how long a request waits for headroom (default 5000).
    #[serde(default)]
    pub queue_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub name: String,
    #[serde(rename = "type")]
    _type: String,
    pub rules: Vec<RateLimitRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetAlert {
    pub at_pct: u32,
    #[serde(default)]
    pub notify: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetScope {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub id: String,
    pub scope: BudgetScope,
    #[serde(deserialize_with = "crate::price::de_usd_nanos")]
    pub ceiling_usd: i64,
    pub window: String,
    #[serde(default)]
    pub alerts: Vec<BudgetAlert>,
    pub on_exceed: String,
    /// Tollgate: IANA time zone of the calendar window (default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub cut_streams: bool,
    #[serde(default)]
    pub queue_timeout_ms: Option<u64>,
}

/// `tollgate-alert-channels`: where `notify:` names deliver.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertChannelsDoc {
    #[serde(rename = "type")]
    _type: String,
    channels: Vec<AlertChannel>,
}

/// One notify target: `slack:…` (Slack incoming webhook), `pagerduty:…` (Events API v2) or
/// `webhook:…` (the alert as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertChannel {
    /// As written in `notify:`, e.g. `slack:#ai-budget-alerts`.
    pub name: String,
    /// The URL to POST to; or give `url_env`.
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable holding the URL (webhook URLs are secrets).
    #[serde(default)]
    pub url_env: Option<String>,
    /// PagerDuty: the integration's routing key, or `routing_key_env` naming a variable that
    /// holds it.
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub routing_key_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Slack,
    PagerDuty,
    Webhook,
}

impl AlertChannel {
    pub fn kind(&self) -> Option<ChannelKind> {
        match self.name.split_once(':')?.0 {
            "slack" => Some(ChannelKind::Slack),
            "pagerduty" => Some(ChannelKind::PagerDuty),
            "webhook" => Some(ChannelKind::Webhook),
            _ => None,
        }
    }

    /// The URL, from `url` or the `url_env` variable.
    pub fn resolve_url(&self) -> Option<String> {
        self.url.clone().or_else(|| self.url_env.as_ref().and_then(|v| std::env::var(v).ok()))
    }
}

/// `tollgate-anomaly-guards`: detectors for the reference's failure modes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardsDoc {
    #[serde(rename = "type")]
    _type: String,
    guards: Vec<Guard>,
}

/// One anomaly guard. Every kind takes `id`, `notify` (channels to alert), `mode`, and — loop
/// and context-stuffing guards only — `on_breach`, what the ingress does while the guard fires
/// (without it the guard only alerts).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Guard {
    Loop(LoopGuard),
    ContextStuffing(ContextStuffingGuard),
    TokenizerDrift(TokenizerDriftGuard),
    FrontierCostShare(FrontierCostShareGuard),
}

/// A session whose tokens in the current hour exceed `multiplier` × the p`percentile` of its
/// workflow's session-hours over the last `baseline_days`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopGuard {
    pub id: String,
    #[serde(default)]
    pub notify: Vec<String>,
    #[serde(default)]
    pub on_breach: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_multiplier")]
    pub multiplier: u32,
    #[serde(default = "default_percentile")]
    pub percentile: u32,
    #[serde(default = "default_baseline_days")]
    pub baseline_days: u32,
    /// Session-hours a workflow needs before its baseline is trusted.
    #[serde(default = "default_min_samples")]
    pub min_samples: u32,
}

/// A workflow whose average input tokens per request over `window` exceed the limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextStuffingGuard {
    pub id: String,
    #[serde(default)]
    pub notify: Vec<String>,
    #[serde(default)]
    pub on_breach: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    pub max_avg_input_tokens: u64,
    #[serde(default = "default_hour")]
    pub window: String,
    #[serde(default = "default_min_samples")]
    pub min_requests: u32,
}

/// A model version whose provider/reference input-token ratio is more than `max_increase_pct`
/// above the previous version's of the same model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerDriftGuard {
    pub id: String,
    #[serde(default)]
    pub notify: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_drift_pct")]
    pub max_increase_pct: u32,
    #[serde(default = "default_min_samples")]
    pub min_requests: u32,
}

/// A workflow whose frontier-tier share of cost over `window` exceeds `max_share_pct`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontierCostShareGuard {
    pub id: String,
    #[serde(default)]
    pub notify: Vec<String>,
    #[serde(default)]
    pub mode: Mode,
    pub max_share_pct: u32,
    #[serde(default = "default_day")]
    pub window: String,
    /// Cost in USD below which a workflow is not judged (default 0).
    #[serde(default, deserialize_with = "crate::price::de_usd_nanos")]
    pub min_cost_usd: i64,
}

impl Guard {
    pub fn id(&self) -> &str {
        match self {
            Guard::Loop(g) => &g.id,
            Guard::ContextStuffing(g) => &g.id,
            Guard::TokenizerDrift(g) => &g.id,
            Guard::FrontierCostShare(g) => &g.id,
        }
    }

    pub fn notify(&self) -> &[String] {
        match self {
            Guard::Loop(g) => &g.notify,
            Guard::ContextStuffing(g) => &g.notify,
            Guard::TokenizerDrift(g) => &g.notify,
            Guard::FrontierCostShare(g) => &g.notify,
        }
    }

    pub fn on_breach(&self) -> Option<&str> {
        match self {
            Guard::Loop(g) => g.on_breach.as_deref(),
            Guard::ContextStuffing(g) => g.on_breach.as_deref(),
            Guard::TokenizerDrift(_) | Guard::FrontierCostShare(_) => None,
        }
    }

    pub fn mode(&self) -> Mode {
        match self {
            Guard::Loop(g) => g.mode,
            Guard::ContextStuffing(g) => g.mode,
            Guard::TokenizerDrift(g) => g.mode,
            Guard::FrontierCostShare(g) => g.mode,
        }
    }
}

fn default_multiplier() -> u32 {
    3
}
fn default_percentile() -> u32 {
    95
}
fn default_baseline_days() -> u32 {
    7
}
fn default_min_samples() -> u32 {
    20
}
fn default_drift_pct() -> u32 {
    10
}
fn default_hour() -> String {
    "1h".into()
}
fn default_day() -> String {
    "1d".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub name: String,
    #[serde(rename = "type")]
    _type: String,
    pub budgets: Vec<Budget>,
}

/// A whole, checked policy directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub providers: BTreeMap<String, ProviderConfig>,
    pub virtual_models: BTreeMap<String, VirtualModel>,
    pub rate_limits: Vec<RateLimitConfig>,
    pub budgets: Vec<BudgetConfig>,
    pub price_card: Option<PriceCard>,
    pub envelope: EnvelopeConfig,
    /// API keys by SHA-256. A policy without any is valid only with `allow_anonymous`.
    pub api_keys: BTreeMap<String, ApiKey>,
    /// Requests without a key are served (`allow_anonymous: true` in `tollgate-api-keys`).
    pub allow_anonymous: bool,
    /// Notify targets by name.
    pub alert_channels: BTreeMap<String, AlertChannel>,
    pub guards: Vec<Guard>,
    /// Rate limits, budgets and guards compiled for evaluation (see `rules`).
    pub rules: Vec<crate::rules::Rule>,
    /// `rules` by their first matcher (positions in `rules`).
    pub rule_index: crate::rules::RuleIndex,
}

impl Policy {
    /// The price of a target, if the card has one.
    pub fn price(&self, target: &Target) -> Option<&ModelPrice> {
        self.price_card.as_ref()?.price(&target.provider, &target.model)
    }
}

/// `30s`, `5m`, `1h`, `1d`, `1w` → seconds.
pub fn parse_window_seconds(w: &str) -> Result<u64, String> {
    let (num, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit()).unwrap_or(w.len()));
    let n: u64 = num.parse().map_err(|_| format!("window {w:?} should look like 30s, 5m, 1h or 1d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("window {w:?} should look like 30s, 5m, 1h or 1d")),
    };
    if n == 0 {
        return Err(format!("window {w:?} is empty"));
    }
    Ok(n * mult)
}

mod compile;
mod load;

#[cfg(test)]
mod tests;
