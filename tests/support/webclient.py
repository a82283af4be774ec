"""A tiny web-step client on Python's standard library, for tests that need the real
HTTPS pages without a browser: keeps the session cookie by hand (it changes at each
sign-in step), reads the form token from each page, never follows redirects blindly.

usage: webclient.py BASE_URL CA_FILE USER PASSWORD ACTION...
actions: signin | enrol | totp:SECRET (the second step, with the current code) | backup:CODE (the
second step with a backup code) | app-password:LABEL | apple:FILE (presses "Set up an Apple
device" and saves the profile to FILE) | android:FILE (presses "Set up Thunderbird for Android"
and saves the page to FILE)
prints one JSON object with what it learnt (app_password, totp_secret, codes, status)."""

import base64, hashlib, hmac, html, json, re, ssl, struct, sys, time
import urllib.error, urllib.parse, urllib.request

base, ca, user, password, actions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
ctx = ssl.create_default_context(cafile=ca)
cookie = None
out = {}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect())


def request(method, path, fields=None, raw=False):
    global cookie
    data = urllib.parse.urlencode(fields).encode() if fields is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if cookie:
        req.add_header("Cookie", cookie)
    if method == "POST":
        req.add_header("Origin", base)
        req.add_header("Sec-Fetch-Site", "same-origin")
    try:
        resp = opener.open(req, timeout=30)
        status, headers, body = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read()
    body = body if raw else body.decode()
    for c in headers.get_all("Set-Cookie") or []:
        name_value = c.split(";")[0]
        if name_value.startswith("__Host-mailgate="):
            cookie = name_value if name_value.split("=", 1)[1] else None
    if raw:
        return status, headers, body
    return status, headers.get("Location"), body


def csrf(body):
    m = re.search(r'name="csrf" value="([^"]+)"', body)
    if not m:
        raise SystemExit("no form token on the page:\n" + body)
    return m.group(1)


def totp(secret):
    key = base64.b32decode(secret.replace(" ", "").upper() + "=" * (-len(secret.replace(" ", "")) % 8))
    step = int(time.time() // 30)
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000)


def page(path):
    status, location, body = request("GET", path)
    if status != 200:
        raise SystemExit(f"GET {path}: {status} {location}\n{body}")
    return body


for action in actions:
    if action == "signin":
        body = page("/login")
        status, location, body = request("POST", "/login", {"csrf": csrf(body), "username": user, "password": password})
        out["signin"] = [status, location]
        if status != 303:
            print(json.dumps(out))
            raise SystemExit(0)
    elif action == "enrol":
        body = page("/two-factor")
        secret = html.unescape(re.search(r'<code id="totp-secret">([^<]+)</code>', body).group(1))
        if 30 - time.time() % 30 < 3:
            time.sleep(4)
        status, location, body = request("POST", "/two-factor", {"csrf": csrf(body), "code": totp(secret)})
        if status != 200 or "backup-codes" not in body:
            raise SystemExit(f"enrolment failed: {status} {location}\n{body}")
        out["totp_secret"] = secret
        out["codes"] = re.findall(r"<li><code>([^<]+)</code></li>", body)
    elif action.startswith("totp:"):
        body = page("/login/totp")
        status, location, body = request("POST", "/login/totp", {"csrf": csrf(body), "code": totp(action[5:])})
        out["totp"] = [status, location]
    elif action.startswith("backup:"):
        body = page("/login/backup")
        status, location, body = request("POST", "/login/backup", {"csrf": csrf(body), "code": action[7:]})
        out["backup"] = [status, location]
    elif action.startswith("app-password:"):
        body = page("/app-passwords")
        label = action.split(":", 1)[1]
        status, location, body = request(
            "POST", "/app-passwords", {"csrf": csrf(body), "label": label, "scope_imap": "1", "scope_smtp": "1"}
        )
        m = re.search(r'<p class="secret" id="app-password"[^>]*>([^<]+)</p>', body)
        if status != 200 or not m:
            raise SystemExit(f"app password not made: {status} {location}\n{body}")
        out["app_password"] = html.unescape(m.group(1))
    elif action.startswith("apple:"):
        body = page("/app-passwords")
        status, headers, profile = request("POST", "/app-passwords/apple", {"csrf": csrf(body)}, raw=True)
        if status != 200:
            raise SystemExit(f"no profile: {status}\n{profile[:2000]!r}")
        with open(action.split(":", 1)[1], "wb") as f:
            f.write(profile)
        out.setdefault("apple", []).append({k: headers.get(k) for k in ("Content-Type", "Content-Disposition", "Cache-Control")})
    elif action.startswith("android:"):
        body = page("/app-passwords")
        status, location, body = request("POST", "/app-passwords/android", {"csrf": csrf(body)})
        if status != 200 or "<svg" not in body:
            raise SystemExit(f"no QR code page: {status} {location}\n{body}")
        with open(action.split(":", 1)[1], "w") as f:
            f.write(body)
    elif action == "account":
        out["account_page"] = page("/app-passwords")
print(json.dumps(out))
