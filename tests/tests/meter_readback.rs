//! The meter reads back only the rollup rows a batch touches. After 2,000 sessions of one hour,
//! each of its own user, a batch with a new session and user of the same hour reads back no row
//! (none exists yet) instead of the hour's 2,000 session-hours and windows; a meter started
//! afresh that meets one known session reads back exactly that session-hour and its four windows
//! (minute, hour, day, month). The rollups equal the raw events throughout. Real broker and
//! ClickHouse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tollgate_schemas::usage::UsageEvent;

/// Event `i` of the hour that starts at `hour_us`: session `s-{i}`, user `u-{i}`.
fn event(i: u64, hour_us: i64) -> UsageEvent {
    let mut ev = usage_event(i, hour_us + i64::try_from(i).unwrap() * 1_000_000);
    ev.event_id = format!("00000000-0000-7000-8000-{i:012}");
    ev.envelope.session_id = Some(format!("s-{i}"));
    ev.envelope.user_id = Some(format!("u-{i}"));
    ev
}

/// (window rows, session rows) read back so far by every meter of this process.
fn read_back() -> (u64, u64) {
    let m = metrics().render();
    let by_table = |t: &str| {
        m.lines()
            .filter(|l| l.starts_with("tollgate_meter_rows_read_back_total{") && l.contains(&format!("table=\"{t}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    (by_table("usage_windows"), by_table("session_hours"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_reads_back_only_the_rollup_rows_it_touches() {
    let t = topics("readback").await;
    // 2026-11-10 10:00 UTC: a whole hour of room for the events' seconds.
    let hour_us = 1_794_304_800 * 1_000_000;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    produce_usage(&t.usage, &(0..2_000).map(|i| event(i, hour_us)).collect::<Vec<_>>()).await;
    meter_finished(&t.db, &t.usage).await;
    let before = read_back();

    // A new session and user of the same hour: nothing of it is in ClickHouse, nothing is read.
    produce_usage(&t.usage, &[event(2_000, hour_us)]).await;
    meter_finished(&t.db, &t.usage).await;
    let after_new = read_back();
    assert_eq!(after_new, before, "a new key reads back nothing (it was every row of its hour and partition)");
    meter.stop().await;

    // A meter with empty memory meets a known session again: exactly its own rows come back.
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let mut again = event(7, hour_us);
    again.event_id = "00000000-0000-7000-8000-000000009999".into();
    produce_usage(&t.usage, &[again]).await;
    meter_finished(&t.db, &t.usage).await;
    let (windows, sessions) = read_back();
    assert_eq!(
        (windows - after_new.0, sessions - after_new.1),
        (4, 1),
        "its minute, hour, day and month windows and its session-hour"
    );
    assert_windows_match_raw(&t.db).await;
    meter.stop().await;
}
