#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::Path;
use std::sync::Arc;

use super::*;

/// 2026-11-10T10:30:00Z: mid-hour.
const NOW: i64 = (1_794_268_800 + 10 * 3600 + 1800) * US;

fn demo() -> Arc<Policy> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    Arc::new(Policy::load_dir(&dir).unwrap_or_else(|e| panic!("{e}")))
}

fn sample(session: &str, workflow: &str, model: &str, version: &str) -> Sample {
    Sample {
        at_us: NOW,
        session_id: session.into(),
        workflow: workflow.into(),
        provider: "anthropic".into(),
        model: model.into(),
        model_version: version.into(),
        requests: 1,
        ..Sample::default()
    }
}

fn run(guards: &mut Guards, engine: &mut Engine, now: i64, sweep: bool) -> Output {
    let mut out = Output::default();
    guards.evaluate(engine, now, sweep, &mut out);
    out
}

#[test]
fn the_loop_guard_blocks_a_session_above_k_times_its_workflows_p95() {
    let policy = demo();
    let (mut guards, mut engine) = (Guards::new(&policy), Engine::new(Arc::clone(&policy), 50));
    guards.set_baseline(0, Baseline::from([("agent".to_owned(), (1_000, 50)), ("thin".to_owned(), (1_000, 5))]));
    let mut s = sample("loop-1", "agent", "claude-haiku-4-5", "");
    s.io_tokens = 3_000;
    guards.observe(&s, NOW);
    assert!(run(&mut guards, &mut engine, NOW, false).decisions.is_empty(), "3x is not above 3x");
    s.io_tokens = 1;
    guards.observe(&s, NOW);
    let out = run(&mut guards, &mut engine, NOW, false);
    let d = &out.decisions[0];
    assert_eq!(
        (d.rule_id.as_str(), d.scope.as_str(), d.state),
        ("session-loop-guard", "session:loop-1", DecisionState::Breached)
    );
    assert_eq!((d.observed, d.limit, d.action.as_str()), (3_001, 3_000, "hard_block"));
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(out.alerts[0].kind, AlertKind::LoopGuard);
    guards.observe(&s, NOW + US);
    let again = run(&mut guards, &mut engine, NOW + US, true);
    assert!(again.alerts.is_empty(), "once per session-hour");
    // A workflow with too few session-hours has no trusted baseline.
    let mut thin = sample("thin-1", "thin", "m", "");
    thin.io_tokens = 1_000_000;
    guards.observe(&thin, NOW);
    assert!(run(&mut guards, &mut engine, NOW, false).decisions.is_empty());
    // The next hour starts clean: the block is lifted.
    let next_hour = (NOW / HOUR_US + 1) * HOUR_US + US;
    let lifted = run(&mut guards, &mut engine, next_hour, true);
    assert_eq!(
        lifted.decisions.iter().map(|d| (d.scope.as_str(), d.state)).collect::<Vec<_>>(),
        vec![("session:loop-1", DecisionState::Clear)]
    );
}

#[test]
fn context_stuffing_alerts_once_per_window() {
    let policy = demo();
    let (mut guards, mut engine) = (Guards::new(&policy), Engine::new(Arc::clone(&policy), 50));
    let mut s = sample("s", "rag", "claude-haiku-4-5", "");
    s.prompt_tokens = 60_000;
    for _ in 0..19 {
        guards.observe(&s, NOW);
    }
    assert!(run(&mut guards, &mut engine, NOW, false).alerts.is_empty(), "19 requests are below min_requests");
    guards.observe(&s, NOW);
    let out = run(&mut guards, &mut engine, NOW, false);
    assert_eq!(out.alerts.len(), 1);
    assert_eq!(
        (out.alerts[0].observed, out.alerts[0].limit, out.alerts[0].scope.as_str()),
        (60_000, 50_000, "workflow:rag")
    );
    assert!(out.decisions.is_empty(), "the demo's stuffing guard only alerts");
    guards.observe(&s, NOW + US);
    assert!(run(&mut guards, &mut engine, NOW + US, true).alerts.is_empty());
    let mut small = sample("s", "chat", "claude-haiku-4-5", "");
    small.prompt_tokens = 2_000;
    for _ in 0..50 {
        guards.observe(&small, NOW);
    }
    assert!(run(&mut guards, &mut engine, NOW, false).alerts.is_empty());
}

#[test]
fn tokenizer_drift_compares_each_version_with_the_one_before() {
    let policy = demo();
    let (mut guards, mut engine) = (Guards::new(&policy), Engine::new(Arc::clone(&policy), 50));
    let feed = |guards: &mut Guards, version: &str, at: i64, ratio_pct: i64, n: usize| {
        for _ in 0..n {
            let mut s = sample("s", "w", "claude-opus", version);
            s.at_us = at;
            s.referenced_requests = 1;
            s.reference_tokens = 1_000;
            s.referenced_prompt_tokens = 10 * ratio_pct;
            guards.observe(&s, at);
        }
    };
    feed(&mut guards, "claude-opus-4-6", NOW - 86_400 * US, 100, 30);
    feed(&mut guards, "claude-opus-4-7", NOW, 125, 19);
    assert!(run(&mut guards, &mut engine, NOW, false).alerts.is_empty(), "too few requests on the new version");
    feed(&mut guards, "claude-opus-4-7", NOW, 125, 1);
    let out = run(&mut guards, &mut engine, NOW, false);
    assert_eq!(out.alerts.len(), 1);
    let a = &out.alerts[0];
    assert_eq!((a.kind, a.scope.as_str()), (AlertKind::TokenizerDrift, "model:anthropic/claude-opus@claude-opus-4-7"));
    assert_eq!((a.limit, a.observed), (1_000, 1_250));
    assert!(a.summary.contains("1.250") && a.summary.contains("25%"), "{}", a.summary);
    // A later version 4% above 4-7 is within the threshold.
    feed(&mut guards, "claude-opus-4-8", NOW + US, 130, 25);
    assert!(run(&mut guards, &mut engine, NOW + US, false).alerts.is_empty());
}

#[test]
fn frontier_share_alerts_per_workflow() {
    let policy = demo();
    let (mut guards, mut engine) = (Guards::new(&policy), Engine::new(Arc::clone(&policy), 50));
    let usd = 1_000_000_000;
    let mut opus = sample("s", "review", "claude-opus-4-7", "");
    opus.cost_nanos = 3 * usd;
    let mut haiku = sample("s", "review", "claude-haiku-4-5", "");
    haiku.cost_nanos = 2 * usd;
    guards.observe(&haiku, NOW);
    guards.observe(&haiku, NOW);
    guards.observe(&opus, NOW);
    assert!(run(&mut guards, &mut engine, NOW, false).alerts.is_empty(), "3 of 7 dollars is 42%");
    guards.observe(&opus, NOW);
    let out = run(&mut guards, &mut engine, NOW, false);
    assert_eq!(out.alerts.len(), 1);
    assert!(out.alerts[0].summary.contains("60%"), "{}", out.alerts[0].summary);
    guards.observe(&opus, NOW);
    assert!(run(&mut guards, &mut engine, NOW, true).alerts.is_empty(), "once per window");
}

#[test]
fn cache_tokens_are_part_of_the_input_and_counted_once() {
    // 1,000 tokens read (700 of them cache reads, 200 cache writes) and 50 written.
    let mut ev = UsageEvent::example("e1".into(), Some("s1".into()), NOW);
    ev.input_tokens = 1_000;
    ev.cached_input_tokens = 700;
    ev.cache_write_tokens = 200;
    ev.output_tokens = 50;
    ev.reference_input_tokens = Some(800);
    let s = Sample::of(&ev).unwrap();
    assert_eq!((s.prompt_tokens, s.io_tokens, s.referenced_prompt_tokens), (1_000, 1_050, 1_000));
    let u = crate::engine::Usage::of(&ev).unwrap();
    assert_eq!(u.tokens, 1_050, "a token limit counts what the provider reported, once");
    // More cache hits on the same prompt change neither figure (no false drift or stuffing).
    ev.cached_input_tokens = 950;
    ev.cache_write_tokens = 0;
    let again = Sample::of(&ev).unwrap();
    assert_eq!((again.prompt_tokens, again.io_tokens), (s.prompt_tokens, s.io_tokens));
}
