#!/usr/bin/env python3
"""Check a published asv site in headless Chromium, and take a screenshot of a graph.

    python asv_bench/check_site.py                                   # .asv/html, a tracked ratio
    python asv_bench/check_site.py --html asv_bench/.asv/html \\
        --benchmark bench_track.Ratios.track_time_over_ceiling --screenshot docs/img/asv-history.png

Serves the html folder on 127.0.0.1 (asv's pages load their JSON with fetch, which
file:// URLs refuse), opens the benchmark's graph page in headless Chromium
(Debian's ``chromium``: ``apt-get install chromium``) twice, once with ``--dump-dom``
and once with ``--screenshot``, and checks that

* the graph rendered: a flot canvas inside ``#main-graph`` with axis tick labels,
* no error: asv's error dialog text (``#error-message``: "No data ...", "Error
  fetching content ...") is empty, and the page is not an error page,
* the plot has data: the screenshot holds pixels of the first series' colour
  (asv's ``#247AAD``) inside the graph.

Exits 0 when all hold, 1 otherwise (printing which failed). Used by
tests/test_asv_site.py on a two-commit site, and on the history's site for the
README's screenshot.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERIES_RGB = (0x24, 0x7A, 0xAD)  # $.asv.colors[0] in asv/www/asv.js
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class serve:
    """``with serve(folder) as base_url:`` a static HTTP server on 127.0.0.1, a free port, a thread."""

    def __init__(self, folder):
        handler = functools.partial(_Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_chromium(chromium: str, url: str, extra: list, size=(1280, 800), budget_ms=20000, timeout=180) -> str:
    with tempfile.TemporaryDirectory(prefix="asv-chromium-") as profile:
        cmd = [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, HOME=profile))
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


class _Dom(HTMLParser):
    """Collects what the checks need from the rendered DOM."""

    def __init__(self):
        super().__init__()
        self.stack = []
        self.in_main_graph = 0
        self.canvases = 0
        self.tick_labels = 0
        self.error_message = ""
        self._in_error = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag in ("br", "img", "input", "meta", "link", "hr", "col"):
            return
        inside = self.in_main_graph > 0
        self.stack.append((tag, a.get("id") == "main-graph", a.get("id") == "error-message"))
        if a.get("id") == "main-graph":
            self.in_main_graph += 1
        if a.get("id") == "error-message":
            self._in_error += 1
        if inside and tag == "canvas" and "flot-base" in classes:
            self.canvases += 1
        if inside and "flot-tick-label" in classes:
            self.tick_labels += 1
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        while self.stack:
            t, main, err = self.stack.pop()
            self.in_main_graph -= main
            self._in_error -= err
            if t == tag:
                break
        self._in_title = False

    def handle_data(self, data):
        if self._in_error:
            self.error_message += data
        if self._in_title:
            self.title += data


def series_pixels(png: Path, rgb=SERIES_RGB, tolerance=12) -> int:
    """How many pixels of the screenshot have the series colour (needs Pillow)."""
    from PIL import Image

    data = Image.open(png).convert("RGB").tobytes()
    r0, g0, b0 = rgb
    count = 0
    for i in range(0, len(data), 3):
        if abs(data[i] - r0) <= tolerance and abs(data[i + 1] - g0) <= tolerance and abs(data[i + 2] - b0) <= tolerance:
            count += 1
    return count


def check(
    html: Path, benchmark: str, screenshot: Path, query: str = "", min_pixels: int = 20, chromium: str | None = None
) -> list:
    """Problems found (an empty list when the graph rendered with data)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        return ["no chromium on PATH (apt-get install chromium)"]
    html = Path(html)
    if not (html / "index.html").exists():
        return [f"{html}/index.html missing: run asv publish"]
    problems = []
    with serve(html) as base:
        url = f"{base}index.html#{benchmark}{('?' + query) if query else ''}"
        dom_text = run_chromium(chromium, url, ["--dump-dom"])
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        run_chromium(chromium, url, [f"--screenshot={screenshot}"])
    dom = _Dom()
    dom.feed(dom_text)
    if "airspeed velocity" not in dom.title:
        problems.append(f"page title {dom.title!r} is not asv's")
    if dom.canvases < 1:
        problems.append("no flot canvas in #main-graph: the graph did not render")
    if dom.tick_labels < 2:
        problems.append(f"{dom.tick_labels} axis tick labels in #main-graph: an empty plot")
    if dom.error_message.strip():
        problems.append(f"asv shows an error: {dom.error_message.strip()!r}")
    if re.search(r"<h1>\s*(404|500|Error)", dom_text):
        problems.append("an HTTP error page")
    if not screenshot.exists():
        problems.append("chromium wrote no screenshot")
    else:
        n = series_pixels(screenshot)
        if n < min_pixels:
            problems.append(f"{n} pixels of the series colour in the screenshot: no data points plotted")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--html", type=Path, default=HERE / ".asv" / "html")
    ap.add_argument("--benchmark", default="bench_track.Ratios.track_time_over_ceiling")
    ap.add_argument("--query", default="", help="asv graph options after '?', e.g. \"p-size='many'\"")
    ap.add_argument("--screenshot", type=Path, default=HERE / ".asv" / "graph.png")
    args = ap.parse_args(argv)
    problems = check(args.html, args.benchmark, args.screenshot, args.query)
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print(f"OK: {args.benchmark} rendered with data; screenshot {args.screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
