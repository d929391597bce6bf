//! Turns what one request did into its usage event: tokens, estimates, price, and publishing.

use std::sync::Arc;
use std::time::Instant;

use tollgate_schemas::price::ModelPrice;
use tollgate_schemas::usage::{ApiFormat, AppliedDecision, Envelope, Status, TokenSource, UsageEvent};

use crate::count::{self, Count, InputEstimate, Reference};
use crate::decisions::Ticket;
use crate::intake::Hold;
use crate::metrics;
use crate::provider::Usage;
use crate::publish::Publisher;
use crate::trace::RequestTrace;

/// Everything known about an upstream attempt once its target is chosen; finished into one event.
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
    /// The prompt's input as the request path knows it; `None` for a request refused before
    /// any target was chosen.
    pub input: Option<InputEstimate>,
    pub price: Option<ModelPrice>,
    pub price_card_version: String,
    /// The breach decision that shaped the request, if any.
    pub decision: Option<AppliedDecision>,
    /// What the request added to `Watch` counts, settled with its real usage here.
    pub ticket: Option<Arc<Ticket>>,
    /// The attempt's intake record, completed when its event is spooled.
    pub intake: Option<Hold>,
    /// The request's trace: its id goes on the event, and the attempt becomes a span.
    pub trace: RequestTrace,
    /// The GenAI operation (`chat`, `embeddings`), for the spans.
    pub operation: &'static str,
    /// When this attempt began (µs since the epoch); the request's start is `started_at_us`.
    pub attempt_started_at_us: i64,
    /// The provider's wire format (`openai`, `anthropic`): `gen_ai.provider.name`.
    pub provider_kind: &'static str,
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
    /// A failed attempt the provider may have billed (it timed out, or its answer was lost):
    /// its input is estimated instead of zero.
    pub may_be_billed: bool,
}

impl Outcome {
    /// An attempt that failed with `status`, nothing reported.
    pub fn failed(status: Status, http_status: u16, error: String, may_be_billed: bool) -> Outcome {
        Outcome {
            status,
            http_status,
            error: Some(error),
            usage: None,
            usage_complete: false,
            output_text: String::new(),
            model_version: None,
            first_token_at_us: None,
            may_be_billed,
        }
    }
}

impl RequestRecord {
    /// Writes the attempt's interrupted event to the intake journal, before its upstream call.
    pub fn journal_intake(&mut self) {
        let interrupted = Outcome::failed(
            Status::Interrupted,
            0,
            "the ingress stopped before this attempt ended; input estimated, output unknown".into(),
            true,
        );
        let event = self.event(&interrupted, self.started_at_us, self.input.as_ref().map(InputEstimate::best_now));
        self.intake = self.publisher.begin(&event);
    }

    /// Builds the event (estimating what the provider did not report) and queues it. When the
    /// prompt's reference count is still running (a long prompt), the event waits for it off
    /// the caller's path.
    pub fn finish(self, o: Outcome) {
        let ended_at_us =
            self.started_at_us + i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX / 2);
        let pending = match self.input.as_ref().map(|i| &i.reference) {
            Some(r @ Reference::Deferred(f)) if r.now().is_none() => Some(f.clone()),
            _ => None,
        };
        match (pending, tokio::runtime::Handle::try_current()) {
            (Some(counting), Ok(rt)) => {
                rt.spawn(async move {
                    let reference = counting.await;
                    self.publish(&o, ended_at_us, Some(reference));
                });
            }
            _ => {
                let reference = self.input.as_ref().map(InputEstimate::best_now);
                self.publish(&o, ended_at_us, reference);
            }
        }
    }

    fn publish(mut self, o: &Outcome, ended_at_us: i64, reference: Option<Count>) {
        let event = self.event(o, ended_at_us, reference);
        metrics::usage(
            &self.virtual_model,
            &self.provider,
            event.input_tokens,
            event.output_tokens,
            event.cached_input_tokens,
            event.cost_nanos,
        );
        if let Some(t) = &self.ticket {
            // The same tokens the enforcer counts for this event (`UsageEvent::total_tokens`).
            t.settle(event.ended_at_us, event.total_tokens(), event.cost_nanos);
        }
        self.trace.record(&event, self.operation, self.attempt_started_at_us, self.provider_kind);
        self.publisher.publish(event, self.intake.take());
    }

    /// The attempt's usage event for outcome `o`, with `reference` as its reference input count.
    fn event(&self, o: &Outcome, ended_at_us: i64, reference: Option<Count>) -> UsageEvent {
        let ok = (200..300).contains(&o.http_status);
        let estimated_input = Usage { input: reference.map_or(0, |r| r.tokens), ..Usage::default() };
        let (usage, source) = match o.usage {
            Some(u) if o.usage_complete => (u, TokenSource::Provider),
            partial if ok => {
                // Provider truth where we have it (Anthropic reports input at the start), tiktoken
                // for the rest: the output already passed to the client.
                let estimated_out = count::count_text(count::encoding_for(&self.model), &o.output_text);
                let mut u = partial.unwrap_or(estimated_input);
                u.output = u.output.max(estimated_out);
                (u, TokenSource::Estimated)
            }
            // The provider may have read the prompt (a timeout, a lost answer): its input is
            // estimated; what it wrote is unknown.
            _ if o.may_be_billed => (estimated_input, TokenSource::Estimated),
            // The provider refused or failed before generating: nothing was consumed.
            _ => (Usage::default(), TokenSource::Estimated),
        };
        let cost_nanos = self.price.as_ref().map_or(0, |p| p.cost_nanos(usage.billable()));
        UsageEvent {
            event_id: self.event_id.clone(),
            started_at_us: self.started_at_us,
            first_token_at_us: o.first_token_at_us,
            ended_at_us,
            envelope: self.envelope.clone(),
            api_key_id: self.api_key_id.clone(),
            api_format: self.api_format,
            virtual_model: self.virtual_model.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            model_version: o.model_version.clone(),
            attempt: self.attempt,
            fallback_path: self.fallback_path.clone(),
            status: o.status,
            http_status: i32::from(o.http_status),
            error: o.error.clone(),
            streamed: self.streamed,
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_input_tokens: usage.cached_read,
            cache_write_tokens: usage.cache_write,
            reasoning_tokens: usage.reasoning,
            reference_input_tokens: reference.map(|r| r.tokens),
            input_chars: reference.map_or(0, |r| r.chars),
            token_source: source,
            cost_nanos,
            price_card_version: self.price_card_version.clone(),
            decision: self.decision.clone(),
            trace_id: self.trace.trace_id(),
        }
    }
}
