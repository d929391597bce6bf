#!/usr/bin/env bash
# infra.sh start|stop|status [clickhouse|tansu] — start, stop or show the two real infrastructure services of
# the no-Docker local stack, with all state under $STATE_DIR (see common.sh):
#   - ClickHouse (Debian's clickhouse-server 18.16) on 127.0.0.1, HTTP $CLICKHOUSE_HTTP_PORT
#     and native TCP $CLICKHOUSE_TCP_PORT, from a project-local copy of the system config;
#   - Tansu $TANSU_VERSION (Kafka API broker) on 127.0.0.1:$KAFKA_PORT with SQLite storage,
# and, once both are healthy, creates the Tollgate topics if missing.
# `start` is idempotent; `stop` stops only what `start` started (pid files); data survives.
set -euo pipefail

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CH_DIR="$STATE_DIR/clickhouse"
CH_CONFIG="$CH_DIR/config.xml"
CH_LOG=clickhouse.log
TANSU_DIR="$STATE_DIR/tansu"
TANSU_LOG=tansu.log
TANSU_BROKER_URL="tcp://$LOCALHOST:$KAFKA_PORT"
HEALTH_DEADLINE=60

USAGE_TOPIC=tollgate.usage.v1
BREACHES_TOPIC=tollgate.breaches.v1
ALERTS_TOPIC=tollgate.alerts.v1
USAGE_DLQ_TOPIC=tollgate.usage.dlq.v1
ENFORCER_LEASE_TOPIC=tollgate.enforcer-lease.v1
OUTCOMES_TOPIC=tollgate.outcomes.v1
USAGE_PARTITIONS="${TOLLGATE_USAGE_PARTITIONS:-4}"

# ---------------------------------------------------------------- ClickHouse

# Write $CH_DIR/{config,users}.xml from the system's copies: every path into $CH_DIR,
# listen on 127.0.0.1 only, our ports, no TLS ports, no interserver port, UTC server time.
clickhouse_write_config() {
    local src=/etc/clickhouse-server
    [[ -f "$src/config.xml" && -f "$src/users.xml" ]] ||
        die "$src/config.xml or users.xml missing; run compose/local/install.sh"
    mkdir -p "$CH_DIR"/{data,tmp,user_files,format_schemas,log}
    python3 - "$src" "$CH_DIR" "$CLICKHOUSE_HTTP_PORT" "$CLICKHOUSE_TCP_PORT" "$LOCALHOST" <<'PY'
import sys
import xml.etree.ElementTree as ET

src, ch_dir, http_port, tcp_port, host = sys.argv[1:]


def drop_includes(root):
    # Substitutions from /etc/metrika.xml (absent here) only produce "Include not found"
    # noise; the elements keep their inline defaults.
    for el in root.iter():
        if "incl" in el.attrib and el.attrib.get("optional") != "true":
            del el.attrib["incl"]


users = ET.parse(f"{src}/users.xml")
drop_includes(users.getroot())
users.write(f"{ch_dir}/users.xml.new", encoding="utf-8", xml_declaration=True)

tree = ET.parse(f"{src}/config.xml")
root = tree.getroot()
drop_includes(root)


def put(parent, tag, text):
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


logger = root.find("logger")
if logger is None:
    logger = ET.SubElement(root, "logger")
put(logger, "log", f"{ch_dir}/log/clickhouse-server.log")
put(logger, "errorlog", f"{ch_dir}/log/clickhouse-server.err.log")
put(logger, "size", "100M")
put(logger, "count", "3")

put(root, "path", f"{ch_dir}/data/")
put(root, "tmp_path", f"{ch_dir}/tmp/")
put(root, "user_files_path", f"{ch_dir}/user_files/")
put(root, "format_schema_path", f"{ch_dir}/format_schemas/")
put(root, "http_port", http_port)
put(root, "tcp_port", tcp_port)
put(root, "timezone", "UTC")

# 127.0.0.1 only: no ::1 (fails where IPv6 is off), no TLS ports (no certificates here),
# no interserver port (9009; replication is not used and the port may be taken).
for tag in ("listen_host", "https_port", "tcp_port_secure", "interserver_http_port",
            "interserver_https_port", "mysql_port", "postgresql_port"):
    for el in root.findall(tag):
        root.remove(el)
ET.SubElement(root, "listen_host").text = host

tree.write(f"{ch_dir}/config.xml.new", encoding="utf-8", xml_declaration=True)
PY
    mv -f "$CH_DIR/users.xml.new" "$CH_DIR/users.xml"
    mv -f "$CH_CONFIG.new" "$CH_CONFIG"
}

clickhouse_healthy() {
    curl -sf --max-time 2 "$CLICKHOUSE_URL/?query=SELECT%20version()" >/dev/null
}

clickhouse_start() {
    if daemon_running clickhouse; then
        if clickhouse_healthy; then
            log "clickhouse already running and healthy on $CLICKHOUSE_URL"
            return 0
        fi
    else
        local port
        for port in "$CLICKHOUSE_HTTP_PORT" "$CLICKHOUSE_TCP_PORT"; do
            if port_open "$port"; then
                die "port $LOCALHOST:$port is taken by a process this stack did not start" \
                    "(a system clickhouse-server? try: systemctl stop clickhouse-server)," \
                    "or set TOLLGATE_CLICKHOUSE_HTTP_PORT / TOLLGATE_CLICKHOUSE_TCP_PORT"
            fi
        done
        command -v clickhouse-server >/dev/null ||
            die "clickhouse-server not found; run compose/local/install.sh"
        clickhouse_write_config
        # Started from $CH_DIR so nothing (e.g. a preprocessed config) lands elsewhere.
        (cd "$CH_DIR" && start_daemon clickhouse "$CH_LOG" \
            clickhouse-server --config-file="$CH_CONFIG")
    fi
    wait_for_daemon clickhouse "$CH_LOG" "ClickHouse on $CLICKHOUSE_URL" "$HEALTH_DEADLINE" \
        clickhouse_healthy
    log "clickhouse healthy: version $(curl -sf "$CLICKHOUSE_URL/?query=SELECT%20version()")"
}

# ---------------------------------------------------------------- Tansu

# The tansu CLI writes its tracing output to stdout and follows RUST_LOG (up.sh exports
# RUST_LOG=info for the Tollgate services): silence it so stdout is the JSON answer alone.
tansu_cli() {
    RUST_LOG=off tansu "$@"
}

tansu_topics_json() {
    tansu_cli topic list --broker "$TANSU_BROKER_URL"
}

tansu_healthy() {
    port_open "$KAFKA_PORT" && tansu_topics_json >/dev/null 2>&1
}

tansu_start() {
    if daemon_running tansu; then
        if tansu_healthy; then
            log "tansu already running and healthy on $KAFKA_BROKERS"
            return 0
        fi
    else
        if port_open "$KAFKA_PORT"; then
            die "port $LOCALHOST:$KAFKA_PORT is taken by a process this stack did not start;" \
                "stop it or set TOLLGATE_KAFKA_PORT"
        fi
        command -v tansu >/dev/null || die "tansu not found; run compose/local/install.sh"
        mkdir -p "$TANSU_DIR"
        # Tansu resolves the path after sqlite:// against its working directory (and reads a
        # .env file from there), hence the cd into its own state folder. The host part of the
        # URL is lower-cased by the URL parser: keep the file name lower case.
        # Its own log level (TOLLGATE_TANSU_LOG, default warn): at info it logs every request.
        (cd "$TANSU_DIR" && start_daemon tansu "$TANSU_LOG" \
            env RUST_LOG="${TOLLGATE_TANSU_LOG:-warn}" tansu broker \
            --cluster-id tollgate-local \
            --listener-url "$TANSU_BROKER_URL" \
            --advertised-listener-url "$TANSU_BROKER_URL" \
            --storage-engine sqlite://tansu.db)
    fi
    wait_for_daemon tansu "$TANSU_LOG" "Tansu on $KAFKA_BROKERS" "$HEALTH_DEADLINE" \
        tansu_healthy
    log "tansu healthy on $KAFKA_BROKERS (data: $TANSU_DIR/tansu.db)"
}

# topic_names — the existing topic names, one per line.
topic_names() {
    tansu_topics_json | python3 -c '
import json, sys
for topic in json.load(sys.stdin):
    name = topic.get("name")
    if name:
        print(name)
'
}

# has_topic NAME — true when topic NAME exists. (No pipe into grep -q: with pipefail, an
# early grep exit could fail the pipeline.)
has_topic() {
    local names
    names="$(topic_names)" || return 1
    grep -qxF "$1" <<<"$names"
}

# ensure_topic NAME PARTITIONS [KEY=VALUE...] — create NAME unless it exists.
ensure_topic() {
    local name=$1 partitions=$2
    shift 2
    local args=() kv
    for kv in "$@"; do
        args+=(--config "$kv")
    done
    if has_topic "$name"; then
        log "topic $name exists"
        return 0
    fi
    local out
    if ! out="$(tansu_cli topic create --broker "$TANSU_BROKER_URL" --partitions "$partitions" \
        "${args[@]}" "$name" 2>&1)"; then
        # Another creator may have won the race; only a still-missing topic is an error.
        if ! has_topic "$name"; then
            log "ERROR: could not create topic $name:"
            printf '%s\n' "$out" >&2
            return 1
        fi
    fi
    has_topic "$name" || die "topic $name missing after create: $out"
    log "topic $name created ($partitions partitions${*:+, $*})"
}

create_topics() {
    ensure_topic "$USAGE_TOPIC" "$USAGE_PARTITIONS"
    ensure_topic "$BREACHES_TOPIC" 1 cleanup.policy=compact
    ensure_topic "$ALERTS_TOPIC" 1
    ensure_topic "$USAGE_DLQ_TOPIC" 1
    # The enforcers' heartbeats and alert-delivery progress (one partition; enforcer `lease`).
    ensure_topic "$ENFORCER_LEASE_TOPIC" 1
    # Outcomes posted to the ingress (POST /v1/outcomes), keyed project/outcome_id.
    ensure_topic "$OUTCOMES_TOPIC" 1
}

# ---------------------------------------------------------------- commands

status_line() {
    local name=$1 desc=$2 probe=$3 pid health
    if pid="$(daemon_pid "$name")"; then
        if "$probe" >/dev/null 2>&1; then health=healthy; else health=unhealthy; fi
        printf '%-11s running (pid %s), %s, %s\n' "$name" "$pid" "$health" "$desc"
    else
        printf '%-11s stopped, %s\n' "$name" "$desc"
        return 1
    fi
}

cmd_status() {
    local rc=0
    status_line clickhouse "$CLICKHOUSE_URL (tcp $LOCALHOST:$CLICKHOUSE_TCP_PORT)" \
        clickhouse_healthy || rc=1
    status_line tansu "kafka $KAFKA_BROKERS" tansu_healthy || rc=1
    if daemon_running tansu && tansu_healthy; then
        printf '%-11s %s\n' topics "$(topic_names | tr '\n' ' ')"
    fi
    return "$rc"
}

what="${2:-all}"
case "$what" in
all | clickhouse | tansu) ;;
*)
    echo "usage: $0 start|stop|status [clickhouse|tansu]" >&2
    exit 2
    ;;
esac

case "${1:-}" in
start)
    [[ "$what" == tansu ]] || clickhouse_start
    if [[ "$what" != clickhouse ]]; then
        tansu_start
        create_topics
    fi
    case "$what" in
    clickhouse) log "ready: ClickHouse $CLICKHOUSE_URL" ;;
    tansu) log "ready: Kafka API $KAFKA_BROKERS" ;;
    *) log "infrastructure ready: ClickHouse $CLICKHOUSE_URL, Kafka API $KAFKA_BROKERS" ;;
    esac
    ;;
stop)
    [[ "$what" == clickhouse ]] || stop_daemon tansu
    [[ "$what" == tansu ]] || stop_daemon clickhouse
    ;;
status)
    cmd_status
    ;;
*)
    echo "usage: $0 start|stop|status [clickhouse|tansu]" >&2
    exit 2
    ;;
esac
