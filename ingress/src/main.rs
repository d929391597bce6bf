//! `tollgate-ingress`: parses flags, starts tracing and metrics, binds, and runs the proxy.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_ingress::{Config, KafkaConfig};

/// mimalloc instead of glibc's malloc: the request path allocates and frees many small buffers
/// across threads, where glibc's arenas showed ~10% of the ingress's CPU under load
/// (tests/bench/profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tollgate ingress: an OpenAI-compatible LLM proxy that attributes, prices and meters every
/// request, and applies the enforcer's breach decisions to it.
///
/// The policy directory is reloaded on SIGHUP and when one of its files changes; a directory
/// with errors is not applied (the errors are logged, the running policy stays).
#[derive(Parser, Debug)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory of policy YAML files (providers, virtual models, price card, limits).
    #[arg(long, env = "TOLLGATE_POLICY_DIR", required = true)]
    policy_dir: Option<PathBuf>,
    /// Address to serve the API, /healthz and /metrics on.
    #[arg(long, env = "TOLLGATE_INGRESS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Topic usage events are published to.
    #[arg(long, default_value = tollgate_schemas::topics::USAGE)]
    usage_topic: String,
    /// Extra librdkafka settings for the usage producer and the decision consumer, `key=value`
    /// (repeatable; e.g. security.protocol, sasl.*). The producer's defaults are acks=all,
    /// idempotence, linger.ms=10 and compression.type=none (set lz4 where bytes cost more
    /// than CPU).
    #[arg(long = "kafka-option", visible_alias = "kafka-set", value_name = "KEY=VALUE", value_parser = tollgate_runtime::parse_key_value)]
    kafka_options: Vec<(String, String)>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Directory where usage events wait on disk until Kafka acknowledges them (one ingress
    /// process per directory).
    #[arg(long, env = "TOLLGATE_INGRESS_SPOOL_DIR", default_value = "tollgate-spool")]
    spool_dir: PathBuf,
    /// Most bytes the spool may hold; usage events past it are dropped (counted and logged).
    #[arg(long, default_value_t = 1 << 30)]
    spool_max_bytes: u64,
    /// Seconds in-flight requests may run after SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Compacted topic of the enforcer's breach decisions; read in full before serving, then
    /// followed live.
    #[arg(long, default_value = tollgate_schemas::topics::BREACHES)]
    breaches_topic: String,
    /// Where outcomes posted to `POST /v1/outcomes` are published.
    #[arg(long, default_value = tollgate_schemas::topics::OUTCOMES)]
    outcomes_topic: String,
    /// Act on no breach decision: requests pass, and their usage events record what would have
    /// happened (`audit:<action>`).
    #[arg(long, env = "TOLLGATE_INGRESS_AUDIT_ONLY")]
    audit_only: bool,
    /// Seconds start-up waits for the breaches topic to be read; past it the ingress serves
    /// without the unread decisions (fail open, logged, tollgate_ingress_decisions_ready 0)
    /// unless --decisions-required.
    #[arg(long, default_value_t = 15)]
    decisions_start_timeout_secs: u64,
    /// Exit instead of starting open when the breaches topic cannot be read in time.
    #[arg(long)]
    decisions_required: bool,
    /// Requests queue_then_429 may hold at once; more get 429 at once.
    #[arg(long, default_value_t = 10_000)]
    max_queued: usize,
    /// Most rule scopes this ingress counts its own admissions for; past it the scope whose
    /// window ends soonest is dropped (counted in tollgate_ingress_own_counts_evicted_total).
    #[arg(long, default_value_t = tollgate_ingress::decisions::own::DEFAULT_MAX_KEYS)]
    own_count_keys: usize,
    /// Milliseconds between two looks at the policy directory for changes.
    #[arg(long, default_value_t = 1000)]
    policy_poll_ms: u64,
    /// Never reload the policy (neither on SIGHUP nor on file changes).
    #[arg(long)]
    no_policy_reload: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a policy directory and exit: every error as `file:line: field: message` (exit 2),
    /// or a summary (exit 0).
    CheckConfig {
        /// Directory of policy YAML files.
        #[arg(long, env = "TOLLGATE_POLICY_DIR")]
        policy_dir: PathBuf,
    },
}

fn check_config(dir: &std::path::Path) -> ExitCode {
    match tollgate_runtime::reload::check(dir) {
        Ok(summary) => {
            let _ = writeln!(std::io::stdout().lock(), "{summary}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let mut err = std::io::stderr().lock();
            for e in &errors.0 {
                let _ = writeln!(err, "{e}");
            }
            let _ = writeln!(err, "policy in {} has {} error(s)", dir.display(), errors.0.len());
            ExitCode::from(tollgate_runtime::exit::CONFIG)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::CheckConfig { policy_dir }) = &args.command {
        return check_config(policy_dir);
    }
    tollgate_runtime::init_tracing();
    let Some(policy_dir) = args.policy_dir else {
        tracing::error!("--policy-dir is required");
        return ExitCode::from(tollgate_runtime::exit::CONFIG);
    };
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(
        policy_dir,
        KafkaConfig { brokers: args.kafka_brokers, usage_topic: args.usage_topic, extra: args.kafka_options },
    );
    config.max_body_bytes = args.max_body_bytes;
    config.spool_dir = args.spool_dir;
    config.spool_max_bytes = args.spool_max_bytes;
    config.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace_secs);
    config.metrics = Some(metrics);
    config.breaches_topic = args.breaches_topic;
    config.outcomes_topic = args.outcomes_topic;
    config.traces = tollgate_ingress::trace::TracesConfig::from_env();
    config.otel_metrics = tollgate_ingress::otel_metrics::MetricsConfig::from_env();
    config.audit_only = args.audit_only;
    config.decisions_start_timeout = std::time::Duration::from_secs(args.decisions_start_timeout_secs);
    config.decisions_required = args.decisions_required;
    config.max_queued = args.max_queued;
    config.own_count_keys = args.own_count_keys;
    config.reload = (!args.no_policy_reload).then(|| tollgate_runtime::reload::ReloadOptions {
        poll: Some(std::time::Duration::from_millis(args.policy_poll_ms.max(50))),
        ..Default::default()
    });
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("ingress", tollgate_ingress::run(config, listener, shutdown).await)
}
