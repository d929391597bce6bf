#!/usr/bin/env python3
"""oha_result.py RAW TARGET LOAD — one results.jsonl line from oha's JSON output (--output-format json).

oha reports latencies in seconds; the line has microseconds. Achieved req/s counts 2xx answers
only. Errors are non-2xx answers plus transport errors, except the requests still in flight
when the run's deadline cut them ("aborted due to deadline"), which oha lists among errors.
"""

import json
import sys

raw, target, load = sys.argv[1:]
row = {"kind": "latency", "target": target, "mode": "non-stream", "load": load, "measure": "latency"}
try:
    r = json.loads(open(raw).read())
except Exception as e:  # oha failed: say so in the table
    row["skipped"] = f"oha output unreadable ({e.__class__.__name__})"
    print(json.dumps(row))
    sys.exit(0)

pct = r.get("latencyPercentiles", {})
statuses = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
bad_status = sum(v for k, v in statuses.items() if not 200 <= k < 300)
transport = {k: v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k}
unfinished = sum(v for k, v in r.get("errorDistribution", {}).items() if "deadline" in k)
total_s = r["summary"]["total"] or 1.0


def us(key):
    v = pct.get(key)
    return None if v is None else v * 1e6


row.update(
    {
        "p50_us": us("p50"),
        "p90_us": us("p90"),
        "p99_us": us("p99"),
        "max_us": (r["summary"].get("slowest") or 0) * 1e6 if ok else None,
        "achieved_rps": ok / total_s,
        "sent": ok + bad_status + sum(transport.values()),
        "errors": bad_status + sum(transport.values()),
        "unfinished": unfinished,
        "first_error": next(iter(transport), None) or (f"status {next(k for k in statuses if not 200 <= k < 300)}" if bad_status else None),
    }
)
print(json.dumps(row))
