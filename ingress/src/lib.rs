//! Tollgate's ingress: the proxy on every LLM request's path.
//!
//! `run` reads the breach decisions, serves the OpenAI-compatible API on a listener until
//! `shutdown` fires, then stops accepting, lets in-flight requests finish within a grace period,
//! and flushes usage events. The policy is reloaded while it runs (SIGHUP or a changed file):
//! routing, keys, prices, rules and provider credentials swap together in one step.

pub mod auth;
pub mod circuit_breaker;
pub mod clock;
pub mod count;
pub mod decisions;
pub mod envelope;
pub mod error;
pub mod gate;
pub mod intake;
pub mod metrics;
pub mod otel_metrics;
pub mod outcomes;
pub mod provider;
pub mod proxy;
pub mod publish;
pub mod record;
pub mod route;
pub mod spool;
pub mod trace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::policy::{Policy, ProviderKind};
use tracing::{debug, error, info, warn};

pub use publish::KafkaConfig;
use publish::Publisher;
pub use tollgate_runtime::reload::ReloadOptions;

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
    /// The compacted topic of breach decisions (`tollgate.breaches.v1`).
    pub breaches_topic: String,
    /// Where `POST /v1/outcomes` publishes.
    pub outcomes_topic: String,
    /// OpenTelemetry trace export; `None`: none (the caller's trace id is still recorded).
    pub traces: Option<trace::TracesConfig>,
    /// OpenTelemetry metric export (the GenAI client metrics); `None`: none.
    pub otel_metrics: Option<otel_metrics::MetricsConfig>,
    /// Act on no breach decision: record on usage events what each would have done.
    pub audit_only: bool,
    /// How long start-up waits for the breaches topic to be read before serving.
    pub decisions_start_timeout: Duration,
    /// Refuse to start when the breaches topic cannot be read in time (default: start open).
    pub decisions_required: bool,
    /// Requests `queue_then_429` may hold at once; more are refused with 429 at once.
    pub max_queued: usize,
    /// Most rule scopes the ingress counts its own admissions for (`decisions::own`).
    pub own_count_keys: usize,
    /// How the policy directory is watched for changes (`None`: never reloaded).
    pub reload: Option<ReloadOptions>,
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
            breaches_topic: tollgate_schemas::topics::BREACHES.into(),
            outcomes_topic: tollgate_schemas::topics::OUTCOMES.into(),
            traces: None,
            otel_metrics: None,
            audit_only: false,
            decisions_start_timeout: Duration::from_secs(15),
            decisions_required: false,
            max_queued: 10_000,
            own_count_keys: decisions::own::DEFAULT_MAX_KEYS,
            reload: Some(ReloadOptions::default()),
        }
    }
}

/// Everything built from one policy, swapped whole when the policy is reloaded.
pub struct Live {
    pub policy: Arc<Policy>,
    /// Provider name → credential header value, read from the environment when the policy loads.
    credentials: HashMap<String, Option<HeaderValue>>,
    /// Provider name → its API's URLs by path, parsed once rather than on every request.
    urls: HashMap<String, HashMap<&'static str, reqwest::Url>>,
}

/// The provider API paths the ingress calls.
pub(crate) const PROVIDER_PATHS: [&str; 3] = ["/chat/completions", "/messages", "/embeddings"];

/// Why a valid policy cannot be served: what [`Live::new`] needs beyond the policy's own checks.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("provider {provider}: base_url {base_url} is not a URL")]
    BaseUrl {
        provider: String,
        base_url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("provider {provider}: the credential in ${env} is not a valid header value")]
    Credential {
        provider: String,
        env: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
}

impl Live {
    pub fn new(policy: Arc<Policy>) -> Result<Live, LiveError> {
        let mut urls = HashMap::new();
        for (name, p) in &policy.providers {
            let base = p.base_url.trim_end_matches('/');
            let mut by_path = HashMap::new();
            for path in PROVIDER_PATHS {
                let url = reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| LiveError::BaseUrl {
                    provider: name.clone(),
                    base_url: p.base_url.clone(),
                    source: Box::new(e),
                })?;
                by_path.insert(path, url);
            }
            urls.insert(name.clone(), by_path);
        }
        Ok(Live { credentials: credentials(&policy)?, urls, policy })
    }

    /// The URL of `path` at `provider`.
    pub(crate) fn url(&self, provider: &str, path: &str) -> Option<&reqwest::Url> {
        self.urls.get(provider)?.get(path)
    }
}

/// Everything a request needs, built once from the config and the policy.
pub struct App {
    live: ArcSwap<Live>,
    http: reqwest::Client,
    publisher: Publisher,
    breakers: circuit_breaker::Breakers,
    max_body_bytes: usize,
    max_header_bytes: usize,
    first_byte_timeout: Duration,
    metrics: Option<PrometheusHandle>,
    /// Breach decisions, kept current by the follower task.
    pub decisions: Arc<decisions::DecisionCache>,
    queue: gate::Queue,
    outcomes: outcomes::Sink,
    tracing: Option<trace::Tracing>,
    otel_metrics: Option<Arc<otel_metrics::GenAiMetrics>>,
}

impl App {
    /// The current policy and what is built from it; a request holds one for its whole life.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }
}

fn credentials(policy: &Policy) -> Result<HashMap<String, Option<HeaderValue>>, LiveError> {
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
                    let mut v = HeaderValue::from_str(&text).map_err(|source| LiveError::Credential {
                        provider: p.name.clone(),
                        env: var.clone(),
                        source,
                    })?;
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
        .route("/v1/outcomes", post(outcomes::post))
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
    if config.audit_only {
        warn!(
            "audit-only: breach decisions are recorded on usage events but no request is blocked, queued or rerouted"
        );
    }
    let http = reqwest::Client::builder()
        .connect_timeout(config.upstream_connect_timeout)
        .read_timeout(config.upstream_idle_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .context("building the HTTP client")?;
    announce_identity(&policy);
    let live = Live::new(Arc::new(policy))?;
    let spool = publish::SpoolConfig::new(config.spool_dir.clone(), config.spool_max_bytes);
    let outcomes = outcomes::Sink::new(&config.kafka, config.outcomes_topic.clone())?;
    let tracing = config.traces.as_ref().map(|t| trace::Tracing::start(t, http.clone())).transpose()?;
    // A metrics exporter that cannot be built (an unsupported compression setting, say) costs
    // the metrics, not the gateway.
    let otel_metrics = config.otel_metrics.as_ref().and_then(|m| {
        otel_metrics::GenAiMetrics::start(m, http.clone())
            .inspect_err(|e| {
                error!(error = format!("{e:#}"), "OTLP metrics not exported: the exporter cannot be built")
            })
            .ok()
    });
    let (publisher, task) = Publisher::start(&config.kafka, config.publish_queue, spool)?;
    // The breach decisions are read before the first request is served (or the deadline passes).
    let cache = decisions::DecisionCache::with_own_keys(config.audit_only, config.own_count_keys);
    let follow = decisions::FollowConfig {
        brokers: config.kafka.brokers.clone(),
        topic: config.breaches_topic.clone(),
        extra: config.kafka.extra.clone(),
        start_timeout: config.decisions_start_timeout,
        required: config.decisions_required,
    };
    let follower = match decisions::Follower::start(Arc::clone(&cache), &follow, &shutdown).await {
        Ok(f) => f,
        Err(e) => {
            task.shutdown().await;
            return Err(e.into());
        }
    };
    let app = Arc::new(App {
        live: ArcSwap::from_pointee(live),
        http,
        publisher,
        breakers: circuit_breaker::Breakers::default(),
        max_body_bytes: config.max_body_bytes,
        max_header_bytes: config.max_header_bytes,
        first_byte_timeout: config.first_byte_timeout,
        metrics: config.metrics.clone(),
        decisions: cache,
        queue: gate::Queue::new(config.max_queued),
        outcomes,
        tracing,
        otel_metrics,
    });
    let sweeper = tokio::spawn(sweep_own_counts(Arc::clone(&app.decisions), shutdown.clone()));
    let reloads = config.reload.clone().map(|opts| {
        let policy = app.live().policy.as_ref().clone();
        let rx = tollgate_runtime::reload::PolicyWatch::spawn_with(
            config.policy_dir.clone(),
            policy,
            shutdown.clone(),
            opts,
        );
        tokio::spawn(swap_on_reload(Arc::clone(&app), rx))
    });
    info!(addr = %listener.local_addr()?, virtual_models = app.live().policy.virtual_models.len(), "ingress listening");
    // Streamed chunks go out as they come: without TCP_NODELAY each small SSE write waits for the
    // client's delayed ACK (Nagle), which added 15-46 ms to the first token in the benchmark.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
    });
    let server =
        axum::serve(listener, router(Arc::clone(&app))).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    // 1. stop accepting, 2. drain in-flight requests within the grace period (decisions still
    // followed), 3. stop following decisions, 4. flush events.
    let served = tokio::select! {
        r = server => r.context("serving"),
        () = grace => {
            warn!("shutdown grace period over; cutting remaining requests");
            Ok(())
        }
    };
    if let Some(r) = reloads {
        r.abort();
    }
    follower.stop().await;
    sweeper.abort();
    task.shutdown().await;
    // Every request has ended (or was cut): its spans are queued; send them.
    if let Some(t) = &app.tracing {
        t.shutdown(Duration::from_secs(5)).await;
    }
    // And the metrics of every attempt, once more.
    if let Some(m) = &app.otel_metrics {
        m.shutdown(Duration::from_secs(5)).await;
    }
    served?;
    info!("ingress stopped");
    Ok(())
}

/// Says whether the gateway serves callers without a key: a warning in the log and a gauge.
fn announce_identity(policy: &Policy) {
    metrics::anonymous(policy.allow_anonymous);
    if policy.allow_anonymous {
        warn!(
            keys = policy.api_keys.len(),
            "anonymous gateway: requests without an API key are served (allow_anonymous: true); their envelope is whatever the headers say"
        );
    }
}

/// Swaps in what each reloaded policy builds, all at once (requests in flight keep theirs).
/// Forgets, once a second, the own counts whose windows have passed (`decisions::own`).
async fn sweep_own_counts(cache: Arc<decisions::DecisionCache>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                cache.own_counts().sweep(clock::now_us());
            }
        }
    }
}

async fn swap_on_reload(app: Arc<App>, mut policies: tokio::sync::watch::Receiver<Arc<Policy>>) {
    while policies.changed().await.is_ok() {
        let policy = Arc::clone(&policies.borrow_and_update());
        match Live::new(policy) {
            Ok(live) => {
                announce_identity(&live.policy);
                app.live.store(Arc::new(live));
                info!("ingress now serves the reloaded policy");
            }
            Err(e) => {
                error!(error = %tollgate_runtime::error_chain(&e), "reloaded policy not applied; keeping the current one")
            }
        }
    }
}
