//! Each failure-mode measure has one definition (`tollgate_schemas::measures`): its SQL
//! condition selects, on the local ClickHouse, exactly the requests its Rust predicate (the
//! enforcer's guards) counts, and the loop view and the loop report agree on the exact p95.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use tollgate_schemas::measures::{self, DRIFT_ROWS, LOOP_ROWS, STUFFING_ROWS};
use tollgate_schemas::usage::sql::TOTAL_TOKENS;
use tollgate_schemas::usage::{Envelope, Status, TokenSource, UsageEvent};
use tollgate_store::ClickHouseConfig;
use tollgate_store::rows::UsageRow;

/// 2026-04-10T10:00:00Z, in µs.
const AT_US: i64 = 1_775_815_200_000_000;

/// Every combination that a measure's rows depend on: status, where the counts came from, a
/// reference count (none, zero, some) and tokens (none, some), in sessions of one workflow.
fn events() -> Vec<UsageEvent> {
    let statuses = [
        Status::Ok,
        Status::ProviderError,
        Status::Timeout,
        Status::ClientAbort,
        Status::Rejected,
        Status::Interrupted,
    ];
    let mut out = Vec::new();
    for (si, status) in statuses.iter().enumerate() {
        for source in [TokenSource::Provider, TokenSource::Estimated] {
            for reference in [None, Some(0), Some(900)] {
                for tokens in [0, 1_000] {
                    let i = out.len();
                    out.push(UsageEvent {
                        status: *status,
                        token_source: source,
                        reference_input_tokens: reference,
                        input_tokens: tokens,
                        output_tokens: tokens / 10,
                        ended_at_us: AT_US + i as i64,
                        envelope: Envelope {
                            workflow_tag: Some("agent".into()),
                            // Session-hours of different sizes, so the p95 is one of them.
                            session_id: Some(format!("s{}", (si * 7 + i) % 11)),
                            ..Envelope::default()
                        },
                        ..UsageEvent::example(format!("e{i:03}"), None, AT_US + i as i64)
                    });
                }
            }
        }
    }
    out
}

async fn ids(db: &str, condition: &str) -> Vec<String> {
    let out = common::ch(&format!(
        "SELECT event_id FROM {db}.usage_events FINAL WHERE {condition} ORDER BY event_id FORMAT TabSeparated"
    ))
    .await;
    out.lines().map(str::to_owned).collect()
}

fn expected(events: &[UsageEvent], counts: fn(&UsageEvent) -> bool) -> Vec<String> {
    let mut v: Vec<String> = events.iter().filter(|e| counts(e)).map(|e| e.event_id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn each_measure_selects_in_sql_what_it_counts_in_rust() {
    let db = common::unique("tollgate_measures");
    let cfg = ClickHouseConfig { url: common::clickhouse_url(), database: db.clone(), user: None, password: None };
    tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap();
    let events = events();
    let rows: Vec<UsageRow> =
        events.iter().enumerate().map(|(i, e)| UsageRow::new(e.clone(), "tollgate.usage.v1", 0, i as i64)).collect();
    tollgate_meter::sink::insert(&cfg.client(), &rows).await.unwrap();

    let stuffing = expected(&events, measures::stuffing_counts);
    let drift = expected(&events, measures::drift_counts);
    let loops = expected(&events, measures::loop_counts);
    // Each predicate keeps some rows and leaves out others, so each comparison can fail.
    for (name, kept) in [("stuffing", &stuffing), ("drift", &drift), ("loop", &loops)] {
        assert!(!kept.is_empty() && kept.len() < events.len(), "{name} keeps {} of {}", kept.len(), events.len());
    }
    assert_eq!(ids(&db, STUFFING_ROWS).await, stuffing, "context stuffing");
    assert_eq!(ids(&db, DRIFT_ROWS).await, drift, "tokenizer drift");
    assert_eq!(ids(&db, &format!("{LOOP_ROWS} AND {TOTAL_TOKENS} > 0")).await, loops, "loops");

    // The loop figure: the view and the report take the same exact p95 of the same
    // session-hours, and it is one of those session-hours' token sums.
    let mut by_session = std::collections::BTreeMap::<String, i64>::new();
    for e in events.iter().filter(|e| measures::loop_counts(e)) {
        *by_session.entry(e.envelope.session_id.clone().unwrap()).or_default() += e.total_tokens();
    }
    let view = common::ch(&format!(
        "SELECT count(), any(workflow_p95_tokens) FROM {db}.loop_session_hours WHERE workflow_tag = 'agent' FORMAT TabSeparated"
    ))
    .await;
    let (hours, p95) = view.trim().split_once('\t').unwrap();
    assert_eq!(hours.parse::<usize>().unwrap(), by_session.len(), "one row per session-hour with tokens");
    let p95: f64 = p95.parse().unwrap();
    assert!(by_session.values().any(|&t| t as f64 == p95), "exact: {p95} is one of {by_session:?}");
    let reporter = tollgate_meter::report::Reporter::new(&cfg).unwrap();
    let period = tollgate_meter::report::Period::ALL;
    let report = reporter.loops(&period, 1e-9).await.unwrap();
    assert_eq!(report.len(), by_session.len());
    assert!(report.iter().all(|r| r.workflow_p95_tokens == p95), "the report's p95 is the view's");
    common::ch(&format!("DROP DATABASE {db}")).await;
}
