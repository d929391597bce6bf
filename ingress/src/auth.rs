//! Authenticates the caller's API key (`Authorization: Bearer` or `x-api-key`) against the hashed keys in policy.

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use tollgate_schemas::policy::{ApiKey, Policy};

use crate::error::IngressError;

/// The key the request presented, if any.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok())).map(str::trim).filter(|k| !k.is_empty())
}

/// The caller's key. `Ok(None)` for a request without a key when the policy says
/// `allow_anonymous: true`; a key that is presented is always checked.
pub fn authenticate<'p>(policy: &'p Policy, headers: &HeaderMap) -> Result<Option<&'p ApiKey>, IngressError> {
    let Some(key) = presented(headers) else {
        if policy.allow_anonymous {
            return Ok(None);
        }
        return Err(IngressError::Unauthorized(
            "no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`".into(),
        ));
    };
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    policy.api_keys.get(&digest).map(Some).ok_or_else(|| IngressError::Unauthorized("invalid API key".into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::path::Path;

    fn demo() -> Policy {
        Policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy")).unwrap()
    }

    #[test]
    fn finds_keys_by_hash_in_either_header() {
        let p = demo();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer tg-demo-key".parse().unwrap());
        assert_eq!(authenticate(&p, &h).unwrap().unwrap().id, "demo-search");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "tg-intern-key".parse().unwrap());
        assert_eq!(authenticate(&p, &h).unwrap().unwrap().id, "intern");
    }

    #[test]
    fn refuses_missing_and_forged_keys() {
        let p = demo();
        assert!(matches!(authenticate(&p, &HeaderMap::new()), Err(IngressError::Unauthorized(_))));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer tg-demo-kez".parse().unwrap());
        assert!(matches!(authenticate(&p, &h), Err(IngressError::Unauthorized(m)) if m == "invalid API key"));
    }

    #[test]
    fn only_an_anonymous_gateway_serves_requests_without_a_key() {
        let mut p = demo();
        p.api_keys.clear();
        assert!(matches!(authenticate(&p, &HeaderMap::new()), Err(IngressError::Unauthorized(_))));
        p.allow_anonymous = true;
        assert!(authenticate(&p, &HeaderMap::new()).unwrap().is_none());
        // A key that is presented is still checked.
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer tg-demo-key".parse().unwrap());
        assert!(matches!(authenticate(&p, &h), Err(IngressError::Unauthorized(_))));
    }
}
