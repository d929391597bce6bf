#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::path::Path;

use super::*;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy")
}

#[test]
fn the_demo_policy_and_the_reference_yaml_load_as_written() {
    let p = Policy::load_dir(&demo_dir()).unwrap_or_else(|e| panic!("{e}"));
    let vm = &p.virtual_models["intent-fast"];
    assert_eq!(vm.rule_type, LbRuleType::WeightBased);
    assert_eq!(vm.rules.iter().map(|r| r.weight.unwrap()).collect::<Vec<_>>(), vec![90, 10]);
    assert_eq!(vm.fallbacks[0], Target { provider: "openai".into(), model: "gpt-4o-mini".into() });
    assert_eq!(vm.circuit_breaker.as_ref().unwrap().cooldown_seconds, 30);
    let rl = &p.rate_limits[0].rules;
    assert_eq!(rl[0].limit.tokens, Some(200_000));
    assert_eq!(rl[0].when.metadata["X-TFY-Environment"], "production");
    assert_eq!(rl[1].when.subjects["type"], "user");
    assert_eq!(rl[2].on_breach, "fallback_to_haiku");
    let b = &p.budgets[0].budgets;
    assert_eq!(b[0].ceiling_usd, 4_000_000_000_000);
    assert_eq!(b[0].alerts.iter().map(|a| a.at_pct).collect::<Vec<_>>(), vec![80, 100]);
    assert_eq!(b[1].ceiling_usd, 500_000_000_000);
    let haiku = p.price(&vm.rules[0].target).unwrap();
    assert_eq!(haiku.input_usd_per_mtok.0, 1_000_000_000);
    assert_eq!(haiku.output_usd_per_mtok.0, 5_000_000_000);
    assert_eq!(p.envelope.session_id, "X-TFY-Session-ID");
    assert_eq!(p.envelope.required.len(), 7);
}

#[test]
fn errors_name_file_line_and_field() {
    let text = "type: tollgate-providers\nproviders:\n  - name: a\n    kind: openai\n    base_url: http://x\n---\n# second\nname: vm\ntype: gateway-load-balancing-config\nrule_type: weight-based\nrules:\n  - id: r\n    weight: 1\n    target: {provider: a, model: m}\n    timeout: 5\n";
    let err = Policy::from_sources([(Path::new("p.yaml"), text), (Path::new("k.yaml"), ANONYMOUS)]).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    let e = &err.0[0];
    assert_eq!(e.file, Path::new("p.yaml"));
    assert_eq!(e.line, 15, "{e}");
    assert_eq!(e.field, "rules[0].timeout");
    assert!(e.message.contains("unknown field `timeout`"), "{e}");
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let a = "type: tollgate-providers\nproviders:\n  - {name: a, kind: grpc, base_url: http://x}\n";
    let b = "name: vm\ntype: gateway-load-balancing-config\nrule_type: weight-based\nrules:\n  - id: r\n    weight: 1\n    target: {provider: nope, model: m}\n";
    let c = "type: what-is-this\n";
    let err = Policy::from_sources([(Path::new("a.yaml"), a), (Path::new("b.yaml"), b), (Path::new("c.yaml"), c)])
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("a.yaml:3: providers[0].kind: unknown variant `grpc`"), "{text}");
    assert!(text.contains("b.yaml:1: rules[0].target.provider: unknown provider \"nope\""), "{text}");
    assert!(text.contains("b.yaml:1: rules[0].target.model: nope/m has no price"), "{text}");
    assert!(text.contains("c.yaml:1: type: unknown document type \"what-is-this\""), "{text}");
}

#[test]
fn unpriced_targets_are_refused_unless_allowed() {
    let base = "type: tollgate-providers\nproviders:\n  - {name: local, kind: openai, base_url: http://127.0.0.1:1/v1}\n---\nname: vm\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules:\n  - {id: r, priority: 1, target: {provider: local, model: llama}}\n---\ntype: tollgate-price-card\nversion: v1\nprices: []\n";
    assert!(Policy::from_sources([(Path::new("x.yaml"), base), (Path::new("k.yaml"), ANONYMOUS)]).is_err());
    let allowed = format!("{base}unpriced_ok: [local/llama]\n");
    assert!(Policy::from_sources([(Path::new("x.yaml"), allowed.as_str()), (Path::new("k.yaml"), ANONYMOUS)]).is_ok());
}

#[test]
fn windows_parse() {
    assert_eq!(parse_window_seconds("1h"), Ok(3600));
    assert_eq!(parse_window_seconds("1d"), Ok(86_400));
    assert_eq!(parse_window_seconds("30s"), Ok(30));
    assert!(parse_window_seconds("1y").is_err());
    assert!(parse_window_seconds("h").is_err());
    assert!(parse_window_seconds("0m").is_err());
}

/// A keys document that opens the gateway, for tests about other documents.
const ANONYMOUS: &str = "type: tollgate-api-keys\nallow_anonymous: true\n";

const ONE_MODEL: &str = "type: tollgate-providers\nproviders: [{name: a, kind: openai, base_url: \"http://x\"}]\n---\ntype: tollgate-price-card\nversion: v\nprices: [{provider: a, model: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]\n---\nname: vm\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules: [{id: r, priority: 1, target: {provider: a, model: m}}]\n---\ntype: tollgate-envelope\nrequired: [project]\n";

#[test]
fn a_gateway_without_keys_is_only_an_explicit_choice() {
    let err = Policy::from_sources([(Path::new("m.yaml"), ONE_MODEL)]).unwrap_err().to_string();
    assert!(err.contains("m.yaml:0: tollgate-api-keys: no tollgate-api-keys document"), "{err}");
    let empty = "type: tollgate-api-keys\nkeys: []\n";
    let err =
        Policy::from_sources([(Path::new("m.yaml"), ONE_MODEL), (Path::new("k.yaml"), empty)]).unwrap_err().to_string();
    assert!(err.contains("no API key is listed"), "{err}");
    let p = Policy::from_sources([(Path::new("m.yaml"), ONE_MODEL), (Path::new("k.yaml"), ANONYMOUS)]).unwrap();
    assert!(p.allow_anonymous && p.api_keys.is_empty());
}

#[test]
fn keys_name_what_they_may_call_and_what_their_callers_set() {
    let key = |extra: &str| {
        format!(
            "type: tollgate-api-keys\nkeys:\n  - id: k\n    sha256: {}\n    subject: {{type: team, id: t}}\n{extra}",
            "a".repeat(64)
        )
    };
    let load =
        |keys: String| Policy::from_sources([(Path::new("m.yaml"), ONE_MODEL), (Path::new("k.yaml"), keys.as_str())]);
    // A concrete model in `models` needs direct_models, and a known provider.
    let err = load(key("    models: [vm, a/m]\n")).unwrap_err().to_string();
    assert!(
        err.contains("keys[id=k].models: \"a/m\" is a concrete model: the key needs `direct_models: true`"),
        "{err}"
    );
    let err = load(key("    models: [b/m]\n    direct_models: true\n")).unwrap_err().to_string();
    assert!(err.contains("unknown provider \"b\""), "{err}");
    let p = load(key("    models: [vm, a/m]\n    direct_models: true\n")).unwrap();
    let k = p.api_keys.values().next().unwrap();
    assert!(k.may_use("a/m") && !k.may_use("a/other"));
    // caller_sets names envelope fields, and a required field must come from the key or its caller.
    let err = load(key("    models: [vm]\n    caller_sets: [session_id, planet]\n")).unwrap_err().to_string();
    assert!(err.contains("keys[0].caller_sets: unknown envelope field \"planet\""), "{err}");
    let err = load(key("    models: [vm]\n    caller_sets: [session_id]\n")).unwrap_err().to_string();
    assert!(err.contains("required envelope field \"project\" is neither declared by the key"), "{err}");
    assert!(load(key("    models: [vm]\n    caller_sets: [session_id]\n    metadata: {X-TFY-Project: p}\n")).is_ok());
    assert!(load(key("    models: [vm]\n")).is_ok(), "by default an undeclared field is the caller's");
}

#[test]
fn api_keys_are_hashed_and_checked() {
    let p = Policy::load_dir(&demo_dir()).unwrap();
    let keys = &p.api_keys;
    let demo = &keys["e7aab4b439baa8c615eb31e352f5b4259085813fbcd95a65a5a346a6bdfb1bb3"];
    assert_eq!(demo.id, "demo-search");
    assert_eq!(demo.subject.kind, SubjectKind::User);
    assert!(demo.may_use("intent-fast"));
    let intern = keys.values().find(|k| k.id == "intern").unwrap();
    assert!(intern.may_use("chat-default") && !intern.may_use("intent-fast"));
    assert!(intern.direct_models);

    let bad = "type: tollgate-api-keys\nkeys:\n  - {id: a, sha256: NOTHEX, subject: {type: user, id: u}, models: [nope]}\n  - {id: b, sha256: e7aab4b439baa8c615eb31e352f5b4259085813fbcd95a65a5a346a6bdfb1bb3, subject: {type: user, id: u}, models: [nope]}\n";
    let err = Policy::from_sources([(Path::new("k.yaml"), bad)]).unwrap_err().to_string();
    assert!(err.contains("k.yaml:1: keys[0].sha256: must be 64 lower-case hex"), "{err}");
    assert!(err.contains("k.yaml:1: keys[id=b].models: unknown virtual model \"nope\""), "{err}");
}

#[test]
fn fallback_statuses_default_to_429_and_5xx() {
    let p = Policy::load_dir(&demo_dir()).unwrap();
    let vm = &p.virtual_models["intent-fast"];
    assert!(vm.falls_back_on(429) && vm.falls_back_on(503) && !vm.falls_back_on(400));
    let text = "type: tollgate-providers\nproviders: [{name: a, kind: openai, base_url: \"http://x\"}]\n---\ntype: tollgate-price-card\nversion: v\nprices: [{provider: a, model: m, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]\n---\nname: vm\ntype: gateway-load-balancing-config\nrule_type: priority-based\nrules: [{id: r, priority: 1, target: {provider: a, model: m}}]\nretries: {attempts: 2, backoff_ms: 50}\nfallback_on: [503]\n";
    let p = Policy::from_sources([(Path::new("x.yaml"), text), (Path::new("k.yaml"), ANONYMOUS)]).unwrap();
    let vm = &p.virtual_models["vm"];
    assert_eq!(vm.retries, Some(RetryConfig { attempts: 2, backoff_ms: 50 }));
    assert!(vm.falls_back_on(503) && !vm.falls_back_on(429));
}

#[test]
fn the_reference_rules_compile_as_written() {
    use crate::decision::{Measure, RuleKind};
    use crate::rules::{Action, FallbackTarget, Field, Period, Scope, Window};
    let p = Policy::load_dir(&demo_dir()).unwrap();
    let rule = |id: &str| p.rules.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no rule {id}"));

    let loop_guard = rule("per-session-loop-guard");
    assert_eq!(loop_guard.scope, Scope::Field(Field::SessionId));
    assert_eq!(loop_guard.matchers, vec![(Field::Environment, "production".to_owned())]);
    assert_eq!((loop_guard.measure, loop_guard.limit), (Measure::Tokens, 200_000));
    assert_eq!(loop_guard.window, Window::Sliding { seconds: 3600 });
    assert_eq!(loop_guard.action, Action::HardBlock);

    let burst = rule("per-user-burst");
    assert_eq!(burst.subject_kind, Some(SubjectKind::User));
    assert_eq!((burst.scope.clone(), burst.action.clone()), (Scope::Field(Field::UserId), Action::QueueThen429));
    assert_eq!(burst.window, Window::Sliding { seconds: 86_400 });

    let classify = rule("classify-intent-soft-cap");
    assert_eq!((classify.measure, classify.limit, classify.scope.clone()), (Measure::Requests, 100_000, Scope::Global));
    assert_eq!(
        classify.action,
        Action::FallbackTo(FallbackTarget::Concrete(Target {
            provider: "anthropic".into(),
            model: "claude-haiku-4-5".into()
        }))
    );

    let search = rule("platform-search-monthly");
    assert_eq!(search.kind, RuleKind::Budget);
    assert_eq!(search.scope, Scope::Named("X-TFY-Project=platform-search".into()));
    assert_eq!((search.measure, search.limit), (Measure::CostNanos, 4_000_000_000_000));
    assert_eq!(search.window, Window::Calendar { period: Period::Monthly, timezone: "UTC".into() });
    assert_eq!(search.action, Action::FallbackToCheaper);
    assert_eq!(search.alerts.iter().map(|a| a.at_pct).collect::<Vec<_>>(), vec![80, 100]);
    assert_eq!(rule("intern-sandbox-cap").action, Action::HardBlock);

    let guard = rule("session-loop-guard");
    assert_eq!((guard.kind, guard.scope.clone()), (RuleKind::Guard, Scope::Field(Field::SessionId)));
    assert!(p.rules.iter().all(|r| r.id != "tokenizer-drift"), "alert-only guards are not request rules");
    assert_eq!(p.guards.len(), 4);
    assert_eq!(p.alert_channels.len(), 3);
}

#[test]
fn rule_errors_name_the_field() {
    let text = "type: gateway-rate-limit-config\nname: x\nrules:\n  - id: a\n    when: {metadata: {X-Nope: 1}, subjects: {kind: user}}\n    limit: {tokens: 5, window: 1h, scope: planet}\n    on_breach: explode\n  - id: a\n    limit: {requests: 5, window: 1h}\n    on_breach: fallback_to_unicorn\n  - id: team/a\n    limit: {requests: 5, window: 1h}\n    on_breach: hard_block\n---\ntype: gateway-budget-config\nname: b\nbudgets:\n  - id: b1\n    scope: {metadata: {X-TFY-Project: p}}\n    ceiling_usd: 10\n    window: monthly\n    timezone: Mars/Olympus\n    alerts: [{at_pct: 50, notify: [\"slack:#nowhere\"]}]\n    on_exceed: hard_block\n";
    let err = Policy::from_sources([(Path::new("r.yaml"), text)]).unwrap_err().to_string();
    for want in [
        "r.yaml:1: rules[0].when.metadata.X-Nope: not an envelope header",
        "r.yaml:1: rules[0].when.subjects: unknown key \"kind\"",
        "r.yaml:1: rules[0].limit.scope: unknown scope \"planet\"",
        "r.yaml:1: rules[0].on_breach: unknown action \"explode\"",
        "r.yaml:1: rules[1].id: rule id \"a\" is used by another",
        "r.yaml:1: rules[1].on_breach: fallback_to_unicorn: no virtual model",
        "r.yaml:1: rules[2].id: rule id \"team/a\" must be non-empty and without '/'",
        "r.yaml:15: budgets[0].timezone: unknown time zone \"Mars/Olympus\"",
        "r.yaml:15: budgets[0].alerts[0].notify[0]: no channel \"slack:#nowhere\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}
