//! The decision follower's fetch wait follows the ingress's traffic (issue 11): after a quiet
//! spell it takes the long wait (the stack at rest costs the broker little), and the first
//! request afterwards takes the short one back, so a decision published meanwhile blocks its
//! scope within moments. Its own binary: the gauge it reads is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use serde_json::json;
use tollgate_schemas::decision::{BreachDecision, DecisionState};

const RULES: &str = "type: gateway-rate-limit-config\nname: quiet-test\nrules:\n  - id: block\n    limit: {tokens: 1000, window: 1h, scope: session}\n    on_breach: hard_block\n";

fn quiet_gauge() -> Option<f64> {
    common::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_kafka_consumer_quiet{consumer=\"decisions\"} ")?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_follower_takes_its_short_wait_back_at_the_first_request() {
    let usage = common::unique("quiet_usage");
    let breaches = common::unique("quiet_breaches");
    common::create_topic(&usage, 1).await;
    common::create_topic(&breaches, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("quiet-rules.yaml"), RULES).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let mut config = common::ingress_config(policy.path(), &common::kafka_brokers(), &usage, spool.path());
    config.breaches_topic = breaches.clone();
    let ingress = common::start_ingress_with(config).await;
    let http = reqwest::Client::new();
    let ask = |session: &'static str| {
        http.post(format!("http://{}/v1/chat/completions", ingress.addr))
            .header("X-TFY-Project", "quiet")
            .header("X-TFY-Session-ID", session)
            .json(&json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(ask("warm-up").await.unwrap().status(), 200);

    // No request for QUIET_AFTER: the follower switches to its long wait.
    let quiet =
        common::until_at_least(1, Duration::from_secs(60), || async { u64::from(quiet_gauge() == Some(1.0)) }).await;
    assert!(quiet.is_ok(), "the follower never went quiet: {:?}", quiet_gauge());

    // A decision arrives while the ingress is quiet; the next requests wake the follower.
    let codec = BreachDecision::codec().unwrap();
    let d = BreachDecision {
        window_end_us: common::now_us() + 3_600_000_000,
        ..BreachDecision::example("block", "session:sleeper", DecisionState::Breached, 1)
    };
    common::usage_producer()
        .send(FutureRecord::to(&breaches).key(&d.key()).payload(&codec.encode(&d).unwrap()), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let woke = Instant::now();
    let mut passed = 0;
    loop {
        let status = ask("sleeper").await.unwrap().status().as_u16();
        if status == 429 {
            break;
        }
        assert_eq!(status, 200);
        passed += 1;
        assert!(woke.elapsed() < Duration::from_secs(30), "the decision never applied ({passed} requests passed)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("blocked {:?} after the first request of the burst ({passed} passed before)", woke.elapsed());
    let active =
        common::until_at_least(1, Duration::from_secs(30), || async { u64::from(quiet_gauge() == Some(0.0)) }).await;
    assert!(active.is_ok(), "the requests did not take the short wait back: {:?}", quiet_gauge());
    ingress.stop().await;
    mock.stop().await;
}
