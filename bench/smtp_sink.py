#!/usr/bin/python3
"""SMTP relay sink for the benchmark: Dovecot submission's `submission_relay_host`.

Accepts every message (EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; PIPELINING), counts
it and throws it away. asyncio, one process: it is part of the backend, the same for
every proxy measured in front of Dovecot submission.

    smtp_sink.py PORT
"""

import asyncio
import sys

COUNT = 0
EOD = b"\r\n.\r\n"


async def session(reader, writer):
    global COUNT
    writer.write(b"220 sink.bench.test ESMTP sink\r\n")
    buf = b""
    try:
        while True:
            i = buf.find(b"\r\n")
            if i < 0:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                continue
            line, buf = buf[:i], buf[i + 2:]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                             b"250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                # The message ends at CRLF.CRLF; the data so far starts right after DATA's line.
                data = b"\r\n" + buf
                while True:
                    j = data.find(EOD)
                    if j >= 0:
                        buf = data[j + len(EOD):]
                        break
                    more = await reader.read(262144)
                    if not more:
                        return
                    data = data[-(len(EOD) - 1):] + more
                COUNT += 1
                writer.write(b"250 2.0.0 accepted\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 ok\r\n")
            else:
                writer.write(b"502 5.5.1 not here\r\n")
            if not buf:
                await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    server = await asyncio.start_server(session, "127.0.0.1", port, backlog=1024)
    print(f"smtp_sink: listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
