#!/usr/bin/env bash
# policy.sh DIR MOCK_PORT API_KEY MODEL — write the benchmark's policy into DIR: every check of
# the ingress on, every provider the mock provider on 127.0.0.1:MOCK_PORT (OpenAI wire format,
# so the ingress, the floor and LiteLLM all make the same upstream call).
#   - envelope: all seven X-TFY-* fields required;
#   - API keys: one key (only its SHA-256 is written), allowed every model;
#   - routing: virtual model MODEL, weight-based over two targets, a fallback, a circuit breaker;
#   - price card for every target;
#   - rate limits and a budget that match the benchmark request (scopes session, user, workflow,
#     project), with limits it never reaches: the decision gate looks each one up per request.
set -euo pipefail
dir=$1 port=$2 key=$3 model=$4
mkdir -p "$dir"
key_sha="$(printf %s "$key" | sha256sum | cut -d' ' -f1)"

cat >"$dir/envelope.yaml" <<'EOF'
type: tollgate-envelope
required: [project, team, user_id, session_id, workflow_tag, environment, cost_center]
EOF

cat >"$dir/api-keys.yaml" <<EOF
type: tollgate-api-keys
keys:
  - id: bench
    sha256: $key_sha
    subject: {type: user, id: u_8f1c2d}
    models: ["*"]
EOF

cat >"$dir/providers.yaml" <<EOF
type: tollgate-providers
providers:
  - name: openai
    kind: openai
    base_url: http://127.0.0.1:$port/v1
    api_key_env: TOLLGATE_OPENAI_API_KEY
EOF

cat >"$dir/routing.yaml" <<EOF
name: $model
type: gateway-load-balancing-config
rule_type: weight-based
rules:
  - id: primary
    weight: 90
    target: {provider: openai, model: gpt-4o-mini}
    timeout_ms: 8000
  - id: secondary
    weight: 10
    target: {provider: openai, model: gpt-4.1-nano}
    timeout_ms: 8000
fallbacks:
  - {provider: openai, model: gpt-4.1-nano}
circuit_breaker:
  failure_threshold: 5
  window_seconds: 60
  cooldown_seconds: 30
EOF

cat >"$dir/price-card.yaml" <<'EOF'
type: tollgate-price-card
version: "bench"
prices:
  - {provider: openai, model: gpt-4o-mini,  input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60, cached_read_usd_per_mtok: 0.075}
  - {provider: openai, model: gpt-4.1-nano, input_usd_per_mtok: 0.10, output_usd_per_mtok: 0.40, cached_read_usd_per_mtok: 0.025}
EOF

cat >"$dir/rate-limits.yaml" <<'EOF'
name: bench-rate-limits
type: gateway-rate-limit-config
rules:
  - id: per-session
    when:
      metadata: {X-TFY-Environment: production}
    limit: {tokens: 100000000000, window: 1h, scope: session}
    on_breach: hard_block
  - id: per-user
    when:
      subjects: {type: user}
    limit: {tokens: 100000000000, window: 1d, scope: user}
    on_breach: queue_then_429
  - id: per-workflow
    when:
      metadata: {X-TFY-Workflow-Tag: classify-intent}
    limit: {requests: 100000000000, window: 1h}
    on_breach: fallback_to_cheaper
EOF

cat >"$dir/budgets.yaml" <<'EOF'
name: bench-budgets
type: gateway-budget-config
budgets:
  - id: per-project
    scope:
      metadata: {X-TFY-Project: platform-search}
    ceiling_usd: 1000000000
    window: monthly
    on_exceed: hard_block
EOF
