//! OpenTelemetry metrics of the ingress, pushed over OTLP/HTTP (protobuf) beside the traces.
//!
//! The GenAI semantic conventions' client metrics, recorded from each attempt's usage event (as
//! the spans are, so the figures match the rows): `gen_ai.client.token.usage` (histogram of
//! tokens, `gen_ai.token.type` = `input` or `output`) and `gen_ai.client.operation.duration`
//! (histogram, seconds), plus `tollgate.usage.cost` (counter, nano-USD) and
//! `tollgate.usage.requests` (counter of attempts). Their attributes are the operation, the
//! provider's wire format, the virtual model, the concrete model, Tollgate's provider name and
//! `error.type` on failures: values the policy bounds, never an envelope tag a caller chooses,
//! so the series are bounded. Chargeback by project or team is ClickHouse's job.
//!
//! The SDK's periodic reader runs its own thread and would call the async exporter outside the
//! Tokio runtime; here a task of ours collects a manual reader every interval and exports, each
//! export bounded by the timeout, and once more at shutdown. Every export is counted in
//! `tollgate_ingress_otlp_metric_exports_total{result}`.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter as _;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider, Temporality};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::usage::{Status, UsageEvent};
use tracing::{info, warn};

use crate::trace::Http;

/// Where and how often metrics are pushed.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// The OTLP/HTTP metrics URL; `None`: the exporter's default (`http://localhost:4318/v1/metrics`).
    pub endpoint: Option<String>,
    pub service_name: String,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (60 s).
    pub interval: Duration,
    /// Longest one export may take: `OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` or `OTEL_METRIC_EXPORT_TIMEOUT` (30 s); at shutdown at most
    /// [`LAST_EXPORT`].
    pub export_timeout: Duration,
}

impl MetricsConfig {
    /// The configuration the standard variables give, or `None` when they ask for no metric
    /// export: no OTLP endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_METRICS_EXPORTER=none`.
    pub fn from_env() -> Option<MetricsConfig> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_METRICS_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return None;
        }
        // The signal's own URL as given; the generic one with `/v1/metrics` after it (the
        // OTLP exporter's rule, resolved here so the log names where metrics go).
        let endpoint = match var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            Some(e) => e,
            None => format!("{}/v1/metrics", var("OTEL_EXPORTER_OTLP_ENDPOINT")?.trim_end_matches('/')),
        };
        let protocol = var("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
            warn!(protocol = %p, "this ingress exports metrics over OTLP http/protobuf only; using it");
        }
        let ms = |k: &str| var(k).and_then(|v| v.parse::<u64>().ok());
        Some(MetricsConfig {
            endpoint: Some(endpoint),
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| "tollgate-ingress".into()),
            interval: Duration::from_millis(ms("OTEL_METRIC_EXPORT_INTERVAL").unwrap_or(60_000).max(100)),
            export_timeout: Duration::from_millis(
                ms("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")
                    .or_else(|| ms("OTEL_EXPORTER_OTLP_TIMEOUT"))
                    .or_else(|| ms("OTEL_METRIC_EXPORT_TIMEOUT"))
                    .unwrap_or(30_000),
            ),
        })
    }
}

/// The manual reader, shared between the meter provider (which registers with it) and the
/// export task (which collects it).
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: opentelemetry_sdk::metrics::InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The instruments, and the task that pushes them.
pub struct GenAiMetrics {
    provider: SdkMeterProvider,
    token_usage: Histogram<u64>,
    duration: Histogram<f64>,
    cost: Counter<u64>,
    requests: Counter<u64>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set once the last export at shutdown has collected: later attempts are counted, not kept.
    stopped: std::sync::atomic::AtomicBool,
}

impl Drop for GenAiMetrics {
    fn drop(&mut self) {
        // An ingress that failed to start drops this without `shutdown`: end the task too.
        self.stop.cancel();
    }
}

/// The longest the export at shutdown may take (the ingress gives it 5 s in all).
pub const LAST_EXPORT: Duration = Duration::from_secs(4);

impl std::fmt::Debug for GenAiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenAiMetrics").finish_non_exhaustive()
    }
}

/// Token counts per bucket boundary the GenAI conventions advise for `gen_ai.client.token.usage`.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// Seconds per bucket boundary the conventions advise for `gen_ai.client.operation.duration`.
const DURATION_BUCKETS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

impl GenAiMetrics {
    /// Builds the exporter and starts the push task (on the current Tokio runtime).
    pub fn start(cfg: &MetricsConfig, http: reqwest::Client) -> anyhow::Result<Arc<GenAiMetrics>> {
        let mut builder = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_http_client(Http(http))
            .with_temporality(Temporality::Cumulative);
        if let Some(e) = &cfg.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        let exporter = builder.build()?;
        let reader = SharedReader(Arc::new(ManualReader::builder().with_temporality(Temporality::Cumulative).build()));
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(cfg.service_name.clone()).build();
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader.clone()).build();
        let meter = provider.meter("tollgate-ingress");
        let token_usage = meter
            .u64_histogram("gen_ai.client.token.usage")
            .with_unit("{token}")
            .with_description("Tokens used per attempt, by gen_ai.token.type (input: everything the model read)")
            .with_boundaries(TOKEN_BUCKETS.to_vec())
            .build();
        let duration = meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_description("Duration of each upstream attempt")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let cost = meter
            .u64_counter("tollgate.usage.cost")
            .with_unit("{nano-USD}")
            .with_description("Cost of the attempts by the price card, nano-USD")
            .build();
        let requests = meter
            .u64_counter("tollgate.usage.requests")
            .with_unit("{request}")
            .with_description("Attempts that reached for a provider")
            .build();
        let stop = CancellationToken::new();
        let task = tokio::spawn(push_loop(reader, exporter, cfg.interval, cfg.export_timeout, stop.clone()));
        info!(
            interval_ms = cfg.interval.as_millis() as u64,
            endpoint = cfg.endpoint.as_deref().unwrap_or("(from OTEL_* variables)"),
            "exporting metrics over OTLP/HTTP"
        );
        Ok(Arc::new(GenAiMetrics {
            provider,
            token_usage,
            duration,
            cost,
            requests,
            stop,
            task: std::sync::Mutex::new(Some(task)),
            stopped: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Records attempt `ev` (started at `attempt_started_us`); a request Tollgate refused reached
    /// no provider and is not a GenAI operation.
    pub fn record(&self, ev: &UsageEvent, operation: &'static str, attempt_started_us: i64, provider_kind: &str) {
        if ev.status == Status::Rejected {
            return;
        }
        if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            crate::metrics::otlp_metric_attempt_after_shutdown();
            return;
        }
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", provider_kind.to_owned()),
            KeyValue::new("gen_ai.request.model", ev.virtual_model.clone()),
            KeyValue::new("gen_ai.response.model", ev.model.clone()),
            KeyValue::new("tollgate.provider", ev.provider.clone()),
        ];
        if ev.status != Status::Ok {
            attrs.push(KeyValue::new("error.type", ev.status.as_str()));
        }
        let seconds = (ev.ended_at_us - attempt_started_us).max(0) as f64 / 1e6;
        self.duration.record(seconds, &attrs);
        self.requests.add(1, &attrs);
        self.cost.add(u64::try_from(ev.cost_nanos).unwrap_or(0), &attrs);
        for (kind, tokens) in [("input", ev.input_tokens), ("output", ev.output_tokens)] {
            let mut with = attrs.clone();
            with.push(KeyValue::new("gen_ai.token.type", kind));
            self.token_usage.record(u64::try_from(tokens).unwrap_or(0), &with);
        }
    }

    /// Pushes what was recorded so far (within `timeout`), then stops; an attempt recorded
    /// after that is counted (`tollgate_ingress_otlp_metric_attempts_after_shutdown_total`).
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task {
            if tokio::time::timeout(timeout, &mut task).await.is_err() {
                task.abort();
                crate::metrics::otlp_metric_export("timed_out");
                warn!("the last metric export did not finish within the shutdown deadline");
            }
        }
        self.stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            warn!(error = %e, "meter provider shutdown");
        }
    }
}

/// Every `interval`: collect and export; once more when stopped. An export under way when the
/// stop comes is abandoned: the last one carries the same totals and more (cumulative).
async fn push_loop(
    reader: SharedReader,
    exporter: opentelemetry_otlp::MetricExporter,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    loop {
        let last = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(interval) => false,
        };
        let mut rm = ResourceMetrics::default();
        if let Err(e) = reader.collect(&mut rm) {
            warn!(error = %e, "collecting metrics");
            if last {
                return;
            }
            continue;
        }
        let export = tokio::time::timeout(if last { timeout.min(LAST_EXPORT) } else { timeout }, exporter.export(&rm));
        let result = if last {
            export.await
        } else {
            tokio::select! {
                () = stop.cancelled() => {
                    crate::metrics::otlp_metric_export("abandoned");
                    continue;
                }
                r = export => r,
            }
        };
        let result = match result {
            Ok(Ok(())) => "exported",
            Ok(Err(e)) => {
                warn!(error = %e, "metric export failed");
                "failed"
            }
            Err(_) => {
                warn!("metric export timed out");
                "timed_out"
            }
        };
        crate::metrics::otlp_metric_export(result);
        if last {
            return;
        }
    }
}
