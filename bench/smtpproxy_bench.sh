#!/usr/bin/env bash
# smtpproxy_bench.sh - throughput of `lamsonfilter smtpproxy` (content-filter mode) through a
# real private Postfix, against Postfix alone in the same run (follows
# ../shared/bench/anchor-bench.sh; a measurement tool, not product code).
#
#   bench/smtpproxy_bench.sh            # as root, Debian 12, after scripts/bootstrap.sh
#
# Configurations, INTERLEAVED per round (fresh Postfix start + warm-up each time, so drift
# of the shared VM hits all alike; "vs a" is the median of per-round ratios):
#   a    Postfix alone: smtp-source -> smtpd -> smtp-sink
#   s    + content_filter -> lamsonfilter smtpproxy (1 process) -> 10026 smtpd -> smtp-sink
#   s2   the same with --workers 2 (SO_REUSEPORT)
# The filter runs the full example application (examples/mailinglist, SQLite state, per-message
# log line); the benchmark mail is to sink@example.test, an address the application does not
# route: routing, the Decision, the reinjection table and the reinjection itself, i.e. what
# every message pays in this mode.  The Postfix side is the shipped
# conf/postfix/{main,master}.cf.content_filter (ports 10025/10026 as shipped).
# Knobs: BENCH_DIR (under /tmp) BENCH_REPS BENCH_SESSIONS BENCH_SMALL_N BENCH_SMALL_L
#        BENCH_LARGE_N BENCH_LARGE_L BENCH_WARMUP BENCH_CONFIGS BENCH_REP_TIMEOUT
# Only 127.0.0.1; every loop bounded; only PIDs this script started are signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BASE=${BENCH_DIR:-/tmp/lf-bench-cf}
ETC=$BASE/etc SPOOL=$BASE/spool DATA=$BASE/data LOG=$BASE/log RUN=$BASE/run APP=$BASE/app
REPS=${BENCH_REPS:-3}
SESSIONS=${BENCH_SESSIONS:-10}
SMALL_N=${BENCH_SMALL_N:-2000} SMALL_L=${BENCH_SMALL_L:-2000}
LARGE_N=${BENCH_LARGE_N:-200}  LARGE_L=${BENCH_LARGE_L:-100000}
WARMUP=${BENCH_WARMUP:-100}
CONFIGS=${BENCH_CONFIGS:-"a s s2"}
REP_TIMEOUT=${BENCH_REP_TIMEOUT:-300}
PY=${PYTHON:-$REPO/.venv/bin/python}
SINK_PORT=2525 FILTER_PORT=10025 REINJECT_PORT=10026 SMTPD_PORT=${BENCH_SMTPD_PORT:-2500}
HZ=$(getconf CLK_TCK)
export PATH=$PATH:/usr/sbin

case "$BASE" in /tmp/?*) ;; *) echo "BENCH_DIR must be under /tmp" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "run as root (postfix master, smtp-sink -u)" >&2; exit 2; }
for c in postfix smtp-source smtp-sink; do command -v $c >/dev/null || { echo "missing $c" >&2; exit 2; }; done
"$PY" -c 'import aiosmtpd, lamsonfilter' || { echo "run scripts/bootstrap.sh first" >&2; exit 2; }

log() { printf '[smtpproxy-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now() { date +%s.%N; }
PIDS=()
FILTER_PID=""
pf() { postfix -c "$ETC" "$@"; }
master_pid() { local p; p=$(tr -dc 0-9 2>/dev/null < "$SPOOL/pid/master.pid") || true
               [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; return 0; }
stop_pid() { local p=$1 i; kill -0 "$p" 2>/dev/null || return 0; kill -TERM "$p" 2>/dev/null || true
             for i in $(seq 1 150); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
             kill -KILL "$p" 2>/dev/null || true; }
stop_postfix() { local mp i; mp=$(master_pid); [ -n "$mp" ] || return 0; pf stop >/dev/null 2>&1 || true
                 for i in $(seq 1 100); do kill -0 "$mp" 2>/dev/null || return 0; sleep 0.1; done
                 kill -KILL "$mp" 2>/dev/null || true; }
stop_filter() { if [ -n "$FILTER_PID" ]; then stop_pid "$FILTER_PID"; FILTER_PID=""; fi; }
cleanup() { stop_postfix; stop_filter; local p; for p in "${PIDS[@]}"; do stop_pid "$p"; done; PIDS=(); }
trap cleanup EXIT
trap 'exit 130' INT TERM
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_up() { local i; for i in $(seq 1 $(( $2 * 10 ))); do port_busy "$1" && return 0; sleep 0.1; done
            echo "port $1 did not come up" >&2; return 1; }
wait_free() { local i; for i in $(seq 1 100); do port_busy "$1" || return 0; sleep 0.1; done; }

if [ -f "$ETC/main.cf" ]; then stop_postfix; fi
for p in $SMTPD_PORT $SINK_PORT $FILTER_PORT $REINJECT_PORT; do
  if port_busy "$p"; then echo "port $p is already in use; refusing to start" >&2; exit 3; fi
done
rm -rf "$BASE"
mkdir -p "$ETC" "$SPOOL" "$DATA" "$LOG" "$RUN"
chown postfix:postfix "$DATA"

# ---------------------------------------------------------------- the application
cp -r "$REPO/examples/mailinglist" "$APP"
rm -rf "$APP/var" "$APP/tests"
"$PY" -m lamsonfilter.cli db init --app "$APP" >/dev/null

write_main_cf() {  # write_main_cf CONFIG
  cat > "$ETC/main.cf" <<EOF
compatibility_level = 3.6
myhostname = bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
mydestination =
relay_domains =
local_recipient_maps =
relayhost = [127.0.0.1]:$SINK_PORT
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
queue_directory = $SPOOL
data_directory = $DATA
maillog_file = $LOG/maillog
maillog_file_prefixes = $BASE
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtpd_banner = \$myhostname ESMTP
EOF
  case $1 in s*) grep -E '^(content_filter|receive_override_options) ' "$REPO/conf/postfix/main.cf.content_filter" >> "$ETC/main.cf" ;; esac
}
cat > "$ETC/master.cf" <<EOF
127.0.0.1:$SMTPD_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
cat "$REPO/conf/postfix/master.cf.content_filter" >> "$ETC/master.cf"

start_postfix() {
  write_main_cf "$1"
  postsuper -c "$ETC" -d ALL >/dev/null 2>&1 || true
  if ! pf check >/dev/null 2>&1 || ! pf start >/dev/null 2>&1; then
    echo "postfix check/start failed; maillog tail:" >&2; tail -20 "$LOG/maillog" >&2 || true; exit 4
  fi
  wait_up "$SMTPD_PORT" 20
}
start_filter() {  # start_filter CONFIG
  local workers=1
  case $1 in a) return 0 ;; s2) workers=2 ;; esac
  "$PY" -m lamsonfilter.cli smtpproxy --app "$APP" --listen 127.0.0.1:$FILTER_PORT \
    --reinject 127.0.0.1:$REINJECT_PORT --workers $workers >> "$LOG/filter-$1.log" 2>&1 &
  FILTER_PID=$!
  wait_up $FILTER_PORT 30
}
filter_cpu() {  # utime+stime ticks of the filter and its children (workers)
  [ -n "$FILTER_PID" ] || { echo 0; return; }
  local t=0 p
  for p in $FILTER_PID $(pgrep -P "$FILTER_PID" 2>/dev/null || true); do
    [ -r "/proc/$p/stat" ] && t=$(( t + $(awk '{sub(/^.*\) /,""); print $12+$13}' "/proc/$p/stat") ))
  done
  echo $t
}
sys_cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8, $6, $9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat; }
sink_count() { local s; s=$(tail -c 96 "$SINK_OUT" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1) || true
               s=${s#mesg=}; echo "${s:-0}"; }
queue_len() { find "$SPOOL/incoming" "$SPOOL/active" "$SPOOL/deferred" "$SPOOL/hold" "$SPOOL/maildrop" \
                   -type f 2>/dev/null | wc -l; }

cat > "$RUN/watch.py" <<'EOF'
import os, re, sys, time
path, base, target, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.time() + limit
pat = re.compile(rb"mesg=(\d+)")
fd = os.open(path, os.O_RDONLY)
count = base
while True:
    m = pat.findall(os.pread(fd, 96, max(0, os.fstat(fd).st_size - 96)))
    if m:
        count = int(m[-1])
    if count - base >= target:
        print(f"{time.time():.6f} {count - base}"); break
    if time.time() >= deadline:
        print(f"timeout {count - base}"); break
    time.sleep(0.005)
EOF

send_batch() {  # send_batch N LEN -> DELIVERED ELAPSED SRC_RC
  local n=$1 len=$2 c0 t0 t2="" c="" wpid i wout=$RUN/watch.out
  c0=$(sink_count); : > "$wout"
  "$PY" "$RUN/watch.py" "$SINK_OUT" "$c0" "$n" "$((REP_TIMEOUT + 30))" > "$wout" &
  wpid=$!; PIDS+=("$wpid"); sleep 0.2
  t0=$(now); SRC_RC=0
  timeout "$REP_TIMEOUT" smtp-source -s "$SESSIONS" -m "$n" -l "$len" -M bench.localdomain \
    -f bench@example.test -t sink@example.test -S "smtpproxy bench" 127.0.0.1:"$SMTPD_PORT" \
    >> "$LOG/smtp-source.out" 2>&1 || SRC_RC=$?
  if [ "$SRC_RC" != 0 ]; then
    for i in $(seq 1 300); do kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$wpid" 2>/dev/null && { stop_pid "$wpid"; echo "timeout $(( $(sink_count) - c0 ))" > "$wout"; }
  fi
  wait "$wpid" || true
  read -r t2 c < "$wout" || true
  if [ "$t2" = timeout ] || [ -z "$t2" ]; then log "timeout: ${c:-0}/$n delivered"; t2=$(now); c=${c:-0}; fi
  DELIVERED=$c; ELAPSED=$(awk -v a="$t0" -v b="$t2" 'BEGIN{printf "%.3f", b-a}')
  for i in $(seq 1 300); do [ "$(queue_len)" -eq 0 ] && break; sleep 0.1; done
}

RESULTS=$LOG/results.tsv
printf 'round\tconfig\tsize\tn\tdelivered\telapsed_s\tmsgs_per_s\tfilter_cpu_ms_per_msg\tsys_busy_pct\tsteal_pct\tsource_rc\tbad\n' > "$RESULTS"
measure() {  # measure ROUND CONFIG SIZE
  local round=$1 cfg=$2 size=$3 n len pc0 pc1 s0 s1 mlog0 bad
  if [ "$size" = small ]; then n=$SMALL_N len=$SMALL_L; else n=$LARGE_N len=$LARGE_L; fi
  pc0=$(filter_cpu); s0=$(sys_cpu); mlog0=$(stat -c %s "$LOG/maillog")
  send_batch "$n" "$len"
  pc1=$(filter_cpu); s1=$(sys_cpu)
  bad=$(tail -c +"$((mlog0 + 1))" "$LOG/maillog" | grep -cE 'status=(deferred|bounced)|reject:' || true)
  awk -v r="$round" -v cfg="$cfg" -v size="$size" -v n="$n" -v d="$DELIVERED" -v el="$ELAPSED" \
      -v pc="$((pc1 - pc0))" -v s0="$s0" -v s1="$s1" -v hz="$HZ" -v rc="$SRC_RC" -v bad="$bad" 'BEGIN{
        split(s0,a," "); split(s1,b," "); busy=b[1]-a[1]; st=b[3]-a[3]; tot=b[4]-a[4];
        printf "%d\t%s\t%s\t%d\t%d\t%.3f\t%.1f\t%.3f\t%.0f\t%.0f\t%d\t%d\n", r,cfg,size,n,d,el,(el>0)?d/el:0,
          (d>0)?1000*pc/hz/d:0,(tot>0)?100*busy/tot:0,(tot>0)?100*st/tot:0,rc,bad}' >> "$RESULTS"
  log "$(tail -1 "$RESULTS" | awk -F'\t' '{printf "round %s %-3s %-5s %s/%s msgs in %ss = %s msg/s (filter %s ms cpu/msg, %s%% busy, %s%% steal, bad %s)", $1,$2,$3,$5,$4,$6,$7,$8,$9,$10,$12}')"
}

log "postfix $(postconf -d -h mail_version), $("$PY" -V), $(nproc) cores; small $SMALL_N x $SMALL_L B, large $LARGE_N x $LARGE_L B, -s $SESSIONS, rounds $REPS, configs: $CONFIGS"
SINK_OUT=$LOG/sink.out
smtp-sink -u nobody -c 127.0.0.1:$SINK_PORT 1024 > "$SINK_OUT" 2>&1 &
PIDS+=("$!"); wait_up $SINK_PORT 10
for round in $(seq 1 "$REPS"); do
  for cfg in $CONFIGS; do
    start_filter "$cfg"
    start_postfix "$cfg"
    if [ "$WARMUP" -gt 0 ]; then send_batch "$WARMUP" "$SMALL_L"; fi
    measure "$round" "$cfg" small
    measure "$round" "$cfg" large
    stop_postfix
    stop_filter; wait_free $FILTER_PORT
  done
done

"$PY" - "$RESULTS" "$SESSIONS" <<'EOF' | tee "$LOG/table.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
names = {"a": "Postfix alone -> smtp-sink", "s": "+ lamsonfilter smtpproxy, 1 process",
         "s2": "+ lamsonfilter smtpproxy --workers 2"}
by = {}
for r in rows:
    by.setdefault((r["config"], r["size"]), {})[r["round"]] = r
print(f"\nsmtpproxy-bench: medians over {len({r['round'] for r in rows})} interleaved rounds, smtp-source -s {sys.argv[2]}")
hdr = f"{'config':<42} {'size':<5} {'n':>5} {'deliv':>5} {'msg/s':>7} {'vs a':>5} {'filter ms/msg':>13} {'busy%':>5} {'steal%':>6} {'bad':>3}"
print(hdr); print("-" * len(hdr))
for size in ("small", "large"):
    base = by.get(("a", size), {})
    for cfg in names:
        d = by.get((cfg, size))
        if not d: continue
        rs = list(d.values())
        ratios = [float(d[k]["msgs_per_s"]) / float(base[k]["msgs_per_s"]) for k in d if k in base and float(base[k]["msgs_per_s"]) > 0]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        med = lambda k: statistics.median(float(r[k]) for r in rs)
        bad = sum(int(r["bad"]) + (int(r["source_rc"]) != 0) for r in rs)
        print(f"{cfg + ' ' + names[cfg]:<42} {size:<5} {rs[0]['n']:>5} {min(int(r['delivered']) for r in rs):>5} "
              f"{med('msgs_per_s'):>7.1f} {ratio:>5} {med('filter_cpu_ms_per_msg'):>13.2f} {med('sys_busy_pct'):>5.0f} "
              f"{med('steal_pct'):>6.0f} {bad:>3}")
print("vs a = median of per-round ratios to Postfix alone in the same round; filter ms/msg = CPU of the "
      "lamsonfilter process(es) per message; bad = deferred/bounced/rejected log lines + smtp-source failures")
EOF
log "raw results: $RESULTS ; logs: $LOG"
