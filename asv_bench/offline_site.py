#!/usr/bin/env python3
"""Make a published asv site work without internet: its CDN scripts and styles from local copies.

    asv publish && python offline_site.py            # from asv_bench/ (default: .asv/html)
    python asv_bench/offline_site.py path/to/html

asv's ``index.html`` loads jQuery, flot, bootstrap, stupidtable and md5 from CDNs
(code.jquery.com, cdnjs, jsdelivr). Without them the page is asv's "Can not determine
continental origin of swallow" error page. This copies the files in
``asv_bench/vendor/site/`` (the same versions, from npm; see its README.md) to
``<html>/vendor/`` and points every known CDN URL of the html pages at them
(the ``integrity``/``crossorigin`` attributes go: they are for cross-origin files).
Idempotent. Prints any CDN URL it does not know (a newer asv): the site checker
(check_site.py) then fails on the page, which says which dependency is missing.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "vendor" / "site"

# basename of the CDN URL (as asv 0.6 writes it) -> local file in vendor/site/
LOCAL = {
    "jquery-3.3.1.min.js": "jquery-3.3.1.min.js",
    "jquery.flot.min.js": "jquery.flot-0.8.3.js",
    "jquery.flot.time.min.js": "jquery.flot.time-0.8.3.js",
    "jquery.flot.selection.min.js": "jquery.flot.selection-0.8.3.js",
    "jquery.flot.categories.min.js": "jquery.flot.categories-0.8.3.js",
    "jquery.flot.orderBars.js": "jquery.flot.orderBars-1.0.0.js",
    "stupidtable.min.js": "stupidtable-1.1.3.min.js",
    "md5.min.js": "md5-2.19.0.min.js",
    "bootstrap.min.js": "bootstrap-3.1.1.min.js",
    "bootstrap.min.css": "bootstrap-3.1.1.min.css",
}

_TAG = re.compile(r"<(script|link)\b[^>]*?\b(src|href)=\"(https?://[^\"]+)\"[^>]*>", re.S)
_DROP = re.compile(r"\s+(integrity|crossorigin|referrerpolicy)=\"[^\"]*\"|\s+crossorigin(?=[\s>/])")


def localize(html_dir: Path) -> list:
    """Rewrite the html pages of ``html_dir``; returns the CDN URLs left as they were."""
    html_dir = Path(html_dir)
    target = html_dir / "vendor"
    target.mkdir(exist_ok=True)
    for name in set(LOCAL.values()):
        shutil.copyfile(VENDOR / name, target / name)
    unknown = []

    def swap(m):
        tag, url = m.group(1), m.group(3)
        name = url.rsplit("/", 1)[-1]
        if name not in LOCAL or (tag == "link" and not name.endswith(".css")):
            if tag == "script" or name.endswith(".css"):
                unknown.append(url)
            return m.group(0)
        return _DROP.sub("", m.group(0).replace(url, f"vendor/{LOCAL[name]}"))

    for page in html_dir.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        new = _TAG.sub(swap, text)
        if new != text:
            page.write_text(new, encoding="utf-8")
    return unknown


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    html_dir = Path(argv[0]) if argv else HERE / ".asv" / "html"
    if not (html_dir / "index.html").exists():
        print(f"{html_dir}/index.html missing: run asv publish first", file=sys.stderr)
        return 1
    unknown = localize(html_dir)
    for url in unknown:
        print(f"offline_site: no local copy of {url}", file=sys.stderr)
    print(
        f"offline_site: {html_dir} uses {html_dir / 'vendor'}" + (f" ({len(unknown)} CDN URLs left)" if unknown else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
