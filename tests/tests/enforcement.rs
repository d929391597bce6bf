//! The whole loop against the real stack: requests through the ingress are metered, the enforcer
//! decides on the reference's rate limits and budgets (loaded as written), and the ingress acts:
//! a looping session is blocked at 200,000 tokens an hour, the intern sandbox stops at $500,
//! platform-search falls back to the cheaper model at $4,000 with alerts at 80% and 100%, and
//! classify-intent over 100,000 requests an hour falls back to Haiku.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tollgate_schemas::decision::DecisionState;
use tollgate_schemas::usage::{Envelope, UsageEvent};

/// One chat request; returns the status, the body and the `Retry-After` header.
async fn ask(
    client: &reqwest::Client,
    ingress: SocketAddr,
    model: &str,
    headers: &[(&str, &str)],
    directive: &str,
) -> (u16, Value, Option<String>) {
    let mut req = client.post(format!("http://{ingress}/v1/chat/completions")).json(&json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("hello\n#mock {directive}")}],
    }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, resp.json().await.unwrap_or(Value::Null), retry)
}

/// Sends until the ingress answers 429 (the enforcer's decision has arrived) or 30 s pass.
async fn until_blocked(
    client: &reqwest::Client,
    ingress: SocketAddr,
    model: &str,
    headers: &[(&str, &str)],
) -> (Value, String, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut passed = 0;
    loop {
        let (status, body, retry) = ask(client, ingress, model, headers, "prompt_tokens=1 completion_tokens=1").await;
        if status == 429 {
            return (body, retry.expect("a 429 carries Retry-After"), passed);
        }
        assert_eq!(status, 200, "{body}");
        passed += 1;
        assert!(Instant::now() < deadline, "not blocked within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reference_policy_governs_requests_through_the_ingress() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let t = topics("enforce").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let spool = tempfile::tempdir().unwrap();
    let mut config = ingress_config(dir.path(), &kafka_brokers(), &t.usage, spool.path());
    config.breaches_topic = t.breaches.clone();
    let ingress = start_ingress_with(config).await;
    let log = DecisionLog::follow(&t.breaches);
    let client = reqwest::Client::new();
    let gw = ingress.addr;

    // 1. A production session is blocked once it passes 200,000 tokens in an hour.
    let looping = [("X-TFY-Project", "agents"), ("X-TFY-Session-ID", "loop-1"), ("X-TFY-Environment", "production")];
    for _ in 0..4 {
        let (status, body, _) =
            ask(&client, gw, "vm-openai", &looping, "prompt_tokens=45000 completion_tokens=5000").await;
        assert_eq!(status, 200, "{body}");
    }
    let (body, retry, passed) = until_blocked(&client, gw, "vm-openai", &looping).await;
    let e = &body["error"];
    assert_eq!((e["rule"].as_str(), e["scope"].as_str()), (Some("per-session-loop-guard"), Some("session:loop-1")));
    assert_eq!(e["limit"], 200_000);
    assert!(e["observed"].as_i64().unwrap() >= 200_000, "{body}");
    let retry: u64 = retry.parse().unwrap();
    assert!((3_000..=3_700).contains(&retry), "the oldest usage leaves the hour in about an hour: {retry}");
    eprintln!("session blocked after {passed} more request(s)");
    // Another session of the same user is not affected.
    let other = [("X-TFY-Project", "agents"), ("X-TFY-Session-ID", "loop-2"), ("X-TFY-Environment", "production")];
    assert_eq!(ask(&client, gw, "vm-openai", &other, "prompt_tokens=10 completion_tokens=1").await.0, 200);

    // 2. The intern sandbox stops at $500: five $100 requests on the frontier model.
    let intern = [("X-TFY-Project", "intern-sandbox"), ("X-TFY-Session-ID", "intern-1")];
    for _ in 0..5 {
        let (status, body, _) =
            ask(&client, gw, "vm-premium", &intern, "prompt_tokens=20000000 completion_tokens=0").await;
        assert_eq!(status, 200, "{body}");
    }
    let (body, _, _) = until_blocked(&client, gw, "vm-premium", &intern).await;
    assert_eq!(body["error"]["rule"], "intern-sandbox-cap");
    assert_eq!(body["error"]["limit"], 500_000_000_000i64);

    // 3. platform-search: $3,200 (80%), then $4,000 (100%): the cheaper model from then on.
    let search = [("X-TFY-Project", "platform-search"), ("X-TFY-Session-ID", "search-1")];
    for _ in 0..4 {
        let (status, body, _) =
            ask(&client, gw, "vm-premium", &search, "prompt_tokens=160000000 completion_tokens=0").await;
        assert_eq!((status, body["model"].as_str()), (200, Some("claude-opus-4-7")), "{body}");
    }
    log.wait_for("platform-search-monthly/X-TFY-Project=platform-search", |d| d.observed == 3_200_000_000_000).await;
    let (status, _, _) = ask(&client, gw, "vm-premium", &search, "prompt_tokens=160000000 completion_tokens=0").await;
    assert_eq!(status, 200);
    log.wait_for("platform-search-monthly/X-TFY-Project=platform-search", |d| d.state == DecisionState::Breached).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let model = loop {
        let (status, body, _) = ask(&client, gw, "vm-premium", &search, "prompt_tokens=10 completion_tokens=1").await;
        assert_eq!(status, 200, "{body}");
        let model = body["model"].as_str().unwrap().to_owned();
        if model != "claude-opus-4-7" || Instant::now() > deadline {
            break model;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(model, "claude-haiku-4-5", "fallback_to_cheaper: the virtual model's cheaper fallback");
    assert!(
        eventually(Duration::from_secs(30), || async { webhooks(mock.addr).await.len() >= 4 }).await,
        "alerts at 80% and 100% on Slack and PagerDuty"
    );

    // 4. classify-intent over 100,000 requests in an hour falls back to Haiku. 99,999 of them
    // are produced straight to the usage topic (as other ingresses would), the rest is real.
    let classify =
        [("X-TFY-Project", "support"), ("X-TFY-Session-ID", "cls-1"), ("X-TFY-Workflow-Tag", "classify-intent")];
    let (status, body, _) = ask(&client, gw, "vm-openai", &classify, "prompt_tokens=5 completion_tokens=1").await;
    assert_eq!((status, body["model"].as_str()), (200, Some("gpt-4o-mini")), "under the cap: the normal route");
    let now = now_us();
    let others: Vec<UsageEvent> = (0..99_999u64)
        .map(|i| UsageEvent {
            envelope: Envelope {
                project: Some("support".into()),
                session_id: Some(format!("cls-other-{}", i % 1000)),
                workflow_tag: Some("classify-intent".into()),
                ..Envelope::default()
            },
            input_tokens: 5,
            output_tokens: 1,
            ..UsageEvent::example(uuid::Uuid::now_v7().to_string(), None, now)
        })
        .collect();
    produce_usage(&t.usage, &others).await;
    log.wait_for("classify-intent-soft-cap/global", |d| d.state == DecisionState::Breached).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let model = loop {
        let (status, body, _) = ask(&client, gw, "vm-openai", &classify, "prompt_tokens=5 completion_tokens=1").await;
        assert_eq!(status, 200, "{body}");
        let model = body["model"].as_str().unwrap().to_owned();
        if model != "gpt-4o-mini" || Instant::now() > deadline {
            break model;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(model, "claude-haiku-4-5", "fallback_to_haiku");
    // Other workflows keep their route.
    let other = [("X-TFY-Project", "support"), ("X-TFY-Session-ID", "sum-1"), ("X-TFY-Workflow-Tag", "summarize")];
    let (_, body, _) = ask(&client, gw, "vm-openai", &other, "prompt_tokens=5 completion_tokens=1").await;
    assert_eq!(body["model"], "gpt-4o-mini");

    // The usage events record the decision that shaped each request.
    assert!(
        eventually(Duration::from_secs(60), || async {
            ch_count(&format!(
                "SELECT count() FROM {}.usage_events FINAL WHERE decision_rule_id = 'classify-intent-soft-cap' AND model = 'claude-haiku-4-5'",
                t.db
            ))
            .await
                >= 1
        })
        .await
    );
    let blocked = ch_count(&format!(
        "SELECT count() FROM {}.usage_events FINAL WHERE status = 'rejected' AND decision_rule_id IN ('per-session-loop-guard', 'intern-sandbox-cap') AND http_status = 429",
        t.db
    ))
    .await;
    assert!(blocked >= 2, "refused requests are recorded with their decision: {blocked}");

    drop(log);
    ingress.stop().await;
    enforcer.stop().await;
    // Exactly once: stopped, the enforcer has delivered all it ever will.
    let hooks = webhooks(mock.addr).await;
    let mut ids: Vec<String> = hooks
        .iter()
        .map(|h| format!("{}:{}", h["channel"].as_str().unwrap(), h["alert_id"].as_str().unwrap()))
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 4, "exactly once each: {ids:#?}");
    assert!(ids[0].starts_with("pagerduty:platform-search-monthly/") && ids[0].ends_with("/100"), "{ids:?}");
    assert!(ids[1].ends_with("/80") && ids[2].ends_with("/100") && ids[3].ends_with("/80"), "{ids:?}");
    meter.stop().await;
    mock.stop().await;
}
