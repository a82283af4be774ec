#!/usr/bin/env python3
"""The stand-in system browser for Thunderbird's OAuth sign-in (thunderbird.py
--oauth-browser): does what a person does in mailgate's web step, on Python's standard
library only.

usage: oauth_browser.py AUTHORIZATION_URL
environment: TB_OAUTH_USER, TB_OAUTH_PASSWORD (the account password), MG_TOTP_SECRET
(base32; the second step's code is computed from it), MG_CA (the web step's CA file),
TB_OAUTH_DENY=1 (press Deny on the consent page instead of Allow).

It GETs the URL, and on each page fills the first form the way a person would (address,
password, the current TOTP code; hidden fields kept), presses Allow (or Deny), follows
the web step's redirects itself (keeping the cookies), and finally requests the redirect
to Thunderbird's loopback listener. Every step is printed to stdout, for the log."""

import base64, hashlib, hmac, html.parser, os, ssl, struct, sys, time
import urllib.error, urllib.parse, urllib.request

url = sys.argv[1]
user = os.environ.get("TB_OAUTH_USER", "")
password = os.environ.get("TB_OAUTH_PASSWORD", "")
secret = os.environ.get("MG_TOTP_SECRET", "")
deny = os.environ.get("TB_OAUTH_DENY") == "1"
ctx = ssl.create_default_context(cafile=os.environ["MG_CA"]) if os.environ.get("MG_CA") else ssl.create_default_context()
origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(url))
cookies = {}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect())


def totp(b32):
    key = base64.b32decode(b32.upper() + "=" * (-len(b32) % 8))
    t = int(time.time()) // 30
    d = hmac.new(key, struct.pack(">Q", t), hashlib.sha1).digest()
    o = d[-1] & 15
    return "%06d" % ((struct.unpack(">I", d[o : o + 4])[0] & 0x7FFFFFFF) % 1000000)


def request(method, target, fields=None):
    data = urllib.parse.urlencode(fields).encode() if fields is not None else None
    req = urllib.request.Request(target, data=data, method=method)
    if cookies:
        req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
    if method == "POST":
        req.add_header("Origin", origin)
        req.add_header("Sec-Fetch-Site", "same-origin")
    try:
        resp = opener.open(req, timeout=30)
        status, headers, body = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read().decode()
    for c in headers.get_all("Set-Cookie") or []:
        name, _, rest = c.partition("=")
        cookies[name.strip()] = rest.split(";", 1)[0]
    print(f"{method} {urllib.parse.urlsplit(target).path} -> {status} {headers.get('Location') or ''}", flush=True)
    return status, headers.get("Location"), body


class Forms(html.parser.HTMLParser):
    """The page's forms: action, method, inputs (name, type, value) and buttons."""

    def __init__(self):
        super().__init__()
        self.forms = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action") or "", "method": (a.get("method") or "get").upper(), "inputs": [], "buttons": []})
        elif self.forms and tag == "input":
            kind = (a.get("type") or "text").lower()
            if kind == "submit":
                self.forms[-1]["buttons"].append((a.get("name"), a.get("value") or "", a.get("value") or ""))
            else:
                self.forms[-1]["inputs"].append((a.get("name"), kind, a.get("value") or ""))
        elif self.forms and tag == "button":
            self.forms[-1]["buttons"].append((a.get("name"), a.get("value") or "", ""))
            self._button = self.forms[-1]["buttons"]
        else:
            return

    def handle_data(self, data):
        # The text of the last <button> names it ("Allow", "Deny").
        buttons = getattr(self, "_button", None)
        if buttons and not buttons[-1][2].strip():
            name, value, _ = buttons[-1]
            buttons[-1] = (name, value, data.strip())

    def handle_endtag(self, tag):
        if tag == "button":
            self._button = None


def fill(form):
    fields = {}
    for name, kind, value in form["inputs"]:
        if not name:
            continue
        n = name.lower()
        if kind == "hidden":
            fields[name] = value
        elif kind == "password":
            fields[name] = password
        elif kind in ("checkbox", "radio"):
            continue
        elif any(w in n for w in ("code", "totp", "otp")):
            if not secret:
                raise SystemExit("the page asks for a second-factor code and MG_TOTP_SECRET is not set")
            if 30 - time.time() % 30 < 2:
                time.sleep(3)
            fields[name] = totp(secret)
        elif any(w in n for w in ("user", "email", "address", "login")):
            fields[name] = value or user
        else:
            fields[name] = value
    want = ("deny", "cancel", "no") if deny else ("allow", "approve", "accept", "continue", "sign in", "verify", "yes")
    chosen = None
    for name, value, text in form["buttons"]:
        label = (text or value or "").lower()
        if any(w in label for w in want):
            chosen = (name, value)
            break
    if chosen is None and form["buttons"] and not deny:
        name, value, _ = form["buttons"][0]
        chosen = (name, value)
    if chosen and chosen[0]:
        fields[chosen[0]] = chosen[1]
    return fields


def loopback(location):
    host = urllib.parse.urlsplit(location).hostname or ""
    return location.startswith("http://") and host in ("localhost", "127.0.0.1", "::1")


status, location, body = request("GET", url)
for _ in range(12):
    if status in (301, 302, 303, 307, 308) and location:
        target = urllib.parse.urljoin(url, location)
        if loopback(target):
            # Thunderbird's listener: the answer (code or error) goes home.
            print("redirect to the app:", urllib.parse.urlsplit(target).query.split("code=")[0] + ("code=…" if "code=" in target else ""), flush=True)
            try:
                urllib.request.urlopen(target, timeout=30).read()
            except Exception as e:  # the listener may close without an HTTP answer
                print("loopback:", e, flush=True)
            sys.exit(0)
        url = target
        status, location, body = request("GET", url)
        continue
    if status != 200:
        raise SystemExit(f"unexpected answer {status}:\n{body[:2000]}")
    p = Forms()
    p.feed(body)
    forms = [f for f in p.forms if f["method"] == "POST"]
    if not forms:
        raise SystemExit(f"no form on the page:\n{body[:2000]}")
    form = forms[0]
    if not deny:
        # The form whose button does what the person came for (not, say, Sign out in the
        # page's header).
        for f in forms:
            if any(any(w in (t or v).lower() for w in ("allow", "approve", "sign in", "verify", "continue")) for _, v, t in f["buttons"]):
                form = f
                break
    if deny:
        # A person who says no presses Deny where the page offers it.
        for f in forms:
            if any(any(w in (t or v).lower() for w in ("deny", "cancel")) for _, v, t in f["buttons"]):
                form = f
                break
    fields = fill(form)
    status, location, body = request("POST", urllib.parse.urljoin(url, form["action"] or url), fields)
raise SystemExit("the sign-in did not finish within 12 pages")
