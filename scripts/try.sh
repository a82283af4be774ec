#!/usr/bin/env bash
# Try mailgate: one command for a complete local setup that reads and sends mail.
#
#   sudo bash scripts/try.sh
#
# It starts, on 127.0.0.1 only, and leaves running until Ctrl-C:
#   * a private Dovecot (tools/dev-dovecot.sh): IMAP, and submission whose mail is
#     delivered into the recipients' Maildirs of that same Dovecot (tools/dev-deliver.py),
#     so what you send can be read back; nothing leaves the machine;
#   * mailgate in front of it, with a configuration written from the ports below;
#   * the account alice@example.com with an account password and an app password;
# then prints what to type into Thunderbird and where the web step is. Ctrl-C (or
# SIGTERM) stops everything it started. Each run starts afresh in TRY_DIR.
#
# It installs Dovecot from Debian when missing (dovecot-imapd, dovecot-submissiond;
# python3 too if there is none) and nothing else. Runs as root: Dovecot switches to
# unprivileged users. The first `cargo build --release` takes several minutes.
#
# Environment (all optional):
#   TRY_DIR=/tmp/mailgate-try   everything this run makes: config, certificate, store,
#                               logs, Dovecot and its mail (emptied at the next run)
#   MAILGATE_BIN=PATH           use this mailgate binary instead of `cargo build --release`
#   PORT_BASE=10000             the ports below are PORT_BASE + the usual port number:
#   IMAPS_PORT=10993 IMAP_PORT=10143 SMTPS_PORT=10465 SMTP_PORT=10587 WEB_PORT=10443
#                               mailgate: IMAP (SSL/TLS), IMAP (STARTTLS), SMTP (SSL/TLS),
#                               SMTP (STARTTLS), the web step (HTTPS)
#   DOVECOT_IMAP_PORT=11143 DOVECOT_SUBMISSION_PORT=11587 DELIVERY_PORT=11025
#                               the private Dovecot behind mailgate, and its local delivery
#   ACCOUNT_PASSWORD=...        alice's account password (default: a random one)
#   NO_INSTALL=1                never run apt-get; fail if Dovecot is missing
set -euo pipefail

# Ctrl-C (SIGINT) must reach the traps below even when this script was started with
# SIGINT ignored, as shells do for background jobs (`bash scripts/try.sh &`): start
# once more with the default handling (same PID).
if [[ -z ${MAILGATE_TRY_REEXEC:-} ]] && env --default-signal=INT true 2>/dev/null; then
    MAILGATE_TRY_REEXEC=1 exec env --default-signal=INT,TERM bash "${BASH_SOURCE[0]}" "$@"
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${TRY_DIR:-/tmp/mailgate-try}
USER_EMAIL=alice@example.com
PORT_BASE=${PORT_BASE:-10000}

say() { printf 'try: %s\n' "$*"; }
die() { printf 'try: error: %s\n' "$*" >&2; exit 1; }
# Whether any of the PIDs still runs (`kill -0 A B` fails as soon as one is gone).
any_alive() {
    local p
    for p in "$@"; do
        kill -0 "$p" 2>/dev/null && return 0
    done
    return 1
}

[[ $PORT_BASE =~ ^[0-9]+$ ]] || die "PORT_BASE must be a number"
IMAPS_PORT=${IMAPS_PORT:-$((PORT_BASE + 993))}
IMAP_PORT=${IMAP_PORT:-$((PORT_BASE + 143))}
SMTPS_PORT=${SMTPS_PORT:-$((PORT_BASE + 465))}
SMTP_PORT=${SMTP_PORT:-$((PORT_BASE + 587))}
WEB_PORT=${WEB_PORT:-$((PORT_BASE + 443))}
DOVECOT_IMAP_PORT=${DOVECOT_IMAP_PORT:-$((PORT_BASE + 1143))}
DOVECOT_SUBMISSION_PORT=${DOVECOT_SUBMISSION_PORT:-$((PORT_BASE + 1587))}
DELIVERY_PORT=${DELIVERY_PORT:-$((PORT_BASE + 1025))}
PORT_VARS=(IMAPS_PORT IMAP_PORT SMTPS_PORT SMTP_PORT WEB_PORT DOVECOT_IMAP_PORT DOVECOT_SUBMISSION_PORT DELIVERY_PORT)

# --- checks ------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "run as root (sudo bash scripts/try.sh): Dovecot switches to its unprivileged users"
[[ $DIR == /* ]] || DIR=$PWD/$DIR
[[ $DIR != *[\"\\[:space:]]* ]] || die "TRY_DIR must not contain quotes, backslashes or spaces: $DIR"
[[ $DIR != / ]] || die "TRY_DIR must not be /"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -A seen=()
for v in "${PORT_VARS[@]}"; do
    p=${!v}
    [[ $p =~ ^[0-9]+$ ]] && ((p >= 1 && p <= 65535)) || die "$v=$p is not a port number"
    [[ -z ${seen[$p]:-} ]] || die "$v and ${seen[$p]} are both $p"
    seen[$p]=$v
    ! port_in_use "$p" ||
        die "127.0.0.1:$p ($v) is in use (by an earlier try still running?); stop that, or choose other ports with PORT_BASE=… or $v=…"
done

cat <<EOF
mailgate try: a private Dovecot and mailgate in front of it, on 127.0.0.1, until Ctrl-C.
EOF
if [[ -z ${MAILGATE_BIN:-} ]]; then
    say "the first build (cargo build --release) takes several minutes, up to 15 on two cores; later runs take seconds"
fi

# --- Dovecot from Debian, if missing -------------------------------------------
need=()
[[ -x /usr/sbin/dovecot && -x /usr/lib/dovecot/imap ]] || need+=(dovecot-imapd)
[[ -x /usr/lib/dovecot/submission ]] || need+=(dovecot-submissiond)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
    [[ -z ${NO_INSTALL:-} ]] || die "missing: ${need[*]} (NO_INSTALL is set)"
    command -v apt-get >/dev/null || die "missing: ${need[*]}; install them (Debian package names) and run again"
    say "installing from Debian: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The package may have started the system Dovecot (ports 143, 993). This try
    # runs its own; leave the system one installed but stopped, as it was not running.
    if [[ " ${need[*]} " == *" dovecot-imapd "* ]]; then
        if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
            systemctl disable --now dovecot.service >/dev/null 2>&1 || true
        else
            service dovecot stop >/dev/null 2>&1 || true
            update-rc.d dovecot disable >/dev/null 2>&1 || true
        fi
        say "the system Dovecot service that came with the package is stopped and disabled"
    fi
fi

# --- mailgate ----------------------------------------------------------------
if [[ -n ${MAILGATE_BIN:-} ]]; then
    [[ -f $MAILGATE_BIN && -x $MAILGATE_BIN ]] || die "MAILGATE_BIN=$MAILGATE_BIN is not an executable file"
    BIN=$(readlink -f "$MAILGATE_BIN")
else
    command -v cargo >/dev/null ||
        die "cargo not found (sudo may have left it out of PATH): build as yourself with \`cargo build --release\`, then run \`sudo MAILGATE_BIN=target/release/mailgate bash scripts/try.sh\` (Rust: https://rustup.rs)"
    say "building: cargo build --release (in $REPO)"
    (cd "$REPO" && cargo build --release --bin mailgate) || die "the build failed"
    BIN=$REPO/target/release/mailgate
fi

# --- a fresh directory -----------------------------------------------------------
MARKER=.mailgate-try
if [[ -e $DIR ]]; then
    [[ -d $DIR ]] || die "$DIR exists and is not a directory"
    if [[ -e $DIR/$MARKER ]]; then
        master_pid=$(cat "$DIR/dovecot/run/master.pid" 2>/dev/null || true)
        if [[ -n $master_pid ]] && kill -0 "$master_pid" 2>/dev/null &&
            grep -qF "$DIR/" "/proc/$master_pid/cmdline" 2>/dev/null; then
            die "a Dovecot of an earlier try in $DIR still runs (PID $master_pid); stop that try first"
        fi
        rm -rf "$DIR"
    elif [[ -n $(ls -A "$DIR") ]]; then
        die "$DIR exists and was not made by this script; choose another TRY_DIR"
    fi
fi
mkdir -p "$DIR"
chmod 0755 "$DIR"
touch "$DIR/$MARKER"
CONF=$DIR/mailgate.toml
SECRET=$DIR/upstream-master.secret

cat >"$CONF" <<EOF
# Written by scripts/try.sh for one try; the ports are the ones that run used.
[server]
hostname = "localhost"
public_url = "https://localhost:$WEB_PORT"
data_dir = "$DIR/data"

[tls]
cert = "$DIR/certs/cert.pem"
key = "$DIR/certs/key.pem"

[imap]
listen_tls = ["127.0.0.1:$IMAPS_PORT"]
listen_starttls = ["127.0.0.1:$IMAP_PORT"]

[smtp]
listen_tls = ["127.0.0.1:$SMTPS_PORT"]
listen_starttls = ["127.0.0.1:$SMTP_PORT"]

[web]
listen = ["127.0.0.1:$WEB_PORT"]

# The private Dovecot of tools/dev-dovecot.sh; mailgate logs in there as the user
# with the master user "mailgate" (Dovecot's own user passwords are never used).
[upstream.imap]
address = "127.0.0.1:$DOVECOT_IMAP_PORT"
tls = "none"
login = "master-sasl"
master_user = "mailgate"
master_password_file = "$SECRET"

[upstream.smtp]
address = "127.0.0.1:$DOVECOT_SUBMISSION_PORT"
tls = "none"
login = "master-sasl"
master_user = "mailgate"
master_password_file = "$SECRET"
EOF

mg() { "$BIN" --config "$CONF" "$@"; }
SETUP_LOG=$DIR/setup.log
run_logged() {
    printf '$ mailgate %s\n' "$*" >>"$SETUP_LOG"
    if ! out=$(mg "$@" 2>&1 <"${STDIN_FILE:-/dev/null}"); then
        printf '%s\n' "$out" >>"$SETUP_LOG"
        die "mailgate $* failed: $out"
    fi
    printf '%s\n' "$out" >>"$SETUP_LOG"
}

if [[ -n ${ACCOUNT_PASSWORD:-} ]]; then
    ACCOUNT_PW=$ACCOUNT_PASSWORD
else
    ACCOUNT_PW=$(head -c 64 /dev/urandom | base32 -w0 | tr -d '=' | tr 'A-Z' 'a-z' | cut -c1-16 |
        sed 's/..../&-/g; s/-$//')
fi
run_logged init
STDIN_FILE=$DIR/.pw
(umask 077 && printf '%s\n' "$ACCOUNT_PW" >"$STDIN_FILE")
run_logged user add "$USER_EMAIL" --password-stdin
rm -f "$STDIN_FILE"
unset STDIN_FILE
run_logged app-password create "$USER_EMAIL" --label "Thunderbird (scripts/try.sh)"
APP_PW=$(printf '%s\n' "$out" | tail -n1)

# --- start --------------------------------------------------------------------
DOVECOT_WRAPPER_PID=
MAILGATE_PID=
stop_all() {
    trap - INT TERM EXIT
    local pids=()
    [[ -n $MAILGATE_PID ]] && pids+=("$MAILGATE_PID")
    [[ -n $DOVECOT_WRAPPER_PID ]] && pids+=("$DOVECOT_WRAPPER_PID")
    if ((${#pids[@]})); then
        echo
        say "stopping mailgate and Dovecot"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do
            any_alive "${pids[@]}" || break
            sleep 0.1
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    # Should tools/dev-dovecot.sh have been killed before it could stop Dovecot.
    local master
    master=$(cat "$DIR/dovecot/run/master.pid" 2>/dev/null || true)
    if [[ -n $master ]] && kill -0 "$master" 2>/dev/null && grep -qF "$DIR/" "/proc/$master/cmdline" 2>/dev/null; then
        kill -TERM "$master" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$master" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if ((${#pids[@]})); then
        say "stopped; what this run made stays in $DIR until the next run"
    fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

# Waits until 127.0.0.1:PORT accepts, while PID lives; else shows LOG and fails.
wait_port() {
    local port=$1 pid=$2 what=$3 log=$4
    for _ in $(seq 300); do
        port_in_use "$port" && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 30 "$log" >&2 || true
    die "$what did not start listening on 127.0.0.1:$port (log: $log)"
}

# Each in its own session: Ctrl-C reaches only this script, which stops them in order.
PORT=$DOVECOT_IMAP_PORT SUBMISSION_PORT=$DOVECOT_SUBMISSION_PORT DELIVERY_PORT=$DELIVERY_PORT \
    MASTER_SECRET_FILE=$SECRET TLS_CERT='' TLS_KEY='' \
    setsid bash "$REPO/tools/dev-dovecot.sh" "$DIR/dovecot" >"$DIR/dovecot.out" 2>&1 </dev/null &
DOVECOT_WRAPPER_PID=$!
for p in "$DOVECOT_IMAP_PORT" "$DOVECOT_SUBMISSION_PORT" "$DELIVERY_PORT"; do
    wait_port "$p" "$DOVECOT_WRAPPER_PID" "Dovecot (tools/dev-dovecot.sh)" "$DIR/dovecot.out"
done

NO_COLOR=1 setsid "$BIN" --config "$CONF" serve >"$DIR/mailgate.log" 2>&1 </dev/null &
MAILGATE_PID=$!
for p in "$IMAPS_PORT" "$IMAP_PORT" "$SMTPS_PORT" "$SMTP_PORT" "$WEB_PORT"; do
    wait_port "$p" "$MAILGATE_PID" "mailgate" "$DIR/mailgate.log"
done

# --- what to type ------------------------------------------------------------
cat <<EOF

Ready. mailgate runs in front of a private Dovecot; mail sent to any address is
delivered locally (try alice@example.com itself), nothing leaves this machine.

Thunderbird: add a mail account (Account Settings > Account Actions > Add Mail
Account), enter the e-mail address and the password below, then "Configure manually":
  Email address    $USER_EMAIL
  Password         $APP_PW   (the app password; spaces optional)
  Incoming server  IMAP   hostname localhost   port $IMAPS_PORT   SSL/TLS   Normal password
  Outgoing server  SMTP   hostname localhost   port $SMTPS_PORT   SSL/TLS   Normal password
  Username         $USER_EMAIL (incoming and outgoing)
  Also offered: IMAP on port $IMAP_PORT and SMTP on port $SMTP_PORT, both with STARTTLS.
  The certificate is self-signed: confirm the security exception Thunderbird offers,
  once for each port (SHA-256 fingerprint:
  $(openssl x509 -in "$DIR/certs/cert.pem" -noout -fingerprint -sha256 2>/dev/null | sed 's/^.*=//' || echo "see $DIR/certs/cert.pem")).

Web step: https://localhost:$WEB_PORT/ (the same self-signed certificate)
  Sign in as       $USER_EMAIL
  Account password $ACCOUNT_PW
  There you can turn on two-step verification (TOTP) and make app passwords.

Which password is for what:
  app password      mail apps (IMAP, SMTP); one per device
  account password  the web step; mail apps too, until two-step verification is on
  Dovecot's own passwords are not used: mailgate logs in to Dovecot as its master user.

Files: $DIR (config mailgate.toml, logs mailgate.log and dovecot/dovecot.log,
  mail dovecot/home/$USER_EMAIL/Maildir)
Admin commands: $BIN --config $CONF app-password list $USER_EMAIL

Press Ctrl-C to stop everything.
EOF

# Returns on Ctrl-C/SIGTERM (the traps stop everything), or when one of them ends.
wait -n "$MAILGATE_PID" "$DOVECOT_WRAPPER_PID" || true
if kill -0 "$MAILGATE_PID" 2>/dev/null; then
    tail -n 20 "$DIR/dovecot.out" >&2 || true
    die "Dovecot stopped (log: $DIR/dovecot/dovecot.log); stopping mailgate"
else
    tail -n 20 "$DIR/mailgate.log" >&2 || true
    die "mailgate stopped (log: $DIR/mailgate.log); stopping Dovecot"
fi
