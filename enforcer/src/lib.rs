//! Tollgate's enforcer: evaluates policy over the usage stream.
//!
//! This first version loads and validates the policy, follows the usage topic in its consumer
//! group and exports what it sees; rate limits, budgets and anomaly guards build on this loop.

pub mod metrics;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::policy::Policy;
use tollgate_schemas::usage::UsageEvent;
use tracing::{error, info, warn};

#[derive(Debug, Clone)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub brokers: String,
    pub usage_topic: String,
    pub group_id: String,
    pub kafka_extra: Vec<(String, String)>,
    pub metrics: Option<PrometheusHandle>,
}

impl Config {
    pub fn new(policy_dir: PathBuf, brokers: String) -> Self {
        Self {
            policy_dir,
            brokers,
            usage_topic: tollgate_schemas::topics::USAGE.into(),
            group_id: "tollgate-enforcer".into(),
            kafka_extra: Vec::new(),
            metrics: None,
        }
    }
}

/// Loads the policy, then follows the usage topic until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let policy = Policy::load_dir(&config.policy_dir)
        .map_err(|e| anyhow::anyhow!("policy in {} is invalid:\n{e}", config.policy_dir.display()))?;
    metrics::describe();
    let rate_rules: usize = policy.rate_limits.iter().map(|c| c.rules.len()).sum();
    let budgets: usize = policy.budgets.iter().map(|c| c.budgets.len()).sum();
    metrics::rules("rate_limit", rate_rules);
    metrics::rules("budget", budgets);

    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.offset.reset", "latest");
    for (k, v) in &config.kafka_extra {
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create().context("creating the Kafka consumer")?;
    consumer.subscribe(&[&config.usage_topic]).context("subscribing to the usage topic")?;
    info!(topic = %config.usage_topic, rate_rules, budgets, "enforcer consuming");

    let http = axum::serve(listener, tollgate_runtime::ops_router(config.metrics.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let http = tokio::spawn(async move { http.await });
    let codec = UsageEvent::codec()?;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            msg = consumer.recv() => match msg {
                Ok(m) => match m.payload().map(|p| codec.decode::<UsageEvent>(p)) {
                    Some(Ok(ev)) => {
                        let now_us = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_micros() as i64);
                        let age = (now_us - ev.ended_at_us).max(0) as f64 / 1e6;
                        metrics::event(ev.input_tokens, ev.output_tokens, ev.cost_nanos, age);
                    }
                    Some(Err(e)) => {
                        metrics::decode_error();
                        error!(partition = m.partition(), offset = m.offset(), error = %e, "usage event skipped: cannot decode");
                    }
                    None => metrics::decode_error(),
                },
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    let _ = http.await;
    info!("enforcer stopped");
    Ok(())
}
