//! `tollgate-console`: the read-only web console (spend, budgets, live breaches, the failure
//! modes, outcomes per dollar) on 127.0.0.1:8088 by default.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tollgate_console::Config;
use tollgate_meter::ClickHouseArgs;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tollgate console: what the meter and the enforcer know, as pages behind a token.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    ch: ClickHouseArgs,
    /// Address to serve on; it also answers /healthz and /metrics.
    #[arg(long, env = "TOLLGATE_CONSOLE_LISTEN", default_value = "127.0.0.1:8088")]
    listen: String,
    /// A file whose first line is the console token (at least 16 characters); wins over
    /// --token.
    #[arg(long, env = "TOLLGATE_CONSOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The console token itself (prefer --token-file: the environment of a process is readable
    /// by its user).
    #[arg(long, env = "TOLLGATE_CONSOLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Directory of policy YAML files, for the budgets page.
    #[arg(long, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Kafka bootstrap servers (the live breaches and alerts).
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = tollgate_schemas::topics::BREACHES)]
    breaches_topic: String,
    #[arg(long, default_value = tollgate_schemas::topics::ALERTS)]
    alerts_topic: String,
    /// A librdkafka setting for the console's consumer, `KEY=VALUE`; repeatable.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = tollgate_runtime::parse_key_value)]
    kafka_options: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tollgate_runtime::init_tracing();
    let cli = Cli::parse();
    let token = match (&cli.token_file, &cli.token) {
        (Some(path), _) => match std::fs::read_to_string(path) {
            Ok(text) => text.lines().next().unwrap_or_default().trim().to_owned(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the console token");
                return ExitCode::from(tollgate_runtime::exit::CONFIG);
            }
        },
        (None, Some(t)) => t.trim().to_owned(),
        (None, None) => {
            tracing::error!("the console needs a token: --token-file or TOLLGATE_CONSOLE_TOKEN");
            return ExitCode::from(tollgate_runtime::exit::CONFIG);
        }
    };
    if token.len() < tollgate_console::MIN_TOKEN_LEN {
        tracing::error!("the console token must be at least {} characters", tollgate_console::MIN_TOKEN_LEN);
        return ExitCode::from(tollgate_runtime::exit::CONFIG);
    }
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&cli.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(cli.ch.config(), cli.kafka_brokers, token);
    config.breaches_topic = cli.breaches_topic;
    config.alerts_topic = cli.alerts_topic;
    config.kafka_extra = cli.kafka_options;
    config.policy_dir = cli.policy_dir;
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("console", tollgate_console::run(config, listener, shutdown).await)
}
