#!/usr/bin/env bash
# install-server.sh - install lamsonfilter on a Debian 12 server, as README.rst
# ("Installing on a server") describes, step by step.  Run as root from a clone:
#
#     scripts/install-server.sh milter /path/to/your/app
#     scripts/install-server.sh content-filter /path/to/your/app
#     scripts/install-server.sh queue /path/to/your/app
#
# What it does (each step is idempotent; a second run updates):
#   1. apt: build-essential python3-dev python3-venv libmilter-dev libsystemd-dev pkg-config postfix
#   2. the virtualenv /opt/lamsonfilter, and `pip install CLONE[milter,smtpproxy,systemd]`
#      (lamsonfilter is not on PyPI: it is installed from this clone)
#   3. the user lamsonfilter (conf/systemd/lamsonfilter.sysusers, systemd-sysusers),
#      member of group postfix
#   4. the application, copied to /srv/lamsonfilter/app (owned by root, readable by all)
#   5. the state directory /var/lib/lamsonfilter (owner lamsonfilter, 0750); queue: also the
#      queue's parent /var/spool/lamsonfilter (owner lamsonfilter, 0750)
#   6. `lamsonfilter db init` of the database the units use, run as lamsonfilter
#   7. the systemd unit of MODE and /etc/default/lamsonfilter
#   8. Postfix: the application's domains (conf/postfix/main.cf.domains, with the
#      application's HOSTS) and the lines of MODE (conf/postfix/main.cf.MODE, master.cf.MODE);
#      queue: the lines of main.cf.queue instead of main.cf.domains (HOSTS, the spool, the
#      user's uid and gid filled in), master.cf.queue, and virtual(8)'s service if missing
#   9. `lamsonfilter check` of the result, `systemctl enable --now`, `postfix reload`
#
# Variables (for a test in a scratch root; the defaults are the real server):
#   LF_ROOT        prefix of /opt, /srv, /var/lib, /var/spool, /etc/systemd, /etc/default,
#                  /usr/lib/sysusers.d (default: empty, i.e. /); the user is always a real one
#   LF_USER        the service's user (default: lamsonfilter)
#   POSTFIX_CONFIG Postfix's configuration directory (default: /etc/postfix)
#   LF_LISTEN, LF_REINJECT, LF_POLICY  the content filter's loopback addresses
#                  (default: 127.0.0.1:10025, 127.0.0.1:10026, 127.0.0.1:10027); LF_REINJECT is
#                  also the outbox listener of the milter and of deq (queue)
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
umask 022  # what it installs is readable by the service user

say() { printf 'install-server: %s\n' "$*"; }
die() { printf 'install-server: ERROR: %s\n' "$*" >&2; exit 2; }

MODE=${1:-}
APP_SRC=${2:-}
case "$MODE" in milter|content-filter|queue) ;; *) die "usage: $0 milter|content-filter|queue APP_DIR";; esac
[ -f "$APP_SRC/config/settings.py" ] || die "$APP_SRC: not an application directory (no config/settings.py)"
[ "$(id -u)" = 0 ] || die "run as root"

CLONE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APP_SRC=$(cd "$APP_SRC" && pwd)
LF_ROOT=${LF_ROOT:-}
LF_USER=${LF_USER:-lamsonfilter}
POSTFIX_CONFIG=${POSTFIX_CONFIG:-/etc/postfix}
LF_LISTEN=${LF_LISTEN:-127.0.0.1:10025}
LF_REINJECT=${LF_REINJECT:-127.0.0.1:10026}
LF_POLICY=${LF_POLICY:-127.0.0.1:10027}
VENV=$LF_ROOT/opt/lamsonfilter
APP=$LF_ROOT/srv/lamsonfilter/app
STATE=$LF_ROOT/var/lib/lamsonfilter
SPOOL=$LF_ROOT/var/spool/lamsonfilter   # queue mode: virtual_mailbox_base; the queue is $SPOOL/queue
DATABASE=sqlite:///$STATE/state.db      # sqlite:////var/lib/lamsonfilter/state.db, as the units
case "$MODE" in milter) UNIT=lamsonfilter-milter;; content-filter) UNIT=lamsonfilter-smtpproxy;; queue) UNIT=lamsonfilter-deq;; esac
pc() { postconf -c "$POSTFIX_CONFIG" "$@"; }

# ------------------------------------------------------------------ 1. Debian packages
PACKAGES=(build-essential python3-dev python3-venv libmilter-dev libsystemd-dev pkg-config postfix)
missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "1. apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  say "1. Debian packages: installed"
fi

# ------------------------------------------------------------------ 2. virtualenv
say "2. virtualenv $VENV; pip install $CLONE[milter,smtpproxy,systemd]"
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"  # Debian's python3 (python3-venv)
"$VENV/bin/pip" install -q "$CLONE[milter,smtpproxy,systemd]"

# ------------------------------------------------------------------ 3. the user
say "3. user $LF_USER (sysusers.d), in group postfix"
install -d "$LF_ROOT/usr/lib/sysusers.d"
sed "s/\blamsonfilter\b/$LF_USER/g; s#/var/lib/$LF_USER#/var/lib/lamsonfilter#" \
    "$CLONE/conf/systemd/lamsonfilter.sysusers" > "$LF_ROOT/usr/lib/sysusers.d/$LF_USER.conf"
systemd-sysusers "$LF_ROOT/usr/lib/sysusers.d/$LF_USER.conf"

# ------------------------------------------------------------------ 4. the application
say "4. application $APP_SRC -> $APP (owned by root, read-only for $LF_USER)"
install -d -m 0755 "$(dirname "$APP")"
rm -rf "$APP.new"
cp -a "$APP_SRC" "$APP.new"
rm -rf "$APP.new/var" "$APP.new/.venv"
find "$APP.new" -name __pycache__ -prune -exec rm -rf {} +
chown -R root:root "$APP.new"
chmod -R u=rwX,go=rX "$APP.new"
rm -rf "$APP"
mv "$APP.new" "$APP"

# ------------------------------------------------------------------ 5. the state directory
say "5. state directory $STATE (owner $LF_USER, 0750)"
install -d -o "$LF_USER" -g "$LF_USER" -m 0750 "$STATE"
if [ "$MODE" = queue ]; then
  say "5. queue spool $SPOOL (owner $LF_USER, 0750): virtual(8) creates queue/ there as $LF_USER"
  install -d -m 0755 "$(dirname "$SPOOL")"
  install -d -o "$LF_USER" -g "$LF_USER" -m 0750 "$SPOOL"
fi

# ------------------------------------------------------------------ 6. the database the units use
say "6. lamsonfilter db init --app $APP --database $DATABASE (as $LF_USER)"
runuser -u "$LF_USER" -- "$VENV/bin/lamsonfilter" db init --app "$APP" --database "$DATABASE"

# ------------------------------------------------------------------ 7. the unit
QUEUE=$(pc -h queue_directory)
say "7. $LF_ROOT/etc/systemd/system/$UNIT.service and $LF_ROOT/etc/default/lamsonfilter"
install -d "$LF_ROOT/etc/systemd/system" "$LF_ROOT/etc/default"
sed -e "s#/opt/lamsonfilter#$VENV#g; s#/var/lib/lamsonfilter#$STATE#g; s#/var/spool/postfix#$QUEUE#g" \
    -e "s#/var/spool/lamsonfilter#$SPOOL#g" \
    -e "s#=/etc/postfix#=$POSTFIX_CONFIG#; s#/etc/default/lamsonfilter#$LF_ROOT/etc/default/lamsonfilter#" \
    -e "s#^User=lamsonfilter#User=$LF_USER#; s#^Group=lamsonfilter#Group=$LF_USER#" \
    -e "s#-o lamsonfilter #-o $LF_USER #; s#-g lamsonfilter #-g $LF_USER #" \
    "$CLONE/conf/systemd/$UNIT.service" > "$LF_ROOT/etc/systemd/system/$UNIT.service"
cat > "$LF_ROOT/etc/default/lamsonfilter" <<EOF
# read by the lamsonfilter units (EnvironmentFile=); written by scripts/install-server.sh
LAMSONFILTER_APP=$APP
LAMSONFILTER_DATABASE=$DATABASE
LAMSONFILTER_LISTEN=$LF_LISTEN
LAMSONFILTER_REINJECT=$LF_REINJECT
LAMSONFILTER_POLICY=$LF_POLICY
LAMSONFILTER_RELAY=$LF_REINJECT
LAMSONFILTER_POSTFIX_CONFIG=$POSTFIX_CONFIG
LAMSONFILTER_QUEUE=$SPOOL/queue
EOF

# ------------------------------------------------------------------ 8. Postfix
HOSTS=$("$VENV/bin/lamsonfilter" routes --app "$APP" 2>/dev/null | sed -n 's/^hosts: //p' | tr -d ',')
[ -n "$HOSTS" ] && [ "$HOSTS" != "(none)" ] || die "$APP: HOSTS is empty: Postfix would not know the application's domains"
say "8. Postfix in $POSTFIX_CONFIG: domains $HOSTS, lines of main.cf.${MODE/-/_} and master.cf.${MODE/-/_}"
if [ "$MODE" != queue ]; then
  # main.cf.domains: Postfix relays the domains (to lamsonfilter, then lamsonfilter-kept)
  relay=$(pc -nh relay_domains)
  for h in $HOSTS; do
    case ", $relay," in *", $h,"*|*" $h,"*) ;; *) relay=${relay:+$relay, }$h;; esac
  done
  pc -e "relay_domains = $relay"
  table="inline:{"
  for h in $HOSTS; do table="$table {$h = lamsonfilter-kept:mail for $h was not consumed by lamsonfilter},"; done
  table="${table%,} }"
  transport=$(pc -nh transport_maps | sed 's/inline:{[^}]*lamsonfilter-kept:[^}]*}[^}]*} *,\? *//')
  pc -e "transport_maps = $table${transport:+, $transport}"
  deferred=$(pc -nh defer_transports)
  [[ " $deferred " == *" lamsonfilter-kept "* ]] || pc -e "defer_transports = ${deferred:+$deferred }lamsonfilter-kept"
  pc -M lamsonfilter-kept/unix | grep -q . || grep -v '^#' "$CLONE/conf/postfix/master.cf.domains" >> "$POSTFIX_CONFIG/master.cf"
else
  # main.cf.queue instead: the domains leave relay_domains and the lamsonfilter-kept transport
  # of the other modes (a domain has one address class; transport_maps would bypass virtual(8))
  relay=""
  for d in $(pc -nh relay_domains | tr ',' ' '); do
    case " $HOSTS " in *" $d "*) ;; *) relay=${relay:+$relay, }$d;; esac
  done
  [ "$relay" = "$(pc -nh relay_domains)" ] || pc -e "relay_domains = $relay"
  transport=$(pc -nh transport_maps)
  others=$(printf '%s' "$transport" | sed 's/inline:{[^}]*lamsonfilter-kept:[^}]*}[^}]*} *,\? *//')
  [ "$others" = "$transport" ] || pc -e "transport_maps = $others"
  DOMAINS=$(echo $HOSTS | sed 's/ /, /g')
  BOXES="inline:{"
  for h in $HOSTS; do BOXES="$BOXES {@$h = queue/},"; done
  BOXES="${BOXES%,} }"
  OWN="inline:{"  # what the outbox listener puts on hold (master.cf.queue)
  for h in $HOSTS; do OWN="$OWN {$h = HOLD sent back to its own domain by lamsonfilter deq},"; done
  OWN="${OWN%,} }"
  QUID=$(id -u "$LF_USER")
  QGID=$(id -g "$LF_USER")
  # a Postfix that already delivers other domains with virtual(8) is merged by hand
  for want in "virtual_mailbox_base = $SPOOL" "virtual_mailbox_maps = $BOXES" \
              "virtual_uid_maps = static:$QUID" "virtual_gid_maps = static:$QGID"; do
    name=${want%% =*}
    current=$(pc -nh "$name")
    [ -z "$current" ] || [ "$name = $current" = "$want" ] || [[ "$current" == static:LAMSONFILTER_?ID ]] ||
      die "$name is '$current' in $POSTFIX_CONFIG/main.cf: this Postfix delivers other domains with virtual(8); merge conf/postfix/main.cf.queue by hand"
  done
  pc -M virtual/unix | grep -q . ||  # Debian's master.cf has it
    echo "virtual   unix  -       n       n       -       -       virtual" >> "$POSTFIX_CONFIG/master.cf"
fi
# the main.cf lines of the mode: "name = value" with continuation lines joined
chrooted=$(pc -M | awk -v l="$LF_REINJECT" '$2 == "inet" && $8 == "smtpd" && $1 != l && $5 == "y" {print "y"; exit}')
awk '/^#/ || /^$/ {next} /^[ \t]/ {line = line " " $0; next} {if (line) print line; line = $0} END {if (line) print line}' \
    "$CLONE/conf/postfix/main.cf.${MODE/-/_}" |
  sed -e "s#127.0.0.1\]:10025#${LF_LISTEN%:*}]:${LF_LISTEN##*:}#; s#inet:127.0.0.1:10027#inet:$LF_POLICY#" |
  while IFS= read -r line; do
    if [ "$chrooted" != y ]; then  # an unchrooted smtpd names the socket by its full path
      line=${line//unix:\/lamsonfilter\//unix:$QUEUE\/lamsonfilter\/}
    fi
    name=${line%% =*}
    case "$name" in  # queue mode: the HOSTS, the spool and the user's numbers
      virtual_mailbox_domains) line="$name = $DOMAINS";;
      virtual_mailbox_base) line="$name = $SPOOL";;
      virtual_mailbox_maps) line="$name = $BOXES";;
      virtual_uid_maps) line="$name = static:$QUID";;
      virtual_gid_maps) line="$name = static:$QGID";;
      lamsonfilter_own_domains) line="$name = $OWN";;
    esac
    current=$(pc -nh "$name")
    if [ "$name" = smtpd_recipient_restrictions ] && [ -n "$current" ] && [[ "$current" != *check_policy_service* ]]; then
      # the policy check first, then the restrictions already there
      line="$name = $(printf '%s' "${line#*= }" | sed 's/},.*/}/'), $current"
    fi
    pc -e "$line"
  done
if ! pc -M | awk '{print $1}' | grep -qx "${LF_REINJECT}"; then
  sed "s/^127.0.0.1:10026 /$LF_REINJECT /" "$CLONE/conf/postfix/master.cf.${MODE/-/_}" >> "$POSTFIX_CONFIG/master.cf"
fi

# ------------------------------------------------------------------ 9. check, start
say "9. lamsonfilter check"
check_args=(--app "$APP" --database "$DATABASE" --user "$LF_USER" --postfix-config "$POSTFIX_CONFIG")
[ "$MODE" = milter ] && check_args+=(--milter-socket "unix:$QUEUE/lamsonfilter/milter.sock")
"$VENV/bin/lamsonfilter" check "${check_args[@]}" --relay "$LF_REINJECT" ||
  die "lamsonfilter check found errors (above): fix them, then run this script again"
if [ -z "$LF_ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now "$UNIT"
  if postfix -c "$POSTFIX_CONFIG" status 2>/dev/null; then postfix -c "$POSTFIX_CONFIG" reload; fi
  say "done: $UNIT is running; Postfix reloaded"
else
  say "done; start it with: systemctl enable --now $UNIT, then postfix reload"
fi
