#!/usr/bin/env bash
# install.sh — idempotent installer of everything the no-Docker local stack and the test
# suite need on a Debian 12 machine (run as root; needs no stdin, so it works in CI):
#   - Debian packages: ClickHouse 18.16 server/client, the build dependencies of rdkafka's
#     bundled librdkafka, pip and curl, and Chromium with its ChromeDriver for the console's
#     browser tests (apt-get runs only if something is missing);
#   - Tansu 0.6.0 (Kafka API broker) with SQLite storage, through cargo install (~12 min);
#   - Python packages of the tests: chdb-core 26.9.0, openai, anthropic.
# Prints one short line per step to stderr; logs of long steps go to $STATE_DIR/logs.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
    clickhouse-server clickhouse-client
    cmake libcurl4-openssl-dev libssl-dev libsasl2-dev libzstd-dev pkg-config build-essential
    python3-pip curl
    chromium chromium-driver
)
TANSU_FEATURES=libsql,dynostore
CHDB_VERSION=26.9.0

# show_tail LOGFILE — the end of a failed step's log.
show_tail() {
    log "last lines of $1:"
    tail -n 40 "$1" >&2 || true
}

# ---------------------------------------------------------------- Debian packages

pkg_installed() {
    local status
    status="$(dpkg -s "$1" 2>/dev/null)" || return 1
    grep -qx 'Status: install ok installed' <<<"$status"
}

install_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "debian packages: all present"
        return 0
    fi
    if ((EUID != 0)); then
        die "missing debian packages: ${missing[*]}; run as root: apt-get install -y ${missing[*]}"
    fi
    local apt_log="$LOG_DIR/apt.log"
    local had_clickhouse=0
    pkg_installed clickhouse-server && had_clickhouse=1
    log "debian packages: installing ${missing[*]} (log $apt_log)"
    if ! { apt-get update && apt-get install -y "${missing[@]}"; } </dev/null >"$apt_log" 2>&1; then
        show_tail "$apt_log"
        die "apt-get install failed"
    fi
    # On a machine with systemd the package starts the system-wide server on 8123/9000,
    # which would collide with the project-local one that infra.sh runs.
    if ((had_clickhouse == 0)) && command -v systemctl >/dev/null &&
        systemctl is-active --quiet clickhouse-server 2>/dev/null; then
        log "debian packages: disabling the system clickhouse-server service (infra.sh runs its own)"
        systemctl disable --now clickhouse-server >>"$apt_log" 2>&1 || true
    fi
    log "debian packages: installed"
}

# ---------------------------------------------------------------- Tansu

tansu_version_ok() {
    local out
    out="$(tansu --version 2>/dev/null)" || return 1
    [[ "$out" == *"$TANSU_VERSION"* ]]
}

# True when this tansu has the SQLite storage engine (`tansu --help` lists its engines; a
# plain `cargo install tansu` has none).
tansu_features_ok() {
    local help
    help="$(tansu --help 2>/dev/null)" || return 1
    grep -q '^Storage engines:.*libsql' <<<"$help"
}

# Wait for a cargo install of tansu that is already running (e.g. started by hand).
wait_for_other_tansu_install() {
    local pids start=$SECONDS said=0
    while pids="$(pgrep -f '(^|/)cargo install tansu' 2>/dev/null)"; do
        if ((said == 0)); then
            log "tansu: another 'cargo install tansu' is running (pid ${pids//$'\n'/ }); waiting for it"
            said=1
        fi
        if ((SECONDS - start > 1800)); then
            die "tansu: the other 'cargo install tansu' did not finish within 30 minutes"
        fi
        sleep 10
    done
}

install_tansu() {
    if tansu_version_ok && tansu_features_ok; then
        log "tansu: $TANSU_VERSION present"
        return 0
    fi
    wait_for_other_tansu_install
    if tansu_version_ok && tansu_features_ok; then
        log "tansu: $TANSU_VERSION present"
        return 0
    fi
    command -v cargo >/dev/null || die "tansu: cargo not found; install the Rust toolchain (rustup) first"
    local tansu_log="$LOG_DIR/tansu-install.log"
    log "tansu: cargo install tansu $TANSU_VERSION --features $TANSU_FEATURES (takes ~12 minutes; log $tansu_log)"
    # Without CARGO_TARGET_DIR, cargo install builds in a temporary folder it removes after.
    if ! env -u CARGO_TARGET_DIR cargo install tansu --locked --version "$TANSU_VERSION" --features "$TANSU_FEATURES" \
        </dev/null >"$tansu_log" 2>&1; then
        show_tail "$tansu_log"
        die "tansu: cargo install failed"
    fi
    tansu_version_ok || die "tansu: installed, but 'tansu --version' does not report $TANSU_VERSION"
    log "tansu: installed $(tansu --version)"
}

# ---------------------------------------------------------------- Python packages

# missing_python_packages — print the pip requirement of each test package that does not
# import (or, for chdb-core, is not version $CHDB_VERSION), one per line.
missing_python_packages() {
    python3 - "$CHDB_VERSION" <<'PY'
import importlib, sys
from importlib.metadata import PackageNotFoundError, version

chdb_version = sys.argv[1]
for module, dist, requirement in (
    ("chdb", "chdb-core", f"chdb-core=={chdb_version}"),
    ("openai", None, "openai"),
    ("anthropic", None, "anthropic"),
):
    try:
        importlib.import_module(module)
        if dist is not None and version(dist) != chdb_version:
            raise PackageNotFoundError(dist)
    except Exception:
        print(requirement)
PY
}

install_python_packages() {
    command -v python3 >/dev/null || die "python3 not found"
    local wanted=()
    mapfile -t wanted < <(missing_python_packages)
    if ((${#wanted[@]} == 0)); then
        log "python packages: chdb-core $CHDB_VERSION, openai, anthropic present"
        return 0
    fi
    local pip_args=(--quiet --disable-pip-version-check --no-input)
    # Debian's own python3 refuses system-wide pip installs (PEP 668) unless told otherwise.
    if [[ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]]; then
        pip_args+=(--break-system-packages)
    fi
    local pip_log="$LOG_DIR/pip-install.log"
    log "python packages: installing ${wanted[*]} with $(command -v python3) (log $pip_log)"
    if ! python3 -m pip install "${pip_args[@]}" "${wanted[@]}" </dev/null >"$pip_log" 2>&1; then
        show_tail "$pip_log"
        die "pip install failed"
    fi
    mapfile -t wanted < <(missing_python_packages)
    ((${#wanted[@]} == 0)) || die "python packages: still not importable after pip install: ${wanted[*]}"
    log "python packages: installed"
}

install_apt_packages
install_tansu
install_python_packages
log "install: done"
