//! Tollgate's enforcer: rate limits, budgets and anomaly guards evaluated over the usage stream.
//!
//! On start it reads back what it last published (the compacted breaches topic and the alerts
//! topic), rebuilds the open windows from the usage ClickHouse holds up to the meter's
//! checkpoints, and consumes the usage topic from exactly those offsets. Decisions go to
//! `tollgate.breaches.v1` keyed `rule_id/scope`; alerts go to `tollgate.alerts.v1` and their
//! notify channels.

pub mod delivery;
pub mod engine;
pub mod guards;
pub mod lease;
pub mod metrics;
pub mod notify;
pub mod rebuild;
pub mod seen;
pub mod topics;
pub use tollgate_schemas::window;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_runtime::error_chain;
use tollgate_runtime::kafka::{Awaited, Outgoing, Producer};
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::decision::{Alert, BreachDecision};
use tollgate_schemas::policy::Policy;
use tollgate_schemas::usage::UsageEvent;
use tollgate_store::ClickHouseConfig;
use tracing::{debug, error, info, warn};

use engine::{Engine, Usage};
use guards::{Guards, Sample};
use notify::Notifier;
use seen::{Seen, Verdict};

#[derive(Debug, Clone)]
pub struct Config {
    pub policy_dir: PathBuf,
    pub brokers: String,
    pub usage_topic: String,
    pub breaches_topic: String,
    pub alerts_topic: String,
    /// Where usage events that cannot be counted (undecodable, negative amounts) are set aside.
    pub dead_letter_topic: String,
    pub clickhouse: ClickHouseConfig,
    /// Scopes at or above this share of their limit are published as `Watch` with their headroom.
    pub watch_pct: u32,
    /// How long a batch of new usage may wait before it is evaluated.
    pub evaluate_every: Duration,
    /// How often scopes, alert ids and guard workflows whose windows have passed are forgotten,
    /// and idle `Clear` keys tombstoned.
    pub gc_every: Duration,
    /// Event ids counted are remembered at least this long, and until the meter has recorded
    /// them (see `seen`): a copy re-sent within it is told apart without asking ClickHouse.
    pub seen_min_age: Duration,
    /// Most event ids remembered; past it the oldest are forgotten early (counted).
    pub seen_max_ids: usize,
    pub kafka_extra: Vec<(String, String)>,
    pub metrics: Option<PrometheusHandle>,
    /// Which of several enforcers publishes (`lease`).
    pub lease: lease::LeaseConfig,
}

impl Config {
    pub fn new(policy_dir: PathBuf, brokers: String, clickhouse: ClickHouseConfig) -> Self {
        Self {
            policy_dir,
            brokers,
            usage_topic: tollgate_schemas::topics::USAGE.into(),
            breaches_topic: tollgate_schemas::topics::BREACHES.into(),
            alerts_topic: tollgate_schemas::topics::ALERTS.into(),
            dead_letter_topic: tollgate_schemas::topics::USAGE_DEAD_LETTERS.into(),
            clickhouse,
            watch_pct: 50,
            evaluate_every: Duration::from_millis(10),
            gc_every: Duration::from_secs(30),
            seen_min_age: Duration::from_secs(600),
            seen_max_ids: 2_000_000,
            kafka_extra: Vec::new(),
            metrics: None,
            lease: lease::LeaseConfig::default(),
        }
    }
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Loads the policy, then enforces it until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let policy = Policy::load_dir(&config.policy_dir)
        .map_err(|e| anyhow::anyhow!("policy in {} is invalid:\n{e}", config.policy_dir.display()))?;
    metrics::describe();
    let listen = listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    let http = axum::serve(listener, tollgate_runtime::ops_router(config.metrics.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let http = tokio::spawn(async move { http.await });

    let instance = match &config.lease.instance_id {
        Some(id) => id.clone(),
        None => format!("{}/{listen}", lease::host_name()),
    };
    lease::ensure_topic(&config.brokers, &config.kafka_extra, &config.lease.topic).await?;
    let notifier =
        Notifier::new(&policy.alert_channels, notify::NotifyConfig::default()).context("setting up alert channels")?;
    // A changed policy (file change or SIGHUP) that loads is enforced from a fresh start: history
    // read back, windows rebuilt for the new rules; one that does not load changes nothing.
    let mut policies =
        tollgate_runtime::reload::PolicyWatch::spawn(config.policy_dir.clone(), policy, shutdown.clone());
    let result = loop {
        let policy = Arc::clone(&policies.borrow_and_update());
        notifier.set_channels(&policy.alert_channels);
        match enforce(&config, &instance, policy, &notifier, &shutdown, &mut policies).await {
            Ok(Stopped::Reload) => info!("policy changed: rebuilding the windows for the new rules"),
            Ok(Stopped::Demoted) => warn!("another enforcer holds the lease: standing by again"),
            Ok(Stopped::Shutdown) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    notifier.shutdown(Duration::from_secs(10)).await;
    shutdown.cancel();
    tollgate_runtime::log_ops_server_end("enforcer", http).await;
    info!("enforcer stopped");
    result
}

/// Why a decision or an alert did not reach its topic (the engine republishes it).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("encoding it")]
    Encode(#[from] tollgate_schemas::avro::CodecError),
    #[error("sending it to {topic}")]
    Send {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

/// Why `enforce` returned.
enum Stopped {
    Shutdown,
    Reload,
    /// This enforcer was active and lost the lease (fenced): it starts over as a standby.
    Demoted,
}

/// Reads back the enforcer's own history, rebuilds the windows and follows the usage topic until
/// shutdown or a new policy.
async fn enforce(
    config: &Config,
    instance: &str,
    policy: Arc<Policy>,
    notifier: &Notifier,
    shutdown: &CancellationToken,
    policies: &mut tokio::sync::watch::Receiver<Arc<Policy>>,
) -> anyhow::Result<Stopped> {
    let counts = |kind| policy.rules.iter().filter(|r| r.kind == kind).count();
    metrics::rules("rate_limit", counts(tollgate_schemas::decision::RuleKind::RateLimit));
    metrics::rules("budget", counts(tollgate_schemas::decision::RuleKind::Budget));
    metrics::rules("guard", policy.guards.len());
    let started = Instant::now();
    let (decisions, alerts, own_ends) = replay_own_history(config).await?;
    let lease_name = lease::lease_name(&config.lease.group_id, &config.breaches_topic);
    let (last_lease, lease_end) = read_lease(config, &lease_name).await?;
    // The engine as the topics leave it: what was last decided per key, which alerts went out.
    let seeded = || {
        let mut e = Engine::new(Arc::clone(&policy), config.watch_pct);
        for d in &decisions {
            e.seed_published(d);
        }
        for a in &alerts {
            e.seed_alerted(a);
        }
        e
    };

    let ch = config.clickhouse.client();
    let Some(covered) = tollgate_runtime::retry_with_backoff(
        shutdown,
        "clickhouse",
        "reading the meter's checkpoints",
        |_: &clickhouse::error::Error| {},
        || tollgate_store::checkpoints(&ch, &config.usage_topic),
    )
    .await
    else {
        return Ok(Stopped::Shutdown);
    };
    // Each attempt starts from the seeded engine: a failed one may have counted part of the rows.
    let Some(((rebuilt, mut above), mut engine, mut guards)) = tollgate_runtime::retry_with_backoff(
        shutdown,
        "clickhouse",
        "rebuilding windows from clickhouse",
        |_: &clickhouse::error::Error| {},
        || async {
            let now = now_us();
            let mut e = seeded();
            let r = rebuild::rebuild(&ch, &config.usage_topic, &covered, &mut e, now, rebuild::Source::Best).await?;
            let mut g = Guards::new(&policy);
            rebuild::rebuild_guards(&ch, &config.usage_topic, &covered, &mut g, now).await?;
            for (i, pct, days) in g.baselines_wanted() {
                g.set_baseline(i, rebuild::loop_baseline(&ch, pct, days, now).await?);
            }
            Ok((r, e, g))
        },
    )
    .await
    else {
        return Ok(Stopped::Shutdown);
    };
    info!(
        decisions = decisions.len(),
        raw_buckets = rebuilt.raw_buckets,
        raw_requests = rebuilt.raw_requests,
        rollup_buckets = rebuilt.rollup_buckets,
        rollup_requests = rebuilt.rollup_requests,
        rows_past_checkpoints = above.len(),
        scopes = engine.scopes(),
        resume = ?covered,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "windows rebuilt from clickhouse"
    );

    // Copies of the events the rebuild counted ended no later than the latest of them.
    let Some(forgot_until) = tollgate_runtime::retry_with_backoff(
        shutdown,
        "clickhouse",
        "reading when the counted events ended",
        |_: &clickhouse::error::Error| {},
        || tollgate_store::latest_ended_before(&ch, &config.usage_topic, &covered),
    )
    .await
    else {
        return Ok(Stopped::Shutdown);
    };
    let mut seen = Seen::new(forgot_until, i64::MIN, config.seen_min_age, config.seen_max_ids);
    let mut doubtful: Vec<Waiting> = Vec::new();
    let mut next_prune = Instant::now() + PRUNE_SEEN_EVERY;
    let mut next_doubtful = Instant::now();

    info!(topic = %config.usage_topic, resume = ?covered, "enforcer consuming usage");
    // The next offset of each partition, so the consumer can be re-created where it is when it
    // switches between its active and quiet fetch waits (tollgate_runtime::kafka).
    let mut next = covered.clone();
    let mut quiet = false;
    let mut last_event = Instant::now();
    let mut consumer = usage_consumer(config, &next, quiet).await?;
    let codec = UsageEvent::codec()?;

    // Standing by: the active's output followed from where the replay ended; taking over when
    // its heartbeats stop (or at once when nobody holds the lease).
    let mut follow_from: Vec<(String, i32, i64)> = own_ends.clone();
    follow_from.push((config.lease.topic.clone(), 0, lease_end));
    let mut role = Role::Standby {
        follower: topics::Follower::new(&config.brokers, &config.kafka_extra, &follow_from)?,
        last_heard: Instant::now(),
        take_now: lease::free_at_start(last_lease.as_ref(), instance, config.lease.session_timeout),
    };
    let mut heard = Heard {
        delivered: last_lease.map(|(r, _)| r.delivered),
        released: false,
        decision_codec: BreachDecision::codec()?,
        alert_codec: Alert::codec()?,
    };
    metrics::active(false);

    let mut tally = Tally { pending: 0, oldest_pending: None, counters: metrics::EventCounters::default() };
    let mut tick = tokio::time::interval(config.evaluate_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    // Takeovers and heartbeats, finer than housekeeping: a takeover waits at most this long
    // past the session timeout.
    let mut lease_tick = tokio::time::interval(LEASE_TICK);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_gc = Instant::now();
    // The loop guards' baselines move slowly: re-read them every five minutes, off the loop.
    let (baseline_tx, mut baselines) = tokio::sync::mpsc::channel(4);
    let refresh = tokio::spawn(refresh_baselines(ch.clone(), guards.baselines_wanted(), baseline_tx, shutdown.clone()));
    let stopped = loop {
        let mut switch_to = None;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Stopped::Shutdown,
            Ok(()) = policies.changed() => break Stopped::Reload,
            Some((i, baseline)) = baselines.recv() => guards.set_baseline(i, baseline),
            _ = tick.tick(), if tally.pending > 0 => {
                let now = now_us();
                if let Role::Active(a) = &role
                    && let Err(f) = a.publisher.publish(&mut engine, &mut guards, now, false).await
                {
                    break fenced(f);
                }
                if let Some(oldest) = tally.oldest_pending.take() {
                    metrics::evaluated(tally.pending, (now - oldest).max(0) as f64 / 1e6);
                }
                tally.pending = 0;
            }
            _ = lease_tick.tick() => {
                if let Role::Standby { last_heard, take_now, .. } = &mut role
                    && (*take_now || last_heard.elapsed() >= config.lease.session_timeout)
                {
                    // A decision taken on an earlier read (at start, before the rebuild; or a
                    // release another enforcer may have answered already) is checked again on
                    // the lease topic as it is now; silence needs no second look.
                    if last_heard.elapsed() < config.lease.session_timeout {
                        let free = match read_lease(config, &lease_name).await {
                            Ok((last, _)) => lease::free_at_start(last.as_ref(), instance, config.lease.session_timeout),
                            Err(_) => false,
                        };
                        if !free {
                            *take_now = false;
                            *last_heard = Instant::now();
                            continue;
                        }
                    }
                    let Role::Standby { follower, .. } = std::mem::replace(&mut role, Role::Switching) else { unreachable!() };
                    role = match take_over(config, instance, &lease_name, follower, &mut engine, &mut heard, notifier).await {
                        Ok(a) => Role::Active(Box::new(a)),
                        Err((e, follower)) => {
                            metrics::takeover("failed");
                            warn!(error = format!("{e:#}"), "could not take over; standing by");
                            match follower {
                                Some(follower) => Role::Standby { follower, last_heard: Instant::now(), take_now: false },
                                None => break Stopped::Demoted,
                            }
                        }
                    };
                    // What changed while standing by, published at once.
                    if let Role::Active(a) = &role
                        && let Err(f) = a.publisher.publish(&mut engine, &mut guards, now_us(), true).await
                    {
                        break fenced(f);
                    }
                }
                if let Role::Active(a) = &mut role {
                    if a.next_heartbeat <= Instant::now() {
                        a.next_heartbeat = Instant::now() + config.lease.heartbeat_every;
                        if let Err(f) = a.publisher.lease.heartbeat(false).await {
                            break fenced(f);
                        }
                    }
                    if a.delivery.is_finished() {
                        break fenced(lease::Fenced("alert delivery stopped".into()));
                    }
                }
            }
            _ = housekeeping.tick() => {
                let now = now_us();
                if let Role::Active(a) = &role
                    && let Err(f) = a.publisher.publish(&mut engine, &mut guards, now, true).await
                {
                    break fenced(f);
                }
                if !above.is_empty() {
                    above.passed(&next);
                }
                if last_gc.elapsed() >= config.gc_every {
                    if let Role::Active(a) = &role {
                        let tombstones = engine.gc(now);
                        if let Err(f) = a.publisher.tombstone(&mut engine, tombstones, now).await {
                            break fenced(f);
                        }
                    } else {
                        engine.gc_standby(now);
                    }
                    guards.gc(&engine, now);
                    metrics::scopes(engine.scopes());
                    last_gc = Instant::now();
                }
                if Instant::now() >= next_prune || (!doubtful.is_empty() && Instant::now() >= next_doubtful) {
                    match settle_seen(&ch, &config.usage_topic, &mut seen, &mut doubtful).await {
                        Some(resolved) => {
                            next_prune = Instant::now() + PRUNE_SEEN_EVERY;
                            next_doubtful = Instant::now();
                            for w in resolved {
                                count(&w.ev, w.counted_by_rebuild, &mut engine, &mut guards, &mut tally);
                            }
                        }
                        // ClickHouse away or slow: the loop must not stall on it every second.
                        None => {
                            next_prune = Instant::now() + SEEN_BACKOFF;
                            next_doubtful = next_prune;
                        }
                    }
                }
                if !quiet && last_event.elapsed() >= tollgate_runtime::kafka::QUIET_AFTER {
                    switch_to = Some(true);
                }
            }
            Some(r) = follow(&mut role) => {
                if let Role::Standby { last_heard, take_now, .. } = &mut role
                    && absorb(config, &lease_name, instance, r, &mut engine, &mut heard)
                {
                    // The latest word of another enforcer decides: it holds the lease, or it
                    // released it.
                    *last_heard = Instant::now();
                    *take_now = heard.released;
                }
            }
            msg = consumer.recv() => match msg {
                Ok(m) => match m.payload().map(|p| {
                    next.insert(m.partition(), m.offset() + 1);
                    last_event = Instant::now();
                    if quiet {
                        switch_to = Some(false);
                    }
                    codec.decode::<UsageEvent>(p)
                }) {
                    Some(Ok(ev)) if ev.implausible().is_some() => {
                        let why = format!("implausible usage event: {}", ev.implausible().unwrap_or_default());
                        set_aside(role.producer(), config, &m, &why).await;
                    }
                    Some(Ok(ev)) => {
                        let at = (m.partition(), m.offset());
                        // Asked now: `above` forgets a row once the consumer has passed it, and a
                        // doubtful event is counted later.
                        let counted_by_rebuild = above.counted_event(&ev, at);
                        match seen.check(&ev.event_id, at, ev.ended_at_us, Instant::now()) {
                            Verdict::New => count(&ev, counted_by_rebuild, &mut engine, &mut guards, &mut tally),
                            Verdict::Duplicate => metrics::duplicate(),
                            Verdict::Doubtful if doubtful.len() < MAX_DOUBTFUL => {
                                metrics::doubtful_waiting(doubtful.len() + 1);
                                doubtful.push(Waiting { ev, at, counted_by_rebuild });
                            }
                            Verdict::Doubtful => {
                                // Too many waiting (the meter is far behind): counting it may
                                // count a copy twice, which errs toward enforcing, and is counted.
                                metrics::doubtful("unverified");
                                seen.remember(&ev.event_id, at, ev.ended_at_us, Instant::now());
                                count(&ev, counted_by_rebuild, &mut engine, &mut guards, &mut tally);
                            }
                        }
                    }
                    Some(Err(e)) => set_aside(role.producer(), config, &m, &format!("cannot decode: {e}")).await,
                    None => set_aside(role.producer(), config, &m, "message has no payload").await,
                },
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
        if let Some(to_quiet) = switch_to {
            match usage_consumer(config, &next, to_quiet).await {
                Ok(c) => {
                    let old = std::mem::replace(&mut consumer, c);
                    // Closing a consumer may block briefly: not on an async worker.
                    tokio::task::spawn_blocking(move || drop(old));
                    quiet = to_quiet;
                    tollgate_runtime::kafka::quiet_gauge(tollgate_runtime::kafka::Follow::Usage, quiet);
                    debug!(quiet, "usage consumer switched fetch wait");
                }
                Err(e) => {
                    warn!(error = format!("{e:#}"), "cannot re-create the usage consumer; keeping the current one")
                }
            }
        }
    };
    if let Role::Active(a) = role {
        if tally.pending > 0 && !matches!(stopped, Stopped::Demoted) {
            let _ = a.publisher.publish(&mut engine, &mut guards, now_us(), false).await;
        }
        a.stop(!matches!(stopped, Stopped::Demoted)).await;
    }
    metrics::active(false);
    refresh.abort();
    Ok(stopped)
}

/// A lost lease, logged and counted.
fn fenced(f: lease::Fenced) -> Stopped {
    metrics::fenced();
    warn!(error = %f, "lost the lease: stopping publication");
    Stopped::Demoted
}

/// Whether this enforcer publishes.
enum Role {
    Standby {
        follower: topics::Follower,
        /// When the active last gave a sign of life (or this standby started).
        last_heard: Instant,
        /// Take over at the next housekeeping tick: nobody holds the lease, or it was released.
        take_now: bool,
    },
    Active(Box<Active>),
    /// Between the two, inside one housekeeping tick.
    Switching,
}

impl Role {
    fn producer(&self) -> Option<&Producer<Awaited>> {
        match self {
            Role::Active(a) => Some(&a.publisher.lease.producer),
            _ => None,
        }
    }
}

/// The next record a standby follows; never ready for an active enforcer.
async fn follow(role: &mut Role) -> Option<topics::Followed> {
    match role {
        Role::Standby { follower, .. } => match follower.recv().await {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "error following the active enforcer's topics");
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        },
        _ => std::future::pending().await,
    }
}

/// What a standby last read of the active's lease records, and the codecs of what it follows.
struct Heard {
    /// The active's delivered offsets (`None`: no active ever wrote one).
    delivered: Option<BTreeMap<i32, i64>>,
    /// The active released the lease (stopped cleanly).
    released: bool,
    decision_codec: AvroCodec,
    alert_codec: AvroCodec,
}

/// Takes a record the active published into the standby's engine (what was decided and
/// alerted) or `heard` (its lease records). Returns true for a sign of life of another enforcer.
fn absorb(
    config: &Config,
    lease_name: &str,
    instance: &str,
    r: topics::Followed,
    engine: &mut Engine,
    heard: &mut Heard,
) -> bool {
    if r.topic == config.breaches_topic {
        match (&r.payload, &r.key) {
            (Some(p), _) => match heard.decision_codec.decode::<BreachDecision>(p) {
                Ok(d) => engine.seed_published(&d),
                Err(e) => warn!(error = %e, "breach decision skipped: cannot decode"),
            },
            (None, Some(k)) => engine.seed_tombstone(&String::from_utf8_lossy(k)),
            (None, None) => {}
        }
        false
    } else if r.topic == config.alerts_topic {
        if let Some(Ok(a)) = r.payload.as_deref().map(|p| heard.alert_codec.decode::<Alert>(p)) {
            engine.seed_alerted(&a);
        }
        false
    } else if r.key.as_deref() == Some(lease_name.as_bytes()) {
        match r.payload.as_deref().map(serde_json::from_slice::<lease::LeaseRecord>) {
            // This instance's own records (an earlier run of it) say nothing newer than what it
            // read at start.
            Some(Ok(mut rec)) if rec.instance != instance => {
                if let Some(before) = &heard.delivered {
                    lease::merge_delivered(&mut rec.delivered, before);
                }
                heard.delivered = Some(rec.delivered);
                heard.released = rec.released;
                true
            }
            _ => false,
        }
    } else {
        false
    }
}

/// The active enforcer's publisher (through the lease's fenced producer) and its alert delivery.
struct Active {
    publisher: Publisher,
    next_heartbeat: Instant,
    delivery: tokio::task::JoinHandle<Result<(), lease::Fenced>>,
    stop_delivery: CancellationToken,
}

impl Active {
    /// A clean stop (`release`): waits for the deliveries in flight, then tells the standbys they
    /// may take over at once. A lost lease: stops the deliveries at once.
    async fn stop(self, release: bool) {
        if !release {
            // Lost the lease: the next active delivers what is not recorded as done; going on
            // here would deliver it twice.
            self.delivery.abort();
            let _ = self.delivery.await;
            return;
        }
        self.stop_delivery.cancel();
        match self.delivery.await {
            Ok(Ok(())) => {
                if !matches!(self.publisher.lease.heartbeat(true).await, Ok(true)) {
                    warn!("could not release the lease; a standby takes over after the session timeout");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "alert delivery ended"),
            Err(e) => warn!(error = %e, "alert delivery task failed"),
        }
    }
}

/// The group's last lease record and the lease topic's end ([`lease::read_last`], off the async
/// workers: it blocks).
async fn read_lease(config: &Config, lease_name: &str) -> anyhow::Result<(lease::Last, i64)> {
    let (brokers, extra, topic, name) =
        (config.brokers.clone(), config.kafka_extra.clone(), config.lease.topic.clone(), lease_name.to_owned());
    tokio::task::spawn_blocking(move || lease::read_last(&brokers, &extra, &topic, &name))
        .await
        .context("the lease reader's thread failed")?
}

/// How often the lease is looked after (takeover due, heartbeat due).
const LEASE_TICK: Duration = Duration::from_millis(100);

/// How long a new active may take to read what the last one published before it publishes.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);

/// Takes the lease (fencing the last holder), reads everything the last holder published up to
/// the end, and starts delivering alerts from where it stopped. On failure the follower comes
/// back (when it can still be used) to stand by again.
async fn take_over(
    config: &Config,
    instance: &str,
    lease_name: &str,
    mut follower: topics::Follower,
    engine: &mut Engine,
    heard: &mut Heard,
    notifier: &Notifier,
) -> Result<Active, (anyhow::Error, Option<topics::Follower>)> {
    let started = Instant::now();
    // With no holder before (a new group, or enforcers that kept no lease), the alerts the topic
    // holds were delivered (or belong to no one): delivery starts at their end.
    let initial: BTreeMap<i32, i64> =
        heard.delivered.clone().unwrap_or_else(|| follower.positions(&config.alerts_topic).into_iter().collect());
    let taken = lease::Lease::take(
        &config.brokers,
        &config.kafka_extra,
        &config.lease,
        lease_name.to_owned(),
        instance.to_owned(),
        initial.clone(),
    )
    .await;
    let lease = match taken {
        Ok(l) => l,
        Err(e) => return Err((e, Some(follower))),
    };
    // Nobody else can write now: what the topics hold is all the last holder published.
    let caught = follower
        .catch_up(&config.brokers, &config.kafka_extra, CATCH_UP_DEADLINE, |r| {
            absorb(config, lease_name, instance, r, engine, heard);
        })
        .await;
    if let Err(e) = caught {
        // The lease is held and nothing published: starting over as a standby is safest.
        return Err((e, None));
    }
    // Delivery goes on from the last holder's delivered offsets (a partition it never wrote: from
    // its end now).
    let base = heard.delivered.clone().unwrap_or(initial);
    let from: BTreeMap<i32, i64> = follower
        .positions(&config.alerts_topic)
        .into_iter()
        .map(|(p, end)| (p, base.get(&p).copied().unwrap_or(end)))
        .collect();
    for (p, at) in &from {
        lease.set_delivered(*p, *at);
    }
    drop(follower);
    let stop_delivery = CancellationToken::new();
    let delivery = tokio::spawn(delivery::run(
        config.clone(),
        from,
        Arc::clone(&lease),
        notifier.clone(),
        stop_delivery.clone(),
        Duration::from_secs(10),
    ));
    let publisher = match Publisher::new(Arc::clone(&lease), config) {
        Ok(p) => p,
        Err(e) => {
            stop_delivery.cancel();
            return Err((e, None));
        }
    };
    metrics::takeover("taken");
    metrics::active(true);
    info!(
        instance,
        lease = lease_name,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "took the lease: this enforcer publishes"
    );
    Ok(Active { publisher, next_heartbeat: Instant::now() + config.lease.heartbeat_every, delivery, stop_delivery })
}

async fn refresh_baselines(
    ch: clickhouse::Client,
    wanted: Vec<(usize, u32, u32)>,
    tx: tokio::sync::mpsc::Sender<(usize, guards::Baseline)>,
    shutdown: CancellationToken,
) {
    if wanted.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(300)) => {}
        }
        for (i, pct, days) in &wanted {
            match rebuild::loop_baseline(&ch, *pct, *days, now_us()).await {
                Ok(b) => {
                    if tx.send((*i, b)).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "cannot refresh the loop guard's baseline; keeping the last one"),
            }
        }
    }
}

/// Every topic, partition and offset where a replay ended.
type Ends = Vec<(String, i32, i64)>;

/// The last decision per key and every alert id, from the enforcer's own topics, and where each
/// partition's replay ended.
async fn replay_own_history(config: &Config) -> anyhow::Result<(Vec<BreachDecision>, Vec<Alert>, Ends)> {
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        let codec = BreachDecision::codec()?;
        let mut decisions: BTreeMap<String, BreachDecision> = BTreeMap::new();
        let deadline = Duration::from_secs(120);
        let breaches_end =
            topics::read_to_end(&cfg.brokers, &cfg.kafka_extra, &cfg.breaches_topic, deadline, |key, payload| match (
                key,
                payload.map(|p| codec.decode::<BreachDecision>(p)),
            ) {
                (_, Some(Ok(d))) => match decisions.get(&d.key()) {
                    Some(old) if old.version >= d.version => {}
                    _ => {
                        decisions.insert(d.key(), d);
                    }
                },
                (Some(k), None) => {
                    decisions.remove(String::from_utf8_lossy(k).as_ref());
                }
                (_, Some(Err(e))) => warn!(error = %e, "breach decision skipped: cannot decode"),
                (None, None) => {}
            })?;
        let alert_codec = Alert::codec()?;
        let mut alerts = Vec::new();
        let alerts_end =
            topics::read_to_end(&cfg.brokers, &cfg.kafka_extra, &cfg.alerts_topic, deadline, |_, payload| {
                if let Some(Ok(a)) = payload.map(|p| alert_codec.decode::<Alert>(p)) {
                    alerts.push(a);
                }
            })?;
        let ends = breaches_end
            .into_iter()
            .map(|(p, at)| (cfg.breaches_topic.clone(), p, at))
            .chain(alerts_end.into_iter().map(|(p, at)| (cfg.alerts_topic.clone(), p, at)))
            .collect();
        Ok((decisions.into_values().collect(), alerts, ends))
    })
    .await?
}

/// The usage consumer, each partition at its offset in `covered` (from the beginning when absent),
/// with the quiet or the active fetch wait (`tollgate_runtime::kafka::Follow::Usage`).
async fn usage_consumer(config: &Config, covered: &BTreeMap<i32, i64>, quiet: bool) -> anyhow::Result<StreamConsumer> {
    let settings =
        [("group.id", "tollgate-enforcer"), ("enable.auto.commit", "false"), ("enable.partition.eof", "false")];
    let fetch = Some((tollgate_runtime::kafka::Follow::Usage, quiet));
    let cc = tollgate_runtime::kafka::client_config(&config.brokers, &settings, fetch, &config.kafka_extra);
    let consumer: StreamConsumer = cc.create().context("creating the usage consumer")?;
    let topic = config.usage_topic.clone();
    // A metadata request blocks its thread for up to its timeout: off the async workers.
    let asked = topic.clone();
    let (consumer, md) = tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(Some(&asked), Duration::from_secs(10));
        (consumer, md)
    })
    .await
    .context("the metadata request's thread failed")?;
    let md = md.with_context(|| format!("reading metadata of {topic}"))?;
    let partitions = tollgate_runtime::partitions_in(&md, &topic);
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let offset = covered.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(&topic, *p, offset)?;
    }
    consumer.assign(&tpl).context("assigning the usage partitions")?;
    debug!(%topic, ?partitions, quiet, "enforcer consuming usage");
    Ok(consumer)
}

/// A usage record the enforcer cannot count: counted, logged and copied to the dead-letter topic
/// (the meter sets the same record aside on its own, with its own `tollgate-rejected-by` header).
async fn set_aside(
    producer: Option<&Producer<Awaited>>,
    config: &Config,
    m: &rdkafka::message::BorrowedMessage<'_>,
    why: &str,
) {
    metrics::decode_error();
    let Some(producer) = producer else {
        // The active enforcer copies it (and the meter, on its own).
        debug!(partition = m.partition(), offset = m.offset(), error = why, "usage event not counted (standby)");
        return;
    };
    match tollgate_runtime::kafka::dead_letter(producer, &config.dead_letter_topic, m, why, "enforcer").await {
        Ok(_) => warn!(
            partition = m.partition(),
            offset = m.offset(),
            error = why,
            "usage event not counted; sent to the dead-letter topic"
        ),
        Err(e) => {
            error!(partition = m.partition(), offset = m.offset(), error = why, kafka = %e, "usage event not counted and not dead-lettered")
        }
    }
}

/// Sends what the engine decides to the breaches and alerts topics through the lease's fenced
/// producer; a send that fails is forgotten by the engine, so the next evaluation sends it
/// again, unless the lease is lost (`Err`).
struct Publisher {
    lease: Arc<lease::Lease>,
    breaches_topic: String,
    alerts_topic: String,
    decision_codec: AvroCodec,
    alert_codec: AvroCodec,
}

impl Publisher {
    fn new(lease: Arc<lease::Lease>, config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            lease,
            breaches_topic: config.breaches_topic.clone(),
            alerts_topic: config.alerts_topic.clone(),
            decision_codec: BreachDecision::codec()?,
            alert_codec: Alert::codec()?,
        })
    }

    /// Publishes a tombstone for each key (`Engine::gc`); one not sent is tried again next time.
    async fn tombstone(&self, engine: &mut Engine, keys: Vec<String>, now: i64) -> Result<(), lease::Fenced> {
        if keys.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_secs(10);
        let sends = keys.iter().map(|key| {
            let record =
                Outgoing { topic: &self.breaches_topic, key: Some(key.as_bytes()), payload: None, headers: None };
            self.lease.producer.send_awaited(record, timeout)
        });
        let sent = futures::future::join_all(sends).await;
        let mut done = 0u64;
        let mut lost = None;
        for (key, r) in keys.into_iter().zip(sent) {
            match r {
                Ok(_) => done += 1,
                Err(e) => {
                    lost = lost.or_else(|| self.lease.why_failed(&e));
                    metrics::publish_error("tombstone");
                    let e = PublishError::Send { topic: self.breaches_topic.clone(), source: e };
                    warn!(key = %key, error = %error_chain(&e), "tombstone not published; will retry");
                    engine.untombstone(key, now);
                }
            }
        }
        metrics::tombstones(done);
        debug!(tombstones = done, "decision keys whose window has passed tombstoned");
        lost.map_or(Ok(()), Err)
    }

    /// Publishes what the rules and guards decide now; `sweep` re-judges every guard scope.
    async fn publish(
        &self,
        engine: &mut Engine,
        guards: &mut Guards,
        now: i64,
        sweep: bool,
    ) -> Result<(), lease::Fenced> {
        let mut out = engine.evaluate(now);
        metrics::keys_evaluated(out.evaluated);
        guards.evaluate(engine, now, sweep, &mut out);
        if out.decisions.is_empty() && out.alerts.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_secs(10);
        let sent_to = |topic: &str| {
            let topic = topic.to_owned();
            move |source| PublishError::Send { topic, source }
        };
        let decisions = out.decisions.iter().map(|d| async move {
            let payload = self.decision_codec.encode(d)?;
            let key = d.key();
            let record = Outgoing {
                topic: &self.breaches_topic,
                key: Some(key.as_bytes()),
                payload: Some(&payload),
                headers: None,
            };
            self.lease.producer.send_awaited(record, timeout).await.map(|_| ()).map_err(sent_to(&self.breaches_topic))
        });
        let alerts = out.alerts.iter().map(|a| async move {
            let payload = self.alert_codec.encode(a)?;
            let record = Outgoing {
                topic: &self.alerts_topic,
                key: Some(a.alert_id.as_bytes()),
                payload: Some(&payload),
                headers: None,
            };
            self.lease.producer.send_awaited(record, timeout).await.map(|_| ()).map_err(sent_to(&self.alerts_topic))
        });
        let (sent, raised) = futures::join!(futures::future::join_all(decisions), futures::future::join_all(alerts));
        let mut lost = None;
        let mut lost_by = |e: &PublishError| {
            if let PublishError::Send { source, .. } = e
                && lost.is_none()
            {
                lost = self.lease.why_failed(source);
            }
        };
        for (d, r) in out.decisions.iter().zip(sent) {
            match r {
                Ok(()) => {
                    metrics::decision(d.rule_kind.as_str(), d.state.as_str());
                    debug!(key = %d.key(), state = d.state.as_str(), observed = d.observed, limit = d.limit, "decision published");
                }
                Err(e) => {
                    lost_by(&e);
                    metrics::publish_error("decision");
                    warn!(key = %d.key(), error = %error_chain(&e), "decision not published; will retry");
                    engine.unpublish(d);
                }
            }
        }
        for (a, r) in out.alerts.iter().zip(raised) {
            match r {
                Ok(()) => {
                    // Delivered to its channels from the alerts topic (`delivery`).
                    metrics::alert(a.kind.as_str());
                    info!(alert = %a.alert_id, summary = %a.summary, "alert raised");
                }
                Err(e) => {
                    lost_by(&e);
                    metrics::publish_error("alert");
                    warn!(alert = %a.alert_id, error = %error_chain(&e), "alert not published; will retry");
                    engine.unalert(a);
                }
            }
        }
        lost.map_or(Ok(()), Err)
    }
}

/// How often the ids the meter has recorded are forgotten.
const PRUNE_SEEN_EVERY: Duration = Duration::from_secs(5);
/// Most doubtful events waiting for the meter at once.
const MAX_DOUBTFUL: usize = 100_000;
/// How long one ClickHouse call of the consume loop may take before it is tried again later
/// (the loop waits for it: decisions too).
const LOOP_QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the loop leaves ClickHouse alone after such a call failed.
const SEEN_BACKOFF: Duration = Duration::from_secs(30);

/// What the consume loop has counted since its last evaluation, and the counters of every event.
struct Tally {
    pending: usize,
    oldest_pending: Option<i64>,
    counters: metrics::EventCounters,
}

/// Counts one event into the windows and guards; `counted_by_rebuild` is what
/// `rebuild::Covered::counted_event` said when it was consumed.
fn count(ev: &UsageEvent, counted_by_rebuild: bool, engine: &mut Engine, guards: &mut Guards, tally: &mut Tally) {
    tally.counters.event(ev.input_tokens, ev.output_tokens, ev.cost_nanos);
    if let Some(u) = Usage::of(ev) {
        let now = now_us();
        rebuild::observe_consumed(engine, &u, counted_by_rebuild, now);
        if let Some(s) = Sample::of(ev) {
            guards.observe(&s, now);
        }
        tally.pending += 1;
        tally.oldest_pending.get_or_insert(ev.ended_at_us);
    }
}

/// One ClickHouse read of the consume loop, bounded by `LOOP_QUERY_TIMEOUT`; `None` (logged)
/// when it fails or times out.
async fn loop_query<T>(
    what: &str,
    query: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
) -> Option<T> {
    match tokio::time::timeout(LOOP_QUERY_TIMEOUT, query).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read {what}; trying again in 30 s");
            None
        }
        Err(_) => {
            warn!("reading {what} timed out; trying again in 30 s");
            None
        }
    }
}

/// A doubtful event waiting for the meter (see `seen`), where it was read, and whether the
/// rebuild had counted it into the rollup rules (asked when it was read).
struct Waiting {
    ev: UsageEvent,
    at: seen::Position,
    counted_by_rebuild: bool,
}

/// Reads the meter's checkpoints; forgets the ids it has recorded; decides the doubtful events
/// whose offsets it has passed (every earlier copy is then in `event_positions`). Returns those
/// to count; `None` when ClickHouse is away or slow (nothing changes; tried again later).
async fn settle_seen(
    ch: &clickhouse::Client,
    topic: &str,
    seen: &mut Seen,
    doubtful: &mut Vec<Waiting>,
) -> Option<Vec<Waiting>> {
    let durable = loop_query("the meter's checkpoints", tollgate_store::checkpoints(ch, topic)).await?;
    let (forgotten, evicted) = seen.prune(&durable, Instant::now());
    metrics::seen_ids(seen.len(), forgotten, evicted);
    let ready: Vec<usize> = (0..doubtful.len())
        .filter(|i| durable.get(&doubtful[*i].at.0).is_some_and(|next| *next >= doubtful[*i].at.1))
        .collect();
    if ready.is_empty() {
        return Some(Vec::new());
    }
    let ids: Vec<&str> = ready.iter().map(|i| doubtful[*i].ev.event_id.as_str()).collect();
    let first = loop_query("event positions", tollgate_store::first_positions(ch, topic, &ids)).await?;
    let mut taken = vec![false; doubtful.len()];
    for i in &ready {
        taken[*i] = true;
    }
    let mut counted = Vec::new();
    for (i, w) in std::mem::take(doubtful).into_iter().enumerate() {
        if !taken[i] {
            doubtful.push(w);
        } else if first.get(&w.ev.event_id).is_some_and(|f| *f < w.at) || seen.contains(&w.ev.event_id) {
            metrics::doubtful("duplicate");
        } else {
            metrics::doubtful("counted");
            seen.remember(&w.ev.event_id, w.at, w.ev.ended_at_us, Instant::now());
            counted.push(w);
        }
    }
    metrics::doubtful_waiting(doubtful.len());
    Some(counted)
}
