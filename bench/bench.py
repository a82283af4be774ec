#!/usr/bin/python3
"""mailgate benchmark: mailgate and its peers side by side, in one run, on loopback.

Started by bench/run (which installs the Debian packages and builds mailgate). Everything
runs from a private temporary directory with its own configuration files; the daemons run
in the foreground as children of this process and are stopped by PID (and their process
group) at the end, also on errors and Ctrl-C. See docs/performance.md.
"""

import argparse
import base64
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients  # noqa: E402

try:
    import argon2  # noqa: E402
except ImportError:  # --floor-only needs no password hashes (bench/run installs python3-argon2)
    argon2 = None

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
# "mailgate_old": a second mailgate binary in the same run (--mailgate-old, MAILGATE_BIN_OLD),
# so that a change is compared with what it replaces under the same conditions.
PEERS = ["mailgate", "mailgate_old", "nginx", "haproxy", "dovecot_proxy", "dovecot"]
PROXIES = ["mailgate", "mailgate_old", "nginx", "haproxy", "dovecot_proxy"]
# SMTP submission: the proxies with an SMTP side, in front of the backend's Dovecot submission.
SMTP_PEERS = ["mailgate", "mailgate_old", "nginx", "haproxy"]
# POP3: in front of the backend's Dovecot pop3, and the backend's own pop3s (nginx mail and the
# Dovecot proxy have no POP3 side here).
POP3_PEERS = ["mailgate", "mailgate_old", "haproxy", "dovecot"]
DOMAIN = "bench.test"
N_LOGIN_USERS = 16
N_IDLE_USERS = 20
N_SMTP_USERS = 16  # the SMTP clients log in as the first 16 idle users ({PLAIN} passwords)
IDLE_MSGS = 20  # 20 x ~52 KB = ~1.05 MB per session for the "after 1 MB" variant
MASTER = "proxymaster"
# The TLS 1.3 suite the clients offer by default (--suite), so that every peer relays with the
# same cipher whatever its own preference: what the OpenSSL peers and mailgate pick today with
# OpenSSL's default client offer (docs/performance.md "Cipher suites").
SUITE = "TLS_AES_256_GCM_SHA384"
# --no-avx512: OPENSSL_ia32cap for every process (aws-lc in mailgate, OpenSSL in the peers and
# the Python clients). The part after ':' is ANDed, inverted ('~'), with CPUID leaf 7 (EBX in
# bits 0-31, ECX in bits 32-63): it clears AVX512F/DQ/IFMA/PF/ER/CD/BW/VL (EBX 0xDC230000) and
# AVX512VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ (ECX 0x5842), and keeps AES-NI, AVX2, VAES and
# VPCLMULQDQ: a host like the AMD EPYC of issue 21 (AVX2 + VAES, no AVX-512). aws-lc takes its
# AVX-512 AES-GCM code only with VAES, VPCLMULQDQ and AVX512F/DQ/BW/VL. Never set the variable
# to an empty string: aws-lc then takes it as a CPUID value of 0 and falls back to AES without
# AES-NI (~20x slower).
NO_AVX512_MASK = ":~0x5842DC230000"
CPU_FLAGS = ["aes", "vaes", "vpclmulqdq", "avx2", "avx512f"]
ARGON2 = argon2 and argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16)

# ----------------------------------------------------------------------------- helpers


def is_mg(peer):
    """A mailgate instance (the binary under test or the old one)."""
    return peer.startswith("mailgate")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rand_pw(n=20):
    return "".join(random.SystemRandom().choice(string.ascii_letters + string.digits) for _ in range(n))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


CLK = os.sysconf("SC_CLK_TCK")


def _proc_stats():
    """pid -> (ppid, pgrp, cpu ticks incl. reaped children) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        # fields from 3 (state): ppid=4 pgrp=5 utime=14 stime=15 cutime=16 cstime=17
        out[int(d)] = (int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]))
    return out


def tree(root, stats=None):
    stats = stats or _proc_stats()
    kids = {}
    for pid, (ppid, _, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in stats:
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def cpu_secs(roots):
    """user+sys seconds of the process trees under `roots` (reaped children included)."""
    stats = _proc_stats()
    total = 0
    for r in roots:
        for p in tree(r, stats):
            total += stats[p][2]
    return total / CLK


def pss_kib(roots):
    stats = _proc_stats()
    total, nproc = 0, 0
    for r in roots:
        for p in tree(r, stats):
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1])
                            nproc += 1
                            break
            except OSError:
                pass
    return total, nproc


def cpu_idle_sample(secs):
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])

    i0, t0 = read()
    time.sleep(secs)
    i1, t1 = read()
    return 100.0 * (i1 - i0) / max(1, t1 - t0)


def own_and_busy():
    """(CPU seconds of this bench's own process tree incl. reaped children -- clients and servers
    --, busy CPU seconds of the whole machine (user+nice+system), wall time)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return cpu_secs([os.getpid()]), (v[0] + v[1] + v[2]) / CLK, time.time()


def quiet_wait(min_idle=90.0, timeout=30.0):
    """Waits until the CPUs are >= min_idle % idle over 0.5 s (or timeout); returns the idle %."""
    deadline = time.time() + timeout
    while True:
        idle = cpu_idle_sample(0.5)
        if idle >= min_idle or time.time() >= deadline:
            return round(idle, 1)


# ----------------------------------------------------------------------------- processes


class Daemon:
    def __init__(self, name, cmd, cwd, logfile, env=None):
        self.name = name
        self.log = open(logfile, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self.pid = self.proc.pid
        self.logfile = logfile

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in its process group (by group id = its PID), then check.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [p for p, (_, g, _) in _proc_stats().items() if g == self.pid]
            if not left:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(1.0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        left = [p for p, (_, g, _) in _proc_stats().items() if g == self.pid]
        self.log.close()
        return left


GREETING = {"imap": b"* OK", "smtp": b"220", "pop3": b"+OK"}


def wait_greeting(port, tls_ctx=None, timeout=30.0, name="", proto="imap"):
    """Waits for a server's greeting (GREETING[proto]), over implicit TLS when tls_ctx is given."""
    want = GREETING[proto]
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if tls_ctx:
                c = clients.TlsConn(tls_ctx, port, timeout=5)
                data = c.readline()
                c.close()
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    data = sock.recv(1024)
            if not data.startswith(want):
                raise RuntimeError(f"greeting {data[:80]!r}")
            return
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
            time.sleep(0.2)
    raise RuntimeError(f"{name} on port {port} did not greet {want!r} within {timeout}s: {last}")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout[-800:]} {r.stderr[-800:]}")
    return r.stdout


# ----------------------------------------------------------------------------- setup


def make_messages(n, seed=7):
    rnd = random.Random(seed)
    msgs = []
    for i in range(n):
        payload = base64.encodebytes(rnd.randbytes(37500)).replace(b"\n", b"\r\n")
        text = (f"Message {i} of the mailgate benchmark mailbox.\r\n" * 12).encode()
        m = (
            f"From: Bench Sender <sender@{DOMAIN}>\r\nTo: <bulk@{DOMAIN}>\r\n"
            f"Subject: bench message {i}\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bench-{i}@{DOMAIN}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode() + text + (
            b"\r\n--b1\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
        ) + payload + b"\r\n--b1--\r\n"
        msgs.append(m)
    return msgs


def write_maildir(home, messages, uid, gid):
    md = os.path.join(home, "Maildir")
    for d in (home, md, md + "/cur", md + "/new", md + "/tmp"):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o700)
        os.chown(d, uid, gid)
    t = int(time.time())
    for i, m in enumerate(messages):
        p = f"{md}/cur/{t}.M{i}P{os.getpid()}.bench,S={len(m)}:2,S"
        with open(p, "wb") as f:
            f.write(m)
        os.chown(p, uid, gid)


def login_service(proto, listeners):
    """A Dovecot `proto`-login service in high-performance mode (long-lived login processes, one
    per CPU, each serving many clients) with `listeners`: (name, port or 0 for none, ssl)."""
    inet = ""
    for name, port, ssl in listeners:
        tls = "    ssl = yes\n" if ssl else ""
        inet += f"  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n{tls}  }}\n"
    return f"""service {proto}-login {{
{inet}  service_count = 0
  process_min_avail = 2
  process_limit = 2
  client_limit = 15000
}}
"""


class Setup:
    """Users, passwords, mailboxes, certificates and the five servers."""

    def __init__(self, args, work):
        self.args = args
        self.w = work
        self.daemons = {}
        self.ports = {}
        self.versions = {}
        self.specs = {}
        self.mg = {}  # mailgate instance name -> {dir, bin, conf}
        self.apps = {}  # mailgate instance name -> user -> [app passwords]
        self.tokens = {}  # mailgate instance name -> [(user, OAuth access token, "xoauth2")]
        self.readonly = {}  # mailgate instance name -> a read-only (`--scope imap:read`) password of the bulk user

    # --- accounts
    def make_users(self):
        self.master_pw = rand_pw(24)
        self.argon_users = []  # (user, password, phc)
        for i in range(N_LOGIN_USERS):
            u, p = f"a{i + 1:02d}@{DOMAIN}", rand_pw()
            self.argon_users.append((u, p, ARGON2.hash(p)))
        self.idle_users = [(f"i{i + 1:02d}@{DOMAIN}", rand_pw()) for i in range(N_IDLE_USERS)]
        self.bulk = (f"bulk@{DOMAIN}", rand_pw())
        self.pop3 = (f"pop3@{DOMAIN}", rand_pw())  # the POP3 mailbox (POP3 has no folders)
        self.cost_users = [(f"one@{DOMAIN}", rand_pw()), (f"fifty@{DOMAIN}", rand_pw())]

    def plain_users(self):
        """The users with {PLAIN} passwords at the peers: (user, password)."""
        return self.idle_users + [self.bulk, self.pop3] + self.cost_users

    def passwd_lines(self, proxy_port=None):
        lines = []
        extra = ""

        def ex(u):
            if proxy_port is None:
                return ""
            return f"::::::proxy=y host=127.0.0.1 port={proxy_port} destuser={u}*{MASTER} pass={self.master_pw}"

        for u, _, phc in self.argon_users:
            lines.append(f"{u}:{{ARGON2ID}}{phc}{ex(u)}")
        for u, p in self.plain_users():
            lines.append(f"{u}:{{PLAIN}}{p}{ex(u)}")
        del extra
        return "\n".join(lines) + "\n"

    # --- TLS
    def make_cert(self):
        d = os.path.join(self.w, "tls")
        os.makedirs(d)
        self.cert, self.key = f"{d}/cert.pem", f"{d}/key.pem"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "3", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        os.chmod(self.key, 0o600)
        self.combined = f"{d}/combined.pem"
        with open(self.combined, "w") as f:
            f.write(open(self.cert).read() + open(self.key).read())
        os.chmod(self.combined, 0o600)
        self.ctx = clients.tls_context(self.cert)

    # --- Dovecot backend (also the "dovecot" peer: its implicit-TLS listener)
    def dovecot_head(self, d, name, protocols="imap"):
        """The settings both Dovecot instances (backend and proxy) start with."""
        return f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = {name}
listen = 127.0.0.1
protocols = {protocols}
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot-info.log
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
"""

    def start_backend(self, messages):
        d = os.path.join(self.w, "dovecot")
        os.makedirs(d + "/run")
        os.makedirs(d + "/state")
        os.makedirs(d + "/home")
        import pwd
        import grp
        uid = pwd.getpwnam("nobody").pw_uid
        try:
            gid = grp.getgrnam("nogroup").gr_gid
            gname = "nogroup"
        except KeyError:
            gid, gname = pwd.getpwnam("nobody").pw_gid, "nobody"
        os.chmod(d, 0o755)
        os.chown(d + "/home", uid, gid)
        with open(d + "/users", "w") as f:
            f.write(self.passwd_lines())
        with open(d + "/master-users", "w") as f:
            f.write(f"mailgate:{{PLAIN}}{self.master_pw}\n{MASTER}:{{PLAIN}}{self.master_pw}\n")
        for p in ("users", "master-users"):
            os.chmod(f"{d}/{p}", 0o644)
        log("writing the mailboxes (bulk: %d messages, %.1f MB; POP3: %d of them)" % (
            len(messages), sum(map(len, messages)) / 1e6, self.args.pop3_messages))
        write_maildir(f"{d}/home/{self.bulk[0]}", messages, uid, gid)
        write_maildir(f"{d}/home/{self.pop3[0]}", messages[:self.args.pop3_messages], uid, gid)
        for u, _ in self.idle_users:
            write_maildir(f"{d}/home/{u}", messages[:IDLE_MSGS], uid, gid)
        plain, tls = free_port(), free_port()
        self.ports["backend_plain"], self.ports["dovecot"] = plain, tls
        pop3, pop3s = free_port(), free_port()
        self.ports["backend_pop3"], self.ports["dovecot_pop3"] = pop3, pop3s
        # SMTP: Dovecot submission (plain, behind the proxies) relays to a sink that keeps nothing.
        sub, sink = free_port(), free_port()
        self.ports["backend_submission"], self.ports["smtp_sink"] = sub, sink
        self.daemons["smtp_sink"] = Daemon("smtp_sink", [sys.executable, os.path.join(BENCH_DIR, "smtp_sink.py"),
                                                         str(sink)], d, d + "/smtp_sink.log")
        wait_greeting(sink, None, name="smtp_sink", proto="smtp")
        # --dovecot-imap-reuse: imap processes serve one session after another instead of one
        # process per session (all mailboxes belong to one uid here), a much cheaper backend login.
        imap_reuse = "  service_count = 0\n  process_min_avail = 16\n" if self.args.dovecot_imap_reuse else ""
        conf = f"""# mailgate bench backend (generated)
{self.dovecot_head(d, f"mgbench-backend-{plain}", "imap submission pop3")}auth_master_user_separator = *
login_trusted_networks = 127.0.0.0/8
auth_failure_delay = 0
mail_fsync = never
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = {d}/master-users
}}
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid={gname} home={d}/home/%u allow_all_users=yes
}}
mail_location = maildir:~/Maildir
protocol imap {{
  mail_max_userip_connections = 100000
}}
protocol pop3 {{
  mail_max_userip_connections = 100000
}}
hostname = backend.{DOMAIN}
submission_relay_host = 127.0.0.1
submission_relay_port = {sink}
submission_relay_ssl = no
submission_relay_trusted = no
{login_service("submission", [("submission", sub, False)])}default_process_limit = 6000
default_client_limit = 30000
default_vsz_limit = 2G
{login_service("imap", [("imap", plain, False), ("imaps", tls, True)])}service imap {{
  process_limit = 6000
  client_limit = 1
{imap_reuse}}}
{login_service("pop3", [("pop3", pop3, False), ("pop3s", pop3s, True)])}service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
"""
        with open(d + "/dovecot.conf", "w") as f:
            f.write(conf)
        run(["dovecot", "-n", "-c", d + "/dovecot.conf"])
        self.launch("backend", ["dovecot", "-F", "-c", d + "/dovecot.conf"], d, d + "/stdout.log",
                    [(plain, "imap", False), (tls, "imap", True), (sub, "smtp", False), (pop3, "pop3", False),
                     (pop3s, "pop3", True)])

    def start_dovecot_proxy(self):
        d = os.path.join(self.w, "dovecot-proxy")
        for s in ("run", "state"):
            os.makedirs(f"{d}/{s}")
        os.chmod(d, 0o755)
        with open(d + "/users", "w") as f:
            f.write(self.passwd_lines(proxy_port=self.ports["backend_plain"]))
        os.chmod(d + "/users", 0o644)
        port = free_port()
        self.ports["dovecot_proxy"] = port
        conf = f"""# mailgate bench: Dovecot in proxy mode (generated)
{self.dovecot_head(d, f"mgbench-proxy-{port}")}auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent allow_all_users=yes
}}
default_process_limit = 6000
default_client_limit = 30000
default_vsz_limit = 2G
{login_service("imap", [("imap", 0, False), ("imaps", port, True)])}service anvil {{
  unix_listener anvil-auth-penalty {{
    path = anvil-auth-penalty-disabled
  }}
}}
"""
        with open(d + "/dovecot.conf", "w") as f:
            f.write(conf)
        run(["dovecot", "-n", "-c", d + "/dovecot.conf"])
        self.launch("dovecot_proxy", ["dovecot", "-F", "-c", d + "/dovecot.conf"], d, d + "/stdout.log",
                    [(port, "imap", True)])

    def start_nginx(self):
        d = os.path.join(self.w, "nginx")
        os.makedirs(d + "/logs")
        os.chmod(d, 0o755)
        auth_port, port, smtp_port = free_port(), free_port(), free_port()
        self.ports["nginx"], self.ports["auth_http"], self.ports["nginx_smtp"] = port, auth_port, smtp_port
        with open(d + "/users", "w") as f:
            f.write(self.passwd_lines())
        with open(d + "/master.secret", "w") as f:
            f.write(self.master_pw + "\n")
        self.daemons["auth_http"] = Daemon(
            "auth_http", [sys.executable, os.path.join(BENCH_DIR, "auth_http.py"), str(auth_port), d + "/users",
                          "127.0.0.1", str(self.ports["backend_plain"]), MASTER, d + "/master.secret",
                          str(self.ports["backend_submission"])],
            d, d + "/auth_http.log")
        conf = f"""# mailgate bench: nginx mail proxy (generated)
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
user nobody nogroup;
worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
daemon off;
events {{
  worker_connections 9000;
}}
mail {{
  server_name localhost;
  auth_http 127.0.0.1:{auth_port}/auth;
  proxy_pass_error_message on;
  proxy_buffer 64k;
  ssl_certificate {self.cert};
  ssl_certificate_key {self.key};
  ssl_protocols TLSv1.2 TLSv1.3;
  server {{
    listen 127.0.0.1:{port} ssl;
    protocol imap;
    imap_auth plain login;
  }}
  # SMTP: nginx logs in to Dovecot submission itself (AUTH PLAIN as user*master with the
  # credentials auth_http returns) instead of XCLIENT, which Dovecot submission cannot log in with.
  server {{
    listen 127.0.0.1:{smtp_port} ssl;
    protocol smtp;
    smtp_auth plain login;
    xclient off;
    proxy_smtp_auth on;
  }}
}}
"""
        with open(d + "/nginx.conf", "w") as f:
            f.write(conf)
        run(["nginx", "-t", "-q", "-p", d, "-e", d + "/logs/error.log", "-c", d + "/nginx.conf"])
        self.launch("nginx", ["nginx", "-p", d, "-e", d + "/logs/error.log", "-c", d + "/nginx.conf"], d,
                    d + "/stdout.log", [(port, "imap", True), (smtp_port, "smtp", True)])

    def start_haproxy(self):
        d = os.path.join(self.w, "haproxy")
        os.makedirs(d)
        port, smtp_port, pop3_port = free_port(), free_port(), free_port()
        self.ports["haproxy"], self.ports["haproxy_smtp"], self.ports["haproxy_pop3"] = port, smtp_port, pop3_port
        conf = f"""# mailgate bench: haproxy TLS termination, TCP mode (generated)
global
  maxconn 9000
  nbthread 2
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  maxconn 9000
frontend imaps
  bind 127.0.0.1:{port} ssl crt {self.combined}
  default_backend dovecot
backend dovecot
  server d1 127.0.0.1:{self.ports['backend_plain']} maxconn 9000
frontend smtps
  bind 127.0.0.1:{smtp_port} ssl crt {self.combined}
  default_backend submission
backend submission
  server s1 127.0.0.1:{self.ports['backend_submission']} maxconn 9000
frontend pop3s
  bind 127.0.0.1:{pop3_port} ssl crt {self.combined}
  default_backend pop3
backend pop3
  server p1 127.0.0.1:{self.ports['backend_pop3']} maxconn 9000
"""
        with open(d + "/haproxy.cfg", "w") as f:
            f.write(conf)
        run(["haproxy", "-c", "-q", "-f", d + "/haproxy.cfg"])
        self.launch("haproxy", ["haproxy", "-db", "-f", d + "/haproxy.cfg"], d, d + "/stdout.log",
                    [(port, "imap", True), (smtp_port, "smtp", True), (pop3_port, "pop3", True)])

    def mailgate(self, name, *args, stdin=None):
        mg = self.mg[name]
        cmd = [mg["bin"], "--config", mg["conf"], *args]
        r = subprocess.run(cmd, cwd=mg["dir"], input=stdin, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({r.returncode}): {r.stderr[-800:]}")
        return r.stdout

    def start_mailgate(self, name, binary):
        """One mailgate instance `name` ("mailgate" or "mailgate_old") from `binary`, with its
        own store, IMAP, SMTP and POP3 ports, accounts and app passwords. A binary from before
        POP3 (which refuses [pop3]) runs without it, and is left out of the POP3 figure."""
        d = os.path.join(self.w, name)
        os.makedirs(d)
        # A private copy: the shared target/ may be rebuilt while the bench runs.
        mg = {"dir": d, "bin": d + "/mailgate", "conf": d + "/mailgate.toml"}
        self.mg[name] = mg
        shutil.copy2(binary, mg["bin"])
        port, smtp_port, pop3_port = free_port(), free_port(), free_port()
        # The web step and OAuth (issue 16): the new binary only (an old one may not know
        # [oauth]); its XOAUTH2 logins are measured beside the app-password logins.
        web_port = free_port() if name == "mailgate" else None
        self.ports[name], self.ports[name + "_smtp"] = port, smtp_port
        with open(d + "/master.secret", "w") as f:
            f.write(self.master_pw + "\n")
        os.chmod(d + "/master.secret", 0o600)
        conf = f"""# mailgate bench (generated)
[server]
hostname = "localhost"
public_url = "https://localhost"
data_dir = "{d}/data"

[tls]
cert = "{self.cert}"
key = "{self.key}"

[imap]
listen_tls = ["127.0.0.1:{port}"]
listen_starttls = []

[smtp]
listen_tls = ["127.0.0.1:{smtp_port}"]
listen_starttls = []

[web]
listen = [{f'"127.0.0.1:{web_port}"' if web_port else ""}]

[upstream.imap]
address = "127.0.0.1:{self.ports['backend_plain']}"
tls = "none"
login = "master-sasl"
master_user = "mailgate"
master_password_file = "{d}/master.secret"

[upstream.smtp]
address = "127.0.0.1:{self.ports['backend_submission']}"
tls = "none"
login = "master-sasl"
master_user = "mailgate"
master_password_file = "{d}/master.secret"

[limits]
auth_failure_delay_ms = 0
max_connections = 30000
max_connections_per_ip = 30000
max_sessions_per_user_ip = 30000
"""
        pop3 = f"""
[pop3]
listen_tls = ["127.0.0.1:{pop3_port}"]
listen_starttls = []

[upstream.pop3]
address = "127.0.0.1:{self.ports['backend_pop3']}"
tls = "none"
login = "master-sasl"
master_user = "mailgate"
master_password_file = "{d}/master.secret"
xclient = true
"""
        if web_port:
            conf = conf.replace('public_url = "https://localhost"', f'public_url = "https://127.0.0.1:{web_port}"')
            conf += "\n[oauth]\nenabled = true\n"
        with open(mg["conf"], "w") as f:
            f.write(conf + pop3)
        try:
            self.mailgate(name, "init")
            self.ports[name + "_pop3"] = pop3_port
        except RuntimeError as e:
            if name == "mailgate" or "pop3" not in str(e):
                raise
            log(f"{name}: this binary has no POP3 ({str(e).strip().splitlines()[-1]}): no POP3 figure for it")
            with open(mg["conf"], "w") as f:
                f.write(conf)
            self.mailgate(name, "init")
        log("%s: adding %d accounts and their app passwords" % (
            name, len(self.argon_users) + len(self.plain_users())))
        for u, p, _ in self.argon_users:
            self.mailgate(name, "user", "add", u, "--password-stdin", stdin=p + "\n")
        for u, p in self.plain_users():
            self.mailgate(name, "user", "add", u, "--password-stdin", stdin=p + "\n")
        app = {}
        for u in [x[0] for x in self.argon_users] + [x[0] for x in self.idle_users] + [self.bulk[0],
                                                                                       self.cost_users[0][0]]:
            app[u] = [self.app_password(name, u, "bench")]
        fifty = self.cost_users[1][0]
        app[fifty] = [self.app_password(name, fifty, f"device {k}") for k in range(50)]
        listeners = [(port, "imap", True), (smtp_port, "smtp", True)]
        if self.pop3_port(name):
            app[self.pop3[0]] = [self.app_password(name, self.pop3[0], "bench", scope="imap,pop3")]
            listeners.append((pop3_port, "pop3", True))
        self.apps[name] = app
        # Issue 20: the bulk user's read-only app password (IMAP through the filtered session).
        try:
            self.readonly[name] = self.app_password(name, self.bulk[0], "bench read-only", scope="imap:read")
        except RuntimeError as e:
            log(f"{name}: no read-only app passwords ({str(e).strip().splitlines()[-1]}): no read-only figure")
        self.launch(name, [mg["bin"], "--config", mg["conf"], "serve"], d, d + "/mailgate.log", listeners)
        # Which library encrypts its TLS records ([tls] record_crypto = "auto"; a binary from
        # before the choice has aws-lc-rs only).
        with open(d + "/mailgate.log", errors="replace") as f:
            m = re.search(r'record_crypto="?([a-z0-9-]+)', f.read())
        RECORD_CRYPTO[name] = m.group(1) if m else "aws-lc-rs (no choice in this binary)"
        log(f"{name}: TLS records encrypted by {RECORD_CRYPTO[name]}")
        if web_port:
            log(f"{name}: signing {len(self.argon_users)} accounts in through the browser (OAuth) for XOAUTH2 logins")
            self.tokens[name] = [
                (u, clients.oauth_token(f"https://127.0.0.1:{web_port}", self.cert, u, p), "xoauth2")
                for u, p, _ in self.argon_users
            ]

    def launch(self, name, cmd, cwd, logfile, listeners):
        """Starts a server (foreground, own process group) and waits for its greeting on each of
        its `listeners`: (port, "imap" | "smtp" | "pop3", implicit TLS)."""
        self.specs[name] = (cmd, cwd, logfile, listeners)
        self.daemons[name] = Daemon(name, cmd, cwd, logfile)
        for port, proto, tls in listeners:
            wait_greeting(port, self.ctx if tls else None, name=name, proto=proto)

    def restart(self, peer):
        """Stops and starts a peer's server again (fresh process, same config and ports)."""
        name = "backend" if peer == "dovecot" else peer
        left = self.daemons.pop(name).stop()
        if left:
            raise RuntimeError(f"{name}: processes {left} still running after stop")
        self.launch(name, *self.specs[name])

    def app_password(self, name, user, label, scope=None):
        scope = ["--scope", scope] if scope else []
        out = self.mailgate(name, "app-password", "create", user, "--label", label, *scope).strip().splitlines()[-1]
        pw = out.replace(" ", "").replace("-", "").strip()
        if len(pw) != 32:
            raise RuntimeError(f"unexpected app password line {out!r}")
        return pw

    # --- per-peer credentials and CPU roots
    def creds(self, peer, kind):
        """kind: argon2 | app | bulk | pop3 | idle | smtp. Peers have no app passwords: for them a
        device password is a password checked against an argon2id hash, i.e. the argon2 users.
        SMTP logs in as the first N_SMTP_USERS idle users ({PLAIN} passwords at the peers)."""
        app = self.apps.get(peer, {})
        if kind == "bulk_readonly":
            return [(self.bulk[0], self.readonly[peer])]
        if kind in ("bulk", "pop3"):
            u, pw = self.bulk if kind == "bulk" else self.pop3
            return [(u, app[u][0] if is_mg(peer) else pw)]
        if kind in ("idle", "smtp"):
            users = self.idle_users[:N_SMTP_USERS] if kind == "smtp" else self.idle_users
            if is_mg(peer):
                return [(u, app[u][0]) for u, _ in users]
            return list(users)
        if kind == "app" and is_mg(peer):
            return [(u, app[u][0]) for u, _, _ in self.argon_users]
        return [(u, p) for u, p, _ in self.argon_users]

    def smtp_port(self, peer):
        return self.ports[peer + "_smtp"]

    def pop3_port(self, peer):
        """The peer's POP3-over-TLS port, None if it has none (nginx, the Dovecot proxy, a
        mailgate binary from before POP3)."""
        return self.ports.get(peer + "_pop3")

    def front_roots(self, peer):
        if is_mg(peer):
            return [self.daemons[peer].pid]
        if peer == "nginx":
            return [self.daemons["nginx"].pid, self.daemons["auth_http"].pid]
        if peer == "haproxy":
            return [self.daemons["haproxy"].pid]
        if peer == "dovecot_proxy":
            return [self.daemons["dovecot_proxy"].pid]
        return [self.daemons["backend"].pid]  # dovecot direct: the server itself

    def mem_roots(self, peer):
        if peer == "nginx":
            return [self.daemons["nginx"].pid]
        return self.front_roots(peer)

    def backend_roots(self):
        return [self.daemons["backend"].pid, self.daemons["smtp_sink"].pid]

    def check_alive(self):
        dead = [n for n, d in self.daemons.items() if not d.alive()]
        if dead:
            raise RuntimeError(f"server(s) exited: {dead} (logs under {self.w})")

    def stop_all(self):
        leftovers = {}
        for name in ["mailgate", "mailgate_old", "haproxy", "nginx", "auth_http", "dovecot_proxy", "backend",
                     "smtp_sink"]:
            d = self.daemons.pop(name, None)
            if d:
                left = d.stop()
                if left:
                    leftovers[name] = left
        return leftovers


# ----------------------------------------------------------------------------- measurements


class Bench:
    def __init__(self, args, s, messages):
        self.a = args
        self.s = s
        self.messages = messages
        self.records = []
        self.errors = []

    def rec(self, **kw):
        return kw

    def wait(self):
        idle = quiet_wait(self.a.min_idle, self.a.quiet_timeout)
        self._mark = own_and_busy()
        return idle

    def run(self, method, *args, retries=None, **kw):
        """Runs one measurement. If other work on the machine (CPU time not spent by the bench's
        own processes) took more than --max-foreign % of the CPUs meanwhile, repeats it, up to
        --retries times, and keeps the least disturbed attempt."""
        retries = self.a.retries if retries is None else retries
        best = None
        for attempt in range(1, retries + 2):
            r = method(*args, **kw)
            own1, busy1, t1 = own_and_busy()
            own0, busy0, t0 = self._mark
            foreign = 100.0 * max(0.0, (busy1 - busy0) - (own1 - own0)) / max(1e-6, (t1 - t0) * os.cpu_count())
            r["foreign_cpu_pct"] = round(foreign, 1)
            r["attempt"] = attempt
            if best is None or r["foreign_cpu_pct"] < best["foreign_cpu_pct"]:
                best = r
            if foreign <= self.a.max_foreign:
                break
            if attempt <= retries:
                log(f"    other work took {foreign:.0f}% of the CPUs during that measurement: repeating it")
        self.records.append(best)
        return best

    def greeting(self, peer, rnd):
        idle = self.wait()
        lat = clients.greeting_latency(self.s.ctx, self.s.ports[peer], self.a.greetings)
        r = self.rec(kind="greeting", peer=peer, round=rnd, idle_cpu_pct=idle, n=len(lat),
                     median_ms=round(statistics.median(lat), 3), min_ms=round(min(lat), 3),
                     max_ms=round(max(lat), 3))
        log(f"  greeting  {peer:14s} {r['median_ms']:8.3f} ms (idle {idle}%)")
        return r

    def bulk(self, peer, rnd, kind="bulk", ctx=None):
        """IMAP: FETCH 1:* BODY.PEEK[] of the bulk mailbox, --fetches times on one connection.
        kind "bulk_default_suite": the same with `ctx` offering OpenSSL's default TLS 1.3 suites,
        so that the server picks by its own preference (mailgate's second figure). kind
        "bulk_readonly": the same with the bulk user's read-only app password (issue 20)."""
        user, pw = self.s.creds(peer, "bulk_readonly" if kind == "bulk_readonly" else "bulk")[0]
        return self.download(kind, peer, rnd, clients.fetch_all, self.s.ports[peer], user, pw, self.a.fetches,
                             ctx=ctx)

    def pop3(self, peer, rnd):
        """POP3: RETR of every message of the POP3 mailbox, --pop3-passes times on one connection."""
        user, pw = self.s.creds(peer, "pop3")[0]
        return self.download("pop3", peer, rnd, clients.retr_all, self.s.pop3_port(peer), user, pw,
                             self.a.pop3_messages, self.a.pop3_passes)

    def download(self, kind, peer, rnd, client, port, *args, ctx=None):
        """One download measurement: `client(ctx, port, *args, info=dict)` returns [(bytes,
        seconds)] per pass over the mailbox (and puts the negotiated suite into the dict);
        records MB/s, the suite and the front's and the backend's CPU per GB. `ctx`: another
        client TLS context than the run's (e.g. one offering OpenSSL's default suites)."""
        idle = self.wait()
        roots, back = self.s.front_roots(peer), self.s.backend_roots()
        c0, b0 = cpu_secs(roots), cpu_secs(back)
        info = {}
        res = client(ctx or self.s.ctx, port, *args, info=info)
        time.sleep(self.a.cpu_settle)  # let the servers finish closing and reap exited children
        c1, b1 = cpu_secs(roots), cpu_secs(back)
        nbytes = sum(n for n, _ in res)
        secs = sum(t for _, t in res)
        gb = nbytes / 1e9
        r = self.rec(kind=kind, peer=peer, round=rnd, idle_cpu_pct=idle, bytes=nbytes, secs=round(secs, 4),
                     mb_s=round(nbytes / 1e6 / secs, 1),
                     per_fetch_mb_s=[round(n / 1e6 / t, 1) for n, t in res],
                     front_cpu_ms_per_gb=round((c1 - c0) * 1000 / gb, 1),
                     backend_cpu_ms_per_gb=round((b1 - b0) * 1000 / gb, 1),
                     cipher=info.get("cipher"), tls_version=info.get("tls_version"))
        log(f"  {kind:9s} {peer:14s} {r['mb_s']:8.1f} MB/s  front {r['front_cpu_ms_per_gb']:7.0f} ms/GB"
            f"  backend {r['backend_cpu_ms_per_gb']:6.0f} ms/GB  {r['cipher']} (idle {idle}%)")
        return r

    def floor(self, rnd):
        """The floor (see floor_figures), on this machine, between the round's measurements."""
        idle = self.wait()
        f = measure_floor(self.a)
        r = self.rec(kind="floor", peer=None, round=rnd, idle_cpu_pct=idle, **f)
        log(f"  floor     {f['floor_ms_per_gb']:8.0f} ms/GB = AES {f['aes_ms_per_gb']:.0f} ({f['suite']}) + read "
            f"{f['read_ms_per_gb']:.0f} + write {f['write_ms_per_gb']:.0f} (syscalls in them "
            f"{f['syscalls_ms_per_gb']:.0f}); copies-only bound {f['floor_min_ms_per_gb']:.0f} (idle {idle}%)")
        return r

    def append(self, peer, rnd):
        idle = self.wait()
        roots, back = self.s.front_roots(peer), self.s.backend_roots()
        user, pw = self.s.creds(peer, "bulk")[0]
        c0, b0 = cpu_secs(roots), cpu_secs(back)
        nbytes, secs = clients.append_all(self.s.ctx, self.s.ports[peer], user, pw, f"up-{peer}-{rnd}",
                                          self.messages[:self.a.append_messages])
        time.sleep(self.a.cpu_settle)  # let the servers finish closing and reap exited children
        c1, b1 = cpu_secs(roots), cpu_secs(back)
        gb = nbytes / 1e9
        r = self.rec(kind="append", peer=peer, round=rnd, idle_cpu_pct=idle, bytes=nbytes, secs=round(secs, 4),
                     mb_s=round(nbytes / 1e6 / secs, 1),
                     front_cpu_ms_per_gb_incl_delete=round((c1 - c0) * 1000 / gb, 1),
                     backend_cpu_ms_per_gb_incl_delete=round((b1 - b0) * 1000 / gb, 1))
        log(f"  append    {peer:14s} {r['mb_s']:8.1f} MB/s (idle {idle}%)")
        return r

    def logins(self, peer, rnd, kind, clients_n, creds=None, label=None, secs=None):
        idle = self.wait()
        roots, back = self.s.front_roots(peer), self.s.backend_roots()
        creds = creds or self.s.creds(peer, kind)
        secs = secs or self.a.login_secs
        ctx = mp.get_context("fork")
        start_at = time.time() + 0.5
        procs, pipes = [], []
        for w in range(clients_n):
            # One user per worker when there are enough; otherwise each worker cycles through all.
            mine = [creds[w]] if len(creds) >= clients_n else creds[w % len(creds):] + creds[:w % len(creds)]
            rd, wr = ctx.Pipe(duplex=False)
            p = ctx.Process(target=clients.login_worker,
                            args=(self.s.cert, self.s.ports[peer], mine, start_at, secs, wr))
            p.start()
            wr.close()
            procs.append(p)
            pipes.append(rd)
        c0, b0 = cpu_secs(roots), cpu_secs(back)
        lat, errors, first, try_later = [], 0, None, 0
        for rd in pipes:
            lw, e, f, t = rd.recv()
            lat += lw
            errors += e
            first = first or f
            try_later += t
        t_end = time.time()
        for p in procs:
            p.join()
        time.sleep(self.a.cpu_settle)  # let the servers finish closing and reap exited children
        c1, b1 = cpu_secs(roots), cpu_secs(back)
        secs = max(secs, t_end - start_at)
        n = len(lat)
        r = self.rec(kind="logins", what=label or kind, peer=peer, round=rnd, clients=clients_n, idle_cpu_pct=idle,
                     logins=n, errors=errors, first_error=first, try_later=try_later, secs=round(secs, 2),
                     logins_per_s=round(n / secs, 1), p50_ms=round(pct(lat, 50), 2) if lat else None,
                     p99_ms=round(pct(lat, 99), 2) if lat else None,
                     front_cpu_ms_per_login=round((c1 - c0) * 1000 / n, 3) if n else None,
                     backend_cpu_ms_per_login=round((b1 - b0) * 1000 / n, 3) if n else None)
        if errors:
            self.errors.append(f"{label or kind} logins via {peer}, {clients_n} clients, round {rnd}: "
                               f"{errors} errors, first: {first}")
        log(f"  logins    {peer:14s} {label or kind:7s} c{clients_n:<2d} {r['logins_per_s']:7.1f}/s "
            f"p50 {r['p50_ms']} p99 {r['p99_ms']} ms front {r['front_cpu_ms_per_login']} ms/login"
            f" errors {errors}{f' try-later {try_later}' if try_later else ''} (idle {idle}%)")
        return r

    def smtp(self, peer, rnd):
        """SMTP submission: --smtp-clients clients over implicit TLS, each sending --smtp-size
        messages, --smtp-per-conn per connection (EHLO + AUTH PLAIN each time), for --smtp-secs."""
        idle = self.wait()
        roots, back = self.s.front_roots(peer), self.s.backend_roots()
        creds = self.s.creds(peer, "smtp")
        secs = self.a.smtp_secs
        ctx = mp.get_context("fork")
        start_at = time.time() + 0.5
        procs, pipes = [], []
        for w in range(self.a.smtp_clients):
            rd, wr = ctx.Pipe(duplex=False)
            p = ctx.Process(target=clients.smtp_worker,
                            args=(self.s.cert, self.s.smtp_port(peer), [creds[w % len(creds)]], start_at, secs,
                                  self.a.smtp_per_conn, self.a.smtp_size, wr))
            p.start()
            wr.close()
            procs.append(p)
            pipes.append(rd)
        c0, b0 = cpu_secs(roots), cpu_secs(back)
        n, lat, errors, first = 0, [], 0, None
        for rd in pipes:
            k, lw, e, f = rd.recv()
            n += k
            lat += lw
            errors += e
            first = first or f
        t_end = time.time()
        for p in procs:
            p.join()
        time.sleep(self.a.cpu_settle)  # let the servers finish closing and reap exited children
        c1, b1 = cpu_secs(roots), cpu_secs(back)
        secs = max(secs, t_end - start_at)
        r = self.rec(kind="smtp", peer=peer, round=rnd, clients=self.a.smtp_clients, idle_cpu_pct=idle,
                     messages=n, message_bytes=self.a.smtp_size, per_conn=self.a.smtp_per_conn, errors=errors,
                     first_error=first, secs=round(secs, 2), msgs_per_s=round(n / secs, 1),
                     mb_s=round(n * self.a.smtp_size / 1e6 / secs, 1),
                     p50_ms=round(pct(lat, 50), 2) if lat else None, p99_ms=round(pct(lat, 99), 2) if lat else None,
                     front_cpu_ms_per_msg=round((c1 - c0) * 1000 / n, 3) if n else None,
                     backend_cpu_ms_per_msg=round((b1 - b0) * 1000 / n, 3) if n else None)
        if errors:
            self.errors.append(f"SMTP submission via {peer}, round {rnd}: {errors} errors, first: {first}")
        log(f"  smtp      {peer:14s} {r['msgs_per_s']:7.1f} msgs/s p50 {r['p50_ms']} ms front "
            f"{r['front_cpu_ms_per_msg']} ms/msg backend {r['backend_cpu_ms_per_msg']} ms/msg errors {errors} "
            f"(idle {idle}%)")
        return r

    def idle(self, peer, rnd, after_1mb):
        # A fresh server for each memory measurement: memory kept from earlier loads (pools,
        # allocator caches) would otherwise be reused and hide the per-session cost.
        self.s.restart(peer)
        u, pw = self.s.creds(peer, "idle")[0]
        c = clients.Conn(self.s.ctx, self.s.ports[peer])
        c.handshake_done_greeting()
        c.login(u, pw)
        c.command("z", "LOGOUT")
        c.close()
        time.sleep(0.5)
        idle = self.wait()
        roots = self.s.mem_roots(peer)
        creds = self.s.creds(peer, "idle")
        n = self.a.idle_sessions
        workers = self.a.idle_workers
        pss0, _ = pss_kib(roots)
        ctx = mp.get_context("fork")
        procs, pipes = [], []
        t0 = time.time()
        for w in range(workers):
            cnt = n // workers + (1 if w < n % workers else 0)
            mine = creds[w % len(creds):] + creds[:w % len(creds)]
            a, b = ctx.Pipe()
            p = ctx.Process(target=clients.idle_worker,
                            args=(self.s.cert, self.s.ports[peer], mine, cnt,
                                  f"1:{IDLE_MSGS}" if after_1mb else None, b))
            p.start()
            procs.append(p)
            pipes.append(a)
        ready, errors, first = 0, 0, None
        for a in pipes:
            msg = a.recv()
            ready += msg[1]
            errors += msg[2]
            first = first or msg[3]
        setup_secs = time.time() - t0
        time.sleep(self.a.idle_settle)
        pss1, nproc = pss_kib(roots)
        for a in pipes:
            a.send("close")
        for a in pipes:
            a.recv()
        for p in procs:
            p.join()
        per = (pss1 - pss0) / max(1, ready)
        variant = "idle_after_1mb" if after_1mb else "idle"
        r = self.rec(kind=variant, peer=peer, round=rnd, idle_cpu_pct=idle, sessions=ready, errors=errors,
                     first_error=first, pss_before_kib=pss0, pss_loaded_kib=pss1, processes=nproc,
                     kib_per_session=round(per, 2), setup_secs=round(setup_secs, 1))
        if errors or ready != n:
            self.errors.append(f"{variant} via {peer}, round {rnd}: {ready}/{n} sessions, {errors} errors, "
                               f"first: {first}")
        log(f"  {variant:15s} {peer:14s} {per:8.2f} KiB/session ({ready} sessions, {nproc} processes, "
            f"setup {setup_secs:.1f}s, idle {idle}%)")
        # Let the servers close the sessions before the next measurement.
        time.sleep(1.0)
        return r


def rotate(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


# ----------------------------------------------------------------------------- report


def summarize(b, args):
    recs = b.records

    def vals(kind, peer, field, **match):
        out = []
        for r in recs:
            if r["kind"] == kind and r["peer"] == peer and all(r.get(k) == v for k, v in match.items()):
                if r.get(field) is not None:
                    out.append(r[field])
        return out

    def fig(kind, field, peers, **match):
        med_, spread = {}, {}
        for p in peers:
            v = vals(kind, p, field, **match)
            if v:
                med_[p] = round(med(v), 3)
                spread[p] = [round(min(v), 3), round(med(v), 3), round(max(v), 3)]
        return med_, spread

    out, spread = {}, {}

    def put(name, kind, field, peers, **match):
        out[name], spread[name] = fig(kind, field, peers, **match)

    put("bulk_mb_s", "bulk", "mb_s", PEERS)
    put("append_mb_s", "append", "mb_s", PEERS)
    put("proxy_cpu_ms_per_gb", "bulk", "front_cpu_ms_per_gb", PROXIES)
    # mailgate with the suite it picks itself from OpenSSL's default client offer (--suite pins
    # the headline figures above to one suite for every peer).
    put("bulk_mb_s_default_suite", "bulk_default_suite", "mb_s", PEERS)
    put("proxy_cpu_ms_per_gb_default_suite", "bulk_default_suite", "front_cpu_ms_per_gb", PROXIES)
    # Issue 20: the same FETCH with a read-only app password (the filtered IMAP session).
    put("bulk_mb_s_readonly", "bulk_readonly", "mb_s", PEERS)
    put("proxy_cpu_ms_per_gb_readonly", "bulk_readonly", "front_cpu_ms_per_gb", PROXIES)
    floor_summary(recs, out, spread)
    put("server_cpu_ms_per_gb_dovecot_direct", "bulk", "front_cpu_ms_per_gb", ["dovecot"])
    put("backend_cpu_ms_per_gb", "bulk", "backend_cpu_ms_per_gb", PROXIES)
    put("pop3_mb_s", "pop3", "mb_s", POP3_PEERS)
    put("pop3_proxy_cpu_ms_per_gb", "pop3", "front_cpu_ms_per_gb", PROXIES)
    put("pop3_server_cpu_ms_per_gb_dovecot_direct", "pop3", "front_cpu_ms_per_gb", ["dovecot"])
    put("pop3_backend_cpu_ms_per_gb", "pop3", "backend_cpu_ms_per_gb", PROXIES)
    put("append_proxy_cpu_ms_per_gb", "append", "front_cpu_ms_per_gb_incl_delete", PROXIES)
    for what, key in (("app", "app_password"), ("argon2", "argon2"), ("xoauth2", "xoauth2")):
        for c in (16, 1):
            put(f"{key}_logins_per_s_c{c}", "logins", "logins_per_s", PEERS, what=what, clients=c)
            put(f"{key}_login_p50_ms_c{c}", "logins", "p50_ms", PEERS, what=what, clients=c)
            put(f"{key}_login_p99_ms_c{c}", "logins", "p99_ms", PEERS, what=what, clients=c)
            put(f"{key}_front_cpu_ms_per_login_c{c}", "logins", "front_cpu_ms_per_login", PEERS, what=what,
                clients=c)
            put(f"{key}_backend_cpu_ms_per_login_c{c}", "logins", "backend_cpu_ms_per_login", PEERS, what=what,
                clients=c)
    # The peers have no app passwords: a device password is checked against an argon2id hash.
    for key in [k for k in out if k.startswith("app_password_")]:
        akey = "argon2_" + key[len("app_password_"):]
        for p in PEERS:
            if not is_mg(p) and p in out.get(akey, {}):
                out[key][p] = out[akey][p]
                spread[key][p] = spread[akey][p]
    # Logins answered "try again later" (not errors: see clients.login_worker), per peer and
    # cell, summed over the rounds.
    tl = {}
    for r in recs:
        if r["kind"] == "logins" and r.get("try_later"):
            key = f"{r['what']}_c{r['clients']}"
            tl.setdefault(r["peer"], {})[key] = tl.get(r["peer"], {}).get(key, 0) + r["try_later"]
    out["logins_try_later"] = tl
    put("smtp_msgs_per_s", "smtp", "msgs_per_s", SMTP_PEERS)
    put("smtp_proxy_cpu_ms_per_msg", "smtp", "front_cpu_ms_per_msg", SMTP_PEERS)
    put("smtp_backend_cpu_ms_per_msg", "smtp", "backend_cpu_ms_per_msg", SMTP_PEERS)
    put("smtp_p50_ms", "smtp", "p50_ms", SMTP_PEERS)
    put("greeting_ms_after_handshake", "greeting", "median_ms", PEERS)
    put("idle_kib_per_session", "idle", "kib_per_session", PEERS)
    put("idle_kib_per_session_after_1mb", "idle_after_1mb", "kib_per_session", PEERS)
    one = vals("logins", "mailgate", "front_cpu_ms_per_login", what="app_1")
    fifty = vals("logins", "mailgate", "front_cpu_ms_per_login", what="app_50")
    one_r = vals("logins", "mailgate", "logins_per_s", what="app_1")
    fifty_r = vals("logins", "mailgate", "logins_per_s", what="app_50")
    out["login_cost_ratio_50_vs_1_app_passwords"] = round(med(fifty) / med(one), 3) if one and fifty else None
    out["login_rate_ratio_50_vs_1_app_passwords"] = round(med(fifty_r) / med(one_r), 3) if one_r and fifty_r else None
    out["login_cost_ms_1_app_password"] = med(one)
    out["login_cost_ms_50_app_passwords"] = med(fifty)

    def ratio(a, b_):
        return round(a / b_, 3) if a is not None and b_ else None

    g = lambda name, p: out.get(name, {}).get(p)  # noqa: E731
    targets = [
        ("B1", "bulk FETCH MB/s >= 1.2x haproxy", ratio(g("bulk_mb_s", "mailgate"), g("bulk_mb_s", "haproxy")),
         ">=", 1.2),
        ("B2", "proxy CPU per GB <= 0.75x haproxy",
         ratio(g("proxy_cpu_ms_per_gb", "mailgate"), g("proxy_cpu_ms_per_gb", "haproxy")), "<=", 0.75),
        ("F1", "proxy CPU per GB <= 1.3x the floor measured in the same run",
         g("proxy_cpu_floor_ratio", "mailgate"), "<=", 1.3),
        ("N1", "bulk FETCH with a read-only app password >= 0.8x unrestricted (MB/s)",
         ratio(g("bulk_mb_s_readonly", "mailgate"), g("bulk_mb_s", "mailgate")), ">=", 0.8),
        ("P1", "POP3 RETR MB/s >= 1.2x haproxy", ratio(g("pop3_mb_s", "mailgate"), g("pop3_mb_s", "haproxy")),
         ">=", 1.2),
        ("L2", "app-password logins/s, 16 clients >= 3x nginx+auth_http (argon2id)",
         ratio(g("app_password_logins_per_s_c16", "mailgate"), g("app_password_logins_per_s_c16", "nginx")),
         ">=", 3.0),
        ("L2-p99", "app-password login p99 at 16 clients <= 80 ms", g("app_password_login_p99_ms_c16", "mailgate"),
         "<=", 80.0),
        ("O1", "XOAUTH2 (OAuth token) logins/s, 16 clients >= 1.0x app-password logins",
         ratio(g("xoauth2_logins_per_s_c16", "mailgate"), g("app_password_logins_per_s_c16", "mailgate")), ">=", 1.0),
        ("O1-p99", "XOAUTH2 login p99 at 16 clients <= 1.0x the app-password p99",
         ratio(g("xoauth2_login_p99_ms_c16", "mailgate"), g("app_password_login_p99_ms_c16", "mailgate")), "<=", 1.0),
        ("L1", "argon2id account-password logins/s, 16 clients >= 1.0x Dovecot proxy",
         ratio(g("argon2_logins_per_s_c16", "mailgate"), g("argon2_logins_per_s_c16", "dovecot_proxy")), ">=", 1.0),
        ("L4", "greeting <= 1 ms after the TLS handshake", g("greeting_ms_after_handshake", "mailgate"), "<=", 1.0),
        ("M1", "idle session <= 16 KiB PSS", g("idle_kib_per_session", "mailgate"), "<=", 16.0),
        ("M1-1MB", "idle session after 1 MB <= 16 KiB PSS", g("idle_kib_per_session_after_1mb", "mailgate"),
         "<=", 16.0),
        ("A1", "login cost with 50 app passwords <= 1.1x with 1 (CPU per login)",
         out["login_cost_ratio_50_vs_1_app_passwords"], "<=", 1.1),
        ("S1", "SMTP submission msgs/s, 16 clients, 50 KB >= 1.0x haproxy",
         ratio(g("smtp_msgs_per_s", "mailgate"), g("smtp_msgs_per_s", "haproxy")), ">=", 1.0),
        ("S2", "SMTP proxy CPU per message <= 1.0x haproxy",
         ratio(g("smtp_proxy_cpu_ms_per_msg", "mailgate"), g("smtp_proxy_cpu_ms_per_msg", "haproxy")), "<=", 1.0),
    ]
    tlist = []
    for tid, goal, v, op, thr in targets:
        ok = None if v is None else (v >= thr if op == ">=" else v <= thr)
        tlist.append({"id": tid, "goal": goal, "measured": v, "op": op, "threshold": thr,
                      "result": "PASS" if ok else ("MISS" if ok is False else "N/A")})
    out["targets"] = tlist
    out["spread_min_median_max"] = spread
    out["old_vs_new"] = old_vs_new(out, spread, args.rounds)
    foreign = [r["foreign_cpu_pct"] for r in recs if r.get("foreign_cpu_pct") is not None]
    out["foreign_cpu_pct_median"] = round(med(foreign), 1) if foreign else None
    out["foreign_cpu_pct_limit"] = args.max_foreign
    return out


# Figures compared between the new and the old mailgate binary: (key, label, higher is better).
COMPARE = [
    ("bulk_mb_s", "bulk FETCH MB/s", True),
    ("bulk_mb_s_readonly", "bulk MB/s, read-only app pw", True),
    ("proxy_cpu_ms_per_gb", "proxy CPU ms/GB (fetch)", False),
    ("pop3_mb_s", "POP3 RETR MB/s", True),
    ("pop3_proxy_cpu_ms_per_gb", "POP3 proxy CPU ms/GB", False),
    ("append_mb_s", "APPEND MB/s", True),
    ("app_password_logins_per_s_c16", "app-pw logins/s, 16 cl.", True),
    ("app_password_front_cpu_ms_per_login_c16", "app-pw proxy CPU ms/login, 16", False),
    ("app_password_logins_per_s_c1", "app-pw logins/s, 1 cl.", True),
    ("argon2_logins_per_s_c16", "argon2 logins/s, 16 cl.", True),
    ("greeting_ms_after_handshake", "greeting ms after handshake", False),
    ("idle_kib_per_session", "idle KiB PSS/session", False),
    ("idle_kib_per_session_after_1mb", "idle KiB PSS/session after 1MB", False),
    ("smtp_msgs_per_s", "SMTP msgs/s, 16 cl., 50 KB", True),
    ("smtp_proxy_cpu_ms_per_msg", "SMTP proxy CPU ms/msg", False),
]


def old_vs_new(out, spread, rounds):
    """New ("mailgate") against old ("mailgate_old"), figure by figure: both min/median/max
    over the rounds, the ratio of the medians, and whether the new one is worse beyond the
    run's spread (its whole range on the worse side of the old one's, no overlap)."""
    rows = []
    for key, label, higher in COMPARE:
        new, old = spread.get(key, {}).get("mailgate"), spread.get(key, {}).get("mailgate_old")
        if not new or not old:
            continue
        if higher:
            worse, better = new[2] < old[0], new[0] > old[2]
        else:
            worse, better = new[0] > old[2], new[2] < old[0]
        verdict = "worse beyond spread" if worse else ("better beyond spread" if better else "within spread")
        if rounds < 2:
            verdict = "no spread (1 round)"
        rows.append({"figure": key, "label": label, "higher_is_better": higher, "new": new, "old": old,
                     "new_over_old": round(new[1] / old[1], 3) if old[1] else None, "verdict": verdict,
                     "n_rounds": rounds})
    return rows


def compare_text(summary, markdown=False):
    rows = summary.get("old_vs_new") or []
    if not rows:
        return ""

    def rng(v, nd):
        return f"{v[0]:,.{nd}f} / {v[1]:,.{nd}f} / {v[2]:,.{nd}f}"

    lines = []
    if markdown:
        lines.append("| figure | new (min / median / max) | old (min / median / max) | new / old | verdict |")
        lines.append("| --- | ---: | ---: | ---: | --- |")
    else:
        lines.append(f"{'new vs old mailgate':34s}{'new min/med/max':>30s}{'old min/med/max':>30s}{'new/old':>9s}  verdict")
    for r in rows:
        nd = 2 if max(r["old"][1], r["new"][1]) < 10 else 1
        ratio_ = "–" if r["new_over_old"] is None else f"{r['new_over_old']:.3f}"
        if markdown:
            lines.append(f"| {r['label']} | {rng(r['new'], nd)} | {rng(r['old'], nd)} | {ratio_} | {r['verdict']} |")
        else:
            lines.append(f"{r['label']:34s}{rng(r['new'], nd):>30s}{rng(r['old'], nd):>30s}{ratio_:>9s}  "
                         f"{r['verdict']}")
    if rows and rows[0]["n_rounds"] < 2:
        lines.append("(one round: min = median = max, no spread to judge by; use --rounds 3 or more)")
    foreign, limit = summary.get("foreign_cpu_pct_median"), summary.get("foreign_cpu_pct_limit")
    if foreign is not None and limit is not None and foreign > limit:
        lines.append(f"(other work took a median {foreign:.0f} % of the CPUs during the measurements: the spread is "
                     "mostly that load, and verdicts are unreliable; an A/A run, the same binary as both, on such a "
                     "machine showed 2 of 12 figures 'beyond spread')")
    return "\n".join(lines)


ROWS = [
    ("bulk_mb_s", "bulk FETCH MB/s", 1),
    ("proxy_cpu_ms_per_gb", "proxy CPU ms/GB (fetch)", 0),
    ("proxy_cpu_floor_ratio", "proxy CPU / floor (fetch)", 2),
    ("bulk_mb_s_default_suite", "bulk MB/s, server-chosen suite", 1),
    ("bulk_mb_s_readonly", "bulk MB/s, read-only app pw", 1),
    ("proxy_cpu_ms_per_gb_readonly", "proxy CPU ms/GB, read-only pw", 0),
    ("proxy_cpu_ms_per_gb_default_suite", "proxy CPU ms/GB, server's suite", 0),
    ("server_cpu_ms_per_gb_dovecot_direct", "Dovecot direct server CPU ms/GB", 0),
    ("backend_cpu_ms_per_gb", "backend CPU ms/GB (fetch)", 0),
    ("pop3_mb_s", "POP3 RETR MB/s", 1),
    ("pop3_proxy_cpu_ms_per_gb", "POP3 proxy CPU ms/GB", 0),
    ("pop3_server_cpu_ms_per_gb_dovecot_direct", "Dovecot direct POP3 CPU ms/GB", 0),
    ("pop3_backend_cpu_ms_per_gb", "POP3 backend CPU ms/GB", 0),
    ("append_mb_s", "APPEND MB/s", 1),
    ("append_proxy_cpu_ms_per_gb", "proxy CPU ms/GB (append)", 0),
    ("app_password_logins_per_s_c16", "app-pw logins/s, 16 cl.", 1),
    ("app_password_login_p50_ms_c16", "app-pw login p50 ms, 16 cl.", 1),
    ("app_password_login_p99_ms_c16", "app-pw login p99 ms, 16 cl.", 1),
    ("app_password_front_cpu_ms_per_login_c16", "app-pw proxy CPU ms/login, 16", 2),
    ("app_password_logins_per_s_c1", "app-pw logins/s, 1 cl.", 1),
    ("app_password_login_p50_ms_c1", "app-pw login p50 ms, 1 cl.", 1),
    ("app_password_login_p99_ms_c1", "app-pw login p99 ms, 1 cl.", 1),
    ("app_password_front_cpu_ms_per_login_c1", "app-pw proxy CPU ms/login, 1", 2),
    ("xoauth2_logins_per_s_c16", "XOAUTH2 logins/s, 16 cl.", 1),
    ("xoauth2_login_p50_ms_c16", "XOAUTH2 login p50 ms, 16 cl.", 1),
    ("xoauth2_login_p99_ms_c16", "XOAUTH2 login p99 ms, 16 cl.", 1),
    ("xoauth2_front_cpu_ms_per_login_c16", "XOAUTH2 proxy CPU ms/login, 16", 2),
    ("xoauth2_logins_per_s_c1", "XOAUTH2 logins/s, 1 cl.", 1),
    ("argon2_logins_per_s_c16", "argon2 logins/s, 16 cl.", 1),
    ("argon2_login_p50_ms_c16", "argon2 login p50 ms, 16 cl.", 1),
    ("argon2_login_p99_ms_c16", "argon2 login p99 ms, 16 cl.", 1),
    ("argon2_front_cpu_ms_per_login_c16", "argon2 proxy CPU ms/login, 16", 2),
    ("argon2_backend_cpu_ms_per_login_c16", "argon2 backend CPU ms/login, 16", 2),
    ("argon2_logins_per_s_c1", "argon2 logins/s, 1 cl.", 1),
    ("argon2_login_p50_ms_c1", "argon2 login p50 ms, 1 cl.", 1),
    ("argon2_login_p99_ms_c1", "argon2 login p99 ms, 1 cl.", 1),
    ("argon2_front_cpu_ms_per_login_c1", "argon2 proxy CPU ms/login, 1", 2),
    ("smtp_msgs_per_s", "SMTP msgs/s, 16 cl., 50 KB", 1),
    ("smtp_proxy_cpu_ms_per_msg", "SMTP proxy CPU ms/msg", 3),
    ("smtp_backend_cpu_ms_per_msg", "SMTP backend CPU ms/msg", 3),
    ("smtp_p50_ms", "SMTP msg p50 ms, 16 cl.", 1),
    ("greeting_ms_after_handshake", "greeting ms after handshake", 3),
    ("idle_kib_per_session", "idle KiB PSS/session", 1),
    ("idle_kib_per_session_after_1mb", "idle KiB PSS/session after 1MB", 1),
]


def table(summary, markdown=False):
    lines = []
    peers = [p for p in PEERS if any(p in (summary.get(k) or {}) for k, _, _ in ROWS)]
    if markdown:
        lines.append("| figure | " + " | ".join(peers) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in peers) + " |")
    else:
        lines.append(f"{'figure':34s}" + "".join(f"{p:>15s}" for p in peers))
    for key, label, nd in ROWS:
        vals = summary.get(key, {})
        if not any(vals.get(p) is not None for p in peers):
            continue  # not measured in this run (--skip)
        cells = []
        for p in peers:
            v = vals.get(p)
            cells.append("–" if v is None else f"{v:,.{nd}f}")
        if markdown:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"{label:34s}" + "".join(f"{c:>15s}" for c in cells))
    if summary.get("pop3_mb_s"):
        lines += ["", "POP3: nginx mail and the Dovecot proxy are not set up for POP3 (nor is a mailgate binary from "
                  "before POP3), so they have no POP3 figures."]
    return "\n".join(lines)


def targets_text(summary, markdown=False):
    lines = []
    if markdown:
        lines.append("| id | target | measured | result |")
        lines.append("| --- | --- | ---: | --- |")
    for t in summary["targets"]:
        v = "n/a" if t["measured"] is None else f"{t['measured']:.3f}"
        if markdown:
            lines.append(f"| {t['id']} | {t['goal']} | {v} ({t['op']} {t['threshold']}) | **{t['result']}** |")
        else:
            lines.append(f"{t['result']:5s} {t['id']:7s} {t['goal']:70s} measured {v} ({t['op']} {t['threshold']})")
    return "\n".join(lines)


def machine_info():
    info = {"cores": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
        with open("/etc/debian_version") as f:
            info["debian"] = f.read().strip()
    except OSError:
        pass
    return info


def cpu_flags():
    """The CPU flags that decide the AES-GCM code path (CPU_FLAGS): present or not, from the
    first processor in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return {k: k in have for k in CPU_FLAGS}
    except OSError:
        pass
    return {}


def kernel_tls():
    """Whether this kernel can do kTLS: CONFIG_TLS in /proc/config.gz (or /boot/config-*), and
    "tls" among the TCP upper-layer protocols it offers."""
    import glob
    import gzip
    out = {"config_tls": None, "tcp_ulps": None}
    for path in ["/proc/config.gz"] + sorted(glob.glob(f"/boot/config-{platform.release()}")):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_TLS=") or line.startswith("# CONFIG_TLS is not set"):
                        out["config_tls"] = line.strip()
                        break
            out["config_source"] = path
            break
        except OSError:
            continue
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            out["tcp_ulps"] = f.read().split()
    except OSError:
        pass
    out["available"] = bool(out["tcp_ulps"] and "tls" in out["tcp_ulps"])
    return out


# Where each flag of CPU_FLAGS sits in the two 64-bit words of OPENSSL_ia32cap: (word, bit).
# Word 0 is CPUID leaf 1 (EDX in bits 0-31, ECX in 32-63), word 1 leaf 7 (EBX, then ECX).
IA32CAP_BITS = {"aes": (0, 32 + 25), "avx2": (1, 5), "avx512f": (1, 16), "vaes": (1, 32 + 9),
                "vpclmulqdq": (1, 32 + 10)}


def flags_through_mask(flags, mask):
    """The CPU_FLAGS as aws-lc and OpenSSL see them through OPENSSL_ia32cap=`mask`:
    '[~|]value[:[~|]value]', '~' clears the given bits, '|' sets them, a bare value replaces
    the word (as aws-lc's handle_cpu_env reads it)."""
    seen = dict(flags)
    if not mask:
        return seen
    for word, field in enumerate(mask.split(":")[:2]):
        op = field[:1] if field[:1] in ("~", "|") else ""
        num = field[len(op):]
        try:
            v = int(num, 16) if num.lower().startswith("0x") else int(num)
        except ValueError:
            continue  # an empty or unreadable field leaves that word alone
        for name, (w, bit) in IA32CAP_BITS.items():
            if w != word or name not in seen:
                continue
            on = bool(v >> bit & 1)
            seen[name] = (seen[name] and not on) if op == "~" else (seen[name] or on) if op == "|" else on
    return seen


# mailgate instance name -> the library its listeners encrypt TLS records with (its log).
RECORD_CRYPTO = {}


def host_info(args, records=()):
    """What decides the cost of a relayed byte on this host: the CPU, its AES-related flags,
    the OPENSSL_ia32cap mask the run set (--no-avx512), which AES-GCM code aws-lc takes, kTLS,
    and the suite each peer negotiated in the bulk test."""
    m = machine_info()
    flags = cpu_flags()
    mask = os.environ.get("OPENSSL_ia32cap")
    seen = flags_through_mask(flags, mask)
    avx512 = bool(seen.get("vaes") and seen.get("vpclmulqdq") and seen.get("avx512f"))
    h = {
        "cpu": m.get("cpu"),
        "cores": m.get("cores"),
        "kernel": m.get("kernel"),
        "cpu_flags": flags,
        "openssl_ia32cap": mask,
        "no_avx512": mask == NO_AVX512_MASK,
        "cpu_flags_seen_by_crypto": seen,
        # aws-lc (aws-lc-sys 0.47) has two x86-64 AES-GCM paths: VAES + VPCLMULQDQ + AVX-512
        # (aesni-gcm-avx512), else AES-NI + AVX (aesni-gcm-x86_64, 128-bit); no VAES-AVX2 one.
        # (its AVX-512 test also wants AVX512DQ/BW/VL, which come with AVX512F on x86-64 CPUs
        # that have VAES, and which the --no-avx512 mask clears together with it).
        "aws_lc_aes_gcm_path": ("vaes-avx512" if avx512 else "aesni-avx (no AVX-512: 128-bit AES-NI)"
                                if seen.get("aes") else "no AES-NI: software AES"),
        "kernel_tls": kernel_tls(),
        "client_tls13_suites": args.suite,
    }
    if RECORD_CRYPTO:
        # ring 0.17.14: VAES + VPCLMULQDQ AVX2 AES-GCM, else AES-NI + AVX; it ignores
        # OPENSSL_ia32cap (mailgate's "auto" picks it when aws-lc would see no AVX-512).
        h["mailgate_record_crypto"] = dict(RECORD_CRYPTO)
    for kind, key in (("bulk", "negotiated_suites"), ("bulk_default_suite", "negotiated_suites_default_offer")):
        got = {}
        for r in records:
            if r.get("kind") == kind and r.get("cipher"):
                got.setdefault(r["peer"], set()).add(r["cipher"])
        if got:
            h[key] = {p: ",".join(sorted(v)) for p, v in got.items()}
    return h


def floor_figures(raw, suite):
    """The floor of one relayed GB on this machine, from the measurements of
    examples/floor.rs (`raw`), for the TLS 1.3 `suite` the bulk test runs with.

    floor_ms_per_gb = AES ms/GB + read ms/GB + write ms/GB, where

    * AES: CPU to seal 1 GB as TLS 1.3 records of 16 KiB with `suite` in aws-lc-rs (the library
      rustls encrypts with in mailgate), in place, no copy;
    * read (from the upstream) and write (to the client): the reader's and the writer's CPU per
      GB of one loopback TCP stream with 64 KiB reads and writes (mailgate's relay reads 64 KiB
      at a time and writes four 16 KiB records per read). Each is one kernel copy between a
      socket and user memory plus that side's TCP work, and includes its syscalls (one read or
      write per 64 KiB; `syscalls_ms_per_gb` says how much of the two that is).

    Any relay in user space over loopback TCP pays at least this per GB it carries; what a
    proxy uses above it is its own work (buffer copies, framing, polling, wake-ups).
    floor_min_ms_per_gb = AES + 2 x memcpy of 1 GB + syscalls is the lower bound if the TCP
    stack cost nothing but the copies (it does not: loopback delivery, ACKs, skb handling)."""
    if suite not in raw["aes"]:
        suite = SUITE  # "default": OpenSSL's default offer; every peer then picks AES-256-GCM
    aes = raw["aes"][suite]["cpu_ms_per_gb"]
    lb = raw["loopback_64k"]
    pairs_per_gb_64k, pairs_per_gb_16k = 1e9 / 65536, 1e9 / 16384
    sys64 = raw["syscall_pair_ns"] * pairs_per_gb_64k / 1e6
    sys16 = raw["syscall_pair_ns"] * pairs_per_gb_16k / 1e6
    memcpy = raw["memcpy"]["cpu_ms_per_gb"]
    return {
        "suite": suite,
        "floor_ms_per_gb": round(aes + lb["reader_cpu_ms_per_gb"] + lb["writer_cpu_ms_per_gb"], 1),
        "aes_ms_per_gb": aes,
        "read_ms_per_gb": lb["reader_cpu_ms_per_gb"],
        "write_ms_per_gb": lb["writer_cpu_ms_per_gb"],
        "syscalls_ms_per_gb": round(sys64, 1),
        "floor_min_ms_per_gb": round(aes + 2 * memcpy + sys64, 1),
        "memcpy_ms_per_gb": memcpy,
        "memcpy_mb_s": raw["memcpy"]["mb_s"],
        "loopback_64k_mb_s": lb["mb_s"],
        "loopback_64k_cpu_ms_per_gb": lb["cpu_ms_per_gb"],
        "loopback_16k_mb_s": raw["loopback_16k"]["mb_s"],
        "loopback_16k_cpu_ms_per_gb": raw["loopback_16k"]["cpu_ms_per_gb"],
        "syscall_pair_ns": raw["syscall_pair_ns"],
        "syscalls_ms_per_gb_16k": round(sys16, 1),
        "aes_ms_per_gb_by_suite": {k: v["cpu_ms_per_gb"] for k, v in raw["aes"].items()},
        "aes_mb_s_by_suite": {k: v["mb_s"] for k, v in raw["aes"].items()},
        "rustls_send_ms_per_gb_by_suite": {k: v["cpu_ms_per_gb"] for k, v in raw["rustls_send"].items()},
        "raw": raw,
    }


def measure_floor(args):
    """Runs examples/floor.rs (--floor-bin) once; returns floor_figures()."""
    r = subprocess.run([args.floor_bin, "--mib", str(args.floor_mib)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{args.floor_bin} failed ({r.returncode}): {r.stderr[-800:]}")
    return floor_figures(json.loads(r.stdout), args.suite)


def floor_summary(recs, out, spread):
    """Medians of the round's floor measurements into `out` (floor_ms_per_gb, floor), and
    proxy CPU per GB over the floor for every proxy (proxy_cpu_floor_ratio)."""
    fl = [r for r in recs if r["kind"] == "floor"]
    if not fl:
        return
    f = {"suite": fl[0]["suite"], "n": len(fl)}
    for k, v in fl[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("round", "attempt"):
            xs = [r[k] for r in fl]
            f[k] = round(med(xs), 1)
            if k == "floor_ms_per_gb":
                spread[k] = [round(min(xs), 1), round(med(xs), 1), round(max(xs), 1)]
        elif isinstance(v, dict) and k.endswith("_by_suite"):
            f[k] = {s_: round(med([r[k][s_] for r in fl]), 1) for s_ in v}
    f["formula"] = ("floor_ms_per_gb = aes_ms_per_gb (TLS 1.3 records of 16 KiB, in place, aws-lc-rs) + "
                    "read_ms_per_gb + write_ms_per_gb (reader's and writer's CPU per GB of one loopback TCP "
                    "stream, 64 KiB reads/writes, syscalls included); floor_min_ms_per_gb = aes + 2 x memcpy + "
                    "syscalls (read + write per 64 KiB)")
    out["floor"] = f
    out["floor_ms_per_gb"] = f["floor_ms_per_gb"]
    ratio = {}
    for p, v in (out.get("proxy_cpu_ms_per_gb") or {}).items():
        if v is not None and f["floor_ms_per_gb"]:
            ratio[p] = round(v / f["floor_ms_per_gb"], 3)
    out["proxy_cpu_floor_ratio"] = ratio


def floor_text(summary, markdown=False):
    f = summary.get("floor")
    if not f:
        return ""
    aes = ", ".join(f"{k} {v:,.0f}" for k, v in f.get("aes_ms_per_gb_by_suite", {}).items())
    rs = ", ".join(f"{k} {v:,.0f}" for k, v in f.get("rustls_send_ms_per_gb_by_suite", {}).items())
    lines = [
        f"floor (this machine, median of {f['n']}): {f['floor_ms_per_gb']:,.0f} ms/GB = AES {f['aes_ms_per_gb']:,.0f} "
        f"({f['suite']}) + read {f['read_ms_per_gb']:,.0f} + write {f['write_ms_per_gb']:,.0f} "
        f"(syscalls in these: {f['syscalls_ms_per_gb']:,.0f}; {f['syscall_pair_ns']:,.0f} ns per read+write)",
        f"  copies-only bound (AES + 2 x memcpy + syscalls): {f['floor_min_ms_per_gb']:,.0f} ms/GB; memcpy "
        f"{f['memcpy_mb_s']:,.0f} MB/s ({f['memcpy_ms_per_gb']:,.0f} ms/GB); loopback TCP 64k "
        f"{f['loopback_64k_mb_s']:,.0f} MB/s ({f['loopback_64k_cpu_ms_per_gb']:,.0f} ms/GB both ends), 16k "
        f"{f['loopback_16k_mb_s']:,.0f} MB/s ({f['loopback_16k_cpu_ms_per_gb']:,.0f} ms/GB)",
        f"  AES-GCM record sealing, CPU ms/GB: {aes}; through rustls (copy + seal + framing): {rs}",
    ]
    ratio = summary.get("proxy_cpu_floor_ratio") or {}
    if ratio:
        lines.append("  proxy CPU per GB / floor: " + ", ".join(f"{p} {v:.2f}" for p, v in ratio.items()))
    if markdown:
        lines = [ln.strip() + "  " for ln in lines]
    return "\n".join(lines)


def host_text(host):
    if not host:
        return ""
    flags = " ".join(f"{k}{'+' if v else '-'}" for k, v in host.get("cpu_flags", {}).items())
    t = (f"host: {host.get('cpu')}, flags {flags}"
         f"{' (masked for the crypto libraries: OPENSSL_ia32cap=' + host['openssl_ia32cap'] + ')' if host.get('openssl_ia32cap') else ''}"
         f"; aws-lc AES-GCM path: {host.get('aws_lc_aes_gcm_path')}; kTLS: "
         f"{'yes' if (host.get('kernel_tls') or {}).get('available') else 'no'}")
    if host.get("mailgate_record_crypto"):
        t += "; mailgate's TLS records: " + ", ".join(f"{k} {v}" for k, v in host["mailgate_record_crypto"].items())
    if host.get("negotiated_suites"):
        t += "\nsuites negotiated in the bulk test (clients offer " + str(host.get("client_tls13_suites")) + "): " + \
            ", ".join(f"{p} {c}" for p, c in host["negotiated_suites"].items())
    if host.get("negotiated_suites_default_offer"):
        t += "\n  with OpenSSL's default offer: " + ", ".join(
            f"{p} {c}" for p, c in host["negotiated_suites_default_offer"].items())
    return t


def _dist_version(name):
    try:
        import importlib.metadata
        return importlib.metadata.version(name)
    except Exception:  # noqa: BLE001 - Debian's package may not carry metadata
        return None


def versions(mg_bin, mg_old=None):
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return None

    v = {
        "dovecot": out(["dovecot", "--version"]),
        "nginx": out(["nginx", "-v"]),
        "haproxy": out(["haproxy", "-v"]),
        "openssl": out(["openssl", "version"]),
        "python": sys.version.split()[0],
        "python_ssl": __import__("ssl").OPENSSL_VERSION,
        "argon2_cffi": _dist_version("argon2-cffi"),
        "argon2_cffi_bindings": _dist_version("argon2-cffi-bindings"),
        "mailgate_binary": mg_bin,
        "mailgate_binary_sha256": (subprocess.run(["sha256sum", mg_bin], capture_output=True, text=True).stdout
                                   .split() or [None])[0],
    }
    if mg_old:
        v["mailgate_old_binary"] = mg_old
        v["mailgate_old_binary_sha256"] = (subprocess.run(["sha256sum", mg_old], capture_output=True, text=True)
                                           .stdout.split() or [None])[0]
    try:
        v["git_commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
        v["git_src_dirty"] = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "src", "Cargo.toml",
                                                  "Cargo.lock"], capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    return v


# ----------------------------------------------------------------------------- main


def floor_only(args):
    """bench/run --floor-only: the floor alone, --rounds times (--quick: once), no servers.
    Writes bench/results/<time>-floor.json with `floor`, `floor_ms_per_gb` and `host`."""
    if args.quick:
        args.rounds = 1
    args.quiet_timeout = min(args.quiet_timeout, 3.0)  # a loaded machine stays loaded: measure anyway
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    b = Bench(args, None, None)
    for rnd in range(args.rounds):
        b.run(b.floor, rnd, retries=0)
    out, spread = {}, {}
    floor_summary(b.records, out, spread)
    result = {"schema": 1, "floor_only": True, "started_utc": started.isoformat(timespec="seconds"),
              "elapsed_secs": round(time.time() - t0, 1), "machine": machine_info(),
              "host": host_info(args), "settings": {k: v for k, v in vars(args).items() if k.startswith("floor")
                                                    or k in ("rounds", "suite", "no_avx512")},
              **out, "spread_min_median_max": spread, "measurements": b.records}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, started.strftime("%Y%m%dT%H%M%SZ") + "-floor.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print()
    print(floor_text(out))
    print(host_text(result["host"]))
    print(f"\nresults: {path}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, short loads (for development)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--login-secs", type=float, default=10.0)
    ap.add_argument("--fetches", type=int, default=3, help="full-mailbox FETCHes per bulk measurement")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--pop3-messages", type=int, default=2000,
                    help="messages in the POP3 mailbox (at most --messages; --quick: 1000)")
    ap.add_argument("--pop3-passes", type=int, default=3,
                    help="RETRs of the whole POP3 mailbox per measurement, on one connection")
    ap.add_argument("--idle-sessions", type=int, default=2000)
    ap.add_argument("--idle-workers", type=int, default=4)
    ap.add_argument("--idle-rounds", type=int, default=1,
                    help="rounds (the first N) that measure idle memory; it is deterministic and slow")
    ap.add_argument("--cost-secs", type=float, default=5.0, help="seconds per 1-vs-50 app password cell")
    ap.add_argument("--idle-settle", type=float, default=3.0)
    ap.add_argument("--greetings", type=int, default=50)
    ap.add_argument("--cpu-settle", type=float, default=0.5, help="seconds after a load before reading CPU")
    ap.add_argument("--max-foreign", type=float, default=10.0,
                    help="repeat a measurement when other work took more than this %% of the CPUs")
    ap.add_argument("--retries", type=int, default=1, help="repeats of a disturbed measurement")
    ap.add_argument("--min-idle", type=float, default=90.0, help="quiet wait: idle CPU %% before each measurement")
    ap.add_argument("--quiet-timeout", type=float, default=15.0)
    ap.add_argument("--dovecot-imap-reuse", action="store_true",
                    help="the backend Dovecot reuses imap processes (service_count = 0) instead of one per "
                         "session: a cheaper backend login, for comparison (not the default)")
    ap.add_argument("--smtp-secs", type=float, default=10.0, help="seconds per SMTP submission cell")
    ap.add_argument("--smtp-clients", type=int, default=16)
    ap.add_argument("--smtp-size", type=int, default=50000, help="bytes per submitted message")
    ap.add_argument("--smtp-per-conn", type=int, default=10,
                    help="messages per SMTP connection (each connection: TLS, EHLO, AUTH PLAIN)")
    ap.add_argument("--peers", default=",".join(p for p in PEERS if p != "mailgate_old"),
                    help="comma list of %s (mailgate_old is added when --mailgate-old is given)" % ",".join(PEERS))
    ap.add_argument("--skip", default="",
                    help="comma list of: greeting,bulk,floor,pop3,append,logins,cost,idle,smtp")
    ap.add_argument("--mailgate", default=os.path.join(REPO, "target/release/mailgate"))
    ap.add_argument("--mailgate-old", default=None,
                    help="a second mailgate binary measured in the same run as peer mailgate_old (the binary "
                         "a change replaces); the run then prints new against old with the run's spread")
    ap.add_argument("--results", default=os.path.join(BENCH_DIR, "results"))
    ap.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the private directory (configs, logs, mailboxes) is made")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--suite", default=SUITE,
                    help="the only TLS 1.3 suite the clients offer, so every peer relays with it (OpenSSL name, "
                         "e.g. TLS_AES_128_GCM_SHA256); 'default': OpenSSL's default offer, each server picks. "
                         "Unless 'default', mailgate's bulk FETCH is also measured with the default offer "
                         "(bulk_mb_s_default_suite)")
    ap.add_argument("--no-avx512", action="store_true",
                    help="hide AVX-512 from the crypto libraries of every process (OPENSSL_ia32cap=%s: aws-lc in "
                         "mailgate and the floor, OpenSSL in the peers and clients), to measure a host without "
                         "AVX-512 (AVX2 + VAES) on one that has it" % NO_AVX512_MASK)
    ap.add_argument("--floor-only", action="store_true",
                    help="only the floor (examples/floor.rs, --rounds times): no servers, no root needed")
    ap.add_argument("--floor-bin", default=os.path.join(REPO, "target/release/examples/floor"),
                    help="the floor program (cargo build --release --example floor)")
    ap.add_argument("--floor-mib", type=int, default=1024, help="MiB per floor measurement (AES, memcpy, loopback)")
    args = ap.parse_args()
    if args.no_avx512 and os.environ.get("OPENSSL_ia32cap") != NO_AVX512_MASK:
        # Set before OpenSSL is loaded (the ssl module at import): start this script again with
        # it, so that the clients, every server and the floor program see the same mask.
        os.environ["OPENSSL_ia32cap"] = NO_AVX512_MASK
        os.execv(sys.executable, [sys.executable] + sys.argv)
    if os.environ.get("OPENSSL_ia32cap") == "":
        sys.exit("bench: OPENSSL_ia32cap is set but empty: aws-lc then turns off AES-NI; unset it")
    clients.TLS13_SUITES = None if args.suite == "default" else args.suite
    args.floor_bin = os.path.abspath(args.floor_bin)
    if not os.access(args.floor_bin, os.X_OK):
        sys.exit(f"bench: {args.floor_bin} not found (cargo build --release --example floor)")
    if args.floor_only:
        return floor_only(args)
    if args.quick:
        args.rounds, args.login_secs, args.fetches = 1, 3.0, 1
        args.idle_sessions, args.greetings, args.quiet_timeout, args.cost_secs = 400, 20, 10.0, 3.0
        args.smtp_secs, args.pop3_messages, args.pop3_passes = 4.0, 1000, 1
    args.append_messages = args.messages
    args.pop3_messages = min(args.pop3_messages, args.messages)
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        sys.exit(f"bench: unknown peers {unknown} (known: {', '.join(PEERS)})")
    if args.mailgate_old:
        args.mailgate_old = os.path.abspath(args.mailgate_old)
        if not os.access(args.mailgate_old, os.X_OK):
            sys.exit(f"bench: --mailgate-old {args.mailgate_old} is not an executable")
        if "mailgate_old" not in peers:
            peers.insert(peers.index("mailgate") + 1 if "mailgate" in peers else 0, "mailgate_old")
    elif "mailgate_old" in peers:
        sys.exit("bench: peer mailgate_old needs --mailgate-old PATH (or MAILGATE_BIN_OLD for bench/run)")
    skip = set(x for x in args.skip.split(",") if x)
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (Dovecot and nginx drop privileges)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 200000), max(hard, 200000)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # no CAP_SYS_RESOURCE: the hard limit
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4 * args.idle_sessions + 1000:
        sys.exit(f"bench: open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)} too low")
    mg = os.path.abspath(args.mailgate)
    args.mailgate = mg
    if "mailgate" in peers and not os.access(mg, os.X_OK):
        sys.exit(f"bench: {mg} not found (cargo build --release)")

    started = datetime.datetime.now(datetime.timezone.utc)
    # On tmpfs by default: the backend's Maildir writes (APPEND) should cost CPU, not disk waits.
    work = tempfile.mkdtemp(prefix="mailgate-bench-", dir=args.tmpdir)
    os.chmod(work, 0o755)
    log(f"work dir {work}")
    s = Setup(args, work)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.time()
    # Before anything else: which mailgate (the shared tree may move on while the bench runs).
    run_versions = versions(mg, args.mailgate_old)
    summary = None
    b = None
    leftovers = {}
    try:
        s.make_users()
        s.make_cert()
        messages = make_messages(args.messages)
        s.start_backend(messages)
        s.start_dovecot_proxy()
        s.start_nginx()
        s.start_haproxy()
        if "mailgate" in peers:
            s.start_mailgate("mailgate", mg)
        if "mailgate_old" in peers:
            s.start_mailgate("mailgate_old", args.mailgate_old)
        log("servers up: " + ", ".join(f"{k}={v}" for k, v in s.ports.items()))
        b = Bench(args, s, messages)
        # The second bulk figure: the clients' default TLS 1.3 offer, the server's own choice.
        default_ctx = clients.tls_context(s.cert, "default") if args.suite != "default" else None
        # Warm-up: index the mailbox, fill the page cache, one pass through every path.
        log("warm-up")
        clients.fetch_all(s.ctx, s.ports["dovecot"], s.bulk[0], s.bulk[1], 1)
        for p in peers:
            u, pw = s.creds(p, "bulk")[0]
            c = clients.Conn(s.ctx, s.ports[p])
            c.handshake_done_greeting()
            c.login(u, pw)
            c.command("z", "LOGOUT")
            c.close()
        pop3_peers = [p for p in peers if p in POP3_PEERS and s.pop3_port(p)]
        if "pop3" not in skip:
            # Dovecot indexes the POP3 mailbox (sizes, UIDLs) at its first RETR pass; one login
            # per peer (mailgate: the app password's first use costs an argon2 hash).
            clients.retr_all(s.ctx, s.pop3_port("dovecot"), s.pop3[0], s.pop3[1], args.pop3_messages, 1)
            for p in pop3_peers:
                clients.retr_all(s.ctx, s.pop3_port(p), *s.creds(p, "pop3")[0], 1, 1)
        smtp_peers = [p for p in peers if p in SMTP_PEERS]
        if "smtp" not in skip:
            # One login per SMTP account and peer outside the measurement (mailgate's first
            # use of a device password costs an argon2 hash), and one message through each.
            for p in smtp_peers:
                creds = s.creds(p, "smtp")
                for k, (u, pw) in enumerate(creds):
                    c = clients.SmtpConn(s.ctx, s.smtp_port(p))
                    c.reply(b"220")
                    c.cmd("EHLO warmup.bench.test", b"250")
                    auth = base64.b64encode(f"\0{u}\0{pw}".encode()).decode()
                    c.cmd(f"AUTH PLAIN {auth}", b"235")
                    if k == 0:
                        c.cmd(f"MAIL FROM:<{u}>", b"250")
                        c.cmd("RCPT TO:<rcpt@bench.test>", b"250")
                        c.cmd("DATA", b"354")
                        c.sock.sendall(clients.smtp_message(u, args.smtp_size) + b".\r\n")
                        c.reply(b"250")
                    c.cmd("QUIT", b"221")
                    c.close()
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            order = rotate(peers, rnd)
            if "greeting" not in skip:
                for p in order:
                    b.run(b.greeting, p, rnd)
            if "bulk" not in skip:
                for p in order:
                    b.run(b.bulk, p, rnd)
            if "bulk" not in skip:
                for p in [x for x in order if x in s.readonly]:
                    b.run(b.bulk, p, rnd, "bulk_readonly")
            if "bulk" not in skip and default_ctx is not None:
                for p in [x for x in order if is_mg(x)]:
                    b.run(b.bulk, p, rnd, "bulk_default_suite", default_ctx)
            if "floor" not in skip:
                b.run(b.floor, rnd)
            if "pop3" not in skip:
                for p in [x for x in order if x in pop3_peers]:
                    b.run(b.pop3, p, rnd)
            if "append" not in skip:
                for p in order:
                    b.run(b.append, p, rnd)
            if "logins" not in skip:
                for c in (16, 1):
                    for p in order:
                        if is_mg(p):
                            b.run(b.logins, p, rnd, "app", c)
                        if p in s.tokens:
                            b.run(b.logins, p, rnd, "xoauth2", c, creds=s.tokens[p])
                        b.run(b.logins, p, rnd, "argon2", c)
            if "smtp" not in skip:
                for p in [x for x in order if x in SMTP_PEERS]:
                    b.run(b.smtp, p, rnd)
            if "cost" not in skip and "mailgate" in peers:
                one = s.cost_users[0][0]
                fifty = s.cost_users[1][0]
                fa = s.apps["mailgate"][fifty]
                cells = [([(one, s.apps["mailgate"][one][0])], "app_1"),
                         ([(fifty, fa[0]), (fifty, fa[25]), (fifty, fa[49])], "app_50")]
                # Alternate which account goes first, so that whatever the first cell
                # leaves behind (store growth, caches) does not always weigh on the same one.
                for creds, label in (cells if rnd % 2 == 0 else cells[::-1]):
                    # One login with each app password first, outside the measurement: the
                    # first use of a device password within accounts.verify_cache_secs costs
                    # an argon2 hash whatever the account holds, and the 50-password cell
                    # uses three devices against one. A1 compares the cost per login with
                    # 1 and 50 app passwords, not the number of devices in the cell.
                    for u, pw in creds:
                        c = clients.Conn(s.ctx, s.ports["mailgate"])
                        c.handshake_done_greeting()
                        c.login(u, pw)
                        c.command("z", "LOGOUT")
                        c.close()
                    b.run(b.logins, "mailgate", rnd, "app", 16, creds=creds, label=label, secs=args.cost_secs)
            if "idle" not in skip and rnd < args.idle_rounds:
                for after in (False, True):
                    for p in order:
                        if after and p == "dovecot":
                            continue  # not a proxy: its sessions hold no relay buffers (and it is slow)
                        b.run(b.idle, p, rnd, after, retries=0)
            s.check_alive()
        summary = summarize(b, args)
    finally:
        leftovers = s.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t_start
    protocol_errors = list(b.errors) if b else []
    result = {
        "schema": 1,
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_secs": round(elapsed, 1),
        "valid": not protocol_errors and not leftovers,
        "protocol_errors": protocol_errors,
        "leftover_processes": leftovers,
        "machine": machine_info(),
        "host": host_info(args, b.records if b else []),
        "versions": run_versions,
        "settings": {k: v for k, v in vars(args).items() if k not in ("mailgate", "mailgate_old", "results")},
        "method": {
            "client": "Python %s (ssl, TLS 1.3, ECDSA P-256 self-signed), multiprocessing workers for logins"
                      % sys.version.split()[0],
            "cpu": "user+sys of each server's process tree from /proc/PID/stat incl. reaped children",
            "memory": "PSS from /proc/PID/smaps_rollup over the proxy's process tree, loaded minus before",
            "quiet_wait": f">= {args.min_idle}% idle CPU over 0.5 s before each measurement "
                          f"(timeout {args.quiet_timeout} s); idle_cpu_pct recorded per measurement",
            "peers_app_passwords": "the peers have no app passwords: their app_password_* figures are their "
                                   "argon2id logins (a device password checked against an argon2id hash)",
            "smtp": "implicit-TLS submission, N clients each sending messages of --smtp-size bytes (MAIL, RCPT, "
                    "DATA one at a time), --smtp-per-conn per connection (TLS + EHLO + AUTH PLAIN each); all "
                    "proxies in front of the backend's Dovecot submission, which relays to bench/smtp_sink.py; "
                    "mailgate logs in there with master SASL, nginx with proxy_smtp_auth as user*master, haproxy "
                    "passes the client's own AUTH through; backend CPU = Dovecot + sink",
            "pop3": "one POP3 connection over implicit TLS: USER, PASS, STAT, then RETR of every message of the "
                    "POP3 mailbox (no DELE), 100 RETRs per write with two batches in flight, --pop3-passes "
                    "times, QUIT; mailgate (app password with the pop3 scope, master SASL login and XCLIENT to "
                    "the backend), haproxy (TLS termination to the backend's pop3) and Dovecot's own pop3s; "
                    "nginx mail and the Dovecot proxy are not set up for POP3",
            "login_cost_ratio": "mailgate proxy CPU ms per login, account with 50 app passwords (logging in with "
                                "the 1st, 26th and 50th) / account with 1, 16 clients",
        },
    }
    result.update(summary or {})
    result["measurements"] = b.records if b else []
    os.makedirs(args.results, exist_ok=True)
    name = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "") + ".json"
    path = os.path.join(args.results, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print()
    print(f"mailgate bench: {args.rounds} round(s), medians, {elapsed / 60:.1f} min, "
          f"{'VALID' if result['valid'] else 'INVALID'}")
    if summary:
        print(table(summary))
        print()
        print(floor_text(summary))
        print(host_text(result["host"]))
        print()
        print(targets_text(summary))
        if summary.get("old_vs_new"):
            print()
            print(compare_text(summary))
    for e in protocol_errors:
        print("ERROR:", e)
    if leftovers:
        print("ERROR: processes left running:", leftovers)
    print(f"\nresults: {path}")
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
