//! What every Tollgate binary does the same way: logging, the metrics recorder, shutdown on
//! SIGTERM/ctrl-c, binding, the `/healthz` + `/metrics` endpoints, and policy hot reload.

pub mod kafka;
pub mod reload;

use std::process::ExitCode;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit codes of start-up failures, the same for every binary.
pub mod exit {
    pub const CONFIG: u8 = 2;
    pub const BIND: u8 = 3;
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Installs the process-wide Prometheus recorder.
pub fn install_metrics() -> Result<PrometheusHandle, ExitCode> {
    PrometheusBuilder::new().install_recorder().map_err(|e| {
        tracing::error!(error = %e, "cannot install the metrics recorder");
        ExitCode::from(exit::CONFIG)
    })
}

pub async fn bind(addr: &str) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        tracing::error!(addr, error = %e, "cannot bind");
        ExitCode::from(exit::BIND)
    })
}

/// The start of every service binary: the metrics recorder, then the listener.
pub async fn metrics_and_listener(addr: &str) -> Result<(PrometheusHandle, TcpListener), ExitCode> {
    let metrics = install_metrics()?;
    Ok((metrics, bind(addr).await?))
}

/// A token cancelled on the first SIGTERM or ctrl-c.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Maps a service's result to the process exit code, logging the whole error chain.
pub fn exit_code(service: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{service} failed");
            ExitCode::FAILURE
        }
    }
}

/// `GET /metrics` (Prometheus text format; 404 when no recorder is installed).
pub async fn render_metrics(metrics: Option<PrometheusHandle>) -> axum::response::Response {
    match metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// `/healthz` and `/metrics`, for the services whose only HTTP surface they are.
pub fn ops_router(metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(move || render_metrics(metrics.clone())))
}

/// Calls `f` until it succeeds or `shutdown` (then `None`), waiting 100 ms between tries and
/// doubling up to 10 s; each failure is logged as `{service} unavailable: {what}` and passed to
/// `on_error` (for a counter).
pub async fn retry_with_backoff<T, E, F, Fut>(
    shutdown: &CancellationToken,
    service: &str,
    what: &str,
    mut on_error: impl FnMut(&E),
    mut f: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        // An attempt that hangs (a server that accepts and never answers) gives way to
        // `shutdown` too: what it was writing is written again by whoever replays it.
        let attempt = tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            r = f() => r,
        };
        match attempt {
            Ok(v) => return Some(v),
            Err(e) => {
                on_error(&e);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{service} unavailable: {what}");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// An error and its sources, `outer: inner: root` (reqwest's own message is only the outermost,
/// "error sending request").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A `--kafka-option KEY=VALUE` argument (every service's flag for extra librdkafka settings).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

/// Waits for a service's ops HTTP server (metrics, health) and logs how it ended, instead of
/// dropping its error: a server that failed is visible in the log.
pub async fn log_ops_server_end(service: &str, server: tokio::task::JoinHandle<std::io::Result<()>>) {
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "{service}: the ops HTTP server (metrics, health) failed"),
        Err(e) => tracing::error!(error = %e, "{service}: the ops HTTP server's task failed"),
    }
}

/// A token that cancels itself after `limit`: the bound of a last attempt at shutdown (a final
/// flush that retries while a server is away must end some time).
pub fn cancelled_after(limit: std::time::Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        cancel.cancel();
    });
    token
}

/// The partitions `md` lists for `topic`; empty when the topic is missing or has an error.
pub fn partitions_in(md: &rdkafka::metadata::Metadata, topic: &str) -> Vec<i32> {
    md.topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_options_are_key_equals_value() {
        assert_eq!(parse_key_value("linger.ms=5"), Ok(("linger.ms".into(), "5".into())));
        assert_eq!(parse_key_value(" sasl.password =a=b"), Ok(("sasl.password".into(), "a=b".into())));
        assert!(parse_key_value("=5").is_err());
        assert!(parse_key_value("linger.ms").is_err());
    }

    #[test]
    fn an_error_chain_names_every_source() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, inner);
        assert_eq!(error_chain(&outer), "connection refused");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(error_chain(&Wrap(std::io::Error::other("reset"))), "error sending request: reset");
    }
}
