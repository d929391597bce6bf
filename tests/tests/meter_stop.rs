//! A meter stopped while ClickHouse is away: its last write at shutdown gives up after
//! `final_flush_timeout` instead of retrying forever, and the next start writes those events,
//! each once. (Its own test binary: the consumed-events counter is this meter's alone.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::forwarder::{Forwarder, upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_stopped_while_clickhouse_is_away_stops_and_loses_nothing() {
    const N: u64 = 200;
    let topic = common::unique("meter_stop");
    let db = common::unique("tollgate_meter_stop");
    common::create_topic(&topic, 1).await;
    let forwarder = Forwarder::start(upstream()).await;
    let mut config = common::meter_config(&topic, &db);
    config.clickhouse.url = format!("http://{}", forwarder.addr);
    // The batch waits: it is still in memory when the meter is told to stop.
    config.batch_max_rows = 1_000_000;
    config.batch_max_wait = Duration::from_secs(3600);
    config.final_flush_timeout = Duration::from_secs(2);
    let meter = common::start_meter(config).await;
    let migrated = common::eventually(Duration::from_secs(60), || async {
        common::ch_count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'meter_checkpoints'"
        ))
        .await
            == 1
    })
    .await;
    assert!(migrated, "the meter migrated its database");
    let evs = common::usage_events(N);
    common::produce_usage(&topic, &evs).await;
    let read = common::until_at_least(N, Duration::from_secs(60), || async {
        common::metric(&common::metrics().render(), "tollgate_meter_events_consumed_total")
    })
    .await;
    assert!(read.is_ok(), "the meter read the events: {read:?}");

    forwarder.off();
    let stopping = Instant::now();
    // Before the fix the last write retried forever and this did not return.
    meter.stop().await;
    eprintln!("stopped {:?} after the stop was asked, clickhouse away", stopping.elapsed());
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await, 0);

    forwarder.on();
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let caught_up = common::until_at_least(N, Duration::from_secs(60), || common::checkpointed(&db)).await;
    assert!(caught_up.is_ok(), "the next start wrote the batch: {caught_up:?}");
    meter.stop().await;
    assert_eq!(
        common::ch(&format!("SELECT count(), uniqExact(event_id) FROM {db}.usage_events")).await.trim(),
        format!("{N}\t{N}"),
        "every event once, no duplicate"
    );
    common::assert_windows_match_raw(&db).await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
