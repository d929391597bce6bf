//! Outcomes joined to usage, end to end through the real broker and ClickHouse: outcomes posted
//! to the ingress (`POST /v1/outcomes`, authenticated and bound to the key like any request)
//! reach `outcome_events` once however often they are posted, and cost per outcome is the named
//! sessions' spend over the outcome count, checked against direct SQL on `usage_events`, in the
//! report (`tollgate-meter report cost-per-outcome`) and in the monthly views.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_meter::report::{Dimension, Period, Reporter};

/// The test key pins project and team; the session and workflow are its caller's.
fn keys() -> String {
    format!(
        "type: tollgate-api-keys\nkeys:\n  - id: outcomes\n    sha256: {}\n    subject: {{type: team, id: payments}}\n    models: [vm-openai]\n    metadata:\n      X-TFY-Project: shop\n      X-TFY-Team: payments\n",
        common::TEST_API_KEY_SHA256
    )
}

/// A trace id a caller sends with one request (`traceparent`), and an outcome names.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A chat request in `session` of `workflow` whose usage the mock reports as given; session
/// `s-e` carries the caller's trace [`TRACE`].
async fn chat(
    http: &reqwest::Client,
    ingress: std::net::SocketAddr,
    session: &str,
    workflow: &str,
    tokens: (u64, u64),
) {
    let content = format!("work\n#mock prompt_tokens={} completion_tokens={}", tokens.0, tokens.1);
    let mut req = http.post(format!("http://{ingress}/v1/chat/completions"));
    if session == "s-e" {
        req = req.header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"));
    }
    let resp = req
        .bearer_auth(common::TEST_API_KEY)
        .header("X-TFY-Session-ID", session)
        .header("X-TFY-Workflow-Tag", workflow)
        .json(&json!({"model": "vm-openai", "messages": [{"role": "user", "content": content}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

async fn post(
    http: &reqwest::Client,
    ingress: std::net::SocketAddr,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut req = http
        .post(format!("http://{ingress}/v1/outcomes"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    for (h, v) in headers {
        req = req.header(*h, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn cost_of(db: &str, condition: &str) -> i64 {
    common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL WHERE {condition}"))
        .await
        .trim()
        .parse()
        .unwrap()
}

/// `cost / n` rounded to the nearest nano-USD, as the report rounds it.
fn per(cost: i64, n: i64) -> i64 {
    (2 * cost + n).div_euclid(2 * n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_per_outcome_counts_each_outcome_once_and_matches_the_raw_rows() {
    let topic = common::unique("outcomes_usage");
    let outcomes_topic = common::unique("outcomes");
    let db = common::unique("tollgate_outcomes");
    common::create_topic(&topic, 2).await;
    common::create_topic(&outcomes_topic, 1).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("api-keys.yaml"), keys()).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let mut ic = common::ingress_config(policy.path(), &common::kafka_brokers(), &topic, spool.path());
    ic.outcomes_topic = outcomes_topic.clone();
    let ingress = common::start_ingress_with(ic).await;
    let mut mc = common::meter_config(&topic, &db);
    mc.outcomes_topic = Some(outcomes_topic.clone());
    let meter = common::start_meter(mc).await;
    let http = reqwest::Client::new();

    // Spend: two reviewed sessions and one triage session, plus triage work without a session
    // an outcome names.
    for (session, workflow, tokens) in [
        ("s-a", "review", (1200, 300)),
        ("s-a", "review", (800, 40)),
        ("s-b", "review", (5000, 700)),
        ("s-c", "triage", (90, 9)),
        ("s-c", "triage", (3000, 10)),
        ("s-d", "triage", (70_000, 2_000)),
        ("s-e", "deploy", (400, 4)),
    ] {
        chat(&http, ingress.addr, session, workflow, tokens).await;
    }

    // Refused, and nothing recorded: no key, a header the key pins, bad bodies.
    let ok_body = r#"{"id": "pr-1", "kind": "merged_pr", "session_ids": ["s-a", "s-b"]}"#;
    let (status, body) = post(&http, ingress.addr, None, &[], ok_body).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) =
        post(&http, ingress.addr, Some(common::TEST_API_KEY), &[("X-TFY-Project", "other")], ok_body).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "identity_conflict", "{body}");
    for (bad, why) in [
        ("{\"id\": \"pr-9\", ", "malformed_json"),
        (r#"{"id": "pr-9", "kind": "Merged PR"}"#, "kind must be a word"),
        (r#"{"id": "", "kind": "merged_pr"}"#, "id must be"),
        (r#"{"id": "pr-9", "kind": "merged_pr", "occurred_at": "2999-01-01T00:00:00Z"}"#, "in the future"),
        (r#"{"id": "pr-9", "kind": "merged_pr", "sessions": ["s-a"]}"#, "unknown field"),
        // Nothing to attribute it by: no session, no trace, no workflow tag.
        (r#"{"id": "pr-9", "kind": "merged_pr"}"#, "needs what produced it"),
    ] {
        let (status, body) = post(&http, ingress.addr, Some(common::TEST_API_KEY), &[], bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.to_string().contains(why), "{bad}: expected {why:?} in {body}");
    }

    // pr-1 names two sessions and is posted twice; pr-2 names s-b again (counted once for the
    // team); ticket-1 names no session, so it is attributed by its workflow tag.
    let key = Some(common::TEST_API_KEY);
    let workflow = |w| [("X-TFY-Workflow-Tag", w)];
    for _ in 0..2 {
        let (status, body) = post(&http, ingress.addr, key, &workflow("review"), ok_body).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["project"], "shop", "{body}");
    }
    let pr2 = r#"{"id": "pr-2", "kind": "merged_pr", "value": 2.5, "session_ids": ["s-b", "s-b"]}"#;
    let (status, body) = post(&http, ingress.addr, key, &workflow("review"), pr2).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["session_ids"], json!(["s-b"]), "{body}");
    // pr-3 names the trace of s-e's request.
    let pr3 = format!(r#"{{"id": "pr-3", "kind": "merged_pr", "trace_ids": ["{TRACE}"]}}"#);
    let (status, body) = post(&http, ingress.addr, key, &workflow("review"), &pr3).await;
    assert_eq!(status, 202, "{body}");
    let bad_trace = r#"{"id": "pr-4", "kind": "merged_pr", "trace_ids": ["not-a-trace"]}"#;
    let (status, body) = post(&http, ingress.addr, key, &[], bad_trace).await;
    assert_eq!(status, 400, "{body}");
    let ticket = r#"{"id": "ticket-1", "kind": "resolved_ticket"}"#;
    for _ in 0..2 {
        let (status, body) = post(&http, ingress.addr, key, &workflow("triage"), ticket).await;
        assert_eq!(status, 202, "{body}");
    }

    // Seven usage rows; six outcome records read (pr-1 and ticket-1 twice), four outcomes.
    assert_eq!(
        common::wait_for_count(&format!("SELECT count() FROM {db}.usage_events FINAL"), 7, Duration::from_secs(30))
            .await,
        7
    );
    let read_all = common::eventually(Duration::from_secs(30), || async {
        common::ch_count(&format!("SELECT max(kafka_offset) + 1 FROM {db}.outcome_events")).await >= 6
    })
    .await;
    assert!(read_all, "the meter did not write all six outcome records");
    let final_rows = common::ch_count(&format!("SELECT count() FROM {db}.outcome_events FINAL")).await;
    let unique_ids = common::ch_count(&format!("SELECT uniqExact(project, outcome_id) FROM {db}.outcome_events")).await;
    assert_eq!((final_rows, unique_ids), (4, 4), "each outcome counts once");

    // Direct SQL: the named sessions' and trace's spend over the outcomes.
    let sessions = cost_of(&db, "project = 'shop' AND session_id IN ('s-a', 's-b')").await;
    let traced = cost_of(&db, &format!("project = 'shop' AND trace_id = '{TRACE}'")).await;
    let named = sessions + traced;
    let triage = cost_of(&db, "workflow_tag = 'triage'").await;
    let all = cost_of(&db, "1").await;
    assert!(sessions > 0 && traced > 0 && triage > 0 && all == named + triage, "{named} {triage} {all}");

    let reporter = Reporter::new(&common::meter_config(&topic, &db).clickhouse).unwrap();
    let period = Period::between(None, None).unwrap();
    let by_team = reporter.cost_per_outcome("merged_pr", Dimension::Team, &period).await.unwrap();
    assert_eq!(by_team.len(), 1, "{by_team:?}");
    let t = &by_team[0];
    assert_eq!((t.key.as_str(), t.outcomes), ("payments", 3));
    assert_eq!(t.outcome_cost_nanos, named, "spend on merged PRs = s-a + s-b (s-b once) + the trace");
    assert_eq!(t.cost_per_outcome_nanos(), per(named, 3));
    assert_eq!(t.other_cost_nanos, triage, "the triage spend produced no merged PR");
    assert!((t.value - 2.5).abs() < 1e-9, "{}", t.value);

    // By workflow, each workflow's outcomes weigh only its own spend: pr-3 was posted under
    // `review` but names a `deploy` trace, so it links nothing there.
    let prs = reporter.cost_per_outcome("merged_pr", Dimension::Workflow, &period).await.unwrap();
    let review = prs.iter().find(|r| r.key == "review").unwrap_or_else(|| panic!("{prs:?}"));
    assert_eq!((review.outcomes, review.outcome_cost_nanos, review.other_cost_nanos), (3, sessions, 0));
    let deploy = prs.iter().find(|r| r.key == "deploy").unwrap_or_else(|| panic!("{prs:?}"));
    assert_eq!((deploy.outcomes, deploy.outcome_cost_nanos, deploy.other_cost_nanos), (0, 0, traced));

    let by_workflow = reporter.cost_per_outcome("resolved_ticket", Dimension::Workflow, &period).await.unwrap();
    let row = |k: &str| by_workflow.iter().find(|r| r.key == k).unwrap_or_else(|| panic!("{k}: {by_workflow:?}"));
    assert_eq!((row("triage").outcomes, row("triage").outcome_cost_nanos), (1, triage));
    assert_eq!((row("review").outcomes, row("review").other_cost_nanos), (0, sessions));
    assert_eq!((row("deploy").outcomes, row("deploy").other_cost_nanos), (0, traced));

    assert!(reporter.cost_per_outcome("Merged PR", Dimension::Team, &period).await.is_err());
    assert!(reporter.cost_per_outcome("merged_pr", Dimension::Model, &period).await.is_err());

    // The monthly view says the same for this month.
    let view = common::ch(&format!(
        "SELECT outcomes, outcome_cost_nanos, other_cost_nanos, cost_per_outcome_nanos FROM {db}.cost_per_outcome_by_team \
         WHERE kind = 'merged_pr' AND team = 'payments' \
         AND month = (SELECT toStartOfMonth(max(occurred_at), 'UTC') FROM {db}.outcome_events) FORMAT TSV"
    ))
    .await;
    let figures: Vec<f64> = view.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(figures[..3], [3.0, named as f64, triage as f64], "{view}");
    assert!((figures[3] - named as f64 / 3.0).abs() < 1.0, "{view}");

    // The command line prints the report's figures as CSV.
    let out = tokio::process::Command::new(common::binary("tollgate-meter", "tollgate-meter"))
        .args(["report", "--clickhouse-url", &common::clickhouse_url(), "--database", &db, "--format", "csv"])
        .args(["cost-per-outcome", "--kind", "merged_pr", "--by", "team"])
        .output()
        .await
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{csv}\n{}", String::from_utf8_lossy(&out.stderr));
    let usd = |n: i64| tollgate_meter::report::format_usd(n);
    let line = csv.lines().find(|l| l.starts_with("payments,")).unwrap_or_else(|| panic!("{csv}"));
    assert!(line.starts_with("payments,3,"), "{csv}");
    assert!(line.contains(&usd(named)) && line.contains(&usd(per(named, 3))), "{line} / {csv}");

    meter.stop().await;
    ingress.stop().await;
    mock.stop().await;
}

/// A broker that does not take the outcome: 503 with `Retry-After` and `not_recorded`, counted,
/// within the delivery timeout; the caller holds the outcome and posts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_broker_does_not_take_is_a_503_to_retry() {
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    let spool = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: no broker at all.
    let mut ic = common::ingress_config(policy.path(), "127.0.0.1:1", "outcomes_nowhere", spool.path());
    ic.decisions_start_timeout = Duration::from_secs(1);
    let ingress = common::start_ingress_with(ic).await;
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let resp = http
        .post(format!("http://{}/v1/outcomes", ingress.addr))
        .header("X-TFY-Project", "shop")
        .json(&json!({"id": "pr-1", "kind": "merged_pr", "session_ids": ["s-a"]}))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_recorded", "{body}");
    assert!(waited < Duration::from_secs(15), "the post waited {waited:?} (delivery timeout: 5 s)");
    let metrics = http.get(format!("http://{}/metrics", ingress.addr)).send().await.unwrap().text().await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_ingress_outcomes_total") && l.contains("not_recorded"))
        .unwrap_or_else(|| panic!("no not_recorded count in\n{metrics}"));
    assert!(line.split_whitespace().last().unwrap().parse::<f64>().unwrap() >= 1.0, "{line}");
    ingress.stop().await;
    mock.stop().await;
}
