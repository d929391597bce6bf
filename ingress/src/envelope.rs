//! Reads the identity envelope (project, team, user, session, workflow, environment, cost centre) from headers.

use axum::http::HeaderMap;
use tollgate_schemas::policy::{ApiKey, EnvelopeConfig, EnvelopeConflict};
use tollgate_schemas::usage::Envelope;

use crate::error::IngressError;

/// Longest envelope value kept; longer ones are refused rather than truncated, because a
/// truncated session id would merge sessions.
pub const MAX_VALUE_LEN: usize = 256;

/// Extracts the envelope. With a key, the key's own values are authoritative and a header sets
/// only what the key leaves to its caller (`ApiKey::resolve_field`); a conflicting header is
/// refused (403) naming the header and the key's value. Without a key (an anonymous gateway) the
/// headers are all there is. Every required header still missing is named in one error (400).
pub fn extract(headers: &HeaderMap, cfg: &EnvelopeConfig, key: Option<&ApiKey>) -> Result<Envelope, IngressError> {
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
        let value = match key {
            None => value,
            Some(k) => k.resolve_field(field, header, value).map_err(|c| match c {
                EnvelopeConflict::Pinned { header, key_value } => IngressError::IdentityConflict(format!(
                    "header {header} is {key_value:?} for this API key; a request may leave it out or repeat it, not change it"
                )),
                EnvelopeConflict::NotCallers { header } => {
                    IngressError::IdentityConflict(format!("this API key does not let its caller set {header}"))
                }
            })?,
        };
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
    use tollgate_schemas::policy::{Subject, SubjectKind};

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

    fn key(subject: &str, metadata: &[(&str, &str)], caller_sets: Option<&[&str]>) -> ApiKey {
        let (kind, id) = subject.split_once(':').unwrap();
        ApiKey {
            id: "k".into(),
            sha256: "0".repeat(64),
            subject: Subject {
                kind: if kind == "user" { SubjectKind::User } else { SubjectKind::Team },
                id: id.into(),
            },
            models: vec!["*".into()],
            direct_models: false,
            metadata: metadata.iter().map(|(h, v)| ((*h).to_owned(), (*v).to_owned())).collect(),
            caller_sets: caller_sets.map(|f| f.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn forbidden(r: Result<Envelope, IngressError>) -> String {
        match r {
            Err(IngressError::IdentityConflict(m)) => m,
            other => panic!("expected 403, got {other:?}"),
        }
    }

    #[test]
    fn a_keys_own_values_are_authoritative() {
        let k = key("team:interns", &[("x-tfy-project", "intern-sandbox"), ("X-TFY-Environment", "development")], None);
        let c = cfg(&["project"]);
        // Absent or repeated: the key's value.
        let mut h = HeaderMap::new();
        h.insert("X-TFY-Environment", "development".parse().unwrap());
        h.insert("X-TFY-Session-ID", "s1".parse().unwrap());
        let env = extract(&h, &c, Some(&k)).unwrap();
        assert_eq!(env.project.as_deref(), Some("intern-sandbox"));
        assert_eq!(env.environment.as_deref(), Some("development"));
        assert_eq!(env.session_id.as_deref(), Some("s1"), "undeclared fields are the caller's");
        // Changed: refused, naming the header and the key's value.
        h.insert("X-TFY-Project", "platform-search".parse().unwrap());
        let m = forbidden(extract(&h, &c, Some(&k)));
        assert!(m.contains("X-TFY-Project") && m.contains("intern-sandbox"), "{m}");
        let mut h = HeaderMap::new();
        h.insert("X-TFY-Environment", "production".parse().unwrap());
        assert!(forbidden(extract(&h, &c, Some(&k))).contains("X-TFY-Environment"));
    }

    #[test]
    fn a_users_key_is_that_user() {
        let k = key("user:u_1", &[], None);
        let mut h = HeaderMap::new();
        assert_eq!(extract(&h, &cfg(&[]), Some(&k)).unwrap().user_id.as_deref(), Some("u_1"));
        h.insert("X-TFY-User-ID", "u_2".parse().unwrap());
        assert!(forbidden(extract(&h, &cfg(&[]), Some(&k))).contains("u_1"));
        // A team's key serving many end users leaves the user to its caller.
        let k = key("team:search", &[], None);
        assert_eq!(extract(&h, &cfg(&[]), Some(&k)).unwrap().user_id.as_deref(), Some("u_2"));
    }

    #[test]
    fn caller_sets_lists_exactly_what_the_caller_may_set() {
        let k = key("user:svc", &[("X-TFY-Team", "search")], Some(&["session_id", "user_id", "team"]));
        let mut h = HeaderMap::new();
        h.insert("X-TFY-User-ID", "end-user-7".parse().unwrap());
        h.insert("X-TFY-Team", "ranking".parse().unwrap());
        let env = extract(&h, &cfg(&[]), Some(&k)).unwrap();
        assert_eq!(env.user_id.as_deref(), Some("end-user-7"), "listed: the subject is only a default");
        assert_eq!(env.team.as_deref(), Some("ranking"), "listed: the metadata is only a default");
        h.insert("X-TFY-Workflow-Tag", "w".parse().unwrap());
        assert!(forbidden(extract(&h, &cfg(&[]), Some(&k))).contains("does not let its caller set X-TFY-Workflow-Tag"));
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
