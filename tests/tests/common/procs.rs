//! Services as processes of their own, for tests that kill them with SIGKILL: a Tansu broker
//! owned by one test (its own port and SQLite file), the ingress binary, the meter binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;

/// A Tansu broker owned by this test, with SQLite storage in `dir`.
pub struct Broker {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

pub fn tansu_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|c| c.is_file()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").expect("HOME");
        Path::new(&home).join(".cargo/bin/tansu")
    })
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Broker {
    pub fn new() -> Self {
        Broker { dir: tempfile::tempdir().unwrap(), port: free_port(), child: None, starts: 0 }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts Tansu (again, on the same port and SQLite file) and waits until it answers.
    pub async fn start(&mut self) {
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
        let ready = super::eventually(Duration::from_secs(60), || {
            let addr = addr.clone();
            async move { tokio::task::spawn_blocking(move || broker_answers(&addr)).await.unwrap() }
        })
        .await;
        assert!(ready, "tansu on {} did not answer within 60 s; see {}", self.addr(), self.dir.path().display());
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill(&mut self) {
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
pub fn broker_answers(addr: &str) -> bool {
    let Ok(admin) = ClientConfig::new().set("bootstrap.servers", addr).create::<AdminClient<DefaultClientContext>>()
    else {
        return false;
    };
    admin.inner().fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|md| !md.brokers().is_empty())
}

pub fn ingress_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| super::binary("tollgate-ingress", "tollgate-ingress")).clone()
}

/// One run of the ingress binary (a process of its own, so it can be killed with SIGKILL).
pub struct IngressProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl IngressProcess {
    pub async fn start(policy: &Path, brokers: &str, topic: &str, spool: &Path, log: PathBuf) -> IngressProcess {
        Self::start_with(policy, brokers, topic, spool, log, &[]).await
    }

    /// [`IngressProcess::start`] with more flags (`--breaches-topic`, …).
    pub async fn start_with(
        policy: &Path,
        brokers: &str,
        topic: &str,
        spool: &Path,
        log: PathBuf,
        extra: &[&str],
    ) -> IngressProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(ingress_bin())
            .args(["--policy-dir".as_ref(), policy.as_os_str()])
            .args(["--listen", &addr.to_string(), "--kafka-brokers", brokers, "--usage-topic", topic])
            .args(["--spool-dir".as_ref(), spool.as_os_str()])
            .args(["--shutdown-grace-secs", "5"])
            .args(extra)
            .env("RUST_LOG", "warn,tollgate_ingress=info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let ingress = IngressProcess { child: Some(child), addr, log };
        let url = format!("http://{addr}/healthz");
        let up = super::eventually(Duration::from_secs(30), || {
            let url = url.clone();
            async move { reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        assert!(up, "ingress did not come up:\n{}", ingress.log_text());
        ingress
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr)).await.unwrap().text().await.unwrap()
    }

    /// The process id, for /proc figures.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill_9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "ingress exited with {status}:\n{}", self.log_text());
                return;
            }
            assert!(Instant::now() < end, "ingress did not stop within 60 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for IngressProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the meter binary (a process of its own, so it can be killed with SIGKILL) on `brokers`,
/// appending its stderr to `log`.
pub fn start_meter_process(bin: &Path, brokers: &str, topic: &str, db: &str, log: &Path) -> KillOnDrop {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    KillOnDrop(
        Command::new(bin)
            .args(["run", "--clickhouse-url", &super::clickhouse_url(), "--database", db])
            .args(["--kafka-brokers", brokers, "--usage-topic", topic, "--group-id", db])
            .args(["--listen", "127.0.0.1:0", "--batch-max-rows", "7000", "--batch-max-wait-ms", "200"])
            // The shared broker's outcomes are no test's business (and a fresh broker has no such topic).
            .arg("--no-outcomes")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// A gauge or counter of a process's /metrics.
pub async fn scrape(addr: &str, name: &str) -> u64 {
    let text = match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    super::metric(&text, name)
}

/// Starts the enforcer binary on `t`'s topics and database, its stderr to `log`.
pub fn start_enforcer_process(policy: &Path, t: &super::Topics, listen: &str, log: &Path) -> KillOnDrop {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(super::binary("tollgate-enforcer", "tollgate-enforcer"))
        .args(["--policy-dir".as_ref(), policy.as_os_str()])
        .args(["--kafka-brokers", &super::kafka_brokers(), "--usage-topic", &t.usage, "--breaches-topic", &t.breaches])
        .args(["--alerts-topic", &t.alerts, "--clickhouse-url", &super::clickhouse_url(), "--database", &t.db])
        .args(["--listen", listen, "--instance-id", &format!("test/{}", t.breaches)])
        .args(["--lease-topic", &super::lease_topic(&t.breaches)])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// CPU seconds (user + system) in a `/proc/PID/stat` line, and the process's command name.
pub fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // utime and stime are fields 14 and 15, the 12th and 13th after the name; USER_HZ is 100.
    let ticks: f64 = stat[close + 2..].split(' ').skip(11).take(2).filter_map(|v| v.parse::<f64>().ok()).sum();
    Some((&stat[open + 1..close], ticks / 100.0))
}

/// CPU seconds (user + system) used so far by process `pid` (0 when it cannot be read).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(stat_cpu).map_or(0.0, |(_, cpu)| cpu)
}

/// VmRSS of process `pid`, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves no service
/// running behind it.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
