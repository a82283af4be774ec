#!/usr/bin/env bash
# Run a throw-away Dovecot for mailgate development, in the foreground, on loopback
# only: IMAP and submission (SMTP), with local delivery so that sent mail can be read
# back. The same setup as tests/support/dovecot.rs and tests/support/submission.rs, in
# one instance. scripts/try.sh runs it; it can also be run on its own.
#
#   sudo tools/dev-dovecot.sh [DIR]          # DIR defaults to /tmp/mailgate-dev-dovecot
#
# Environment:
#   PORT=1143                 plain IMAP port (STARTTLS too when TLS is enabled)
#   SUBMISSION_PORT=1587      plain submission port (STARTTLS too when TLS is enabled)
#   DELIVERY_PORT=1025        local delivery (tools/dev-deliver.py), the submission
#                             service's relay host
#   TLS_CERT=… TLS_KEY=…      PEM cert chain + key: enables ssl and imaps on TLS_PORT
#   TLS_PORT=1993
#   DOVECOT=/usr/sbin/dovecot DOVECOT_LIBEXEC=/usr/lib/dovecot
#   MASTER_SECRET_FILE=<repo>/config/upstream-master.secret
#
# Users: alice@example.com with the Dovecot password alice-password, for logging in to
# this Dovecot directly. Through mailgate that password does not work: mailgate checks
# its own account and app passwords and logs in here as the master user "mailgate",
# whose password is the content of MASTER_SECRET_FILE (created with a random value,
# mode 0600, if missing; `mailgate init` makes the same file). Log in as alice through
# the master user with
#   a AUTHENTICATE PLAIN base64("alice@example.com\0mailgate\0<secret>")   or
#   a LOGIN "alice@example.com*mailgate" "<secret>"
# Sent mail: submission relays every message to tools/dev-deliver.py, which hands it
# to dovecot-lda: each recipient, of any domain, gets it in DIR/home/<address>/Maildir
# (nothing leaves the machine).
# Mail and the log are kept in DIR between runs. Stop with Ctrl-C (or SIGTERM).
# Uses nothing from /etc/dovecot and does not touch the system Dovecot.
set -euo pipefail

DIR=${1:-/tmp/mailgate-dev-dovecot}
PORT=${PORT:-1143}
SUBMISSION_PORT=${SUBMISSION_PORT:-1587}
DELIVERY_PORT=${DELIVERY_PORT:-1025}
TLS_PORT=${TLS_PORT:-1993}
DOVECOT=${DOVECOT:-/usr/sbin/dovecot}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECRET=${MASTER_SECRET_FILE:-$REPO/config/upstream-master.secret}
MAIL_USER=nobody
MAIL_GROUP=nogroup
getent group "$MAIL_GROUP" >/dev/null || MAIL_GROUP=nobody

say() { printf 'dev-dovecot: %s\n' "$*"; }
die() { printf 'dev-dovecot: error: %s\n' "$*" >&2; exit 1; }
# Whether any of the PIDs still runs (`kill -0 A B` fails as soon as one is gone).
any_alive() {
    local p
    for p in "$@"; do
        kill -0 "$p" 2>/dev/null && return 0
    done
    return 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (Dovecot drops privileges to $MAIL_USER/dovecot/dovenull)"
[[ -x $DOVECOT ]] || die "$DOVECOT not found (apt-get install dovecot-imapd dovecot-submissiond, or set DOVECOT=)"
LIBEXEC=${DOVECOT_LIBEXEC:-/usr/lib/dovecot}
[[ -x $LIBEXEC/submission ]] || die "$LIBEXEC/submission not found (apt-get install dovecot-submissiond)"
[[ -x $LIBEXEC/dovecot-lda ]] || die "$LIBEXEC/dovecot-lda not found (apt-get install dovecot-core)"
command -v python3 >/dev/null || die "python3 not found (it runs the local delivery, tools/dev-deliver.py)"
for v in PORT SUBMISSION_PORT DELIVERY_PORT TLS_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number"
done
if [[ -n ${TLS_CERT:-} || -n ${TLS_KEY:-} ]]; then
    [[ -r ${TLS_CERT:-} && -r ${TLS_KEY:-} ]] || die "TLS_CERT and TLS_KEY must both be readable files"
    TLS=1
else
    TLS=0
fi

# --- master password ---------------------------------------------------------
if [[ ! -s $SECRET ]]; then
    mkdir -p "$(dirname "$SECRET")"
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '+/=\n' >"$SECRET")
    say "created $SECRET (random master password, mode 0600)"
fi
chmod 600 "$SECRET"
MASTER_PW=$(head -n1 "$SECRET" | tr -d '\r')
[[ -n $MASTER_PW ]] || die "$SECRET is empty"

# passwd-file entry; {PLAIN.b64} when the password would break the ':' format
passwd_entry() {
    local pw=$2
    if [[ $pw == *:* || $pw =~ ^[[:space:]] || $pw =~ [[:space:]]$ ]]; then
        printf '%s:{PLAIN.b64}%s\n' "$1" "$(printf '%s' "$pw" | base64 -w0)"
    else
        printf '%s:{PLAIN}%s\n' "$1" "$pw"
    fi
}

# --- directory layout --------------------------------------------------------
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
mkdir -p "$DIR/run" "$DIR/state" "$DIR/home"
# Unprivileged Dovecot processes must traverse DIR; mail is written as nobody.
chmod 0755 "$DIR"
chown "$MAIL_USER:$MAIL_GROUP" "$DIR/home"
p=$DIR
while [[ $p != / ]]; do
    p=$(dirname "$p")
    [[ $(( 0$(stat -c %a "$p") & 1 )) -ne 0 ]] ||
        die "$p is not world-traversable (o+x); $MAIL_USER could not reach $DIR/home"
done

passwd_entry alice@example.com alice-password >"$DIR/users"
passwd_entry mailgate "$MASTER_PW" >"$DIR/master-users"
if getent group dovecot >/dev/null; then
    chown root:dovecot "$DIR/users" "$DIR/master-users"
    chmod 0640 "$DIR/users" "$DIR/master-users"
else
    chmod 0644 "$DIR/users" "$DIR/master-users"
fi

if [[ $TLS -eq 1 ]]; then
    mkdir -p "$DIR/tls" && chmod 0700 "$DIR/tls"
    cp "$TLS_CERT" "$DIR/tls/cert.pem"
    cp "$TLS_KEY" "$DIR/tls/key.pem" && chmod 0600 "$DIR/tls/key.pem"
    IMAPS_PORT=$TLS_PORT
    SSL_CONF="ssl = yes
ssl_cert = <$DIR/tls/cert.pem
ssl_key = <$DIR/tls/key.pem"
else
    IMAPS_PORT=0
    SSL_CONF="ssl = no"
fi

cat >"$DIR/dovecot.conf" <<EOF
# Generated by tools/dev-dovecot.sh -- development instance, not for production.
base_dir = $DIR/run
state_dir = $DIR/state
instance_name = mailgate-dev-$PORT
listen = 127.0.0.1
protocols = imap submission
hostname = dev-dovecot.mailgate.test

log_path = $DIR/dovecot.log
info_log_path = $DIR/dovecot.log
debug_log_path = $DIR/dovecot.log
auth_verbose = yes
verbose_proctitle = yes

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_master_user_separator = *
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0

passdb {
  driver = passwd-file
  master = yes
  pass = yes
  args = $DIR/master-users
}
passdb {
  driver = passwd-file
  args = $DIR/users
}
userdb {
  driver = static
  args = uid=$MAIL_USER gid=$MAIL_GROUP home=$DIR/home/%u allow_all_users=yes
}

mail_location = maildir:~/Maildir
protocol imap {
  mail_max_userip_connections = 1000
}

# Submission relays everything it accepts to tools/dev-deliver.py, which runs
# dovecot-lda with this file for each recipient.
submission_relay_host = 127.0.0.1
submission_relay_port = $DELIVERY_PORT
submission_relay_ssl = no
submission_relay_trusted = no
postmaster_address = postmaster@example.com
lda_mailbox_autocreate = yes

service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $PORT
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $IMAPS_PORT
  }
}
service submission-login {
  inet_listener submission {
    address = 127.0.0.1
    port = $SUBMISSION_PORT
  }
}
# No IP-based auth penalty (auth skips it when this socket is not found).
service anvil {
  unix_listener anvil-auth-penalty {
    path = anvil-auth-penalty-disabled
  }
}
$SSL_CONF
EOF

"$DOVECOT" -n -c "$DIR/dovecot.conf" >/dev/null || die "config check failed: $DIR/dovecot.conf"

say "dir:         $DIR (config dovecot.conf, log dovecot.log, mail home/<address>/Maildir)"
say "imap:        127.0.0.1:$PORT$([[ $TLS -eq 1 ]] && echo ' (STARTTLS available)')"
[[ $TLS -eq 1 ]] && say "imaps:       127.0.0.1:$TLS_PORT"
say "submission:  127.0.0.1:$SUBMISSION_PORT$([[ $TLS -eq 1 ]] && echo ' (STARTTLS available)'), relaying to the local delivery on 127.0.0.1:$DELIVERY_PORT"
say "user:        alice@example.com, Dovecot password alice-password: for logging in to this Dovecot"
say "             directly; it does not work through mailgate (mailgate checks its own passwords)"
say "master user: mailgate / password in $SECRET (mailgate logs in as the user with it)"
say "try:         a LOGIN \"alice@example.com*mailgate\" \"\$(cat $SECRET)\""
say "mailgate:    its configuration for this Dovecot (scripts/try.sh writes a whole one):"
cat <<EOF
    [upstream.imap]
    address = "127.0.0.1:$PORT"
    master_password_file = "$SECRET"
    [upstream.smtp]
    address = "127.0.0.1:$SUBMISSION_PORT"
    master_password_file = "$SECRET"
EOF

# --- run ---------------------------------------------------------------------
# Dovecot and the local delivery run as children; on SIGTERM, SIGINT, or when
# either ends, both are stopped and waited for (by PID).
DELIVER_PID=
DOVECOT_PID=
stop() {
    trap - TERM INT EXIT
    local pids=()
    [[ -n $DOVECOT_PID ]] && pids+=("$DOVECOT_PID")
    [[ -n $DELIVER_PID ]] && pids+=("$DELIVER_PID")
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        any_alive "${pids[@]}" || break
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    say "stopped"
}
trap 'stop; exit 0' TERM INT
trap stop EXIT

python3 "$REPO/tools/dev-deliver.py" --port "$DELIVERY_PORT" --config "$DIR/dovecot.conf" \
    --lda "$LIBEXEC/dovecot-lda" &
DELIVER_PID=$!
say "starting $DOVECOT -F -c $DIR/dovecot.conf (Ctrl-C to stop; log: tail -f $DIR/dovecot.log)"
"$DOVECOT" -F -c "$DIR/dovecot.conf" &
DOVECOT_PID=$!
# Returns when either child ends (or a trapped signal arrives).
wait -n "$DOVECOT_PID" "$DELIVER_PID" || true
say "error: $(kill -0 "$DOVECOT_PID" 2>/dev/null && echo "the local delivery" || echo "dovecot") ended; stopping (log: $DIR/dovecot.log)" >&2
exit 1
