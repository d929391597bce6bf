//! The scale benchmark (run by `tests/bench/scale`, ignored in the normal test run). Prints:
//!
//! 1. the meter binary's events/s over `TOLLGATE_SCALE_EVENTS` events (default 1,000,000)
//!    spread over 500,000 sessions and 50,000 users, against the same number over 100 sessions;
//! 2. the RSS of the ingress, enforcer and meter binaries after `TOLLGATE_SCALE_REQUESTS`
//!    requests (default 200,000) through the ingress, each a session of its own among 500,000
//!    and a user among 50,000, under one-minute session and user limits, and again once those
//!    windows have passed (the enforcer's scopes and the ingress's own counts back to 0);
//! 3. the time of the chargeback `--by team --month` over `TOLLGATE_SCALE_REPORT_EVENTS` events
//!    (default 10,000,000, written by SQL) read from the month rollups, against the raw
//!    `usage_events FINAL` scan, and that both give the same rows.
//!
//! Asserts only that the figures were obtained.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::procs::{
    IngressProcess, KillOnDrop, free_port, rss_kib, scrape, start_enforcer_process, start_meter_process,
};
use common::*;
use serde_json::json;
use tollgate_meter::report::{Dimension, Period, Reporter, Source};
use tollgate_meter::window::Granularity;
use tollgate_schemas::usage::UsageEvent;
use tollgate_store::ClickHouseConfig;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Event `i` of `n` over `sessions` sessions and `users` users, one hour from 2026-11-10 10:00.
fn event(i: u64, n: u64, sessions: u64, users: u64) -> UsageEvent {
    let base_us = 1_794_304_800 * 1_000_000;
    let mut ev = usage_event(i, base_us + i64::try_from(i * 3_600_000_000 / n.max(1)).unwrap());
    ev.envelope.session_id = Some(format!("s-{}", i % sessions));
    ev.envelope.user_id = Some(format!("u-{}", i % users));
    ev
}

/// Produces `n` events over `sessions` sessions to a fresh topic, then times the meter binary
/// from its start until its checkpoints reach the topic's end. Returns events/s and the meter's
/// RSS at the end.
async fn meter_rate(n: u64, sessions: u64, users: u64) -> (f64, u64) {
    let t = topics(&format!("scale_meter_{sessions}")).await;
    let events: Vec<UsageEvent> = (0..n).map(|i| event(i, n, sessions, users)).collect();
    produce_usage(&t.usage, &events).await;
    drop(events);
    let logs = tempfile::tempdir().unwrap();
    let bin = binary("tollgate-meter", "tollgate-meter");
    let started = Instant::now();
    let mut meter = start_meter_process(&bin, &kafka_brokers(), &t.usage, &t.db, &logs.path().join("meter.log"));
    meter_finished(&t.db, &t.usage).await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = rss_kib(meter.id());
    meter.kill().unwrap();
    meter.wait().unwrap();
    (n as f64 / seconds, rss)
}

const RULES: &str = "name: scale\ntype: gateway-rate-limit-config\nrules:\n  - id: scale-session\n    limit: {tokens: 1000000, window: 1m, scope: session}\n    on_breach: hard_block\n  - id: scale-user\n    limit: {requests: 100000, window: 1m, scope: user}\n    on_breach: hard_block\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run by tests/bench/scale"]
async fn scale() {
    let n = env_u64("TOLLGATE_SCALE_EVENTS", 1_000_000);
    let requests = env_u64("TOLLGATE_SCALE_REQUESTS", 200_000);
    let report_events = env_u64("TOLLGATE_SCALE_REPORT_EVENTS", 10_000_000);
    let (sessions, users) = (500_000, 50_000);

    // 1. The meter's rate, many sessions against few.
    let (few, few_rss) = meter_rate(n, 100, 100).await;
    let (many, many_rss) = meter_rate(n, sessions, users).await;
    println!(
        "meter: {n} events over 100 sessions: {few:.0} events/s (RSS {}); over {sessions} sessions and {users} users: {many:.0} events/s (RSS {})",
        mib(few_rss),
        mib(many_rss)
    );

    // 2. The stack's memory under many sessions, and after their windows passed.
    let mock = start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    write_policy(policy.path(), mock.addr);
    std::fs::write(policy.path().join("scale.yaml"), RULES).unwrap();
    let t = topics("scale_stack").await;
    let logs = tempfile::tempdir().unwrap();
    let meter_bin = binary("tollgate-meter", "tollgate-meter");
    let mut meter = start_meter_process(&meter_bin, &kafka_brokers(), &t.usage, &t.db, &logs.path().join("meter.log"));
    let enforcer_addr = format!("127.0.0.1:{}", free_port());
    let mut enforcer = start_enforcer_process(policy.path(), &t, &enforcer_addr, &logs.path().join("enforcer.log"));
    let spool = tempfile::tempdir().unwrap();
    let mut ingress = IngressProcess::start_with(
        policy.path(),
        &kafka_brokers(),
        &t.usage,
        spool.path(),
        logs.path().join("ingress.log"),
        &["--breaches-topic", &t.breaches],
    )
    .await;
    let gw = ingress.addr;
    let rss = |ingress: &IngressProcess, enforcer: &KillOnDrop, meter: &KillOnDrop| {
        (rss_kib(ingress.pid().unwrap()), rss_kib(enforcer.id()), rss_kib(meter.id()))
    };
    let at_start = rss(&ingress, &enforcer, &meter);
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (next, answered, client) = (next.clone(), answered.clone(), client.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let resp = client
                        .post(format!("http://{gw}/v1/chat/completions"))
                        .header("X-TFY-Project", "scale")
                        .header("X-TFY-Session-ID", format!("s-{}", i % sessions))
                        .header("X-TFY-User-ID", format!("u-{}", i % users))
                        .json(&json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi\n#mock prompt_tokens=20 completion_tokens=5"}]}))
                        .send()
                        .await;
                    if resp.is_ok_and(|r| r.status().is_success()) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let load_s = started.elapsed().as_secs_f64();
    meter_finished(&t.db, &t.usage).await;
    let end = topic_end(&kafka_brokers(), &t.usage).await;
    let consumed = until_at_least(end, Duration::from_secs(60), || {
        let addr = enforcer_addr.clone();
        async move { scrape(&addr, "tollgate_enforcer_events_total").await }
    })
    .await;
    let after_load = rss(&ingress, &enforcer, &meter);
    let ingress_metrics = ingress.metrics().await;
    println!(
        "stack: {requests} requests ({} answered) in {load_s:.1} s ({:.0}/s), {} sessions, {} users; enforcer read {consumed:?} of {end} events; own counts held {}, evicted {}",
        answered.load(Ordering::Relaxed),
        requests as f64 / load_s,
        requests.min(sessions),
        requests.min(users),
        metric(&ingress_metrics, "tollgate_ingress_own_counts"),
        metric(&ingress_metrics, "tollgate_ingress_own_counts_evicted_total"),
    );
    // The one-minute windows pass; the enforcer forgets its scopes (gc every 30 s), the ingress
    // its own counts (swept every second) and the decisions tombstoned.
    let quiet_started = Instant::now();
    let forgotten = eventually(Duration::from_secs(300), || {
        let (addr, gw) = (enforcer_addr.clone(), gw);
        async move {
            scrape(&addr, "tollgate_enforcer_scopes").await == 0
                && scrape(&gw.to_string(), "tollgate_ingress_own_counts").await == 0
        }
    })
    .await;
    let after_windows = rss(&ingress, &enforcer, &meter);
    println!(
        "RSS (ingress, enforcer, meter): at start {} / {} / {}; after the load {} / {} / {}; {:.0} s later, the windows passed ({}): {} / {} / {}",
        mib(at_start.0),
        mib(at_start.1),
        mib(at_start.2),
        mib(after_load.0),
        mib(after_load.1),
        mib(after_load.2),
        quiet_started.elapsed().as_secs_f64(),
        if forgotten { "enforcer scopes and ingress own counts at 0" } else { "NOT all forgotten within 300 s" },
        mib(after_windows.0),
        mib(after_windows.1),
        mib(after_windows.2),
    );
    ingress.terminate().await;
    enforcer.kill().unwrap();
    enforcer.wait().unwrap();
    meter.kill().unwrap();
    meter.wait().unwrap();
    mock.stop().await;

    // 3. The month's chargeback by team over many events: rollups against the raw scan.
    let db = unique("tollgate_scale_report");
    let cfg = ClickHouseConfig { url: clickhouse_url(), database: db.clone(), user: None, password: None };
    tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap();
    let nov = 1_793_491_200u64; // 2026-11-01T00:00:00Z
    let write = Instant::now();
    ch(&format!(
        "INSERT INTO {db}.usage_events (event_id, started_at, started_at_us, ended_at, ended_at_us, project, team, \
         user_id, session_id, workflow_tag, provider, model, status, input_tokens, output_tokens, cost_nanos, \
         kafka_topic, kafka_partition, kafka_offset) \
         SELECT concat('ev-', toString(number)) AS id, toDateTime({nov} + intDiv(number * 2592000, {report_events})) AS t, \
           toInt64(toUInt32(t)) * 1000000, t, toInt64(toUInt32(t)) * 1000000, concat('p-', toString(number % 20)), \
           concat('team-', toString(number % 50)), concat('u-', toString(number % 50000)), \
           concat('s-', toString(number % 500000)), 'wf', 'anthropic', 'claude-haiku-4-5', 'ok', \
           toInt64(100 + number % 900), toInt64(10 + number % 90), toInt64(1000 + number % 100000), 't', \
           toInt32(number % 4), toInt64(intDiv(number, 4)) \
         FROM system.numbers LIMIT {report_events}"
    ))
    .await;
    // The month windows as the meter keeps them: per partition, absolute totals.
    ch(&format!(
        "INSERT INTO {db}.usage_windows (granularity, window_start, project, team, user_id, cost_center, workflow_tag, \
         environment, api_key_id, virtual_model, provider, model, model_version, kafka_partition, requests, errors, \
         input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, cost_nanos, \
         latency_us_sum, version) \
         SELECT 'month', toDateTime(toStartOfMonth(ended_at)) AS w, project, team, user_id, cost_center, workflow_tag, \
           environment, api_key_id, virtual_model, provider, model, model_version, kafka_partition, toInt64(count()), \
           toInt64(countIf(status != 'ok')), sum(input_tokens), sum(output_tokens), sum(cached_input_tokens), \
           sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_nanos), sum(ended_at_us - started_at_us), \
           toUInt64(max(kafka_offset)) \
         FROM {db}.usage_events GROUP BY w, project, team, user_id, cost_center, workflow_tag, environment, api_key_id, \
           virtual_model, provider, model, model_version, kafka_partition"
    ))
    .await;
    let written_s = write.elapsed().as_secs_f64();
    let reporter = Reporter::new(&cfg).unwrap();
    let month = Period::month("2026-11").unwrap();
    let time = |source: Source| {
        let reporter = &reporter;
        async move {
            let mut best = f64::MAX;
            let mut rows = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                rows = reporter.chargeback_from(&[Dimension::Team], &month, source).await.unwrap();
                best = best.min(t0.elapsed().as_secs_f64());
            }
            (best, rows)
        }
    };
    let (rollup_s, from_rollups) = time(Source::Rollups(Granularity::Month)).await;
    let (raw_s, from_raw) = time(Source::Raw).await;
    let window_rows: u64 = ch(&format!("SELECT count() FROM {db}.usage_windows")).await.trim().parse().unwrap();
    println!(
        "report --by team --month 2026-11 over {report_events} events ({window_rows} month-window rows; written in {written_s:.0} s): rollups {:.3} s, raw FINAL scan {:.3} s (best of 3); {} teams, same rows: {}",
        rollup_s,
        raw_s,
        from_rollups.len(),
        from_rollups == from_raw
    );
    assert_eq!(from_rollups, from_raw);
    ch(&format!("DROP DATABASE {db}")).await;
}
