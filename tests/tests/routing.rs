//! Virtual-model routing through the real ingress: weights, fallback order, circuit breakers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

/// A provider whose health the test switches: 503 while `failing`, else a minimal completion.
struct Switchable {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
}

async fn start_switchable() -> Switchable {
    let calls = Arc::new(AtomicU64::new(0));
    let failing = Arc::new(AtomicBool::new(true));
    let (c, f) = (calls.clone(), failing.clone());
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let (c, f) = (c.clone(), f.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"error": {"message": "overloaded", "type": "server_error"}})))
                } else {
                    (StatusCode::OK, axum::Json(json!({"id": "x", "object": "chat.completion", "model": "flaky-1",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Switchable { addr, calls, failing }
}

fn write_policy(dir: &std::path::Path, mock: SocketAddr, flaky: SocketAddr) {
    let providers = format!(
        "type: tollgate-providers\nproviders:\n  - {{name: heavy, kind: openai, base_url: \"http://{mock}/v1\"}}\n  - {{name: light, kind: openai, base_url: \"http://{mock}/v1\"}}\n  - {{name: claude, kind: anthropic, base_url: \"http://{mock}/v1\"}}\n  - {{name: dead-a, kind: openai, base_url: \"http://127.0.0.1:1/v1\"}}\n  - {{name: dead-b, kind: openai, base_url: \"http://127.0.0.1:2/v1\"}}\n  - {{name: flaky, kind: openai, base_url: \"http://{flaky}/v1\"}}\n"
    );
    let prices = "type: tollgate-price-card\nversion: routing-1\nprices:\n".to_owned()
        + &["heavy", "light", "dead-a", "dead-b", "flaky"]
            .iter()
            .map(|p| format!("  - {{provider: {p}, model: m, input_usd_per_mtok: 1, output_usd_per_mtok: 2}}\n"))
            .collect::<String>()
        + "  - {provider: claude, model: claude-haiku-4-5, input_usd_per_mtok: 1, output_usd_per_mtok: 5}\n";
    let models = "name: split\ntype: gateway-load-balancing-config\nrule_type: weight-based\nrules:\n  - {id: a, weight: 90, target: {provider: heavy, model: m}}\n  - {id: b, weight: 10, target: {provider: light, model: m}}\n---\nname: chain\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: a, priority: 1, target: {provider: dead-a, model: m}}\nfallbacks:\n  - {provider: dead-b, model: m}\n  - {provider: claude, model: claude-haiku-4-5}\n  - {provider: heavy, model: m}\n---\nname: guarded\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: a, priority: 1, target: {provider: flaky, model: m}}\nfallbacks:\n  - {provider: heavy, model: m}\ncircuit_breaker: {failure_threshold: 3, window_seconds: 60, cooldown_seconds: 5}\n";
    std::fs::write(dir.join("providers.yaml"), providers).unwrap();
    std::fs::write(dir.join("prices.yaml"), prices).unwrap();
    std::fs::write(dir.join("models.yaml"), models).unwrap();
    std::fs::write(dir.join("api-keys.yaml"), "type: tollgate-api-keys\nallow_anonymous: true\n").unwrap();
}

async fn chat(client: &reqwest::Client, ingress: SocketAddr, model: &str, session: &str) -> Value {
    let resp = client
        .post(format!("http://{ingress}/v1/chat/completions"))
        .header("X-TFY-Session-ID", session)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi\n#mock prompt_tokens=5 completion_tokens=2"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{model}/{session}: {body}");
    body
}

struct Stack {
    topic: String,
    db: String,
    ingress: common::Service,
    meter: common::Service,
    mock: common::Service,
    flaky: Switchable,
    _dir: tempfile::TempDir,
}

async fn stack(name: &str) -> Stack {
    let topic = common::unique(name);
    let db = common::unique(&format!("tollgate_{name}"));
    common::create_topic(&topic, 2).await;
    let mock = common::start_mock().await;
    let flaky = start_switchable().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), mock.addr, flaky.addr);
    let ingress = common::start_ingress(dir.path(), &topic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    Stack { topic, db, ingress, meter, mock, flaky, _dir: dir }
}

impl Stack {
    async fn rows(&self, n: u64) -> bool {
        let sql = format!("SELECT count() FROM {}.usage_events FINAL", self.db);
        common::until_at_least(n, Duration::from_secs(60), || common::ch_count(&sql)).await.is_ok()
    }

    async fn stop(self) {
        self.ingress.stop().await;
        self.meter.stop().await;
        self.mock.stop().await;
        common::ch(&format!("DROP DATABASE IF EXISTS {}", self.db)).await;
        let _ = self.topic;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_90_10_virtual_model_splits_10000_requests_within_2_percent() {
    let s = stack("split").await;
    const N: u64 = 10_000;
    let client = reqwest::Client::new();
    let ingress = s.ingress.addr;
    let ok: u64 = futures::stream::iter(0..N)
        .map(|i| {
            let client = client.clone();
            async move {
                u64::from(chat(&client, ingress, "split", &format!("s{}", i % 97)).await["usage"]["total_tokens"] == 7)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<u64>>()
        .await
        .iter()
        .sum();
    assert_eq!(ok, N, "every request answered with the mock's usage");
    assert!(s.rows(N).await, "all {N} rows reached ClickHouse");
    let tsv = common::ch(&format!(
        "SELECT provider, count() FROM {}.usage_events FINAL GROUP BY provider ORDER BY provider FORMAT TabSeparated",
        s.db
    ))
    .await;
    let counts: Vec<(String, u64)> = tsv
        .lines()
        .map(|l| {
            let (p, c) = l.split_once('\t').unwrap();
            (p.to_owned(), c.parse().unwrap())
        })
        .collect();
    assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), N, "{counts:?}");
    let heavy = counts.iter().find(|c| c.0 == "heavy").map_or(0, |c| c.1);
    let share = heavy as f64 / N as f64;
    eprintln!("90/10 split over {N} requests: {counts:?}, primary share {share:.4}");
    assert!((0.88..=0.92).contains(&share), "heavy took {share:.4} of traffic, want 0.90 ± 0.02 ({counts:?})");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_primary_falls_back_in_order_across_providers() {
    let s = stack("chain").await;
    let client = reqwest::Client::new();
    let body = chat(&client, s.ingress.addr, "chain", "chain-1").await;
    // Two dead OpenAI-kind targets, then an Anthropic target answers, translated to OpenAI's format.
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    // One row per attempt: the refused connections cost nothing.
    assert!(s.rows(3).await);
    let rows = common::ch(&format!(
        "SELECT provider, model, attempt, fallback_path, status, input_tokens, output_tokens, cost_nanos FROM {}.usage_events FINAL ORDER BY attempt FORMAT TabSeparated",
        s.db
    ))
    .await;
    // 5 in × 1000 n$ + 2 out × 5000 n$ = 15,000 n$.
    assert_eq!(
        rows,
        "dead-a\tm\t1\t[]\tprovider_error\t0\t0\t0\n\
         dead-b\tm\t2\t['dead-a/m']\tprovider_error\t0\t0\t0\n\
         claude\tclaude-haiku-4-5\t3\t['dead-a/m','dead-b/m']\tok\t5\t2\t15000\n"
    );
    s.stop().await;
}

/// Sends requests to `guarded` until the primary has been called `want` times (the half-open
/// probe after the cooldown; the requests before it go to the fallback) and returns the last
/// answer. Each request is counted in `sent`.
async fn until_calls(
    client: &reqwest::Client,
    ingress: SocketAddr,
    calls: &AtomicU64,
    want: u64,
    sent: &mut usize,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    while calls.load(Ordering::SeqCst) < want {
        assert!(Instant::now() < deadline, "no half-open probe within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = chat(client, ingress, "guarded", &format!("b{sent}")).await;
        *sent += 1;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_after_the_threshold_and_closes_after_the_cooldown() {
    let s = stack("breaker").await;
    let client = reqwest::Client::new();
    let calls = || s.flaky.calls.load(Ordering::SeqCst);
    let served_by = |b: &Value| b["model"].as_str().unwrap_or_default().to_owned();

    // Three failures within the window: each request still succeeds, on the fallback.
    for i in 0..3 {
        let b = chat(&client, s.ingress.addr, "guarded", &format!("b{i}")).await;
        assert_ne!(served_by(&b), "flaky-1");
    }
    assert_eq!(calls(), 3);
    // Open: the primary is not called at all.
    for i in 3..6 {
        chat(&client, s.ingress.addr, "guarded", &format!("b{i}")).await;
    }
    assert_eq!(calls(), 3, "an open breaker keeps traffic off the failing target");
    let mut sent = 6;
    // The probe fails, so the breaker opens again: the next request does not reach the primary.
    until_calls(&client, s.ingress.addr, &s.flaky.calls, 4, &mut sent).await;
    chat(&client, s.ingress.addr, "guarded", &format!("b{sent}")).await;
    sent += 1;
    assert_eq!(calls(), 4, "exactly one half-open probe, and the breaker open again after it");
    // The target recovers: the next probe succeeds and closes the breaker.
    s.flaky.failing.store(false, Ordering::SeqCst);
    let probe = until_calls(&client, s.ingress.addr, &s.flaky.calls, 5, &mut sent).await;
    assert_eq!(served_by(&probe), "flaky-1", "the successful probe answers");
    for _ in 0..3 {
        let b = chat(&client, s.ingress.addr, "guarded", &format!("b{sent}")).await;
        sent += 1;
        assert_eq!(served_by(&b), "flaky-1", "closed again: the primary serves");
    }
    assert_eq!(calls(), 8);
    // Every answer and the 4 refused calls to the primary, each a row.
    assert!(s.rows(sent as u64 + 4).await);
    let by_provider = common::ch(&format!(
        "SELECT provider, status, count() FROM {}.usage_events FINAL GROUP BY provider, status ORDER BY provider, status FORMAT TabSeparated",
        s.db
    ))
    .await;
    assert_eq!(by_provider, format!("flaky\tok\t4\nflaky\tprovider_error\t4\nheavy\tok\t{}\n", sent - 4));
    s.stop().await;
}
