//! The request path of `POST /v1/chat/completions`: envelope, routing, provider call, metering.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tollgate_schemas::policy::{ProviderConfig, ProviderKind, Target};
use tollgate_schemas::usage::{ApiFormat, Status};
use tracing::{debug, warn};

use crate::error::IngressError;
use crate::provider::{StreamAccounting, anthropic, openai};
use crate::record::{Outcome, RequestRecord, now_us};
use crate::{App, count, envelope, metrics, route};

const ENDPOINT_CHAT: &str = "chat_completions";
/// Largest non-streaming provider response read into memory.
const MAX_PROVIDER_BODY: usize = 32 << 20;

pub async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let mut vm_label = String::from("-");
    let resp = match chat(&app, &headers, body, started, &mut vm_label).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "request refused");
            e.into_response()
        }
    };
    metrics::request(ENDPOINT_CHAT, &vm_label, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

async fn chat(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    vm_label: &mut String,
) -> Result<Response, IngressError> {
    let started_at_us = now_us();
    let bytes = axum::body::to_bytes(body, app.max_body_bytes)
        .await
        .map_err(|_| IngressError::BodyTooLarge { limit: app.max_body_bytes })?;
    let req: Value = serde_json::from_slice(&bytes).map_err(|e| IngressError::MalformedJson(e.to_string()))?;
    if !req.is_object() {
        return Err(IngressError::InvalidRequest("request body must be a JSON object".into()));
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| IngressError::InvalidRequest("`model` is required".into()))?;
    if !req.get("messages").is_some_and(Value::is_array) {
        return Err(IngressError::InvalidRequest("`messages` must be an array".into()));
    }
    let envelope = envelope::extract(headers, &app.policy.envelope)?;
    let vm = app.policy.virtual_models.get(model).ok_or_else(|| IngressError::UnknownModel(model.to_owned()))?;
    vm_label.clone_from(&vm.name);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = req.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let plan = route::plan(vm, &mut rand::rng());
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut tried: Vec<String> = Vec::new();
    let mut last_err = None;

    for (i, attempt) in plan.iter().enumerate() {
        let target = attempt.target;
        let Some(provider) = app.policy.providers.get(&target.provider) else {
            // Policy validation guarantees this; keep going rather than fail the request.
            continue;
        };
        if i > 0 {
            metrics::fallback(&vm.name);
        }
        let (reference_input_tokens, input_chars) = count::estimate_input(&target.model, &req);
        let record = RequestRecord {
            publisher: app.publisher.clone(),
            event_id: event_id.clone(),
            started,
            started_at_us,
            envelope: envelope.clone(),
            api_key_id: None,
            api_format: ApiFormat::OpenAi,
            virtual_model: vm.name.clone(),
            provider: target.provider.clone(),
            model: target.model.clone(),
            attempt: i32::try_from(i + 1).unwrap_or(i32::MAX),
            fallback_path: tried.clone(),
            streamed: stream,
            reference_input_tokens,
            input_chars,
            price: app.policy.price(target).cloned(),
            price_card_version: app.policy.price_card.as_ref().map(|c| c.version.clone()).unwrap_or_default(),
        };
        let first_byte = attempt.timeout_ms.map_or(app.first_byte_timeout, Duration::from_millis);
        let more = i + 1 < plan.len();
        match call(app, provider, target, &req, stream, first_byte).await {
            Ok(resp) => {
                let result = if stream {
                    Ok(stream_response(resp, provider.kind, client_wants_usage, record))
                } else {
                    complete_response(resp, provider.kind, record).await
                };
                match result {
                    Ok(r) => return Ok(r),
                    Err((e, record)) => {
                        warn!(provider = %target.provider, model = %target.model, error = %e, "provider answer unusable");
                        if !more {
                            fail(record, &e);
                            return Err(e);
                        }
                        last_err = Some(e);
                    }
                }
            }
            Err(e) => {
                warn!(provider = %target.provider, model = %target.model, error = %e, "provider call failed");
                if !(e.retryable() && more) {
                    fail(record, &e);
                    return Err(e);
                }
                last_err = Some(e);
            }
        }
        tried.push(target.to_string());
    }
    Err(last_err.unwrap_or_else(|| IngressError::Internal(format!("virtual model {} has no usable target", vm.name))))
}

/// Records a request that reached a provider and failed there.
fn fail(record: RequestRecord, e: &IngressError) {
    let status = match e {
        IngressError::ProviderTimeout { .. } => Status::Timeout,
        _ => Status::ProviderError,
    };
    record.finish(Outcome {
        status,
        http_status: e.status_code().as_u16(),
        error: Some(e.to_string()),
        usage: None,
        usage_complete: false,
        output_text: String::new(),
        model_version: None,
        first_token_at_us: None,
    });
}

/// Sends the request to one target; a non-2xx answer becomes `ProviderStatus`.
async fn call(
    app: &App,
    provider: &ProviderConfig,
    target: &Target,
    req: &Value,
    stream: bool,
    first_byte: Duration,
) -> Result<reqwest::Response, IngressError> {
    let base = provider.base_url.trim_end_matches('/');
    let credential = app.credentials.get(&provider.name).and_then(Option::as_ref);
    let builder = match provider.kind {
        ProviderKind::Openai => {
            let b = app.http.post(format!("{base}/chat/completions")).json(&openai::upstream_body(
                req,
                &target.model,
                stream,
            ));
            match credential {
                Some(c) => b.header(header::AUTHORIZATION, c.clone()),
                None => b,
            }
        }
        ProviderKind::Anthropic => {
            let body = anthropic::from_openai_request(req, &target.model, stream)?;
            let b = app
                .http
                .post(format!("{base}/messages"))
                .header("anthropic-version", anthropic::API_VERSION)
                .json(&body);
            match credential {
                Some(c) => b.header("x-api-key", c.clone()),
                None => b,
            }
        }
    };
    let provider_name = || provider.name.clone();
    let resp = tokio::time::timeout(first_byte, builder.send())
        .await
        .map_err(|_| IngressError::ProviderTimeout {
            provider: provider_name(),
            ms: u64::try_from(first_byte.as_millis()).unwrap_or(u64::MAX),
        })?
        .map_err(|e| IngressError::ProviderFailed { provider: provider_name(), message: error_chain(&e) })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = read_limited(resp, 1 << 20).await.unwrap_or_default();
    Err(IngressError::ProviderStatus { provider: provider_name(), status, body, content_type })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        if out.len() + chunk.len() > limit {
            return Err(format!("provider response is larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// Reads a whole non-streaming answer, meters it, and gives the client OpenAI's format.
async fn complete_response(
    resp: reqwest::Response,
    kind: ProviderKind,
    record: RequestRecord,
) -> Result<Response, (IngressError, RequestRecord)> {
    let provider = record.provider.clone();
    let bad = |message: String| IngressError::ProviderFailed { provider: provider.clone(), message };
    let bytes = match read_limited(resp, MAX_PROVIDER_BODY).await {
        Ok(b) => b,
        Err(m) => return Err((bad(m), record)),
    };
    let parsed: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err((bad("provider sent a response that is not a JSON object".into()), record)),
    };
    let (usage, text, model_version, body) = match kind {
        ProviderKind::Openai => {
            let text = openai::response_text(&parsed);
            let mv = parsed.get("model").and_then(Value::as_str).map(str::to_owned);
            (openai::usage(&parsed), text, mv, bytes)
        }
        ProviderKind::Anthropic => {
            let usage = parsed.get("usage").and_then(anthropic::usage);
            let text = anthropic::response_text(&parsed);
            let mv = parsed.get("model").and_then(Value::as_str).map(str::to_owned);
            let translated = anthropic::to_openai_response(&parsed, record.started_at_us / 1_000_000);
            (usage, text, mv, Bytes::from(translated.to_string()))
        }
    };
    record.finish(Outcome {
        status: Status::Ok,
        http_status: 200,
        error: None,
        usage_complete: usage.is_some(),
        usage,
        output_text: text,
        model_version,
        first_token_at_us: None,
    });
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}

type UpstreamEvents = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

enum Conversion {
    OpenAi { client_wants_usage: bool },
    AnthropicToOpenAi(anthropic::ToOpenAiStream),
}

fn stream_response(
    resp: reqwest::Response,
    kind: ProviderKind,
    client_wants_usage: bool,
    record: RequestRecord,
) -> Response {
    let conversion = match kind {
        ProviderKind::Openai => Conversion::OpenAi { client_wants_usage },
        ProviderKind::Anthropic => Conversion::AnthropicToOpenAi(anthropic::ToOpenAiStream {
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

impl MeteredStream {
    fn on_event(&mut self, ev: Event) {
        let had_text = !self.acct.text.is_empty();
        match &mut self.conversion {
            Conversion::OpenAi { client_wants_usage } => {
                if ev.data.trim() == "[DONE]" {
                    self.acct.finished = true;
                    self.pending.push_back(sse_data("[DONE]"));
                } else {
                    match serde_json::from_str::<Value>(&ev.data) {
                        Ok(chunk) if chunk.get("error").is_some() => {
                            self.pending.push_back(sse_data(&ev.data));
                            self.fail_stream(format!("provider sent an error event: {}", chunk["error"]));
                        }
                        Ok(chunk) => {
                            if openai::passthrough_chunk(&chunk, &mut self.acct, *client_wants_usage) {
                                self.pending.push_back(sse_data(&ev.data));
                            }
                        }
                        Err(_) => self.fail_stream("provider sent a stream event that is not JSON".into()),
                    }
                }
            }
            Conversion::AnthropicToOpenAi(conv) => match serde_json::from_str::<Value>(&ev.data) {
                Ok(data) if data.get("type").and_then(Value::as_str) == Some("error") => {
                    self.fail_stream(format!("provider sent an error event: {}", data["error"]));
                }
                Ok(data) => {
                    let mut out = Vec::new();
                    conv.on_event(&ev.event, &data, &mut self.acct, &mut out);
                    for chunk in out {
                        self.pending.push_back(sse_data(&chunk.to_string()));
                    }
                    if self.acct.finished {
                        self.pending.push_back(sse_data("[DONE]"));
                    }
                }
                Err(_) => self.fail_stream("provider sent a stream event that is not JSON".into()),
            },
        }
        if !had_text && !self.acct.text.is_empty() {
            self.first_token_at_us = Some(now_us());
        }
    }

    /// Ends the stream with an OpenAI-style error event the SDKs raise on.
    fn fail_stream(&mut self, message: String) {
        let body = json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}});
        self.pending.push_back(sse_data(&body.to_string()));
        self.error = Some(message);
        self.ended = true;
    }

    fn publish(&mut self, status: Status) {
        let Some(record) = self.record.take() else { return };
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
        });
    }
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if self.ended || self.acct.finished {
                self.publish(Status::ProviderError);
                return Poll::Ready(None);
            }
            match self.upstream.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(ev))) => self.on_event(ev),
                Poll::Ready(Some(Err(e))) => {
                    let msg = match &e {
                        EventStreamError::Transport(t) => format!("provider stream failed: {}", error_chain(t)),
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

/// `GET /v1/models`: the virtual models this gateway serves, in OpenAI's list format.
pub async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = app
        .policy
        .virtual_models
        .keys()
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
