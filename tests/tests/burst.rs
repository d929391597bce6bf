//! Bursts against one ingress, on the real broker and ClickHouse: a limit of 30 requests a
//! minute per team holds exactly when 45 requests arrive at once from 8 clients and when one
//! client sends them back to back (the ingress counts its own admissions from the first request,
//! before the enforcer has seen any usage), and a $0.01 budget holds within one request when 8
//! clients spend into it at once (each admission reserves the request's worst-case cost until it
//! ends). The figures are checked against the usage rows in ClickHouse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use serde_json::{Value, json};

const RULES: &str = "name: burst\ntype: gateway-rate-limit-config\nrules:\n  - id: team-burst\n    when: {metadata: {X-TFY-Project: burst}}\n    limit: {requests: 30, window: 1m, scope: team}\n    on_breach: queue_then_429\n    queue_timeout_ms: 200\n---\nname: burst-budgets\ntype: gateway-budget-config\nbudgets:\n  - id: burst-budget\n    scope: {metadata: {X-TFY-Project: burst-budget}}\n    ceiling_usd: 0.01\n    window: daily\n    on_exceed: hard_block\n";

/// One request of team `team`; 200 or 429 (anything else fails the test).
async fn ask(client: &reqwest::Client, gw: SocketAddr, project: &str, team: &str, body: &Value) -> bool {
    let resp = client
        .post(format!("http://{gw}/v1/chat/completions"))
        .header("X-TFY-Project", project)
        .header("X-TFY-Team", team)
        .header("X-TFY-Session-ID", format!("{team}-session"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    match status {
        200 => true,
        429 => {
            let rule = body["error"]["rule"].as_str().unwrap_or_default();
            assert!(rule == "team-burst" || rule == "burst-budget", "{body}");
            false
        }
        other => panic!("unexpected {other}: {body}"),
    }
}

/// Sends `n` requests from `clients` concurrent clients; returns how many were admitted.
async fn burst(gw: SocketAddr, project: &str, team: &str, n: u64, clients: u64, body: Value) -> u64 {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let body = Arc::new(body);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, next, admitted, body) = (client.clone(), next.clone(), admitted.clone(), body.clone());
            let (project, team) = (project.to_owned(), team.to_owned());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    if ask(&client, gw, &project, &team, &body).await {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    admitted.load(Ordering::SeqCst)
}

fn chat(directive: &str, max_tokens: Option<u64>) -> Value {
    let mut body =
        json!({"model": "vm-openai", "messages": [{"role": "user", "content": format!("hi\n#mock {directive}")}]});
    if let Some(m) = max_tokens {
        body["max_tokens"] = json!(m);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_stop_at_the_limit_on_one_ingress() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), mock.addr);
    std::fs::write(dir.path().join("burst.yaml"), RULES).unwrap();
    let t = topics("burst").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let spool = tempfile::tempdir().unwrap();
    let mut config = ingress_config(dir.path(), &kafka_brokers(), &t.usage, spool.path());
    config.breaches_topic = t.breaches.clone();
    let ingress = start_ingress_with(config).await;
    let gw = ingress.addr;

    // 45 requests, 8 at a time, each 100 ms at the provider: far faster than any decision.
    let slow = chat("prompt_tokens=5 completion_tokens=5 latency_ms=100", None);
    let concurrent = burst(gw, "burst", "t-concurrent", 45, 8, slow.clone()).await;
    let sequential = burst(gw, "burst", "t-sequential", 45, 1, slow).await;
    // $0.01 at $0.0006 a request (1,000 output tokens of gpt-4o-mini; max_tokens says so up
    // front), 8 clients at once, 200 ms each.
    let budget = chat("prompt_tokens=5 completion_tokens=1000 latency_ms=200", Some(1000));
    let spenders = burst(gw, "burst-budget", "t-budget", 40, 8, budget).await;
    eprintln!(
        "admitted: {concurrent} of 45 (8 concurrent), {sequential} of 45 (sequential), {spenders} of 40 budget requests"
    );
    assert_eq!(concurrent, 30, "8 concurrent clients: exactly the limit");
    assert_eq!(sequential, 30, "one client: exactly the limit");

    ingress.stop().await;
    meter_finished(&t.db, &t.usage).await;
    let rows = |team: &str, status: &str| {
        format!("SELECT count() FROM {}.usage_events FINAL WHERE team = '{team}' AND status {status}", t.db)
    };
    assert_eq!(ch_count(&rows("t-concurrent", "!= 'rejected'")).await, 30);
    assert_eq!(ch_count(&rows("t-concurrent", "= 'rejected'")).await, 15);
    assert_eq!(ch_count(&rows("t-sequential", "!= 'rejected'")).await, 30);
    let spent: i64 =
        ch(&format!("SELECT sum(cost_nanos) FROM {}.usage_events FINAL WHERE project = 'burst-budget'", t.db))
            .await
            .trim()
            .parse()
            .unwrap();
    let per_request = 5 * 150 + 1000 * 600; // nano-USD: input at $0.15/MTok, output at $0.60/MTok
    assert_eq!(spent, i64::try_from(spenders).unwrap() * per_request);
    assert!(
        spent < 10_000_000 + per_request,
        "spent {spent} nano-USD: more than one request past the $0.01 ceiling ({spenders} admitted)"
    );
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}
