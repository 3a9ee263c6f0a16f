#!/usr/bin/env python3
"""Open every page of a built site in headless Chromium, offline, and check what a reader sees.

    python scripts/check_site.py _build/html [--screenshots DIR]

Each page is loaded from disk (file:// URL) with every other kind of request blocked, and checked
for:

- JavaScript errors: uncaught exceptions, console.error, errors the browser logs;
- files the page loads that are missing (scripts, styles, fonts, images) or lie outside the site;
- requests that would leave the machine (anything not file:, data: or blob:): blocked, and each
  one is a failure. (Behind the per-page blocking, Chromium runs with no name resolution and a
  dead proxy, so nothing can leave even if a request escaped it.);
- math: MathJax loaded and finished typesetting, no TeX errors, and no raw TeX (`$...$`,
  `\\command`, `\\(`) left in the visible text outside code;
- images: each one loads (naturalWidth > 0) and has an alt text that describes it: an empty one, or
  one that is only the file name (what myst-nb writes for a plot whose cell has no
  `mystnb.image.alt`), is a failure (with --lenient-alt, a file name is only a note);
- code: no line of a notebook cell's code is wider than its box (cut off, or hidden behind a scroll
  bar); cells collapsed behind a "Show code" toggle are opened to be measured;
- widgets: each saved widget view (application/vnd.jupyter.widget-view+json) is rendered by the
  widget manager from the saved state, and no "Loading widget..." placeholder is left;
- internal links: every link to a local file resolves to an existing file inside the site, and
  every #anchor into an .html page exists there.

A screenshot of each page (PNG) goes to --screenshots (default: `site-check/` next to SITE_DIR,
i.e. `_build/site-check/` for `_build/html`), mirroring the site's folders: the first screen
(1200 x 900) by default, the whole page with --full-page (slower: long chapters are 30,000 px tall,
saved in tiles `page.png`, `page.2.png`, ...).

Prints one line per page (OK, or FAIL followed by the problems, indented) and a summary; exits 1
if any page has a problem, 2 if the site or Chromium cannot be found.

No dependency beyond the standard library and a Chromium binary (Debian: `apt-get install
chromium`): the browser is driven through the DevTools protocol over a pipe
(--remote-debugging-pipe), so no port is opened either.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import html.parser
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import pathname2url

ALLOWED_SCHEMES = {"file", "data", "blob", "about"}
# Network.setBlockedURLs patterns: everything that could go over the network.
BLOCKED_PATTERNS = ["http:*", "https:*", "ws:*", "wss:*", "ftp:*"]
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads", ".doctrees"}
TILE_HEIGHT = 10000  # full-page screenshots: Chromium's captures stop at 16,384 px
MAX_TEX_SNIPPETS = 8
MAX_CODE_LINES = 8
CODE_SNIPPET = 60  # characters of an overflowing line of code quoted in its failure
VIEWPORT = (1200, 900)


# ------------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol, through a pipe
# ------------------------------------------------------------------------------------------------
class BrowserError(RuntimeError):
    pass


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium binary: an explicit path, $CHROMIUM, or the first of the usual names on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM")):
        if candidate:
            return shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high_fd(fd: int) -> int:
    """Move a descriptor to >= 10 so that dup2 onto 3 and 4 cannot clobber another one of ours."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Browser:
    """A headless Chromium driven through --remote-debugging-pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, executable: str, *, window: tuple[int, int] = VIEWPORT):
        self.profile = tempfile.mkdtemp(prefix="check-site-profile-")
        self.log = os.path.join(self.profile, "chromium.log")  # its stdout and stderr
        cmd_r, cmd_w = (_high_fd(fd) for fd in os.pipe())
        out_r, out_w = (_high_fd(fd) for fd in os.pipe())
        args = [
            executable,
            "--headless",
            "--no-sandbox",  # root in containers; only local files are opened
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            f"--window-size={window[0]},{window[1]}",
            "--hide-scrollbars",
            "--mute-audio",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--disable-breakpad",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-quic",
            "--no-pings",
            "--metrics-recording-only",
            # Belt and braces behind the per-page blocking: no name resolves, every proxied
            # connection goes to a closed local port. Nothing can leave the machine.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "about:blank",
        ]
        log = self.log
        actions = [
            (os.POSIX_SPAWN_DUP2, cmd_r, 3),
            (os.POSIX_SPAWN_DUP2, out_w, 4),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_OPEN, 2, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        ]
        # Its own process group, so that close() can end the browser and all its children.
        self.pid = os.posix_spawn(executable, args, os.environ, file_actions=actions, setsid=True)
        os.close(cmd_r)
        os.close(out_w)
        self._write_fd = cmd_w
        self._read_fd = out_r
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        try:
            version = self.call("Browser.getVersion", timeout=30)
        except BrowserError as error:
            try:
                with open(self.log, errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
            except OSError:
                tail = ""
            self.close()
            raise BrowserError(f"{executable} did not start: {error}\n{tail}") from None
        self.version = version.get("product", "?")

    # -- transport ---------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    self._closed = True
                    self._lock.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                with self._lock:
                    if "id" in message:
                        self._responses[message["id"]] = message
                    else:
                        self.events.append(message)
                        self._on_event(message)
                    self._lock.notify_all()

    def _on_event(self, message: dict) -> None:
        """Called with the lock held, in the reader thread: must not wait for a response."""
        method, params, session = message.get("method"), message.get("params", {}), message.get("sessionId")
        if method == "Target.attachedToTarget":
            # A worker or iframe of a page: block its network too, then let it run.
            child = params["sessionId"]
            self.send("Network.enable", {}, child)
            self.send("Network.setBlockedURLs", {"urls": BLOCKED_PATTERNS}, child)
            self.send("Runtime.enable", {}, child)
            self.send("Runtime.runIfWaitingForDebugger", {}, child)
            message["parentSessionId"] = session
        elif method == "Page.javascriptDialogOpening":
            self.send("Page.handleJavaScriptDialog", {"accept": False}, session)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        with self._send_lock:
            self._next_id += 1
            call_id = self._next_id
            message = {"id": call_id, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            data = json.dumps(message).encode() + b"\0"
            while data:
                try:
                    written = os.write(self._write_fd, data)
                except OSError as error:
                    raise BrowserError(f"Chromium is gone ({error})") from None
                data = data[written:]
        return call_id

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        call_id = self.send(method, params, session)
        with self._lock:
            deadline = time.monotonic() + timeout
            while call_id not in self._responses:
                left = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"Chromium exited during {method}")
                if left <= 0:
                    raise BrowserError(f"no answer to {method} within {timeout:.0f} s")
                self._lock.wait(left)
            response = self._responses.pop(call_id)
        if "error" in response:
            raise BrowserError(f"{method}: {response['error'].get('message')}")
        return response.get("result", {})

    def wait_for_event(self, method: str, session: str, start: int, timeout: float) -> dict | None:
        """The first event `method` of `session` at index >= start in self.events, or None."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for event in self.events[start:]:
                    if event.get("method") == method and event.get("sessionId") == session:
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._lock.wait(left)

    def close(self) -> None:
        try:
            if not self._closed:
                self.send("Browser.close")
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
        except (OSError, BrowserError, ChildProcessError):
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the group this class started (setsid above)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# What runs in the page
# ------------------------------------------------------------------------------------------------
# Waits (up to TIMEOUT_MS) for widgets, MathJax and images, then returns everything to check.
PAGE_SCRIPT = r"""
(async (TIMEOUT_MS) => {
  const start = Date.now();
  const left = () => Math.max(0, TIMEOUT_MS - (Date.now() - start));
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const race = (p, ms) => Promise.race([p, sleep(ms).then(() => 'timeout')]);

  // -- widgets: the html-manager puts a div.widget-subarea before each view <script> and renders
  //    the widget into it.
  const VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]';
  const STATE = 'script[type="application/vnd.jupyter.widget-state+json"]';
  const views = [...document.querySelectorAll(VIEW)];
  const rendered = v => {
    const area = v.previousElementSibling;
    return !!(area && area.classList.contains('widget-subarea') &&
              area.querySelector('.jupyter-widgets, [class^="widget-"], [class*=" widget-"]'));
  };
  while (views.some(v => !rendered(v)) && left() > 0) await sleep(50);

  // -- math
  const mj = window.MathJax;
  let mathjax = 'absent';
  if (mj && mj.startup && mj.startup.promise) {
    mathjax = await race(mj.startup.promise.then(() => 'done', e => 'error: ' + e), left());
  } else if (mj) {
    mathjax = 'not loaded';
  }

  // -- images: lazy ones are made eager, then every image is waited for
  const imgs = [...document.images];
  imgs.forEach(i => { if (i.loading === 'lazy') i.loading = 'eager'; });
  const decoded = await Promise.all(imgs.map(i => race(i.decode().then(() => true, () => false), left())));
  if (document.fonts) await race(document.fonts.ready, left());

  const images = imgs.map((i, k) => ({
    src: i.currentSrc || i.src || i.getAttribute('src') || '',
    rawSrc: i.getAttribute('src') || '',
    alt: i.getAttribute('alt'),
    where: (i.closest('section[id]') || {}).id || '',
    inWidget: !!i.closest('.jupyter-widgets, .widget-subarea'),
    ok: i.complete && (i.naturalWidth > 0 || decoded[k] === true),
    width: i.naturalWidth,
  }));

  // -- visible text outside code, grouped by block, scanned for raw TeX
  const EXCLUDE = 'script, style, noscript, template, pre, code, kbd, samp, tt, textarea, svg, ' +
                  'mjx-container, mjx-assistive-mml, .MathJax, .highlight, .linenos';
  const BLOCK = 'p, li, dd, dt, td, th, h1, h2, h3, h4, h5, h6, figcaption, caption, blockquote, ' +
                'div, section, article, aside, nav, header, footer, main, label, summary, details, body';
  const scanText = () => {
    const blocks = new Map();
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT, {
      acceptNode(node) {
        if (node.nodeType === Node.ELEMENT_NODE) {
          if (node.matches(EXCLUDE)) return NodeFilter.FILTER_REJECT;
          if (node.checkVisibility && !node.checkVisibility({visibilityProperty: true})) return NodeFilter.FILTER_REJECT;
          return NodeFilter.FILTER_SKIP;
        }
        return NodeFilter.FILTER_ACCEPT;
      }
    });
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      const block = n.parentElement.closest(BLOCK) || document.body;
      blocks.set(block, (blocks.get(block) || '') + n.data);
    }
    const TEX = [
      /\\(?:[A-Za-z]+|[()[\]{}])/g,             // \command, \( \) \[ \]
      /\$\$|\$(?=\S)[^$\n]{0,300}?\S\$(?!\d)|\$(?=\S)[^$\n]\$(?!\d)/g,  // $$, $x$, $a + b$ (not $5-$10)
    ];
    const rawTex = [];
    for (const text of blocks.values()) {
      const flat = text.replace(/\s+/g, ' ');
      for (const re of TEX) {
        for (const m of flat.matchAll(re)) {
          const a = Math.max(0, m.index - 40), b = Math.min(flat.length, m.index + m[0].length + 40);
          rawTex.push((a > 0 ? '…' : '') + flat.slice(a, b).trim() + (b < flat.length ? '…' : ''));
          break;
        }
      }
    }
    return rawTex;
  };
  const mathElements = [...document.querySelectorAll('.math')];
  const countUntypeset = () => mathElements.filter(e => !e.querySelector('mjx-container') &&
                                                   !e.closest('mjx-container')).length;
  let rawTex = scanText(), untypeset = countUntypeset();
  if ((rawTex.length || untypeset) && mathjax === 'done') {
    // Widgets ask MathJax to typeset their labels after they render: give that a moment.
    await sleep(Math.min(1000, left()));
    rawTex = scanText(); untypeset = countUntypeset();
  }
  const texErrors = [...document.querySelectorAll('mjx-merror')].map(
    e => e.getAttribute('data-mjx-error') || e.textContent);

  // -- code: a line of a notebook cell's code wider than its box is cut off (or hidden behind a
  //    scroll bar). Cells collapsed behind a "Show code" toggle are opened to be measured, then
  //    closed again. The line named is the first that does not fit, measured in the pre's own font.
  const collapsed = [...document.querySelectorAll('details:not([open])')]
    .filter(d => d.querySelector('.cell_input pre'));
  collapsed.forEach(d => { d.open = true; });
  const overflowingCode = [];
  for (const pre of document.querySelectorAll('.cell_input pre')) {
    if (pre.scrollWidth <= pre.clientWidth + 1) continue;
    const style = getComputedStyle(pre);
    const room = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const lines = pre.textContent.split('\n');
    const probe = document.createElement('span');
    probe.style.cssText = 'position: absolute; visibility: hidden; white-space: pre; left: 0; top: 0';
    pre.appendChild(probe);  // the pre's font, size and letter spacing
    let line = lines.find(text => { probe.textContent = text; return probe.getBoundingClientRect().width > room + 1; });
    probe.remove();
    if (line === undefined) line = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    overflowingCode.push({line: line.trim(), where: (pre.closest('section[id]') || {}).id || ''});
  }
  collapsed.forEach(d => { d.open = false; });

  const loadingText = /Loading widget/i.test(document.body ? document.body.innerText : '');
  const links = [...document.querySelectorAll('a[href], area[href]')].map(a => ({
    href: a.href, raw: a.getAttribute('href'),
  }));
  const ids = [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name'));
  return {
    url: location.href,
    title: document.title,
    widgets: {
      views: views.length,
      states: document.querySelectorAll(STATE).length,
      unrendered: views.filter(v => !rendered(v)).map(v => {
        try { return JSON.parse(v.textContent).model_id; } catch (e) { return '?'; }
      }),
      loadingText,
    },
    math: {mathjax, mathElements: mathElements.length, untypeset,
           containers: document.querySelectorAll('mjx-container').length},
    rawTex, texErrors, images, links, ids, overflowingCode,
    height: Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0),
    width: Math.max(document.documentElement.scrollWidth, 0),
    elapsedMs: Date.now() - start,
  };
})
"""


# ------------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------------
@dataclass
class PageResult:
    page: str  # path relative to the site directory, with "/"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refresh: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            content = attrs.get("content") or ""
            if "url=" in content.lower():
                self.refresh = content[content.lower().index("url=") + 4:].strip().strip("'\"")


_PARSED: dict[Path, _Anchors] = {}


def _parse(path: Path) -> _Anchors:
    if path not in _PARSED:
        parser = _Anchors()
        parser.feed(path.read_text(errors="replace"))
        parser.close()
        _PARSED[path] = parser
    return _PARSED[path]


def site_pages(site: Path) -> list[Path]:
    """Every .html page of the site, skipping Sphinx's asset folders."""
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site).parts
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        pages.append(path)
    return pages


def _file_url(path: Path) -> str:
    return "file://" + pathname2url(str(path.resolve()))


def _short(url: str, site: Path) -> str:
    """A file:// URL as a path relative to the site, other URLs as they are, cut to 150 chars."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        try:
            url = str(path.relative_to(site.resolve())) + (f"#{parts.fragment}" if parts.fragment else "")
        except ValueError:
            url = str(path)
    elif parts.scheme == "data":
        url = url[:40] + "…"
    return url if len(url) <= 150 else url[:147] + "…"


def check_link(href: str, page: Path, site: Path, page_ids: set[str]) -> str | None:
    """A problem with one resolved link (an absolute URL), or None. Only local files are checked."""
    parts = urlsplit(href)
    if parts.scheme != "file":
        return None
    target = Path(unquote(parts.path))
    fragment = unquote(parts.fragment)
    site = site.resolve()
    if target == page.resolve():
        if fragment and fragment not in page_ids and fragment not in _parse(page).ids:
            return f"dead anchor: #{fragment} is not in this page"
        return None
    try:
        target.relative_to(site)
    except ValueError:
        return f"link leaves the site: {target}"
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"dead link: {_short(href, site)} (no such file)"
    if fragment and target.suffix in (".html", ".htm") and fragment not in _parse(target).ids:
        return f"dead anchor: {_short(href, site)} (no id {fragment!r} in {target.relative_to(site)})"
    return None


def _describe_exception(params: dict) -> str:
    details = params.get("exceptionDetails", {})
    exception = details.get("exception") or {}
    text = exception.get("description") or exception.get("value") or details.get("text") or "?"
    text = str(text).splitlines()[0]
    where = details.get("url") or ""
    if where:
        where = f" ({where.rsplit('/', 1)[-1]}:{details.get('lineNumber', 0) + 1})"
    return text + where


def _console_text(params: dict) -> str:
    pieces = []
    for arg in params.get("args", []):
        value = arg.get("value", arg.get("description", arg.get("type")))
        pieces.append(value if isinstance(value, str) else json.dumps(value))
    return " ".join(pieces).splitlines()[0] if pieces else "?"


def check_page(browser: Browser, site: Path, page: Path, screenshot: Path | None = None, *,
               timeout: float = 15.0, lenient_alt: bool = False, full_page: bool = False) -> PageResult:
    site = site.resolve()
    page = page.resolve()
    result = PageResult(page=page.relative_to(site).as_posix())
    started = time.monotonic()
    parsed = _parse(page)
    if parsed.refresh is not None:
        # A redirect stub (Sphinx/jupyter-book's root index.html): check where it points.
        target = (page.parent / unquote(parsed.refresh.split("#")[0])).resolve()
        if not target.is_file():
            result.problems.append(f"redirect to a missing page: {parsed.refresh}")
        else:
            result.notes.append(f"redirects to {target.relative_to(site).as_posix()}")
        result.seconds = time.monotonic() - started
        return result

    # A fresh browser context per page: empty storage and cache, as for a first-time reader, and
    # results that do not depend on which pages were opened before.
    context = browser.call("Target.createBrowserContext", {})["browserContextId"]
    target_id = browser.call("Target.createTarget", {"url": "about:blank",
                                                     "browserContextId": context})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
    first_event = len(browser.events)
    try:
        for method, params in [
            ("Network.enable", {}),
            ("Network.setBlockedURLs", {"urls": BLOCKED_PATTERNS}),
            ("Page.enable", {}),
            ("Runtime.enable", {}),
            ("Log.enable", {}),
            ("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True}),
        ]:
            browser.call(method, params, session)
        mark = len(browser.events)
        nav = browser.call("Page.navigate", {"url": _file_url(page)}, session)
        if nav.get("errorText"):
            result.problems.append(f"page does not open: {nav['errorText']}")
            return result
        if browser.wait_for_event("Page.loadEventFired", session, mark, timeout) is None:
            result.problems.append(f"page did not finish loading within {timeout:.0f} s")
        try:
            evaluated = browser.call(
                "Runtime.evaluate",
                {"expression": f"({PAGE_SCRIPT})({int(timeout * 1000)})", "awaitPromise": True,
                 "returnByValue": True},
                session, timeout=timeout + 15)
        except BrowserError as error:  # e.g. a script of the page that never yields
            result.problems.append(f"page does not respond: {error}")
            return result
        if "exceptionDetails" in evaluated:
            result.problems.append("checker script failed: " + _describe_exception(evaluated))
            return result
        info = evaluated["result"]["value"]
        time.sleep(0.05)  # let late console messages of the page arrive
        if screenshot is not None:
            _screenshot(browser, session, info, screenshot, full_page)
            result.screenshot = screenshot
        with browser._lock:
            events = list(browser.events[first_event:])
        sessions = {session} | {e["params"]["sessionId"] for e in events
                                if e.get("method") == "Target.attachedToTarget"
                                and e.get("parentSessionId") == session}
        events = [e for e in events if e.get("sessionId") in sessions]
        _judge(result, info, events, page, site, lenient_alt=lenient_alt)
    finally:
        try:
            browser.call("Target.closeTarget", {"targetId": target_id}, timeout=10)
            browser.call("Target.disposeBrowserContext", {"browserContextId": context}, timeout=10)
        except BrowserError:
            pass
        result.seconds = time.monotonic() - started
    return result


def _screenshot(browser: Browser, session: str, info: dict, path: Path, full_page: bool) -> None:
    """The first screen as `path`; with full_page, the whole page as `path`, `path.2.png`, ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not full_page:
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session, timeout=60)
        path.write_bytes(base64.b64decode(shot["data"]))
        return
    width = max(VIEWPORT[0], min(int(info.get("width") or VIEWPORT[0]), 4000))
    height = max(1, int(info.get("height") or VIEWPORT[1]))
    for k, top in enumerate(range(0, height, TILE_HEIGHT), start=1):
        clip = {"x": 0, "y": top, "width": width, "height": min(TILE_HEIGHT, height - top), "scale": 1}
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                       "clip": clip}, session, timeout=60)
        tile = path if k == 1 else path.with_suffix(f".{k}.png")
        tile.write_bytes(base64.b64decode(shot["data"]))


def _judge(result: PageResult, info: dict, events: list[dict], page: Path, site: Path, *,
           lenient_alt: bool = False) -> None:
    problems = result.problems
    seen: set[str] = set()

    def add(problem: str) -> None:
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)

    # -- requests: anything that is not a local file is a failure (and was blocked)
    urls: dict[str, str] = {}
    broken_images = {img["src"] for img in info["images"] if not img["ok"]}
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            scheme = urlsplit(url).scheme
            if scheme not in ALLOWED_SCHEMES:
                add(f"request to the network (blocked): {_short(url, site)}")
            elif scheme == "file" and not Path(unquote(urlsplit(url).path)).is_relative_to(site):
                add(f"loads a file outside the site: {unquote(urlsplit(url).path)}")
        elif method == "Network.webSocketCreated":
            add(f"websocket to the network (blocked): {_short(params['url'], site)}")
        elif method == "Network.loadingFailed":
            url = urls.get(params["requestId"], "?")
            if urlsplit(url).scheme == "file" and url not in broken_images and not params.get("canceled"):
                add(f"missing file: {_short(url, site)} ({params.get('errorText')})")
        elif method == "Runtime.exceptionThrown":
            add("JS error: " + _describe_exception(params))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            add("console error: " + _console_text(params))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            if entry.get("level") == "error" and entry.get("source") != "network":
                add(f"browser error ({entry.get('source')}): {entry.get('text', '').splitlines()[0]}")

    # -- math
    math = info["math"]
    if math["mathElements"] or math["containers"]:
        if math["mathjax"] in ("absent", "not loaded"):
            add(f"math not typeset: MathJax is {math['mathjax']} ({math['mathElements']} formulas)")
        elif math["mathjax"] != "done":
            add(f"math not typeset: MathJax {math['mathjax']}")
        elif math["untypeset"]:
            add(f"math not typeset: {math['untypeset']} of {math['mathElements']} formulas left as TeX")
    for error in info["texErrors"]:
        add(f"TeX error: {error}")
    for snippet in info["rawTex"][:MAX_TEX_SNIPPETS]:
        add(f"raw TeX in the text: “{snippet}”")
    if len(info["rawTex"]) > MAX_TEX_SNIPPETS:
        add(f"raw TeX in the text: … and {len(info['rawTex']) - MAX_TEX_SNIPPETS} more blocks")

    # -- images
    for img in info["images"]:
        name = _short(img["src"], site) if img["src"] else "(no src)"
        if img["inWidget"]:
            name += " (drawn by a widget)"
        if img["where"]:
            name += f" in section #{img['where']}"
        if not img["ok"]:
            add(f"broken image: {name}")
        alt = (img["alt"] or "").strip()
        if not alt:
            add(f"image without alt text: {name}")
        elif alt in (img["rawSrc"], img["rawSrc"].rsplit("/", 1)[-1]):
            message = f"image alt text is only its file name: {name}"
            (result.notes.append if lenient_alt else add)(message)

    # -- code: a line wider than its cell is cut off (or scrolled out of sight)
    code = info.get("overflowingCode", [])
    for item in code[:MAX_CODE_LINES]:
        line = item["line"]
        quoted = line[:CODE_SNIPPET] + ("…" if len(line) > CODE_SNIPPET else "")
        add(f"code wider than its cell (cut off): “{quoted}”"
            + (f" in section #{item['where']}" if item["where"] else ""))
    if len(code) > MAX_CODE_LINES:
        add(f"code wider than its cell: … and {len(code) - MAX_CODE_LINES} more blocks")

    # -- widgets
    widgets = info["widgets"]
    if widgets["views"]:
        if not widgets["states"]:
            add(f"{widgets['views']} widget views but no saved widget state")
        for model_id in widgets["unrendered"]:
            add(f"widget not rendered: model {model_id}")
        if widgets["loadingText"]:
            add("a 'Loading widget...' placeholder is visible")

    # -- internal links
    page_ids = set(info["ids"])
    for link in info["links"]:
        problem = check_link(link["href"], page, site, page_ids)
        if problem:
            add(problem)

    if len(problems) > 40:
        del problems[40:]
        problems.append("… (more problems cut)")


def check_site(site: str | Path, screenshots: str | Path | None = None, *, chromium: str | None = None,
               pages: list[Path] | None = None, timeout: float = 15.0, lenient_alt: bool = False,
               full_page: bool = False, report=None) -> list[PageResult]:
    """Check every page of `site`; `report(result)` is called after each page."""
    site = Path(site).resolve()
    executable = find_chromium(chromium)
    if executable is None:
        raise BrowserError("Chromium not found: install it (Debian: apt-get install chromium) or pass --chromium")
    pages = [Path(p).resolve() for p in pages] if pages is not None else site_pages(site)
    shots = Path(screenshots).resolve() if screenshots is not None else None
    _PARSED.clear()
    results = []
    with Browser(executable) as browser:
        for page in pages:
            shot = None
            if shots is not None:
                shot = shots / page.relative_to(site).with_suffix(".png")
            result = check_page(browser, site, page, shot, timeout=timeout, lenient_alt=lenient_alt,
                                full_page=full_page)
            results.append(result)
            if report:
                report(result)
    return results


def format_result(result: PageResult, notes: bool = True) -> str:
    lines = [f"{'OK  ' if result.ok else 'FAIL'}  {result.page}  ({result.seconds:.1f} s)"]
    lines += [f"      - {p}" for p in result.problems]
    lines += [f"      note: {n}" for n in result.notes] if notes else []
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", help="the built site, e.g. _build/html")
    parser.add_argument("--screenshots", metavar="DIR",
                        help="where to save a PNG of each page (default: site-check/ next to SITE)")
    parser.add_argument("--no-screenshots", action="store_true", help="take no screenshots")
    parser.add_argument("--full-page", action="store_true",
                        help="screenshot whole pages, in tiles of 10,000 px (default: the first screen)")
    parser.add_argument("--chromium", metavar="PATH", help="the Chromium binary (default: $CHROMIUM or on PATH)")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds to wait for a page's widgets, math and images (default 15)")
    alt = parser.add_mutually_exclusive_group()
    alt.add_argument("--lenient-alt", action="store_true",
                     help="only note (do not fail on) images whose alt text is only their file name")
    alt.add_argument("--strict-alt", action="store_true",
                     help="fail on images whose alt text is only their file name (the default)")
    parser.add_argument("pages", nargs="*", help="check only these pages (default: every page)")
    args = parser.parse_intermixed_args(argv)  # pages may come after the options

    site = Path(args.site)
    if not (site / "index.html").is_file() and not site_pages(site):
        print(f"check_site: no built site in {site} (build it first: make book)", file=sys.stderr)
        return 2
    screenshots = None
    if not args.no_screenshots:
        screenshots = Path(args.screenshots) if args.screenshots else site.resolve().parent / "site-check"
    pages = [Path(p) if Path(p).is_absolute() or Path(p).exists() else site / p for p in args.pages] or None
    started = time.monotonic()
    try:
        results = check_site(site, screenshots, chromium=args.chromium, pages=pages, timeout=args.timeout,
                             lenient_alt=args.lenient_alt, full_page=args.full_page,
                             report=lambda r: print(format_result(r), flush=True))
    except BrowserError as error:
        print(f"check_site: {error}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    problems = sum(len(r.problems) for r in failed)
    print(f"\n{len(results)} pages checked in {time.monotonic() - started:.1f} s: "
          f"{len(results) - len(failed)} OK, {len(failed)} with problems ({problems} in all)."
          + (f" Screenshots in {screenshots}" if screenshots else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
