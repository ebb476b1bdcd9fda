#!/usr/bin/env bash
# Same-run comparison on this machine: portswitch `register-unregister` against Redis
# `SET key val NX` + `DEL key` (the closest Redis equivalent of acquire + release),
# both servers on loopback with their default settings, each driven by its own load
# generator with 64 connections and 64 requests in flight per connection.
#
# Installs Redis from Debian packages if it is missing. Writes JSON and a Markdown
# table to bench-results/<UTC timestamp>/. Not part of the test command.
#
#   scripts/bench-vs-redis.sh            # 10 s per run
#   DURATION=30 scripts/bench-vs-redis.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PIPELINE=${PIPELINE:-64}
PS_PORT=${PS_PORT:-17400}
REDIS_PORT=${REDIS_PORT:-17401}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
fi

cargo build --release -q -p portswitch
BIN=target/release/portswitch
OUT=bench-results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
. "$(dirname "$0")/lib.sh"

echo "== portswitch register-unregister, $CONNS connections, pipeline $PIPELINE, ${DURATION}s"
"$BIN" serve --listen "127.0.0.1:$PS_PORT" --no-http >"$WORK/ps.log" 2>&1 &
PS_PID=$!
PIDS+=("$PS_PID")
wait_port "$PS_PORT"
"$BIN" bench register-unregister --addr "127.0.0.1:$PS_PORT" \
    --connections "$CONNS" --pipeline "$PIPELINE" --duration "$DURATION" --json | tee "$OUT/portswitch.json"
kill "$PS_PID"

echo "== redis SET NX + DEL, $CONNS connections, pipeline $PIPELINE"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT"
# Size each run to last roughly DURATION seconds at ~1.5 M requests/s.
N=$((DURATION * 1500000))
RB=(redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$CONNS" -P "$PIPELINE" --threads 2 -n "$N" -r 1000000 --csv)
"${RB[@]}" SET key:__rand_int__ val NX | tee "$OUT/redis-set-nx.csv"
"${RB[@]}" DEL key:__rand_int__ | tee "$OUT/redis-del.csv"
REDIS_VERSION=$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')
kill "$REDIS_PID"

python3 - "$OUT" "$REDIS_VERSION" <<'PY'
import csv, json, sys, datetime
out, redis_version = sys.argv[1], sys.argv[2]
ps = json.load(open(f"{out}/portswitch.json"))
def rps(path):
    rows = list(csv.reader(open(path)))
    return float(rows[1][1])
set_rps, del_rps = rps(f"{out}/redis-set-nx.csv"), rps(f"{out}/redis-del.csv")
# Equal numbers of each: the pair rate is the harmonic mean.
redis = 2 / (1 / set_rps + 1 / del_rps)
ratio = ps["ops_per_sec"] / redis
table = f"""| system | workload | requests/s | p99 |
|---|---|---:|---:|
| portswitch | REGISTER + UNREGISTER | {ps['ops_per_sec']:,.0f} | {ps['p99_us']:,.0f} µs |
| Redis {redis_version} | SET NX | {set_rps:,.0f} | |
| Redis {redis_version} | DEL | {del_rps:,.0f} | |
| Redis {redis_version} | SET NX + DEL (combined) | {redis:,.0f} | |

portswitch / Redis: **{ratio:.2f}×** ({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)
"""
open(f"{out}/table.md", "w").write(table)
json.dump({"portswitch_ops_per_sec": ps["ops_per_sec"], "redis_set_nx_rps": set_rps,
           "redis_del_rps": del_rps, "redis_combined_rps": redis, "ratio": ratio},
          open(f"{out}/summary.json", "w"))
print(table)
PY
echo "results in $OUT"
