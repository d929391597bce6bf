//! OpenTelemetry traces of the ingress, received at an OTLP/HTTP endpoint of the test's own and
//! checked span by span: one server span per request continuing the caller's `traceparent`, one
//! client span per upstream attempt with the GenAI attributes and Tollgate's, and the same trace
//! id on the request's rows in ClickHouse (real broker, real ClickHouse).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use serde_json::json;

/// A received span: ids in hex, kind, name, attributes as text.
#[derive(Debug, Clone)]
struct Got {
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    name: String,
    attrs: BTreeMap<String, String>,
    service: String,
}

type Received = Arc<Mutex<Vec<Got>>>;

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(Any::ArrayValue(a)) => a.values.iter().map(|x| text(&Some(x.clone()))).collect::<Vec<_>>().join(","),
        other => format!("{other:?}"),
    }
}

async fn receive(State(got): State<Received>, body: Bytes) -> Vec<u8> {
    let req = ExportTraceServiceRequest::decode(body).unwrap();
    let mut out = got.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| text(&a.value))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent: hex::encode(&s.parent_span_id),
                    kind: s.kind,
                    name: s.name.clone(),
                    attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                    service: service.clone(),
                });
            }
        }
    }
    Vec::new() // an empty ExportTraceServiceResponse
}

async fn chat(http: &reqwest::Client, ingress: std::net::SocketAddr, model: &str, traceparent: Option<&str>) {
    let mut req = http
        .post(format!("http://{ingress}/v1/chat/completions"))
        .header("X-TFY-Project", "traced")
        .header("X-TFY-Session-ID", format!("s-{model}"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi\n#mock prompt_tokens=321 completion_tokens=12"}]}));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_follow_the_callers_trace_and_rows_carry_its_id() {
    let got: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(Arc::clone(&got));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let topic = common::unique("traces");
    let db = common::unique("tollgate_traces");
    common::create_topic(&topic, 2).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    let spool = tempfile::tempdir().unwrap();
    let mut ic = common::ingress_config(policy.path(), &common::kafka_brokers(), &topic, spool.path());
    ic.traces = Some(tollgate_ingress::trace::TracesConfig {
        endpoint: Some(format!("http://{collector}/v1/traces")),
        service_name: "tollgate-ingress-test".into(),
        max_queue: 1024,
        max_batch: 64,
        // Nothing is sent before the ingress stops: its shutdown must send every span.
        delay: Duration::from_secs(3600),
        export_timeout: Duration::from_secs(10),
    });
    let ingress = common::start_ingress_with(ic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let http = reqwest::Client::new();

    // The caller's trace, continued; then a request with a failed first attempt and no caller trace.
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    chat(&http, ingress.addr, "vm-openai", Some(&format!("00-{caller_trace}-{caller_span}-01"))).await;
    chat(&http, ingress.addr, "vm-fallback", None).await;

    // The rows first (their events are published before the ingress stops), then stop it.
    assert_eq!(
        common::wait_for_count(&format!("SELECT count() FROM {db}.usage_events FINAL"), 3, Duration::from_secs(30))
            .await,
        3
    );
    ingress.stop().await;

    // 2 server spans and 3 client spans (vm-fallback tries the dead provider first).
    let all = common::eventually(Duration::from_secs(30), || async { got.lock().unwrap().len() >= 5 }).await;
    let spans = got.lock().unwrap().clone();
    assert!(all, "spans received: {spans:#?}");
    assert_eq!(spans.len(), 5, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "tollgate-ingress-test"), "{spans:#?}");

    let server = |model: &str| {
        spans
            .iter()
            .find(|s| s.kind == SpanKind::Server as i32 && s.name == format!("chat {model}"))
            .unwrap_or_else(|| panic!("no server span for {model}: {spans:#?}"))
            .clone()
    };
    let children = |parent: &Got| {
        let mut c: Vec<Got> = spans.iter().filter(|s| s.parent == parent.span_id).cloned().collect();
        c.sort_by_key(|s| s.attrs["tollgate.attempt"].parse::<i64>().unwrap());
        c
    };

    let first = server("vm-openai");
    assert_eq!(
        (first.trace_id.as_str(), first.parent.as_str()),
        (caller_trace, caller_span),
        "continues the caller's trace"
    );
    let a = &first.attrs;
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.request.model"], "vm-openai");
    assert_eq!(a["gen_ai.response.model"], "gpt-4o-mini");
    assert_eq!(a["gen_ai.provider.name"], "openai");
    assert_eq!((a["gen_ai.usage.input_tokens"].as_str(), a["gen_ai.usage.output_tokens"].as_str()), ("321", "12"));
    assert_eq!((a["tollgate.project"].as_str(), a["tollgate.session_id"].as_str()), ("traced", "s-vm-openai"));
    let attempts = children(&first);
    assert_eq!(attempts.len(), 1, "{attempts:#?}");
    let c = &attempts[0].attrs;
    assert_eq!(attempts[0].kind, SpanKind::Client as i32);
    assert_eq!(attempts[0].trace_id, caller_trace);
    assert_eq!((c["gen_ai.provider.name"].as_str(), c["gen_ai.request.model"].as_str()), ("openai", "gpt-4o-mini"));
    assert_eq!((c["gen_ai.usage.input_tokens"].as_str(), c["tollgate.virtual_model"].as_str()), ("321", "vm-openai"));

    let second = server("vm-fallback");
    assert_ne!(second.trace_id, caller_trace);
    assert!(second.parent.is_empty() || second.parent == "0000000000000000", "a new trace: {second:?}");
    let attempts = children(&second);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(attempts[0].attrs["tollgate.provider"], "dead");
    assert!(attempts[0].attrs.contains_key("error.type"), "{:?}", attempts[0]);
    assert_eq!(attempts[1].attrs["gen_ai.provider.name"], "anthropic");
    assert_eq!(attempts[1].attrs["tollgate.fallback_path"], "dead/gpt-4o-mini");
    assert_eq!(second.attrs["gen_ai.response.model"], "claude-haiku-4-5");
    // The request span tells the request's end (the fallback answered) and its whole spend.
    assert!(!second.attrs.contains_key("error.type"), "{second:?}");
    assert_eq!(second.attrs["tollgate.attempts"], "2");
    let cost = |s: &Got| s.attrs["tollgate.cost_nanos"].parse::<i64>().unwrap();
    assert_eq!(cost(&second), cost(&attempts[0]) + cost(&attempts[1]));

    // ClickHouse: each row carries its request's trace id; the cost on the span is the row's.
    let rows = common::ch(&format!(
        "SELECT virtual_model, attempt, trace_id, cost_nanos FROM {db}.usage_events FINAL ORDER BY virtual_model, attempt FORMAT TSV"
    ))
    .await;
    let span_cost = |s: &Got| s.attrs["tollgate.cost_nanos"].clone();
    let expected = [
        format!("vm-fallback\t1\t{}\t{}", second.trace_id, span_cost(&attempts[0])),
        format!("vm-fallback\t2\t{}\t{}", second.trace_id, span_cost(&attempts[1])),
        format!("vm-openai\t1\t{caller_trace}\t{}", span_cost(&children(&first)[0])),
    ];
    assert_eq!(rows.lines().collect::<Vec<_>>(), expected, "{rows}");

    let metrics = common::metrics().render();
    assert_eq!(common::metric(&metrics, "tollgate_ingress_trace_spans_total"), 5, "{metrics}");
    assert!(metrics.contains("tollgate_ingress_trace_spans_total{result=\"exported\"} 5"), "{metrics}");

    meter.stop().await;
    mock.stop().await;
}

/// The GenAI metrics one export carried: per (instrument, attributes as text), the summed
/// value (a counter's sum, a histogram's sum) and the number of measurements.
type MetricSums = Arc<Mutex<BTreeMap<(String, String), (f64, u64)>>>;

async fn receive_metrics(State(got): State<MetricSums>, body: Bytes) -> Vec<u8> {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
    let req = ExportMetricsServiceRequest::decode(body).unwrap();
    let attrs = |a: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
        let mut kv: Vec<String> = a.iter().map(|kv| format!("{}={}", kv.key, text(&kv.value))).collect();
        kv.sort();
        kv.join(",")
    };
    // Cumulative: each export holds the totals so far, so the last one received wins.
    let mut now = BTreeMap::new();
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                match m.data {
                    Some(Data::Histogram(h)) => {
                        assert_eq!(h.aggregation_temporality, 2, "{} is cumulative", m.name);
                        for p in h.data_points {
                            now.insert((m.name.clone(), attrs(&p.attributes)), (p.sum.unwrap_or(0.0), p.count));
                        }
                    }
                    Some(Data::Sum(s)) => {
                        assert!(s.is_monotonic && s.aggregation_temporality == 2, "{} is a cumulative counter", m.name);
                        for p in s.data_points {
                            let v = match p.value {
                                Some(Number::AsInt(i)) => i as f64,
                                Some(Number::AsDouble(d)) => d,
                                None => 0.0,
                            };
                            now.insert((m.name.clone(), attrs(&p.attributes)), (v, 1));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    *got.lock().unwrap() = now;
    Vec::new() // an empty ExportMetricsServiceResponse
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn genai_metrics_carry_the_rows_tokens_and_cost() {
    let got: MetricSums = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let app =
        axum::Router::new().route("/v1/metrics", axum::routing::post(receive_metrics)).with_state(Arc::clone(&got));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let topic = common::unique("otel_metrics");
    let db = common::unique("tollgate_otel_metrics");
    common::create_topic(&topic, 2).await;
    let mock = common::start_mock().await;
    let policy = tempfile::tempdir().unwrap();
    common::write_policy(policy.path(), mock.addr);
    let spool = tempfile::tempdir().unwrap();
    let mut ic = common::ingress_config(policy.path(), &common::kafka_brokers(), &topic, spool.path());
    ic.otel_metrics = Some(tollgate_ingress::otel_metrics::MetricsConfig {
        endpoint: Some(format!("http://{collector}/v1/metrics")),
        service_name: "tollgate-ingress-test".into(),
        // Nothing is pushed before the ingress stops: its shutdown must push every attempt.
        interval: Duration::from_secs(3600),
        export_timeout: Duration::from_secs(10),
    });
    let ingress = common::start_ingress_with(ic).await;
    let meter = common::start_meter(common::meter_config(&topic, &db)).await;
    let http = reqwest::Client::new();
    chat(&http, ingress.addr, "vm-openai", None).await;
    chat(&http, ingress.addr, "vm-openai", None).await;
    chat(&http, ingress.addr, "vm-fallback", None).await;
    assert_eq!(
        common::wait_for_count(&format!("SELECT count() FROM {db}.usage_events FINAL"), 4, Duration::from_secs(30))
            .await,
        4
    );
    ingress.stop().await;
    let pushed = common::eventually(Duration::from_secs(30), || async { !got.lock().unwrap().is_empty() }).await;
    assert!(pushed, "no metric export arrived");
    let sums = got.lock().unwrap().clone();

    // Per instrument and series, what ClickHouse holds for the same attempts.
    let rows = common::ch(&format!(
        "SELECT virtual_model, provider, model, status, sum(input_tokens), sum(output_tokens), sum(cost_nanos), count() \
         FROM {db}.usage_events FINAL GROUP BY virtual_model, provider, model, status ORDER BY virtual_model, provider FORMAT TSV"
    ))
    .await;
    assert_eq!(rows.lines().count(), 3, "{rows}");
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (vm, provider, model, status) = (f[0], f[1], f[2], f[3]);
        let kind = if provider == "anthropic-mock" { "anthropic" } else { "openai" };
        let mut base = vec![
            "gen_ai.operation.name=chat".to_owned(),
            format!("gen_ai.provider.name={kind}"),
            format!("gen_ai.request.model={vm}"),
            format!("gen_ai.response.model={model}"),
            format!("tollgate.provider={provider}"),
        ];
        if status != "ok" {
            base.push(format!("error.type={status}"));
        }
        let with = |extra: &str| {
            let mut a = base.clone();
            if !extra.is_empty() {
                a.push(extra.to_owned());
            }
            a.sort();
            a.join(",")
        };
        let get = |name: &str, extra: &str| {
            *sums.get(&(name.to_owned(), with(extra))).unwrap_or_else(|| panic!("no {name} {}: {sums:#?}", with(extra)))
        };
        let n: u64 = f[7].parse().unwrap();
        assert_eq!(get("gen_ai.client.token.usage", "gen_ai.token.type=input"), (f[4].parse().unwrap(), n), "{line}");
        assert_eq!(get("gen_ai.client.token.usage", "gen_ai.token.type=output"), (f[5].parse().unwrap(), n), "{line}");
        assert_eq!(get("tollgate.usage.cost", "").0, f[6].parse::<f64>().unwrap(), "{line}");
        assert_eq!(get("tollgate.usage.requests", "").0, n as f64, "{line}");
        assert_eq!(get("gen_ai.client.operation.duration", "").1, n, "{line}");
    }
    meter.stop().await;
    mock.stop().await;
}
