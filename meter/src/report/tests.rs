//! Unit tests of the reports that need no ClickHouse: period parsing and bounds, grouping columns
//! and their SQL, drift pairing, and the totals in every output format.
#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn months_and_bounds_are_half_open_utc() {
    let p = Period::month("2026-04").unwrap();
    assert_eq!(p.from, Some(parse_instant("2026-04-01T00:00:00Z").unwrap()));
    assert_eq!(p.to, Some(parse_instant("2026-05-01").unwrap()));
    assert_eq!(Period::month("2026-12").unwrap().to, Some(parse_instant("2027-01-01").unwrap()));
    assert_eq!(
        p.condition(),
        format!("ended_at >= toDateTime({}) AND ended_at < toDateTime({})", 1_775_001_600, 1_777_593_600)
    );
    assert!(Period::month("2026-13").is_err());
    assert!(Period::month("April").is_err());
    assert_eq!(parse_instant("2026-04-01 12:30").unwrap(), 1_775_001_600 + 12 * 3600 + 30 * 60);
    assert_eq!(parse_instant("2026-04-01T14:30:00+02:00").unwrap(), 1_775_001_600 + 12 * 3600 + 30 * 60);
    assert!(parse_instant("yesterday").is_err());
    assert!(Period::between(Some("2026-04-02"), Some("2026-04-01")).is_err());
    assert!(Period::between(Some("1969-12-31"), None).is_err());
    assert_eq!(Period::between(None, None).unwrap(), Period::ALL);
    assert_eq!(Period::ALL.condition(), "1");
}

#[test]
fn a_period_is_read_from_the_coarsest_windows_that_tile_it() {
    let between = |f: &str, t: &str| Period::between(Some(f), Some(t)).unwrap();
    assert_eq!(Period::month("2026-04").unwrap().tiled_by(), Some(Granularity::Month));
    assert_eq!(Period::ALL.tiled_by(), Some(Granularity::Month));
    assert_eq!(between("2026-04-03", "2026-04-05").tiled_by(), Some(Granularity::Day));
    assert_eq!(between("2026-04-03", "2026-04-05T10:00:00Z").tiled_by(), Some(Granularity::Hour));
    assert_eq!(between("2026-04-03T10:05:00Z", "2026-04-05").tiled_by(), Some(Granularity::Minute));
    assert_eq!(between("2026-04-03T10:05:01Z", "2026-04-05").tiled_by(), None);
    assert_eq!(Source::for_period(&between("2026-04-03T10:05:01Z", "2026-04-05")), Source::Raw);
    let sql = sql::chargeback_rollups("db", &[Dimension::Team], &Period::month("2026-04").unwrap(), Granularity::Month);
    assert!(sql.contains("FROM db.usage_windows FINAL WHERE granularity = 'month' AND window_start >= "), "{sql}");
}

#[test]
fn model_grouping_is_provider_and_model_and_keys_are_unique() {
    assert_eq!(key_columns(&[Dimension::Team, Dimension::Model, Dimension::Team]), ["team", "provider", "model"]);
    let q = sql::chargeback("db", &[Dimension::CostCenter, Dimension::User], &Period::ALL);
    assert!(q.contains("GROUP BY cost_center, user_id"), "{q}");
    assert!(q.contains("FROM db.usage_events FINAL"), "{q}");
    assert!(!q.contains('?'), "no bind placeholders: {q}");
}

#[test]
fn drift_compares_each_version_with_the_one_before() {
    let row = |v: &str, first: u32, prompt: i64| DriftRow {
        provider: "anthropic".into(),
        model: "claude-opus".into(),
        model_version: v.into(),
        first_seen: first,
        last_seen: first + 10,
        requests: 10,
        prompt_tokens: prompt,
        reference_tokens: 1000,
    };
    let d = drift_against_previous(vec![row("b", 200, 1300), row("a", 100, 1000), row("c", 300, 1320)], 0.10);
    assert_eq!(d.iter().map(|d| d.row.model_version.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(d.iter().map(|d| d.flagged).collect::<Vec<_>>(), [false, true, false]);
    assert_eq!(d[1].previous_version.as_deref(), Some("a"));
    assert!((d[1].change.unwrap() - 0.3).abs() < 1e-9);
}

#[test]
fn outputs_carry_totals_in_every_format() {
    let rows = vec![
        ChargebackRow {
            keys: vec!["t1".into()],
            requests: 2,
            errors: 1,
            input_tokens: 10,
            output_tokens: 5,
            cached_input_tokens: 0,
            cost_nanos: 1_000_000_001,
        },
        ChargebackRow {
            keys: vec!["t,2".into()],
            requests: 1,
            errors: 0,
            input_tokens: 1,
            output_tokens: 1,
            cached_input_tokens: 1,
            cost_nanos: 2,
        },
    ];
    let out = Output::chargeback(&[Dimension::Team], Period::ALL, &rows);
    let csv = out.render(Format::Csv).unwrap();
    assert_eq!(
        csv,
        "team,requests,errors,input_tokens,output_tokens,cached_input_tokens,cost_usd\n\
         t1,2,1,10,5,0,1.000000001\n\"t,2\",1,0,1,1,1,0.000000002\nTOTAL,3,1,11,6,1,1.000000003\n"
    );
    let json = out.json();
    assert_eq!(json["total"]["cost_usd"], "1.000000003");
    assert_eq!(json["total"]["cost_nanos"], 1_000_000_003);
    assert_eq!(json["rows"][1]["team"], "t,2");
    assert!(json["total"].get("team").is_none());
    let table = out.render(Format::Table).unwrap();
    assert!(table.contains("TOTAL") && table.contains("1.000000003"), "{table}");
}

#[test]
fn a_caller_chosen_tag_never_reaches_a_spreadsheet_as_a_formula() {
    let row = |key: &str| ChargebackRow {
        keys: vec![key.into()],
        requests: 1,
        errors: 0,
        input_tokens: 1,
        output_tokens: 1,
        cached_input_tokens: 0,
        cost_nanos: -5,
    };
    let rows = vec![row("=HYPERLINK(\"http://x\")"), row("@cmd"), row("+1"), row("-2"), row("ok-team")];
    let csv = Output::chargeback(&[Dimension::Team], Period::ALL, &rows).render(Format::Csv).unwrap();
    let firsts: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(firsts, ["\"'=HYPERLINK(\"\"http://x\"\")\"", "'@cmd", "'+1", "'-2", "ok-team", "TOTAL"]);
    // Money stays a number, negative or not.
    assert!(csv.lines().nth(1).unwrap().ends_with(",-0.000000005"), "{csv}");
}
