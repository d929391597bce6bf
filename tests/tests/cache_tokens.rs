//! One definition of each token quantity, end to end: cache reads and writes reported by the
//! provider in both wire formats are counted once, by the enforcer's token limit and by the
//! failure-mode views (context stuffing, loops, tokenizer drift), exactly as the provider reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tollgate_schemas::decision::DecisionState;

/// A session cap of 5,000 tokens an hour; its Watch decisions carry the observed total from 2,500.
const RULES: &str = "name: cache-rules\ntype: gateway-rate-limit-config\nrules:\n  - id: session-cap\n    limit: {tokens: 5000, window: 1h, scope: session}\n    on_breach: hard_block\n";

/// Every request: 1,000 prompt tokens of which most came from the cache, and 50 written.
const PROMPT: i64 = 1_000;
const COMPLETION: i64 = 50;

/// One request in the client's wire format; the provider (the mock) answers in its own.
async fn ask(
    http: &reqwest::Client,
    ingress: std::net::SocketAddr,
    anthropic_client: bool,
    stream: bool,
    directive: &str,
) {
    let text = format!("summarise the cached context\n#mock {directive}");
    let (path, body) = if anthropic_client {
        (
            "/v1/messages",
            json!({"model": "vm-anthropic", "max_tokens": 200, "stream": stream, "messages": [{"role": "user", "content": text}]}),
        )
    } else {
        (
            "/v1/chat/completions",
            json!({"model": "vm-openai", "stream": stream, "messages": [{"role": "user", "content": text}]}),
        )
    };
    let resp = http
        .post(format!("http://{ingress}{path}"))
        .header("X-TFY-Project", "cache-project")
        .header("X-TFY-Session-ID", "cached-session")
        .header("X-TFY-Workflow-Tag", "cached-workflow")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_tokens_are_counted_once_by_limits_and_views() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), mock.addr);
    std::fs::write(dir.path().join("cache-rules.yaml"), RULES).unwrap();
    let t = topics("cache").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let ingress = start_ingress(dir.path(), &t.usage).await;
    let log = DecisionLog::follow(&t.breaches);
    let http = reqwest::Client::new();

    // OpenAI reports prompt_tokens with the cached part inside; Anthropic reports the uncached
    // input, the cache reads and the cache writes apart. Both are 1,000 tokens read.
    let openai = format!("prompt_tokens={PROMPT} completion_tokens={COMPLETION} cached_tokens=900");
    let anthropic =
        format!("prompt_tokens={PROMPT} completion_tokens={COMPLETION} cached_tokens=600 cache_write_tokens=300");
    ask(&http, ingress.addr, false, false, &openai).await;
    ask(&http, ingress.addr, false, true, &openai).await;
    ask(&http, ingress.addr, true, false, &anthropic).await;
    ask(&http, ingress.addr, true, true, &anthropic).await;
    let per_request = PROMPT + COMPLETION;
    // Counting the cache a second time would have made this 7,900 and breached the cap.
    let d = log.wait_for("session-cap/session:cached-session", |d| d.observed == 4 * per_request).await;
    assert_eq!((d.state, d.limit), (DecisionState::Watch, 5_000));
    ask(&http, ingress.addr, true, false, &anthropic).await;
    let d = log.wait_for("session-cap/session:cached-session", |d| d.state == DecisionState::Breached).await;
    assert_eq!(d.observed, 5 * per_request, "breached at what the provider reported");

    // The stored rows hold what the provider reported, cache parts apart for pricing.
    let rows_sql = format!("SELECT count() FROM {}.usage_events FINAL", t.db);
    wait_for_count(&rows_sql, 5, Duration::from_secs(60)).await;
    let raw = ch(&format!(
        "SELECT sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), sum(cache_write_tokens), \
         sum(reference_input_tokens) FROM {}.usage_events FINAL FORMAT TabSeparated",
        t.db
    ))
    .await;
    let raw: Vec<i64> = raw.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(raw[..4], [5 * PROMPT, 5 * COMPLETION, 2 * 900 + 3 * 600, 3 * 300]);
    let reference = raw[4];
    assert!(reference > 0);

    // The failure-mode views say the same.
    let stuffing = ch(&format!(
        "SELECT requests, prompt_tokens, max_prompt_tokens FROM {}.context_stuffing_by_workflow \
         WHERE workflow_tag = 'cached-workflow' FORMAT TabSeparated",
        t.db
    ))
    .await;
    assert_eq!(stuffing.trim(), format!("5\t{}\t{PROMPT}", 5 * PROMPT), "context stuffing");
    let loops = ch(&format!(
        "SELECT requests, tokens FROM {}.loop_session_hours WHERE session_id = 'cached-session' FORMAT TabSeparated",
        t.db
    ))
    .await;
    assert_eq!(loops.trim(), format!("5\t{}", 5 * per_request), "loop figure");
    let drift = ch(&format!(
        "SELECT sum(prompt_tokens), sum(reference_tokens), sum(prompt_tokens) / sum(reference_tokens) \
         FROM {}.tokenizer_drift FORMAT TabSeparated",
        t.db
    ))
    .await;
    let drift: Vec<&str> = drift.split_whitespace().collect();
    assert_eq!(drift[0].parse::<i64>().unwrap(), 5 * PROMPT, "drift: prompt tokens");
    assert_eq!(drift[1].parse::<i64>().unwrap(), reference, "drift: reference tokens");
    let ratio: f64 = drift[2].parse().unwrap();
    let expected = (5 * PROMPT) as f64 / reference as f64;
    assert!((ratio - expected).abs() < 1e-9, "drift ratio {ratio} against {expected}: cache hits must not raise it");

    ingress.stop().await;
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}
