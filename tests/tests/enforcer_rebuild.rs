//! The enforcer rebuilds what it can from the meter's minute rollups and the rest from the raw
//! events. Against the real broker, meter and ClickHouse: both ways give every rule and scope the
//! same count, and so does a rebuild from earlier checkpoints followed by the events past them,
//! when window rows already cover some of those events (the meter writes its windows before its
//! checkpoint) and some events were re-sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tollgate_enforcer::engine::{Engine, Usage};
use tollgate_enforcer::rebuild::{self, Source};
use tollgate_schemas::policy::Policy;
use tollgate_schemas::usage::{Envelope, Status, UsageEvent};

const MINUTE_US: i64 = 60_000_000;

/// Rules beside the reference's: requests per key in an hour, tokens per team in two minutes
/// (two-second buckets: read raw), a day in a half-hour time zone (calendar, by quarter-hour).
fn write_extra_rules(dir: &std::path::Path) {
    let keys = (1..=3)
        .map(|k| {
            format!(
                "  - id: k{k}\n    sha256: {}\n    subject: {{type: user, id: u{k}}}\n    models: [vm-openai]\n",
                format!("{k}").repeat(64)
            )
        })
        .collect::<String>();
    std::fs::write(dir.join("api-keys.yaml"), format!("type: tollgate-api-keys\nallow_anonymous: true\nkeys:\n{keys}"))
        .unwrap();
    std::fs::write(
        dir.join("extra-limits.yaml"),
        "name: rebuild-extra\ntype: gateway-rate-limit-config\nrules:\n\
         - id: per-key-requests\n  limit: {requests: 1000000, window: 1h, scope: api_key}\n  on_breach: hard_block\n\
         - id: per-team-two-minutes\n  limit: {tokens: 1000000000, window: 2m, scope: team}\n  on_breach: hard_block\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("extra-budgets.yaml"),
        "name: rebuild-days\ntype: gateway-budget-config\nbudgets:\n\
         - id: search-daily-kolkata\n  scope: {metadata: {X-TFY-Project: search}}\n  ceiling_usd: 100000\n  window: daily\n  timezone: Asia/Kolkata\n  on_exceed: hard_block\n",
    )
    .unwrap();
}

/// Event `i`, ended at `ended_us`: several projects, teams, users, keys, sessions and
/// environments; one in 13 refused (no tokens, no cost), one in 7 a provider error.
fn event(i: u64, ended_us: i64) -> UsageEvent {
    let tokens = 200 + (i * 7919 % 4000) as i64;
    let rejected = i % 13 == 0;
    UsageEvent {
        started_at_us: ended_us - 300_000,
        envelope: Envelope {
            project: Some(["search", "support", "intern-sandbox", "platform-search"][(i % 4) as usize].into()),
            team: Some(["data", "platform"][(i % 2) as usize].into()),
            user_id: Some(format!("u{}", i % 5)),
            session_id: Some(format!("s{}", i % 50)),
            workflow_tag: Some(["classify-intent", "summarize"][(i % 3 == 0) as usize].into()),
            environment: Some(["production", "staging"][(i % 6 == 0) as usize].into()),
            ..Default::default()
        },
        api_key_id: Some(format!("k{}", 1 + i % 3)),
        provider: "anthropic".into(),
        model: ["claude-haiku-4-5", "claude-opus-4-7"][(i % 4 == 1) as usize].into(),
        status: if rejected {
            Status::Rejected
        } else if i % 7 == 0 {
            Status::ProviderError
        } else {
            Status::Ok
        },
        input_tokens: if rejected { 0 } else { tokens },
        output_tokens: if rejected { 0 } else { tokens / 4 },
        cost_nanos: if rejected { 0 } else { tokens * 3000 },
        ..UsageEvent::example(format!("rebuild-{i:06}"), None, ended_us)
    }
}

/// Every live rule and scope with its count.
fn counts(engine: &mut Engine, now: i64) -> Vec<(String, String, i64)> {
    engine.snapshot(now)
}

/// The records of `topic` from `from` up to `to` (partition → offset), with their positions.
async fn records(topic: &str, from: &BTreeMap<i32, i64>, to: &BTreeMap<i32, i64>) -> Vec<(UsageEvent, (i32, i64))> {
    let (topic, from, to) = (topic.to_owned(), from.clone(), to.clone());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("group.id", unique("rebuild"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut want = 0;
        for (p, o) in &from {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(*o)).unwrap();
            want += to[p] - o;
        }
        c.assign(&tpl).unwrap();
        let codec = UsageEvent::codec().unwrap();
        let mut out = Vec::new();
        while out.len() < usize::try_from(want).unwrap() {
            let m = c.poll(Duration::from_secs(30)).expect("the topic holds the records").unwrap();
            if m.offset() < to[&m.partition()] {
                out.push((codec.decode::<UsageEvent>(m.payload().unwrap()).unwrap(), (m.partition(), m.offset())));
            }
        }
        out.sort_by_key(|(_, at)| *at);
        out
    })
    .await
    .unwrap()
}

/// Rebuilds from `from`, then counts the records up to `to` as the enforcer does: each event at
/// its first copy (as `event_positions` has it), into the rules the rebuild did not count it in.
async fn rebuild_then_follow(
    ch: &clickhouse::Client,
    policy: &Arc<Policy>,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    to: &BTreeMap<i32, i64>,
    source: Source,
    now: i64,
) -> (Vec<(String, String, i64)>, usize) {
    let mut engine = Engine::new(Arc::clone(policy), 80);
    let (_, above) = rebuild::rebuild(ch, topic, from, &mut engine, now, source).await.unwrap();
    let covering = above.len();
    let recs = records(topic, from, to).await;
    let ids: Vec<&str> = recs.iter().map(|(ev, _)| ev.event_id.as_str()).collect();
    let first = tollgate_store::first_positions(ch, topic, &ids).await.unwrap();
    for (ev, at) in &recs {
        if first[&ev.event_id] != *at {
            continue; // a re-sent copy
        }
        if let Some(u) = Usage::of(ev) {
            rebuild::observe_consumed(&mut engine, &u, above.counted_event(ev, *at), now);
        }
    }
    (counts(&mut engine, now), covering)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rollups_and_the_raw_events_rebuild_the_same_counts() {
    let dir = tempfile::tempdir().unwrap();
    write_reference_rules(dir.path(), "127.0.0.1:9".parse().unwrap());
    write_extra_rules(dir.path());
    let policy = Arc::new(Policy::load_dir(dir.path()).unwrap());
    assert!(policy.rules.iter().any(rebuild::from_rollups) && !policy.rules.iter().all(rebuild::from_rollups));
    let t = topics("enf_rebuild").await;
    let meter = start_meter(meter_config(&t.usage, &t.db)).await;

    // From 40 days ago (before the month and the budgets' windows) to now: most in the last two
    // days, the last few hundred in the last ten minutes. Then fresh ones, and a tenth of the
    // first re-sent (same id and key, so the same partition, later offsets).
    let now = now_us();
    let first: Vec<UsageEvent> = (0..2400u64)
        .map(|i| {
            let ago = match i % 10 {
                0 => (i as i64 * 1_447) % (40 * 1440) * MINUTE_US,
                1..=3 => (i as i64 * 7) % (2 * 1440) * MINUTE_US,
                _ => (i as i64 * 13) % 55 * MINUTE_US + (i as i64 % 59) * 1_000_000,
            };
            event(i, now - ago)
        })
        .collect();
    produce_usage(&t.usage, &first).await;
    // The copies last, so that the 60 last offsets of each partition, past the earlier
    // checkpoints below, are mostly copies whose first copy lies below them.
    let mut later: Vec<UsageEvent> = (2400..2800u64).map(|i| event(i, now - (i as i64 % 600) * 1_000_000)).collect();
    later.extend(first.iter().step_by(10).cloned());
    produce_usage(&t.usage, &later).await;
    meter_finished(&t.db, &t.usage).await;
    assert_windows_match_raw(&t.db).await;
    // Merged, `usage_events` keeps one copy of a re-sent event, the last: its first copy's row
    // below the checkpoints is gone, and the rebuild must still find the event.
    ch(&format!("OPTIMIZE TABLE {}.usage_events FINAL", t.db)).await;

    let client =
        tollgate_store::ClickHouseConfig { url: clickhouse_url(), database: t.db.clone(), user: None, password: None }
            .client();
    let checkpoints = tollgate_store::checkpoints(&client, &t.usage).await.unwrap();
    let now = now_us();

    let mut raw = Engine::new(Arc::clone(&policy), 80);
    let (r, above) = rebuild::rebuild(&client, &t.usage, &checkpoints, &mut raw, now, Source::Raw).await.unwrap();
    assert!(above.is_empty() && r.rollup_buckets == 0 && r.raw_requests > 2000, "{r:?}");
    let raw = counts(&mut raw, now);
    let mut best = Engine::new(Arc::clone(&policy), 80);
    let (r, above) = rebuild::rebuild(&client, &t.usage, &checkpoints, &mut best, now, Source::Best).await.unwrap();
    assert!(above.is_empty(), "the meter has checkpointed everything its windows hold");
    assert!(r.rollup_requests > 2000 && r.raw_requests > 0, "{r:?}");
    let best = counts(&mut best, now);
    for rule in &policy.rules {
        let kind = rule.kind;
        if kind != tollgate_schemas::decision::RuleKind::Guard {
            assert!(raw.iter().any(|(id, _, v)| *id == rule.id && *v > 0), "{} counted nothing", rule.id);
        }
    }
    assert_eq!(best, raw, "the rollups and the raw events rebuild the same counts");

    // As if the enforcer had started when the checkpoints were 60 events lower on each
    // partition: the windows then cover events past them.
    let earlier: BTreeMap<i32, i64> = checkpoints.iter().map(|(p, o)| (*p, (o - 60).max(0))).collect();
    let (resumed, covering) =
        rebuild_then_follow(&client, &policy, &t.usage, &earlier, &checkpoints, Source::Best, now).await;
    assert!(covering > 0, "window rows cover events past the earlier checkpoints");
    assert_eq!(resumed, raw, "rollups up to earlier checkpoints, then the events past them");
    let (resumed_raw, _) =
        rebuild_then_follow(&client, &policy, &t.usage, &earlier, &checkpoints, Source::Raw, now).await;
    assert_eq!(resumed_raw, raw, "raw events up to earlier checkpoints, then the events past them");
    drop(meter);
}
