"""Regenerate spec/vectors/*.json from the reference: ``python -m fisheropt.vectors [suite ...]``."""
import sys

from . import SUITES, write_all

names = sys.argv[1:] or list(SUITES)
unknown = [n for n in names if n not in SUITES]
if unknown:
    sys.exit(f"unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}")
for path in write_all(names=names):
    print(f"wrote {path}")
