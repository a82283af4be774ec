#!/usr/bin/python3
"""nginx mail `auth_http` endpoint for the benchmark (threaded, argon2id via argon2-cffi).

nginx asks GET /auth with Auth-User / Auth-Pass (URL-escaped). Users come from a
Dovecot-style passwd-file (`user:{ARGON2ID}$argon2id$...` or `user:{PLAIN}secret`).
On success the answer points nginx at the backend Dovecot and logs it in there as
`user*MASTER` with the master password; otherwise Auth-Status says why (and the bench
counts it as an error: the load must never fail a login).

SMTP (`Auth-Protocol: smtp`) is pointed at SMTP_PORT, where nginx logs in with the same
master credentials (`proxy_smtp_auth on`).

    auth_http.py PORT USERS_FILE BACKEND_HOST BACKEND_PORT MASTER_USER MASTER_PASSWORD_FILE [SMTP_PORT]
"""

import hmac
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import argon2

VERIFIER = argon2.PasswordHasher()
FAILURES = 0
LOCK = threading.Lock()


def load_users(path):
    users = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            name, rest = line.split(":", 1)
            users[name.lower()] = rest.split(":", 1)[0]
    return users


def check(stored, password):
    if stored.startswith("{ARGON2ID}"):
        try:
            return VERIFIER.verify(stored[len("{ARGON2ID}"):], password)
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHash:
            return False
    if stored.startswith("{PLAIN}"):
        return hmac.compare_digest(stored[len("{PLAIN}"):].encode(), password.encode())
    return False


def main():
    port, users_file, host, bport, master_user, master_file = sys.argv[1:7]
    smtp_port = sys.argv[7] if len(sys.argv) > 7 else None
    users = load_users(users_file)
    with open(master_file, encoding="utf-8") as f:
        master_password = f.readline().strip()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # no per-request log lines
            pass

        def do_GET(self):
            global FAILURES
            user = unquote(self.headers.get("Auth-User", ""))
            password = unquote(self.headers.get("Auth-Pass", ""))
            stored = users.get(user.lower())
            self.send_response(200)
            if stored is not None and check(stored, password):
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", host)
                smtp = self.headers.get("Auth-Protocol", "").lower() == "smtp"
                self.send_header("Auth-Port", smtp_port if smtp and smtp_port else bport)
                self.send_header("Auth-User", f"{user}*{master_user}")
                self.send_header("Auth-Pass", master_password)
            else:
                with LOCK:
                    FAILURES += 1
                self.send_header("Auth-Status", "Invalid login or password")
                self.send_header("Auth-Wait", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()

    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    print(f"auth_http: listening on 127.0.0.1:{port}, {len(users)} users", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
