//! The decision cache itself: the decisions held by key (lookups, versions, tombstones), what
//! this ingress admitted into `Watch` keys since each decision, its own counts, and the streams
//! to cut.
//!
//! **Lookup.** A request's rules give their scope values (`Rule::scope_of`); each `rule_id/scope`
//! is one hash-map lookup in a key buffer reused for the whole request.
//!
//! **Local counting between decisions.** The enforcer learns of spend only from usage events,
//! which are published when requests end; between two decisions an ingress would otherwise admit
//! a burst of any size into a scope that is one request from its limit. So when the enforcer
//! publishes `Watch` with the `headroom` left, every ingress counts what it admits into that key
//! (what `Reservation` says at admission — one request, the input estimate, the worst-case cost —
//! settled to what the request used when it ends) and treats the scope as breached once its own count
//! reaches the headroom. A newer decision says up to which end time its `observed` counts usage
//! (`covered_until_us`); the ingress then drops from its count what ended by then and keeps what
//! is still in flight or ended later, so nothing this ingress admitted is forgotten between two
//! decisions nor counted twice (a request is dropped from the count once its usage event's
//! `ended_at_us` is covered: the very time the enforcer's `covered_until_us` is made of; events
//! settled out of end-time order stay counted until the later one is covered, which errs towards
//! blocking). The overshoot past the limit is thereby bounded by what is admitted but not yet
//! counted: for a request limit nothing (admission is an atomic check-and-add), for a token
//! limit the output of requests already in flight (their input is counted at admission), for a
//! cost limit the part of their cost past the reservation — DESIGN's target of "no more than the
//! requests already in flight" — instead of the request rate times the decision delay. With
//! several ingresses each counts against the whole headroom, so the bound is per ingress; a
//! single decision later, the enforcer's own totals take over.
//!
//! **Own counts.** Beside the decisions, the cache holds what this ingress admitted per rule and
//! scope in each rule's window, from the first request (`own`): the bound that needs no decision.
//!
//! **Cutting streams.** Streaming requests under a rule with `cut_streams: true` register under
//! their key; a `Breached` decision with `cut_streams` (not in audit) — or the local count
//! reaching the headroom — cancels them, and each stream ends with an SSE error event.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Context;
use std::time::Instant;

use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tollgate_schemas::decision::{BreachDecision, DecisionState, Measure};
use tracing::{debug, info};

use super::own::{OwnCount, OwnCounts, Reached};
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
    /// Not from the enforcer: this ingress's own count reached the rule's limit (`own_breach`).
    own: bool,
}

impl Entry {
    /// The entry for a new decision, keeping what the key's previous entry counted beyond the
    /// usage this decision covers.
    fn new(decision: BreachDecision, previous: Option<&Entry>) -> Self {
        let local = previous.map(|p| Arc::clone(&p.local)).unwrap_or_default();
        local.cover(decision.covered_until_us);
        Self { decision, local, own: false }
    }

    /// The breach this ingress's own count found: `decision` is `Breached` with the own count as
    /// `observed` and, as `window_end_us`, when that count falls back under the limit. Never
    /// stored in the cache; it answers the request that found it.
    pub fn own_breach(decision: BreachDecision) -> Self {
        Self { decision, local: Arc::default(), own: true }
    }

    /// What this ingress admitted into the key that the decision does not include.
    pub fn local(&self) -> i64 {
        self.local.total.load(Ordering::Acquire)
    }

    /// The best current figure: the enforcer's `observed` plus what this ingress added since.
    pub fn observed(&self) -> i64 {
        self.decision.observed.saturating_add(self.local())
    }

    /// Found by this ingress's own count (`own_breach`), not decided by the enforcer.
    pub fn is_own(&self) -> bool {
        self.own
    }

    /// A `Watch` whose headroom this ingress has used up, or a breach of its own count.
    pub fn locally_breached(&self) -> bool {
        self.own || (self.decision.state == DecisionState::Watch && self.local() >= self.decision.headroom)
    }

    /// Whether requests of the key get the rule's action now.
    pub fn breached(&self) -> bool {
        self.decision.state == DecisionState::Breached || self.locally_breached()
    }

    /// Adds `amount`, at most the whole headroom, unless the headroom is already used up
    /// (atomically: concurrent admissions never both take the last unit). Returns what was
    /// added (see `OwnCount::try_admit` for why it is capped).
    fn try_admit(&self, amount: i64) -> Option<i64> {
        let headroom = self.decision.headroom;
        let added = amount.min(headroom);
        self.local
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur < headroom).then(|| cur.saturating_add(added))
            })
            .ok()
            .map(|_| added)
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
    pub(super) request_after_quiet: Notify,
    /// What this ingress admitted per rule and scope, in the rule's window (`own`).
    own: OwnCounts,
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
        Self::with_own_keys(audit_only, super::own::DEFAULT_MAX_KEYS)
    }

    /// A cache whose own counts hold at most `max_own_keys` rule scopes.
    pub fn with_own_keys(audit_only: bool, max_own_keys: usize) -> Arc<Self> {
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
            own: OwnCounts::new(max_own_keys),
        })
    }

    /// This ingress's own admissions per rule and scope.
    pub fn own_counts(&self) -> &OwnCounts {
        &self.own
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
    pub(super) fn quiet(&self) -> bool {
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

    pub(super) fn set_ready(&self) {
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

    /// Counts one admitted request into its rules' own counts and the `Watch` keys it falls in,
    /// each with the amount `reserved` says for its measure. Fails with the first count that has
    /// no room left (after undoing what it added to the others).
    pub fn admit(
        self: &Arc<Self>,
        owns: &[OwnHold],
        watches: &[WatchHold],
        reserved: Reservation,
    ) -> Result<Ticket, Exhausted> {
        let at_us = crate::clock::now_us();
        let mut ticket =
            Ticket { cache: Arc::clone(self), holds: Vec::new(), owns: Vec::new(), settled: AtomicU32::new(0) };
        for (i, o) in owns.iter().enumerate() {
            let admitted = match o.count.try_admit(reserved.of(o.measure), o.limit, at_us) {
                Ok(added) => added,
                Err(reached) => return Err(Exhausted::Own(i, reached)), // the ticket's drop undoes the rest
            };
            ticket.owns.push(OwnTaken { hold: o.clone(), at_us, admitted });
        }
        for (i, w) in watches.iter().enumerate() {
            let Some(admitted) = w.entry.try_admit(reserved.of(w.entry.decision.measure)) else {
                return Err(Exhausted::Watch(i));
            };
            ticket.holds.push(Hold {
                key: w.key.clone(),
                entry: Arc::clone(&w.entry),
                admitted,
                cut_streams: w.cut_streams,
            });
        }
        Ok(ticket)
    }

    fn adjust_own(&self, o: &OwnTaken, delta: i64) {
        if o.hold.count.adjust(o.at_us, delta, o.hold.limit, crate::clock::now_us()) {
            self.changes.send_modify(|g| *g = g.wrapping_add(1));
        }
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

/// A rule scope the request falls in, to be counted in this ingress's own count at admission.
#[derive(Debug, Clone)]
pub struct OwnHold {
    pub count: Arc<OwnCount>,
    pub measure: Measure,
    pub limit: i64,
}

/// What one request counts at admission, by measure: one request; its input estimate in tokens;
/// its worst-case cost (input estimate at the input price plus `max_tokens` at the output price,
/// or the input alone when the request sets no `max_tokens`). A count takes at most what is left
/// under its limit or headroom. Each is replaced by what the request used when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub tokens: i64,
    pub cost_nanos: i64,
}

impl Reservation {
    fn of(self, m: Measure) -> i64 {
        match m {
            Measure::Requests => 1,
            Measure::Tokens => self.tokens.max(0),
            Measure::CostNanos => self.cost_nanos.max(0),
        }
    }
}

/// Which count had no room for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// `owns[i]` reached its rule's limit.
    Own(usize, Reached),
    /// `watches[i]`'s headroom is used up.
    Watch(usize),
}

struct OwnTaken {
    hold: OwnHold,
    at_us: i64,
    admitted: i64,
}

struct Hold {
    key: String,
    entry: Arc<Entry>,
    admitted: i64,
    cut_streams: bool,
}

/// What one admitted request added to local and own counts; settled when each of its upstream
/// attempts ends. Dropped with no attempt settled (the request never reached a provider), it
/// takes back what it added.
pub struct Ticket {
    cache: Arc<DecisionCache>,
    holds: Vec<Hold>,
    owns: Vec<OwnTaken>,
    /// Attempts settled so far.
    settled: AtomicU32,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("keys", &self.holds.iter().map(|h| &h.key).collect::<Vec<_>>())
            .field("own", &self.owns.len())
            .finish()
    }
}

impl Ticket {
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty() && self.owns.is_empty()
    }

    /// One upstream attempt ended having used `tokens` (`UsageEvent::total_tokens`) and
    /// `cost_nanos`; each attempt is one usage event, counted by the enforcer as one request.
    /// The first replaces what admission reserved; later ones (retries, fallbacks) add theirs.
    /// `ended_at_us` is the attempt's usage event's `ended_at_us`: the time the enforcer's
    /// `covered_until_us` is compared with, so the amount is dropped here exactly when a decision
    /// counts it.
    pub fn settle(&self, ended_at_us: i64, tokens: i64, cost_nanos: i64) {
        let first = self.settled.fetch_add(1, Ordering::AcqRel) == 0;
        let used = |m: Measure| match m {
            Measure::Requests => 1,
            Measure::Tokens => tokens,
            Measure::CostNanos => cost_nanos,
        };
        let delta = |m: Measure, admitted: i64| if first { used(m).saturating_sub(admitted) } else { used(m) };
        for o in &self.owns {
            self.cache.adjust_own(o, delta(o.hold.measure, o.admitted));
        }
        for h in &self.holds {
            let m = h.entry.decision.measure;
            self.cache.add_local(h, delta(m, h.admitted));
            // From now on the amount is in a usage event: the decision that covers it drops it.
            h.entry.local.ended(ended_at_us, used(m));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Acquire) == 0 {
            for o in &self.owns {
                self.cache.adjust_own(o, -o.admitted);
            }
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
