#!/usr/bin/env bash
# The message queue replicated: a port switch and three brokers (release build) on this
# machine, and `portswitch mq bench --switch` producing and consuming through the
# cluster client. Queues with 1 replica (no replication) and 3 (each message confirmed
# once two brokers hold it, fsync per batch on each), 1 and 3 partitions (leaders
# spread over the brokers). Prints one JSON line per run and keeps them in
# bench-results/mq-group-<UTC timestamp>/.
#
#   scripts/bench-mq-group.sh
#   MESSAGES=200000 scripts/bench-mq-group.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-500000}
cargo build --release -q -p portswitch
BIN=target/release/portswitch
OUT=bench-results/mq-group-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
DATA=$(mktemp -d -p "$PWD" .mq-group-bench-XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DATA"' EXIT
wait_listening() {
    for _ in $(seq 200); do
        grep -q "listening on" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "$1: did not start" >&2
    exit 1
}
"$BIN" serve --listen 127.0.0.1:0 --data-dir "$DATA/switch" >"$OUT/switch.log" 2>&1 &
PIDS+=($!)
wait_listening "$OUT/switch.log"
SWITCH=$(sed -n 's/^listening on //p' "$OUT/switch.log" | head -1)
for b in b0 b1 b2; do
    "$BIN" mq serve --listen 127.0.0.1:0 --no-http --data-dir "$DATA/$b" --switch "$SWITCH" \
        --name "$b" >"$OUT/$b.log" 2>&1 &
    PIDS+=($!)
    wait_listening "$OUT/$b.log"
done
run() {
    "$BIN" mq bench --switch "$SWITCH" --json "$@" | tee -a "$OUT/results.jsonl"
}
run --messages "$MESSAGES" --size 100 --partitions 1 --replicas 1
run --messages "$MESSAGES" --size 100 --partitions 1 --replicas 3
run --messages "$MESSAGES" --size 100 --partitions 3 --replicas 1
run --messages "$MESSAGES" --size 100 --partitions 3 --replicas 3
run --messages $((MESSAGES / 5)) --size 1024 --partitions 3 --replicas 3
# Latency below the peak: paced producers, small batches.
run --messages $((MESSAGES / 2)) --size 100 --partitions 3 --replicas 3 --batch 100 --rate 100000
echo "results in $OUT"
