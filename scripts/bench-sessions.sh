#!/usr/bin/env bash
# Many concurrent sessions on one server: `bench --workload hold-sessions` opens N
# sessions (one connection each, spread over 127.0.0.x source addresses), keeps them
# alive with PINGs and times a fresh client's REGISTER meanwhile; the server's
# resident memory per session is the figure.
#
# Raises what it can for N connections (fs.nr_open, the descriptor limits, the
# ephemeral port range). Where the hard descriptor limit cannot be raised (no
# CAP_SYS_RESOURCE, as in some containers) it says so and runs with as many sessions
# as the limit allows.
#
#   scripts/bench-sessions.sh                 # N = 1,000,000
#   SESSIONS=100000 HOLD=30 scripts/bench-sessions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-1000000}
HOLD=${HOLD:-30}
LEASE_MS=${LEASE_MS:-60000}
PORT=${PORT:-17420}

want=$((SESSIONS + 4096))
if [ "$(cat /proc/sys/fs/nr_open)" -lt "$want" ]; then
    echo "$want" >/proc/sys/fs/nr_open 2>/dev/null || sysctl -qw fs.nr_open="$want" 2>/dev/null || true
fi
ulimit -Hn "$want" 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
limit=$(ulimit -Hn)
N=$SESSIONS
if [ "$limit" != unlimited ] && [ "$limit" -lt "$want" ]; then
    N=$((limit - 1000))
    echo "bench-sessions: the hard descriptor limit is $limit (raising it needs CAP_SYS_RESOURCE);" \
        "running $N sessions instead of $SESSIONS" >&2
fi

cargo build --release -q -p portswitch
BIN=target/release/portswitch
OUT=bench-results/sessions-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
. "$(dirname "$0")/lib.sh"

"$BIN" serve --listen "127.0.0.1:$PORT" --no-http \
    --connections-max $((N + 100)) --sessions-max $((N + 100)) >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT"
"$BIN" bench --addr "127.0.0.1:$PORT" --workload hold-sessions --connections "$N" \
    --lease-ms "$LEASE_MS" --duration "$HOLD" --json | tee "$OUT/hold-sessions.json"
echo "results in $OUT"
