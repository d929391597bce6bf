//! OpenAI Chat Completions (and every OpenAI-compatible server): requests, usage, stream passthrough.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{StreamAccounting, Usage, int};
use crate::count::for_each_text;

/// Usage of a Chat Completions response or of the final stream chunk.
pub fn usage(body: &Value) -> Option<Usage> {
    body.get("usage").filter(|u| u.is_object()).map(usage_fields)
}

/// The counts of a `usage` object.
fn usage_fields(u: &Value) -> Usage {
    Usage {
        input: int(u, &["prompt_tokens"]).unwrap_or(0),
        output: int(u, &["completion_tokens"]).unwrap_or(0),
        cached_read: int(u, &["prompt_tokens_details", "cached_tokens"]).unwrap_or(0),
        cache_write: 0,
        reasoning: int(u, &["completion_tokens_details", "reasoning_tokens"]).unwrap_or(0),
    }
}

/// The body to send upstream: the client's, with the concrete model, and with usage requested
/// on streams (the extra chunk is hidden again from clients that did not ask for it).
pub fn upstream_body(client: &Value, raw: &Bytes, model: &str, stream: bool) -> super::UpstreamBody {
    let mut set = vec![("model", json!(model))];
    if stream {
        let mut opts = client.get("stream_options").filter(|o| o.is_object()).cloned().unwrap_or_else(|| json!({}));
        opts["include_usage"] = json!(true);
        set.push(("stream_options", opts));
    }
    super::with_fields(client, raw, set)
}

/// Output text of a non-streaming response (for estimates when a provider reports no usage).
pub fn response_text(body: &Value) -> String {
    let mut out = String::new();
    if let Some(choices) = body.get("choices").and_then(Value::as_array) {
        for c in choices {
            if let Some(t) = c.pointer("/message/content").and_then(Value::as_str) {
                out.push_str(t);
            }
        }
    }
    out
}

/// Passes OpenAI stream chunks through, recording usage and text. Returns the chunk to forward,
/// or `None` for the usage-only chunk a client did not ask for.
pub fn passthrough_chunk(chunk: &Value, acct: &mut StreamAccounting, client_wants_usage: bool) -> bool {
    if acct.model_version.is_none() {
        acct.model_version = chunk.get("model").and_then(Value::as_str).map(str::to_owned);
    }
    if let Some(u) = usage(chunk) {
        acct.usage = Some(u);
    }
    let choices = chunk.get("choices").and_then(Value::as_array);
    if let Some(choices) = choices {
        for c in choices {
            if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                acct.push_text(t);
            }
        }
    }
    let usage_only = choices.is_none_or(|c| c.is_empty()) && chunk.get("usage").is_some_and(Value::is_object);
    client_wants_usage || !usage_only
}

/// What [`passthrough_event`] reads of a stream chunk, borrowed from the event's text; every
/// other field is skipped without being built. Chunks are parsed once per event, which made the
/// generic `Value` parse the largest share of a stream's CPU after the socket writes.
#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default)]
    usage: Option<Value>,
    /// Whether the chunk has an `error` member at all.
    #[serde(default, deserialize_with = "present")]
    error: bool,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// [`passthrough_chunk`] straight from an event's text, for chunks shaped as OpenAI sends them.
/// `None` when the event is anything else (not an object, an error, unexpected types): the
/// caller then parses it as a `Value` and takes the general path, so behaviour does not change.
pub fn passthrough_event(data: &str, acct: &mut StreamAccounting, client_wants_usage: bool) -> Option<bool> {
    if !data.trim_start().starts_with('{') {
        return None;
    }
    let chunk: ChunkView = serde_json::from_str(data).ok()?;
    if chunk.error {
        return None;
    }
    if acct.model_version.is_none() {
        acct.model_version = chunk.model.map(Cow::into_owned);
    }
    let usage = chunk.usage.as_ref().filter(|u| u.is_object());
    if let Some(u) = usage {
        acct.usage = Some(usage_fields(u));
    }
    for c in chunk.choices.iter().flatten() {
        if let Some(t) = c.delta.as_ref().and_then(|d| d.content.as_deref()) {
            acct.push_text(t);
        }
    }
    let usage_only = chunk.choices.as_ref().is_none_or(Vec::is_empty) && usage.is_some();
    Some(client_wants_usage || !usage_only)
}

/// Translates an Anthropic Messages request into a Chat Completions request.
pub fn from_anthropic_request(req: &Value, model: &str, stream: bool) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = req.get("system") {
        let mut text = String::new();
        for_each_text(system, &mut |t| text.push_str(t));
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    if let Some(list) = req.get("messages").and_then(Value::as_array) {
        for m in list {
            let role = if m.get("role").and_then(Value::as_str) == Some("assistant") { "assistant" } else { "user" };
            let mut text = String::new();
            if let Some(c) = m.get("content") {
                for_each_text(c, &mut |t| text.push_str(t));
            }
            messages.push(json!({"role": role, "content": text}));
        }
    }
    let mut body = json!({"model": model, "messages": messages});
    for key in ["temperature", "top_p", "max_tokens"] {
        if let Some(v) = req.get(key) {
            body[key] = v.clone();
        }
    }
    if let Some(stop) = req.get("stop_sequences") {
        body["stop"] = stop.clone();
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn stop_reason(finish: Option<&str>) -> Value {
    match finish {
        Some("length") => json!("max_tokens"),
        Some("tool_calls") | Some("function_call") => json!("tool_use"),
        Some(_) => json!("end_turn"),
        None => Value::Null,
    }
}

/// Anthropic `usage` object for normalised counts (input excludes cache reads and writes).
pub fn anthropic_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": (u.input - u.cached_read - u.cache_write).max(0),
        "output_tokens": u.output,
        "cache_read_input_tokens": u.cached_read,
        "cache_creation_input_tokens": u.cache_write,
    })
}

/// Translates a Chat Completions response into a Messages response.
pub fn to_anthropic_response(resp: &Value) -> Value {
    let u = usage(resp).unwrap_or_default();
    let id = resp.get("id").and_then(Value::as_str).unwrap_or("chatcmpl");
    let finish = resp.pointer("/choices/0/finish_reason").and_then(Value::as_str);
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model").cloned().unwrap_or(Value::Null),
        "content": [{"type": "text", "text": response_text(resp)}],
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": anthropic_usage(&u),
    })
}

/// Turns OpenAI stream chunks into Anthropic stream events (`(event name, data)` pairs).
#[derive(Debug, Default)]
pub struct ToAnthropicStream {
    pub id: String,
    started: bool,
    block_open: bool,
    stop: Option<Value>,
}

impl ToAnthropicStream {
    pub fn new(id: String) -> Self {
        Self { id, ..Self::default() }
    }

    fn start(&mut self, acct: &StreamAccounting, out: &mut Vec<(&'static str, Value)>) {
        if !self.started {
            self.started = true;
            out.push((
                "message_start",
                json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": acct.model_version,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ));
        }
    }

    /// Handles one chunk; `[DONE]` is passed as `None`.
    pub fn on_chunk(
        &mut self,
        chunk: Option<&Value>,
        acct: &mut StreamAccounting,
        out: &mut Vec<(&'static str, Value)>,
    ) {
        let Some(chunk) = chunk else {
            // End of stream: close the block and the message, with the usage OpenAI reported last.
            self.start(acct, out);
            if self.block_open {
                out.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                self.block_open = false;
            }
            let u = acct.usage.unwrap_or_default();
            out.push((
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop.take().unwrap_or(json!("end_turn")), "stop_sequence": null},
                "usage": anthropic_usage(&u)}),
            ));
            out.push(("message_stop", json!({"type": "message_stop"})));
            acct.finished = true;
            return;
        };
        let before = acct.text.len();
        passthrough_chunk(chunk, acct, true);
        self.start(acct, out);
        if acct.text.len() > before {
            if !self.block_open {
                self.block_open = true;
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ));
            }
            let delta = &acct.text[before..];
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": delta}}),
            ));
        }
        if let Some(f) = chunk.pointer("/choices/0/finish_reason").and_then(Value::as_str) {
            self.stop = Some(stop_reason(Some(f)));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The borrowed fast path learns what the `Value` path learns from the same chunks, and
    /// declines what it does not handle.
    #[test]
    fn the_event_fast_path_agrees_with_the_value_path() {
        let chunks = [
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c1","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"Hél\"lo \u00e9"}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"id":"c1","choices":[{"delta":{"content":null}},{"delta":{"content":" two"}}]}"#,
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            r#"{"id":"c1","usage":null}"#,
        ];
        for wants_usage in [false, true] {
            let (mut fast, mut slow) = (StreamAccounting::default(), StreamAccounting::default());
            for c in chunks {
                let f = passthrough_event(c, &mut fast, wants_usage);
                let s = passthrough_chunk(&serde_json::from_str(c).unwrap(), &mut slow, wants_usage);
                assert_eq!(f, Some(s), "{c}");
            }
            assert_eq!(fast.text, slow.text);
            assert_eq!(fast.text, "Hél\"lo é two");
            assert_eq!(fast.model_version, slow.model_version);
            assert_eq!(fast.usage, slow.usage);
            assert_eq!(fast.usage.map(|u| u.cached_read), Some(2));
        }
        let mut acct = StreamAccounting::default();
        for declined in [
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"error":null}"#,
            r#"[1,2]"#,
            r#"{"choices":[{"delta":{"content":[{"type":"text","text":"x"}]}}]}"#,
            r#"{"choices":"nope"}"#,
            "not json",
        ] {
            assert_eq!(passthrough_event(declined, &mut acct, false), None, "{declined}");
        }
        assert!(acct.text.is_empty() && acct.usage.is_none());
    }

    #[test]
    fn reads_usage_details() {
        let b = json!({"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 30}, "completion_tokens_details": {"reasoning_tokens": 5}}});
        let u = usage(&b).unwrap();
        assert_eq!(u, Usage { input: 100, output: 20, cached_read: 30, cache_write: 0, reasoning: 5 });
        assert_eq!(u.billable().input, 70);
        assert!(usage(&json!({"usage": null})).is_none());
    }

    #[test]
    fn asks_for_stream_usage_and_hides_it() {
        for client in [
            json!({"model": "intent-fast", "stream": true}),
            json!({"model": "intent-fast", "stream": true, "stream_options": {"include_usage": false, "x": 1}}),
        ] {
            // From the client's bytes, and from its tree when the bytes cannot be spliced.
            for raw in [client.to_string().into_bytes(), br#"{"mod\u0065l": "intent-fast"}"#.to_vec()] {
                let b = upstream_body(&client, &Bytes::from(raw), "gpt-4o-mini", true).to_vec();
                let b: Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(b["stream_options"]["include_usage"], json!(true));
                assert_eq!(b["model"], json!("gpt-4o-mini"));
            }
        }
        let raw =
            Bytes::from_static(br#"{"model":"a","messages":[{"role":"user","content":"caf\u00e9 \"q\""}],"n":1.50}"#);
        let spliced = String::from_utf8(upstream_body(&Value::Null, &raw, "b", false).to_vec()).unwrap();
        assert_eq!(
            spliced, r#"{"messages":[{"role":"user","content":"caf\u00e9 \"q\""}],"model":"b","n":1.50}"#,
            "copied verbatim"
        );
        let mut acct = StreamAccounting::default();
        let last = json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}});
        assert!(!passthrough_chunk(&last, &mut acct, false));
        assert_eq!(acct.usage.unwrap().output, 3);
        assert!(passthrough_chunk(&last, &mut acct, true));
        let delta =
            json!({"model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"content": "hi"}}], "usage": null});
        assert!(passthrough_chunk(&delta, &mut acct, false));
        assert_eq!(acct.text, "hi");
    }

    #[test]
    fn translates_anthropic_requests_and_responses() {
        let req = json!({"model": "vm", "max_tokens": 20, "system": [{"type": "text", "text": "Be terse."}],
            "stop_sequences": ["END"], "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]});
        let b = from_anthropic_request(&req, "gpt-4o-mini", true);
        assert_eq!(
            b["messages"],
            json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
        );
        assert_eq!(b["max_tokens"], 20);
        assert_eq!(b["stop"], json!(["END"]));
        assert_eq!(b["stream_options"]["include_usage"], true);
        let resp = json!({"id": "x", "model": "gpt-4o-mini", "choices": [{"message": {"content": "Hello"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}});
        let a = to_anthropic_response(&resp);
        assert_eq!(a["content"][0]["text"], "Hello");
        assert_eq!(a["stop_reason"], "max_tokens");
        assert_eq!(
            a["usage"],
            json!({"input_tokens": 6, "output_tokens": 3, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0})
        );
    }

    #[test]
    fn translates_a_stream_to_anthropic_events() {
        let mut t = ToAnthropicStream::new("msg_1".into());
        let mut acct = StreamAccounting::default();
        let mut out = Vec::new();
        t.on_chunk(
            Some(&json!({"model": "gpt-4o-mini", "choices": [{"delta": {"role": "assistant", "content": ""}}]})),
            &mut acct,
            &mut out,
        );
        t.on_chunk(Some(&json!({"choices": [{"delta": {"content": "Hi"}}]})), &mut acct, &mut out);
        t.on_chunk(Some(&json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})), &mut acct, &mut out);
        t.on_chunk(
            Some(&json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})),
            &mut acct,
            &mut out,
        );
        t.on_chunk(None, &mut acct, &mut out);
        let names: Vec<&str> = out.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(out[4].1["usage"]["output_tokens"], 2);
        assert_eq!(out[4].1["usage"]["input_tokens"], 9);
        assert!(acct.finished);
        assert_eq!(acct.usage.unwrap().input, 9);
    }
}
