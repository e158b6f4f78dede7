#!/usr/bin/env bash
# filter_bench.sh - throughput of lamsonfilter (milter and content filter) through a real
# private Postfix, as a ratio to Postfix alone measured in the same run (follows
# bench/anchor/anchor-bench.sh; a measurement tool, not product code).  The one harness:
# bench/milter_bench.sh and bench/smtpproxy_bench.sh only choose its configurations.
#
#   bench/filter_bench.sh                          # as root, Debian 12, after scripts/bootstrap.sh
#   BENCH_CONFIGS="a mu mi s s2" bench/filter_bench.sh   # both modes in one run
#
# Configurations (BENCH_CONFIGS), INTERLEAVED per round: every round runs each configuration
# once, with a fresh Postfix start and a warm-up, so drift of a shared VM (CPU steal) hits all
# alike; "vs a" is the median of the per-round ratios to config a:
#   a    Postfix alone: smtp-source -> smtpd -> smtp-sink
#   mu   + lamsonfilter milter on a unix socket   (smtpd_milters = unix:...)
#   mi   + lamsonfilter milter on loopback TCP    (smtpd_milters = inet:127.0.0.1:PORT)
#   mp   mu with the milter process on one CPU (taskset -c BENCH_PIN_CPU, default the last
#        CPU): what systemd's CPUAffinity= in conf/systemd/lamsonfilter-milter.service does
#   s    + lamsonfilter smtpproxy as after-queue content filter (content_filter -> filter ->
#        reinjection smtpd -> smtp-sink); the mode flag for content-filter mode
#   s2   the same with --workers 2 (two processes on one port, SO_REUSEPORT)
#   tu   + bench/trivial_milter.py on a unix socket: pymilter receiving header and body and
#        adding a header, nothing else -- the floor that lamsonfilter's milter sits on
#   tc   + bench/trivial_milter.py --connect: ACCEPT at connect -- what any pymilter milter
#        costs per SMTP session (connect, negotiate, a thread) before it does anything
# The milters run the full example application (examples/mailinglist: SQLite state, Mako
# views, the per-message log line) and Postfix uses the *shipped* conf/postfix snippets
# (main.cf.milter, master.cf.milter; *.content_filter for s) with only sockets and ports
# replaced.  The benchmark mail goes to BENCH_RCPT (default sink@example.net), an address the
# application does not route, so it passes through: envelope at RCPT (check_recipient),
# header+body spooled, App.process, the plan (ACCEPT) -- what every message pays in milter
# mode.  "proc" counts the per-message log lines of the filter: every message was processed.
# Knobs: BENCH_DIR (under /tmp) BENCH_REPS BENCH_SESSIONS BENCH_SMALL_N BENCH_SMALL_L
#        BENCH_LARGE_N BENCH_LARGE_L BENCH_WARMUP BENCH_CONFIGS BENCH_RCPT BENCH_REP_TIMEOUT
#        BENCH_SMTPD_PORT BENCH_PIN_CPU BENCH_MILTER_ARGS (extra options for `lamsonfilter milter`)
#        BENCH_SOURCE_ARGS (extra smtp-source options, e.g. -d: several messages per connection)
#        BENCH_SOURCE (the load program, default smtp-source; it gets smtp-source's options:
#        bench/stateful_bench.sh uses bench/stateful_source.py)
#        BENCH_APP (another application directory; default examples/mailinglist)
#        BENCH_TAG=1 adds a handler for tag@lists.example.org that adds a header and delivers
#        (with BENCH_RCPT=tag@lists.example.org: routed mail with an end-of-message change)
# Only 127.0.0.1; every loop bounded; only PIDs this script started are signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BASE=${BENCH_DIR:-/tmp/lf-bench}
ETC=$BASE/etc SPOOL=$BASE/spool DATA=$BASE/data LOG=$BASE/log RUN=$BASE/run APP=$BASE/app
REPS=${BENCH_REPS:-3}
SESSIONS=${BENCH_SESSIONS:-10}
SMALL_N=${BENCH_SMALL_N:-2000} SMALL_L=${BENCH_SMALL_L:-2000}
LARGE_N=${BENCH_LARGE_N:-200}  LARGE_L=${BENCH_LARGE_L:-100000}
WARMUP=${BENCH_WARMUP:-100}
CONFIGS=${BENCH_CONFIGS:-"a mu mi"}
RCPT=${BENCH_RCPT:-sink@example.net}
APP_SRC=${BENCH_APP:-$REPO/examples/mailinglist}
REP_TIMEOUT=${BENCH_REP_TIMEOUT:-300}
PY=${PYTHON:-$REPO/.venv/bin/python}
# ports of our own (anchor-bench and smtpproxy_bench use 25/2500, 2525, 10025-10027)
SMTPD_PORT=${BENCH_SMTPD_PORT:-2600} SINK_PORT=2625 MILTER_PORT=8893
OUTBOX_PORT=10036 FILTER_PORT=10035 REINJECT_PORT=10038 POLICY_PORT=10037
FILTER2_PORT=10045 POLICY2_PORT=10047  # s2: its own listeners (all filters run for the whole run)
MILTER_SOCK=$RUN/milter.sock PINNED_SOCK=$RUN/milter-pinned.sock TRIVIAL_SOCK=$RUN/trivial.sock CONNECT_SOCK=$RUN/connect.sock
HZ=$(getconf CLK_TCK)
PIN_CPU=${BENCH_PIN_CPU:-$(( $(nproc) - 1 ))}
export PATH=$PATH:/usr/sbin

case "$BASE" in /tmp/?*) ;; *) echo "BENCH_DIR must be under /tmp" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "run as root (postfix master, smtp-sink -u)" >&2; exit 2; }
for c in postfix smtp-source smtp-sink; do command -v $c >/dev/null || { echo "missing $c (scripts/bootstrap.sh)" >&2; exit 2; }; done
"$PY" -c 'import Milter, lamsonfilter' || { echo "run scripts/bootstrap.sh first (pymilter)" >&2; exit 2; }
for cfg in $CONFIGS; do case $cfg in a|mu|mi|mp|s|s2|tu|tc) ;; *) echo "unknown config $cfg (a mu mi mp s s2 tu tc)" >&2; exit 2 ;; esac; done

log() { printf '[filter-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now() { date +%s.%N; }
PIDS=()              # helpers we started (sink, watchers)
declare -A FPID=()   # config -> filter PID
pf() { postfix -c "$ETC" "$@"; }
master_pid() { local p; p=$(tr -dc 0-9 2>/dev/null < "$SPOOL/pid/master.pid") || true
               [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; return 0; }
stop_pid() {  # TERM, wait <= 15 s (libmilter polls every 5 s), then KILL -- only our own PIDs
  local p=$1 i; kill -0 "$p" 2>/dev/null || return 0; kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 1 150); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true; }
stop_postfix() { local mp i; mp=$(master_pid); [ -n "$mp" ] || return 0; pf stop >/dev/null 2>&1 || true
                 for i in $(seq 1 100); do kill -0 "$mp" 2>/dev/null || return 0; sleep 0.1; done
                 kill -KILL "$mp" 2>/dev/null || true; }
cleanup() {
  stop_postfix
  local p; for p in "${FPID[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${FPID[@]}" "${PIDS[@]}"; do stop_pid "$p"; done
  FPID=(); PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_up() {  # wait_up PORT|/socket SECONDS
  local i; for i in $(seq 1 $(( $2 * 10 ))); do
    if [[ $1 == /* ]]; then [ -S "$1" ] && return 0; else port_busy "$1" && return 0; fi
    sleep 0.1; done
  echo "$1 did not come up" >&2; return 1; }

if [ -f "$ETC/main.cf" ]; then stop_postfix; fi
for p in $SMTPD_PORT $SINK_PORT $MILTER_PORT $OUTBOX_PORT $FILTER_PORT $REINJECT_PORT $POLICY_PORT; do
  if port_busy "$p"; then echo "port $p is already in use; refusing to start" >&2; exit 3; fi
done
rm -rf "$BASE"
mkdir -p "$ETC" "$SPOOL" "$DATA" "$LOG" "$RUN"
chmod 755 "$BASE" "$RUN"
chown postfix:postfix "$DATA"

# ---------------------------------------------------------------- the application
cp -r "$APP_SRC" "$APP"
rm -rf "$APP/var" "$APP/tests"
if [ "${BENCH_TAG:-0}" = 1 ]; then
  cat > "$APP/app/handlers/benchtag.py" <<'PYEOF'
"""bench/milter_bench.sh BENCH_TAG=1: tag@HOST gets a header and is delivered."""
from lamsonfilter import Handler, stateless

handler = Handler("benchtag", default_action="deliver")


@handler.route("tag@(host)")
@stateless
def TAG(ctx, host):
    ctx.add_header("X-Lamsonfilter-Bench", "tagged")
PYEOF
  printf '\nHANDLERS = HANDLERS + ["benchtag"]\n' >> "$APP/config/settings.py"
fi
"$PY" -m lamsonfilter.cli db init --app "$APP" >/dev/null

# ---------------------------------------------------------------- Postfix configuration
snippet() {  # snippet FILE : "name = value" lines of a shipped main.cf snippet, continuations joined
  "$PY" - "$1" <<'EOF'
import re, sys
params = {}
name = None
for line in open(sys.argv[1]):
    line = line.rstrip("\n")
    if not line.strip() or line.lstrip().startswith("#"):
        continue
    if line[0].isspace() and name:
        params[name] += " " + line.strip()
        continue
    name, _, value = line.partition("=")
    name = name.strip()
    params[name] = value.strip()
for k, v in params.items():
    print(f"{k} = {v}")
EOF
}
MILTER_MAIN=$(snippet "$REPO/conf/postfix/main.cf.milter")
grep -q 'unix:/lamsonfilter/milter.sock' <<<"$MILTER_MAIN" || { echo "main.cf.milter: socket line changed" >&2; exit 2; }
CF_MAIN=$(snippet "$REPO/conf/postfix/main.cf.content_filter")

write_main_cf() {  # write_main_cf CONFIG
  cat > "$ETC/main.cf" <<EOF
# private benchmark instance - generated by bench/milter_bench.sh
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
smtpd_peername_lookup = no
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
  case $1 in
    mu) sed "s#unix:/lamsonfilter/milter.sock#unix:$MILTER_SOCK#" <<<"$MILTER_MAIN" >> "$ETC/main.cf" ;;
    mp) sed "s#unix:/lamsonfilter/milter.sock#unix:$PINNED_SOCK#" <<<"$MILTER_MAIN" >> "$ETC/main.cf" ;;
    mi) sed "s#unix:/lamsonfilter/milter.sock#inet:127.0.0.1:$MILTER_PORT#" <<<"$MILTER_MAIN" >> "$ETC/main.cf" ;;
    tu) sed "s#unix:/lamsonfilter/milter.sock#unix:$TRIVIAL_SOCK#" <<<"$MILTER_MAIN" >> "$ETC/main.cf" ;;
    tc) sed "s#unix:/lamsonfilter/milter.sock#unix:$CONNECT_SOCK#" <<<"$MILTER_MAIN" >> "$ETC/main.cf" ;;
    s)  sed -e "s#\[127.0.0.1\]:10025#[127.0.0.1]:$FILTER_PORT#" -e "s#inet:127.0.0.1:10027#inet:127.0.0.1:$POLICY_PORT#" \
          <<<"$CF_MAIN" >> "$ETC/main.cf" ;;
    s2) sed -e "s#\[127.0.0.1\]:10025#[127.0.0.1]:$FILTER2_PORT#" -e "s#inet:127.0.0.1:10027#inet:127.0.0.1:$POLICY2_PORT#" \
          <<<"$CF_MAIN" >> "$ETC/main.cf" ;;
  esac
}
# the base services of a private instance, as lamsonfilter/devtools/localpostfix.py writes them
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
sed "s#127.0.0.1:10026 #127.0.0.1:$OUTBOX_PORT #" "$REPO/conf/postfix/master.cf.milter" >> "$ETC/master.cf"
if [[ " $CONFIGS " == *" s "* || " $CONFIGS " == *" s2 "* ]]; then
  sed "s#127.0.0.1:10026 inet#127.0.0.1:$REINJECT_PORT inet#" "$REPO/conf/postfix/master.cf.content_filter" >> "$ETC/master.cf"
fi

start_postfix() {
  write_main_cf "$1"
  postsuper -c "$ETC" -d ALL >/dev/null 2>&1 || true
  if ! pf check >/dev/null 2>&1 || ! pf start >/dev/null 2>&1; then
    echo "postfix check/start failed; maillog tail:" >&2; tail -20 "$LOG/maillog" >&2 || true; exit 4
  fi
  wait_up "$SMTPD_PORT" 20
}

# ---------------------------------------------------------------- the filters (kept for the run)
start_filter() {  # start_filter CONFIG
  local args prefix=()
  case $1 in
    a) return 0 ;;
    tu) "$PY" "$HERE/trivial_milter.py" "unix:$TRIVIAL_SOCK" >> "$LOG/filter-tu.log" 2>&1 &
        FPID[tu]=$!; wait_up "$TRIVIAL_SOCK" 30; return 0 ;;
    tc) "$PY" "$HERE/trivial_milter.py" "unix:$CONNECT_SOCK" --connect >> "$LOG/filter-tc.log" 2>&1 &
        FPID[tc]=$!; wait_up "$CONNECT_SOCK" 30; return 0 ;;
    mu) args=(milter --socket "unix:$MILTER_SOCK" --relay "127.0.0.1:$OUTBOX_PORT" ${BENCH_MILTER_ARGS:-}) ;;
    mi) args=(milter --socket "inet:$MILTER_PORT@127.0.0.1" --relay "127.0.0.1:$OUTBOX_PORT" ${BENCH_MILTER_ARGS:-}) ;;
    mp) prefix=(taskset -c "$PIN_CPU")
        args=(milter --socket "unix:$PINNED_SOCK" --relay "127.0.0.1:$OUTBOX_PORT" ${BENCH_MILTER_ARGS:-}) ;;
    s)  args=(smtpproxy --listen "127.0.0.1:$FILTER_PORT" --reinject "127.0.0.1:$REINJECT_PORT"
              --policy "127.0.0.1:$POLICY_PORT") ;;
    s2) args=(smtpproxy --listen "127.0.0.1:$FILTER2_PORT" --reinject "127.0.0.1:$REINJECT_PORT"
              --policy "127.0.0.1:$POLICY2_PORT" --workers 2) ;;
  esac
  "${prefix[@]}" "$PY" -m lamsonfilter.cli "${args[@]}" --app "$APP" >> "$LOG/filter-$1.log" 2>&1 &
  FPID[$1]=$!
  case $1 in mu) wait_up "$MILTER_SOCK" 30 ;; mp) wait_up "$PINNED_SOCK" 30 ;; mi) wait_up "$MILTER_PORT" 30 ;; s) wait_up "$FILTER_PORT" 30 ;; s2) wait_up "$FILTER2_PORT" 30 ;; esac
  sleep 0.5  # the unix socket gets its mode just after it appears
}
proc_cpu() {  # utime+stime ticks of PID and its children, 0 if none
  [ -n "${1:-}" ] || { echo 0; return; }
  local t=0 p
  for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
    [ -r "/proc/$p/stat" ] && t=$(( t + $(awk '{sub(/^.*\) /,""); print $12+$13}' "/proc/$p/stat") ))
  done
  echo $t
}
processed() {  # per-message log lines written by the filter of CONFIG so far
  case $1 in a|tu|tc) echo 0; return ;; esac
  grep -c 'queue_id=.* via=' "$LOG/filter-$1.log" 2>/dev/null || true
}
sys_cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8, $6, $9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat; }
sink_count() { local s; s=$(tail -c 96 "$SINK_OUT" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1) || true
               s=${s#mesg=}; echo "${s:-0}"; }
queue_len() { find "$SPOOL/incoming" "$SPOOL/active" "$SPOOL/deferred" "$SPOOL/hold" "$SPOOL/maildrop" \
                   -type f 2>/dev/null | wc -l; }

# One python process polls the smtp-sink -c counter every 5 ms and prints when the sink
# had TARGET more messages than BASE (a forked tail|grep loop would skew CPU-bound configs).
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
  timeout "$REP_TIMEOUT" ${BENCH_SOURCE:-smtp-source} ${BENCH_SOURCE_ARGS:-} -s "$SESSIONS" -m "$n" -l "$len" -M bench.localdomain \
    -f bench@example.test -t "$RCPT" -S "milter bench" 127.0.0.1:"$SMTPD_PORT" \
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
printf 'round\tconfig\tsize\tn\tdelivered\tprocessed\telapsed_s\tmsgs_per_s\tfilter_cpu_ms_per_msg\tsys_busy_pct\tsteal_pct\tsource_rc\tbad\n' > "$RESULTS"
measure() {  # measure ROUND CONFIG SIZE
  local round=$1 cfg=$2 size=$3 n len pc0 pc1 s0 s1 mlog0 bad p0 p1
  if [ "$size" = small ]; then n=$SMALL_N len=$SMALL_L; else n=$LARGE_N len=$LARGE_L; fi
  pc0=$(proc_cpu "${FPID[$cfg]:-}"); s0=$(sys_cpu); mlog0=$(stat -c %s "$LOG/maillog"); p0=$(processed "$cfg")
  send_batch "$n" "$len"
  pc1=$(proc_cpu "${FPID[$cfg]:-}"); s1=$(sys_cpu); p1=$(processed "$cfg")
  bad=$(tail -c +"$((mlog0 + 1))" "$LOG/maillog" | grep -cE 'status=(deferred|bounced)|reject:|milter-reject' || true)
  awk -v r="$round" -v cfg="$cfg" -v size="$size" -v n="$n" -v d="$DELIVERED" -v p="$((p1 - p0))" -v el="$ELAPSED" \
      -v pc="$((pc1 - pc0))" -v s0="$s0" -v s1="$s1" -v hz="$HZ" -v rc="$SRC_RC" -v bad="$bad" 'BEGIN{
        split(s0,a," "); split(s1,b," "); busy=b[1]-a[1]; st=b[3]-a[3]; tot=b[4]-a[4];
        printf "%d\t%s\t%s\t%d\t%d\t%d\t%.3f\t%.1f\t%.3f\t%.0f\t%.0f\t%d\t%d\n", r,cfg,size,n,d,p,el,(el>0)?d/el:0,
          (d>0)?1000*pc/hz/d:0,(tot>0)?100*busy/tot:0,(tot>0)?100*st/tot:0,rc,bad}' >> "$RESULTS"
  log "$(tail -1 "$RESULTS" | awk -F'\t' '{printf "round %s %-2s %-5s %s/%s msgs (processed %s) in %ss = %s msg/s (filter %s ms cpu/msg, %s%% busy, %s%% steal, bad %s)", $1,$2,$3,$5,$4,$6,$7,$8,$9,$10,$11,$13}')"
}

log "postfix $(postconf -d -h mail_version), $("$PY" -V), $(nproc) cores; small $SMALL_N x $SMALL_L B, large $LARGE_N x $LARGE_L B, -s $SESSIONS ${BENCH_SOURCE_ARGS:-}, rounds $REPS, configs: $CONFIGS, rcpt $RCPT, app $APP_SRC ${BENCH_MILTER_ARGS:-}"
SINK_OUT=$LOG/sink.out
smtp-sink -u nobody -c 127.0.0.1:$SINK_PORT 1024 > "$SINK_OUT" 2>&1 &
PIDS+=("$!"); wait_up $SINK_PORT 10
for cfg in $CONFIGS; do start_filter "$cfg"; done
for round in $(seq 1 "$REPS"); do
  for cfg in $CONFIGS; do
    start_postfix "$cfg"
    if [ "$WARMUP" -gt 0 ]; then send_batch "$WARMUP" "$SMALL_L"; fi
    measure "$round" "$cfg" small
    [ "$LARGE_N" -gt 0 ] && measure "$round" "$cfg" large
    stop_postfix
  done
done

"$PY" - "$RESULTS" "$SESSIONS" "$RCPT" <<'EOF' | tee "$LOG/table.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
names = {"a": "Postfix alone -> smtp-sink", "mu": "+ lamsonfilter milter, unix socket",
         "mp": "+ lamsonfilter milter, unix, one CPU",
         "mi": "+ lamsonfilter milter, inet 127.0.0.1", "s": "+ lamsonfilter smtpproxy (content_filter)",
         "s2": "+ the same, --workers 2",
         "tu": "+ trivial pymilter milter, hdr+body, unix",
         "tc": "+ pymilter milter ACCEPT at connect, unix"}
by = {}
for r in rows:
    by.setdefault((r["config"], r["size"]), {})[r["round"]] = r
print(f"\nfilter-bench: medians over {len({r['round'] for r in rows})} interleaved rounds, "
      f"smtp-source -s {sys.argv[2]}, mail to {sys.argv[3]}")
hdr = (f"{'config':<44} {'size':<5} {'n':>5} {'deliv':>5} {'proc':>5} {'msg/s':>7} {'min-max':>11} {'vs a':>5} "
       f"{'ms cpu/msg':>10} {'busy%':>5} {'steal%':>6} {'bad':>3}")
print(hdr); print("-" * len(hdr))
for size in ("small", "large"):
    base = by.get(("a", size), {})
    for cfg in names:
        d = by.get((cfg, size))
        if not d: continue
        rs = list(d.values())
        rates = [float(r["msgs_per_s"]) for r in rs]
        ratios = [float(d[k]["msgs_per_s"]) / float(base[k]["msgs_per_s"]) for k in d
                  if k in base and float(base[k]["msgs_per_s"]) > 0]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        med = lambda k: statistics.median(float(r[k]) for r in rs)
        bad = sum(int(r["bad"]) + (int(r["source_rc"]) != 0) for r in rs)
        print(f"{cfg + ' ' + names[cfg]:<44} {size:<5} {rs[0]['n']:>5} {min(int(r['delivered']) for r in rs):>5} "
              f"{min(int(r['processed']) for r in rs):>5} {statistics.median(rates):>7.1f} "
              f"{min(rates):>5.0f}-{max(rates):<5.0f} {ratio:>5} {med('filter_cpu_ms_per_msg'):>10.2f} "
              f"{med('sys_busy_pct'):>5.0f} {med('steal_pct'):>6.0f} {bad:>3}")
print("vs a = median of per-round ratios to Postfix alone in the same round; deliv/proc = fewest "
      "messages delivered at the sink / processed by lamsonfilter in a round; ms cpu/msg = CPU of the "
      "lamsonfilter process; busy%/steal% = whole machine; bad = deferred/bounced/rejected log lines "
      "+ smtp-source failures")
EOF
log "raw results: $RESULTS ; logs: $LOG"
