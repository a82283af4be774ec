#!/usr/bin/env bash
# Installs what the tests need from Debian's packages (Dovecot for the interop tests,
# curl, Python and mbsync (isync) for the real clients). Idempotent; needs root (or sudo) when
# something is missing.
set -euo pipefail
need=()
for pkg in dovecot-imapd curl python3 isync ca-certificates; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The tests start their own Dovecot on free loopback ports; a system Dovecot that the
# package may have started does not get in the way and is left alone.
test -x /usr/sbin/dovecot || { echo "dovecot is not installed at /usr/sbin/dovecot" >&2; exit 1; }
