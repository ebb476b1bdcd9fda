"""The query benchmark's data set, peers, comparison and table (run by bench-query.sh).

Generates a nested flights data set as NDJSON, deterministically from a seed, with the
answers to the three queries computed in Python on the way (the reference); then, for
each engine, loads the data and runs each query once untimed and 3 times timed, and
checks every engine's answers against the reference and each other.

Engines, each driven the way its own users would:
- sqlite: Debian's sqlite3 CLI; a file database, table flights(doc TEXT) filled by
  .import, queried with json_extract / json_each and the CLI's built-in REGEXP; times
  from the CLI's `.timer on` (real).
- duckdb: PyPI's duckdb in this process; read_ndjson into a table with typed STRUCT and
  LIST columns, queried with UNNEST and regexp_matches; times by wall clock around
  execute + fetchall.
- postgres: Debian's PostgreSQL; a private cluster (initdb into a temporary directory,
  unix socket only), table flights(doc jsonb) filled by COPY, queried with ->, ->>,
  jsonb_array_elements and ~; times from psql's \\timing; the cluster is stopped and its
  directory deleted at the end.
- ours: `portswitch query run --source flights=FILE --preload --stats SQL`; load and
  query times from the --stats line on standard error (load_ms: reading the file into
  memory; query_ms: the query alone over the rows in memory).
- ours-stream: the same without --preload: the file is streamed through the query, so
  query_ms is the whole pass (read, parse, query) and there is no load.

Standard library only, plus the duckdb package for the duckdb engine.
"""
import argparse
import datetime
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal

RUNS = 3  # timed runs per query, after one untimed
GENERATOR_VERSION = 1  # bump when the generator's output changes

# --- data set --------------------------------------------------------------------------

COUNTRIES = [  # ISO code, weight (skewed: a few countries hold most records)
    ("RU", 24), ("DE", 11), ("US", 10), ("GB", 7), ("FR", 6), ("TR", 5), ("KZ", 4),
    ("IT", 4), ("ES", 4), ("BY", 3), ("AE", 3), ("PL", 3), ("CN", 3), ("UA", 2),
    ("NL", 2), ("GE", 2), ("AM", 2), ("IL", 2), ("JP", 1), ("BR", 1),
]
CITIES = [  # IATA city codes; the first few are busier
    "MOW", "LED", "BER", "NYC", "LON", "PAR", "IST", "DXB", "FRA", "MUC", "ROM", "MIL",
    "MAD", "BCN", "WAW", "AMS", "ALA", "TSE", "MSQ", "KIV", "TBS", "EVN", "TLV", "PEK",
    "SHA", "TYO", "SAO", "AER", "KZN", "OVB",
]
CITY_WEIGHTS = [14, 8, 6, 6, 5, 5, 5, 4, 4, 3] + [2] * 20
RU_FIRST = {
    "m": ["Иван", "Пётр", "Алексей", "Дмитрий", "Сергей", "Андрей", "Михаил", "Николай",
          "Фёдор", "Юрий", "Павел", "Петр", "Илья", "Ярослав"],
    "f": ["Анна", "Мария", "Ольга", "Наталья", "Елена", "Татьяна", "Юлия", "Дарья",
          "Алёна", "Ксения", "Иванна"],
}
RU_FIRST_W = {"m": [9, 6, 5, 5, 5, 4, 4, 3, 2, 2, 2, 2, 2, 1],
              "f": [7, 6, 5, 5, 5, 4, 3, 3, 2, 2, 1]}
RU_LAST = ["Петров", "Сидоров", "Иванов", "Смирнов", "Кузнецов", "Попов", "Соколов",
           "Лебедев", "Козлов", "Новиков", "Морозов", "Волков", "Фёдоров", "Ёлкин",
           "Соловьёв"]
LATIN_FIRST = ["Ivan", "John", "Anna", "Maria", "José", "François", "Jürgen", "Zoë",
               "Łukasz", "Søren", "Mehmet", "Ahmet", "Chloé", "Björn", "Ana", "Peter",
               "Иван", "Émilie", "Ştefan", "Dvořák"]
LATIN_LAST = ["Smith", "Müller", "García", "Dupont", "Rossi", "Öztürk", "Yılmaz",
              "Wójcik", "Kowalski", "Nørgaard", "Brontë", "Núñez", "O'Brien", "Schäfer",
              "Jensen", "Petrov", "Ivanov", "Łęcki"]
CJK_NAMES = ["王伟", "李娜", "张敏", "山田 太郎", "佐藤 花子", "김민준"]
CYRILLIC_COUNTRIES = {"RU", "BY", "KZ", "UA"}


def person(rng, country):
    if country in CYRILLIC_COUNTRIES and rng.random() < 0.85:
        sex = "m" if rng.random() < 0.55 else "f"
        first = rng.choices(RU_FIRST[sex], RU_FIRST_W[sex])[0]
        last = rng.choice(RU_LAST) + ("а" if sex == "f" else "")
        if rng.random() < 0.2:
            return f"{last} {first}"  # family name first, as on many documents
        return f"{first} {last}"
    if country in ("CN", "JP") and rng.random() < 0.7:
        return rng.choice(CJK_NAMES)
    return f"{rng.choice(LATIN_FIRST)} {rng.choice(LATIN_LAST)}"


def record(rng, i):
    country = rng.choices(COUNTRIES_CODES, COUNTRIES_W)[0]
    nseg = rng.choices((1, 2, 3, 4), (50, 30, 15, 5))[0]
    origin = "MOW" if country == "RU" and rng.random() < 0.4 else rng.choices(CITIES, CITY_WEIGHTS)[0]
    segments = []
    for _ in range(nseg):
        dest = rng.choices(CITIES, CITY_WEIGHTS)[0]
        while dest == origin:
            dest = rng.choices(CITIES, CITY_WEIGHTS)[0]
        segments.append({"Origin": origin, "Dest": dest, "Minutes": rng.randint(30, 900)})
        origin = dest if rng.random() < 0.8 else rng.choices(CITIES, CITY_WEIGHTS)[0]
    tickets = []
    for _ in range(rng.choices((1, 2), (70, 30))[0]):
        cents = int(rng.lognormvariate(9.2, 0.8))  # median about 100.00
        cents = min(max(cents, 1500), 500000)
        tickets.append({"Prices": {"oneway": {"Value": cents / 100}}})
    return {
        "id": i,
        "Country": country,
        "Name": person(rng, country),
        "Passengers": {"Adults": rng.choices((1, 2, 3, 4), (45, 35, 12, 8))[0],
                       "Children": rng.choices((0, 1, 2, 3), (60, 22, 13, 5))[0]},
        "Segments": segments,
        "Tickets": tickets,
    }


COUNTRIES_CODES = [c for c, _ in COUNTRIES]
COUNTRIES_W = [w for _, w in COUNTRIES]
NAME_RE = re.compile("^(Иван|Пётр)")


class Reference:
    """The three answers, computed in Python from the records as they are generated."""

    def __init__(self):
        self.q1 = {}
        self.q2 = 0
        self.de = []  # (price, id) of Country == "DE"

    def add(self, r):
        if NAME_RE.search(r["Name"]):
            for s in r["Segments"]:
                if s["Origin"] == "MOW":
                    n, m = self.q1.get(r["Country"], (0, 0))
                    self.q1[r["Country"]] = (n + 1, m + s["Minutes"])
        price = r["Tickets"][0]["Prices"]["oneway"]["Value"]
        if ((r["Segments"][0]["Origin"] == "MOW" or r["Country"] == "RU")
                and (price >= 100 or r["Passengers"]["Adults"] == 1)):
            self.q2 += 1
        if r["Country"] == "DE":
            self.de.append((price, r["id"]))

    def answers(self):
        top = sorted(self.de, key=lambda t: (-t[0], t[1]))[:10]
        return {
            "Q1": [[c, n, m] for c, (n, m) in sorted(self.q1.items())],
            "Q2": [[self.q2]],
            "Q3": [[i, p] for p, i in top],
        }


def generate(path, records, seed):
    """Writes the data set (if it is not there yet) and returns the reference answers."""
    meta_path = path + ".meta.json"
    want = {"records": records, "seed": seed, "generator": GENERATOR_VERSION}
    if os.path.exists(path) and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if {k: meta.get(k) for k in want} == want and os.path.getsize(path) == meta.get("bytes"):
            log(f"data: reusing {path} ({records:,} records, seed {seed})")
            return meta["answers"]
    log(f"data: generating {records:,} records (seed {seed}) into {path}")
    t0 = time.perf_counter()
    rng = random.Random(seed)
    ref = Reference()
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(1, records + 1):
            r = record(rng, i)
            ref.add(r)
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
    os.replace(tmp, path)
    meta = dict(want, bytes=os.path.getsize(path), answers=ref.answers())
    with open(meta_path, "w") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    log(f"data: {meta['bytes'] / 1e6:,.1f} MB in {time.perf_counter() - t0:.1f} s")
    return meta["answers"]


# --- queries ---------------------------------------------------------------------------

# Column kinds for comparing answers: s string, i integer, p price (rounded to 2 decimals).
KINDS = {"Q1": "sii", "Q2": "i", "Q3": "ip"}
NAMES = {"Q1": ["country", "n", "minutes"], "Q2": ["n"], "Q3": ["id", "price"]}
QUERIES = {
    "ours": {
        "Q1": 'SELECT f.Country AS country, count(*) AS n, sum(s.Minutes) AS minutes '
              'FROM flights f, f.Segments s WHERE s.Origin == "MOW" && '
              'f.Name.matches("^(Иван|Пётр)") GROUP BY f.Country ORDER BY country',
        "Q2": 'SELECT count(*) AS n FROM flights f WHERE (f.Segments[0].Origin == "MOW" || '
              'f.Country == "RU") && (f.Tickets[0].Prices["oneway"].Value >= 100 || '
              'f.Passengers.Adults == 1)',
        "Q3": 'SELECT f.id AS id, f.Tickets[0].Prices["oneway"].Value AS price FROM flights f '
              'WHERE f.Country == "DE" ORDER BY price DESC, id LIMIT 10',
    },
    "sqlite": {
        "Q1": "SELECT json_extract(f.doc, '$.Country') AS country, count(*) AS n, "
              "sum(json_extract(s.value, '$.Minutes')) AS minutes "
              "FROM flights f, json_each(f.doc, '$.Segments') s "
              "WHERE json_extract(s.value, '$.Origin') = 'MOW' "
              "AND json_extract(f.doc, '$.Name') REGEXP '^(Иван|Пётр)' "
              "GROUP BY country ORDER BY country;",
        "Q2": "SELECT count(*) AS n FROM flights "
              "WHERE (json_extract(doc, '$.Segments[0].Origin') = 'MOW' "
              "OR json_extract(doc, '$.Country') = 'RU') "
              "AND (json_extract(doc, '$.Tickets[0].Prices.oneway.Value') >= 100 "
              "OR json_extract(doc, '$.Passengers.Adults') = 1);",
        "Q3": "SELECT json_extract(doc, '$.id') AS id, "
              "json_extract(doc, '$.Tickets[0].Prices.oneway.Value') AS price "
              "FROM flights WHERE json_extract(doc, '$.Country') = 'DE' "
              "ORDER BY price DESC, id LIMIT 10;",
    },
    "duckdb": {  # lists are 1-based in DuckDB
        # unnest in the select list, as DuckDB's users write it: the lateral form
        # (FROM flights f, UNNEST(f.Segments) AS u(s)) is planned as a delim join that
        # regroups the lists by row, and took 3-4x longer here.
        "Q1": "SELECT country, count(*) AS n, sum(s.Minutes) AS minutes "
              "FROM (SELECT f.Country AS country, unnest(f.Segments) AS s FROM flights f "
              "WHERE regexp_matches(f.Name, '^(Иван|Пётр)')) "
              "WHERE s.Origin = 'MOW' GROUP BY country ORDER BY country",
        "Q2": "SELECT count(*) AS n FROM flights f "
              "WHERE (f.Segments[1].Origin = 'MOW' OR f.Country = 'RU') "
              "AND (f.Tickets[1].Prices.oneway.Value >= 100 OR f.Passengers.Adults = 1)",
        "Q3": "SELECT f.id AS id, f.Tickets[1].Prices.oneway.Value AS price FROM flights f "
              "WHERE f.Country = 'DE' ORDER BY price DESC, id LIMIT 10",
    },
    "postgres": {
        "Q1": "SELECT f.doc->>'Country' AS country, count(*) AS n, "
              "sum((s->>'Minutes')::int) AS minutes "
              "FROM flights f, jsonb_array_elements(f.doc->'Segments') s "
              "WHERE s->>'Origin' = 'MOW' AND f.doc->>'Name' ~ '^(Иван|Пётр)' "
              "GROUP BY 1 ORDER BY country;",
        "Q2": "SELECT count(*) AS n FROM flights "
              "WHERE (doc->'Segments'->0->>'Origin' = 'MOW' OR doc->>'Country' = 'RU') "
              "AND ((doc->'Tickets'->0->'Prices'->'oneway'->>'Value')::numeric >= 100 "
              "OR (doc->'Passengers'->>'Adults')::int = 1);",
        "Q3": "SELECT (doc->>'id')::bigint AS id, "
              "(doc->'Tickets'->0->'Prices'->'oneway'->>'Value')::numeric AS price "
              "FROM flights WHERE doc->>'Country' = 'DE' ORDER BY price DESC, id LIMIT 10;",
    },
}
QNAMES = ["Q1", "Q2", "Q3"]
DUCKDB_COLUMNS = {
    "id": "BIGINT",
    "Country": "VARCHAR",
    "Name": "VARCHAR",
    "Passengers": "STRUCT(Adults INTEGER, Children INTEGER)",
    "Segments": "STRUCT(Origin VARCHAR, Dest VARCHAR, Minutes INTEGER)[]",
    "Tickets": 'STRUCT(Prices STRUCT(oneway STRUCT("Value" DOUBLE)))[]',
}


def normalize(q, rows):
    """Rows (lists of values or of the strings a CLI printed) as comparable tuples."""
    out = []
    for row in rows:
        kinds = KINDS[q]
        if len(row) != len(kinds):
            raise ValueError(f"{q}: row {row!r} has {len(row)} columns, want {len(kinds)}")
        vals = []
        for k, v in zip(kinds, row):
            if v is None or v == "":
                vals.append(None)
            elif k == "s":
                vals.append(str(v))
            elif k == "i":
                d = Decimal(str(v))
                if d != d.to_integral_value():
                    raise ValueError(f"{q}: {v!r} is not an integer")
                vals.append(int(d))
            else:
                vals.append(str(Decimal(str(v)).quantize(Decimal("0.01"))))
        out.append(tuple(vals))
    return out


# --- engines ---------------------------------------------------------------------------

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_cmd(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def blocks(text, timing_re):
    """Splits CLI output on `@@ Q run` marker lines into {(Q, run): (rows, ms)}."""
    res, key, rows, ms = {}, None, [], None
    for line in text.splitlines() + ["@@ end -1"]:
        if line.startswith("@@ "):
            if key is not None:
                res[key] = (rows, ms)
            _, q, r = line.split()
            key, rows, ms = (q, int(r)), [], None
            continue
        m = timing_re.match(line)
        if m:
            ms = float(m.group(1)) * (1000.0 if "Run Time" in line else 1.0)
        elif key is not None and line != "":
            rows.append(line.split("|"))
    return res


def script_runs(stmts, mark):
    """A CLI script: for each query, one untimed run (run 0) and RUNS timed ones."""
    lines = []
    for q in QNAMES:
        for r in range(RUNS + 1):
            lines.append(mark(q, r))
            lines.append(stmts[q])
    return "\n".join(lines) + "\n"


def collect(q_runs):
    """{(Q, run): (rows, ms)} -> {Q: {"rows":…, "ms": [timed…]}} (run 0 untimed)."""
    out = {}
    for q in QNAMES:
        rows0 = q_runs[(q, 0)][0]
        times = []
        for r in range(1, RUNS + 1):
            rows, ms = q_runs[(q, r)]
            if ms is None:
                raise RuntimeError(f"{q} run {r}: no time printed")
            if rows != rows0:
                raise RuntimeError(f"{q}: run {r} answered differently from the first run")
            times.append(ms)
        out[q] = {"rows": rows0, "ms": times}
    return out


def engine_sqlite(data, work):
    db = os.path.join(work, "flights.sqlite")
    for p in glob.glob(db + "*"):
        os.remove(p)
    version = run_cmd(["sqlite3", "--version"]).stdout.split()[0]
    has_jsonb = subprocess.run(["sqlite3", ":memory:", "select jsonb('{}')"],
                               capture_output=True).returncode == 0
    has_regexp = run_cmd(["sqlite3", ":memory:", "select 'Иван' regexp '^(Иван|Пётр)'"]).stdout.strip() == "1"
    # Each line of the file is one row: ascii mode does no quoting, its field separator
    # (0x1F) does not occur in JSON, and its row separator is set to a newline.
    storage = "JSONB BLOB" if has_jsonb else "TEXT"
    load = "\n".join([
        "PRAGMA journal_mode=OFF;", "PRAGMA synchronous=OFF;",
        "CREATE TABLE flights(doc TEXT);" if not has_jsonb else "CREATE TABLE raw(doc TEXT);",
        ".mode ascii", '.separator "\\037" "\\n"', f".import '{data}' " + ("flights" if not has_jsonb else "raw"),
    ] + (["CREATE TABLE flights AS SELECT jsonb(doc) AS doc FROM raw;", "DROP TABLE raw;"] if has_jsonb else []))
    t0 = time.perf_counter()
    run_cmd(["sqlite3", db], input=load)
    load_s = time.perf_counter() - t0
    n = int(run_cmd(["sqlite3", db, "select count(*) from flights"]).stdout)
    # Queries: the whole file fits the page cache and a memory map.
    head = "\n".join(["PRAGMA cache_size=-2000000;", "PRAGMA mmap_size=4000000000;",
                      ".mode list", ".separator |", ".headers off", ".timer on"])
    if has_regexp:
        script = head + "\n" + script_runs(QUERIES["sqlite"], lambda q, r: f".print @@ {q} {r}")
        out = run_cmd(["sqlite3", db], input=script).stdout
        res = collect(blocks(out, re.compile(r"^Run Time: real ([\d.]+)")))
        how = "the CLI's built-in REGEXP; times from .timer (real)"
    else:
        res = sqlite_python(db)
        how = ("REGEXP registered from Python (this sqlite3 CLI has none; Python's sqlite3 module "
               "calling back into Python per row is slower); times by wall clock in Python")
    size = sum(os.path.getsize(p) for p in glob.glob(db + "*"))
    for p in glob.glob(db + "*"):
        os.remove(p)
    return {
        "version": f"{version} (Debian sqlite3 {dpkg_version('sqlite3')})",
        "storage": f"file database, table flights(doc {storage}) with one JSON document per row "
                   f"({size / 1e6:,.0f} MB); loaded with the CLI's .import; queried with json_extract, "
                   f"json_each and {how}; one thread"
                   + ("" if has_jsonb else "; this SQLite has no jsonb (3.45+)"),
        "load_s": load_s, "rows_loaded": n, "queries": res,
    }


def sqlite_python(db):
    """The queries through Python's sqlite3 module, for a sqlite3 CLI without REGEXP."""
    import sqlite3
    con = sqlite3.connect(db)
    con.create_function("regexp", 2, lambda pat, s: None if s is None else re.search(pat, s) is not None,
                        deterministic=True)
    con.execute("PRAGMA cache_size=-2000000")
    con.execute("PRAGMA mmap_size=4000000000")
    res = {}
    for q in QNAMES:
        sql = QUERIES["sqlite"][q]
        rows0 = [list(r) for r in con.execute(sql).fetchall()]
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            rows = [list(r) for r in con.execute(sql).fetchall()]
            times.append((time.perf_counter() - t) * 1000)
            if rows != rows0:
                raise RuntimeError(f"{q}: a timed run answered differently from the first run")
        res[q] = {"rows": rows0, "ms": times}
    con.close()
    return res


def engine_duckdb(data, work):
    import duckdb
    con = duckdb.connect()  # in memory
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    cols = ", ".join(f"'{k}': '{v}'" for k, v in DUCKDB_COLUMNS.items())
    t0 = time.perf_counter()
    con.execute(f"CREATE TABLE flights AS SELECT * FROM read_ndjson('{data}', columns={{{cols}}})")
    load_s = time.perf_counter() - t0
    n = con.execute("SELECT count(*) FROM flights").fetchone()[0]
    res = {}
    for q in QNAMES:
        sql = QUERIES["duckdb"][q]
        rows0 = [list(r) for r in con.execute(sql).fetchall()]
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            rows = [list(r) for r in con.execute(sql).fetchall()]
            times.append((time.perf_counter() - t) * 1000)
            if rows != rows0:
                raise RuntimeError(f"{q}: a timed run answered differently from the first run")
        res[q] = {"rows": rows0, "ms": times}
    con.close()
    return {
        "version": f"{duckdb.__version__} (PyPI duckdb)",
        "storage": f"in-memory database, table flights with typed columns (read_ndjson with "
                   f"columns: Passengers STRUCT, Segments STRUCT[], Tickets STRUCT[], Value DOUBLE); "
                   f"queried with unnest (in the select list) and regexp_matches (RE2); times by wall clock around "
                   f"execute+fetchall in the same process; {threads} threads",
        "load_s": load_s, "rows_loaded": n, "queries": res,
    }


def dpkg_version(pkg):
    p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
    return p.stdout.strip() or "?"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_postgres(data, work):
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not bins:
        raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql (Debian's postgresql)")
    bindir = bins[-1]
    as_user = []
    # initdb and postgres refuse to run as root: then the cluster runs as Debian's
    # `postgres` system user (psql, the client, stays the current user).
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="pg-", dir=work)
    if as_user:
        shutil.chown(base, "postgres")
        if subprocess.run(as_user + ["test", "-w", base]).returncode != 0:
            os.rmdir(base)
            base = tempfile.mkdtemp(prefix="query-bench-pg-")
            shutil.chown(base, "postgres")
    pgdata, sock = os.path.join(base, "data"), base
    port = free_port()
    env = dict(os.environ, PGHOST=sock, PGPORT=str(port), PGUSER="bench", PGDATABASE="postgres",
               PGCLIENTENCODING="UTF8")
    started = False
    try:
        run_cmd(as_user + [f"{bindir}/initdb", "-D", pgdata, "-U", "bench", "-A", "trust",
                           "-E", "UTF8", "--no-locale", "--no-sync"])
        # Unix socket only; memory for a table this size; bulk-load friendly WAL
        # settings; no JIT.
        with open(os.path.join(pgdata, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{sock}'\nport = {port}\n"
                    "shared_buffers = 2GB\nwork_mem = 64MB\nmaintenance_work_mem = 512MB\n"
                    "wal_level = minimal\nmax_wal_senders = 0\nmax_wal_size = 4GB\n"
                    # JIT compiles each of these sub-second queries anew (jit_above_cost is
                    # far below a 1M-row scan) and made them slower here, not faster.
                    "jit = off\n")
        run_cmd(as_user + [f"{bindir}/pg_ctl", "-D", pgdata, "-l", os.path.join(base, "log"),
                           "-w", "-t", "120", "start"])
        started = True
        settings = run_cmd(["psql", "-X", "-q", "-A", "-t", "-c",
                            "SELECT current_setting('server_version'), current_setting('max_parallel_workers_per_gather'),"
                            " current_setting('jit'), current_setting('shared_buffers')"],
                           env=env).stdout.strip().split("|")
        # COPY FREEZE into a table created in the same transaction (no WAL with
        # wal_level=minimal, rows frozen), then ANALYZE. csv with quote and delimiter
        # bytes that JSON does not contain: each line is one value, as it is.
        load = "\n".join([
            "\\set ON_ERROR_STOP 1", "BEGIN;", "CREATE TABLE flights(doc jsonb);",
            f"\\copy flights(doc) FROM '{data}' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02', FREEZE)",
            "COMMIT;", "ANALYZE flights;"])
        t0 = time.perf_counter()
        run_cmd(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"], input=load, env=env)
        load_s = time.perf_counter() - t0
        n = int(run_cmd(["psql", "-X", "-A", "-t", "-c", "SELECT count(*) FROM flights"], env=env).stdout)
        size = int(run_cmd(["psql", "-X", "-A", "-t", "-c",
                            "SELECT pg_total_relation_size('flights')"], env=env).stdout)
        head = "\\set ON_ERROR_STOP 1\n\\pset format unaligned\n\\pset tuples_only on\n" \
               "\\pset fieldsep '|'\n\\timing on\n"
        script = head + script_runs(QUERIES["postgres"], lambda q, r: f"\\echo @@ {q} {r}")
        out = run_cmd(["psql", "-X", "-q"], input=script, env=env).stdout
        res = collect(blocks(out, re.compile(r"^Time: ([\d.]+) ms")))
    finally:
        if started:
            subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", pgdata, "-m", "fast", "-w", "stop"],
                           capture_output=True)
        if os.path.exists(os.path.join(base, "log")):
            shutil.copy(os.path.join(base, "log"), os.path.join(work, "postgres.log"))
        shutil.rmtree(base, ignore_errors=True)
    return {
        "version": f"{settings[0].split()[0]} (Debian postgresql-{bindir.split('/')[-2]} "
                   f"{dpkg_version('postgresql-' + bindir.split('/')[-2])})",
        "storage": f"private cluster (unix socket, C locale, UTF8, shared_buffers {settings[3]}), "
                   f"table flights(doc jsonb), {size / 1e6:,.0f} MB, no index; loaded with COPY FREEZE "
                   f"+ ANALYZE; queried with ->/->>, jsonb_array_elements and ~; times from psql's "
                   f"\\timing; up to {settings[1]} parallel workers per query, jit {settings[2]}",
        "load_s": load_s, "rows_loaded": n, "queries": res,
    }


def engine_ours(data, work, binary, note, preload):
    if note:
        raise Skip(note)
    if not os.path.exists(binary):
        raise Skip(f"{binary} does not exist (build it with cargo build --release -p portswitch)")
    probe = subprocess.run([binary, "query", "run", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        msg = [m for m in (probe.stderr or probe.stdout).strip().splitlines() if m.strip()]
        raise Skip("`portswitch query run` is not available yet: " + " / ".join(msg[:2]))
    if preload and "--preload" not in probe.stdout:
        raise Skip("this `portswitch query run` has no --preload")
    flags = ["--preload"] if preload else []
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    res, loads, rows_in = {}, [], None
    for q in QNAMES:
        rows0, times = None, []
        for r in range(RUNS + 1):
            p = subprocess.run([binary, "query", "run", "--source", f"flights={data}", "--stats"]
                               + flags + [QUERIES["ours"][q]], capture_output=True, text=True)
            if p.returncode != 0:
                raise Skip(f"{q}: `portswitch query run` exited {p.returncode}: "
                           + " / ".join([m for m in p.stderr.strip().splitlines() if m.strip()][-3:]))
            stats = None
            for line in reversed(p.stderr.strip().splitlines()):
                try:
                    stats = json.loads(line)
                    break
                except ValueError:
                    continue
            if not isinstance(stats, dict) or "query_ms" not in stats:
                raise Skip(f"{q}: no --stats line with query_ms on standard error: {p.stderr.strip()[-300:]!r}")
            rows = []
            for line in p.stdout.splitlines():
                if line.strip():
                    obj = json.loads(line)
                    rows.append([obj.get(k) for k in NAMES[q]])
            if r == 0:
                rows0 = rows
                continue
            if rows != rows0:
                raise RuntimeError(f"{q}: run {r} answered differently from the first run")
            times.append(float(stats["query_ms"]))
            if preload and "load_ms" in stats:
                loads.append(float(stats["load_ms"]) / 1000)
            rows_in = stats.get("rows_in", rows_in)
        res[q] = {"rows": rows0, "ms": times}
    if preload:
        storage = ("`portswitch query run --preload --stats`, a process per run: reads the whole NDJSON "
                   "file into memory (load_ms; the load column is its median over the timed runs), "
                   "then times the query alone over the rows in memory (query_ms)")
    else:
        storage = ("`portswitch query run --stats` without --preload, a process per run: streams the "
                   "NDJSON file through the query (only the fields and rows the query asks for are "
                   "kept), so query_ms is reading + parsing + querying the file in one pass, and "
                   "there is no separate load")
    return {
        "version": version,
        "storage": storage,
        "load_s": statistics.median(loads) if loads else None, "rows_loaded": rows_in, "queries": res,
    }


class Skip(Exception):
    pass


# --- main ------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data", required=True, help="the NDJSON file (generated if missing)")
    ap.add_argument("--out", required=True, help="directory for results.json and table.md")
    ap.add_argument("--engine", action="append",
                    help="sqlite, duckdb, postgres, ours (--preload), ours-stream (repeatable)")
    ap.add_argument("--portswitch", default="target/release/portswitch")
    ap.add_argument("--ours-note", default="", help="a reason to skip ours (e.g. its build failed)")
    args = ap.parse_args()
    engines = args.engine or ["sqlite", "duckdb", "postgres", "ours", "ours-stream"]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups

    os.makedirs(args.out, exist_ok=True)
    data = os.path.abspath(args.data)
    started = datetime.datetime.now(datetime.timezone.utc)
    reference = generate(data, args.records, args.seed)
    expected = {q: normalize(q, reference[q]) for q in QNAMES}

    results = {}
    for e in engines:
        log(f"== {e}")
        t0 = time.perf_counter()
        try:
            if e == "sqlite":
                r = engine_sqlite(data, args.out)
            elif e == "duckdb":
                r = engine_duckdb(data, args.out)
            elif e == "postgres":
                r = engine_postgres(data, args.out)
            elif e in ("ours", "ours-stream"):
                r = engine_ours(data, args.out, args.portswitch, args.ours_note, e == "ours")
            else:
                raise Skip(f"unknown engine {e}")
        except Skip as err:
            log(f"{e}: skipped: {err}")
            results[e] = {"skipped": str(err)}
            continue
        except (RuntimeError, ValueError, OSError, ImportError) as err:
            log(f"{e}: failed: {err}")
            results[e] = {"error": str(err)}
            continue
        for q in QNAMES:
            qr = r["queries"][q]
            qr["median_ms"] = statistics.median(qr["ms"])
            try:
                got = normalize(q, qr["rows"])
                qr["matches_reference"] = got == expected[q]
            except ValueError as err:
                qr["matches_reference"] = False
                qr["error"] = str(err)
            qr["rows"] = [list(x) for x in qr["rows"]]
        r["elapsed_s"] = time.perf_counter() - t0
        if r.get("rows_loaded") not in (None, args.records):
            r["note"] = f"loaded {r['rows_loaded']} rows, want {args.records}"
        results[e] = r
        log(f"{e}: load " + ("-" if r["load_s"] is None else f"{r['load_s']:.2f} s") + "; " + "; ".join(
            f"{q} {r['queries'][q]['median_ms']:.1f} ms"
            f"{'' if r['queries'][q]['matches_reference'] else ' (ANSWER DIFFERS)'}" for q in QNAMES))

    ran = {e: r for e, r in results.items() if "queries" in r}
    all_match = bool(ran) and all(r["queries"][q]["matches_reference"] for r in ran.values() for q in QNAMES)
    doc = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "records": args.records, "seed": args.seed, "data_bytes": os.path.getsize(data),
        "runs_per_query": RUNS, "queries": QUERIES, "reference": reference,
        "all_answers_identical": all_match, "engines": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    table = render(doc)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    log(f"results in {args.out}")
    failed = [e for e, r in results.items() if "error" in r]
    return 1 if failed or (ran and not all_match) else 0


def render(doc):
    title = {"ours": "portswitch (--preload)", "ours-stream": "portswitch (streaming)",
             "sqlite": "SQLite", "duckdb": "DuckDB", "postgres": "PostgreSQL"}
    L = [f"# Query benchmark: {doc['records']:,} nested records (seed {doc['seed']}, "
         f"{doc['data_bytes'] / 1e6:,.0f} MB NDJSON)\n",
         f"Started {doc['started']}. Median of {doc['runs_per_query']} runs per query after one "
         f"untimed run; load is separate. Answers checked against a reference computed while "
         f"generating: **{'all identical' if doc['all_answers_identical'] else 'NOT all identical'}**.\n",
         "| engine | version | Q1 ms | Q2 ms | Q3 ms | load s | answers |",
         "|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for e, r in doc["engines"].items():
        name = title.get(e, e)
        if "queries" not in r:
            why = r.get("skipped") or r.get("error")
            L.append(f"| {name} | - | - | - | - | - | {'skipped' if 'skipped' in r else 'failed'} |")
            notes.append(f"- **{name}**: {'skipped' if 'skipped' in r else 'failed'}: {why}")
            continue
        qs = r["queries"]
        ok = all(qs[q]["matches_reference"] for q in QNAMES)
        bad = [q for q in QNAMES if not qs[q]["matches_reference"]]
        load = ("- (in query)" if e == "ours-stream" else "-") if r["load_s"] is None else f"{r['load_s']:.2f}"
        L.append(f"| {name} | {r['version']} | " + " | ".join(f"{qs[q]['median_ms']:,.1f}" for q in QNAMES)
                 + f" | {load} | {'identical' if ok else 'differ: ' + ', '.join(bad)} |")
        notes.append(f"- **{name}**: {r['storage']}" + (f"; {r['note']}" if r.get("note") else ""))
    L.append("\n## How each engine holds and queries the data\n")
    L += notes
    L.append("\n## Queries\n")
    for q in QNAMES:
        L.append(f"- {q}")
        for e in doc["engines"]:
            if e in doc["queries"]:
                L.append(f"  - {title.get(e, e)}: `{doc['queries'][e][q]}`")
    L.append("\n## Answers (reference)\n")
    for q in QNAMES:
        L.append(f"- {q}: `{json.dumps(doc['reference'][q], ensure_ascii=False)}`")
    diffs = [(e, q, r["queries"][q]) for e, r in doc["engines"].items() if "queries" in r
             for q in QNAMES if not r["queries"][q]["matches_reference"]]
    if diffs:
        L.append("\n## Answers that differ from the reference\n")
        for e, q, qr in diffs:
            L.append(f"- {title.get(e, e)} {q}: `{json.dumps(qr['rows'], ensure_ascii=False)}`"
                     + (f" ({qr['error']})" if qr.get("error") else ""))
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
