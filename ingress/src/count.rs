//! Token estimates with tiktoken: the reference count beside the provider's report.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{LazyLock, Mutex, PoisonError};

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
    let mut add = |text: &str| {
        tokens += count_prompt_text(bpe, text);
        chars += i64::try_from(text.chars().count()).unwrap_or(i64::MAX);
    };
    if let Some(system) = body.get("system") {
        for_each_text(system, &mut add);
    }
    // Embeddings: `input` is a string or an array of strings (token-id arrays are counted as given).
    let mut token_ids = 0;
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => token_ids = items.len() as i64,
        Some(input) => for_each_text(input, &mut add),
        None => {}
    }
    let mut messages = 0;
    if let Some(list) = body.get("messages").and_then(Value::as_array) {
        for m in list {
            messages += 1;
            if let Some(c) = m.get("content") {
                for_each_text(c, &mut add);
            }
        }
    }
    (tokens + token_ids + messages * PER_MESSAGE + if messages > 0 { REPLY_PRIMING } else { 0 }, chars)
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

    #[test]
    fn picks_encoding_by_family() {
        assert!(std::ptr::eq(encoding_for("gpt-4o-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("o3-mini"), o200k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("claude-haiku-4-5"), cl100k_base_singleton()));
        assert!(std::ptr::eq(encoding_for("gpt-4"), cl100k_base_singleton()));
    }
}
