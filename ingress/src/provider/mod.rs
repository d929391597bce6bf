//! Provider adapters: request building, usage extraction and format translation per wire format.

pub mod anthropic;
pub mod openai;

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use serde_json::Value;
use serde_json::value::RawValue;
use tollgate_schemas::price::TokenCounts;

/// The client's request with some top-level fields set to new values: the client's own bytes
/// with every other value passed on verbatim, never parsed into a tree or escaped again
/// (serializing a parsed 3.6 MB prompt back to JSON took ~4 ms, most of a big request's time in
/// the gateway), and large values not even copied (a slice of the client's buffer). When the
/// bytes cannot be spliced (a key with escapes), the parsed `client` tree with the fields set is
/// serialized instead.
pub fn with_fields(client: &Value, raw: &Bytes, set: Vec<(&str, Value)>) -> UpstreamBody {
    splice(raw, &set).unwrap_or_else(|| {
        let mut body = client.clone();
        for (k, v) in set {
            body[k] = v;
        }
        UpstreamBody::from(body.to_string().into_bytes())
    })
}

/// Values at least this long go upstream as slices of the client's buffer; shorter ones are
/// copied into the small buffers between them (a few writes, not one per field).
const SLICE_BYTES: usize = 64 << 10;

fn splice(raw: &Bytes, set: &[(&str, Value)]) -> Option<UpstreamBody> {
    let mut fields: BTreeMap<&str, &RawValue> = serde_json::from_slice(raw).ok()?;
    let values: Vec<Box<RawValue>> =
        set.iter().map(|(_, v)| serde_json::value::to_raw_value(v)).collect::<Result<_, _>>().ok()?;
    for ((k, _), v) in set.iter().zip(&values) {
        fields.insert(k, v);
    }
    let mut body = UpstreamBody::default();
    let mut small = Vec::with_capacity(512);
    small.push(b'{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            small.push(b',');
        }
        serde_json::to_writer(&mut small, k).ok()?;
        small.push(b':');
        let text = v.get().as_bytes();
        // A value of the client's own (not one of `set`) lies inside `raw`.
        if text.len() >= SLICE_BYTES && raw.as_ptr_range().contains(&text.as_ptr()) {
            body.push(Bytes::from(std::mem::take(&mut small)));
            body.push(raw.slice_ref(text));
        } else {
            small.extend_from_slice(text);
        }
    }
    small.push(b'}');
    body.push(Bytes::from(small));
    Some(body)
}

/// A request body in a few pieces, its length known: the client's large values as slices of its
/// buffer, the rest in small buffers. It implements [`http_body::Body`] with an exact size, so
/// the HTTP client sends a `Content-Length` and writes the pieces as they are.
#[derive(Debug, Default)]
pub struct UpstreamBody {
    chunks: VecDeque<Bytes>,
    len: u64,
}

impl UpstreamBody {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len() as u64;
            self.chunks.push_back(chunk);
        }
    }

    /// The whole body in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }
}

impl From<Vec<u8>> for UpstreamBody {
    fn from(bytes: Vec<u8>) -> Self {
        let mut body = UpstreamBody::default();
        body.push(Bytes::from(bytes));
        body
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        Poll::Ready(this.chunks.pop_front().map(|c| {
            this.len -= c.len() as u64;
            Ok(http_body::Frame::data(c))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt as _;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn a_big_value_goes_upstream_as_a_slice_of_the_clients_buffer() {
        let text = "word ".repeat(40_000);
        let client = json!({"model": "fast", "messages": [{"role": "user", "content": text}], "n": 1});
        let raw = Bytes::from(client.to_string());
        let body = with_fields(&client, &raw, vec![("model", json!("gpt-4o-mini"))]);
        let big = body.chunks.iter().find(|c| c.len() >= SLICE_BYTES).unwrap();
        assert!(raw.as_ptr_range().contains(&big.as_ptr()), "the messages are not copied");
        assert_eq!(body.chunks.len(), 3, "before, the messages, after");
        let len = body.len;
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent.len() as u64, len, "the size announced is the size sent");
        let sent: Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(sent, json!({"model": "gpt-4o-mini", "messages": client["messages"], "n": 1}));
    }
}
