//! Anthropic Messages: usage, and translation from and to OpenAI Chat Completions (streams too).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{StreamAccounting, Usage, int};
use crate::count::for_each_text;
use crate::error::IngressError;

pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` is required by Anthropic; used when an OpenAI client did not set one.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Usage of a Messages response, or of a stream's `message_start.message`.
pub fn usage(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let fresh = int(u, &["input_tokens"]).unwrap_or(0);
    let cached_read = int(u, &["cache_read_input_tokens"]).unwrap_or(0);
    let cache_write = int(u, &["cache_creation_input_tokens"]).unwrap_or(0);
    Some(Usage {
        input: fresh + cached_read + cache_write,
        output: int(u, &["output_tokens"]).unwrap_or(0),
        cached_read,
        cache_write,
        reasoning: 0,
    })
}

/// Translates an OpenAI Chat Completions request into a Messages request.
pub fn from_openai_request(req: &Value, model: &str, stream: bool) -> Result<Value, IngressError> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| IngressError::InvalidRequest("`messages` must be an array".into()))?;
    let mut system = String::new();
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let mut text = String::new();
        if let Some(c) = m.get("content") {
            for_each_text(c, &mut |t| text.push_str(t));
        }
        match role {
            "system" | "developer" => {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(&text);
            }
            "assistant" => out.push(json!({"role": "assistant", "content": text})),
            _ => out.push(json!({"role": "user", "content": text})),
        }
    }
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(out));
    body.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        body.insert("system".into(), json!(system));
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = req.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            body.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            body.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if stream {
        body.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(body))
}

fn finish_reason(stop_reason: Option<&str>) -> Value {
    match stop_reason {
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some(_) => json!("stop"),
        None => Value::Null,
    }
}

/// OpenAI `usage` object for normalised counts.
pub fn openai_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cached_read},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning},
    })
}

/// Text of a Messages response.
pub fn response_text(resp: &Value) -> String {
    let mut text = String::new();
    if let Some(c) = resp.get("content") {
        for_each_text(c, &mut |t| text.push_str(t));
    }
    text
}

/// Translates a Messages response into a Chat Completions response.
pub fn to_openai_response(resp: &Value, created: i64) -> Value {
    let usage = resp.get("usage").and_then(usage).unwrap_or_default();
    let id = resp.get("id").and_then(Value::as_str).unwrap_or("msg");
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": resp.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": response_text(resp)},
            "finish_reason": finish_reason(resp.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": openai_usage(&usage),
    })
}

/// Turns Anthropic stream events into OpenAI chunks.
#[derive(Debug)]
pub struct ToOpenAiStream {
    pub id: String,
    pub created: i64,
    pub client_wants_usage: bool,
}

impl ToOpenAiStream {
    fn chunk(&self, acct: &StreamAccounting, delta: Value, finish: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": acct.model_version,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if self.client_wants_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// Handles one event (`event:` name and parsed `data:`), pushing OpenAI chunks to `out`.
    pub fn on_event(&self, name: &str, data: &Value, acct: &mut StreamAccounting, out: &mut Vec<Value>) {
        let before = acct.text.len();
        match observe_event(name, data, acct) {
            "message_start" => out.push(self.chunk(acct, json!({"role": "assistant", "content": ""}), Value::Null)),
            "content_block_delta" if acct.text.len() > before => {
                let delta = acct.text[before..].to_owned();
                out.push(self.chunk(acct, json!({"content": delta}), Value::Null));
            }
            "message_delta" => {
                let stop = data.pointer("/delta/stop_reason").and_then(Value::as_str);
                out.push(self.chunk(acct, json!({}), finish_reason(stop)));
            }
            "message_stop" if self.client_wants_usage => {
                let u = acct.usage.unwrap_or_default();
                out.push(json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": acct.model_version, "choices": [], "usage": openai_usage(&u),
                }));
            }
            _ => {}
        }
    }
}

/// The body to send upstream for an Anthropic client: the client's, with the concrete model.
pub fn upstream_body(client: &Value, raw: &Bytes, model: &str) -> super::UpstreamBody {
    super::with_fields(client, raw, vec![("model", json!(model))])
}

/// Records what one stream event says (model, usage, text, end) and returns its type.
pub fn observe_event<'a>(name: &'a str, data: &'a Value, acct: &mut StreamAccounting) -> &'a str {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or(name);
    match kind {
        "message_start" => {
            let msg = data.get("message").unwrap_or(&Value::Null);
            acct.model_version = msg.get("model").and_then(Value::as_str).map(str::to_owned);
            acct.usage = msg.get("usage").and_then(usage);
        }
        "content_block_delta" => {
            if let Some(t) = data.pointer("/delta/text").and_then(Value::as_str) {
                acct.push_text(t);
            }
        }
        "message_delta" => {
            // Anthropic's message_delta usage is cumulative: its counts replace earlier ones.
            if let Some(u) = data.get("usage").filter(|u| u.is_object()) {
                let mut cur = acct.usage.unwrap_or_default();
                if let Some(o) = int(u, &["output_tokens"]) {
                    cur.output = o;
                }
                if let Some(next) = usage(u).filter(|_| u.get("input_tokens").is_some()) {
                    cur.input = next.input;
                    cur.cached_read = next.cached_read;
                    cur.cache_write = next.cache_write;
                }
                acct.usage = Some(cur);
            }
        }
        "message_stop" => acct.finished = true,
        _ => {}
    }
    kind
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn translates_requests() {
        let req = json!({"model": "intent-fast", "max_tokens": 50, "stop": "END", "temperature": 0.2,
            "messages": [{"role": "system", "content": "Be terse."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"}]});
        let b = from_openai_request(&req, "claude-haiku-4-5", true).unwrap();
        assert_eq!(b["system"], "Be terse.");
        assert_eq!(b["messages"].as_array().unwrap().len(), 3);
        assert_eq!(b["messages"][0], json!({"role": "user", "content": "Hi"}));
        assert_eq!(b["max_tokens"], 50);
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["stream"], true);
        assert_eq!(b["model"], "claude-haiku-4-5");
    }

    #[test]
    fn usage_adds_cache_fields_to_input() {
        let u = usage(&json!({"input_tokens": 10, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5, "output_tokens": 7}))
        .unwrap();
        assert_eq!(u, Usage { input: 115, output: 7, cached_read: 100, cache_write: 5, reasoning: 0 });
        assert_eq!(u.billable().input, 10);
    }

    #[test]
    fn translates_a_stream() {
        let t = ToOpenAiStream { id: "x".into(), created: 1, client_wants_usage: false };
        let mut acct = StreamAccounting::default();
        let mut out = Vec::new();
        t.on_event(
            "message_start",
            &json!({"type": "message_start", "message": {"model": "claude-haiku-4-5-20251001",
            "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            &mut acct,
            &mut out,
        );
        t.on_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
            &mut acct,
            &mut out,
        );
        t.on_event(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
            &mut acct,
            &mut out,
        );
        t.on_event("message_stop", &json!({"type": "message_stop"}), &mut acct, &mut out);
        assert_eq!(out.len(), 3, "no usage chunk for a client that did not ask");
        assert_eq!(out[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(out[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(acct.usage.unwrap(), Usage { input: 12, output: 9, ..Default::default() });
        assert!(acct.finished);
        assert_eq!(acct.model_version.as_deref(), Some("claude-haiku-4-5-20251001"));
    }
}
