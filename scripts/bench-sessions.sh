#!/usr/bin/env bash
# Many concurrent sessions on one server: `portswitch-harness hold-sessions` opens N
# sessions (CHANNELS per connection, each on a channel of its own — 1 for one
# connection per session — spread over 127.0.0.x source addresses), keeps them alive
# with PINGs and times a fresh client's REGISTER meanwhile; the server's resident
# memory per session is the figure.
#
# Raises what it can for N connections (fs.nr_open, the descriptor limits, the
# ephemeral port range). Where the hard descriptor limit cannot be raised (no
# CAP_SYS_RESOURCE, as in some containers) it says so and runs with as many sessions
# as the limit allows.
#
#   scripts/bench-sessions.sh                 # N = 1,000,000, 1,000 per connection
#   CHANNELS=1 SESSIONS=100000 HOLD=30 scripts/bench-sessions.sh   # a connection each
#
# The server admits HELLOs at --hello-rate-max (20,000/s by default); the script
# raises it to N per second so that opening the sessions is not the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS=${SESSIONS:-1000000}
CHANNELS=${CHANNELS:-1000}
HOLD=${HOLD:-30}
LEASE_MS=${LEASE_MS:-60000}
PORT=${PORT:-17420}

CONNS=$(( (SESSIONS + CHANNELS - 1) / CHANNELS ))
want=$((CONNS + 4096))
if [ "$(cat /proc/sys/fs/nr_open)" -lt "$want" ]; then
    echo "$want" >/proc/sys/fs/nr_open 2>/dev/null || sysctl -qw fs.nr_open="$want" 2>/dev/null || true
fi
ulimit -Hn "$want" 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
limit=$(ulimit -Hn)
N=$SESSIONS
if [ "$limit" != unlimited ] && [ "$limit" -lt "$want" ]; then
    N=$(( (limit - 1000) * CHANNELS ))
    echo "bench-sessions: the hard descriptor limit is $limit (raising it needs CAP_SYS_RESOURCE);" \
        "running $N sessions instead of $SESSIONS" >&2
fi
CONNS=$(( (N + CHANNELS - 1) / CHANNELS ))

cargo build --release -q -p portswitch -p portswitch-harness
BIN=target/release/portswitch
HARNESS=target/release/portswitch-harness
OUT=bench-results/sessions-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
. "$(dirname "$0")/lib.sh"

"$BIN" serve --listen "127.0.0.1:$PORT" --no-http \
    --connections-max $((CONNS + 100)) --sessions-max $((N + 100)) \
    --hello-rate-max "$N" --channels-per-connection-max $((CHANNELS + 1)) >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
wait_port "$PORT"
"$HARNESS" hold-sessions --addr "127.0.0.1:$PORT" --connections "$N" --channels "$CHANNELS" \
    --lease-ms "$LEASE_MS" --duration "$HOLD" --json | tee "$OUT/hold-sessions.json"
echo "results in $OUT"
