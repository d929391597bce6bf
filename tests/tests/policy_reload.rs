//! Policy hot reload under a running ingress: a valid change to the policy directory takes
//! effect (routing, prices and rules together), an invalid one keeps the running policy, SIGHUP
//! reloads; and `tollgate-ingress check-config` reports every error with file, line and field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use tollgate_ingress::ReloadOptions;
use tollgate_schemas::decision::{BreachDecision, DecisionState};
use tollgate_schemas::usage::UsageEvent;

const RULES_BEFORE: &str = "\
type: gateway-rate-limit-config
name: reload-test
rules:
  - id: old-rule
    limit: {tokens: 1000, window: 1h, scope: session}
    on_breach: hard_block
";

const RULES_AFTER: &str = "\
type: gateway-rate-limit-config
name: reload-test
rules:
  - id: old-rule
    limit: {tokens: 1000, window: 1h, scope: session}
    on_breach: hard_block
  - id: new-rule
    limit: {tokens: 1000, window: 1h, scope: session}
    on_breach: hard_block
";

const NEW_MODEL: &str = "\
name: vm-new
type: gateway-load-balancing-config
rule_type: priority-based
rules:
  - {id: a, priority: 1, target: {provider: openai-mock, model: gpt-4o-mini}, timeout_ms: 5000}
";

/// The test price card with another version and gpt-4o-mini at twice the price.
const PRICES_AFTER: &str = "\
type: tollgate-price-card
version: test-2
prices:
  - {provider: openai-mock, model: gpt-4o-mini, input_usd_per_mtok: 0.30, output_usd_per_mtok: 1.20}
  - {provider: anthropic-mock, model: claude-haiku-4-5, input_usd_per_mtok: 1.00, output_usd_per_mtok: 5.00}
  - {provider: dead, model: gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60}
";

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

async fn publish_block(topic: &str, rule: &str, session: &str) {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", common::kafka_brokers()).create().unwrap();
    let d = BreachDecision {
        observed: 1001,
        window_start_us: now_us(),
        window_end_us: now_us() + 60_000_000,
        decided_at_us: now_us(),
        ..BreachDecision::example(rule, format!("session:{session}"), DecisionState::Breached, 1)
    };
    let payload = BreachDecision::codec().unwrap().encode(&d).unwrap();
    producer
        .send(FutureRecord::to(topic).key(&d.key()).payload(&payload), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

async fn status(ingress: std::net::SocketAddr, model: &str, session: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{ingress}/v1/chat/completions"))
        .header("X-TFY-Project", "reload")
        .header("X-TFY-Session-ID", session)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi\n#mock prompt_tokens=100 completion_tokens=10"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until the request answers `want`; returns whether it did within `within`.
async fn becomes(ingress: std::net::SocketAddr, model: &str, session: &str, want: u16, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if status(ingress, model, session).await == want {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The usage events of `session` on the one-partition `topic`, once there are `n`.
async fn usage_of(topic: &str, session: &str, n: usize) -> Vec<UsageEvent> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .set("group.id", common::unique("reload_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let codec = UsageEvent::codec().unwrap();
    let mut found = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while found.len() < n && Instant::now() < end {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            let ev: UsageEvent = codec.decode(m.payload().unwrap()).unwrap();
            if ev.envelope.session_id.as_deref() == Some(session) {
                found.push(ev);
            }
        }
    }
    assert_eq!(found.len(), n, "usage events of {session}");
    found
}

/// A metric line's value, e.g. `tollgate_policy_reloads_total{outcome="invalid"}`.
fn metric_value(name_and_labels: &str) -> f64 {
    common::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

struct Setup {
    mock: common::Service,
    policy: tempfile::TempDir,
    usage: String,
    breaches: String,
}

async fn setup(name: &str) -> Setup {
    let usage = common::unique(&format!("usage_{name}"));
    let breaches = common::unique(&format!("breaches_{name}"));
    common::create_topic(&usage, 1).await;
    common::create_topic(&breaches, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("rules.yaml"), RULES_BEFORE).unwrap();
    Setup { mock, policy, usage, breaches }
}

async fn start(s: &Setup, reload: ReloadOptions) -> common::Service {
    let spool = tempfile::tempdir().unwrap();
    let mut config = common::ingress_config(s.policy.path(), &common::kafka_brokers(), &s.usage, spool.path());
    config.breaches_topic = s.breaches.clone();
    config.reload = Some(reload);
    let mut ingress = common::start_ingress_with(config).await;
    ingress.temp = Some(spool);
    ingress
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_takes_effect_and_an_invalid_one_keeps_the_running_policy() {
    let s = setup("reload").await;
    let fast =
        ReloadOptions { poll: Some(Duration::from_millis(200)), sighup: false, settle: Duration::from_millis(100) };
    let ingress = start(&s, fast).await;
    let dir = s.policy.path();

    // Before: no vm-new; a decision for a rule the policy does not have yet changes nothing.
    publish_block(&s.breaches, "new-rule", "r1").await;
    publish_block(&s.breaches, "old-rule", "barrier").await;
    assert!(becomes(ingress.addr, "vm-openai", "barrier", 429, Duration::from_secs(20)).await, "decisions are read");
    assert_eq!(status(ingress.addr, "vm-new", "r0").await, 404);
    assert_eq!(status(ingress.addr, "vm-openai", "r1").await, 200, "new-rule is not a rule yet");
    assert_eq!(status(ingress.addr, "vm-openai", "p1").await, 200);

    // A valid change: a virtual model, the price card and a rule, in three files.
    std::fs::write(dir.join("reload-models.yaml"), NEW_MODEL).unwrap();
    std::fs::write(dir.join("prices.yaml"), PRICES_AFTER).unwrap();
    std::fs::write(dir.join("rules.yaml"), RULES_AFTER).unwrap();
    let changed = Instant::now();
    assert!(
        becomes(ingress.addr, "vm-new", "r2", 200, Duration::from_secs(10)).await,
        "vm-new is served after the reload"
    );
    eprintln!("reload took effect {:.2} s after the files changed", changed.elapsed().as_secs_f64());
    assert_eq!(status(ingress.addr, "vm-openai", "r1").await, 429, "new-rule came with the same reload");
    assert_eq!(status(ingress.addr, "vm-openai", "p2").await, 200);
    let before = &usage_of(&s.usage, "p1", 1).await[0];
    let after = &usage_of(&s.usage, "p2", 1).await[0];
    assert_eq!((before.price_card_version.as_str(), after.price_card_version.as_str()), ("test-1", "test-2"));
    assert_eq!(before.cost_nanos, 100 * 150 + 10 * 600, "the first card's gpt-4o-mini price");
    assert_eq!(after.cost_nanos, 100 * 300 + 10 * 1200, "the reloaded card's price");

    // An invalid change: nothing applies, the running policy stays, the error is counted.
    let invalid_before = metric_value("tollgate_policy_reloads_total{outcome=\"invalid\"}");
    std::fs::write(
        dir.join("reload-models.yaml"),
        "name: vm-newer\ntype: gateway-load-balancing-config\nrule_typo: x\n",
    )
    .unwrap();
    std::fs::write(dir.join("rules.yaml"), RULES_BEFORE).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while metric_value("tollgate_policy_reloads_total{outcome=\"invalid\"}") <= invalid_before {
        assert!(Instant::now() < end, "the invalid directory was never tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric_value("tollgate_policy_valid"), 0.0);
    assert_eq!(status(ingress.addr, "vm-new", "r3").await, 200, "vm-new is still served");
    assert_eq!(status(ingress.addr, "vm-newer", "r3").await, 404);
    assert_eq!(
        status(ingress.addr, "vm-openai", "r1").await,
        429,
        "new-rule is still a rule (rules.yaml's edit is not half-applied)"
    );

    // Fixed: the directory as it now is applies (vm-new gone, new-rule gone).
    std::fs::remove_file(dir.join("reload-models.yaml")).unwrap();
    assert!(becomes(ingress.addr, "vm-new", "r4", 404, Duration::from_secs(10)).await, "the fixed directory applies");
    assert_eq!(status(ingress.addr, "vm-openai", "r1").await, 200, "new-rule is gone with it");
    assert_eq!(metric_value("tollgate_policy_valid"), 1.0);

    ingress.stop().await;
    s.mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_polling_is_off() {
    let s = setup("hup").await;
    let ingress = start(&s, ReloadOptions { poll: None, sighup: true, settle: Duration::from_millis(50) }).await;
    assert_eq!(status(ingress.addr, "vm-new", "h1").await, 404);
    std::fs::write(s.policy.path().join("reload-models.yaml"), NEW_MODEL).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(ingress.addr, "vm-new", "h2").await, 404, "no polling: the change waits for SIGHUP");
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert!(becomes(ingress.addr, "vm-new", "h3", 200, Duration::from_secs(10)).await, "SIGHUP reloaded");
    ingress.stop().await;
    s.mock.stop().await;
}

fn check_config(dir: &Path) -> (i32, String, String) {
    let bin = common::binary("tollgate-ingress", "tollgate-ingress");
    let out = std::process::Command::new(bin)
        .args(["check-config", "--policy-dir"])
        .arg(dir)
        .env_remove("TOLLGATE_POLICY_DIR")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn check_config_prints_every_error_or_a_summary() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    let (code, out, err) = check_config(&demo);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is valid: 4 providers, 2 virtual models, 2 API keys"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&demo).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("zz-bad.yaml"),
        "name: x\ntype: gateway-load-balancing-config\nrule_type: weight-based\nrules:\n  - id: r\n    weight: 1\n    target: {provider: nope, model: m}\n---\ntype: gateway-rate-limit-config\nname: y\nrules:\n  - id: z\n    limit: {tokens: 5, window: 1y}\n    on_breach: explode\n",
    )
    .unwrap();
    let (code, out, err) = check_config(dir.path());
    assert_eq!(code, 2, "{out}{err}");
    let file = dir.path().join("zz-bad.yaml");
    for want in [
        format!("{}:1: rules[0].target.provider: unknown provider \"nope\"", file.display()),
        format!("{}:1: rules[0].target.model: nope/m has no price", file.display()),
        format!("{}:9: rules[0].limit.window:", file.display()),
        format!("{}:9: rules[0].on_breach: unknown action \"explode\"", file.display()),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    assert!(err.contains("4 error(s)"), "{err}");
}
