//! `tollgate-meter`: `run` consumes usage into ClickHouse; `migrate` applies the schema and exits.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tollgate_meter::{ClickHouseConfig, Config};

/// Tollgate meter: usage events from Kafka into ClickHouse, exactly once.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume the usage topic into ClickHouse (applies migrations first).
    Run(RunArgs),
    /// Apply ClickHouse migrations and exit.
    Migrate(ChArgs),
}

#[derive(Args, Debug)]
struct ChArgs {
    /// ClickHouse HTTP URL.
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    /// ClickHouse database.
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_DATABASE", default_value = "tollgate")]
    database: String,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_USER")]
    clickhouse_user: Option<String>,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    clickhouse_password: Option<String>,
}

impl ChArgs {
    fn config(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    ch: ChArgs,
    /// Directory of policy YAML files (validated at start).
    #[arg(long, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = tollgate_schemas::topics::USAGE)]
    usage_topic: String,
    #[arg(long, default_value = "tollgate-meter")]
    group_id: String,
    /// Address for /healthz and /metrics.
    #[arg(long, env = "TOLLGATE_METER_LISTEN", default_value = "127.0.0.1:9101")]
    listen: String,
    /// Rows per ClickHouse insert at most.
    #[arg(long, default_value_t = 50_000)]
    batch_max_rows: usize,
    /// Longest a row waits before its batch is written, in milliseconds.
    #[arg(long, default_value_t = 500)]
    batch_max_wait_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tollgate_runtime::init_tracing();
    match Cli::parse().command {
        Command::Migrate(ch) => {
            let cfg = ch.config();
            let result = tollgate_meter::migrate::apply(&cfg.server_client(), &cfg.database).await.map(|n| {
                tracing::info!(applied = n, database = %cfg.database, "migrations done");
            });
            tollgate_runtime::exit_code("migration", result)
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    if let Some(dir) = &args.policy_dir {
        if let Err(e) = tollgate_schemas::policy::Policy::load_dir(dir) {
            tracing::error!("policy in {} is invalid:\n{e}", dir.display());
            return ExitCode::from(tollgate_runtime::exit::CONFIG);
        }
    }
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(args.kafka_brokers, args.ch.config());
    config.usage_topic = args.usage_topic;
    config.group_id = args.group_id;
    config.batch_max_rows = args.batch_max_rows;
    config.batch_max_wait = std::time::Duration::from_millis(args.batch_max_wait_ms);
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("meter", tollgate_meter::run(config, listener, shutdown).await)
}
