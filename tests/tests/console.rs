//! The console end to end in headless Chromium (Debian's `chromium`, driven through
//! `chromedriver` over WebDriver) against the real stack: usage seeded through the ingress and
//! metered into ClickHouse, the enforcer deciding on the reference's rules, outcomes posted to the
//! ingress. The pages load behind the token with the figures ClickHouse holds, the CSV equals
//! `tollgate-meter report`, and a breach decided while the breaches page is open appears on it
//! without a reload.
//!
//! With `TOLLGATE_CONSOLE_SCREENSHOTS=<dir>` it also saves a PNG of each page there (the README's
//! screenshots).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::procs::{KillOnDrop, free_port};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_meter::report::{Dimension, Period, Reporter, SeriesRow, Step, format_usd};

const TOKEN: &str = "console-test-token-0123456789";

fn program(env: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{} is missing: install Debian's chromium and chromium-driver (compose/local/install.sh does), or set {env}",
        path.display()
    );
    path
}

/// chromedriver on a port of its own, and a headless Chromium session with a fresh profile.
struct Browser {
    client: Client,
    _driver: Group,
    _profile: tempfile::TempDir,
}

/// chromedriver in a process group of its own, with the Chromium it starts: all of it is killed
/// when the test ends, even by a panic (killing chromedriver alone would leave its browser
/// running).
struct Group(KillOnDrop);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
    }
}

async fn browser() -> Browser {
    let chromium = program("TOLLGATE_TEST_CHROMIUM", "/usr/bin/chromium");
    let driver_bin = program("TOLLGATE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver");
    let profile = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
    let driver = Group(KillOnDrop(
        std::os::unix::process::CommandExt::process_group(
            std::process::Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdout(log.try_clone().unwrap())
                .stderr(log),
            0,
        )
        .spawn()
        .expect("start chromedriver"),
    ));
    let up = eventually(Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
    assert!(up, "chromedriver did not listen on {port}");
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                "--window-size=1360,1000", format!("--user-data-dir={}", profile.path().join("profile").display()),
            ],
        },
    });
    let serde_json::Value::Object(caps) = caps else { unreachable!() };
    let client = ClientBuilder::native()
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session through chromedriver");
    Browser { client, _driver: driver, _profile: profile }
}

async fn ask(http: &reqwest::Client, gw: SocketAddr, model: &str, headers: &[(&str, &str)], directive: &str) -> u16 {
    let mut req = http.post(format!("http://{gw}/v1/chat/completions")).json(&json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("hello\n#mock {directive}")}],
    }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn text_of(c: &Client, css: &str) -> String {
    match c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(css)).await {
        Ok(el) => el.text().await.unwrap(),
        Err(e) => {
            panic!("no {css} on {}: {e}\n{}", c.current_url().await.unwrap(), c.source().await.unwrap_or_default())
        }
    }
}

/// This UTC month, `2026-12`.
fn jiff_month() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    tollgate_meter::report::fmt_time(secs)[..7].to_owned()
}

async fn sql_i64(sql: &str) -> i64 {
    ch(sql).await.trim().parse().unwrap_or_else(|_| panic!("not a number from {sql}"))
}

async fn screenshot(c: &Client, name: &str) {
    let Some(dir) = std::env::var_os("TOLLGATE_CONSOLE_SCREENSHOTS") else { return };
    let png = c.screenshot().await.unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_what_the_stack_holds_and_breaches_as_they_happen() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), mock.addr);
    let t = topics("console").await;
    let outcomes_topic = unique("console_outcomes");
    create_topic(&outcomes_topic, 1).await;
    let mut mc = meter_config(&t.usage, &t.db);
    mc.history = Some((t.breaches.clone(), t.alerts.clone()));
    mc.outcomes_topic = Some(outcomes_topic.clone());
    let meter = start_meter(mc).await;
    let enforcer = start_enforcer(enforcer_config(dir.path(), &t.usage, &t.breaches, &t.alerts, &t.db)).await;
    let spool = tempfile::tempdir().unwrap();
    let mut ic = ingress_config(dir.path(), &kafka_brokers(), &t.usage, spool.path());
    ic.breaches_topic = t.breaches.clone();
    ic.outcomes_topic = outcomes_topic.clone();
    let ingress = start_ingress_with(ic).await;
    let http = reqwest::Client::new();
    let gw = ingress.addr;

    // The month every page shows, fixed before seeding (a page left to default to "this month"
    // could turn over between the seeding and the look).
    let month = jiff_month();
    // Seed: platform-search on the frontier model (its monthly budget), growth on the cheap one,
    // and spend without a team (untagged).
    let mut sent = 0;
    for i in 0..6 {
        let session = format!("search-{}", i % 2);
        let h = [
            ("X-TFY-Project", "platform-search"),
            ("X-TFY-Team", "search"),
            ("X-TFY-Workflow-Tag", "rank"),
            ("X-TFY-Session-ID", session.as_str()),
        ];
        assert_eq!(ask(&http, gw, "vm-premium", &h, "prompt_tokens=100000 completion_tokens=2000").await, 200);
        sent += 1;
    }
    for i in 0..4 {
        let session = format!("growth-{i}");
        let h = [
            ("X-TFY-Project", "growth-bot"),
            ("X-TFY-Team", "growth"),
            ("X-TFY-Workflow-Tag", "summarise"),
            ("X-TFY-Session-ID", session.as_str()),
        ];
        assert_eq!(ask(&http, gw, "vm-openai", &h, "prompt_tokens=3000 completion_tokens=400").await, 200);
        sent += 1;
    }
    let h = [("X-TFY-Project", "scratch"), ("X-TFY-Session-ID", "scratch-1")];
    assert_eq!(ask(&http, gw, "vm-openai", &h, "prompt_tokens=1000 completion_tokens=10").await, 200);
    sent += 1;
    let outcome = json!({"id": "pr-1", "kind": "merged_pr", "session_ids": ["search-0"]});
    let resp = http
        .post(format!("http://{gw}/v1/outcomes"))
        .header("X-TFY-Project", "platform-search")
        .header("X-TFY-Team", "search")
        .header("X-TFY-Workflow-Tag", "rank")
        .json(&outcome)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{}", resp.text().await.unwrap());
    let db = &t.db;
    wait_for_count(&format!("SELECT count() FROM {db}.usage_events FINAL"), sent, Duration::from_secs(30)).await;
    wait_for_count(&format!("SELECT count() FROM {db}.outcome_events FINAL"), 1, Duration::from_secs(30)).await;

    // The model tiers the meter binary writes at start from its price card (`tier: frontier`).
    let ch_config =
        tollgate_store::ClickHouseConfig { url: clickhouse_url(), database: db.clone(), user: None, password: None };
    let card = tollgate_schemas::policy::Policy::load_dir(dir.path()).unwrap().price_card.unwrap();
    Reporter::new(&ch_config).unwrap().sync_model_tiers(&card).await.unwrap();

    // The console, in-process, on the test's topics and database.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console_addr = listener.local_addr().unwrap();
    let mut cc = tollgate_console::Config::new(ch_config.clone(), kafka_brokers(), TOKEN.into());
    cc.breaches_topic = t.breaches.clone();
    cc.alerts_topic = t.alerts.clone();
    cc.policy_dir = Some(dir.path().to_path_buf());
    let console_stop = CancellationToken::new();
    let console = tokio::spawn(tollgate_console::run(cc, listener, console_stop.clone()));
    let base = format!("http://{console_addr}");

    // Without the token: 401 for a program, the login form for a browser; a wrong token is 401.
    let r = http.get(format!("{base}/spend")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.get(format!("{base}/csv/chargeback")).bearer_auth("not-the-token-at-all").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirect.get(format!("{base}/budgets")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/login?next=%2Fbudgets");
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));

    let b = browser().await;
    let c = &b.client;

    // Logging in through the form lands on the page asked for.
    c.goto(&format!("{base}/spend?by=team&month={month}")).await.unwrap();
    let token_field = c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#token")).await.unwrap();
    screenshot(c, "login").await;
    token_field.send_keys("wrong-token-wrong-token").await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();
    assert!(text_of(c, "#login-error").await.contains("not the console token"));
    c.find(Locator::Css("#token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    c.find(Locator::Css("#login button")).await.unwrap().click().await.unwrap();

    // Spend by team: the table's cost per team is ClickHouse's, printed as the report prints it.
    let table = text_of(c, "#spend-table").await;
    for team in ["search", "growth"] {
        let cost = sql_i64(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL WHERE team = '{team}'")).await;
        assert!(cost > 0);
        assert!(table.contains(&format!("{team} ")) && table.contains(&format_usd(cost)), "{team} {cost}: {table}");
    }
    assert!(table.contains("(none)"), "spend without a team shows as (none): {table}");
    let bars = c.find_all(Locator::Css("#spend-chart rect")).await.unwrap();
    assert!(bars.len() >= 3, "a segment per team on the day, and the legend");
    screenshot(c, "spend").await;

    // The CSV the page links to is `tollgate-meter report --by team --format csv`, byte for byte.
    let href = c.find(Locator::Css("#csv")).await.unwrap().attr("href").await.unwrap().unwrap();
    let csv = http.get(format!("{base}{href}")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(csv.status().as_u16(), 200);
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(href.contains(&format!("month={month}")), "{href}");
    let report = std::process::Command::new(binary("tollgate-meter", "tollgate-meter"))
        .args(["report", "--by", "team", "--month", &month, "--format", "csv", "--clickhouse-url", &clickhouse_url()])
        .args(["--database", db])
        .output()
        .unwrap();
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    assert_eq!(csv, String::from_utf8(report.stdout).unwrap());

    // The chart's figures: read from the day rollups over a whole month, the same per day and team
    // as from the raw events (a period starting a second early is not tiled by any window).
    meter_finished(db, &t.usage).await;
    let reporter = Reporter::new(&ch_config).unwrap();
    let whole = Period::month(&month).unwrap();
    let unaligned = Period { from: whole.from.map(|f| f - 1), to: whole.to };
    assert!(whole.tiled_by().is_some() && unaligned.tiled_by().is_none());
    let flat = |rows: Vec<SeriesRow>| rows.into_iter().map(|r| (r.bucket, r.keys, r.cost_nanos)).collect::<Vec<_>>();
    for step in [Step::Day, Step::Month] {
        let rollups = flat(reporter.chargeback_series(&[Dimension::Team], &whole, step).await.unwrap());
        let raw = flat(reporter.chargeback_series(&[Dimension::Team], &unaligned, step).await.unwrap());
        assert!(!raw.is_empty());
        assert_eq!(rollups, raw, "{step:?}");
    }

    // Budgets: platform-search's monthly spend against $4000, with the 80% and 100% thresholds.
    c.goto(&format!("{base}/budgets")).await.unwrap();
    let spent = sql_i64(&format!(
        "SELECT sum(cost_nanos) FROM {db}.usage_events FINAL WHERE project = 'platform-search' AND status != 'rejected'"
    ))
    .await;
    let row = text_of(c, "#budget-platform-search-monthly tr[data-scope]").await;
    assert!(row.contains(&format!("${}", format_usd(spent))), "{row}");
    assert!(text_of(c, "#budget-platform-search-monthly .ceiling").await.contains("$4000.000000000"));
    let ticks = c.find_all(Locator::Css("#budget-platform-search-monthly svg.gauge line")).await.unwrap();
    assert_eq!(ticks.len(), 2, "one tick per alert threshold");
    let intern = text_of(c, "#budget-intern-sandbox-cap").await;
    assert!(intern.contains("X-TFY-Project=intern-sandbox $0.000000000 0.0%"), "{intern}");
    screenshot(c, "budgets").await;

    // The failure modes: rank runs wholly on the frontier model, flagged.
    c.goto(&format!("{base}/failure-modes?month={month}")).await.unwrap();
    let flagged = text_of(c, "#frontier-share-table tr.flagged").await;
    assert!(flagged.contains("rank") && flagged.contains("1.0000"), "{flagged}");
    for id in ["context-stuffing", "loops", "drift", "untagged"] {
        c.wait().at_most(Duration::from_secs(5)).for_element(Locator::Css(&format!("#{id}-table"))).await.unwrap();
    }
    assert!(text_of(c, "#context-stuffing-table tr.flagged").await.contains("rank"));
    assert!(text_of(c, "#untagged-table").await.contains("team,cost_center"));
    screenshot(c, "failure-modes").await;

    // Outcomes: one merged PR took session search-0's spend.
    c.goto(&format!("{base}/outcomes?kind=merged_pr&by=team&month={month}")).await.unwrap();
    let per_outcome =
        sql_i64(&format!("SELECT sum(cost_nanos) FROM {db}.usage_events FINAL WHERE session_id = 'search-0'")).await;
    let outcomes = text_of(c, "#outcomes-table").await;
    assert!(outcomes.contains(&format_usd(per_outcome)), "{per_outcome}: {outcomes}");
    screenshot(c, "outcomes").await;

    // Breaches: the page is open and following; a session loops past 200,000 tokens an hour, and
    // its breach appears without a reload.
    c.goto(&format!("{base}/breaches")).await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("body[data-live='open']")).await.unwrap();
    c.execute("window.__stillTheSamePage = 'yes'; return null;", vec![]).await.unwrap();
    let rule = "per-session-loop-guard";
    assert!(c.find(Locator::Css(&format!("#live-rows tr[data-rule='{rule}']"))).await.is_err());
    let looping = [("X-TFY-Project", "agents"), ("X-TFY-Session-ID", "loop-1"), ("X-TFY-Environment", "production")];
    let mut blocked = false;
    for _ in 0..40 {
        let status = ask(&http, gw, "vm-openai", &looping, "prompt_tokens=45000 completion_tokens=5000").await;
        if status == 429 {
            blocked = true;
            break;
        }
        assert_eq!(status, 200);
        if c.find(Locator::Css(&format!("#live-rows tr[data-state='breached'][data-rule='{rule}']"))).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let live = c
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(&format!("#live-rows tr[data-state='breached'][data-rule='{rule}']")))
        .await
        .unwrap_or_else(|e| panic!("the breach did not appear live (blocked: {blocked}): {e}"));
    let live_text = live.text().await.unwrap();
    assert!(live_text.contains("session:loop-1") && live_text.contains("200000 tokens"), "{live_text}");
    let same = c.execute("return window.__stillTheSamePage || null;", vec![]).await.unwrap();
    assert_eq!(same, Value::from("yes"), "the page was reloaded");
    screenshot(c, "breaches").await;
    // The history the meter keeps has it too, on the next load.
    wait_for_count(
        &format!("SELECT count() FROM {db}.breach_history FINAL WHERE rule_id = '{rule}'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    c.goto(&format!("{base}/breaches")).await.unwrap();
    assert!(text_of(c, "#breach-history").await.contains(rule));

    // Logging out ends the session: the next page asks for the token again.
    c.find(Locator::Css("form.logout button")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#token")).await.unwrap();
    c.goto(&format!("{base}/budgets")).await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#token")).await.unwrap();

    b.client.close().await.unwrap();
    console_stop.cancel();
    console.await.unwrap().unwrap();
    ingress.stop().await;
    enforcer.stop().await;
    meter.stop().await;
    mock.stop().await;
}
