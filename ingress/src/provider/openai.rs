//! OpenAI Chat Completions (and every OpenAI-compatible server): requests, usage, stream passthrough.

use serde_json::{Value, json};

use super::{StreamAccounting, Usage, int};

/// Usage of a Chat Completions response or of the final stream chunk.
pub fn usage(body: &Value) -> Option<Usage> {
    let u = body.get("usage").filter(|u| u.is_object())?;
    Some(Usage {
        input: int(u, &["prompt_tokens"]).unwrap_or(0),
        output: int(u, &["completion_tokens"]).unwrap_or(0),
        cached_read: int(u, &["prompt_tokens_details", "cached_tokens"]).unwrap_or(0),
        cache_write: 0,
        reasoning: int(u, &["completion_tokens_details", "reasoning_tokens"]).unwrap_or(0),
    })
}

/// The body to send upstream: the client's, with the concrete model, and with usage requested
/// on streams (the extra chunk is hidden again from clients that did not ask for it).
pub fn upstream_body(client: &Value, model: &str, stream: bool) -> Value {
    let mut body = client.clone();
    body["model"] = json!(model);
    if stream {
        let opts = body.get_mut("stream_options").filter(|o| o.is_object());
        match opts {
            Some(o) => o["include_usage"] = json!(true),
            None => body["stream_options"] = json!({"include_usage": true}),
        }
    }
    body
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        let b = upstream_body(&json!({"model": "intent-fast", "stream": true}), "gpt-4o-mini", true);
        assert_eq!(b["stream_options"]["include_usage"], json!(true));
        assert_eq!(b["model"], json!("gpt-4o-mini"));
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
}
