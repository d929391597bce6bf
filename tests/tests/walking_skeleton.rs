//! One request end to end: ingress → mock provider → Avro on Kafka → meter → ClickHouse row.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    provider: &'static str,
    model: &'static str,
    attempt: i64,
    streamed: bool,
    input: i64,
    output: i64,
    cached: i64,
    cache_write: i64,
    cost_nanos: i64,
}

/// The mock's directive and what the ingress must record for it. Costs are worked out here
/// from the test price card (nano-USD per token: gpt-4o-mini 150 in / 600 out / 75 cached;
/// claude-haiku-4-5 1000 in / 5000 out / 100 cached / 1250 cache write), not by the product.
fn case(i: u64) -> (&'static str, bool, String, Expected) {
    let prompt = 50 + (i * 7919) % 4000;
    let completion = 1 + (i * 31) % 40;
    let cached = (i * 13) % 30;
    let write = (i * 5) % 9;
    let vm = ["vm-openai", "vm-anthropic", "vm-fallback"][(i % 3) as usize];
    let streamed = i % 2 == 0;
    let directive = format!(
        "#mock prompt_tokens={prompt} completion_tokens={completion} cached_tokens={cached} cache_write_tokens={write}"
    );
    let (p, c, k, w) = (prompt as i64, completion as i64, cached as i64, write as i64);
    let exp = if vm == "vm-openai" {
        Expected {
            provider: "openai-mock",
            model: "gpt-4o-mini",
            attempt: 1,
            streamed,
            input: p,
            output: c,
            cached: k,
            cache_write: 0,
            cost_nanos: (p - k) * 150 + c * 600 + k * 75,
        }
    } else {
        Expected {
            provider: "anthropic-mock",
            model: "claude-haiku-4-5",
            attempt: if vm == "vm-fallback" { 2 } else { 1 },
            streamed,
            input: p,
            output: c,
            cached: k,
            cache_write: w,
            cost_nanos: (p - k - w) * 1000 + c * 5000 + k * 100 + w * 1250,
        }
    };
    (vm, streamed, directive, exp)
}

async fn send(client: &reqwest::Client, ingress: std::net::SocketAddr, i: u64, session: &str) -> (u16, String) {
    let (vm, streamed, directive, _) = case(i);
    let mut body = json!({
        "model": vm,
        "messages": [
            {"role": "system", "content": "You classify intents."},
            {"role": "user", "content": format!("Where is my order {i}?\n{directive}")},
        ],
    });
    if streamed {
        body["stream"] = json!(true);
        if i % 4 == 0 {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    let resp = client
        .post(format!("http://{ingress}/v1/chat/completions"))
        .header("X-TFY-Project", "platform-search")
        .header("X-TFY-Team", "data-platform")
        .header("X-TFY-Session-ID", session)
        .header("X-TFY-Workflow-Tag", "classify-intent")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Words the client received, from a JSON response or an SSE stream; and the usage chunk, if any.
fn received(body: &str, streamed: bool) -> (usize, Option<Value>) {
    if !streamed {
        let v: Value = serde_json::from_str(body).unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        return (text.split_whitespace().count(), Some(v["usage"].clone()));
    }
    let mut text = String::new();
    let mut usage = None;
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "stream carried an error: {data}");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    assert!(done, "stream did not end with [DONE]: {body}");
    (text.split_whitespace().count(), usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_requests_become_exactly_n_rows_with_the_providers_numbers() {
    let topic = common::unique("usage");
    let db = common::unique("tollgate_e2e");
    common::create_topic(&topic, 3).await;
    let mock = common::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(dir.path(), mock.addr);
    let ingress = common::start_ingress(dir.path(), &topic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;

    const N: u64 = 60;
    let client = reqwest::Client::new();
    let results: Vec<(u64, u16, String)> = futures::stream::iter(0..N)
        .map(|i| {
            let client = client.clone();
            async move {
                let (status, body) = send(&client, ingress.addr, i, &format!("sess-{i}")).await;
                (i, status, body)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    let mut expected = BTreeMap::new();
    for (i, status, body) in &results {
        let (_, streamed, _, exp) = case(*i);
        assert_eq!(*status, 200, "request {i}: {body}");
        let (words, usage) = received(body, streamed);
        assert_eq!(words as i64, exp.output, "request {i}: the client got every word");
        let asked_usage = !streamed || i % 4 == 0;
        assert_eq!(usage.is_some(), asked_usage, "request {i}: usage shown only to clients that asked");
        if let Some(u) = usage {
            assert_eq!(u["prompt_tokens"], json!(exp.input), "request {i}");
            assert_eq!(u["completion_tokens"], json!(exp.output), "request {i}");
        }
        expected.insert(format!("sess-{i}"), exp);
    }

    // One row per upstream attempt: every third request first tries the `dead` provider.
    let fell_back = (0..N).filter(|i| i % 3 == 2).count() as u64;
    let rows_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    let arrived =
        common::until_at_least(N + fell_back, Duration::from_secs(60), || common::ch_count(&rows_sql)).await.is_ok();
    assert!(arrived, "only {} of {} rows reached ClickHouse", common::ch_count(&rows_sql).await, N + fell_back);
    // The attempts at the dead provider: refused connections, nothing billed, the request's own
    // event id (the answer's row is `<id>#2`).
    assert_eq!(
        common::ch(&format!(
            "SELECT count(), countIf(status = 'provider_error' AND attempt = 1 AND input_tokens = 0 AND cost_nanos = 0), \
             countIf(concat(event_id, '#2') IN (SELECT event_id FROM {db}.usage_events WHERE attempt = 2)) \
             FROM {db}.usage_events FINAL WHERE provider = 'dead'"
        ))
        .await
        .trim(),
        format!("{fell_back}\t{fell_back}\t{fell_back}")
    );

    let tsv = common::ch(&format!(
        "SELECT session_id, provider, model, attempt, streamed, input_tokens, output_tokens, cached_input_tokens, \
         cache_write_tokens, cost_nanos, token_source, status, project, workflow_tag, price_card_version, \
         length(fallback_path), api_format FROM {db}.usage_events FINAL WHERE provider != 'dead' \
         ORDER BY session_id FORMAT TabSeparated"
    ))
    .await;
    let mut seen = BTreeMap::new();
    for line in tsv.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let got = Expected {
            provider: if f[1] == "openai-mock" { "openai-mock" } else { "anthropic-mock" },
            model: if f[2] == "gpt-4o-mini" { "gpt-4o-mini" } else { "claude-haiku-4-5" },
            attempt: f[3].parse().unwrap(),
            streamed: f[4] == "1",
            input: f[5].parse().unwrap(),
            output: f[6].parse().unwrap(),
            cached: f[7].parse().unwrap(),
            cache_write: f[8].parse().unwrap(),
            cost_nanos: f[9].parse().unwrap(),
        };
        assert_eq!(f[1], got.provider, "{line}");
        assert_eq!(
            &f[10..],
            [
                "provider",
                "ok",
                "platform-search",
                "classify-intent",
                "test-1",
                if got.attempt == 2 { "1" } else { "0" },
                "openai"
            ],
            "{line}"
        );
        assert!(seen.insert(f[0].to_owned(), got).is_none(), "two rows for session {}", f[0]);
    }
    assert_eq!(seen.len() as u64, N, "exactly one answered row per request");
    for (session, exp) in &expected {
        assert_eq!(seen.get(session), Some(exp), "row of {session}");
    }
    let total: i64 = expected.values().map(|e| e.cost_nanos).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        total.to_string(),
        "total spend to the nano-dollar"
    );

    // Nothing more arrives later (no duplicates from retries or replays).
    meter.stop().await;
    ingress.stop().await;
    mock.stop().await;
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await, N + fell_back);
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
