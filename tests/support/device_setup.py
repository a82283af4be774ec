"""Checks what the one-step device set-ups of the web step hand out, as the device would
read it, and logs in with the password inside through mailgate (Python standard library,
plus openssl, rsvg-convert and zbarimg).

usage: device_setup.py apple PROFILE CA_FILE [--signed]
       device_setup.py android PAGE_HTML CA_FILE
Connects to localhost on the ports the profile or QR code names (the host they name is
printed, not used: the test's certificate is for localhost). Prints one JSON object."""

import html, imaplib, json, plistlib, re, smtplib, ssl, subprocess, sys, tempfile, os

kind, path, ca = sys.argv[1], sys.argv[2], sys.argv[3]
signed = "--signed" in sys.argv[4:]
ctx = ssl.create_default_context(cafile=ca)
out = {}

# Keys Apple's documentation marks as required: the profile's top level, every payload,
# and the com.apple.mail.managed payload; plus the ones this set-up relies on.
TOP_REQUIRED = ["PayloadContent", "PayloadDisplayName", "PayloadIdentifier", "PayloadType", "PayloadUUID",
                "PayloadVersion"]
PAYLOAD_REQUIRED = ["PayloadIdentifier", "PayloadType", "PayloadUUID", "PayloadVersion"]
MAIL_REQUIRED = ["EmailAccountType", "EmailAddress", "IncomingMailServerAuthentication", "IncomingMailServerHostName",
                 "IncomingMailServerPortNumber", "IncomingMailServerUseSSL", "IncomingMailServerUsername",
                 "IncomingPassword", "OutgoingMailServerAuthentication", "OutgoingMailServerHostName",
                 "OutgoingMailServerPortNumber", "OutgoingMailServerUseSSL", "OutgoingMailServerUsername",
                 "OutgoingPassword", "OutgoingPasswordSameAsIncomingPassword", "EmailAccountDescription"]


def fail(why):
    out["failure"] = why
    print(json.dumps(out))
    raise SystemExit(1)


def imap_login(port, user, password):
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx) as c:
        typ, _ = c.login(user, password)
        typ2, _ = c.select("INBOX")
        c.logout()
        return f"{typ} {typ2}"


def smtp_login(port, user, password, implicit=True):
    if implicit:
        s = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=30)
    else:
        s = smtplib.SMTP("localhost", port, timeout=30)
        s.starttls(context=ctx)
    code, _ = s.login(user, password)
    s.quit()
    return code


if kind == "apple":
    data = open(path, "rb").read()
    if signed:
        if data.startswith(b"<?xml"):
            fail("the profile is not signed")
        r = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-CAfile", ca, "-in", path],
                           capture_output=True, timeout=60)
        out["openssl"] = r.stderr.decode().strip()
        if r.returncode != 0:
            fail("openssl cms -verify: " + r.stderr.decode())
        data = r.stdout
    p = plistlib.loads(data)
    missing = [k for k in TOP_REQUIRED if k not in p]
    if p.get("PayloadType") != "Configuration" or p.get("PayloadVersion") != 1 or missing:
        fail(f"top level: missing {missing}, type {p.get('PayloadType')}")
    mail = p["PayloadContent"][0]
    missing = [k for k in PAYLOAD_REQUIRED + MAIL_REQUIRED if k not in mail]
    if missing or mail["PayloadType"] != "com.apple.mail.managed" or mail["EmailAccountType"] != "EmailTypeIMAP":
        fail(f"mail payload: missing {missing}")
    for k in ("IncomingMailServerAuthentication", "OutgoingMailServerAuthentication"):
        if mail[k] != "EmailAuthPassword":
            fail(f"{k} = {mail[k]}")
    if mail["OutgoingPasswordSameAsIncomingPassword"] is not False:
        fail("OutgoingPasswordSameAsIncomingPassword is not false")
    out.update(uuid=p["PayloadUUID"], identifier=p["PayloadIdentifier"], account_uuid=mail["PayloadUUID"],
               organisation=p.get("PayloadOrganization"), host=mail["IncomingMailServerHostName"],
               smtp_host=mail["OutgoingMailServerHostName"], imap_port=mail["IncomingMailServerPortNumber"],
               smtp_port=mail["OutgoingMailServerPortNumber"], password=mail["IncomingPassword"])
    out["imap"] = imap_login(mail["IncomingMailServerPortNumber"], mail["IncomingMailServerUsername"],
                             mail["IncomingPassword"])
    out["smtp"] = smtp_login(mail["OutgoingMailServerPortNumber"], mail["OutgoingMailServerUsername"],
                             mail["OutgoingPassword"])
elif kind == "android":
    page = open(path).read()
    m = re.search(r"<svg.*?</svg>", page, re.S)
    if not m:
        fail("no SVG on the page")
    with tempfile.TemporaryDirectory() as d:
        svg, png = os.path.join(d, "qr.svg"), os.path.join(d, "qr.png")
        with open(svg, "w") as f:
            f.write(m.group(0))
        subprocess.run(["rsvg-convert", "-w", "600", "-b", "white", "-o", png, svg], check=True, timeout=60)
        r = subprocess.run(["zbarimg", "--raw", "-q", png], capture_output=True, timeout=60)
        if r.returncode != 0:
            fail("zbarimg read nothing: " + r.stderr.decode())
    text = r.stdout.decode().strip()
    out["qr"] = text
    q = json.loads(text)
    # Thunderbird's "Export for Mobile" QR code format, version 1: the types of each element.
    ok = (isinstance(q, list) and len(q) == 4 and q[0] == 1 and q[1] == [1, 1]
          and isinstance(q[2], list) and len(q[2]) in (6, 7, 8) and q[2][0] == 0
          and all(isinstance(x, str) for x in (q[2][1], q[2][5]))
          and all(isinstance(x, int) for x in (q[2][2], q[2][3], q[2][4]))
          and q[2][3] in (0, 2, 3) and q[2][4] in range(0, 7) and 1 <= q[2][2] <= 65535
          and isinstance(q[3], list) and len(q[3]) >= 1)
    if not ok:
        fail("not the published format (incoming server): " + text)
    group = q[3][0]
    smtp, identity = group[0], group[1]
    ok = (smtp[0] == 0 and isinstance(smtp[1], str) and isinstance(smtp[2], int) and smtp[3] in (0, 2, 3)
          and smtp[4] in range(0, 7) and isinstance(smtp[5], str) and len(smtp) in (6, 7)
          and isinstance(identity, list) and len(identity) == 2 and all(isinstance(x, str) for x in identity)
          and "@" in identity[0])
    if not ok:
        fail("not the published format (outgoing server group): " + text)
    password = q[2][7] if len(q[2]) > 7 else None
    if not password or smtp[6] != password:
        fail("no password in the QR code")
    out.update(host=q[2][1], imap_port=q[2][2], imap_security=q[2][3], smtp_port=smtp[2], smtp_security=smtp[3],
               user=q[2][5], email=identity[0], password=password)
    out["imap"] = imap_login(q[2][2], q[2][5], password)
    out["smtp"] = smtp_login(smtp[2], smtp[5], password, implicit=smtp[3] == 3)
    # The plain text block for other apps names the same password, grouped in fours.
    block = re.search(r'<pre class="settings-text"[^>]*>(.*?)</pre>', page, re.S)
    out["settings_text"] = html.unescape(block.group(1)) if block else None
else:
    fail("unknown kind " + kind)
print(json.dumps(out))
