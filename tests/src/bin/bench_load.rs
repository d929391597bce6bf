//! `tollgate-bench-load`: the parts of `tests/bench/run` that no registry tool does.
//!
//! - `stream`: a load generator for SSE chat-completion streams that reports the time to the
//!   first token and to the last one. oha and wrk time a response as a whole (oha: until the
//!   body ends; wrk: the same, with no hook per body chunk), so neither can give a time to
//!   first token; non-streaming load stays with oha. Open loop at a fixed rate (each request's
//!   time counts from when it was due, so a stall is not hidden: no coordinated omission), or
//!   closed loop with a fixed number of connections for saturation.
//! - `hold`: opens many slow streams at once, waits until every one has its first token, and
//!   samples a process's resident memory (`VmRSS`) while they are all open.
//! - `prepare-kafka`: creates the run's usage and (compacted) breaches topics and fills the
//!   breaches topic with `Clear` decisions for scopes the benchmark traffic never has, so the
//!   ingress starts with a non-empty decision cache and looks up every rule on every request.
//!
//! Results are one JSON object on stdout; progress goes to stderr.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use futures::StreamExt as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tollgate_schemas::decision::{BreachDecision, DecisionState, decision_key};

#[derive(Debug, Parser)]
#[command(name = "tollgate-bench-load", version, about = "Benchmark helpers: SSE load, stream hold, Kafka set-up")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Load with streaming requests; report time to first token and to the last token.
    Stream(StreamArgs),
    /// Hold many slow streams open at once and sample a process's resident memory.
    Hold(HoldArgs),
    /// Create the usage and breaches topics and seed the breaches topic with decisions.
    PrepareKafka(KafkaArgs),
    /// Time from sending a (large) request to its first byte at the mock provider, through a
    /// gateway (`--url`) and to the mock directly (`--direct`).
    BigPrompt(BigPromptArgs),
}

#[derive(Debug, ClapArgs)]
struct BigPromptArgs {
    #[command(flatten)]
    target: Target,
    /// The mock provider's own chat completions URL.
    #[arg(long)]
    direct: String,
    /// The mock provider's `/_mock/stats` URL (its `last_request_at_us`).
    #[arg(long)]
    stats: String,
    /// Measured requests per target.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Unmeasured requests per target first (the first one after a start also pays for the
    /// tokenizer's tables and the allocator's first large pages; it is reported as `cold_ms`).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
}

#[derive(Debug, ClapArgs)]
struct Target {
    /// URL to POST to.
    #[arg(long)]
    url: String,
    /// File with the JSON request body.
    #[arg(long)]
    body_file: std::path::PathBuf,
    /// Request header `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
}

#[derive(Debug, ClapArgs)]
struct StreamArgs {
    #[command(flatten)]
    target: Target,
    /// Requests per second (open loop). Without it: closed loop on `--connections`.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests in flight at most. Closed loop: always this many (saturation). Open loop: a
    /// request due while all are busy waits for one, and its time still counts from when it
    /// was due (as `oha -q --latency-correction` does with its `-c` connections).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first (connections, caches, allocator).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// A request not finished this many seconds after it started is an error.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

#[derive(Debug, ClapArgs)]
struct HoldArgs {
    #[command(flatten)]
    target: Target,
    /// Streams to hold open at once.
    #[arg(long, default_value_t = 2000)]
    streams: usize,
    /// Streams opened per 100 ms while ramping up (a listen backlog is finite).
    #[arg(long, default_value_t = 250)]
    ramp: usize,
    /// Process whose VmRSS is sampled.
    #[arg(long)]
    pid: u32,
    /// Seconds to wait for every stream's first token.
    #[arg(long, default_value_t = 60.0)]
    open_timeout: f64,
    /// Seconds to sample memory once every stream is open.
    #[arg(long, default_value_t = 3.0)]
    sample: f64,
}

#[derive(Debug, ClapArgs)]
struct KafkaArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    usage_topic: String,
    #[arg(long, default_value_t = 4)]
    usage_partitions: i32,
    #[arg(long)]
    breaches_topic: String,
    /// `Clear` decisions to write, spread over `--rule` ids.
    #[arg(long, default_value_t = 10_000)]
    decisions: usize,
    /// Rule id the seeded decisions name (repeatable); use the policy's own ids.
    #[arg(long = "rule")]
    rules: Vec<String>,
}

fn out(v: &Value) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{v}")?;
    Ok(())
}

fn client(pool: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")
}

struct Request {
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Request {
    fn new(t: &Target, client: reqwest::Client) -> anyhow::Result<Self> {
        let body = std::fs::read(&t.body_file).with_context(|| format!("reading {}", t.body_file.display()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for h in &t.headers {
            let Some((name, value)) = h.split_once(':') else { bail!("header {h:?} is not `Name: value`") };
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
                reqwest::header::HeaderValue::from_str(value.trim())?,
            );
        }
        headers
            .entry(reqwest::header::CONTENT_TYPE)
            .or_insert(reqwest::header::HeaderValue::from_static("application/json"));
        Ok(Self { client, url: t.url.clone(), headers, body: body.into() })
    }

    /// Sends one streaming request; returns (first token, last byte) measured from `due`.
    async fn stream_once(&self, due: Instant) -> Result<(Duration, Duration), String> {
        let resp = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(self.body.clone())
            .send()
            .await
            .map_err(|e| format!("send: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status().as_u16()));
        }
        let mut body = resp.bytes_stream();
        let mut seen = Vec::with_capacity(4096);
        let mut first = None;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            if first.is_none() {
                let from = seen.len().saturating_sub(32);
                seen.extend_from_slice(&chunk);
                if has_token(&seen[from..]) {
                    first = Some(due.elapsed());
                }
            }
        }
        let last = due.elapsed();
        match first {
            Some(f) => Ok((f, last)),
            None => Err("stream ended without a token".into()),
        }
    }
}

/// Whether `buf` holds an SSE chunk with non-empty `"content"` text (OpenAI's stream format,
/// with or without a space after the colon).
fn has_token(buf: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":";
    let mut i = 0;
    while let Some(pos) = buf[i..].windows(KEY.len()).position(|w| w == KEY) {
        let mut j = i + pos + KEY.len();
        while buf.get(j) == Some(&b' ') {
            j += 1;
        }
        if buf.get(j) == Some(&b'"') && buf.get(j + 1).is_some_and(|c| *c != b'"') {
            return true;
        }
        i = i + pos + 1;
    }
    false
}

fn percentiles(mut v: Vec<Duration>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let at = |q: f64| {
        let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[idx].as_secs_f64() * 1e6
    };
    json!({"p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99), "max_us": at(1.0)})
}

#[derive(Default)]
struct Tally {
    /// Streams that ended (successfully) inside the measured window, whenever they started.
    completed_in_window: u64,
    ttft: Vec<Duration>,
    last: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

async fn stream(args: StreamArgs) -> anyhow::Result<()> {
    let req = Arc::new(Request::new(&args.target, client(args.connections.max(256))?)?);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let timeout = Duration::from_secs_f64(args.timeout);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let sent = Arc::new(AtomicU64::new(0));

    let one = {
        let req = Arc::clone(&req);
        let tally = Arc::clone(&tally);
        move |due: Instant| {
            let req = Arc::clone(&req);
            let tally = Arc::clone(&tally);
            async move {
                let r = tokio::time::timeout(timeout, req.stream_once(due)).await;
                let done = Instant::now();
                let mut t = tally.lock().await;
                if matches!(r, Ok(Ok(_))) && done >= measure_from && done <= end {
                    t.completed_in_window += 1;
                }
                if due < measure_from {
                    return;
                }
                match r {
                    Ok(Ok((first, last))) => {
                        t.ttft.push(first);
                        t.last.push(last);
                    }
                    Ok(Err(e)) => {
                        t.errors += 1;
                        t.first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        t.errors += 1;
                        t.first_error.get_or_insert_with(|| "timed out".into());
                    }
                }
            }
        }
    };

    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        Some(rate) if rate > 0.0 => {
            let slots = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1)));
            let mut i: u64 = 0;
            loop {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                // All connections busy: wait for one, as oha -q does; the time still counts from `due`.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break };
                if Instant::now() >= end {
                    break;
                }
                i += 1;
                if due >= measure_from {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                let request = one(due);
                tasks.spawn(async move {
                    request.await;
                    drop(slot);
                });
                // Reap finished tasks now and then so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
        }
        _ => {
            for _ in 0..args.connections {
                let one = one.clone();
                let sent = Arc::clone(&sent);
                tasks.spawn(async move {
                    loop {
                        let due = Instant::now();
                        if due >= end {
                            break;
                        }
                        if due >= measure_from {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        one(due).await;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let t = std::mem::take(&mut *tally.lock().await);
    let ok = t.ttft.len() as u64;
    out(&json!({
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "connections": args.connections,
        "duration_s": args.duration,
        "sent": sent.load(Ordering::Relaxed),
        "ok": ok,
        "errors": t.errors,
        "first_error": t.first_error,
        // Throughput: streams that ended inside the measured window, per second of it.
        "achieved_rps": t.completed_in_window as f64 / args.duration,
        "ttft": percentiles(t.ttft),
        "last": percentiles(t.last),
    }))
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let req = Arc::new(Request::new(&args.target, client(args.streams)?)?);
    let before = vm_rss_kib(args.pid).context("reading VmRSS of --pid")?;
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..args.streams {
        if i > 0 && i % args.ramp.max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let req = Arc::clone(&req);
        let (opened, failed, first_error) = (Arc::clone(&opened), Arc::clone(&failed), Arc::clone(&first_error));
        tasks.spawn(async move {
            let fail = |e: String| async {
                failed.fetch_add(1, Ordering::Relaxed);
                first_error.lock().await.get_or_insert(e);
            };
            let resp = match req.client.post(&req.url).headers(req.headers.clone()).body(req.body.clone()).send().await
            {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => return fail(format!("status {}", r.status().as_u16())).await,
                Err(e) => return fail(format!("send: {e}")).await,
            };
            let mut body = resp.bytes_stream();
            let mut seen = Vec::new();
            let mut counted = false;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) if !counted => {
                        seen.extend_from_slice(&c);
                        if has_token(&seen) {
                            counted = true;
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return fail(format!("body: {e}")).await,
                }
            }
        });
    }
    let deadline = started + Duration::from_secs_f64(args.open_timeout);
    let mut peak = before;
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.streams as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(vm_rss_kib(args.pid).unwrap_or(0));
    }
    let all_open_after = started.elapsed();
    let open_now = opened.load(Ordering::Relaxed);
    let sample_end = Instant::now() + Duration::from_secs_f64(args.sample);
    let mut held = 0u64;
    while Instant::now() < sample_end {
        let rss = vm_rss_kib(args.pid).unwrap_or(0);
        held = held.max(rss);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(held);
    let error = first_error.lock().await.clone();
    out(&json!({
        "streams": args.streams,
        "open": open_now,
        "failed": failed.load(Ordering::Relaxed),
        "first_error": error,
        "all_open_after_s": all_open_after.as_secs_f64(),
        "rss_before_kib": before,
        "rss_held_kib": held,
        "rss_peak_kib": peak,
    }))?;
    tasks.abort_all();
    Ok(())
}

async fn prepare_kafka(args: KafkaArgs) -> anyhow::Result<()> {
    if args.rules.is_empty() && args.decisions > 0 {
        bail!("--rule is required to seed decisions");
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &args.brokers).create().context("Kafka admin client")?;
    let usage = NewTopic::new(&args.usage_topic, args.usage_partitions, TopicReplication::Fixed(1));
    let breaches = NewTopic::new(&args.breaches_topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    let created = admin
        .create_topics(&[usage, breaches], &AdminOptions::new())
        .await
        .with_context(|| format!("creating topics on {}", args.brokers))?;
    for r in created {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => bail!("creating topic {topic}: {e}"),
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .context("Kafka producer")?;
    let codec = BreachDecision::codec()?;
    let now_us = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros())?;
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..args.decisions {
        let rule_id = &args.rules[i % args.rules.len()];
        let d = BreachDecision {
            limit: 1_000_000,
            headroom: 1_000_000,
            window_start_us: now_us - 3_600_000_000,
            window_end_us: now_us + 3_600_000_000,
            decided_at_us: now_us,
            ..BreachDecision::example(rule_id.clone(), format!("session:bench-seed-{i}"), DecisionState::Clear, now_us)
        };
        let key = decision_key(&d.rule_id, &d.scope);
        let payload = codec.encode(&d)?;
        let topic = args.breaches_topic.clone();
        let producer = producer.clone();
        pending.push(async move {
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
        });
        if pending.len() >= 1000 {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    producer.flush(Duration::from_secs(30))?;
    out(&json!({"usage_topic": args.usage_topic, "breaches_topic": args.breaches_topic, "decisions": args.decisions}))
}

/// Microseconds since the Unix epoch: the mock stamps arrivals on the same clock.
fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

async fn big_prompt(a: BigPromptArgs) -> anyhow::Result<()> {
    let client = client(4)?;
    let via = Request::new(&a.target, client.clone())?;
    let direct = Request { url: a.direct.clone(), ..Request::new(&a.target, client.clone())? };
    let mut res = serde_json::Map::new();
    let mut prompt_tokens = Value::Null;
    for (name, req) in [("direct", &direct), ("gateway", &via)] {
        let mut samples = Vec::with_capacity(a.runs);
        let mut cold = None;
        for i in 0..a.warmup + a.runs {
            let sent_at = unix_us();
            let resp = req.client.post(&req.url).headers(req.headers.clone()).body(req.body.clone()).send().await?;
            let status = resp.status();
            let answer: Value = resp.json().await.context("the answer is not JSON")?;
            if !status.is_success() {
                bail!("{name} answered {status}: {answer}");
            }
            prompt_tokens = answer["usage"]["prompt_tokens"].clone();
            let stats: Value = client.get(&a.stats).send().await?.json().await?;
            let arrived = stats["last_request_at_us"].as_i64().context("the mock has no last_request_at_us")?;
            let ms = (arrived - sent_at) as f64 / 1000.0;
            cold.get_or_insert(ms);
            if i >= a.warmup {
                samples.push(ms);
            }
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        res.insert(
            name.into(),
            json!({"cold_ms": cold, "min_ms": at(0.0), "p50_ms": at(0.5), "p90_ms": at(0.9), "max_ms": at(1.0)}),
        );
    }
    let p50 = |name: &str| res[name]["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let added = p50("gateway") - p50("direct");
    res.insert("added_p50_ms".into(), json!(added));
    res.insert("body_bytes".into(), json!(via.body.len()));
    res.insert("prompt_tokens".into(), prompt_tokens);
    res.insert("runs".into(), json!(a.runs));
    out(&Value::Object(res))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Stream(a) => stream(a).await,
        Cmd::Hold(a) => hold(a).await,
        Cmd::PrepareKafka(a) => prepare_kafka(a).await,
        Cmd::BigPrompt(a) => big_prompt(a).await,
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "tollgate-bench-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
