#!/usr/bin/env python3
"""Check a published asv site in headless Chromium, and take a screenshot of a graph.

    python asv_bench/check_site.py                                   # .asv/html, a tracked ratio
    python asv_bench/check_site.py --html asv_bench/.asv/html \\
        --benchmark bench_track.Ratios.track_time_over_ceiling --screenshot docs/img/asv-history.png

Serves the html folder on 127.0.0.1 (asv's pages load their JSON with fetch, which
file:// URLs refuse), opens the benchmark's graph page in headless Chromium
(Debian's ``chromium``: ``apt-get install chromium``), driven as the docs' browser test
drives it (``docs/browser.py``), waits for the graph to be drawn, and checks that

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
import re
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "docs"))
try:
    from browser import Chromium, find_chromium  # one way to run headless Chromium, the docs' one
finally:
    sys.path.remove(str(HERE.parent / "docs"))

SERIES_RGB = (0x24, 0x7A, 0xAD)  # $.asv.colors[0] in asv/www/asv.js
WINDOW = (1280, 800)

# Resolves, once the graph is drawn or asv shows an error (or after 30 s), with what the checks read.
_WAIT_GRAPH = """
new Promise((resolve) => {
  const t0 = Date.now();
  const facts = () => {
    const graph = document.getElementById('main-graph');
    const error = document.getElementById('error-message');
    const h1 = document.querySelector('h1');
    return {
      title: document.title,
      canvases: graph ? graph.querySelectorAll('canvas.flot-base').length : 0,
      tick_labels: graph ? graph.querySelectorAll('.flot-tick-label').length : 0,
      error: error ? error.textContent.trim() : '',
      h1: h1 ? h1.textContent.trim() : '',
    };
  };
  (function poll() {
    const f = facts();
    if ((f.canvases && f.tick_labels >= 2) || f.error || Date.now() - t0 > 30000) {
      setTimeout(() => resolve(facts()), 500);  // the draw in progress finishes
    } else { setTimeout(poll, 100); }
  })();
})
"""


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
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with serve(html) as base, Chromium(chromium, width=WINDOW[0], height=WINDOW[1]) as browser:
            browser.open(f"{base}index.html#{benchmark}{('?' + query) if query else ''}")
            facts = browser.evaluate(_WAIT_GRAPH)
            browser.screenshot(screenshot, width=WINDOW[0], height=WINDOW[1])
    except (RuntimeError, TimeoutError, OSError, StopIteration) as exc:
        return [f"chromium: {exc}"]
    if "airspeed velocity" not in facts["title"]:
        problems.append(f"page title {facts['title']!r} is not asv's")
    if facts["canvases"] < 1:
        problems.append("no flot canvas in #main-graph: the graph did not render")
    if facts["tick_labels"] < 2:
        problems.append(f"{facts['tick_labels']} axis tick labels in #main-graph: an empty plot")
    if facts["error"]:
        problems.append(f"asv shows an error: {facts['error']!r}")
    if re.match(r"(404|500|Error)", facts["h1"]):
        problems.append(f"an HTTP error page: {facts['h1']!r}")
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
