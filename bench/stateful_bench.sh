#!/usr/bin/env bash
# stateful_bench.sh - routed, stateful mail (the example list's subscribe/confirm traffic) with
# PostgreSQL against SQLite in the same run, as ratios to Postfix alone (issue 16).  A measurement
# tool, not product code: it drives bench/filter_bench.sh (the one harness: private Postfix,
# smtp-sink, the shipped conf/postfix snippets, per-round ratio to config a, CPU of the filter
# process) with bench/stateful_source.py as the load program, once per database per round:
#
#   bench/stateful_bench.sh                       # as root, after scripts/bootstrap.sh
#   STATEFUL_REPS=5 BENCH_SMALL_N=1000 bench/stateful_bench.sh
#
# Each round runs, INTERLEAVED, for DB in sqlite pg: filter_bench.sh with BENCH_REPS=1 and
# BENCH_CONFIGS (default "a mu s": Postfix alone, the milter, the content filter) -- a fresh
# Postfix, a fresh application copy, a fresh database (SQLite file; for pg a fresh database
# lf_bench_<random> on 127.0.0.1:5432, dropped afterwards).  Every message is routed and changes
# state: pairs of python-subscribe (START -> PENDING, token, confirmation request through the
# outbox) and python-confirm-TOKEN (PENDING -> MEMBER, welcome through the outbox), each pair
# from a new sender; N messages in, N replies at the sink.  With Postfix alone the same mail is
# relayed to the sink as it is.
# The application is examples/mailinglist with REPLY_BUDGET raised (the default 300 replies a
# minute per process would be the limit measured) and RELAY at filter_bench.sh's outbox listener.
# "vs a" = median of the per-round ratios to config a of the same filter_bench.sh invocation.
# Knobs: STATEFUL_REPS (3) STATEFUL_DBS ("sqlite pg") BENCH_CONFIGS BENCH_SMALL_N (500)
#        BENCH_SMALL_L (2000) BENCH_SESSIONS (10) BENCH_WARMUP (40) PG_SERVER (postgresql://postgres@127.0.0.1:5432)
# Only 127.0.0.1; bounded (REPS x DBS invocations, each bounded by filter_bench.sh's timeouts).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
REPS=${STATEFUL_REPS:-3}
DBS=${STATEFUL_DBS:-"sqlite pg"}
PG_SERVER=${PG_SERVER:-postgresql://postgres@127.0.0.1:5432}
OUT=${STATEFUL_OUT:-/tmp/lf-stateful-bench}
export BENCH_DIR=${BENCH_DIR:-/tmp/lf-bench-stateful}
export BENCH_CONFIGS=${BENCH_CONFIGS:-"a mu s"}
export BENCH_SMALL_N=${BENCH_SMALL_N:-500} BENCH_LARGE_N=0 BENCH_WARMUP=${BENCH_WARMUP:-40}
export BENCH_SOURCE="$PY $HERE/stateful_source.py"
export BENCH_RCPT=python-subscribe@lists.example.org BENCH_REPS=1
export PYTHON=$PY

case "$OUT" in /tmp/?*) ;; *) echo "STATEFUL_OUT must be under /tmp" >&2; exit 2 ;; esac
rm -rf "$OUT"; mkdir -p "$OUT"
log() { printf '[stateful-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# the application: the example list, replies not capped by the per-process budget
APP=$OUT/app
cp -r "$REPO/examples/mailinglist" "$APP"
rm -rf "$APP/var" "$APP/tests"
printf '\n# bench/stateful_bench.sh\nREPLY_BUDGET = (1000000, 30)\nRELAY = "127.0.0.1:10036"\n' >> "$APP/config/settings.py"
export BENCH_APP=$APP

PGDB=""
pgsql() { "$PY" -c 'import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=10) as c: c.execute(sys.argv[2])' "$PG_SERVER/postgres" "$1"; }
drop_pg() { [ -n "$PGDB" ] && pgsql "DROP DATABASE IF EXISTS \"$PGDB\" WITH (FORCE)" || true; PGDB=""; }
trap drop_pg EXIT

printf 'round\tdb\tconfig\tsize\tn\tdelivered\tprocessed\telapsed_s\tmsgs_per_s\tfilter_cpu_ms_per_msg\tsys_busy_pct\tsteal_pct\tsource_rc\tbad\n' > "$OUT/results.tsv"
for round in $(seq 1 "$REPS"); do
  for db in $DBS; do
    unset LAMSONFILTER_DATABASE
    if [ "$db" = pg ]; then
      PGDB=lf_bench_$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
      pgsql "CREATE DATABASE \"$PGDB\""
      export LAMSONFILTER_DATABASE=$PG_SERVER/$PGDB
    fi
    log "round $round, $db: filter_bench.sh configs $BENCH_CONFIGS"
    bash "$HERE/filter_bench.sh" 2>> "$OUT/filter_bench.log" >/dev/null || { log "filter_bench.sh failed (see $OUT/filter_bench.log)"; exit 1; }
    tail -n +2 "$BENCH_DIR/log/results.tsv" | awk -F'\t' -v r="$round" -v db="$db" 'BEGIN{OFS="\t"} {$1 = r OFS db; print}' >> "$OUT/results.tsv"
    tail -n 20 "$BENCH_DIR/log/filter-mu.log" > "$OUT/filter-mu-$db-$round.tail" 2>/dev/null || true
    drop_pg
  done
done

"$PY" - "$OUT/results.tsv" <<'EOF' | tee "$OUT/table.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
names = {"a": "Postfix alone -> smtp-sink", "mu": "+ milter (unix socket)", "mi": "+ milter (inet)",
         "s": "+ smtpproxy (content_filter)", "s2": "+ smtpproxy --workers 2"}
by = {}
for r in rows:
    by.setdefault((r["db"], r["config"]), {})[r["round"]] = r
print(f"\nstateful-bench: subscribe/confirm pairs, medians over {len({r['round'] for r in rows})} rounds")
hdr = (f"{'db':<7} {'config':<34} {'n':>5} {'deliv':>5} {'msg/s':>7} {'min-max':>11} {'vs a':>5} "
       f"{'ms cpu/msg':>10} {'busy%':>5} {'bad':>3}")
print(hdr); print("-" * len(hdr))
for db in dict.fromkeys(r["db"] for r in rows):
    base = by.get((db, "a"), {})
    for cfg in names:
        d = by.get((db, cfg))
        if not d: continue
        rs = list(d.values())
        rates = [float(r["msgs_per_s"]) for r in rs]
        ratios = [float(d[k]["msgs_per_s"]) / float(base[k]["msgs_per_s"]) for k in d
                  if k in base and float(base[k]["msgs_per_s"]) > 0]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        bad = sum(int(r["bad"]) + (int(r["source_rc"]) != 0) for r in rs)
        print(f"{db:<7} {cfg + ' ' + names[cfg]:<34} {rs[0]['n']:>5} {min(int(r['delivered']) for r in rs):>5} "
              f"{statistics.median(rates):>7.1f} {min(rates):>5.0f}-{max(rates):<5.0f} {ratio:>5} "
              f"{statistics.median(float(r['filter_cpu_ms_per_msg']) for r in rs):>10.2f} "
              f"{statistics.median(float(r['sys_busy_pct']) for r in rs):>5.0f} {bad:>3}")
print("vs a = median of per-round ratios to Postfix alone in the same filter_bench.sh invocation; "
      "ms cpu/msg = CPU of the lamsonfilter process per inbound message (its outbox reply included)")
EOF
log "raw results: $OUT/results.tsv"
