//! The metered stream: a provider's SSE stream passed to the client (as is, or translated to the
//! client's wire format) while its usage is counted, cut when a `cut_streams` breach fires, and
//! recorded once when it ends however it ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tollgate_runtime::error_chain;
use tollgate_schemas::decision::RuleKind;
use tollgate_schemas::policy::ProviderKind;
use tollgate_schemas::usage::{ApiFormat, AppliedDecision, Status};

use super::Endpoint;
use crate::clock::now_us;
use crate::decisions::StreamCut;
use crate::error::IngressError;
use crate::gate::{self, Blocked};
use crate::metrics;
use crate::provider::{StreamAccounting, anthropic, openai};
use crate::record::{Outcome, RequestRecord};

/// A streamed body frame is sent once it holds this much, even if more events are ready.
const COALESCE_BYTES: usize = 64 << 10;

type UpstreamEvents = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

enum Conversion {
    OpenAi { client_wants_usage: bool },
    AnthropicToOpenAi(anthropic::ToOpenAiStream),
    Anthropic,
    OpenAiToAnthropic(openai::ToAnthropicStream),
}

impl Conversion {
    fn client_format(&self) -> ApiFormat {
        match self {
            Conversion::OpenAi { .. } | Conversion::AnthropicToOpenAi(_) => ApiFormat::OpenAi,
            Conversion::Anthropic | Conversion::OpenAiToAnthropic(_) => ApiFormat::Anthropic,
        }
    }
}

pub(super) fn stream_response(
    endpoint: Endpoint,
    resp: reqwest::Response,
    kind: ProviderKind,
    client_wants_usage: bool,
    record: RequestRecord,
    cuts: Vec<StreamCut>,
) -> Response {
    let conversion = match (endpoint, kind) {
        (Endpoint::Messages, ProviderKind::Anthropic) => Conversion::Anthropic,
        (Endpoint::Messages, ProviderKind::Openai) => {
            Conversion::OpenAiToAnthropic(openai::ToAnthropicStream::new(format!("msg_{}", record.event_id)))
        }
        (_, ProviderKind::Openai) => Conversion::OpenAi { client_wants_usage },
        (_, ProviderKind::Anthropic) => Conversion::AnthropicToOpenAi(anthropic::ToOpenAiStream {
            id: format!("chatcmpl-{}", record.event_id),
            created: record.started_at_us / 1_000_000,
            client_wants_usage,
        }),
    };
    let metered = MeteredStream {
        upstream: Box::pin(resp.bytes_stream().eventsource()),
        conversion,
        acct: StreamAccounting::default(),
        pending: VecDeque::new(),
        record: Some(record),
        first_token_at_us: None,
        error: None,
        ended: false,
        timed_out: false,
        cuts,
        cut_by: None,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(metered))
        .unwrap_or_else(|e| IngressError::Internal(e.to_string()).into_response())
}

/// Passes a provider's SSE stream to the client in OpenAI's format while metering it. The usage
/// event is published when the stream ends — cleanly, by a provider failure, or by the client
/// going away (the body is dropped).
struct MeteredStream {
    upstream: UpstreamEvents,
    conversion: Conversion,
    acct: StreamAccounting,
    pending: VecDeque<Bytes>,
    record: Option<RequestRecord>,
    first_token_at_us: Option<i64>,
    error: Option<String>,
    ended: bool,
    /// The provider went silent past the idle timeout (recorded as `timeout`, not `provider_error`).
    timed_out: bool,
    /// Registrations under `cut_streams` rules: any of them firing ends the stream.
    cuts: Vec<StreamCut>,
    /// The decision that cut the stream, recorded on its usage event.
    cut_by: Option<AppliedDecision>,
}

fn sse_data(data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 8);
    for line in data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

/// An SSE frame with an event name, as Anthropic's API sends them.
fn sse_event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

impl MeteredStream {
    fn on_event(&mut self, ev: Event) {
        let had_text = !self.acct.text.is_empty();
        let done_marker = ev.data.trim() == "[DONE]";
        if let (Conversion::OpenAi { client_wants_usage }, false) = (&self.conversion, done_marker) {
            if let Some(forward) = openai::passthrough_event(&ev.data, &mut self.acct, *client_wants_usage) {
                if forward {
                    self.pending.push_back(sse_data(&ev.data));
                }
                if !had_text && !self.acct.text.is_empty() {
                    self.first_token_at_us = Some(now_us());
                }
                return;
            }
        }
        let parsed = if done_marker {
            None
        } else {
            match serde_json::from_str::<Value>(&ev.data) {
                Ok(v) => Some(v),
                Err(_) => return self.fail_stream("provider sent a stream event that is not JSON".into()),
            }
        };
        if let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) {
            return self.fail_stream(format!("provider sent an error event: {err}"));
        }
        match (&mut self.conversion, parsed) {
            (Conversion::OpenAi { .. }, None) => {
                self.acct.finished = true;
                self.pending.push_back(sse_data("[DONE]"));
            }
            (Conversion::OpenAi { client_wants_usage }, Some(chunk)) => {
                if openai::passthrough_chunk(&chunk, &mut self.acct, *client_wants_usage) {
                    self.pending.push_back(sse_data(&ev.data));
                }
            }
            (Conversion::AnthropicToOpenAi(conv), Some(data)) => {
                let mut out = Vec::new();
                conv.on_event(&ev.event, &data, &mut self.acct, &mut out);
                self.pending.extend(out.iter().map(|chunk| sse_data(&chunk.to_string())));
                if self.acct.finished {
                    self.pending.push_back(sse_data("[DONE]"));
                }
            }
            (Conversion::Anthropic, Some(data)) => {
                let name = anthropic::observe_event(&ev.event, &data, &mut self.acct);
                self.pending.push_back(sse_event(name, &ev.data));
            }
            (Conversion::OpenAiToAnthropic(conv), chunk) => {
                let mut out: Vec<(&str, Value)> = Vec::new();
                conv.on_chunk(chunk.as_ref(), &mut self.acct, &mut out);
                self.pending.extend(out.iter().map(|(name, data)| sse_event(name, &data.to_string())));
            }
            // `[DONE]` is OpenAI's; an Anthropic stream has no use for it.
            (Conversion::AnthropicToOpenAi(_) | Conversion::Anthropic, None) => {}
        }
        if !had_text && !self.acct.text.is_empty() {
            self.first_token_at_us = Some(now_us());
        }
    }

    /// Ends the stream with an error event in the client's format, which the SDKs raise on.
    fn fail_stream(&mut self, message: String) {
        let frame = match self.conversion.client_format() {
            ApiFormat::OpenAi => sse_data(
                &json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}})
                    .to_string(),
            ),
            ApiFormat::Anthropic => sse_event(
                "error",
                &json!({"type": "error", "error": {"type": "api_error", "message": message}}).to_string(),
            ),
        };
        self.pending.push_back(frame);
        self.error = Some(message);
        self.ended = true;
    }

    /// Ends the stream because its scope breached a `cut_streams` rule: an error event in the
    /// client's format naming the rule, then the end. Usage so far is estimated and recorded
    /// once, as `client_abort` with the decision `cut_stream`.
    fn cut_stream(&mut self, i: usize) {
        let Some(cut) = self.cuts.get(i) else { return };
        let entry = cut.entry();
        let blocked = Blocked {
            rule_id: cut.rule_id.clone(),
            rule_kind: entry.as_ref().map_or(RuleKind::Budget, |e| e.decision.rule_kind),
            scope: cut.scope.clone(),
            measure: entry.as_ref().map_or(tollgate_schemas::decision::Measure::CostNanos, |e| e.decision.measure),
            limit: entry.as_ref().map_or(0, |e| e.decision.limit),
            observed: entry.as_ref().map_or(0, |e| e.observed()),
            action: "cut_stream".into(),
            retry_after_secs: gate::retry_after_secs(entry.as_ref().map_or(0, |e| e.decision.window_end_us), now_us()),
            local: entry.as_ref().is_some_and(|e| e.locally_breached()),
            waited_ms: None,
            queue_full: false,
        };
        let applied = AppliedDecision {
            rule_id: cut.rule_id.clone(),
            scope: cut.scope.clone(),
            action: "cut_stream".into(),
            version: entry.as_ref().map_or(0, |e| e.decision.version),
        };
        metrics::breach_action(&applied.rule_id, "cut_stream");
        let message = format!("{}; the gateway ended this stream", blocked.message());
        let format = self.conversion.client_format();
        let mut body = IngressError::Blocked(Box::new(blocked)).body_for(format);
        body["error"]["message"] = Value::String(message.clone());
        let frame = match format {
            ApiFormat::OpenAi => sse_data(&body.to_string()),
            ApiFormat::Anthropic => sse_event("error", &body.to_string()),
        };
        self.pending.push_back(frame);
        self.error = Some(message);
        self.cut_by = Some(applied);
        self.ended = true;
    }

    fn publish(&mut self, status: Status) {
        let Some(mut record) = self.record.take() else { return };
        if let Some(d) = self.cut_by.take() {
            record.decision = Some(d);
        }
        let complete = self.acct.finished && self.error.is_none();
        let status = if complete { Status::Ok } else { status };
        record.finish(Outcome {
            status,
            http_status: 200,
            error: self.error.take(),
            usage: self.acct.usage,
            usage_complete: complete && self.acct.usage.is_some(),
            output_text: std::mem::take(&mut self.acct.text),
            model_version: self.acct.model_version.take(),
            first_token_at_us: self.first_token_at_us,
            may_be_billed: true,
        });
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Events the provider has already sent go out together: one body frame (one write to
        // the client) per wake-up rather than one per event, without waiting for anything.
        let mut out: Option<BytesMut> = None;
        loop {
            while let Some(b) = self.pending.pop_front() {
                match &mut out {
                    Some(o) => o.extend_from_slice(&b),
                    None => out = Some(BytesMut::from(b)),
                }
            }
            if out.as_ref().is_some_and(|o| o.len() >= COALESCE_BYTES) {
                return Poll::Ready(out.map(|o| Ok(o.freeze())));
            }
            if self.ended || self.acct.finished {
                if let Some(o) = out {
                    return Poll::Ready(Some(Ok(o.freeze())));
                }
                let status = if self.cut_by.is_some() {
                    // Ended early on the client's side of the gateway, by the gateway: counted
                    // like a client abort (partial, estimated, billed). Not `rejected`, which
                    // means nothing was consumed (the enforcer skips those); `decision.action`
                    // = `cut_stream` tells the two kinds of abort apart.
                    Status::ClientAbort
                } else if self.timed_out {
                    Status::Timeout
                } else {
                    Status::ProviderError
                };
                self.publish(status);
                return Poll::Ready(None);
            }
            if let Some(i) = self.cuts.iter_mut().position(|c| c.poll_cut(cx)) {
                self.cut_stream(i);
                continue;
            }
            match self.upstream.poll_next_unpin(cx) {
                Poll::Pending => return out.map_or(Poll::Pending, |o| Poll::Ready(Some(Ok(o.freeze())))),
                Poll::Ready(Some(Ok(ev))) => self.on_event(ev),
                Poll::Ready(Some(Err(e))) => {
                    let msg = match &e {
                        EventStreamError::Transport(t) => {
                            self.timed_out = t.is_timeout();
                            format!("provider stream failed: {}", error_chain(t))
                        }
                        other => format!("provider stream is malformed: {other}"),
                    };
                    self.fail_stream(msg);
                }
                Poll::Ready(None) => self.fail_stream("provider closed the stream before its end".into()),
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // Still holding the record: the client went away before the stream ended.
        if self.record.is_some() {
            if self.error.is_none() {
                self.error = Some("client closed the connection".into());
            }
            self.publish(Status::ClientAbort);
        }
    }
}
