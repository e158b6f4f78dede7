#!/usr/bin/env bash
# bootstrap.sh - idempotent set-up for lamsonfilter (Debian 12, as root).
#
#   scripts/bootstrap.sh run    what running needs (`make run`, `make dry-run`)
#   scripts/bootstrap.sh [test] that and the test toolchain (`make test`, CI via .ci/run)
#   scripts/bootstrap.sh --print-extras run|test   the pip extras of a mode, and exit
#
#   1. apt: for running, postfix (debconf "No configuration": no /etc/postfix/main.cf, system
#      instance not configured or left running), libmilter-dev, build-essential, python3-dev
#      (pymilter compiles against libmilter) and swaks (the demo's banner uses it); for the
#      tests also pkg-config and libsystemd-dev (systemd-python), systemd (systemd-analyze),
#      miltertest, strace (reliability R6), graphviz (`lamsonfilter graph -o x.svg`).
#      `apt-get update` runs only when one of them is missing.
#   2. .venv in the repository (made with the `python3` on PATH) and
#      `pip install -e '.[EXTRAS]' --config-settings editable_mode=compat`, with a line per
#      pip step (the whole output in .venv/bootstrap-pip.log).  Run: milter,smtpproxy;
#      test: all extras (mypy, hypothesis, atheris, docutils, ruff, pytest ...).  "compat"
#      puts the checkout on sys.path as a path entry, so a directory named lamsonfilter in
#      the current directory (a clone next to your applications) cannot shadow the package:
#      Python's path finder prefers a regular package found later on sys.path to a namespace
#      directory found first, whereas setuptools' default editable finder is only asked
#      after the path finder has already settled for the namespace directory.
#      Skipped while the stamp .venv/.bootstrap-stamp (a hash of setup.cfg, pyproject.toml,
#      the extras, the install options and the venv's Python version) matches and the key
#      modules import; a venv set up for the tests satisfies `run` too.
#   3. starts the local PostgreSQL cluster if it is installed but down (never fails on it).
#
# A second run only checks, and takes well under a second.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=$ROOT/.venv
RUN_EXTRAS=milter,smtpproxy
TEST_EXTRAS=milter,smtpproxy,postgresql,metrics,systemd,test
RUN_APT=(postfix libmilter-dev build-essential python3-dev swaks)
TEST_APT=("${RUN_APT[@]}" pkg-config libsystemd-dev systemd miltertest strace graphviz)
PIP_OPTIONS=(--disable-pip-version-check --config-settings editable_mode=compat)
export PATH=$PATH:/usr/sbin:/sbin

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

extras_of() {
  case "$1" in
    run) echo "$RUN_EXTRAS" ;;
    test) echo "$TEST_EXTRAS" ;;
    *) die "unknown mode '$1': run or test" ;;
  esac
}
if [ "${1:-}" = --print-extras ]; then
  extras_of "${2:-test}"
  exit 0
fi
MODE=${1:-test}
EXTRAS=$(extras_of "$MODE")
if [ "$MODE" = run ]; then APT_PACKAGES=("${RUN_APT[@]}"); else APT_PACKAGES=("${TEST_APT[@]}"); fi
is_root() { [ "$(id -u)" = 0 ]; }

# ------------------------------------------------------------------ 1. Debian packages
pkg_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
# PID of the *system* Postfix master, if one is running (not our private test instances)
system_master_pid() {
  local p
  p=$(tr -dc 0-9 2>/dev/null < /var/spool/postfix/pid/master.pid) || true
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "$p"; fi
  return 0
}

missing=()
for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  is_root || die "missing Debian packages (${missing[*]}); run this script as root"
  say "apt: installing ${missing[*]}"
  master_before=$(system_master_pid)
  if [[ " ${missing[*]} " == *" postfix "* ]]; then
    # No configuration: the package installs binaries only; no main.cf, nothing listening on :25
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  fi
  apt_log=$(mktemp /tmp/bootstrap-apt.XXXXXX)
  if ! { apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$apt_log" 2>&1; then
    tail -n 30 "$apt_log" >&2
    die "apt-get failed (full log: $apt_log)"
  fi
  rm -f "$apt_log"
  master_after=$(system_master_pid)
  if [ -n "$master_after" ] && [ "$master_after" != "$master_before" ]; then
    # the install started the system instance: stop exactly that one (tests use private ones)
    say "apt: stopping the system Postfix (pid $master_after) that the install started"
    postfix stop >/dev/null 2>&1 || kill -TERM "$master_after" 2>/dev/null || true
  fi
else
  say "apt: ${APT_PACKAGES[*]} already installed"
fi

# ------------------------------------------------------------------ 2. virtualenv
command -v python3 >/dev/null || die "no python3 on PATH"
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "venv: creating .venv with $(command -v python3) ($(python3 -c 'import platform;print(platform.python_version())'))"
  python3 -m venv --clear "$VENV"
fi
stamp_file=$VENV/.bootstrap-stamp
stamp_of() {
  { cat setup.cfg pyproject.toml; echo "$1"; echo "${PIP_OPTIONS[*]}"; "$VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1
}
stamp=$(stamp_of "$EXTRAS")
current=$(cat "$stamp_file" 2>/dev/null || true)
stamp_ok() {
  [ "$current" = "$stamp" ] || { [ "$MODE" = run ] && [ "$current" = "$(stamp_of "$TEST_EXTRAS")" ]; }
}
# the dependencies must import; lamsonfilter itself only has to be installed (importing
# it is the tests' business)
venv_ok() {
  local modules="Milter, aiosmtpd, alembic"
  [ "$MODE" = run ] || modules="$modules, psycopg, pytest, prometheus_client, systemd.daemon"
  "$VENV/bin/python" -c "import importlib.metadata as m, $modules
m.version('lamsonfilter')" >/dev/null 2>&1
}
# one line per pip step (what it collects, builds and installs) instead of 40 silent seconds
pip_progress() {
  local line
  while IFS= read -r line; do
    case $line in
      Collecting*|"Building wheel for"*|"Installing collected"*|"Successfully installed"*) say "pip: $line" ;;
    esac
  done
}
if stamp_ok && venv_ok; then
  say "venv: .venv up to date ($("$VENV/bin/python" -V 2>&1), editable lamsonfilter[$EXTRAS])"
else
  say "venv: pip install -e '.[$EXTRAS]' (pymilter compiles against libmilter-dev; about a minute the first time)"
  rm -f "$stamp_file"
  pip_log=$VENV/bootstrap-pip.log
  set +e
  "$VENV/bin/python" -m pip install "${PIP_OPTIONS[@]}" -e ".[$EXTRAS]" 2>&1 | tee "$pip_log" | pip_progress
  pip_status=${PIPESTATUS[0]}
  set -e
  if [ "$pip_status" != 0 ]; then
    grep -v '^ *$' "$pip_log" | tail -n 25 >&2
    die "pip install failed (full log: $pip_log)"
  fi
  venv_ok || die "pip install succeeded but the dependencies do not import (log: $pip_log)"
  echo "$stamp" > "$stamp_file"
  say "venv: done ($("$VENV/bin/python" -V 2>&1), pymilter $("$VENV/bin/python" -c 'import importlib.metadata as m;print(m.version("pymilter"))'); log: .venv/bootstrap-pip.log)"
fi

# ------------------------------------------------------------------ 3. PostgreSQL
if [ -d /etc/postgresql ] && command -v pg_lsclusters >/dev/null; then
  for ver in $(ls /etc/postgresql); do
    [ -d "/etc/postgresql/$ver/main" ] || continue
    if pg_ctlcluster "$ver" main status >/dev/null 2>&1; then
      continue
    elif is_root; then
      say "postgresql: starting cluster $ver/main"
      pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
        say "postgresql: WARNING: could not start $ver/main (database tests will fail or skip)"
    else
      say "postgresql: cluster $ver/main is down (start it as root)"
    fi
  done
fi
