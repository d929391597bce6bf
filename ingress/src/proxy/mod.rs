//! The request path of the three model endpoints: key, envelope, routing, provider call, metering.
//!
//! `POST /v1/chat/completions` (OpenAI format), `POST /v1/messages` (Anthropic format) and
//! `POST /v1/embeddings` share one path; a request is translated when its target speaks the
//! other wire format, streams included, because fallbacks cross providers.
//!
//! `upstream` builds and sends the provider request and reads a whole answer; `stream` meters
//! (and translates) a streamed one on its way to the client.

mod stream;
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::policy::{ApiKey, Policy, ProviderKind, Target, VirtualModel};
use tollgate_schemas::price::TokenCounts;
use tollgate_schemas::usage::{ApiFormat, AppliedDecision, Envelope, Status};
use tracing::{debug, warn};

use crate::circuit_breaker::Admit;
use crate::clock::now_us;
use crate::count::InputEstimate;
use crate::decisions::{Reservation, StreamCut, Ticket};
use crate::error::IngressError;
use crate::gate::{self, Blocked, Reroute};
use crate::record::{Outcome, RequestRecord};
use crate::route::Attempt;
use crate::{App, Live, auth, count, envelope, metrics, route};
use stream::stream_response;
use upstream::{call, complete_response};

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
    // After `resolve`: the span is named by a model this gateway serves, never by whatever
    // string a caller sent.
    let trace = crate::trace::RequestTrace::begin(
        app.tracing.as_ref(),
        app.otel_metrics.as_ref(),
        headers,
        crate::trace::operation(endpoint == Endpoint::Embeddings),
        model,
        started_at_us,
    );
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
    let view = gate::RequestView { envelope: &envelope, api_key: key, vm, target: first, stream };
    let mut estimates = Estimates { body: Arc::clone(&req), by_encoding: Vec::new() };
    let max_output = req.get("max_tokens").or_else(|| req.get("max_completion_tokens")).and_then(Value::as_i64);
    let mut reserve = || {
        let Some(t) = first else { return Reservation::default() };
        let tokens = estimates.for_model(&t.model).tokens;
        let worst = TokenCounts { input: tokens, output: max_output.unwrap_or(0).max(0), ..TokenCounts::default() };
        Reservation { tokens, cost_nanos: policy.price(t).map_or(0, |p| p.cost_nanos(worst)) }
    };
    app.decisions.note_request();
    let gated = tokio::select! {
        biased;
        () = gone.cancelled() => return Err(client_gone()),
        gated = gate::gate(&app.decisions, policy, &view, &app.queue, &mut reserve) => gated,
    };
    let pass = match gated {
        Ok(pass) => pass,
        Err(refusal) => {
            let refused =
                Refused { endpoint, event_id, started, started_at_us, stream, vm_label: vm_label.as_str(), trace };
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
    Admitted {
        endpoint,
        app,
        live: &live,
        key,
        envelope: &envelope,
        req: &req,
        bytes: &bytes,
        stream,
        client_wants_usage,
        event_id,
        started,
        started_at_us,
        vm_label,
        vm,
        plan,
        estimates,
        applied: pass.applied,
        ticket: pass.ticket,
        cuts: pass.cuts,
        gone,
        trace,
    }
    .try_targets()
    .await
}

/// A request the gate let through: what each of its provider attempts needs.
struct Admitted<'r> {
    endpoint: Endpoint,
    app: &'r App,
    live: &'r Live,
    key: Option<&'r ApiKey>,
    envelope: &'r Envelope,
    req: &'r Value,
    bytes: &'r Bytes,
    stream: bool,
    client_wants_usage: bool,
    event_id: String,
    started: Instant,
    started_at_us: i64,
    vm_label: &'r str,
    vm: Option<&'r VirtualModel>,
    plan: Vec<Attempt<'r>>,
    estimates: Estimates,
    /// From the gate's `Pass`.
    applied: Option<AppliedDecision>,
    ticket: Option<Arc<Ticket>>,
    cuts: Vec<StreamCut>,
    gone: &'r CancellationToken,
    trace: crate::trace::RequestTrace,
}

impl Admitted<'_> {
    /// Tries the plan's targets in order, each behind its circuit breaker and with its retries,
    /// until one answers; every attempt is a usage event of its own.
    async fn try_targets(mut self) -> Result<Response, IngressError> {
        let policy = &*self.live.policy;
        let mut tried: Vec<String> = Vec::new();
        let mut last_err = None;
        let mut retry_after = Duration::MAX;
        let retries = self.vm.and_then(|v| v.retries.as_ref());
        let breaker = self.vm.and_then(|v| v.circuit_breaker.as_ref());
        // Upstream calls made so far: each is its own usage event, the first under the request's
        // event id, the n-th under `<event id>#n`.
        let mut calls: i32 = 0;

        for (i, attempt) in self.plan.iter().enumerate() {
            let target = attempt.target;
            let target_name = target.to_string();
            let Some(provider) = policy.providers.get(&target.provider) else { continue };
            if self.endpoint == Endpoint::Embeddings && provider.kind == ProviderKind::Anthropic {
                last_err = Some(IngressError::InvalidRequest(format!("{target_name} has no embeddings API")));
                continue;
            }
            if let Some(cfg) = breaker {
                if let Admit::No { retry_after: wait } = self.app.breakers.admit(&target_name, cfg, Instant::now()) {
                    debug!(target = %target_name, "circuit open; skipping target");
                    retry_after = retry_after.min(wait);
                    tried.push(target_name);
                    continue;
                }
            }
            if !tried.is_empty() {
                metrics::fallback(self.vm_label);
            }
            let input = self.estimates.for_model(&target.model).clone();
            let first_byte = attempt.timeout_ms.map_or(self.app.first_byte_timeout, Duration::from_millis);
            let more_targets = i + 1 < self.plan.len();
            let tries = 1 + retries.map_or(0, |r| r.attempts);
            for try_no in 0..tries {
                if self.gone.is_cancelled() {
                    return Err(client_gone());
                }
                calls = calls.saturating_add(1);
                let mut record = RequestRecord {
                    publisher: self.app.publisher.clone(),
                    event_id: if calls == 1 { self.event_id.clone() } else { format!("{}#{calls}", self.event_id) },
                    started: self.started,
                    started_at_us: self.started_at_us,
                    envelope: self.envelope.clone(),
                    api_key_id: self.key.map(|k| k.id.clone()),
                    api_format: self.endpoint.format(),
                    virtual_model: self.vm_label.to_owned(),
                    provider: target.provider.clone(),
                    model: target.model.clone(),
                    attempt: calls,
                    fallback_path: tried.clone(),
                    streamed: self.stream,
                    input: Some(input.clone()),
                    price: policy.price(target).cloned(),
                    price_card_version: policy.price_card.as_ref().map(|c| c.version.clone()).unwrap_or_default(),
                    decision: self.applied.clone(),
                    ticket: self.ticket.clone(),
                    intake: None,
                    trace: self.trace.clone(),
                    operation: crate::trace::operation(self.endpoint == Endpoint::Embeddings),
                    attempt_started_at_us: crate::clock::now_us(),
                    provider_kind: match provider.kind {
                        ProviderKind::Openai => "openai",
                        ProviderKind::Anthropic => "anthropic",
                    },
                };
                record.journal_intake();
                let outcome = match call(
                    self.endpoint,
                    self.app,
                    self.live,
                    provider,
                    target,
                    self.req,
                    self.bytes,
                    self.stream,
                    first_byte,
                )
                .await
                {
                    Ok(resp) if self.stream => {
                        let cuts = std::mem::take(&mut self.cuts);
                        Ok(stream_response(self.endpoint, resp, provider.kind, self.client_wants_usage, record, cuts))
                    }
                    Ok(resp) => complete_response(self.endpoint, resp, provider.kind, record).await,
                    Err(e) => Err((e, record)),
                };
                let (e, record) = match outcome {
                    Ok(r) => {
                        if let Some(cfg) = breaker {
                            self.app.breakers.record(&target_name, cfg, true, Instant::now());
                        }
                        return Ok(r);
                    }
                    Err(failure) => failure,
                };
                warn!(provider = %target.provider, model = %target.model, error = %e, "provider call failed");
                let moves_on = match &e {
                    IngressError::ProviderStatus { status, .. } => self.vm.is_some_and(|v| v.falls_back_on(*status)),
                    other => other.retryable(),
                };
                if let Some(cfg) = breaker {
                    self.app.breakers.record(&target_name, cfg, !moves_on, Instant::now());
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
                    () = self.gone.cancelled() => return Err(client_gone()),
                    () = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                }
            }
            tried.push(target_name);
        }
        if retry_after != Duration::MAX && last_err.is_none() {
            return Err(IngressError::Unavailable {
                model: self.vm_label.to_owned(),
                retry_after_secs: retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
            });
        }
        Err(last_err.unwrap_or_else(|| IngressError::Internal(format!("model {} has no usable target", self.vm_label))))
    }
}

/// A request refused by a breach decision, for its usage event.
struct Refused<'a> {
    endpoint: Endpoint,
    event_id: String,
    started: Instant,
    started_at_us: i64,
    stream: bool,
    vm_label: &'a str,
    trace: crate::trace::RequestTrace,
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
            operation: crate::trace::operation(self.endpoint == Endpoint::Embeddings),
            attempt_started_at_us: self.started_at_us,
            provider_kind: "",
            trace: self.trace,
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
