//! Criterion benchmarks of the ingress's per-request work, stage by stage: API key, identity
//! envelope, body parse, token estimate, decision-cache lookup and breach gate, usage-event
//! encode. Each uses the demo policy (`compose/policy`) and the demo request of the README.
//!
//! `cargo bench -p tollgate-ingress --bench hot_path` (add `-- --quick` for a short run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::Value;
use tollgate_ingress::decisions::DecisionCache;
use tollgate_ingress::gate::{self, Queue, RequestView};
use tollgate_ingress::{auth, count, envelope};
use tollgate_schemas::decision::{BreachDecision, DecisionState, decision_key};
use tollgate_schemas::policy::Policy;
use tollgate_schemas::usage::{Envelope, Status, TokenSource, UsageEvent};

const BODY: &[u8] = br#"{"model":"intent-fast","messages":[{"role":"system","content":"You classify customer messages into one of: order_status, refund, complaint, other. Answer with the label only."},{"role":"user","content":"Classify: where is my order? I placed it last Tuesday and the tracking page has not changed since."}],"max_tokens":16}"#;

fn policy() -> Policy {
    Policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy")).expect("demo policy")
}

/// The README's demo request headers, plus what an SDK adds.
fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("authorization", "Bearer tg-demo-key"),
        ("x-tfy-project", "platform-search"),
        ("x-tfy-team", "data-platform"),
        ("x-tfy-user-id", "u_8f1c2d"),
        ("x-tfy-session-id", "sess_a3f9c2-b71d-4e"),
        ("x-tfy-workflow-tag", "classify-intent"),
        ("x-tfy-environment", "production"),
        ("x-tfy-cost-center", "eng-platform-002"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// A cache of `n` decisions for scopes the benchmark request never has (it misses on every rule).
fn cache_with(n: usize, policy: &Policy) -> Arc<DecisionCache> {
    let cache = DecisionCache::new(false);
    let rules: Vec<&str> = policy.rules.iter().map(|r| r.id.as_str()).collect();
    for i in 0..n {
        let d = BreachDecision {
            limit: 1_000_000,
            headroom: 1_000_000,
            window_end_us: i64::MAX / 2,
            decided_at_us: 1,
            ..BreachDecision::example(rules[i % rules.len()], format!("session:other-{i}"), DecisionState::Clear, 1)
        };
        cache.apply(&d.key(), Some(d));
    }
    cache
}

fn event() -> UsageEvent {
    UsageEvent {
        envelope: Envelope {
            project: Some("platform-search".into()),
            team: Some("data-platform".into()),
            user_id: Some("u_8f1c2d".into()),
            session_id: Some("sess_a3f9c2-b71d-4e".into()),
            workflow_tag: Some("classify-intent".into()),
            environment: Some("production".into()),
            cost_center: Some("eng-platform-002".into()),
        },
        api_key_id: Some("demo-search".into()),
        virtual_model: "intent-fast".into(),
        provider: "anthropic".into(),
        model: "claude-haiku-4-5".into(),
        model_version: Some("claude-haiku-4-5-20251001".into()),
        attempt: 1,
        status: Status::Ok,
        http_status: 200,
        input_tokens: 57,
        output_tokens: 3,
        reference_input_tokens: Some(55),
        input_chars: 214,
        token_source: TokenSource::Provider,
        cost_nanos: 72_000,
        price_card_version: "2026-04".into(),
        first_token_at_us: Some(1_775_000_000_120_000),
        ..UsageEvent::example("0196a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(), None, 1_775_000_000_250_000)
    }
}

fn bench(c: &mut Criterion) {
    let policy = policy();
    let headers = headers();

    c.bench_function("auth/sha256 key lookup", |b| {
        b.iter(|| auth::authenticate(black_box(&policy), black_box(&headers)))
    });

    let key = auth::authenticate(&policy, &headers).unwrap();
    c.bench_function("envelope/extract 7 required headers", |b| {
        b.iter(|| envelope::extract(black_box(&headers), &policy.envelope, key).unwrap())
    });

    c.bench_function("body/parse json (demo request)", |b| {
        b.iter(|| serde_json::from_slice::<Value>(black_box(BODY)).unwrap())
    });

    let body: Value = serde_json::from_slice(BODY).unwrap();
    // The ingress estimates once for the gate (first target) and once per attempt; texts seen
    // recently are counted from memory, so a repeated body costs a hash per message.
    c.bench_function("count/estimate_input o200k (gpt-4o-mini), texts seen before", |b| {
        b.iter(|| count::estimate_input(black_box("gpt-4o-mini"), black_box(&body)))
    });
    c.bench_function("count/estimate_input cl100k (claude-haiku-4-5), texts seen before", |b| {
        b.iter(|| count::estimate_input(black_box("claude-haiku-4-5"), black_box(&body)))
    });
    let texts: Vec<&str> = body["messages"].as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    let o200k = count::encoding_for("gpt-4o-mini");
    c.bench_function("count/tiktoken o200k, the demo request's texts (new texts)", |b| {
        b.iter(|| texts.iter().map(|t| count::count_text(o200k, black_box(t))).sum::<i64>())
    });

    let env = envelope::extract(&headers, &policy.envelope, key).unwrap();
    let vm = policy.virtual_models.get("intent-fast");
    let target = vm.and_then(|v| v.rules.first()).map(|r| &r.target);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let queue = Queue::new(10_000);
    for n in [0usize, 10_000] {
        let cache = cache_with(n, &policy);
        let probe = decision_key(&policy.rules[0].id, "session:other-0");
        c.bench_function(&format!("decisions/get miss ({n} cached)"), |b| {
            b.iter(|| cache.get(black_box("per-session-loop-guard/session:sess_a3f9c2-b71d-4e")))
        });
        if n > 0 {
            c.bench_function(&format!("decisions/get hit ({n} cached)"), |b| b.iter(|| cache.get(black_box(&probe))));
        }
        c.bench_function(&format!("breach/gate every rule, no breach ({n} cached)"), |b| {
            b.iter(|| {
                let view = RequestView { envelope: &env, api_key: key, vm, target, stream: false };
                let mut estimate = tollgate_ingress::decisions::Reservation::default;
                rt.block_on(gate::gate(&cache, &policy, &view, &queue, &mut estimate)).is_ok()
            })
        });
    }

    let codec = UsageEvent::codec().unwrap();
    let ev = event();
    c.bench_function("event/avro encode (single-object)", |b| b.iter(|| codec.encode(black_box(&ev)).unwrap()));
    c.bench_function("event/clone + encode", |b| {
        b.iter_batched(|| ev.clone(), |e| codec.encode(&e).unwrap(), BatchSize::SmallInput)
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
