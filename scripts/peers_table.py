"""Turns peerbench's JSON lines into results.json and a Markdown table (table.md).

Usage: peers_table.py RESULTS.jsonl OUT_DIR DURATION
Ratios are portswitch's figure over the peer's (for memory and release time: the
peer's over portswitch's), so every ratio reads "portswitch is N× better".
"""
import datetime
import json
import os
import sys

results_path, out, duration = sys.argv[1], sys.argv[2], sys.argv[3]
versions, runs = {}, []
for line in open(results_path):
    line = line.strip()
    if not line:
        continue
    r = json.loads(line)
    if "workload" in r:
        runs.append(r)
    else:
        versions[r["system"]] = r["version"]

order = [s for s in ["portswitch", "etcd", "zookeeper", "redis"] if s in versions]
peers = [s for s in order if s != "portswitch"]
title = {"portswitch": "portswitch", "etcd": "etcd", "zookeeper": "ZooKeeper", "redis": "Redis"}
head = {s: f"{title[s]} {versions[s]}" for s in order}


def conns_of(r):
    # ZooKeeper cannot share a connection between sessions: its shared-connection run
    # is reported (with one connection per session) in the shared row all the same.
    return 1 if r.get("label") == "shared-connection" else 0


def find_all(system, workload, clients=None, label="", pipeline=1, shared=0):
    return [r for r in runs
            if r["system"] == system and r["workload"] == workload
            and r.get("label", "") in (label, "shared-connection" if shared else label)
            and conns_of(r) == shared
            and r.get("pipeline", 1) == pipeline
            and (clients is None or r["clients"] == clients)]


def find(system, workload, clients=None, label="", pipeline=1, shared=0):
    """The run; of a shared-connection row run at several load-generator thread
    counts, the system's best."""
    found = find_all(system, workload, clients, label, pipeline, shared)
    if not found:
        return None
    if shared:
        return max(found, key=lambda r: r.get("pairs_per_s", 0))
    return found[0]


def threads_note(r):
    t = r.get("load_threads")
    return "" if t is None else f", {t} thread{'' if t == 1 else 's'}"


def ratio(a, b):
    return f"{a / b:,.1f}×" if a and b else "–"


lines = []
w = lines.append
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
w(f"Run {when}; {duration} s per throughput run; every server on loopback with its default "
  "durability, one at a time, load generator on the same machine "
  f"(its runtime: {os.environ.get('PEERBENCH_THREADS') or 'one thread per core'}"
  f"{' thread' if os.environ.get('PEERBENCH_THREADS') == '1' else (' threads' if os.environ.get('PEERBENCH_THREADS') else '')}; "
  "the shared-connection row at each thread count in SHARED_THREADS, each system at its best).\n")

summary = {"versions": versions, "duration_s": float(duration), "when": when, "rows": []}

for workload, what, key in [
    ("acquire-release", "Acquire + release of an own name, closed loops (pairs/s; p50 / p99 of a pair); one request in flight per client unless the row says more", "pairs_per_s"),
    ("contend", "Contended name: all clients try one name, the winner releases (successful pairs/s; p50 / p99)", "pairs_per_s"),
]:
    clients = sorted({(r["clients"], r.get("pipeline", 1), conns_of(r)) for r in runs if r["workload"] == workload})
    w(f"**{what}**\n")
    w("| clients | " + " | ".join(head[s] for s in order) + " | "
      + " | ".join(f"× {title[p]}" for p in peers) + " |")
    w("|---:|" + "---:|" * (len(order) + len(peers)))
    for c, pipe, shared in clients:
        cells, vals = [], {}
        for s in order:
            r = find(s, workload, c, pipeline=pipe, shared=shared)
            if r is None:
                cells.append("–")
                continue
            vals[s] = r[key]
            cells.append(f"{r[key]:,.0f} ({r['p50_us']:,} / {r['p99_us']:,} µs"
                         f"{threads_note(r) if shared else ''})")
        ratios = [ratio(vals.get("portswitch"), vals.get(p)) for p in peers]
        who = f"{c}" if pipe == 1 else f"{c} × {pipe} in flight"
        if shared:
            who += ", one shared connection¹"
        w(f"| {who} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        summary["rows"].append({"workload": workload, "clients": c, "pipeline": pipe, "shared_connection": bool(shared), "values": vals,
                                "ratios": {p: (vals["portswitch"] / vals[p]) if vals.get("portswitch") and vals.get(p) else None for p in peers}})
    if any(shared for _, _, shared in clients):
        w("\n¹ The process's sessions share one connection where the system allows it: "
          "portswitch sessions on channels of one connection (`Mux`), etcd leases over one "
          "client (one HTTP/2 connection), Redis commands over one multiplexed connection; "
          "a ZooKeeper session is its connection, so ZooKeeper keeps one each. Each system "
          "at its best over the load generator's thread counts (all of them below).")
        for c, pipe, shared in clients:
            if not shared:
                continue
            counts = sorted({r.get("load_threads") for s in order
                             for r in find_all(s, workload, c, pipeline=pipe, shared=1)}, key=str)
            w("")
            w("| load-generator threads | " + " | ".join(head[s] for s in order) + " |")
            w("|---:|" + "---:|" * len(order))
            for t in counts:
                cells = []
                for s in order:
                    r = next((r for r in find_all(s, workload, c, pipeline=pipe, shared=1)
                              if r.get("load_threads") == t), None)
                    cells.append("–" if r is None else
                                 f"{r[key]:,.0f} ({r['p50_us']:,} / {r['p99_us']:,} µs)")
                w(f"| {t} | " + " | ".join(cells) + " |")
    w("")

w("**Server cost of those runs (CPU seconds / resident MiB at the end)**\n")
w("| workload | clients | " + " | ".join(head[s] for s in order) + " |")
w("|---|---:|" + "---:|" * len(order))
for workload in ["acquire-release", "contend"]:
    for c, pipe, shared in sorted({(r["clients"], r.get("pipeline", 1), conns_of(r)) for r in runs if r["workload"] == workload}):
        cells = []
        for s in order:
            r = find(s, workload, c, pipeline=pipe, shared=shared)
            cells.append("–" if r is None or "server_cpu_s" not in r else
                         f"{r['server_cpu_s']:.1f} s / {r['server_rss_bytes'] / 2**20:,.0f}")
        who = (f"{c}" if pipe == 1 else f"{c} × {pipe}") + (", shared" if shared else "")
        w(f"| {workload} | {who} | " + " | ".join(cells) + " |")
w("")

w("**Session-bound names: create N (16 sessions, 64 in flight each); server memory per name**\n")
w("| | " + " | ".join(head[s] for s in order) + " |")
w("|---|" + "---:|" * len(order))
fills = {s: find(s, "fill") for s in order}
n = next((r["names"] for r in fills.values() if r), 0)
w(f"| names created/s ({n:,} names) | " + " | ".join(
    "–" if not r else f"{r['names_per_s']:,.0f}" for r in fills.values()) + " |")
w("| resident bytes per name | " + " | ".join(
    "–" if not r or "bytes_per_name" not in r else f"{r['bytes_per_name']:,.0f}" for r in fills.values()) + " |")
ps_b = (fills.get("portswitch") or {}).get("bytes_per_name")
w("| × portswitch's bytes | " + " | ".join(
    "–" if not r or not ps_b or "bytes_per_name" not in r else f"{r['bytes_per_name'] / ps_b:,.1f}×"
    for r in fills.values()) + " |")
w("| create errors | " + " | ".join("–" if not r else f"{r['errors']}" for r in fills.values()) + " |")
w("")
summary["fill"] = fills

w("**Killing a holder with SIGKILL: time until another session sees the name free (p50 / max)**\n")
w("| | " + " | ".join(head[s] for s in order) + " |")
w("|---|" + "---:|" * len(order))
kills = {s: find(s, "kill-holder") for s in order}
lease = next((r["lease_ms"] for r in kills.values() if r), 0)
w(f"| lease / TTL / session timeout {lease:,} ms | " + " | ".join(
    "–" if not r else f"{r['release_p50_ms']:,.0f} / {r['release_max_ms']:,.0f} ms" for r in kills.values()) + " |")
eod = find("portswitch", "kill-holder", label="end-on-disconnect")
if eod:
    w("| portswitch session with end-on-disconnect | "
      f"{eod['release_p50_ms']:,.2f} / {eod['release_max_ms']:,.2f} ms |" + " – |" * (len(order) - 1))
w("")
summary["kill_holder"] = kills
summary["kill_holder_end_on_disconnect"] = eod

errors = [(r["system"], r["workload"], r.get("clients"), r["errors"]) for r in runs if r.get("errors")]
if errors:
    w("Errors: " + ", ".join(f"{s} {wl} ({c} clients): {e}" for s, wl, c, e in errors) + "\n")
summary["errors"] = errors

table = "\n".join(lines)
open(f"{out}/table.md", "w").write(table)
json.dump({"summary": summary, "runs": runs}, open(f"{out}/results.json", "w"), indent=1)
print(table)
