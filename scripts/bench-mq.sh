#!/usr/bin/env bash
# The message queue's own figures: one broker (release build, data on this machine's
# disk, fsync per batch unless stated) and `portswitch mq bench` producing and consuming
# through it, producer, consumer and broker on the same cores. Prints one JSON line per
# run and keeps them in bench-results/mq-<UTC timestamp>/.
#
#   scripts/bench-mq.sh
#   MESSAGES=200000 scripts/bench-mq.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-1000000}
PORT=${PORT:-17490}
cargo build --release -q -p portswitch
BIN=target/release/portswitch
OUT=bench-results/mq-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
DATA=$(mktemp -d -p "$PWD" .mq-bench-XXXXXX)
"$BIN" mq serve --listen "127.0.0.1:$PORT" --no-http --data-dir "$DATA" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do
    grep -q "listening on" "$OUT/serve.log" 2>/dev/null && break
    sleep 0.1
done
run() {
    "$BIN" mq bench --addr "127.0.0.1:$PORT" --json "$@" | tee -a "$OUT/results.jsonl"
}
run --messages "$MESSAGES" --size 100 --partitions 1
run --messages "$MESSAGES" --size 100 --partitions 4
run --messages "$MESSAGES" --size 100 --partitions 16
run --messages "$MESSAGES" --size 100 --partitions 1 --fsync interval
run --messages $((MESSAGES / 5)) --size 1024 --partitions 1
run --messages $((MESSAGES / 5)) --size 1024 --partitions 4
# Latency below the peak: paced producers, small batches.
run --messages $((MESSAGES / 2)) --size 100 --partitions 1 --batch 100 --rate 200000
run --messages $((MESSAGES / 2)) --size 100 --partitions 4 --batch 100 --rate 300000
echo "results in $OUT"
