//! Usage events the meter and the enforcer cannot count (undecodable, or with amounts that cannot
//! be right: a negative cost, cache parts above the input) go to the dead-letter topic, with why
//! and who set them aside, and never block their partition: the events around them are all
//! counted, and nothing is subtracted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use tollgate_schemas::usage::{ApiFormat, Envelope, UsageEvent};

fn event(i: i64) -> UsageEvent {
    UsageEvent {
        started_at_us: 1_795_924_958_000_000 + i,
        envelope: Envelope {
            project: Some("dlq".into()),
            session_id: Some(format!("s{}", i % 4)),
            ..Default::default()
        },
        api_format: ApiFormat::Anthropic,
        input_tokens: 10 + i,
        output_tokens: 1,
        cost_nanos: 1000 * (10 + i),
        ..UsageEvent::example(format!("00000000-0000-7000-8000-{i:012}"), None, 1_795_924_958_000_000 + i * 1000)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_events_are_dead_lettered_and_the_rest_counted() {
    let topic = common::unique("dlq");
    let db = common::unique("tollgate_dlq");
    common::create_topic(&topic, 2).await;
    common::create_topic(&format!("{topic}.dlq"), 1).await;
    // The enforcer reads the same topic and sets the same five records aside on its own. It
    // resumes where the meter's checkpoints end, so it starts before any record is written (on
    // the migrated, empty database).
    let cfg = tollgate_store::ClickHouseConfig {
        url: common::clickhouse_url(),
        database: db.clone(),
        user: None,
        password: None,
    };
    tollgate_store::migrate::apply(&cfg.server_client(), &db).await.unwrap();
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), "127.0.0.1:1".parse().unwrap());
    let (breaches, alerts) = (common::unique("dlq_breaches"), common::unique("dlq_alerts"));
    common::create_topic(&breaches, 1).await;
    common::create_topic(&alerts, 1).await;
    let mut ec = common::enforcer_config(policy.path(), &topic, &breaches, &alerts, &db);
    ec.dead_letter_topic = format!("{topic}.dlq");
    let enforcer = common::start_enforcer(ec).await;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", common::kafka_brokers()).create().unwrap();
    let codec = UsageEvent::codec().unwrap();
    let garbage: [&[u8]; 3] = [b"{\"json\": \"not avro\"}", &[0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9], b""];
    // Valid Avro, but not amounts anyone may count.
    let negative = UsageEvent { cost_nanos: -1_000_000_000, ..event(25) };
    let cache_above_input = UsageEvent { cached_input_tokens: 500, ..event(175) };
    let implausible = [codec.encode(&negative).unwrap(), codec.encode(&cache_above_input).unwrap()];
    let mut good = 0;
    for i in 0..300i64 {
        let (payload, key) = if i % 100 == 50 {
            (garbage[(i / 100) as usize].to_vec(), "s2".to_owned())
        } else if i == 25 || i == 175 {
            (implausible[usize::from(i == 175)].clone(), "s1".to_owned())
        } else {
            good += 1;
            (codec.encode(&event(i)).unwrap(), format!("s{}", i % 4))
        };
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let sql = format!("SELECT count() FROM {db}.usage_events FINAL");
    common::wait_for_count(&sql, good, Duration::from_secs(60)).await;
    common::meter_finished(&db, &topic).await;
    meter.stop().await;
    assert_eq!(common::ch_count(&sql).await, good, "every countable event, once");
    assert_eq!(common::ch_count(&format!("SELECT count() FROM {db}.usage_events WHERE cost_nanos < 0")).await, 0);
    let want: i64 = (0..300).filter(|i| i % 100 != 50 && *i != 25 && *i != 175).map(|i| 1000 * (10 + i)).sum();
    assert_eq!(
        common::ch(&format!("SELECT sum(cost_nanos) FROM {db}.usage_windows FINAL WHERE granularity = 'month'"))
            .await
            .trim(),
        want.to_string()
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .set("group.id", common::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{topic}.dlq")]).unwrap();
    let mut dead = Vec::new();
    let mut by = Vec::new();
    while dead.len() < 10 {
        let m =
            tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("dead letters arrive").unwrap();
        let headers = m.headers().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("tollgate-source-topic").as_deref(), Some(topic.as_str()));
        assert!(header("tollgate-error").is_some_and(|e| !e.is_empty()));
        assert!(header("tollgate-source-offset").is_some());
        by.push(header("tollgate-rejected-by").unwrap_or_default());
        dead.push(m.payload().unwrap_or_default().to_vec());
    }
    enforcer.stop().await;
    let mut want_dead: Vec<Vec<u8>> = garbage.iter().map(|g| g.to_vec()).chain(implausible.iter().cloned()).collect();
    want_dead.extend(want_dead.clone());
    want_dead.sort();
    dead.sort();
    assert_eq!(dead, want_dead, "the records nobody may count, unchanged, once from each reader");
    by.sort();
    assert_eq!(by, [["enforcer"; 5], ["meter"; 5]].concat());
    common::ch(&format!("DROP DATABASE IF EXISTS {db}")).await;
}
