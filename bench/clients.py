"""IMAP, SMTP and POP3 clients of the benchmark: TLS 1.3, raw sockets, as little parsing as
possible.

Every reply is checked; anything other than the expected tagged OK (SMTP: reply code, POP3:
+OK) raises ImapError (SmtpError, Pop3Error), which the callers count as an error (a run with
errors is invalid).
"""

import base64
import os
import socket
import ssl
import sys
import time

HOST = "127.0.0.1"
SERVER_NAME = "localhost"


class ImapError(Exception):
    pass


# The TLS 1.3 cipher suites the clients offer (OpenSSL names, ':'-separated), or None for
# OpenSSL's default offer (TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256,
# TLS_AES_128_GCM_SHA256, in that order). bench.py sets it before it starts any client, so the
# forked login and idle workers inherit it: with one suite offered, every server has to use it.
TLS13_SUITES = None


def set_tls13_suites(ctx, suites):
    """Restricts the TLS 1.3 cipher suites `ctx` offers to `suites`.

    Python's ssl module (3.11 here) has no call for the TLS 1.3 suites (`set_ciphers` sets only
    the TLS 1.2 list), so this calls OpenSSL's SSL_CTX_set_ciphersuites on the context's SSL_CTX
    (the first field after the object header of CPython's _ssl._SSLContext) in the libssl that
    _ssl uses. The result is checked with get_ciphers(), and bench.py records the suite each
    connection negotiated (SSLSocket.cipher()), so a wrong pointer cannot pass unnoticed."""
    if hasattr(ctx, "set_ciphersuites"):  # a Python that has the call
        ctx.set_ciphersuites(suites)
    else:
        import ctypes
        libssl = ctypes.CDLL("libssl.so.3")
        fn = libssl.SSL_CTX_set_ciphersuites
        fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        fn.restype = ctypes.c_int
        ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ssl_ctx or fn(ssl_ctx, suites.encode()) != 1:
            raise RuntimeError(f"SSL_CTX_set_ciphersuites({suites!r}) failed")
    got = [c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"]
    if got != suites.split(":"):
        raise RuntimeError(f"TLS 1.3 suites {got}, wanted {suites}")


def tls_context(cafile, suites=None):
    """A TLS 1.3 client context; `suites`: the TLS 1.3 suites to offer ("default": OpenSSL's
    default offer; None: TLS13_SUITES)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile)
    ctx.check_hostname = True
    suites = TLS13_SUITES if suites is None else suites
    if suites and suites != "default":
        set_tls13_suites(ctx, suites)
    return ctx


def note_cipher(sock, info):
    """Puts the negotiated suite and protocol of `sock` into `info` (a dict), if given."""
    if info is not None:
        name, version, _ = sock.cipher()
        info["cipher"], info["tls_version"] = name, version


class TlsConn:
    """One TLS connection to the mail server under test (TCP_NODELAY, handshake done) with a
    small line reader."""

    error = ImapError

    def __init__(self, ctx, port, timeout=60.0):
        raw = socket.create_connection((HOST, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=SERVER_NAME, do_handshake_on_connect=False)
        self.sock.do_handshake()
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def readline(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[: i + 2], self.buf[i + 2:]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise self.error(f"connection closed (pending {self.buf[:120]!r})")
            self.buf += data


class Conn(TlsConn):
    """One IMAP connection."""

    def handshake_done_greeting(self):
        line = self.readline()
        if not line.startswith(b"* OK"):
            raise ImapError(f"greeting: {line[:120]!r}")
        return line

    def command(self, tag, text):
        """Sends `tag text` and reads up to the tagged reply, which must be OK."""
        self.sock.sendall(f"{tag} {text}\r\n".encode())
        return self.expect_tagged(tag)

    def expect_tagged(self, tag):
        t = tag.encode() + b" "
        while True:
            line = self.readline()
            if line.startswith(t):
                if line[len(t):len(t) + 2] != b"OK":
                    raise ImapError(f"{tag}: {line[:200]!r}")
                return line

    def login(self, user, password, mechanism=None):
        if mechanism == "xoauth2":
            msg = base64.b64encode(f"user={user}\x01auth=Bearer {password}\x01\x01".encode()).decode()
            self.command("a", f"AUTHENTICATE XOAUTH2 {msg}")
        else:
            self.command("a", f'LOGIN "{user}" "{password}"')


def oauth_token(web, cafile, user, password):
    """An OAuth access token for `user`, got as a mail app gets one: the authorization
    request opened in the stand-in browser of the tests (tests/support/oauth_browser.py:
    signs in on the web step and consents), the redirect caught on a loopback listener, the
    code redeemed with PKCE at the token endpoint."""
    import hashlib, http.server, json, secrets, subprocess, threading, urllib.parse, urllib.request
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    got = {}

    class Catch(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            got.update(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Catch)
    redirect = f"http://127.0.0.1:{srv.server_address[1]}/"
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    q = urllib.parse.urlencode({"response_type": "code", "client_id": "thunderbird", "redirect_uri": redirect,
                                "state": "bench", "code_challenge": challenge, "code_challenge_method": "S256",
                                "scope": "mail", "login_hint": user})
    browser = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support", "oauth_browser.py")
    env = dict(os.environ, TB_OAUTH_USER=user, TB_OAUTH_PASSWORD=password, MG_CA=cafile)
    r = subprocess.run([sys.executable, browser, f"{web}/oauth/authorize?{q}"], env=env, capture_output=True,
                       text=True, timeout=60)
    t.join(10)
    srv.server_close()
    if "code" not in got:
        raise RuntimeError(f"OAuth sign-in for {user} gave no code: {r.stdout[-600:]} {r.stderr[-600:]}")
    body = urllib.parse.urlencode({"grant_type": "authorization_code", "code": got["code"][0],
                                   "redirect_uri": redirect, "client_id": "thunderbird",
                                   "code_verifier": verifier}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{web}/oauth/token", data=body),
                                context=tls_context(cafile), timeout=30) as resp:
        return json.loads(resp.read())["access_token"]


def read_to_tagged(sock, tag, buf):
    """Reads raw bytes with recv_into until the tagged reply line of `tag` has arrived.
    No parsing: looks only at the end of the stream. Returns the bytes received."""
    mv = memoryview(buf)
    ok = b"\r\n" + tag.encode() + b" OK"
    bad = (b"\r\n" + tag.encode() + b" NO", b"\r\n" + tag.encode() + b" BAD")
    tail = b"\r\n"
    total = 0
    while True:
        n = sock.recv_into(mv)
        if n == 0:
            raise ImapError(f"{tag}: connection closed after {total} bytes")
        total += n
        seg = tail + bytes(mv[max(0, n - 256):n])
        tail = seg[-256:]
        if seg.endswith(b"\r\n"):
            if ok in seg:
                return total
            for b in bad:
                if b in seg:
                    raise ImapError(f"{tag}: {seg[seg.find(b) + 2:][:200]!r}")


def fetch_all(ctx, port, user, password, repeats, buf_size=1 << 20, info=None):
    """Bulk: FETCH 1:* BODY.PEEK[] `repeats` times on one connection. Returns
    [(bytes, seconds)] per fetch; `info` (a dict) gets the negotiated cipher suite."""
    c = Conn(ctx, port)
    note_cipher(c.sock, info)
    c.handshake_done_greeting()
    c.login(user, password)
    c.command("e", "EXAMINE INBOX")
    buf = bytearray(buf_size)
    out = []
    for i in range(repeats):
        tag = f"F{i}x"
        t0 = time.perf_counter()
        c.sock.sendall(f"{tag} FETCH 1:* BODY.PEEK[]\r\n".encode())
        n = read_to_tagged(c.sock, tag, buf)
        out.append((n, time.perf_counter() - t0))
    c.command("z", "LOGOUT")
    c.close()
    return out


def append_all(ctx, port, user, password, mailbox, messages, batch=100):
    """Upload: MULTIAPPEND (RFC 3502) with LITERAL+, `batch` messages per command, two
    commands in flight. Returns (payload bytes, seconds)."""
    c = Conn(ctx, port)
    c.handshake_done_greeting()
    c.login(user, password)
    c.command("c", f'CREATE "{mailbox}"')
    total = 0
    pending = []
    t0 = time.perf_counter()
    for start in range(0, len(messages), batch):
        tag = f"U{start}"
        parts = [f'{tag} APPEND "{mailbox}"'.encode()]
        for m in messages[start:start + batch]:
            parts.append(f" {{{len(m)}+}}\r\n".encode())
            parts.append(m)
            total += len(m)
        parts.append(b"\r\n")
        c.sock.sendall(b"".join(parts))
        pending.append(tag)
        if len(pending) > 1:
            c.expect_tagged(pending.pop(0))
    for tag in pending:
        c.expect_tagged(tag)
    secs = time.perf_counter() - t0
    c.command("d", f'DELETE "{mailbox}"')
    c.command("z", "LOGOUT")
    c.close()
    return total, secs


def greeting_latency(ctx, port, count):
    """Time from the end of the client's TLS handshake to the complete greeting line (ms)."""
    out = []
    for _ in range(count):
        raw = socket.create_connection((HOST, port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(raw, server_hostname=SERVER_NAME, do_handshake_on_connect=False)
        s.do_handshake()
        t0 = time.perf_counter()
        buf = b""
        while b"\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                raise ImapError("closed before greeting")
            buf += d
        out.append((time.perf_counter() - t0) * 1000.0)
        if not buf.startswith(b"* OK"):
            raise ImapError(f"greeting: {buf[:100]!r}")
        try:
            s.sendall(b"q LOGOUT\r\n")
            s.recv(4096)
        except OSError:
            pass
        s.close()
        time.sleep(0.002)
    return out


def login_worker(cafile, port, creds, start_at, secs, conn):
    """Process body: connect + TLS + greeting + LOGIN + LOGOUT + close, in a loop for
    `secs` from `start_at`. Sends (latencies_ms, errors, first_error, try_later) over `conn`.

    A login answered `NO [UNAVAILABLE]` ("not checked, try again later") is counted in
    `try_later`, not as an error, and tried again after 50 ms, as a mail app does: mailgate
    answers so when an address has more account-password logins in flight than its guess
    budget allows (docs/security.md "Guess budgets"), and all the bench's clients are one
    address. It is not in the latencies, so not in logins/s either."""
    ctx = tls_context(cafile)
    lat = []
    errors = 0
    try_later = 0
    first = None
    i = 0
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    end = start_at + secs
    while time.time() < end:
        user, password, *mech = creds[i % len(creds)]
        i += 1
        t0 = time.perf_counter()
        c = None
        try:
            c = Conn(ctx, port, timeout=30)
            c.handshake_done_greeting()
            c.login(user, password, *mech)
            c.command("b", "LOGOUT")
            lat.append((time.perf_counter() - t0) * 1000.0)
        except (OSError, ImapError, ssl.SSLError) as e:
            if isinstance(e, ImapError) and "NO [UNAVAILABLE]" in str(e):
                try_later += 1
            else:
                errors += 1
                if first is None:
                    first = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
        finally:
            if c is not None:
                c.close()
    conn.send((lat, errors, first, try_later))
    conn.close()


def idle_worker(cafile, port, creds, count, fetch_range, conn):
    """Process body: opens `count` sessions (LOGIN, EXAMINE, optional FETCH of
    `fetch_range`, IDLE), reports ('ready', n, errors, first_error), waits for 'close',
    closes everything and reports ('closed',)."""
    ctx = tls_context(cafile)
    sessions = []
    errors = 0
    first = None
    buf = bytearray(1 << 20)
    for i in range(count):
        user, password = creds[i % len(creds)]
        c = None
        try:
            c = Conn(ctx, port, timeout=120)
            c.handshake_done_greeting()
            c.login(user, password)
            c.command("e", "EXAMINE INBOX")
            if fetch_range:
                if c.buf:
                    raise ImapError("unexpected data before FETCH")
                c.sock.sendall(f"f FETCH {fetch_range} BODY.PEEK[]\r\n".encode())
                read_to_tagged(c.sock, "f", buf)
            c.sock.sendall(b"i IDLE\r\n")
            line = c.readline()
            if not line.startswith(b"+"):
                raise ImapError(f"IDLE: {line[:100]!r}")
            sessions.append(c)
        except (OSError, ImapError, ssl.SSLError) as e:
            errors += 1
            if first is None:
                first = f"{type(e).__name__}: {e}"
            if c is not None:
                c.close()
    conn.send(("ready", len(sessions), errors, first))
    conn.recv()
    for c in sessions:
        c.close()
    conn.send(("closed",))
    conn.close()
    os._exit(0)


# ----------------------------------------------------------------------------- SMTP submission


class SmtpError(Exception):
    pass


class SmtpConn(TlsConn):
    """One implicit-TLS submission connection (port 465 style) with a reply reader."""

    error = SmtpError

    def reply(self, want):
        """Reads one (possibly multi-line) reply; its code must be `want`."""
        while True:
            end = 0
            while True:
                i = self.buf.find(b"\r\n", end)
                if i < 0:
                    break
                line = self.buf[end:i]
                end = i + 2
                if len(line) < 4 or line[3:4] != b"-":
                    code, self.buf = line[:3], self.buf[end:]
                    if code != want:
                        raise SmtpError(f"expected {want.decode()}, got {line[:200]!r}")
                    return line
            data = self.sock.recv(65536)
            if not data:
                raise SmtpError(f"connection closed (pending {self.buf[:120]!r})")
            self.buf += data

    def cmd(self, line, want):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply(want)


def smtp_message(user, size):
    """A `size`-byte message (headers + base64-looking body lines) From: `user`."""
    head = (f"From: Bench <{user}>\r\nTo: <rcpt@bench.test>\r\nSubject: bench submission\r\n"
            f"Date: Mon, 7 Dec 2026 06:00:00 +0000\r\nMessage-ID: <{os.urandom(8).hex()}@bench.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = (b"QmVuY2ggbWVzc2FnZSBib2R5IGxpbmUgZm9yIHRoZSBzdWJtaXNzaW9uIGZpZ3VyZSBvZiBtYWlsZ2F0ZQ"[:76]
            + b"\r\n")
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def smtp_worker(cafile, port, creds, start_at, secs, per_conn, size, conn):
    """Process body: for `secs` from `start_at`, connect + TLS + EHLO + AUTH PLAIN, then send
    `per_conn` messages of `size` bytes (MAIL, RCPT, DATA, one command at a time), QUIT, again.
    Sends (messages, per-message latencies ms, errors, first_error) over `conn`."""
    import base64
    ctx = tls_context(cafile)
    lat = []
    errors = 0
    first = None
    user, password = creds[0]
    msg = smtp_message(user, size) + b".\r\n"
    auth = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    end = start_at + secs
    while time.time() < end:
        c = None
        try:
            c = SmtpConn(ctx, port, timeout=30)
            c.reply(b"220")
            c.cmd("EHLO client.bench.test", b"250")
            c.cmd(f"AUTH PLAIN {auth}", b"235")
            for _ in range(per_conn):
                if time.time() >= end:
                    break
                t0 = time.perf_counter()
                c.cmd(f"MAIL FROM:<{user}>", b"250")
                c.cmd("RCPT TO:<rcpt@bench.test>", b"250")
                c.cmd("DATA", b"354")
                c.sock.sendall(msg)
                c.reply(b"250")
                lat.append((time.perf_counter() - t0) * 1000.0)
            c.cmd("QUIT", b"221")
        except (OSError, SmtpError, ssl.SSLError) as e:
            errors += 1
            if first is None:
                first = f"{type(e).__name__}: {e}"
            time.sleep(0.05)
        finally:
            if c is not None:
                c.close()
    conn.send((len(lat), lat, errors, first))
    conn.close()


# ----------------------------------------------------------------------------- POP3


class Pop3Error(Exception):
    pass


class Pop3Conn(TlsConn):
    """One implicit-TLS POP3 connection (port 995 style)."""

    error = Pop3Error

    def ok(self):
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise Pop3Error(f"expected +OK, got {line[:200]!r}")
        return line

    def cmd(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.ok()


class Pop3Replies:
    """Counts complete POP3 multi-line replies (each ends in a line ".") in the raw byte stream
    of a socket, read with recv_into into `buf`. No parsing beyond that: dot-stuffing keeps
    "\r\n.\r\n" out of the message bodies, and no line of the bench's messages starts with
    "-ERR", so an error reply shows as "\n-ERR"."""

    END, ERR = b"\r\n.\r\n", b"\n-ERR"

    def __init__(self, sock, buf):
        self.sock, self.buf, self.mv = sock, buf, memoryview(buf)
        self.tail = b"\r\n"  # the last 4 bytes received (an -ERR as the first line shows too)
        self.total = self.done = 0

    def until(self, count):
        """Reads until `count` replies in all have arrived; returns the bytes received in all."""
        buf, mv = self.buf, self.mv
        while self.done < count:
            n = self.sock.recv_into(mv)
            if n == 0:
                raise Pop3Error(f"connection closed after {self.total} bytes, {self.done} replies")
            self.total += n
            # A marker across the two reads lies in the last 4 bytes before and the first 4 now.
            edge = self.tail + bytes(mv[:min(n, 4)])
            self.done += edge.count(self.END) + buf.count(self.END, 0, n)
            if self.ERR in edge or buf.find(self.ERR, 0, n) >= 0:
                data = self.tail + bytes(mv[:n])
                raise Pop3Error(f"after {self.done} replies: {data[data.find(self.ERR) + 1:][:200]!r}")
            self.tail = (self.tail + bytes(mv[max(0, n - 4):n]))[-4:]
        return self.total


def retr_all(ctx, port, user, password, count, passes, batch=100, buf_size=1 << 20, info=None):
    """POP3 download: USER/PASS, then RETR 1 .. `count` (no DELE) `passes` times on one
    connection, `batch` RETRs per write and two batches in flight, QUIT. Returns
    [(bytes, seconds)] per pass; `info` (a dict) gets the negotiated cipher suite."""
    c = Pop3Conn(ctx, port)
    note_cipher(c.sock, info)
    c.ok()
    c.cmd(f"USER {user}")
    c.cmd(f"PASS {password}")
    stat = c.cmd("STAT").split()
    if int(stat[1]) < count:
        raise Pop3Error(f"STAT: {int(stat[1])} messages, {count} wanted")
    if c.buf:
        raise Pop3Error(f"unexpected data before RETR: {c.buf[:120]!r}")
    buf = bytearray(buf_size)
    out = []
    for _ in range(passes):
        replies = Pop3Replies(c.sock, buf)
        t0 = time.perf_counter()
        for start in range(1, count + 1, batch):
            last = min(count, start + batch - 1)
            c.sock.sendall("".join(f"RETR {i}\r\n" for i in range(start, last + 1)).encode())
            replies.until(start - 1 - batch)
        n = replies.until(count)
        out.append((n, time.perf_counter() - t0))
    c.cmd("QUIT")
    c.close()
    return out
