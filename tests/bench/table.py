#!/usr/bin/env python3
"""table.py RUN_DIR — print the markdown table of one `tests/bench/run` from RUN_DIR/results.jsonl.

Each line of results.jsonl is one measurement (written by tests/bench/run):
  {"kind": "latency", "target": T, "mode": "non-stream"|"stream", "load": RATE|"sat", ...}
      with "measure" ("latency", "ttft" or "last"), p50_us/p90_us/p99_us/max_us,
      achieved_rps, sent, errors (or "skipped": reason);
  {"kind": "memory", ...}, {"kind": "idle", ...}, {"kind": "big_prompt", ...}, {"kind": "meter", ...},
  {"kind": "enforcer", ...}.
RUN_DIR/meta.json holds the run's context (date, commit, machine, pinning, load).
"""

import json
import sys
from pathlib import Path

TARGET_NAMES = {
    "direct": "mock provider, direct",
    "floor": "floor proxy → mock",
    "ingress": "ingress → mock",
    "ingress-traced": "ingress, traces exported → mock",
    "litellm": "LiteLLM → mock",
}
TARGET_ORDER = ["direct", "floor", "ingress", "ingress-traced", "litellm"]
MEASURE_NAMES = {"latency": "latency", "ttft": "first token", "last": "last token"}


def fmt_us(us):
    if us is None:
        return "–"
    if us < 1_000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_delta(us):
    if us is None:
        return "–"
    sign = "+" if us >= 0 else "−"
    return sign + fmt_us(abs(us))


def load_label(load):
    if load == "c1":
        return "1 connection"
    return "saturation" if load == "sat" else f"{int(load):,} req/s"


def load_key(load):
    return {"c1": -1.0, "sat": float("inf")}.get(load) or float(load)


def main():
    run = Path(sys.argv[1])
    meta = json.loads((run / "meta.json").read_text())
    rows = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines() if l.strip()]
    lat = [r for r in rows if r["kind"] == "latency"]

    def find(target, mode, load, measure):
        for r in lat:
            if (r["target"], r["mode"], r["load"], r["measure"]) == (target, mode, load, measure):
                return r
        return None

    out = []
    w = out.append
    w(f"Tollgate benchmark — {meta['date']} — commit {meta['commit']}")
    w("")
    w(f"- Machine: {meta['machine']}")
    w(f"- Pinning: {meta['pinning']}")
    w(f"- Load on the machine: {meta['load']}")
    w(f"- Each load: {meta['durations']}")
    w(f"- Tools: {meta['tools']}")
    w("")
    w("| mode | load | target | measure | p50 | p90 | p99 | max | achieved req/s | errors | vs direct (Δp50 / Δp99) · vs floor |")
    w("|---|---|---|---|--:|--:|--:|--:|--:|--:|---|")
    loads = []
    for r in lat:
        if r["load"] not in loads:
            loads.append(r["load"])
    loads.sort(key=load_key)
    for mode in ["non-stream", "stream"]:
        measures = ["latency"] if mode == "non-stream" else ["ttft", "last"]
        for load in loads:
            for measure in measures:
                for target in TARGET_ORDER:
                    r = find(target, mode, load, measure)
                    if r is None:
                        continue
                    cells = [mode, load_label(load), TARGET_NAMES.get(target, target), MEASURE_NAMES[measure]]
                    if r.get("skipped"):
                        w("| " + " | ".join(cells) + f" | not run: {r['skipped']} | | | | | | |")
                        continue
                    if r.get("p50_us") is None:
                        why = "no request due in the measured window finished: every connection was still busy"
                        rps = f"{r.get('achieved_rps', 0):,.0f}"
                        w("| " + " | ".join(cells) + f" | – | – | – | – | {rps} | {r.get('errors', 0):,} | {why} |")
                        continue
                    cells += [fmt_us(r.get(k)) for k in ("p50_us", "p90_us", "p99_us", "max_us")]
                    cells.append(f"{r.get('achieved_rps', 0):,.0f}")
                    errors = r.get("errors", 0)
                    sent = r.get("sent") or 0
                    cell = f"{errors:,}" + (f" ({100 * errors / sent:.1f}%)" if errors and sent else "")
                    unfinished = r.get("unfinished") or 0
                    ok = max(sent - errors, 0)
                    if unfinished and unfinished * 10 >= ok:
                        cell += f", {unfinished:,} unfinished at the end"
                    cells.append(cell)
                    note = ""
                    d = find("direct", mode, load, measure)
                    if target != "direct" and d and not d.get("skipped") and r.get("p50_us") is not None:
                        note = f"{fmt_delta(r['p50_us'] - d['p50_us'])} / {fmt_delta(r['p99_us'] - d['p99_us'])}"
                    f = find("floor", mode, load, measure)
                    if load == "sat" and target not in ("floor", "direct") and f and f.get("achieved_rps"):
                        note += f" · {100 * r.get('achieved_rps', 0) / f['achieved_rps']:.0f}% of floor req/s"
                    cells.append(note)
                    w("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["kind"] == "memory":
            w(f"| memory | {r['label']} | ingress | VmRSS | {r['value']} | | | | | {r.get('errors', '')} | {r.get('note', '')} |")
    for r in rows:
        if r["kind"] in ("idle", "big_prompt", "meter", "enforcer"):
            w(f"| {r['kind']} | {r.get('label', '')} | {r.get('target', '')} | {r.get('measure', '')} | {r['value']} | | | | | {r.get('errors', '')} | {r.get('note', '')} |")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
