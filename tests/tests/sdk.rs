//! The official `openai` and `anthropic` Python SDKs, pointed at the ingress, complete streaming
//! and non-streaming calls (both wire formats, both provider kinds), see the exact text and usage
//! the provider reported, raise the right exception for refused requests and for a stream the
//! provider cuts; and every call that reached a provider is one ClickHouse row with the key's id,
//! the token counts (provider's, or estimated for a cut stream) and the right cost.
//!
//! The calls themselves are made by `tests/python/sdk_check.py`; this test owns every
//! expectation and passes them to it as JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_ingress::count;

const KEY_ID: &str = "sdk-key";

/// One SDK call: which SDK and method, which virtual model, and the usage the mock reports.
#[derive(Debug, Clone)]
struct Case {
    session: String,
    sdk: &'static str,
    call: &'static str,
    model: &'static str,
    prompt: i64,
    completion: i64,
    cached: i64,
    cache_write: i64,
}

/// What the meter must have stored for a case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    api_key_id: String,
    api_format: String,
    virtual_model: String,
    provider: String,
    model: String,
    streamed: bool,
    input: i64,
    output: i64,
    cached: i64,
    cache_write: i64,
    cost_nanos: i64,
    token_source: String,
    status: String,
    project: String,
    team: String,
}

impl Case {
    fn anthropic_provider(&self) -> bool {
        self.model == "vm-anthropic"
    }

    fn embeddings(&self) -> bool {
        self.call == "embeddings"
    }

    fn text(&self) -> String {
        if self.embeddings() {
            return format!("embed this for {}\n#mock prompt_tokens={}", self.session, self.prompt);
        }
        format!(
            "Case {}: say something.\n#mock prompt_tokens={} completion_tokens={} cached_tokens={} cache_write_tokens={}",
            self.session, self.prompt, self.completion, self.cached, self.cache_write
        )
    }

    fn expect_text(&self) -> String {
        (1..=self.completion).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
    }

    /// The usage fields the SDK must show (`None`: no usage at all).
    fn expect_usage(&self) -> Option<Value> {
        let (p, c, k, w) = (self.prompt, self.completion, self.cached, self.cache_write);
        match (self.sdk, self.call) {
            (_, "embeddings") => Some(json!({"prompt_tokens": p, "total_tokens": p})),
            ("openai", "chat_stream") => None,
            // OpenAI's prompt_tokens include cache reads (and, translated from Anthropic, writes).
            ("openai", _) => {
                Some(json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "cached_tokens": k}))
            }
            // Anthropic's input_tokens exclude cache reads and writes; OpenAI has no cache writes.
            _ if self.anthropic_provider() => Some(json!({
                "input_tokens": p - k - w, "output_tokens": c,
                "cache_read_input_tokens": k, "cache_creation_input_tokens": w})),
            _ => Some(json!({
                "input_tokens": p - k, "output_tokens": c,
                "cache_read_input_tokens": k, "cache_creation_input_tokens": 0})),
        }
    }

    fn spec(&self) -> Value {
        let mut v = json!({
            "session": self.session,
            "sdk": self.sdk,
            "call": self.call,
            "model": self.model,
            "text": self.text(),
            "max_tokens": 64,
            "expect_usage": self.expect_usage(),
        });
        if !self.embeddings() {
            v["expect_text"] = json!(self.expect_text());
        }
        v
    }

    /// The row, with the cost worked out here from the test price card (nano-USD per token:
    /// gpt-4o-mini 150 in / 600 out / 75 cached; claude-haiku-4-5 1000 in / 5000 out /
    /// 100 cached / 1250 cache write), not by the product.
    fn expect_row(&self) -> Row {
        let (p, c, k, w) = (self.prompt, self.completion, self.cached, self.cache_write);
        let (provider, model, output, cached, cache_write, cost_nanos) = if self.embeddings() {
            ("openai-mock", "gpt-4o-mini", 0, 0, 0, p * 150)
        } else if self.anthropic_provider() {
            ("anthropic-mock", "claude-haiku-4-5", c, k, w, (p - k - w) * 1000 + c * 5000 + k * 100 + w * 1250)
        } else {
            ("openai-mock", "gpt-4o-mini", c, k, 0, (p - k) * 150 + c * 600 + k * 75)
        };
        Row {
            api_key_id: KEY_ID.into(),
            api_format: if self.sdk == "openai" { "openai" } else { "anthropic" }.into(),
            virtual_model: self.model.into(),
            provider: provider.into(),
            model: model.into(),
            streamed: self.call.contains("stream"),
            input: p,
            output,
            cached,
            cache_write,
            cost_nanos,
            token_source: "provider".into(),
            status: "ok".into(),
            project: "sdk-check".into(),
            team: "sdk-team".into(),
        }
    }
}

fn cases() -> Vec<Case> {
    let calls: [(&str, &str, &[&str]); 7] = [
        ("openai", "chat", &["vm-openai", "vm-anthropic"]),
        ("openai", "chat_stream", &["vm-openai", "vm-anthropic"]),
        ("openai", "chat_stream_usage", &["vm-openai", "vm-anthropic"]),
        ("openai", "embeddings", &["vm-openai"]),
        ("anthropic", "messages", &["vm-openai", "vm-anthropic"]),
        ("anthropic", "messages_stream_raw", &["vm-openai", "vm-anthropic"]),
        ("anthropic", "messages_stream_helper", &["vm-openai", "vm-anthropic"]),
    ];
    let mut out = Vec::new();
    for (sdk, call, models) in calls {
        for model in models {
            let i = out.len() as i64;
            out.push(Case {
                session: format!("sdk-{i:02}-{sdk}-{call}-{model}"),
                sdk,
                call,
                model,
                prompt: 40 + 17 * i,
                completion: 3 + i % 5,
                cached: 5 + i,
                cache_write: 2 + i % 3,
            });
        }
    }
    out
}

/// A stream the mock cuts (`close_after=2`) under an SDK: the SDK must raise after the first two
/// words, and the row must say `provider_error` with estimated tokens.
#[derive(Debug, Clone)]
struct CutStream {
    session: &'static str,
    sdk: &'static str,
    call: &'static str,
    model: &'static str,
    error: &'static str,
}

const CUT_PROMPT: i64 = 70;

const CUT_STREAMS: [CutStream; 2] = [
    // Translated both ways: an OpenAI client on the Anthropic-kind model and the reverse.
    CutStream {
        session: "sdk-cut-openai",
        sdk: "openai",
        call: "chat_stream",
        model: "vm-anthropic",
        error: "APIError",
    },
    CutStream {
        session: "sdk-cut-anthropic",
        sdk: "anthropic",
        call: "messages_stream_helper",
        model: "vm-openai",
        error: "APIStatusError",
    },
];

impl CutStream {
    fn text(&self) -> String {
        format!("Cut {}.\n#mock prompt_tokens={CUT_PROMPT} completion_tokens=9 close_after=2", self.session)
    }

    fn spec(&self) -> Value {
        json!({
            "session": self.session, "sdk": self.sdk, "call": self.call, "model": self.model,
            "text": self.text(), "max_tokens": 64, "expect_text_before": "w1 w2 ",
            "error": self.error, "message_contains": "provider stream failed",
        })
    }

    /// Input: what the provider reported before the cut (Anthropic's message_start), else the
    /// ingress's tiktoken reference; output: tiktoken over the two words streamed.
    fn expect_row(&self) -> Row {
        let anthropic = self.model == "vm-anthropic";
        let (provider, model) =
            if anthropic { ("anthropic-mock", "claude-haiku-4-5") } else { ("openai-mock", "gpt-4o-mini") };
        let estimate = count::count_text(count::encoding_for(model), "w1 w2 ");
        let (input, output, cost_nanos) = if anthropic {
            // message_start reported the input (and output_tokens=1, below the estimate).
            let output = estimate.max(1);
            (CUT_PROMPT, output, CUT_PROMPT * 1000 + output * 5000)
        } else {
            let body = json!({"messages": [{"role": "user", "content": self.text()}]});
            let (reference, _) = count::estimate_input(model, &body);
            (reference, estimate, reference * 150 + estimate * 600)
        };
        Row {
            api_key_id: KEY_ID.into(),
            api_format: if self.sdk == "openai" { "openai" } else { "anthropic" }.into(),
            virtual_model: self.model.into(),
            provider: provider.into(),
            model: model.into(),
            streamed: true,
            input,
            output,
            cached: 0,
            cache_write: 0,
            cost_nanos,
            token_source: "estimated".into(),
            status: "provider_error".into(),
            project: "sdk-check".into(),
            team: "sdk-team".into(),
        }
    }
}

/// Refused calls: the SDK exception each must raise, and a word its message must contain.
fn refusals() -> Value {
    json!([
        {"sdk": "openai", "call": "chat", "model": "vm-openai", "key": "bad",
         "error": "AuthenticationError", "status": 401, "message_contains": "invalid API key"},
        {"sdk": "anthropic", "call": "messages", "model": "vm-anthropic", "key": "bad",
         "error": "AuthenticationError", "status": 401, "message_contains": "invalid API key"},
        {"sdk": "openai", "call": "chat", "model": "vm-fallback", "key": "good",
         "error": "PermissionDeniedError", "status": 403, "message_contains": "vm-fallback"},
        {"sdk": "anthropic", "call": "messages_stream_helper", "model": "vm-fallback", "key": "good",
         "error": "PermissionDeniedError", "status": 403, "message_contains": "vm-fallback"},
        {"sdk": "openai", "call": "chat_stream", "model": "no-such-model", "key": "good",
         "error": "NotFoundError", "status": 404, "message_contains": "no-such-model"},
        {"sdk": "anthropic", "call": "messages", "model": "no-such-model", "key": "good",
         "error": "NotFoundError", "status": 404, "message_contains": "no-such-model"},
    ])
}

async fn run_sdk_check(spec: &Value) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/sdk_check.py");
    let child = tokio::process::Command::new("python3")
        .arg(&script)
        .env("TOLLGATE_SDK_SPEC", spec.to_string())
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .expect("sdk_check.py finishes within 180 s")
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()))
}

async fn stored_rows(db: &str) -> BTreeMap<String, Row> {
    let tsv = common::ch(&format!(
        "SELECT session_id, api_key_id, api_format, virtual_model, provider, model, streamed, input_tokens, \
         output_tokens, cached_input_tokens, cache_write_tokens, cost_nanos, token_source, status, project, team \
         FROM {db}.usage_events FINAL ORDER BY session_id FORMAT TabSeparated"
    ))
    .await;
    let mut rows = BTreeMap::new();
    for line in tsv.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 16, "{line}");
        let int = |i: usize| -> i64 { f[i].parse().unwrap_or_else(|e| panic!("column {i} of {line}: {e}")) };
        let row = Row {
            api_key_id: f[1].into(),
            api_format: f[2].into(),
            virtual_model: f[3].into(),
            provider: f[4].into(),
            model: f[5].into(),
            streamed: f[6] == "1",
            input: int(7),
            output: int(8),
            cached: int(9),
            cache_write: int(10),
            cost_nanos: int(11),
            token_source: f[12].into(),
            status: f[13].into(),
            project: f[14].into(),
            team: f[15].into(),
        };
        assert!(rows.insert(f[0].to_owned(), row).is_none(), "two rows for session {}", f[0]);
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_sdks_stream_and_complete_through_the_ingress() {
    let topic = common::unique("usage_sdk");
    let db = common::unique("tollgate_sdk");
    common::create_topic(&topic, 1).await;
    let mock = common::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    common::write_policy(dir.path(), mock.addr);
    // The key may use two of the three virtual models; its metadata supplies the team.
    common::write_api_keys(dir.path(), KEY_ID, &["vm-openai", "vm-anthropic"], &[("X-TFY-Team", "sdk-team")]);
    let ingress = common::start_ingress(dir.path(), &topic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;

    let cases = cases();
    let spec = json!({
        "base_url": format!("http://{}", ingress.addr),
        "key": common::TEST_API_KEY,
        "bad_key": "tg-test-key-forged",
        "headers": {"X-TFY-Project": "sdk-check"},
        "session_header": "X-TFY-Session-ID",
        "cases": cases.iter().map(Case::spec).collect::<Vec<_>>(),
        "stream_failures": CUT_STREAMS.iter().map(CutStream::spec).collect::<Vec<_>>(),
        "errors": refusals(),
        "models": ["vm-anthropic", "vm-openai"],
    });
    let out = run_sdk_check(&spec).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sdk_check.py failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("sdk_check: all "), "no summary line:\n{stdout}");
    eprintln!("{stdout}"); // shown with --nocapture: one line per SDK check

    // Every call that reached a provider is one row; refused calls (session `sdk-refused`) leave none.
    let mut expected: BTreeMap<String, Row> = cases.iter().map(|c| (c.session.clone(), c.expect_row())).collect();
    expected.extend(CUT_STREAMS.iter().map(|c| (c.session.to_owned(), c.expect_row())));
    let n = expected.len() as u64;
    let count_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    let arrived = common::until_at_least(n, Duration::from_secs(60), || common::ch_count(&count_sql)).await.is_ok();
    assert!(arrived, "only {} of {n} rows reached ClickHouse", common::ch_count(&count_sql).await);
    // Final: the ingress stopped and the meter through the whole topic.
    ingress.stop().await;
    common::meter_finished(&db, &topic).await;
    let rows = stored_rows(&db).await;
    assert_eq!(
        rows.len() as u64,
        n,
        "exactly one row per call that reached a provider, none for refused ones: {rows:#?}"
    );
    for (session, row) in &expected {
        assert_eq!(rows.get(session), Some(row), "row of {session}");
    }
    let total: i64 = expected.values().map(|r| r.cost_nanos).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        total.to_string(),
        "total spend to the nano-dollar"
    );

    meter.stop().await;
    mock.stop().await;
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events FINAL")).await, n);
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
