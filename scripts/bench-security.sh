#!/usr/bin/env bash
# Security figures, one run on this machine: cost of a SCRAM login, register-unregister
# over TLS as a ratio of plaintext, and the cost of ACL checks. Three servers on
# loopback: plaintext without users, plaintext with users, TLS with users.
#
#   scripts/bench-security.sh            # 10 s per throughput run
#   DURATION=30 scripts/bench-security.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
cargo build --release -q -p portswitch
BIN=target/release/portswitch
. "$(dirname "$0")/lib.sh"
ROOT_PW='Granite-Falcon-2026!'
APP_PW='Tulip-Orbit-93xx'
"$BIN" cert --out "$WORK/certs" >/dev/null

start() { # port, extra flags...
    local port=$1; shift
    "$BIN" serve --listen "127.0.0.1:$port" --no-http "$@" >"$WORK/serve-$port.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
}
users() { # addr, extra ctl flags...
    local addr=$1; shift
    echo "$ROOT_PW" | "$BIN" ctl --addr "$addr" "$@" user add root --role root >/dev/null
    # A role whose matching grant is the last of ten: the ACL check walks them all.
    local grants=()
    for i in $(seq 1 9); do grants+=(--grant "other$i/=register,query"); done
    PORTSWITCH_PASSWORD=$ROOT_PW "$BIN" ctl --addr "$addr" "$@" --user root role add app "${grants[@]}" --grant "bench-=register,query" >/dev/null
    PORTSWITCH_PASSWORD=$ROOT_PW PORTSWITCH_NEW_PASSWORD=$APP_PW "$BIN" ctl --addr "$addr" "$@" --user root user add app --role app >/dev/null
}

start 17410
start 17411 --data-dir "$WORK/d1"
users 127.0.0.1:17411
start 17412 --data-dir "$WORK/d2" --tls-cert "$WORK/certs/server.pem" --tls-key "$WORK/certs/server-key.pem"
users localhost:17412 --ca "$WORK/certs/ca.pem"

run() { "$BIN" bench register-unregister --connections 64 --duration "$DURATION" --json "$@"; }
echo "== register-unregister, 64 connections, ${DURATION}s each"
PLAIN=$(run --addr 127.0.0.1:17410)
ROOTP=$(PORTSWITCH_PASSWORD=$ROOT_PW run --addr 127.0.0.1:17411 --user root)
ACL=$(PORTSWITCH_PASSWORD=$APP_PW run --addr 127.0.0.1:17411 --user app)
TLS=$(PORTSWITCH_PASSWORD=$ROOT_PW run --addr localhost:17412 --ca "$WORK/certs/ca.pem" --user root)
echo "== logins (SCRAM-SHA-256, 16384 iterations)"
L1=$(PORTSWITCH_PASSWORD=$ROOT_PW "$BIN" bench login --addr 127.0.0.1:17411 --user root --connections 1 --duration 5 --json)
L2=$(PORTSWITCH_PASSWORD=$ROOT_PW "$BIN" bench login --addr 127.0.0.1:17411 --user root --connections 2 --duration 5 --json)
LT=$(PORTSWITCH_PASSWORD=$ROOT_PW "$BIN" bench login --addr localhost:17412 --ca "$WORK/certs/ca.pem" --user root --connections 1 --duration 5 --json)

python3 - "$PLAIN" "$ROOTP" "$ACL" "$TLS" "$L1" "$L2" "$LT" <<'PY'
import json, sys, datetime
plain, rootp, acl, tls, l1, l2, lt = (json.loads(a) for a in sys.argv[1:])
ops = lambda r: r["ops_per_sec"]
acl_ns = (1 / ops(acl) - 1 / ops(rootp)) * 1e9
print(f"""| run | ops/s | p99 | ratio |
|---|---:|---:|---:|
| plaintext, no users | {ops(plain):,.0f} | {plain['p99_us']:,.0f} µs | 1.00 |
| plaintext, logged in as root (one grant) | {ops(rootp):,.0f} | {rootp['p99_us']:,.0f} µs | {ops(rootp)/ops(plain):.2f} |
| plaintext, role of 10 grants, match last | {ops(acl):,.0f} | {acl['p99_us']:,.0f} µs | {ops(acl)/ops(plain):.2f} |
| TLS 1.3, logged in as root | {ops(tls):,.0f} | {tls['p99_us']:,.0f} µs | {ops(tls)/ops(rootp):.2f} of plaintext with users |

ACL check with 10 grants vs 1, per operation (difference of per-op times): {acl_ns:.0f} ns
| logins | logins/s | connect+login p50 | p99 |
|---|---:|---:|---:|
| plaintext, 1 connection | {l1['logins_per_sec']:,.0f} | {l1['p50_us']:,.0f} µs | {l1['p99_us']:,.0f} µs |
| plaintext, 2 connections | {l2['logins_per_sec']:,.0f} | {l2['p50_us']:,.0f} µs | {l2['p99_us']:,.0f} µs |
| TLS, 1 connection | {lt['logins_per_sec']:,.0f} | {lt['p50_us']:,.0f} µs | {lt['p99_us']:,.0f} µs |

({datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)""")
PY
