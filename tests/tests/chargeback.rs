//! Chargeback and the failure-mode reports against the real ClickHouse: every grouping's figures
//! and totals equal the raw events to the nano-dollar (replayed events included), each
//! failure-mode report flags exactly what was seeded and nothing else, the `report` binary
//! prints the library's figures, and the report SQL runs on current ClickHouse too (chdb).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tollgate_meter::report::{self, Dimension, Period, Reporter, Source, Totals, format_usd};
use tollgate_meter::sink;
use tollgate_meter::window::{Granularity, Windows};
use tollgate_schemas::usage::{ApiFormat, Envelope, Status, TokenSource, UsageEvent};
use tollgate_store::ClickHouseConfig;
use tollgate_store::rows::UsageRow;

/// 2026-04-01T00:00:00Z and 2026-05-01T00:00:00Z.
const APRIL: i64 = 1_775_001_600;
const MAY: i64 = 1_777_593_600;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

const OPUS: (&str, &str) = ("anthropic", "claude-opus-4-7");
const SONNET: (&str, &str) = ("anthropic", "claude-sonnet-4-6");
const HAIKU: (&str, &str) = ("anthropic", "claude-haiku-4-5");
const MINI: (&str, &str) = ("openai", "gpt-4o-mini");

/// A successful, fully tagged request; the reference count equals the prompt (token ratio 1).
fn event(
    id: String,
    ended: i64,
    workflow: &str,
    session: &str,
    model: (&str, &str),
    input: i64,
    output: i64,
) -> UsageEvent {
    UsageEvent {
        event_id: id,
        started_at_us: ended * 1_000_000 - 700_000,
        first_token_at_us: None,
        ended_at_us: ended * 1_000_000,
        envelope: Envelope {
            project: Some(format!("proj-{workflow}")),
            team: Some("team-a".into()),
            user_id: Some("u_1".into()),
            session_id: Some(session.into()),
            workflow_tag: Some(workflow.into()),
            environment: Some("production".into()),
            cost_center: Some("cc-1".into()),
        },
        api_key_id: Some("key-main".into()),
        api_format: ApiFormat::OpenAi,
        virtual_model: "vm".into(),
        provider: model.0.into(),
        model: model.1.into(),
        model_version: Some(format!("{}-v1", model.1)),
        attempt: 1,
        fallback_path: vec![],
        status: Status::Ok,
        http_status: 200,
        error: None,
        streamed: false,
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        reference_input_tokens: Some(input),
        input_chars: input * 4,
        token_source: TokenSource::Provider,
        cost_nanos: input * 1_000 + output * 5_000 + 7,
        price_card_version: "2026-04".into(),
        decision: None,
        trace_id: None,
    }
}

fn failed(mut e: UsageEvent) -> UsageEvent {
    // As the ingress records a provider failure: nothing consumed, nothing billed.
    e.status = Status::ProviderError;
    e.http_status = 502;
    e.input_tokens = 0;
    e.output_tokens = 0;
    e.cached_input_tokens = 0;
    e.cost_nanos = 0;
    e.token_source = TokenSource::Estimated;
    e
}

fn secs(e: &UsageEvent) -> i64 {
    e.ended_at_us.div_euclid(1_000_000)
}

fn within(e: &UsageEvent, p: &Period) -> bool {
    let s = secs(e);
    p.from.is_none_or(|f| s >= f) && p.to.is_none_or(|t| s < t)
}

/// Prompt tokens by the one definition (`UsageEvent::prompt_tokens`: the input, cache included).
fn prompt(e: &UsageEvent) -> i64 {
    e.prompt_tokens()
}

fn s(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

/// A migrated database of its own, merges stopped so replayed rows stay physically duplicated.
async fn fresh_db(prefix: &str) -> ClickHouseConfig {
    let db = common::unique(prefix);
    let cfg = ClickHouseConfig { url: common::clickhouse_url(), database: db.clone(), user: None, password: None };
    tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap();
    common::ch(&format!("SYSTEM STOP MERGES {db}.usage_events")).await;
    cfg
}

/// Writes every event through the meter's sink, then `replayed` of them again at new Kafka
/// positions (a replay after a crash, or a re-send by the ingress), and proves both copies are
/// stored while FINAL sees each event once.
async fn seed(cfg: &ClickHouseConfig, events: &[UsageEvent], replayed: &[usize]) {
    let client = cfg.client();
    let rows: Vec<UsageRow> =
        events.iter().enumerate().map(|(i, e)| UsageRow::new(e.clone(), "tollgate.usage.v1", 0, i as i64)).collect();
    sink::insert(&client, &rows).await.unwrap();
    let again: Vec<UsageRow> = replayed
        .iter()
        .map(|&i| UsageRow::new(events[i].clone(), "tollgate.usage.v1", 1, 1_000_000 + i as i64))
        .collect();
    sink::insert(&client, &again).await.unwrap();
    // The rollups, as the meter's flush makes them: each event's first copy only.
    let all: Vec<UsageRow> = rows.into_iter().chain(again).collect();
    let firsts = sink::first_copies(&client, "tollgate.usage.v1", &all).await.unwrap();
    let mut windows = Windows::default();
    let batch = windows.batch(firsts);
    windows.apply(&batch);
    let (w, sessions) = windows.dirty();
    tollgate_store::insert_rows(&client, tollgate_store::tables::USAGE_WINDOWS, &w).await.unwrap();
    tollgate_store::insert_rows(&client, tollgate_store::tables::SESSION_HOURS, &sessions).await.unwrap();
    let db = &cfg.database;
    let raw = common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await;
    assert_eq!(raw as usize, events.len() + replayed.len(), "both copies of a replayed event are stored");
    let once = common::ch_count(&format!("SELECT count() FROM {db}.usage_events FINAL")).await;
    assert_eq!(once as usize, events.len(), "FINAL sees each event once");
}

async fn drop_db(cfg: &ClickHouseConfig) {
    common::ch(&format!("DROP DATABASE {}", cfg.database)).await;
}

// ---------------------------------------------------------------------------------------------
// Chargeback

/// 400 events over March to May with every envelope dimension varied (absent fields too),
/// failures, odd nano-dollar costs, and events exactly on the month boundaries.
fn chargeback_events() -> Vec<UsageEvent> {
    let projects = [Some("platform-search"), Some("support"), Some("intern-sandbox"), None];
    let teams = [Some("data-platform"), Some("cx"), None];
    let centers = [Some("eng-platform-002"), Some("cx-001"), Some("eng-ml-007"), Some("ops-3"), None];
    let users = ["u_8f1c2d", "u_2", "u_3", "u_4", "u_5", "u_6", ""];
    let workflows = ["classify-intent", "summarize"];
    let models = [OPUS, HAIKU, MINI];
    let mut out = Vec::new();
    for i in 0..400_i64 {
        let ended = match i {
            0 => APRIL - 1,
            1 => APRIL,
            2 => MAY - 1,
            3 => MAY,
            _ => APRIL - 2 * DAY + (i * 7919) % (34 * DAY),
        };
        let iu = i as usize;
        let mut e = event(
            format!("0190a000-0000-7000-8000-{i:012}"),
            ended,
            workflows[iu % 2],
            &format!("sess-{}", i % 37),
            models[(iu / 2) % 3],
            100 + (i * 37) % 5000,
            1 + (i * 13) % 700,
        );
        e.envelope.project = projects[iu % 4].map(str::to_owned);
        e.envelope.team = teams[iu % 3].map(str::to_owned);
        e.envelope.cost_center = centers[iu % 5].map(str::to_owned);
        e.envelope.user_id = Some(users[iu % 7].to_owned()).filter(|u| !u.is_empty());
        e.cached_input_tokens = if i % 4 == 0 { e.input_tokens / 10 } else { 0 };
        e.cost_nanos = (i * 987_654_321) % 3_000_000_007 + 1;
        if i % 7 == 3 {
            e = failed(e);
        } else if i % 11 == 5 {
            e = failed(e);
            e.status = Status::Timeout;
        }
        out.push(e);
    }
    out
}

fn key_of(e: &UsageEvent, dims: &[Dimension]) -> Vec<String> {
    report::key_columns(dims)
        .iter()
        .map(|c| match *c {
            "project" => s(&e.envelope.project),
            "team" => s(&e.envelope.team),
            "cost_center" => s(&e.envelope.cost_center),
            "user_id" => s(&e.envelope.user_id),
            "workflow_tag" => s(&e.envelope.workflow_tag),
            "provider" => e.provider.clone(),
            "model" => e.model.clone(),
            other => panic!("unknown key column {other}"),
        })
        .collect()
}

fn add(t: &mut Totals, e: &UsageEvent) {
    t.requests += 1;
    t.errors += u64::from(e.status != Status::Ok);
    t.input_tokens += e.input_tokens;
    t.output_tokens += e.output_tokens;
    t.cached_input_tokens += e.cached_input_tokens;
    t.cost_nanos += e.cost_nanos;
}

/// What chargeback must say, computed here from the seeded events.
fn expected_chargeback(events: &[UsageEvent], dims: &[Dimension], p: &Period) -> BTreeMap<Vec<String>, Totals> {
    let mut m: BTreeMap<Vec<String>, Totals> = BTreeMap::new();
    for e in events.iter().filter(|e| within(e, p)) {
        add(m.entry(key_of(e, dims)).or_default(), e);
    }
    m
}

/// The same figures straight from the raw table, with one plain `sum()` per column.
async fn raw_totals(db: &str, p: &Period) -> Totals {
    let tsv = common::ch(&format!(
        "SELECT count(), countIf(status != 'ok'), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), \
         sum(cost_nanos) FROM {db}.usage_events FINAL WHERE {} FORMAT TabSeparated",
        p.condition()
    ))
    .await;
    let f: Vec<i64> = tsv.trim().split('\t').map(|x| x.parse().unwrap()).collect();
    Totals {
        requests: f[0] as u64,
        errors: f[1] as u64,
        input_tokens: f[2],
        output_tokens: f[3],
        cached_input_tokens: f[4],
        cost_nanos: f[5],
    }
}

const GROUPINGS: &[&[Dimension]] = &[
    &[Dimension::Project],
    &[Dimension::Team],
    &[Dimension::CostCenter],
    &[Dimension::User],
    &[Dimension::Workflow],
    &[Dimension::Model],
    &[Dimension::Team, Dimension::Model],
    &[Dimension::Project, Dimension::User],
    &[Dimension::CostCenter, Dimension::Workflow, Dimension::Model],
];

#[tokio::test]
async fn chargeback_matches_the_raw_events_to_the_nano_dollar() {
    let cfg = fresh_db("tollgate_cb").await;
    let events = chargeback_events();
    let replayed: Vec<usize> = (0..events.len()).filter(|i| i % 6 == 0).collect();
    seed(&cfg, &events, &replayed).await;
    let reporter = Reporter::new(&cfg).unwrap();
    let db = &cfg.database;

    let periods = [
        Period::month("2026-04").unwrap(),
        Period::between(Some("2026-04-10"), Some("2026-04-20T12:00:00Z")).unwrap(),
        Period::ALL,
        Period::between(Some("2026-04-10T00:00:30Z"), Some("2026-04-20T12:00:00Z")).unwrap(),
    ];
    let sources: Vec<Source> = periods.iter().map(Source::for_period).collect();
    assert_eq!(
        sources,
        [
            Source::Rollups(Granularity::Month),
            Source::Rollups(Granularity::Hour),
            Source::Rollups(Granularity::Month),
            Source::Raw
        ],
        "whole windows tile the first three periods; the last starts inside a minute"
    );
    let april = periods[0];
    let in_april = events.iter().filter(|e| within(e, &april)).count();
    assert!(in_april > 300 && in_april < 400, "{in_april} of the events are in April");
    assert!(within(&events[1], &april) && within(&events[2], &april), "month starts are in, ends out");
    assert!(!within(&events[0], &april) && !within(&events[3], &april));

    for p in &periods {
        let raw = raw_totals(db, p).await;
        assert!(raw.requests > 0 && raw.cost_nanos > 1_000_000_000, "{p:?}: {raw:?}");
        for dims in GROUPINGS {
            let rows = reporter.chargeback(dims, p).await.unwrap();
            let got: BTreeMap<Vec<String>, Totals> =
                rows.iter().map(|r| (r.keys.clone(), Totals::of(std::slice::from_ref(r)))).collect();
            assert_eq!(got.len(), rows.len(), "{dims:?}: each group once");
            let want = expected_chargeback(&events, dims, p);
            assert_eq!(got, want, "{dims:?} over {p:?}");
            assert_eq!(Totals::of(&rows), raw, "{dims:?} over {p:?}: total equals sum() over the raw events");
            // Read from the rollups or from the raw events, the report is the same, row for row.
            let from_raw = reporter.chargeback_from(dims, p, Source::Raw).await.unwrap();
            assert_eq!(rows, from_raw, "{dims:?} over {p:?}: rollups and raw events agree");
            let minutes = reporter.chargeback_from(dims, p, Source::Rollups(Granularity::Minute)).await;
            match p.tiled_by() {
                Some(_) => assert_eq!(minutes.unwrap(), from_raw, "{dims:?} over {p:?}: minute windows agree too"),
                None => assert!(minutes.is_err(), "minute windows do not tile {p:?}"),
            }
            // Largest cost first.
            assert!(rows.windows(2).all(|w| w[0].cost_nanos >= w[1].cost_nanos), "{dims:?}: ordered by cost");
        }
    }

    // The documented views say what `report --month 2026-04` says.
    let team_view = common::ch(&format!(
        "SELECT team, requests, errors, input_tokens, output_tokens, cached_input_tokens, cost_nanos \
         FROM {db}.chargeback_by_team WHERE month = '2026-04-01' ORDER BY team FORMAT TabSeparated"
    ))
    .await;
    let want: Vec<String> = expected_chargeback(&events, &[Dimension::Team], &april)
        .iter()
        .map(|(k, t)| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                k[0], t.requests, t.errors, t.input_tokens, t.output_tokens, t.cached_input_tokens, t.cost_nanos
            )
        })
        .collect();
    assert_eq!(team_view.lines().collect::<Vec<_>>(), want);
    let model_view = common::ch(&format!(
        "SELECT provider, model, sum(requests), sum(cost_nanos) FROM {db}.chargeback_by_model \
         WHERE month = '2026-04-01' GROUP BY provider, model ORDER BY provider, model FORMAT TabSeparated"
    ))
    .await;
    let want: Vec<String> = expected_chargeback(&events, &[Dimension::Model], &april)
        .iter()
        .map(|(k, t)| format!("{}\t{}\t{}\t{}", k[0], k[1], t.requests, t.cost_nanos))
        .collect();
    assert_eq!(model_view.lines().collect::<Vec<_>>(), want);
    for view in ["project", "team", "cost_center", "user", "workflow", "model"] {
        let n = common::ch_count(&format!(
            "SELECT sum(cost_nanos) FROM {db}.chargeback_by_{view} WHERE month = '2026-04-01'"
        ))
        .await;
        assert_eq!(n as i64, raw_totals(db, &april).await.cost_nanos, "chargeback_by_{view} total");
    }
    drop_db(&cfg).await;
}

// ---------------------------------------------------------------------------------------------
// The four failure modes and untagged spend

const LOOP_HOUR: i64 = APRIL + 5 * DAY + HOUR;
const DRIFTED: &str = "claude-sonnet-4-6-20260415";

/// Workflows, each normal but for one symptom the test looks for:
/// - classify-intent: 20 of 40 requests on Opus, 83% of its cost (frontier overuse);
/// - code-review: Opus for 31% of its cost, and one 120K-token prompt among 3K ones (neither);
/// - support-bot: 60K-token prompts (5K of them cache reads) on every successful request, and
///   failed requests with no tokens that must not dilute the average (context stuffing);
/// - agent: 40 ordinary sessions of 12–15K tokens an hour, and `ag-loop`, one ordinary hour
///   then an hour of 60 requests, ~200K tokens (loop);
/// - translate: Sonnet's new version turns the same text into 1.3× the tokens of the previous
///   one (drift); gpt-4o-mini's into 1.04× (no drift); tiktoken-estimated events are ignored;
/// - summarize: requests without project, team or cost centre (untagged spend).
fn failure_events() -> Vec<UsageEvent> {
    let mut v = Vec::new();
    let mut n = 0_u64;
    let mut id = || {
        n += 1;
        format!("0190b000-0000-7000-8000-{n:012}")
    };
    for i in 0..40_i64 {
        let j = i % 4;
        let t = APRIL + DAY + j * HOUR + i * 10;
        let model = if i % 2 == 0 { OPUS } else { HAIKU };
        let mut e = event(id(), t, "classify-intent", &format!("ci-s{j}"), model, 800, 20);
        e.cost_nanos = if model == OPUS { 5_000_001 } else { 1_000_003 };
        v.push(e);
    }
    for i in 0..40_i64 {
        let j = i % 4;
        let t = APRIL + 2 * DAY + j * HOUR + i * 10;
        let model = if i % 4 == 0 { OPUS } else { SONNET };
        let input = if i == 1 { 120_000 } else { 3_000 };
        let mut e = event(id(), t, "code-review", &format!("cr-s{j}"), model, input, 20);
        e.cost_nanos = if model == OPUS { 2_000_000 } else { 1_500_000 };
        if model == SONNET {
            e.model_version = Some("claude-sonnet-4-6-20260201".into());
        }
        v.push(e);
    }
    for i in 0..40_i64 {
        let j = i % 3;
        let t = APRIL + 3 * DAY + j * HOUR + i * 10;
        let mut e = event(id(), t, "support-bot", &format!("sb-s{j}"), HAIKU, 60_000, 300);
        e.cached_input_tokens = 5_000;
        e.reference_input_tokens = Some(60_000);
        v.push(if i >= 30 { failed(e) } else { e });
    }
    for j in 0..40_i64 {
        let t = APRIL + 4 * DAY + (j % 10) * HOUR;
        for r in 0..4 {
            v.push(event(id(), t + r * 60, "agent", &format!("ag-s{j}"), HAIKU, 2_500 + j * 20, 500));
        }
    }
    for r in 0..4 {
        v.push(event(id(), APRIL + 5 * DAY + r * 60, "agent", "ag-loop", HAIKU, 2_600, 500));
    }
    for r in 0..60 {
        v.push(event(id(), LOOP_HOUR + r * 50, "agent", "ag-loop", HAIKU, 3_000, 400));
    }
    let versions = [
        (SONNET, "claude-sonnet-4-6-20260201", 6, 1_000),
        (SONNET, DRIFTED, 15, 1_300),
        (MINI, "gpt-4o-mini-2024-07-18", 7, 1_000),
        (MINI, "gpt-4o-mini-2026-03-01", 16, 1_040),
    ];
    for (model, version, day, input) in versions {
        for i in 0..20_i64 {
            let t = APRIL + day * DAY + (i % 4) * HOUR + i * 10;
            let mut e = event(id(), t, "translate", &format!("tr-s{}", i % 4), model, input, 100);
            e.reference_input_tokens = Some(1_000);
            e.model_version = Some(version.into());
            v.push(e);
        }
    }
    for i in 0..3_i64 {
        // The provider sent no usage: tiktoken on both sides says nothing about its tokenizer.
        let mut e = event(id(), APRIL + 15 * DAY + i * HOUR, "translate", &format!("tr-s{i}"), SONNET, 5_000, 100);
        e.reference_input_tokens = Some(1_000);
        e.model_version = Some(DRIFTED.into());
        e.token_source = TokenSource::Estimated;
        v.push(e);
    }
    for i in 0..12_i64 {
        let mut e = event(
            id(),
            APRIL + 8 * DAY + (i % 2) * HOUR + i * 10,
            "summarize",
            &format!("su-s{}", i % 2),
            MINI,
            900,
            90,
        );
        e.model_version = Some("gpt-4o-mini-2024-07-18".into());
        match i % 4 {
            0 => {
                e.envelope.project = None;
                e.envelope.team = None;
                e.envelope.cost_center = None;
                e.api_key_id = Some("key-legacy".into());
            }
            1 => {
                e.envelope.cost_center = None;
                e.api_key_id = Some("key-batch".into());
            }
            2 if i == 2 => e.envelope.project = Some(String::new()),
            _ => {}
        }
        v.push(e);
    }
    v
}

/// (provider, model, model_version) and (requests, prompt tokens, reference tokens, first seen, last seen).
type VersionKey = (String, String, String);
type VersionFigures = (u64, i64, i64, i64, i64);

fn compose_price_card() -> tollgate_schemas::policy::PriceCard {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    tollgate_schemas::policy::Policy::load_dir(&dir).unwrap().price_card.expect("compose/policy has a price card")
}

fn set<T: Ord + Clone, I: IntoIterator<Item = T>>(i: I) -> BTreeSet<T> {
    i.into_iter().collect()
}

#[tokio::test]
async fn failure_mode_reports_flag_exactly_what_was_seeded() {
    let cfg = fresh_db("tollgate_fm").await;
    let events = failure_events();
    let replayed: Vec<usize> = (0..events.len()).filter(|i| i % 5 == 0).collect();
    seed(&cfg, &events, &replayed).await;
    let reporter = Reporter::new(&cfg).unwrap();
    let db = &cfg.database;
    let april = Period::month("2026-04").unwrap();

    // Tiers come from the price card: only Opus is frontier.
    let card = compose_price_card();
    assert_eq!(reporter.sync_model_tiers(&card).await.unwrap(), card.prices.len());
    assert_eq!(reporter.frontier_models().await.unwrap(), 1);
    let frontier_pairs =
        common::ch(&format!("SELECT provider, model FROM {db}.frontier_models FORMAT TabSeparated")).await;
    assert_eq!(frontier_pairs.trim(), "anthropic\tclaude-opus-4-7");

    // Frontier share.
    let rows = reporter.frontier_share(&april).await.unwrap();
    let mut want: BTreeMap<String, (u64, u64, i64, i64)> = BTreeMap::new();
    for e in &events {
        let w = want.entry(s(&e.envelope.workflow_tag)).or_default();
        let frontier = (e.provider.as_str(), e.model.as_str()) == OPUS;
        w.0 += 1;
        w.1 += u64::from(frontier);
        w.2 += e.cost_nanos;
        w.3 += if frontier { e.cost_nanos } else { 0 };
    }
    let got: BTreeMap<String, (u64, u64, i64, i64)> = rows
        .iter()
        .map(|r| (r.workflow_tag.clone(), (r.requests, r.frontier_requests, r.cost_nanos, r.frontier_cost_nanos)))
        .collect();
    assert_eq!(got, want);
    let flagged =
        set(rows.iter().filter(|r| r.share() > report::DEFAULT_FRONTIER_SHARE).map(|r| r.workflow_tag.as_str()));
    assert_eq!(flagged, set(["classify-intent"]));
    let cr = rows.iter().find(|r| r.workflow_tag == "code-review").unwrap();
    assert!(cr.share() > 0.25 && cr.share() < 0.35, "code-review uses some Opus: {}", cr.share());

    // Context stuffing.
    let rows = reporter.context_stuffing(&april).await.unwrap();
    let mut want: BTreeMap<String, (u64, i64, i64)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.status == Status::Ok) {
        let w = want.entry(s(&e.envelope.workflow_tag)).or_default();
        w.0 += 1;
        w.1 += prompt(e);
        w.2 = w.2.max(prompt(e));
    }
    let got: BTreeMap<String, (u64, i64, i64)> =
        rows.iter().map(|r| (r.workflow_tag.clone(), (r.requests, r.prompt_tokens, r.max_prompt_tokens))).collect();
    assert_eq!(got, want);
    let over =
        |limit: u64| set(rows.iter().filter(|r| r.avg_prompt_tokens() > limit as f64).map(|r| r.workflow_tag.clone()));
    assert_eq!(over(report::DEFAULT_STUFFING_TOKENS), set(["support-bot".to_owned()]));
    assert_eq!(rows.iter().find(|r| r.workflow_tag == "support-bot").unwrap().avg_prompt_tokens(), 60_000.0);
    assert_eq!(over(70_000), BTreeSet::new(), "a higher threshold flags nothing");

    // Loops: exactly one session-hour, with the tokens its events add up to.
    let rows = reporter.loops(&april, report::DEFAULT_LOOP_K).await.unwrap();
    let flagged = set(rows.iter().map(|r| (r.workflow_tag.clone(), r.session_id.clone(), i64::from(r.hour))));
    assert_eq!(flagged, set([("agent".to_owned(), "ag-loop".to_owned(), LOOP_HOUR)]), "{rows:?}");
    let loop_tokens: i64 = events
        .iter()
        .filter(|e| s(&e.envelope.session_id) == "ag-loop" && secs(e) >= LOOP_HOUR)
        .map(|e| e.input_tokens + e.output_tokens + e.cached_input_tokens + e.cache_write_tokens)
        .sum();
    assert_eq!(rows[0].tokens, loop_tokens);
    assert_eq!(rows[0].requests, 60);
    assert!(rows[0].workflow_p95_tokens > 12_000.0 && rows[0].workflow_p95_tokens < 16_000.0, "{rows:?}");
    assert!(rows[0].ratio_to_p95() > 10.0, "{rows:?}");
    // A lower k finds more; a far higher one finds none.
    assert!(reporter.loops(&april, 1.0).await.unwrap().len() > 1);
    assert!(reporter.loops(&april, 100.0).await.unwrap().is_empty());

    // Tokenizer drift.
    let rows = reporter.drift(&april, report::DEFAULT_DRIFT).await.unwrap();
    let mut want: BTreeMap<VersionKey, VersionFigures> = BTreeMap::new();
    for e in events.iter().filter(|e| e.status == Status::Ok && e.token_source == TokenSource::Provider) {
        let k = (e.provider.clone(), e.model.clone(), s(&e.model_version));
        let w = want.entry(k).or_insert((0, 0, 0, i64::MAX, 0));
        w.0 += 1;
        w.1 += prompt(e);
        w.2 += e.reference_input_tokens.unwrap();
        w.3 = w.3.min(secs(e));
        w.4 = w.4.max(secs(e));
    }
    let got: BTreeMap<VersionKey, VersionFigures> = rows
        .iter()
        .map(|d| {
            let r = &d.row;
            let k = (r.provider.clone(), r.model.clone(), r.model_version.clone());
            (k, (r.requests, r.prompt_tokens, r.reference_tokens, i64::from(r.first_seen), i64::from(r.last_seen)))
        })
        .collect();
    assert_eq!(got, want);
    let flagged: Vec<&report::Drift> = rows.iter().filter(|d| d.flagged).collect();
    assert_eq!(flagged.len(), 1, "{rows:?}");
    assert_eq!(flagged[0].row.model_version, DRIFTED);
    assert_eq!(flagged[0].previous_version.as_deref(), Some("claude-sonnet-4-6-20260201"));
    assert!((flagged[0].change.unwrap() - 0.3).abs() < 1e-9, "{:?}", flagged[0]);
    assert!((flagged[0].row.token_ratio() - 1.3).abs() < 1e-9);
    let mini = rows.iter().find(|d| d.row.model_version == "gpt-4o-mini-2026-03-01").unwrap();
    assert!((mini.change.unwrap() - 0.04).abs() < 1e-9 && !mini.flagged, "{mini:?}");

    // Untagged spend.
    let rows = reporter.untagged(&april).await.unwrap();
    let mut want: BTreeMap<(String, String, String), (u64, i64)> = BTreeMap::new();
    for e in &events {
        let missing: Vec<&str> =
            [("project", &e.envelope.project), ("team", &e.envelope.team), ("cost_center", &e.envelope.cost_center)]
                .into_iter()
                .filter(|(_, v)| s(v).is_empty())
                .map(|(n, _)| n)
                .collect();
        if !missing.is_empty() {
            let w = want.entry((missing.join(","), s(&e.api_key_id), s(&e.envelope.workflow_tag))).or_default();
            w.0 += 1;
            w.1 += e.cost_nanos;
        }
    }
    assert_eq!(want.len(), 3, "three kinds of untagged spend were seeded");
    let got: BTreeMap<(String, String, String), (u64, i64)> = rows
        .iter()
        .map(|r| ((r.missing.clone(), r.api_key_id.clone(), r.workflow_tag.clone()), (r.requests, r.cost_nanos)))
        .collect();
    assert_eq!(got, want);
    assert!(got.contains_key(&("project,team,cost_center".into(), "key-legacy".into(), "summarize".into())));
    assert_eq!(
        reporter.total_cost(&april).await.unwrap(),
        events.iter().map(|e| e.cost_nanos).sum::<i64>(),
        "all spend, each replayed event once"
    );

    // The views answer the same for the month.
    let tsv = |sql: String| async move { common::ch(&format!("{sql} FORMAT TabSeparated")).await };
    let view = tsv(format!(
        "SELECT workflow_tag FROM {db}.frontier_share_by_workflow WHERE month = '2026-04-01' AND frontier_share > 0.5"
    ))
    .await;
    assert_eq!(view.trim(), "classify-intent");
    let view = tsv(format!(
        "SELECT workflow_tag FROM {db}.context_stuffing_by_workflow WHERE month = '2026-04-01' AND avg_prompt_tokens > 50000"
    ))
    .await;
    assert_eq!(view.trim(), "support-bot");
    let view = tsv(format!(
        "SELECT session_id, toUnixTimestamp(hour), tokens FROM {db}.loop_session_hours WHERE month = '2026-04-01' AND ratio_to_p95 > 3"
    ))
    .await;
    assert_eq!(view.trim(), format!("ag-loop\t{LOOP_HOUR}\t{loop_tokens}"));
    let view = tsv(format!(
        "SELECT model_version, round(token_ratio, 6) FROM {db}.tokenizer_drift WHERE model = 'claude-sonnet-4-6' ORDER BY first_seen"
    ))
    .await;
    assert_eq!(view.trim(), format!("claude-sonnet-4-6-20260201\t1\n{DRIFTED}\t1.3"));
    let view =
        tsv(format!("SELECT sum(requests), sum(cost_nanos) FROM {db}.untagged_spend WHERE month = '2026-04-01'")).await;
    let (n, c) = want.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    assert_eq!(view.trim(), format!("{n}\t{c}"));
    drop_db(&cfg).await;
}

// ---------------------------------------------------------------------------------------------
// The binary

fn meter_binary() -> PathBuf {
    common::binary("tollgate-meter", "tollgate-meter")
}

fn run_report(cfg: &ClickHouseConfig, args: &[&str]) -> String {
    let out = Command::new(meter_binary())
        .arg("report")
        .args(args)
        .args(["--clickhouse-url", &cfg.url, "--database", &cfg.database])
        .env_remove("TOLLGATE_POLICY_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "report {args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test]
async fn report_binary_prints_the_library_figures() {
    let cfg = fresh_db("tollgate_cbbin").await;
    let events = failure_events();
    seed(&cfg, &events, &[0, 1, 2, 50, 150]).await;
    let reporter = Reporter::new(&cfg).unwrap();
    let april = Period::month("2026-04").unwrap();
    let dims = [Dimension::Team, Dimension::Model];
    let rows = reporter.chargeback(&dims, &april).await.unwrap();
    let total = Totals::of(&rows);
    assert!(rows.len() >= 4 && total.requests as usize == events.len(), "{rows:?}");

    // CSV: the grouping columns, the figures, cost as exact dollars, a TOTAL row last.
    let csv_text = run_report(&cfg, &["--by", "team", "--by", "model", "--month", "2026-04", "--format", "csv"]);
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        header,
        [
            "team",
            "provider",
            "model",
            "requests",
            "errors",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cost_usd"
        ]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), rows.len() + 1);
    for (rec, row) in records.iter().zip(&rows) {
        let fields: Vec<&str> = rec.iter().collect();
        assert_eq!(fields[..3], row.keys.iter().map(String::as_str).collect::<Vec<_>>()[..]);
        assert_eq!(
            fields[3..],
            [
                row.requests.to_string(),
                row.errors.to_string(),
                row.input_tokens.to_string(),
                row.output_tokens.to_string(),
                row.cached_input_tokens.to_string(),
                format_usd(row.cost_nanos),
            ]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()[..]
        );
    }
    let last: Vec<&str> = records.last().unwrap().iter().collect();
    assert_eq!(last[0], "TOTAL");
    assert_eq!(last[3].parse::<u64>().unwrap(), total.requests);
    assert_eq!(last[8], format_usd(total.cost_nanos));
    assert_eq!(format_usd(total.cost_nanos), format_usd(events.iter().map(|e| e.cost_nanos).sum()));

    // JSON: the same rows, cost both as an exact string and as integer nano-USD.
    let json: Value = serde_json::from_str(&run_report(
        &cfg,
        &["--month", "2026-04", "--by", "team", "--by", "model", "--format", "json"],
    ))
    .unwrap();
    assert_eq!(json["report"], "chargeback");
    assert_eq!(json["from"], "2026-04-01T00:00:00Z");
    assert_eq!(json["to"], "2026-05-01T00:00:00Z");
    let jrows = json["rows"].as_array().unwrap();
    assert_eq!(jrows.len(), rows.len());
    for (j, row) in jrows.iter().zip(&rows) {
        assert_eq!(j["team"], row.keys[0].as_str());
        assert_eq!(j["model"], row.keys[2].as_str());
        assert_eq!(j["requests"], row.requests);
        assert_eq!(j["cost_nanos"], row.cost_nanos);
        assert_eq!(j["cost_usd"], format_usd(row.cost_nanos).as_str());
    }
    assert_eq!(json["total"]["requests"], total.requests);
    assert_eq!(json["total"]["input_tokens"], total.input_tokens);
    assert_eq!(json["total"]["cost_nanos"], total.cost_nanos);
    assert_eq!(json["total"]["cost_usd"], format_usd(total.cost_nanos).as_str());

    // Table: a TOTAL row with the exact total.
    let table = run_report(&cfg, &["--by", "team", "--by", "model", "--month", "2026-04"]);
    let total_line = table.lines().find(|l| l.contains("TOTAL")).unwrap_or_else(|| panic!("no TOTAL row:\n{table}"));
    assert!(total_line.contains(&format_usd(total.cost_nanos)), "{table}");
    assert!(total_line.contains(&format!(" {} ", total.requests)), "{table}");

    // --from/--to are half-open: the same as --month when they span it.
    let same = run_report(
        &cfg,
        &["--by", "team", "--by", "model", "--from", "2026-04-01", "--to", "2026-05-01T00:00:00Z", "--format", "csv"],
    );
    assert_eq!(same, csv_text);

    // The failure-mode subcommands, with tiers synced from --policy-dir.
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    let fs: Value = serde_json::from_str(&run_report(
        &cfg,
        &["frontier-share", "--policy-dir", policy.to_str().unwrap(), "--format", "json"],
    ))
    .unwrap();
    let flagged: Vec<&str> = fs["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["flagged"] == true)
        .map(|r| r["workflow_tag"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, ["classify-intent"]);
    assert_eq!(fs["total"]["cost_nanos"], total.cost_nanos);

    let stuffing: Value = serde_json::from_str(&run_report(&cfg, &["context-stuffing", "--format", "json"])).unwrap();
    let flagged: Vec<&str> = stuffing["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["flagged"] == true)
        .map(|r| r["workflow_tag"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, ["support-bot"]);
    let stuffing: Value =
        serde_json::from_str(&run_report(&cfg, &["context-stuffing", "--threshold", "70000", "--format", "json"]))
            .unwrap();
    assert!(stuffing["rows"].as_array().unwrap().iter().all(|r| r["flagged"] == false));

    let loops: Value =
        serde_json::from_str(&run_report(&cfg, &["loops", "--month", "2026-04", "--format", "json"])).unwrap();
    let lrows = loops["rows"].as_array().unwrap();
    assert_eq!(lrows.len(), 1, "{loops}");
    assert_eq!(lrows[0]["session_id"], "ag-loop");
    assert_eq!(lrows[0]["hour"], report::fmt_time(LOOP_HOUR).as_str());
    assert_eq!(loops["parameters"]["k"], 3.0);
    let loops_k1: Value = serde_json::from_str(&run_report(&cfg, &["loops", "--k", "1", "--format", "json"])).unwrap();
    assert!(loops_k1["rows"].as_array().unwrap().len() > 1);

    let drift = run_report(&cfg, &["drift", "--format", "csv"]);
    let mut reader = csv::Reader::from_reader(drift.as_bytes());
    let flagged_col = reader.headers().unwrap().iter().position(|h| h == "flagged").unwrap();
    let flagged: Vec<String> =
        reader.records().map(Result::unwrap).filter(|r| &r[flagged_col] == "yes").map(|r| r[2].to_owned()).collect();
    assert_eq!(flagged, [DRIFTED]);

    let untagged: Value = serde_json::from_str(&run_report(&cfg, &["untagged", "--format", "json"])).unwrap();
    let lib = reporter.untagged(&Period::ALL).await.unwrap();
    assert_eq!(untagged["rows"].as_array().unwrap().len(), lib.len());
    assert_eq!(untagged["total"]["cost_nanos"], lib.iter().map(|r| r.cost_nanos).sum::<i64>());

    // Bad input is refused with a non-zero exit, not an empty report.
    let out = Command::new(meter_binary())
        .args(["report", "--month", "2026-13", "--database", &cfg.database, "--clickhouse-url", &cfg.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2026-13"));
    drop_db(&cfg).await;
}

/// `run --policy-dir` writes the price card's tiers before it consumes (no broker needed).
#[tokio::test]
async fn meter_run_writes_the_price_card_tiers_at_start() {
    let db = common::unique("tollgate_tiers");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    let mut child = Command::new(meter_binary())
        .args(["run", "--policy-dir", policy.to_str().unwrap(), "--database", &db, "--listen", "127.0.0.1:0"])
        .args(["--clickhouse-url", &common::clickhouse_url(), "--kafka-brokers", "127.0.0.1:1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let query = format!("SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'frontier_models'");
    let synced = common::eventually(std::time::Duration::from_secs(30), || async {
        common::ch_count(&query).await == 1
            && common::ch_count(&format!("SELECT count() FROM {db}.model_tiers")).await
                == compose_price_card().prices.len() as u64
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(synced, "the meter did not write the card's tiers");
    let tiers = common::ch(&format!(
        "SELECT provider, model, tier FROM {db}.model_tiers WHERE tier != 'economy' ORDER BY model FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(tiers, "anthropic\tclaude-opus-4-7\tfrontier\nanthropic\tclaude-sonnet-4-6\tstandard\n");
    assert_eq!(
        common::ch(&format!("SELECT model FROM {db}.frontier_models FORMAT TabSeparated")).await,
        "claude-opus-4-7\n"
    );
    common::ch(&format!("DROP DATABASE {db}")).await;
}

// ---------------------------------------------------------------------------------------------
// Current ClickHouse

/// Every report query, on current ClickHouse (chdb), against rows with a duplicate.
#[test]
fn report_queries_run_on_current_clickhouse() {
    let db = "tollgate_current";
    let mut stmts: Vec<String> = tollgate_store::migrate::statements(db).into_iter().map(|(_, s)| s).collect();
    let april2 = APRIL + DAY + 10 * HOUR;
    stmts.push(format!(
        "INSERT INTO {db}.usage_events (event_id, started_at, ended_at, project, team, user_id, session_id, workflow_tag, \
         cost_center, api_key_id, provider, model, model_version, status, input_tokens, output_tokens, cached_input_tokens, \
         reference_input_tokens, token_source, cost_nanos) VALUES \
         ('e1', {april2}, {april2}, 'p1', 't1', 'u1', 's1', 'w1', 'cc1', 'k1', 'anthropic', 'claude-opus-4-7', 'v1', 'ok', 1000, 100, 0, 800, 'provider', 7500000001), \
         ('e1', {april2}, {april2}, 'p1', 't1', 'u1', 's1', 'w1', 'cc1', 'k1', 'anthropic', 'claude-opus-4-7', 'v1', 'ok', 1000, 100, 0, 800, 'provider', 7500000001), \
         ('e2', {t2}, {t2}, '', 't1', 'u2', 's2', 'w1', '', 'k2', 'openai', 'gpt-4o-mini', 'v2', 'ok', 500, 50, 100, 600, 'provider', 123), \
         ('e3', {t3}, {t3}, 'p1', '', 'u1', 's1', 'w2', 'cc1', 'k1', 'openai', 'gpt-4o-mini', 'v3', 'provider_error', 0, 0, 0, NULL, 'estimated', 0)",
        t2 = april2 + 1800,
        t3 = april2 + DAY,
    ));
    stmts.push(format!(
        "INSERT INTO {db}.model_tiers (sync_id, provider, model, tier, price_card_version) VALUES \
         (1, 'anthropic', 'claude-opus-4-7', 'standard', 'old'), (2, 'anthropic', 'claude-opus-4-7', 'frontier', 'new'), \
         (2, 'openai', 'gpt-4o-mini', 'economy', 'new')"
    ));
    let april = Period::month("2026-04").unwrap();
    let queries = [
        report::sql::chargeback(db, &[Dimension::Project], &april),
        report::sql::chargeback(db, &[Dimension::CostCenter, Dimension::Workflow, Dimension::Model], &Period::ALL),
        report::sql::frontier_share(db, &april),
        report::sql::context_stuffing(db, &april),
        report::sql::loops(db, &april, 0.5),
        report::sql::drift(db, &april),
        report::sql::untagged(db, &april),
        report::sql::total_cost(db, &april),
        format!("SELECT project, requests, errors, cost_nanos FROM {db}.chargeback_by_project ORDER BY project"),
        format!(
            "SELECT workflow_tag, frontier_cost_nanos, frontier_share FROM {db}.frontier_share_by_workflow ORDER BY workflow_tag"
        ),
        format!("SELECT session_id, tokens FROM {db}.loop_session_hours WHERE ratio_to_p95 > 0.5 ORDER BY session_id"),
        format!(
            "SELECT model_version, prompt_tokens, reference_tokens FROM {db}.tokenizer_drift ORDER BY model_version"
        ),
        format!("SELECT missing, cost_nanos FROM {db}.untagged_spend ORDER BY missing"),
    ];
    for q in &queries {
        assert!(q.starts_with("SELECT"), "{q}");
    }
    stmts.extend(queries.iter().cloned());
    let text: String = stmts.iter().map(|s| format!("{s}\n-- ;;\n")).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("statements.sql");
    std::fs::write(&file, text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chdb/run_sql.py");
    let out = Command::new("python3").arg(script).arg(&file).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "current ClickHouse (chdb) refused a report query:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("clickhouse \"2"), "{stdout}");
    let expect = [
        // chargeback by project, April: e1 once (not twice), e3 an error.
        "\"['p1']\",2,1,1000,100,0,7500000001",
        "\"['']\",1,0,500,50,100,123",
        // by cost centre, workflow and model, all time.
        "\"['cc1','w1','anthropic','claude-opus-4-7']\",1,0,1000,100,0,7500000001",
        // frontier share: only the newest sync counts (Opus is frontier there).
        "\"w1\",2,1,7500000124,7500000001",
        "\"w2\",1,0,0,0",
        // context stuffing: successful requests only; e2's 100 cached tokens are inside its 500.
        "\"w1\",2,1500,1000",
        // loops (k = 0.5): w1's exact p95 is one of its two session-hours, s1's 1,100 tokens; s1
        // is above half of it, s2 (550) is not.
        "\"w1\",\"s1\",\"2026-04-02 10:00:00\",1,1100,7500000001,",
        // drift.
        "\"anthropic\",\"claude-opus-4-7\",\"v1\",",
        ",1,1000,800",
        ",1,500,600",
        // untagged.
        "\"project,cost_center\",\"k2\",\"w1\",1,123",
        "\"team\",\"k1\",\"w2\",1,0",
        // views.
        "\"\",1,0,123\n\"p1\",2,1,7500000001",
        "\"w1\",7500000001,0.9999999836",
        "\"s1\",1100",
        "\"v1\",1000,800\n\"v2\",500,600",
        "\"project,cost_center\",123\n\"team\",0",
    ];
    for e in expect {
        assert!(stdout.contains(e), "missing {e:?} in current ClickHouse's answers:\n{stdout}");
    }
    assert!(!stdout.contains("\"w1\",\"s2\""), "s2 is not a loop: {stdout}");
    assert!(stdout.contains("\n7500000124\n"), "total cost: {stdout}");
}
