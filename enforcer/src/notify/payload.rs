//! The body each channel kind receives, built from an alert: a Slack incoming-webhook message,
//! a PagerDuty Events API v2 `trigger` event, or the alert itself as JSON for webhooks; with
//! the amounts, percentages, times and cut-to-length text for people that they share.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_schemas::decision::{Alert, AlertKind, Measure, Severity};
use tollgate_schemas::price::{group_thousands, usd};
use tracing::error;

/// `source` of every PagerDuty event.
const PAGERDUTY_SOURCE: &str = "tollgate";
/// PagerDuty's limits on `payload.summary` and `dedup_key`, in characters.
const PAGERDUTY_SUMMARY_MAX: usize = 1024;
const PAGERDUTY_DEDUP_KEY_MAX: usize = 255;
/// Slack's limits: header text, section text, one section field.
const SLACK_HEADER_MAX: usize = 150;
const SLACK_SECTION_MAX: usize = 3000;
const SLACK_FIELD_MAX: usize = 2000;

/// `value` of `measure` for people: nano-USD as dollars (`$1,234.57`, or four decimals under
/// a dollar), tokens and requests as whole numbers with thousands separators.
/// `-1,234` style.
fn signed_thousands(v: i64) -> String {
    format!("{}{}", if v < 0 { "-" } else { "" }, group_thousands(v.unsigned_abs()))
}

pub fn format_amount(measure: Measure, value: i64) -> String {
    match measure {
        Measure::CostNanos => usd(value),
        Measure::Tokens => format!("{} tokens", signed_thousands(value)),
        Measure::Requests => {
            let noun = if value == 1 { "request" } else { "requests" };
            format!("{} {noun}", signed_thousands(value))
        }
    }
}

/// `observed` as a whole percentage of `limit`, when there is a limit.
fn percent_of_limit(observed: i64, limit: i64) -> Option<i64> {
    (limit > 0).then(|| i64::try_from(i128::from(observed) * 100 / i128::from(limit)).unwrap_or(i64::MAX))
}

fn title(alert: &Alert) -> String {
    match alert.kind {
        AlertKind::BudgetThreshold => format!("Budget {}% reached", alert.threshold_pct),
        AlertKind::RateLimitBreach => "Rate limit breached".to_owned(),
        AlertKind::LoopGuard => "Agent loop detected".to_owned(),
        AlertKind::ContextStuffing => "Context stuffing detected".to_owned(),
        AlertKind::TokenizerDrift => "Tokenizer drift detected".to_owned(),
        AlertKind::FrontierCostShare => "Frontier-model cost share too high".to_owned(),
    }
}

fn severity_emoji(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => ":rotating_light:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    }
}

/// `$812.40 of $1,000.00 (81%)`.
fn observed_vs_limit(alert: &Alert) -> String {
    let observed = format_amount(alert.measure, alert.observed);
    let limit = format_amount(alert.measure, alert.limit);
    match percent_of_limit(alert.observed, alert.limit) {
        Some(pct) => format!("{observed} of {limit} ({pct}%)"),
        None => format!("{observed} of {limit}"),
    }
}

/// One line for people who see nothing else: the alert's own summary, or one made up.
fn summary_line(alert: &Alert) -> String {
    let summary = alert.summary.trim();
    if summary.is_empty() {
        format!("{} for {}: {}, rule {}", title(alert), alert.scope, observed_vs_limit(alert), alert.rule_id)
    } else {
        summary.to_owned()
    }
}

fn timestamp(us: i64) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_microsecond(us).ok()
}

/// RFC 3339 in UTC, or the raw microseconds when out of range.
fn rfc3339(us: i64) -> String {
    timestamp(us).map_or_else(|| us.to_string(), |t| t.to_string())
}

fn short_time(us: i64) -> String {
    timestamp(us).map_or_else(|| us.to_string(), |t| t.strftime("%Y-%m-%d %H:%M").to_string())
}

/// At most `max` characters, the last one `…` when cut.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Slack treats `&`, `<` and `>` as markup (`<!channel>` pings everyone).
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn slack_code(s: &str) -> String {
    format!("`{}`", slack_escape(s).replace('`', "'"))
}

fn slack_field(label: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": truncate(&format!("*{label}*\n{value}"), SLACK_FIELD_MAX)})
}

/// A Slack incoming-webhook message: `text` is what notifications show, `blocks` the message.
pub fn slack_payload(alert: &Alert) -> Value {
    let title = title(alert);
    let severity = alert.severity.as_str();
    let fallback = format!(
        "[{}] {title}: {} ({}) {}",
        severity.to_uppercase(),
        slack_escape(&alert.scope),
        slack_escape(&alert.rule_id),
        observed_vs_limit(alert)
    );
    let header = format!("{} {title}: {}", severity_emoji(alert.severity), alert.scope);
    let mut fields = vec![
        slack_field("Rule", &slack_code(&alert.rule_id)),
        slack_field("Scope", &slack_code(&alert.scope)),
        slack_field("Observed", &format_amount(alert.measure, alert.observed)),
        slack_field("Limit", &format_amount(alert.measure, alert.limit)),
    ];
    if let Some(pct) = percent_of_limit(alert.observed, alert.limit) {
        fields.push(slack_field("Used", &format!("{pct}% of limit")));
    }
    if alert.threshold_pct > 0 {
        fields.push(slack_field("Threshold", &format!("{}%", alert.threshold_pct)));
    }
    fields.push(slack_field("Severity", severity));
    let context = format!(
        "Window {} – {} UTC · alert {} · Tollgate",
        short_time(alert.window_start_us),
        short_time(alert.window_end_us),
        slack_code(&alert.alert_id)
    );
    json!({
        "text": truncate(&fallback, SLACK_SECTION_MAX),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": truncate(&header, SLACK_HEADER_MAX), "emoji": true}},
            {"type": "section", "text": {"type": "mrkdwn", "text": truncate(&slack_escape(&summary_line(alert)), SLACK_SECTION_MAX)}},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&context, SLACK_SECTION_MAX)}]},
        ],
    })
}

/// The alert id as a PagerDuty `dedup_key` (at most 255 characters; a longer id keeps its
/// start and ends in its SHA-256, so distinct ids stay distinct).
fn dedup_key(alert_id: &str) -> String {
    if alert_id.chars().count() <= PAGERDUTY_DEDUP_KEY_MAX {
        return alert_id.to_owned();
    }
    let digest = format!("{:x}", Sha256::digest(alert_id.as_bytes()));
    let keep = PAGERDUTY_DEDUP_KEY_MAX - digest.len() - 1;
    let head: String = alert_id.chars().take(keep).collect();
    format!("{head}#{digest}")
}

/// A PagerDuty Events API v2 `trigger` event, deduplicated on the alert id.
pub fn pagerduty_payload(alert: &Alert, routing_key: &str) -> Value {
    let severity = match alert.severity {
        Severity::Critical => "critical",
        Severity::Warning => "warning",
        Severity::Info => "info",
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(&alert.alert_id),
        "client": "Tollgate",
        "payload": {
            "summary": truncate(&summary_line(alert), PAGERDUTY_SUMMARY_MAX),
            "source": PAGERDUTY_SOURCE,
            "severity": severity,
            "timestamp": rfc3339(alert.raised_at_us),
            "component": alert.scope,
            "group": alert.rule_id,
            "class": alert.kind.as_str(),
            "custom_details": {
                "alert_id": alert.alert_id,
                "rule_id": alert.rule_id,
                "kind": alert.kind.as_str(),
                "scope": alert.scope,
                "measure": alert.measure.as_str(),
                "observed": alert.observed,
                "limit": alert.limit,
                "observed_display": format_amount(alert.measure, alert.observed),
                "limit_display": format_amount(alert.measure, alert.limit),
                "percent_of_limit": percent_of_limit(alert.observed, alert.limit),
                "threshold_pct": alert.threshold_pct,
                "window_start": rfc3339(alert.window_start_us),
                "window_end": rfc3339(alert.window_end_us),
            },
        },
    })
}

/// The alert itself, every field, as `tollgate_schemas::decision::Alert` serializes.
pub fn webhook_payload(alert: &Alert) -> Value {
    serde_json::to_value(alert).unwrap_or_else(|e| {
        // Strings, integers and unit enums always serialize; kept total all the same.
        error!(alert = %alert.alert_id, error = %e, "alert cannot be serialized as JSON");
        json!({"alert_id": alert.alert_id, "summary": alert.summary})
    })
}
