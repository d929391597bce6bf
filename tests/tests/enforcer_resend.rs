//! Re-sent usage events count once in the enforcer's windows whenever they come back: after the
//! enforcer has forgotten their ids (the meter recorded them), and after an enforcer restart,
//! when the first copies are known only from ClickHouse. Its own binary: the test reads the
//! enforcer's counters from the process-wide metrics registry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use tollgate_schemas::decision::DecisionState;
use tollgate_schemas::usage::{Envelope, UsageEvent};

const KEY: &str = "per-session-loop-guard/session:resend-1";

fn session() -> Envelope {
    Envelope {
        project: Some("platform-search".into()),
        session_id: Some("resend-1".into()),
        environment: Some("production".into()),
        workflow_tag: Some("agent".into()),
        ..Default::default()
    }
}

/// 1,000 tokens, ended now.
fn event() -> UsageEvent {
    UsageEvent {
        input_tokens: 800,
        output_tokens: 200,
        envelope: session(),
        ..UsageEvent::example(uuid::Uuid::now_v7().to_string(), None, now_us())
    }
}

fn counter(name: &str) -> u64 {
    metric(&metrics().render(), name)
}

/// Waits until `name` has risen by `by` from `from`.
async fn risen(name: &str, from: u64, by: u64) {
    let reached = until_at_least(from + by, Duration::from_secs(60), || async { counter(name) }).await;
    assert!(reached.is_ok(), "{name} stalled at {reached:?}, expected {}", from + by);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_sent_events_count_once_after_the_enforcer_forgot_them_and_after_a_restart() {
    // The enforcers' log, shown when the test fails (RUST_LOG overrides).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tollgate_enforcer=debug,tollgate_meter=info")),
        )
        .with_test_writer()
        .try_init();
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let t = topics("enf_resend").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let mut config = enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db);
    // Forget an id as soon as the meter has recorded it, instead of after ten minutes.
    config.seen_min_age = Duration::ZERO;
    let enforcer = start_enforcer(config.clone()).await;
    let log = DecisionLog::follow(&t.breaches);

    let first: Vec<UsageEvent> = (0..120).map(|_| event()).collect();
    produce_usage(&t.usage, &first).await;
    log.wait_for(KEY, |d| d.observed == 120_000).await;
    // The meter records them; the enforcer then forgets their ids.
    risen("tollgate_enforcer_seen_ids_forgotten_total", 0, 120).await;

    // Copies of 20 of them, as an ingress re-sends after an outage: old `ended_at_us`, new
    // offsets. They are doubtful, wait for the meter, and are found in event_positions.
    let duplicates = |m: &str| {
        metric(m, "tollgate_enforcer_doubtful_events_total{outcome=\"duplicate\"}")
            + metric(m, "tollgate_enforcer_duplicate_events_total")
    };
    // Waits until `n` more copies than `before` were set aside as duplicates.
    let found = |before: u64, n: u64| async move {
        let reached =
            until_at_least(before + n, Duration::from_secs(60), || async { duplicates(&metrics().render()) }).await;
        assert_eq!(reached, Ok(before + n), "each copy is found to be one");
    };
    let before = duplicates(&metrics().render());
    produce_usage(&t.usage, &first[..20]).await;
    found(before, 20).await;
    produce_usage(&t.usage, &[event()]).await;
    let d = log.wait_for(KEY, |d| d.observed >= 121_000).await;
    assert_eq!((d.state, d.observed), (DecisionState::Watch, 121_000), "the copies added nothing");

    // A restart: the first copies are known only from ClickHouse (the rebuild). The meter is
    // stopped first, so the next copies are in Kafka only when the enforcer starts: they are
    // doubtful, and wait until the meter is back and has passed them.
    assert_eq!(until_at_least(141, Duration::from_secs(60), || checkpointed(&t.db)).await, Ok(141));
    enforcer.stop().await;
    meter.stop().await;
    produce_usage(&t.usage, &first[20..40]).await;
    let before = duplicates(&metrics().render());
    let enforcer = start_enforcer(config).await;
    // Each copy waits for the meter, but the first: it lies at the meter's checkpoint, every
    // offset below it is recorded, so a settling pass that comes before the others are read
    // finds it a duplicate at once.
    let waiting = || metric(&metrics().render(), "tollgate_enforcer_doubtful_waiting");
    let accounted = || async move {
        let m = metrics().render();
        metric(&m, "tollgate_enforcer_doubtful_waiting") + duplicates(&m) - before
    };
    let waited = until_at_least(20, Duration::from_secs(60), accounted).await;
    assert!(
        waited.is_ok_and(|n| n >= 20) && waiting() >= 19,
        "waiting for the meter: {waited:?}, {} waiting; metrics:\n{}",
        waiting(),
        metrics().render()
    );
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    found(before, 20).await;
    produce_usage(&t.usage, &[event()]).await;
    let d = log.wait_for(KEY, |d| d.observed >= 122_000).await;
    assert_eq!((d.state, d.observed), (DecisionState::Watch, 122_000), "nor after a restart");
    assert_eq!(counter("tollgate_enforcer_doubtful_events_total{outcome=\"unverified\"}"), 0);

    // The meter counted every copy once too.
    assert_eq!(until_at_least(162, Duration::from_secs(60), || checkpointed(&t.db)).await, Ok(162));
    assert_windows_match_raw(&t.db).await;
    enforcer.stop().await;
    meter.stop().await;
    drop(log);
    mock.stop().await;
}
