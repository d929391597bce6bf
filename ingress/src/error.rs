//! The ingress's one error type at the client boundary, with its HTTP mapping and OpenAI-style body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
    #[error("missing required identity headers: {}", .0.join(", "))]
    MissingEnvelope(Vec<String>),
    #[error("the model `{0}` does not exist or is not served by this gateway")]
    UnknownModel(String),
    #[error("provider {provider} answered HTTP {status}")]
    ProviderStatus { provider: String, status: u16, body: bytes::Bytes, content_type: Option<HeaderValue> },
    #[error("provider {provider} failed: {message}")]
    ProviderFailed { provider: String, message: String },
    #[error("provider {provider} did not answer within {ms} ms")]
    ProviderTimeout { provider: String, ms: u64 },
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
            IngressError::UnknownModel(_) => StatusCode::NOT_FOUND,
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
            | IngressError::MissingEnvelope(_)
            | IngressError::UnknownModel(_) => Origin::Client,
            IngressError::ProviderStatus { .. }
            | IngressError::ProviderFailed { .. }
            | IngressError::ProviderTimeout { .. } => Origin::Provider,
            IngressError::Internal(_) => Origin::Internal,
        }
    }

    /// Whether the same request may succeed if sent again (to this or another target).
    pub fn retryable(&self) -> bool {
        match self {
            IngressError::ProviderStatus { status, .. } => *status == 429 || *status >= 500,
            IngressError::ProviderFailed { .. } | IngressError::ProviderTimeout { .. } => true,
            IngressError::MalformedJson(_)
            | IngressError::InvalidRequest(_)
            | IngressError::BodyTooLarge { .. }
            | IngressError::MissingEnvelope(_)
            | IngressError::UnknownModel(_)
            | IngressError::Internal(_) => false,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            IngressError::UnknownModel(_) => "not_found_error",
            IngressError::BodyTooLarge { .. } => "request_too_large",
            _ => match self.origin() {
                Origin::Client => "invalid_request_error",
                Origin::Provider => "upstream_error",
                Origin::Internal => "internal_error",
            },
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            IngressError::MissingEnvelope(_) => Some("missing_identity_headers"),
            IngressError::UnknownModel(_) => Some("model_not_found"),
            IngressError::MalformedJson(_) => Some("malformed_json"),
            IngressError::ProviderTimeout { .. } => Some("upstream_timeout"),
            _ => None,
        }
    }
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        // A provider's own error body is passed through unchanged: SDKs know how to read it.
        if let IngressError::ProviderStatus { body, content_type, .. } = self {
            let mut resp = (status, body).into_response();
            if let Some(ct) = content_type {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            return resp;
        }
        let mut body = json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "param": null,
            "code": self.code(),
        }});
        if let IngressError::MissingEnvelope(missing) = &self {
            body["error"]["missing_headers"] = json!(missing);
        }
        (status, Json(body)).into_response()
    }
}
