//! `tollgate-enforcer`: parses flags, starts tracing and metrics, binds, and runs the enforcer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate_enforcer::Config;

/// Tollgate enforcer: rate limits, budgets and anomaly guards over the usage stream.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory of policy YAML files.
    #[arg(long, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = tollgate_schemas::topics::USAGE)]
    usage_topic: String,
    #[arg(long, default_value = "tollgate-enforcer")]
    group_id: String,
    /// Address for /healthz and /metrics.
    #[arg(long, env = "TOLLGATE_ENFORCER_LISTEN", default_value = "127.0.0.1:9102")]
    listen: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tollgate_runtime::init_tracing();
    let args = Args::parse();
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(args.policy_dir, args.kafka_brokers);
    config.usage_topic = args.usage_topic;
    config.group_id = args.group_id;
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("enforcer", tollgate_enforcer::run(config, listener, shutdown).await)
}
