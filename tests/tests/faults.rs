//! The ingress, the broker and the meter each killed with SIGKILL while requests flow, one after
//! the other, each restarted: every request a client got an answer to has its row, every rollup
//! (minute, hour, day and month windows, session-hours) equals the sums of the raw table, and
//! duplicates are counted explicitly — raw copies of an event (a re-send after the ingress's
//! kill, a redelivery after the broker's or the meter's) against the distinct event ids, which
//! is what each rollup's request sum must equal.
//!
//! Its own Tansu broker (so it can be killed without touching the shared one), the ingress and
//! meter binaries as processes, the shared ClickHouse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::procs::{Broker, IngressProcess, start_meter_process};
use common::*;
use tokio_util::sync::CancellationToken;

/// Load from `workers` clients until `stop`: request `i` is session `sess-{i}`; answered ones
/// are recorded. A request the dead ingress refused is not retried (a fresh one follows).
fn load(
    addr: Arc<Mutex<SocketAddr>>,
    answered: Arc<Mutex<BTreeSet<u64>>>,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    (0..6)
        .map(|_| {
            let (addr, answered, stop, next, client) =
                (addr.clone(), answered.clone(), stop.clone(), next.clone(), client.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let gw = *addr.lock().unwrap();
                    match chat(&client, gw, i).await {
                        Ok(()) => {
                            answered.lock().unwrap().insert(i);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect()
}

/// Waits until `more` further requests have been answered.
async fn answered_more(answered: &Mutex<BTreeSet<u64>>, more: u64) {
    let target = answered.lock().unwrap().len() as u64 + more;
    let r = until_at_least(target, Duration::from_secs(60), || async { answered.lock().unwrap().len() as u64 }).await;
    assert!(r.is_ok(), "load stalled at {r:?} of {target} answered requests");
}

async fn figure(sql: &str) -> u64 {
    ch(sql).await.trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_ingress_the_broker_and_the_meter_loses_and_doubles_nothing() {
    let mock = start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    write_policy(policy.path(), mock.addr);
    let logs = tempfile::tempdir().unwrap();
    let mut broker = Broker::new();
    broker.start().await;
    let brokers = broker.addr();
    let topic = unique("faults_usage");
    create_topic_on(&brokers, &topic, 4).await;
    let db = unique("tollgate_faults");
    let meter_bin = binary("tollgate-meter", "tollgate-meter");
    let meter_log = logs.path().join("meter.log");
    let mut meter = start_meter_process(&meter_bin, &brokers, &topic, &db, &meter_log);
    let spool = tempfile::tempdir().unwrap();
    let start_ingress = |run: u32| {
        IngressProcess::start(
            policy.path(),
            &brokers,
            &topic,
            spool.path(),
            logs.path().join(format!("ingress-{run}.log")),
        )
    };
    let mut ingress = start_ingress(1).await;
    let addr = Arc::new(Mutex::new(ingress.addr));
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = CancellationToken::new();
    let workers = load(addr.clone(), answered.clone(), stop.clone());

    // 1. The ingress, mid-load: what it spooled is sent by the next run.
    answered_more(&answered, 300).await;
    ingress.kill_9();
    ingress = start_ingress(2).await;
    *addr.lock().unwrap() = ingress.addr;
    // 2. The broker: the ingress keeps answering into its spool, the meter waits.
    answered_more(&answered, 300).await;
    broker.kill();
    answered_more(&answered, 200).await;
    broker.start().await;
    // 3. The meter, mid-batch: it resumes from its checkpoints.
    answered_more(&answered, 300).await;
    meter.kill().unwrap();
    meter.wait().unwrap();
    answered_more(&answered, 100).await;
    meter = start_meter_process(&meter_bin, &brokers, &topic, &db, &meter_log);
    answered_more(&answered, 300).await;

    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    ingress.terminate().await;
    meter_finished_on(&brokers, &db, &topic).await;

    // Every answered request has its row: `ok`, or `interrupted` for one whose answer was out but
    // whose event had not reached the spool at the ingress's kill (its attempt was journaled at
    // the start, and the next run recorded it; see tests/tests/ingress_kill.rs).
    let answered: BTreeSet<u64> = std::mem::take(&mut *answered.lock().unwrap());
    let interrupted =
        figure(&format!("SELECT count() FROM {db}.usage_events FINAL WHERE status = 'interrupted'")).await;
    let ok_sessions: BTreeSet<u64> =
        ch(&format!("SELECT DISTINCT session_id FROM {db}.usage_events FINAL WHERE status IN ('ok', 'interrupted') FORMAT TabSeparated"))
            .await
            .lines()
            .filter_map(|s| s.strip_prefix("sess-")?.parse().ok())
            .collect();
    let missing: Vec<&u64> = answered.difference(&ok_sessions).take(10).collect();
    assert!(missing.is_empty(), "answered requests without a row, e.g. {missing:?} (of {})", answered.len());

    // Every rollup equals its raw events; duplicates counted, and counted once.
    assert_windows_match_raw(&db).await;
    let copies = figure(&format!("SELECT count() FROM {db}.usage_events")).await;
    let events = figure(&format!("SELECT uniqExact(event_id) FROM {db}.usage_events")).await;
    let final_rows = figure(&format!("SELECT count() FROM {db}.usage_events FINAL")).await;
    let day_requests =
        figure(&format!("SELECT sum(requests) FROM {db}.usage_windows FINAL WHERE granularity = 'day'")).await;
    let session_requests = figure(&format!("SELECT sum(requests) FROM {db}.session_hours FINAL")).await;
    let positions = figure(&format!("SELECT count() FROM {db}.event_positions")).await;
    eprintln!(
        "{} requests answered ({interrupted} rows interrupted by the ingress's kill); {events} distinct events, {copies} raw copies ({} duplicates collapsed by FINAL), {positions} positions read by the meter",
        answered.len(),
        copies - events
    );
    assert_eq!(final_rows, events, "FINAL leaves one row per event id");
    assert_eq!(day_requests, events, "day windows count each event once");
    assert_eq!(session_requests, events, "session-hours count each event once");

    meter.kill().unwrap();
    meter.wait().unwrap();
    mock.stop().await;
}
