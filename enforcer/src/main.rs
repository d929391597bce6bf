//! `tollgate-enforcer`: parses flags, starts tracing and metrics, binds, and runs the enforcer;
//! `tollgate-enforcer check-config` validates a policy directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tollgate_enforcer::Config;
use tollgate_store::ClickHouseConfig;

/// mimalloc, as the ingress and the meter: every event allocates its strings and the keys of the
/// rules it falls in, and glibc's malloc and free were about a tenth of the enforcer's profile
/// (perf, `tests/bench/enforcer capacity`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tollgate enforcer: rate limits, budgets and anomaly guards over the usage stream.
///
/// Publishes breach decisions to the compacted breaches topic (key `rule_id/scope`) and alerts to
/// the alerts topic and the policy's notify channels. On start it rebuilds its windows from the
/// usage ClickHouse holds (the meter's tables) and consumes the usage topic from the meter's
/// checkpoints, so a restart neither forgets spend nor counts it twice.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory of policy YAML files.
    #[arg(long, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TOLLGATE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    #[arg(long, default_value = tollgate_schemas::topics::USAGE)]
    usage_topic: String,
    #[arg(long, default_value = tollgate_schemas::topics::BREACHES)]
    breaches_topic: String,
    #[arg(long, default_value = tollgate_schemas::topics::ALERTS)]
    alerts_topic: String,
    /// Where usage events that cannot be counted (undecodable, negative amounts) are copied
    #[arg(long, default_value = tollgate_schemas::topics::USAGE_DEAD_LETTERS)]
    dead_letter_topic: String,
    /// ClickHouse HTTP URL (the meter's database, read at start).
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_DATABASE", default_value = "tollgate")]
    database: String,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_USER")]
    clickhouse_user: Option<String>,
    #[arg(long, env = "TOLLGATE_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    clickhouse_password: Option<String>,
    /// A scope at or above this percentage of its limit is published as `Watch` with its
    /// headroom, which ingresses count their own admissions against.
    #[arg(long, default_value_t = 50)]
    watch_pct: u32,
    /// Longest wait, in milliseconds, between new usage arriving and its decisions going out.
    #[arg(long, default_value_t = 10)]
    evaluate_every_ms: u64,
    /// Extra librdkafka settings, `key=value`, repeatable.
    #[arg(long = "kafka-option", visible_alias = "kafka-set", value_name = "KEY=VALUE", value_parser = tollgate_runtime::parse_key_value)]
    kafka_options: Vec<(String, String)>,
    /// Enforcers with the same group id (and breaches topic) are one group: one publishes, the
    /// others stand by with warm windows and take over when it stops.
    #[arg(long, env = "TOLLGATE_ENFORCER_GROUP_ID", default_value = "tollgate-enforcer")]
    group_id: String,
    /// The group's lease topic (one partition; created when missing).
    #[arg(long, default_value = tollgate_schemas::topics::ENFORCER_LEASE)]
    lease_topic: String,
    /// This enforcer's id in its group [default: host name and listen address]. A restarted
    /// enforcer with the id of the last active one takes over at once.
    #[arg(long, env = "TOLLGATE_ENFORCER_INSTANCE_ID")]
    instance_id: Option<String>,
    /// A standby takes over after this long without a heartbeat from the active enforcer.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// How often the active enforcer writes its heartbeat (at most a third of the session timeout).
    #[arg(long, default_value_t = 2_000)]
    heartbeat_interval_ms: u64,
    /// Address for /healthz and /metrics.
    #[arg(long, env = "TOLLGATE_ENFORCER_LISTEN", default_value = "127.0.0.1:9102")]
    listen: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a policy directory: print every error with file, line and field (exit 2), or a
    /// summary of what it defines (exit 0).
    CheckConfig {
        #[arg(long, env = "TOLLGATE_POLICY_DIR")]
        policy_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::CheckConfig { policy_dir }) = args.command {
        return check_config(&policy_dir);
    }
    tollgate_runtime::init_tracing();
    let Some(policy_dir) = args.policy_dir else {
        eprintln!("--policy-dir (or TOLLGATE_POLICY_DIR) is required");
        return ExitCode::from(2);
    };
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let clickhouse = ClickHouseConfig {
        url: args.clickhouse_url,
        database: args.database,
        user: args.clickhouse_user,
        password: args.clickhouse_password,
    };
    let mut config = Config::new(policy_dir, args.kafka_brokers, clickhouse);
    config.usage_topic = args.usage_topic;
    config.breaches_topic = args.breaches_topic;
    config.alerts_topic = args.alerts_topic;
    config.dead_letter_topic = args.dead_letter_topic;
    config.watch_pct = args.watch_pct;
    config.evaluate_every = Duration::from_millis(args.evaluate_every_ms.max(1));
    config.kafka_extra = args.kafka_options;
    // A standby reads heartbeats up to its quiet fetch wait (about 1 s) late: below 2 s it would
    // take over from a live active again and again.
    if args.session_timeout_ms < 2_000 || args.heartbeat_interval_ms.saturating_mul(3) > args.session_timeout_ms {
        eprintln!(
            "--session-timeout-ms must be at least 2000 and at least three heartbeats (--heartbeat-interval-ms {})",
            args.heartbeat_interval_ms
        );
        return ExitCode::from(2);
    }
    config.lease = tollgate_enforcer::lease::LeaseConfig {
        group_id: args.group_id,
        topic: args.lease_topic,
        instance_id: args.instance_id,
        session_timeout: Duration::from_millis(args.session_timeout_ms),
        heartbeat_every: Duration::from_millis(args.heartbeat_interval_ms.max(100)),
    };
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("enforcer", tollgate_enforcer::run(config, listener, shutdown).await)
}

#[allow(clippy::print_stdout)] // check-config's output is its purpose
fn check_config(dir: &std::path::Path) -> ExitCode {
    match tollgate_runtime::reload::check(dir) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", dir.display(), errors.0.len());
            ExitCode::from(tollgate_runtime::exit::CONFIG)
        }
    }
}
