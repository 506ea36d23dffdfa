"""A real SMTP server for the tests (aiosmtpd), on loopback.

Usage: smtp_sink.py DIR [CERT KEY]. Prints the port it listens on, then writes every message it
takes to DIR/NNNN.json ({from, to, subject, message_id, body, tls}, the body decoded from its
transfer encoding; tls: whether the session was upgraded with STARTTLS). With CERT and KEY it
offers STARTTLS and refuses mail before it. While DIR/fail holds a number N > 0, it refuses the next N messages with a 451 (a
passing failure), writes each refused one to DIR/refused-NNNN.json, and counts N down.
"""

import asyncio
import email
import email.policy
import json
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP

OUT = sys.argv[1]


def parsed(session, envelope):
    message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain",))
    return {
        "from": envelope.mail_from,
        "to": envelope.rcpt_tos,
        "subject": str(message["subject"] or ""),
        "message_id": str(message["message-id"] or ""),
        "body": body.get_content() if body is not None else "",
        "tls": session.ssl is not None,
    }


def write(name, record):
    tmp = os.path.join(OUT, "." + name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.rename(tmp, os.path.join(OUT, name))


class Sink:
    def __init__(self):
        self.taken = 0
        self.refused = 0

    async def handle_DATA(self, server, session, envelope):
        fail = os.path.join(OUT, "fail")
        try:
            with open(fail, encoding="utf-8") as f:
                left = int(f.read().strip() or "0")
        except FileNotFoundError:
            left = 0
        if left > 0:
            with open(fail, "w", encoding="utf-8") as f:
                f.write(str(left - 1))
            self.refused += 1
            write("refused-%04d.json" % self.refused, parsed(session, envelope))
            return "451 4.3.0 try again later"
        self.taken += 1
        write("%04d.json" % self.taken, parsed(session, envelope))
        return "250 2.0.0 OK"


async def main():
    sink = Sink()
    loop = asyncio.get_running_loop()
    tls = {}
    if len(sys.argv) > 3:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
        tls = {"tls_context": context, "require_starttls": True}
    server = await loop.create_server(lambda: SMTP(sink, **tls), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
