//! ClickHouse goes away under the meter for several seconds, mid-stream, while more events
//! arrive: the meter stops consuming, retries with backoff, and once ClickHouse is back holds
//! exactly every event once, with every rollup window equal to the sums of its raw events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::forwarder::{Forwarder, upstream};

fn metric(name: &str) -> u64 {
    common::metric(&common::metrics().render(), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clickhouse_outage_loses_and_doubles_nothing() {
    const BEFORE: u64 = 30_000;
    const DURING: u64 = 6_000;
    let total = BEFORE + DURING;
    let topic = common::unique("outage");
    let db = common::unique("tollgate_outage");
    common::create_topic(&topic, 4).await;
    let evs = common::usage_events(total);
    common::produce_usage(&topic, &evs[..BEFORE as usize]).await;

    let forwarder = Forwarder::start(upstream()).await;
    let mut config = common::meter_config(&topic, &db);
    config.clickhouse.url = format!("http://{}", forwarder.addr);
    // Small batches, so the outage finds most of the stream still to write.
    config.batch_max_rows = 2_000;
    let meter = common::start_meter(config).await;

    let raw_sql = format!("SELECT count() FROM {db}.usage_events");
    let landed = common::eventually(Duration::from_secs(60), || async {
        // The table does not exist until the meter has migrated the database.
        common::ch_count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'usage_events'"
        ))
        .await
            == 1
            && common::ch_count(&raw_sql).await > 0
    })
    .await;
    assert!(landed, "no row reached ClickHouse within 60 s");

    forwarder.off();
    let errors_before = metric("tollgate_meter_insert_errors_total");
    let off_at = Instant::now();
    eprintln!("clickhouse off with {} raw rows written", common::ch_count(&raw_sql).await);
    common::produce_usage(&topic, &evs[BEFORE as usize..]).await;
    eprintln!("{DURING} more events produced while clickhouse is off");

    // Whatever was in flight when the switch went off has settled after a second; from then on
    // nothing is written, and nothing more is read from Kafka than the one batch that waits.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(off_at.elapsed())).await;
    let rows_stalled = common::ch_count(&raw_sql).await;
    let consumed_stalled = metric("tollgate_meter_events_consumed_total");
    assert!(rows_stalled < total, "the outage came after the meter had written everything");
    // The outage lasts until the meter has failed and retried several times (and at least 5 s);
    // how long that takes depends on the machine, so it is waited for, not timed.
    let retried = common::eventually(Duration::from_secs(180), || async {
        metric("tollgate_meter_insert_errors_total") - errors_before >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(off_at.elapsed())).await;
    let retries = metric("tollgate_meter_insert_errors_total") - errors_before;
    eprintln!("clickhouse back after {:?}: {retries} failed calls retried", off_at.elapsed());
    assert!(retried, "expected several retries during the outage, saw {retries}");
    assert_eq!(common::ch_count(&raw_sql).await, rows_stalled, "rows written while clickhouse was off");
    assert_eq!(
        metric("tollgate_meter_events_consumed_total"),
        consumed_stalled,
        "the meter kept consuming while it could not write"
    );
    forwarder.on();

    let caught_up = common::until_at_least(total, Duration::from_secs(120), || common::checkpointed(&db)).await.is_ok();
    assert!(caught_up, "the meter did not catch up after the outage: {} of {total}", common::checkpointed(&db).await);
    meter.stop().await;

    assert_eq!(
        common::ch_count(&format!("SELECT count() FROM {db}.usage_events FINAL")).await,
        total,
        "exactly every event once"
    );
    assert_eq!(common::checkpointed(&db).await, total, "checkpoints end at the last offset of each partition");
    let want_cost: i64 = evs.iter().map(|e| e.cost_nanos).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        want_cost.to_string()
    );
    // The events produced while ClickHouse was away are all there.
    let during_ids =
        format!("SELECT count() FROM {db}.usage_events FINAL WHERE event_id >= '{}'", evs[BEFORE as usize].event_id);
    assert_eq!(common::ch_count(&during_ids).await, DURING);
    common::assert_windows_match_raw(&db).await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
