//! The ingress's one error type at the client boundary, with its HTTP mapping and OpenAI-style body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_schemas::decision::RuleKind;
use tollgate_schemas::usage::ApiFormat;

use crate::gate::Blocked;

/// Where an error came from, for the body's `type` and for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Client,
    Provider,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body is larger than the {limit} bytes this gateway accepts")]
    BodyTooLarge { limit: usize },
    #[error("request headers are larger than the {limit} bytes this gateway accepts")]
    HeadersTooLarge { limit: usize },
    #[error("missing required identity headers: {}", .0.join(", "))]
    MissingEnvelope(Vec<String>),
    #[error("the model `{0}` does not exist or is not served by this gateway")]
    UnknownModel(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// An identity header the request's API key does not let its caller set, or sets otherwise.
    #[error("{0}")]
    IdentityConflict(String),
    #[error("every target of `{model}` is unavailable (circuit open); retry in {retry_after_secs} s")]
    Unavailable { model: String, retry_after_secs: u64 },
    #[error("provider {provider} answered HTTP {status}")]
    ProviderStatus { provider: String, status: u16, body: bytes::Bytes, content_type: Option<HeaderValue> },
    #[error("provider {provider} failed: {message}")]
    ProviderFailed {
        provider: String,
        message: String,
        /// The request reached the provider (it may have billed it); false when no connection was made.
        reached: bool,
    },
    #[error("provider {provider} did not answer within {ms} ms")]
    ProviderTimeout { provider: String, ms: u64 },
    #[error("{}", .0.message())]
    Blocked(Box<Blocked>),
    /// A record the gateway could not make durable (the broker is away); sending the same
    /// request again is safe (outcomes are idempotent on their id).
    #[error("not recorded, retry: {0}")]
    NotRecorded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IngressError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            IngressError::MalformedJson(_) | IngressError::InvalidRequest(_) | IngressError::MissingEnvelope(_) => {
                StatusCode::BAD_REQUEST
            }
            IngressError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngressError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            IngressError::UnknownModel(_) => StatusCode::NOT_FOUND,
            IngressError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngressError::Forbidden(_) | IngressError::IdentityConflict(_) => StatusCode::FORBIDDEN,
            IngressError::Unavailable { .. } | IngressError::NotRecorded(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngressError::Blocked(_) => StatusCode::TOO_MANY_REQUESTS,
            IngressError::ProviderStatus { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            IngressError::ProviderFailed { .. } => StatusCode::BAD_GATEWAY,
            IngressError::ProviderTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            IngressError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn origin(&self) -> Origin {
        match self {
            IngressError::MalformedJson(_)
            | IngressError::InvalidRequest(_)
            | IngressError::BodyTooLarge { .. }
            | IngressError::HeadersTooLarge { .. }
            | IngressError::MissingEnvelope(_)
            | IngressError::UnknownModel(_)
            | IngressError::Unauthorized(_)
            | IngressError::Forbidden(_)
            | IngressError::IdentityConflict(_)
            | IngressError::Blocked(_) => Origin::Client,
            IngressError::ProviderStatus { .. }
            | IngressError::ProviderFailed { .. }
            | IngressError::ProviderTimeout { .. }
            | IngressError::Unavailable { .. } => Origin::Provider,
            IngressError::Internal(_) | IngressError::NotRecorded(_) => Origin::Internal,
        }
    }

    /// Whether a provider may have billed the attempt that failed this way: it timed out, or
    /// the request reached the provider and the answer was lost or unreadable. An HTTP error
    /// status is the provider refusing the request, which it does not bill.
    pub fn may_be_billed(&self) -> bool {
        match self {
            IngressError::ProviderTimeout { .. } => true,
            IngressError::ProviderFailed { reached, .. } => *reached,
            _ => false,
        }
    }

    /// Whether the same request may succeed if sent again (to this or another target).
    pub fn retryable(&self) -> bool {
        match self {
            IngressError::ProviderStatus { status, .. } => *status == 429 || *status >= 500,
            IngressError::ProviderFailed { .. }
            | IngressError::ProviderTimeout { .. }
            | IngressError::Unavailable { .. }
            | IngressError::NotRecorded(_) => true,
            IngressError::MalformedJson(_)
            | IngressError::InvalidRequest(_)
            | IngressError::BodyTooLarge { .. }
            | IngressError::HeadersTooLarge { .. }
            | IngressError::MissingEnvelope(_)
            | IngressError::UnknownModel(_)
            | IngressError::Unauthorized(_)
            | IngressError::Forbidden(_)
            | IngressError::IdentityConflict(_)
            // Not within this request; the 429 says when (`Retry-After`).
            | IngressError::Blocked(_)
            | IngressError::Internal(_) => false,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            IngressError::UnknownModel(_) => "not_found_error",
            IngressError::Unauthorized(_) => "authentication_error",
            IngressError::Forbidden(_) | IngressError::IdentityConflict(_) => "permission_error",
            IngressError::Unavailable { .. } => "overloaded_error",
            // OpenAI's own names: a spent budget is `insufficient_quota`, a rate `rate_limit_error`.
            IngressError::Blocked(b) if b.rule_kind == RuleKind::Budget => "insufficient_quota",
            IngressError::Blocked(_) => "rate_limit_error",
            IngressError::BodyTooLarge { .. } | IngressError::HeadersTooLarge { .. } => "request_too_large",
            _ => match self.origin() {
                Origin::Client => "invalid_request_error",
                Origin::Provider => "upstream_error",
                Origin::Internal => "internal_error",
            },
        }
    }

    /// Anthropic's error `type` names for the same conditions.
    fn anthropic_type(&self) -> &'static str {
        match self.status_code().as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 | 431 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            IngressError::MissingEnvelope(_) => Some("missing_identity_headers"),
            IngressError::UnknownModel(_) => Some("model_not_found"),
            IngressError::MalformedJson(_) => Some("malformed_json"),
            IngressError::Unauthorized(_) => Some("invalid_api_key"),
            IngressError::Forbidden(_) => Some("model_not_allowed"),
            IngressError::IdentityConflict(_) => Some("identity_conflict"),
            IngressError::ProviderTimeout { .. } => Some("upstream_timeout"),
            IngressError::NotRecorded(_) => Some("not_recorded"),
            IngressError::Blocked(b) => Some(match b.rule_kind {
                RuleKind::RateLimit => "rate_limit_exceeded",
                RuleKind::Budget => "budget_exceeded",
                RuleKind::Guard => "guard_triggered",
            }),
            _ => None,
        }
    }
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        self.into_response_for(ApiFormat::OpenAi)
    }
}

impl IngressError {
    /// The JSON error body in the client's format (OpenAI's `{"error": {...}}` or Anthropic's
    /// `{"type": "error", "error": {...}}`), with the extra fields some errors carry.
    pub fn body_for(&self, format: ApiFormat) -> serde_json::Value {
        let mut body = match format {
            ApiFormat::OpenAi => json!({"error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": null,
                "code": self.code(),
            }}),
            ApiFormat::Anthropic => json!({"type": "error", "error": {
                "type": self.anthropic_type(),
                "message": self.to_string(),
            }}),
        };
        if let IngressError::MissingEnvelope(missing) = self {
            body["error"]["missing_headers"] = json!(missing);
        }
        if let IngressError::Blocked(b) = self {
            let e = &mut body["error"];
            e["rule"] = json!(b.rule_id);
            e["rule_kind"] = json!(b.rule_kind.as_str());
            e["scope"] = json!(b.scope);
            e["measure"] = json!(b.measure.as_str());
            e["limit"] = json!(b.limit);
            e["observed"] = json!(b.observed);
            e["action"] = json!(b.action);
            e["retry_after_seconds"] = json!(b.retry_after_secs);
        }
        body
    }

    /// The error in the wire format the client speaks (OpenAI's or Anthropic's error body).
    pub fn into_response_for(self, format: ApiFormat) -> Response {
        let status = self.status_code();
        // A provider's own error body is passed through when it is already in the client's
        // format; after a translated call it is re-shaped, keeping the provider's message.
        if let IngressError::ProviderStatus { body, content_type, .. } = self {
            let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            let anthropic_shaped =
                parsed.as_ref().is_some_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("error"));
            let openai_shaped = !anthropic_shaped && parsed.as_ref().is_some_and(|v| v["error"]["message"].is_string());
            let native = match format {
                ApiFormat::OpenAi => openai_shaped,
                ApiFormat::Anthropic => anthropic_shaped,
            };
            if native || !(openai_shaped || anthropic_shaped) {
                let mut resp = (status, body).into_response();
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                return resp;
            }
            let err = parsed.as_ref().map(|v| &v["error"]).unwrap_or(&serde_json::Value::Null);
            let message = err["message"].as_str().unwrap_or("provider error");
            let kind = err["type"].as_str().unwrap_or("api_error");
            let body = match format {
                ApiFormat::OpenAi => {
                    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
                }
                ApiFormat::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
            };
            return (status, Json(body)).into_response();
        }
        let body = self.body_for(format);
        let retry_after = match &self {
            IngressError::Unavailable { retry_after_secs, .. } => Some(*retry_after_secs),
            IngressError::Blocked(b) => Some(b.retry_after_secs),
            IngressError::NotRecorded(_) => Some(1),
            _ => None,
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn body_of(e: IngressError, format: ApiFormat) -> (u16, serde_json::Value) {
        let resp = e.into_response_for(format);
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn provider_error(body: serde_json::Value) -> IngressError {
        IngressError::ProviderStatus {
            provider: "p".into(),
            status: 529,
            body: bytes::Bytes::from(body.to_string()),
            content_type: None,
        }
    }

    #[tokio::test]
    async fn provider_errors_reach_the_client_in_its_own_format() {
        let anthropic = json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}});
        let (status, b) = body_of(provider_error(anthropic.clone()), ApiFormat::Anthropic).await;
        assert_eq!((status, b), (529, anthropic.clone()), "native: unchanged");
        let (_, b) = body_of(provider_error(anthropic), ApiFormat::OpenAi).await;
        assert_eq!(b, json!({"error": {"message": "busy", "type": "overloaded_error", "param": null, "code": null}}));
        let openai =
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}});
        let (_, b) = body_of(provider_error(openai), ApiFormat::Anthropic).await;
        assert_eq!(b, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}));
    }

    #[tokio::test]
    async fn a_blocked_request_is_429_naming_rule_scope_limit_and_observed_in_either_format() {
        let blocked = Blocked {
            rule_id: "intern-sandbox-cap".into(),
            rule_kind: RuleKind::Budget,
            scope: "X-TFY-Project=intern-sandbox".into(),
            measure: tollgate_schemas::decision::Measure::CostNanos,
            limit: 500_000_000_000,
            observed: 500_250_000_000,
            action: "hard_block".into(),
            retry_after_secs: 3600,
            local: false,
            waited_ms: None,
            queue_full: false,
        };
        let resp = IngressError::Blocked(Box::new(blocked.clone())).into_response_for(ApiFormat::OpenAi);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3600");
        let (status, b) = body_of(IngressError::Blocked(Box::new(blocked.clone())), ApiFormat::OpenAi).await;
        assert_eq!(status, 429);
        let e = &b["error"];
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("insufficient_quota"), Some("budget_exceeded")));
        assert_eq!(e["rule"], "intern-sandbox-cap");
        assert_eq!(e["scope"], "X-TFY-Project=intern-sandbox");
        assert_eq!((e["limit"].as_i64(), e["observed"].as_i64()), (Some(500_000_000_000), Some(500_250_000_000)));
        assert_eq!((e["measure"].as_str(), e["action"].as_str()), (Some("cost_nanos"), Some("hard_block")));
        assert_eq!(e["retry_after_seconds"], 3600);
        assert_eq!(
            e["message"],
            "budget intern-sandbox-cap exceeded for X-TFY-Project=intern-sandbox: $500.25 of $500.00; retry in 3600 s"
        );
        let (_, b) = body_of(IngressError::Blocked(Box::new(blocked)), ApiFormat::Anthropic).await;
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "rate_limit_error");
        assert_eq!(b["error"]["rule"], "intern-sandbox-cap");
        assert_eq!(b["error"]["observed"], 500_250_000_000_i64);
    }

    #[tokio::test]
    async fn missing_headers_are_named_in_the_body() {
        let (status, b) = body_of(IngressError::MissingEnvelope(vec!["X-TFY-Team".into()]), ApiFormat::OpenAi).await;
        assert_eq!(status, 400);
        assert_eq!(b["error"]["missing_headers"], json!(["X-TFY-Team"]));
        assert_eq!(b["error"]["code"], "missing_identity_headers");
    }
}
