//! Every migration statement runs on ClickHouse 18.16 (the local server) and on current
//! ClickHouse (chdb, in process), and applying twice changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

/// What migration 0003 creates: the model-tier table and the chargeback and failure-mode views.
const CHARGEBACK_OBJECTS: &[&str] = &[
    "outcome_events",
    "cost_per_outcome_by_team",
    "cost_per_outcome_by_workflow",
    "model_tiers",
    "frontier_models",
    "chargeback_by_project",
    "chargeback_by_team",
    "chargeback_by_cost_center",
    "chargeback_by_user",
    "chargeback_by_workflow",
    "chargeback_by_model",
    "frontier_share_by_workflow",
    "context_stuffing_by_workflow",
    "loop_session_hours",
    "tokenizer_drift",
    "untagged_spend",
    "breach_history",
    "alert_history",
    "breaches",
    "alerts",
];

#[tokio::test]
async fn migrations_apply_once_on_the_local_server() {
    let db = common::unique("tollgate_mig");
    let cfg = tollgate_store::ClickHouseConfig {
        url: common::clickhouse_url(),
        database: db.clone(),
        user: None,
        password: None,
    };
    let applied = tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap();
    assert_eq!(applied, tollgate_store::migrate::MIGRATIONS.len());
    assert_eq!(
        tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap(),
        0,
        "second run applies nothing"
    );
    // A run stopped between adding a column and recording its migration: the statement again
    // fails, in a way `apply` takes as applied (ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS).
    for (_, stmt) in tollgate_store::migrate::statements(&db).into_iter().filter(|(_, s)| s.contains(" ADD COLUMN ")) {
        let e = cfg.server_client().query(&stmt).execute().await.unwrap_err().to_string();
        assert!(tollgate_store::migrate::column_already_added(&stmt, &e), "{e}");
    }
    let versions =
        common::ch(&format!("SELECT count(), max(version) FROM {db}.schema_migrations FORMAT TabSeparated")).await;
    let last = tollgate_store::migrate::MIGRATIONS.last().unwrap().0;
    assert_eq!(versions.trim(), format!("{}\t{last}", tollgate_store::migrate::MIGRATIONS.len()));
    let tables = common::ch(&format!(
        "SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name FORMAT TabSeparated"
    ))
    .await;
    let tables: Vec<&str> = tables.lines().collect();
    for t in ["meter_checkpoints", "schema_migrations", "session_hours", "usage_events", "usage_windows"]
        .into_iter()
        .chain(CHARGEBACK_OBJECTS.iter().copied())
    {
        assert!(tables.contains(&t), "{t} missing from {tables:?}");
    }
    common::ch(&format!("DROP DATABASE {db}")).await;
}

#[test]
fn migrations_run_on_current_clickhouse() {
    let db = "tollgate_current";
    let mut text = String::new();
    for (_, stmt) in tollgate_store::migrate::statements(db) {
        text.push_str(&stmt);
        text.push_str("\n-- ;;\n");
    }
    // Read back what the migrations made, so a statement that did nothing cannot pass.
    text.push_str(&format!("SELECT name FROM system.tables WHERE database = '{db}' ORDER BY name\n-- ;;\n"));
    text.push_str(&format!(
        "SELECT count() FROM system.columns WHERE database = '{db}' AND table = 'usage_events'\n-- ;;\n"
    ));
    // The queries the enforcer runs against these tables at start.
    text.push_str(&format!("USE {db}\n-- ;;\n"));
    let policy =
        tollgate_schemas::policy::Policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy"))
            .unwrap();
    for q in tollgate_enforcer::rebuild::startup_sql(&policy, "tollgate.usage.v1", 1_794_268_800_000_000) {
        text.push_str(&q);
        text.push_str("\n-- ;;\n");
    }
    // The report's cost per outcome, and the views built from the same SQL.
    let all_time = tollgate_meter::report::Period::between(None, None).unwrap();
    text.push_str(&tollgate_meter::report::sql::cost_per_outcome(db, "merged_pr", "team", &all_time));
    text.push_str("\n-- ;;\n");
    text.push_str(&format!("SELECT count() FROM {db}.cost_per_outcome_by_workflow\n-- ;;\n"));
    // The console's own queries: the spend series from the rollups and from the raw events, the
    // outcome kinds, each budget's spend, the decision and alert history.
    use tollgate_meter::report::{Dimension, Period, Step, sql};
    use tollgate_store::rows::Granularity;
    let month = Period::month("2026-12").unwrap();
    for (step, g) in [(Step::Day, Some(Granularity::Day)), (Step::Month, Some(Granularity::Month)), (Step::Day, None)] {
        text.push_str(&sql::chargeback_series(db, &[Dimension::Model], &month, step, g));
        text.push_str("\n-- ;;\n");
    }
    text.push_str(&sql::outcome_kinds(db, &month));
    text.push_str("\n-- ;;\n");
    for rule in &policy.rules {
        if let Some(q) = tollgate_console::budgets::spend_sql(db, rule, 1_794_268_800_000_000, 1_796_947_200_000_000) {
            text.push_str(&q);
            text.push_str("\n-- ;;\n");
        }
    }
    text.push_str(&tollgate_console::breach_history_sql(db, 10));
    text.push_str("\n-- ;;\n");
    text.push_str(&tollgate_console::alert_history_sql(db, 10));
    text.push_str("\n-- ;;\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("statements.sql");
    std::fs::write(&file, text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chdb/run_sql.py");
    let out = Command::new("python3").arg(script).arg(&file).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "current ClickHouse (chdb) refused a migration:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("clickhouse \"2"), "{stdout}");
    for t in ["meter_checkpoints", "schema_migrations", "session_hours", "usage_events", "usage_windows"]
        .into_iter()
        .chain(CHARGEBACK_OBJECTS.iter().copied())
    {
        assert!(stdout.contains(&format!("\"{t}\"\n")), "{t} missing on current ClickHouse: {stdout}");
    }
    assert!(stdout.contains("\n44\n"), "usage_events has its 44 columns on current ClickHouse: {stdout}");
}
