//! Anthropic-format clients (`/v1/messages`) against Anthropic and OpenAI targets, streamed and
//! not: what the client sees and what ClickHouse records equal what the provider reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};

/// Reads an Anthropic SSE stream: (event names, text, final usage as the client saw it).
fn read_stream(body: &str) -> (Vec<String>, String, Value) {
    let (mut names, mut text, mut usage) = (Vec::new(), String::new(), json!({}));
    let mut name = String::new();
    for line in body.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
            names.push(name.clone());
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(d).unwrap();
            assert_eq!(v["type"], json!(name), "event name and data type agree");
            match name.as_str() {
                "message_start" => usage = v["message"]["usage"].clone(),
                "content_block_delta" => text.push_str(v["delta"]["text"].as_str().unwrap()),
                "message_delta" => {
                    for (k, val) in v["usage"].as_object().unwrap() {
                        usage[k] = val.clone();
                    }
                }
                "error" => panic!("stream carried an error: {d}"),
                _ => {}
            }
        }
    }
    (names, text, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_clients_are_metered_to_the_token_and_nano_dollar() {
    let topic = common::unique("formats");
    let db = common::unique("tollgate_formats");
    common::create_topic(&topic, 2).await;
    let mock = common::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(dir.path(), mock.addr);
    let ingress = common::start_ingress(dir.path(), &topic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let client = reqwest::Client::new();

    // (virtual model, stream, prompt, completion, cached, cache write) and the cost worked out
    // from the test price card: haiku 1000/5000/100/1250 n$ per token, gpt-4o-mini 150/600/75.
    let cases: [(&str, bool, i64, i64, i64, i64, i64); 4] = [
        ("vm-anthropic", false, 1200, 30, 200, 40, 1000 * 960 + 5000 * 30 + 100 * 200 + 1250 * 40),
        ("vm-anthropic", true, 800, 12, 100, 0, 1000 * 700 + 5000 * 12 + 100 * 100),
        ("vm-openai", false, 950, 25, 50, 0, 150 * 900 + 600 * 25 + 75 * 50),
        ("vm-openai", true, 640, 9, 0, 0, 150 * 640 + 600 * 9),
    ];
    for (i, (vm, stream, p, c, k, w, _)) in cases.iter().enumerate() {
        let directive =
            format!("#mock prompt_tokens={p} completion_tokens={c} cached_tokens={k} cache_write_tokens={w}");
        let resp = client
            .post(format!("http://{}/v1/messages", ingress.addr))
            .header("X-TFY-Project", "formats")
            .header("X-TFY-Session-ID", format!("fmt-{i}"))
            .json(&json!({"model": vm, "max_tokens": 64, "stream": stream, "system": "Be terse.",
                "messages": [{"role": "user", "content": [{"type": "text", "text": format!("Hello\n{directive}")}]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "case {i}");
        let body = resp.text().await.unwrap();
        let (text, usage) = if *stream {
            let (names, text, usage) = read_stream(&body);
            assert_eq!(names.first().map(String::as_str), Some("message_start"), "case {i}");
            assert_eq!(names.last().map(String::as_str), Some("message_stop"), "case {i}");
            (text, usage)
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["type"], "message", "case {i}: {v}");
            (v["content"][0]["text"].as_str().unwrap().to_owned(), v["usage"].clone())
        };
        let expected_text: Vec<String> = (1..=*c).map(|n| format!("w{n}")).collect();
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            expected_text,
            "case {i}: every word reached the client"
        );
        // Anthropic's input_tokens excludes cache reads and writes (OpenAI targets have no cache writes).
        let w_seen = if *vm == "vm-openai" { 0 } else { *w };
        assert_eq!(usage["input_tokens"], json!(p - k - w_seen), "case {i}: {usage}");
        assert_eq!(usage["output_tokens"], json!(c), "case {i}: {usage}");
        assert_eq!(usage["cache_read_input_tokens"], json!(k), "case {i}: {usage}");
    }

    let sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    common::wait_for_count(&sql, 4, Duration::from_secs(60)).await;
    let tsv = common::ch(&format!(
        "SELECT session_id, api_format, streamed, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, \
         cost_nanos, token_source, status FROM {db}.usage_events FINAL ORDER BY session_id FORMAT TabSeparated"
    ))
    .await;
    let rows: Vec<&str> = tsv.lines().collect();
    assert_eq!(rows.len(), 4, "{tsv}");
    for (i, (vm, stream, p, c, k, w, cost)) in cases.iter().enumerate() {
        let w = if *vm == "vm-openai" { 0 } else { *w };
        assert_eq!(
            rows[i],
            format!("fmt-{i}\tanthropic\t{}\t{p}\t{c}\t{k}\t{w}\t{cost}\tprovider\tok", u8::from(*stream)),
            "case {i}"
        );
    }
    meter.stop().await;
    ingress.stop().await;
    mock.stop().await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
