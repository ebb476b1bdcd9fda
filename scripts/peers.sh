#!/usr/bin/env bash
# The peer comparison suite: the same workloads, through each system's own maintained
# client library (peers/ — etcd-client, zookeeper-client, redis, portswitch-client),
# against portswitch, etcd, ZooKeeper and Redis, each from Debian's packages, on
# loopback with its default durability, one after the other on this machine.
#
# Installs what it needs (Debian packages: etcd-server, zookeeper, redis-server,
# protobuf-compiler and libprotobuf-dev for etcd-client's build), builds peers/ and portswitch, starts and
# stops every server itself, and writes results.json + table.md to
# bench-results/peers-<UTC timestamp>/ (or $OUT). Not part of the test command; the
# test `peers_smoke` runs it with SMOKE=1 so it cannot rot.
#
#   scripts/peers.sh                  # full run, ~10 minutes
#   DURATION=30 scripts/peers.sh
#   SMOKE=1 scripts/peers.sh          # seconds per workload, 2,000 names
#   SHARED_ONLY=1 scripts/peers.sh    # only the shared-connection row
#
# The shared-connection row runs once per load-generator thread count in
# SHARED_THREADS (default "1 2"), and the table compares each system at its best: on
# two cores a second load-generator thread helps some client libraries and takes the
# server's core from others. PEERBENCH_THREADS sets the thread count of every other
# run (default: one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
    DURATION=${DURATION:-1}; CLIENT_COUNTS=${CLIENT_COUNTS:-"1 4"}; CONTENDERS=${CONTENDERS:-4}
    FILL=${FILL:-2000}; KILL_REPEAT=${KILL_REPEAT:-1}; PROFILE=${PROFILE:-debug}
    PIPELINED_CLIENTS=${PIPELINED_CLIENTS:-4}; PIPELINE=${PIPELINE:-4}
else
    DURATION=${DURATION:-10}; CLIENT_COUNTS=${CLIENT_COUNTS:-"1 16 128"}; CONTENDERS=${CONTENDERS:-16}
    FILL=${FILL:-1000000}; KILL_REPEAT=${KILL_REPEAT:-5}; PROFILE=${PROFILE:-release}
    PIPELINED_CLIENTS=${PIPELINED_CLIENTS:-128}; PIPELINE=${PIPELINE:-16}
fi
# ZooKeeper's smallest session timeout with its default tickTime (2 s) is 4 s; every
# system gets the same lease in kill-holder.
KILL_LEASE_MS=${KILL_LEASE_MS:-4000}
SYSTEMS=${SYSTEMS:-"portswitch etcd zookeeper redis"}
BASE_PORT=${BASE_PORT:-17500}
OUT=${OUT:-$ROOT/bench-results/peers-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

# --- install -------------------------------------------------------------------
need=()
command -v etcd >/dev/null || need+=(etcd-server)
[ -f /usr/share/java/zookeeper.jar ] || need+=(zookeeper)
command -v redis-server >/dev/null || need+=(redis-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc's well-known types (descriptor.proto, struct.proto): only recommended by
# protobuf-compiler, so not installed with --no-install-recommends.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v java >/dev/null || need+=(default-jre-headless)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "peers.sh: needs root or sudo to install ${need[*]}" >&2; exit 2; }
        SUDO=sudo
    fi
    echo "== installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    # Debian's maintainer scripts must not start system-wide services on our ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- build ---------------------------------------------------------------------
cargo_profile=(); [ "$PROFILE" = release ] && cargo_profile=(--release)
if [ -z "${PORTSWITCH_BIN:-}" ]; then
    cargo build -q "${cargo_profile[@]}" -p portswitch
    PORTSWITCH_BIN=$ROOT/target/$PROFILE/portswitch
fi
(cd peers && cargo build -q "${cargo_profile[@]}")
PEERBENCH=$ROOT/peers/target/$PROFILE/peerbench

. "$ROOT/scripts/lib.sh"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# --- servers -------------------------------------------------------------------
SERVER_PID=""
start_server() { # system port
    local sys=$1 port=$2 dir="$WORK/$1-$2"
    mkdir -p "$dir"
    case $sys in
    portswitch)
        "$PORTSWITCH_BIN" serve --listen "127.0.0.1:$port" --no-http >"$dir/log" 2>&1 &
        ;;
    etcd)
        etcd --name peerbench --data-dir "$dir/data" \
            --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
            --listen-peer-urls "http://127.0.0.1:$((port + 1000))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1000))" \
            --initial-cluster "peerbench=http://127.0.0.1:$((port + 1000))" >"$dir/log" 2>&1 &
        ;;
    zookeeper)
        # Defaults but for two settings a benchmark needs: no limit on connections
        # from one address (default 60, below 128 clients) and no admin web server
        # (it would take port 8080).
        cat >"$dir/zoo.cfg" <<EOF
tickTime=2000
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
EOF
        java -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
            org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" >"$dir/log" 2>&1 &
        ;;
    redis)
        redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" >"$dir/log" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_port "$port"
}
stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}
version_of() {
    case $1 in
    portswitch) "$PORTSWITCH_BIN" --version | awk '{print $2}' ;;
    etcd) etcd --version | awk '/etcd Version/ {print $3}' ;;
    zookeeper) dpkg-query -W -f '${Version}' zookeeper | sed 's/-.*//' ;;
    redis) redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/' ;;
    esac
}
run() { # system port workload args...
    local sys=$1 port=$2 w=$3; shift 3
    echo "== $sys $w $*" >&2
    "$PEERBENCH" run --system "$sys" --addr "127.0.0.1:$port" --server-pid "$SERVER_PID" \
        --workload "$w" "$@" | tee -a "$RESULTS"
}

SHARED_THREADS=${SHARED_THREADS:-"1 2"}
run_shared() { # system port: the shared-connection row at each load-generator thread count
    local t
    for t in $SHARED_THREADS; do
        PEERBENCH_THREADS=$t run "$1" "$2" acquire-release --clients "$PIPELINED_CLIENTS" \
            --connections 1 --duration "$DURATION" --label shared-connection
    done
}

port=$BASE_PORT
for sys in $SYSTEMS; do
    port=$((port + 1))
    echo "{\"system\":\"$sys\",\"version\":\"$(version_of "$sys")\"}" >>"$RESULTS"
    # Throughput and failure detection on a fresh server...
    start_server "$sys" "$port"
    if [ -n "${SHARED_ONLY:-}" ]; then
        run_shared "$sys" "$port"
        stop_server
        continue
    fi
    for c in $CLIENT_COUNTS; do
        run "$sys" "$port" acquire-release --clients "$c" --duration "$DURATION"
    done
    # The same 128 sessions with 16 requests in flight each: what each client library
    # makes of concurrent requests on one session (pipelining, multiplexing, batching).
    run "$sys" "$port" acquire-release --clients "$PIPELINED_CLIENTS" --pipeline "$PIPELINE" --duration "$DURATION"
    # The same 128 sessions, one request in flight each, sharing one connection where
    # the system can (portswitch: channels; etcd: one client; Redis: one multiplexed
    # connection; ZooKeeper cannot: a session is a connection).
    run_shared "$sys" "$port"
    run "$sys" "$port" contend --clients "$CONTENDERS" --duration "$DURATION"
    run "$sys" "$port" kill-holder --repeat "$KILL_REPEAT" --lease-ms "$KILL_LEASE_MS"
    if [ "$sys" = portswitch ]; then
        run "$sys" "$port" kill-holder --repeat "$KILL_REPEAT" --lease-ms "$KILL_LEASE_MS" \
            --end-on-disconnect --label end-on-disconnect
    fi
    stop_server
    # ...memory per name on another fresh one.
    port=$((port + 1))
    start_server "$sys" "$port"
    run "$sys" "$port" fill --count "$FILL" --clients 16 --inflight 64
    stop_server
done

python3 "$ROOT/scripts/peers_table.py" "$RESULTS" "$OUT" "$DURATION"
echo "results in $OUT" >&2
