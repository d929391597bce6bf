//! Provider adapters: request building, usage extraction and format translation per wire format.

pub mod anthropic;
pub mod openai;

use serde_json::Value;
use tollgate_schemas::price::TokenCounts;

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
