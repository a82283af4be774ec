#!/usr/bin/env python3
"""Drives Debian's headless Chromium through chromedriver (W3C WebDriver over HTTP, Python
standard library only) through mailgate's web step, as a person would:

  full mode   sign in with the account password, turn on two-step verification (key read
              from the page, TOTP computed here; the page must say it is on and that mail
              apps using the account password stop now), read and download the backup
              codes, sign out ("signed out"), leave a sign-in with a wrong code by Cancel,
              sign in again with a typo and a backup code (the security notice lists the
              cancelled sign-in's code only; dismiss it), make an app password (no scope
              first: the name is kept; then IMAP only: only IMAP settings); writes JSON
              {app_password, backup_codes, used_backup_code, download, ...} to --out.
  reuse mode  sign in with the account password and --backup-code, which must be refused.
  after mode  sign in with the unused --backup-code (the notice lists reuse mode's wrong
              code; dismiss it), revoke the app password (one open connection: singular),
              make new backup codes and turn two-step verification off, each after its
              question; the refused devices list goes with 2FA.
  scopes mode with POP3 and ManageSieve on: sign in (no second factor), the form offers
              their boxes unticked; make an app password for all four scopes; the page
              lists the settings of each (JSON: settings, app_password_rows).
  devices mode the one-step set-ups: sign in (no second factor), the account page offers
              both buttons (shot: device-setup); "Set up an Apple device" downloads the
              profile (the page stays); "Set up Thunderbird for Android" shows the QR code
              and the settings (shot: android-setup); the password is selectable as a
              whole (user-select: all) and the script adds a Copy button that selects
              it; the created page of the form has the button too (JSON: profile,
              android_password, selected).
  stale mode  sign in (no second factor); the app password list's row of --label has the
              stale mark ("Not used for over N days", class stale; shot: devices-stale),
              or with --fresh has none and nothing is shot (JSON: stale_row).
  oauth mode  with [oauth] on, as Thunderbird's external sign-in: a loopback listener here
              is the app; the browser opens /oauth/authorize (PKCE S256, login_hint),
              signs in, denies on the consent page (the listener gets error=access_denied
              with state and iss), opens it again (signed in: straight to consent), allows
              (the listener gets code, state, iss), then this script redeems the code and
              the refresh token at /oauth/token and checks the device list (JSON: denied,
              allowed, tokens, refreshed, device_rows).

Each page is shot at 390 and 1280 px (--widths; NAME-390.png, NAME-1280.png), and fails
if it is wider than the window; with --organisation, each checked page's header and title
must show it.

Every wait has a deadline and the whole run has one (--deadline, SIGALRM); chromedriver
runs in its own process group and is ended by PID (with Chromium, its child) on any exit.
Screenshots of each page go to --screenshots. Used by tests/web.rs.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HTTP_TIMEOUT = 30  # seconds for one WebDriver command
WAIT = 15  # seconds for a page or element to show up
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

T0 = time.monotonic()


def log(*args):
    print(f"[{time.monotonic() - T0:6.2f}s]", *args, flush=True)


class Failure(Exception):
    pass


class Refused(Failure):
    """mailgate answered with an error page: no point waiting for the expected one."""


# ---------------------------------------------------------------------------------------
# TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps) and the certificate pin.


def totp(base32_secret, at=None):
    key = base32_secret.replace(" ", "").upper()
    key = base64.b32decode(key + "=" * (-len(key) % 8))
    step = int((time.time() if at is None else at) // 30)
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[off : off + 4])[0] & 0x7FFFFFFF
    return f"{value % 1_000_000:06d}"


def _der(buf, pos):
    """One DER TLV at pos: (tag, start of value, end of value)."""
    tag = buf[pos]
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    return tag, pos, pos + length


def spki_pin(cert_pem_path):
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in a PEM file: what
    Chromium's --ignore-certificate-errors-spki-list takes, so only that key is accepted."""
    text = open(cert_pem_path, encoding="ascii").read()
    body = text.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    der = base64.b64decode("".join(body.split()))
    _, cert_start, _ = _der(der, 0)  # Certificate
    _, tbs, _ = _der(der, cert_start)  # TBSCertificate
    pos = tbs
    if der[pos] == 0xA0:  # [0] version
        pos = _der(der, pos)[2]
    for _ in range(5):  # serial, signature, issuer, validity, subject
        pos = _der(der, pos)[2]
    _, _, end = _der(der, pos)
    return base64.b64encode(hashlib.sha256(der[pos:end]).digest()).decode()


# ---------------------------------------------------------------------------------------
# A minimal W3C WebDriver client.


def free_port():
    """A free loopback port below the kernel's ephemeral range (as daemon.rs's pick_ports:
    a released port from that range can become any outgoing connection's source port)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        high = 32768
    for _ in range(1000 if high > 11000 else 0):
        port = random.randrange(10000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """PIDs of pid's descendants (from /proc), children first."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class Driver:
    def __init__(self, workdir, pin, width, height):
        self.workdir = workdir
        self.downloads = os.path.join(workdir, "downloads")
        os.makedirs(self.downloads, exist_ok=True)
        self.port = free_port()
        self.log_path = os.path.join(workdir, "chromedriver.log")
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", f"--log-path={self.log_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: ended as a whole by PID
        )
        self.pids_file = os.environ.get("MAILGATE_BROWSER_PIDS")
        if self.pids_file:
            with open(self.pids_file, "w", encoding="ascii") as f:
                f.write(f"{self.proc.pid}\n")
        self.base = f"http://127.0.0.1:{self.port}"
        self.session = None
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if self._http("GET", "/status").get("ready"):
                    break
            except (OSError, Failure):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"chromedriver did not start (exit {self.proc.poll()})\n{self.driver_log()}")
            time.sleep(0.1)
        args = [
            "--headless=new",
            "--no-sandbox",  # root in a container: no user namespaces for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--password-store=basic",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
            f"--user-data-dir={os.path.join(workdir, 'profile')}",
            f"--crash-dumps-dir={workdir}",
        ]
        # For debugging, e.g. MAILGATE_CHROMIUM_ARGS="--log-net-log=/tmp/net.json --net-log-capture-mode=Everything"
        args += os.environ.get("MAILGATE_CHROMIUM_ARGS", "").split()
        if pin:
            # Accept exactly mailgate's test key, not any certificate.
            args.append(f"--ignore-certificate-errors-spki-list={pin}")
        else:
            args.append("--ignore-certificate-errors")
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": not pin,
                    "pageLoadStrategy": "normal",
                    "timeouts": {"implicit": 0, "pageLoad": WAIT * 1000, "script": 10_000},
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": args,
                        "prefs": {
                            "download.default_directory": self.downloads,
                            "download.prompt_for_download": False,
                            "download.directory_upgrade": True,
                            "safebrowsing.enabled": False,
                            "credentials_enable_service": False,
                            "profile.password_manager_enabled": False,
                        },
                    },
                }
            }
        }
        value = self._http("POST", "/session", caps)
        self.session = value["sessionId"]
        log("chromium", value["capabilities"].get("browserVersion"), "via chromedriver on port", self.port)

    def driver_log(self, lines=40):
        """The end of chromedriver's log, long lines (screenshots) cut short."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(line if len(line) < 300 else line[:300] + "…" for line in tail)

    def _http(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json; charset=utf-8")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
                payload = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            payload = json.loads(e.read() or b"{}")
            value = payload.get("value", {})
            raise Failure(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}") from None
        return payload.get("value")

    def cmd(self, method, path, body=None):
        return self._http(method, f"/session/{self.session}{path}", body)

    # Navigation and pages.

    def go(self, url):
        self.cmd("POST", "/url", {"url": url})

    def url(self):
        return self.cmd("GET", "/url")

    def path(self):
        return urllib.parse.urlsplit(self.url()).path

    def title(self):
        return self.cmd("GET", "/title")

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, what, check, timeout=WAIT):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                got = check()
                if got:
                    return got
            except Refused:
                raise
            except Failure as e:
                last = e
            if time.monotonic() > deadline:
                raise Failure(f"timed out after {timeout} s waiting for {what} (at {self.url()}: {last or ''})")
            time.sleep(0.1)

    def at(self, path, heading=None):
        """Waits until the loaded page is `path` (and shows `heading` as its h1)."""

        def loaded():
            if self.js("return document.readyState") != "complete":
                return False
            h1 = self.js("const h = document.querySelector('h1'); return h ? h.textContent : ''")
            if h1 in ("Request refused", "Something went wrong") and h1 != heading:
                hint = ""
                if h1 == "Request refused":
                    # Chromium (and the Fetch standard) send "Origin: null" on a form POST
                    # from a page served with "Referrer-Policy: no-referrer".
                    hint = " (the same-origin check refused the browser's form POST: does it accept what browsers send?)"
                text = self.js("return document.body.innerText")
                raise Refused(f"mailgate answered {h1!r} at {self.url()}{hint}: {text}")
            if self.path() != path:
                return False
            return heading is None or h1 == heading

        self.wait(f"page {path}" + (f" with heading {heading!r}" if heading else ""), loaded)
        # The stylesheet really applied (not a bare page): the header is styled by /style.css.
        sheets = self.js("return Array.from(document.styleSheets).map(s => s.cssRules.length)")
        if not sheets or not sheets[0]:
            raise Failure(f"no CSS on {path}: {sheets}")

    # Elements.

    def find_all(self, css):
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def find(self, css, timeout=WAIT):
        return self.wait(f"element {css}", lambda: (self.find_all(css) or [None])[0], timeout)

    def link(self, text):
        found = lambda: [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "link text", "value": text})]
        return self.wait(f"link {text!r}", lambda: (found() or [None])[0])

    def text(self, css):
        return self.cmd("GET", f"/element/{self.find(css)}/text")

    def body_text(self):
        return self.text("body")

    def type(self, css, value):
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear", {})
        self.cmd("POST", f"/element/{el}/value", {"text": value})

    def click(self, element):
        self.cmd("POST", f"/element/{element}/click", {})

    # Screenshots and downloads.

    def screenshot(self, directory, name, width, check=True):
        """The whole page: the window is made as tall as the document first (measured in a
        short window, so that the height is the content's, plus the window's own frame).
        Fails if the page is wider than the window (a horizontal scroll bar)."""
        self.cmd("POST", "/window/rect", {"width": width, "height": 400})
        content, frame, scroll_width, inner_width = self.js(
            "return [Math.ceil(document.documentElement.scrollHeight), window.outerHeight - window.innerHeight,"
            " document.documentElement.scrollWidth, window.innerWidth]"
        )
        if check and inner_width != width:
            raise Failure(f"{name}: the window is {inner_width} px wide, not {width}")
        if check and scroll_width > inner_width:
            wide = self.js(
                "return Array.from(document.querySelectorAll('body *'))"
                ".filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)"
                ".slice(0, 5).map(e => e.tagName + (e.id ? '#' + e.id : '') + ' ' + Math.round(e.getBoundingClientRect().right))"
            )
            raise Failure(f"{name}: the page is {scroll_width} px wide in a {width}-px window: {wide}")
        self.cmd("POST", "/window/rect", {"width": width, "height": int(content) + 24 + max(int(frame), 0)})
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        if not png.startswith(b"\x89PNG"):
            raise Failure(f"screenshot {name} is not a PNG")
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(png)
        log("screenshot", path, f"{len(png)} bytes")

    def shots(self, a, name):
        """Screenshots NAME-390.png and NAME-1280.png (each of a.widths), each checked for
        a page wider than the window; then the window goes back to a.width."""
        for width in a.widths:
            self.screenshot(a.screenshots, f"{name}-{width}.png", width)
        self.cmd("POST", "/window/rect", {"width": a.width, "height": 800})

    def allow_downloads(self):
        """Headless Chromium drops downloads unless told where to put them (CDP)."""
        try:
            self.cmd(
                "POST",
                "/goog/cdp/execute",
                {"cmd": "Browser.setDownloadBehavior", "params": {"behavior": "allow", "downloadPath": self.downloads}},
            )
            return "prefs+cdp"
        except Failure as e:
            log("Browser.setDownloadBehavior failed, relying on prefs:", e)
            return "prefs"

    def wait_download(self, name, timeout=WAIT):
        path = os.path.join(self.downloads, name)

        def done():
            files = os.listdir(self.downloads)
            return os.path.exists(path) and not any(f.endswith(".crdownload") for f in files)

        self.wait(f"download {name} (have {os.listdir(self.downloads)})", done, timeout)
        with open(path, "rb") as f:
            return f.read()

    def quit(self):
        """Ends the session (Chromium quits), then chromedriver and anything left, by PID."""
        if self.session:
            try:
                self._http("DELETE", f"/session/{self.session}")
            except (OSError, Failure) as e:
                log("delete session:", e)
            self.session = None
        if self.proc:
            pids = descendants(self.proc.pid)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in [self.proc.pid, *pids]:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self.proc.wait(timeout=5)
                    if not any(os.path.exists(f"/proc/{p}") for p in pids):
                        break
                except subprocess.TimeoutExpired:
                    pass
            self.proc = None
            if self.pids_file:
                try:
                    os.remove(self.pids_file)
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------
# The flows.


def sign_in(d, a, expect_path, shot=None):
    """Fills in the sign-in form (screenshots `shot` of it filled in) and sends it."""
    d.go(a.url + "/login")
    d.at("/login", "Sign in")
    d.type("#username", a.user)
    d.type("#password", a.password)
    if shot:
        d.shots(a, shot)
    d.click(d.find('form[action="/login"] button[type="submit"]'))
    d.at(expect_path)


def sign_out(d):
    d.click(d.find('form[action="/logout"] button'))
    d.at("/login", "Sign in")


def submit(d, form_action):
    d.click(d.find(f'form[action="{form_action}"] button[type="submit"]'))


def expect(d, what, *texts, absent=()):
    """The page shows each of `texts` and none of `absent`; returns its text."""
    page = d.body_text()
    for t in texts:
        if t not in page:
            raise Failure(f"{what}: expected {t!r} at {d.path()}:\n{page}")
    for t in absent:
        if t in page:
            raise Failure(f"{what}: did not expect {t!r} at {d.path()}:\n{page}")
    return page


def check_site(d, a):
    """`[web] organisation` heads the page and ends its title."""
    if not a.organisation:
        return
    title = d.title()
    if not title.endswith(f" · {a.organisation}"):
        raise Failure(f"the title {title!r} does not end with the organisation {a.organisation!r}")
    brand = d.text("header .brand").strip()
    if brand != a.organisation:
        raise Failure(f"the header shows {brand!r}, not the organisation {a.organisation!r}")


def wrong_totp(secret):
    """A 6-digit code that is not valid now (nor two steps either side)."""
    now = time.time()
    near = {totp(secret, now + k * 30) for k in range(-2, 3)}
    return next(c for c in (f"{n:06d}" for n in range(1000)) if c not in near)


def checked(d, css):
    return d.cmd("GET", f"/element/{d.find(css)}/selected")


def full(d, a, result):
    timings = result["timings"]

    def mark(what, since):
        timings[what] = round(time.monotonic() - since, 2)
        return time.monotonic()

    t = time.monotonic()
    # 1. The account password alone signs in: there is no second factor yet.
    sign_in(d, a, "/app-passwords", "signin")
    d.at("/app-passwords", "App passwords")
    check_site(d, a)
    expect(d, "2FA off", "Two-step verification is off")
    t = mark("sign_in", t)

    # 2. Enrol TOTP: the steps in the order they are read (the QR code in step 1); read
    # the key from the page, type the current code.
    d.click(d.link("Turn on two-step verification"))
    d.at("/two-factor", "Turn on two-step verification")
    check_site(d, a)
    secret = d.text("#totp-secret").strip()
    if len(secret.replace(" ", "")) < 16:
        raise Failure(f"TOTP key looks wrong: {secret!r}")
    qr = d.js("const s = document.querySelector('#step-scan figure.qr svg'); return s ? s.getBoundingClientRect().width : 0")
    if not qr or qr < 150:
        raise Failure(f"no QR code in step 1 of the enrolment page (width {qr})")
    tops = d.js(
        "return ['#step-scan', '#step-scan svg', '#step-key', '#totp-secret', '#step-code', '#code']"
        ".map(s => document.querySelector(s).getBoundingClientRect().top)"
    )
    if tops != sorted(tops):
        raise Failure(f"the enrolment page is not in the order of its steps: {tops}")
    d.shots(a, "enrol")
    # A code near the end of its 30-s step may expire on the way; wait for a fresh one.
    if 30 - time.time() % 30 < 3:
        time.sleep(30 - time.time() % 30 + 0.2)
    d.type("#code", totp(secret))
    submit(d, "/two-factor")
    d.at("/two-factor", "Two-step verification is on")
    expect(d, "2FA turned on", "Mail apps that use your account password stop working now.")
    t = mark("enrol_totp", t)

    # 3. The backup codes: on the page, and as a downloaded text file.
    elements = d.find_all("#backup-codes li code")
    codes = [d.cmd("GET", f"/element/{e}/text").strip() for e in elements]
    if len(codes) != 10 or len(set(codes)) != 10:
        raise Failure(f"expected 10 different backup codes, got {codes}")
    d.shots(a, "backup-codes")
    result["download"] = d.allow_downloads()
    d.click(d.find('a[href="/backup-codes.txt"]'))
    text = d.wait_download("backup-codes.txt").decode("utf-8")
    lines = [line.strip() for line in text.splitlines()]
    in_file = [line for line in lines if line in codes]
    if in_file != codes:
        raise Failure(f"downloaded file does not list the codes shown:\n{text}\nshown: {codes}")
    if a.user not in text:
        raise Failure(f"downloaded file does not name the account:\n{text}")
    result["download_file"] = text
    # Still on the codes page after the download.
    d.at("/two-factor", "Two-step verification is on")
    t = mark("backup_codes", t)

    # 4. Sign out: the sign-in page says so.
    sign_out(d)
    expect(d, "signed out", "You are signed out.")
    d.shots(a, "signed-out")

    # 5. A sign-in that gets a wrong code and is cancelled, as someone who knows the
    # password but not the code might leave it: the second step names the account.
    sign_in(d, a, "/login/totp")
    d.at("/login/totp", "Two-step verification")
    expect(d, "second step", f"Signing in as {a.user}.", "Cancel sign-in")
    d.shots(a, "second-factor")
    d.type("#code", wrong_totp(secret))
    submit(d, "/login/totp")
    d.wait("the wrong-code message", lambda: "That code is not right" in d.body_text())
    d.click(d.find('form[action="/login/cancel"] button'))
    d.at("/login", "Sign in")
    expect(d, "cancelled", "The sign-in was cancelled.")
    d.shots(a, "sign-in-cancelled")
    t = mark("cancelled_sign_in", t)

    # 6. Sign in again: a typo of one's own, then a backup code.
    sign_in(d, a, "/login/totp")
    d.type("#code", wrong_totp(secret))
    submit(d, "/login/totp")
    d.wait("the wrong-code message", lambda: "That code is not right" in d.body_text())
    d.click(d.link("Use a backup code instead"))
    d.at("/login/backup", "Two-step verification")
    used = codes[3]
    d.type("#code", used)
    d.shots(a, "second-factor-backup")
    submit(d, "/login/backup")
    d.at("/app-passwords", "App passwords")
    expect(d, "backup code sign-in", "9 backup codes are left", "Backup codes left: 9", "Two-step verification is on")
    # The security notice: the cancelled sign-in's wrong code with its time and address,
    # not this sign-in's own typo.
    items = [d.cmd("GET", f"/element/{e}/text") for e in d.find_all("#security-notice li")]
    if len(items) != 1 or "127.0.0.1" not in items[0] or "UTC" not in items[0]:
        raise Failure(f"expected the security notice to list one wrong code from 127.0.0.1, got {items}")
    d.shots(a, "security-notice")
    submit(d, "/security-notice")
    d.at("/app-passwords", "App passwords")
    d.go(a.url + "/app-passwords")
    d.at("/app-passwords", "App passwords")
    if d.find_all("#security-notice"):
        raise Failure("the security notice came back after it was dismissed")
    result["security_notice"] = items
    t = mark("sign_in_with_backup_code", t)

    # 7. A new app password: with no scope ticked the form comes back as typed; then
    # reading only, and the settings name only the IMAP server.
    d.type("#label", a.label)
    for box in ('input[name="scope_imap"]', 'input[name="scope_smtp"]'):
        if checked(d, box):
            d.click(d.find(box))
    submit(d, "/app-passwords")
    d.at("/app-passwords", "App passwords")
    d.wait("the scope message", lambda: d.find_all("#scope-error"))
    kept = d.cmd("GET", f"/element/{d.find('#label')}/property/value")
    if kept != a.label:
        raise Failure(f"the name field came back as {kept!r}, not {a.label!r}")
    d.shots(a, "app-password-no-scope")
    d.click(d.find('input[name="scope_imap"]'))
    submit(d, "/app-passwords")
    d.at("/app-passwords", f"Your new app password for “{a.label}”")
    expect(d, "IMAP-only settings", "Incoming mail (IMAP)", "It can only read mail", absent=["Outgoing mail (SMTP)"])
    app_password = d.text("#app-password").strip()
    if len(app_password.replace(" ", "")) < 16:
        raise Failure(f"app password looks wrong: {app_password!r}")
    d.shots(a, "app-password-created")
    d.click(d.link("Done"))
    d.at("/app-passwords", "App passwords")
    rows = d.text("table tbody")
    if a.label not in rows:
        raise Failure(f"{a.label!r} is not in the list:\n{rows}")
    d.shots(a, "account")
    mark("app_password", t)

    result.update(
        app_password=app_password,
        backup_codes=codes,
        used_backup_code=used,
        totp_secret=secret,
        app_password_rows=rows,
    )


def reuse(d, a, result):
    """A backup code that was used once is refused the second time."""
    sign_in(d, a, "/login/totp")
    d.click(d.link("Use a backup code instead"))
    d.at("/login/backup", "Two-step verification")
    d.type("#code", a.backup_code)
    submit(d, "/login/backup")
    d.at("/login/backup", "Two-step verification")
    error = d.text("p.error")
    result["error"] = error
    d.shots(a, "backup-code-refused")
    if "That backup code is not right or was used already." not in error:
        raise Failure(f"expected the backup code to be refused, got {error!r}")


def after(d, a, result):
    """After the test used the app password over IMAP (a connection it keeps open) and
    tried the account password (refused): revoke, new backup codes, 2FA off."""
    sign_in(d, a, "/login/totp")
    d.click(d.link("Use a backup code instead"))
    d.at("/login/backup", "Two-step verification")
    d.type("#code", a.backup_code)
    submit(d, "/login/backup")
    d.at("/app-passwords", "App passwords")
    expect(d, "after the IMAP checks", "8 backup codes are left", "Devices still using your account password")
    # The devices list: the app password's row names the mail app (its IMAP ID) and the
    # address it last signed in from; the app that sent the account password after 2FA was
    # on is listed under "still using", with its name.
    # Read in one script call each (element references can go stale while the page settles).
    texts = lambda css: d.js("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText)", css)  # noqa: E731
    seen = {}

    def listed():
        seen["rows"], seen["still"] = texts("tbody tr"), texts("h2 + p + ul li")
        mine = [r for r in seen["rows"] if r.startswith(a.label)]
        return (mine and "from 127.0.0.1 (Thunderbird 153.0)" in mine[0]
                and any("K-9 Mail 6.800" in s and "127.0.0.1" in s for s in seen["still"]))

    try:
        d.wait("the devices list", listed)
    except Failure:
        raise Failure(f"expected the row of {a.label!r} to show its last use by Thunderbird 153.0 from 127.0.0.1 and "
                      f"K-9 Mail 6.800 from 127.0.0.1 among the devices still using the account password; rows "
                      f"{seen.get('rows')}, still using {seen.get('still')}")
    result["devices"] = {"rows": seen["rows"], "still_using": seen["still"]}
    # The reuse run's refused backup code is a wrong code of a sign-in that never
    # succeeded: in the notice, until dismissed.
    items = [d.cmd("GET", f"/element/{e}/text") for e in d.find_all("#security-notice li")]
    if len(items) != 1 or "a wrong backup code, from 127.0.0.1" not in items[0]:
        raise Failure(f"expected the security notice to list the reused backup code, got {items}")
    submit(d, "/security-notice")
    d.at("/app-passwords", "App passwords")
    # Revoking ends the one connection the test holds: said in the singular.
    d.click(d.find(f'button[aria-label="Revoke {a.label}"]'))
    d.at("/app-passwords", "App passwords")
    said = f"“{a.label}” is revoked and can no longer sign in. The connection that used it was closed."
    expect(d, "revoked", said)
    result["revoked"] = said
    d.shots(a, "revoked")
    # New backup codes: asked first.
    d.click(d.link("Make new backup codes"))
    d.at("/backup-codes", "Make new backup codes?")
    expect(d, "asked", "Your 8 remaining backup codes stop working at once.")
    d.shots(a, "confirm-backup-codes")
    submit(d, "/backup-codes")
    d.at("/backup-codes", "Your new backup codes")
    d.click(d.link("Done"))
    d.at("/app-passwords", "App passwords")
    # Turning two-step verification off: asked first; then no devices to fix are listed.
    d.click(d.link("Turn off two-step verification"))
    d.at("/two-factor/disable", "Turn off two-step verification?")
    d.shots(a, "confirm-turn-off")
    submit(d, "/two-factor/disable")
    d.at("/app-passwords", "App passwords")
    expect(d, "2FA off", "Two-step verification is off", absent=["Devices still using your account password"])
    d.shots(a, "account-2fa-off")


def scopes(d, a, result):
    """POP3 and ManageSieve are on: the form offers their boxes (not ticked by default);
    an app password for all four scopes shows the settings of each, and the list names
    its scopes."""
    sign_in(d, a, "/app-passwords")
    d.at("/app-passwords", "App passwords")
    check_site(d, a)
    expect(d, "four scopes", "Reading mail (IMAP)", "Sending mail (SMTP)", "Downloading mail (POP3)",
           "Sieve filters (ManageSieve)")
    for box in ('input[name="scope_pop3"]', 'input[name="scope_sieve"]'):
        if checked(d, box):
            raise Failure(f"{box} is ticked by default")
        d.click(d.find(box))
    for box in ('input[name="scope_imap"]', 'input[name="scope_smtp"]'):
        if not checked(d, box):
            raise Failure(f"{box} is not ticked by default")
    d.type("#label", a.label)
    d.shots(a, "app-password-scopes")
    submit(d, "/app-passwords")
    d.at("/app-passwords", f"Your new app password for “{a.label}”")
    expect(d, "the settings of all four", "Incoming mail (IMAP)", "Incoming mail (POP3)", "Outgoing mail (SMTP)",
           "Mail filters (ManageSieve)", "change mail filters (ManageSieve)")
    result["settings"] = d.text("dl.settings")
    d.shots(a, "app-password-created-all-scopes")
    d.click(d.link("Done"))
    d.at("/app-passwords", "App passwords")
    rows = d.text("table tbody")
    if "IMAP, SMTP, POP3, ManageSieve" not in rows:
        raise Failure(f"the list does not name the four scopes:\n{rows}")
    result["app_password_rows"] = rows


def copy_affordance(d, what):
    """The new password is selectable as a whole, and /copy.js put a Copy button after it
    that selects it when pressed (the clipboard itself may be refused to a headless
    browser). Returns the selected text."""
    select = d.js("return getComputedStyle(document.getElementById('app-password')).userSelect")
    if select != "all":
        raise Failure(f"{what}: the password's user-select is {select!r}, not 'all'")
    button = d.find("#app-password + button.copy")
    if d.cmd("GET", f"/element/{button}/text").strip() != "Copy":
        raise Failure(f"{what}: the Copy button says {d.cmd('GET', f'/element/{button}/text')!r}")
    d.click(button)
    d.wait(f"{what}: Copy pressed", lambda: d.cmd("GET", f"/element/{button}/text").strip() != "Copy")
    selected = d.js("return window.getSelection().toString()").strip()
    if selected != d.text("#app-password").strip():
        raise Failure(f"{what}: Copy selected {selected!r}, not the password")
    return selected


def devices(d, a, result):
    """The one-step set-ups for Apple devices and Thunderbird for Android, and the Copy
    buttons."""
    d.allow_downloads()
    sign_in(d, a, "/app-passwords")
    d.at("/app-passwords", "App passwords")
    check_site(d, a)
    expect(d, "the set-up buttons", "Set up a phone or computer in one step", "Set up an Apple device",
           "Set up Thunderbird for Android")
    d.shots(a, "device-setup")
    submit(d, "/app-passwords/apple")
    profile = d.wait_download(a.profile_name).decode()
    if "com.apple.mail.managed" not in profile or "<key>IncomingPassword</key>" not in profile:
        raise Failure(f"the download is not a mail profile:\n{profile[:2000]}")
    result["profile"] = len(profile)
    d.go(a.url + "/app-passwords")
    d.at("/app-passwords", "App passwords")
    rows = d.text("table tbody")
    if "Apple device " not in rows:
        raise Failure(f"the profile's app password is not listed:\n{rows}")
    submit(d, "/app-passwords/android")
    d.at("/app-passwords/android", "Set up Thunderbird for Android")
    check_site(d, a)
    d.find("#setup-qr svg")
    expect(d, "the settings", "Import settings", "Scan QR code", "Incoming mail (IMAP)", "Outgoing mail (SMTP)")
    result["android_password"] = d.text("#app-password").strip()
    result["selected"] = copy_affordance(d, "android page")
    d.go(a.url + "/app-passwords")
    d.at("/app-passwords", "App passwords")
    # The shots come from a fresh page, before Copy is pressed.
    submit(d, "/app-passwords/android")
    d.at("/app-passwords/android", "Set up Thunderbird for Android")
    d.find("#app-password + button.copy")
    d.shots(a, "android-setup")
    d.go(a.url + "/app-passwords")
    d.at("/app-passwords", "App passwords")
    d.type("#label", a.label)
    submit(d, "/app-passwords")
    d.at("/app-passwords", f"Your new app password for “{a.label}”")
    copy_affordance(d, "created page")


def stale(d, a, result):
    """The row of the app password --label in the list carries the stale mark (with
    --fresh: does not)."""
    sign_in(d, a, "/app-passwords")
    d.at("/app-passwords", "App passwords")
    check_site(d, a)
    rows = d.js(
        "return Array.from(document.querySelectorAll('table tbody tr'))"
        ".filter(r => r.cells[0] && r.cells[0].innerText.split('\\n')[0].trim() === arguments[0])"
        ".map(r => r.innerText)", a.label)
    if len(rows) != 1:
        raise Failure(f"not one row for {a.label!r} in the list: {rows!r}\n{d.text('table tbody')}")
    result["stale_row"] = rows[0]
    marks = d.js(
        "return Array.from(document.querySelectorAll('table tbody tr'))"
        ".filter(r => r.cells[0] && r.cells[0].innerText.split('\\n')[0].trim() === arguments[0])"
        ".flatMap(r => Array.from(r.querySelectorAll('small.stale')).map(s => s.innerText))", a.label)
    said = "Not used for over 90 days: revoke it if the device is gone."
    if a.fresh:
        if marks or "Not used for over" in rows[0]:
            raise Failure(f"the row of {a.label!r} is marked stale on the real clock: {rows[0]!r}")
        return
    if marks != [said]:
        raise Failure(f"the row of {a.label!r} does not carry the stale mark {said!r}: {marks!r} in {rows[0]!r}")
    d.shots(a, "devices-stale")


class Loopback:
    """The app's loopback redirect listener (RFC 8252 7.3): records each request's query and
    answers a short page, as Thunderbird does."""

    def __init__(self):
        import http.server
        import threading

        self.queries = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if urllib.parse.urlsplit(self.path).path != "/":  # the browser's /favicon.ico
                    self.send_error(404)
                    return
                outer.queries.append(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
                body = b"<!doctype html><title>Done</title><p>You can close this page."
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.redirect_uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, d, n):
        d.wait(f"request {n} on the loopback listener", lambda: len(self.queries) >= n)
        return {k: v[0] for k, v in self.queries[n - 1].items()}

    def close(self):
        self.server.shutdown()


def pkce():
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def token_request(a, fields):
    """POST /oauth/token as an app would: (status, JSON)."""
    import ssl

    # Loopback to the test server only; the browser itself pins the certificate's key.
    ctx = ssl._create_unverified_context()
    req = urllib.request.Request(
        a.url + "/oauth/token",
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "browser.py Thunderbird-test"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT, context=ctx) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def oauth(d, a, result):
    """Thunderbird's external OAuth2 sign-in, with this browser as the system browser."""
    app = Loopback()
    try:
        state = "tb-" + base64.urlsafe_b64encode(os.urandom(12)).decode()

        def authorize(challenge):
            q = urllib.parse.urlencode({
                "response_type": "code", "client_id": "thunderbird", "redirect_uri": app.redirect_uri,
                "scope": "mail", "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
                "login_hint": a.user,
            })
            d.go(f"{a.url}/oauth/authorize?{q}")

        # 1. Not signed in: the sign-in, with the address filled in; then Deny.
        _, challenge = pkce()
        authorize(challenge)
        d.at("/login", "Sign in")
        expect(d, "sign-in for Thunderbird", "Sign in to let Thunderbird use your mail account.")
        filled = d.js("return document.getElementById('username').value")
        if filled != a.user:
            raise Failure(f"login_hint did not fill in the address: {filled!r}")
        d.type("#password", a.password)
        d.click(d.find('form[action="/login"] button[type="submit"]'))
        d.at("/oauth/consent", "Allow Thunderbird to use your mail account?")
        check_site(d, a)
        expect(d, "consent", a.user, "read your mail", "send mail as you", "Allow", "Deny")
        d.shots(a, "oauth-consent")
        d.click(d.find("#deny"))
        denied = app.wait(d, 1)
        result["denied"] = denied
        if denied.get("error") != "access_denied" or denied.get("state") != state or denied.get("iss") != a.url_issuer:
            raise Failure(f"the denial came back as {denied}")

        # 2. Signed in now: straight to the consent; Allow.
        verifier, challenge = pkce()
        authorize(challenge)
        d.at("/oauth/consent", "Allow Thunderbird to use your mail account?")
        d.click(d.find("#allow"))
        allowed = app.wait(d, 2)
        result["allowed"] = {k: (v if k != "code" else f"<{len(v)} characters>") for k, v in allowed.items()}
        if not allowed.get("code") or allowed.get("state") != state or allowed.get("iss") != a.url_issuer:
            raise Failure(f"the approval came back as {result['allowed']}")

        # 3. The app redeems the code, once, and renews with the refresh token.
        base = {"client_id": "thunderbird", "redirect_uri": app.redirect_uri}
        status, tokens = token_request(a, {**base, "grant_type": "authorization_code", "code": allowed["code"], "code_verifier": verifier})
        if status != 200 or tokens.get("token_type") != "Bearer" or not tokens.get("refresh_token"):
            raise Failure(f"the code was not redeemed: {status} {tokens}")
        result["tokens"] = {"scope": tokens.get("scope"), "expires_in": tokens.get("expires_in")}
        status, again = token_request(a, {**base, "grant_type": "authorization_code", "code": allowed["code"], "code_verifier": verifier})
        result["replay"] = [status, again.get("error")]
        status, renewed = token_request(a, {"client_id": "thunderbird", "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
        if status != 200 or renewed.get("refresh_token") in (None, tokens["refresh_token"]):
            raise Failure(f"the refresh token was not renewed and rotated: {status} {renewed}")
        result["refreshed"] = True

        # 4. The device list shows it, with Revoke.
        d.go(a.url + "/app-passwords")
        d.at("/app-passwords", "App passwords")
        rows = d.text("table tbody")
        if "Signed in through the browser" not in rows or "Thunderbird" not in rows:
            raise Failure(f"the grant is not listed as a device:\n{rows}")
        result["device_rows"] = rows
        # 5. The first refresh token, used already, is refused (and ends the grant).
        status, replayed = token_request(a, {"client_id": "thunderbird", "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]})
        result["refresh_replay"] = [status, replayed.get("error")]
    finally:
        app.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="https://localhost:PORT of mailgate's web step")
    p.add_argument("user")
    p.add_argument("password")
    p.add_argument("screenshots", help="directory for PNG screenshots")
    p.add_argument("out", help="JSON result file")
    p.add_argument("--mode", choices=["full", "reuse", "after", "scopes", "oauth", "devices", "stale"],
                   default="full")
    p.add_argument("--issuer", help="oauth mode: the expected iss (default: the URL)")
    p.add_argument("--backup-code", help="reuse mode: the code that was used already; after mode: an unused one")
    p.add_argument("--cert", help="mailgate's certificate (PEM): accept only its key")
    p.add_argument("--label", default="Browser test")
    p.add_argument("--profile-name", default="mail.example.test.mobileconfig",
                   help="devices mode: the file name of the Apple profile download")
    p.add_argument("--fresh", action="store_true", help="stale mode: the row must NOT be marked stale")
    p.add_argument("--organisation", help="[web] organisation: expected in the header and the titles")
    p.add_argument("--width", type=int, default=1280, help="the window's width while it works")
    p.add_argument("--widths", default="390,1280", help="the widths of the screenshots, each checked for overflow")
    p.add_argument("--deadline", type=int, default=240, help="seconds for the whole run")
    a = p.parse_args()
    a.url = a.url.rstrip("/")
    a.url_issuer = a.issuer or a.url
    a.widths = [int(w) for w in a.widths.split(",")]
    os.makedirs(a.screenshots, exist_ok=True)

    def give_up(signum, _frame):
        raise Failure(f"signal {signum}: out of time or stopped")

    signal.signal(signal.SIGALRM, give_up)
    signal.signal(signal.SIGTERM, give_up)
    signal.alarm(a.deadline)

    result = {"mode": a.mode, "ok": False, "timings": {}}
    workdir = tempfile.mkdtemp(prefix="mailgate-browser-")
    d = None
    code = 1
    try:
        pin = spki_pin(a.cert) if a.cert else None
        t = time.monotonic()
        d = Driver(workdir, pin, a.width, 800)
        result["timings"]["start_browser"] = round(time.monotonic() - t, 2)
        {"full": full, "reuse": reuse, "after": after, "scopes": scopes, "oauth": oauth, "devices": devices,
         "stale": stale}[a.mode](d, a, result)
        result["ok"] = True
        code = 0
    except Exception as e:  # noqa: BLE001 - any failure is reported, then cleaned up
        result["failure"] = f"{type(e).__name__}: {e}"
        log("FAIL:", result["failure"])
        if not isinstance(e, Failure):
            traceback.print_exc(file=sys.stdout)
        if d and d.session:
            signal.alarm(20)  # a last look at the page, within bounds
            try:
                log("at", d.url(), "\n" + d.body_text()[:2000])
                d.screenshot(a.screenshots, "failure.png", a.width, check=False)
            except Exception as e2:  # noqa: BLE001
                log(f"(no page: {e2})")
            signal.alarm(0)
        if d:
            log("chromedriver log (tail):\n" + d.driver_log())
    finally:
        # Cleanup must not be interrupted by our own alarm; a SIGTERM from the test is
        # followed by SIGKILL, and the test then ends the process group by PID too.
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if d:
            t = time.monotonic()
            d.quit()
            result["timings"]["quit_browser"] = round(time.monotonic() - t, 2)
        result["timings"]["total"] = round(time.monotonic() - T0, 2)
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        shutil.rmtree(workdir, ignore_errors=True)
    log("PASS" if code == 0 else "FAILED", a.mode, json.dumps(result["timings"]))
    return code


if __name__ == "__main__":
    sys.exit(main())
