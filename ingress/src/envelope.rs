//! Reads the identity envelope (project, team, user, session, workflow, environment, cost centre) from headers.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use tollgate_schemas::policy::EnvelopeConfig;
use tollgate_schemas::usage::Envelope;

use crate::error::IngressError;

/// Longest envelope value kept; longer ones are refused rather than truncated, because a
/// truncated session id would merge sessions.
pub const MAX_VALUE_LEN: usize = 256;

/// Extracts the envelope; values the request lacks come from `defaults` (the API key's
/// metadata, by header name); every required header still missing is named in one error.
pub fn extract(
    headers: &HeaderMap,
    cfg: &EnvelopeConfig,
    defaults: Option<&BTreeMap<String, String>>,
) -> Result<Envelope, IngressError> {
    let mut env = Envelope::default();
    let mut missing = Vec::new();
    for (field, header) in cfg.headers() {
        let value = match headers.get(header) {
            None => None,
            Some(v) => {
                let s = v
                    .to_str()
                    .map_err(|_| IngressError::InvalidRequest(format!("header {header} is not visible ASCII")))?;
                let s = s.trim();
                if s.len() > MAX_VALUE_LEN {
                    return Err(IngressError::InvalidRequest(format!(
                        "header {header} is longer than {MAX_VALUE_LEN} bytes"
                    )));
                }
                (!s.is_empty()).then(|| s.to_owned())
            }
        };
        let value =
            value.or_else(|| defaults?.iter().find(|(k, _)| k.eq_ignore_ascii_case(header)).map(|(_, v)| v.clone()));
        if value.is_none() && cfg.required.iter().any(|r| r == field) {
            missing.push(header.to_owned());
        }
        let slot = match field {
            "project" => &mut env.project,
            "team" => &mut env.team,
            "user_id" => &mut env.user_id,
            "session_id" => &mut env.session_id,
            "workflow_tag" => &mut env.workflow_tag,
            "environment" => &mut env.environment,
            _ => &mut env.cost_center,
        };
        *slot = value;
    }
    if missing.is_empty() { Ok(env) } else { Err(IngressError::MissingEnvelope(missing)) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn cfg(required: &[&str]) -> EnvelopeConfig {
        EnvelopeConfig { required: required.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn reads_the_reference_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-tfy-project", "platform-search".parse().unwrap());
        h.insert("X-TFY-Session-ID", "sess_a3f9c2-b71d-4e".parse().unwrap());
        let env = extract(&h, &cfg(&["project"]), None).unwrap();
        assert_eq!(env.project.as_deref(), Some("platform-search"));
        assert_eq!(env.session_id.as_deref(), Some("sess_a3f9c2-b71d-4e"));
        assert_eq!(env.team, None);
    }

    #[test]
    fn names_every_missing_header() {
        let mut h = HeaderMap::new();
        h.insert("X-TFY-Team", "data-platform".parse().unwrap());
        h.insert("X-TFY-Project", "   ".parse().unwrap());
        let err = extract(&h, &cfg(&["project", "team", "session_id"]), None).unwrap_err();
        match err {
            IngressError::MissingEnvelope(m) => assert_eq!(m, vec!["X-TFY-Project", "X-TFY-Session-ID"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn key_metadata_fills_what_the_request_lacks() {
        let mut h = HeaderMap::new();
        h.insert("X-TFY-Team", "search".parse().unwrap());
        let defaults: BTreeMap<String, String> =
            [("x-tfy-team".into(), "other".into()), ("X-TFY-Project".into(), "p1".into())].into();
        let env = extract(&h, &cfg(&["project", "team"]), Some(&defaults)).unwrap();
        assert_eq!(env.team.as_deref(), Some("search"), "the request's own header wins");
        assert_eq!(env.project.as_deref(), Some("p1"));
    }

    #[test]
    fn header_names_are_configurable() {
        let mut c = cfg(&["team"]);
        c.team = "X-Acme-Team".into();
        let mut h = HeaderMap::new();
        h.insert("x-acme-team", "search".parse().unwrap());
        assert_eq!(extract(&h, &c, None).unwrap().team.as_deref(), Some("search"));
    }
}
