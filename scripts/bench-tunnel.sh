#!/usr/bin/env bash
# The tunnel against its peers, in one run on this machine, every process on the same
# cores: iperf3 through `portswitch tunnel` (pool of 4), `ssh -L` (OpenSSH, aes128-gcm
# and chacha20-poly1305), shadowsocks-libev (aes-256-gcm, ss-tunnel) and plain
# loopback, with 1 and 8 parallel streams; the round trip added to small requests
# (64 B, ping-pong); the bytes on the wire for an office-like corpus (HTML, JSON API
# calls, e-mail with attachments, documents) against the bytes carried; and real
# applications through our tunnel: an ssh session (to the benchmark's sshd) and an
# HTTP download (python3's http.server, fetched with curl), each checked by SHA-256.
#
# Installs what is missing from Debian (iperf3, openssh-server, openssh-client,
# shadowsocks-libev; as root or with sudo), builds portswitch, starts and stops every
# process itself, prints one JSON line per measurement and writes results.jsonl and
# summary.md to bench-results/tunnel-<UTC timestamp>/ (or $OUT).
#
#   scripts/bench-tunnel.sh                 # release build, 5 runs of 5 s each
#   SMOKE=1 scripts/bench-tunnel.sh         # debug build, 1 run of 1 s: a quick check
#   RUNS=7 DURATION=10 scripts/bench-tunnel.sh
#
#   SYSTEMS=tunnel PARTS=corpus scripts/bench-tunnel.sh   # bytes on the wire only
#
# Environment: SMOKE, RUNS, DURATION (s per iperf3 run), PROFILE (release, or debug
# with SMOKE), SYSTEMS (default "loopback tunnel ssh-aes ssh-chacha shadowsocks"),
# PARTS (default "throughput latency corpus apps"), BASE_PORT (default 19500), OUT,
# PORTSWITCH_BIN (a portswitch binary to use instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
    RUNS=${RUNS:-1}; DURATION=${DURATION:-1}; PROFILE=${PROFILE:-debug}; LAT_COUNT=${LAT_COUNT:-200}
else
    RUNS=${RUNS:-5}; DURATION=${DURATION:-5}; PROFILE=${PROFILE:-release}; LAT_COUNT=${LAT_COUNT:-3000}
fi
SYSTEMS=${SYSTEMS:-"loopback tunnel ssh-aes ssh-chacha shadowsocks"}
PARTS=${PARTS:-"throughput latency corpus apps"}
BASE_PORT=${BASE_PORT:-19500}
OUT=${OUT:-$ROOT/bench-results/tunnel-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
has() { case " $SYSTEMS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
want_ssh() { has ssh-aes || has ssh-chacha || { has tunnel && part apps; }; }
want_ssh && [ ! -x /usr/sbin/sshd ] && need+=(openssh-server)
want_ssh && ! command -v ssh >/dev/null && need+=(openssh-client)
has shadowsocks && ! command -v ss-server >/dev/null && need+=(shadowsocks-libev)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
        echo "bench-tunnel.sh: needs root or sudo to install ${need[*]}" >&2; exit 2
    fi
    echo "== installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    # Debian's maintainer scripts must not start system-wide services.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -n "${PORTSWITCH_BIN:-}" ]; then
    BIN=$PORTSWITCH_BIN  # built already (the smoke test passes its own)
elif [ "$PROFILE" = release ]; then
    cargo build --release -q -p portswitch
    BIN=$TARGET_DIR/release/portswitch
else
    cargo build -q -p portswitch
    BIN=$TARGET_DIR/debug/portswitch
fi

# WORK, PIDS, cleanup on exit, wait_port.
source "$ROOT/scripts/lib.sh"
PY="python3 $ROOT/scripts/tunnel_bench.py"

# Ports: targets, then per system an iperf3, an echo and a sink forward.
P_IPERF=$BASE_PORT; P_ECHO=$((BASE_PORT + 1)); P_SINK=$((BASE_PORT + 2))
P_TUN=$((BASE_PORT + 10)); P_TUN_METRICS=$((BASE_PORT + 11))
P_SSHD=$((BASE_PORT + 20)); P_SS=$((BASE_PORT + 30)); P_HTTP=$((BASE_PORT + 3))
port_of() { # system kind(0 iperf, 1 echo, 2 sink)
    case $1 in
        loopback) echo $((BASE_PORT + $2)) ;;
        tunnel) echo $((BASE_PORT + 40 + $2)) ;;
        ssh-aes) echo $((BASE_PORT + 50 + $2)) ;;
        ssh-chacha) echo $((BASE_PORT + 60 + $2)) ;;
        shadowsocks) echo $((BASE_PORT + 70 + $2)) ;;
    esac
}

iperf3 -s -p "$P_IPERF" >"$WORK/iperf3.log" 2>&1 & PIDS+=($!)
$PY echo "$P_ECHO" & PIDS+=($!)
$PY sink "$P_SINK" & PIDS+=($!)
wait_port "$P_IPERF"; wait_port "$P_ECHO"; wait_port "$P_SINK"

if has tunnel; then
    "$BIN" tunnel keygen --out "$WORK/tunnel.key" 2>/dev/null
    "$BIN" tunnel server --listen "127.0.0.1:$P_TUN" --key-file "$WORK/tunnel.key" >"$OUT/tunnel-server.log" 2>&1 & PIDS+=($!)
    wait_port "$P_TUN"
    fw=()
    for k in 0 1 2; do fw+=(-L "127.0.0.1:$(port_of tunnel $k):127.0.0.1:$((BASE_PORT + k))"); done
    # Applications through the tunnel: sshd (kind 3) and an HTTP server (kind 4).
    fw+=(-L "127.0.0.1:$(port_of tunnel 3):127.0.0.1:$P_SSHD" -L "127.0.0.1:$(port_of tunnel 4):127.0.0.1:$P_HTTP")
    "$BIN" tunnel client --server "127.0.0.1:$P_TUN" --key-file "$WORK/tunnel.key" "${fw[@]}" \
        --metrics-listen "127.0.0.1:$P_TUN_METRICS" >"$OUT/tunnel-client.log" 2>&1 & PIDS+=($!)
    wait_port "$(port_of tunnel 2)"; wait_port "$P_TUN_METRICS"
fi
if want_ssh; then
    mkdir -p "$WORK/ssh" /run/sshd 2>/dev/null || true
    ssh-keygen -q -t ed25519 -N "" -f "$WORK/ssh/host" >/dev/null
    ssh-keygen -q -t ed25519 -N "" -f "$WORK/ssh/user" >/dev/null
    cp "$WORK/ssh/user.pub" "$WORK/ssh/authorized_keys"
    chmod 600 "$WORK/ssh/authorized_keys"
    cat >"$WORK/ssh/sshd_config" <<CONF
Port $P_SSHD
ListenAddress 127.0.0.1
HostKey $WORK/ssh/host
AuthorizedKeysFile $WORK/ssh/authorized_keys
PidFile $WORK/ssh/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com
CONF
    /usr/sbin/sshd -D -f "$WORK/ssh/sshd_config" -E "$OUT/sshd.log" & PIDS+=($!)
    wait_port "$P_SSHD"
    for sys in ssh-aes ssh-chacha; do
        has "$sys" || continue
        cipher=aes128-gcm@openssh.com
        [ "$sys" = ssh-chacha ] && cipher=chacha20-poly1305@openssh.com
        fw=()
        for k in 0 1 2; do fw+=(-L "127.0.0.1:$(port_of "$sys" $k):127.0.0.1:$((BASE_PORT + k))"); done
        ssh -N -q -i "$WORK/ssh/user" -p "$P_SSHD" -c "$cipher" -o StrictHostKeyChecking=no \
            -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes "${fw[@]}" "$(id -un)@127.0.0.1" & PIDS+=($!)
        wait_port "$(port_of "$sys" 2)"
    done
fi
if has shadowsocks; then
    ss-server -s 127.0.0.1 -p "$P_SS" -k bench-password -m aes-256-gcm >"$OUT/ss-server.log" 2>&1 & PIDS+=($!)
    wait_port "$P_SS"
    for k in 0 1 2; do
        ss-tunnel -s 127.0.0.1 -p "$P_SS" -b 127.0.0.1 -l "$(port_of shadowsocks $k)" \
            -L "127.0.0.1:$((BASE_PORT + k))" -k bench-password -m aes-256-gcm >>"$OUT/ss-tunnel.log" 2>&1 & PIDS+=($!)
    done
    wait_port "$(port_of shadowsocks 2)"
fi

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
emit() { echo "$1" | tee -a "$OUT/results.jsonl"; }

# --- throughput -------------------------------------------------------------------
part throughput && for sys in $SYSTEMS; do
    port=$(port_of "$sys" 0)
    for streams in 1 8; do
        : >"$WORK/runs"
        for _ in $(seq 1 "$RUNS"); do
            gbps=$(iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" -P "$streams" -J 2>/dev/null |
                jq '.end.sum_received.bits_per_second / 1e9' || echo 0)
            echo "$gbps" >>"$WORK/runs"
        done
        med=$(median <"$WORK/runs")
        emit "{\"system\":\"$sys\",\"measure\":\"iperf3_gbit_s\",\"streams\":$streams,\"median\":$med,\"runs\":[$(paste -sd, "$WORK/runs")]}"
    done
done

# --- latency ----------------------------------------------------------------------
part latency && for sys in $SYSTEMS; do
    r=$($PY latency "$(port_of "$sys" 1)" "$LAT_COUNT" 64)
    emit "{\"system\":\"$sys\",\"measure\":\"rtt_64B\",\"result\":$r}"
done

# --- bytes on the wire for the office corpus (ours) -----------------------------
if has tunnel && part corpus; then
    metric() { curl -s "http://127.0.0.1:$P_TUN_METRICS/metrics" | awk -v m="$1" '$1==m {print $2}'; }
    c0=$(metric portswitch_tunnel_carried_sent_bytes_total); w0=$(metric portswitch_tunnel_wire_sent_bytes_total)
    r=$($PY corpus "$(port_of tunnel 2)")
    c1=$(metric portswitch_tunnel_carried_sent_bytes_total); w1=$(metric portswitch_tunnel_wire_sent_bytes_total)
    emit "{\"system\":\"tunnel\",\"measure\":\"office_corpus\",\"carried\":$((c1 - c0)),\"wire\":$((w1 - w0)),\"wire_per_carried\":$(awk -v w=$((w1 - w0)) -v c=$((c1 - c0)) 'BEGIN { if (c > 0) printf "%.3f", w / c; else printf "null" }'),\"corpus\":$r}"
fi

# --- applications through our tunnel: ssh and HTTP, checked by SHA-256 -------------
if has tunnel && part apps; then
    size=$((64 << 20)); [ -n "$SMOKE" ] && size=$((4 << 20))
    mkdir -p "$WORK/www"
    head -c "$size" /dev/urandom >"$WORK/www/payload"
    want=$(sha256sum <"$WORK/www/payload" | cut -d' ' -f1)
    # ssh: a session to the sshd through our tunnel, streaming the file back.
    t0=$(date +%s.%N)
    got=$(ssh -q -i "$WORK/ssh/user" -p "$(port_of tunnel 3)" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -c aes128-gcm@openssh.com "$(id -un)@127.0.0.1" \
        cat "$WORK/www/payload" | sha256sum | cut -d' ' -f1)
    t1=$(date +%s.%N)
    emit "{\"system\":\"tunnel\",\"measure\":\"ssh_through\",\"bytes\":$size,\"sha256_ok\":$([ "$got" = "$want" ] && echo true || echo false),\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')}"
    # HTTP: python3's http.server behind the tunnel, fetched with curl.
    python3 -m http.server "$P_HTTP" --bind 127.0.0.1 --directory "$WORK/www" >"$WORK/http.log" 2>&1 & PIDS+=($!)
    wait_port "$P_HTTP"
    t0=$(date +%s.%N)
    got=$(curl -sf "http://127.0.0.1:$(port_of tunnel 4)/payload" | sha256sum | cut -d' ' -f1)
    t1=$(date +%s.%N)
    emit "{\"system\":\"tunnel\",\"measure\":\"http_through\",\"bytes\":$size,\"sha256_ok\":$([ "$got" = "$want" ] && echo true || echo false),\"seconds\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')}"
fi

# --- summary ----------------------------------------------------------------------
{
    echo "# Tunnel benchmark $(date -u +%Y-%m-%dT%H:%MZ) ($PROFILE, $RUNS runs x ${DURATION}s, median)"
    echo
    echo "| system | 1 stream Gbit/s | 8 streams Gbit/s | p50 RTT 64 B (us) | p99 (us) |"
    echo "|---|---|---|---|---|"
    for sys in $SYSTEMS; do
        one=$(jq -r "select(.system==\"$sys\" and .streams==1) | .median" "$OUT/results.jsonl")
        eight=$(jq -r "select(.system==\"$sys\" and .streams==8) | .median" "$OUT/results.jsonl")
        p50=$(jq -r "select(.system==\"$sys\" and .measure==\"rtt_64B\") | .result.p50_us" "$OUT/results.jsonl")
        p99=$(jq -r "select(.system==\"$sys\" and .measure==\"rtt_64B\") | .result.p99_us" "$OUT/results.jsonl")
        echo "| $sys | $one | $eight | $p50 | $p99 |"
    done
    echo
    jq -r 'select(.measure=="ssh_through" or .measure=="http_through") | "\(.measure): \(.bytes) bytes through the tunnel in \(.seconds) s, SHA-256 \(if .sha256_ok then "matches" else "DIFFERS" end)."' "$OUT/results.jsonl"
    jq -r 'select(.measure=="office_corpus") | "Office corpus: \(.carried) bytes carried, \(.wire) on the wire (\(.wire_per_carried) of carried)."' "$OUT/results.jsonl"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
echo "results in $OUT"
