//! The console's pages, its CSV exports, the live feed and the login form.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use clap::ValueEnum as _;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use tollgate_meter::report::{
    self, Cell, Dimension, Format, Output, Period, ReportError, SeriesRow, Step, Which, format_usd,
};

use crate::AppState;
use crate::budgets::{self, Projection};
use crate::html::{self, Bar, esc, page, url_value};
use crate::live::fmt_us;

type Shared = State<Arc<AppState>>;

const CSS: &str = include_str!("../assets/console.css");
const LIVE_JS: &str = include_str!("../assets/live.js");

/// The pages behind the token.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/spend") }))
        .route("/spend", get(spend))
        .route("/budgets", get(budgets_page))
        .route("/breaches", get(breaches))
        .route("/failure-modes", get(failure_modes))
        .route("/outcomes", get(outcomes))
        .route("/csv/{report}", get(csv))
        .route("/live/events", get(live_events))
}

/// The login form and the embedded stylesheet and script (no figures in either).
pub(crate) fn public_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/assets/{name}", get(asset))
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "live.js" => (LIVE_JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Only a path on this console: printable ASCII without spaces (a browser drops tabs and line
/// breaks from `Location`, which would turn `/\t/host` into `//host`), one leading `/` not
/// followed by another or by `\\`, so the form cannot send a person elsewhere.
fn local_path(next: Option<&str>) -> String {
    let ok = |p: &str| {
        let b = p.as_bytes();
        b.first() == Some(&b'/')
            && !matches!(b.get(1), Some(b'/' | b'\\'))
            && b.iter().all(|c| c.is_ascii_graphic())
            && !p.contains('\\')
    };
    match next {
        Some(p) if ok(p) => p.to_owned(),
        _ => "/spend".to_owned(),
    }
}

fn login_html(next: &str, error: Option<&str>) -> String {
    let err = error.map_or(String::new(), |e| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(e)));
    let body = format!(
        "{err}<form method=\"post\" action=\"/login\" id=\"login\"><label>Console token \
         <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label>\
         <input type=\"hidden\" name=\"next\" value=\"{next}\"><button type=\"submit\">Log in</button></form>\
         <p class=\"hint\">The token is the one the console was started with (<code>--token-file</code> or \
         <code>TOLLGATE_CONSOLE_TOKEN</code>); <code>compose/local/up.sh</code> prints where it is.</p>",
        next = esc(next)
    );
    page("/login", "Log in", &body, &[])
}

async fn login_form(Query(q): Query<LoginQuery>) -> Html<String> {
    Html(login_html(&local_path(q.next.as_deref()), None))
}

async fn logout() -> Response {
    ([(header::SET_COOKIE, AppState::logout_cookie())], Redirect::to("/login")).into_response()
}

async fn login(State(state): Shared, Form(form): Form<LoginForm>) -> Response {
    let next = local_path(form.next.as_deref());
    if state.token_matches(&form.token) {
        return ([(header::SET_COOKIE, state.session_cookie())], Redirect::to(&next)).into_response();
    }
    metrics::counter!("tollgate_console_unauthorised_total").increment(1);
    (StatusCode::UNAUTHORIZED, Html(login_html(&next, Some("That is not the console token.")))).into_response()
}

/// What every page's form sends: the period (a month, or from/to), and the page's own choices.
#[derive(Debug, Default, Clone, Deserialize)]
struct Params {
    month: Option<String>,
    from: Option<String>,
    to: Option<String>,
    by: Option<String>,
    step: Option<String>,
    kind: Option<String>,
}

impl Params {
    fn nonempty(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }

    /// The period asked for; this UTC month when none is.
    fn period(&self) -> Result<Period, ReportError> {
        let (from, to) = (Self::nonempty(&self.from), Self::nonempty(&self.to));
        match Self::nonempty(&self.month) {
            Some(m) => Period::month(m),
            None if from.is_some() || to.is_some() => Period::between(from, to),
            None => Period::month(&this_month()),
        }
    }

    /// The month field's value as shown (this month when the period is not from/to).
    fn month_shown(&self) -> String {
        match Self::nonempty(&self.month) {
            Some(m) => m.to_owned(),
            None if Self::nonempty(&self.from).is_some() || Self::nonempty(&self.to).is_some() => String::new(),
            None => this_month(),
        }
    }

    fn dimension(&self, default: Dimension) -> Result<Dimension, ReportError> {
        match Self::nonempty(&self.by) {
            None => Ok(default),
            Some(b) => {
                Dimension::from_str(b, true).map_err(|_| ReportError::Argument(format!("unknown grouping {b:?}")))
            }
        }
    }

    fn step(&self) -> Step {
        if Self::nonempty(&self.step) == Some("month") { Step::Month } else { Step::Day }
    }

    /// The period and choices as a query string, for links (CSV) that show the same thing.
    fn query(&self, extra: &[(&str, &str)]) -> String {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for (k, v) in [("month", &self.month), ("from", &self.from), ("to", &self.to)] {
            if let Some(v) = Self::nonempty(v) {
                pairs.push((k, v));
            }
        }
        if Self::nonempty(&self.month).is_none()
            && Self::nonempty(&self.from).is_none()
            && Self::nonempty(&self.to).is_none()
        {
            // Pin the month shown, so the export matches the page even across midnight.
            pairs.push(("month", ""));
        }
        pairs.extend_from_slice(extra);
        let month = this_month();
        pairs
            .iter()
            .map(|(k, v)| {
                let v = if *k == "month" && v.is_empty() { month.as_str() } else { v };
                format!("{k}={}", url_value(v))
            })
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn this_month() -> String {
    jiff::Timestamp::now().strftime("%Y-%m").to_string()
}

fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// A page that could not be made: 400 for what was asked, 502 when ClickHouse failed.
fn error_page(current: &str, title: &str, e: &ReportError) -> Response {
    let status = match e {
        ReportError::ClickHouse(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::BAD_REQUEST,
    };
    let body = format!("<p class=\"error\" id=\"error\">{}</p>", esc(&e.to_string()));
    (status, Html(page(current, title, &body, &[]))).into_response()
}

/// The period form shared by the pages, with the page's own fields in `extra`.
fn period_form(action: &str, p: &Params, extra: &str) -> String {
    format!(
        "<form class=\"controls\" method=\"get\" action=\"{action}\">\
         <label>Month <input type=\"month\" name=\"month\" value=\"{m}\"></label>\
         <span class=\"or\">or</span><label>From <input type=\"date\" name=\"from\" value=\"{f}\"></label>\
         <label>To <input type=\"date\" name=\"to\" value=\"{t}\"></label>{extra}<button type=\"submit\">Show</button></form>",
        m = esc(&p.month_shown()),
        f = esc(Params::nonempty(&p.from).unwrap_or_default()),
        t = esc(Params::nonempty(&p.to).unwrap_or_default()),
    )
}

fn select(name: &str, label: &str, options: &[(&str, &str)], chosen: &str) -> String {
    let mut html = format!("<label>{label} <select name=\"{name}\">");
    for (value, text) in options {
        let sel = if *value == chosen { " selected" } else { "" };
        let _ = write!(html, "<option value=\"{}\"{sel}>{}</option>", esc(value), esc(text));
    }
    html.push_str("</select></label>");
    html
}

const DIMENSIONS: [(&str, &str); 6] = [
    ("project", "Project"),
    ("team", "Team"),
    ("cost-center", "Cost centre"),
    ("user", "User"),
    ("workflow", "Workflow"),
    ("model", "Model"),
];

fn period_line(out: &Output) -> String {
    format!("<p class=\"period\">{}</p>", esc(&out.period.describe()))
}

async fn spend(State(state): Shared, Query(p): Query<Params>) -> Response {
    match spend_body(&state, &p).await {
        Ok(body) => Html(page("/spend", "Spend", &body, &[])).into_response(),
        Err(e) => error_page("/spend", "Spend", &e),
    }
}

async fn spend_body(state: &AppState, p: &Params) -> Result<String, ReportError> {
    let dim = p.dimension(Dimension::Project)?;
    let period = p.period()?;
    let step = p.step();
    let dims = [dim];
    let out = state.reporter.output(&Which::Chargeback(dims.to_vec()), period).await?;
    let series = state.reporter.chargeback_series(&dims, &period, step).await?;
    let controls = format!(
        "{}{}",
        select("by", "By", &DIMENSIONS, dim.name()),
        select(
            "step",
            "Over",
            &[("day", "Days"), ("month", "Months")],
            if step == Step::Month { "month" } else { "day" }
        )
    );
    let mut body = period_form("/spend", p, &controls);
    body.push_str(&period_line(&out));
    let (buckets, lines) = spend_series(&series, &period, step);
    let caption = format!("Spend by {} per {}, USD", dim.name(), if step == Step::Month { "month" } else { "day" });
    body.push_str(&html::stacked_columns("spend-chart", &caption, &buckets, &lines));
    let csv = format!("/csv/chargeback?{}", p.query(&[("by", dim.name())]));
    let _ = write!(body, "<p class=\"export\"><a id=\"csv\" href=\"{}\" download>Export CSV</a></p>", esc(&csv));
    body.push_str(&html::report_table(&out, "spend-table"));
    Ok(body)
}

/// Groups beyond this many are summed as `other` in the chart (the table lists them all).
const SERIES_SHOWN: usize = 7;

/// The chart's buckets (every day or month of a bounded period, else those with spend) and one
/// line per group, the largest first.
fn spend_series(rows: &[SeriesRow], period: &Period, step: Step) -> (Vec<String>, Vec<(String, Vec<i64>)>) {
    let mut buckets = every_bucket(period, step).unwrap_or_default();
    if buckets.is_empty() {
        buckets = rows.iter().map(|r| r.bucket.clone()).collect();
        buckets.sort();
        buckets.dedup();
    }
    let mut totals: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for r in rows {
        *totals.entry(label(&r.keys)).or_default() += r.cost_nanos;
    }
    let mut order: Vec<(String, i64)> = totals.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = order.iter().take(SERIES_SHOWN).map(|(k, _)| k.clone()).collect();
    let other = order.len() > SERIES_SHOWN;
    let mut lines: Vec<(String, Vec<i64>)> = shown.iter().map(|k| (k.clone(), vec![0; buckets.len()])).collect();
    if other {
        lines.push(("other".into(), vec![0; buckets.len()]));
    }
    for r in rows {
        let Ok(b) = buckets.binary_search(&r.bucket) else { continue };
        let key = label(&r.keys);
        let line = shown.iter().position(|k| *k == key).unwrap_or(lines.len() - 1);
        if let Some(v) = lines.get_mut(line).and_then(|l| l.1.get_mut(b)) {
            *v += r.cost_nanos;
        }
    }
    (buckets, lines)
}

fn label(keys: &[String]) -> String {
    let parts: Vec<&str> = keys.iter().map(|k| if k.is_empty() { "(none)" } else { k.as_str() }).collect();
    parts.join(" / ")
}

/// Every UTC day (`2026-12-01`) or month (`2026-12-01`, its first day) of a bounded period of at
/// most [`MAX_BUCKETS`]; `None` otherwise (the chart then has the buckets with spend).
const MAX_BUCKETS: usize = 800;

fn every_bucket(period: &Period, step: Step) -> Option<Vec<String>> {
    let (from, to) = (period.from?, period.to?);
    let start = jiff::Timestamp::from_second(from).ok()?.to_zoned(jiff::tz::TimeZone::UTC).date();
    let end = jiff::Timestamp::from_second(to).ok()?.to_zoned(jiff::tz::TimeZone::UTC);
    let mut d = match step {
        Step::Day => start,
        Step::Month => start.first_of_month(),
    };
    let mut out = Vec::new();
    while d.to_zoned(jiff::tz::TimeZone::UTC).ok()? < end {
        if out.len() == MAX_BUCKETS {
            return None;
        }
        out.push(d.to_string());
        d = match step {
            Step::Day => d.tomorrow().ok()?,
            Step::Month => d.first_of_month().checked_add(jiff::ToSpan::months(1)).ok()?,
        };
    }
    Some(out)
}

async fn budgets_page(State(state): Shared) -> Response {
    let Some(policy) = state.policy.as_ref().map(|rx| Arc::clone(&rx.borrow())) else {
        let body = "<p class=\"empty\">No policy directory was given (<code>--policy-dir</code>), so there are no budgets to show.</p>";
        return Html(page("/budgets", "Budgets", body, &[])).into_response();
    };
    let now = now_us();
    let list = budgets::statuses(&state.client, &state.db, &policy.rules, now).await;
    let mut body = format!("<p class=\"period\">Windows open at {} (UTC)</p>", esc(&fmt_us(now)));
    if list.is_empty() {
        body.push_str("<p class=\"empty\">The policy has no budgets.</p>");
    }
    for b in &list {
        let r = &b.rule;
        let window = match &r.window {
            tollgate_schemas::rules::Window::Calendar { period, timezone } => {
                let period = format!("{period:?}").to_lowercase();
                format!(
                    "{period} in {timezone}, {} to {}",
                    fmt_us(b.window_start_us),
                    b.window_end_us.map(fmt_us).unwrap_or_default()
                )
            }
            tollgate_schemas::rules::Window::Sliding { seconds } => format!("the last {seconds} s, sliding"),
        };
        let thresholds: Vec<u32> = r.alerts.iter().map(|a| a.at_pct).collect();
        let alert_text = if thresholds.is_empty() {
            "none".to_owned()
        } else {
            r.alerts.iter().map(|a| format!("{}% → {}", a.at_pct, a.notify.join(", "))).collect::<Vec<_>>().join("; ")
        };
        let _ = write!(
            body,
            "<section class=\"budget\" id=\"budget-{id}\" data-rule=\"{id}\"><h2>{id}</h2>\
             <p>Ceiling <strong class=\"ceiling\">{ceiling}</strong> · window {window} · on exceed <code>{action}</code> · alerts {alerts}</p>",
            id = esc(&r.id),
            ceiling = esc(&budgets::figure(r.measure, r.limit)),
            window = esc(&window),
            action = esc(&r.action_name),
            alerts = esc(&alert_text),
        );
        if let Some(note) = &b.note {
            let _ = write!(body, "<p class=\"note\">{}</p>", esc(note));
        }
        body.push_str(
            "<table class=\"report\"><thead><tr><th>scope</th><th class=\"num\">spent</th><th class=\"num\">of ceiling</th>\
             <th>against ceiling and alert thresholds</th><th>runs out</th></tr></thead><tbody>",
        );
        if b.scopes.is_empty() && b.note.is_none() {
            body.push_str("<tr><td colspan=\"5\" class=\"empty\">nothing spent in this window yet</td></tr>");
        }
        for s in &b.scopes {
            let pct = if r.limit > 0 { s.spent as f64 * 100.0 / r.limit as f64 } else { 0.0 };
            let runs_out = match s.projection {
                Projection::Exceeded => "exceeded".to_owned(),
                Projection::RunsOutAt(at) => fmt_us(at),
                Projection::Holds => "not in this window".to_owned(),
                Projection::NoSpend => "—".to_owned(),
                Projection::Sliding => "sliding window".to_owned(),
            };
            let spent = budgets::figure(r.measure, s.spent);
            let _ = write!(
                body,
                "<tr data-scope=\"{scope}\"><td>{scope}</td><td class=\"num spent\">{spent}</td><td class=\"num\">{pct:.1}%</td><td>{gauge}</td><td class=\"runs-out\">{runs_out}</td></tr>",
                scope = esc(&s.scope),
                spent = esc(&spent),
                gauge = html::gauge(
                    &format!("gauge-{}-{}", r.id, s.scope),
                    s.spent,
                    r.limit,
                    &thresholds,
                    &format!("{pct:.1}% of the ceiling")
                ),
                runs_out = esc(&runs_out),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    Html(page("/budgets", "Budgets", &body, &[])).into_response()
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BreachRow {
    decided_at_us: i64,
    rule_kind: String,
    rule_id: String,
    scope: String,
    state: String,
    action: String,
    measure: String,
    limit_value: i64,
    observed: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct AlertRow {
    raised_at_us: i64,
    rule_id: String,
    severity: String,
    scope: String,
    threshold_pct: i32,
    summary: String,
}

/// History rows shown at most.
const HISTORY_ROWS: usize = 200;

fn measure_figure(measure: &str, value: i64) -> String {
    match measure {
        "cost_nanos" => format!("${}", format_usd(value)),
        m => format!("{value} {m}"),
    }
}

async fn breaches(State(state): Shared) -> Response {
    let db = &state.db;
    let breaches: Result<Vec<BreachRow>, _> =
        state.client.query(&crate::breach_history_sql(db, HISTORY_ROWS)).fetch_all().await;
    let alerts: Result<Vec<AlertRow>, _> =
        state.client.query(&crate::alert_history_sql(db, HISTORY_ROWS)).fetch_all().await;
    let mut body = String::from(
        "<section id=\"live-section\"><h2>Live <span id=\"live-status\" class=\"status\">connecting…</span></h2>\
         <p class=\"hint\">Breach decisions and alerts as the enforcer publishes them, newest first; the page updates by itself.</p>\
         <table class=\"report\" id=\"live\"><thead><tr><th>at (UTC)</th><th>what</th><th>rule</th><th>scope</th><th>state</th>\
         <th>action / summary</th><th class=\"num\">observed</th><th class=\"num\">limit</th></tr></thead><tbody id=\"live-rows\">\
         </tbody></table></section><section><h2>Breach history</h2>",
    );
    match breaches {
        Ok(rows) => {
            body.push_str(
                "<table class=\"report\" id=\"breach-history\"><thead><tr><th>decided (UTC)</th><th>kind</th><th>rule</th><th>scope</th>\
                 <th>state</th><th>action</th><th class=\"num\">observed</th><th class=\"num\">limit</th></tr></thead><tbody>",
            );
            if rows.is_empty() {
                body.push_str("<tr><td colspan=\"8\" class=\"empty\">no breach decided yet</td></tr>");
            }
            for r in rows {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(&fmt_us(r.decided_at_us)),
                    esc(&r.rule_kind),
                    esc(&r.rule_id),
                    esc(&r.scope),
                    esc(&r.state),
                    esc(&r.action),
                    esc(&measure_figure(&r.measure, r.observed)),
                    esc(&measure_figure(&r.measure, r.limit_value)),
                );
            }
            body.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"error\">breach history unavailable: {}</p>", esc(&e.to_string()));
        }
    }
    body.push_str("</section><section><h2>Alert history</h2>");
    match alerts {
        Ok(rows) => {
            body.push_str(
                "<table class=\"report\" id=\"alert-history\"><thead><tr><th>raised (UTC)</th><th>severity</th><th>rule</th><th>scope</th>\
                 <th class=\"num\">at</th><th>summary</th></tr></thead><tbody>",
            );
            if rows.is_empty() {
                body.push_str("<tr><td colspan=\"6\" class=\"empty\">no alert raised yet</td></tr>");
            }
            for r in rows {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}%</td><td>{}</td></tr>",
                    esc(&fmt_us(r.raised_at_us)),
                    esc(&r.severity),
                    esc(&r.rule_id),
                    esc(&r.scope),
                    r.threshold_pct,
                    esc(&r.summary),
                );
            }
            body.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"error\">alert history unavailable: {}</p>", esc(&e.to_string()));
        }
    }
    body.push_str("</section>");
    Html(page("/breaches", "Breaches and alerts", &body, &["live.js"])).into_response()
}

/// `/live/events`: the ring, then each new record, as server-sent events named by their kind.
async fn live_events(State(state): Shared) -> Response {
    let Ok(slot) = Arc::clone(&state.live_slots).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "too many pages follow the live feed\n",
        )
            .into_response();
    };
    let (rx, recent) = state.hub.follow();
    metrics::gauge!("tollgate_console_live_clients").increment(1.0);
    let stream =
        futures::StreamExt::take_until(live_stream(rx, recent, slot), state.shutdown.clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// Decrements the live-clients gauge when a page's stream ends.
struct Following(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for Following {
    fn drop(&mut self) {
        metrics::gauge!("tollgate_console_live_clients").decrement(1.0);
    }
}

fn event_of(ev: &crate::live::LiveEvent) -> Event {
    Event::default().event(ev.kind).id(ev.id.clone()).data(serde_json::to_string(ev).unwrap_or_default())
}

fn live_stream(
    rx: tokio::sync::broadcast::Receiver<Arc<crate::live::LiveEvent>>,
    recent: Vec<Arc<crate::live::LiveEvent>>,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = (rx, recent.into_iter(), Following(slot));
    futures::stream::unfold(state, |(mut rx, mut recent, guard)| async move {
        if let Some(ev) = recent.next() {
            return Some((Ok(event_of(&ev)), (rx, recent, guard)));
        }
        match rx.recv().await {
            Ok(ev) => Some((Ok(event_of(&ev)), (rx, recent, guard))),
            Err(RecvError::Lagged(n)) => {
                metrics::counter!("tollgate_console_live_lagged_total").increment(n);
                let ev = Event::default().event("lagged").data(n.to_string());
                Some((Ok(ev), (rx, recent, guard)))
            }
            Err(RecvError::Closed) => None,
        }
    })
}

/// A failure mode's report, the column its chart draws, and how that column prints.
struct Mode {
    id: &'static str,
    heading: &'static str,
    what: &'static str,
    which: Which,
    chart: &'static str,
    marker: Option<(f64, String)>,
}

fn modes() -> Vec<Mode> {
    vec![
        Mode {
            id: "frontier-share",
            heading: "Frontier-model share per workflow",
            what: "The share of each workflow's cost spent on frontier models (price card tier).",
            which: Which::FrontierShare(report::DEFAULT_FRONTIER_SHARE),
            chart: "frontier_share",
            marker: Some((report::DEFAULT_FRONTIER_SHARE, format!("flag above {}", report::DEFAULT_FRONTIER_SHARE))),
        },
        Mode {
            id: "context-stuffing",
            heading: "Context stuffing",
            what: "Average prompt tokens (input with cache reads and writes) per successful request, per workflow.",
            which: Which::ContextStuffing(report::DEFAULT_STUFFING_TOKENS),
            chart: "avg_prompt_tokens",
            marker: Some((
                report::DEFAULT_STUFFING_TOKENS as f64,
                format!("flag above {}", report::DEFAULT_STUFFING_TOKENS),
            )),
        },
        Mode {
            id: "loops",
            heading: "Agent loops: top sessions against their workflow's p95",
            what: "Session-hours whose tokens are above k × the p95 session-hour of their workflow.",
            which: Which::Loops(report::DEFAULT_LOOP_K),
            chart: "ratio_to_p95",
            marker: Some((report::DEFAULT_LOOP_K, format!("k = {}", report::DEFAULT_LOOP_K))),
        },
        Mode {
            id: "drift",
            heading: "Tokenizer drift",
            what: "Provider prompt tokens per reference (tiktoken) token, per model version, against the version before.",
            which: Which::Drift(report::DEFAULT_DRIFT),
            chart: "token_ratio",
            marker: None,
        },
        Mode {
            id: "untagged",
            heading: "Untagged spend",
            what: "Spend without a project, team or cost centre, by what is missing.",
            which: Which::Untagged,
            chart: "cost_usd",
            marker: None,
        },
    ]
}

fn chart_of(out: &Output, id: &str, caption: &str, col: &str, marker: Option<(f64, &str)>) -> String {
    let Some(c) = html::column(out, col) else { return String::new() };
    let flag = html::column(out, "flagged");
    let bars: Vec<Bar> = out
        .rows
        .iter()
        .take(20)
        .map(|row| Bar {
            label: html::row_label(out, row),
            value: row.get(c).map_or(0.0, html::magnitude),
            text: row.get(c).map(|cell| out.text(c, cell)).unwrap_or_default(),
            flagged: flag.and_then(|f| row.get(f)).is_some_and(|x| *x == Cell::Flag(true)),
        })
        .collect();
    html::hbars(id, caption, &bars, marker)
}

async fn failure_modes(State(state): Shared, Query(p): Query<Params>) -> Response {
    let period = match p.period() {
        Ok(period) => period,
        Err(e) => return error_page("/failure-modes", "Failure modes", &e),
    };
    let mut body = period_form("/failure-modes", &p, "");
    match state.reporter.frontier_models().await {
        Ok(0) => body.push_str(
            "<p class=\"note\" id=\"no-frontier\">No model is marked frontier in ClickHouse, so every frontier share reads 0: \
             run the meter with a price card that sets <code>tier: frontier</code>.</p>",
        ),
        Ok(_) => {}
        Err(e) => return error_page("/failure-modes", "Failure modes", &e),
    }
    let mut first = true;
    for m in modes() {
        let out = match state.reporter.output(&m.which, period).await {
            Ok(out) => out,
            Err(e) => return error_page("/failure-modes", "Failure modes", &e),
        };
        if first {
            body.push_str(&period_line(&out));
            first = false;
        }
        let csv = format!("/csv/{}?{}", m.id, p.query(&[]));
        let _ = write!(
            body,
            "<section id=\"{id}\"><h2>{h}</h2><p class=\"hint\">{what}</p>{chart}\
             <p class=\"export\"><a href=\"{csv}\" download>Export CSV</a></p>{table}</section>",
            id = m.id,
            h = esc(m.heading),
            what = esc(m.what),
            chart = chart_of(
                &out,
                &format!("{}-chart", m.id),
                &out.title,
                m.chart,
                m.marker.as_ref().map(|(v, t)| (*v, t.as_str()))
            ),
            csv = esc(&csv),
            table = html::report_table(&out, &format!("{}-table", m.id)),
        );
    }
    Html(page("/failure-modes", "Failure modes", &body, &[])).into_response()
}

const OUTCOME_GROUPS: [(&str, &str); 5] = [
    ("team", "Team"),
    ("workflow", "Workflow"),
    ("project", "Project"),
    ("user", "User"),
    ("cost-center", "Cost centre"),
];

async fn outcomes(State(state): Shared, Query(p): Query<Params>) -> Response {
    match outcomes_body(&state, &p).await {
        Ok(body) => Html(page("/outcomes", "Outcomes per dollar", &body, &[])).into_response(),
        Err(e) => error_page("/outcomes", "Outcomes per dollar", &e),
    }
}

async fn outcomes_body(state: &AppState, p: &Params) -> Result<String, ReportError> {
    let period = p.period()?;
    let by = p.dimension(Dimension::Team)?;
    let kinds = state.reporter.outcome_kinds(&period).await?;
    let kind = Params::nonempty(&p.kind).map(str::to_owned).or_else(|| kinds.first().cloned());
    let options: Vec<(&str, &str)> = kinds.iter().map(|k| (k.as_str(), k.as_str())).collect();
    let controls = format!(
        "{}{}",
        if options.is_empty() {
            String::new()
        } else {
            select("kind", "Outcome", &options, kind.as_deref().unwrap_or(""))
        },
        select("by", "By", &OUTCOME_GROUPS, by.name())
    );
    let mut body = period_form("/outcomes", p, &controls);
    let Some(kind) = kind else {
        body.push_str(
            "<p class=\"empty\" id=\"no-outcomes\">No outcome was posted in this period. Post them to the ingress \
             (<code>POST /v1/outcomes</code>) with the sessions or traces that produced them.</p>",
        );
        return Ok(body);
    };
    let out = state.reporter.output(&Which::CostPerOutcome { kind: kind.clone(), by }, period).await?;
    body.push_str(&period_line(&out));
    body.push_str(&chart_of(
        &out,
        "cost-per-outcome-chart",
        &format!("cost per {kind} outcome, USD"),
        "cost_per_outcome_usd",
        None,
    ));
    body.push_str(&chart_of(
        &out,
        "no-outcome-chart",
        "spend that produced no outcome of this kind, USD",
        "no_outcome_cost_usd",
        None,
    ));
    let csv = format!("/csv/cost-per-outcome?{}", p.query(&[("kind", &kind), ("by", by.name())]));
    let _ = write!(body, "<p class=\"export\"><a id=\"csv\" href=\"{}\" download>Export CSV</a></p>", esc(&csv));
    body.push_str(&html::report_table(&out, "outcomes-table"));
    body.push_str(
        "<p class=\"hint\">An outcome takes the spend of the sessions and traces it names, in its project and group; \
         one that names neither takes its workflow's spend. The README says how in full.</p>",
    );
    Ok(body)
}

/// `/csv/{report}`: the report as `tollgate-meter report … --format csv` prints it.
async fn csv(State(state): Shared, Path(name): Path<String>, Query(p): Query<Params>, _h: HeaderMap) -> Response {
    let which = match name.as_str() {
        "chargeback" => p.dimension(Dimension::Project).map(|d| Which::Chargeback(vec![d])),
        "cost-per-outcome" => match Params::nonempty(&p.kind) {
            Some(kind) => p.dimension(Dimension::Team).map(|by| Which::CostPerOutcome { kind: kind.to_owned(), by }),
            None => Err(ReportError::Argument("cost-per-outcome needs kind=".into())),
        },
        other => match modes().into_iter().find(|m| m.id == other) {
            Some(m) => Ok(m.which),
            None => return (StatusCode::NOT_FOUND, format!("no report called {other:?}\n")).into_response(),
        },
    };
    let result = match (which, p.period()) {
        (Ok(which), Ok(period)) => {
            state.reporter.output(&which, period).await.and_then(|o| o.render(Format::Csv).map(|t| (o, t)))
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match result {
        Ok((out, text)) => {
            let file = format!("{}-{}.csv", out.name, period_slug(&p));
            (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                    (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file}\"")),
                ],
                text,
            )
                .into_response()
        }
        Err(e @ ReportError::ClickHouse(_)) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// A file-name-safe name of the period.
fn period_slug(p: &Params) -> String {
    let raw = match Params::nonempty(&p.month) {
        Some(m) => m.to_owned(),
        None => {
            format!("{}_{}", Params::nonempty(&p.from).unwrap_or("start"), Params::nonempty(&p.to).unwrap_or("now"))
        }
    };
    raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn login_only_sends_people_to_this_console() {
        assert_eq!(local_path(Some("/budgets?x=1")), "/budgets?x=1");
        assert_eq!(local_path(Some("//evil.example/")), "/spend");
        assert_eq!(local_path(Some("https://evil.example/")), "/spend");
        assert_eq!(local_path(Some("/\\evil.example")), "/spend");
        assert_eq!(local_path(Some("/\t/evil.example")), "/spend");
        assert_eq!(local_path(Some("/\n/evil.example")), "/spend");
        assert_eq!(local_path(Some("/ /evil.example")), "/spend");
        assert_eq!(local_path(Some("/spend?by=team&month=2026-12")), "/spend?by=team&month=2026-12");
        assert_eq!(local_path(None), "/spend");
    }

    #[test]
    fn a_month_has_every_day_and_a_year_every_month() {
        let m = Period::month("2026-02").unwrap();
        let days = every_bucket(&m, Step::Day).unwrap();
        assert_eq!((days.len(), days[0].as_str(), days[27].as_str()), (28, "2026-02-01", "2026-02-28"));
        let y = Period::between(Some("2026-01-01"), Some("2027-01-01")).unwrap();
        let months = every_bucket(&y, Step::Month).unwrap();
        assert_eq!((months.len(), months[11].as_str()), (12, "2026-12-01"));
        assert!(every_bucket(&Period::between(Some("2026-01-01"), None).unwrap(), Step::Day).is_none());
        assert!(every_bucket(&Period::between(Some("2020-01-01"), Some("2026-01-01")).unwrap(), Step::Day).is_none());
        assert_eq!(
            every_bucket(&Period::between(Some("2020-01-01"), Some("2026-01-01")).unwrap(), Step::Month).unwrap().len(),
            72
        );
    }

    #[test]
    fn the_chart_keeps_the_largest_groups_and_sums_the_rest() {
        let rows: Vec<SeriesRow> = (0..10)
            .map(|i| SeriesRow { bucket: "2026-02-01".into(), keys: vec![format!("g{i}")], cost_nanos: 100 - i })
            .collect();
        let (buckets, lines) = spend_series(&rows, &Period::month("2026-02").unwrap(), Step::Day);
        assert_eq!(buckets.len(), 28);
        assert_eq!(lines.len(), SERIES_SHOWN + 1);
        assert_eq!(lines[0], ("g0".to_owned(), [vec![100], vec![0; 27]].concat()));
        assert_eq!(lines[SERIES_SHOWN].1[0], 93 + 92 + 91);
        let total: i64 = lines.iter().map(|l| l.1.iter().sum::<i64>()).sum();
        assert_eq!(total, rows.iter().map(|r| r.cost_nanos).sum::<i64>());
    }
}
