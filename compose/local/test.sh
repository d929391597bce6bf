#!/usr/bin/env bash
# test.sh — the README's test command: installs what is missing, starts the real Kafka-API
# broker (Tansu) and ClickHouse unless they already run (and then stops them again on exit),
# checks formatting and lints, and runs every test of the workspace against them.
set -euo pipefail
# shellcheck source=compose/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bash "$REPO/compose/local/install.sh"

started_infra=0
if port_open "$KAFKA_PORT" && port_open "$CLICKHOUSE_HTTP_PORT"; then
    log "using the Kafka broker and ClickHouse already running on $KAFKA_BROKERS and $CLICKHOUSE_URL"
else
    started_infra=1
    # Stop what this script started, whatever way it ends, so the next run finds the ports free.
    trap 'bash "$REPO/compose/local/infra.sh" stop || true' EXIT
    bash "$REPO/compose/local/infra.sh" start
fi

export TOLLGATE_TEST_KAFKA_BROKERS="$KAFKA_BROKERS"
export TOLLGATE_TEST_CLICKHOUSE_URL="$CLICKHOUSE_URL"
cd "$REPO"
log "cargo target dir: $CARGO_TARGET_DIR (infra started here: $started_infra)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
