//! OpenTelemetry traces of the ingress, exported over OTLP/HTTP (protobuf).
//!
//! One span per request (`SpanKind::Server`, named `{operation} {model asked for}`) and one child
//! span per upstream attempt (`SpanKind::Client`), with the GenAI semantic conventions
//! (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
//! `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`) and
//! Tollgate's own `tollgate.*` attributes (envelope, virtual model, cost in nano-USD, decision,
//! fallback path). An incoming W3C `traceparent` continues the caller's trace; the usage event of
//! every attempt carries the trace id, so a ClickHouse row leads to its trace. Without an
//! exporter the ingress still records the caller's trace id.
//!
//! The spans are built from the usage events themselves (their times, tokens and cost), so a span
//! and its row never disagree. The request span ends when the last of its attempts is recorded
//! (a stream's at its end).
//!
//! Exporting never slows the request path: an ended span goes into a bounded queue without
//! waiting (`try_send`); a full queue drops it, counted in
//! `tollgate_ingress_trace_spans_total{result="dropped_queue_full"}`. One task sends batches.
//! This is the SDK's batch processor's job, written here because that one drops silently (a log
//! line at shutdown), and a dropped span must be a counted one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status as SpanStatus, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::{mpsc, oneshot};
use tollgate_schemas::usage::{Status, UsageEvent};
use tracing::{info, warn};

use crate::metrics;

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct TracesConfig {
    /// The OTLP/HTTP traces URL (`http://collector:4318/v1/traces`); `None`: the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` variables.
    pub endpoint: Option<String>,
    pub service_name: String,
    /// Ended spans waiting for export; past it they are dropped (counted).
    pub max_queue: usize,
    /// Most spans per export request.
    pub max_batch: usize,
    /// Longest wait before a batch that is not full is sent.
    pub delay: Duration,
    /// Longest an export may take; past it the batch is dropped (counted).
    pub export_timeout: Duration,
}

impl TracesConfig {
    /// The configuration the standard variables give, or `None` when they ask for no trace
    /// export: no OTLP endpoint set, `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`.
    /// `OTEL_EXPORTER_OTLP_HEADERS` is read by the exporter itself.
    pub fn from_env() -> Option<TracesConfig> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
            warn!(protocol = %p, "this ingress exports traces over OTLP http/protobuf only; using it");
        }
        let number = |k: &str, default: u64| var(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(default);
        Some(TracesConfig {
            endpoint: None,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| "tollgate-ingress".into()),
            max_queue: usize::try_from(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)).unwrap_or(2048).max(1),
            max_batch: usize::try_from(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)).unwrap_or(512).max(1),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            export_timeout: Duration::from_millis(
                var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                    .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(10_000),
            ),
        })
    }
}

/// The exporting half: the tracer requests start spans on, and the task that sends them.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    to_export: mpsc::Sender<Msg>,
    task: tokio::task::JoinHandle<()>,
}

enum Msg {
    Span(Box<SpanData>),
    /// Send what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

impl Tracing {
    /// Builds the exporter and starts the export task (on the current Tokio runtime).
    pub fn start(cfg: &TracesConfig, http: reqwest::Client) -> anyhow::Result<Tracing> {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(Http(http));
        if let Some(e) = &cfg.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(cfg.service_name.clone()).build();
        let mut exporter = builder.build()?;
        exporter.set_resource(&resource);
        let (to_export, queue) = mpsc::channel(cfg.max_queue);
        let task = tokio::spawn(export_loop(queue, exporter, cfg.max_batch, cfg.delay, cfg.export_timeout));
        let processor = Queue { to_export: to_export.clone() };
        let provider = SdkTracerProvider::builder().with_resource(resource).with_span_processor(processor).build();
        let tracer = provider.tracer("tollgate-ingress");
        info!(service = %cfg.service_name, endpoint = cfg.endpoint.as_deref().unwrap_or("(from OTEL_* variables)"), "exporting traces over OTLP/HTTP");
        Ok(Tracing { provider, tracer, to_export, task })
    }

    /// Sends every span ended so far (within `timeout`), then stops the export task. A span
    /// that ends later (a request cut at the end of the grace period) is dropped and counted
    /// (`dropped_after_shutdown`), as are those the deadline left in the queue.
    pub async fn shutdown(&self, timeout: Duration) {
        let flushed = tokio::time::timeout(timeout, async {
            let (tx, rx) = oneshot::channel();
            self.to_export.send(Msg::Flush(tx)).await.is_ok() && rx.await.is_ok()
        })
        .await;
        if !matches!(flushed, Ok(true)) {
            warn!("trace export did not finish within the shutdown deadline");
        }
        self.task.abort();
        // Aborting drops the queue; what it still held was not exported.
        let left = self.to_export.max_capacity() - self.to_export.capacity();
        if left > 0 {
            metrics::trace_spans("dropped_after_shutdown", left as u64);
        }
        if let Err(e) = self.provider.shutdown() {
            warn!(error = %e, "trace provider shutdown");
        }
    }
}

/// The span processor: each ended span into the bounded queue, never waiting.
#[derive(Debug)]
struct Queue {
    to_export: mpsc::Sender<Msg>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.to_export.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => metrics::trace_spans("dropped_queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => metrics::trace_spans("dropped_after_shutdown", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // Asked from any thread, possibly a runtime worker: the flush is requested, not awaited.
        let (tx, _) = oneshot::channel();
        self.to_export.try_send(Msg::Flush(tx)).map_err(|_| OTelSdkError::InternalFailure("queue full".into()))
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

async fn export_loop(
    mut queue: mpsc::Receiver<Msg>,
    exporter: opentelemetry_otlp::SpanExporter,
    max_batch: usize,
    delay: Duration,
    timeout: Duration,
) {
    let exporter = Export { exporter, timeout };
    let mut batch: Vec<SpanData> = Vec::with_capacity(max_batch);
    let mut tick = tokio::time::interval(delay.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = queue.recv() => match msg {
                Some(Msg::Span(s)) => {
                    batch.push(*s);
                    if batch.len() >= max_batch {
                        exporter.send(&mut batch).await;
                    }
                }
                Some(Msg::Flush(done)) => {
                    while let Ok(Msg::Span(s)) = queue.try_recv() {
                        batch.push(*s);
                    }
                    exporter.send(&mut batch).await;
                    let _ = done.send(());
                }
                None => {
                    exporter.send(&mut batch).await;
                    return;
                }
            },
            _ = tick.tick() => exporter.send(&mut batch).await,
        }
    }
}

/// The exporter, each export bounded in time (with its own HTTP client the OTLP exporter does
/// not apply `OTEL_EXPORTER_OTLP_TIMEOUT` itself).
struct Export {
    exporter: opentelemetry_otlp::SpanExporter,
    timeout: Duration,
}

impl Export {
    async fn send(&self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        let n = spans.len() as u64;
        let error = match tokio::time::timeout(self.timeout, self.exporter.export(spans)).await {
            Ok(Ok(())) => return metrics::trace_spans("exported", n),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        metrics::trace_spans("dropped_export_failed", n);
        warn!(error, spans = n, "trace export failed; spans dropped");
    }
}

/// The OTLP exporters' HTTP client (traces and metrics): the ingress's own reqwest
/// (opentelemetry-http implements its trait for an older reqwest only).
#[derive(Debug)]
pub(crate) struct Http(pub(crate) reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Http {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let resp = self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?;
        if !status.is_success() {
            return Err(format!("the collector answered HTTP {status}").into());
        }
        let mut out = http::Response::builder().status(status).body(body)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// One request's trace: its id, and its span when spans are exported. Cheap to clone (each
/// attempt's record holds one); the request span ends when the last clone is dropped.
#[derive(Clone, Default)]
pub struct RequestTrace {
    inner: Option<Arc<Inner>>,
    /// Where each attempt's GenAI metrics go, when they are exported.
    metrics: Option<Arc<crate::otel_metrics::GenAiMetrics>>,
}

struct Inner {
    trace_id: String,
    /// The context holding the request span, and the tracer of its children; `None` when
    /// nothing is exported.
    cx: Option<(Context, SdkTracer)>,
    /// What the request span says when it ends, gathered from its attempts.
    end: Mutex<RequestEnd>,
}

/// The request span's closing attributes: the last attempt's outcome, and the tokens and cost of
/// all its attempts (a failed attempt a provider may have billed is part of the request's spend).
#[derive(Default)]
struct RequestEnd {
    ended_at_us: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_nanos: i64,
    attempts: i64,
    /// The last attempt's attributes (its own tokens and cost left out) and status.
    last: Vec<KeyValue>,
    status: Option<SpanStatus>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some((cx, _)) = &self.cx else { return };
        let end = std::mem::take(self.end.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner));
        let span = cx.span();
        for kv in end.last {
            span.set_attribute(kv);
        }
        if end.attempts > 0 || end.status.is_some() {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", end.input_tokens));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", end.output_tokens));
            span.set_attribute(KeyValue::new("tollgate.cost_nanos", end.cost_nanos));
            span.set_attribute(KeyValue::new("tollgate.attempts", end.attempts));
        }
        if let Some(status) = end.status {
            span.set_status(status);
        }
        let at = if end.ended_at_us > 0 { time_of(end.ended_at_us) } else { SystemTime::now() };
        span.end_with_timestamp(at);
    }
}

fn time_of(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// The GenAI operation of an endpoint.
pub fn operation(embeddings: bool) -> &'static str {
    if embeddings { "embeddings" } else { "chat" }
}

impl RequestTrace {
    /// The request's trace: the caller's (`traceparent`) continued, or a new one when spans are
    /// exported; no trace when neither.
    pub fn begin(
        tracing: Option<&Tracing>,
        metrics: Option<&Arc<crate::otel_metrics::GenAiMetrics>>,
        headers: &HeaderMap,
        operation: &'static str,
        model: &str,
        started_at_us: i64,
    ) -> RequestTrace {
        let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let Some(t) = tracing else {
            let sc = parent.span().span_context().clone();
            return RequestTrace {
                inner: sc
                    .is_valid()
                    .then(|| Arc::new(Inner { trace_id: sc.trace_id().to_string(), cx: None, end: Mutex::default() })),
                metrics: metrics.cloned(),
            };
        };
        let span = t
            .tracer
            .span_builder(format!("{operation} {model}"))
            .with_kind(SpanKind::Server)
            .with_start_time(time_of(started_at_us))
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
            ])
            .start_with_context(&t.tracer, &parent);
        let trace_id = span.span_context().trace_id().to_string();
        let cx = parent.with_span(span);
        RequestTrace {
            inner: Some(Arc::new(Inner { trace_id, cx: Some((cx, t.tracer.clone())), end: Mutex::default() })),
            metrics: metrics.cloned(),
        }
    }

    /// The W3C trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> Option<String> {
        self.inner.as_ref().map(|i| i.trace_id.clone())
    }

    /// Records attempt `ev` (started at `attempt_started_us` on a provider of kind
    /// `provider_kind`): a child span when it reached for a provider, and the request span's
    /// outcome attributes (the last attempt's stand).
    pub fn record(&self, ev: &UsageEvent, operation: &'static str, attempt_started_us: i64, provider_kind: &str) {
        if let Some(m) = &self.metrics {
            m.record(ev, operation, attempt_started_us, provider_kind);
        }
        let Some(inner) = &self.inner else { return };
        let Some((cx, tracer)) = &inner.cx else { return };
        let mut common = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.usage.input_tokens", ev.input_tokens),
            KeyValue::new("gen_ai.usage.output_tokens", ev.output_tokens),
            KeyValue::new("http.response.status_code", i64::from(ev.http_status)),
            KeyValue::new("tollgate.event_id", ev.event_id.clone()),
            KeyValue::new("tollgate.status", ev.status.as_str()),
            KeyValue::new("tollgate.token_source", ev.token_source.as_str()),
            KeyValue::new("tollgate.cost_nanos", ev.cost_nanos),
            KeyValue::new("tollgate.virtual_model", ev.virtual_model.clone()),
            KeyValue::new(
                "tollgate.fallback_path",
                Value::Array(ev.fallback_path.iter().map(|s| StringValue::from(s.clone())).collect::<Vec<_>>().into()),
            ),
        ];
        let e = &ev.envelope;
        for (k, v) in [
            ("tollgate.project", &e.project),
            ("tollgate.team", &e.team),
            ("tollgate.user_id", &e.user_id),
            ("tollgate.session_id", &e.session_id),
            ("tollgate.workflow_tag", &e.workflow_tag),
            ("tollgate.environment", &e.environment),
            ("tollgate.cost_center", &e.cost_center),
            ("tollgate.api_key_id", &ev.api_key_id),
        ] {
            if let Some(v) = v {
                common.push(KeyValue::new(k, v.clone()));
            }
        }
        if let Some(d) = &ev.decision {
            common.push(KeyValue::new("tollgate.decision.rule_id", d.rule_id.clone()));
            common.push(KeyValue::new("tollgate.decision.scope", d.scope.clone()));
            common.push(KeyValue::new("tollgate.decision.action", d.action.clone()));
        }
        let ok = ev.status == Status::Ok;
        let response_model = ev.model_version.clone().unwrap_or_else(|| ev.model.clone());
        {
            let mut end = inner.end.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            end.ended_at_us = end.ended_at_us.max(ev.ended_at_us);
            end.input_tokens = end.input_tokens.saturating_add(ev.input_tokens);
            end.output_tokens = end.output_tokens.saturating_add(ev.output_tokens);
            end.cost_nanos = end.cost_nanos.saturating_add(ev.cost_nanos);
            end.attempts += i64::from(ev.attempt > 0);
            let summed = ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "tollgate.cost_nanos"];
            end.last = common.iter().filter(|kv| !summed.contains(&kv.key.as_str())).cloned().collect();
            if ok && !ev.model.is_empty() {
                end.last.push(KeyValue::new("gen_ai.response.model", response_model.clone()));
                end.last.push(KeyValue::new("gen_ai.provider.name", provider_kind.to_owned()));
                end.status = Some(SpanStatus::Ok);
            } else {
                end.last.push(KeyValue::new("error.type", ev.status.as_str()));
                end.status = Some(SpanStatus::error(ev.error.clone().unwrap_or_default()));
            }
        }
        if ev.attempt == 0 {
            return; // refused before any provider: the request span says it all
        }
        let mut attrs = common;
        attrs.extend([
            KeyValue::new("gen_ai.provider.name", provider_kind.to_owned()),
            KeyValue::new("gen_ai.request.model", ev.model.clone()),
            KeyValue::new("tollgate.provider", ev.provider.clone()),
            KeyValue::new("tollgate.attempt", i64::from(ev.attempt)),
        ]);
        if ok {
            attrs.push(KeyValue::new("gen_ai.response.model", response_model));
        } else {
            attrs.push(KeyValue::new("error.type", ev.status.as_str()));
        }
        let mut span = tracer
            .span_builder(format!("{operation} {}", ev.model))
            .with_kind(SpanKind::Client)
            .with_start_time(time_of(attempt_started_us))
            .with_attributes(attrs)
            .start_with_context(tracer, cx);
        if !ok {
            span.set_status(SpanStatus::error(ev.error.clone().unwrap_or_default()));
        }
        span.end_with_timestamp(time_of(ev.ended_at_us));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", traceparent.parse().unwrap());
        h
    }

    #[test]
    fn without_export_the_callers_trace_id_is_kept() {
        let t = RequestTrace::begin(
            None,
            None,
            &headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "chat",
            "m",
            1,
        );
        assert_eq!(t.trace_id().as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn without_export_or_a_valid_traceparent_there_is_no_trace() {
        for bad in ["", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "garbage", "00-xyz-01"] {
            let h = if bad.is_empty() { HeaderMap::new() } else { headers(bad) };
            assert_eq!(RequestTrace::begin(None, None, &h, "chat", "m", 1).trace_id(), None, "{bad:?}");
        }
    }
}
