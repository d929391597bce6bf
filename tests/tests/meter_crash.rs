//! The meter killed with SIGKILL at random points of a 200,000-event run, several times, and
//! restarted: ClickHouse ends with exactly every event once, and every rollup window equals
//! the sum of its raw events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tollgate_schemas::usage::{ApiFormat, Envelope, Status, TokenSource, UsageEvent};

fn events(n: u64) -> Vec<UsageEvent> {
    // 2026-10-20 00:00 UTC onwards, one event every 13 s: about 30 days, across a month end.
    let base_us: i64 = 1_792_454_400 * 1_000_000;
    (0..n)
        .map(|i| {
            let ended = base_us + (i as i64) * 13_000_000;
            let tokens = 100 + (i * 7919 % 5000) as i64;
            UsageEvent {
                event_id: format!("00000000-0000-7000-8000-{i:012}"),
                started_at_us: ended - 400_000,
                first_token_at_us: None,
                ended_at_us: ended,
                envelope: Envelope {
                    project: Some(["search", "support", "intern-sandbox"][(i % 3) as usize].into()),
                    team: Some(["data", "platform"][(i % 2) as usize].into()),
                    session_id: Some(format!("sess-{}", i % 500)),
                    workflow_tag: Some(["classify", "summarize"][(i % 2) as usize].into()),
                    ..Default::default()
                },
                api_key_id: None,
                api_format: ApiFormat::OpenAi,
                virtual_model: "vm".into(),
                provider: "anthropic".into(),
                model: ["claude-haiku-4-5", "claude-opus-4-7"][(i % 4 == 0) as usize].into(),
                model_version: None,
                attempt: 1,
                fallback_path: vec![],
                status: if i % 17 == 0 { Status::ProviderError } else { Status::Ok },
                http_status: 200,
                error: None,
                streamed: i % 2 == 0,
                input_tokens: tokens,
                output_tokens: tokens / 5,
                cached_input_tokens: tokens / 10,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
                reference_input_tokens: Some(tokens),
                input_chars: tokens * 4,
                token_source: TokenSource::Provider,
                cost_nanos: tokens * 1000 + (tokens / 5) * 5000,
                price_card_version: "v".into(),
                decision: None,
            }
        })
        .collect()
}

async fn produce(topic: &str, events: &[UsageEvent]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let codec = UsageEvent::codec().unwrap();
    for chunk in events.chunks(20_000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for ev in chunk {
            let payload = codec.encode(ev).unwrap();
            let key = ev.envelope.session_id.clone().unwrap();
            let record = FutureRecord::to(topic).key(&key).payload(&payload);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for d in pending {
            d.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
}

fn start_meter(bin: &std::path::Path, topic: &str, db: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(bin)
        .args(["run", "--clickhouse-url", &common::clickhouse_url(), "--database", db])
        .args(["--kafka-brokers", &common::kafka_brokers(), "--usage-topic", topic, "--group-id", db])
        .args(["--listen", "127.0.0.1:0", "--batch-max-rows", "7000", "--batch-max-wait-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

const GROUPS: &str = "project, team, user_id, cost_center, workflow_tag, environment, api_key_id, virtual_model, provider, model, model_version";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let n: u64 = std::env::var("TOLLGATE_CRASH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let topic = common::unique("crash");
    let db = common::unique("tollgate_crash");
    common::create_topic(&topic, 4).await;
    let evs = events(n);
    let t = Instant::now();
    produce(&topic, &evs).await;
    eprintln!("produced {n} events in {:?}", t.elapsed());

    let bin = common::binary("tollgate-meter", "tollgate-meter");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("meter.log");
    let count_sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < 4 {
        let mut child = start_meter(&bin, &topic, &db, &log);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..6000))).await;
        let seen = common::ch(&format!("SELECT count() FROM {db}.usage_events")).await;
        // SIGKILL: no flush, no shutdown, whatever step the meter was in.
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        eprintln!("kill {kills}: {} raw rows before the kill", seen.trim());
    }
    let mut child = start_meter(&bin, &topic, &db, &log);
    let done = common::eventually(Duration::from_secs(300), || async {
        let next: u64 = common::ch(&format!(
            "SELECT sum(o) FROM (SELECT max(next_offset) AS o FROM {db}.meter_checkpoints GROUP BY kafka_partition)"
        ))
        .await
        .trim()
        .parse()
        .unwrap_or(0);
        next >= n
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done, "the meter did not catch up; log: {}", std::fs::read_to_string(&log).unwrap_or_default());

    assert_eq!(common::ch_count(&count_sql).await, n, "exactly every event once");
    let want_cost: i64 = evs.iter().map(|e| e.cost_nanos).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        want_cost.to_string()
    );

    for (granularity, start) in [
        ("minute", "toStartOfMinute(ended_at)"),
        ("hour", "toStartOfHour(ended_at)"),
        ("day", "toStartOfDay(ended_at)"),
        ("month", "toDateTime(toStartOfMonth(ended_at))"),
    ] {
        let from_windows = common::ch(&format!(
            "SELECT window_start, {GROUPS}, sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), \
             sum(cached_input_tokens), sum(cost_nanos), sum(latency_us_sum) FROM {db}.usage_windows FINAL \
             WHERE granularity = '{granularity}' GROUP BY window_start, {GROUPS} ORDER BY window_start, {GROUPS} FORMAT TabSeparated"
        ))
        .await;
        let from_raw = common::ch(&format!(
            "SELECT {start} AS w, {GROUPS}, count(), sum(status != 'ok'), sum(input_tokens), sum(output_tokens), \
             sum(cached_input_tokens), sum(cost_nanos), sum(ended_at_us - started_at_us) FROM {db}.usage_events FINAL \
             GROUP BY w, {GROUPS} ORDER BY w, {GROUPS} FORMAT TabSeparated"
        ))
        .await;
        assert!(!from_raw.is_empty());
        assert_eq!(from_windows.lines().count(), from_raw.lines().count(), "{granularity}: number of windows");
        assert!(from_windows == from_raw, "{granularity} windows differ from the sums of their raw events");
    }
    let sessions = common::ch(&format!(
        "SELECT sum(requests), sum(input_tokens), sum(cost_nanos) FROM {db}.session_hours FINAL FORMAT TabSeparated"
    ))
    .await;
    let raw = common::ch(&format!(
        "SELECT count(), sum(input_tokens), sum(cost_nanos) FROM {db}.usage_events FINAL FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(sessions, raw, "session hours add up to the raw events");
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
