#!/usr/bin/env bash
# exim-setup.sh - a private, real Exim 4 binary for lamsonfilter's Exim tests (Debian 12, as root).
#
# Debian installs only one MTA: exim4-daemon-* conflicts with postfix.  So this script
# does not install Exim; it downloads the Debian packages with `apt-get download`
# (exim4-daemon-light, exim4-base and libidn12, the one library `ldd` finds missing
# beside postfix) and unpacks them with `dpkg -x` into a private directory OUTSIDE the
# repository (default /var/cache/lamsonfilter-exim; LAMSONFILTER_EXIM_DIR overrides).
# The unpacked binary loses its set-uid bit (it is run by the test as root with a
# private -C configuration and LD_LIBRARY_PATH).  The binary looks up its compiled-in
# user Debian-exim at start, so that system user/group is created if missing (as
# exim4-base's postinst would).  Nothing in /etc/exim4 is touched.
#
# Prints the path of a wrapper that runs the private exim (stdout, last line).
# Idempotent: a second run only checks (`exim -bV`).  Exit 1 with a reason when the
# packages cannot be fetched (no network, no apt): callers skip, or fail under CI=true.
set -euo pipefail

DIR=${LAMSONFILTER_EXIM_DIR:-/var/cache/lamsonfilter-exim}
ROOTFS=$DIR/root
WRAPPER=$DIR/exim
PACKAGES=(exim4-daemon-light exim4-base libidn12)

say() { printf 'exim-setup: %s\n' "$*" >&2; }
die() { printf 'exim-setup: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (dpkg -x, the Debian-exim system user)"
case "$DIR" in /|/usr|/usr/*|/etc|/etc/*) die "refusing LAMSONFILTER_EXIM_DIR=$DIR" ;; esac

if ! getent passwd Debian-exim >/dev/null; then
  say "creating the system user Debian-exim (the binary's compiled-in exim user)"
  getent group Debian-exim >/dev/null || groupadd --system Debian-exim
  useradd --system --gid Debian-exim --home-dir /var/spool/exim4 --no-create-home \
    --shell /usr/sbin/nologin Debian-exim
fi

works() { [ -x "$WRAPPER" ] && "$WRAPPER" -C /dev/null -bV >/dev/null 2>&1; }

if ! works; then
  command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (Debian)"
  dl=$(mktemp -d /tmp/exim-dl.XXXXXX)
  trap 'rm -rf "$dl"' EXIT
  say "apt-get download ${PACKAGES[*]}"
  if ! (cd "$dl" && apt-get download "${PACKAGES[@]}" >/dev/null 2>&1); then
    say "download failed; apt-get update and once more"
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$dl" && apt-get download "${PACKAGES[@]}" >/dev/null 2>&1) ||
      die "cannot download ${PACKAGES[*]} (no network or no Debian archive?)"
  fi
  rm -rf "$ROOTFS"
  mkdir -p "$ROOTFS"
  for deb in "$dl"/*.deb; do dpkg -x "$deb" "$ROOTFS"; done
  chmod u-s "$ROOTFS/usr/sbin/exim4"          # a private copy: never set-uid
  cat > "$WRAPPER" <<WRAP
#!/bin/sh
# private Exim from scripts/exim-setup.sh (Debian packages unpacked with dpkg -x)
LD_LIBRARY_PATH=$ROOTFS/usr/lib/x86_64-linux-gnu:$ROOTFS/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
exec $ROOTFS/usr/sbin/exim4 "\$@"
WRAP
  chmod 0755 "$WRAPPER"
  missing=$(LD_LIBRARY_PATH=$ROOTFS/usr/lib/x86_64-linux-gnu ldd "$ROOTFS/usr/sbin/exim4" | grep 'not found' || true)
  [ -z "$missing" ] || die "exim still misses libraries: $missing"
  works || die "the unpacked exim does not run: $("$WRAPPER" -C /dev/null -bV 2>&1 | head -3)"
fi
say "$("$WRAPPER" -C /dev/null -bV 2>/dev/null | head -1)"
echo "$WRAPPER"
