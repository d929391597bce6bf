//! The meter killed with SIGKILL at random points of a 200,000-event run, several times, and
//! restarted: ClickHouse ends with exactly every event once, and every rollup window equals
//! the sum of its raw events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use rand::Rng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let n: u64 = std::env::var("TOLLGATE_CRASH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let topic = common::unique("crash");
    let db = common::unique("tollgate_crash");
    common::create_topic(&topic, 4).await;
    let evs = common::usage_events(n);
    let t = Instant::now();
    common::produce_usage(&topic, &evs).await;
    eprintln!("produced {n} events in {:?}", t.elapsed());

    let bin = common::binary("tollgate-meter", "tollgate-meter");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("meter.log");
    let count_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < 4 {
        let mut child = common::procs::start_meter_process(&bin, &common::kafka_brokers(), &topic, &db, &log);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..6000))).await;
        let seen = common::ch(&format!("SELECT count() FROM {db}.usage_events")).await;
        // SIGKILL: no flush, no shutdown, whatever step the meter was in.
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        eprintln!("kill {kills}: {} raw rows before the kill", seen.trim());
    }
    let mut child = common::procs::start_meter_process(&bin, &common::kafka_brokers(), &topic, &db, &log);
    // The checkpoint's sum is the meter's progress: wait while it moves (the machine may be busy).
    let done = common::until_at_least(n, Duration::from_secs(120), || common::checkpointed(&db)).await.is_ok();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done, "the meter did not catch up; log: {}", std::fs::read_to_string(&log).unwrap_or_default());

    assert_eq!(common::ch_count(&count_sql).await, n, "exactly every event once");
    let want_cost: i64 = evs.iter().map(|e| e.cost_nanos).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        want_cost.to_string()
    );

    common::assert_windows_match_raw(&db).await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
