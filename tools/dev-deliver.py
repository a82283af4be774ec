#!/usr/bin/env python3
"""Local delivery for the development Dovecot (tools/dev-dovecot.sh).

Dovecot's submission service only relays, over SMTP, to a `submission_relay_host`;
its LMTP service does not speak SMTP. This is that relay host: a small SMTP server on
loopback that hands every accepted message to `dovecot-lda` (one run per recipient),
so mail sent through mailgate lands in the recipient's Maildir of the same Dovecot and
can be read back over IMAP. Nothing leaves the machine: every recipient, whatever the
domain, is delivered locally.

    python3 tools/dev-deliver.py --port 1025 --config DIR/dovecot.conf

Only the standard library. Runs until SIGTERM/SIGINT. One line per delivery on stdout.
"""

import argparse
import os
import signal
import socketserver
import subprocess
import sys

MAX_SIZE = 50 * 1024 * 1024


def log(msg):
    print(f"dev-deliver: {msg}", flush=True)


class Handler(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.reply("220 dev-deliver.mailgate.test local delivery ready")
        sender, rcpts = None, []
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            cmd = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb):].strip()
            if verb == "EHLO":
                for cap in ("dev-deliver.mailgate.test", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
                    self.reply(f"250-{cap}")
                self.reply(f"250 SIZE {MAX_SIZE}")
            elif verb == "HELO":
                self.reply("250 dev-deliver.mailgate.test")
            elif verb == "MAIL" and arg.upper().startswith("FROM:"):
                sender, rcpts = address(arg[5:]), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT" and arg.upper().startswith("TO:"):
                if sender is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                rcpt = address(arg[3:])
                if not rcpt or "@" not in rcpt or rcpt.startswith("-"):
                    self.reply("550 5.1.3 Bad recipient address")
                    continue
                rcpts.append(rcpt)
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if not rcpts:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self.read_data()
                if data is None:
                    return
                self.reply(self.deliver(sender, rcpts, data))
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not implemented")

    def read_data(self):
        chunks, size = [], 0
        while True:
            line = self.rfile.readline()
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(chunks)
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if size <= MAX_SIZE:
                chunks.append(line)

    def deliver(self, sender, rcpts, data):
        failed = []
        for rcpt in rcpts:
            # Run as root, dovecot-lda looks the user up and switches to its uid.
            cmd = [self.server.lda, "-c", self.server.config, "-d", rcpt, "-f", sender or ""]
            p = subprocess.run(cmd, input=data, capture_output=True, check=False)
            if p.returncode == 0:
                log(f"delivered from <{sender}> to <{rcpt}> ({len(data)} bytes)")
            else:
                err = p.stderr.decode("utf-8", "replace").strip().replace("\n", " ")
                log(f"dovecot-lda failed for <{rcpt}> (exit {p.returncode}): {err}")
                failed.append(rcpt)
        if failed:
            return f"451 4.3.0 Local delivery failed for {', '.join(failed)} (see the dev-deliver output)"
        return "250 2.0.0 Delivered"


def address(s):
    s = s.strip()
    if s.startswith("<"):
        end = s.find(">")
        return s[1:end] if end > 0 else s[1:]
    return s.split(" ", 1)[0]


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--config", required=True, help="the Dovecot configuration file")
    ap.add_argument("--lda", default="/usr/lib/dovecot/dovecot-lda")
    args = ap.parse_args()
    if not os.access(args.lda, os.X_OK):
        sys.exit(f"dev-deliver: {args.lda} not found (Debian package dovecot-core)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Server(("127.0.0.1", args.port), Handler) as srv:
        srv.lda, srv.config = args.lda, args.config
        log(f"listening on 127.0.0.1:{args.port}, delivering with {args.lda}")
        try:
            srv.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
