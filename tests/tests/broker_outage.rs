//! The Kafka broker dies in the middle of a run: every request is still answered, and once the
//! broker is back ClickHouse holds exactly one row per request.
//!
//! This binary runs its own Tansu broker (a free loopback port, its own SQLite file) so it can
//! SIGKILL and restart it without touching the shared one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use common::procs::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_broker_mid_run_loses_no_usage_event() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut broker = Broker::new();
    broker.start().await;
    let brokers = broker.addr();
    let topic = common::unique("usage_outage");
    let db = common::unique("tollgate_outage");
    common::create_topic_on(&brokers, &topic, 3).await;

    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    let spool = tempfile::tempdir().unwrap();
    let ingress =
        common::start_ingress_with(common::ingress_config(policy.path(), &brokers, &topic, spool.path())).await;
    let mut meter_config = common::meter_config(&topic, &db);
    meter_config.brokers = brokers.clone();
    let meter = common::start_meter(meter_config).await;

    // 300 requests, 8 at a time, one started every 150 ms (45 s): the broker is SIGKILLed at
    // request 80 and restarted at request 230, a 22 s outage, well past the producer's 10 s
    // message timeout (librdkafka reported the first timeouts ~14 s after the kill), so
    // deliveries fail and are sent again from the spool.
    const N: u64 = 300;
    const PACE: Duration = Duration::from_millis(150);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let answered = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now();
    let load = {
        let answered = Arc::clone(&answered);
        let addr = ingress.addr;
        tokio::spawn(async move {
            futures::stream::iter(0..N)
                .map(|i| {
                    let client = client.clone();
                    let answered = Arc::clone(&answered);
                    async move {
                        tokio::time::sleep_until(t0 + PACE * i as u32).await;
                        let r = common::chat(&client, addr, i).await;
                        answered.fetch_add(1, Ordering::Relaxed);
                        r
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<Result<(), String>>>()
                .await
        })
    };
    tokio::time::sleep_until(t0 + PACE * 80).await;
    broker.kill();
    let killed_at = Instant::now();
    let answered_at_kill = answered.load(Ordering::Relaxed);
    tokio::time::sleep_until(t0 + PACE * 230).await;
    let answered_before_restart = answered.load(Ordering::Relaxed);
    broker.start().await;
    let outage = killed_at.elapsed();
    let results = load.await.unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of {N} requests failed: {failures:#?}", failures.len());
    eprintln!(
        "broker killed after {answered_at_kill} answers, back after {answered_before_restart} (outage {:.1} s); all {N} answered 200",
        outage.as_secs_f64()
    );

    let rows_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    let rows = common::chat_rows(N);
    let waited = Instant::now();
    let arrived = common::until_at_least(rows, Duration::from_secs(120), || common::ch_count(&rows_sql)).await.is_ok();
    let m = common::metrics().render();
    assert!(
        arrived,
        "only {} of {rows} rows reached ClickHouse after the broker came back; ingress metrics:\n{}",
        common::ch_count(&rows_sql).await,
        m.lines()
            .filter(|l| l.starts_with("tollgate_ingress_e") || l.starts_with("tollgate_ingress_s"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("all rows in ClickHouse {:.1} s after the load ended", waited.elapsed().as_secs_f64());
    // Nothing more arrives later: with the ingress stopped and the meter through the whole
    // topic, one row per attempt, each once.
    ingress.stop().await;
    common::meter_finished_on(&brokers, &db, &topic).await;
    assert_eq!(common::ch_count(&rows_sql).await, rows, "rows with FINAL");
    assert_eq!(
        common::ch_count(&format!("SELECT uniqExact(session_id) FROM {db}.usage_events FINAL")).await,
        N,
        "one row per request"
    );
    let (input, output): (u64, u64) =
        (0..N).map(|i| (common::chat_case(i).2, common::chat_case(i).3)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(
        common::ch(&format!("SELECT sum(input_tokens), sum(output_tokens) FROM {db}.usage_events FINAL")).await.trim(),
        format!("{input}\t{output}"),
        "token totals are the mock's"
    );
    let raw = common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await;

    let m = common::metrics().render();
    let spooled = common::metric(&m, "tollgate_ingress_events_spooled_total");
    let resent = common::metric(&m, "tollgate_ingress_events_resent_total");
    let failed = common::metric(&m, "tollgate_ingress_delivery_failures_total");
    let published = common::metric(&m, "tollgate_ingress_events_published_total");
    let dropped = common::metric(&m, "tollgate_ingress_events_dropped_total");
    eprintln!(
        "spooled {spooled}, delivery failures {failed}, resent {resent}, acknowledged {published}, dropped {dropped}; \
         raw rows before merges {raw} (duplicates collapse on event_id)"
    );
    assert_eq!(spooled, rows, "every event went through the spool");
    assert!(failed > 0, "deliveries failed during the outage");
    assert!(resent > 0, "events were sent again from the spool");
    assert_eq!(dropped, 0, "nothing dropped");

    meter.stop().await;
    mock.stop().await;
    assert_eq!(common::ch_count(&rows_sql).await, rows, "still one row per attempt after shutdown");
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
