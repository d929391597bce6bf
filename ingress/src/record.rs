//! Turns what one request did into its usage event: tokens, estimates, price, and publishing.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tollgate_schemas::price::ModelPrice;
use tollgate_schemas::usage::{ApiFormat, AppliedDecision, Envelope, Status, TokenSource, UsageEvent};

use crate::count;
use crate::decisions::Ticket;
use crate::metrics;
use crate::provider::Usage;
use crate::publish::Publisher;

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Everything known about a request once its target is chosen; finished into one event.
pub struct RequestRecord {
    pub publisher: Publisher,
    pub event_id: String,
    pub started: Instant,
    pub started_at_us: i64,
    pub envelope: Envelope,
    pub api_key_id: Option<String>,
    pub api_format: ApiFormat,
    pub virtual_model: String,
    pub provider: String,
    pub model: String,
    pub attempt: i32,
    pub fallback_path: Vec<String>,
    pub streamed: bool,
    /// `None` for a request refused before any target was chosen.
    pub reference_input_tokens: Option<i64>,
    pub input_chars: i64,
    pub price: Option<ModelPrice>,
    pub price_card_version: String,
    /// The breach decision that shaped the request, if any.
    pub decision: Option<AppliedDecision>,
    /// What the request added to `Watch` counts, settled with its real usage here.
    pub ticket: Option<Arc<Ticket>>,
}

/// How the request ended.
pub struct Outcome {
    pub status: Status,
    pub http_status: u16,
    pub error: Option<String>,
    /// The provider's report; `None` when it never sent one.
    pub usage: Option<Usage>,
    /// Whether `usage` is final (a clean end) rather than partial (a cut stream).
    pub usage_complete: bool,
    /// Output text seen, for estimating what the provider did not report.
    pub output_text: String,
    pub model_version: Option<String>,
    pub first_token_at_us: Option<i64>,
}

impl RequestRecord {
    /// Builds the event (estimating what the provider did not report) and queues it.
    pub fn finish(self, o: Outcome) {
        let ok = (200..300).contains(&o.http_status);
        let (usage, source) = match o.usage {
            Some(u) if o.usage_complete => (u, TokenSource::Provider),
            partial if ok => {
                // Provider truth where we have it (Anthropic reports input at the start), tiktoken
                // for the rest: the output already passed to the client.
                let estimated_out = count::count_text(count::encoding_for(&self.model), &o.output_text);
                let mut u =
                    partial.unwrap_or(Usage { input: self.reference_input_tokens.unwrap_or(0), ..Usage::default() });
                u.output = u.output.max(estimated_out);
                (u, TokenSource::Estimated)
            }
            // The provider refused or failed before generating: nothing was consumed.
            _ => (Usage::default(), TokenSource::Estimated),
        };
        let cost_nanos = self.price.as_ref().map_or(0, |p| p.cost_nanos(usage.billable()));
        let ticket = self.ticket;
        metrics::usage(&self.virtual_model, &self.provider, usage.input, usage.output, usage.cached_read, cost_nanos);
        let event = UsageEvent {
            event_id: self.event_id,
            started_at_us: self.started_at_us,
            first_token_at_us: o.first_token_at_us,
            ended_at_us: self.started_at_us + i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX / 2),
            envelope: self.envelope,
            api_key_id: self.api_key_id,
            api_format: self.api_format,
            virtual_model: self.virtual_model,
            provider: self.provider,
            model: self.model,
            model_version: o.model_version,
            attempt: self.attempt,
            fallback_path: self.fallback_path,
            status: o.status,
            http_status: i32::from(o.http_status),
            error: o.error,
            streamed: self.streamed,
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_input_tokens: usage.cached_read,
            cache_write_tokens: usage.cache_write,
            reasoning_tokens: usage.reasoning,
            reference_input_tokens: self.reference_input_tokens,
            input_chars: self.input_chars,
            token_source: source,
            cost_nanos,
            price_card_version: self.price_card_version,
            decision: self.decision,
        };
        if let Some(t) = &ticket {
            // The same tokens the enforcer counts for this event (`UsageEvent::total_tokens`).
            t.settle(event.total_tokens(), event.cost_nanos);
        }
        self.publisher.publish(event);
    }
}
