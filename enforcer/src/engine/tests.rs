#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::Path;

use super::*;

const US: i64 = 1_000_000;
/// 2026-11-10T00:00:00Z: mid-month, so monthly budgets do not roll over inside a test.
const T0: i64 = 1_794_268_800 * US;

fn demo() -> Arc<Policy> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    Arc::new(Policy::load_dir(&dir).unwrap_or_else(|e| panic!("{e}")))
}

fn usage(at_us: i64, env: &[(&str, &str)], tokens: i64, cost_nanos: i64) -> Usage<'static> {
    let mut envelope = Envelope::default();
    for (k, v) in env {
        let v = Some((*v).to_owned());
        match *k {
            "project" => envelope.project = v,
            "session" => envelope.session_id = v,
            "environment" => envelope.environment = v,
            "workflow" => envelope.workflow_tag = v,
            "user" => envelope.user_id = v,
            _ => panic!("{k}"),
        }
    }
    Usage { at_us, envelope: Cow::Owned(envelope), api_key_id: None, requests: 1, tokens, cost_nanos }
}

fn states(out: &Output, rule: &str) -> Vec<(DecisionState, i64)> {
    out.decisions.iter().filter(|d| d.rule_id == rule).map(|d| (d.state, d.observed)).collect()
}

#[test]
fn a_session_is_watched_then_blocked_then_released_by_time() {
    let mut e = Engine::new(demo(), 50);
    let prod = [("session", "s1"), ("environment", "production")];
    e.observe(&usage(T0, &prod, 90_000, 0), T0);
    assert!(states(&e.evaluate(T0), "per-session-loop-guard").is_empty(), "45% is below the watch line");
    e.observe(&usage(T0 + US, &prod, 20_000, 0), T0 + US);
    assert_eq!(states(&e.evaluate(T0 + US), "per-session-loop-guard"), vec![(DecisionState::Watch, 110_000)]);
    e.observe(&usage(T0 + 120 * US, &prod, 90_000, 0), T0 + 120 * US);
    let out = e.evaluate(T0 + 120 * US);
    let d = out.decisions.iter().find(|d| d.rule_id == "per-session-loop-guard").unwrap();
    assert_eq!(
        (d.state, d.observed, d.headroom, d.scope.as_str()),
        (DecisionState::Breached, 200_000, 0, "session:s1")
    );
    assert_eq!(d.action, "hard_block");
    // Dropping the first minute (110K) lifts it: one hour and one minute after T0.
    assert_eq!(d.window_end_us, T0 + 3600 * US + 60 * US);
    assert!(e.evaluate(T0 + 3600 * US).decisions.is_empty(), "still breached, nothing new to say");
    let later = e.evaluate(T0 + 3661 * US);
    assert_eq!(states(&later, "per-session-loop-guard"), vec![(DecisionState::Clear, 90_000)], "45% again");
    e.observe(&usage(T0 + 3662 * US, &prod, 20_000, 0), T0 + 3662 * US);
    let watch = e.evaluate(T0 + 3662 * US);
    assert_eq!(states(&watch, "per-session-loop-guard"), vec![(DecisionState::Watch, 110_000)]);
    let cleared = e.evaluate(T0 + 3600 * US + 181 * US);
    assert_eq!(states(&cleared, "per-session-loop-guard"), vec![(DecisionState::Clear, 20_000)]);
    // Staging traffic is not governed by the production rule.
    e.observe(&usage(T0, &[("session", "s2"), ("environment", "staging")], 500_000, 0), T0);
    assert!(states(&e.evaluate(T0), "per-session-loop-guard").is_empty());
}

#[test]
fn budget_alerts_fire_once_per_threshold_and_window() {
    let mut e = Engine::new(demo(), 50);
    let search = [("project", "platform-search")];
    let usd = 1_000_000_000i64;
    e.observe(&usage(T0, &search, 1, 3_199 * usd), T0);
    let out = e.evaluate(T0);
    assert!(out.alerts.is_empty());
    assert_eq!(states(&out, "platform-search-monthly"), vec![(DecisionState::Watch, 3_199 * usd)]);
    e.observe(&usage(T0 + US, &search, 1, usd), T0 + US);
    let out = e.evaluate(T0 + US);
    assert_eq!(out.alerts.iter().map(|a| a.threshold_pct).collect::<Vec<_>>(), vec![80]);
    assert_eq!(out.alerts[0].notify, vec!["slack:#ai-budget-alerts", "pagerduty:platform"]);
    assert!(out.alerts[0].summary.contains("$3,200.00 of $4,000.00"), "{}", out.alerts[0].summary);
    e.observe(&usage(T0 + 2 * US, &search, 1, usd), T0 + 2 * US);
    assert!(e.evaluate(T0 + 2 * US).alerts.is_empty(), "80% fires once");
    e.observe(&usage(T0 + 3 * US, &search, 1, 800 * usd), T0 + 3 * US);
    let out = e.evaluate(T0 + 3 * US);
    assert_eq!(
        out.alerts.iter().map(|a| (a.threshold_pct, a.severity)).collect::<Vec<_>>(),
        vec![(100, Severity::Critical)]
    );
    let d = out.decisions.iter().find(|d| d.rule_id == "platform-search-monthly").unwrap();
    assert_eq!((d.state, d.action.as_str()), (DecisionState::Breached, "fallback_to_cheaper"));
    assert_eq!(d.window_end_us, 1_796_083_200 * US, "December 1st, UTC");
    assert!(e.evaluate(T0 + 4 * US).alerts.is_empty());
    // Other projects are not in this budget.
    e.observe(&usage(T0, &[("project", "other")], 1, 5_000 * usd), T0);
    assert!(e.evaluate(T0 + 5 * US).decisions.iter().all(|d| d.scope != "X-TFY-Project=other"));
}

#[test]
fn the_user_rule_needs_a_user_key() {
    let policy = demo();
    let user_key = policy.api_keys.values().find(|k| k.id == "demo-search").unwrap().id.clone();
    let team_key = policy.api_keys.values().find(|k| k.id == "intern").unwrap().id.clone();
    let mut e = Engine::new(policy, 50);
    let mut u = usage(T0, &[("user", "u1")], 5_000_000, 0);
    u.api_key_id = Some(team_key.into());
    e.observe(&u, T0);
    assert!(states(&e.evaluate(T0), "per-user-burst").is_empty(), "a team key is not a user subject");
    u.api_key_id = Some(user_key.into());
    e.observe(&u, T0);
    let out = e.evaluate(T0);
    let d = out.decisions.iter().find(|d| d.rule_id == "per-user-burst").unwrap();
    assert_eq!((d.state, d.scope.as_str(), d.action.as_str()), (DecisionState::Breached, "user:u1", "queue_then_429"));
}

#[test]
fn a_restarted_engine_repeats_nothing_and_versions_move_forward() {
    let events: Vec<Usage> = (0..50)
        .map(|i| {
            usage(
                T0 + i * US,
                &[("project", "platform-search"), ("session", "s"), ("environment", "production")],
                10_000,
                100_000_000_000,
            )
        })
        .collect();
    let mut a = Engine::new(demo(), 50);
    let mut published = Vec::new();
    let mut alerts = Vec::new();
    for (i, u) in events.iter().enumerate() {
        a.observe(u, u.at_us);
        if i % 7 == 0 {
            let out = a.evaluate(u.at_us);
            published.extend(out.decisions);
            alerts.extend(out.alerts);
        }
    }
    let now = T0 + 60 * US;
    let out = a.evaluate(now);
    published.extend(out.decisions);
    alerts.extend(out.alerts);
    assert_eq!(alerts.len(), 2, "80% and 100% of the budget");
    let versions: Vec<i64> = published.iter().map(|d| d.version).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    // The restart: what the topics hold, then the same usage rebuilt.
    let mut b = Engine::new(demo(), 50);
    for d in &published {
        b.seed_published(d);
    }
    for a in &alerts {
        b.seed_alerted(a);
    }
    for u in &events {
        b.observe(u, now);
    }
    let again = b.evaluate(now);
    assert!(again.decisions.is_empty(), "{:?}", again.decisions);
    assert!(again.alerts.is_empty());
    b.observe(&events[0], now + US);
    let next = b.evaluate(now + US);
    assert!(next.decisions.iter().all(|d| d.version > *versions.last().unwrap()));
}

#[test]
fn a_cleared_key_is_tombstoned_once_its_window_holds_nothing_and_alert_ids_expire() {
    let mut e = Engine::new(demo(), 50);
    let prod = [("session", "s1"), ("environment", "production")];
    let key = "per-session-loop-guard/session:s1";
    e.observe(&usage(T0, &prod, 210_000, 0), T0);
    assert_eq!(states(&e.evaluate(T0), "per-session-loop-guard"), vec![(DecisionState::Breached, 210_000)]);
    assert!(e.gc(T0 + US).is_empty(), "in force: kept");
    e.observe(&usage(T0 + 1800 * US, &prod, 10_000, 0), T0 + 1800 * US);
    let cleared = e.evaluate(T0 + 3661 * US);
    assert_eq!(states(&cleared, "per-session-loop-guard"), vec![(DecisionState::Clear, 10_000)]);
    assert!(e.gc(T0 + 3661 * US).is_empty(), "cleared, but the window still counts 10,000 tokens");
    assert_eq!(e.gc(T0 + 5461 * US), vec![key.to_owned()], "nothing left in the window: tombstoned");
    assert_eq!(e.scopes(), 0);
    assert!(e.gc(T0 + 5462 * US).is_empty(), "once");
    // The key counts again later: a fresh decision, with a higher version than any before.
    e.observe(&usage(T0 + 5500 * US, &prod, 210_000, 0), T0 + 5500 * US);
    let again = e.evaluate(T0 + 5500 * US);
    assert_eq!(states(&again, "per-session-loop-guard"), vec![(DecisionState::Breached, 210_000)]);
    assert!(again.decisions[0].version > cleared.decisions[0].version);

    // Alert ids are kept one window past their window, then forgotten.
    assert!(e.first_time("loop/session:s1/0/300", T0 + 7200 * US));
    assert!(!e.first_time("loop/session:s1/0/300", T0 + 7200 * US));
    e.gc(T0 + 7200 * US);
    assert!(e.first_time("loop/session:s1/0/300", T0 + 9000 * US), "forgotten once its window passed");
}

#[test]
fn usd_formats_money() {
    assert_eq!(usd(4_000_000_000_000), "$4,000.00");
    assert_eq!(usd(1_289_000), "$0.001289", "exact: a small spend is not $0.00");
    assert_eq!(usd(12_345_678_900_000), "$12,345.6789");
}

#[test]
fn an_evaluation_looks_at_the_keys_counted_into_and_the_keys_due_only() {
    let mut e = Engine::new(demo(), 50);
    // 1,000 watched sessions (110K of 200K tokens an hour), counted in the first minute.
    for i in 0..1_000 {
        let s = format!("s{i}");
        e.observe(&usage(T0, &[("session", &s), ("environment", "production")], 110_000, 0), T0);
    }
    let first = e.evaluate(T0);
    assert_eq!(states(&first, "per-session-loop-guard").len(), 1_000);
    assert!(first.evaluated >= 1_000);
    // One more event: one key looked at, not the 1,000 in force.
    let prod = [("session", "s7"), ("environment", "production")];
    e.observe(&usage(T0 + 10 * US, &prod, 1_000, 0), T0 + 10 * US);
    let one = e.evaluate(T0 + 10 * US);
    assert_eq!(one.evaluated, 1, "s7's session key");
    assert_eq!(states(&one, "per-session-loop-guard"), vec![(DecisionState::Watch, 111_000)]);
    // A small change within a second of the last word is held back, and falls due a second on.
    e.observe(&usage(T0 + 10 * US + 500_000, &prod, 1_000, 0), T0 + 10 * US + 500_000);
    assert!(e.evaluate(T0 + 10 * US + 500_000).decisions.is_empty(), "held back");
    assert_eq!(e.evaluate(T0 + 10 * US + 900_000).evaluated, 0);
    let refreshed = e.evaluate(T0 + 11 * US);
    assert_eq!(refreshed.evaluated, 1);
    assert_eq!(states(&refreshed, "per-session-loop-guard"), vec![(DecisionState::Watch, 112_000)]);
    assert_eq!(e.evaluate(T0 + 20 * US).evaluated, 0, "nothing counted, nothing due");
    assert_eq!(e.evaluate(T0 + 2_000 * US).evaluated, 0);
    // The first minute's usage leaves the hour: every session is looked at again, and cleared.
    let lifted = e.evaluate(T0 + 3661 * US);
    assert_eq!(lifted.evaluated, 1_000);
    let cleared = states(&lifted, "per-session-loop-guard");
    assert_eq!(cleared.len(), 1_000);
    assert!(cleared.iter().all(|(s, _)| *s == DecisionState::Clear));
    assert_eq!(e.evaluate(T0 + 7200 * US).evaluated, 0, "cleared keys are not due any more");
}
