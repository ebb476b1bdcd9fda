#!/usr/bin/env bash
# The query benchmark against peers: one nested data set (NDJSON, generated
# deterministically from a seed by scripts/query_bench.py), loaded into SQLite (Debian's
# sqlite3 CLI), DuckDB (PyPI's duckdb, in a virtualenv of its own) and PostgreSQL
# (Debian's, a private cluster started and deleted by the run), and into portswitch
# through `portswitch query run`; the same three queries on each, answers checked to be
# identical across engines (and to a reference computed in Python while generating).
#
# Load time and query time are reported apart: each query is run once untimed (warm
# caches), then 3 times; the table shows the median. Output goes to
# bench-results/query/<UTC timestamp>/ (results.json, table.md, postgres.log, and
# ours-build.log when portswitch was built);
# the data set is kept in bench-results/query/data/ and reused by later runs with the
# same size and seed.
#
#   scripts/bench-query.sh                    # 1,000,000 records
#   scripts/bench-query.sh --quick            # 20,000 records, a smoke run
#   scripts/bench-query.sh --records 200000 --engines "sqlite duckdb"
#
# Options: --records N (default 1000000), --quick (= --records 20000), --seed S
# (default 42), --engines LIST (default "sqlite duckdb postgres ours ours-stream"),
# --no-build (do not build portswitch; use target/release/portswitch or $PORTSWITCH_BIN
# as it is). ours is `portswitch query run --preload`: the file read into memory first
# (load), then the query timed alone; ours-stream is the same without --preload: the
# file streamed through the query, its one pass being the query time.
# portswitch is skipped, with the reason in the table, if `portswitch query run` is not
# there (or the build fails).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

RECORDS=1000000
SEED=42
ENGINES="sqlite duckdb postgres ours ours-stream"
BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
    --records) RECORDS=$2; shift 2 ;;
    --quick) RECORDS=20000; shift ;;
    --seed) SEED=$2; shift 2 ;;
    --engines) ENGINES=$2; shift 2 ;;
    --no-build) BUILD=""; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-query.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
has() { case " $ENGINES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

BASE=$ROOT/bench-results/query
OUT=${OUT:-$BASE/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$BASE/data" "$OUT"

# --- peers ---------------------------------------------------------------------
need=(python3-venv)
has sqlite && need+=(sqlite3)
has postgres && need+=(postgresql)
"$ROOT/scripts/need-debian.sh" "${need[@]}"

# DuckDB from PyPI, in a virtualenv of this benchmark's own (not system-wide).
VENV=$BASE/venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if has duckdb && ! "$VENV/bin/python" -c 'import duckdb' 2>/dev/null; then
    echo "== installing duckdb (PyPI) into the virtualenv" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check duckdb
fi

# --- ours ----------------------------------------------------------------------
PORTSWITCH_BIN=${PORTSWITCH_BIN:-$ROOT/target/release/portswitch}
OURS_NOTE=""
if { has ours || has ours-stream; } && [ -n "$BUILD" ]; then
    echo "== building portswitch (release)" >&2
    if ! nice -n 19 cargo build --release -q -p portswitch 2>"$OUT/ours-build.log"; then
        OURS_NOTE="cargo build --release -p portswitch failed: $(grep -m1 -E '^error' "$OUT/ours-build.log" || tail -n1 "$OUT/ours-build.log")"
        echo "bench-query.sh: $OURS_NOTE (log: $OUT/ours-build.log); portswitch is skipped" >&2
    fi
fi

# --- run -----------------------------------------------------------------------
DATA=$BASE/data/flights-$RECORDS-seed$SEED.ndjson
engines=()
for e in $ENGINES; do engines+=(--engine "$e"); done
nice -n 19 "$VENV/bin/python" "$ROOT/scripts/query_bench.py" \
    --records "$RECORDS" --seed "$SEED" --data "$DATA" --out "$OUT" \
    --portswitch "$PORTSWITCH_BIN" --ours-note "$OURS_NOTE" "${engines[@]}"
