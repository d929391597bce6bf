//! Harness for end-to-end tests: the real Kafka-API broker and ClickHouse (started by
//! `compose/local/infra.sh`), each test on its own topic and database, services in-process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod forwarder;
pub mod procs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::usage::{Envelope, Status, UsageEvent};
use tollgate_tests::mock::{self, MockOptions};

pub fn kafka_brokers() -> String {
    std::env::var("TOLLGATE_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("TOLLGATE_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A name no other run uses: `<prefix>_<pid>_<uuid-v7 tail>`.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}_{}", std::process::id(), &id[id.len() - 12..])
}

/// One metrics recorder per test process, shared by every in-process service.
pub fn metrics() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| PrometheusBuilder::new().install_recorder().expect("metrics recorder")).clone()
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&kafka_brokers(), name, partitions).await;
}

/// Creates a topic through the Kafka admin API of the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let res = admin
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach the Kafka broker at {brokers}: {e} (is compose/local/infra.sh running?)")
        });
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Runs SQL on the real ClickHouse over HTTP: whether it succeeded, and the answer.
async fn ch_answer(sql: &str) -> (bool, String) {
    let resp = reqwest::Client::new()
        .post(clickhouse_url())
        .body(sql.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("cannot reach ClickHouse at {}: {e}", clickhouse_url()));
    let ok = resp.status().is_success();
    (ok, resp.text().await.unwrap())
}

/// Runs SQL on the real ClickHouse over HTTP and returns the TSV answer.
pub async fn ch(sql: &str) -> String {
    let (ok, text) = ch_answer(sql).await;
    assert!(ok, "ClickHouse refused {sql}: {text}");
    text
}

/// A count; 0 while the database or table does not exist yet (the meter creates them when it
/// starts, which a loaded machine may not have done by a test's first look).
pub async fn ch_count(sql: &str) -> u64 {
    let (ok, text) = ch_answer(sql).await;
    if !ok && (text.contains("Code: 81,") || text.contains("Code: 60,")) {
        return 0;
    }
    assert!(ok, "ClickHouse refused {sql}: {text}");
    text.trim().parse().unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Polls until `f` returns true or the deadline passes; returns whether it did.
pub async fn eventually<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f().await
}

/// Polls `progress` until it reaches `target`; fails (returns the last figure) only when the
/// figure has not moved for `stall`. For tests that push volume through a service on a shared,
/// possibly busy machine: they wait as long as the work advances, however slowly, and no longer.
pub async fn until_at_least<F, Fut>(target: u64, stall: Duration, mut progress: F) -> Result<u64, u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut last = progress().await;
    let mut moved = Instant::now();
    loop {
        if last >= target {
            return Ok(last);
        }
        if moved.elapsed() >= stall {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = progress().await;
        if now != last {
            moved = Instant::now();
            last = now;
        }
    }
}

/// Waits until `sql` (a count) reaches `n`, as long as the count keeps moving (see
/// `until_at_least`); panics with the figure reached when it stopped for `stall`.
pub async fn wait_for_count(sql: &str, n: u64, stall: Duration) -> u64 {
    until_at_least(n, stall, || ch_count(sql))
        .await
        .unwrap_or_else(|got| panic!("{sql}: {got} of {n}, and no progress for {stall:?}"))
}

/// Work the in-process services of this test binary have done so far (events the enforcers
/// evaluated and the meters read, rows written): a figure that moves while anything advances.
pub fn services_progress() -> u64 {
    let text = metrics().render();
    ["tollgate_enforcer_events_total", "tollgate_meter_events_consumed_total", "tollgate_meter_rows_inserted_total"]
        .iter()
        .map(|name| metric(&text, name))
        .sum()
}

pub struct Service {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    /// A directory the service owns (the ingress's spool), removed after it stops.
    pub temp: Option<tempfile::TempDir>,
}

impl Service {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("service stops within 60 s")
            .expect("service task")
            .expect("service result");
    }
}

pub async fn start_mock() -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        mock::serve(listener, MockOptions::default(), token).await?;
        Ok(())
    });
    Service { addr, shutdown, task, temp: None }
}

/// The ingress on the shared broker, with its own spool directory (a fresh tempdir).
pub async fn start_ingress(policy_dir: &Path, topic: &str) -> Service {
    let spool = tempfile::tempdir().unwrap();
    let config = ingress_config(policy_dir, &kafka_brokers(), topic, spool.path());
    let mut service = start_ingress_with(config).await;
    service.temp = Some(spool);
    service
}

/// The test settings of an ingress: quick shutdown, short idle timeout, the shared metrics.
pub fn ingress_config(policy_dir: &Path, brokers: &str, topic: &str, spool_dir: &Path) -> tollgate_ingress::Config {
    let mut config = tollgate_ingress::Config::new(
        policy_dir.to_path_buf(),
        tollgate_ingress::KafkaConfig { brokers: brokers.into(), usage_topic: topic.into(), extra: vec![] },
    );
    config.metrics = Some(metrics());
    config.shutdown_grace = Duration::from_secs(5);
    config.upstream_idle_timeout = Duration::from_secs(3);
    config.spool_dir = spool_dir.to_path_buf();
    config
}

pub async fn start_ingress_with(config: tollgate_ingress::Config) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tollgate_ingress::run(config, listener, shutdown.clone()));
    Service { addr, shutdown, task, temp: None }
}

pub fn meter_config(topic: &str, database: &str) -> tollgate_meter::Config {
    let mut config = tollgate_meter::Config::new(
        kafka_brokers(),
        tollgate_store::ClickHouseConfig {
            url: clickhouse_url(),
            database: database.into(),
            user: None,
            password: None,
        },
    );
    config.usage_topic = topic.into();
    config.dead_letter_topic = format!("{topic}.dlq");
    config.group_id = format!("{database}_meter");
    config.batch_max_wait = Duration::from_millis(200);
    config.metrics = Some(metrics());
    // The shared broker's default breaches and alerts topics are no test's business.
    config.history = None;
    config.outcomes_topic = None;
    config
}

pub async fn start_meter(config: tollgate_meter::Config) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tollgate_meter::run(config, listener, shutdown.clone()));
    Service { addr, shutdown, task, temp: None }
}

/// Writes a policy for tests: an OpenAI-kind and an Anthropic-kind provider on the mock, a
/// provider nobody listens on (`dead`), three virtual models and their prices, and an anonymous
/// gateway (`allow_anonymous: true`).
pub fn write_policy(dir: &Path, mock: SocketAddr) -> PathBuf {
    let base = format!("http://{mock}/v1");
    let files = [
        (
            "providers.yaml",
            format!(
                "type: tollgate-providers\nproviders:\n  - {{name: openai-mock, kind: openai, base_url: \"{base}\"}}\n  - {{name: anthropic-mock, kind: anthropic, base_url: \"{base}\"}}\n  - {{name: dead, kind: openai, base_url: \"http://127.0.0.1:1/v1\"}}\n"
            ),
        ),
        (
            "prices.yaml",
            "type: tollgate-price-card\nversion: test-1\nprices:\n  - {provider: openai-mock, model: gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60, cached_read_usd_per_mtok: 0.075}\n  - {provider: anthropic-mock, model: claude-haiku-4-5, input_usd_per_mtok: 1.00, output_usd_per_mtok: 5.00, cached_read_usd_per_mtok: 0.10, cache_write_usd_per_mtok: 1.25}\n  - {provider: dead, model: gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60}\n".into(),
        ),
        (
            "models.yaml",
            "name: vm-openai\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: a, priority: 1, target: {provider: openai-mock, model: gpt-4o-mini}, timeout_ms: 5000}\n---\nname: vm-anthropic\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: a, priority: 1, target: {provider: anthropic-mock, model: claude-haiku-4-5}, timeout_ms: 5000}\n---\nname: vm-fallback\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: a, priority: 1, target: {provider: dead, model: gpt-4o-mini}, timeout_ms: 2000}\nfallbacks:\n  - {provider: anthropic-mock, model: claude-haiku-4-5}\n".into(),
        ),
        ("envelope.yaml", "type: tollgate-envelope\nrequired: [project, session_id]\n".into()),
        // An anonymous gateway, so tests about other things need no key; `write_api_keys`
        // replaces this file with a keyed one.
        ("api-keys.yaml", "type: tollgate-api-keys\nallow_anonymous: true\n".into()),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir.to_path_buf()
}

/// The gateway API key tests send, and its SHA-256 as policy stores it
/// (`printf %s tg-test-key | sha256sum`).
pub const TEST_API_KEY: &str = "tg-test-key";
pub const TEST_API_KEY_SHA256: &str = "2173a168026e43858e02309abd5271d237acfab8d94155cea0998b02252b5544";

/// Writes `api-keys.yaml`: the test key as `id`, allowed the virtual `models`, with envelope
/// defaults `metadata` (header name → value). A policy with keys refuses requests without one.
pub fn write_api_keys(dir: &Path, id: &str, models: &[&str], metadata: &[(&str, &str)]) {
    let models = models.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ");
    let mut text = format!(
        "type: tollgate-api-keys\nkeys:\n  - id: {id}\n    sha256: {TEST_API_KEY_SHA256}\n    subject: {{type: user, id: u_test}}\n    models: [{models}]\n"
    );
    if !metadata.is_empty() {
        text.push_str("    metadata:\n");
        for (header, value) in metadata {
            text.push_str(&format!("      {header}: {value}\n"));
        }
    }
    std::fs::write(dir.join("api-keys.yaml"), text).unwrap();
}

/// Request `i`: its virtual model, whether it streams, and the tokens the mock reports.
pub fn chat_case(i: u64) -> (&'static str, bool, u64, u64) {
    let vm = ["vm-openai", "vm-anthropic", "vm-fallback"][(i % 3) as usize];
    (vm, i % 2 == 0, 20 + (i * 37) % 500, 1 + (i * 7) % 30)
}

/// Rows requests `0..n` of [`chat`] leave: one per upstream attempt, so two for each
/// `vm-fallback` request (its refused attempt at the `dead` provider, then the answer).
pub fn chat_rows(n: u64) -> u64 {
    (0..n).map(|i| if chat_case(i).0 == "vm-fallback" { 2 } else { 1 }).sum()
}

/// Sends request `i` (session `sess-{i}`) and checks the client got the whole answer.
pub async fn chat(client: &reqwest::Client, ingress: SocketAddr, i: u64) -> Result<(), String> {
    let (vm, streamed, prompt, completion) = chat_case(i);
    let mut body = json!({
        "model": vm,
        "messages": [{"role": "user", "content": format!("hello {i}\n#mock prompt_tokens={prompt} completion_tokens={completion}")}],
    });
    if streamed {
        body["stream"] = json!(true);
    }
    let resp = client
        .post(format!("http://{ingress}/v1/chat/completions"))
        .header("X-TFY-Project", "outage")
        .header("X-TFY-Session-ID", format!("sess-{i}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("request {i}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| format!("request {i}: body: {e}"))?;
    if status != 200 {
        return Err(format!("request {i}: HTTP {status}: {text}"));
    }
    let words = if streamed {
        assert!(text.contains("data: [DONE]"), "request {i}: stream did not end: {text}");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect::<String>()
            .split_whitespace()
            .count()
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("request {i}: {e}: {text}"))?;
        v["choices"][0]["message"]["content"].as_str().unwrap_or_default().split_whitespace().count()
    };
    if words as u64 != completion {
        return Err(format!("request {i}: got {words} words, the mock sent {completion}"));
    }
    Ok(())
}

/// Sum of a counter (over all label sets) in the Prometheus text `metrics`.
pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// `target/<profile>/<bin>` of a workspace package, built (or found up to date) first. Tests
/// that kill a service with SIGKILL need it as a process of its own.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    // A test runs as target/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("running cargo build for {bin}: {e}"));
    assert!(status.success(), "cargo build -p {package} --bin {bin} failed");
    let path = profile_dir.join(bin);
    assert!(path.is_file(), "{} missing after cargo build", path.display());
    path
}

/// Usage event `i` of the meter tests, ended at `ended_us`: three projects, two teams, two
/// workflows, two models, 500 sessions, one provider error in 17, tokens varying with `i`.
pub fn usage_event(i: u64, ended_us: i64) -> UsageEvent {
    let tokens = 100 + (i * 7919 % 5000) as i64;
    UsageEvent {
        started_at_us: ended_us - 400_000,
        envelope: Envelope {
            project: Some(["search", "support", "intern-sandbox"][(i % 3) as usize].into()),
            team: Some(["data", "platform"][(i % 2) as usize].into()),
            session_id: Some(format!("sess-{}", i % 500)),
            workflow_tag: Some(["classify", "summarize"][(i % 2) as usize].into()),
            ..Default::default()
        },
        provider: "anthropic".into(),
        model: ["claude-haiku-4-5", "claude-opus-4-7"][(i % 4 == 0) as usize].into(),
        status: if i % 17 == 0 { Status::ProviderError } else { Status::Ok },
        streamed: i % 2 == 0,
        input_tokens: tokens,
        output_tokens: tokens / 5,
        cached_input_tokens: tokens / 10,
        reference_input_tokens: Some(tokens),
        input_chars: tokens * 4,
        cost_nanos: tokens * 1000 + (tokens / 5) * 5000,
        ..UsageEvent::example(format!("00000000-0000-7000-8000-{i:012}"), None, ended_us)
    }
}

/// `n` usage events from 2026-10-20 00:00 UTC, one every 13 s: about 30 days per 200,000,
/// across a month end.
pub fn usage_events(n: u64) -> Vec<UsageEvent> {
    let base_us: i64 = 1_792_454_400 * 1_000_000;
    (0..n).map(|i| usage_event(i, base_us + (i as i64) * 13_000_000)).collect()
}

/// An idempotent producer to the shared broker that acks only once every replica has a record.
pub fn usage_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

/// Produces `events` to `topic` as Avro, keyed by session (as the ingress does), and waits for
/// every acknowledgement.
pub async fn produce_usage(topic: &str, events: &[UsageEvent]) {
    let producer = usage_producer();
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

/// Events of a partition the meter has finished with (raw rows, windows and checkpoint in
/// ClickHouse), summed over partitions: the next offset each checkpoint names.
pub async fn checkpointed(db: &str) -> u64 {
    ch(&format!(
        "SELECT sum(o) FROM (SELECT max(next_offset) AS o FROM {db}.meter_checkpoints GROUP BY kafka_partition)"
    ))
    .await
    .trim()
    .parse()
    .unwrap_or(0)
}

/// The end of `topic` on `brokers`: the sum over its partitions of their high watermarks.
pub async fn topic_end(brokers: &str, topic: &str) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", unique("end")).create().unwrap();
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
        (0..partitions)
            .map(|p| {
                let (_, high) = c.fetch_watermarks(&topic, i32::try_from(p).unwrap(), Duration::from_secs(10)).unwrap();
                u64::try_from(high).unwrap()
            })
            .sum()
    })
    .await
    .unwrap()
}

/// Waits until the meter has finished with every event `topic` holds now: its checkpoints in
/// `db` reach the topic's end. Once nothing produces to `topic` any more, ClickHouse then holds
/// all it ever will, so a count taken after this is final (no fixed wait for stragglers).
pub async fn meter_finished_on(brokers: &str, db: &str, topic: &str) {
    let end = topic_end(brokers, topic).await;
    let done = until_at_least(end, Duration::from_secs(60), || checkpointed(db)).await;
    assert!(done.is_ok(), "the meter stopped at {done:?} of the {end} events of {topic}");
}

/// [`meter_finished_on`] the test broker.
pub async fn meter_finished(db: &str, topic: &str) {
    meter_finished_on(&kafka_brokers(), db, topic).await;
}

const WINDOW_GROUPS: &str = "project, team, user_id, cost_center, workflow_tag, environment, api_key_id, virtual_model, provider, model, model_version";

/// Asserts that every rollup window of `db` (minute, hour, day, month), summed over partitions,
/// equals the sums of its raw events, and that the session hours add up to the raw events.
pub async fn assert_windows_match_raw(db: &str) {
    for (granularity, start) in [
        ("minute", "toStartOfMinute(ended_at)"),
        ("hour", "toStartOfHour(ended_at)"),
        ("day", "toStartOfDay(ended_at)"),
        ("month", "toDateTime(toStartOfMonth(ended_at))"),
    ] {
        let from_windows = ch(&format!(
            "SELECT window_start, {WINDOW_GROUPS}, sum(requests), sum(errors), sum(rejected), sum(input_tokens), sum(output_tokens), \
             sum(cached_input_tokens), sum(cost_nanos), sum(latency_us_sum) FROM {db}.usage_windows FINAL \
             WHERE granularity = '{granularity}' GROUP BY window_start, {WINDOW_GROUPS} ORDER BY window_start, {WINDOW_GROUPS} FORMAT TabSeparated"
        ))
        .await;
        let from_raw = ch(&format!(
            "SELECT {start} AS w, {WINDOW_GROUPS}, count(), sum(status != 'ok'), sum(status = 'rejected'), sum(input_tokens), sum(output_tokens), \
             sum(cached_input_tokens), sum(cost_nanos), sum(ended_at_us - started_at_us) FROM {db}.usage_events FINAL \
             GROUP BY w, {WINDOW_GROUPS} ORDER BY w, {WINDOW_GROUPS} FORMAT TabSeparated"
        ))
        .await;
        assert!(!from_raw.is_empty());
        assert_eq!(from_windows.lines().count(), from_raw.lines().count(), "{granularity}: number of windows");
        assert!(from_windows == from_raw, "{granularity} windows differ from the sums of their raw events");
    }
    let sessions = ch(&format!(
        "SELECT sum(requests), sum(input_tokens), sum(cost_nanos) FROM {db}.session_hours FINAL FORMAT TabSeparated"
    ))
    .await;
    let raw = ch(&format!(
        "SELECT count(), sum(input_tokens), sum(cost_nanos) FROM {db}.usage_events FINAL FORMAT TabSeparated"
    ))
    .await;
    assert_eq!(sessions, raw, "session hours add up to the raw events");
}

/// The lease topic of a test's enforcers (created by the enforcer): one per test, so no test
/// reads another's heartbeats.
pub fn lease_topic(breaches: &str) -> String {
    format!("{breaches}_lease")
}

/// The enforcer's settings for a test: its own topics, the meter's database, the shared metrics.
pub fn enforcer_config(
    policy_dir: &Path,
    usage: &str,
    breaches: &str,
    alerts: &str,
    db: &str,
) -> tollgate_enforcer::Config {
    let mut config = tollgate_enforcer::Config::new(
        policy_dir.to_path_buf(),
        kafka_brokers(),
        tollgate_store::ClickHouseConfig { url: clickhouse_url(), database: db.into(), user: None, password: None },
    );
    config.usage_topic = usage.into();
    config.breaches_topic = breaches.into();
    config.alerts_topic = alerts.into();
    config.metrics = Some(metrics());
    // One id for every test enforcer of these topics: one restarted takes over at once (as a
    // restarted pod with a stable name does), without waiting for its own lease to expire.
    config.lease.instance_id = Some(format!("test/{breaches}"));
    config.lease.topic = lease_topic(breaches);
    config
}

pub async fn start_enforcer(config: tollgate_enforcer::Config) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tollgate_enforcer::run(config, listener, shutdown.clone()));
    Service { addr, shutdown, task, temp: None }
}

/// Follows a breaches topic from its beginning and keeps every decision read, in order.
pub struct DecisionLog {
    decisions: std::sync::Arc<std::sync::Mutex<Vec<tollgate_schemas::decision::BreachDecision>>>,
    /// Keys of the tombstones read, in topic order.
    tombstones: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl DecisionLog {
    pub fn follow(topic: &str) -> DecisionLog {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", kafka_brokers()).set("group.id", unique("decision-log"));
        tollgate_runtime::kafka::follow(&mut cc, tollgate_runtime::kafka::Follow::Decisions, false);
        let consumer: StreamConsumer = cc.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let decisions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tombstones = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (sink, removed, token) = (decisions.clone(), tombstones.clone(), stop.clone());
        tokio::spawn(async move {
            let codec = tollgate_schemas::decision::BreachDecision::codec().unwrap();
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    m = consumer.recv() => {
                        let m = m.unwrap();
                        match m.payload() {
                            Some(p) => sink.lock().unwrap().push(codec.decode(p).unwrap()),
                            None => removed.lock().unwrap().push(String::from_utf8_lossy(m.key().unwrap()).into_owned()),
                        }
                    }
                }
            }
        });
        DecisionLog { decisions, tombstones, stop }
    }

    /// Keys tombstoned so far, in topic order.
    pub fn tombstones(&self) -> Vec<String> {
        self.tombstones.lock().unwrap().clone()
    }

    pub fn all(&self) -> Vec<tollgate_schemas::decision::BreachDecision> {
        self.decisions.lock().unwrap().clone()
    }

    /// The newest decision for `rule_id/scope`.
    pub fn latest(&self, key: &str) -> Option<tollgate_schemas::decision::BreachDecision> {
        self.decisions.lock().unwrap().iter().filter(|d| d.key() == key).max_by_key(|d| d.version).cloned()
    }

    /// Waits until the newest decision for `key` satisfies `f`, and returns it.
    pub async fn wait_for(
        &self,
        key: &str,
        f: impl Fn(&tollgate_schemas::decision::BreachDecision) -> bool,
    ) -> tollgate_schemas::decision::BreachDecision {
        // As long as the services advance (events evaluated, decisions published), however slowly
        // a busy machine lets them; a minute without any progress fails.
        let stall = Duration::from_secs(60);
        let progress = || services_progress() + self.decisions.lock().unwrap().len() as u64;
        let (mut last, mut moved) = (progress(), Instant::now());
        loop {
            if let Some(d) = self.latest(key).filter(|d| f(d)) {
                return d;
            }
            let now = progress();
            if now != last {
                (last, moved) = (now, Instant::now());
            }
            assert!(
                moved.elapsed() < stall,
                "no matching decision for {key}, and no progress for {stall:?}; newest: {:?}",
                self.latest(key)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// `write_policy`, plus the reference's rate-limit and budget YAML verbatim (compose/policy),
/// alert channels on the mock's webhook sink, and `vm-premium`: a frontier model (priced in
/// the card) with the cheaper Haiku as its fallback.
pub fn write_reference_rules(dir: &Path, mock: SocketAddr) {
    write_policy(dir, mock);
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy");
    for f in ["rate-limits.yaml", "budgets.yaml"] {
        std::fs::copy(reference.join(f), dir.join(f)).unwrap();
    }
    let channels = format!(
        "type: tollgate-alert-channels\nchannels:\n  - {{name: \"slack:#ai-budget-alerts\", url: \"http://{mock}/webhooks/slack\"}}\n  - {{name: \"pagerduty:platform\", url: \"http://{mock}/webhooks/pagerduty\", routing_key: test-routing-key}}\n"
    );
    std::fs::write(dir.join("channels.yaml"), channels).unwrap();
    let prices = std::fs::read_to_string(dir.join("prices.yaml")).unwrap();
    std::fs::write(
        dir.join("prices.yaml"),
        format!("{prices}  - {{provider: anthropic-mock, model: claude-opus-4-7, tier: frontier, input_usd_per_mtok: 5, output_usd_per_mtok: 25}}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("premium.yaml"),
        "name: vm-premium\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: opus, priority: 1, target: {provider: anthropic-mock, model: claude-opus-4-7}, timeout_ms: 5000}\nfallbacks:\n  - {provider: anthropic-mock, model: claude-haiku-4-5}\n",
    )
    .unwrap();
}

/// What the mock's webhook sink received, oldest first.
pub async fn webhooks(mock: SocketAddr) -> Vec<Value> {
    let v: Value = reqwest::get(format!("http://{mock}/webhooks")).await.unwrap().json().await.unwrap();
    v.as_array().unwrap().clone()
}

/// Every alert on `topic` (one partition), in order.
pub async fn alerts_on(topic: &str) -> Vec<tollgate_schemas::decision::Alert> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", unique("alerts"))
            // The enforcer's transaction is never committed on Tansu (enforcer `lease`).
            .set("isolation.level", "read_uncommitted")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
        c.assign(&tpl).unwrap();
        let codec = tollgate_schemas::decision::Alert::codec().unwrap();
        let mut out = Vec::new();
        // To the partition's end-of-file event, not to a count or an offset: a takeover's abort
        // marker takes an offset and is never handed over.
        loop {
            match c.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => out.push(codec.decode(m.payload().unwrap()).unwrap()),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => panic!("reading the alerts: {e}"),
                None => panic!("alerts topic ended early"),
            }
        }
        out
    })
    .await
    .unwrap()
}

/// A usage, a breaches and an alerts topic and a database of their own.
pub struct Topics {
    pub usage: String,
    pub breaches: String,
    pub alerts: String,
    pub db: String,
}

pub async fn topics(name: &str) -> Topics {
    let t = Topics {
        usage: unique(&format!("{name}_usage")),
        breaches: unique(&format!("{name}_breaches")),
        alerts: unique(&format!("{name}_alerts")),
        db: unique(name),
    };
    create_topic(&t.usage, 4).await;
    create_topic(&t.breaches, 1).await;
    create_topic(&t.alerts, 1).await;
    t
}
