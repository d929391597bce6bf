//! The request path of the three model endpoints: key, envelope, routing, provider call, metering.
//!
//! `POST /v1/chat/completions` (OpenAI format), `POST /v1/messages` (Anthropic format) and
//! `POST /v1/embeddings` share one path; a request is translated when its target speaks the
//! other wire format, streams included, because fallbacks cross providers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tollgate_runtime::error_chain;
use tollgate_schemas::decision::RuleKind;
use tollgate_schemas::policy::{ApiKey, Policy, ProviderConfig, ProviderKind, Target, VirtualModel};
use tollgate_schemas::usage::{ApiFormat, AppliedDecision, Envelope, Status};
use tracing::{debug, warn};

use crate::breach::{self, Blocked, Reroute};
use crate::breaker::Admit;
use crate::clock::now_us;
use crate::count::InputEstimate;
use crate::decisions::StreamCut;
use crate::error::IngressError;
use crate::provider::{StreamAccounting, UpstreamBody, anthropic, openai};
use crate::record::{Outcome, RequestRecord};
use crate::route::Attempt;
use crate::{App, Live, auth, count, envelope, metrics, route};

/// Largest non-streaming provider response read into memory.
const MAX_PROVIDER_BODY: usize = 32 << 20;
/// A streamed body frame is sent once it holds this much, even if more events are ready.
const COALESCE_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Messages,
    Embeddings,
}

impl Endpoint {
    fn format(self) -> ApiFormat {
        match self {
            Endpoint::Chat | Endpoint::Embeddings => ApiFormat::OpenAi,
            Endpoint::Messages => ApiFormat::Anthropic,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

pub async fn chat_completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(Endpoint::Chat, &app, &headers, body).await
}

pub async fn messages(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(Endpoint::Messages, &app, &headers, body).await
}

pub async fn embeddings(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(Endpoint::Embeddings, &app, &headers, body).await
}

/// Serves one request on a task of its own, so that a client going away from a non-streaming
/// call does not cancel the upstream call: its answer is still read (bounded by the upstream
/// idle timeout and `MAX_PROVIDER_BODY`) and recorded. Until the first upstream call the
/// request stops as soon as its client is gone (`gone`), so nobody pays for an answer no one
/// waits for.
async fn handle(endpoint: Endpoint, app: &Arc<App>, headers: &HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let gone = CancellationToken::new();
    let _cancel_when_dropped = gone.clone().drop_guard();
    let (app, headers) = (Arc::clone(app), headers.clone());
    let served = tokio::spawn(async move {
        let mut vm_label = String::from("-");
        let result = serve(endpoint, &app, &headers, body, started, &mut vm_label, &gone).await;
        (result, vm_label)
    });
    let (resp, vm_label) = match served.await {
        Ok((Ok(r), vm_label)) => (r, vm_label),
        Ok((Err(e), vm_label)) => {
            debug!(error = %e, "request refused");
            (e.into_response_for(endpoint.format()), vm_label)
        }
        Err(e) => (IngressError::Internal(format!("request task failed: {e}")).into_response(), "-".into()),
    };
    metrics::request(endpoint.label(), &vm_label, resp.status().as_u16(), started.elapsed().as_secs_f64());
    resp
}

/// The client closed its connection before the request reached a provider (nobody reads this).
fn client_gone() -> IngressError {
    IngressError::Internal("the client closed the connection".into())
}

/// The input estimates of one request body, one per tokenizer, each made at most once: for the
/// gate (when a Watch needs it) and for the usage events of the targets that share it.
struct Estimates {
    body: Arc<Value>,
    by_encoding: Vec<(usize, InputEstimate)>,
}

impl Estimates {
    fn for_model(&mut self, model: &str) -> &InputEstimate {
        let key = std::ptr::from_ref(count::encoding_for(model)) as usize;
        let i = match self.by_encoding.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.by_encoding.push((key, count::estimate_input_bounded(model, &self.body)));
                self.by_encoding.len() - 1
            }
        };
        &self.by_encoding[i].1
    }
}

/// Checks the parts of the body every endpoint needs; returns the model name.
fn validate(endpoint: Endpoint, req: &Value) -> Result<&str, IngressError> {
    if !req.is_object() {
        return Err(IngressError::InvalidRequest("request body must be a JSON object".into()));
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| IngressError::InvalidRequest("`model` is required".into()))?;
    match endpoint {
        Endpoint::Chat | Endpoint::Messages if !req.get("messages").is_some_and(Value::is_array) => {
            Err(IngressError::InvalidRequest("`messages` must be an array".into()))
        }
        Endpoint::Messages if !req.get("max_tokens").is_some_and(Value::is_u64) => {
            Err(IngressError::InvalidRequest("`max_tokens` is required".into()))
        }
        Endpoint::Embeddings if req.get("input").is_none() => {
            Err(IngressError::InvalidRequest("`input` is required".into()))
        }
        _ => Ok(model),
    }
}

/// What a model name resolves to: a virtual model, or a concrete target the key may name.
enum Resolved<'p> {
    Virtual(&'p VirtualModel),
    Direct(Target),
}

fn resolve<'p>(policy: &'p Policy, key: Option<&ApiKey>, model: &str) -> Result<Resolved<'p>, IngressError> {
    if let Some(vm) = policy.virtual_models.get(model) {
        if key.is_some_and(|k| !k.may_use(model)) {
            return Err(IngressError::Forbidden(format!("this API key may not use the model `{model}`")));
        }
        return Ok(Resolved::Virtual(vm));
    }
    if let Some((provider, concrete)) = model.split_once('/') {
        let target = Target { provider: provider.to_owned(), model: concrete.to_owned() };
        let known = policy.providers.contains_key(provider)
            && (policy.price(&target).is_some()
                || policy.price_card.as_ref().is_some_and(|c| c.unpriced_ok.contains(&target.to_string())));
        if known {
            return match key {
                // An anonymous gateway has no key to name concrete models with.
                Some(k) if k.direct_models && k.may_use(model) => Ok(Resolved::Direct(target)),
                Some(k) if k.direct_models => {
                    Err(IngressError::Forbidden(format!("this API key may not use the model `{model}`")))
                }
                _ => Err(IngressError::Forbidden(format!(
                    "`{model}` is a concrete model; this API key may only use virtual models"
                ))),
            };
        }
    }
    Err(IngressError::UnknownModel(model.to_owned()))
}

async fn serve(
    endpoint: Endpoint,
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    vm_label: &mut String,
    gone: &CancellationToken,
) -> Result<Response, IngressError> {
    let started_at_us = now_us();
    let header_bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if header_bytes > app.max_header_bytes {
        return Err(IngressError::HeadersTooLarge { limit: app.max_header_bytes });
    }
    // One policy for the whole request, however many reloads happen meanwhile.
    let live = app.live();
    let policy = &*live.policy;
    let key = auth::authenticate(policy, headers)?;
    let bytes = axum::body::to_bytes(body, app.max_body_bytes)
        .await
        .map_err(|_| IngressError::BodyTooLarge { limit: app.max_body_bytes })?;
    let req: Arc<Value> =
        Arc::new(serde_json::from_slice(&bytes).map_err(|e| IngressError::MalformedJson(e.to_string()))?);
    let model = validate(endpoint, &req)?;
    let envelope = envelope::extract(headers, &policy.envelope, key)?;
    let resolved = resolve(policy, key, model)?;
    // Declared before the plan, which may borrow it.
    let rerouted_to: Target;
    let (mut vm, mut plan) = match &resolved {
        Resolved::Virtual(vm) => (Some(*vm), route::plan(vm, &mut rand::rng())),
        Resolved::Direct(t) => (None, vec![Attempt { target: t, timeout_ms: None }]),
    };
    vm_label.clone_from(&vm.map_or_else(|| model.to_owned(), |v| v.name.clone()));
    let stream = endpoint != Endpoint::Embeddings && req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_wants_usage = req.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let event_id = uuid::Uuid::now_v7().to_string();

    // Breach decisions: refuse, hold, reroute, or pass (counting into Watch headrooms).
    let first = plan.first().map(|a| a.target);
    let view = breach::RequestView { envelope: &envelope, api_key: key, vm, target: first, stream };
    let mut estimates = Estimates { body: Arc::clone(&req), by_encoding: Vec::new() };
    let mut estimate = || first.map_or(0, |t| estimates.for_model(&t.model).tokens);
    app.decisions.note_request();
    let gated = tokio::select! {
        biased;
        () = gone.cancelled() => return Err(client_gone()),
        gated = breach::gate(&app.decisions, policy, &view, &app.queue, &mut estimate) => gated,
    };
    let pass = match gated {
        Ok(pass) => pass,
        Err(refusal) => {
            let refused = Refused { endpoint, event_id, started, started_at_us, stream, vm_label: vm_label.as_str() };
            refused.record(app, policy, &envelope, key, refusal.applied, &refusal.blocked);
            return Err(IngressError::Blocked(Box::new(refusal.blocked)));
        }
    };
    match pass.reroute {
        Some(Reroute::Virtual(name)) => match policy.virtual_models.get(&name) {
            Some(v) => {
                vm = Some(v);
                plan = route::plan(v, &mut rand::rng());
            }
            None => {
                warn!(virtual_model = %name, "breach fallback names a virtual model the policy lacks; not rerouted")
            }
        },
        Some(Reroute::Concrete(t)) => {
            rerouted_to = t;
            plan = vec![Attempt { target: &rerouted_to, timeout_ms: None }];
        }
        None => {}
    }
    let mut cuts = pass.cuts;
    let mut tried: Vec<String> = Vec::new();
    let mut last_err = None;
    let mut retry_after = Duration::MAX;
    let retries = vm.and_then(|v| v.retries.as_ref());
    let breaker = vm.and_then(|v| v.circuit_breaker.as_ref());
    // Upstream calls made so far: each is its own usage event, the first under the request's
    // event id, the n-th under `<event id>#n`.
    let mut calls: i32 = 0;

    for (i, attempt) in plan.iter().enumerate() {
        let target = attempt.target;
        let target_name = target.to_string();
        let Some(provider) = policy.providers.get(&target.provider) else { continue };
        if endpoint == Endpoint::Embeddings && provider.kind == ProviderKind::Anthropic {
            last_err = Some(IngressError::InvalidRequest(format!("{target_name} has no embeddings API")));
            continue;
        }
        if let Some(cfg) = breaker {
            if let Admit::No { retry_after: wait } = app.breakers.admit(&target_name, cfg, Instant::now()) {
                debug!(target = %target_name, "circuit open; skipping target");
                retry_after = retry_after.min(wait);
                tried.push(target_name);
                continue;
            }
        }
        if !tried.is_empty() {
            metrics::fallback(vm_label);
        }
        let input = estimates.for_model(&target.model).clone();
        let first_byte = attempt.timeout_ms.map_or(app.first_byte_timeout, Duration::from_millis);
        let more_targets = i + 1 < plan.len();
        let tries = 1 + retries.map_or(0, |r| r.attempts);
        for try_no in 0..tries {
            if gone.is_cancelled() {
                return Err(client_gone());
            }
            calls = calls.saturating_add(1);
            let mut record = RequestRecord {
                publisher: app.publisher.clone(),
                event_id: if calls == 1 { event_id.clone() } else { format!("{event_id}#{calls}") },
                started,
                started_at_us,
                envelope: envelope.clone(),
                api_key_id: key.map(|k| k.id.clone()),
                api_format: endpoint.format(),
                virtual_model: vm_label.clone(),
                provider: target.provider.clone(),
                model: target.model.clone(),
                attempt: calls,
                fallback_path: tried.clone(),
                streamed: stream,
                input: Some(input.clone()),
                price: policy.price(target).cloned(),
                price_card_version: policy.price_card.as_ref().map(|c| c.version.clone()).unwrap_or_default(),
                decision: pass.applied.clone(),
                ticket: pass.ticket.clone(),
                intake: None,
            };
            record.journal_intake();
            let outcome = match call(endpoint, app, &live, provider, target, &req, &bytes, stream, first_byte).await {
                Ok(resp) if stream => {
                    let cuts = std::mem::take(&mut cuts);
                    Ok(stream_response(endpoint, resp, provider.kind, client_wants_usage, record, cuts))
                }
                Ok(resp) => complete_response(endpoint, resp, provider.kind, record).await,
                Err(e) => Err((e, record)),
            };
            let (e, record) = match outcome {
                Ok(r) => {
                    if let Some(cfg) = breaker {
                        app.breakers.record(&target_name, cfg, true, Instant::now());
                    }
                    return Ok(r);
                }
                Err(failure) => failure,
            };
            warn!(provider = %target.provider, model = %target.model, error = %e, "provider call failed");
            let moves_on = match &e {
                IngressError::ProviderStatus { status, .. } => vm.is_some_and(|v| v.falls_back_on(*status)),
                other => other.retryable(),
            };
            if let Some(cfg) = breaker {
                app.breakers.record(&target_name, cfg, !moves_on, Instant::now());
            }
            let last_try = try_no + 1 == tries;
            // Every attempt is a row: one that failed before a fallback or a retry too.
            fail(record, &e);
            if !moves_on || (last_try && !more_targets) {
                return Err(e);
            }
            last_err = Some(e);
            if last_try {
                break;
            }
            let backoff = retries.map_or(0, |r| r.backoff_ms.saturating_mul(1 << try_no.min(16)));
            tokio::select! {
                () = gone.cancelled() => return Err(client_gone()),
                () = tokio::time::sleep(Duration::from_millis(backoff)) => {}
            }
        }
        tried.push(target_name);
    }
    if retry_after != Duration::MAX && last_err.is_none() {
        return Err(IngressError::Unavailable {
            model: vm_label.clone(),
            retry_after_secs: retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
        });
    }
    Err(last_err.unwrap_or_else(|| IngressError::Internal(format!("model {vm_label} has no usable target"))))
}

/// A request refused by a breach decision, for its usage event.
struct Refused<'a> {
    endpoint: Endpoint,
    event_id: String,
    started: Instant,
    started_at_us: i64,
    stream: bool,
    vm_label: &'a str,
}

impl Refused<'_> {
    /// One usage event: `rejected`, HTTP 429, nothing consumed, the decision that refused it. No
    /// provider or model (it reached none) and no tiktoken count of its prompt, so a flood of
    /// refused requests costs the gateway next to nothing.
    fn record(
        self,
        app: &App,
        policy: &Policy,
        envelope: &Envelope,
        key: Option<&ApiKey>,
        applied: AppliedDecision,
        b: &Blocked,
    ) {
        let record = RequestRecord {
            publisher: app.publisher.clone(),
            event_id: self.event_id,
            started: self.started,
            started_at_us: self.started_at_us,
            envelope: envelope.clone(),
            api_key_id: key.map(|k| k.id.clone()),
            api_format: self.endpoint.format(),
            virtual_model: self.vm_label.to_owned(),
            provider: String::new(),
            model: String::new(),
            attempt: 0,
            fallback_path: Vec::new(),
            streamed: self.stream,
            input: None,
            price: None,
            price_card_version: policy.price_card.as_ref().map(|c| c.version.clone()).unwrap_or_default(),
            decision: Some(applied),
            ticket: None,
            intake: None,
        };
        record.finish(Outcome::failed(Status::Rejected, 429, b.message(), false));
    }
}

/// Records an attempt that reached (or tried to reach) a provider and failed there.
fn fail(record: RequestRecord, e: &IngressError) {
    let status = match e {
        IngressError::ProviderTimeout { .. } => Status::Timeout,
        _ => Status::ProviderError,
    };
    record.finish(Outcome::failed(status, e.status_code().as_u16(), e.to_string(), e.may_be_billed()));
}

/// The provider path and body bytes for this endpoint and provider kind: the client's bytes
/// with the concrete model when the formats match (`raw`), a translation when they do not.
fn upstream(
    endpoint: Endpoint,
    kind: ProviderKind,
    req: &Value,
    raw: &Bytes,
    model: &str,
    stream: bool,
) -> Result<(&'static str, UpstreamBody), IngressError> {
    let translated = |v: Value| UpstreamBody::from(v.to_string().into_bytes());
    Ok(match (endpoint, kind) {
        (Endpoint::Chat, ProviderKind::Openai) => ("/chat/completions", openai::upstream_body(req, raw, model, stream)),
        (Endpoint::Chat, ProviderKind::Anthropic) => {
            ("/messages", translated(anthropic::from_openai_request(req, model, stream)?))
        }
        (Endpoint::Messages, ProviderKind::Anthropic) => ("/messages", anthropic::upstream_body(req, raw, model)),
        (Endpoint::Messages, ProviderKind::Openai) => {
            ("/chat/completions", translated(openai::from_anthropic_request(req, model, stream)))
        }
        (Endpoint::Embeddings, ProviderKind::Openai) => ("/embeddings", openai::upstream_body(req, raw, model, false)),
        (Endpoint::Embeddings, ProviderKind::Anthropic) => {
            return Err(IngressError::InvalidRequest("Anthropic has no embeddings API".into()));
        }
    })
}

/// Sends the request to one target; a non-2xx answer becomes `ProviderStatus`.
#[allow(clippy::too_many_arguments)]
async fn call(
    endpoint: Endpoint,
    app: &App,
    live: &Live,
    provider: &ProviderConfig,
    target: &Target,
    req: &Value,
    raw: &Bytes,
    stream: bool,
    first_byte: Duration,
) -> Result<reqwest::Response, IngressError> {
    let (path, body) = upstream(endpoint, provider.kind, req, raw, &target.model, stream)?;
    let url = live
        .url(&provider.name, path)
        .cloned()
        .ok_or_else(|| IngressError::Internal(format!("provider {} has no URL for {path}", provider.name)))?;
    let credential = live.credentials.get(&provider.name).and_then(Option::as_ref);
    let mut builder = app
        .http
        .post(url)
        .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(reqwest::Body::wrap(body));
    match provider.kind {
        ProviderKind::Openai => {
            if let Some(c) = credential {
                builder = builder.header(header::AUTHORIZATION, c.clone());
            }
        }
        ProviderKind::Anthropic => {
            builder = builder.header("anthropic-version", anthropic::API_VERSION);
            if let Some(c) = credential {
                builder = builder.header("x-api-key", c.clone());
            }
        }
    }
    let provider_name = || provider.name.clone();
    let sent = Instant::now();
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let resp = tokio::time::timeout(first_byte, builder.send())
        .await
        .map_err(|_| IngressError::ProviderTimeout { provider: provider_name(), ms: millis(first_byte) })?
        .map_err(|e| {
            // The client's idle (read) timeout can fire before `first_byte`: a timeout all the same.
            if e.is_timeout() {
                IngressError::ProviderTimeout { provider: provider_name(), ms: millis(sent.elapsed()) }
            } else {
                IngressError::ProviderFailed {
                    provider: provider_name(),
                    message: error_chain(&e),
                    reached: !e.is_connect(),
                }
            }
        })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = read_limited(resp, 1 << 20).await.unwrap_or_default();
    Err(IngressError::ProviderStatus { provider: provider_name(), status, body, content_type })
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

/// Reads a whole non-streaming answer, meters it, and answers in the client's format.
async fn complete_response(
    endpoint: Endpoint,
    resp: reqwest::Response,
    kind: ProviderKind,
    record: RequestRecord,
) -> Result<Response, (IngressError, RequestRecord)> {
    let provider = record.provider.clone();
    let bad = |message: String| IngressError::ProviderFailed { provider: provider.clone(), message, reached: true };
    let bytes = match read_limited(resp, MAX_PROVIDER_BODY).await {
        Ok(b) => b,
        Err(m) => return Err((bad(m), record)),
    };
    let parsed: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err((bad("provider sent a response that is not a JSON object".into()), record)),
    };
    let model_version = parsed.get("model").and_then(Value::as_str).map(str::to_owned);
    let (usage, text, body) = match (endpoint, kind) {
        (Endpoint::Chat | Endpoint::Embeddings, ProviderKind::Openai) => {
            (openai::usage(&parsed), openai::response_text(&parsed), bytes)
        }
        (Endpoint::Messages, ProviderKind::Anthropic) => {
            (parsed.get("usage").and_then(anthropic::usage), anthropic::response_text(&parsed), bytes)
        }
        (Endpoint::Chat, ProviderKind::Anthropic) => {
            let translated = anthropic::to_openai_response(&parsed, record.started_at_us / 1_000_000);
            let usage = parsed.get("usage").and_then(anthropic::usage);
            (usage, anthropic::response_text(&parsed), Bytes::from(translated.to_string()))
        }
        (Endpoint::Messages, ProviderKind::Openai) => {
            let translated = openai::to_anthropic_response(&parsed);
            (openai::usage(&parsed), openai::response_text(&parsed), Bytes::from(translated.to_string()))
        }
        (Endpoint::Embeddings, ProviderKind::Anthropic) => {
            return Err((IngressError::InvalidRequest("Anthropic has no embeddings API".into()), record));
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
        may_be_billed: false,
    });
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}

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

fn stream_response(
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
            retry_after_secs: breach::retry_after_secs(
                entry.as_ref().map_or(0, |e| e.decision.window_end_us),
                now_us(),
            ),
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

/// `GET /v1/models`: the virtual models the caller's key may use, in OpenAI's list format.
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let live = app.live();
    let key = match auth::authenticate(&live.policy, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let data: Vec<Value> = live
        .policy
        .virtual_models
        .keys()
        .filter(|name| key.is_none_or(|k| k.may_use(name)))
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
