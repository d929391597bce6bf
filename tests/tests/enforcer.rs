//! The enforcer against the real broker and ClickHouse: the reference's rate limits and budgets,
//! loaded as written, decide as written; alerts reach a webhook receiver once per threshold; a
//! restart (SIGKILL) neither forgets spend nor counts it twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tollgate_schemas::decision::{Alert, DecisionState};
use tollgate_schemas::usage::{Envelope, UsageEvent};

const USD: i64 = 1_000_000_000;

/// The test policy plus the reference's rate-limit and budget YAML verbatim, and alert channels
/// on the mock's webhook sink.
fn reference_policy(dir: &Path, mock: SocketAddr) {
    write_policy(dir, mock);
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    for f in ["rate-limits.yaml", "budgets.yaml"] {
        std::fs::copy(reference.join(f), dir.join(f)).unwrap();
    }
    let channels = format!(
        "type: tollgate-alert-channels\nchannels:\n  - {{name: \"slack:#ai-budget-alerts\", url: \"http://{mock}/webhooks/slack\"}}\n  - {{name: \"pagerduty:platform\", url: \"http://{mock}/webhooks/pagerduty\", routing_key: test-routing-key}}\n"
    );
    std::fs::write(dir.join("channels.yaml"), channels).unwrap();
}

fn event(i: u64, envelope: Envelope, input: i64, output: i64, cost_nanos: i64) -> UsageEvent {
    UsageEvent {
        input_tokens: input,
        output_tokens: output,
        cost_nanos,
        envelope: Envelope { session_id: envelope.session_id.clone().or(Some(format!("s-{i}"))), ..envelope },
        ..UsageEvent::example(uuid::Uuid::now_v7().to_string(), None, now_us())
    }
}

fn env(project: &str, session: &str, environment: &str, workflow: &str) -> Envelope {
    let some = |s: &str| if s.is_empty() { None } else { Some(s.to_owned()) };
    Envelope {
        project: some(project),
        session_id: some(session),
        environment: some(environment),
        workflow_tag: some(workflow),
        ..Envelope::default()
    }
}

async fn webhooks(mock: SocketAddr) -> Vec<Value> {
    let v: Value = reqwest::get(format!("http://{mock}/webhooks")).await.unwrap().json().await.unwrap();
    v.as_array().unwrap().clone()
}

async fn alerts_on(topic: &str) -> Vec<Alert> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", unique("alerts"))
            .create()
            .unwrap();
        let (_, high) = c.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
        c.assign(&tpl).unwrap();
        let codec = Alert::codec().unwrap();
        let mut out = Vec::new();
        while (out.len() as i64) < high {
            if let Some(m) = c.poll(Duration::from_secs(10)) {
                out.push(codec.decode(m.unwrap().payload().unwrap()).unwrap());
            } else {
                panic!("alerts topic ended early");
            }
        }
        out
    })
    .await
    .unwrap()
}

struct Topics {
    usage: String,
    breaches: String,
    alerts: String,
    db: String,
}

async fn topics(name: &str) -> Topics {
    let t = Topics {
        usage: unique(&format!("{name}_usage")),
        breaches: unique(&format!("{name}_breaches")),
        alerts: unique(&format!("{name}_alerts")),
        db: unique(name),
    };
    create_topic(&t.usage, 4).await;
    create_topic(&t.breaches, 1).await;
    create_topic(&t.alerts, 1).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reference_rules_decide_as_written() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    reference_policy(dir.path(), mock.addr);
    let t = topics("enf_ref").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let log = DecisionLog::follow(&t.breaches);

    // A looping production session: 50K tokens a request.
    let looping = env("platform-search", "loop-1", "production", "agent");
    let three: Vec<_> = (0..3).map(|i| event(i, looping.clone(), 40_000, 10_000, 0)).collect();
    produce_usage(&t.usage, &three).await;
    let d = log.wait_for("per-session-loop-guard/session:loop-1", |d| d.observed == 150_000).await;
    assert_eq!((d.state, d.headroom), (DecisionState::Watch, 50_000));
    produce_usage(&t.usage, &[event(3, looping.clone(), 40_000, 10_000, 0)]).await;
    let d = log.wait_for("per-session-loop-guard/session:loop-1", |d| d.state == DecisionState::Breached).await;
    assert_eq!((d.observed, d.limit, d.action.as_str()), (200_000, 200_000, "hard_block"));
    assert!(d.window_end_us > now_us() + 3_000_000_000, "lifts in about an hour, not sooner");
    // The same volume in staging is not governed by the production rule.
    produce_usage(&t.usage, &[event(4, env("platform-search", "stage-1", "staging", "agent"), 300_000, 0, 0)]).await;

    // The intern sandbox: a hard stop at $500.
    let intern = env("intern-sandbox", "intern-1", "development", "homework");
    let spend: Vec<_> = (0..5).map(|i| event(10 + i, intern.clone(), 10, 10, 100 * USD)).collect();
    produce_usage(&t.usage, &spend[..4]).await;
    let d = log.wait_for("intern-sandbox-cap/X-TFY-Project=intern-sandbox", |d| d.observed == 400 * USD).await;
    assert_eq!(d.state, DecisionState::Watch);
    produce_usage(&t.usage, &spend[4..]).await;
    let d =
        log.wait_for("intern-sandbox-cap/X-TFY-Project=intern-sandbox", |d| d.state == DecisionState::Breached).await;
    assert_eq!((d.observed, d.action.as_str()), (500 * USD, "hard_block"));

    // platform-search: alerts at 80% and 100% of $4,000, then the cheaper model.
    let search = env("platform-search", "search-1", "development", "rank");
    produce_usage(&t.usage, &[event(20, search.clone(), 10, 10, 3_199 * USD)]).await;
    log.wait_for("platform-search-monthly/X-TFY-Project=platform-search", |d| d.observed == 3_199 * USD).await;
    produce_usage(&t.usage, &[event(21, search.clone(), 10, 10, USD)]).await;
    log.wait_for("platform-search-monthly/X-TFY-Project=platform-search", |d| d.observed == 3_200 * USD).await;
    produce_usage(
        &t.usage,
        &[event(22, search.clone(), 10, 10, 700 * USD), event(23, search.clone(), 10, 10, 100 * USD)],
    )
    .await;
    let d = log
        .wait_for("platform-search-monthly/X-TFY-Project=platform-search", |d| d.state == DecisionState::Breached)
        .await;
    assert_eq!((d.observed, d.action.as_str()), (4_000 * USD, "fallback_to_cheaper"));
    // Past 100%: no further alert.
    produce_usage(&t.usage, &[event(24, search.clone(), 10, 10, 100 * USD)]).await;

    // classify-intent: over 100,000 requests in an hour falls back to Haiku.
    let classify = env("support", "", "production", "classify-intent");
    let many: Vec<_> = (0..99_999).map(|i| event(1_000 + i, classify.clone(), 1, 1, 1)).collect();
    let started = Instant::now();
    produce_usage(&t.usage, &many).await;
    let d = log.wait_for("classify-intent-soft-cap/global", |d| d.observed == 99_999).await;
    assert_eq!(d.state, DecisionState::Watch);
    produce_usage(&t.usage, &[event(200_000, classify.clone(), 1, 1, 1)]).await;
    let d = log.wait_for("classify-intent-soft-cap/global", |d| d.state == DecisionState::Breached).await;
    assert_eq!((d.observed, d.action.as_str()), (100_000, "fallback_to_haiku"));
    eprintln!("100,000 classify-intent events produced and decided in {:?}", started.elapsed());

    // Alerts: 80% and 100%, once each, on both channels.
    let deadline = Instant::now() + Duration::from_secs(30);
    while webhooks(mock.addr).await.len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would arrive now
    let hooks = webhooks(mock.addr).await;
    let mut seen: Vec<(String, String)> = hooks
        .iter()
        .map(|h| (h["channel"].as_str().unwrap().to_owned(), h["alert_id"].as_str().unwrap_or_default().to_owned()))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 4, "{hooks:#?}");
    assert!(
        seen.iter().filter(|(c, _)| c == "slack").count() == 2
            && seen.iter().filter(|(c, _)| c == "pagerduty").count() == 2
    );
    assert!(
        seen.iter().any(|(_, id)| id.ends_with("/80")) && seen.iter().any(|(_, id)| id.ends_with("/100")),
        "{seen:?}"
    );
    let slack = hooks.iter().find(|h| h["channel"] == "slack").unwrap();
    assert!(slack["body"]["text"].as_str().unwrap().contains("platform-search-monthly"), "{slack}");
    let alerts = alerts_on(&t.alerts).await;
    assert_eq!(alerts.iter().map(|a| a.threshold_pct).collect::<Vec<_>>(), vec![80, 100]);

    // Nothing about the staging session, and versions only move forward per key.
    let all = log.all();
    assert!(all.iter().all(|d| d.scope != "session:stage-1"));
    let mut by_key = std::collections::BTreeMap::<String, i64>::new();
    for d in &all {
        let last = by_key.insert(d.key(), d.version).unwrap_or(i64::MIN);
        assert!(d.version > last, "{} went from version {last} to {}", d.key(), d.version);
    }
    drop(log);
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}

/// Starts the enforcer binary (so it can be SIGKILLed), logging to a file in `dir`.
fn spawn_enforcer(policy: &Path, t: &Topics, log_dir: &Path, n: u32) -> std::process::Child {
    let log = std::fs::File::create(log_dir.join(format!("enforcer-{n}.log"))).unwrap();
    std::process::Command::new(binary("tollgate-enforcer", "tollgate-enforcer"))
        .args(["--policy-dir", policy.to_str().unwrap()])
        .args(["--kafka-brokers", &kafka_brokers()])
        .args(["--usage-topic", &t.usage, "--breaches-topic", &t.breaches, "--alerts-topic", &t.alerts])
        .args(["--clickhouse-url", &clickhouse_url(), "--database", &t.db])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_mid_window_neither_forgets_nor_double_counts() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    reference_policy(dir.path(), mock.addr);
    let logs = tempfile::tempdir().unwrap();
    let t = topics("enf_restart").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let log = DecisionLog::follow(&t.breaches);
    let mut enforcer = spawn_enforcer(dir.path(), &t, logs.path(), 1);

    let session = env("platform-search", "restart-1", "production", "agent");
    let key = "per-session-loop-guard/session:restart-1";
    let budget = "platform-search-monthly/X-TFY-Project=platform-search";
    // 120 requests of 1,000 tokens, and $3,300 of spend: a watched session, the 80% alert.
    let mut events: Vec<_> = (0..120).map(|i| event(i, session.clone(), 800, 200, 0)).collect();
    events[0].cost_nanos = 3_300 * USD;
    produce_usage(&t.usage, &events).await;
    log.wait_for(key, |d| d.observed == 120_000).await;
    log.wait_for(budget, |d| d.observed == 3_300 * USD).await;
    assert!(eventually(Duration::from_secs(30), || async { webhooks(mock.addr).await.len() == 2 }).await);
    let before = log.all().iter().map(|d| d.version).max().unwrap();

    // SIGKILL mid-window; 50 more requests reach ClickHouse through the meter, then the meter
    // stops and 40 more stay in Kafka only.
    enforcer.kill().unwrap();
    enforcer.wait().unwrap();
    let more: Vec<_> = (120..170).map(|i| event(i, session.clone(), 800, 200, 0)).collect();
    produce_usage(&t.usage, &more).await;
    assert!(eventually(Duration::from_secs(60), || async { checkpointed(&t.db).await == 170 }).await);
    meter.stop().await;
    let rest: Vec<_> = (170..210).map(|i| event(i, session.clone(), 800, 200, 0)).collect();
    produce_usage(&t.usage, &rest).await;

    let mut enforcer = spawn_enforcer(dir.path(), &t, logs.path(), 2);
    log.wait_for(key, |d| d.version > before && d.state == DecisionState::Breached).await;
    // A breached scope's count is republished at most once a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = log.latest(key).unwrap();
    // 170 from ClickHouse (up to the meter's checkpoints) + 40 from Kafka after them. Counting
    // from the topic's start as well would give 380,000; forgetting ClickHouse, 40,000.
    assert_eq!((d.state, d.observed), (DecisionState::Breached, 210_000), "{d:?}");
    let spend = log.latest(budget).unwrap();
    assert_eq!(spend.observed, 3_300 * USD, "the budget's spend survives the restart");
    assert_eq!(webhooks(mock.addr).await.len(), 2, "the 80% alert is not sent again");
    assert_eq!(alerts_on(&t.alerts).await.len(), 1);
    enforcer.kill().unwrap();
    enforcer.wait().unwrap();
    drop(log);
    mock.stop().await;
}
