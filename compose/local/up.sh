#!/usr/bin/env bash
# up.sh — run the whole Tollgate stack locally, without Docker: installs what is missing
# (install.sh), builds the release binaries, starts ClickHouse and Tansu (infra.sh), applies
# the ClickHouse migrations, then starts the mock provider, meter, enforcer, ingress and the web
# console, waits for each /healthz, and prints a ready-to-paste demo request and the console's
# address and token file.
# Idempotent: a second run leaves running services alone. Stop with compose/local/down.sh.
# Logs: $STATE_DIR/logs/<service>.log (default .state/logs/).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$HERE/common.sh"

POLICY_DIR="$REPO/compose/policy"
DATABASE=tollgate
HEALTH_DEADLINE=60

# The demo providers all point at the mock; the ingress may insist the key variables exist.
export TOLLGATE_ANTHROPIC_API_KEY="${TOLLGATE_ANTHROPIC_API_KEY:-mock-provider-key}"
export TOLLGATE_OPENAI_API_KEY="${TOLLGATE_OPENAI_API_KEY:-mock-provider-key}"
export RUST_LOG="${RUST_LOG:-info}"

"$HERE/install.sh"

log "building release binaries into $CARGO_TARGET_DIR (cargo build --release --bins)"
(cd "$REPO" && cargo build --release --bins)
for bin in tollgate-ingress tollgate-meter tollgate-enforcer tollgate-mock-provider tollgate-console; do
    [[ -x "$BIN/$bin" ]] || die "$BIN/$bin was not built"
done

"$HERE/infra.sh" start

log "applying ClickHouse migrations (database $DATABASE)"
"$BIN/tollgate-meter" migrate --clickhouse-url "$CLICKHOUSE_URL" --database "$DATABASE" >&2

# start_service NAME PORT BINARY ARGS... — start one Tollgate service (unless it runs) and wait
# until GET http://127.0.0.1:PORT/healthz answers 200.
start_service() {
    local name=$1 port=$2 binary=$3
    shift 3
    if daemon_running "$name" && [[ "$BIN/$binary" -nt "$(pid_file "$name")" ]]; then
        log "note: $binary was rebuilt after $name started; run down.sh then up.sh to restart it"
    fi
    if ! daemon_running "$name" && port_open "$port"; then
        die "port $LOCALHOST:$port is taken by a process this stack did not start"
    fi
    start_daemon "$name" "$name.log" "$BIN/$binary" "$@"
    wait_for_daemon "$name" "$name.log" "$name /healthz on $LOCALHOST:$port" \
        "$HEALTH_DEADLINE" http_ok "http://$LOCALHOST:$port/healthz"
    log "$name healthy on http://$LOCALHOST:$port"
}

start_service mock-provider "$MOCK_PORT" tollgate-mock-provider \
    --listen "$LOCALHOST:$MOCK_PORT"
start_service meter "$METER_PORT" tollgate-meter run \
    --policy-dir "$POLICY_DIR" \
    --kafka-brokers "$KAFKA_BROKERS" \
    --clickhouse-url "$CLICKHOUSE_URL" \
    --database "$DATABASE" \
    --listen "$LOCALHOST:$METER_PORT"
start_service enforcer "$ENFORCER_PORT" tollgate-enforcer \
    --policy-dir "$POLICY_DIR" \
    --kafka-brokers "$KAFKA_BROKERS" \
    --clickhouse-url "$CLICKHOUSE_URL" \
    --database "$DATABASE" \
    --listen "$LOCALHOST:$ENFORCER_PORT"
start_service ingress "$INGRESS_PORT" tollgate-ingress \
    --policy-dir "$POLICY_DIR" \
    --kafka-brokers "$KAFKA_BROKERS" \
    --spool-dir "$STATE_DIR/ingress-spool" \
    --listen "$LOCALHOST:$INGRESS_PORT"

# The console's token: made once (32 random bytes, hex), kept readable by this user only.
CONSOLE_TOKEN_FILE="$STATE_DIR/console-token"
if [[ ! -s "$CONSOLE_TOKEN_FILE" ]]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$CONSOLE_TOKEN_FILE")
fi
start_service console "$CONSOLE_PORT" tollgate-console \
    --policy-dir "$POLICY_DIR" \
    --kafka-brokers "$KAFKA_BROKERS" \
    --clickhouse-url "$CLICKHOUSE_URL" \
    --database "$DATABASE" \
    --token-file "$CONSOLE_TOKEN_FILE" \
    --listen "$LOCALHOST:$CONSOLE_PORT"

log "stack is up (state and logs under $STATE_DIR; stop with compose/local/down.sh)"

QUERY="SELECT event_id, project, team, virtual_model, provider, model, input_tokens, output_tokens, cost_nanos FROM $DATABASE.usage_events ORDER BY ended_at DESC LIMIT 5 FORMAT PrettyCompact"

cat <<EOF
# Tollgate is running. Send a request through the ingress:
curl -sS http://$LOCALHOST:$INGRESS_PORT/v1/chat/completions \\
  -H 'Authorization: Bearer tg-demo-key' \\
  -H 'Content-Type: application/json' \\
  -H 'X-TFY-Project: platform-search' \\
  -H 'X-TFY-Team: data-platform' \\
  -H 'X-TFY-User-ID: u_8f1c2d' \\
  -H 'X-TFY-Session-ID: sess_a3f9c2-b71d-4e' \\
  -H 'X-TFY-Workflow-Tag: classify-intent' \\
  -H 'X-TFY-Environment: production' \\
  -H 'X-TFY-Cost-Center: eng-platform-002' \\
  -d '{"model":"intent-fast","messages":[{"role":"user","content":"Classify: where is my order?"}]}'

# Then see its usage row in ClickHouse (the meter writes it within seconds):
#   $QUERY
curl -sS '$CLICKHOUSE_URL/' --data-binary '$QUERY'

# The console: http://$LOCALHOST:$CONSOLE_PORT/ (log in with the token in $CONSOLE_TOKEN_FILE)
EOF
