//! Numbered ClickHouse migrations, applied once each and recorded in `schema_migrations`.
//!
//! Every statement must run on ClickHouse 18.16 (Debian's server, used locally) and on current
//! ClickHouse (checked in tests through chdb); `{db}` stands for the database name.

use clickhouse::Client;
use tracing::info;

/// (version, name, SQL) in order. Never edit an applied migration; add the next number.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "usage_events", include_str!("../migrations/0001_usage_events.sql")),
    (2, "windows", include_str!("../migrations/0002_windows.sql")),
    (3, "chargeback", include_str!("../migrations/0003_chargeback.sql")),
    (4, "history", include_str!("../migrations/0004_history.sql")),
    (5, "one_token_definition", include_str!("../migrations/0005_one_token_definition.sql")),
    (6, "one_measure_definition", include_str!("../migrations/0006_one_measure_definition.sql")),
    (7, "event_positions", include_str!("../migrations/0007_event_positions.sql")),
    (8, "window_rejected", include_str!("../migrations/0008_window_rejected.sql")),
    (9, "trace_id", include_str!("../migrations/0009_trace_id.sql")),
    (10, "outcomes", include_str!("../migrations/0010_outcomes.sql")),
];

/// Statements that create the database and the version table, before any migration.
fn bootstrap(db: &str) -> Vec<String> {
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree() ORDER BY version"
        ),
    ]
}

/// Splits a migration file into statements (`;` at the end of a line ends one; `--` comments dropped).
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let line = line.split("--").next().unwrap_or("").trim_end();
        if line.trim().is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if line.ends_with(';') {
            let stmt = cur.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// A migration's SQL for database `db`: `{db}` is the database; `{prompt_tokens}` and
/// `{total_tokens}` are the one definition of those quantities (`tollgate_schemas::usage::sql`);
/// `{stuffing_rows}`, `{drift_rows}`, `{loop_rows}`, `{session_hour_has_tokens}` and
/// `{session_hour_p95}` are the failure-mode measures' (`tollgate_schemas::measures`);
/// `{cost_per_outcome_by_team}` and `{cost_per_outcome_by_workflow}` the monthly cost per outcome
/// (`tollgate_schemas::outcome::sql`).
fn render(sql: &str, db: &str) -> String {
    use tollgate_schemas::measures;
    let by = |group: &str| {
        let month = |col: &str| format!("toStartOfMonth({col}, 'UTC')");
        tollgate_schemas::outcome::sql::cost_per_outcome(
            db,
            &tollgate_schemas::outcome::sql::Shape {
                group,
                outcome_bucket: &month("occurred_at"),
                usage_bucket: &month("ended_at"),
                usage_kind: &format!("arrayJoin((SELECT groupUniqArray(kind) FROM {db}.outcome_events))"),
                outcome_cond: "1",
                usage_cond: "1",
            },
        )
    };
    use tollgate_schemas::usage::sql::{PROMPT_TOKENS, TOTAL_TOKENS};
    sql.replace("{db}", db)
        .replace("{prompt_tokens}", PROMPT_TOKENS)
        .replace("{total_tokens}", TOTAL_TOKENS)
        .replace("{stuffing_rows}", measures::STUFFING_ROWS)
        .replace("{drift_rows}", measures::DRIFT_ROWS)
        .replace("{loop_rows}", measures::LOOP_ROWS)
        .replace("{session_hour_has_tokens}", measures::SESSION_HOUR_HAS_TOKENS)
        .replace("{session_hour_p95}", &measures::session_hour_quantile(0.95, "tokens"))
        .replace("{cost_per_outcome_by_team}", &by("team"))
        .replace("{cost_per_outcome_by_workflow}", &by("workflow_tag"))
}

/// Every statement for database `db`, in order, with the version each belongs to (0: bootstrap).
pub fn statements(db: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = bootstrap(db).into_iter().map(|s| (0, s)).collect();
    for (version, _, sql) in MIGRATIONS {
        out.extend(split_statements(&render(sql, db)).into_iter().map(|s| (*version, s)));
    }
    out
}

/// Database names are spliced into SQL, so only plain identifiers are accepted.
pub fn check_database_name(db: &str) -> Result<(), String> {
    let ok = !db.is_empty()
        && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !db.starts_with(|c: char| c.is_ascii_digit());
    if ok { Ok(()) } else { Err(format!("database name {db:?} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")) }
}

/// Whether `stmt` adds a column that `error` says is there already: a run that stopped between
/// the statement and recording its migration. ClickHouse 18.16 has no `ADD COLUMN IF NOT
/// EXISTS`, so the statement is written without it and this error means it was applied.
pub fn column_already_added(stmt: &str, error: &str) -> bool {
    stmt.trim_start().starts_with("ALTER TABLE")
        && stmt.contains(" ADD COLUMN ")
        && (error.contains("Code: 44") || error.contains("Code: 15"))
        && error.contains("already exists")
}

/// Applies the migrations `db` does not have yet; returns how many were applied.
pub async fn apply(client: &Client, db: &str) -> anyhow::Result<usize> {
    check_database_name(db).map_err(anyhow::Error::msg)?;
    for s in bootstrap(db) {
        client.query(&s).execute().await?;
    }
    let done: Vec<u32> =
        client.query(&format!("SELECT version FROM {db}.schema_migrations")).fetch_all::<u32>().await?;
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        for stmt in split_statements(&render(sql, db)) {
            match client.query(&stmt).execute().await {
                Ok(()) => {}
                Err(e) if column_already_added(&stmt, &e.to_string()) => {
                    info!(version, statement = %stmt, "column already there (an earlier run stopped before recording the migration)");
                }
                Err(e) => return Err(e.into()),
            }
        }
        client
            .query(&format!("INSERT INTO {db}.schema_migrations (version, name) VALUES (?, ?)"))
            .bind(*version)
            .bind(*name)
            .execute()
            .await?;
        info!(version, name, database = db, "migration applied");
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_and_drops_comments() {
        let s = split_statements("-- c\nCREATE TABLE a (x Int8) -- trailing\nENGINE = Memory;\n\nSELECT 1;\n");
        assert_eq!(s, vec!["CREATE TABLE a (x Int8)\nENGINE = Memory", "SELECT 1"]);
    }

    #[test]
    fn a_column_added_before_is_taken_as_applied() {
        let add = "ALTER TABLE db.usage_windows ADD COLUMN rejected Int64 DEFAULT 0 AFTER errors";
        let exists = "Code: 44, e.displayText() = DB::Exception: Cannot add column rejected: column with this name already exists";
        assert!(column_already_added(add, exists));
        assert!(!column_already_added(
            add,
            "Code: 60, e.displayText() = DB::Exception: Table db.usage_windows doesn't exist"
        ));
        assert!(!column_already_added("CREATE TABLE db.t (x Int8) ENGINE = Memory", exists));
    }

    #[test]
    fn versions_are_increasing_and_unique() {
        let v: Vec<u32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
        assert_eq!(v.first(), Some(&1));
    }

    #[test]
    fn database_names_are_identifiers() {
        assert!(check_database_name("tollgate_test_1").is_ok());
        assert!(check_database_name("x; DROP").is_err());
        assert!(check_database_name("1abc").is_err());
    }
}
