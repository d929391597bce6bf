//! Breach decisions end to end: decisions produced to a real (Tansu) breaches topic reach the
//! ingress's cache and shape requests — 429s, queueing, fallbacks, audit, Watch headroom, cut
//! streams — and every request's usage event (read back from the usage topic) records the
//! decision. The enforcer is not involved: the tests produce the `BreachDecision` records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tollgate_schemas::decision::{BreachDecision, DecisionState, Measure, RuleKind};
use tollgate_schemas::usage::{Status, TokenSource, UsageEvent};

/// Rules of these tests. None has a `when:`, so each applies to every request (with a session);
/// a decision is published for one session's key only, so sessions do not disturb each other.
const RULES: &str = "\
type: gateway-rate-limit-config
name: decisions-test
rules:
  - id: block
    limit: {tokens: 1000, window: 1h, scope: session}
    on_breach: hard_block
  - id: queue
    limit: {requests: 10, window: 1m, scope: session}
    on_breach: queue_then_429
    queue_timeout_ms: 2000
  - id: haiku
    limit: {requests: 10, window: 1m, scope: session}
    on_breach: fallback_to_haiku
  - id: cheaper
    limit: {requests: 10, window: 1m, scope: session}
    on_breach: fallback_to_cheaper
  - id: audit
    limit: {requests: 10, window: 1m, scope: session}
    on_breach: hard_block
    mode: audit
  - id: watch
    limit: {requests: 100, window: 1h, scope: session}
    on_breach: hard_block
  - id: watch-tokens
    limit: {tokens: 1000, window: 1h, scope: session}
    on_breach: hard_block
---
type: gateway-budget-config
name: decisions-budgets
budgets:
  - id: cut-budget
    scope: {metadata: {X-TFY-Project: cut-project}}
    ceiling_usd: 1
    window: monthly
    on_exceed: hard_block
    cut_streams: true
";

/// `vm-dear` runs on Sonnet with two cheaper fallbacks; gpt-4o-mini is the cheapest.
const MODELS: &str = "\
name: vm-dear
type: gateway-load-balancing-config
rule_type: priority-based
rules:
  - {id: a, priority: 1, target: {provider: anthropic-mock, model: claude-sonnet-4-6}, timeout_ms: 5000}
fallbacks:
  - {provider: anthropic-mock, model: claude-haiku-4-5}
  - {provider: openai-mock, model: gpt-4o-mini}
";

const PRICES: &str = "\
type: tollgate-price-card
version: test-1
prices:
  - {provider: openai-mock, model: gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60, cached_read_usd_per_mtok: 0.075}
  - {provider: anthropic-mock, model: claude-haiku-4-5, input_usd_per_mtok: 1.00, output_usd_per_mtok: 5.00, cached_read_usd_per_mtok: 0.10, cache_write_usd_per_mtok: 1.25}
  - {provider: anthropic-mock, model: claude-sonnet-4-6, input_usd_per_mtok: 3.00, output_usd_per_mtok: 15.00}
  - {provider: dead, model: gpt-4o-mini, input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60}
";

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A decision for `rule/scope`: 120 s left in its window.
fn decision(rule: &str, scope: &str, state: DecisionState, version: i64) -> BreachDecision {
    BreachDecision {
        observed: if state == DecisionState::Breached { 1234 } else { 10 },
        headroom: if state == DecisionState::Breached { 0 } else { 990 },
        window_start_us: now_us() - 3_480_000_000,
        window_end_us: now_us() + 120_000_000,
        decided_at_us: now_us(),
        ..BreachDecision::example(rule, scope, state, version)
    }
}

struct Stack {
    mock: common::Service,
    ingress: common::Service,
    policy: tempfile::TempDir,
    breaches: String,
    producer: FutureProducer,
    codec: tollgate_schemas::avro::AvroCodec,
    http: reqwest::Client,
    usage: UsageReader,
}

fn write_test_policy(dir: &std::path::Path, mock: std::net::SocketAddr) {
    common::write_policy(dir, mock);
    std::fs::write(dir.join("prices.yaml"), PRICES).unwrap();
    std::fs::write(dir.join("decision-models.yaml"), MODELS).unwrap();
    std::fs::write(dir.join("decision-rules.yaml"), RULES).unwrap();
}

impl Stack {
    /// Mock provider, topics, policy; the ingress is started by `start_ingress`.
    async fn prepare(name: &str) -> (common::Service, tempfile::TempDir, String, String) {
        let usage_topic = common::unique(&format!("usage_{name}"));
        let breaches = common::unique(&format!("breaches_{name}"));
        common::create_topic(&usage_topic, 1).await;
        common::create_topic(&breaches, 1).await;
        let mock = common::start_mock().await;
        let policy = tempfile::tempdir().unwrap();
        write_test_policy(policy.path(), mock.addr);
        (mock, policy, usage_topic, breaches)
    }

    async fn start(
        (mock, policy, usage_topic, breaches): (common::Service, tempfile::TempDir, String, String),
        configure: impl FnOnce(&mut tollgate_ingress::Config),
    ) -> Stack {
        let spool = tempfile::tempdir().unwrap();
        let mut config = common::ingress_config(policy.path(), &common::kafka_brokers(), &usage_topic, spool.path());
        config.breaches_topic = breaches.clone();
        configure(&mut config);
        let mut ingress = common::start_ingress_with(config).await;
        ingress.temp = Some(spool);
        Stack {
            mock,
            ingress,
            policy,
            usage: UsageReader::new(&usage_topic),
            breaches,
            producer: decision_producer(),
            codec: BreachDecision::codec().unwrap(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        }
    }

    async fn new(name: &str) -> Stack {
        Self::start(Self::prepare(name).await, |_| {}).await
    }

    async fn publish(&self, d: &BreachDecision) {
        publish_decision(&self.producer, &self.codec, &self.breaches, d).await;
    }

    async fn tombstone(&self, key: &str) {
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.breaches).key(key);
        self.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    /// An OpenAI chat request of `session` to `model`.
    fn chat(&self, session: &str, model: &str, text: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("http://{}/v1/chat/completions", self.ingress.addr))
            .header("X-TFY-Project", "decisions")
            .header("X-TFY-Session-ID", session)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("the ingress answers");
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        Answer { status, retry_after, text: resp.text().await.unwrap() }
    }

    /// Sends `session`'s request until its status is `want` (a decision takes effect); returns
    /// the last answer and how many requests it took.
    async fn until_status(&self, session: &str, want: u16) -> (Answer, usize) {
        let end = Instant::now() + Duration::from_secs(20);
        let mut sent = 0;
        loop {
            let a = self.send(self.chat(session, "vm-openai", "hi\n#mock completion_tokens=2")).await;
            sent += 1;
            if a.status == want || Instant::now() > end {
                assert_eq!(a.status, want, "session {session} never answered {want}: {}", a.text);
                return (a, sent);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes a hard block for a session nobody else uses and waits until it applies: every
    /// record published before it has then been applied too (one partition, in order).
    async fn barrier(&self) {
        let marker = common::unique("marker");
        self.publish(&decision("block", &format!("session:{marker}"), DecisionState::Breached, 1)).await;
        self.until_status(&marker, 429).await;
    }

    async fn stop(self) {
        self.ingress.stop().await;
        self.mock.stop().await;
    }
}

/// A response as the client saw it.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text))
    }
}

fn decision_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", common::kafka_brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

async fn publish_decision(
    producer: &FutureProducer,
    codec: &tollgate_schemas::avro::AvroCodec,
    topic: &str,
    d: &BreachDecision,
) {
    let payload = codec.encode(d).unwrap();
    let key = d.key();
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&payload), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Reads the (one-partition) usage topic from the beginning.
struct UsageReader {
    consumer: StreamConsumer,
    codec: tollgate_schemas::avro::AvroCodec,
    events: Vec<UsageEvent>,
}

impl UsageReader {
    fn new(topic: &str) -> Self {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", common::kafka_brokers())
            .set("group.id", common::unique("decisions_reader"))
            .set("enable.auto.commit", "false");
        tollgate_runtime::kafka::follow(&mut cc, tollgate_runtime::kafka::Follow::Usage, false);
        let consumer: StreamConsumer = cc.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        UsageReader { consumer, codec: UsageEvent::codec().unwrap(), events: Vec::new() }
    }

    /// The usage events of `session`, once there are `n` of them; then 1 s more to prove no
    /// other arrives.
    async fn of(&mut self, session: &str, n: usize) -> Vec<UsageEvent> {
        let count =
            |events: &[UsageEvent]| events.iter().filter(|e| e.envelope.session_id.as_deref() == Some(session)).count();
        let end = Instant::now() + Duration::from_secs(30);
        let mut settle_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            match settle_until {
                Some(t) if now >= t => break,
                None if count(&self.events) >= n => settle_until = Some(now + Duration::from_secs(1)),
                None if now >= end => break,
                _ => {}
            }
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), self.consumer.recv()).await {
                let ev: UsageEvent = self.codec.decode(m.payload().unwrap()).unwrap();
                self.events.push(ev);
            }
        }
        let got: Vec<UsageEvent> =
            self.events.iter().filter(|e| e.envelope.session_id.as_deref() == Some(session)).cloned().collect();
        assert_eq!(got.len(), n, "usage events of {session}: {got:#?}");
        got
    }
}

fn assert_rejected(ev: &UsageEvent, rule: &str, scope: &str, action: &str, version: i64) {
    assert_eq!(ev.status, Status::Rejected, "{ev:#?}");
    assert_eq!(ev.http_status, 429, "{ev:#?}");
    assert_eq!((ev.input_tokens, ev.output_tokens, ev.cost_nanos), (0, 0, 0), "a refused request consumed nothing");
    assert_eq!((ev.provider.as_str(), ev.model.as_str()), ("", ""), "it reached no provider");
    let d = ev.decision.as_ref().expect("the decision is recorded");
    assert_eq!((d.rule_id.as_str(), d.scope.as_str(), d.action.as_str(), d.version), (rule, scope, action, version));
}

fn applied(ev: &UsageEvent) -> (String, String, String, i64) {
    let d = ev.decision.as_ref().unwrap_or_else(|| panic!("no decision on {ev:#?}"));
    (d.rule_id.clone(), d.scope.clone(), d.action.clone(), d.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_block_from_before_start_then_versions_and_tombstones() {
    let parts = Stack::prepare("block").await;
    // Published before the ingress starts, behind 20,000 other records: the whole topic must be
    // read before the first request is served (skipping the wait fails this test).
    let producer = decision_producer();
    let codec = BreachDecision::codec().unwrap();
    let mut pending = Vec::new();
    for i in 0..20_000 {
        let d = decision("block", &format!("session:filler-{i}"), DecisionState::Breached, 1);
        let (key, payload) = (d.key(), codec.encode(&d).unwrap());
        let record = FutureRecord::to(&parts.3).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    publish_decision(&producer, &codec, &parts.3, &decision("block", "session:b1", DecisionState::Breached, 5)).await;
    let mut s = Stack::start(parts, |_| {}).await;

    let a = s.send(s.chat("b1", "vm-openai", "hello")).await;
    assert_eq!(a.status, 429, "the first request after start is blocked: {}", a.text);
    let retry = a.retry_after.expect("Retry-After");
    assert!((100..=120).contains(&retry), "Retry-After {retry} s, the window ends in 120 s");
    let e = &a.json()["error"];
    assert_eq!(e["rule"], "block");
    assert_eq!(e["scope"], "session:b1");
    assert_eq!(e["limit"], 1000);
    assert_eq!(e["observed"], 1234);
    assert_eq!(e["measure"], "tokens");
    assert_eq!(e["action"], "hard_block");
    assert_eq!(e["retry_after_seconds"].as_u64(), Some(retry));
    assert_eq!(e["code"], "rate_limit_exceeded");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("block") && message.contains("1234 tokens of 1000 tokens"), "{message}");

    // The same block in Anthropic's error format on /v1/messages.
    let a = s
        .send(
            s.http
                .post(format!("http://{}/v1/messages", s.ingress.addr))
                .header("X-TFY-Project", "decisions")
                .header("X-TFY-Session-ID", "b1")
                .json(
                    &json!({"model": "vm-anthropic", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
                ),
        )
        .await;
    assert_eq!(a.status, 429, "{}", a.text);
    let v = a.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!((v["error"]["rule"].as_str(), v["error"]["observed"].as_i64()), (Some("block"), Some(1234)));
    assert!(a.retry_after.is_some());

    // Another session is not affected.
    assert_eq!(s.send(s.chat("b2", "vm-openai", "hello\n#mock completion_tokens=2")).await.status, 200);

    // A lower version is ignored: proven by a later decision (the barrier) taking effect first.
    s.publish(&decision("block", "session:b1", DecisionState::Clear, 4)).await;
    s.barrier().await;
    assert_eq!(s.send(s.chat("b1", "vm-openai", "hello")).await.status, 429, "version 4 < 5 did not lift the block");

    // A higher version lifts it.
    s.publish(&decision("block", "session:b1", DecisionState::Clear, 6)).await;
    let (lifted, polls) = s.until_status("b1", 200).await;
    assert!(lifted.json()["choices"][0]["message"]["content"].is_string());

    // A tombstone removes a key.
    s.publish(&decision("block", "session:b3", DecisionState::Breached, 1)).await;
    s.until_status("b3", 429).await;
    s.tombstone("block/session:b3").await;
    s.until_status("b3", 200).await;

    // A version far ahead of the ingress's clock could never be superseded: it is ignored.
    let far_ahead = now_us() + 2 * 3_600_000_000;
    s.publish(&decision("block", "session:b4", DecisionState::Breached, far_ahead)).await;
    s.barrier().await;
    let a = s.send(s.chat("b4", "vm-openai", "hello\n#mock completion_tokens=2")).await;
    assert_eq!(a.status, 200, "a decision from the far future is not applied: {}", a.text);
    let ignored = common::metric(
        &common::metrics().render(),
        "tollgate_ingress_decisions_ignored_total{reason=\"future_version\"}",
    );
    assert!(ignored >= 1, "and it is counted");

    // One event per request; the refused ones carry the decision and consumed nothing.
    let b1 = s.usage.of("b1", 3 + polls).await;
    let rejected: Vec<&UsageEvent> = b1.iter().filter(|e| e.status == Status::Rejected).collect();
    assert_eq!(rejected.len(), 2 + polls, "{b1:#?}");
    for ev in &rejected {
        assert_rejected(ev, "block", "session:b1", "hard_block", 5);
    }
    let ok: Vec<&UsageEvent> = b1.iter().filter(|e| e.status == Status::Ok).collect();
    assert_eq!(ok.len(), 1, "{b1:#?}");
    assert!(ok[0].decision.is_none(), "a cleared key shapes nothing");
    assert_eq!(s.usage.of("b2", 1).await[0].decision, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_then_429_is_released_by_a_clear_and_refused_after_its_wait() {
    let mut s = Stack::new("queue").await;
    s.publish(&decision("queue", "session:q1", DecisionState::Breached, 1)).await;
    s.barrier().await;

    // Released: a Clear arrives 700 ms into the 2000 ms wait.
    let started = Instant::now();
    let held = s.send(s.chat("q1", "vm-openai", "hold me\n#mock completion_tokens=3"));
    let lift = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.publish(&decision("queue", "session:q1", DecisionState::Clear, 2)).await;
    };
    let (a, ()) = tokio::join!(held, lift);
    let waited = started.elapsed();
    assert_eq!(a.status, 200, "released by the Clear: {}", a.text);
    assert!(waited >= Duration::from_millis(650), "it was held until the Clear ({waited:?})");
    // Its 200 says the Clear released it: past the 2 s wait it would have been refused (429).

    // Refused: no Clear within the wait.
    s.publish(&decision("queue", "session:q1", DecisionState::Breached, 3)).await;
    s.barrier().await;
    let started = Instant::now();
    let a = s.send(s.chat("q1", "vm-openai", "hold me again")).await;
    let waited = started.elapsed();
    assert_eq!(a.status, 429, "{}", a.text);
    assert!(waited >= Duration::from_millis(1950), "held for the rule's 2000 ms first ({waited:?})");
    assert!(a.retry_after.is_some());
    let e = &a.json()["error"];
    assert_eq!((e["rule"].as_str(), e["action"].as_str()), (Some("queue"), Some("queue_then_429")));
    assert!(e["message"].as_str().unwrap().contains("waited"), "{e}");

    let events = s.usage.of("q1", 2).await;
    let ok = events.iter().find(|e| e.status == Status::Ok).expect("the released request");
    assert_eq!(applied(ok), ("queue".into(), "session:q1".into(), "queue_then_429:released".into(), 1));
    assert_eq!(ok.output_tokens, 3);
    let refused = events.iter().find(|e| e.status == Status::Rejected).expect("the refused request");
    assert_rejected(refused, "queue", "session:q1", "queue_then_429", 3);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_go_to_haiku_and_to_the_cheapest_fallback() {
    let mut s = Stack::new("fallback").await;
    s.publish(&decision("haiku", "session:f1", DecisionState::Breached, 1)).await;
    s.publish(&decision("cheaper", "session:c1", DecisionState::Breached, 1)).await;
    s.publish(&decision("cheaper", "session:c2", DecisionState::Breached, 1)).await;
    s.barrier().await;

    // fallback_to_haiku: asked for gpt-4o-mini, served by claude-haiku-4-5.
    let a = s.send(s.chat("f1", "vm-openai", "hi\n#mock prompt_tokens=10 completion_tokens=4")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["model"], "claude-haiku-4-5", "{}", a.text);
    // fallback_to_cheaper: vm-dear runs on Sonnet; its cheapest fallback is gpt-4o-mini.
    let a = s.send(s.chat("c1", "vm-dear", "hi\n#mock prompt_tokens=10 completion_tokens=4")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["model"], "gpt-4o-mini", "{}", a.text);
    // Already on the cheapest (vm-openai has no cheaper fallback): passes, recorded.
    let a = s.send(s.chat("c2", "vm-openai", "hi\n#mock prompt_tokens=10 completion_tokens=4")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["model"], "gpt-4o-mini");
    // Without a decision, vm-dear stays on Sonnet.
    let a = s.send(s.chat("c3", "vm-dear", "hi\n#mock completion_tokens=4")).await;
    assert_eq!(a.json()["model"], "claude-sonnet-4-6", "{}", a.text);

    let f1 = &s.usage.of("f1", 1).await[0];
    assert_eq!(
        (f1.provider.as_str(), f1.model.as_str(), f1.virtual_model.as_str()),
        ("anthropic-mock", "claude-haiku-4-5", "vm-openai")
    );
    assert_eq!(applied(f1), ("haiku".into(), "session:f1".into(), "fallback_to_haiku".into(), 1));
    assert_eq!(f1.cost_nanos, 10 * 1000 + 4 * 5000, "priced as haiku");
    let c1 = &s.usage.of("c1", 1).await[0];
    assert_eq!((c1.provider.as_str(), c1.model.as_str()), ("openai-mock", "gpt-4o-mini"));
    assert_eq!(applied(c1), ("cheaper".into(), "session:c1".into(), "fallback_to_cheaper".into(), 1));
    let c2 = &s.usage.of("c2", 1).await[0];
    assert_eq!(c2.model, "gpt-4o-mini");
    assert_eq!(applied(c2).2, "fallback_to_cheaper:already_cheapest");
    assert_eq!(s.usage.of("c3", 1).await[0].decision, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_passes_and_records_what_it_would_have_done() {
    let parts = Stack::prepare("audit").await;
    let breaches = parts.3.clone();
    let mut s = Stack::start(parts, |_| {}).await;
    s.publish(&decision("audit", "session:a1", DecisionState::Breached, 3)).await;
    s.publish(&decision("block", "session:a2", DecisionState::Breached, 1)).await;
    s.until_status("a2", 429).await;
    let a = s.send(s.chat("a1", "vm-openai", "hi\n#mock completion_tokens=2")).await;
    assert_eq!(a.status, 200, "a rule in audit mode lets the request pass: {}", a.text);
    assert_eq!(
        applied(&s.usage.of("a1", 1).await[0]),
        ("audit".into(), "session:a1".into(), "audit:hard_block".into(), 3)
    );

    // A second ingress in --audit-only on the same breaches topic: the hard block passes too.
    let spool = tempfile::tempdir().unwrap();
    let usage = common::unique("usage_audit_only");
    common::create_topic(&usage, 1).await;
    let mut config = common::ingress_config(s.policy.path(), &common::kafka_brokers(), &usage, spool.path());
    config.breaches_topic = breaches;
    config.audit_only = true;
    let audit_only = common::start_ingress_with(config).await;
    let resp = s
        .http
        .post(format!("http://{}/v1/chat/completions", audit_only.addr))
        .header("X-TFY-Project", "decisions")
        .header("X-TFY-Session-ID", "a2")
        .json(
            &json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi\n#mock completion_tokens=2"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap());
    let mut reader = UsageReader::new(&usage);
    let ev = &reader.of("a2", 1).await[0];
    assert_eq!(ev.status, Status::Ok);
    assert_eq!(applied(ev), ("block".into(), "session:a2".into(), "audit:hard_block".into(), 1));
    audit_only.stop().await;
    drop(spool);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_headroom_blocks_once_the_local_count_reaches_it() {
    let mut s = Stack::new("watch").await;
    // 97 of 100 requests seen by the enforcer: 3 left.
    let mut w = decision("watch", "session:w1", DecisionState::Watch, 1);
    (w.measure, w.limit, w.observed, w.headroom) = (Measure::Requests, 100, 97, 3);
    s.publish(&w).await;
    s.barrier().await;
    for i in 0..3 {
        let a = s.send(s.chat("w1", "vm-openai", "hi\n#mock completion_tokens=2")).await;
        assert_eq!(a.status, 200, "request {i} is within the headroom: {}", a.text);
    }
    let a = s.send(s.chat("w1", "vm-openai", "hi")).await;
    assert_eq!(a.status, 429, "the 4th request finds the headroom used up: {}", a.text);
    let e = &a.json()["error"];
    assert_eq!((e["observed"].as_i64(), e["limit"].as_i64()), (Some(100), Some(100)), "97 + 3 counted here");
    assert_eq!(e["measure"], "requests");
    assert!(e["message"].as_str().unwrap().contains("counted by this gateway"), "{e}");

    // A newer decision whose `observed` covers the usage of those requests (they ended before
    // its `covered_until_us`) starts the count afresh: 2 more pass, the third does not.
    w.version = 2;
    (w.observed, w.headroom) = (98, 2);
    w.covered_until_us = now_us();
    s.publish(&w).await;
    s.until_status("w1", 200).await;
    assert_eq!(s.send(s.chat("w1", "vm-openai", "hi\n#mock completion_tokens=2")).await.status, 200);
    assert_eq!(s.send(s.chat("w1", "vm-openai", "hi")).await.status, 429);

    // Tokens: the input estimate at admission, the provider's total at the end. 120 tokens
    // reported against a headroom of 100: the next request is blocked (the estimate alone,
    // a handful of tokens, would have let it through).
    let mut t = decision("watch-tokens", "session:w2", DecisionState::Watch, 1);
    (t.limit, t.observed, t.headroom) = (1000, 900, 100);
    s.publish(&t).await;
    s.barrier().await;
    let a = s.send(s.chat("w2", "vm-openai", "hi\n#mock prompt_tokens=60 completion_tokens=60")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = s.send(s.chat("w2", "vm-openai", "hi")).await;
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.json()["error"]["observed"], 1020, "900 + the 120 tokens the provider reported");

    let w2 = s.usage.of("w2", 2).await;
    assert_rejected(
        w2.iter().find(|e| e.status == Status::Rejected).unwrap(),
        "watch-tokens",
        "session:w2",
        "hard_block",
        1,
    );
    assert_eq!(w2.iter().find(|e| e.status == Status::Ok).unwrap().decision, None, "a Watch shapes nothing");
    s.stop().await;
}

/// Reads SSE frames from a streaming response until `stop` says so or the stream ends.
async fn read_frames(resp: reqwest::Response, mut stop: impl FnMut(&str) -> bool) -> (String, bool) {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if stop(&text) {
            return (text, false);
        }
    }
    (text, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_streams_ends_running_streams_with_an_error_event_and_records_them_once() {
    let mut s = Stack::new("cut").await;
    let mut budget = decision("cut-budget", "X-TFY-Project=cut-project", DecisionState::Clear, 1);
    (budget.rule_kind, budget.measure, budget.limit, budget.observed, budget.headroom) =
        (RuleKind::Budget, Measure::CostNanos, 1_000_000_000, 10, 999_999_990);
    // 200 words, one every 50 ms: a 10 s stream.
    let slow = "tell me a story\n#mock prompt_tokens=30 completion_tokens=200 chunk_delay_ms=50";

    // OpenAI format.
    let resp = s
        .http
        .post(format!("http://{}/v1/chat/completions", s.ingress.addr))
        .header("X-TFY-Project", "cut-project")
        .header("X-TFY-Session-ID", "cut1")
        .json(&json!({"model": "vm-openai", "stream": true, "messages": [{"role": "user", "content": slow}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while text.matches("\"content\":\"w").count() < 3 {
        text.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    budget.state = DecisionState::Breached;
    budget.cut_streams = true;
    budget.observed = 1_000_000_500;
    budget.version = 2;
    s.publish(&budget).await;
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(!text.contains("[DONE]"), "the stream did not finish normally: {text}");
    let last = text.lines().rev().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let err: Value = serde_json::from_str(last).unwrap();
    assert_eq!(err["error"]["rule"], "cut-budget", "{last}");
    assert_eq!(err["error"]["action"], "cut_stream");
    assert_eq!(err["error"]["type"], "insufficient_quota");
    assert_eq!(err["error"]["scope"], "X-TFY-Project=cut-project");
    let words = text.matches("\"content\":\"w").count();
    assert!((3..200).contains(&words), "{words} words passed before the cut");

    // A new request of the scope is now blocked at the door.
    let a = s
        .send(
            s.http
                .post(format!("http://{}/v1/chat/completions", s.ingress.addr))
                .header("X-TFY-Project", "cut-project")
                .header("X-TFY-Session-ID", "cut-after")
                .json(&json!({"model": "vm-openai", "messages": [{"role": "user", "content": "more"}]})),
        )
        .await;
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.json()["error"]["code"], "budget_exceeded");

    // Anthropic format: lift the budget, start a stream, breach it again.
    budget.state = DecisionState::Clear;
    budget.version = 3;
    s.publish(&budget).await;
    s.barrier().await;
    let resp = s
        .http
        .post(format!("http://{}/v1/messages", s.ingress.addr))
        .header("X-TFY-Project", "cut-project")
        .header("X-TFY-Session-ID", "cut2")
        .json(&json!({"model": "vm-anthropic", "stream": true, "max_tokens": 300, "messages": [{"role": "user", "content": slow}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    budget.state = DecisionState::Breached;
    budget.version = 4;
    let mut published = false;
    let (text, ended) = read_frames(resp, |t| {
        if !published && t.matches("text_delta").count() >= 3 {
            published = true;
            let (p, c, topic, d) =
                (s.producer.clone(), BreachDecision::codec().unwrap(), s.breaches.clone(), budget.clone());
            tokio::spawn(async move { publish_decision(&p, &c, &topic, &d).await });
        }
        false
    })
    .await;
    assert!(ended);
    assert!(!text.contains("message_stop"), "{text}");
    let last = text.split("\n\n").filter(|f| !f.trim().is_empty()).last().unwrap();
    assert!(last.starts_with("event: error\n"), "{last}");
    let err: Value = serde_json::from_str(last.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!((err["type"].as_str(), err["error"]["type"].as_str()), (Some("error"), Some("rate_limit_error")));
    assert_eq!(err["error"]["rule"], "cut-budget");

    // Each cut stream is one usage event: ended early (client_abort, so budgets count it — a
    // `rejected` event is one that consumed nothing), its usage estimated and priced.
    for (session, version) in [("cut1", 2), ("cut2", 4)] {
        let ev = &s.usage.of(session, 1).await[0];
        assert_eq!(ev.status, Status::ClientAbort, "{ev:#?}");
        assert!(ev.error.as_deref().unwrap_or_default().contains("the gateway ended this stream"), "{ev:#?}");
        assert_eq!(ev.http_status, 200);
        assert!(ev.streamed);
        assert_eq!(
            applied(ev),
            ("cut-budget".into(), "X-TFY-Project=cut-project".into(), "cut_stream".into(), version)
        );
        assert_eq!(ev.token_source, TokenSource::Estimated, "the provider never reported the output");
        assert!(ev.output_tokens >= 3 && ev.output_tokens < 400, "the words that reached the client: {ev:#?}");
        if session == "cut2" {
            assert_eq!(ev.input_tokens, 30, "Anthropic reports input at the start: {ev:#?}");
        } else {
            assert_eq!(Some(ev.input_tokens), ev.reference_input_tokens, "OpenAI reports at the end: tiktoken");
        }
        assert!(ev.cost_nanos > 0);
    }
    assert_rejected(&s.usage.of("cut-after", 1).await[0], "cut-budget", "X-TFY-Project=cut-project", "hard_block", 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_without_the_broker_fails_when_required_and_starts_open_otherwise() {
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    write_test_policy(policy.path(), mock.addr);
    let spool = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let mut config = common::ingress_config(policy.path(), "127.0.0.1:1", "usage_nowhere", spool.path());
    config.decisions_start_timeout = Duration::from_secs(2);
    config.decisions_required = true;
    let ingress = common::start_ingress_with(config.clone()).await;
    let result = tokio::time::timeout(Duration::from_secs(20), ingress.task).await.unwrap().unwrap();
    let err = format!("{:#}", result.expect_err("a required breaches topic that cannot be read fails the start"));
    assert!(err.contains("breach decisions of topic tollgate.breaches.v1 not loaded within 2 s"), "{err}");

    // Default: start open after the deadline, and serve.
    config.decisions_required = false;
    let spool2 = tempfile::tempdir().unwrap();
    config.spool_dir = spool2.path().to_path_buf();
    let started = Instant::now();
    let ingress = common::start_ingress_with(config).await;
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", ingress.addr))
        .header("X-TFY-Project", "decisions")
        .header("X-TFY-Session-ID", "open")
        .json(
            &json!({"model": "vm-openai", "messages": [{"role": "user", "content": "hi\n#mock completion_tokens=2"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(started.elapsed() >= Duration::from_secs(2), "served only after the deadline ({:?})", started.elapsed());
    ingress.stop().await;
    mock.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaches_topic_created_after_start_is_picked_up() {
    let parts = Stack::prepare("late").await;
    // Not the topic prepare created: one that does not exist yet.
    let late = common::unique("breaches_late");
    // A start deadline of an hour: served at all, the request did not wait for the topic.
    let mut s = Stack::start(parts, |c| {
        c.breaches_topic = late.clone();
        c.decisions_start_timeout = Duration::from_secs(3600);
    })
    .await;
    s.breaches = late.clone();
    let a = s.send(s.chat("l1", "vm-openai", "hi\n#mock completion_tokens=2")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    common::create_topic(&late, 1).await;
    s.publish(&decision("block", "session:l1", DecisionState::Breached, 1)).await;
    s.until_status("l1", 429).await;
    s.stop().await;
}
