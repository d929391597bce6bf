//! The Kafka broker dies in the middle of a run: every request is still answered, and once the
//! broker is back ClickHouse holds exactly one row per request.
//!
//! This binary runs its own Tansu broker (a free loopback port, its own SQLite file) so it can
//! SIGKILL and restart it without touching the shared one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;

/// A Tansu broker owned by this test, with SQLite storage in `dir`.
struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

fn tansu_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|c| c.is_file()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME");
        Path::new(&home).join(".cargo/bin/tansu")
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Broker {
    fn new() -> Self {
        Broker { dir: tempfile::tempdir().unwrap(), port: free_port(), child: None, starts: 0 }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts Tansu (again, on the same port and SQLite file) and waits until it answers.
    async fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        self.starts += 1;
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::File::create(self.dir.path().join(format!("tansu-{}.log", self.starts))).unwrap();
        let child = Command::new(tansu_bin())
            .current_dir(self.dir.path())
            .env("RUST_LOG", std::env::var("TOLLGATE_TEST_TANSU_LOG").unwrap_or_else(|_| "warn".into()))
            .args(["broker", "--cluster-id", "test", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (cargo install tansu?)", tansu_bin().display()));
        self.child = Some(child);
        let addr = self.addr();
        let ready = common::eventually(Duration::from_secs(60), || {
            let addr = addr.clone();
            async move { tokio::task::spawn_blocking(move || broker_answers(&addr)).await.unwrap() }
        })
        .await;
        assert!(ready, "tansu on {} did not answer within 60 s; see {}", self.addr(), self.dir.path().display());
    }

    /// SIGKILL: no chance to flush or close anything.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("broker running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // The test failed: show what the broker said.
            for n in 1..=self.starts {
                let log = std::fs::read_to_string(self.dir.path().join(format!("tansu-{n}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- tansu run {n}, last {} lines:", tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// True when the broker at `addr` returns cluster metadata.
fn broker_answers(addr: &str) -> bool {
    let Ok(admin) = ClientConfig::new().set("bootstrap.servers", addr).create::<AdminClient<DefaultClientContext>>()
    else {
        return false;
    };
    admin.inner().fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|md| !md.brokers().is_empty())
}

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
