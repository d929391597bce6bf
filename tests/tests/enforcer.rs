//! The enforcer against the real broker and ClickHouse: the reference's rate limits and budgets,
//! loaded as written, decide as written; alerts reach a webhook receiver once per threshold; a
//! restart (SIGKILL) neither forgets spend nor counts it twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tollgate_schemas::decision::DecisionState;
use tollgate_schemas::usage::{Envelope, UsageEvent};

const USD: i64 = 1_000_000_000;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reference_rules_decide_as_written() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let t = topics("enf_ref").await;
    let mut mc = meter_config(&t.usage, &t.db);
    mc.history = Some((t.breaches.clone(), t.alerts.clone()));
    let meter = start_meter(mc).await;
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
    // Every event is decided (the last decision above came from the last event); stopping the
    // enforcer ends every delivery it started, so what the receiver holds now is all it gets.
    enforcer.stop().await;
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
    // The meter keeps every decision and alert in ClickHouse, once each.
    let db = &t.db;
    assert!(
        eventually(Duration::from_secs(30), || async {
            ch_count(&format!("SELECT count() FROM {db}.breach_history FINAL")).await == all.len() as u64
        })
        .await,
        "breach_history holds the {} decisions published",
        all.len()
    );
    assert_eq!(
        ch(&format!("SELECT groupArray(threshold_pct) FROM (SELECT threshold_pct FROM {db}.alerts ORDER BY threshold_pct) FORMAT TabSeparated")).await.trim(),
        "[80,100]"
    );
    let breached = ch(&format!(
        "SELECT rule_id, observed, action FROM {db}.breaches WHERE state = 'breached' AND rule_id = 'intern-sandbox-cap' FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(breached.trim(), "intern-sandbox-cap\t500000000000\thard_block");
    assert!(all.iter().all(|d| d.scope != "session:stage-1"));
    let mut by_key = std::collections::BTreeMap::<String, i64>::new();
    for d in &all {
        let last = by_key.insert(d.key(), d.version).unwrap_or(i64::MIN);
        assert!(d.version > last, "{} went from version {last} to {}", d.key(), d.version);
    }
    drop(log);
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
        .args(["--listen", "127.0.0.1:0", "--instance-id", "enforcer", "--lease-topic", &lease_topic(&t.breaches)])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_mid_window_neither_forgets_nor_double_counts() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
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
    assert_eq!(until_at_least(170, Duration::from_secs(60), || checkpointed(&t.db)).await, Ok(170));
    meter.stop().await;
    let rest: Vec<_> = (170..210).map(|i| event(i, session.clone(), 800, 200, 0)).collect();
    produce_usage(&t.usage, &rest).await;

    let mut enforcer = spawn_enforcer(dir.path(), &t, logs.path(), 2);
    // A breached scope's count is republished at most once a second: wait for the one that has
    // read everything (or more, which the assertion below refuses).
    let d =
        log.wait_for(key, |d| d.version > before && d.state == DecisionState::Breached && d.observed >= 210_000).await;
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

/// A usage event for the guard test: `model`/`version` on the Anthropic-kind mock provider.
fn guard_event(session: &str, workflow: &str, model: &str, version: &str, ended_us: i64) -> UsageEvent {
    UsageEvent {
        provider: "anthropic-mock".into(),
        model: model.into(),
        model_version: Some(version.into()),
        envelope: Envelope {
            project: Some("guards".into()),
            session_id: Some(session.into()),
            workflow_tag: Some(workflow.into()),
            ..Envelope::default()
        },
        ..UsageEvent::example(uuid::Uuid::now_v7().to_string(), None, ended_us)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_anomaly_guards_find_the_loop_the_stuffing_the_drift_and_the_frontier_share() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    std::fs::copy(reference.join("anomaly-guards.yaml"), dir.path().join("anomaly-guards.yaml")).unwrap();
    let m = mock.addr;
    std::fs::write(
        dir.path().join("channels.yaml"),
        format!(
            "type: tollgate-alert-channels\nchannels:\n  - {{name: \"slack:#ai-budget-alerts\", url: \"http://{m}/webhooks/slack\"}}\n  - {{name: \"pagerduty:platform\", url: \"http://{m}/webhooks/pagerduty\", routing_key: k}}\n  - {{name: \"webhook:finops\", url: \"http://{m}/webhooks/finops\"}}\n"
        ),
    )
    .unwrap();
    let t = topics("enf_guards").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;

    // History, two hours ago: 30 agent sessions of 1,000 tokens (the loop baseline: p95 = 1,000),
    // and 30 requests on version 4-6 whose provider counts equal the reference estimate.
    let hour_us = 3_600_000_000;
    let past = (now_us() / hour_us - 2) * hour_us + 60_000_000;
    let mut history = Vec::new();
    for i in 0..30 {
        history.push(UsageEvent {
            input_tokens: 800,
            output_tokens: 200,
            ..guard_event(&format!("agent-{i}"), "agent", "claude-haiku-4-5", "claude-haiku-4-5", past + i * 1_000_000)
        });
        history.push(UsageEvent {
            input_tokens: 1_000,
            reference_input_tokens: Some(1_000),
            ..guard_event(&format!("old-{i}"), "review", "claude-opus-4-7", "claude-opus-4-6", past + i * 1_000_000)
        });
    }
    produce_usage(&t.usage, &history).await;
    assert_eq!(until_at_least(60, Duration::from_secs(60), || checkpointed(&t.db)).await, Ok(60));

    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let log = DecisionLog::follow(&t.breaches);
    let now = now_us();
    let mut live = Vec::new();
    // A looping agent: 4 × 1,000 tokens this hour, above 3 × its workflow's p95.
    for i in 0..4 {
        live.push(UsageEvent {
            input_tokens: 800,
            output_tokens: 200,
            ..guard_event("loop-x", "agent", "claude-haiku-4-5", "", now + i)
        });
    }
    // A normal agent session: 2,000 tokens.
    for i in 0..2 {
        live.push(UsageEvent {
            input_tokens: 800,
            output_tokens: 200,
            ..guard_event("fine-x", "agent", "claude-haiku-4-5", "", now + i)
        });
    }
    // Context stuffing: 20 requests of 60K input tokens in `rag`.
    for i in 0..20 {
        live.push(UsageEvent { input_tokens: 60_000, ..guard_event("rag-1", "rag", "claude-haiku-4-5", "", now + i) });
    }
    // Tokenizer drift: version 4-7 reads the same prompts as 30% more tokens, 25 requests, in
    // `review`, whose spend is all on the frontier model (cost share 100% > 50%).
    for i in 0..25 {
        live.push(UsageEvent {
            input_tokens: 1_300,
            reference_input_tokens: Some(1_000),
            cost_nanos: 1_000_000_000,
            // One request per session: no session of `review` is anywhere near a loop.
            ..guard_event(&format!("review-{i}"), "review", "claude-opus-4-7", "claude-opus-4-7", now + i)
        });
    }
    produce_usage(&t.usage, &live).await;

    let d = log.wait_for("session-loop-guard/session:loop-x", |d| d.state == DecisionState::Breached).await;
    assert_eq!((d.observed, d.limit, d.action.as_str()), (4_000, 3_000, "hard_block"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let kinds = || async {
        let mut v: Vec<String> =
            alerts_on(&t.alerts).await.iter().map(|a| format!("{}:{}", a.kind.as_str(), a.scope)).collect();
        v.sort();
        v
    };
    while kinds().await.len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Stopped, the enforcer has published and delivered all it will for these events (a sweep
    // re-alerting is the guards' unit tests' concern: context_stuffing_alerts_once_per_window).
    enforcer.stop().await;
    assert_eq!(
        kinds().await,
        vec![
            "context_stuffing:workflow:rag",
            "frontier_cost_share:workflow:review",
            "loop_guard:session:loop-x",
            "tokenizer_drift:model:anthropic-mock/claude-opus-4-7@claude-opus-4-7",
        ]
    );
    assert!(log.latest("session-loop-guard/session:fine-x").is_none(), "a normal session is left alone");
    let hooks = webhooks(mock.addr).await;
    let count = |c: &str| hooks.iter().filter(|h| h["channel"] == c).count();
    assert_eq!((count("slack"), count("finops")), (2, 2), "loop + drift to Slack, stuffing + share to finops");
    drop(log);
    meter.stop().await;
    mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_policy_is_enforced_at_once_and_a_broken_one_changes_nothing() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let t = topics("enf_reload").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let log = DecisionLog::follow(&t.breaches);
    let key = "intern-sandbox-cap/X-TFY-Project=intern-sandbox";
    let intern = env("intern-sandbox", "i-1", "development", "homework");
    let spend: Vec<_> = (0..4).map(|i| event(i, intern.clone(), 10, 10, 100 * USD)).collect();
    produce_usage(&t.usage, &spend).await;
    let d = log.wait_for(key, |d| d.observed == 400 * USD).await;
    assert_eq!((d.state, d.limit), (DecisionState::Watch, 500 * USD));

    // A broken edit: the enforcer keeps the policy it has.
    let budgets = dir.path().join("budgets.yaml");
    let good = std::fs::read_to_string(&budgets).unwrap();
    let invalid = || common::metric(&common::metrics().render(), "tollgate_policy_reloads_total{outcome=\"invalid\"}");
    let invalid_before = invalid();
    std::fs::write(&budgets, good.replace("ceiling_usd: 500", "ceiling_usd: lots")).unwrap();
    // Waits for the reload to have been tried and refused, then checks that it changed nothing.
    assert!(
        common::eventually(Duration::from_secs(30), || async { invalid() > invalid_before }).await,
        "the broken policy was read and refused"
    );
    assert_eq!(log.latest(key).unwrap().version, d.version, "nothing new from a policy that does not load");

    // The interns' cap cut to $300: the $400 already spent breaches it.
    std::fs::write(&budgets, good.replace("ceiling_usd: 500", "ceiling_usd: 300")).unwrap();
    let d = log.wait_for(key, |d| d.state == DecisionState::Breached).await;
    assert_eq!((d.observed, d.limit), (400 * USD, 300 * USD), "rebuilt from ClickHouse and Kafka, not counted twice");
    drop(log);
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}
