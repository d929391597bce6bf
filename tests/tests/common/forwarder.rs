//! A TCP forwarder to ClickHouse with a switch, for tests of a ClickHouse outage.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP forwarder to ClickHouse with a switch. Off, it drops every connection it accepts and
/// aborts every one it carries, so the meter sees what a dead server looks like: resets and
/// connections closed before an answer.
pub struct Forwarder {
    pub addr: SocketAddr,
    /// Some while on: cancelling it aborts the connections opened under it.
    live: Arc<Mutex<Option<CancellationToken>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let state = Arc::clone(&live);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                let token = state.lock().unwrap().clone();
                let Some(token) = token else {
                    drop(client); // off: closed at once
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        () = token.cancelled() => {} // both sockets dropped mid-exchange
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self { addr, live, accept }
    }

    pub fn off(&self) {
        if let Some(token) = self.live.lock().unwrap().take() {
            token.cancel();
        }
    }

    pub fn on(&self) {
        self.live.lock().unwrap().get_or_insert_with(CancellationToken::new);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.off();
        self.accept.abort();
    }
}

/// The address of the ClickHouse the tests use.
pub fn upstream() -> SocketAddr {
    let url = super::clickhouse_url();
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    hostport.parse().unwrap_or_else(|e| panic!("ClickHouse URL {url} is not http://<ip>:<port>: {e}"))
}
