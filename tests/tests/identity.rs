//! Identity from credentials, end to end through the real broker and ClickHouse: a key's own
//! envelope values cannot be changed by a header (403, no row, no spend moved), a key names only
//! the concrete models it lists, and a gateway serves callers without a key only when its policy
//! says so, which a reload cannot change.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};

/// `printf %s tg-direct-key | sha256sum`.
const DIRECT_KEY: &str = "tg-direct-key";
const DIRECT_KEY_SHA256: &str = "8eb3756ffe2b3b0e66ac9da1b9a2a5f1fd96fa032552a1affb65fb686e29361c";

/// The test key pins every field but the workflow tag (the session too: a batch job's key);
/// the direct key is a team's, may name one concrete model, and leaves the envelope to its caller.
fn keys() -> String {
    format!(
        "type: tollgate-api-keys\nkeys:\n  - id: pinned\n    sha256: {}\n    subject: {{type: user, id: u_pinned}}\n    models: [vm-openai]\n    metadata:\n      X-TFY-Project: p-pinned\n      X-TFY-Team: t-pinned\n      X-TFY-Session-ID: batch-7\n      X-TFY-Environment: production\n      X-TFY-Cost-Center: cc-pinned\n  - id: direct\n    sha256: {DIRECT_KEY_SHA256}\n    subject: {{type: team, id: t-direct}}\n    models: [vm-openai, openai-mock/gpt-4o-mini]\n    direct_models: true\n",
        common::TEST_API_KEY_SHA256
    )
}

struct Call<'a> {
    key: &'a str,
    model: &'a str,
    headers: &'a [(&'a str, &'a str)],
}

async fn call(client: &reqwest::Client, ingress: std::net::SocketAddr, c: Call<'_>) -> (u16, Value) {
    let mut req = client
        .post(format!("http://{ingress}/v1/chat/completions"))
        .bearer_auth(c.key)
        .json(&json!({"model": c.model, "messages": [{"role": "user", "content": "who pays for this?"}]}));
    for (h, v) in c.headers {
        req = req.header(*h, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

/// One test, so the process-wide gauges and reload counters it reads are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_comes_from_credentials() {
    an_anonymous_gateway_is_only_ever_an_explicit_choice().await;
    a_keys_identity_cannot_be_spoofed_by_headers().await;
}

async fn a_keys_identity_cannot_be_spoofed_by_headers() {
    let topic = common::unique("identity");
    let db = common::unique("tollgate_identity");
    // One partition: rows arrive in the order the ingress published them.
    common::create_topic(&topic, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("api-keys.yaml"), keys()).unwrap();
    let ingress = common::start_ingress(policy.path(), &topic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let http = reqwest::Client::new();

    // The key's values, repeated or left out: served, and attributed to the key.
    let (status, body) = call(
        &http,
        ingress.addr,
        pinned(&[("X-TFY-Project", "p-pinned"), ("X-TFY-User-ID", "u_pinned"), ("X-TFY-Workflow-Tag", "nightly")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&http, ingress.addr, pinned(&[])).await;
    assert_eq!(status, 200, "{body}");

    // Each spoof is refused with 403, naming the header and the key's own value.
    for (header, spoof, key_value) in [
        ("X-TFY-Project", "platform-search", "p-pinned"),
        ("X-TFY-User-ID", "u_someone_else", "u_pinned"),
        ("X-TFY-Session-ID", "fresh-session-123", "batch-7"),
        ("X-TFY-Environment", "staging", "production"),
    ] {
        let spoofed = [(header, spoof)];
        let (status, body) = call(&http, ingress.addr, pinned(&spoofed)).await;
        assert_eq!(status, 403, "{header}: {body}");
        assert_eq!(body["error"]["code"], "identity_conflict", "{body}");
        let m = message(&body);
        assert!(m.contains(header) && m.contains(key_value), "{header}: {m}");
    }

    // Concrete models: only those the key lists, and only with direct_models.
    let (status, body) = call(&http, ingress.addr, pinned_direct(common::TEST_API_KEY)).await;
    assert_eq!(status, 403, "a key without direct_models: {body}");
    let direct = |model| Call {
        key: DIRECT_KEY,
        model,
        headers: &[("X-TFY-Project", "p-direct"), ("X-TFY-Session-ID", "s-direct")],
    };
    let (status, body) = call(&http, ingress.addr, direct("anthropic-mock/claude-haiku-4-5")).await;
    assert_eq!(status, 403, "a concrete model the key does not list: {body}");
    assert!(message(&body).contains("may not use the model"), "{body}");
    let (status, body) = call(&http, ingress.addr, direct("openai-mock/gpt-4o-mini")).await;
    assert_eq!(status, 200, "a listed concrete model: {body}");

    // A last request after every refusal: once its row is in, every row before it is too.
    let (status, _) = call(&http, ingress.addr, pinned(&[("X-TFY-Workflow-Tag", "sentinel")])).await;
    assert_eq!(status, 200);
    let rows_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    common::wait_for_count(&rows_sql, 4, Duration::from_secs(60)).await;
    let sentinel = format!("SELECT count() FROM {db}.usage_events FINAL WHERE workflow_tag = 'sentinel'");
    common::wait_for_count(&sentinel, 1, Duration::from_secs(60)).await;

    let rows = common::ch(&format!(
        "SELECT api_key_id, project, team, user_id, session_id, environment, cost_center, count(), sum(cost_nanos) > 0 \
         FROM {db}.usage_events FINAL GROUP BY api_key_id, project, team, user_id, session_id, environment, cost_center \
         ORDER BY api_key_id FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(
        rows,
        "direct\tp-direct\t\t\ts-direct\t\t\t1\t1\n\
         pinned\tp-pinned\tt-pinned\tu_pinned\tbatch-7\tproduction\tcc-pinned\t3\t1\n",
        "every row carries the key's identity; the refused requests left none and moved no spend"
    );
    assert_eq!(
        common::ch_count(&format!("SELECT count() FROM {db}.usage_events WHERE project = 'platform-search'")).await,
        0
    );

    ingress.stop().await;
    meter.stop().await;
    mock.stop().await;
}

/// A call with the pinned key to the virtual model it may use.
fn pinned<'a>(headers: &'a [(&'a str, &'a str)]) -> Call<'a> {
    Call { key: common::TEST_API_KEY, model: "vm-openai", headers }
}

fn pinned_direct(key: &str) -> Call<'_> {
    Call { key, model: "openai-mock/gpt-4o-mini", headers: &[] }
}

async fn an_anonymous_gateway_is_only_ever_an_explicit_choice() {
    let topic = common::unique("anonymous");
    common::create_topic(&topic, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);

    // No keys document at all: the ingress does not start.
    std::fs::remove_file(policy.path().join("api-keys.yaml")).unwrap();
    let refused = common::start_ingress(policy.path(), &topic).await;
    let err = tokio::time::timeout(Duration::from_secs(60), refused.task).await.unwrap().unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("no tollgate-api-keys document"), "{err:#}");

    // Said explicitly: served without a key, and the gauge says so.
    std::fs::write(policy.path().join("api-keys.yaml"), "type: tollgate-api-keys\nallow_anonymous: true\n").unwrap();
    let open = common::start_ingress(policy.path(), &topic).await;
    let http = reqwest::Client::new();
    let body = json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi"}]});
    let anonymous = |addr| {
        http.post(format!("http://{addr}/v1/chat/completions"))
            .header("X-TFY-Project", "p")
            .header("X-TFY-Session-ID", "s")
            .json(&body)
    };
    assert_eq!(anonymous(open.addr).send().await.unwrap().status().as_u16(), 200);
    let gauge = |name: &str| {
        common::metrics()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(gauge("tollgate_ingress_anonymous "), 1.0);
    open.stop().await;

    // A keyed gateway stays keyed: a reload that would remove every key is refused.
    common::write_api_keys(policy.path(), "only-key", &["vm-openai"], &[]);
    let spool = tempfile::tempdir().unwrap();
    let mut config = common::ingress_config(policy.path(), &common::kafka_brokers(), &topic, spool.path());
    config.reload = Some(tollgate_runtime::reload::ReloadOptions {
        poll: Some(Duration::from_millis(100)),
        sighup: false,
        settle: Duration::from_millis(50),
    });
    let keyed = common::start_ingress_with(config).await;
    assert_eq!(anonymous(keyed.addr).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(gauge("tollgate_ingress_anonymous "), 0.0);
    let invalid = || common::metric(&common::metrics().render(), "tollgate_policy_reloads_total{outcome=\"invalid\"}");
    let before = invalid();
    std::fs::write(policy.path().join("api-keys.yaml"), "type: tollgate-api-keys\nallow_anonymous: true\n").unwrap();
    common::until_at_least(before + 1, Duration::from_secs(60), || async { invalid() })
        .await
        .expect("the reload is tried and refused");
    assert_eq!(anonymous(keyed.addr).send().await.unwrap().status().as_u16(), 401, "still keyed");
    keyed.stop().await;
    mock.stop().await;
}
