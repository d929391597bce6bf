//! State keyed by what callers choose shrinks back once its window passes: a session breached
//! under a 3-second limit is cleared, then tombstoned on the compacted breaches topic, and the
//! ingress's decision cache and its own counts drop it (their gauges go back to zero), on the
//! real broker and ClickHouse.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use tollgate_schemas::decision::DecisionState;

const RULES: &str = "name: short\ntype: gateway-rate-limit-config\nrules:\n  - id: short-window\n    when: {metadata: {X-TFY-Project: short}}\n    limit: {requests: 2, window: 3s, scope: session}\n    on_breach: hard_block\n";

async fn ask(client: &reqwest::Client, gw: SocketAddr, session: &str) -> u16 {
    client
        .post(format!("http://{gw}/v1/chat/completions"))
        .header("X-TFY-Project", "short")
        .header("X-TFY-Session-ID", session)
        .json(&json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scope_whose_window_passed_is_tombstoned_and_forgotten() {
    let metrics = metrics();
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), mock.addr);
    std::fs::write(dir.path().join("short.yaml"), RULES).unwrap();
    let t = topics("tombstones").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;
    let mut ec = enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db);
    ec.gc_every = Duration::from_secs(1);
    let enforcer = start_enforcer(ec).await;
    let spool = tempfile::tempdir().unwrap();
    let mut config = ingress_config(dir.path(), &kafka_brokers(), &t.usage, spool.path());
    config.breaches_topic = t.breaches.clone();
    let ingress = start_ingress_with(config).await;
    let log = DecisionLog::follow(&t.breaches);
    let client = reqwest::Client::new();
    let gw = ingress.addr;

    assert_eq!(ask(&client, gw, "s1").await, 200);
    assert_eq!(ask(&client, gw, "s1").await, 200);
    assert_eq!(ask(&client, gw, "s1").await, 429, "the ingress's own count stops the third at once");
    let key = "short-window/session:s1";
    log.wait_for(key, |d| d.state == DecisionState::Breached).await;
    let gauges = || {
        let m = metrics.render();
        (metric(&m, "tollgate_ingress_decisions_cached"), metric(&m, "tollgate_ingress_own_counts"))
    };
    // The ingress's follower applies it (it may already have been tombstoned on a slow machine).
    let held =
        eventually(Duration::from_secs(60), || async { gauges().0 >= 1 || log.tombstones().iter().any(|k| k == key) })
            .await;
    assert!(held, "the ingress never held the breach");

    // The window passes: the enforcer clears the key, then tombstones it once nothing is left.
    log.wait_for(key, |d| d.state == DecisionState::Clear).await;
    let tombstoned = eventually(Duration::from_secs(60), || async { log.tombstones().iter().any(|k| k == key) }).await;
    assert!(tombstoned, "no tombstone for {key}; decisions: {:?}", log.all());
    assert!(metric(&metrics.render(), "tollgate_enforcer_tombstones_total") >= 1);
    let forgotten = eventually(Duration::from_secs(60), || async { gauges() == (0, 0) }).await;
    assert!(forgotten, "the ingress still holds (decisions, own counts) = {:?}", gauges());
    // And the session starts afresh.
    assert_eq!(ask(&client, gw, "s1").await, 200);

    ingress.stop().await;
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}
