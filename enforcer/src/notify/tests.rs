//! Unit tests of the notifier: the payload formats, the retry rules, and whole deliveries over
//! HTTP to an in-process receiver on 127.0.0.1:0 that records every post and answers as each
//! test scripts it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use reqwest::StatusCode;
use serde_json::Value;
use tollgate_schemas::decision::{Alert, AlertKind, Measure, Severity};
use tollgate_schemas::policy::AlertChannel;

use super::delivery::{parse_retry_after, retryable_status};
use super::{Deliveries, DeliveryStats, Notifier, NotifyConfig, format_amount, pagerduty_payload, slack_payload};

const ENV_URL: &str = "TOLLGATE_NOTIFY_TEST_URL";
const ENV_KEY: &str = "TOLLGATE_NOTIFY_TEST_ROUTING_KEY";
const UNSET_ENV: &str = "TOLLGATE_NOTIFY_TEST_NEVER_SET_7f3c";

/// How the test receiver answers one post.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    RetryAfter(u16, &'static str),
    /// Answers 200 after this long (longer than the client's timeout in the tests).
    Stall(Duration),
}

#[derive(Clone, Debug)]
struct Hit {
    path: String,
    at: Instant,
    headers: HeaderMap,
    body: Value,
}

#[derive(Default)]
struct Script {
    hits: Vec<Hit>,
    replies: HashMap<String, VecDeque<Reply>>,
}

/// An in-process webhook receiver on 127.0.0.1:0 that records every post and answers as
/// scripted per path (200 once the script runs out).
#[derive(Clone, Default)]
struct Receiver {
    addr: Option<SocketAddr>,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    async fn start(script: &[(&str, &[Reply])]) -> Self {
        let mut s = Script::default();
        for (path, replies) in script {
            s.replies.insert(format!("/{path}"), replies.iter().cloned().collect());
        }
        let script = Arc::new(Mutex::new(s));
        let app = Router::new().route("/{*path}", post(receive)).with_state(Arc::clone(&script));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr: Some(addr), script }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr.unwrap())
    }

    fn hits(&self) -> Vec<Hit> {
        self.script.lock().unwrap().hits.clone()
    }
}

async fn receive(
    State(script): State<Arc<Mutex<Script>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let path = format!("/{path}");
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    let reply = {
        let mut s = script.lock().unwrap();
        s.hits.push(Hit { path: path.clone(), at: Instant::now(), headers, body });
        s.replies.get_mut(&path).and_then(VecDeque::pop_front)
    };
    let status = |code: u16| AxumStatus::from_u16(code).unwrap();
    match reply {
        None => (AxumStatus::OK, "ok").into_response(),
        Some(Reply::Status(code)) => (status(code), "scripted").into_response(),
        Some(Reply::RetryAfter(code, after)) => (status(code), [("retry-after", after)], "later").into_response(),
        Some(Reply::Stall(d)) => {
            tokio::time::sleep(d).await;
            (AxumStatus::OK, "late").into_response()
        }
    }
}

fn fast() -> NotifyConfig {
    NotifyConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        max_attempts: 5,
        max_elapsed: Duration::from_secs(30),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        max_pending: 100,
        max_in_flight: 4,
    }
}

fn channel(name: &str, url: Option<String>) -> AlertChannel {
    AlertChannel { name: name.to_owned(), url, url_env: None, routing_key: None, routing_key_env: None }
}

fn channels(list: Vec<AlertChannel>) -> BTreeMap<String, AlertChannel> {
    list.into_iter().map(|c| (c.name.clone(), c)).collect()
}

/// 2025-06-01T00:00:00Z.
const JUNE_US: i64 = 1_748_736_000_000_000;
/// 2025-07-01T00:00:00Z.
const JULY_US: i64 = 1_751_328_000_000_000;

fn alert(notify: &[&str]) -> Alert {
    Alert {
        alert_id: Alert::id_for("search-monthly", "team:search", JUNE_US, 80),
        rule_id: "search-monthly".to_owned(),
        kind: AlertKind::BudgetThreshold,
        severity: Severity::Warning,
        scope: "team:search".to_owned(),
        threshold_pct: 80,
        measure: Measure::CostNanos,
        limit: 1_000_000_000_000,
        observed: 812_400_000_000,
        window_start_us: JUNE_US,
        window_end_us: JULY_US,
        raised_at_us: JUNE_US + 1_234_567,
        summary: "team:search spent $812.40 of its $1,000.00 monthly budget".to_owned(),
        notify: notify.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[test]
fn amounts_read_as_dollars_and_whole_numbers() {
    assert_eq!(format_amount(Measure::CostNanos, 812_400_000_000), "$812.40");
    assert_eq!(format_amount(Measure::CostNanos, 1_000_000_000_000), "$1,000.00");
    assert_eq!(format_amount(Measure::CostNanos, 1_234_567_891_000_000), "$1,234,567.891");
    assert_eq!(format_amount(Measure::CostNanos, 4_200_000), "$0.0042");
    assert_eq!(format_amount(Measure::CostNanos, 999_990_000), "$0.99999", "exact, never rounded");
    assert_eq!(format_amount(Measure::CostNanos, 0), "$0.00");
    assert_eq!(format_amount(Measure::CostNanos, -2_500_000_000), "-$2.50");
    assert_eq!(format_amount(Measure::Tokens, 1_234_567), "1,234,567 tokens");
    assert_eq!(format_amount(Measure::Tokens, 999), "999 tokens");
    assert_eq!(format_amount(Measure::Requests, 1), "1 request");
    assert_eq!(format_amount(Measure::Requests, 12_000), "12,000 requests");
}

#[test]
fn retry_after_reads_seconds_and_http_dates() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
    assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
    assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
    assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after("soon", now), None);
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap() {
    let inner = Notifier::new(&BTreeMap::new(), fast()).unwrap().inner;
    for _ in 0..50 {
        let first = inner.backoff(1);
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10), "{first:?}");
        let second = inner.backoff(2);
        assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(20), "{second:?}");
        let capped = inner.backoff(40);
        assert!(capped >= Duration::from_millis(20) && capped <= Duration::from_millis(40), "{capped:?}");
    }
}

#[test]
fn statuses_are_retried_or_not() {
    for code in [408, 429, 500, 502, 503, 504] {
        assert!(retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
    }
    for code in [301, 400, 401, 403, 404, 410, 413, 422] {
        assert!(!retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
    }
}

#[test]
fn slack_payload_has_text_and_readable_blocks() {
    let mut a = alert(&["slack:#ai-budget-alerts"]);
    a.scope = "team:<search>&co".to_owned();
    let p = slack_payload(&a);
    let text = p["text"].as_str().unwrap();
    assert!(text.contains("$812.40 of $1,000.00 (81%)"), "{text}");
    assert!(text.contains("team:&lt;search&gt;&amp;co"), "markup is escaped: {text}");
    let blocks = p["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(blocks[0]["text"]["type"], "plain_text");
    assert!(blocks[0]["text"]["text"].as_str().unwrap().contains("Budget 80% reached"));
    assert_eq!(blocks[1]["type"], "section");
    assert_eq!(blocks[1]["text"]["type"], "mrkdwn");
    assert_eq!(blocks[1]["text"]["text"], "team:search spent $812.40 of its $1,000.00 monthly budget");
    let fields: Vec<&str> =
        blocks[2]["fields"].as_array().unwrap().iter().map(|f| f["text"].as_str().unwrap()).collect();
    assert_eq!(
        fields,
        [
            "*Rule*\n`search-monthly`",
            "*Scope*\n`team:&lt;search&gt;&amp;co`",
            "*Observed*\n$812.40",
            "*Limit*\n$1,000.00",
            "*Used*\n81% of limit",
            "*Threshold*\n80%",
            "*Severity*\nwarning",
        ]
    );
    assert_eq!(blocks[3]["type"], "context");
    let context = blocks[3]["elements"][0]["text"].as_str().unwrap();
    assert!(context.contains("2025-06-01 00:00 – 2025-07-01 00:00 UTC"), "{context}");

    let mut tokens = alert(&[]);
    tokens.measure = Measure::Tokens;
    tokens.limit = 5_000_000;
    tokens.observed = 5_250_000;
    tokens.summary.clear();
    let p = slack_payload(&tokens);
    assert!(p["text"].as_str().unwrap().contains("5,250,000 tokens of 5,000,000 tokens (105%)"));
    assert_eq!(
        p["blocks"][1]["text"]["text"],
        "Budget 80% reached for team:search: 5,250,000 tokens of 5,000,000 tokens (105%), rule search-monthly"
    );
}

#[test]
fn pagerduty_payload_is_an_events_v2_trigger() {
    let mut a = alert(&["pagerduty:platform"]);
    a.severity = Severity::Critical;
    let p = pagerduty_payload(&a, "R0UT1NGKEY");
    assert_eq!(p["routing_key"], "R0UT1NGKEY");
    assert_eq!(p["event_action"], "trigger");
    assert_eq!(p["dedup_key"], a.alert_id.as_str());
    let payload = &p["payload"];
    assert_eq!(payload["summary"], a.summary.as_str());
    assert_eq!(payload["source"], "tollgate");
    assert_eq!(payload["severity"], "critical");
    assert_eq!(payload["timestamp"], "2025-06-01T00:00:01.234567Z");
    assert_eq!(payload["component"], "team:search");
    assert_eq!(payload["group"], "search-monthly");
    assert_eq!(payload["class"], "budget_threshold");
    let details = &payload["custom_details"];
    assert_eq!(details["observed"], 812_400_000_000i64);
    assert_eq!(details["limit_display"], "$1,000.00");
    assert_eq!(details["percent_of_limit"], 81);
    assert_eq!(details["window_end"], "2025-07-01T00:00:00Z");

    for (severity, expected) in [(Severity::Warning, "warning"), (Severity::Info, "info")] {
        a.severity = severity;
        assert_eq!(pagerduty_payload(&a, "k")["payload"]["severity"], expected);
    }

    a.summary = "x".repeat(2000);
    a.alert_id = "y".repeat(300);
    let p = pagerduty_payload(&a, "k");
    assert_eq!(p["payload"]["summary"].as_str().unwrap().chars().count(), 1024);
    let key = p["dedup_key"].as_str().unwrap();
    assert_eq!(key.chars().count(), 255);
    a.alert_id.push('z');
    assert_ne!(pagerduty_payload(&a, "k")["dedup_key"].as_str().unwrap(), key, "long ids stay distinct");
}

#[tokio::test]
async fn slack_and_webhook_payloads_over_http() {
    let rx = Receiver::start(&[("finops", &[Reply::Status(202)])]).await;
    let map = channels(vec![
        channel("slack:#ai-budget-alerts", Some(rx.url("slack"))),
        channel("webhook:finops", Some(rx.url("finops"))),
    ]);
    let notifier = Notifier::new(&map, fast()).unwrap();
    let a = alert(&["slack:#ai-budget-alerts", "webhook:finops", "webhook:finops"]);
    assert_eq!(notifier.notify(&a), 2, "each channel once");
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 2, ..Default::default() });

    let hits = rx.hits();
    assert_eq!(hits.len(), 2);
    let hit = |path: &str| hits.iter().find(|h| h.path == path).unwrap();
    for h in &hits {
        assert_eq!(h.headers["content-type"], "application/json");
        assert_eq!(h.headers["x-tollgate-alert-id"], a.alert_id.as_str());
    }
    let slack = hit("/slack");
    assert!(slack.body["text"].as_str().unwrap().contains("$812.40 of $1,000.00"));
    assert_eq!(slack.body["blocks"].as_array().unwrap().len(), 4);
    assert!(!slack.headers.contains_key("idempotency-key"));

    let finops = hit("/finops");
    assert_eq!(finops.headers["idempotency-key"], a.alert_id.as_str());
    let back: Alert = serde_json::from_value(finops.body.clone()).unwrap();
    assert_eq!(back, a, "the webhook body is the whole alert");
    assert_eq!(finops.body["observed"], 812_400_000_000i64);
}

#[tokio::test]
async fn two_503s_then_200_is_one_delivery_after_three_attempts() {
    let rx = Receiver::start(&[("hook", &[Reply::Status(503), Reply::Status(503), Reply::Status(200)])]).await;
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(rx.hits().len(), 3);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 2, failed: 0, dropped: 0 });
    let ids: BTreeSet<_> = rx.hits().iter().map(|h| h.headers["idempotency-key"].clone()).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same idempotency key");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let rx = Receiver::start(&[("hook", &[Reply::RetryAfter(429, "1")])]).await;
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    let hits = rx.hits();
    assert_eq!(hits.len(), 2);
    let gap = hits[1].at - hits[0].at;
    assert!(gap >= Duration::from_millis(950), "waited {gap:?}, Retry-After asked 1s (backoff alone is 10ms)");
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 1, failed: 0, dropped: 0 });
}

#[tokio::test]
async fn a_retry_after_beyond_max_elapsed_gives_up_at_once() {
    let rx = Receiver::start(&[("hook", &[Reply::RetryAfter(503, "3600")])]).await;
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), fast()).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(5)).await, 0);
    assert_eq!(rx.hits().len(), 1);
    assert_eq!(notifier.stats(), DeliveryStats { failed: 1, ..Default::default() });
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let rx = Receiver::start(&[("hook", &[Reply::Status(400)]), ("gone", &[Reply::Status(404)])]).await;
    let map =
        channels(vec![channel("webhook:finops", Some(rx.url("hook"))), channel("slack:#gone", Some(rx.url("gone")))]);
    let notifier = Notifier::new(&map, fast()).unwrap();
    notifier.notify(&alert(&["webhook:finops", "slack:#gone"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(rx.hits().len(), 2, "one attempt each");
    assert_eq!(notifier.stats(), DeliveryStats { failed: 2, ..Default::default() });
}

#[tokio::test]
async fn timeouts_are_retried() {
    let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_secs(5))])]).await;
    let config = NotifyConfig { request_timeout: Duration::from_millis(200), ..fast() };
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(rx.hits().len(), 2);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 1, failed: 0, dropped: 0 });
}

#[tokio::test]
async fn connect_errors_are_retried_up_to_max_attempts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = NotifyConfig { max_attempts: 3, ..fast() };
    let notifier =
        Notifier::new(&channels(vec![channel("webhook:finops", Some(format!("http://{addr}/hook")))]), config).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 0, retried: 2, failed: 1, dropped: 0 });
}

#[tokio::test]
async fn unknown_and_unusable_channels_are_counted_not_fatal() {
    let rx = Receiver::start(&[]).await;
    let mut env_url = channel("webhook:from-env", None);
    env_url.url_env = Some(UNSET_ENV.to_owned());
    let mut keyless = channel("pagerduty:platform", Some(rx.url("pd")));
    keyless.routing_key_env = Some(UNSET_ENV.to_owned());
    let map = channels(vec![
        channel("webhook:finops", Some(rx.url("finops"))),
        env_url,
        keyless,
        channel("slack:#bad-url", Some("not a url".to_owned())),
    ]);
    let notifier = Notifier::new(&map, fast()).unwrap();
    let a = alert(&[
        "slack:#nobody-defined-this",
        "webhook:from-env",
        "pagerduty:platform",
        "slack:#bad-url",
        "webhook:finops",
    ]);
    assert_eq!(notifier.notify(&a), 1);
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, failed: 4, ..Default::default() });
    let hits = rx.hits();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].path, "/finops");
}

#[tokio::test]
async fn set_channels_takes_effect_for_the_next_alert() {
    let rx = Receiver::start(&[]).await;
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("old")))]), fast()).unwrap();
    notifier.notify(&alert(&["webhook:finops"]));
    notifier.set_channels(&channels(vec![channel("webhook:finops", Some(rx.url("new")))]));
    notifier.notify(&alert(&["webhook:finops"]));
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    let mut paths: Vec<String> = rx.hits().into_iter().map(|h| h.path).collect();
    paths.sort();
    assert_eq!(paths, ["/new", "/old"]);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_millis(300))])]).await;
    let config = NotifyConfig { max_pending: 1, ..fast() };
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
    let a = alert(&["webhook:finops"]);
    assert_eq!(notifier.notify(&a), 1);
    assert_eq!(notifier.notify(&a), 0);
    assert_eq!(notifier.notify(&a), 0);
    assert_eq!(notifier.pending(), 1);
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, dropped: 2, ..Default::default() });
}

#[tokio::test]
async fn notify_returns_before_the_delivery_and_shutdown_abandons_what_is_left() {
    // The receiver holds each request for 30 s: a notify that waited on the delivery could
    // not return with it still pending and no attempt ended.
    let rx = Receiver::start(&[("hook", &[Reply::Stall(Duration::from_secs(30))])]).await;
    let config = NotifyConfig { request_timeout: Duration::from_secs(30), ..fast() };
    let notifier = Notifier::new(&channels(vec![channel("webhook:finops", Some(rx.url("hook")))]), config).unwrap();
    assert_eq!(notifier.notify(&alert(&["webhook:finops"])), 1);
    assert_eq!((notifier.pending(), notifier.stats()), (1, DeliveryStats::default()));
    assert_eq!(notifier.flush(Duration::from_millis(300)).await, 1, "still in flight");
    assert_eq!(notifier.shutdown(Duration::from_millis(100)).await, 1);
    assert_eq!(notifier.pending(), 0);
    assert_eq!(notifier.notify(&alert(&["webhook:finops"])), 0, "closed");
    assert_eq!(notifier.stats(), DeliveryStats { dropped: 2, ..Default::default() });
}

/// Runs `env_child` in a child process with the variables set (this crate forbids the
/// `unsafe` that setting them in-process takes).
#[tokio::test]
async fn url_env_and_routing_key_env_are_read() {
    let rx = Receiver::start(&[("pd", &[Reply::Status(202)])]).await;
    let out = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "notify::tests::env_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ENV_URL, rx.url("pd"))
        .env(ENV_KEY, "R0UT1NGKEY")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "the child ran the test: {stdout}");
    let hits = rx.hits();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].headers["content-type"], "application/json");
    assert_eq!(hits[0].body["routing_key"], "R0UT1NGKEY");
    assert_eq!(hits[0].body["event_action"], "trigger");
    assert_eq!(hits[0].body["dedup_key"], alert(&[]).alert_id.as_str());
    assert_eq!(hits[0].body["payload"]["source"], "tollgate");
}

#[tokio::test]
#[ignore = "run by url_env_and_routing_key_env_are_read with the variables set"]
async fn env_child() {
    if std::env::var_os(ENV_URL).is_none() {
        return;
    }
    let pd = AlertChannel {
        name: "pagerduty:platform".to_owned(),
        url: None,
        url_env: Some(ENV_URL.to_owned()),
        routing_key: None,
        routing_key_env: Some(ENV_KEY.to_owned()),
    };
    let notifier = Notifier::new(&channels(vec![pd]), fast()).unwrap();
    assert_eq!(notifier.notify(&alert(&["pagerduty:platform"])), 1);
    assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
    assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, ..Default::default() });
}

/// An enforcer that lost the lease drops the task waiting on an alert's deliveries: the
/// deliveries not yet ended stop with it, even once the wait has begun.
#[tokio::test]
async fn dropping_the_wait_for_deliveries_stops_those_left() {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let quick = tokio::spawn(async move {
        let _ = done_tx.send(());
    });
    // Holds its sender until it ends: the receiver hears of it either way.
    let slow = tokio::spawn(async move {
        let _held = held_tx;
        std::future::pending::<()>().await;
    });
    let waiting = tokio::spawn(Deliveries(vec![quick, slow]).finished());
    done_rx.await.unwrap();
    waiting.abort();
    let ended = tokio::time::timeout(Duration::from_secs(10), held_rx).await;
    assert!(matches!(ended, Ok(Err(_))), "the delivery left was stopped: {ended:?}");
}
