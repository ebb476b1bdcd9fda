#!/usr/bin/env bash
# portswitch-query's expression evaluator against cel (cel-rust), evalexpr, rhai and jaq
# (jq): the criterion benchmark in peers-query/ (benches/expr.rs says what each library
# is given and what it reuses per evaluation), release build, one thread, three
# predicates (comparison, Unicode regex, arithmetic) over the same 1,024 records. Every
# library's answers are checked against ours on every record before anything is
# timed. Prints a table — ns per evaluation (criterion's median, with its 95%
# confidence interval), millions of evaluations per second, and ours/them (their time
# over ours: how many times as many evaluations per second ours does) — and keeps the
# log, the table and criterion's estimates in bench-results/query-expr-<UTC timestamp>/.
#
#   scripts/bench-query-expr.sh
#   MEASURE=10 WARMUP=3 SAMPLES=100 scripts/bench-query-expr.sh   # longer, steadier
#   FILTER=regex scripts/bench-query-expr.sh                       # one predicate
#
# Environment: MEASURE (s of measurement per benchmark, default 3), WARMUP (s, default
# 1), SAMPLES (criterion samples, default 30), FILTER (criterion's name filter),
# PEERS_QUERY_TARGET_DIR (default peers-query/target), OUT. Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MEASURE=${MEASURE:-3}
WARMUP=${WARMUP:-1}
SAMPLES=${SAMPLES:-30}
FILTER=${FILTER:-}
TARGET=${PEERS_QUERY_TARGET_DIR:-$ROOT/peers-query/target}
OUT=${OUT:-$ROOT/bench-results/query-expr-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
export CARGO_TARGET_DIR=$TARGET

echo "== build (release)" >&2
(cd peers-query && nice -n 19 cargo bench --no-run -q)
# Criterion keeps every earlier run's estimates: start clean so that the table holds
# only this run's.
rm -rf "$TARGET/criterion"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== run: $MEASURE s measurement, $WARMUP s warm-up, $SAMPLES samples per benchmark" >&2
(cd peers-query && cargo bench -q --bench expr -- \
    --measurement-time "$MEASURE" --warm-up-time "$WARMUP" --sample-size "$SAMPLES" \
    ${FILTER:+"$FILTER"}) 2>&1 | tee "$OUT/bench.log"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
cp -r "$TARGET/criterion" "$OUT/criterion"

python3 - "$TARGET/criterion" "$ROOT/peers-query/Cargo.lock" "$STARTED" "$LOAD_START" "$LOAD_END" <<'PY' | tee "$OUT/summary.md"
import json, os, re, sys

crit, lock, started, load_start, load_end = sys.argv[1:6]
preds = ["comparison", "regex", "arithmetic"]
order = ["ours", "ours-dyn", "cel", "cel-precompiled", "evalexpr",
         "evalexpr-precompiled", "rhai", "jaq"]

def median_ns(group, lib):
    path = os.path.join(crit, group, lib, "new", "estimates.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]

def median_ci(group, lib):
    with open(os.path.join(crit, group, lib, "new", "estimates.json")) as f:
        ci = json.load(f)["median"]["confidence_interval"]
    return ci["lower_bound"], ci["upper_bound"]

def fmt(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"

text = open(lock).read()
versions = dict(re.findall(r'name = "([^"]+)"\nversion = "([^"]+)"', text))
libs = {"cel": "cel", "evalexpr": "evalexpr", "rhai": "rhai", "jaq": "jaq-core"}
print(f"query expression evaluators, {started}, one thread, release; load average "
      f"{load_start} before, {load_end} after")
print("peers: " + ", ".join(f"{c} {versions.get(c, '?')}" for c in
      ["cel", "evalexpr", "rhai", "jaq-core", "jaq-std", "jaq-json"]))
print()
print("| predicate | library | ns/eval | 95% CI | M evals/s | ours/them |")
print("|---|---|---:|---:|---:|---:|")
for p in preds:
    if not os.path.isdir(os.path.join(crit, p)):
        continue
    ours = median_ns(p, "ours")
    found = [l for l in order if median_ns(p, l) is not None]
    found += sorted(l for l in os.listdir(os.path.join(crit, p))
                    if l not in order and median_ns(p, l) is not None)
    for lib in found:
        ns = median_ns(p, lib)
        ratio = "" if lib == "ours" or ours is None else fmt(ns / ours)
        lo, hi = median_ci(p, lib)
        print(f"| {p} | {lib} | {ns:.1f} | {lo:.0f}–{hi:.0f} | {fmt(1e3 / ns)} | {ratio} |")
print()
print("ours: typed schema, bound by slot; ours-dyn: every variable dyn. *-precompiled: the")
print("regex compiled once in a function of the caller's (the library's own regex function")
print("compiles its pattern on every call). A predicate a library cannot express is left")
print("out: see the `check` lines of the log.")
PY
echo "results in $OUT" >&2
