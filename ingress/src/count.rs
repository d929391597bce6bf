//! Token estimates with tiktoken: the reference count beside the provider's report.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use serde_json::Value;
use tiktoken_rs::{CoreBPE, cl100k_base_singleton, o200k_base_singleton};

/// Tokens OpenAI's chat format adds per message (role and separators) and to prime the reply.
const PER_MESSAGE: i64 = 3;
const REPLY_PRIMING: i64 = 3;

/// The encoding for a model family: o200k for GPT-4o/4.1/5 and the o-series, cl100k otherwise.
/// Anthropic and open models publish no tiktoken encoding; cl100k is the stable reference that
/// makes their provider/reference ratio comparable across versions.
pub fn encoding_for(model: &str) -> &'static CoreBPE {
    let m = model.rsplit('/').next().unwrap_or(model);
    let o200k = m.starts_with("gpt-4o")
        || m.starts_with("gpt-4.1")
        || m.starts_with("gpt-5")
        || m.starts_with("chatgpt-4o")
        || (m.starts_with('o') && m.chars().nth(1).is_some_and(|c| c.is_ascii_digit()));
    if o200k { o200k_base_singleton() } else { cl100k_base_singleton() }
}

pub fn count_text(bpe: &CoreBPE, text: &str) -> i64 {
    i64::try_from(bpe.encode_ordinary(text).len()).unwrap_or(i64::MAX)
}

/// Texts remembered per generation; two generations are kept (at most 2 × this many counts,
/// 16 bytes each plus the map's overhead).
const SEEN_PER_GENERATION: usize = 16_384;

/// Token counts of prompt texts seen recently, by a keyed hash of encoding and text. Agent loops
/// and chat clients send the same system prompt, tool definitions and earlier turns with every
/// request; each is tokenized once, and later requests pay a hash of the text instead (tiktoken
/// takes ~12 µs for a 30-token message and grows with the text; hashing is ~1 GB/s). Two
/// generations (the older dropped when the newer fills) bound it without LRU bookkeeping.
struct Seen {
    hasher: std::hash::RandomState,
    current: HashMap<u64, i64>,
    previous: HashMap<u64, i64>,
}

static SEEN: LazyLock<Mutex<Seen>> = LazyLock::new(|| {
    Mutex::new(Seen { hasher: std::hash::RandomState::new(), current: HashMap::new(), previous: HashMap::new() })
});

/// [`count_text`] through the cache of texts seen recently.
pub fn count_prompt_text(bpe: &'static CoreBPE, text: &str) -> i64 {
    let key = {
        let seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
        let mut h = seen.hasher.build_hasher();
        std::ptr::from_ref(bpe).hash(&mut h);
        text.hash(&mut h);
        let key = h.finish();
        if let Some(n) = seen.current.get(&key).or_else(|| seen.previous.get(&key)) {
            return *n;
        }
        key
    };
    // Counted outside the lock: another request may count the same text meanwhile, harmlessly.
    let n = count_text(bpe, text);
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.current.len() >= SEEN_PER_GENERATION {
        seen.previous = std::mem::take(&mut seen.current);
    }
    seen.current.insert(key, n);
    n
}

/// Reference input tokens and input length in characters of an OpenAI- or Anthropic-style
/// request body (`messages`, plus Anthropic's top-level `system`).
pub fn estimate_input(model: &str, body: &Value) -> (i64, i64) {
    let bpe = encoding_for(model);
    let mut tokens = 0;
    let mut chars = 0;
    let mut messages = 0;
    walk_texts(
        body,
        &mut |text| {
            tokens += count_prompt_text(bpe, text);
            chars += i64::try_from(text.chars().count()).unwrap_or(i64::MAX);
        },
        &mut messages,
    );
    // Embeddings: `input` may be token ids, counted as given.
    let token_ids = match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items.len() as i64,
        _ => 0,
    };
    (tokens + token_ids + chat_overhead(messages), chars)
}

/// Tokens the chat format adds around `messages` messages.
fn chat_overhead(messages: i64) -> i64 {
    messages * PER_MESSAGE + if messages > 0 { REPLY_PRIMING } else { 0 }
}

/// Prompt text counted with tiktoken on the request path, at most (~1 ms). A longer prompt's
/// reference count runs on the counting threads beside the upstream call (tiktoken takes ~0.45 s
/// for 3.2 MB), and the request path scales a count of its first [`SAMPLE_BYTES`] by its length.
pub const INLINE_BYTES: usize = 8 << 10;
/// Text sampled for a long prompt's linear estimate (~0.3 ms of tiktoken).
const SAMPLE_BYTES: usize = 2 << 10;

/// Long prompts waiting for their reference count, at most, and their text in bytes; past
/// either a prompt's reference is its linear estimate (counted in
/// `tollgate_ingress_reference_counts_skipped_total`), so a flood of huge prompts cannot hold
/// their bodies in memory without bound.
const DEFERRED_QUEUE: usize = 256;
const DEFERRED_BYTES: usize = 256 << 20;
static DEFERRED_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type CountJob = Box<dyn FnOnce() + Send>;

/// The threads that count long prompts: one per core, at the lowest CPU priority (nice 19), so
/// that the request path, at normal priority, is never slowed by a 0.45 s count beside it on a
/// busy core; they still get their share when the machine is loaded.
static COUNTERS: LazyLock<std::sync::mpsc::SyncSender<CountJob>> = LazyLock::new(|| {
    let (tx, rx) = std::sync::mpsc::sync_channel::<CountJob>(DEFERRED_QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get) {
        let rx = Arc::clone(&rx);
        let spawned = std::thread::Builder::new().name(format!("tollgate-count-{i}")).spawn(move || {
            // On Linux this sets the calling thread's own nice value.
            if let Err(e) = rustix::process::setpriority_process(None, 19) {
                tracing::debug!(error = %e, "reference counting thread keeps its priority");
            }
            loop {
                let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "reference counting thread not started");
        }
    }
    tx
});

/// A prompt's reference input: tiktoken's count and its length in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub tokens: i64,
    pub chars: i64,
}

/// A prompt's reference count: known, or being counted beside the upstream call.
#[derive(Clone)]
pub enum Reference {
    Counted(Count),
    Deferred(Shared<BoxFuture<'static, Count>>),
}

impl Reference {
    /// The count if it is known now.
    pub fn now(&self) -> Option<Count> {
        match self {
            Reference::Counted(n) => Some(*n),
            Reference::Deferred(f) => f.peek().copied(),
        }
    }
}

/// What the request path knows of a prompt's input for one encoding.
#[derive(Clone)]
pub struct InputEstimate {
    /// The reference count when the prompt was short enough to count inline; otherwise a
    /// linear estimate (for the gate and for intake records).
    pub tokens: i64,
    /// Bytes of prompt text (the intake record's stand-in for characters while they are counted).
    pub bytes: i64,
    pub reference: Reference,
}

impl InputEstimate {
    /// The reference count if known, else the estimate.
    pub fn best_now(&self) -> Count {
        self.reference.now().unwrap_or(Count { tokens: self.tokens, chars: self.bytes })
    }
}

/// Estimates a prompt's input without spending more than [`INLINE_BYTES`] of tiktoken on the
/// request path; a longer prompt's exact count goes to the counting threads.
pub fn estimate_input_bounded(model: &str, body: &Arc<Value>) -> InputEstimate {
    let mut bytes = 0usize;
    let mut messages = 0i64;
    walk_texts(body, &mut |t| bytes += t.len(), &mut messages);
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    if bytes <= INLINE_BYTES {
        let (tokens, chars) = estimate_input(model, body);
        let count = Count { tokens, chars };
        return InputEstimate { tokens, bytes: as_i64(bytes), reference: Reference::Counted(count) };
    }
    // Count a prefix of the text exactly and scale it by bytes: tokens per byte vary little
    // within one prompt, and the exact count follows.
    let bpe = encoding_for(model);
    let mut prefix = String::with_capacity(SAMPLE_BYTES);
    let mut ignored = 0;
    walk_texts(
        body,
        &mut |t| {
            let room = SAMPLE_BYTES - prefix.len();
            if room > 0 {
                let mut end = room.min(t.len());
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                prefix.push_str(&t[..end]);
            }
        },
        &mut ignored,
    );
    let prefix_tokens = count_text(bpe, &prefix);
    let scaled = (i128::from(prefix_tokens) * bytes as i128 / prefix.len().max(1) as i128) as i64;
    let tokens = scaled.saturating_add(chat_overhead(messages));
    let (job_model, job_body) = (model.to_owned(), Arc::clone(body));
    let (done, counted) = tokio::sync::oneshot::channel();
    let job: CountJob = Box::new(move || {
        let (tokens, chars) = estimate_input(&job_model, &job_body);
        let _ = done.send(Count { tokens, chars });
        DEFERRED_HELD.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    });
    let estimate =
        InputEstimate { tokens, bytes: as_i64(bytes), reference: Reference::Counted(Count { tokens, chars: 0 }) };
    let held = DEFERRED_HELD.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    if held + bytes > DEFERRED_BYTES || COUNTERS.try_send(job).is_err() {
        DEFERRED_HELD.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::reference_count_skipped();
        let mut chars = 0;
        walk_texts(body, &mut |t| chars += as_i64(t.chars().count()), &mut ignored);
        return InputEstimate { reference: Reference::Counted(Count { tokens, chars }), ..estimate };
    }
    crate::metrics::reference_count_deferred();
    // A count that never reports (its thread gone) leaves the estimate in its place.
    let fallback = estimate.best_now();
    let reference = async move { counted.await.unwrap_or(fallback) };
    InputEstimate { reference: Reference::Deferred(reference.boxed().shared()), ..estimate }
}

/// Calls `f` on every prompt text of a request body (Anthropic's `system`, embeddings'
/// `input`, each message's content) and counts the messages.
fn walk_texts(body: &Value, f: &mut impl FnMut(&str), messages: &mut i64) {
    if let Some(system) = body.get("system") {
        for_each_text(system, f);
    }
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {}
        Some(input) => for_each_text(input, f),
        None => {}
    }
    if let Some(list) = body.get("messages").and_then(Value::as_array) {
        for m in list {
            *messages += 1;
            if let Some(c) = m.get("content") {
                for_each_text(c, f);
            }
        }
    }
}

/// Calls `f` on every text of a content value: a string, or an array of `{type: text, text}` blocks.
pub fn for_each_text(content: &Value, f: &mut impl FnMut(&str)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(blocks) => {
            for b in blocks {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    f(t);
                } else if let Some(s) = b.as_str() {
                    f(s);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_messages_in_both_formats() {
        let openai = json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You classify intents."},
            {"role": "user", "content": "Where is my order?"}]});
        let (t, c) = estimate_input("gpt-4o-mini", &openai);
        // "You classify intents." = 4 tokens, "Where is my order?" = 5 tokens (o200k), + 2*3 + 3.
        assert_eq!(t, 4 + 5 + 9);
        assert_eq!(c, 21 + 18);
        let anthropic = json!({"model": "claude-haiku-4-5", "system": [{"type": "text", "text": "You classify intents."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Where is my order?"}]}]});
        let (t, c) = estimate_input("claude-haiku-4-5", &anthropic);
        assert_eq!(c, 39);
        assert!(t > 9 && t < 20, "{t}");
    }

    #[test]
    fn remembered_counts_equal_fresh_ones() {
        let texts = ["You classify intents.", "Where is my order?", "", "ünïcödé 🚀 text", "You classify intents."];
        for bpe in [o200k_base_singleton(), cl100k_base_singleton()] {
            for _ in 0..2 {
                for t in texts {
                    assert_eq!(count_prompt_text(bpe, t), count_text(bpe, t), "{t:?}");
                }
            }
        }
        // Past a generation's size the oldest texts are counted afresh, still correctly.
        for i in 0..SEEN_PER_GENERATION + 10 {
            count_prompt_text(cl100k_base_singleton(), &format!("filler {i}"));
        }
        assert_eq!(
            count_prompt_text(cl100k_base_singleton(), "filler 3"),
            count_text(cl100k_base_singleton(), "filler 3")
        );
    }

    #[tokio::test]
    async fn long_prompts_are_estimated_inline_and_counted_beside() {
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(20_000);
        let body = Arc::new(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": long}]}));
        let est = estimate_input_bounded("gpt-4o-mini", &body);
        let (exact, chars) = estimate_input("gpt-4o-mini", &body);
        assert!(matches!(est.reference, Reference::Deferred(_)), "a long prompt is counted beside");
        if let Reference::Deferred(f) = est.reference.clone() {
            assert_eq!(f.await, Count { tokens: exact, chars });
        }
        // A repeated sentence scales exactly, up to the cut at the prefix's end.
        assert!((est.tokens - exact).abs() * 1000 <= exact, "{} vs {exact}", est.tokens);
        let short = Arc::new(json!({"messages": [{"role": "user", "content": "hello there"}]}));
        let est = estimate_input_bounded("gpt-4o-mini", &short);
        let (tokens, chars) = estimate_input("gpt-4o-mini", &short);
        assert_eq!(est.reference.now(), Some(Count { tokens, chars }));
    }

    #[test]
    fn picks_encoding_by_family() {
        assert!(std::ptr::eq(encoding_for("gpt-4o-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("o3-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("claude-haiku-4-5"), cl100k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("gpt-4"), cl100k_base_singleton()));
    }
}
