//! Rollups exactly once under re-sends: an event id the ingress sends again (same id and key, a
//! later offset) adds nothing to `usage_windows` or `session_hours`, whether the copy comes in
//! the same batch, a later batch, or after a meter restart. After each fault every rollup is
//! compared with `usage_events FINAL`, and the duplicates are counted explicitly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use tollgate_schemas::usage::{Envelope, UsageEvent};

const EVENTS: i64 = 60;

fn event(i: i64, now_us: i64) -> UsageEvent {
    UsageEvent {
        input_tokens: 100 + i,
        output_tokens: 10 + i,
        cost_nanos: 1_000 * (i + 1),
        envelope: Envelope {
            project: Some(format!("p{}", i % 3)),
            session_id: Some(format!("s{}", i % 6)),
            workflow_tag: Some("agent".into()),
            ..Envelope::default()
        },
        ..UsageEvent::example(event_id(i), None, now_us + i)
    }
}

/// Ids as the ingress makes them are plain, and the meter writes them into its lookups' SQL as
/// they are; every seventh has a quote, a space and a `?`, so its batch's ids are bound instead.
fn event_id(i: i64) -> String {
    if i % 7 == 0 { format!("resend '{i:03}'?") } else { format!("resend-{i:03}") }
}

/// Every rollup against the raw table: (label, requests, tokens, cost) per granularity and for
/// session-hours must equal the distinct events' figures, and the distinct ids must be EVENTS.
async fn assert_rollups_exact(db: &str, stage: &str) {
    let raw = common::ch(&format!(
        "SELECT uniqExact(event_id), count(), sum(input_tokens + output_tokens), sum(cost_nanos) \
         FROM {db}.usage_events FINAL FORMAT TabSeparated"
    ))
    .await;
    let raw: Vec<i64> = raw.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(raw[0], EVENTS, "{stage}: distinct event ids");
    assert_eq!(raw[1], EVENTS, "{stage}: one row per event id with FINAL");
    for granularity in ["minute", "hour", "day", "month"] {
        let rolled = common::ch(&format!(
            "SELECT sum(requests), sum(input_tokens + output_tokens), sum(cost_nanos) FROM {db}.usage_windows FINAL \
             WHERE granularity = '{granularity}' FORMAT TabSeparated"
        ))
        .await;
        let rolled: Vec<i64> = rolled.split_whitespace().map(|v| v.parse().unwrap()).collect();
        assert_eq!(rolled, raw[1..].to_vec(), "{stage}: usage_windows ({granularity}) against the raw table");
    }
    let sessions = common::ch(&format!(
        "SELECT sum(requests), sum(input_tokens + output_tokens), sum(cost_nanos) FROM {db}.session_hours FINAL \
         FORMAT TabSeparated"
    ))
    .await;
    let sessions: Vec<i64> = sessions.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(sessions, raw[1..].to_vec(), "{stage}: session_hours against the raw table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_sent_events_add_nothing_to_the_rollups() {
    let topic = common::unique("usage_resend");
    let db = common::unique("tollgate_resend");
    common::create_topic(&topic, 2).await;
    let now = tollgate_ingress::clock::now_us();
    let events: Vec<UsageEvent> = (0..EVENTS).map(|i| event(i, now)).collect();
    let copies = |range: std::ops::Range<usize>| events[range].to_vec();
    let resent = || common::metric(&common::metrics().render(), "tollgate_meter_resent_events_total");

    // The events, then copies of ten of them in a later batch, and one event twice within a batch.
    common::produce_usage(&topic, &events).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    common::meter_finished(&db, &topic).await;
    assert_rollups_exact(&db, "first pass").await;
    let mut again = copies(0..10);
    again.extend(copies(10..11));
    again.extend(copies(10..11));
    common::produce_usage(&topic, &again).await;
    common::meter_finished(&db, &topic).await;
    assert_rollups_exact(&db, "copies in a later batch and twice in one batch").await;
    assert_eq!(resent(), 12, "every copy seen and set aside");

    // Copies sent while the meter is down, read by a new meter (nothing of them in memory).
    meter.stop().await;
    common::produce_usage(&topic, &copies(20..30)).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    common::meter_finished(&db, &topic).await;
    assert_rollups_exact(&db, "copies across a meter restart").await;
    assert_eq!(resent(), 22);

    // The raw table kept each copy's position; the rollups only the first.
    let positions = common::ch_count(&format!(
        "SELECT count() FROM (SELECT DISTINCT event_id, kafka_partition, kafka_offset FROM {db}.event_positions)"
    ))
    .await;
    assert_eq!(positions, EVENTS as u64 + 22, "every copy's position is recorded");
    meter.stop().await;
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
