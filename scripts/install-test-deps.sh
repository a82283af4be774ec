#!/usr/bin/env bash
# Installs what the tests need from Debian's packages (Dovecot for the interop tests,
# with POP3 and ManageSieve/Pigeonhole; Dovecot submission and Postfix as real upstream
# SMTP servers; sieve-connect and Python's sievelib as ManageSieve clients; swaks with Perl's TLS
# modules, curl, Python, mbsync (isync) and Thunderbird as real clients; PostgreSQL 15
# for the PostgreSQL store tests, HAProxy as a real PROXY-protocol load balancer, and
# nghttp2's h2load for HTTP/2 bursts on the web step, fail2ban to run the shipped filter and
# jail on mailgate's log, Python's prometheus_client to parse the /metrics scrape, libfaketime
# (faketime) to run mailgate 91 days on for the stale mark in tests/web.rs, Pebble
# (with pebble-challtestsrv as its DNS) as the ACME CA of tests/acme.rs), and
# builds Dovecot's imaptest from the source in ../shared/tools/imaptest (beside the
# repository) into target/imaptest (dovecot-dev and the autotools to build it; rebuilt
# only when missing), and installs cargo-deb from crates.io at a pinned version for
# tests/deb.rs (the Debian package; with systemd-analyze from systemd, adduser and
# setpriv/runuser from util-linux).
# Idempotent; needs root (or sudo) when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for pkg in dovecot-imapd dovecot-submissiond dovecot-pop3d dovecot-managesieved dovecot-sieve sieve-connect \
  python3-sievelib python3-prometheus-client fetchmail getmail6 postfix swaks libnet-ssleay-perl libio-socket-ssl-perl \
  curl python3 isync thunderbird ca-certificates chromium chromium-driver iproute2 util-linux \
  postgresql-15 haproxy nghttp2-client systemd adduser fail2ban pebble zbar-tools librsvg2-bin openssl faketime \
  dovecot-dev autoconf automake libtool make gcc pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # postfix's postinst asks what kind of mail system this is: none. The tests run
  # their own private Postfix (tests/support/postfix.rs); the system one stays unconfigured.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The tests run their own PostgreSQL clusters (tests/support/postgres.rs) and HAProxy
  # instances (tests/support/haproxy.rs) on free loopback ports. Where the packages'
  # postinst could start services (no policy-rc.d, no systemd in CI containers: init
  # scripts), stop what this run just installed: the `main` cluster on 5432 and the
  # system haproxy. A PostgreSQL or HAProxy that was already installed is left alone.
  for pkg in "${need[@]}"; do
    case "$pkg" in
      postgresql-15)
        $SUDO pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
        $SUDO update-rc.d postgresql disable >/dev/null 2>&1 || true
        ;;
      haproxy)
        $SUDO service haproxy stop >/dev/null 2>&1 || true
        $SUDO update-rc.d haproxy disable >/dev/null 2>&1 || true
        ;;
      fail2ban)
        # tests/fail2ban.rs runs its own fail2ban-server in a temporary directory; the
        # system one would change the firewall.
        $SUDO service fail2ban stop >/dev/null 2>&1 || true
        $SUDO update-rc.d fail2ban disable >/dev/null 2>&1 || true
        ;;
    esac
  done
fi
# The tests start their own Dovecot on free loopback ports; a system Dovecot that the
# package may have started does not get in the way and is left alone.
test -x /usr/sbin/dovecot || { echo "dovecot is not installed at /usr/sbin/dovecot" >&2; exit 1; }
test -x /usr/lib/dovecot/submission || { echo "dovecot-submissiond is not installed" >&2; exit 1; }
test -x /usr/lib/dovecot/pop3 || { echo "dovecot-pop3d is not installed" >&2; exit 1; }
test -x /usr/lib/dovecot/managesieve || { echo "dovecot-managesieved is not installed" >&2; exit 1; }
test -x /usr/lib/dovecot/dovecot-lda || { echo "dovecot-lda (dovecot-core) is not installed" >&2; exit 1; }
command -v sieve-connect >/dev/null || { echo "sieve-connect is not installed" >&2; exit 1; }
/usr/bin/python3 -c "import sievelib.managesieve" 2>/dev/null || { echo "python3-sievelib is not installed" >&2; exit 1; }
/usr/bin/python3 -c "import prometheus_client.parser" 2>/dev/null || { echo "python3-prometheus-client is not installed" >&2; exit 1; }
test -x /usr/lib/postfix/sbin/master || { echo "postfix is not installed" >&2; exit 1; }
command -v thunderbird >/dev/null || { echo "thunderbird is not installed" >&2; exit 1; }
command -v chromedriver >/dev/null || { echo "chromedriver (chromium-driver) is not installed" >&2; exit 1; }
# tests/devices.rs: the Android QR code (SVG to PNG, then decoded) and the signed Apple profile.
command -v zbarimg >/dev/null || { echo "zbarimg (zbar-tools) is not installed" >&2; exit 1; }
command -v rsvg-convert >/dev/null || { echo "rsvg-convert (librsvg2-bin) is not installed" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl is not installed" >&2; exit 1; }
# tests/web.rs: the stale mark, with mailgate's clock moved by LD_PRELOAD of libfaketime.
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || { echo "libfaketime (faketime) is not installed" >&2; exit 1; }
test -x /usr/lib/postgresql/15/bin/postgres || { echo "postgresql-15 is not installed" >&2; exit 1; }
test -x /usr/lib/postgresql/15/bin/pg_isready || { echo "postgresql-client-15 is not installed" >&2; exit 1; }
test -x /usr/sbin/haproxy || { echo "haproxy is not installed at /usr/sbin/haproxy" >&2; exit 1; }
test -x /usr/bin/pebble || { echo "pebble is not installed at /usr/bin/pebble" >&2; exit 1; }
test -x /usr/bin/pebble-challtestsrv || { echo "pebble-challtestsrv (pebble) is not installed" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load (nghttp2-client) is not installed" >&2; exit 1; }
command -v fail2ban-regex >/dev/null || { echo "fail2ban-regex (fail2ban) is not installed" >&2; exit 1; }
command -v fail2ban-server >/dev/null || { echo "fail2ban-server (fail2ban) is not installed" >&2; exit 1; }
command -v fail2ban-client >/dev/null || { echo "fail2ban-client (fail2ban) is not installed" >&2; exit 1; }
getent passwd postgres >/dev/null || { echo "the postgres system user is missing (postgresql-common)" >&2; exit 1; }

command -v systemd-analyze >/dev/null || { echo "systemd-analyze (systemd) is not installed" >&2; exit 1; }

# cargo-deb (tests/deb.rs packs the built binary with it): pinned, built from crates.io
# only when that version is missing (about 4 minutes of a loaded two-core machine; then
# kept in ~/.cargo/bin). 3.8.0 declares rust-version 1.85 and builds on 1.95.
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

# imaptest (tests/imaptest.rs): built from source beside the repository, never downloaded.
# The build is kept in target/imaptest (or $CARGO_TARGET_DIR/imaptest) and reused.
imaptest_src=../shared/tools/imaptest
if [ -f "$imaptest_src/build.sh" ]; then
  imaptest_bin="$(bash "$imaptest_src/build.sh" "${CARGO_TARGET_DIR:-target}/imaptest" | tail -n 1)"
  test -x "$imaptest_bin" || { echo "imaptest did not build ($imaptest_src/build.sh)" >&2; exit 1; }
  echo "imaptest: $imaptest_bin"
else
  echo "WARNING: $imaptest_src/build.sh not found (shared/ beside the repository):" \
    "tests/imaptest.rs will skip the imaptest runs" >&2
fi
