//! `tollgate-floor-proxy`: the benchmark floor, a bare pass-through proxy with no governance.
//!
//! It runs on the ingress's HTTP stack, set up the way the ingress sets it up: an axum server
//! (`axum::serve`, no extra layers) in front of a `reqwest` client with the ingress's
//! timeouts, pool settings and allocator (mimalloc); accepted connections get TCP_NODELAY unless `--nodelay false`. Each request's body is read whole (as the ingress reads it),
//! sent to `--upstream` + the request's path and query with the request's end-to-end headers,
//! and the answer's status, headers and body stream back as they arrive. No envelope, key,
//! routing, token count, decision or usage event: whatever the ingress costs above this
//! proxy is the price of governance. `tests/bench/run` measures both against the mock provider.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt as _;
use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

/// The ingress's allocator, so the floor differs from it only by governance.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A bare pass-through HTTP proxy on the ingress's stack (axum + reqwest), for benchmarks.
#[derive(Debug, Parser)]
#[command(name = "tollgate-floor-proxy", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: String,
    /// Base URL every request is forwarded to (the request's path and query are appended).
    #[arg(long, default_value = "http://127.0.0.1:8090")]
    upstream: String,
    /// Largest request body accepted, in bytes (the ingress's default).
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Set TCP_NODELAY on accepted connections (as the mock provider does). Without it a
    /// response written in several pieces (a stream, a head before its body) can wait for the
    /// client's delayed ACK, about 40 ms on Linux.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    nodelay: bool,
}

struct Floor {
    http: reqwest::Client,
    upstream: String,
    max_body_bytes: usize,
}

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The end-to-end headers of a message; `for_request` also drops `host` and `content-length`,
/// which the client sets for the upstream call. A response keeps its length: the body passes
/// unchanged.
fn end_to_end(headers: &HeaderMap, for_request: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let client_sets = for_request && (name == header::HOST || name == header::CONTENT_LENGTH);
        if !hop_by_hop(name) && !client_sets {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

async fn forward(State(floor): State<Arc<Floor>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, floor.max_body_bytes).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", floor.upstream);
    let sent = floor.http.request(parts.method, url).headers(end_to_end(&parts.headers, true)).body(bytes).send().await;
    let upstream = match sent {
        Ok(resp) => resp,
        Err(error) => {
            warn!(%error, "upstream call failed");
            return (StatusCode::BAD_GATEWAY, format!("upstream call failed: {error}")).into_response();
        }
    };
    let mut resp = Response::builder().status(upstream.status());
    if let Some(headers) = resp.headers_mut() {
        *headers = end_to_end(upstream.headers(), false);
        if !headers.contains_key(header::CONTENT_TYPE) {
            headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
        }
    }
    resp.body(Body::from_stream(upstream.bytes_stream()))
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tollgate_runtime::init_tracing();
    // The ingress's client (ingress/src/lib.rs `run`): same timeouts, same pool.
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            error!(%error, "cannot build the HTTP client");
            return ExitCode::FAILURE;
        }
    };
    let floor = Arc::new(Floor {
        http,
        upstream: args.upstream.trim_end_matches('/').to_owned(),
        max_body_bytes: args.max_body_bytes,
    });
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(error) => {
            error!(listen = %args.listen, %error, "cannot bind the listen address");
            return ExitCode::FAILURE;
        }
    };
    let nodelay = args.nodelay;
    let listener = listener.tap_io(move |tcp| {
        if nodelay {
            if let Err(error) = tcp.set_nodelay(true) {
                warn!(%error, "tcp_nodelay not set");
            }
        }
    });
    let app =
        Router::new().route("/healthz", axum::routing::get(|| async { "ok" })).fallback(forward).with_state(floor);
    info!(listen = %args.listen, upstream = %args.upstream, nodelay, "floor proxy listening");
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "floor proxy failed");
            ExitCode::FAILURE
        }
    }
}
