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
# The persistent target folder keeps every earlier build of each test and binary (about 300 MB
# each in debug; each fresh clone builds new ones) and the incremental state of every clone: they
# filled this machine's disk mid-link. Incremental builds are off (a fresh clone gains nothing from
# them), and once the tests are built every file in target/debug/deps named like a current test
# or binary but not one of them is removed.
export CARGO_INCREMENTAL=0
rm -rf "$CARGO_TARGET_DIR"/debug/incremental
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# prune_superseded_binaries EXECUTABLE... — drops the other builds of these executables' names.
prune_superseded_binaries() {
    local deps="$CARGO_TARGET_DIR/debug/deps" path file
    local -A current=() names=()
    for path in "$@"; do
        [[ "$path" == "$deps"/* ]] || continue
        file="${path##*/}"
        current[$file]=1
        names[${file%-*}]=1
    done
    (( ${#current[@]} > 0 )) || return 0
    while IFS= read -r file; do
        if [[ -n "${names[${file%-*}]:-}" && -z "${current[$file]:-}" ]]; then
            rm -f -- "$deps/$file"
        fi
    done < <(cd "$deps" && ls | grep -E '^[A-Za-z0-9_]+-[0-9a-f]{16}$' || true)
}
# The binaries the tests start (common::binary) and the tests themselves; a build error shows
# again in `cargo test` below.
log "building the binaries and tests"
mapfile -t built < <({
    cargo build --workspace --locked --bins --message-format=json
    cargo test --workspace --locked --no-run --message-format=json
} 2>/dev/null | grep -o '"executable":"[^"]*"' | sed -e 's/^"executable":"//' -e 's/"$//' || true)
prune_superseded_binaries "${built[@]}"
cargo test --workspace --locked --no-fail-fast
