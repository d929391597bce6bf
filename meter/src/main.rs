//! `tollgate-meter`: `run` consumes usage into ClickHouse; `migrate` applies the schema and exits;
//! `report` prints chargeback and the failure-mode reports.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tollgate_meter::report::{self, Dimension, Format, Output, Period, Reporter, Which};
use tollgate_meter::{ClickHouseArgs as ChArgs, Config};
use tollgate_store::ClickHouseConfig;

/// mimalloc, as the ingress: every event allocates a dozen strings that live until its batch is
/// written, and glibc's malloc and free were about a tenth of the meter's profile (perf,
/// tests/bench/meter). The CPU per event came out the same within noise (7.4 µs against 7.6 µs
/// with glibc, 300,000 events, one run each); it is kept for one allocator across the services.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Print chargeback (`--by ...`) or a failure-mode report from ClickHouse.
    Report(ReportArgs),
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
    /// Topic that takes usage events the meter cannot decode.
    #[arg(long, default_value = tollgate_schemas::topics::USAGE_DEAD_LETTERS)]
    dead_letter_topic: String,
    /// The enforcer's breach decisions, kept in `breach_history`.
    #[arg(long, default_value = tollgate_schemas::topics::BREACHES)]
    breaches_topic: String,
    /// The enforcer's alerts, kept in `alert_history`.
    #[arg(long, default_value = tollgate_schemas::topics::ALERTS)]
    alerts_topic: String,
    /// Do not keep the decision and alert history.
    #[arg(long)]
    no_history: bool,
    /// Outcomes posted to the ingress (`POST /v1/outcomes`), kept in `outcome_events`.
    #[arg(long, default_value = tollgate_schemas::topics::OUTCOMES)]
    outcomes_topic: String,
    /// Do not keep outcomes.
    #[arg(long)]
    no_outcomes: bool,
    /// Consumer group: with `--group` the meters that share the partitions; otherwise the group
    /// the standalone meter commits its offsets under (for monitoring only).
    #[arg(long, default_value = "tollgate-meter")]
    group_id: String,
    /// Share the topic's partitions with the other meters of `--group-id` through the Kafka
    /// consumer group: start as many as you like and stop or lose any of them; on every
    /// rebalance each partition resumes at its ClickHouse checkpoint, so nothing is lost or
    /// counted twice. Without it the meter reads every partition itself and must be the only one
    /// on the topic. A crashed member's partitions move after the group's session timeout
    /// (librdkafka's default 45 s; e.g. `--kafka-option session.timeout.ms=10000`).
    #[arg(long)]
    group: bool,
    /// A librdkafka setting for the meter's Kafka clients, `KEY=VALUE`; repeatable.
    #[arg(long = "kafka-option", visible_alias = "kafka-set", value_name = "KEY=VALUE", value_parser = tollgate_runtime::parse_key_value)]
    kafka_options: Vec<(String, String)>,
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
            let result = tollgate_store::migrate::apply(&cfg.server_client(), &cfg.database).await.map(|n| {
                tracing::info!(applied = n, database = %cfg.database, "migrations done");
            });
            tollgate_runtime::exit_code("migration", result)
        }
        Command::Run(args) => run(args).await,
        Command::Report(args) => report(args).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let mut price_card = None;
    if let Some(dir) = &args.policy_dir {
        match tollgate_schemas::policy::Policy::load_dir(dir) {
            Ok(policy) => price_card = policy.price_card,
            Err(e) => {
                tracing::error!("policy in {} is invalid:\n{e}", dir.display());
                return ExitCode::from(tollgate_runtime::exit::CONFIG);
            }
        }
    }
    if let Some(card) = &price_card {
        sync_tiers_at_start(&args.ch.config(), card).await;
    }
    let (metrics, listener) = match tollgate_runtime::metrics_and_listener(&args.listen).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut config = Config::new(args.kafka_brokers, args.ch.config());
    config.usage_topic = args.usage_topic;
    config.group_id = args.group_id;
    if args.group {
        config.mode = tollgate_meter::Mode::Group;
    }
    config.kafka_extra = args.kafka_options;
    config.dead_letter_topic = args.dead_letter_topic;
    config.history = (!args.no_history).then_some((args.breaches_topic, args.alerts_topic));
    config.outcomes_topic = (!args.no_outcomes).then_some(args.outcomes_topic);
    config.batch_max_rows = args.batch_max_rows;
    config.batch_max_wait = std::time::Duration::from_millis(args.batch_max_wait_ms);
    config.metrics = Some(metrics);
    let shutdown = tollgate_runtime::shutdown_on_signal();
    tollgate_runtime::exit_code("meter", tollgate_meter::run(config, listener, shutdown).await)
}

/// Writes the price card's model tiers for the frontier-share report. Needs migration 0003, so
/// migrations are applied first (`run` finds them current); a failure is logged, and `run`
/// then reports the unreachable ClickHouse itself.
async fn sync_tiers_at_start(cfg: &ClickHouseConfig, card: &tollgate_schemas::policy::PriceCard) {
    if let Err(e) = tollgate_store::migrate::apply(&cfg.server_client(), &cfg.database).await {
        tracing::warn!(error = format!("{e:#}"), "model tiers not synced: migrations failed");
        return;
    }
    match Reporter::new(cfg) {
        Ok(r) => match r.sync_model_tiers(card).await {
            Ok(n) => tracing::info!(models = n, version = %card.version, "model tiers synced"),
            Err(e) => tracing::warn!(error = %e, "model tiers not synced"),
        },
        Err(e) => tracing::warn!(error = %e, "model tiers not synced"),
    }
}

#[derive(Args, Debug)]
struct ReportArgs {
    #[command(subcommand)]
    kind: Option<ReportKind>,
    #[command(flatten)]
    ch: ChArgs,
    /// Chargeback grouping; repeat for several (`--by team --by model`); default project.
    #[arg(long = "by", value_enum)]
    by: Vec<Dimension>,
    /// A calendar month, UTC (`2026-04`).
    #[arg(long, global = true, conflicts_with_all = ["from", "to"])]
    month: Option<String>,
    /// Start of the period, inclusive: a date (`2026-04-01`, UTC midnight) or a UTC datetime.
    #[arg(long, global = true)]
    from: Option<String>,
    /// End of the period, exclusive.
    #[arg(long, global = true)]
    to: Option<String>,
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Policy directory whose price card's model tiers are written to ClickHouse first.
    #[arg(long, global = true, env = "TOLLGATE_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
enum ReportKind {
    /// Share of each workflow's cost on frontier models (price card `tier: frontier`).
    FrontierShare {
        /// Flag workflows whose frontier share is above this.
        #[arg(long, default_value_t = report::DEFAULT_FRONTIER_SHARE)]
        threshold: f64,
    },
    /// Average prompt tokens (input + cache reads + cache writes) per successful request, per workflow.
    ContextStuffing {
        /// Flag workflows whose average is above this many tokens.
        #[arg(long, default_value_t = report::DEFAULT_STUFFING_TOKENS)]
        threshold: u64,
    },
    /// Session-hours whose tokens exceed k times the p95 session-hour of their workflow.
    Loops {
        #[arg(long, default_value_t = report::DEFAULT_LOOP_K)]
        k: f64,
    },
    /// Provider tokens per reference (tiktoken) token, per model version, against the previous version.
    Drift {
        /// Flag a version whose ratio is this much above the previous version's (0.10 = 10%).
        #[arg(long, default_value_t = report::DEFAULT_DRIFT)]
        threshold: f64,
    },
    /// Spend without a project, team or cost centre.
    Untagged,
    /// Cost per outcome of a kind and outcomes per dollar, per group, beside the spend that
    /// produced no outcome of that kind (outcomes posted to the ingress's POST /v1/outcomes).
    CostPerOutcome {
        /// The outcome kind (`merged_pr`, `resolved_ticket`, …).
        #[arg(long)]
        kind: String,
        /// The grouping (any but `model`).
        #[arg(long = "by", value_enum, default_value_t = Dimension::Team)]
        by: Dimension,
    },
}

async fn report(args: ReportArgs) -> ExitCode {
    match build_report(&args).await.and_then(|out| out.render(args.format).map_err(anyhow::Error::from)) {
        Ok(text) => {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "report failed");
            ExitCode::FAILURE
        }
    }
}

async fn build_report(args: &ReportArgs) -> anyhow::Result<Output> {
    let period = match &args.month {
        Some(m) => Period::month(m)?,
        None => Period::between(args.from.as_deref(), args.to.as_deref())?,
    };
    let reporter = Reporter::new(&args.ch.config())?;
    if let Some(dir) = &args.policy_dir {
        let policy = tollgate_schemas::policy::Policy::load_dir(dir)
            .map_err(|e| anyhow::anyhow!("policy in {} is invalid:\n{e}", dir.display()))?;
        if let Some(card) = &policy.price_card {
            reporter.sync_model_tiers(card).await?;
        }
    }
    if args.kind.is_some() && !args.by.is_empty() {
        anyhow::bail!("--by groups chargeback; it does not apply to the failure-mode reports");
    }
    let which = match args.kind.clone() {
        None => Which::Chargeback(if args.by.is_empty() { vec![Dimension::Project] } else { args.by.clone() }),
        Some(ReportKind::FrontierShare { threshold }) => {
            if reporter.frontier_models().await? == 0 {
                tracing::warn!(
                    "no model is marked frontier in ClickHouse: pass --policy-dir, or run the meter with a price card that sets `tier: frontier`"
                );
            }
            Which::FrontierShare(threshold)
        }
        Some(ReportKind::ContextStuffing { threshold }) => Which::ContextStuffing(threshold),
        Some(ReportKind::Loops { k }) => Which::Loops(k),
        Some(ReportKind::Drift { threshold }) => Which::Drift(threshold),
        Some(ReportKind::Untagged) => Which::Untagged,
        Some(ReportKind::CostPerOutcome { kind, by }) => Which::CostPerOutcome { kind, by },
    };
    Ok(reporter.output(&which, period).await?)
}
