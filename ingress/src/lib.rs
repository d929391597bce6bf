//! Tollgate's ingress: the proxy on every LLM request's path.
//!
//! `run` serves the OpenAI-compatible API on a listener until `shutdown` fires, then stops
//! accepting, lets in-flight requests finish within a grace period, and flushes usage events.

pub mod auth;
pub mod breaker;
pub mod count;
pub mod envelope;
pub mod error;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod publish;
pub mod record;
pub mod route;
pub mod spool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::policy::{Policy, ProviderKind};
use tracing::{info, warn};

pub use publish::KafkaConfig;
use publish::Publisher;

#[derive(Debug, Clone)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub kafka: KafkaConfig,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest total size of request header names and values accepted.
    pub max_header_bytes: usize,
    /// Usage events waiting for the producer before new ones are dropped (and counted).
    pub publish_queue: usize,
    /// Directory of the on-disk spool that holds usage events until Kafka acknowledges them.
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold; events past it are dropped (counted and logged).
    pub spool_max_bytes: u64,
    pub upstream_connect_timeout: Duration,
    /// Longest silence between two reads of a provider's response (stalled streams end here).
    pub upstream_idle_timeout: Duration,
    /// Time for a provider's response head when the routing rule sets no `timeout_ms`.
    pub first_byte_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    pub metrics: Option<PrometheusHandle>,
}

impl Config {
    pub fn new(policy_dir: PathBuf, kafka: KafkaConfig) -> Self {
        Self {
            policy_dir,
            kafka,
            max_body_bytes: 8 << 20,
            max_header_bytes: 64 << 10,
            publish_queue: 65_536,
            spool_dir: PathBuf::from("tollgate-spool"),
            spool_max_bytes: 1 << 30,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_idle_timeout: Duration::from_secs(60),
            first_byte_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            metrics: None,
        }
    }
}

/// Everything a request needs, built once from the config and the policy.
pub struct App {
    pub policy: Policy,
    /// Provider name → credential header value, read from the environment at start.
    credentials: HashMap<String, Option<HeaderValue>>,
    http: reqwest::Client,
    publisher: Publisher,
    breakers: breaker::Breakers,
    max_body_bytes: usize,
    max_header_bytes: usize,
    first_byte_timeout: Duration,
    metrics: Option<PrometheusHandle>,
}

fn credentials(policy: &Policy) -> anyhow::Result<HashMap<String, Option<HeaderValue>>> {
    let mut out = HashMap::new();
    for p in policy.providers.values() {
        let value = match &p.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(secret) => {
                    let text = match p.kind {
                        ProviderKind::Openai => format!("Bearer {secret}"),
                        ProviderKind::Anthropic => secret,
                    };
                    let mut v = HeaderValue::from_str(&text)
                        .with_context(|| format!("credential in ${var} is not a valid header value"))?;
                    v.set_sensitive(true);
                    Some(v)
                }
                Err(_) => {
                    warn!(provider = %p.name, env = %var, "provider credential variable is not set; calling without one");
                    None
                }
            },
        };
        out.insert(p.name.clone(), value);
    }
    Ok(out)
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/api/llm/api/inference/openai/chat/completions", post(proxy::chat_completions))
        .route("/v1/messages", post(proxy::messages))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(proxy::models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render_metrics))
        .with_state(app)
}

async fn render_metrics(State(app): State<Arc<App>>) -> axum::response::Response {
    tollgate_runtime::render_metrics(app.metrics.clone()).await
}

/// Serves until `shutdown` is cancelled; returns once every usage event is flushed.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let policy = Policy::load_dir(&config.policy_dir)
        .map_err(|e| anyhow::anyhow!("policy in {} is invalid:\n{e}", config.policy_dir.display()))?;
    metrics::describe();
    let http = reqwest::Client::builder()
        .connect_timeout(config.upstream_connect_timeout)
        .read_timeout(config.upstream_idle_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .context("building the HTTP client")?;
    let spool = publish::SpoolConfig::new(config.spool_dir.clone(), config.spool_max_bytes);
    let (publisher, task) = Publisher::start(&config.kafka, config.publish_queue, spool)?;
    let app = Arc::new(App {
        credentials: credentials(&policy)?,
        policy,
        http,
        publisher,
        breakers: breaker::Breakers::default(),
        max_body_bytes: config.max_body_bytes,
        max_header_bytes: config.max_header_bytes,
        first_byte_timeout: config.first_byte_timeout,
        metrics: config.metrics.clone(),
    });
    info!(addr = %listener.local_addr()?, virtual_models = app.policy.virtual_models.len(), "ingress listening");
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    // 1. stop accepting, 2. drain in-flight requests within the grace period, 3. flush events.
    tokio::select! {
        r = server => r.context("serving")?,
        () = grace => warn!("shutdown grace period over; cutting remaining requests"),
    }
    task.shutdown().await;
    info!("ingress stopped");
    Ok(())
}
