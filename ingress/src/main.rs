//! `tollgate-ingress`: parses flags, starts tracing and metrics, binds, and runs the proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate_ingress::{Config, KafkaConfig};

/// Tollgate ingress: an OpenAI-compatible LLM proxy that attributes, prices and meters every request.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory of policy YAML files (providers, virtual models, price card, limits).
    #[arg(long, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: PathBuf,
    /// Address to serve the API, /healthz and /metrics on.
    #[arg(long, env = "TOLLGATE_INGRESS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// Topic usage events are published to.
    #[arg(long, default_value = tollgate_schemas::topics::USAGE)]
    usage_topic: String,
    /// Extra librdkafka producer settings, `key=value` (repeatable).
    #[arg(long = "kafka-set", value_parser = parse_kv)]
    kafka_set: Vec<(String, String)>,
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
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("expected key=value, got {s:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tollgate_runtime::init_tracing();
    let args = Args::parse();
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(
        args.policy_dir,
        KafkaConfig { brokers: args.kafka_brokers, usage_topic: args.usage_topic, extra: args.kafka_set },
    );
    config.max_body_bytes = args.max_body_bytes;
    config.spool_dir = args.spool_dir;
    config.spool_max_bytes = args.spool_max_bytes;
    config.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace_secs);
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("ingress", tollgate_ingress::run(config, listener, shutdown).await)
}
