//! Scriptable mock of the OpenAI and Anthropic HTTP APIs: usage, latency, errors, stalls, bad bytes.
//!
//! Endpoints: `POST /v1/chat/completions` (OpenAI Chat Completions), `POST /v1/messages`
//! (Anthropic Messages), `POST /v1/embeddings` (OpenAI embeddings), `GET /healthz`, and
//! `GET /_mock/stats` (requests received per endpoint, and when the last one arrived).
//!
//! The mock sits behind the gateway, where headers do not pass through, so it is scripted
//! in band: any line of message text whose first word is `#mock` is a directive line, and the
//! last one found (Anthropic `system` first, then every message in order) applies to the
//! request. A directive line holds space-separated `key=value` pairs and bare flags:
//!
//! ```text
//! #mock prompt_tokens=123 completion_tokens=45 cached_tokens=10 cache_write_tokens=3
//!       reasoning_tokens=5 latency_ms=20 chunk_delay_ms=5 fail=503 stall_after=2
//!       close_after=3 garbage model_version=claude-haiku-4-5-20251001
//! ```
//!
//! (all on one line). An unknown key or a malformed value is answered 400, so a typo in a
//! test never passes silently. Faults apply in this order: `fail`, then `garbage`, then
//! `stall_after` / `close_after` (which exclude each other).
//!
//! Usage the directive does not set is derived: prompt tokens are the whitespace-separated
//! words of all text (system and messages, directive lines included) plus 4 per message;
//! completion tokens are `max_completion_tokens` or `max_tokens` capped at 256, else 16. The
//! answer is exactly that many words, `w1 w2 w3 ...`, one word per streamed content chunk.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures::Stream;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Completion tokens when the request sets no `max_tokens` and no directive says otherwise.
const DEFAULT_COMPLETION_TOKENS: u64 = 16;
/// Cap on a derived completion (from `max_tokens`); a directive's number is used as given.
const MAX_DERIVED_COMPLETION_TOKENS: u64 = 256;
/// Prompt tokens added per message, as chat templates do.
const TOKENS_PER_MESSAGE: u64 = 4;
/// At most this many words of answer text are generated; usage still reports the directive.
const MAX_TEXT_WORDS: u64 = 1 << 20;
/// Default embedding width; a request's `dimensions` overrides it, up to `MAX_DIMENSIONS`.
const DEFAULT_DIMENSIONS: usize = 8;
const MAX_DIMENSIONS: usize = 4096;
/// Pause before a `close_after` abort so the chunks already sent are flushed to the client.
const ABORT_FLUSH_GRACE: Duration = Duration::from_millis(20);

/// Options of a mock provider instance.
#[derive(Clone, Debug, Default)]
pub struct MockOptions {
    /// Base latency added before every answer (a directive's `latency_ms` adds to it).
    pub latency: Duration,
}

/// The mock's routes. Stalls started through this router only end when the client goes
/// away; [`serve`] also ends them at shutdown.
pub fn router(opts: MockOptions) -> Router {
    build(opts, CancellationToken::new())
}

/// Serves the mock on `listener` until `shutdown` is cancelled, then drains connections
/// (stalled streams are aborted so shutdown never hangs).
pub async fn serve(listener: TcpListener, opts: MockOptions, shutdown: CancellationToken) -> io::Result<()> {
    let app = build(opts, shutdown.clone());
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::trace!(%error, "tcp_nodelay not set");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

fn build(opts: MockOptions, stop: CancellationToken) -> Router {
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let shared = Arc::new(Shared {
        opts,
        stop,
        started,
        ids: AtomicU64::new(0),
        chat_completions: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        embeddings: AtomicU64::new(0),
        last_request_at_us: AtomicI64::new(0),
        otlp_trace_posts: AtomicU64::new(0),
        otlp_trace_bytes: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/v1/embeddings", post(embeddings))
        // Stamps each API request's arrival (its head, before the body is read).
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), stamp_arrival))
        .route("/healthz", get(|| async { "ok" }))
        .route("/_mock/stats", get(stats))
        .route("/v1/traces", post(otlp_traces))
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
        .merge(webhook_sink::router())
}

struct Shared {
    opts: MockOptions,
    stop: CancellationToken,
    started: u64,
    ids: AtomicU64,
    chat_completions: AtomicU64,
    messages: AtomicU64,
    embeddings: AtomicU64,
    /// When the last API request's head arrived, µs since the Unix epoch.
    last_request_at_us: AtomicI64,
    /// OTLP/HTTP trace exports received (`POST /v1/traces`), and their bytes.
    otlp_trace_posts: AtomicU64,
    otlp_trace_bytes: AtomicU64,
}

async fn stamp_arrival(State(shared): AppState, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    shared.last_request_at_us.store(i64::try_from(now).unwrap_or(i64::MAX), Ordering::Relaxed);
    next.run(req).await
}

impl Shared {
    fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}mock{:x}{n:08x}", self.started)
    }

    /// Sleeps the base latency plus the directive's; shutdown cuts it short.
    async fn pause(&self, directive: &Directive) {
        let total = self.opts.latency + directive.latency;
        if total.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(total) => {}
            () = self.stop.cancelled() => {}
        }
    }
}

type AppState = State<Arc<Shared>>;

/// The wire format an endpoint speaks; decides the error JSON shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

// ---------------------------------------------------------------------------------------
// directives
// ---------------------------------------------------------------------------------------

/// A parsed `#mock` line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Directive {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: u64,
    cache_write_tokens: u64,
    reasoning_tokens: u64,
    latency: Duration,
    chunk_delay: Duration,
    fail: Option<StatusCode>,
    garbage: bool,
    cut: Option<Cut>,
    model_version: Option<String>,
}

/// How a stream ends early: after `after` content chunks it stalls or drops the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cut {
    after: usize,
    kind: CutKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutKind {
    Stall,
    Close,
}

/// Whether `line` is a directive line: its first word is `#mock`.
fn is_directive(line: &str) -> bool {
    line.trim_start().strip_prefix("#mock").is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

impl Directive {
    fn parse(line: &str) -> Result<Self, String> {
        let rest = line.trim_start().strip_prefix("#mock").ok_or_else(|| format!("not a #mock directive: {line:?}"))?;
        let mut d = Directive::default();
        for item in rest.split_whitespace() {
            let Some((key, value)) = item.split_once('=') else {
                match item {
                    "garbage" => d.garbage = true,
                    other => return Err(format!("#mock: unknown flag {other:?}")),
                }
                continue;
            };
            let number = || {
                value.parse::<u64>().map_err(|_| format!("#mock: {key} wants a non-negative integer, got {value:?}"))
            };
            match key {
                "prompt_tokens" => d.prompt_tokens = Some(number()?),
                "completion_tokens" => d.completion_tokens = Some(number()?),
                "cached_tokens" => d.cached_tokens = number()?,
                "cache_write_tokens" => d.cache_write_tokens = number()?,
                "reasoning_tokens" => d.reasoning_tokens = number()?,
                "latency_ms" => d.latency = Duration::from_millis(number()?),
                "chunk_delay_ms" => d.chunk_delay = Duration::from_millis(number()?),
                "fail" => {
                    let status = u16::try_from(number()?)
                        .ok()
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .filter(|status| status.is_client_error() || status.is_server_error())
                        .ok_or_else(|| format!("#mock: fail wants an HTTP status 400-599, got {value:?}"))?;
                    d.fail = Some(status);
                }
                "stall_after" | "close_after" => {
                    if d.cut.is_some() {
                        return Err("#mock: stall_after and close_after exclude each other".into());
                    }
                    let after = usize::try_from(number()?).map_err(|_| format!("#mock: {key} is too large"))?;
                    let kind = if key == "stall_after" { CutKind::Stall } else { CutKind::Close };
                    d.cut = Some(Cut { after, kind });
                }
                "model_version" if !value.is_empty() => d.model_version = Some(value.to_owned()),
                "model_version" => return Err("#mock: model_version is empty".into()),
                other => return Err(format!("#mock: unknown key {other:?}")),
            }
        }
        Ok(d)
    }
}

// ---------------------------------------------------------------------------------------
// requests
// ---------------------------------------------------------------------------------------

/// Text gathered from a request: word count, and the last directive line seen.
#[derive(Default)]
struct Text<'a> {
    words: u64,
    directive: Option<&'a str>,
}

impl<'a> Text<'a> {
    fn add(&mut self, text: &'a str) {
        self.words += text.split_whitespace().count() as u64;
        if let Some(line) = text.lines().rfind(|line| is_directive(line)) {
            self.directive = Some(line);
        }
    }

    /// Adds a message `content`: a string, or an array of content blocks whose `text` (or,
    /// for tool results, nested `content`) is read.
    fn add_content(&mut self, content: &'a Value) {
        match content {
            Value::String(text) => self.add(text),
            Value::Array(blocks) => {
                for block in blocks {
                    match block {
                        Value::String(text) => self.add(text),
                        Value::Object(fields) => match fields.get("text") {
                            Some(Value::String(text)) => self.add(text),
                            _ => {
                                if let Some(nested) = fields.get("content") {
                                    self.add_content(nested);
                                }
                            }
                        },
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }

    fn directive(&self) -> Result<Directive, String> {
        self.directive.map_or_else(|| Ok(Directive::default()), Directive::parse)
    }
}

/// A validated chat request (either API).
#[derive(Debug)]
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    usage: Usage,
    directive: Directive,
}

/// Token counts of one answer, in the mock's neutral form (prompt includes cache reads and
/// writes; completion includes reasoning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("the request body must be a JSON object".into()),
        Err(error) => Err(format!("we could not parse the JSON body of your request: {error}")),
    }
}

fn required_str<'a>(fields: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match fields.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(format!("{key}: Field required")),
        Some(_) => Err(format!("{key}: Input should be a valid string")),
    }
}

fn optional_u64(fields: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => {
            value.as_u64().map(Some).ok_or_else(|| format!("{key}: Input should be a valid non-negative integer"))
        }
    }
}

fn parse_chat(api: Api, body: &[u8]) -> Result<ChatRequest, String> {
    let fields = parse_object(body)?;
    let model = required_str(&fields, "model")?.to_owned();
    let messages = match fields.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => return Err("messages: List should have at least 1 item".into()),
        None | Some(Value::Null) => return Err("messages: Field required".into()),
        Some(_) => return Err("messages: Input should be a valid list".into()),
    };
    let max_tokens = match api {
        Api::OpenAi => match optional_u64(&fields, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => optional_u64(&fields, "max_tokens")?,
        },
        Api::Anthropic => match optional_u64(&fields, "max_tokens")? {
            Some(0) => return Err("max_tokens: Input should be greater than or equal to 1".into()),
            Some(n) => Some(n),
            None => return Err("max_tokens: Field required".into()),
        },
    };
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("stream: Input should be a valid boolean".into()),
    };
    let include_usage = fields
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let mut text = Text::default();
    if api == Api::Anthropic {
        if let Some(system) = fields.get("system") {
            text.add_content(system);
        }
    }
    for message in messages {
        if let Some(content) = message.get("content") {
            text.add_content(content);
        }
    }
    let directive = text.directive()?;
    let derived_prompt = text.words + TOKENS_PER_MESSAGE * messages.len() as u64;
    let derived_completion = max_tokens.map_or(DEFAULT_COMPLETION_TOKENS, |n| n.min(MAX_DERIVED_COMPLETION_TOKENS));
    let usage = Usage {
        prompt: directive.prompt_tokens.unwrap_or(derived_prompt),
        completion: directive.completion_tokens.unwrap_or(derived_completion),
        cached: directive.cached_tokens,
        cache_write: directive.cache_write_tokens,
        reasoning: directive.reasoning_tokens,
    };
    Ok(ChatRequest { model, stream, include_usage, usage, directive })
}

/// The answer's words: `w1 w2 ... wN`.
fn words(n: u64) -> impl Iterator<Item = String> {
    (1..=n.min(MAX_TEXT_WORDS)).map(|i| format!("w{i}"))
}

fn answer_text(n: u64) -> String {
    words(n).collect::<Vec<_>>().join(" ")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// responses and faults
// ---------------------------------------------------------------------------------------

/// The provider's error `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An error answer in the provider's JSON shape; a 429 carries `retry-after: 1`.
fn error_response(api: Api, status: StatusCode, message: &str) -> Response {
    let kind = error_type(status);
    let body = match api {
        Api::OpenAi => {
            let code = if status == StatusCode::TOO_MANY_REQUESTS { json!("rate_limit_exceeded") } else { Value::Null };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Api::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn bad_request(api: Api, message: &str) -> Response {
    error_response(api, StatusCode::BAD_REQUEST, message)
}

/// A response whose body fails at once, so hyper drops the connection without a complete
/// answer.
fn aborted() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, _>(io::Error::new(io::ErrorKind::ConnectionAborted, "mock: connection dropped on purpose"))
    });
    Response::new(Body::from_stream(stream))
}

/// A 200 whose body claims to be JSON and is not.
fn garbage_json() -> Response {
    let mut response = Response::new(Body::from(r#"{"id":"mock-garbage","choices":[{"message":"#));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Faults that replace a whole answer: `fail`, `garbage` (non-stream form), and for
/// non-streaming requests `stall_after` (hang) and `close_after` (drop the connection).
async fn whole_answer_fault(shared: &Shared, api: Api, directive: &Directive, stream: bool) -> Option<Response> {
    if let Some(status) = directive.fail {
        let message = format!("mock failure: status {} requested by #mock directive", status.as_u16());
        return Some(error_response(api, status, &message));
    }
    if directive.garbage && !stream {
        return Some(garbage_json());
    }
    match directive.cut {
        Some(Cut { kind: CutKind::Stall, .. }) if !stream => {
            shared.stop.cancelled().await;
            Some(aborted())
        }
        Some(Cut { kind: CutKind::Close, .. }) if !stream => Some(aborted()),
        _ => None,
    }
}

/// One step of a scripted streaming body.
#[derive(Debug)]
enum Step {
    Send(Bytes),
    Delay(Duration),
    /// Hang without closing until shutdown, then abort.
    Stall,
    /// Drop the connection without finishing the chunked body.
    Abort,
}

/// Lays out a stream: the preamble, the content chunks (with delays between them, cut
/// short by `stall_after` / `close_after`), then the epilogue.
fn script(pre: Vec<Bytes>, content: Vec<Bytes>, post: Vec<Bytes>, d: &Directive) -> VecDeque<Step> {
    let mut steps: VecDeque<Step> = pre.into_iter().map(Step::Send).collect();
    let cut_step = |cut: Cut| match cut.kind {
        CutKind::Stall => Step::Stall,
        CutKind::Close => Step::Abort,
    };
    for (i, chunk) in content.into_iter().enumerate() {
        if let Some(cut) = d.cut.filter(|cut| cut.after == i) {
            steps.push_back(cut_step(cut));
            return steps;
        }
        if i > 0 && !d.chunk_delay.is_zero() {
            steps.push_back(Step::Delay(d.chunk_delay));
        }
        steps.push_back(Step::Send(chunk));
    }
    if let Some(cut) = d.cut {
        steps.push_back(cut_step(cut));
        return steps;
    }
    steps.extend(post.into_iter().map(Step::Send));
    steps
}

fn play(steps: VecDeque<Step>, stop: CancellationToken) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some((steps, stop)), |state| async move {
        let (mut steps, stop) = state?;
        loop {
            match steps.pop_front()? {
                Step::Send(bytes) => return Some((Ok(bytes), Some((steps, stop)))),
                Step::Delay(pause) => tokio::time::sleep(pause).await,
                Step::Stall => {
                    stop.cancelled().await;
                    let error = io::Error::other("mock: stalled stream ended by shutdown");
                    return Some((Err(error), None));
                }
                Step::Abort => {
                    tokio::time::sleep(ABORT_FLUSH_GRACE).await;
                    let error = io::Error::new(io::ErrorKind::ConnectionAborted, "mock: stream dropped on purpose");
                    return Some((Err(error), None));
                }
            }
        }
    })
}

fn sse_response(steps: VecDeque<Step>, stop: CancellationToken) -> Response {
    let mut response = Response::new(Body::from_stream(play(steps, stop)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `data: {json}\n\n`
fn sse_data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `event: name\ndata: {json}\n\n`
fn sse_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

fn garbage_stream(api: Api) -> VecDeque<Step> {
    let chunks: &[&'static str] = match api {
        Api::OpenAi => &[
            "data: this is not json\n\n",
            "data: {\"id\":\"chatcmpl-garbage\",\"choices\":[{\"delta\":\n\n",
            "data: [DONE]\n\n",
        ],
        Api::Anthropic => &[
            "event: message_start\ndata: this is not json\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\n\n",
            "event: message_stop\ndata: }{\n\n",
        ],
    };
    chunks.iter().map(|chunk| Step::Send(Bytes::from_static(chunk.as_bytes()))).collect()
}

// ---------------------------------------------------------------------------------------
// OpenAI Chat Completions
// ---------------------------------------------------------------------------------------

fn openai_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt.saturating_add(u.completion),
        "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

async fn chat_completions(State(shared): AppState, body: Bytes) -> Response {
    shared.chat_completions.fetch_add(1, Ordering::Relaxed);
    let api = Api::OpenAi;
    let req = match parse_chat(api, &body) {
        Ok(req) => req,
        Err(message) => return bad_request(api, &message),
    };
    shared.pause(&req.directive).await;
    if let Some(response) = whole_answer_fault(&shared, api, &req.directive, req.stream).await {
        return response;
    }
    let id = shared.next_id("chatcmpl-");
    let created = unix_now();
    let model = req.directive.model_version.clone().unwrap_or(req.model);
    let usage = req.usage;

    if !req.stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer_text(usage.completion), "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": openai_usage(&usage),
        });
        return Json(body).into_response();
    }
    if req.directive.garbage {
        return sse_response(garbage_stream(api), shared.stop.clone());
    }

    let chunk = |delta: Value, finish_reason: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        if req.include_usage {
            chunk["usage"] = Value::Null;
        }
        sse_data(&chunk)
    };
    let pre = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    let last = usage.completion.min(MAX_TEXT_WORDS);
    let content = words(usage.completion)
        .enumerate()
        .map(|(i, word)| {
            let text = if (i as u64) + 1 < last { format!("{word} ") } else { word };
            chunk(json!({"content": text}), Value::Null)
        })
        .collect();
    let mut post = vec![chunk(json!({}), json!("stop"))];
    if req.include_usage {
        post.push(sse_data(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [],
            "usage": openai_usage(&usage),
        })));
    }
    post.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(script(pre, content, post, &req.directive), shared.stop.clone())
}

// ---------------------------------------------------------------------------------------
// Anthropic Messages
// ---------------------------------------------------------------------------------------

fn anthropic_usage(u: &Usage, output_tokens: u64) -> Value {
    let input = u.prompt.saturating_sub(u.cached).saturating_sub(u.cache_write);
    json!({
        "input_tokens": input,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cached,
        "output_tokens": output_tokens,
    })
}

async fn messages(State(shared): AppState, body: Bytes) -> Response {
    shared.messages.fetch_add(1, Ordering::Relaxed);
    let api = Api::Anthropic;
    let req = match parse_chat(api, &body) {
        Ok(req) => req,
        Err(message) => return bad_request(api, &message),
    };
    shared.pause(&req.directive).await;
    if let Some(response) = whole_answer_fault(&shared, api, &req.directive, req.stream).await {
        return response;
    }
    let id = shared.next_id("msg_");
    let model = req.directive.model_version.clone().unwrap_or(req.model);
    let usage = req.usage;

    if !req.stream {
        let body = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": answer_text(usage.completion)}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": anthropic_usage(&usage, usage.completion),
        });
        return Json(body).into_response();
    }
    if req.directive.garbage {
        return sse_response(garbage_stream(api), shared.stop.clone());
    }

    let pre = vec![
        sse_event(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": anthropic_usage(&usage, 1),
                }
            }),
        ),
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        sse_event("ping", &json!({"type": "ping"})),
    ];
    let last = usage.completion.min(MAX_TEXT_WORDS);
    let content = words(usage.completion)
        .enumerate()
        .map(|(i, word)| {
            let text = if (i as u64) + 1 < last { format!("{word} ") } else { word };
            sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
            )
        })
        .collect();
    let post = vec![
        sse_event("content_block_stop", &json!({"type": "content_block_stop", "index": 0})),
        sse_event(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": usage.completion},
            }),
        ),
        sse_event("message_stop", &json!({"type": "message_stop"})),
    ];
    sse_response(script(pre, content, post, &req.directive), shared.stop.clone())
}

// ---------------------------------------------------------------------------------------
// OpenAI embeddings
// ---------------------------------------------------------------------------------------

/// One embedding input: text, or pre-tokenized ids.
enum EmbeddingInput<'a> {
    Text(&'a str),
    Tokens(Vec<u64>),
}

fn parse_embedding_inputs(input: Option<&Value>) -> Result<Vec<EmbeddingInput<'_>>, String> {
    let tokens = |items: &[Value]| -> Option<Vec<u64>> { items.iter().map(Value::as_u64).collect() };
    match input {
        None | Some(Value::Null) => Err("input: Field required".into()),
        Some(Value::String(text)) => Ok(vec![EmbeddingInput::Text(text)]),
        Some(Value::Array(items)) if items.is_empty() => Err("input: List should have at least 1 item".into()),
        Some(Value::Array(items)) => {
            if let Some(ids) = tokens(items) {
                return Ok(vec![EmbeddingInput::Tokens(ids)]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(EmbeddingInput::Text(text)),
                    Value::Array(ids) => tokens(ids)
                        .map(EmbeddingInput::Tokens)
                        .ok_or_else(|| "input: token arrays must hold integers".to_owned()),
                    _ => Err("input: items must be strings or token arrays".to_owned()),
                })
                .collect()
        }
        Some(_) => Err("input: Input should be a string or a list".into()),
    }
}

/// FNV-1a, the seed of a deterministic vector.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// A deterministic vector in [-1, 1) for `seed` (splitmix64 stream).
fn embedding_vector(seed: u64, dimensions: usize) -> Vec<f32> {
    let mut state = seed;
    (0..dimensions)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits → an exactly representable f32 in [0, 1), then [-1, 1).
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            unit * 2.0 - 1.0
        })
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn embeddings(State(shared): AppState, body: Bytes) -> Response {
    shared.embeddings.fetch_add(1, Ordering::Relaxed);
    let api = Api::OpenAi;
    let fields = match parse_object(&body) {
        Ok(fields) => fields,
        Err(message) => return bad_request(api, &message),
    };
    let model = match required_str(&fields, "model") {
        Ok(model) => model.to_owned(),
        Err(message) => return bad_request(api, &message),
    };
    let inputs = match parse_embedding_inputs(fields.get("input")) {
        Ok(inputs) => inputs,
        Err(message) => return bad_request(api, &message),
    };
    let dimensions = match optional_u64(&fields, "dimensions") {
        Ok(None) => DEFAULT_DIMENSIONS,
        Ok(Some(n)) if (1..=MAX_DIMENSIONS as u64).contains(&n) => n as usize,
        Ok(Some(_)) => return bad_request(api, "dimensions: must be between 1 and 4096"),
        Err(message) => return bad_request(api, &message),
    };
    let as_base64 = match fields.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => return bad_request(api, "encoding_format: must be 'float' or 'base64'"),
    };

    let mut text = Text::default();
    let mut token_words = 0u64;
    for input in &inputs {
        match input {
            EmbeddingInput::Text(s) => text.add(s),
            EmbeddingInput::Tokens(ids) => token_words += ids.len() as u64,
        }
    }
    let directive = match text.directive() {
        Ok(directive) => directive,
        Err(message) => return bad_request(api, &message),
    };
    shared.pause(&directive).await;
    if let Some(response) = whole_answer_fault(&shared, api, &directive, false).await {
        return response;
    }

    let prompt_tokens = directive.prompt_tokens.unwrap_or(text.words + token_words);
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let seed = match input {
                EmbeddingInput::Text(s) => fnv1a(s.bytes()),
                EmbeddingInput::Tokens(ids) => fnv1a(ids.iter().flat_map(|id| id.to_le_bytes())),
            };
            let vector = embedding_vector(seed, dimensions);
            let embedding = if as_base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": directive.model_version.unwrap_or(model),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------

async fn stats(State(shared): AppState) -> Json<Value> {
    Json(json!({
        "chat_completions": shared.chat_completions.load(Ordering::Relaxed),
        "messages": shared.messages.load(Ordering::Relaxed),
        "embeddings": shared.embeddings.load(Ordering::Relaxed),
        "last_request_at_us": shared.last_request_at_us.load(Ordering::Relaxed),
        "otlp_trace_posts": shared.otlp_trace_posts.load(Ordering::Relaxed),
        "otlp_trace_bytes": shared.otlp_trace_bytes.load(Ordering::Relaxed),
    }))
}

/// An OpenTelemetry collector stand-in (OTLP/HTTP): counts each export and its bytes and answers
/// with an empty `ExportTraceServiceResponse` (zero protobuf bytes: full success). The benchmark
/// points an ingress's trace export here.
async fn otlp_traces(State(shared): AppState, body: axum::body::Bytes) -> Response {
    shared.otlp_trace_posts.fetch_add(1, Ordering::Relaxed);
    shared.otlp_trace_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new()).into_response()
}

// ---------------------------------------------------------------------------------------
// webhook sink
// ---------------------------------------------------------------------------------------

/// Stand-in for the alert channels (Slack, PagerDuty, plain webhooks), so tests and the demo
/// can watch the enforcer's alert deliveries arrive.
///
/// `POST /webhooks/{channel}` stores the JSON body with the channel and the arrival time and
/// answers 200 `ok`; a body that is not JSON is answered 400. `?fail=N` makes the first N posts
/// to that channel (counted since the mock started, failed ones included) answer 503, so a
/// sender that retries gets through on post N+1; an unknown query key or a malformed value is
/// answered 400. `GET /webhooks` (optionally `?channel=slack`) returns what was stored as a
/// JSON array, oldest first, each entry
/// `{"channel", "received_at_us", "attempt", "alert_id", "idempotency_key", "body"}` where
/// `attempt` is the post's number on its channel and the two ids are the
/// `X-Tollgate-Alert-Id` and `Idempotency-Key` headers (null when absent).
mod webhook_sink {
    use std::collections::{HashMap, VecDeque};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{SystemTime, UNIX_EPOCH};

    use axum::body::Bytes;
    use axum::extract::{Path, Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde::Deserialize;
    use serde_json::{Value, json};

    /// Entries kept; the oldest go first beyond this.
    const MAX_STORED: usize = 10_000;

    #[derive(Default)]
    struct Sink {
        stored: VecDeque<Value>,
        /// Posts received per channel, failed ones included.
        posts: HashMap<String, u64>,
    }

    type SinkState = State<Arc<Mutex<Sink>>>;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PostParams {
        #[serde(default)]
        fail: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ListParams {
        channel: Option<String>,
    }

    /// The sink's routes, with their own state.
    pub(super) fn router() -> Router {
        Router::new()
            .route("/webhooks", get(list))
            .route("/webhooks/{channel}", post(receive))
            .with_state(Arc::new(Mutex::new(Sink::default())))
    }

    fn header(headers: &HeaderMap, name: &str) -> Value {
        headers.get(name).and_then(|v| v.to_str().ok()).map_or(Value::Null, |v| Value::String(v.to_owned()))
    }

    async fn receive(
        State(sink): SinkState,
        Path(channel): Path<String>,
        Query(params): Query<PostParams>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let received_at_us =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or_default();
        let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        let attempt = {
            let n = sink.posts.entry(channel.clone()).or_default();
            *n += 1;
            *n
        };
        if attempt <= params.fail {
            let message = format!("mock: post {attempt} of the {} to fail on channel {channel:?}", params.fail);
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": message}))).into_response();
        }
        let body: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let message = format!("mock: webhook body is not JSON: {e}");
                return (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response();
            }
        };
        if sink.stored.len() >= MAX_STORED {
            sink.stored.pop_front();
        }
        sink.stored.push_back(json!({
            "channel": channel,
            "received_at_us": received_at_us,
            "attempt": attempt,
            "alert_id": header(&headers, "x-tollgate-alert-id"),
            "idempotency_key": header(&headers, "idempotency-key"),
            "body": body,
        }));
        (StatusCode::OK, "ok").into_response()
    }

    async fn list(State(sink): SinkState, Query(params): Query<ListParams>) -> Json<Value> {
        let sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
        let entries = sink
            .stored
            .iter()
            .filter(|e| params.channel.as_deref().is_none_or(|c| e["channel"] == c))
            .cloned()
            .collect();
        Json(Value::Array(entries))
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used, clippy::expect_used)]

        use std::collections::BTreeMap;
        use std::time::Duration;

        use axum::body::Body;
        use axum::http::Request;
        use tollgate_enforcer::notify::{DeliveryStats, Notifier, NotifyConfig};
        use tollgate_schemas::decision::{Alert, AlertKind, Measure, Severity};
        use tollgate_schemas::policy::AlertChannel;
        use tower::ServiceExt;

        use super::*;

        async fn post_to(app: &Router, uri: &str, body: &str) -> StatusCode {
            let request = Request::builder()
                .method("POST")
                .uri(uri)
                .header("content-type", "application/json")
                .header("x-tollgate-alert-id", "rule/scope/0/80")
                .body(Body::from(body.to_owned()))
                .unwrap();
            app.clone().oneshot(request).await.unwrap().status()
        }

        async fn list_at(app: &Router, uri: &str) -> Vec<Value> {
            let request = Request::builder().uri(uri).body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap().as_array().unwrap().clone()
        }

        #[tokio::test]
        async fn stores_json_posts_per_channel() {
            let app = super::super::router(super::super::MockOptions::default());
            assert_eq!(post_to(&app, "/webhooks/slack", r#"{"text":"hello"}"#).await, StatusCode::OK);
            assert_eq!(post_to(&app, "/webhooks/finops", r#"{"alert_id":"a"}"#).await, StatusCode::OK);
            let all = list_at(&app, "/webhooks").await;
            assert_eq!(all.len(), 2);
            assert_eq!(all[0]["channel"], "slack");
            assert_eq!(all[0]["body"], json!({"text": "hello"}));
            assert_eq!(all[0]["attempt"], 1);
            assert_eq!(all[0]["alert_id"], "rule/scope/0/80");
            assert_eq!(all[0]["idempotency_key"], Value::Null);
            assert!(all[0]["received_at_us"].as_i64().unwrap() > 1_700_000_000_000_000);
            let finops = list_at(&app, "/webhooks?channel=finops").await;
            assert_eq!(finops.len(), 1);
            assert_eq!(finops[0]["body"]["alert_id"], "a");
        }

        #[tokio::test]
        async fn fail_n_answers_503_to_the_first_n_posts_of_that_channel() {
            let app = router();
            let statuses = [
                post_to(&app, "/webhooks/pagerduty?fail=2", "{}").await,
                post_to(&app, "/webhooks/slack?fail=0", "{}").await,
                post_to(&app, "/webhooks/pagerduty?fail=2", "{}").await,
                post_to(&app, "/webhooks/pagerduty?fail=2", "{}").await,
            ];
            assert_eq!(
                statuses,
                [StatusCode::SERVICE_UNAVAILABLE, StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE, StatusCode::OK]
            );
            let pagerduty = list_at(&app, "/webhooks?channel=pagerduty").await;
            assert_eq!(pagerduty.len(), 1, "failed posts are not stored");
            assert_eq!(pagerduty[0]["attempt"], 3);
        }

        #[tokio::test]
        async fn mistakes_are_answered_400() {
            let app = router();
            assert_eq!(post_to(&app, "/webhooks/slack", "not json").await, StatusCode::BAD_REQUEST);
            assert_eq!(post_to(&app, "/webhooks/slack?fial=2", "{}").await, StatusCode::BAD_REQUEST);
            assert_eq!(post_to(&app, "/webhooks/slack?fail=two", "{}").await, StatusCode::BAD_REQUEST);
            assert!(list_at(&app, "/webhooks").await.is_empty());
        }

        /// The enforcer's notifier against the sink over TCP: retried through `?fail=2`, stored
        /// once.
        #[tokio::test]
        async fn notifier_retries_through_fail_and_lands_once() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router()).await });
            let channel = AlertChannel {
                name: "webhook:finops".to_owned(),
                url: Some(format!("http://{addr}/webhooks/finops?fail=2")),
                url_env: None,
                routing_key: None,
                routing_key_env: None,
            };
            let config = NotifyConfig {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
                ..NotifyConfig::default()
            };
            let notifier =
                Notifier::new(&BTreeMap::from([(channel.name.clone(), channel)]), config).expect("notifier builds");
            let alert = Alert {
                alert_id: Alert::id_for("finops-daily", "team:search", 0, 80),
                rule_id: "finops-daily".to_owned(),
                kind: AlertKind::BudgetThreshold,
                severity: Severity::Warning,
                scope: "team:search".to_owned(),
                threshold_pct: 80,
                measure: Measure::CostNanos,
                limit: 100_000_000_000,
                observed: 80_000_000_000,
                window_start_us: 0,
                window_end_us: 86_400_000_000,
                raised_at_us: 1_000,
                summary: "team:search spent $80.00 of $100.00".to_owned(),
                notify: vec!["webhook:finops".to_owned()],
            };
            assert_eq!(notifier.notify(&alert), 1);
            assert_eq!(notifier.flush(Duration::from_secs(10)).await, 0);
            assert_eq!(notifier.stats(), DeliveryStats { delivered: 1, retried: 2, failed: 0, dropped: 0 });

            let response = reqwest::get(format!("http://{addr}/webhooks")).await.unwrap();
            let stored: Vec<Value> = response.json().await.unwrap();
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0]["attempt"], 3);
            assert_eq!(stored[0]["idempotency_key"], alert.alert_id.as_str());
            assert_eq!(serde_json::from_value::<Alert>(stored[0]["body"].clone()).unwrap(), alert);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use axum::http::{HeaderMap, Request};
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;

    async fn post_raw(app: &Router, uri: &str, body: impl Into<Body>) -> Response {
        let request = Request::builder()
            .method("POST")
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        app.clone().oneshot(request).await.unwrap()
    }

    async fn post(app: &Router, uri: &str, body: &Value) -> (StatusCode, HeaderMap, Bytes) {
        let response = post_raw(app, uri, body.to_string()).await;
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (parts.status, parts.headers, bytes)
    }

    async fn post_json(app: &Router, uri: &str, body: &Value) -> (StatusCode, Value) {
        let (status, _, bytes) = post(app, uri, body).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn get_json(app: &Router, uri: &str) -> Value {
        let request = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// (event name, data) per SSE event.
    fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
        body.split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                let mut name = None;
                let mut data = String::new();
                for line in event.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        name = Some(value.to_owned());
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data.push_str(value);
                    }
                }
                (name, data)
            })
            .collect()
    }

    fn openai_body(content: &str) -> Value {
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})
    }

    fn anthropic_body(content: &str) -> Value {
        json!({
            "model": "claude-haiku-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": content}],
        })
    }

    fn app() -> Router {
        router(MockOptions::default())
    }

    #[test]
    fn directive_parses_every_key() {
        let d = Directive::parse(
            "#mock prompt_tokens=123 completion_tokens=45 cached_tokens=10 cache_write_tokens=3 \
             reasoning_tokens=5 latency_ms=20 chunk_delay_ms=7 fail=503 stall_after=2 garbage \
             model_version=claude-haiku-4-5-20251001",
        )
        .unwrap();
        assert_eq!(
            d,
            Directive {
                prompt_tokens: Some(123),
                completion_tokens: Some(45),
                cached_tokens: 10,
                cache_write_tokens: 3,
                reasoning_tokens: 5,
                latency: Duration::from_millis(20),
                chunk_delay: Duration::from_millis(7),
                fail: Some(StatusCode::SERVICE_UNAVAILABLE),
                garbage: true,
                cut: Some(Cut { after: 2, kind: CutKind::Stall }),
                model_version: Some("claude-haiku-4-5-20251001".into()),
            }
        );
        let close = Directive::parse("  #mock   close_after=3 ").unwrap();
        assert_eq!(close.cut, Some(Cut { after: 3, kind: CutKind::Close }));
        assert_eq!(Directive::parse("#mock").unwrap(), Directive::default());
    }

    #[test]
    fn directive_rejects_mistakes() {
        for bad in [
            "#mock prompt_token=1",
            "#mock prompt_tokens=-1",
            "#mock prompt_tokens=abc",
            "#mock fail=200",
            "#mock fail=1000",
            "#mock garbag",
            "#mock stall_after=1 close_after=2",
            "#mock model_version=",
        ] {
            assert!(Directive::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(is_directive("#mock"));
        assert!(is_directive("  #mock fail=500"));
        assert!(!is_directive("#mockery fail=500"));
        assert!(!is_directive("say #mock fail=500"));
    }

    #[test]
    fn last_directive_line_wins_across_system_and_messages() {
        let body = json!({
            "model": "m",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "be brief\n#mock prompt_tokens=1"}],
            "messages": [
                {"role": "user", "content": "one two\n#mock prompt_tokens=2\nthree"},
                {"role": "assistant", "content": [{"type": "text", "text": "#mock prompt_tokens=3 completion_tokens=4"}]},
                {"role": "user", "content": [{"type": "text", "text": "no directive here"}]},
            ],
        });
        let req = parse_chat(Api::Anthropic, body.to_string().as_bytes()).unwrap();
        assert_eq!(req.usage.prompt, 3);
        assert_eq!(req.usage.completion, 4);
    }

    #[test]
    fn usage_is_derived_from_words_and_max_tokens() {
        // words: "be brief" 2 + "one two three" 3 + "four five" 2 = 7; 2 messages → +8.
        let anthropic = json!({
            "model": "m",
            "max_tokens": 10,
            "system": "be brief",
            "messages": [
                {"role": "user", "content": "one two three"},
                {"role": "user", "content": [{"type": "text", "text": "four"}, {"type": "text", "text": " five "}]},
            ],
        });
        let req = parse_chat(Api::Anthropic, anthropic.to_string().as_bytes()).unwrap();
        assert_eq!(req.usage, Usage { prompt: 15, completion: 10, cached: 0, cache_write: 0, reasoning: 0 });

        let mut openai = openai_body("alpha beta gamma");
        let req = parse_chat(Api::OpenAi, openai.to_string().as_bytes()).unwrap();
        assert_eq!((req.usage.prompt, req.usage.completion), (3 + 4, 16));
        openai["max_tokens"] = json!(1000);
        let req = parse_chat(Api::OpenAi, openai.to_string().as_bytes()).unwrap();
        assert_eq!(req.usage.completion, 256);
        openai["max_completion_tokens"] = json!(7);
        let req = parse_chat(Api::OpenAi, openai.to_string().as_bytes()).unwrap();
        assert_eq!(req.usage.completion, 7);
    }

    #[tokio::test]
    async fn openai_non_stream_reports_directive_usage() {
        let body = openai_body(
            "hello\n#mock prompt_tokens=123 completion_tokens=45 cached_tokens=10 reasoning_tokens=5 \
             model_version=gpt-4o-mini-2024-07-18",
        );
        let (status, v) = post_json(&app(), "/v1/chat/completions", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["model"], "gpt-4o-mini-2024-07-18");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(text.split(' ').count(), 45);
        assert!(text.starts_with("w1 w2 ") && text.ends_with(" w45"));
        let usage = &v["usage"];
        assert_eq!(usage["prompt_tokens"], 123);
        assert_eq!(usage["completion_tokens"], 45);
        assert_eq!(usage["total_tokens"], 168);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 10);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 5);
    }

    #[tokio::test]
    async fn openai_non_stream_derives_usage_and_echoes_model() {
        let mut body = openai_body("");
        body["messages"] = json!([
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": [{"type": "text", "text": "count to five"}]},
        ]);
        body["max_tokens"] = json!(5);
        let (status, v) = post_json(&app(), "/v1/chat/completions", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["usage"]["prompt_tokens"], 3 + 3 + 8);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 19);
        assert_eq!(v["choices"][0]["message"]["content"], "w1 w2 w3 w4 w5");
    }

    #[tokio::test]
    async fn openai_stream_without_include_usage_has_no_usage() {
        let mut body = openai_body("hi\n#mock completion_tokens=3");
        body["stream"] = json!(true);
        let (status, headers, bytes) = post(&app(), "/v1/chat/completions", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        let events = sse_events(std::str::from_utf8(&bytes).unwrap());
        assert_eq!(events.len(), 1 + 3 + 1 + 1);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(name, data)| {
                assert!(name.is_none());
                serde_json::from_str(data).unwrap()
            })
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert!(chunk.get("usage").is_none(), "usage present: {chunk}");
        }
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = chunks[1..4].iter().map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
        assert_eq!(text, "w1 w2 w3");
        assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    }

    #[tokio::test]
    async fn openai_stream_with_include_usage_ends_with_usage_chunk() {
        let mut body =
            openai_body("hi\n#mock prompt_tokens=50 completion_tokens=4 cached_tokens=20 reasoning_tokens=2");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (status, _, bytes) = post(&app(), "/v1/chat/completions", &body).await;
        assert_eq!(status, StatusCode::OK);
        let events = sse_events(std::str::from_utf8(&bytes).unwrap());
        assert_eq!(events.len(), 1 + 4 + 1 + 1 + 1);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let chunks: Vec<Value> =
            events[..events.len() - 1].iter().map(|(_, data)| serde_json::from_str(data).unwrap()).collect();
        let (usage_chunk, rest) = chunks.split_last().unwrap();
        for chunk in rest {
            assert_eq!(chunk["usage"], Value::Null);
            assert!(chunk.get("usage").is_some());
        }
        let content_chunks =
            rest.iter().filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty())).count();
        assert_eq!(content_chunks, 4);
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], 50);
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 4);
        assert_eq!(usage_chunk["usage"]["total_tokens"], 54);
        assert_eq!(usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
        assert_eq!(usage_chunk["usage"]["completion_tokens_details"]["reasoning_tokens"], 2);
    }

    #[tokio::test]
    async fn anthropic_non_stream_excludes_cache_from_input_tokens() {
        let mut body = anthropic_body("");
        body["system"] = json!("sys");
        body["messages"] = json!([{"role": "user", "content": [
            {"type": "text", "text": "question"},
            {"type": "text", "text": "#mock prompt_tokens=100 completion_tokens=6 cached_tokens=10 cache_write_tokens=3"},
        ]}]);
        let (status, v) = post_json(&app(), "/v1/messages", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["type"], "message");
        assert!(v["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "claude-haiku-4-5");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["stop_sequence"], Value::Null);
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"], "w1 w2 w3 w4 w5 w6");
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 87, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 10, "output_tokens": 6})
        );
    }

    #[tokio::test]
    async fn anthropic_stream_events_in_order_with_usage() {
        let mut body = anthropic_body(
            "hi\n#mock prompt_tokens=100 completion_tokens=3 cached_tokens=10 cache_write_tokens=3 \
             model_version=claude-haiku-4-5-20251001",
        );
        body["stream"] = json!(true);
        let (status, headers, bytes) = post(&app(), "/v1/messages", &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        let events = sse_events(std::str::from_utf8(&bytes).unwrap());
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        for ((name, _), value) in events.iter().zip(&data) {
            assert_eq!(value["type"], name.as_deref().unwrap());
        }
        let start = &data[0]["message"];
        assert_eq!(start["model"], "claude-haiku-4-5-20251001");
        assert_eq!(start["content"], json!([]));
        assert_eq!(start["usage"]["input_tokens"], 87);
        assert_eq!(start["usage"]["cache_read_input_tokens"], 10);
        assert_eq!(start["usage"]["cache_creation_input_tokens"], 3);
        assert_eq!(start["usage"]["output_tokens"], 1);
        let text: String = data[3..6]
            .iter()
            .map(|d| {
                assert_eq!(d["delta"]["type"], "text_delta");
                d["delta"]["text"].as_str().unwrap()
            })
            .collect();
        assert_eq!(text, "w1 w2 w3");
        assert_eq!(data[7]["delta"]["stop_reason"], "end_turn");
        assert_eq!(data[7]["delta"]["stop_sequence"], Value::Null);
        assert_eq!(data[7]["usage"]["output_tokens"], 3);
    }

    #[tokio::test]
    async fn fail_directive_answers_provider_error() {
        let app = app();
        let (status, headers, bytes) = post(&app, "/v1/chat/completions", &openai_body("#mock fail=503")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.get(header::RETRY_AFTER).is_none());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "overloaded_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("503"));

        let (status, headers, bytes) = post(&app, "/v1/chat/completions", &openai_body("#mock fail=429")).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");

        let mut body = anthropic_body("#mock fail=529");
        body["stream"] = json!(true);
        let (status, _, bytes) = post(&app, "/v1/messages", &body).await;
        assert_eq!(status.as_u16(), 529);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");

        let (status, v) = post_json(&app, "/v1/messages", &anthropic_body("#mock fail=500")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(v["error"]["type"], "api_error");
    }

    #[tokio::test]
    async fn invalid_requests_get_400_in_provider_shape() {
        let app = app();
        let response = post_raw(&app, "/v1/chat/completions", "{not json").await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], Value::Null);
        assert_eq!(v["error"]["code"], Value::Null);
        assert!(v["error"]["message"].is_string());

        let response = post_raw(&app, "/v1/messages", "[1,").await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let (status, v) = post_json(&app, "/v1/chat/completions", &json!({"messages": []})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().unwrap().contains("model"));
        let (status, v) = post_json(&app, "/v1/chat/completions", &json!({"model": "m"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().unwrap().contains("messages"));

        let mut no_max = anthropic_body("hi");
        no_max.as_object_mut().unwrap().remove("max_tokens");
        let (status, v) = post_json(&app, "/v1/messages", &no_max).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().unwrap().contains("max_tokens"));

        let (status, v) = post_json(&app, "/v1/chat/completions", &openai_body("#mock prompt_tokns=5")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().unwrap().contains("prompt_tokns"));

        // Every request is counted, valid or not.
        let before = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros();
        let mut stats = get_json(&app, "/_mock/stats").await;
        let last = stats.as_object_mut().unwrap().remove("last_request_at_us").unwrap().as_u64().unwrap();
        assert!(u128::from(last) <= before && u128::from(last) + 60_000_000 > before, "stamped at arrival: {last}");
        assert_eq!(
            stats,
            json!({"chat_completions": 4, "messages": 2, "embeddings": 0, "otlp_trace_posts": 0, "otlp_trace_bytes": 0})
        );
    }

    #[tokio::test]
    async fn otlp_trace_exports_are_counted_and_answered_with_full_success() {
        let app = app();
        let (status, _, bytes) = post(&app, "/v1/traces", &json!("twelve bytes")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(bytes.is_empty(), "an empty ExportTraceServiceResponse");
        let stats = get_json(&app, "/_mock/stats").await;
        assert_eq!((stats["otlp_trace_posts"].as_u64(), stats["otlp_trace_bytes"].as_u64()), (Some(1), Some(14)));
        assert_eq!(stats["chat_completions"], 0, "not an API request");
    }

    #[tokio::test]
    async fn garbage_is_not_json() {
        let app = app();
        let (status, _, bytes) = post(&app, "/v1/chat/completions", &openai_body("#mock garbage")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(serde_json::from_slice::<Value>(&bytes).is_err());

        let mut body = anthropic_body("#mock garbage");
        body["stream"] = json!(true);
        let (status, _, bytes) = post(&app, "/v1/messages", &body).await;
        assert_eq!(status, StatusCode::OK);
        let events = sse_events(std::str::from_utf8(&bytes).unwrap());
        assert_eq!(events.len(), 3);
        for (_, data) in events {
            assert!(serde_json::from_str::<Value>(&data).is_err(), "{data} parsed");
        }
    }

    /// Reads body chunks until the body ends, errors, or stays silent for `quiet`.
    async fn read_until_quiet(body: Body, quiet: Duration) -> (String, &'static str) {
        let mut stream = body.into_data_stream();
        let mut text = String::new();
        loop {
            match tokio::time::timeout(quiet, stream.next()).await {
                Ok(Some(Ok(bytes))) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Some(Err(_))) => return (text, "error"),
                Ok(None) => return (text, "end"),
                Err(_) => return (text, "silent"),
            }
        }
    }

    #[tokio::test]
    async fn stall_after_sends_n_chunks_then_hangs() {
        let mut body = openai_body("#mock completion_tokens=10 stall_after=2");
        body["stream"] = json!(true);
        let response = post_raw(&app(), "/v1/chat/completions", body.to_string()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let (text, how) = read_until_quiet(response.into_body(), Duration::from_millis(300)).await;
        assert_eq!(how, "silent");
        let events = sse_events(&text);
        assert_eq!(events.len(), 1 + 2);
        assert!(!text.contains("[DONE]"));

        // Non-streaming: no answer at all.
        let app = app();
        let request = post_raw(&app, "/v1/messages", anthropic_body("#mock stall_after=0").to_string());
        assert!(tokio::time::timeout(Duration::from_millis(200), request).await.is_err());
    }

    #[tokio::test]
    async fn close_after_sends_n_chunks_then_errors() {
        let mut body = anthropic_body("#mock completion_tokens=10 close_after=3");
        body["stream"] = json!(true);
        let response = post_raw(&app(), "/v1/messages", body.to_string()).await;
        let (text, how) = read_until_quiet(response.into_body(), Duration::from_secs(5)).await;
        assert_eq!(how, "error");
        let deltas =
            sse_events(&text).iter().filter(|(name, _)| name.as_deref() == Some("content_block_delta")).count();
        assert_eq!(deltas, 3);
        assert!(!text.contains("message_stop"));

        let response = post_raw(&app(), "/v1/chat/completions", openai_body("#mock close_after=0").to_string()).await;
        let (text, how) = read_until_quiet(response.into_body(), Duration::from_secs(5)).await;
        assert_eq!((text.as_str(), how), ("", "error"));
    }

    #[tokio::test]
    async fn latency_directive_adds_to_base_latency() {
        let app = router(MockOptions { latency: Duration::from_millis(30) });
        let started = Instant::now();
        let (status, _) = post_json(&app, "/v1/chat/completions", &openai_body("#mock latency_ms=40")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(70), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_with_usage() {
        let app = app();
        let body = json!({"model": "text-embedding-3-small", "input": ["hello world", "one two three"]});
        let (status, first) = post_json(&app, "/v1/embeddings", &body).await;
        assert_eq!(status, StatusCode::OK);
        let (_, second) = post_json(&app, "/v1/embeddings", &body).await;
        assert_eq!(first, second);
        assert_eq!(first["object"], "list");
        assert_eq!(first["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
        let data = first["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        let vector = data[0]["embedding"].as_array().unwrap();
        assert_eq!(vector.len(), DEFAULT_DIMENSIONS);
        assert!(vector.iter().all(|x| (-1.0..1.0).contains(&x.as_f64().unwrap())));
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);

        let body = json!({"model": "m", "input": "a b c", "dimensions": 3, "encoding_format": "base64"});
        let (status, v) = post_json(&app, "/v1/embeddings", &body).await;
        assert_eq!(status, StatusCode::OK);
        // 3 f32 = 12 bytes = 16 base64 characters.
        assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 16);
        assert_eq!(v["usage"]["prompt_tokens"], 3);

        let (status, _) = post_json(&app, "/v1/embeddings", &json!({"model": "m"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(get_json(&app, "/_mock/stats").await["embeddings"], 4);
    }

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    async fn raw_http(addr: std::net::SocketAddr, path: &str, body: &Value) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        // The connection ends either with EOF or a reset; both end the answer.
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await;
        String::from_utf8_lossy(&response).into_owned()
    }

    #[tokio::test]
    async fn served_over_tcp_close_aborts_and_shutdown_ends_stalls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, MockOptions::default(), shutdown.clone()));

        let mut body = openai_body("#mock completion_tokens=5");
        body["stream"] = json!(true);
        let complete = raw_http(addr, "/v1/chat/completions", &body).await;
        assert!(complete.starts_with("HTTP/1.1 200"));
        assert!(complete.contains("data: [DONE]"));
        assert!(complete.ends_with("0\r\n\r\n"), "chunked body not terminated: {complete:?}");

        let mut body = openai_body("#mock completion_tokens=5 close_after=2");
        body["stream"] = json!(true);
        let cut = raw_http(addr, "/v1/chat/completions", &body).await;
        assert!(cut.starts_with("HTTP/1.1 200"));
        assert!(cut.contains("\"content\":\"w2 \""));
        assert!(!cut.contains("w3"));
        assert!(!cut.ends_with("0\r\n\r\n"), "aborted body looks complete: {cut:?}");

        // A stalled stream holds its connection until shutdown, which must still finish.
        let mut body = anthropic_body("#mock stall_after=1");
        body["stream"] = json!(true);
        let stalled = tokio::spawn(async move { raw_http(addr, "/v1/messages", &body).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stalled.is_finished());
        shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), server).await;
        result.expect("serve did not stop").unwrap().unwrap();
        let stalled = stalled.await.unwrap();
        assert_eq!(stalled.matches("event: content_block_delta").count(), 1);
        assert!(!stalled.contains("message_stop"));
    }
}
