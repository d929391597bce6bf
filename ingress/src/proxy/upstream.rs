//! The upstream call: the provider request built from the client's (its bytes, or a translation
//! to the other wire format), sent to one target with its first-byte deadline, and a whole
//! non-streaming answer read, metered and answered in the client's format.

use std::time::{Duration, Instant};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tollgate_runtime::error_chain;
use tollgate_schemas::policy::{ProviderConfig, ProviderKind, Target};
use tollgate_schemas::usage::Status;

use super::Endpoint;
use crate::error::IngressError;
use crate::provider::{UpstreamBody, anthropic, openai};
use crate::record::{Outcome, RequestRecord};
use crate::{App, Live};

/// Largest non-streaming provider response read into memory.
const MAX_PROVIDER_BODY: usize = 32 << 20;

/// The provider path and body bytes for this endpoint and provider kind: the client's bytes
/// with the concrete model when the formats match (`raw`), a translation when they do not.
fn upstream(
    endpoint: Endpoint,
    kind: ProviderKind,
    req: &Value,
    raw: &Bytes,
    model: &str,
    stream: bool,
) -> Result<(&'static str, UpstreamBody), IngressError> {
    let translated = |v: Value| UpstreamBody::from(v.to_string().into_bytes());
    Ok(match (endpoint, kind) {
        (Endpoint::Chat, ProviderKind::Openai) => ("/chat/completions", openai::upstream_body(req, raw, model, stream)),
        (Endpoint::Chat, ProviderKind::Anthropic) => {
            ("/messages", translated(anthropic::from_openai_request(req, model, stream)?))
        }
        (Endpoint::Messages, ProviderKind::Anthropic) => ("/messages", anthropic::upstream_body(req, raw, model)),
        (Endpoint::Messages, ProviderKind::Openai) => {
            ("/chat/completions", translated(openai::from_anthropic_request(req, model, stream)))
        }
        (Endpoint::Embeddings, ProviderKind::Openai) => ("/embeddings", openai::upstream_body(req, raw, model, false)),
        (Endpoint::Embeddings, ProviderKind::Anthropic) => {
            return Err(IngressError::InvalidRequest("Anthropic has no embeddings API".into()));
        }
    })
}

/// Sends the request to one target; a non-2xx answer becomes `ProviderStatus`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn call(
    endpoint: Endpoint,
    app: &App,
    live: &Live,
    provider: &ProviderConfig,
    target: &Target,
    req: &Value,
    raw: &Bytes,
    stream: bool,
    first_byte: Duration,
) -> Result<reqwest::Response, IngressError> {
    let (path, body) = upstream(endpoint, provider.kind, req, raw, &target.model, stream)?;
    let url = live
        .url(&provider.name, path)
        .cloned()
        .ok_or_else(|| IngressError::Internal(format!("provider {} has no URL for {path}", provider.name)))?;
    let credential = live.credentials.get(&provider.name).and_then(Option::as_ref);
    let mut builder = app
        .http
        .post(url)
        .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .body(reqwest::Body::wrap(body));
    match provider.kind {
        ProviderKind::Openai => {
            if let Some(c) = credential {
                builder = builder.header(header::AUTHORIZATION, c.clone());
            }
        }
        ProviderKind::Anthropic => {
            builder = builder.header("anthropic-version", anthropic::API_VERSION);
            if let Some(c) = credential {
                builder = builder.header("x-api-key", c.clone());
            }
        }
    }
    let provider_name = || provider.name.clone();
    let sent = Instant::now();
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let resp = tokio::time::timeout(first_byte, builder.send())
        .await
        .map_err(|_| IngressError::ProviderTimeout { provider: provider_name(), ms: millis(first_byte) })?
        .map_err(|e| {
            // The client's idle (read) timeout can fire before `first_byte`: a timeout all the same.
            if e.is_timeout() {
                IngressError::ProviderTimeout { provider: provider_name(), ms: millis(sent.elapsed()) }
            } else {
                IngressError::ProviderFailed {
                    provider: provider_name(),
                    message: error_chain(&e),
                    reached: !e.is_connect(),
                }
            }
        })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = read_limited(resp, 1 << 20).await.unwrap_or_default();
    Err(IngressError::ProviderStatus { provider: provider_name(), status, body, content_type })
}

async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| error_chain(&e))?;
        if out.len() + chunk.len() > limit {
            return Err(format!("provider response is larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// Reads a whole non-streaming answer, meters it, and answers in the client's format.
pub(super) async fn complete_response(
    endpoint: Endpoint,
    resp: reqwest::Response,
    kind: ProviderKind,
    record: RequestRecord,
) -> Result<Response, (IngressError, RequestRecord)> {
    let provider = record.provider.clone();
    let bad = |message: String| IngressError::ProviderFailed { provider: provider.clone(), message, reached: true };
    let bytes = match read_limited(resp, MAX_PROVIDER_BODY).await {
        Ok(b) => b,
        Err(m) => return Err((bad(m), record)),
    };
    let parsed: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err((bad("provider sent a response that is not a JSON object".into()), record)),
    };
    let model_version = parsed.get("model").and_then(Value::as_str).map(str::to_owned);
    let (usage, text, body) = match (endpoint, kind) {
        (Endpoint::Chat | Endpoint::Embeddings, ProviderKind::Openai) => {
            (openai::usage(&parsed), openai::response_text(&parsed), bytes)
        }
        (Endpoint::Messages, ProviderKind::Anthropic) => {
            (parsed.get("usage").and_then(anthropic::usage), anthropic::response_text(&parsed), bytes)
        }
        (Endpoint::Chat, ProviderKind::Anthropic) => {
            let translated = anthropic::to_openai_response(&parsed, record.started_at_us / 1_000_000);
            let usage = parsed.get("usage").and_then(anthropic::usage);
            (usage, anthropic::response_text(&parsed), Bytes::from(translated.to_string()))
        }
        (Endpoint::Messages, ProviderKind::Openai) => {
            let translated = openai::to_anthropic_response(&parsed);
            (openai::usage(&parsed), openai::response_text(&parsed), Bytes::from(translated.to_string()))
        }
        (Endpoint::Embeddings, ProviderKind::Anthropic) => {
            return Err((IngressError::InvalidRequest("Anthropic has no embeddings API".into()), record));
        }
    };
    record.finish(Outcome {
        status: Status::Ok,
        http_status: 200,
        error: None,
        usage_complete: usage.is_some(),
        usage,
        output_text: text,
        model_version,
        first_token_at_us: None,
        may_be_billed: false,
    });
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}
