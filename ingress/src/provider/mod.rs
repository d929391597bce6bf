//! Provider adapters: request building, usage extraction and format translation per wire format.

pub mod anthropic;
pub mod openai;

use std::collections::BTreeMap;

use serde_json::Value;
use serde_json::value::RawValue;
use tollgate_schemas::price::TokenCounts;

/// The client's request with some top-level fields set to new values, as bytes: the client's
/// own bytes with every other value copied verbatim, never parsed into a tree or escaped again
/// (serializing a parsed 3.6 MB prompt back to JSON took ~4 ms, most of a big request's time in
/// the gateway; this is a copy). When the bytes cannot be spliced (a key with escapes), the
/// parsed `client` tree with the fields set is serialized instead.
pub fn with_fields(client: &Value, raw: &[u8], set: Vec<(&str, Value)>) -> Vec<u8> {
    splice(raw, &set).unwrap_or_else(|| {
        let mut body = client.clone();
        for (k, v) in set {
            body[k] = v;
        }
        body.to_string().into_bytes()
    })
}

fn splice(raw: &[u8], set: &[(&str, Value)]) -> Option<Vec<u8>> {
    let mut fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(raw).ok()?;
    let values: Vec<Box<RawValue>> =
        set.iter().map(|(_, v)| serde_json::value::to_raw_value(v)).collect::<Result<_, _>>().ok()?;
    for ((k, _), v) in set.iter().zip(&values) {
        fields.insert(k, v);
    }
    let mut out = Vec::with_capacity(raw.len() + 256);
    serde_json::to_writer(&mut out, &fields).ok()?;
    Some(out)
}

/// Token counts of one response, normalised: `input` counts every input token, including
/// prompt-cache reads and writes (OpenAI's `prompt_tokens`; Anthropic's three input fields added).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: i64,
    pub output: i64,
    pub cached_read: i64,
    pub cache_write: i64,
    pub reasoning: i64,
}

impl Usage {
    /// Counts as the price card bills them: uncached input, output, cache reads, cache writes.
    pub fn billable(&self) -> TokenCounts {
        TokenCounts {
            input: (self.input - self.cached_read - self.cache_write).max(0),
            output: self.output,
            cached_read: self.cached_read,
            cache_write: self.cache_write,
        }
    }
}

fn int(v: &Value, path: &[&str]) -> Option<i64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_i64()
}

/// What a streaming conversion learned from the provider so far.
#[derive(Debug, Default)]
pub struct StreamAccounting {
    /// Usage the provider reported, if it did.
    pub usage: Option<Usage>,
    /// Model the provider said it ran.
    pub model_version: Option<String>,
    /// Output text already passed to the client, for an estimate if the stream is cut.
    pub text: String,
    /// Whether the provider signalled a clean end of stream.
    pub finished: bool,
}

/// Longest output text kept for estimating a cut stream (beyond this, the count is extrapolated
/// from the characters seen).
pub const MAX_TEXT_KEPT: usize = 1 << 20;

impl StreamAccounting {
    pub fn push_text(&mut self, s: &str) {
        if self.text.len() + s.len() <= MAX_TEXT_KEPT {
            self.text.push_str(s);
        }
    }
}
