//! Meters sharing one consumer group (`tollgate-meter run --group`) join, leave gracefully and
//! are SIGKILLed while 100,000 events stream into a 4-partition topic, so partitions move
//! between meters in the middle of batches: ClickHouse ends with exactly every event once, and
//! every rollup window equals the sum of its raw events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The group's session timeout: how long the broker waits before handing a SIGKILLed meter's
/// partitions to the others (librdkafka's default is 45 s).
const SESSION_TIMEOUT_MS: u32 = 6_000;

/// One `tollgate-meter run --group` process, logging to its own file.
struct Meter {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Meter {
    fn start(bin: &Path, topic: &str, db: &str, dir: &Path, name: &'static str) -> Self {
        let log = dir.join(format!("meter-{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(["run", "--group", "--clickhouse-url", &common::clickhouse_url(), "--database", db])
            .args(["--kafka-brokers", &common::kafka_brokers(), "--usage-topic", topic, "--group-id", db])
            .args(["--dead-letter-topic", &format!("{topic}.dlq")])
            .args(["--kafka-option", &format!("session.timeout.ms={SESSION_TIMEOUT_MS}")])
            .args(["--kafka-option", "heartbeat.interval.ms=1000"])
            // Batches that wait up to 1 s: a rebalance finds rows read but not yet written more
            // often than with short ones (the test needs one that does).
            .args(["--listen", "127.0.0.1:0", "--batch-max-rows", "10000", "--batch-max-wait-ms", "1000"])
            .env("RUST_LOG", "warn,tollgate_meter=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Meter { name, child: Some(child), log }
    }

    /// SIGKILL: no flush, no leaving the group.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("meter running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then waits for the meter to write its batch, leave the group and exit 0.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("meter running");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM {}", child.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "meter {} exited with {status}; log:\n{}", self.name, self.log_text());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "meter {} did not stop within 60 s; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the meters' logs say about rebalances.
#[derive(Debug, Default)]
struct Rebalances {
    assigns: usize,
    revokes: usize,
    /// Revokes that came while the meter held rows read but not yet written.
    mid_batch: usize,
    /// Per partition, the meters it was assigned to, in order (no meter twice in a row).
    owners: BTreeMap<i32, Vec<&'static str>>,
}

impl Rebalances {
    /// Partitions that came back to a meter after another meter had them (A, B, A): the case
    /// where windows kept in memory across the gap would be stale.
    fn returns(&self) -> usize {
        self.owners.values().map(|seq| (1..seq.len()).filter(|&i| seq[..i].contains(&seq[i])).count()).sum()
    }
}

/// `key=value` from a tracing line: the value up to the next space, or a whole `[..]` or `{..}`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let close = match rest.chars().next() {
        Some('{') => Some('}'),
        Some('[') => Some(']'),
        _ => None,
    };
    let end = match close {
        Some(c) => rest.find(c).map_or(rest.len(), |i| i + 1),
        None => rest.find(' ').unwrap_or(rest.len()),
    };
    Some(&rest[..end])
}

fn rebalances(meters: &[Meter]) -> Rebalances {
    let mut r = Rebalances::default();
    // (timestamp, meter, partitions) of every assignment; RFC 3339 UTC timestamps sort as text.
    let mut assigned: Vec<(String, &'static str, Vec<i32>)> = Vec::new();
    for m in meters {
        for line in m.log_text().lines() {
            if line.contains("partitions assigned") {
                r.assigns += 1;
                let parts = field(line, "partitions").unwrap_or("[]").trim_matches(['[', ']']);
                let at = line.split_whitespace().next().unwrap_or_default().to_owned();
                assigned.push((at, m.name, parts.split(',').filter_map(|p| p.trim().parse().ok()).collect()));
            } else if line.contains("partitions revoked") {
                r.revokes += 1;
                if field(line, "unwritten").and_then(|u| u.parse::<u64>().ok()).is_some_and(|u| u > 0) {
                    r.mid_batch += 1;
                }
            }
        }
    }
    assigned.sort();
    for (_, meter, parts) in assigned {
        for p in parts {
            let seq = r.owners.entry(p).or_default();
            if seq.last() != Some(&meter) {
                seq.push(meter);
            }
        }
    }
    r
}

fn dump_logs(meters: &[Meter]) {
    for m in meters {
        let text = m.log_text();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        eprintln!("--- meter {}, last {} lines:", m.name, tail.len());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// `common::checkpointed`, 0 until the first meter has created the database.
async fn checkpointed(db: &str) -> u64 {
    let exists = format!("SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'meter_checkpoints'");
    if common::ch_count(&exists).await == 0 {
        return 0;
    }
    common::checkpointed(db).await
}

/// The partitions a running meter owns, from the `owned` field of its last rebalance line.
fn owned(meter: &Meter) -> (usize, BTreeSet<i32>) {
    let text = meter.log_text();
    let lines: Vec<&str> =
        text.lines().filter(|l| l.contains("partitions assigned") || l.contains("partitions revoked")).collect();
    let owned = lines
        .last()
        .and_then(|l| field(l, "owned"))
        .map(|o| o.trim_matches(['{', '}']).split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_default();
    (lines.len(), owned)
}

/// Waits until the group has settled: every running meter owns partitions, together they own
/// each of the `partitions` once, and no rebalance happened for 3 s. After a SIGKILL that takes
/// the session timeout and the rebalance after it.
async fn settle(meters: &[Meter], partitions: i32) -> Duration {
    let started = Instant::now();
    let mut last = (Vec::new(), Instant::now());
    loop {
        let now: Vec<(usize, BTreeSet<i32>)> = meters.iter().filter(|m| m.child.is_some()).map(owned).collect();
        let mut all: Vec<i32> = now.iter().flat_map(|(_, o)| o.iter().copied()).collect();
        all.sort_unstable();
        let whole = all == (0..partitions).collect::<Vec<_>>() && now.iter().all(|(_, o)| !o.is_empty());
        if now != last.0 {
            last = (now, Instant::now());
        } else if whole && last.1.elapsed() >= Duration::from_secs(3) {
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(60) {
            dump_logs(meters);
            panic!("the group did not settle within 60 s: {:?}", last.0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Start(&'static str),
    /// SIGTERM: the meter writes its batch and leaves the group.
    Stop(&'static str),
    /// SIGKILL: the broker notices after the session timeout.
    Kill(&'static str),
}

/// What happens to the group while the events stream in; after each step but a kill the group
/// settles (see `settle`), then runs a second before the next. Meter `a` hands partitions to
/// `b` and gets them back when `b` leaves; `c` and `d` are SIGKILLed holding partitions, which
/// the meters that join next take over, replaying them from the checkpoints the dead ones left;
/// `a` leaves while `e` and `f` finish the stream.
///
/// A kill is followed by a join because Tansu 0.6 does not rebalance a dead member away by
/// itself: when a live member's heartbeat finds the session expired, the coordinator drops the
/// member but keeps the group formed at the same generation with the dead member's assignment,
/// so the survivors rejoin into their old partitions and the dead member's stay unread until
/// someone joins or leaves (`tansu-broker` 0.6.0, `coordinator/group/administrator.rs`:
/// `Inner<Formed>::heartbeat` answers REBALANCE_IN_PROGRESS without re-forming the group). The
/// join comes once the session has expired: a dead member still in the group when the leader
/// assigns is kept in the assignment the same way.
const SCRIPT: &[Step] = &[
    Step::Start("a"),
    Step::Start("b"),
    Step::Stop("b"),
    Step::Start("c"),
    Step::Kill("c"),
    Step::Start("d"),
    Step::Start("e"),
    Step::Stop("a"),
    Step::Kill("d"),
    Step::Start("f"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalances_mid_batch_lose_and_double_nothing() {
    let n: u64 = std::env::var("TOLLGATE_REBALANCE_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let topic = common::unique("rebalance");
    let db = common::unique("tollgate_rebalance");
    common::create_topic(&topic, 4).await;
    let evs = common::usage_events(n);
    let want_cost: i64 = evs.iter().map(|e| e.cost_nanos).sum();
    let bin = common::binary("tollgate-meter", "tollgate-meter");
    // TOLLGATE_KEEP_LOGS=1 keeps the meters' logs for a look afterwards.
    let keep = std::env::var_os("TOLLGATE_KEEP_LOGS").is_some();
    let dir = tempfile::Builder::new().prefix("meter_rebalance").disable_cleanup(keep).tempdir().unwrap();
    if keep {
        eprintln!("meter logs in {}", dir.path().display());
    }
    let t0 = Instant::now();

    // Each step releases its share of the events as it begins, so every rebalance happens while
    // events stream in, however fast the broker takes them.
    let (release, mut released) = tokio::sync::mpsc::unbounded_channel::<std::ops::Range<usize>>();
    let producer = {
        let topic = topic.clone();
        tokio::spawn(async move {
            while let Some(range) = released.recv().await {
                for chunk in evs[range].chunks(1_000) {
                    common::produce_usage(&topic, chunk).await;
                }
            }
        })
    };
    let share = (n as usize).div_ceil(SCRIPT.len());

    let mut meters: Vec<Meter> = Vec::new();
    for (i, step) in SCRIPT.iter().enumerate() {
        release.send(i * share..((i + 1) * share).min(n as usize)).unwrap();
        let written = checkpointed(&db).await;
        eprintln!("{:>6.1} s  {step:?}  ({written} events checkpointed)", t0.elapsed().as_secs_f64());
        let running = |name: &str| {
            meters
                .iter()
                .position(|m| m.name == name && m.child.is_some())
                .unwrap_or_else(|| panic!("{name} not running"))
        };
        match *step {
            Step::Start(name) => meters.push(Meter::start(&bin, &topic, &db, dir.path(), name)),
            Step::Stop(name) => {
                let i = running(name);
                meters[i].stop().await;
            }
            Step::Kill(name) => {
                let i = running(name);
                meters[i].kill();
            }
        }
        if let Step::Kill(_) = step {
            // The session expires (a heartbeat interval late at most), then the next step joins.
            tokio::time::sleep(Duration::from_millis(u64::from(SESSION_TIMEOUT_MS) + 3_000)).await;
            continue;
        }
        let took = settle(&meters, 4).await;
        eprintln!("{:>6.1} s  settled after {:.1} s", t0.elapsed().as_secs_f64(), took.as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(release);
    producer.await.unwrap();
    eprintln!("{:>6.1} s  all {n} events produced", t0.elapsed().as_secs_f64());

    // As long as the group advances; rebalances pause it for up to a session timeout each.
    let caught_up = common::until_at_least(n, Duration::from_secs(120), || checkpointed(&db)).await.is_ok();
    if !caught_up {
        dump_logs(&meters);
    }
    assert!(caught_up, "the group did not catch up: {} of {n} events checkpointed", common::checkpointed(&db).await);
    eprintln!("{:>6.1} s  caught up", t0.elapsed().as_secs_f64());
    for m in meters.iter_mut().filter(|m| m.child.is_some()) {
        m.stop().await;
    }

    let seen = rebalances(&meters);
    eprintln!(
        "rebalances: {} assignments, {} revocations ({} with rows read but not yet written), {} returns of a \
         partition to a meter that had it before; owners per partition: {:?}",
        seen.assigns,
        seen.revokes,
        seen.mid_batch,
        seen.returns(),
        seen.owners
    );
    let owning: BTreeSet<&str> = seen.owners.values().flatten().copied().collect();
    assert!(owning.len() >= 4, "partitions went to several meters: {:?}", seen.owners);
    assert!(seen.owners.values().all(|seq| seq.len() >= 2), "every partition moved: {:?}", seen.owners);
    let moves: usize = seen.owners.values().map(|seq| seq.len() - 1).sum();
    assert!(moves >= 8, "partitions changed hands {moves} times: {:?}", seen.owners);
    assert!(seen.mid_batch >= 1, "no rebalance came in the middle of a batch: {seen:?}");
    assert!(seen.returns() >= 1, "no partition came back to a meter after another had it: {seen:?}");

    // Exactly every event once: by event id, by Kafka position, and in money.
    let final_count = common::ch_count(&format!("SELECT count() FROM {db}.usage_events FINAL")).await;
    assert_eq!(final_count, n, "exactly every event once (FINAL)");
    assert_eq!(common::ch_count(&format!("SELECT uniqExact(event_id) FROM {db}.usage_events")).await, n);
    assert_eq!(
        common::ch_count(&format!("SELECT uniqExact(kafka_partition, kafka_offset) FROM {db}.usage_events FINAL"))
            .await,
        n,
        "every Kafka position once"
    );
    assert_eq!(common::checkpointed(&db).await, n, "checkpoints end at the last offset of each partition");
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL")).await.trim(),
        want_cost.to_string()
    );
    common::assert_windows_match_raw(&db).await;
    let month_requests = format!("SELECT sum(requests) FROM {db}.usage_windows FINAL WHERE granularity = 'month'");
    assert_eq!(common::ch_count(&month_requests).await, n, "the month windows count every event once");

    // Without FINAL: rows a meter wrote and then replayed (a SIGKILL between insert and
    // checkpoint) are duplicates until ClickHouse merges them; once merged, every table holds
    // each event once.
    let plain = common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await;
    eprintln!("raw rows before merging: {plain} ({} written twice)", plain - n);
    assert!(plain >= n);
    common::ch(&format!("OPTIMIZE TABLE {db}.usage_events FINAL")).await;
    common::ch(&format!("OPTIMIZE TABLE {db}.usage_windows FINAL")).await;
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events")).await, n, "merged raw rows");
    assert_eq!(
        common::ch_count(&format!("SELECT sum(requests) FROM {db}.usage_windows WHERE granularity = 'month'")).await,
        n,
        "merged month windows, read without FINAL"
    );
    eprintln!("{:>6.1} s  done", t0.elapsed().as_secs_f64());
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
