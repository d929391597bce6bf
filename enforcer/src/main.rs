//! `tollgate-enforcer`: parses flags, starts tracing and metrics, binds, and runs the enforcer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let handle = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the metrics recorder");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %args.listen, error = %e, "cannot bind");
            return ExitCode::from(3);
        }
    };
    let mut config = Config::new(args.policy_dir, args.kafka_brokers);
    config.usage_topic = args.usage_topic;
    config.group_id = args.group_id;
    config.metrics = Some(handle);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
    match tollgate_enforcer::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "enforcer failed");
            ExitCode::FAILURE
        }
    }
}
