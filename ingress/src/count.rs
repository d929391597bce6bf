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

/// Prompt text counted with tiktoken on the request path, at most. A longer prompt's reference
/// count runs on the blocking pool beside the upstream call (tiktoken takes ~0.45 s for 3.2 MB),
/// and the request path uses a linear estimate from this much of its text.
pub const INLINE_BYTES: usize = 64 << 10;

/// Reference counts of long prompts running at once, at most (one per core); others wait their
/// turn off the request path.
static DEFERRED: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get))
});

/// A prompt's reference (tiktoken) input count: known, or being counted beside the upstream call.
#[derive(Clone)]
pub enum Reference {
    Counted(i64),
    Deferred(Shared<BoxFuture<'static, i64>>),
}

impl Reference {
    /// The count if it is known now.
    pub fn now(&self) -> Option<i64> {
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
    /// linear estimate from its first [`INLINE_BYTES`] (for the gate and for intake records).
    pub tokens: i64,
    pub chars: i64,
    pub reference: Reference,
}

/// Estimates a prompt's input without spending more than [`INLINE_BYTES`] of tiktoken on the
/// request path; must run inside a Tokio runtime when the prompt is longer (the exact count is
/// spawned onto the blocking pool).
pub fn estimate_input_bounded(model: &str, body: &Arc<Value>) -> InputEstimate {
    let mut bytes = 0usize;
    let mut chars = 0i64;
    let mut messages = 0i64;
    walk_texts(
        body,
        &mut |t| {
            bytes += t.len();
            chars += i64::try_from(t.chars().count()).unwrap_or(i64::MAX);
        },
        &mut messages,
    );
    if bytes <= INLINE_BYTES || tokio::runtime::Handle::try_current().is_err() {
        let (tokens, chars) = estimate_input(model, body);
        return InputEstimate { tokens, chars, reference: Reference::Counted(tokens) };
    }
    // Count a prefix of the text exactly and scale it by bytes: tokens per byte vary little
    // within one prompt, and the exact count follows.
    let bpe = encoding_for(model);
    let mut prefix = String::with_capacity(INLINE_BYTES);
    let mut ignored = 0;
    walk_texts(
        body,
        &mut |t| {
            let room = INLINE_BYTES - prefix.len();
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
    crate::metrics::reference_count_deferred();
    let (model, body) = (model.to_owned(), Arc::clone(body));
    let counting = tokio::spawn(async move {
        let _permit = DEFERRED.acquire().await.ok();
        tokio::task::spawn_blocking(move || estimate_input(&model, &body).0).await
    });
    let reference = async move {
        match counting.await {
            Ok(Ok(n)) => n,
            // The count panicked or the runtime is shutting down: the estimate stands in.
            _ => tokens,
        }
    };
    InputEstimate { tokens, chars, reference: Reference::Deferred(reference.boxed().shared()) }
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
        assert_eq!(est.chars, chars);
        assert!(matches!(est.reference, Reference::Deferred(_)), "a long prompt is counted beside");
        if let Reference::Deferred(f) = est.reference.clone() {
            assert_eq!(f.await, exact);
        }
        // A repeated sentence scales exactly, up to the cut at the prefix's end.
        assert!((est.tokens - exact).abs() * 1000 <= exact, "{} vs {exact}", est.tokens);
        let short = Arc::new(json!({"messages": [{"role": "user", "content": "hello there"}]}));
        let est = estimate_input_bounded("gpt-4o-mini", &short);
        assert_eq!(est.reference.now(), Some(estimate_input("gpt-4o-mini", &short).0));
    }

    #[test]
    fn picks_encoding_by_family() {
        assert!(std::ptr::eq(encoding_for("gpt-4o-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("o3-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("claude-haiku-4-5"), cl100k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("gpt-4"), cl100k_base_singleton()));
    }
}
