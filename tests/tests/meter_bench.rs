//! Meter benchmark (`tests/bench/meter`): sustained usage events per second from Kafka into
//! ClickHouse, and the consumer lag, against the real broker and ClickHouse.
//!
//! `meter_throughput` produces a backlog and lets the meter drain it, or, with
//! `TOLLGATE_BENCH_RATE` set, produces at that rate while the meter runs, so the lag under a
//! steady load shows. `meter_flush_steps` times each step of the meter's flush on the same
//! events, one at a time, to show where the time goes.
//!
//! Settings (environment): `TOLLGATE_BENCH_EVENTS` (300,000), `TOLLGATE_BENCH_RATE` (events/s;
//! unset: backlog), `TOLLGATE_BENCH_USERS` (200), `TOLLGATE_BENCH_SPAN_S` (event time a backlog
//! covers, 300), `TOLLGATE_BENCH_BATCH_ROWS` and `TOLLGATE_BENCH_BATCH_WAIT_MS` (the meter's
//! defaults), `TOLLGATE_BENCH_KAFKA=k=v,k=v` (librdkafka settings for the consumers),
//! `TOLLGATE_BENCH_KEEP=1` keeps the databases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::print_stdout)]

/// The meter binary's allocator, so the meter running in this process measures as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::procs::stat_cpu;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tollgate_meter::sink;
use tollgate_meter::window::Windows;
use tollgate_schemas::usage::UsageEvent;
use tollgate_store::rows::{CheckpointRow, UsageRow};
use tollgate_store::{insert_rows, tables};

const PARTITIONS: i32 = 4;

fn env<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a valid value")),
        Err(_) => default,
    }
}

struct Settings {
    events: u64,
    rate: Option<u64>,
    users: u64,
    span_s: u64,
    batch_max_rows: usize,
    batch_max_wait: Duration,
    /// librdkafka settings for the meter's consumer, from `k=v,k=v`.
    kafka_extra: Vec<(String, String)>,
}

impl Settings {
    fn from_env() -> Self {
        let defaults = tollgate_meter::Config::new(
            String::new(),
            tollgate_store::ClickHouseConfig {
                url: String::new(),
                database: String::new(),
                user: None,
                password: None,
            },
        );
        Settings {
            events: env("TOLLGATE_BENCH_EVENTS", 300_000),
            rate: std::env::var("TOLLGATE_BENCH_RATE").ok().map(|v| v.parse().expect("TOLLGATE_BENCH_RATE")),
            users: env("TOLLGATE_BENCH_USERS", 200),
            span_s: env("TOLLGATE_BENCH_SPAN_S", 300),
            batch_max_rows: env("TOLLGATE_BENCH_BATCH_ROWS", defaults.batch_max_rows),
            batch_max_wait: Duration::from_millis(env(
                "TOLLGATE_BENCH_BATCH_WAIT_MS",
                defaults.batch_max_wait.as_millis() as u64,
            )),
            kafka_extra: std::env::var("TOLLGATE_BENCH_KAFKA")
                .unwrap_or_default()
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("TOLLGATE_BENCH_KAFKA: k=v,k=v");
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
        }
    }
}

/// SplitMix64: a well-spread pseudo-random value per event index, the same every run.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const WORKFLOWS: [&str; 8] =
    ["classify", "summarize", "extract", "chat", "code-review", "translate", "rag-answer", "triage"];
const MODELS: [(&str, &str, &str); 5] = [
    ("fast", "anthropic", "claude-haiku-4-5"),
    ("smart", "anthropic", "claude-opus-4-7"),
    ("fast-oai", "openai", "gpt-4o-mini"),
    ("smart-oai", "openai", "gpt-4o"),
    ("embed", "openai", "text-embedding-3-small"),
];

/// Event `i` of an organisation of `users` people: each user is in one of 12 teams and one of
/// 36 projects (3 per team, one in three on staging), bills one of 5 cost centres, calls through
/// the project's API key, works in 2 of 8 workflows with 2 of 5 models, and has a few sessions
/// alive at a time. So about `users × 4` dimension combinations, each spread over the
/// partitions by session.
fn bench_event(i: u64, ended_us: i64, users: u64) -> UsageEvent {
    let h = mix(i);
    let u = h % users;
    let team = u % 12;
    let project = team * 3 + (u / 12) % 3;
    let (vm, provider, model) = MODELS[((u + 2 * ((h >> 40) % 2)) % 5) as usize];
    let mut ev = common::usage_event(i, ended_us);
    ev.envelope.project = Some(format!("proj-{project}"));
    ev.envelope.team = Some(format!("team-{team}"));
    ev.envelope.user_id = Some(format!("user-{u}"));
    ev.envelope.cost_center = Some(format!("cc-{}", team % 5));
    ev.envelope.environment = Some(if (u / 12) % 3 == 2 { "staging" } else { "prod" }.into());
    ev.envelope.workflow_tag = Some(WORKFLOWS[((u + (h >> 32) % 2) % 8) as usize].into());
    ev.envelope.session_id = Some(format!("sess-{u}-{}", i / 20_000 + (h >> 48) % 3));
    ev.api_key_id = Some(format!("key-proj-{project}"));
    ev.virtual_model = vm.into();
    ev.provider = provider.into();
    ev.model = model.into();
    ev
}

/// The load generator. Not idempotent, unlike `common::usage_producer`: against Tansu,
/// librdkafka's idempotent producer keeps a core busy while it waits for acks (about 23 µs of
/// CPU per event, against 3 µs without), which on two cores would be taken from the meter.
fn bench_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A Kafka record: key (the session) and Avro payload.
type Record = (String, Vec<u8>);

/// The bench's events, ended from `start_us` on, `step_us` apart, as records, and how many
/// distinct dimension combinations they hold.
fn encoded_events(n: u64, start_us: i64, step_us: f64, users: u64) -> (Vec<Record>, usize) {
    let codec = UsageEvent::codec().unwrap();
    let events: Vec<UsageEvent> =
        (0..n).map(|i| bench_event(i, start_us + (i as f64 * step_us) as i64, users)).collect();
    let combos: HashSet<_> =
        events.iter().map(|e| (&e.envelope.user_id, &e.envelope.workflow_tag, &e.model, &e.envelope.project)).collect();
    let combos = combos.len();
    let encoded = events.iter().map(|e| (e.envelope.session_id.clone().unwrap(), codec.encode(e).unwrap())).collect();
    (encoded, combos)
}

/// Produces `records` to `topic`, at `rate` events/s or as fast as the broker takes them,
/// counting acknowledged records in `acked`.
async fn produce(
    producer: FutureProducer,
    topic: String,
    records: Arc<Vec<Record>>,
    rate: Option<u64>,
    acked: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DeliveryFuture>();
    let acks = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            d.await.unwrap().map_err(|(e, _)| e).unwrap();
            acked.fetch_add(1, Ordering::Relaxed);
        }
    });
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < records.len() {
        let target = match rate {
            Some(r) => ((started.elapsed().as_secs_f64() * r as f64) as usize).min(records.len()),
            None => (sent + 10_000).min(records.len()),
        };
        while sent < target {
            let (key, payload) = &records[sent];
            let record = FutureRecord::to(&topic).key(key).payload(payload);
            match producer.send_result(record) {
                Ok(d) => {
                    tx.send(d).unwrap();
                    sent += 1;
                }
                Err((e, _)) => panic!("producing: {e}"),
            }
        }
        if rate.is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    drop(tx);
    acks.await.unwrap();
}

/// CPU seconds used so far by the processes whose command name starts with `comm`.
fn cpu_seconds(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| stat_cpu(&stat).filter(|(name, _)| name.starts_with(comm)).map(|(_, cpu)| cpu))
        .sum()
}

fn self_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(stat_cpu).map_or(0.0, |(_, cpu)| cpu)
}

#[derive(Clone, Copy)]
struct Cpu {
    clickhouse: f64,
    tansu: f64,
    this: f64,
}

impl Cpu {
    fn now() -> Self {
        Cpu { clickhouse: cpu_seconds("clickhouse"), tansu: cpu_seconds("tansu"), this: self_cpu_seconds() }
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            clickhouse: self.clickhouse - earlier.clickhouse,
            tansu: self.tansu - earlier.tansu,
            this: self.this - earlier.this,
        }
    }
}

/// Reads the checkpoints over one kept-alive connection: `common::ch` builds a client (and
/// loads the TLS roots) per call, which on two cores takes CPU from the meter it measures.
struct Probe {
    client: reqwest::Client,
    sql: String,
}

impl Probe {
    fn new(db: &str) -> Self {
        Probe {
            client: reqwest::Client::new(),
            sql: format!(
                "SELECT sum(o) FROM (SELECT max(next_offset) AS o FROM {db}.meter_checkpoints GROUP BY kafka_partition)"
            ),
        }
    }

    async fn checkpointed(&self) -> u64 {
        let resp = self.client.post(common::clickhouse_url()).body(self.sql.clone()).send().await.unwrap();
        resp.text().await.unwrap().trim().parse().unwrap_or(0)
    }
}

fn rows_inserted() -> u64 {
    common::metric(&common::metrics().render(), "tollgate_meter_rows_inserted_total")
}

fn metric_sum(name: &str) -> f64 {
    let text = common::metrics().render();
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with tests/bench/meter"]
async fn meter_throughput() {
    let s = Settings::from_env();
    let n = s.events;
    let topic = common::unique("bench");
    let db = common::unique("tollgate_bench");
    common::create_topic(&topic, PARTITIONS).await;

    // Event time: a backlog covers the last `span_s` seconds; a steady load is stamped as it goes.
    let (start_us, step_us) = match s.rate {
        None => (now_us() - (s.span_s as i64) * 1_000_000, s.span_s as f64 * 1e6 / n as f64),
        Some(r) => (now_us(), 1e6 / r as f64),
    };
    let t = Instant::now();
    let (records, combos) = encoded_events(n, start_us, step_us, s.users);
    let records = Arc::new(records);
    println!(
        "meter bench: {n} events, {} users, {combos} dimension combinations, {PARTITIONS} partitions, \
         event time {:.0} s ({} events/s of event time); generated in {:.1?}",
        s.users,
        n as f64 * step_us / 1e6,
        (1e6 / step_us).round(),
        t.elapsed()
    );
    println!("meter batch settings: batch_max_rows = {}, batch_max_wait = {:?}", s.batch_max_rows, s.batch_max_wait);

    let producer = bench_producer();
    let acked = Arc::new(AtomicU64::new(0));
    let mut producing = None;
    match s.rate {
        None => {
            let t = Instant::now();
            produce(producer, topic.clone(), Arc::clone(&records), None, Arc::clone(&acked)).await;
            let secs = t.elapsed().as_secs_f64();
            println!("backlog produced in {secs:.1} s ({:.0} events/s into Kafka)", n as f64 / secs);
        }
        Some(r) => {
            println!("producing at {r} events/s while the meter runs");
            producing =
                Some(tokio::spawn(produce(producer, topic.clone(), Arc::clone(&records), s.rate, Arc::clone(&acked))));
        }
    }

    let mut config = common::meter_config(&topic, &db);
    config.batch_max_rows = s.batch_max_rows;
    config.batch_max_wait = s.batch_max_wait;
    config.kafka_extra.clone_from(&s.kafka_extra);
    let base_rows = rows_inserted();
    let base_insert_s = metric_sum("tollgate_meter_insert_seconds_sum");
    let base_batches = metric_sum("tollgate_meter_insert_seconds_count");
    let probe = Probe::new(&db);
    let cpu0 = Cpu::now();
    let started = Instant::now();
    let meter = common::start_meter(config).await;

    println!(
        "\n{:>8}  {:>9}  {:>9}  {:>12}  {:>9}  {:>10}  {:>10}",
        "elapsed", "produced", "written", "checkpointed", "lag", "rate/s", "rate/s 2s"
    );
    let mut history: Vec<(Instant, u64)> = vec![(started, 0)];
    let mut first: Option<(Instant, u64)> = None;
    let mut peak_lag = 0u64;
    let mut lag_sum = 0u64;
    let mut lag_samples = 0u64;
    let mut produced_all_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut printed = (started, 0u64);
    let deadline = started + Duration::from_secs(600 + n / 1_000);
    let done_at = loop {
        tick.tick().await;
        let now = Instant::now();
        assert!(now < deadline, "the meter did not finish within {:?}", deadline - started);
        let done = rows_inserted() - base_rows;
        let produced = acked.load(Ordering::Relaxed);
        if produced >= n && produced_all_at.is_none() {
            produced_all_at = Some(now);
        }
        if done > 0 && first.is_none() {
            first = Some((now, done));
        }
        if done >= n {
            break now;
        }
        if now.duration_since(printed.0) >= Duration::from_millis(500) {
            let checkpointed = probe.checkpointed().await;
            let lag = produced.saturating_sub(checkpointed);
            peak_lag = peak_lag.max(lag);
            if first.is_some() {
                lag_sum += lag;
                lag_samples += 1;
            }
            let rate = checkpointed.saturating_sub(printed.1) as f64 / now.duration_since(printed.0).as_secs_f64();
            // Batches land in steps, so the last half second alone swings between 0 and peaks.
            let (t2, d2) = history
                .iter()
                .rev()
                .find(|(t, _)| now.duration_since(*t) >= Duration::from_secs(2))
                .unwrap_or(&history[0]);
            let rate2 = checkpointed.saturating_sub(*d2) as f64 / now.duration_since(*t2).as_secs_f64();
            history.push((now, checkpointed));
            println!(
                "{:>7.1}s  {produced:>9}  {done:>9}  {checkpointed:>12}  {lag:>9}  {rate:>10.0}  {rate2:>10.0}",
                now.duration_since(started).as_secs_f64()
            );
            printed = (now, checkpointed);
        }
    };
    // The checkpoint follows the last window insert; wait for it so the figure is end to end.
    let checkpointed_at = loop {
        if probe.checkpointed().await >= n {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = Cpu::now().since(cpu0);
    meter.stop().await;
    if let Some(p) = producing {
        p.await.unwrap();
    }
    let (first_at, first_done) = first.unwrap();
    let at = |i: Instant| i.duration_since(started).as_secs_f64();
    println!(
        "{:>7.1}s  {:>9}  {n:>9}  {n:>12}  {:>9}  (all written at {:.2} s)",
        at(checkpointed_at),
        acked.load(Ordering::Relaxed),
        0,
        at(done_at)
    );

    let sustained = (n - first_done) as f64 / checkpointed_at.duration_since(first_at).as_secs_f64();
    let batches = metric_sum("tollgate_meter_insert_seconds_count") - base_batches;
    let flush_s = metric_sum("tollgate_meter_insert_seconds_sum") - base_insert_s;
    let window_rows = common::ch_count(&format!("SELECT count() FROM {db}.usage_windows")).await;
    let window_final = common::ch_count(&format!("SELECT count() FROM {db}.usage_windows FINAL")).await;
    let session_rows = common::ch_count(&format!("SELECT count() FROM {db}.session_hours")).await;
    println!("\nresults ({} mode)", if s.rate.is_some() { "steady load" } else { "backlog" });
    println!(
        "  sustained: {sustained:.0} events/s (first rows at {:.2} s, last checkpoint at {:.2} s)",
        at(first_at),
        at(checkpointed_at)
    );
    println!(
        "  from meter start: {:.0} events/s over {:.2} s (includes migrations and the first batch)",
        n as f64 / at(checkpointed_at),
        at(checkpointed_at)
    );
    if let Some(r) = s.rate {
        let drained = produced_all_at.map(|p| checkpointed_at.saturating_duration_since(p));
        let producing_s = produced_all_at.map_or(0.0, |p| p.duration_since(started).as_secs_f64());
        println!(
            "  producer: {n} events acked in {producing_s:.1} s ({:.0} events/s; asked for {r}/s)",
            n as f64 / producing_s
        );
        println!(
            "  lag at {r} events/s: peak {peak_lag} events ({:.2} s), mean {:.0} events; caught up {:.2?} after the last event was produced",
            peak_lag as f64 / r as f64,
            lag_sum as f64 / lag_samples.max(1) as f64,
            drained.unwrap_or_default()
        );
    } else {
        println!("  peak lag: {peak_lag} events (the whole backlog at start)");
    }
    println!(
        "  batches: {batches:.0}, mean {:.0} rows, mean flush {:.0} ms (raw + windows + sessions), {:.0}% of the run in flush",
        n as f64 / batches.max(1.0),
        1000.0 * flush_s / batches.max(1.0),
        100.0 * flush_s / checkpointed_at.duration_since(first_at).as_secs_f64()
    );
    println!(
        "  window rows written: {window_rows} ({:.2} per event; {window_final} after FINAL); session-hour rows: {session_rows}",
        window_rows as f64 / n as f64
    );
    println!(
        "  CPU seconds during the run: meter+test process {:.1}, clickhouse {:.1}, tansu {:.1} ({} cores)",
        cpu.this,
        cpu.clickhouse,
        cpu.tansu,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    // In backlog mode the producer is done before the meter starts, so this process's CPU is
    // the meter's (and the probe's few queries).
    println!(
        "  meter CPU per event: {:.1} µs{}",
        cpu.this * 1e6 / n as f64,
        if s.rate.is_some() { " (includes the producer: steady load)" } else { "" }
    );
    println!(
        "  meter batch settings: batch_max_rows = {}, batch_max_wait = {:?}; consumer settings {:?}",
        s.batch_max_rows, s.batch_max_wait, s.kafka_extra
    );

    assert_eq!(
        common::ch_count(&format!("SELECT count() FROM {db}.usage_events FINAL")).await,
        n,
        "exactly every event once"
    );
    common::assert_windows_match_raw(&db).await;
    if std::env::var("TOLLGATE_BENCH_KEEP").is_err() {
        common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
    } else {
        println!("  kept database {db} (topic {topic})");
    }
}

/// Time spent in one step, over every batch.
#[derive(Default)]
struct Step {
    total: Duration,
    rows: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with tests/bench/meter"]
async fn meter_flush_steps() {
    let s = Settings::from_env();
    let n = s.events;
    let topic = common::unique("bench_steps");
    let db = common::unique("tollgate_bench_steps");
    common::create_topic(&topic, PARTITIONS).await;
    let step_us = s.span_s as f64 * 1e6 / n as f64;
    let (records, combos) = encoded_events(n, now_us() - (s.span_s as i64) * 1_000_000, step_us, s.users);
    let records = Arc::new(records);
    println!(
        "\nflush steps: {n} events, {combos} dimension combinations, batches of {} rows, each step alone",
        s.batch_max_rows
    );
    let mut steps: BTreeMap<&'static str, Step> = BTreeMap::new();
    let mut record = |name: &'static str, d: Duration, rows: usize| {
        let e = steps.entry(name).or_default();
        e.total += d;
        e.rows += rows as u64;
    };

    let t = Instant::now();
    produce(bench_producer(), topic.clone(), Arc::clone(&records), None, Arc::new(AtomicU64::new(0))).await;
    record("0 produce to kafka (test side)", t.elapsed(), n as usize);

    // Kafka alone: the same consumer settings as the meter, reading every partition.
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", common::kafka_brokers())
        .set("group.id", format!("{db}_steps"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in &s.kafka_extra {
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut messages = Vec::with_capacity(n as usize);
    let t = Instant::now();
    while (messages.len() as u64) < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("kafka stalled").unwrap();
        messages.push((m.partition(), m.offset(), m.payload().unwrap().to_vec()));
    }
    record("1 kafka fetch", t.elapsed(), messages.len());

    let codec = UsageEvent::codec().unwrap();
    let t = Instant::now();
    let rows: Vec<UsageRow> =
        messages.iter().map(|(p, o, payload)| UsageRow::new(codec.decode(payload).unwrap(), &topic, *p, *o)).collect();
    record("2 avro decode + row", t.elapsed(), rows.len());

    let mut config = common::meter_config(&topic, &db);
    config.batch_max_rows = s.batch_max_rows;
    let ch = config.clickhouse.client();
    tollgate_store::migrate::apply(&config.clickhouse.server_client(), &db).await.unwrap();
    let mut windows = Windows::default();
    let mut batches = 0;
    let mut window_rows = 0;
    for batch in rows.chunks(s.batch_max_rows) {
        batches += 1;
        let t = Instant::now();
        sink::insert(&ch, batch).await.unwrap();
        record("3 insert raw rows", t.elapsed(), batch.len());

        let t = Instant::now();
        let prepared = windows.batch(batch);
        let missing = windows.missing(&prepared);
        record("4 windows: intern and group, find missing", t.elapsed(), batch.len());
        if !missing.is_empty() {
            let t = Instant::now();
            let (w, ss) = sink::load_windows(&ch, &missing).await.unwrap();
            let loaded = w.len() + ss.len();
            record("5 windows: read from clickhouse", t.elapsed(), batch.len());
            let t = Instant::now();
            windows.load(w, ss);
            record("6 windows: load into memory", t.elapsed(), loaded);
        }
        let t = Instant::now();
        windows.apply(&prepared);
        record("7 windows: apply", t.elapsed(), batch.len());
        let t = Instant::now();
        let (w, ss) = windows.dirty();
        record("8 windows: dirty rows", t.elapsed(), w.len() + ss.len());
        window_rows += w.len();
        let t = Instant::now();
        insert_rows(&ch, tables::USAGE_WINDOWS, &w).await.unwrap();
        record("9 insert window rows", t.elapsed(), w.len());
        let t = Instant::now();
        insert_rows(&ch, tables::SESSION_HOURS, &ss).await.unwrap();
        record("10 insert session rows", t.elapsed(), ss.len());
        windows.written();

        let mut last: BTreeMap<i32, i64> = BTreeMap::new();
        for r in batch {
            last.insert(r.kafka_partition, r.kafka_offset);
        }
        let marks: Vec<CheckpointRow> = last
            .iter()
            .map(|(p, o)| CheckpointRow { topic: topic.clone(), kafka_partition: *p, next_offset: (*o + 1) as u64 })
            .collect();
        let t = Instant::now();
        insert_rows(&ch, tables::METER_CHECKPOINTS, &marks).await.unwrap();
        record("11 insert checkpoint", t.elapsed(), marks.len());
    }

    let pipeline: Duration = steps.iter().filter(|(k, _)| !k.starts_with('0')).map(|(_, v)| v.total).sum();
    println!("{:<34}  {:>9}  {:>10}  {:>14}  {:>6}", "step", "total", "rows", "events/s alone", "share");
    let mut ordered: Vec<_> = steps.iter().collect();
    ordered.sort_by_key(|(k, _)| k.split(' ').next().and_then(|i| i.parse::<u32>().ok()).unwrap_or(0));
    for (name, step) in ordered {
        let share = if name.starts_with('0') {
            String::from("-")
        } else {
            format!("{:.0}%", 100.0 * step.total.as_secs_f64() / pipeline.as_secs_f64())
        };
        println!(
            "{name:<34}  {:>8.2}s  {:>10}  {:>14.0}  {share:>6}",
            step.total.as_secs_f64(),
            step.rows,
            n as f64 / step.total.as_secs_f64()
        );
    }
    println!(
        "meter pipeline (steps 1-11, one after another): {:.2} s, {:.0} events/s; {batches} batches, {:.2} window rows per event",
        pipeline.as_secs_f64(),
        n as f64 / pipeline.as_secs_f64(),
        window_rows as f64 / n as f64
    );
    if std::env::var("TOLLGATE_BENCH_KEEP").is_err() {
        common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
    }
}
