//! Policy hot reload: watches a policy directory and hands out each new valid policy.
//!
//! [`PolicyWatch::spawn`] returns a `watch::Receiver<Arc<Policy>>` that always holds a valid
//! policy: the initial one, then each one loaded after a change. A reload is tried on SIGHUP and
//! whenever a file of the directory changes (every file's name, size and modification time, and
//! the bytes of every `*.yaml`/`*.yml`, are compared once a second; a change is loaded once the
//! directory has stayed the same for a moment, so a file caught half-written is not reported).
//! A directory that loads with errors changes nothing: the current policy stays, every error is
//! logged with its file, line and field, and `tollgate_policy_reloads_total{outcome="invalid"}`
//! counts the attempt. A policy equal to the current one is not sent again.
//!
//! Receivers swap what they build from a policy in one step (the ingress keeps routing, keys,
//! prices and rules in one `ArcSwap`), so no request sees half of one policy and half of the next.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::policy::{Policy, PolicyErrors};
use tracing::{debug, error, info, warn};

/// How a [`PolicyWatch`] notices changes.
#[derive(Debug, Clone)]
pub struct ReloadOptions {
    /// How often the directory is compared with what was last loaded; `None`: never (SIGHUP only).
    pub poll: Option<Duration>,
    /// Reload on SIGHUP (the process-wide signal; every watch in the process reloads).
    pub sighup: bool,
    /// How long the directory must stay unchanged before a change is loaded.
    pub settle: Duration,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self { poll: Some(Duration::from_secs(1)), sighup: true, settle: Duration::from_millis(200) }
    }
}

/// Watches a policy directory; see the module documentation.
pub struct PolicyWatch;

impl PolicyWatch {
    /// Watches `dir` with the default options (a look every second, and SIGHUP) until
    /// `shutdown`. `initial` is the policy already loaded from `dir`.
    pub fn spawn(dir: PathBuf, initial: Policy, shutdown: CancellationToken) -> watch::Receiver<Arc<Policy>> {
        Self::spawn_with(dir, initial, shutdown, ReloadOptions::default())
    }

    pub fn spawn_with(
        dir: PathBuf,
        initial: Policy,
        shutdown: CancellationToken,
        opts: ReloadOptions,
    ) -> watch::Receiver<Arc<Policy>> {
        describe();
        gauge!("tollgate_policy_valid").set(1.0);
        let (tx, rx) = watch::channel(Arc::new(initial));
        // Listening for SIGHUP and the directory's fingerprint are taken before this returns: a
        // SIGHUP or a change right after start is not lost to the task not having run yet.
        let hup = if opts.sighup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGHUP; policy reloads on file changes only");
                    None
                }
            }
        } else {
            None
        };
        let seen = fingerprint_now(&dir);
        tokio::spawn(watch_dir(dir, tx, shutdown, opts, hup, seen));
        rx
    }
}

pub fn describe() {
    describe_counter!(
        "tollgate_policy_reloads_total",
        "Policy reloads tried, by outcome: applied, unchanged (equal to the current one), invalid (kept the current one)"
    );
    describe_gauge!(
        "tollgate_policy_valid",
        "1 when the policy directory as it is now loaded; 0 after a rejected reload"
    );
    describe_gauge!("tollgate_policy_errors", "Errors found by the last reload attempt (0 when it loaded)");
}

/// `check-config`: the policy directory's summary when it is valid, else every error (each
/// displays as `file:line: field: message`).
pub fn check(dir: &Path) -> Result<String, PolicyErrors> {
    let p = Policy::load_dir(dir)?;
    let kind = |k: tollgate_schemas::decision::RuleKind| p.rules.iter().filter(|r| r.kind == k).count();
    let card = p.price_card.as_ref().map_or_else(
        || "no price card".to_owned(),
        |c| format!("price card {:?} ({} prices)", c.version, c.prices.len()),
    );
    Ok(format!(
        "policy in {} is valid: {} providers, {} virtual models, {} API keys, {} rules ({} rate limits, {} budgets, {} guards), {}, {} alert channels",
        dir.display(),
        p.providers.len(),
        p.virtual_models.len(),
        p.api_keys.len(),
        p.rules.len(),
        kind(tollgate_schemas::decision::RuleKind::RateLimit),
        kind(tollgate_schemas::decision::RuleKind::Budget),
        kind(tollgate_schemas::decision::RuleKind::Guard),
        card,
        p.alert_channels.len(),
    ))
}

/// Loads `dir` as a reload would; on errors, logs each with its file, line and field.
pub async fn load(dir: &Path) -> Result<Policy, PolicyErrors> {
    let d = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || Policy::load_dir(&d)).await {
        Ok(r) => r,
        Err(e) => Err(PolicyErrors(vec![tollgate_schemas::policy::PolicyError {
            file: dir.to_path_buf(),
            line: 0,
            field: String::new(),
            message: format!("loading task failed: {e}"),
        }])),
    }
}

async fn watch_dir(
    dir: PathBuf,
    tx: watch::Sender<Arc<Policy>>,
    shutdown: CancellationToken,
    opts: ReloadOptions,
    mut hup: Option<tokio::signal::unix::Signal>,
    mut seen: u64,
) {
    // Watching for changes: the directory may have changed since `initial` was loaded from it.
    // (With SIGHUP alone, changes wait for the signal, those included.)
    if opts.poll.is_some() {
        reload(&dir, &tx, false).await;
    }
    let mut tick = opts.poll.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    info!(dir = %dir.display(), poll = ?opts.poll, sighup = hup.is_some(), "watching the policy directory");
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(()) = async { match hup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => true,
            _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => false,
        };
        let now = fingerprint(&dir).await;
        if !forced && now == seen {
            continue;
        }
        // Let a write in progress finish: load once the directory holds still.
        let mut settled = now;
        for _ in 0..25 {
            tokio::time::sleep(opts.settle).await;
            let again = fingerprint(&dir).await;
            if again == settled {
                break;
            }
            settled = again;
        }
        seen = settled;
        if forced {
            info!(dir = %dir.display(), "SIGHUP: reloading the policy");
        }
        reload(&dir, &tx, true).await;
    }
    debug!(dir = %dir.display(), "policy watch stopped");
}

/// Loads `dir` and sends it when it is valid and differs from the current policy.
async fn reload(dir: &Path, tx: &watch::Sender<Arc<Policy>>, count_unchanged: bool) {
    let loaded = load(dir).await.and_then(|p| {
        // Opening a running gateway to anyone takes a restart, never a file change.
        if p.api_keys.is_empty() && !tx.borrow().api_keys.is_empty() {
            return Err(PolicyErrors(vec![tollgate_schemas::policy::PolicyError {
                file: dir.to_path_buf(),
                line: 0,
                field: "tollgate-api-keys".into(),
                message: "the new policy lists no API key: a reload may not open a running gateway to \
                          anonymous callers (restart the service to do that)"
                    .into(),
            }]));
        }
        Ok(p)
    });
    match loaded {
        Ok(p) => {
            gauge!("tollgate_policy_valid").set(1.0);
            gauge!("tollgate_policy_errors").set(0.0);
            if **tx.borrow() == p {
                if count_unchanged {
                    counter!("tollgate_policy_reloads_total", "outcome" => "unchanged").increment(1);
                }
                debug!(dir = %dir.display(), "policy unchanged");
                return;
            }
            info!(
                dir = %dir.display(),
                virtual_models = p.virtual_models.len(),
                rules = p.rules.len(),
                price_card = p.price_card.as_ref().map_or("", |c| c.version.as_str()),
                "policy reloaded"
            );
            counter!("tollgate_policy_reloads_total", "outcome" => "applied").increment(1);
            tx.send_replace(Arc::new(p));
        }
        Err(PolicyErrors(errors)) => {
            gauge!("tollgate_policy_valid").set(0.0);
            gauge!("tollgate_policy_errors").set(errors.len() as f64);
            counter!("tollgate_policy_reloads_total", "outcome" => "invalid").increment(1);
            for e in &errors {
                error!(
                    file = %e.file.display(),
                    line = e.line,
                    field = %e.field,
                    message = %e.message,
                    "policy reload rejected; keeping the current policy"
                );
            }
        }
    }
}

/// What the directory holds now: every file's name, size and modification time, and the
/// bytes of the policy files (a same-size rewrite within the clock's resolution still shows).
async fn fingerprint(dir: &Path) -> u64 {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || fingerprint_now(&d)).await.unwrap_or(0)
}

/// [`fingerprint`], on the calling thread.
fn fingerprint_now(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for f in files {
                f.hash(&mut h);
                if let Ok(md) = std::fs::metadata(&f) {
                    md.len().hash(&mut h);
                    md.modified().ok().hash(&mut h);
                }
                if matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    std::fs::read(&f).ok().hash(&mut h);
                }
            }
        }
        Err(e) => e.kind().hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const PROVIDERS: &str =
        "type: tollgate-providers\nproviders:\n  - {name: p, kind: openai, base_url: \"http://127.0.0.1:1/v1\"}\n";

    fn model(name: &str) -> String {
        format!(
            "name: {name}\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {{id: a, priority: 1, target: {{provider: p, model: m}}}}\n---\ntype: tollgate-price-card\nversion: v1\nprices: []\nunpriced_ok: [p/m]\n"
        )
    }

    const KEYS: &str = "type: tollgate-api-keys\nkeys:\n  - {id: k, sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, subject: {type: team, id: t}, models: [\"*\"]}\n";

    fn opts() -> ReloadOptions {
        ReloadOptions { poll: Some(Duration::from_millis(50)), sighup: false, settle: Duration::from_millis(20) }
    }

    async fn next(rx: &mut watch::Receiver<Arc<Policy>>) -> Option<Arc<Policy>> {
        match tokio::time::timeout(Duration::from_secs(3), rx.changed()).await {
            Ok(Ok(())) => Some(rx.borrow_and_update().clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_valid_change_is_sent_an_invalid_one_keeps_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("providers.yaml"), PROVIDERS).unwrap();
        std::fs::write(dir.path().join("models.yaml"), model("one")).unwrap();
        std::fs::write(dir.path().join("keys.yaml"), KEYS).unwrap();
        let initial = Policy::load_dir(dir.path()).unwrap();
        let stop = CancellationToken::new();
        let mut rx = PolicyWatch::spawn_with(dir.path().to_path_buf(), initial, stop.clone(), opts());
        assert!(rx.borrow().virtual_models.contains_key("one"));

        std::fs::write(dir.path().join("models.yaml"), model("two")).unwrap();
        let p = next(&mut rx).await.expect("the valid change arrives");
        assert!(p.virtual_models.contains_key("two") && !p.virtual_models.contains_key("one"));

        std::fs::write(
            dir.path().join("models.yaml"),
            "name: three\ntype: gateway-load-balancing-config\nrule_typo: x\n",
        )
        .unwrap();
        assert!(next(&mut rx).await.is_none(), "an invalid directory sends nothing");
        assert!(rx.borrow().virtual_models.contains_key("two"), "the last valid policy stays");

        // Touching a file without changing the policy sends nothing either.
        std::fs::write(dir.path().join("models.yaml"), model("two")).unwrap();
        std::fs::write(dir.path().join("README.txt"), "notes").unwrap();
        assert!(next(&mut rx).await.is_none(), "an equal policy is not sent again");

        std::fs::write(dir.path().join("models.yaml"), model("four")).unwrap();
        assert!(next(&mut rx).await.expect("fixed").virtual_models.contains_key("four"));

        // A valid policy that opens the gateway is still refused as a reload.
        std::fs::write(dir.path().join("keys.yaml"), "type: tollgate-api-keys\nallow_anonymous: true\n").unwrap();
        assert!(next(&mut rx).await.is_none(), "a reload may not remove every key");
        assert_eq!(rx.borrow().api_keys.len(), 1, "the keyed policy stays");
        stop.cancel();
    }
}
