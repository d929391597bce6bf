//! The decision cache: every breach decision of the compacted breaches topic, read in full at
//! start and followed live, plus what this ingress admitted since each one.
//!
//! **Reading the topic.** [`Follower`] assigns every partition of the topic from the beginning
//! (no consumer group: each ingress needs the whole topic) and applies records in offset order:
//! a record whose version is not above the one held for its key is ignored, a tombstone (null
//! payload) removes the key. That is right whether or not the broker has compacted the topic
//! yet: compaction only removes records a later one overrides. The ingress serves no request
//! until the topic is read up to the high watermarks taken at start, or until a deadline passes
//! (then it either refuses to start or — the default — starts open, see [`Follower::start`]).
//! It then follows the topic with the decision path's fetch wait (`tollgate_runtime::kafka`):
//! on Kafka a decision reaches the cache as soon as it is produced, on a broker that only polls
//! its storage (Tansu) within one wait.
//!
//! **Lookup.** A request's rules give their scope values (`Rule::scope_of`); each `rule_id/scope`
//! is one hash-map lookup in a key buffer reused for the whole request.
//!
//! **Local counting between decisions.** The enforcer learns of spend only from usage events,
//! which are published when requests end; between two decisions an ingress would otherwise admit
//! a burst of any size into a scope that is one request from its limit. So when the enforcer
//! publishes `Watch` with the `headroom` left, every ingress counts what it admits into that key
//! (requests: 1 at admission; tokens: the input estimate at admission, settled to the real total
//! when the request ends; cost: at the end) and treats the scope as breached once its own count
//! reaches the headroom. A newer decision says up to which end time its `observed` counts usage
//! (`covered_until_us`); the ingress then drops from its count what ended by then and keeps what
//! is still in flight or ended later, so nothing this ingress admitted is forgotten between two
//! decisions nor counted twice (a request is dropped from the count once its end time is
//! covered; its event may have reached the enforcer a little earlier, which errs towards
//! blocking). The overshoot past the limit is thereby bounded by what is admitted but not yet
//! counted: for a request limit nothing (admission is an atomic check-and-add), for a token
//! limit the output of requests already in flight (their input is counted at admission), for a
//! cost limit the cost of requests already in flight — DESIGN's target of "no more than the
//! requests already in flight" — instead of the request rate times the decision delay. With
//! several ingresses each counts against the whole headroom, so the bound is per ingress; a
//! single decision later, the enforcer's own totals take over.
//!
//! **Cutting streams.** Streaming requests under a rule with `cut_streams: true` register under
//! their key; a `Breached` decision with `cut_streams` (not in audit) — or the local count
//! reaching the headroom — cancels them, and each stream ends with an SSE error event.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Context;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::decision::{BreachDecision, DecisionState, Measure};
use tracing::{debug, error, info, warn};

use crate::metrics;

/// What this ingress admitted into one key that the enforcer's figure does not include yet: the
/// requests still in flight (at their admission estimate) and those that ended after the usage
/// the last decision covers. It outlives each decision of its key, so a request admitted under
/// one decision and ending under the next is still counted.
#[derive(Debug, Default)]
pub struct LocalCount {
    /// In units of the key's measure.
    total: AtomicI64,
    /// (end time in µs, amount) of requests that ended, in the order they ended.
    ended: Mutex<VecDeque<(i64, i64)>>,
}

impl LocalCount {
    /// Forgets what ended at or before `covered_until_us`: the enforcer has counted it.
    fn cover(&self, covered_until_us: i64) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(&(at, amount)) = ended.front() {
            if at > covered_until_us {
                break;
            }
            self.total.fetch_sub(amount, Ordering::AcqRel);
            ended.pop_front();
        }
    }

    fn ended(&self, at_us: i64, amount: i64) {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).push_back((at_us, amount));
    }
}

/// One cached decision and what this ingress admitted into its key beyond it.
#[derive(Debug)]
pub struct Entry {
    pub decision: BreachDecision,
    /// In units of `decision.measure`; only counted while the decision is `Watch`.
    local: Arc<LocalCount>,
}

impl Entry {
    /// The entry for a new decision, keeping what the key's previous entry counted beyond the
    /// usage this decision covers.
    fn new(decision: BreachDecision, previous: Option<&Entry>) -> Self {
        let local = previous.map(|p| Arc::clone(&p.local)).unwrap_or_default();
        local.cover(decision.covered_until_us);
        Self { decision, local }
    }

    /// What this ingress admitted into the key that the decision does not include.
    pub fn local(&self) -> i64 {
        self.local.total.load(Ordering::Acquire)
    }

    /// The best current figure: the enforcer's `observed` plus what this ingress added since.
    pub fn observed(&self) -> i64 {
        self.decision.observed.saturating_add(self.local())
    }

    /// A `Watch` whose headroom this ingress has used up.
    pub fn locally_breached(&self) -> bool {
        self.decision.state == DecisionState::Watch && self.local() >= self.decision.headroom
    }

    /// Whether requests of the key get the rule's action now.
    pub fn breached(&self) -> bool {
        self.decision.state == DecisionState::Breached || self.locally_breached()
    }

    /// Adds `amount` unless the headroom is already used up (atomically: concurrent admissions
    /// never both take the last unit).
    fn try_admit(&self, amount: i64) -> bool {
        let headroom = self.decision.headroom;
        self.local
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur < headroom).then(|| cur.saturating_add(amount))
            })
            .is_ok()
    }
}

/// What applying one record did to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new key, or a higher version of a held one.
    Stored,
    /// Not above the version held: ignored.
    Stale,
    /// A tombstone removed the key.
    Removed,
    /// A tombstone for a key not held.
    Absent,
}

/// The in-memory decision cache, shared by the follower (writes) and the request path (reads).
pub struct DecisionCache {
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    /// Bumped on every change that may lift a breach; queued requests wait on it.
    changes: watch::Sender<u64>,
    /// In-flight streams by key, for `cut_streams`.
    streams: Mutex<HashMap<String, StreamGroup>>,
    next_group: AtomicU64,
    /// `--audit-only`: never cut streams either.
    audit_only: bool,
    ready: AtomicBool,
    /// When this ingress last served a request (seconds since `epoch`), and the follower's wake-up
    /// for the first request after a quiet spell: its fetch wait follows the ingress's traffic.
    epoch: Instant,
    last_request_s: AtomicU64,
    request_after_quiet: Notify,
}

struct StreamGroup {
    id: u64,
    token: CancellationToken,
    streams: usize,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache").field("len", &self.len()).field("audit_only", &self.audit_only).finish()
    }
}

impl DecisionCache {
    pub fn new(audit_only: bool) -> Arc<Self> {
        Arc::new(Self {
            entries: RwLock::new(HashMap::new()),
            changes: watch::Sender::new(0),
            streams: Mutex::new(HashMap::new()),
            next_group: AtomicU64::new(1),
            audit_only,
            ready: AtomicBool::new(false),
            epoch: Instant::now(),
            last_request_s: AtomicU64::new(0),
            request_after_quiet: Notify::new(),
        })
    }

    /// A request is being served: the follower keeps (or takes back) its short fetch wait. One
    /// relaxed load per request, a store once a second.
    pub fn note_request(&self) {
        let now = self.epoch.elapsed().as_secs();
        if self.last_request_s.load(Ordering::Relaxed) != now {
            let before = self.last_request_s.swap(now, Ordering::Relaxed);
            if now.saturating_sub(before) >= tollgate_runtime::kafka::QUIET_AFTER.as_secs() {
                self.request_after_quiet.notify_one();
            }
        }
    }

    /// Whether no request was served for `QUIET_AFTER`.
    fn quiet(&self) -> bool {
        let last = self.last_request_s.load(Ordering::Relaxed);
        self.epoch.elapsed().as_secs().saturating_sub(last) >= tollgate_runtime::kafka::QUIET_AFTER.as_secs()
    }

    pub fn audit_only(&self) -> bool {
        self.audit_only
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the topic has been read up to the watermarks taken at start.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        metrics::decisions_ready(true);
    }

    /// The decision held for `key` (`rule_id/scope`).
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    /// Applies one record of the topic: `None` is a tombstone.
    pub fn apply(&self, key: &str, decision: Option<BreachDecision>) -> Applied {
        let (applied, cut, size) = {
            let mut map = self.entries.write().unwrap_or_else(PoisonError::into_inner);
            let (applied, cut) = match decision {
                None => (if map.remove(key).is_some() { Applied::Removed } else { Applied::Absent }, false),
                Some(d) => match map.get(key) {
                    Some(held) if held.decision.version >= d.version => (Applied::Stale, false),
                    held => {
                        let cut = d.state == DecisionState::Breached && d.cut_streams && !d.audit && !self.audit_only;
                        let entry = Entry::new(d, held.map(|h| h.as_ref()));
                        map.insert(key.to_owned(), Arc::new(entry));
                        (Applied::Stored, cut)
                    }
                },
            };
            (applied, cut, map.len())
        };
        metrics::decisions_cached(size);
        if matches!(applied, Applied::Stored | Applied::Removed) {
            self.changes.send_modify(|g| *g = g.wrapping_add(1));
        }
        if cut {
            self.cut(key);
        }
        applied
    }

    /// A receiver that changes whenever a decision is stored or removed, or a local count
    /// falls back under its headroom.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Counts one admitted request into the `Watch` keys it falls in. Fails with the index of
    /// the first key whose headroom is used up (after undoing what it added to the others).
    pub fn admit(self: &Arc<Self>, watches: &[WatchHold], estimate_tokens: i64) -> Result<Ticket, usize> {
        let mut holds = Vec::with_capacity(watches.len());
        for (i, w) in watches.iter().enumerate() {
            let amount = match w.entry.decision.measure {
                Measure::Requests => 1,
                Measure::Tokens => estimate_tokens.max(0),
                Measure::CostNanos => 0,
            };
            if !w.entry.try_admit(amount) {
                for h in &holds {
                    self.add_local(h, -h.admitted);
                }
                return Err(i);
            }
            holds.push(Hold {
                key: w.key.clone(),
                entry: Arc::clone(&w.entry),
                admitted: amount,
                cut_streams: w.cut_streams,
            });
        }
        Ok(Ticket { cache: Arc::clone(self), holds, settled: AtomicBool::new(false) })
    }

    fn add_local(&self, h: &Hold, delta: i64) {
        if delta == 0 {
            return;
        }
        let prev = h.entry.local.total.fetch_add(delta, Ordering::AcqRel);
        let now = prev.saturating_add(delta);
        let headroom = h.entry.decision.headroom;
        if prev < headroom && now >= headroom {
            debug!(key = %h.key, local = now, headroom, "local count reached the headroom");
            if h.cut_streams && !self.audit_only && self.is_current(&h.key, &h.entry) {
                self.cut(&h.key);
            }
        } else if prev >= headroom && now < headroom {
            // The estimate was above what the request used: headroom came back.
            self.changes.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    fn is_current(&self, key: &str, entry: &Arc<Entry>) -> bool {
        self.get(key).is_some_and(|held| Arc::ptr_eq(&held, entry))
    }

    /// Registers an in-flight stream under `rule_id/scope`; it is cut when the key breaches.
    pub fn register_stream(self: &Arc<Self>, rule_id: &str, scope: &str) -> StreamCut {
        let key = tollgate_schemas::decision::decision_key(rule_id, scope);
        let (group, token) = {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            let g = streams.entry(key.clone()).or_insert_with(|| StreamGroup {
                id: self.next_group.fetch_add(1, Ordering::Relaxed),
                token: CancellationToken::new(),
                streams: 0,
            });
            g.streams += 1;
            (g.id, g.token.clone())
        };
        StreamCut {
            cache: Arc::clone(self),
            key,
            rule_id: rule_id.to_owned(),
            scope: scope.to_owned(),
            group,
            cancelled: Box::pin(token.cancelled_owned()),
        }
    }

    /// Ends every stream registered under `key`; returns how many there were.
    pub fn cut(&self, key: &str) -> usize {
        let group = self.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(key);
        match group {
            Some(g) => {
                info!(key, streams = g.streams, "cutting in-flight streams of a breached scope");
                g.token.cancel();
                g.streams
            }
            None => 0,
        }
    }

    /// Streams registered under `key` and still running.
    pub fn streams_registered(&self, key: &str) -> usize {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner).get(key).map_or(0, |g| g.streams)
    }
}

/// A `Watch` key a request falls in, to be counted at admission.
#[derive(Debug, Clone)]
pub struct WatchHold {
    pub key: String,
    pub entry: Arc<Entry>,
    /// The rule asks for in-flight streams to be cut when the count reaches the headroom.
    pub cut_streams: bool,
}

struct Hold {
    key: String,
    entry: Arc<Entry>,
    admitted: i64,
    cut_streams: bool,
}

/// What one admitted request added to local counts; settled once when the request ends. Dropped
/// unsettled (the request never reached a provider), it takes back what it added.
pub struct Ticket {
    cache: Arc<DecisionCache>,
    holds: Vec<Hold>,
    settled: AtomicBool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("keys", &self.holds.iter().map(|h| &h.key).collect::<Vec<_>>()).finish()
    }
}

impl Ticket {
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }

    /// The request ended having used `tokens` (`UsageEvent::total_tokens`) and `cost_nanos`: token counts
    /// move from the estimate to the real total, cost is added. Only the first call counts.
    pub fn settle(&self, tokens: i64, cost_nanos: i64) {
        if self.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let ended_at = crate::clock::now_us();
        for h in &self.holds {
            let (delta, amount) = match h.entry.decision.measure {
                Measure::Requests => (0, h.admitted),
                Measure::Tokens => (tokens.saturating_sub(h.admitted), tokens),
                Measure::CostNanos => (cost_nanos, cost_nanos),
            };
            self.cache.add_local(h, delta);
            // From now on the amount is in a usage event: the decision that covers it drops it.
            h.entry.local.ended(ended_at, amount);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            for h in &self.holds {
                self.cache.add_local(h, -h.admitted);
            }
        }
    }
}

/// A streaming request's registration under one key; resolves when the key's streams are cut.
pub struct StreamCut {
    cache: Arc<DecisionCache>,
    key: String,
    pub rule_id: String,
    pub scope: String,
    group: u64,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl StreamCut {
    /// Ready once the stream must end.
    pub fn poll_cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.cancelled.as_mut().poll(cx).is_ready()
    }

    /// The version of the decision held for the key now (the one that cut, as a rule).
    pub fn version(&self) -> i64 {
        self.cache.get(&self.key).map_or(0, |e| e.decision.version)
    }

    /// The decision held for the key now.
    pub fn entry(&self) -> Option<Arc<Entry>> {
        self.cache.get(&self.key)
    }
}

impl Drop for StreamCut {
    fn drop(&mut self) {
        let mut streams = self.cache.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = streams.get_mut(&self.key) {
            if g.id == self.group {
                g.streams = g.streams.saturating_sub(1);
                if g.streams == 0 {
                    streams.remove(&self.key);
                }
            }
        }
    }
}

/// Where and how the breaches topic is read.
#[derive(Debug, Clone)]
pub struct FollowConfig {
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka settings (security, SASL), applied last.
    pub extra: Vec<(String, String)>,
    /// How long start-up waits for the topic to be read up to its watermarks.
    pub start_timeout: Duration,
    /// Refuse to start (instead of starting open) when the deadline passes.
    pub required: bool,
}

/// How far ahead of this ingress's clock a decision's version may be (clock skew between hosts);
/// beyond it the decision is ignored and counted (`decisions_ignored_total{reason="future_version"}`).
const MAX_VERSION_AHEAD_US: i64 = 3_600_000_000;
/// Between two metadata checks (new partitions, a topic created after start).
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// Between two looks for a topic that does not exist (yet).
const MISSING_TOPIC_EVERY: Duration = Duration::from_secs(5);
/// Between two tries while the broker does not answer.
const RETRY_EVERY: Duration = Duration::from_secs(1);
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
/// After one logged consumer error, further ones within this window are only counted.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The task that keeps the cache in step with the topic.
pub struct Follower {
    handle: JoinHandle<()>,
    stop: CancellationToken,
}

impl Follower {
    /// Starts following the topic and waits until it is read up to the high watermarks taken at
    /// start, at most `start_timeout`.
    ///
    /// When the deadline passes (the broker is unreachable, or the topic is slow to read), the
    /// ingress **starts open** by default: it logs an error, sets `tollgate_ingress_decisions_ready`
    /// to 0, serves without the decisions it has not read, and keeps reading (the gauge turns 1 once
    /// caught up). The ingress is on the path of every model call, and the enforcer cannot decide
    /// anything new without the broker either, so a broker outage should not also take every
    /// application's LLM traffic down at the next restart (usage events wait in the spool in the
    /// same situation). With `required` it refuses to start instead. A topic that does not exist
    /// holds no decisions: the ingress starts at once and picks the topic up when it appears.
    pub async fn start(
        cache: Arc<DecisionCache>,
        cfg: &FollowConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Follower> {
        let consumer: StreamConsumer = follower_config(&cfg.brokers, false, &cfg.extra).create()?;
        metrics::decisions_ready(false);
        let (tx, rx) = oneshot::channel();
        let last_error = Arc::new(Mutex::new(None::<String>));
        // Its own token: the cache keeps following while in-flight requests drain after
        // shutdown begins; `run` stops it once the server is done.
        let stop = CancellationToken::new();
        let task = Task {
            consumer: Arc::new(consumer),
            brokers: cfg.brokers.clone(),
            extra: cfg.extra.clone(),
            quiet: false,
            cache: Arc::clone(&cache),
            topic: cfg.topic.clone(),
            codec: BreachDecision::codec()?,
            catch_up: CatchUp { tx: Some(tx), behind: HashMap::new() },
            last_error: Arc::clone(&last_error),
            stop: stop.clone(),
            last_logged: None,
            suppressed: 0,
        };
        let handle = tokio::spawn(task.run());
        let started = Instant::now();
        let follower = Follower { handle, stop };
        tokio::select! {
            r = tokio::time::timeout(cfg.start_timeout, rx) => match r {
                Ok(Ok(())) => info!(
                    topic = %cfg.topic,
                    decisions = cache.len(),
                    ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "breach decisions loaded"
                ),
                Ok(Err(_)) => {} // the task stopped: shutdown
                Err(_) => {
                    let cause = last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
                        .unwrap_or_else(|| "the topic was not read up to its end in time".into());
                    if cfg.required {
                        follower.stop().await;
                        anyhow::bail!(
                            "breach decisions of topic {} not loaded within {} s from {}: {cause}",
                            cfg.topic, cfg.start_timeout.as_secs(), cfg.brokers
                        );
                    }
                    error!(
                        topic = %cfg.topic, brokers = %cfg.brokers, error = %cause,
                        "breach decisions not loaded in time; serving WITHOUT them (fail open) while reading on"
                    );
                }
            },
            () = shutdown.cancelled() => {}
        }
        Ok(follower)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.handle.await {
            warn!(error = %e, "decision follower task failed");
        }
    }
}

/// Partitions still to be read up to their start-time high watermark.
struct CatchUp {
    tx: Option<oneshot::Sender<()>>,
    behind: HashMap<i32, i64>,
}

struct Task {
    consumer: Arc<StreamConsumer>,
    /// The consumer's settings but its fetch wait and the operator's own (`extra`), to re-create
    /// it with the other wait.
    brokers: String,
    extra: Vec<(String, String)>,
    /// Whether the consumer has its quiet fetch wait (no request for `QUIET_AFTER`).
    quiet: bool,
    cache: Arc<DecisionCache>,
    topic: String,
    codec: AvroCodec,
    catch_up: CatchUp,
    last_error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Task {
    fn caught_up(&mut self) {
        if let Some(tx) = self.catch_up.tx.take() {
            self.cache.set_ready();
            let _ = tx.send(());
        }
    }

    fn note_error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let text = format!("{what}: {e}");
        metrics::decision_consumer_error();
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(text.clone());
        let now = Instant::now();
        if self.last_logged.is_none_or(|t| now.duration_since(t) >= ERROR_LOG_EVERY) {
            warn!(topic = %self.topic, error = %text, suppressed = self.suppressed, "breach decision consumer");
            self.last_logged = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    /// Partitions of the topic; `Ok(empty)` when the topic does not exist.
    async fn partitions(&self) -> Result<Vec<i32>, KafkaError> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let found = tokio::task::spawn_blocking(move || {
            let md = consumer.fetch_metadata(Some(&topic), BROKER_TIMEOUT)?;
            Ok(tollgate_runtime::partitions_in(&md, &topic))
        })
        .await;
        match found {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "breaches topic metadata task failed");
                Err(KafkaError::Canceled)
            }
        }
    }

    /// Assigns `partitions`: those in `positions` resume there, the others start at the beginning.
    fn assign(&mut self, partitions: &[i32], positions: &HashMap<i32, Offset>) -> bool {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for p in partitions {
            let at = positions.get(p).copied().unwrap_or(Offset::Beginning);
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, at) {
                self.note_error("building the assignment", &e);
                return false;
            }
        }
        match self.consumer.assign(&tpl) {
            Ok(()) => true,
            Err(e) => {
                self.note_error("assigning the breaches topic", &e);
                false
            }
        }
    }

    /// The high watermark of each non-empty partition (`i64::MAX` where the broker did not say:
    /// the partition's end-of-file event marks it read).
    async fn watermarks(&self, partitions: &[i32]) -> HashMap<i32, i64> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        let parts = partitions.to_vec();
        tokio::task::spawn_blocking(move || {
            parts
                .into_iter()
                .filter_map(|p| match consumer.fetch_watermarks(&topic, p, BROKER_TIMEOUT) {
                    Ok((low, high)) if high <= low => None,
                    Ok((_, high)) => Some((p, high)),
                    Err(e) => {
                        debug!(partition = p, error = %e, "no watermark; waiting for the partition's end instead");
                        Some((p, i64::MAX))
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn run(mut self) {
        // 1. The partitions (the topic may not exist yet, the broker may be away).
        let mut partitions = loop {
            let found = tokio::select! {
                r = self.partitions() => r,
                () = self.stop.cancelled() => return,
            };
            match found {
                Ok(p) if !p.is_empty() => break p,
                Ok(_) => {
                    if self.catch_up.tx.is_some() {
                        warn!(topic = %self.topic, "breaches topic does not exist; no breach decision applies until it does");
                        self.caught_up();
                    }
                }
                Err(e) => self.note_error("reading the breaches topic's metadata", &e),
            }
            let wait = if self.catch_up.tx.is_some() { RETRY_EVERY } else { MISSING_TOPIC_EVERY };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return,
            }
        };
        // 2. Everything from the beginning, and how far "caught up" is.
        while !self.assign(&partitions, &HashMap::new()) {
            tokio::select! {
                () = tokio::time::sleep(RETRY_EVERY) => {}
                () = self.stop.cancelled() => return,
            }
        }
        if self.catch_up.tx.is_some() {
            self.catch_up.behind = tokio::select! {
                w = self.watermarks(&partitions) => w,
                () = self.stop.cancelled() => return,
            };
            if self.catch_up.behind.is_empty() {
                self.caught_up();
            }
        }
        info!(topic = %self.topic, partitions = partitions.len(), "following breach decisions");
        // 3. Follow, with the short fetch wait while the ingress serves requests and the long one
        // after a quiet spell (tollgate_runtime::kafka).
        let mut consumer = Arc::clone(&self.consumer);
        let mut metadata = tokio::time::interval(METADATA_EVERY);
        metadata.reset();
        let mut activity = tokio::time::interval(Duration::from_secs(1));
        activity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cache = Arc::clone(&self.cache);
        loop {
            let mut switch_to = None;
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = cache.request_after_quiet.notified(), if self.quiet => switch_to = Some(false),
                _ = activity.tick(), if !self.quiet && self.catch_up.tx.is_none() => {
                    if cache.quiet() {
                        switch_to = Some(true);
                    }
                }
                m = consumer.recv() => match m {
                    Ok(msg) => self.on_message(&msg),
                    Err(KafkaError::PartitionEOF(p)) => {
                        if self.catch_up.behind.remove(&p).is_some() && self.catch_up.behind.is_empty() {
                            self.caught_up();
                        }
                    }
                    Err(e) => self.note_error("consuming", &e),
                },
                _ = metadata.tick() => {
                    if let Ok(now) = self.partitions().await {
                        if now.iter().any(|p| !partitions.contains(p)) {
                            let positions = self.positions();
                            info!(topic = %self.topic, partitions = now.len(), "breaches topic has new partitions");
                            if self.assign(&now, &positions) {
                                partitions = now;
                            }
                        }
                    }
                }
            }
            if let Some(quiet) = switch_to {
                if let Some(old) = self.switch_wait(&partitions, quiet) {
                    consumer = Arc::clone(&self.consumer);
                    // Closing a consumer may block briefly: not on an async worker.
                    tokio::task::spawn_blocking(move || drop(old));
                }
            }
        }
        debug!("decision follower stopped");
    }

    /// Re-creates the consumer with the quiet or the active fetch wait, each partition where the
    /// old one was, and returns the old one; on failure keeps the old one.
    fn switch_wait(&mut self, partitions: &[i32], quiet: bool) -> Option<Arc<StreamConsumer>> {
        let positions = self.positions();
        let fresh: StreamConsumer = match follower_config(&self.brokers, quiet, &self.extra).create() {
            Ok(c) => c,
            Err(e) => {
                self.note_error("re-creating the consumer", &e);
                return None;
            }
        };
        let old = std::mem::replace(&mut self.consumer, Arc::new(fresh));
        if !self.assign(partitions, &positions) {
            self.consumer = old;
            return None;
        }
        self.quiet = quiet;
        tollgate_runtime::kafka::quiet_gauge(tollgate_runtime::kafka::Follow::Decisions, quiet);
        debug!(quiet, "decision follower switched fetch wait");
        Some(old)
    }

    /// Where each assigned partition is now (to keep it across a re-assignment).
    fn positions(&self) -> HashMap<i32, Offset> {
        self.consumer
            .position()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter(|e| matches!(e.offset(), Offset::Offset(_)))
                    .map(|e| (e.partition(), e.offset()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn on_message(&mut self, msg: &BorrowedMessage<'_>) {
        let partition = msg.partition();
        if let Some(high) = self.catch_up.behind.get(&partition) {
            if msg.offset() + 1 >= *high {
                self.catch_up.behind.remove(&partition);
            }
        }
        let live = self.catch_up.tx.is_none();
        match msg.key().map(std::str::from_utf8) {
            Some(Ok(key)) => {
                let decision = match msg.payload() {
                    None => None,
                    Some(bytes) => match self.codec.decode::<BreachDecision>(bytes) {
                        // Versions are the enforcer's clock in microseconds: one far ahead of
                        // ours could never be superseded, so it would pin its key for good.
                        Ok(d) if d.version > crate::clock::now_us().saturating_add(MAX_VERSION_AHEAD_US) => {
                            metrics::decision_ignored("future_version");
                            warn!(
                                key,
                                version = d.version,
                                offset = msg.offset(),
                                "breach decision with a version far in the future; ignored"
                            );
                            return self.after_message();
                        }
                        Ok(d) if d.key() == key => Some(d),
                        Ok(d) => {
                            metrics::decision_ignored("key_mismatch");
                            warn!(key, payload_key = %d.key(), offset = msg.offset(), "breach decision under another key; ignored");
                            return self.after_message();
                        }
                        Err(e) => {
                            metrics::decision_ignored("undecodable");
                            warn!(key, offset = msg.offset(), error = %e, "undecodable breach decision; ignored");
                            return self.after_message();
                        }
                    },
                };
                let state = decision.as_ref().map_or("tombstone", |d| d.state.as_str());
                let decided_at_us = decision.as_ref().map(|d| d.decided_at_us);
                match self.cache.apply(key, decision) {
                    Applied::Stored | Applied::Removed | Applied::Absent => {
                        metrics::decision_applied(state);
                        if let (true, Some(at)) = (live, decided_at_us) {
                            let delay_us = crate::clock::now_us().saturating_sub(at).max(0);
                            metrics::decision_delay(delay_us as f64 / 1e6);
                        }
                        debug!(key, state, "breach decision applied");
                    }
                    Applied::Stale => {
                        metrics::decision_ignored("stale_version");
                        debug!(key, "breach decision with an old version; ignored");
                    }
                }
            }
            _ => {
                metrics::decision_ignored("no_key");
                warn!(offset = msg.offset(), partition, "breach decision without a UTF-8 key; ignored");
            }
        }
        self.after_message();
    }

    fn after_message(&mut self) {
        if self.catch_up.tx.is_some() && self.catch_up.behind.is_empty() {
            self.caught_up();
        }
    }
}

/// The decision follower's consumer: it never joins or commits (a group id only keeps
/// librdkafka's consumer queue in use), and fetches with the quiet or the active wait.
fn follower_config(brokers: &str, quiet: bool, extra: &[(String, String)]) -> ClientConfig {
    let settings = [
        ("group.id", "tollgate-ingress-decisions"),
        ("client.id", "tollgate-ingress-decisions"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "true"),
        ("auto.offset.reset", "earliest"),
        ("fetch.error.backoff.ms", "100"),
        ("reconnect.backoff.max.ms", "2000"),
    ];
    let fetch = Some((tollgate_runtime::kafka::Follow::Decisions, quiet));
    tollgate_runtime::kafka::client_config(brokers, &settings, fetch, extra)
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn decision(state: DecisionState, measure: Measure, headroom: i64, version: i64) -> BreachDecision {
        BreachDecision {
            measure,
            limit: 100,
            observed: 100 - headroom,
            headroom,
            ..BreachDecision::example("r", "session:s1", state, version)
        }
    }

    const KEY: &str = "r/session:s1";

    fn watch_of(cache: &Arc<DecisionCache>, cut_streams: bool) -> Vec<WatchHold> {
        vec![WatchHold { key: KEY.into(), entry: cache.get(KEY).unwrap(), cut_streams }]
    }

    #[test]
    fn versions_only_move_forward_and_tombstones_remove() {
        let cache = DecisionCache::new(false);
        assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 5))), Applied::Stored);
        assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 4))), Applied::Stale);
        assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 5))), Applied::Stale);
        assert!(cache.get(KEY).unwrap().breached(), "the lower and equal versions did not apply");
        assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 50, 6))), Applied::Stored);
        assert!(!cache.get(KEY).unwrap().breached());
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.apply(KEY, None), Applied::Removed);
        assert!(cache.get(KEY).is_none());
        assert_eq!(cache.apply(KEY, None), Applied::Absent);
        // After a tombstone the key starts afresh (the topic's order is the truth).
        assert_eq!(cache.apply(KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 1))), Applied::Stored);
        assert!(cache.get(KEY).unwrap().breached());
    }

    #[test]
    fn a_replay_in_any_compaction_state_ends_with_the_last_decision() {
        // The same history, uncompacted and compacted, gives the same cache.
        let history = [
            (KEY, Some(decision(DecisionState::Watch, Measure::Tokens, 10, 1))),
            (KEY, Some(decision(DecisionState::Breached, Measure::Tokens, 0, 2))),
            ("r/session:s2", Some(decision(DecisionState::Breached, Measure::Tokens, 0, 1))),
            (KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 60, 3))),
            ("r/session:s2", None),
        ];
        let full = DecisionCache::new(false);
        for (k, d) in history.clone() {
            full.apply(k, d);
        }
        let compacted = DecisionCache::new(false);
        compacted.apply(KEY, Some(decision(DecisionState::Clear, Measure::Tokens, 60, 3)));
        assert_eq!(full.len(), compacted.len());
        assert_eq!(full.get(KEY).unwrap().decision, compacted.get(KEY).unwrap().decision);
    }

    #[test]
    fn watch_requests_are_admitted_up_to_the_headroom_then_breached_until_a_newer_decision() {
        let cache = DecisionCache::new(false);
        cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Requests, 3, 1)));
        let watches = watch_of(&cache, false);
        let tickets: Vec<Ticket> = (0..3).map(|_| cache.admit(&watches, 0).unwrap()).collect();
        assert!(cache.get(KEY).unwrap().locally_breached());
        assert_eq!(cache.admit(&watches, 0).err(), Some(0), "the fourth request finds the headroom used up");
        assert_eq!(cache.get(KEY).unwrap().observed(), 100, "observed = the enforcer's 97 + 3 admitted here");
        for t in &tickets {
            t.settle(1_000, 1_000);
        }
        assert_eq!(cache.get(KEY).unwrap().local(), 3, "settling changes nothing for a request count");
        // A newer decision that has not seen these requests' events yet keeps them counted…
        let mut stale = decision(DecisionState::Watch, Measure::Requests, 3, 2);
        stale.covered_until_us = crate::clock::now_us() - 60_000_000;
        cache.apply(KEY, Some(stale));
        assert_eq!(cache.get(KEY).unwrap().local(), 3, "not covered yet: still counted here");
        assert!(cache.get(KEY).unwrap().breached());
        // …one that covers them starts the count afresh.
        let mut fresh = decision(DecisionState::Watch, Measure::Requests, 3, 3);
        fresh.covered_until_us = crate::clock::now_us();
        cache.apply(KEY, Some(fresh));
        assert_eq!(cache.get(KEY).unwrap().local(), 0, "covered by the enforcer: dropped here");
        assert!(!cache.get(KEY).unwrap().breached());
    }

    #[test]
    fn a_request_in_flight_across_decisions_is_counted_under_the_newer_one() {
        let cache = DecisionCache::new(false);
        cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::CostNanos, 1_000, 1)));
        let in_flight = cache.admit(&watch_of(&cache, false), 0).unwrap();
        let mut next = decision(DecisionState::Watch, Measure::CostNanos, 1_000, 2);
        next.covered_until_us = crate::clock::now_us();
        cache.apply(KEY, Some(next));
        in_flight.settle(0, 1_200);
        assert_eq!(cache.get(KEY).unwrap().local(), 1_200, "settled into the key, not the replaced entry");
        assert!(cache.get(KEY).unwrap().locally_breached());
    }

    #[test]
    fn watch_tokens_count_the_estimate_then_settle_to_the_real_total() {
        let cache = DecisionCache::new(false);
        cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Tokens, 1_000, 1)));
        let watches = watch_of(&cache, false);
        let entry = cache.get(KEY).unwrap();
        let a = cache.admit(&watches, 300).unwrap();
        assert_eq!(entry.local(), 300);
        a.settle(450, 0);
        assert_eq!(entry.local(), 450, "estimate 300 replaced by the real 450");
        a.settle(10_000, 0);
        assert_eq!(entry.local(), 450, "settled once");
        let b = cache.admit(&watches, 600).unwrap();
        assert_eq!(entry.local(), 1_050);
        assert!(entry.locally_breached());
        assert!(cache.admit(&watches, 1).is_err());
        let mut rx = cache.subscribe();
        rx.borrow_and_update();
        drop(b); // never reached a provider: its estimate is taken back
        assert_eq!(entry.local(), 450);
        assert!(!entry.locally_breached());
        assert!(rx.has_changed().unwrap(), "headroom coming back wakes queued requests");
    }

    #[test]
    fn watch_cost_counts_at_the_end() {
        let cache = DecisionCache::new(false);
        cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::CostNanos, 5_000, 1)));
        let watches = watch_of(&cache, true);
        let entry = cache.get(KEY).unwrap();
        let a = cache.admit(&watches, 999).unwrap();
        assert_eq!(entry.local(), 0, "cost is not known at admission");
        let mut cut = cache.register_stream("r", "session:s1");
        a.settle(999, 5_000);
        assert_eq!(entry.local(), 5_000);
        assert!(entry.locally_breached());
        let waker = futures::task::noop_waker();
        assert!(cut.poll_cut(&mut Context::from_waker(&waker)), "the local breach cut the registered stream");
    }

    #[test]
    fn concurrent_admissions_never_pass_a_request_headroom() {
        let cache = DecisionCache::new(false);
        cache.apply(KEY, Some(decision(DecisionState::Watch, Measure::Requests, 100, 1)));
        let watches = watch_of(&cache, false);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(t) = cache.admit(&watches, 0) {
                            t.settle(1, 1);
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_failed_admission_takes_back_what_it_added_to_other_keys() {
        let cache = DecisionCache::new(false);
        cache.apply("a/global", Some(decision(DecisionState::Watch, Measure::Requests, 10, 1)));
        cache.apply("b/global", Some(decision(DecisionState::Watch, Measure::Requests, 0, 1)));
        let watches = vec![
            WatchHold { key: "a/global".into(), entry: cache.get("a/global").unwrap(), cut_streams: false },
            WatchHold { key: "b/global".into(), entry: cache.get("b/global").unwrap(), cut_streams: false },
        ];
        assert_eq!(cache.admit(&watches, 0).err(), Some(1));
        assert_eq!(cache.get("a/global").unwrap().local(), 0);
    }

    #[test]
    fn breached_decisions_with_cut_streams_cut_registered_streams_only_of_their_key() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let cache = DecisionCache::new(false);
        let mut mine = cache.register_stream("r", "session:s1");
        let mut other = cache.register_stream("r", "session:s2");
        assert_eq!(cache.streams_registered(KEY), 1);
        let mut d = decision(DecisionState::Breached, Measure::CostNanos, 0, 1);
        cache.apply(KEY, Some(d.clone()));
        assert!(!mine.poll_cut(&mut cx), "a decision without cut_streams leaves streams alone");
        d.cut_streams = true;
        d.audit = true;
        d.version = 2;
        cache.apply(KEY, Some(d.clone()));
        assert!(!mine.poll_cut(&mut cx), "an audit decision never cuts");
        d.audit = false;
        d.version = 3;
        cache.apply(KEY, Some(d.clone()));
        assert!(mine.poll_cut(&mut cx));
        assert!(!other.poll_cut(&mut cx));
        assert_eq!(mine.version(), 3);
        drop(mine);
        drop(other);
        assert_eq!(cache.streams_registered("r/session:s2"), 0, "registrations end with their stream");

        let audit_only = DecisionCache::new(true);
        let mut s = audit_only.register_stream("r", "session:s1");
        d.version = 4;
        audit_only.apply(KEY, Some(d));
        assert!(!s.poll_cut(&mut cx), "--audit-only never cuts");
    }
}
