#!/usr/bin/env bash
# The vault against its peers, in one run, on one disk: plain ext4 (the floor),
# gocryptfs (FUSE, the best-known encrypted overlay), ours through `portswitch vault
# mount` (FUSE), SQLCipher (a current one, built from source by rusqlite's
# bundled-sqlcipher), and ours through the SQLite VFS.
#
# Parts (every run on a fresh, empty store of each system):
#   fio     sequential 1 MiB write (fsync at the end) and read (cold: fresh mount and
#           dropped caches; warm: read again), random 4 KiB read (warm, time-based)
#           and write (fsync at the end) on one file of FIO_SIZE, incompressible data;
#           for ours also the share of each read's time spent verifying (opening block
#           records: the mount's vault_verify_seconds_total, scraped from
#           --metrics-listen before and after the read)
#   files   unpack a source tree (the vendored sources of the workspace's Cargo.lock,
#           a plain tar made here, deterministic for a given lock file), then sync;
#           bytes on disk; read it all back cold
#   sqlite  peers-vault/'s workload: SQL_ROWS text-heavy rows inserted in transactions
#           of SQL_BATCH (rollback journal, synchronous=FULL), then SQL_SELECTS point
#           selects by primary key — plain SQLite on each mount, SQLCipher on ext4, and
#           ours through the VFS (crates/portswitch-vault-sqlite's benches/sqlite_vfs.rs,
#           which compiles in the same workload)
#   bytes   the text-heavy database from the ext4 run copied into a fresh store of
#           each system: bytes on disk (and SQLCipher's own file, the VFS run's vault,
#           and what zstd per 4 KiB block would leave: a reference)
#
# Every system is a set of functions (<sys>_available, _version, _prepare, _mount,
# _umount); ours is skipped, with the reason, while `portswitch vault mount` or the
# VFS benchmark does not exist.
#
# Installs what is missing from Debian (fio, gocryptfs, fuse3, jq, libssl-dev and
# pkg-config for SQLCipher; as root or with sudo, through scripts/need-debian.sh),
# builds peers-vault (and portswitch unless PORTSWITCH_BIN is given), starts and
# stops every mount itself, prints one JSON line per measurement and writes
# results.jsonl and summary.md to bench-results/vault-<UTC timestamp>/ (or $OUT).
#
#   scripts/bench-vault.sh                     # full run: 1 GiB fio, 200 k rows, 3 runs
#   SMOKE=1 scripts/bench-vault.sh             # small sizes, 1 run: a quick check
#   SYSTEMS="ext4 gocryptfs sqlcipher" PARTS="sqlite bytes" scripts/bench-vault.sh
#   TMPDIR=/mnt/disk scripts/bench-vault.sh    # the disk every system works on
#
# Environment: SMOKE, RUNS, SYSTEMS (default "ext4 gocryptfs ours sqlcipher ours-vfs"),
# PARTS (default "fio files sqlite bytes"), FIO_SIZE (fio's file, default 1g; smoke
# 64m), RAND_SECONDS (random read, default 20; smoke 2), RANDW_SIZE (bytes written by
# the random write, default a quarter of FIO_SIZE), FIO_COMPRESS (how compressible
# fio's data is, percent, default 0), FILES_LIMIT (files of the tree,
# 0 = all; smoke 2000), SQL_ROWS, SQL_BATCH, SQL_SELECTS (default 200000, 1000,
# 200000; smoke 5000, 500, 5000), CMD_TIMEOUT (s for one fio, tar or SQLite run,
# default 1800: a hung mount fails its system, not the suite),
# PROFILE (portswitch's build: release, or debug with SMOKE), PEERS_PROFILE
# (peers-vault's: release, or with SMOKE its unoptimised `smoke` profile, which builds
# SQLite and SQLCipher in a fraction of the time), PORTSWITCH_BIN (a portswitch binary
# to use instead of building one), PEERS_VAULT_TARGET_DIR (default
# peers-vault/target), OUT, TMPDIR (where the stores live: every system on one disk).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
SMOKE=${SMOKE:-}
if [ -n "$SMOKE" ]; then
    RUNS=${RUNS:-1}; FIO_SIZE=${FIO_SIZE:-64m}; RAND_SECONDS=${RAND_SECONDS:-2}
    FILES_LIMIT=${FILES_LIMIT:-2000}; PROFILE=${PROFILE:-debug}; PEERS_PROFILE=${PEERS_PROFILE:-smoke}
    SQL_ROWS=${SQL_ROWS:-5000}; SQL_BATCH=${SQL_BATCH:-500}; SQL_SELECTS=${SQL_SELECTS:-5000}
else
    RUNS=${RUNS:-3}; FIO_SIZE=${FIO_SIZE:-1g}; RAND_SECONDS=${RAND_SECONDS:-20}
    FILES_LIMIT=${FILES_LIMIT:-0}; PROFILE=${PROFILE:-release}; PEERS_PROFILE=${PEERS_PROFILE:-release}
    SQL_ROWS=${SQL_ROWS:-200000}; SQL_BATCH=${SQL_BATCH:-1000}; SQL_SELECTS=${SQL_SELECTS:-200000}
fi
SYSTEMS=${SYSTEMS:-"ext4 gocryptfs ours sqlcipher ours-vfs"}
PARTS=${PARTS:-"fio files sqlite bytes"}
CMD_TIMEOUT=${CMD_TIMEOUT:-1800}
PEERS_TARGET=${PEERS_VAULT_TARGET_DIR:-$ROOT/peers-vault/target}
OUT=${OUT:-$ROOT/bench-results/vault-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
has() { case " $SYSTEMS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
log() { echo "== $(date +%T) $*" >&2; }
# fio's size suffixes (k, m, g: powers of 1024) to bytes.
bytes_of() {
    local n=${1%[kKmMgG]}
    case $1 in
        *[kK]) echo $((n * 1024)) ;;
        *[mM]) echo $((n * 1024 * 1024)) ;;
        *[gG]) echo $((n * 1024 * 1024 * 1024)) ;;
        *) echo "$1" ;;
    esac
}
FIO_BYTES=$(bytes_of "$FIO_SIZE")
RANDW_SIZE=${RANDW_SIZE:-$((FIO_BYTES / 4))}
FS_SYSTEMS=""   # the file systems among SYSTEMS, in order
for s in ext4 gocryptfs ours; do has "$s" && FS_SYSTEMS="$FS_SYSTEMS $s"; done

# --- install -----------------------------------------------------------------------
need=(jq)
part fio && need+=(fio)
has gocryptfs && need+=(gocryptfs fuse3)
has ours && need+=(fuse3 curl)
# SQLCipher's build links the system's OpenSSL (libcrypto).
if has sqlcipher && { part sqlite || part bytes; }; then need+=(libssl-dev pkg-config); fi
bash "$ROOT/scripts/need-debian.sh" "${need[@]}"

# --- build -------------------------------------------------------------------------
BIN=""; BIN_WHY="no portswitch binary"
if has ours || has ours-vfs; then
    if [ -n "${PORTSWITCH_BIN:-}" ]; then
        BIN=$PORTSWITCH_BIN  # built already (the smoke test passes its own)
    else
        log "building portswitch ($PROFILE)"
        cargo_profile=(); [ "$PROFILE" = release ] && cargo_profile=(--release)
        # A portswitch that does not build fails ours, not the peers' figures.
        if cargo build -q "${cargo_profile[@]}" -p portswitch 2>"$OUT/build-portswitch.log"; then
            BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/portswitch
            rm -f "$OUT/build-portswitch.log"
        else
            BIN_WHY="portswitch did not build (build-portswitch.log)"
        fi
    fi
fi
# peers-vault: each binary on its own (built together, Cargo would unify rusqlite's
# features and link SQLCipher into both), in target directories of their own so the
# two builds (SQLite's and SQLCipher's amalgamation: one C file each) run side by side.
SQL_PLAIN=""; SQL_CIPHER=""
if part sqlite || part bytes; then
    build_peer() { # package target-subdir
        cargo build -q --profile "$PEERS_PROFILE" --manifest-path "$ROOT/peers-vault/Cargo.toml" -p "$1" \
            --target-dir "$PEERS_TARGET/$2" >"$OUT/build-$1.log" 2>&1
    }
    log "building peers-vault (SQLite$(has sqlcipher && echo ", SQLCipher"); profile $PEERS_PROFILE)"
    t0=$(date +%s)
    build_peer vaultsql-plain plain & plain_build=$!
    cipher_build=""
    if has sqlcipher; then build_peer vaultsql-sqlcipher sqlcipher & cipher_build=$!; fi
    wait "$plain_build" || { cat "$OUT/build-vaultsql-plain.log" >&2; exit 1; }
    if [ -n "$cipher_build" ]; then
        wait "$cipher_build" || { cat "$OUT/build-vaultsql-sqlcipher.log" >&2; exit 1; }
        SQL_CIPHER=$PEERS_TARGET/sqlcipher/$PEERS_PROFILE/vaultsql-sqlcipher
    fi
    SQL_PLAIN=$PEERS_TARGET/plain/$PEERS_PROFILE/vaultsql-plain
    rm -f "$OUT"/build-vaultsql-*.log
    log "peers-vault built in $(($(date +%s) - t0)) s"
fi

# Ours through the SQLite VFS: the benchmark of crates/portswitch-vault-sqlite
# (benches/sqlite_vfs.rs), which runs peers-vault's workload (compiled in) on a
# connection opened through the vault's VFS; built in PROFILE like portswitch.
VFS_BENCH_SRC=$ROOT/crates/portswitch-vault-sqlite/benches/sqlite_vfs.rs
OURS_VFS_BIN=""; OURS_VFS_WHY=""
if has ours-vfs && part sqlite; then
    if [ ! -f "$VFS_BENCH_SRC" ]; then
        OURS_VFS_WHY="crates/portswitch-vault-sqlite has no benches/sqlite_vfs.rs yet"
    else
        log "building the VFS benchmark ($PROFILE)"
        bench_profile=(); [ "$PROFILE" = release ] || bench_profile=(--profile dev)
        if cargo bench --no-run -q "${bench_profile[@]}" -p portswitch-vault-sqlite --bench sqlite_vfs \
            --message-format=json >"$OUT/build-ours-vfs.json" 2>"$OUT/build-ours-vfs.log"; then
            OURS_VFS_BIN=$(jq -r 'select(.reason == "compiler-artifact" and .target.name == "sqlite_vfs")
                | .executable // empty' "$OUT/build-ours-vfs.json" | tail -n 1)
        fi
        rm -f "$OUT/build-ours-vfs.json"
        if [ -n "$OURS_VFS_BIN" ]; then
            rm -f "$OUT/build-ours-vfs.log"
        else
            OURS_VFS_WHY="its benchmark did not build (build-ours-vfs.log): $(grep -m1 -i error "$OUT/build-ours-vfs.log" || tail -n 1 "$OUT/build-ours-vfs.log")"
        fi
    fi
fi

# WORK (mktemp -d: honours TMPDIR), PIDS, cleanup on exit.
# shellcheck source-path=SCRIPTDIR source=lib.sh disable=SC1091
source "$ROOT/scripts/lib.sh"
PASS="bench passphrase"
PART_PID=""
# Whatever is still mounted under WORK (a part that failed half-way): unmount it, so
# its daemon exits and WORK can go.
unmount_all() {
    local m
    awk -v w="$WORK" 'index($2, w "/") == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
        fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
}
bench_cleanup() {
    if [ -n "$PART_PID" ]; then kill -TERM "$PART_PID" 2>/dev/null || true; fi
    unmount_all
    cleanup
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
FSTYPE=$(findmnt -n -o FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
case $FSTYPE in ext4 | ext2/ext3) ;; *) log "warning: $WORK is on $FSTYPE, not ext4 (set TMPDIR)" ;; esac
# One store at a time (each part removes its stores): fio's file, a log-structured
# store's garbage, the tree and its tar, a few databases.
free_mib=$(df -Pm "$WORK" | awk 'NR == 2 {print $4}')
need_mib=$((FIO_BYTES * 3 / 2 / 1048576 + 1024))
if [ "$free_mib" -lt "$need_mib" ]; then
    log "warning: $free_mib MiB free under $WORK; this run may need about $need_mib MiB"
fi

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "null"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
emit() { echo "$1" | tee -a "$RESULTS"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }
skip() { # system reason
    log "$1: skipped: $2"
    emit "$(jq -nc --arg s "$1" --arg r "$2" '{system:$s, skipped:$r}')"
}

# --- the systems -------------------------------------------------------------------
# Every file system is five functions, <sys>_available (0 when it can run, else prints
# why not), <sys>_version, <sys>_prepare DIR (a fresh store: sets STORE, the bytes on
# disk, and MNT, where to work), <sys>_mount and <sys>_umount. Cold reads unmount, drop
# the caches and mount again. A mount runs in the foreground, as our child: MOUNT_PID.
MOUNT_PID=""
wait_mounted() { # mountpoint pid log
    for _ in $(seq 1 300); do
        mountpoint -q "$1" && return 0
        kill -0 "$2" 2>/dev/null || { echo "mount of $1 exited:" >&2; cat "$3" >&2; return 1; }
        sleep 0.1
    done
    echo "$1: not mounted after 30 s" >&2; cat "$3" >&2
    return 1
}
fuse_umount() { # mountpoint
    local i
    sync
    for i in $(seq 1 50); do
        # fusermount3 for a mount made through it; umount(8) for one made with mount(2)
        # by a daemon running as root.
        { fusermount3 -u "$1" || umount "$1"; } 2>/dev/null && break
        [ "$i" = 50 ] && { echo "$1: busy, unmounting lazily" >&2; fusermount3 -uz "$1" || umount -l "$1"; }
        sleep 0.2
    done
    if [ -n "$MOUNT_PID" ]; then
        for _ in $(seq 1 300); do kill -0 "$MOUNT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "$MOUNT_PID" 2>/dev/null || true
        wait "$MOUNT_PID" 2>/dev/null || true
        MOUNT_PID=""
    fi
}

ext4_available() { return 0; }
ext4_version() { uname -r; }
ext4_prepare() { STORE=$1/dir; MNT=$STORE; mkdir -p "$STORE"; }
ext4_mount() { :; }
ext4_umount() { :; }

gocryptfs_available() { command -v gocryptfs >/dev/null || { echo "gocryptfs is not installed"; return 1; }; }
gocryptfs_version() { gocryptfs -version | awk '{print $2}' | tr -d ';'; }
gocryptfs_prepare() {
    STORE=$1/cipher; MNT=$1/mnt; mkdir -p "$STORE" "$MNT"
    gocryptfs -init -q -extpass "echo $PASS" "$STORE" >/dev/null
}
gocryptfs_mount() {
    gocryptfs -fg -q -extpass "echo $PASS" "$STORE" "$MNT" </dev/null >"$STORE.log" 2>&1 &
    MOUNT_PID=$!
    wait_mounted "$MNT" "$MOUNT_PID" "$STORE.log"
}
gocryptfs_umount() { fuse_umount "$MNT"; }

ours_available() {
    [ -n "$BIN" ] || { echo "$BIN_WHY"; return 1; }
    "$BIN" vault mount --help >/dev/null 2>&1 ||
        { echo "\`portswitch vault mount\` does not exist yet in $BIN"; return 1; }
}
ours_version() { "$BIN" --version | awk '{print $2}'; }
ours_prepare() {
    STORE=$1/vault; MNT=$1/mnt; mkdir -p "$STORE" "$MNT"
    PORTSWITCH_VAULT_PASSPHRASE=$PASS "$BIN" vault init "$STORE" </dev/null >"$1/init.log" 2>&1 ||
        { cat "$1/init.log" >&2; return 1; }
}
# Metrics on a port of the kernel's choosing; the mount logs where (OURS_METRICS: its
# /metrics URL, empty when it did not say within 10 s).
OURS_METRICS=""
ours_mount() {
    local said
    said=$(grep -c 'metrics on http://' "$STORE.log" 2>/dev/null || true)
    PORTSWITCH_VAULT_PASSPHRASE=$PASS "$BIN" vault mount "$STORE" "$MNT" --metrics-listen 127.0.0.1:0 \
        </dev/null >>"$STORE.log" 2>&1 &
    MOUNT_PID=$!
    wait_mounted "$MNT" "$MOUNT_PID" "$STORE.log"
    OURS_METRICS=""
    for _ in $(seq 1 100); do
        if [ "$(grep -c 'metrics on http://' "$STORE.log" || true)" -gt "${said:-0}" ]; then
            OURS_METRICS=$(grep -o 'metrics on http://[^ ]*' "$STORE.log" | tail -n 1 | cut -d' ' -f3)
            break
        fi
        sleep 0.1
    done
    [ -n "$OURS_METRICS" ] || log "ours: the mount did not say where its metrics are"
    return 0
}
ours_umount() { fuse_umount "$MNT"; }

# SQLCipher and ours through the VFS are SQLite engines, not file systems.
sqlcipher_available() { [ -n "$SQL_CIPHER" ] || { echo "not built"; return 1; }; }
ours_vfs_available() {
    part sqlite || { echo "needs the sqlite part"; return 1; }
    [ -n "$OURS_VFS_BIN" ] || { echo "$OURS_VFS_WHY"; return 1; }
}

# A fresh store for SYS in WORK/SYS-PART, mounted: sets STORE and MNT.
fresh() { # system part
    local d=$WORK/$1-$2
    rm -rf "$d"; mkdir -p "$d"
    "$1_prepare" "$d"
    "$1_mount"
}
# Empty every cache between the disk and a read: the mount's own (a fresh daemon),
# and the kernel's (drop_caches as root; else posix_fadvise(DONTNEED) on every file of
# the store and of the mount, which drops clean pages).
COLD_METHOD=drop_caches
drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        COLD_METHOD=fadvise
        find "$@" -type f -exec dd iflag=nocache count=0 if={} \; 2>/dev/null || true
    fi
}
cold() { # system
    "$1_umount"
    drop_caches "$STORE"
    "$1_mount"
    [ "$COLD_METHOD" = fadvise ] && find "$MNT" -type f -exec dd iflag=nocache count=0 if={} \; 2>/dev/null
    return 0
}

# One value per run in WORK/runs/SYS.MEASURE; the median and the runs are emitted.
mkdir -p "$WORK/runs"
record() { echo "$3" >>"$WORK/runs/$1.$2"; } # system measure value
emit_runs() { # system part measure unit [extra json object]
    local f=$WORK/runs/$1.$3 med
    med=$(median <"$f")
    emit "$(jq -nc --arg s "$1" --arg p "$2" --arg m "$3" --arg u "$4" --argjson med "$med" \
        --argjson runs "[$(paste -sd, "$f")]" --argjson x "${5:-{\}}" \
        '{system:$s, part:$p, measure:$m, unit:$u, median:$med, runs:$runs} + $x')"
}

# --- fio ---------------------------------------------------------------------------
# Data: incompressible by default (fio's own pattern shrinks by 8% per 4 KiB block with
# zstd, which would flatter a compressing store); FIO_COMPRESS=N makes it N% compressible.
FIO_COMPRESS=${FIO_COMPRESS:-0}
FIO_COMMON=(--ioengine=psync --fallocate=none --numjobs=1 --size="$FIO_SIZE" --filename=fio.dat
    --buffer_compress_percentage="$FIO_COMPRESS" --output-format=json)
fio_job() { # system measure(or "") dir args... -> records MiB/s (1 MiB) or IOPS (4 KiB)
    local sys=$1 m=$2 dir=$3 out=$WORK/fio.json dirn
    shift 3
    timeout -k 10 "$CMD_TIMEOUT" fio --name="${m:-warmup}" --directory="$dir" "${FIO_COMMON[@]}" --output="$out" "$@" >/dev/null
    [ -n "$m" ] || return 0
    case $m in
        seq_write*) dirn="write" ;;
        rand_write*) dirn="write" ;;
        *) dirn="read" ;;
    esac
    case $m in
        seq*) record "$sys" "$m" "$(jq ".jobs[0].$dirn.bw_bytes / 1048576 | . * 10 | round / 10" "$out")" ;;
        rand*) record "$sys" "$m" "$(jq ".jobs[0].$dirn.iops | round" "$out")" ;;
    esac
}
# Ours: "verify_s verified_bytes blocks_opened cpu_s", the vault's verification counters
# (scraped) and the mount daemon's CPU time (user + system).
CLK_TCK=$(getconf CLK_TCK)
ours_probe() {
    local m cpu
    [ -n "$OURS_METRICS" ] || return 1
    m=$(curl -fsS --max-time 10 "$OURS_METRICS") || return 1
    cpu=$(awk -v hz="$CLK_TCK" '{sub(/^.*\) /, ""); print ($12 + $13) / hz}' "/proc/$MOUNT_PID/stat") || return 1
    awk -v cpu="$cpu" '$1 == "vault_verify_seconds_total" {v = $2} $1 == "vault_verified_bytes_total" {b = $2}
        $1 == "vault_blocks_opened_total" {o = $2} END {if (v == "") exit 1; print v, b + 0, o + 0, cpu}' <<<"$m"
}
# fio_job of a read; for ours also records the share of the read's time (fio's
# runtime) and of the daemon's CPU time spent verifying, and the record bytes opened.
fio_read() { # system measure dir args...
    local sys=$1 m=$2 p0="" p1="" v pct cpu_pct bytes
    if [ "$sys" = ours ]; then p0=$(ours_probe) || p0=""; fi
    fio_job "$@"
    [ "$sys" = ours ] || return 0
    p1=$(ours_probe) || p1=""
    if [ -z "$p0" ] || [ -z "$p1" ]; then
        log "ours: $m: no metrics scraped; verification share not measured"
        return 0
    fi
    v=$(awk -v a="$p0" -v b="$p1" -v ms="$(jq '.jobs[0].read.runtime' "$WORK/fio.json")" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        dv = y[1] - x[1]; db = y[2] - x[2]; dopen = y[3] - x[3]; dcpu = y[4] - x[4]
        if (dopen > 0 && db == 0) exit 1   # blocks opened, none timed: not metered
        printf "%.2f %.2f %d", (ms > 0 ? 100 * dv / (ms / 1000) : 0), (dcpu > 0 ? 100 * dv / dcpu : 0), db
    }') || {
        # Reads the page cache answered open nothing either way: drop every share.
        log "ours: $m: this vault does not time its block opens; verification share not measured"
        : >"$WORK/runs/$sys.unmetered"
        return 0
    }
    read -r pct cpu_pct bytes <<<"$v"
    record ours "${m}_verify_pct" "$pct"
    record ours "${m}_verify_cpu_pct" "$cpu_pct"
    record ours "${m}_verified_bytes" "$bytes"
}
part_fio() { # system
    local sys=$1 d
    for r in $(seq 1 "$RUNS"); do
        log "$sys fio run $r/$RUNS ($FIO_SIZE)"
        fresh "$sys" fio
        d=$MNT/fio
        mkdir -p "$d"
        fio_job "$sys" seq_write_1m "$d" --rw=write --bs=1M --end_fsync=1
        fio_job "$sys" "" "$d" --rw=read --bs=1M --invalidate=0
        fio_read "$sys" seq_read_1m_warm "$d" --rw=read --bs=1M --invalidate=0
        cold "$sys"
        fio_read "$sys" seq_read_1m_cold "$d" --rw=read --bs=1M --invalidate=1
        fio_read "$sys" rand_read_4k_warm "$d" --rw=randread --bs=4k --invalidate=0 --randrepeat=1 \
            --time_based --runtime="$RAND_SECONDS"
        fio_job "$sys" rand_write_4k "$d" --rw=randwrite --bs=4k --io_size="$RANDW_SIZE" --randrepeat=1 \
            --end_fsync=1
        "${sys}_umount"
    done
    rm -rf "$WORK/$sys-fio"
    local x
    x=$(jq -nc --arg size "$FIO_SIZE" --arg cold "$COLD_METHOD" --argjson c "$FIO_COMPRESS" \
        '{file:$size, cold:$cold, compressible_percent:$c}')
    emit_runs "$sys" fio seq_write_1m MiB/s "$x"
    emit_runs "$sys" fio seq_read_1m_cold MiB/s "$x"
    emit_runs "$sys" fio seq_read_1m_warm MiB/s "$x"
    emit_runs "$sys" fio rand_read_4k_warm IOPS "$(jq -c --argjson s "$RAND_SECONDS" '. + {seconds:$s}' <<<"$x")"
    emit_runs "$sys" fio rand_write_4k IOPS "$(jq -c --argjson b "$RANDW_SIZE" '. + {bytes_written:$b}' <<<"$x")"
    # Verification on reads (ours): share of fio's runtime and of the daemon's CPU time
    # spent opening block records; target <= 10% of the read time.
    local m y
    for m in seq_read_1m_cold seq_read_1m_warm rand_read_4k_warm; do
        if [ ! -s "$WORK/runs/$sys.${m}_verify_pct" ] || [ -e "$WORK/runs/$sys.unmetered" ]; then continue; fi
        y=$(jq -c --arg r "$m" '. + {read:$r, target_max_pct:10}' <<<"$x")
        emit_runs "$sys" fio "${m}_verify_pct" "% of read time" "$y"
        emit_runs "$sys" fio "${m}_verify_cpu_pct" "% of mount CPU" "$y"
        emit_runs "$sys" fio "${m}_verified_bytes" bytes "$y"
    done
}

# --- files -------------------------------------------------------------------------
# The tree: the sources cargo vendors for the workspace's Cargo.lock (already in
# cargo's cache once portswitch is built; offline), without the prebuilt Windows
# import libraries (*.a, *.lib, *.dll) some of them ship. Else the repository's own
# tracked files. A plain tar, sorted, with fixed owners and times.
TREE_TAR=$WORK/tree.tar
make_tree() {
    local src
    if cargo vendor --offline --locked --manifest-path "$ROOT/Cargo.toml" "$WORK/tree/vendor" \
        >/dev/null 2>"$WORK/vendor.log"; then
        TREE_KIND="cargo vendor of Cargo.lock"
        src=$WORK/tree
    else
        log "cargo vendor failed ($(tail -1 "$WORK/vendor.log")): using the repository's files"
        TREE_KIND="the repository's tracked files"
        mkdir -p "$WORK/tree/repo"
        git -C "$ROOT" ls-files -z | tar --null -T - -cf - | tar -xf - -C "$WORK/tree/repo"
        src=$WORK/tree
    fi
    (cd "$src" && find . -type f ! -name '*.a' ! -name '*.lib' ! -name '*.dll' | LC_ALL=C sort) >"$WORK/tree.list"
    if [ "$FILES_LIMIT" -gt 0 ]; then
        head -n "$FILES_LIMIT" "$WORK/tree.list" >"$WORK/tree.list.head"
        mv "$WORK/tree.list.head" "$WORK/tree.list"
        TREE_KIND="$TREE_KIND, first $FILES_LIMIT files"
    fi
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$src" -T "$WORK/tree.list" -cf "$TREE_TAR"
    rm -rf "$WORK/tree"
    TREE_FILES=$(wc -l <"$WORK/tree.list")
    TREE_BYTES=$(tar -tvf "$TREE_TAR" | awk '{s += $3} END {print s + 0}')
    log "tree: $TREE_FILES files, $TREE_BYTES bytes ($TREE_KIND)"
}
part_files() { # system
    local sys=$1 t0 first
    first=$(head -n 1 "$WORK/tree.list")
    for r in $(seq 1 "$RUNS"); do
        log "$sys files run $r/$RUNS ($TREE_FILES files)"
        fresh "$sys" files
        mkdir -p "$MNT/tree"
        sync
        t0=$(now)
        timeout -k 10 "$CMD_TIMEOUT" tar -xf "$TREE_TAR" -C "$MNT/tree"
        record "$sys" unpack_s "$(since "$t0")"
        # Durable: fsync one file (ours commits the whole vault on any fsync), then
        # syncfs the disk the store is on.
        sync "$MNT/tree/$first"
        sync -f "$STORE"
        record "$sys" unpack_sync_s "$(since "$t0")"
        # Bytes on disk: the store, unmounted (everything flushed). Then mounted
        # again with empty caches (cold) to read it all back.
        "${sys}_umount"
        record "$sys" du_apparent_bytes "$(du -sb "$STORE" | cut -f1)"
        record "$sys" du_allocated_bytes "$(du -s -B1 "$STORE" | cut -f1)"
        drop_caches "$STORE"
        "${sys}_mount"
        [ "$COLD_METHOD" = fadvise ] && find "$MNT" -type f -exec dd iflag=nocache count=0 if={} \; 2>/dev/null
        t0=$(now)
        timeout -k 10 "$CMD_TIMEOUT" tar -cf - -C "$MNT/tree" . | wc -c >/dev/null
        record "$sys" read_cold_s "$(since "$t0")"
        "${sys}_umount"
    done
    rm -rf "$WORK/$sys-files"
    local x
    x=$(jq -nc --arg k "$TREE_KIND" --argjson f "$TREE_FILES" --argjson b "$TREE_BYTES" \
        '{tree:$k, files:$f, tree_bytes:$b}')
    for m in unpack_s unpack_sync_s read_cold_s; do emit_runs "$sys" files "$m" s "$x"; done
    for m in du_apparent_bytes du_allocated_bytes; do emit_runs "$sys" files "$m" bytes "$x"; done
}

# --- sqlite ------------------------------------------------------------------------
SQL_ARGS=(--rows "$SQL_ROWS" --batch "$SQL_BATCH" --selects "$SQL_SELECTS")
REF_DB=$WORK/reference.db   # the plain database from the ext4 run, for the bytes part
BEFORE_RUN=:   # called with the run's number before each run
sql_runs() { # system command... -> records, emits; the last run's JSON stays in WORK/sql.SYSTEM.json
    local sys=$1 j=$WORK/sql.$1.json
    shift
    for r in $(seq 1 "$RUNS"); do
        "$BEFORE_RUN" "$r"
        log "$sys sqlite run $r/$RUNS ($SQL_ROWS rows)"
        timeout -k 10 "$CMD_TIMEOUT" "$@" "${SQL_ARGS[@]}" >"$j"
        record "$sys" inserts_per_s "$(jq .inserts_per_s "$j")"
        record "$sys" selects_per_s "$(jq .selects_per_s "$j")"
    done
    local x
    x=$(jq -c '{engine, sqlite_version, cipher_version, rows, batch, text_bytes, journal_mode,
        synchronous, page_size, db_bytes}' "$WORK/sql.$sys.json")
    emit_runs "$sys" sqlite inserts_per_s rows/s "$x"
    emit_runs "$sys" sqlite selects_per_s rows/s "$x"
}
# BEFORE_RUN of a file system: a fresh store for every run (same paths: MNT stays).
fresh_sqlite() { # run (sys: part_sqlite's)
    [ "$1" = 1 ] || { "${sys}_umount"; fresh "$sys" sqlite; }
}
part_sqlite() { # system
    local sys=$1
    case $sys in
        sqlcipher)
            mkdir -p "$WORK/sqlcipher-sqlite"
            sql_runs sqlcipher "$SQL_CIPHER" --db "$WORK/sqlcipher-sqlite/bench.db"
            rm -rf "$WORK/sqlcipher-sqlite"
            ;;
        ours-vfs)
            # A fresh vault in DIR each run (the benchmark creates it; default options:
            # AES-256-GCM, zstd, 4 KiB blocks); it reports the vault's bytes as the run
            # left them (every version of the database) and after gc keeping the last.
            sql_runs ours-vfs "$OURS_VFS_BIN" --engine vault --dir "$WORK/ours-vfs-sqlite"
            rm -rf "$WORK/ours-vfs-sqlite"
            ;;
        *)
            # A fresh store for every run (the same paths: MNT does not change).
            fresh "$sys" sqlite
            BEFORE_RUN=fresh_sqlite
            sql_runs "$sys" "$SQL_PLAIN" --db "$MNT/bench.db"
            if [ "$sys" = ext4 ]; then cp "$MNT/bench.db" "$REF_DB"; fi
            "${sys}_umount"
            # What one run left on disk (for ours: every version of the database).
            emit "$(jq -nc --arg s "$sys" --argjson b "$(du -sb "$STORE" | cut -f1)" \
                '{system:$s, part:"sqlite", measure:"store_after_run_bytes", unit:"bytes", median:$b}')"
            rm -rf "$WORK/$sys-sqlite"
            ;;
    esac
}

# --- bytes -------------------------------------------------------------------------
part_bytes() { # system
    local sys=$1 j
    case $sys in
        ext4 | gocryptfs | ours)
            fresh "$sys" bytes
            cp "$REF_DB" "$MNT/bench.db"
            sync "$MNT/bench.db"
            "${sys}_umount"
            j=$(jq -nc --arg s "$sys" --argjson a "$(du -sb "$STORE" | cut -f1)" \
                --argjson d "$(du -s -B1 "$STORE" | cut -f1)" --argjson p "$(stat -c %s "$REF_DB")" \
                '{system:$s, part:"bytes", measure:"db_on_disk", unit:"bytes", median:$a,
                  apparent:$a, allocated:$d, plain_db_bytes:$p, how:"the ext4 run'"'"'s database copied into a fresh store"}')
            rm -rf "$WORK/$sys-bytes"
            emit "$j"
            ;;
        sqlcipher)
            # Its own file, with the same rows (the sqlite part's last run).
            j=$WORK/sql.sqlcipher.json
            [ -s "$j" ] || { skip sqlcipher "bytes: needs the sqlite part"; return 0; }
            emit "$(jq -c '{system:"sqlcipher", part:"bytes", measure:"db_on_disk", unit:"bytes",
                median:.db_bytes, apparent:.db_bytes, allocated:.disk_bytes,
                how:"SQLCipher'"'"'s own database file (same rows)"}' "$j")"
            ;;
        ours-vfs)
            j=$WORK/sql.ours-vfs.json
            [ -s "$j" ] || { skip ours-vfs "bytes: needs the sqlite part"; return 0; }
            emit "$(jq -c '{system:"ours-vfs", part:"bytes", measure:"db_on_disk", unit:"bytes",
                median:(if (.disk_bytes_after_gc | type) == "number" then .disk_bytes_after_gc else .disk_bytes end),
                as_run:.disk_bytes, db_bytes:.db_bytes,
                how:"the VFS run'"'"'s vault, after gc keeping the last version (as_run: with every version)"}' "$j")"
            ;;
    esac
}

# --- run -----------------------------------------------------------------------------
# Every (part, system) runs in a child shell with errexit, in the background so that
# errexit holds and a signal stops the suite at once: a system that fails is reported
# and the others still run.
FAILED=()
run_part() { # part system
    local rc=0
    ( "part_$1" "$2" ) &
    PART_PID=$!
    wait "$PART_PID" || rc=$?
    PART_PID=""
    if [ "$rc" != 0 ]; then
        log "$2 $1: FAILED (exit $rc)"
        FAILED+=("$2 $1")
        emit "$(jq -nc --arg s "$2" --arg p "$1" --argjson rc "$rc" '{system:$s, part:$p, error:("exit \($rc)")}')"
        unmount_all
    fi
}
AVAILABLE=""
for sys in $SYSTEMS; do
    fn=${sys//-/_}_available
    if reason=$("$fn"); then AVAILABLE="$AVAILABLE $sys"; else skip "$sys" "$reason"; fi
done
AVAILABLE_FS=""
for sys in $FS_SYSTEMS; do case " $AVAILABLE " in *" $sys "*) AVAILABLE_FS="$AVAILABLE_FS $sys" ;; esac; done
log "systems:$AVAILABLE; parts: $PARTS; work directory on $FSTYPE"

part fio && for sys in $AVAILABLE_FS; do run_part fio "$sys"; done
if part files && [ -n "$AVAILABLE_FS" ]; then
    make_tree
    for sys in $AVAILABLE_FS; do run_part files "$sys"; done
fi
if part sqlite; then
    for sys in $AVAILABLE; do run_part sqlite "$sys"; done
fi
if part bytes; then
    if [ ! -s "$REF_DB" ]; then
        log "bytes: making the reference database ($SQL_ROWS rows)"
        mkdir -p "$WORK/ref"
        "$SQL_PLAIN" --db "$WORK/ref/bench.db" --rows "$SQL_ROWS" --batch "$SQL_BATCH" --selects 0 >/dev/null
        mv "$WORK/ref/bench.db" "$REF_DB"
    fi
    emit "$("$SQL_PLAIN" blockzstd "$REF_DB" | jq -c '{system:"zstd-4k", part:"bytes", measure:"db_on_disk",
        unit:"bytes", median:.zstd_bytes, ratio:.ratio, how:"the plain database, each 4 KiB block zstd -1 (raw when larger), no sealing: a reference"}')"
    for sys in $AVAILABLE; do run_part bytes "$sys"; done
fi

# --- versions and summary ------------------------------------------------------------
versions=$(for sys in $AVAILABLE; do
    case $sys in
        sqlcipher) v=$(jq -r '.cipher_version // empty' "$WORK/sql.sqlcipher.json" 2>/dev/null || true) ;;
        ours-vfs) v=$(ours_version 2>/dev/null || true) ;;
        *) v=$("${sys}_version" 2>/dev/null || true) ;;
    esac
    printf '%s=%s\n' "$sys" "$v"
done; echo "fio=$(fio --version 2>/dev/null || true)")
LOAD="$LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end" STARTED="$STARTED" CMD="${SMOKE:+SMOKE=1 }scripts/bench-vault.sh" VERSIONS="$versions" FSTYPE="$FSTYPE" \
    CPU="$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
    SETTINGS="runs=$RUNS fio=$FIO_SIZE rand_read=${RAND_SECONDS}s rand_write=$RANDW_SIZE B sql_rows=$SQL_ROWS batch=$SQL_BATCH selects=$SQL_SELECTS" \
    python3 - "$RESULTS" >"$OUT/summary.md" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def get(system, measure, part=None):
    for r in rows:
        if r.get("system") == system and r.get("measure") == measure and (part is None or r.get("part") == part):
            return r
    return None
def val(system, measure, part=None):
    r = get(system, measure, part)
    return None if r is None else r.get("median")
def fmt(x, unit=""):
    if x is None: return "-"
    if unit == "bytes": return f"{x / 1e6:,.1f} MB"
    if unit == "s": return f"{x:,.2f} s"
    if isinstance(x, float) and x < 100: return f"{x:,.1f}"
    return f"{x:,.0f}"
def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b not in (None, 0) else "-"
def met(a, b, need, lower=False):
    if a is None or b in (None, 0): return "-"
    q = a / b
    return "yes" if (q <= need if lower else q >= need) else "**no**"
print(f"# Vault benchmark {os.environ['STARTED']}\n")
print(f"Command: `{os.environ['CMD']}` ({os.environ['SETTINGS']}; median of the runs).  ")
print(f"Machine: {os.environ['CPU']}; load average {os.environ['LOAD']}; stores in a temporary directory on {os.environ['FSTYPE']} (every system on the same disk).  ")
print("Versions: " + ", ".join(l for l in os.environ["VERSIONS"].splitlines() if l) + ".\n")
for r in rows:
    if "skipped" in r: print(f"- **{r['system']}** skipped: {r['skipped']}")
    if "error" in r: print(f"- **{r['system']}** {r.get('part')}: failed ({r['error']})")
print()
fs = ["ext4", "gocryptfs", "ours"]
cold = next((r.get("cold") for r in rows if r.get("cold")), None)
if any(r.get("part") == "fio" and "median" in r for r in rows):
    print("## fio (one job, psync)\n")
    print(f"Cold: the mount restarted and the kernel's caches dropped ({cold}); warm: read again. "
          "Writes end with an fsync, inside the time; the data is incompressible unless FIO_COMPRESS says otherwise. Target: sequential >= 1.2x gocryptfs, random 4 KiB >= 1x.\n")
    print("| measure | ext4 | gocryptfs | ours | gocryptfs / ext4 | ours / gocryptfs | target met |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for m, label, need in [("seq_write_1m", "sequential write 1 MiB (MiB/s)", 1.2),
                         ("seq_read_1m_cold", "sequential read 1 MiB, cold (MiB/s)", 1.2),
                         ("seq_read_1m_warm", "sequential read 1 MiB, warm (MiB/s)", 1.2),
                         ("rand_read_4k_warm", "random read 4 KiB, warm (IOPS)", 1.0),
                         ("rand_write_4k", "random write 4 KiB (IOPS)", 1.0)]:
        v = [val(s, m, "fio") for s in fs]
        print(f"| {label} | {fmt(v[0])} | {fmt(v[1])} | {fmt(v[2])} | {ratio(v[1], v[0])} | {ratio(v[2], v[1])} | {met(v[2], v[1], need)} |")
r = next((r for r in rows if r.get("part") == "files" and "tree" in r), None)
if r:
    print(f"\n## Small files: {r['files']:,} files, {r['tree_bytes'] / 1e6:,.1f} MB ({r['tree']})\n")
    print("Unpacked with tar; durable = then fsync one file and syncfs the store's disk. "
          "Every run on a fresh store; bytes on disk after the unpack; read back with tar after a remount with empty caches. Times: lower is better.\n")
    print("| measure | ext4 | gocryptfs | ours | gocryptfs / ext4 | ours / gocryptfs |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, label, unit in [("unpack_s", "unpack", "s"), ("unpack_sync_s", "unpack, durable", "s"),
                           ("read_cold_s", "read back, cold", "s"),
                           ("du_apparent_bytes", "bytes on disk (apparent)", "bytes"),
                           ("du_allocated_bytes", "bytes on disk (allocated)", "bytes")]:
        v = [val(s, m, "files") for s in fs]
        print(f"| {label} | {fmt(v[0], unit)} | {fmt(v[1], unit)} | {fmt(v[2], unit)} | {ratio(v[1], v[0])} | {ratio(v[2], v[1])} |")
sq = [("ext4", "plain SQLite on ext4"), ("gocryptfs", "plain SQLite on the gocryptfs mount"),
      ("ours", "plain SQLite on our mount"), ("sqlcipher", "SQLCipher on ext4"), ("ours-vfs", "ours through the SQLite VFS")]
info = next((r for r in rows if r.get("part") == "sqlite" and r.get("rows")), None)
if info:
    text = f" ({info['text_bytes'] / 1e6:,.1f} MB of text)" if info.get("text_bytes") else ""
    print(f"\n## SQLite: {info['rows']:,} text-heavy rows{text}\n")
    print(f"Inserts in transactions of {info['batch']:,} rows, journal_mode={info['journal_mode']}, "
          f"synchronous={info['synchronous']} (2 = FULL), page size {info['page_size']}; then the connection is reopened "
          "and rows are read by primary key. Target: ours through the VFS >= SQLCipher for both.\n")
    print("| system | inserts/s | point selects/s | inserts / SQLCipher | selects / SQLCipher | store after a run |")
    print("|---|---:|---:|---:|---:|---:|")
    ci, cs = val("sqlcipher", "inserts_per_s", "sqlite"), val("sqlcipher", "selects_per_s", "sqlite")
    for s, label in sq:
        i, q = val(s, "inserts_per_s", "sqlite"), val(s, "selects_per_s", "sqlite")
        if i is None and q is None: continue
        st = val(s, "store_after_run_bytes", "sqlite")
        print(f"| {label} | {fmt(i)} | {fmt(q)} | {ratio(i, ci)} | {ratio(q, cs)} | {fmt(st, 'bytes')} |")
    for s, _ in sq:
        r = get(s, "inserts_per_s", "sqlite")
        if r and r.get("sqlite_version"):
            print(f"\n{s}: SQLite {r['sqlite_version']}" + (f", SQLCipher {r['cipher_version']}" if r.get("cipher_version") else ""), end="")
    print()
b = [r for r in rows if r.get("part") == "bytes" and r.get("measure") == "db_on_disk"]
if b:
    plain = val("ext4", "db_on_disk", "bytes") or next((r.get("plain_db_bytes") for r in b if r.get("plain_db_bytes")), None)
    gc = val("gocryptfs", "db_on_disk", "bytes")
    print("\n## Bytes on disk: the text-heavy database\n")
    print("The plain database of the ext4 run copied into a fresh store of each system (SQLCipher: its own file, same rows). "
          "Target: ours >= 40% fewer bytes than gocryptfs (<= 0.60x).\n")
    print("| system | bytes | / plain | / gocryptfs | target met |")
    print("|---|---:|---:|---:|---|")
    for s, label in [("ext4", "plain file on ext4"), ("gocryptfs", "gocryptfs"), ("sqlcipher", "SQLCipher"),
                     ("ours", "ours (copied through the mount)"), ("ours-vfs", "ours through the VFS"),
                     ("zstd-4k", "reference: zstd -1 per 4 KiB block, unsealed")]:
        v = val(s, "db_on_disk", "bytes")
        if v is None: continue
        t = met(v, gc, 0.60, lower=True) if s.startswith("ours") else ""
        print(f"| {label} | {v:,} | {ratio(v, plain)} | {ratio(v, gc)} | {t} |")
vr = [("seq_read_1m_cold", "sequential read 1 MiB, cold"), ("seq_read_1m_warm", "sequential read 1 MiB, warm"),
      ("rand_read_4k_warm", "random read 4 KiB, warm")]
if any(val("ours", m + "_verify_pct", "fio") is not None for m, _ in vr):
    print("\n## Verification cost on reads (ours)\n")
    print("Time the mount spent opening block records (frame check, AEAD authentication and decryption: "
          "vault_verify_seconds_total from its /metrics, before and after each fio read) as a share of fio's "
          "runtime and of the mount daemon's CPU time. Reads the kernel's page cache answers open nothing. "
          "Target: <= 10% of the read time.\n")
    print("| read | verifying, % of read time | % of mount CPU | record bytes opened | target met |")
    print("|---|---:|---:|---:|---|")
    for m, label in vr:
        p = val("ours", m + "_verify_pct", "fio")
        if p is None: continue
        c, b = val("ours", m + "_verify_cpu_pct", "fio"), val("ours", m + "_verified_bytes", "fio")
        print(f"| {label} | {p:.1f}% | {'-' if c is None else f'{c:.1f}%'} | {fmt(b, 'bytes')} | {'yes' if p <= 10 else '**no**'} |")
else:
    print("\n## Not measured here\n")
    print("- Verification cost on reads (target <= 10% of read time): ours did not run the fio part, "
          "or its vault does not time its block opens (vault_verify_seconds_total).")
PY
cat "$OUT/summary.md"
echo "results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
