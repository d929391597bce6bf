//! Rollup windows kept exact under replays: per-partition absolute totals, versioned by the offset they cover.
//!
//! Every window row belongs to one Kafka partition, so one meter at a time writes it. The row
//! says "these are the totals of this partition's events in this window, up to offset N". An
//! event replayed after a crash is added only to windows whose covered offset is below it, so a
//! replay neither loses nor double-counts, whatever step the crash interrupted.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, Equivalent, HashMap, HashSet};
use tollgate_schemas::usage::Status;
use tollgate_store::rows::{Dims, UsageRow};
pub use tollgate_store::rows::{Granularity, SessionRow, WindowRow};

/// A row's dimensions, borrowed: looks up the interned `Dims` without building one. Hashes as
/// `Dims` does (each field as a `str`, in order).
struct DimsOf<'a>(&'a UsageRow);

impl DimsOf<'_> {
    fn fields(&self) -> [&str; 11] {
        let r = self.0;
        [
            &r.project,
            &r.team,
            &r.user_id,
            &r.cost_center,
            &r.workflow_tag,
            &r.environment,
            &r.api_key_id,
            &r.virtual_model,
            &r.provider,
            &r.model,
            &r.model_version,
        ]
    }
}

impl Hash for DimsOf<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        for f in self.fields() {
            f.hash(h);
        }
    }
}

impl Equivalent<Arc<Dims>> for DimsOf<'_> {
    fn equivalent(&self, d: &Arc<Dims>) -> bool {
        self.fields()
            == [
                d.project.as_str(),
                &d.team,
                &d.user_id,
                &d.cost_center,
                &d.workflow_tag,
                &d.environment,
                &d.api_key_id,
                &d.virtual_model,
                &d.provider,
                &d.model,
                &d.model_version,
            ]
    }
}

/// One dimension combination, shared by every window of it (interned by `Windows`): keys
/// clone it by reference count and compare and hash it by address, where each of a row's eight
/// key lookups cloned, hashed and compared eleven strings.
#[derive(Debug, Clone)]
pub struct DimsRef(Arc<Dims>);

impl std::ops::Deref for DimsRef {
    type Target = Dims;
    fn deref(&self) -> &Dims {
        &self.0
    }
}

impl PartialEq for DimsRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DimsRef {}

impl Hash for DimsRef {
    fn hash<H: Hasher>(&self, h: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), h);
    }
}

/// By content, which agrees with `Eq` since equal combinations are one allocation.
impl Ord for DimsRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if Arc::ptr_eq(&self.0, &other.0) { std::cmp::Ordering::Equal } else { (*self.0).cmp(&*other.0) }
    }
}

impl PartialOrd for DimsRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub granularity: Granularity,
    pub start: u32,
    pub partition: i32,
    pub dims: DimsRef,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub errors: i64,
    pub rejected: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_us_sum: i64,
}

impl Totals {
    fn add(&mut self, r: &UsageRow) {
        // Figures come from the usage topic: sums saturate rather than wrap or panic.
        self.requests = self.requests.saturating_add(1);
        self.errors = self.errors.saturating_add(i64::from(r.status != Status::Ok.as_str()));
        self.rejected = self.rejected.saturating_add(i64::from(r.status == Status::Rejected.as_str()));
        self.input_tokens = self.input_tokens.saturating_add(r.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(r.output_tokens);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(r.cached_input_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(r.cache_write_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(r.reasoning_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(r.cost_nanos);
        self.latency_us_sum = self.latency_us_sum.saturating_add(r.ended_at_us.saturating_sub(r.started_at_us).max(0));
    }

    fn merge(&mut self, o: &Totals) {
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.rejected = self.rejected.saturating_add(o.rejected);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cached_input_tokens = self.cached_input_tokens.saturating_add(o.cached_input_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(o.cache_write_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(o.reasoning_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(o.cost_nanos);
        self.latency_us_sum = self.latency_us_sum.saturating_add(o.latency_us_sum);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub hour: u32,
    pub workflow_tag: String,
    pub session_id: String,
    pub project: String,
    pub team: String,
    pub user_id: String,
    pub partition: i32,
}

/// A row's session key, borrowed: hashes as `SessionKey` does (fields in order).
struct SessionOf<'a>(&'a UsageRow);

impl SessionOf<'_> {
    fn hour(&self) -> u32 {
        Granularity::Hour.start(self.0.ended_at)
    }

    fn owned(&self) -> SessionKey {
        let r = self.0;
        SessionKey {
            hour: self.hour(),
            workflow_tag: r.workflow_tag.clone(),
            session_id: r.session_id.clone(),
            project: r.project.clone(),
            team: r.team.clone(),
            user_id: r.user_id.clone(),
            partition: r.kafka_partition,
        }
    }
}

impl Hash for SessionOf<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let r = self.0;
        self.hour().hash(h);
        r.workflow_tag.hash(h);
        r.session_id.hash(h);
        r.project.hash(h);
        r.team.hash(h);
        r.user_id.hash(h);
        r.kafka_partition.hash(h);
    }
}

impl Equivalent<SessionKey> for SessionOf<'_> {
    fn equivalent(&self, k: &SessionKey) -> bool {
        let r = self.0;
        k.hour == self.hour()
            && k.partition == r.kafka_partition
            && (k.session_id.as_str(), k.workflow_tag.as_str(), k.project.as_str(), k.team.as_str(), k.user_id.as_str())
                == (
                    r.session_id.as_str(),
                    r.workflow_tag.as_str(),
                    r.project.as_str(),
                    r.team.as_str(),
                    r.user_id.as_str(),
                )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTotals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_nanos: i64,
}

impl SessionTotals {
    fn add(&mut self, r: &UsageRow) {
        self.requests = self.requests.saturating_add(1);
        self.input_tokens = self.input_tokens.saturating_add(r.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(r.output_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(r.cost_nanos);
    }

    fn merge(&mut self, o: &SessionTotals) {
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cost_nanos = self.cost_nanos.saturating_add(o.cost_nanos);
    }
}

/// A window's totals and the offset of its partition they cover (-1: none yet).
#[derive(Debug, Clone, Copy)]
struct Entry<T> {
    totals: T,
    covered: i64,
    dirty: bool,
}

/// Open windows in memory. Anything not in memory is loaded from ClickHouse before use, so
/// eviction only costs a read.
///
/// Maps keyed by what callers choose (session ids, users) hash with hashbrown's default,
/// foldhash seeded at random per process. It is "minimally DoS-resistant": colliding keys
/// would have to be found by timing this process, which answers no caller (it reads the topic
/// and writes ClickHouse), and every map here is bounded or pruned. SipHash cost 8% of the
/// meter's CPU.
#[derive(Debug, Default)]
pub struct Windows {
    windows: HashMap<WindowKey, Entry<Totals>, DefaultHashBuilder>,
    sessions: HashMap<SessionKey, Entry<SessionTotals>, DefaultHashBuilder>,
    /// Every dimension combination a held window has (and those of the batch being applied).
    dims: HashSet<Arc<Dims>, DefaultHashBuilder>,
    /// Keys changed since the last `written`, so writing costs what changed, not what is held.
    dirty_windows: Vec<WindowKey>,
    dirty_sessions: Vec<SessionKey>,
    /// Last offset this process consumed per partition.
    consumed: std::collections::HashMap<i32, i64>,
}

/// Windows and sessions a batch touches that are not in memory: ClickHouse may hold them. Only
/// these keys are read back, so a batch reads in proportion to what it touches, not to what the
/// hour or month holds.
#[derive(Debug, Default)]
pub struct Missing {
    pub windows: HashSet<WindowKey, DefaultHashBuilder>,
    pub sessions: HashSet<SessionKey, DefaultHashBuilder>,
}

/// A batch's rows, each with its interned dimension combination, gathered by the window and
/// session hour they add to. `missing` and `apply` both take it, so a row's dimension strings
/// are hashed once, and the windows held (a large map, mostly out of cache) are looked up once
/// per window the batch touches, not once per row and granularity.
pub struct Batch<'a> {
    rows: Vec<(&'a UsageRow, DimsRef)>,
    windows: HashMap<GroupKey, (WindowKey, Group<Totals>), DefaultHashBuilder>,
    sessions: HashMap<SessionKey, Group<SessionTotals>, DefaultHashBuilder>,
}

/// A window as a batch gathers its rows: (granularity, start, partition, the combination's
/// address), so no reference count moves per row.
type GroupKey = (Granularity, u32, i32, usize);

/// What a batch adds to one window: its rows' sum, and the offsets it spans.
struct Group<T> {
    totals: T,
    first: i64,
    last: i64,
    /// The rows' offsets only rise (they do within a partition's batch): only then is the sum
    /// what adding the rows one by one would give.
    ascending: bool,
}

impl<T: Default> Group<T> {
    /// A group whose first row is at `offset` (then `note` it as every row).
    fn new(offset: i64) -> Self {
        Group { totals: T::default(), first: offset, last: i64::MIN, ascending: true }
    }

    fn note(&mut self, offset: i64) {
        self.ascending &= offset > self.last;
        self.last = offset;
    }

    /// Whether adding the whole group to a window that covers offsets up to `covered` is what
    /// adding its rows one by one would do: offsets rising, and the first past `covered`.
    fn fits(&self, covered: i64) -> bool {
        self.ascending && covered < self.first
    }
}

impl Missing {
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.sessions.is_empty()
    }
}

impl WindowKey {
    /// Whether `w` is this window's row.
    pub fn matches(&self, w: &WindowRow) -> bool {
        let d = &self.dims;
        self.granularity.as_str() == w.granularity
            && self.start == w.window_start
            && self.partition == w.kafka_partition
            && (d.project.as_str(), d.team.as_str(), d.user_id.as_str(), d.cost_center.as_str())
                == (w.project.as_str(), w.team.as_str(), w.user_id.as_str(), w.cost_center.as_str())
            && (d.workflow_tag.as_str(), d.environment.as_str(), d.api_key_id.as_str(), d.virtual_model.as_str())
                == (w.workflow_tag.as_str(), w.environment.as_str(), w.api_key_id.as_str(), w.virtual_model.as_str())
            && (d.provider.as_str(), d.model.as_str(), d.model_version.as_str())
                == (w.provider.as_str(), w.model.as_str(), w.model_version.as_str())
    }
}

fn window_keys(r: &UsageRow, dims: DimsRef) -> impl Iterator<Item = WindowKey> + '_ {
    Granularity::ALL.into_iter().map(move |g| WindowKey {
        granularity: g,
        start: g.start(r.ended_at),
        partition: r.kafka_partition,
        dims: dims.clone(),
    })
}

/// Adds `add` to `key`'s entry (an empty one when memory holds none) unless the entry already
/// covers `offset`; it then covers `offset` and is listed in `dirty` once until written.
fn add_past<K, Q, T>(
    map: &mut HashMap<K, Entry<T>, DefaultHashBuilder>,
    dirty: &mut Vec<K>,
    key: &Q,
    owned: impl Fn(&Q) -> K,
    offset: i64,
    add: impl FnOnce(&mut T),
) where
    K: Hash + Eq,
    Q: Hash + Equivalent<K> + ?Sized,
    T: Default,
{
    let e = match map.get_mut(key) {
        Some(e) => e,
        None => map.entry(owned(key)).or_insert(Entry { totals: T::default(), covered: -1, dirty: false }),
    };
    if offset > e.covered {
        add(&mut e.totals);
        e.covered = offset;
        if !e.dirty {
            e.dirty = true;
            dirty.push(owned(key));
        }
    }
}

impl Windows {
    pub fn len(&self) -> usize {
        self.windows.len() + self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The interned combination of `r`'s dimensions (allocated the first time it is seen).
    fn intern(&mut self, r: &UsageRow) -> DimsRef {
        DimsRef(Arc::clone(self.dims.get_or_insert_with(&DimsOf(r), |_| Arc::new(Dims::of(r)))))
    }

    fn intern_dims(&mut self, d: Dims) -> DimsRef {
        match self.dims.get(&d) {
            Some(held) => DimsRef(Arc::clone(held)),
            None => {
                let d = Arc::new(d);
                self.dims.insert(Arc::clone(&d));
                DimsRef(d)
            }
        }
    }

    /// Drops combinations no held window has any more.
    fn prune_dims(&mut self) {
        self.dims.retain(|d| Arc::strong_count(d) > 1);
    }

    /// Notes each consumed offset, in order. When a partition's offsets jump forward, another
    /// meter owned it in between (a rebalance), so what memory holds of it is stale: it is
    /// dropped and read again from ClickHouse on demand. A jump backwards is a replay, which
    /// the covered offsets make harmless. Call outside `apply`..`written`.
    pub fn consumed(&mut self, partition: i32, offset: i64) {
        if self.consumed.insert(partition, offset).is_some_and(|last| offset > last + 1) {
            self.windows.retain(|k, _| k.partition != partition);
            self.sessions.retain(|k, _| k.partition != partition);
            self.prune_dims();
        }
    }

    /// Drops everything held of `partition`: its windows, session hours and last offset. For a
    /// partition this meter stops or starts owning, since another meter may advance it in
    /// between. Call outside `apply`..`written`.
    pub fn forget(&mut self, partition: i32) {
        self.windows.retain(|k, _| k.partition != partition);
        self.sessions.retain(|k, _| k.partition != partition);
        self.dirty_windows.retain(|k| k.partition != partition);
        self.dirty_sessions.retain(|k| k.partition != partition);
        self.consumed.remove(&partition);
        self.prune_dims();
    }

    /// `rows` with their interned dimensions, for `missing` and `apply`. Hold it only between
    /// the two: its combinations count as held.
    pub fn batch<'a>(&mut self, rows: impl IntoIterator<Item = &'a UsageRow>) -> Batch<'a> {
        let mut b = Batch { rows: Vec::new(), windows: HashMap::default(), sessions: HashMap::default() };
        for r in rows {
            let dims = self.intern(r);
            let at = Arc::as_ptr(&dims.0) as usize;
            for g in Granularity::ALL {
                let start = g.start(r.ended_at);
                let (_, group) = b.windows.entry((g, start, r.kafka_partition, at)).or_insert_with(|| {
                    let key = WindowKey { granularity: g, start, partition: r.kafka_partition, dims: dims.clone() };
                    (key, Group::new(r.kafka_offset))
                });
                group.totals.add(r);
                group.note(r.kafka_offset);
            }
            let s = SessionOf(r);
            let group = match b.sessions.get_mut(&s) {
                Some(g) => g,
                None => b.sessions.entry(s.owned()).or_insert_with(|| Group::new(r.kafka_offset)),
            };
            group.totals.add(r);
            group.note(r.kafka_offset);
            b.rows.push((r, dims));
        }
        b
    }

    /// What must be read from ClickHouse before `apply(batch)`.
    pub fn missing(&self, batch: &Batch<'_>) -> Missing {
        let mut m = Missing::default();
        for (k, _) in batch.windows.values() {
            if !self.windows.contains_key(k) {
                m.windows.insert(k.clone());
            }
        }
        for k in batch.sessions.keys() {
            if !self.sessions.contains_key(k) {
                m.sessions.insert(k.clone());
            }
        }
        m
    }

    /// Takes rows read from ClickHouse; those already in memory are newer and kept.
    pub fn load(&mut self, windows: Vec<WindowRow>, sessions: Vec<SessionRow>) {
        for w in windows {
            let Some(granularity) = Granularity::parse(&w.granularity) else { continue };
            let key = WindowKey {
                granularity,
                start: w.window_start,
                partition: w.kafka_partition,
                dims: self.intern_dims(Dims {
                    project: w.project,
                    team: w.team,
                    user_id: w.user_id,
                    cost_center: w.cost_center,
                    workflow_tag: w.workflow_tag,
                    environment: w.environment,
                    api_key_id: w.api_key_id,
                    virtual_model: w.virtual_model,
                    provider: w.provider,
                    model: w.model,
                    model_version: w.model_version,
                }),
            };
            let totals = Totals {
                requests: w.requests,
                errors: w.errors,
                rejected: w.rejected,
                input_tokens: w.input_tokens,
                output_tokens: w.output_tokens,
                cached_input_tokens: w.cached_input_tokens,
                cache_write_tokens: w.cache_write_tokens,
                reasoning_tokens: w.reasoning_tokens,
                cost_nanos: w.cost_nanos,
                latency_us_sum: w.latency_us_sum,
            };
            let covered = i64::try_from(w.version).unwrap_or(i64::MAX);
            self.windows.entry(key).or_insert(Entry { totals, covered, dirty: false });
        }
        for s in sessions {
            let key = SessionKey {
                hour: s.hour,
                workflow_tag: s.workflow_tag,
                session_id: s.session_id,
                project: s.project,
                team: s.team,
                user_id: s.user_id,
                partition: s.kafka_partition,
            };
            let totals = SessionTotals {
                requests: s.requests,
                input_tokens: s.input_tokens,
                output_tokens: s.output_tokens,
                cost_nanos: s.cost_nanos,
            };
            let covered = i64::try_from(s.version).unwrap_or(i64::MAX);
            self.sessions.entry(key).or_insert(Entry { totals, covered, dirty: false });
        }
    }

    /// Adds each row of `batch` to its windows unless the window already covers its offset. Call
    /// after `load` of what `missing` named: a window absent from memory is taken to be new.
    pub fn apply(&mut self, batch: &Batch<'_>) {
        let covered = |e: Option<i64>| e.unwrap_or(-1);
        let whole = batch.windows.values().all(|(k, g)| g.fits(covered(self.windows.get(k).map(|e| e.covered))))
            && batch.sessions.iter().all(|(k, g)| g.fits(covered(self.sessions.get(k).map(|e| e.covered))));
        if whole {
            self.apply_groups(batch);
        } else {
            self.apply_rows(batch);
        }
    }

    /// Adds each group whole: every row of the batch is past what its windows cover (the case
    /// but for replays).
    fn apply_groups(&mut self, batch: &Batch<'_>) {
        for (k, g) in batch.windows.values() {
            add_past(&mut self.windows, &mut self.dirty_windows, k, WindowKey::clone, g.last, |t| t.merge(&g.totals));
        }
        for (k, g) in &batch.sessions {
            add_past(&mut self.sessions, &mut self.dirty_sessions, k, SessionKey::clone, g.last, |t| {
                t.merge(&g.totals)
            });
        }
    }

    /// Adds the rows one by one, each to the windows that do not cover it yet (a replay).
    fn apply_rows(&mut self, batch: &Batch<'_>) {
        for (r, dims) in &batch.rows {
            let r: &UsageRow = r;
            for k in window_keys(r, dims.clone()) {
                add_past(&mut self.windows, &mut self.dirty_windows, &k, WindowKey::clone, r.kafka_offset, |t| {
                    t.add(r)
                });
            }
            add_past(
                &mut self.sessions,
                &mut self.dirty_sessions,
                &SessionOf(r),
                SessionOf::owned,
                r.kafka_offset,
                |t| t.add(r),
            );
        }
    }

    /// Rows for every window changed since the last call.
    pub fn dirty(&self) -> (Vec<WindowRow>, Vec<SessionRow>) {
        let windows = self
            .dirty_windows
            .iter()
            .filter_map(|k| Some((k, self.windows.get(k)?)))
            .map(|(k, e)| WindowRow {
                granularity: k.granularity.as_str().to_owned(),
                window_start: k.start,
                project: k.dims.project.clone(),
                team: k.dims.team.clone(),
                user_id: k.dims.user_id.clone(),
                cost_center: k.dims.cost_center.clone(),
                workflow_tag: k.dims.workflow_tag.clone(),
                environment: k.dims.environment.clone(),
                api_key_id: k.dims.api_key_id.clone(),
                virtual_model: k.dims.virtual_model.clone(),
                provider: k.dims.provider.clone(),
                model: k.dims.model.clone(),
                model_version: k.dims.model_version.clone(),
                kafka_partition: k.partition,
                requests: e.totals.requests,
                errors: e.totals.errors,
                rejected: e.totals.rejected,
                input_tokens: e.totals.input_tokens,
                output_tokens: e.totals.output_tokens,
                cached_input_tokens: e.totals.cached_input_tokens,
                cache_write_tokens: e.totals.cache_write_tokens,
                reasoning_tokens: e.totals.reasoning_tokens,
                cost_nanos: e.totals.cost_nanos,
                latency_us_sum: e.totals.latency_us_sum,
                version: u64::try_from(e.covered).unwrap_or(0),
            })
            .collect();
        let sessions = self
            .dirty_sessions
            .iter()
            .filter_map(|k| Some((k, self.sessions.get(k)?)))
            .map(|(k, e)| SessionRow {
                hour: k.hour,
                workflow_tag: k.workflow_tag.clone(),
                session_id: k.session_id.clone(),
                project: k.project.clone(),
                team: k.team.clone(),
                user_id: k.user_id.clone(),
                kafka_partition: k.partition,
                requests: e.totals.requests,
                input_tokens: e.totals.input_tokens,
                output_tokens: e.totals.output_tokens,
                cost_nanos: e.totals.cost_nanos,
                version: u64::try_from(e.covered).unwrap_or(0),
            })
            .collect();
        (windows, sessions)
    }

    /// Marks everything written; call once `dirty()`'s rows are in ClickHouse.
    pub fn written(&mut self) {
        for k in self.dirty_windows.drain(..) {
            if let Some(e) = self.windows.get_mut(&k) {
                e.dirty = false;
            }
        }
        for k in self.dirty_sessions.drain(..) {
            if let Some(e) = self.sessions.get_mut(&k) {
                e.dirty = false;
            }
        }
    }

    /// Drops clean windows when memory holds more than `max` (they are re-read on demand).
    /// Returns how many it dropped.
    pub fn evict(&mut self, max: usize) -> usize {
        if self.len() <= max {
            return 0;
        }
        let before = self.len();
        self.windows.retain(|_, e| e.dirty);
        self.sessions.retain(|_, e| e.dirty);
        self.prune_dims();
        before - self.len()
    }

    /// Drops clean windows and session hours that ended more than `grace_s` before `now_s`: a
    /// late event for one of them (a copy re-sent after an outage) reads it back from ClickHouse.
    /// So memory holds what recent traffic touches, not every session ever seen. Returns how
    /// many it dropped.
    pub fn drop_passed(&mut self, now_s: u32, grace_s: u32) -> usize {
        let before = self.len();
        let cutoff = now_s.saturating_sub(grace_s);
        self.windows.retain(|k, e| e.dirty || k.granularity.end(k.start) > cutoff);
        self.sessions.retain(|k, e| e.dirty || k.hour.saturating_add(3600) > cutoff);
        self.prune_dims();
        before - self.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use tollgate_schemas::usage::{Envelope, Status, UsageEvent};

    fn row(partition: i32, offset: i64, ended_at: u32, project: &str, tokens: i64) -> UsageRow {
        let ev = UsageEvent {
            started_at_us: i64::from(ended_at) * 1_000_000 - 250,
            envelope: Envelope {
                project: Some(project.into()),
                session_id: Some(format!("s{}", offset % 3)),
                ..Default::default()
            },
            status: if offset % 5 == 0 { Status::ProviderError } else { Status::Ok },
            input_tokens: tokens,
            output_tokens: tokens / 2,
            cost_nanos: tokens * 1000,
            ..UsageEvent::example(format!("{partition}-{offset}"), None, i64::from(ended_at) * 1_000_000)
        };
        UsageRow::new(ev, "t", partition, offset)
    }

    fn apply<'a>(w: &mut Windows, rows: impl IntoIterator<Item = &'a UsageRow>) {
        let batch = w.batch(rows);
        w.apply(&batch);
    }

    fn missing<'a>(w: &mut Windows, rows: impl IntoIterator<Item = &'a UsageRow>) -> Missing {
        let batch = w.batch(rows);
        w.missing(&batch)
    }

    #[test]
    fn window_starts_match_clickhouse() {
        // 2026-11-29 04:02:38 UTC
        let t = 1795924958;
        assert_eq!(Granularity::Minute.start(t), 1795924920);
        assert_eq!(Granularity::Hour.start(t), 1795924800);
        assert_eq!(Granularity::Day.start(t), 1795910400);
        assert_eq!(Granularity::Month.start(t), 1_793_491_200, "2026-11-01 00:00:00 UTC");
        assert_eq!(Granularity::Month.start(951_782_400), 949_363_200, "2000-02-29 → 2000-02-01");
        assert_eq!(Granularity::Month.start(1_796_443_358), 1_796_083_200, "2026-12-05 → 2026-12-01");
        assert_eq!(Granularity::Month.start(0), 0);
    }

    /// Totals per (granularity, start) summed over every dimension, as a report reads them.
    fn sums(rows: &[WindowRow]) -> BTreeMap<(String, u32), (i64, i64, i64)> {
        let mut out = BTreeMap::new();
        for r in rows {
            let e = out.entry((r.granularity.clone(), r.window_start)).or_insert((0, 0, 0));
            e.0 += r.requests;
            e.1 += r.input_tokens;
            e.2 += r.cost_nanos;
        }
        out
    }

    use std::collections::BTreeMap;

    /// What ClickHouse holds after the writes: the newest version of each row.
    fn final_rows(written: &[WindowRow]) -> Vec<WindowRow> {
        let mut latest: BTreeMap<(String, u32, i32, String), WindowRow> = BTreeMap::new();
        for w in written {
            let k = (w.granularity.clone(), w.window_start, w.kafka_partition, w.project.clone());
            if latest.get(&k).is_none_or(|cur| w.version >= cur.version) {
                latest.insert(k, w.clone());
            }
        }
        latest.into_values().collect()
    }

    proptest! {
        /// However a stream is cut into batches, and from wherever a crash makes the meter
        /// replay, the final windows equal the sums of the distinct events.
        #[test]
        fn replays_from_any_point_count_each_event_once(
            cuts in proptest::collection::vec(1usize..40, 1..8),
            crash_after in 0usize..8,
            rewind in 0usize..60,
        ) {
            let events: Vec<UsageRow> = (0..120)
                .map(|i| row((i % 2) as i32, (i / 2) as i64, 1_796_443_200 + (i as u32) * 37, ["a", "b"][i % 2], 10 + i as i64))
                .collect();
            let mut written: Vec<WindowRow> = Vec::new();
            let mut mem = Windows::default();
            let mut pos = 0;
            let mut batches = 0;
            let mut cut_iter = cuts.iter().cycle();
            while pos < events.len() {
                let n = (*cut_iter.next().unwrap()).min(events.len() - pos);
                // A crash loses memory; the meter replays from `rewind` events back.
                let slice = if batches == crash_after {
                    mem = Windows::default();
                    &events[pos.saturating_sub(rewind)..pos + n]
                } else {
                    &events[pos..pos + n]
                };
                // As `flush` does for every batch: read what ClickHouse holds of the windows
                // memory lacks, then apply.
                let batch = mem.batch(slice);
                let missing = mem.missing(&batch);
                let wanted: Vec<WindowRow> = final_rows(&written)
                    .into_iter()
                    .filter(|w| {
                        missing.windows.iter().any(|k| k.matches(w))
                    })
                    .collect();
                mem.load(wanted, vec![]);
                mem.apply(&batch);
                written.extend(mem.dirty().0);
                mem.written();
                pos += n;
                batches += 1;
            }
            let got = sums(&final_rows(&written));
            let mut expect: BTreeMap<(String, u32), (i64, i64, i64)> = BTreeMap::new();
            for e in &events {
                for g in Granularity::ALL {
                    let x = expect.entry((g.as_str().to_owned(), g.start(e.ended_at))).or_insert((0, 0, 0));
                    x.0 += 1;
                    x.1 += e.input_tokens;
                    x.2 += e.cost_nanos;
                }
            }
            prop_assert_eq!(got, expect);
        }
    }

    /// Rows (and their windows) in a canonical order, to compare two memories.
    #[allow(clippy::type_complexity)]
    fn snapshot(
        w: &Windows,
    ) -> (Vec<((Granularity, u32, i32, Dims), Totals, i64)>, Vec<(SessionKey, SessionTotals, i64)>) {
        // Combinations by content: each memory interns its own.
        let mut windows: Vec<_> = w
            .windows
            .iter()
            .map(|(k, e)| ((k.granularity, k.start, k.partition, (*k.dims).clone()), e.totals, e.covered))
            .collect();
        windows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sessions: Vec<_> = w.sessions.iter().map(|(k, e)| (k.clone(), e.totals, e.covered)).collect();
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        (windows, sessions)
    }

    proptest! {
        /// Adding a batch by groups gives what adding its rows one by one gives, whatever the
        /// offsets (repeated, falling, behind what a window covers) and however rows share
        /// windows and sessions.
        #[test]
        fn groups_add_up_as_rows_do(
            batches in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec((0i32..2, 0i64..40, 0u32..7200, 0usize..3), 1..30)),
                1..6,
            ),
        ) {
            let (mut grouped, mut by_row) = (Windows::default(), Windows::default());
            // Rising batches continue each partition's offsets as a topic would (the groups are
            // added whole); the others take offsets at random (row by row).
            let mut next = [0i64; 2];
            for (rising, spec) in &batches {
                let rows: Vec<UsageRow> = spec
                    .iter()
                    .map(|&(p, o, t, who)| {
                        let o = if *rising {
                            let at = &mut next[usize::try_from(p).unwrap()];
                            *at += 1 + o % 3;
                            *at
                        } else {
                            o
                        };
                        row(p, o, 1_796_443_200 + t, ["a", "b", "c"][who], 10 + o)
                    })
                    .collect();
                let b = grouped.batch(&rows);
                grouped.apply(&b);
                let b = by_row.batch(&rows);
                by_row.apply_rows(&b);
                prop_assert_eq!(snapshot(&grouped), snapshot(&by_row));
                let (mut dg, mut dr) = (grouped.dirty(), by_row.dirty());
                for d in [&mut dg, &mut dr] {
                    d.0.sort_by(|a, b| (&a.granularity, a.window_start, a.kafka_partition, &a.project).cmp(&(&b.granularity, b.window_start, b.kafka_partition, &b.project)));
                    d.1.sort_by(|a, b| (a.hour, &a.session_id, a.kafka_partition, &a.project).cmp(&(b.hour, &b.session_id, b.kafka_partition, &b.project)));
                }
                prop_assert_eq!(format!("{dg:?}"), format!("{dr:?}"));
                grouped.written();
                by_row.written();
            }
        }
    }

    /// One meter's view of a partition in the simulations: its memory and next offset.
    struct Owner {
        mem: Windows,
        next: usize,
    }

    impl Owner {
        /// Reads `n` events from `next` and flushes them as `flush` does: read what memory
        /// lacks from "ClickHouse" (`written`, seen through FINAL), apply, write.
        fn batch(&mut self, events: &[UsageRow], n: usize, written: &mut Vec<WindowRow>, checkpoint: &mut usize) {
            let end = (self.next + n).min(events.len());
            let slice = &events[self.next..end];
            let batch = self.mem.batch(slice);
            let missing = self.mem.missing(&batch);
            let wanted: Vec<WindowRow> =
                final_rows(written).into_iter().filter(|w| missing.windows.iter().any(|k| k.matches(w))).collect();
            self.mem.load(wanted, vec![]);
            self.mem.apply(&batch);
            written.extend(self.mem.dirty().0);
            self.mem.written();
            *checkpoint = (*checkpoint).max(end);
            self.next = end;
        }
    }

    proptest! {
        /// A rebalance hands a partition to meter B while meter A, dropped from the group
        /// mid-flush or not yet told, goes on writing it for a while: B starts at the
        /// checkpoint, their writes interleave in any order, and the windows stay exact.
        #[test]
        fn a_stale_owner_writing_late_changes_nothing(
            cuts in proptest::collection::vec(1usize..30, 1..6),
            before in 1usize..6,
            zombie in 0usize..5,
            order in proptest::collection::vec(any::<bool>(), 0..12),
        ) {
            let events: Vec<UsageRow> = (0..150)
                .map(|i| row(0, i as i64, 1_796_443_200 + (i as u32) * 29, ["a", "b"][i % 2], 10 + i as i64))
                .collect();
            let mut cut = cuts.iter().cycle();
            let mut written: Vec<WindowRow> = Vec::new();
            let mut checkpoint = 0;
            let mut a = Owner { mem: Windows::default(), next: 0 };
            for _ in 0..before {
                a.batch(&events, *cut.next().unwrap(), &mut written, &mut checkpoint);
            }
            let mut b = Owner { mem: Windows::default(), next: checkpoint };
            let mut a_left = zombie;
            let mut turns = order.iter();
            while b.next < events.len() {
                let a_turn = turns.next().copied().unwrap_or(false);
                if a_turn && a_left > 0 && a.next < events.len() {
                    a.batch(&events, *cut.next().unwrap(), &mut written, &mut checkpoint);
                    a_left -= 1;
                } else {
                    b.batch(&events, *cut.next().unwrap(), &mut written, &mut checkpoint);
                }
            }
            let mut expect: BTreeMap<(String, u32), (i64, i64, i64)> = BTreeMap::new();
            for e in &events {
                for g in Granularity::ALL {
                    let x = expect.entry((g.as_str().to_owned(), g.start(e.ended_at))).or_insert((0, 0, 0));
                    x.0 += 1;
                    x.1 += e.input_tokens;
                    x.2 += e.cost_nanos;
                }
            }
            prop_assert_eq!(sums(&final_rows(&written)), expect);
        }
    }

    #[test]
    fn a_jump_in_offsets_drops_the_partitions_stale_windows() {
        let mut w = Windows::default();
        let first: Vec<UsageRow> = (0..3).map(|i| row(1, i, 1_796_443_200, "a", 10)).collect();
        for r in &first {
            w.consumed(1, r.kafka_offset);
        }
        apply(&mut w, &first);
        apply(&mut w, &[row(0, 0, 1_796_443_200, "a", 10)]);
        w.consumed(0, 0);
        w.written();
        let held = w.len();
        w.consumed(1, 3);
        assert_eq!(w.len(), held, "the next offset is no jump");
        w.consumed(1, 2);
        assert_eq!(w.len(), held, "a replay keeps memory");
        w.consumed(1, 9);
        assert!(w.len() < held, "offsets 3..8 were another meter's: partition 1 is read again");
        assert!(missing(&mut w, &[row(0, 3, 1_796_443_200, "a", 10)]).is_empty(), "partition 0 kept");
        assert!(!missing(&mut w, &[row(1, 9, 1_796_443_200, "a", 10)]).is_empty());
    }

    #[test]
    fn forgetting_a_partition_keeps_the_others() {
        let mut w = Windows::default();
        let rows = [row(0, 0, 1_796_443_200, "a", 10), row(1, 0, 1_796_443_200, "a", 10)];
        for r in &rows {
            w.consumed(r.kafka_partition, r.kafka_offset);
        }
        apply(&mut w, &rows);
        w.written();
        w.forget(1);
        assert!(missing(&mut w, &rows[..1]).is_empty(), "partition 0 kept");
        assert!(!missing(&mut w, &rows[1..]).is_empty(), "partition 1 is read again from ClickHouse");
        w.consumed(1, 7);
        apply(&mut w, &[row(1, 7, 1_796_443_200, "a", 10)]);
        assert_eq!(w.len(), 10, "no jump is seen after a forget: partition 1 starts afresh");
    }

    #[test]
    fn windows_that_passed_are_dropped_once_written() {
        assert_eq!(Granularity::Month.end(1_793_491_200), 1_796_083_200, "2026-11 ends at 2026-12-01");
        let mut w = Windows::default();
        let t = 1_796_443_200; // 2026-12-05 08:00:00 UTC
        apply(&mut w, [&row(0, 0, t, "a", 10)]);
        assert_eq!(w.drop_passed(t + 7200, 600), 0, "dirty windows are kept until written");
        w.written();
        assert_eq!(w.len(), 5);
        assert_eq!(w.drop_passed(t + 30, 600), 0, "nothing has ended yet");
        // Two hours on: the minute, the hour and the session hour ended; the day and month not.
        assert_eq!(w.drop_passed(t + 7200, 600), 3);
        assert_eq!(w.len(), 2);
        assert_eq!(w.dims.len(), 1, "the combination is still held by the day and the month");
        assert_eq!(w.drop_passed(t + 40 * 86_400, 600), 2);
        assert!(w.is_empty() && w.dims.is_empty());
    }

    #[test]
    fn borrowed_keys_hash_and_compare_as_the_owned_ones() {
        use std::hash::BuildHasher;
        let hasher = DefaultHashBuilder::default();
        let r = row(3, 7, 1_796_443_200, "a", 10);
        assert_eq!(hasher.hash_one(DimsOf(&r)), hasher.hash_one(Dims::of(&r)));
        assert!(DimsOf(&r).equivalent(&Arc::new(Dims::of(&r))));
        let other = row(3, 7, 1_796_443_200, "b", 10);
        assert!(!DimsOf(&other).equivalent(&Arc::new(Dims::of(&r))));
        assert_eq!(hasher.hash_one(SessionOf(&r)), hasher.hash_one(SessionOf(&r).owned()));
        assert!(SessionOf(&r).equivalent(&SessionOf(&r).owned()));
        assert!(!SessionOf(&other).equivalent(&SessionOf(&r).owned()));
        let mut w = Windows::default();
        apply(&mut w, [&r, &r.clone()]);
        assert_eq!(w.dims.len(), 1, "one combination, interned once");
        assert_eq!(w.len(), 5, "four windows and one session hour");
    }

    #[test]
    fn errors_latency_and_sessions_are_counted() {
        let mut w = Windows::default();
        let rows: Vec<UsageRow> = (0..10).map(|i| row(0, i, 1_796_443_200, "a", 100)).collect();
        apply(&mut w, &rows);
        let (wins, sessions) = w.dirty();
        let minute = wins.iter().find(|r| r.granularity == "minute").unwrap();
        assert_eq!((minute.requests, minute.errors, minute.latency_us_sum, minute.version), (10, 2, 2500, 9));
        assert_eq!(sessions.len(), 3);
        assert_eq!(sessions.iter().map(|s| s.requests).sum::<i64>(), 10);
        w.written();
        assert!(w.dirty().0.is_empty());
        apply(&mut w, &rows);
        assert!(w.dirty().0.is_empty(), "a replay of covered offsets changes nothing");
    }
}
