//! `tollgate-mock-provider`: serves the scriptable OpenAI / Anthropic mock until ctrl-c or SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_tests::mock::{self, MockOptions};
use tracing::{error, info, warn};

/// Scriptable mock of the OpenAI and Anthropic APIs, steered by `#mock` lines in the prompt.
#[derive(Debug, Parser)]
#[command(name = "tollgate-mock-provider", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TOLLGATE_MOCK_LISTEN", default_value = "127.0.0.1:8090")]
    listen: String,
    /// Base latency in milliseconds added to every answer.
    #[arg(long, env = "TOLLGATE_MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tollgate_runtime::init_tracing();

    let listener = match TcpListener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            error!(listen = %args.listen, %error, "cannot bind the listen address");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => info!(%addr, latency_ms = args.latency_ms, "mock provider listening"),
        Err(error) => warn!(%error, "mock provider listening on an unknown address"),
    }

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            info!("shutdown requested");
            shutdown.cancel();
        }
    });
    let opts = MockOptions { latency: Duration::from_millis(args.latency_ms) };
    match mock::serve(listener, opts, shutdown).await {
        Ok(()) => {
            info!("mock provider stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!(%error, "mock provider failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on ctrl-c or, on Unix, SIGTERM.
async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
