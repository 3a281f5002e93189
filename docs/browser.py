"""Open built pages of the site in headless Chromium: did the math render? Screenshots.

Used by ``tests/test_docs.py`` (the ``slow`` browser test) and by ``python docs/build.py
--screenshots``. Needs Debian's ``chromium`` (``apt-get install chromium``); no network is
used: the pages and MathJax are local files.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The pages the browser test opens: (page under the built site, #anchor, screenshot name).
PAGES = (
    ("api/torch.html", "fisheropt.torch.FAdam", "api-fisheropt-torch-FAdam.png"),
    ("spec/fadam.html", "", "spec-fadam.png"),
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
)

# TeX that must not be left in the visible text once MathJax has typeset the page.
_RAW_TEX = re.compile(
    r"\\(frac|tfrac|dfrac|sqrt|mathrm|mathbf|operatorname|begin|end|left|right|nabla|lVert|rVert|top|hat|bar"
    r"|beta|lambda|epsilon|alpha|theta|sum|qquad|quad|le|ge|in|cdot|min|max)(?![A-Za-z])"
    r"|\\[()\[\]]|\$\$|\$[^$\s][^$]*?[\\^_][^$]*?\$"
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    messages are JSON, each ended by a NUL byte, written to the browser's fd 3 and read from its
    fd 4). No network, no extra package."""

    def __init__(self, executable: str, *, width: int = 1280, height: int = 1400, timeout: float = 120.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="fisheropt-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads fd 3 and writes fd 4: bash moves the pipe ends there (no Python code
        # runs between fork and exec, which a multithreaded parent such as JAX's must avoid).
        # The ends are first moved to fds >= 10, so that neither is already 3 or 4.
        high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        args = [
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self._profile.name}",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        shell = shutil.which("bash") or "/bin/bash"  # dash takes single-digit fds only
        cmd = [shell, "-c", f'exec "$0" "$@" 3<&{high_r} 4>&{high_w}', executable, *args]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(high_r, high_w),
            env=dict(os.environ, HOME=self._profile.name),
        )
        os.close(high_r)
        os.close(high_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"chromium exited: {stderr[-500:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(
                f"{expression[:60]}...: {result['exceptionDetails'].get('text')} "
                f"{result['exceptionDetails'].get('exception', {}).get('description', '')}"
            )
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path, *, top: float = 0.0, width: int = 1280, height: int = 1400) -> None:
        """A PNG of the page from ``top`` (CSS pixels from the top of the document) down."""
        clip = {"x": 0, "y": max(0.0, top), "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", session=True, format="png", clip=clip, captureBeyondViewport=True)[
            "data"
        ]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Waits for MathJax to finish typesetting (rejects if the page has no MathJax).
_WAIT_MATHJAX = """
new Promise((resolve, reject) => {
  const t0 = Date.now();
  (function poll() {
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      MathJax.startup.promise.then(() => resolve(true), reject);
    } else if (Date.now() - t0 > 30000) {
      reject(new Error("MathJax did not load"));
    } else { setTimeout(poll, 50); }
  })();
})
"""

_FACTS = """
(() => ({
  math: document.querySelectorAll('.math').length,
  rendered: document.querySelectorAll('.math mjx-container').length,
  errors: document.querySelectorAll('mjx-merror').length,
  text: (() => {  // the prose a reader sees: the article without code, scripts, MathJax's hidden MathML
    const a = (document.querySelector('article') || document.body).cloneNode(true);
    a.querySelectorAll('pre, code, script, style, mjx-assistive-mml').forEach(e => e.remove());
    return a.textContent;
  })(),
}))()
"""


@dataclass
class PageCheck:
    page: str
    math_in_source: int = 0
    math_rendered: int = 0
    raw_tex: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def check_page(
    site: Path,
    page: str,
    anchor: str = "",
    *,
    screenshot: Path | None = None,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> PageCheck:
    """Load ``site/page`` in headless Chromium, wait for MathJax, and check the math rendered:
    every math element of the page holds a MathJax container, MathJax reported no TeX error,
    and no TeX source (``\\frac``, ``$...$``, ``\\(``) is left in the visible text (innerText of
    the article). With ``anchor``, the element of that id is scrolled to the top first.
    Optionally save a screenshot (1280 × 1400)."""
    chromium = chromium or find_chromium()
    result = PageCheck(page)
    if chromium is None:
        result.errors.append("no chromium on PATH (apt-get install chromium)")
        return result
    path = (site / page).resolve()
    result.math_in_source = len(re.findall(r'class="math notranslate nohighlight"', path.read_text(encoding="utf-8")))
    try:
        with Chromium(chromium, timeout=timeout) as browser:
            browser.open(path.as_uri())
            try:
                browser.evaluate(_WAIT_MATHJAX)
            except RuntimeError as exc:  # still look at the page: which TeX is left unrendered
                result.errors.append(f"{page}: {str(exc).split('Error: ')[-1].splitlines()[0]}")
            facts = browser.evaluate(_FACTS)
            top = 0.0
            if anchor:
                top = browser.evaluate(
                    f"(() => {{ const e = document.getElementById({json.dumps(anchor)});"
                    " return e ? e.getBoundingClientRect().top + window.scrollY - 16 : null; })()"
                )
                if top is None:
                    result.errors.append(f"{page} has no element with id {anchor!r}")
                    top = 0.0
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                browser.screenshot(screenshot, top=top)
                result.screenshot = screenshot
    except (RuntimeError, TimeoutError, OSError, StopIteration) as exc:
        result.errors.append(f"{page}: chromium: {exc}")
        return result
    result.math_rendered = facts["rendered"]
    if result.math_in_source == 0:
        result.errors.append(f"{page} has no math to render")
    elif result.math_rendered < result.math_in_source:
        result.errors.append(
            f"{page}: {result.math_rendered} of {result.math_in_source} math elements rendered "
            "(is MathJax in _static/mathjax?)"
        )
    if facts["errors"]:
        result.errors.append(f"{page}: MathJax reported {facts['errors']} TeX error(s) (mjx-merror)")
    result.raw_tex = sorted({m.group(0) for m in _RAW_TEX.finditer(facts["text"])})
    if result.raw_tex:
        result.errors.append(f"{page}: TeX left in the visible text: {', '.join(result.raw_tex[:10])}")
    return result
