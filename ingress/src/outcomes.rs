//! `POST /v1/outcomes`: a result a team counts (a merged PR, a resolved ticket), named by the
//! caller's own id, tied to the sessions that produced it, and published to
//! `tollgate.outcomes.v1` for the meter to join with usage (cost per outcome).
//!
//! The caller is authenticated and its envelope bound to its key exactly as on a model request
//! (a header may only add what the key lets it set); the outcome carries that envelope, and the
//! reports attribute to it only usage of the same project. The answer comes once the broker has
//! the record (`acks=all`, idempotent producer): `202` means it is durable; `503` with
//! `Retry-After` means it is not, and posting the same id again is safe (the meter keeps one row
//! per project and outcome id, the copy read last). Nothing is spooled: the caller holds the
//! outcome until it has a `202`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tollgate_runtime::kafka::{Awaited, Outgoing, Producer};
use tollgate_schemas::avro::AvroCodec;
use tollgate_schemas::outcome::{MAX_ID_LEN, MAX_SESSIONS, Outcome, valid_kind};
use tracing::warn;

use crate::error::IngressError;
use crate::publish::KafkaConfig;
use crate::{App, auth, clock, envelope, metrics};

/// Largest outcome body accepted: a thousand session ids of 256 bytes fit.
const MAX_BODY_BYTES: usize = 512 << 10;
/// How far ahead of the gateway's clock `occurred_at` may be (clock skew), and how far back.
const MAX_AHEAD_US: i64 = 5 * 60 * 1_000_000;
const MAX_BEHIND_US: i64 = 400 * 24 * 3600 * 1_000_000;
/// How long a post waits for the broker before answering 503.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes outcomes, each awaited.
pub struct Sink {
    producer: Producer<Awaited>,
    topic: String,
    codec: AvroCodec,
}

impl Sink {
    pub fn new(kafka: &KafkaConfig, topic: String) -> anyhow::Result<Sink> {
        let timeout_ms = DELIVERY_TIMEOUT.as_millis().to_string();
        let settings = [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "2"),
            ("message.timeout.ms", timeout_ms.as_str()),
        ];
        let cc = tollgate_runtime::kafka::client_config(&kafka.brokers, &settings, None, &kafka.extra);
        let producer = Producer::new(&cc, Awaited)?;
        Ok(Sink { producer, topic, codec: Outcome::codec()? })
    }

    async fn publish(&self, o: &Outcome) -> Result<(), IngressError> {
        let payload = self.codec.encode(o).map_err(|e| IngressError::Internal(e.to_string()))?;
        let key = o.key();
        let record = Outgoing { topic: &self.topic, key: Some(key.as_bytes()), payload: Some(&payload), headers: None };
        self.producer.send_awaited(record, DELIVERY_TIMEOUT).await.map(|_| ()).map_err(|e| {
            warn!(error = %e, topic = %self.topic, outcome = %o.outcome_id, "outcome not recorded");
            IngressError::NotRecorded(format!("the broker did not take the outcome ({e})"))
        })
    }
}

/// The body of `POST /v1/outcomes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Posted {
    id: String,
    kind: String,
    #[serde(default)]
    value: Option<f64>,
    /// RFC 3339 (`2026-12-07T10:00:00Z`); the time of the post when absent.
    #[serde(default)]
    occurred_at: Option<String>,
    #[serde(default)]
    session_ids: Vec<String>,
    /// W3C trace ids (32 lowercase hex digits), as usage rows carry them.
    #[serde(default)]
    trace_ids: Vec<String>,
}

pub async fn post(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let resp = match record(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    metrics::outcome(resp.status().as_u16());
    resp
}

async fn record(app: &App, headers: &HeaderMap, body: Body) -> Result<Response, IngressError> {
    let live = app.live();
    let policy = &*live.policy;
    let key = auth::authenticate(policy, headers)?;
    // The outcome names its sessions in the body: a session header is not required here.
    let mut cfg = policy.envelope.clone();
    cfg.required.retain(|f| f != "session_id");
    let envelope = envelope::extract(headers, &cfg, key)?;
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| IngressError::BodyTooLarge { limit: MAX_BODY_BYTES })?;
    let posted: Posted = serde_json::from_slice(&bytes).map_err(|e| IngressError::MalformedJson(e.to_string()))?;
    let now = clock::now_us();
    // A session header names a session too (the key may pin one: a batch job's).
    let mut session_ids = posted.session_ids;
    session_ids.extend(envelope.session_id.clone());
    let outcome = Outcome {
        outcome_id: checked_id("id", posted.id)?,
        kind: if valid_kind(&posted.kind) {
            posted.kind
        } else {
            return Err(invalid(format!(
                "kind must be a word (a lowercase letter, then lowercase letters, digits or _; at most 64), not {:?}",
                posted.kind
            )));
        },
        value: match posted.value {
            Some(v) if !v.is_finite() => return Err(invalid("value must be a finite number".into())),
            v => v,
        },
        occurred_at_us: occurred_at(posted.occurred_at.as_deref(), now)?,
        received_at_us: now,
        envelope,
        api_key_id: key.map(|k| k.id.clone()),
        session_ids: sessions(session_ids)?,
        trace_ids: traces(posted.trace_ids)?,
    };
    if outcome.session_ids.is_empty() && outcome.trace_ids.is_empty() && outcome.envelope.workflow_tag.is_none() {
        return Err(invalid(
            "an outcome needs what produced it: session_ids, trace_ids, or a workflow tag header (its workflow's spend)"
                .into(),
        ));
    }
    app.outcomes.publish(&outcome).await?;
    let body = json!({
        "id": outcome.outcome_id,
        "kind": outcome.kind,
        "recorded": true,
        "session_ids": outcome.session_ids,
        "trace_ids": outcome.trace_ids,
        "project": outcome.envelope.project,
        "workflow_tag": outcome.envelope.workflow_tag,
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn invalid(message: String) -> IngressError {
    IngressError::InvalidRequest(message)
}

/// An id as given: not empty, at most [`MAX_ID_LEN`] bytes, no control characters.
fn checked_id(field: &str, id: String) -> Result<String, IngressError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must be 1 to {MAX_ID_LEN} bytes without control characters, not {:?}",
            id.chars().take(40).collect::<String>()
        )));
    }
    Ok(id)
}

/// The session ids, each checked, sorted and without repeats (one session counts once).
fn sessions(ids: Vec<String>) -> Result<Vec<String>, IngressError> {
    if ids.len() > MAX_SESSIONS {
        return Err(invalid(format!("session_ids has {} entries; at most {MAX_SESSIONS}", ids.len())));
    }
    let mut out = ids.into_iter().map(|s| checked_id("each of session_ids", s)).collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The trace ids, each 32 lowercase hex digits and not all zero, sorted and without repeats.
fn traces(ids: Vec<String>) -> Result<Vec<String>, IngressError> {
    if ids.len() > MAX_SESSIONS {
        return Err(invalid(format!("trace_ids has {} entries; at most {MAX_SESSIONS}", ids.len())));
    }
    let valid = |t: &str| {
        t.len() == 32
            && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && t.bytes().any(|b| b != b'0')
    };
    if let Some(bad) = ids.iter().find(|t| !valid(t)) {
        return Err(invalid(format!(
            "each of trace_ids must be a W3C trace id (32 lowercase hex digits, not all zero), not {:?}",
            bad.chars().take(40).collect::<String>()
        )));
    }
    let mut out = ids;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn occurred_at(text: Option<&str>, now_us: i64) -> Result<i64, IngressError> {
    let Some(text) = text else { return Ok(now_us) };
    let at: jiff::Timestamp = text
        .parse()
        .map_err(|e| invalid(format!("occurred_at must be an RFC 3339 time (2026-12-07T10:00:00Z): {e}")))?;
    let us = at.as_microsecond();
    if us > now_us + MAX_AHEAD_US {
        return Err(invalid(format!("occurred_at {text} is in the future")));
    }
    if us < now_us - MAX_BEHIND_US {
        return Err(invalid(format!("occurred_at {text} is more than 400 days ago")));
    }
    Ok(us)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sessions_are_checked_sorted_and_unique() {
        let s = sessions(vec!["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(s, ["a", "b"]);
        assert!(sessions(vec![String::new()]).is_err());
        assert!(sessions(vec!["x\n".into()]).is_err());
        assert!(sessions(vec!["s".repeat(MAX_ID_LEN + 1)]).is_err());
        assert!(sessions((0..=MAX_SESSIONS).map(|i| i.to_string()).collect()).is_err());
    }

    #[test]
    fn trace_ids_are_w3c_ids() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736".to_owned();
        assert_eq!(traces(vec![id.clone(), id.clone()]).unwrap(), [id]);
        for bad in ["4BF92F3577B34DA6A3CE929D0E0E4736", "00000000000000000000000000000000", "4bf92f", "zz"] {
            assert!(traces(vec![bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn occurred_at_is_rfc3339_and_not_in_the_future() {
        let now = 1_765_100_000_000_000; // 2025-12-07T09:33:20Z
        assert_eq!(occurred_at(None, now).unwrap(), now);
        assert_eq!(occurred_at(Some("2025-12-07T09:33:19Z"), now).unwrap(), now - 1_000_000);
        assert!(occurred_at(Some("2025-12-07T10:33:20Z"), now).is_err());
        assert!(occurred_at(Some("2023-01-01T00:00:00Z"), now).is_err());
        assert!(occurred_at(Some("yesterday"), now).is_err());
    }
}
