# shellcheck shell=bash disable=SC2034 # variables are used by the scripts that source this file
# common.sh — settings and helpers shared by the no-Docker local stack scripts
# (install.sh, infra.sh, up.sh, down.sh). Sourced, never run on its own.
#
# Everything the stack writes lives under $STATE_DIR (default: <repo>/.state, git-ignored):
#   $STATE_DIR/logs/<name>.log   stdout+stderr of each daemon
#   $STATE_DIR/pids/<name>.pid   pid of each daemon started by start_daemon
#   $STATE_DIR/clickhouse/       ClickHouse config copy, data, logs
#   $STATE_DIR/tansu/            Tansu's SQLite database
#
# Environment overrides:
#   TOLLGATE_STATE_DIR             state folder (default <repo>/.state)
#   CARGO_TARGET_DIR               cargo target folder (default ~/.cache/tollgate-target)
#   TOLLGATE_KAFKA_PORT            Kafka API (Tansu) on 127.0.0.1 (default 9092)
#   TOLLGATE_CLICKHOUSE_HTTP_PORT  ClickHouse HTTP on 127.0.0.1 (default 8123)
#   TOLLGATE_CLICKHOUSE_TCP_PORT   ClickHouse native TCP on 127.0.0.1 (default 9000)
#   TOLLGATE_INGRESS_PORT, TOLLGATE_METER_PORT, TOLLGATE_ENFORCER_PORT, TOLLGATE_CONSOLE_PORT
#                                  Tollgate services (defaults 8080, 9101, 9102, 8088)
# The mock provider stays on 127.0.0.1:8090: compose/policy/providers.yaml points there.

if [[ -n "${TOLLGATE_COMMON_SOURCED:-}" ]]; then
    return 0
fi
TOLLGATE_COMMON_SOURCED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

STATE_DIR="${TOLLGATE_STATE_DIR:-$REPO/.state}"
mkdir -p "$STATE_DIR"
# Absolute, because daemons are started from other working directories.
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
LOG_DIR="$STATE_DIR/logs"
PID_DIR="$STATE_DIR/pids"
mkdir -p "$LOG_DIR" "$PID_DIR"

CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
export CARGO_TARGET_DIR
BIN="$CARGO_TARGET_DIR/release"

# cargo-installed tools (tansu) live here; a non-login shell (CI) may not have it on PATH.
if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
    export PATH
fi

LOCALHOST=127.0.0.1
KAFKA_PORT="${TOLLGATE_KAFKA_PORT:-9092}"
CLICKHOUSE_HTTP_PORT="${TOLLGATE_CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${TOLLGATE_CLICKHOUSE_TCP_PORT:-9000}"
INGRESS_PORT="${TOLLGATE_INGRESS_PORT:-8080}"
METER_PORT="${TOLLGATE_METER_PORT:-9101}"
ENFORCER_PORT="${TOLLGATE_ENFORCER_PORT:-9102}"
CONSOLE_PORT="${TOLLGATE_CONSOLE_PORT:-8088}"
MOCK_PORT=8090

KAFKA_BROKERS="$LOCALHOST:$KAFKA_PORT"
CLICKHOUSE_URL="http://$LOCALHOST:$CLICKHOUSE_HTTP_PORT"
TANSU_VERSION=0.6.0

# log MESSAGE... — one line to stderr, prefixed with the calling script's name.
log() {
    printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2
}

# die MESSAGE... — log and exit 1.
die() {
    log "ERROR: $*"
    exit 1
}

# port_open PORT — true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$LOCALHOST/$1") 2>/dev/null
}

# wait_for DESC DEADLINE_SECONDS COMMAND... — run COMMAND (output discarded) every half
# second until it succeeds; fail after DEADLINE_SECONDS with a clear message.
wait_for() {
    local desc=$1 deadline=$2
    shift 2
    local start=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= deadline)); then
            log "ERROR: timed out after ${deadline}s waiting for $desc (probe: $*)"
            return 1
        fi
        sleep 0.5
    done
}

# pid_file NAME — path of NAME's pid file.
pid_file() {
    printf '%s/%s.pid' "$PID_DIR" "$1"
}

# proc_start_time PID — the process's start time (clock ticks since boot, field 22 of
# /proc/PID/stat); fails for a missing or zombie process. Stable across exec.
proc_start_time() {
    local stat rest
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    rest="${stat##*) }"
    local -a fields
    read -r -a fields <<<"$rest"
    [[ "${fields[0]}" != Z ]] || return 1
    printf '%s\n' "${fields[19]}"
}

# daemon_pid NAME — print the pid of NAME if its pid file names a live process that is
# still the one start_daemon started (same start time, so a reused pid does not count);
# else return 1.
daemon_pid() {
    local file pid started
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 1
    pid="$(head -n1 "$file" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    started="$(proc_start_time "$pid")" || return 1
    if [[ -f "$PID_DIR/$1.start" ]]; then
        [[ "$(cat "$PID_DIR/$1.start")" == "$started" ]] || return 1
    fi
    printf '%s\n' "$pid"
}

# daemon_running NAME — true when NAME runs (see daemon_pid).
daemon_running() {
    daemon_pid "$1" >/dev/null
}

# log_path LOGFILE — LOGFILE if absolute, else $LOG_DIR/LOGFILE.
log_path() {
    if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$LOG_DIR" "$1"; fi
}

# start_daemon NAME LOGFILE COMMAND... — start COMMAND in the background in its own session
# (setsid + nohup, stdin from /dev/null), in the current working directory, with stdout and
# stderr appended to LOGFILE (relative names are under $STATE_DIR/logs). Writes the pid to
# $STATE_DIR/pids/NAME.pid. Idempotent: does nothing if NAME is already running.
start_daemon() {
    local name=$1 logfile
    logfile="$(log_path "$2")"
    shift 2
    local pidf tmp pid
    pidf="$(pid_file "$name")"
    if pid="$(daemon_pid "$name")"; then
        log "$name already running (pid $pid)"
        return 0
    fi
    rm -f "$pidf" "$PID_DIR/$name.start"
    mkdir -p "$(dirname "$logfile")"
    printf '\n=== %s starting %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$name" "$*" >>"$logfile"
    tmp="$pidf.starting.$$"
    rm -f "$tmp"
    # The inner shell writes its own pid and then execs COMMAND, so the pid is COMMAND's
    # whether or not setsid had to fork.
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
    nohup setsid bash -c 'echo "$$" >"$0"; exec "$@"' "$tmp" "$@" >>"$logfile" 2>&1 </dev/null &
    local waited=0
    until [[ -s "$tmp" ]]; do
        if ((waited >= 100)); then
            die "$name did not start within 10s (log: $logfile)"
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    pid="$(cat "$tmp")"
    proc_start_time "$pid" >"$PID_DIR/$name.start" || true
    mv -f "$tmp" "$pidf"
    log "$name started (pid $pid, log $logfile)"
}

# wait_for_daemon NAME LOGFILE DESC DEADLINE COMMAND... — like wait_for, but fails at once
# (showing the log's tail) if NAME's process dies while waiting.
wait_for_daemon() {
    local name=$1 logfile desc=$3 deadline=$4
    logfile="$(log_path "$2")"
    shift 4
    local start=$SECONDS
    until "$@" >/dev/null 2>&1; do
        if ! daemon_running "$name"; then
            log "ERROR: $name exited while waiting for $desc; last lines of $logfile:"
            tail -n 30 "$logfile" >&2 || true
            return 1
        fi
        if ((SECONDS - start >= deadline)); then
            log "ERROR: timed out after ${deadline}s waiting for $desc; last lines of $logfile:"
            tail -n 30 "$logfile" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# stop_daemon NAME — send TERM to the pid in NAME's pid file, wait up to 10 s, then KILL;
# remove the pid file. Touches nothing that is not in a pid file.
stop_daemon() {
    local name=$1 pid
    if ! pid="$(daemon_pid "$name")"; then
        if [[ -f "$(pid_file "$name")" ]]; then
            log "$name not running (removing stale pid file)"
        else
            log "$name not running"
        fi
        rm -f "$(pid_file "$name")" "$PID_DIR/$name.start"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= 100)); then
            log "$name did not exit within 10s after TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            local k=0
            while kill -0 "$pid" 2>/dev/null && ((k < 50)); do
                sleep 0.1
                k=$((k + 1))
            done
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$(pid_file "$name")" "$PID_DIR/$name.start"
    log "$name stopped"
}

# http_ok URL — true when GET URL answers 2xx.
http_ok() {
    curl -sf -o /dev/null --max-time 2 "$1"
}
