#!/usr/bin/env bash
# down.sh — stop the local Tollgate stack that up.sh started: console, ingress, enforcer, meter
# and mock provider, then ClickHouse and Tansu (infra.sh stop). Only processes named in
# $STATE_DIR/pids are stopped; data (ClickHouse, Tansu's SQLite file) stays for the next up.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$HERE/common.sh"

for name in console ingress enforcer meter mock-provider; do
    stop_daemon "$name"
done
"$HERE/infra.sh" stop
