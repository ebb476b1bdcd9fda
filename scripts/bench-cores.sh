#!/usr/bin/env bash
# Both cores against one: register-unregister with the server pinned to one CPU (the
# load generator on another) and with neither pinned, in alternating pairs, reporting
# throughput and the CPU each side spent per request. From those the script prints
# the ceiling any server could reach on this machine while it shares the cores with
# its load generator: cores / (server + load generator CPU per request).
#
#   scripts/bench-cores.sh                         # 3 pairs of 5 s runs, 16 x 512 pre-encoded
#   PAIRS=5 CONNECTIONS=64 PIPELINE=64 PREENCODED= scripts/bench-cores.sh
#
# Needs `taskset` (util-linux) and python3; builds the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-16}
PIPELINE=${PIPELINE:-512}
PREENCODED=${PREENCODED---preencoded}
PORT=${PORT:-17430}
. scripts/lib.sh

CPUS=$(nproc)
if [ "$CPUS" -lt 2 ]; then
    echo "one CPU: nothing to compare" >&2
    exit 1
fi
cargo build --release -q -p portswitch
BIN=target/release/portswitch

# One run: server CPUs, load generator CPUs. Prints "ops ops_per_s loadgen_cpu_s server_cpu_s".
run() {
    taskset -c "$1" "$BIN" serve --listen "127.0.0.1:$PORT" --no-http >/dev/null 2>&1 &
    local sp=$!
    PIDS+=("$sp")
    wait_port "$PORT"
    local before after
    before=$(awk '{print $14 + $15}' "/proc/$sp/stat")
    # The load generator's CPU: its rusage as a child of python.
    local lg
    lg=$(python3 - "$2" "$BIN" "$PORT" "$CONNECTIONS" "$PIPELINE" "$DURATION" "$PREENCODED" <<'PY'
import json, resource, subprocess, sys
cpus, binary, port, conns, pipeline, duration, pre = sys.argv[1:]
cmd = ["taskset", "-c", cpus, binary, "bench", "register-unregister",
       "--addr", f"127.0.0.1:{port}", "--connections", conns,
       "--pipeline", pipeline, "--duration", duration, "--json"] + ([pre] if pre else [])
out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
r = resource.getrusage(resource.RUSAGE_CHILDREN)
j = json.loads(out)
print(j["ops"], j["ops_per_sec"], r.ru_utime + r.ru_stime)
PY
)
    after=$(awk '{print $14 + $15}' "/proc/$sp/stat")
    kill "$sp"
    wait "$sp" 2>/dev/null || true
    local tck
    tck=$(getconf CLK_TCK)
    echo "$lg $(python3 -c "print(($after - $before) / $tck)")"
}

echo "| pair | one core (ops/s) | both cores (ops/s) | ratio | server ns/op (one / both) | load generator ns/op (one / both) | ceiling here |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for i in $(seq 1 "$PAIRS"); do
    read -r o_ops o_rate o_lg o_srv <<<"$(run 0 1)"
    read -r b_ops b_rate b_lg b_srv <<<"$(run "0-$((CPUS - 1))" "0-$((CPUS - 1))")"
    python3 - "$i" "$CPUS" "$o_ops" "$o_rate" "$o_lg" "$o_srv" "$b_ops" "$b_rate" "$b_lg" "$b_srv" <<'PY'
import sys
i, cpus = sys.argv[1], int(sys.argv[2])
o_ops, o_rate, o_lg, o_srv, b_ops, b_rate, b_lg, b_srv = map(float, sys.argv[3:])
ns = lambda cpu, ops: cpu / ops * 1e9
# The most any server could do with every core busy and nothing lost to coordination,
# as a multiple of the one-core figure.
ceiling = cpus / ((o_srv + o_lg) / o_ops) / o_rate
print(f"| {i} | {o_rate:,.0f} | {b_rate:,.0f} | {b_rate / o_rate:.2f}x "
      f"| {ns(o_srv, o_ops):.0f} / {ns(b_srv, b_ops):.0f} | {ns(o_lg, o_ops):.0f} / {ns(b_lg, b_ops):.0f} "
      f"| {ceiling:.2f}x |")
PY
done
