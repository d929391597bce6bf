//! Tollgate's web console: what finance and platform people look at instead of SQL.
//!
//! Read-only pages over the meter's ClickHouse tables and the enforcer's topics, behind a console
//! token: spend by any grouping over days or months, budgets against their ceilings, breaches and
//! alerts live and past, the reference's four failure modes with untagged spend, and outcomes per
//! dollar. Every figure comes from the meter's report functions (`tollgate_meter::report`), so a
//! page, its CSV export and `tollgate-meter report` print the same numbers in the same way.
//!
//! Everything served is in the binary: the HTML and SVG are made here (`html`), the stylesheet
//! and the one script (the live feed) are embedded from `assets/`.

pub mod budgets;
pub mod html;
pub mod live;
mod pages;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_meter::report::Reporter;
use tollgate_schemas::policy::Policy;
use tollgate_store::ClickHouseConfig;
use tracing::info;

/// The session cookie's name.
pub const COOKIE: &str = "tollgate_console";
/// Shortest console token accepted: a guessable token would open every figure.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Clone)]
pub struct Config {
    pub clickhouse: ClickHouseConfig,
    pub kafka_brokers: String,
    pub breaches_topic: String,
    pub alerts_topic: String,
    /// `--kafka-option`s, applied last.
    pub kafka_extra: Vec<(String, String)>,
    /// The policy whose budgets the budgets page shows; `None`: no budgets page figures.
    pub policy_dir: Option<PathBuf>,
    /// The console token (`Authorization: Bearer …`, or the login form, which sets a cookie).
    pub token: String,
    /// Records kept (and replayed to a page that opens) per live topic partition at start, and
    /// in the ring of recent events.
    pub live_backlog: usize,
    /// Pages following the live feed at once at most.
    pub live_clients: usize,
    pub metrics: Option<PrometheusHandle>,
}

impl Config {
    pub fn new(clickhouse: ClickHouseConfig, kafka_brokers: String, token: String) -> Self {
        Config {
            clickhouse,
            kafka_brokers,
            breaches_topic: tollgate_schemas::topics::BREACHES.into(),
            alerts_topic: tollgate_schemas::topics::ALERTS.into(),
            kafka_extra: vec![],
            policy_dir: None,
            token,
            live_backlog: 200,
            live_clients: 64,
            metrics: None,
        }
    }
}

pub(crate) struct AppState {
    pub reporter: Reporter,
    pub client: clickhouse::Client,
    pub db: String,
    /// The policy as last loaded: reloaded when its files change, as the enforcer does.
    pub policy: Option<tokio::sync::watch::Receiver<Arc<Policy>>>,
    /// Ends the live streams at shutdown (a page following them would hold it open).
    pub shutdown: CancellationToken,
    pub hub: Arc<live::Hub>,
    pub live_slots: Arc<tokio::sync::Semaphore>,
    /// What a valid session cookie holds: a digest of the token, so the token itself never
    /// travels in a cookie.
    session: String,
    token_digest: [u8; 32],
}

impl AppState {
    fn authorised(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.token_matches(t));
        bearer || cookie(headers, COOKIE).is_some_and(|c| digest(c.as_bytes()) == digest(self.session.as_bytes()))
    }

    /// Compares digests, so the time taken says nothing about how much of the token was right.
    pub fn token_matches(&self, candidate: &str) -> bool {
        digest(candidate.as_bytes()) == self.token_digest
    }

    pub fn session_cookie(&self) -> String {
        format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200", self.session)
    }

    /// Replaces the session cookie with an expired, empty one.
    pub fn logout_cookie() -> String {
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// How far back the history pages read (a bound on what each page load scans).
pub const HISTORY_DAYS: u32 = 90;

/// The newest `limit` breach decisions the meter keeps (`breach_history`), newest first.
pub fn breach_history_sql(db: &str, limit: usize) -> String {
    format!(
        "SELECT decided_at_us, rule_kind, rule_id, scope, state, action, measure, limit_value, observed \
         FROM {db}.breach_history FINAL WHERE decided_at >= now() - INTERVAL {HISTORY_DAYS} DAY \
         ORDER BY decided_at_us DESC, rule_id, scope LIMIT {limit}"
    )
}

/// The newest `limit` alerts the meter keeps (`alert_history`), newest first.
pub fn alert_history_sql(db: &str, limit: usize) -> String {
    format!(
        "SELECT raised_at_us, rule_id, severity, scope, threshold_pct, summary \
         FROM {db}.alert_history FINAL WHERE raised_at >= now() - INTERVAL {HISTORY_DAYS} DAY \
         ORDER BY raised_at_us DESC, alert_id LIMIT {limit}"
    )
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Serves the console on `listener` until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.token.len() < MIN_TOKEN_LEN {
        anyhow::bail!("the console token must be at least {MIN_TOKEN_LEN} characters");
    }
    let policy = match &config.policy_dir {
        Some(dir) => {
            let initial =
                Policy::load_dir(dir).map_err(|e| anyhow::anyhow!("policy in {} is invalid:\n{e}", dir.display()))?;
            Some(tollgate_runtime::reload::PolicyWatch::spawn(dir.clone(), initial, shutdown.clone()))
        }
        None => None,
    };
    let reporter = Reporter::new(&config.clickhouse).context("clickhouse settings")?;
    let hub = Arc::new(live::Hub::new(config.live_backlog));
    let config = Arc::new(config);
    let follower = tokio::spawn(live::follow(Arc::clone(&config), Arc::clone(&hub), shutdown.clone()));
    let session = hex::encode(Sha256::digest(format!("tollgate-console-session\0{}", config.token).as_bytes()));
    let state = Arc::new(AppState {
        reporter,
        client: config.clickhouse.client(),
        db: config.clickhouse.database.clone(),
        policy,
        shutdown: shutdown.clone(),
        hub,
        live_slots: Arc::new(tokio::sync::Semaphore::new(config.live_clients)),
        token_digest: digest(config.token.as_bytes()),
        session,
    });
    let app = Router::new()
        .merge(pages::routes())
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_token))
        .merge(pages::public_routes())
        .with_state(state)
        .layer(middleware::from_fn(security_headers))
        .merge(tollgate_runtime::ops_router(config.metrics.clone()));
    info!(addr = %listener.local_addr()?, "console listening");
    let stop = shutdown.clone();
    axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await?;
    follower.abort();
    Ok(())
}

/// Lets a request through with the token or the session cookie; a page asked for by a browser
/// goes to the login form instead, anything else gets 401.
async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.authorised(req.headers()) {
        return next.run(req).await;
    }
    metrics::counter!("tollgate_console_unauthorised_total").increment(1);
    let wants_html =
        req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if wants_html && req.method() == axum::http::Method::GET {
        let next_path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        return Redirect::to(&format!("/login?next={}", html::url_value(next_path))).into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"tollgate-console\"")],
        "the console token is missing or wrong (Authorization: Bearer <token>, or log in at /login)\n",
    )
        .into_response()
}

/// No framing, no referrer, nothing cached, nothing loaded from elsewhere.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; tollgate_console=abc"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
