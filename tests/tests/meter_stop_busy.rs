//! A meter stopped while ClickHouse is away and the topic keeps it busy: its writer holds one
//! batch (retrying), one more waits for it, and the consume loop waits to hand over a third.
//! Stopping still ends it (the hand-over gives way to the shutdown, the writer to
//! `final_flush_timeout`), and the next start writes every event once. (Its own test binary:
//! the consumed-events counter is this meter's alone.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::forwarder::{Forwarder, upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_meter_stops_while_clickhouse_is_away_and_loses_nothing() {
    const N: u64 = 400;
    let topic = common::unique("meter_stop_busy");
    let db = common::unique("tollgate_meter_stop_busy");
    common::create_topic(&topic, 1).await;
    let forwarder = Forwarder::start(upstream()).await;
    let mut config = common::meter_config(&topic, &db);
    config.clickhouse.url = format!("http://{}", forwarder.addr);
    config.batch_max_rows = 50;
    config.final_flush_timeout = Duration::from_secs(2);
    let meter = common::start_meter(config).await;
    // The meter is consuming (it read its checkpoints and wrote a first batch)…
    let all = common::usage_events(N);
    common::produce_usage(&topic, &all[..10]).await;
    let started = common::until_at_least(10, Duration::from_secs(60), || common::checkpointed(&db)).await;
    assert!(started.is_ok(), "the meter wrote the first events: {started:?}");
    // …when ClickHouse goes away and the topic keeps coming.
    forwarder.off();
    common::produce_usage(&topic, &all[10..]).await;
    // Two batches with the writer, a third read: the loop now waits to hand it over.
    let read = common::until_at_least(160, Duration::from_secs(60), || async {
        common::metric(&common::metrics().render(), "tollgate_meter_events_consumed_total")
    })
    .await;
    assert!(read.is_ok(), "the meter read three more batches: {read:?}");

    // Before the hand-over gave way to the shutdown, this never returned.
    let stopped = tokio::time::timeout(Duration::from_secs(60), meter.stop()).await;
    assert!(stopped.is_ok(), "the meter stopped");
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await, 10);

    forwarder.on();
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let caught_up = common::until_at_least(N, Duration::from_secs(60), || common::checkpointed(&db)).await;
    assert!(caught_up.is_ok(), "the next start wrote every batch: {caught_up:?}");
    meter.stop().await;
    assert_eq!(
        common::ch(&format!("SELECT count(), uniqExact(event_id) FROM {db}.usage_events")).await.trim(),
        format!("{N}\t{N}"),
        "every event once, no duplicate"
    );
    common::assert_windows_match_raw(&db).await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
