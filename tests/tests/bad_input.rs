//! Bad input from clients and providers: malformed JSON, oversized bodies, missing or forged
//! headers, unknown and forbidden models, a provider that sends garbage, fails, stalls or closes
//! the connection, and a client that goes away mid-stream.
//!
//! Each case checks the status and error body the client gets (OpenAI's shape on
//! `/v1/chat/completions`, Anthropic's on `/v1/messages`), that the ingress still serves a normal
//! request afterwards, and the ClickHouse rows: none for a request refused before it reached a
//! provider, exactly one (with the right status, token source and estimate) for one that did.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tollgate_ingress::count;

/// The bad-input stack's body limit, small so oversized bodies are cheap to send.
const MAX_BODY_BYTES: usize = 64 << 10;
/// How long to keep watching ClickHouse after the expected rows arrived, for extra ones.
const SETTLE: Duration = Duration::from_millis(1500);

/// Mock, ingress (API keys on, a 64 KiB body limit) and meter on a topic and database of their own.
struct Stack {
    mock: common::Service,
    ingress: common::Service,
    meter: common::Service,
    db: String,
    http: reqwest::Client,
    _policy: tempfile::TempDir,
    _spool: tempfile::TempDir,
}

/// Virtual models of this suite beside `common::write_policy`'s: one whose Anthropic-kind
/// primary falls back to the OpenAI-kind target, and one with a 1 s first-byte timeout.
const EXTRA_MODELS: &str = "\
name: vm-fallback-500
type: gateway-load-balancing-config
rule_type: priority-based
rules:
  - {id: a, priority: 1, target: {provider: anthropic-mock, model: claude-haiku-4-5}, timeout_ms: 5000}
fallbacks:
  - {provider: openai-mock, model: gpt-4o-mini}
---
name: vm-slow
type: gateway-load-balancing-config
rule_type: priority-based
rules:
  - {id: a, priority: 1, target: {provider: openai-mock, model: gpt-4o-mini}, timeout_ms: 1000}
---
name: vm-timeout-fallback
type: gateway-load-balancing-config
rule_type: priority-based
rules:
  - {id: a, priority: 1, target: {provider: anthropic-mock, model: claude-haiku-4-5}, timeout_ms: 1000}
fallbacks:
  - {provider: openai-mock, model: gpt-4o-mini}
";

async fn stack() -> Stack {
    let topic = common::unique("usage_bad");
    let db = common::unique("tollgate_bad");
    common::create_topic(&topic, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("bad-input-models.yaml"), EXTRA_MODELS).unwrap();
    // `vm-fallback` exists but this key may not use it.
    common::write_api_keys(
        policy.path(),
        "bad-input-key",
        &["vm-openai", "vm-anthropic", "vm-fallback-500", "vm-slow", "vm-timeout-fallback"],
        &[],
    );
    let spool = tempfile::tempdir().unwrap();
    let mut config = common::ingress_config(policy.path(), &common::kafka_brokers(), &topic, spool.path());
    config.max_body_bytes = MAX_BODY_BYTES;
    let ingress = common::start_ingress_with(config).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    Stack { mock, ingress, meter, db, http: reqwest::Client::new(), _policy: policy, _spool: spool }
}

/// A response as the client saw it.
struct Answer {
    status: u16,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }
}

/// One stored usage event, the columns these tests check.
#[derive(Debug, Clone)]
struct Row {
    session: String,
    status: String,
    http_status: i64,
    token_source: String,
    input: i64,
    output: i64,
    cost_nanos: i64,
    attempt: i64,
    fallback_path: String,
    provider: String,
    model: String,
    streamed: bool,
    api_key_id: String,
    api_format: String,
    reference_input: String,
    error: String,
    event_id: String,
}

impl Stack {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress.addr)
    }

    /// A request with the test key and a complete envelope for `session`.
    fn request(&self, path: &str, session: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .bearer_auth(common::TEST_API_KEY)
            .header("X-TFY-Project", "bad-input")
            .header("X-TFY-Session-ID", session)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("the ingress answers");
        let status = resp.status().as_u16();
        Answer { status, text: resp.text().await.expect("the answer's body") }
    }

    async fn post_json(&self, path: &str, session: &str, body: &Value) -> Answer {
        self.send(self.request(path, session).json(body)).await
    }

    /// A normal request after the bad ones: the ingress still serves, and it leaves an `ok` row.
    async fn assert_still_serves(&self, session: &str) {
        let body = chat_body("vm-openai", "still there?\n#mock prompt_tokens=12 completion_tokens=3");
        let a = self.post_json("/v1/chat/completions", session, &body).await;
        assert_eq!(a.status, 200, "a normal request after the bad ones: {}", a.text);
        assert_eq!(a.json()["choices"][0]["message"]["content"], "w1 w2 w3", "{}", a.text);
    }

    async fn rows(&self) -> Vec<Row> {
        let tsv = common::ch(&format!(
            "SELECT session_id, status, http_status, token_source, input_tokens, output_tokens, cost_nanos, attempt, \
             fallback_path, provider, model, streamed, api_key_id, api_format, reference_input_tokens, error, event_id \
             FROM {}.usage_events FINAL ORDER BY session_id, attempt FORMAT TabSeparated",
            self.db
        ))
        .await;
        tsv.lines()
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                assert_eq!(f.len(), 17, "{line}");
                let int = |i: usize| -> i64 { f[i].parse().unwrap_or_else(|e| panic!("column {i} of {line}: {e}")) };
                Row {
                    session: f[0].into(),
                    status: f[1].into(),
                    http_status: int(2),
                    token_source: f[3].into(),
                    input: int(4),
                    output: int(5),
                    cost_nanos: int(6),
                    attempt: int(7),
                    fallback_path: f[8].into(),
                    provider: f[9].into(),
                    model: f[10].into(),
                    streamed: f[11] == "1",
                    api_key_id: f[12].into(),
                    api_format: f[13].into(),
                    reference_input: f[14].into(),
                    error: f[15].into(),
                    event_id: f[16].into(),
                }
            })
            .collect()
    }

    /// Waits for exactly the rows of `sessions` (in session order; a session named twice has
    /// two attempts), then a little longer to prove no other row arrives.
    async fn expect_rows(&self, sessions: &[&str]) -> Vec<Row> {
        let n = sessions.len() as u64;
        let sql = format!("SELECT count() FROM {}.usage_events FINAL", self.db);
        let arrived = common::until_at_least(n, Duration::from_secs(60), || common::ch_count(&sql)).await.is_ok();
        assert!(
            arrived,
            "only {} of {n} rows reached ClickHouse: {:#?}",
            common::ch_count(&sql).await,
            self.rows().await
        );
        tokio::time::sleep(SETTLE).await;
        let rows = self.rows().await;
        let mut want: Vec<&str> = sessions.to_vec();
        want.sort_unstable();
        let got: Vec<&str> = rows.iter().map(|r| r.session.as_str()).collect();
        assert_eq!(got, want, "one row per attempt that reached a provider, none for refused ones: {rows:#?}");
        for r in &rows {
            assert_eq!(r.api_key_id, "bad-input-key", "{r:?}");
        }
        rows
    }

    async fn stop(self) {
        self.meter.stop().await;
        self.ingress.stop().await;
        self.mock.stop().await;
        common::ch(&format!("DROP DATABASE IF EXISTS {}", self.db)).await;
    }
}

fn row<'r>(rows: &'r [Row], session: &str) -> &'r Row {
    rows.iter().find(|r| r.session == session).unwrap_or_else(|| panic!("no row for {session}: {rows:#?}"))
}

/// The row of a session's `attempt`-th upstream call.
fn attempt_row<'r>(rows: &'r [Row], session: &str, attempt: i64) -> &'r Row {
    rows.iter()
        .find(|r| r.session == session && r.attempt == attempt)
        .unwrap_or_else(|| panic!("no row for attempt {attempt} of {session}: {rows:#?}"))
}

fn chat_body(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

fn messages_body(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]})
}

fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`; returns it.
fn openai_error<'a>(a: &'a Answer, v: &'a Value, kind: &str, code: Option<&str>) -> &'a Value {
    let e = &v["error"];
    assert!(e.is_object(), "not an OpenAI error body: {}", a.text);
    assert_eq!(e["type"], kind, "{}", a.text);
    assert!(e["message"].is_string(), "{}", a.text);
    assert!(e.get("param").is_some(), "{}", a.text);
    assert_eq!(e["code"], code.map_or(Value::Null, |c| json!(c)), "{}", a.text);
    e
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`; returns the inner object.
fn anthropic_error<'a>(a: &'a Answer, v: &'a Value, kind: &str) -> &'a Value {
    assert_eq!(v["type"], "error", "not an Anthropic error body: {}", a.text);
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{}", a.text);
    assert!(e["message"].is_string(), "{}", a.text);
    e
}

fn message(e: &Value) -> &str {
    e["message"].as_str().unwrap_or_default()
}

/// SSE frames of a body: `(event name, data)`.
fn sse(text: &str) -> Vec<(Option<String>, String)> {
    text.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let mut name = None;
            let mut data = Vec::new();
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            (name, data.join("\n"))
        })
        .collect()
}

/// The text an OpenAI-format stream delivered.
fn openai_stream_text(frames: &[(Option<String>, String)]) -> String {
    frames
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v.pointer("/choices/0/delta/content").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// The text an Anthropic-format stream delivered.
fn anthropic_stream_text(frames: &[(Option<String>, String)]) -> String {
    frames
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_delta"))
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v.pointer("/delta/text").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// The ingress's reference estimate of output: tiktoken over the text streamed before the cut.
fn estimate(model: &str, text: &str) -> i64 {
    count::count_text(count::encoding_for(model), text)
}

// ---------------------------------------------------------------------------------------
// refused before any provider: no row
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400_and_leaves_no_row() {
    let s = stack().await;
    let truncated = r#"{"model": "vm-openai", "messages": [{"role": "user", "content": "hi"#;
    let a = s
        .send(s.request("/v1/chat/completions", "bad-json").header("content-type", "application/json").body(truncated))
        .await;
    assert_eq!(a.status, 400, "truncated JSON on chat: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "invalid_request_error", Some("malformed_json"));
    assert!(message(e).starts_with("request body is not valid JSON"), "{}", a.text);

    let a = s.send(s.request("/v1/messages", "bad-json").body("{\"model\": \"vm-anthropic\",, }")).await;
    assert_eq!(a.status, 400, "malformed JSON on messages: {}", a.text);
    let v = a.json();
    let e = anthropic_error(&a, &v, "invalid_request_error");
    assert!(message(e).starts_with("request body is not valid JSON"), "{}", a.text);

    let a = s.send(s.request("/v1/chat/completions", "bad-json").body(vec![0xff, 0xfe, 0x00, 0x01])).await;
    assert_eq!(a.status, 400, "binary bytes: {}", a.text);
    openai_error(&a, &a.json(), "invalid_request_error", Some("malformed_json"));

    // Valid JSON of the wrong shape is refused as clearly.
    let a = s.post_json("/v1/chat/completions", "bad-json", &json!(["vm-openai"])).await;
    assert_eq!(a.status, 400, "a JSON array: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "invalid_request_error", None)), "request body must be a JSON object");
    let a = s.post_json("/v1/chat/completions", "bad-json", &json!({"model": "vm-openai"})).await;
    assert_eq!(a.status, 400, "no messages: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "invalid_request_error", None)), "`messages` must be an array");
    let a = s.post_json("/v1/messages", "bad-json", &chat_body("vm-anthropic", "hi")).await;
    assert_eq!(a.status, 400, "messages without max_tokens: {}", a.text);
    let v = a.json();
    assert_eq!(message(anthropic_error(&a, &v, "invalid_request_error")), "`max_tokens` is required");

    s.assert_still_serves("ok-after-bad-json").await;
    let rows = s.expect_rows(&["ok-after-bad-json"]).await;
    assert_eq!(rows[0].status, "ok");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_and_leaves_no_row() {
    let s = stack().await;
    let big = "x ".repeat(MAX_BODY_BYTES / 2 + 16);
    let body = chat_body("vm-openai", &big);
    assert!(body.to_string().len() > MAX_BODY_BYTES);
    let a = s.post_json("/v1/chat/completions", "too-big", &body).await;
    assert_eq!(a.status, 413, "oversized chat body: {}", &a.text[..a.text.len().min(300)]);
    let v = a.json();
    let e = openai_error(&a, &v, "request_too_large", None);
    assert_eq!(message(e), format!("request body is larger than the {MAX_BODY_BYTES} bytes this gateway accepts"));

    let a = s.post_json("/v1/messages", "too-big", &messages_body("vm-anthropic", &big)).await;
    assert_eq!(a.status, 413, "oversized messages body: {}", &a.text[..a.text.len().min(300)]);
    let v = a.json();
    let e = anthropic_error(&a, &v, "request_too_large");
    assert!(message(e).contains(&MAX_BODY_BYTES.to_string()), "{}", a.text);

    // Chunked, with no Content-Length to refuse it up front: cut off at the limit while read.
    let bytes = body.to_string().into_bytes();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let a = s
        .send(s.request("/v1/chat/completions", "too-big").header("content-type", "application/json").body(streamed))
        .await;
    assert_eq!(a.status, 413, "oversized chunked body: {}", &a.text[..a.text.len().min(300)]);
    openai_error(&a, &a.json(), "request_too_large", None);

    // Just under the limit is served.
    let fits = chat_body("vm-openai", &"y ".repeat(MAX_BODY_BYTES / 2 - 200));
    assert!(fits.to_string().len() <= MAX_BODY_BYTES);
    let a = s.post_json("/v1/chat/completions", "fits", &fits).await;
    assert_eq!(a.status, 200, "a body under the limit: {}", &a.text[..a.text.len().min(300)]);

    s.assert_still_serves("ok-after-too-big").await;
    s.expect_rows(&["fits", "ok-after-too-big"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431_and_leave_no_row() {
    let s = stack().await;
    // 64 KiB is the default header budget; hyper itself takes far larger header sections.
    let big = "h".repeat(8 << 10);
    let mut req = s.request("/v1/chat/completions", "too-many-headers").json(&chat_body("vm-openai", "hi"));
    for i in 0..9 {
        req = req.header(format!("x-filler-{i}"), big.as_str());
    }
    let a = s.send(req).await;
    assert_eq!(a.status, 431, "oversized headers: {}", &a.text[..a.text.len().min(300)]);
    let v = a.json();
    let e = openai_error(&a, &v, "request_too_large", None);
    assert_eq!(message(e), "request headers are larger than the 65536 bytes this gateway accepts");
    s.assert_still_serves("ok-after-big-headers").await;
    s.expect_rows(&["ok-after-big-headers"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_envelope_headers_are_400_naming_each() {
    let s = stack().await;
    let body = chat_body("vm-openai", "hi");
    let bare = || s.http.post(s.url("/v1/chat/completions")).bearer_auth(common::TEST_API_KEY);

    let a = s.send(bare().json(&body)).await;
    assert_eq!(a.status, 400, "no envelope at all: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "invalid_request_error", Some("missing_identity_headers"));
    assert_eq!(message(e), "missing required identity headers: X-TFY-Project, X-TFY-Session-ID");
    assert_eq!(e["missing_headers"], json!(["X-TFY-Project", "X-TFY-Session-ID"]), "{}", a.text);

    let a = s.send(bare().header("X-TFY-Project", "bad-input").json(&body)).await;
    assert_eq!(a.status, 400, "no session: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "invalid_request_error", Some("missing_identity_headers"));
    assert_eq!(e["missing_headers"], json!(["X-TFY-Session-ID"]), "{}", a.text);

    // Present but blank is missing too.
    let a = s.send(bare().header("X-TFY-Project", "  ").header("X-TFY-Session-ID", "blank-project").json(&body)).await;
    assert_eq!(a.status, 400, "blank project: {}", a.text);
    assert_eq!(a.json()["error"]["missing_headers"], json!(["X-TFY-Project"]), "{}", a.text);

    let a = s
        .send(
            s.http
                .post(s.url("/v1/messages"))
                .header("x-api-key", common::TEST_API_KEY)
                .json(&messages_body("vm-anthropic", "hi")),
        )
        .await;
    assert_eq!(a.status, 400, "no envelope on messages: {}", a.text);
    let v = a.json();
    let e = anthropic_error(&a, &v, "invalid_request_error");
    assert_eq!(message(e), "missing required identity headers: X-TFY-Project, X-TFY-Session-ID");

    s.assert_still_serves("ok-after-missing-headers").await;
    s.expect_rows(&["ok-after-missing-headers"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_forged_api_key_is_401() {
    let s = stack().await;
    let body = chat_body("vm-openai", "hi");
    let enveloped = |path: &str| {
        s.http.post(s.url(path)).header("X-TFY-Project", "bad-input").header("X-TFY-Session-ID", "forged-key")
    };
    let no_key = "no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`";

    let a = s.send(enveloped("/v1/chat/completions").json(&body)).await;
    assert_eq!(a.status, 401, "no key: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "authentication_error", Some("invalid_api_key"))), no_key);

    let a = s.send(enveloped("/v1/chat/completions").bearer_auth("tg-test-key-forged").json(&body)).await;
    assert_eq!(a.status, 401, "forged bearer key: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "authentication_error", Some("invalid_api_key"))), "invalid API key");

    // The stored hash is not the key.
    let a = s.send(enveloped("/v1/chat/completions").bearer_auth(common::TEST_API_KEY_SHA256).json(&body)).await;
    assert_eq!(a.status, 401, "the key's hash as the key: {}", a.text);

    let a = s.send(enveloped("/v1/chat/completions").basic_auth("user", Some(common::TEST_API_KEY)).json(&body)).await;
    assert_eq!(a.status, 401, "basic auth is not a key: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "authentication_error", Some("invalid_api_key"))), no_key);

    let a = s
        .send(
            enveloped("/v1/messages")
                .header("x-api-key", "tg-test-key-forged")
                .json(&messages_body("vm-anthropic", "hi")),
        )
        .await;
    assert_eq!(a.status, 401, "forged x-api-key on messages: {}", a.text);
    let v = a.json();
    assert_eq!(message(anthropic_error(&a, &v, "authentication_error")), "invalid API key");

    let a = s.send(s.http.get(s.url("/v1/models")).bearer_auth("tg-test-key-forged")).await;
    assert_eq!(a.status, 401, "forged key on /v1/models: {}", a.text);

    s.assert_still_serves("ok-after-forged-key").await;
    s.expect_rows(&["ok-after-forged-key"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_envelope_headers_are_400() {
    let s = stack().await;
    let body = chat_body("vm-openai", "hi");
    let non_ascii = reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap();
    let a =
        s.send(s.request("/v1/chat/completions", "forged-envelope").header("X-TFY-Team", non_ascii).json(&body)).await;
    assert_eq!(a.status, 400, "a non-ASCII team: {}", a.text);
    let v = a.json();
    assert_eq!(message(openai_error(&a, &v, "invalid_request_error", None)), "header X-TFY-Team is not visible ASCII");

    let long = "s".repeat(tollgate_ingress::envelope::MAX_VALUE_LEN + 1);
    let a = s
        .send(
            s.http
                .post(s.url("/v1/messages"))
                .bearer_auth(common::TEST_API_KEY)
                .header("X-TFY-Project", "bad-input")
                .header("X-TFY-Session-ID", long)
                .json(&messages_body("vm-anthropic", "hi")),
        )
        .await;
    assert_eq!(a.status, 400, "an over-long session id: {}", a.text);
    let v = a.json();
    let e = anthropic_error(&a, &v, "invalid_request_error");
    assert_eq!(
        message(e),
        format!("header X-TFY-Session-ID is longer than {} bytes", tollgate_ingress::envelope::MAX_VALUE_LEN)
    );

    s.assert_still_serves("ok-after-forged-envelope").await;
    s.expect_rows(&["ok-after-forged-envelope"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_model_is_403() {
    let s = stack().await;
    let a = s.post_json("/v1/chat/completions", "forbidden", &chat_body("vm-fallback", "hi")).await;
    assert_eq!(a.status, 403, "a virtual model the key may not use: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "permission_error", Some("model_not_allowed"));
    assert_eq!(message(e), "this API key may not use the model `vm-fallback`");

    let a = s.post_json("/v1/messages", "forbidden", &messages_body("vm-fallback", "hi")).await;
    assert_eq!(a.status, 403, "forbidden on messages: {}", a.text);
    let v = a.json();
    assert_eq!(
        message(anthropic_error(&a, &v, "permission_error")),
        "this API key may not use the model `vm-fallback`"
    );

    // A concrete provider/model, which only keys with `direct_models` may name.
    let a = s.post_json("/v1/chat/completions", "forbidden", &chat_body("openai-mock/gpt-4o-mini", "hi")).await;
    assert_eq!(a.status, 403, "a concrete model: {}", a.text);
    let v = a.json();
    assert!(message(openai_error(&a, &v, "permission_error", Some("model_not_allowed"))).contains("concrete model"));

    s.assert_still_serves("ok-after-forbidden").await;
    s.expect_rows(&["ok-after-forbidden"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404() {
    let s = stack().await;
    let a = s.post_json("/v1/chat/completions", "unknown", &chat_body("no-such-model", "hi")).await;
    assert_eq!(a.status, 404, "unknown model: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "not_found_error", Some("model_not_found"));
    assert_eq!(message(e), "the model `no-such-model` does not exist or is not served by this gateway");

    let a = s.post_json("/v1/messages", "unknown", &streaming(messages_body("no-such-model", "hi"))).await;
    assert_eq!(a.status, 404, "unknown model, streaming, on messages: {}", a.text);
    let v = a.json();
    assert!(message(anthropic_error(&a, &v, "not_found_error")).contains("`no-such-model`"));

    // A provider/model pair that the policy does not know.
    for model in ["openai-mock/gpt-9", "nobody/gpt-4o-mini"] {
        let a = s.post_json("/v1/chat/completions", "unknown", &chat_body(model, "hi")).await;
        assert_eq!(a.status, 404, "{model}: {}", a.text);
    }
    let a = s.send(s.request("/v1/embeddings", "unknown").json(&json!({"model": "no-such-model", "input": "x"}))).await;
    assert_eq!(a.status, 404, "unknown embeddings model: {}", a.text);

    s.assert_still_serves("ok-after-unknown").await;
    s.expect_rows(&["ok-after-unknown"]).await;
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// reached a provider: exactly one row each
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_garbage_is_502_or_a_stream_error_with_one_row_each() {
    let s = stack().await;
    let a = s.post_json("/v1/chat/completions", "garbage-json", &chat_body("vm-openai", "#mock garbage")).await;
    assert_eq!(a.status, 502, "a 200 whose body is not JSON: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "upstream_error", None);
    assert_eq!(message(e), "provider openai-mock failed: provider sent a response that is not a JSON object");

    let a = s.post_json("/v1/messages", "garbage-json-messages", &messages_body("vm-anthropic", "#mock garbage")).await;
    assert_eq!(a.status, 502, "garbage on messages: {}", a.text);
    let v = a.json();
    assert!(message(anthropic_error(&a, &v, "api_error")).contains("not a JSON object"), "{}", a.text);

    // Streams: the head (200) is out before the garbage, so the stream ends with an error event.
    let a = s
        .post_json("/v1/chat/completions", "garbage-stream", &streaming(chat_body("vm-openai", "#mock garbage")))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let frames = sse(&a.text);
    assert_eq!(frames.len(), 1, "only the error event: {}", a.text);
    let v: Value = serde_json::from_str(&frames[0].1).unwrap();
    assert_eq!(v["error"]["type"], "upstream_error", "{}", a.text);
    assert_eq!(v["error"]["message"], "provider sent a stream event that is not JSON", "{}", a.text);
    assert!(!a.text.contains("[DONE]"), "a broken stream must not look complete: {}", a.text);

    let a = s
        .post_json(
            "/v1/messages",
            "garbage-stream-messages",
            &streaming(messages_body("vm-anthropic", "#mock garbage")),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let frames = sse(&a.text);
    assert_eq!(frames.len(), 1, "only the error event: {}", a.text);
    assert_eq!(frames[0].0.as_deref(), Some("error"), "{}", a.text);
    let v: Value = serde_json::from_str(&frames[0].1).unwrap();
    anthropic_error(&Answer { status: 200, text: frames[0].1.clone() }, &v, "api_error");

    s.assert_still_serves("ok-after-garbage").await;
    let rows = s
        .expect_rows(&[
            "garbage-json",
            "garbage-json-messages",
            "garbage-stream",
            "garbage-stream-messages",
            "ok-after-garbage",
        ])
        .await;
    for (session, http_status, streamed) in [
        ("garbage-json", 502, false),
        ("garbage-json-messages", 502, false),
        ("garbage-stream", 200, true),
        ("garbage-stream-messages", 200, true),
    ] {
        let r = row(&rows, session);
        assert_eq!((r.status.as_str(), r.http_status, r.streamed), ("provider_error", http_status, streamed), "{r:?}");
        assert_eq!(r.token_source, "estimated", "{r:?}");
        assert_eq!(r.output, 0, "no output reached the client: {r:?}");
        assert!(!r.error.is_empty(), "{r:?}");
    }
    // An unreadable 2xx answer was served, so it may have been billed: its input is estimated,
    // as is a broken stream's.
    let r = row(&rows, "garbage-json");
    let (reference, _) = count::estimate_input("gpt-4o-mini", &chat_body("vm-openai", "#mock garbage"));
    assert_eq!((r.input, r.cost_nanos), (reference, reference * 150), "{r:?}");
    let r = row(&rows, "garbage-stream");
    let (reference, _) = count::estimate_input("gpt-4o-mini", &streaming(chat_body("vm-openai", "#mock garbage")));
    assert_eq!((r.input, r.reference_input.as_str()), (reference, reference.to_string().as_str()), "{r:?}");
    assert_eq!(r.cost_nanos, reference * 150, "{r:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_500_falls_back_or_reaches_the_client_with_one_row_each() {
    let s = stack().await;
    // The Anthropic-kind primary reads the tool_result block's directive (fail=500); the
    // OpenAI-kind fallback gets the request translated, which keeps text blocks only.
    let body = json!({"model": "vm-fallback-500", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look this up\n#mock prompt_tokens=30 completion_tokens=4"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "#mock fail=500"},
    ]}]});
    let a = s.post_json("/v1/messages", "fell-back", &body).await;
    assert_eq!(a.status, 200, "the fallback answers: {}", a.text);
    let v = a.json();
    assert_eq!(v["type"], "message", "{}", a.text);
    assert_eq!(v["content"][0]["text"], "w1 w2 w3 w4", "{}", a.text);
    assert_eq!(v["usage"]["input_tokens"], 30, "{}", a.text);

    let a = s.post_json("/v1/chat/completions", "failed", &chat_body("vm-openai", "#mock fail=500")).await;
    assert_eq!(a.status, 500, "no fallback: the provider's status reaches the client: {}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "api_error", None);
    assert_eq!(message(e), "mock failure: status 500 requested by #mock directive", "the provider's own body");

    let a = s.post_json("/v1/messages", "failed-messages", &messages_body("vm-anthropic", "#mock fail=503")).await;
    assert_eq!(a.status, 503, "{}", a.text);
    let v = a.json();
    assert_eq!(
        message(anthropic_error(&a, &v, "overloaded_error")),
        "mock failure: status 503 requested by #mock directive"
    );

    s.assert_still_serves("ok-after-500").await;
    let rows = s.expect_rows(&["failed", "failed-messages", "fell-back", "fell-back", "ok-after-500"]).await;
    // The refused first attempt is a row of its own: an HTTP error status is not billed.
    let first = attempt_row(&rows, "fell-back", 1);
    assert_eq!(
        (first.status.as_str(), first.http_status, first.provider.as_str()),
        ("provider_error", 500, "anthropic-mock"),
        "{first:?}"
    );
    assert_eq!(
        (first.fallback_path.as_str(), first.input, first.output, first.cost_nanos),
        ("[]", 0, 0, 0),
        "{first:?}"
    );
    let r = attempt_row(&rows, "fell-back", 2);
    assert_eq!(r.event_id, format!("{}#2", first.event_id), "one request id, one event per attempt");
    assert_eq!((r.status.as_str(), r.http_status, r.attempt), ("ok", 200, 2), "{r:?}");
    assert_eq!(r.fallback_path, "['anthropic-mock/claude-haiku-4-5']", "{r:?}");
    assert_eq!((r.provider.as_str(), r.model.as_str()), ("openai-mock", "gpt-4o-mini"), "{r:?}");
    assert_eq!((r.token_source.as_str(), r.input, r.output), ("provider", 30, 4), "{r:?}");
    assert_eq!(r.cost_nanos, 30 * 150 + 4 * 600, "{r:?}");
    assert_eq!(r.api_format, "anthropic");
    for (session, code) in [("failed", 500), ("failed-messages", 503)] {
        let r = row(&rows, session);
        assert_eq!((r.status.as_str(), r.http_status, r.attempt), ("provider_error", code, 1), "{r:?}");
        assert_eq!((r.fallback_path.as_str(), r.output, r.cost_nanos), ("[]", 0, 0), "{r:?}");
        assert!(r.error.contains(&format!("HTTP {code}")), "{r:?}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_before_the_first_byte_is_504_timeout() {
    let s = stack().await;
    // Warm up (tiktoken's tables load on first use) so the timing below is the provider's alone.
    s.assert_still_serves("warm-up").await;
    let started = Instant::now();
    let a = s.post_json("/v1/chat/completions", "stalled-head", &chat_body("vm-slow", "#mock stall_after=0")).await;
    let took = started.elapsed();
    assert_eq!(a.status, 504, "{}", a.text);
    let v = a.json();
    let e = openai_error(&a, &v, "upstream_error", Some("upstream_timeout"));
    assert_eq!(message(e), "provider openai-mock did not answer within 1000 ms");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(2900),
        "the rule's 1 s, not the 3 s idle timeout: {took:?}"
    );

    // A rule allowing more (5 s) than the idle timeout (3 s): still a timeout, not a failure.
    let a = s.post_json("/v1/messages", "stalled-head-idle", &messages_body("vm-openai", "#mock stall_after=0")).await;
    assert_eq!(a.status, 504, "{}", a.text);
    let v = a.json();
    let e = anthropic_error(&a, &v, "api_error");
    assert!(message(e).starts_with("provider openai-mock did not answer within 3"), "{}", a.text);

    s.assert_still_serves("ok-after-stall").await;
    let rows = s.expect_rows(&["ok-after-stall", "stalled-head", "stalled-head-idle", "warm-up"]).await;
    // A timeout may have been billed: the input is estimated, what the model wrote is unknown.
    let bodies = [chat_body("vm-slow", "#mock stall_after=0"), messages_body("vm-openai", "#mock stall_after=0")];
    for (session, body) in ["stalled-head", "stalled-head-idle"].into_iter().zip(bodies) {
        let r = row(&rows, session);
        assert_eq!((r.status.as_str(), r.http_status, r.token_source.as_str()), ("timeout", 504, "estimated"), "{r:?}");
        let (reference, _) = count::estimate_input("gpt-4o-mini", &body);
        assert_eq!((r.input, r.output, r.cost_nanos), (reference, 0, reference * 150), "{r:?}");
    }
    s.stop().await;
}

/// What a cut stream's row must say: estimated tokens, the input the provider reported (Anthropic
/// reports it first) or the reference estimate, and the output counted from what was streamed.
fn check_cut_row(r: &Row, status: &str, input: i64, output: i64, cost_nanos: i64) {
    assert_eq!((r.status.as_str(), r.http_status, r.streamed), (status, 200, true), "{r:?}");
    assert_eq!(r.token_source, "estimated", "{r:?}");
    assert_eq!((r.input, r.output), (input, output), "{r:?}");
    assert_eq!(r.cost_nanos, cost_nanos, "{r:?}");
    assert!(!r.error.is_empty(), "{r:?}");
}

/// Sends a stream that the mock cuts after three words (`stall_after` / `close_after`) on both
/// endpoints, and checks what the client saw. Returns the chat request (for its reference input
/// estimate); the rows are checked by the caller.
async fn cut_streams(s: &Stack, directive: &str, prefix: &str) -> Value {
    let chat = streaming(chat_body("vm-openai", &format!("#mock completion_tokens=10 {directive}")));
    let msgs =
        streaming(messages_body("vm-anthropic", &format!("#mock prompt_tokens=40 completion_tokens=10 {directive}")));
    let (chat_session, messages_session) = (format!("{prefix}-chat"), format!("{prefix}-messages"));
    let (a, b) = tokio::join!(
        s.post_json("/v1/chat/completions", &chat_session, &chat),
        s.post_json("/v1/messages", &messages_session, &msgs),
    );
    assert_eq!(a.status, 200, "{}", a.text);
    let frames = sse(&a.text);
    assert_eq!(openai_stream_text(&frames), "w1 w2 w3 ", "the words sent before the cut reach the client");
    let last: Value = serde_json::from_str(&frames.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "the stream ends with an error chunk: {}", a.text);
    assert!(last["error"]["message"].as_str().unwrap().starts_with("provider stream failed"), "{}", a.text);
    assert!(!a.text.contains("[DONE]"), "a cut stream must not look complete: {}", a.text);

    assert_eq!(b.status, 200, "{}", b.text);
    let frames = sse(&b.text);
    assert_eq!(anthropic_stream_text(&frames), "w1 w2 w3 ");
    let (name, data) = frames.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"), "the stream ends with an error event: {}", b.text);
    let v: Value = serde_json::from_str(data).unwrap();
    anthropic_error(&Answer { status: 200, text: data.clone() }, &v, "api_error");
    assert!(!b.text.contains("message_stop"), "{}", b.text);
    chat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_stalling_mid_stream_is_cut_at_the_idle_timeout_with_an_estimate() {
    let s = stack().await;
    let started = Instant::now();
    let chat = cut_streams(&s, "stall_after=3", "stall").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(20),
        "cut by the 3 s idle timeout: {took:?}"
    );

    s.assert_still_serves("ok-after-stall").await;
    let rows = s.expect_rows(&["ok-after-stall", "stall-chat", "stall-messages"]).await;
    let (reference, _) = count::estimate_input("gpt-4o-mini", &chat);
    let out = estimate("gpt-4o-mini", "w1 w2 w3 ");
    check_cut_row(row(&rows, "stall-chat"), "timeout", reference, out, reference * 150 + out * 600);
    let out = estimate("claude-haiku-4-5", "w1 w2 w3 ");
    check_cut_row(row(&rows, "stall-messages"), "timeout", 40, out, 40 * 1000 + out * 5000);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_closing_the_connection_is_502_or_a_cut_stream_with_an_estimate() {
    let s = stack().await;
    let chat = cut_streams(&s, "close_after=3", "close").await;

    // Before any byte of a non-streaming answer.
    let a = s.post_json("/v1/chat/completions", "close-head", &chat_body("vm-openai", "#mock close_after=0")).await;
    assert_eq!(a.status, 502, "{}", a.text);
    let v = a.json();
    assert!(
        message(openai_error(&a, &v, "upstream_error", None)).starts_with("provider openai-mock failed"),
        "{}",
        a.text
    );

    s.assert_still_serves("ok-after-close").await;
    let rows = s.expect_rows(&["close-chat", "close-head", "close-messages", "ok-after-close"]).await;
    let (reference, _) = count::estimate_input("gpt-4o-mini", &chat);
    let out = estimate("gpt-4o-mini", "w1 w2 w3 ");
    check_cut_row(row(&rows, "close-chat"), "provider_error", reference, out, reference * 150 + out * 600);
    let out = estimate("claude-haiku-4-5", "w1 w2 w3 ");
    check_cut_row(row(&rows, "close-messages"), "provider_error", 40, out, 40 * 1000 + out * 5000);
    // The request reached the provider before it hung up: may be billed, input estimated.
    let r = row(&rows, "close-head");
    let (reference, _) = count::estimate_input("gpt-4o-mini", &chat_body("vm-openai", "#mock close_after=0"));
    assert_eq!((r.status.as_str(), r.http_status, r.output), ("provider_error", 502, 0), "{r:?}");
    assert_eq!((r.input, r.cost_nanos), (reference, reference * 150), "{r:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_first_attempt_and_its_fallback_are_two_rows() {
    let s = stack().await;
    // The Anthropic-kind primary (1 s first-byte timeout) reads the tool_result's stall; the
    // OpenAI-kind fallback gets the text block only and answers.
    let body = json!({"model": "vm-timeout-fallback", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look this up\n#mock prompt_tokens=30 completion_tokens=4"},
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "#mock stall_after=0"},
    ]}]});
    let a = s.post_json("/v1/messages", "timed-out-then-ok", &body).await;
    assert_eq!(a.status, 200, "the fallback answers: {}", a.text);
    assert_eq!(a.json()["usage"]["input_tokens"], 30, "{}", a.text);
    let rows = s.expect_rows(&["timed-out-then-ok", "timed-out-then-ok"]).await;
    let first = attempt_row(&rows, "timed-out-then-ok", 1);
    let (reference, _) = count::estimate_input("claude-haiku-4-5", &body);
    assert_eq!(
        (first.status.as_str(), first.http_status, first.token_source.as_str()),
        ("timeout", 504, "estimated"),
        "{first:?}"
    );
    assert_eq!((first.provider.as_str(), first.input, first.output), ("anthropic-mock", reference, 0), "{first:?}");
    assert_eq!(first.cost_nanos, reference * 1000, "the estimated input at the primary's price: {first:?}");
    let second = attempt_row(&rows, "timed-out-then-ok", 2);
    assert_eq!(
        (second.status.as_str(), second.token_source.as_str(), second.input, second.output),
        ("ok", "provider", 30, 4),
        "{second:?}"
    );
    assert_eq!(second.fallback_path, "['anthropic-mock/claude-haiku-4-5']", "{second:?}");
    assert_eq!(second.event_id, format!("{}#2", first.event_id), "{second:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_from_a_non_streaming_call_still_gets_its_row() {
    let s = stack().await;
    s.assert_still_serves("warm-up").await;
    // The client gives up after 300 ms; the provider answers after 1.5 s, and the ingress
    // reads that answer and records what the provider reported.
    let body = chat_body("vm-openai", "#mock prompt_tokens=41 completion_tokens=7 latency_ms=1500");
    let gone = s
        .request("/v1/chat/completions", "gone-before-answer")
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the client gave up first");
    let rows = s.expect_rows(&["gone-before-answer", "warm-up"]).await;
    let r = row(&rows, "gone-before-answer");
    assert_eq!((r.status.as_str(), r.token_source.as_str(), r.input, r.output), ("ok", "provider", 41, 7), "{r:?}");
    assert_eq!(r.cost_nanos, 41 * 150 + 7 * 600, "{r:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_going_away_mid_stream_is_client_abort_with_an_estimate() {
    let s = stack().await;
    let body = streaming(chat_body("vm-openai", "#mock completion_tokens=60 chunk_delay_ms=100"));
    let resp = s.request("/v1/chat/completions", "client-left").json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    let mut seen = String::new();
    while openai_stream_text(&sse(&seen)).split_whitespace().count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), chunks.next()).await.expect("a chunk within 10 s");
        seen.push_str(std::str::from_utf8(&chunk.unwrap().unwrap()).unwrap());
    }
    let words_seen = openai_stream_text(&sse(&seen));
    drop(chunks);

    s.assert_still_serves("ok-after-client-left").await;
    let rows = s.expect_rows(&["client-left", "ok-after-client-left"]).await;
    let r = row(&rows, "client-left");
    assert_eq!((r.status.as_str(), r.http_status, r.streamed), ("client_abort", 200, true), "{r:?}");
    assert_eq!(r.token_source, "estimated", "{r:?}");
    let (reference, _) = count::estimate_input("gpt-4o-mini", &body);
    assert_eq!(r.input, reference, "{r:?}");
    // The ingress passed on at least what the client read, and far less than the whole answer.
    let at_least = estimate("gpt-4o-mini", &words_seen);
    let whole = estimate("gpt-4o-mini", &(1..=60).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" "));
    assert!(
        r.output >= at_least && r.output < whole / 2,
        "output {} not in [{at_least}, {}): {r:?}",
        r.output,
        whole / 2
    );
    assert_eq!(r.cost_nanos, r.input * 150 + r.output * 600, "{r:?}");
    assert_eq!(r.error, "client closed the connection", "{r:?}");
    s.stop().await;
}
