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
# prune_superseded_binaries — the persistent target folder keeps every earlier build of each test
# and binary (about 300 MB each in debug); after a few dozen runs they filled this machine's disk
# mid-link. Keeps the two newest files of each name in target/*/deps (a crate's binary and its
# unit tests share a name) and drops incremental state, which a fresh run does not use; cargo
# rebuilds whatever it still needs.
prune_superseded_binaries() {
    local deps file name
    for deps in "$CARGO_TARGET_DIR"/debug/deps "$CARGO_TARGET_DIR"/release/deps; do
        [[ -d "$deps" ]] || continue
        declare -A kept=()
        while IFS= read -r file; do
            name="${file%-*}"
            if (( ${kept[$name]:-0} >= 2 )); then
                rm -f -- "$deps/$file"
            else
                kept[$name]=$(( ${kept[$name]:-0} + 1 ))
            fi
        done < <(cd "$deps" && ls -t | grep -E '^[A-Za-z0-9_]+-[0-9a-f]{16}$' || true)
        unset kept
    done
    rm -rf "$CARGO_TARGET_DIR"/debug/incremental
}
prune_superseded_binaries
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
