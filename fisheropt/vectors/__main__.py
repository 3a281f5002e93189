"""Regenerate spec/vectors/*.json from the reference: ``python -m fisheropt.vectors [suite ...]``.

``python -m fisheropt.vectors --mutants [suite ...]`` prints instead, per suite, every
mutant of fisheropt.vectors.mutants and how many cases of the stored vectors kill it.
"""

import sys

from . import SUITES, write_all

args = sys.argv[1:]
show_mutants = "--mutants" in args
names = [a for a in args if a != "--mutants"] or list(SUITES)
unknown = [n for n in names if n not in SUITES or n.startswith("-")]
if unknown:
    sys.exit(
        f"unknown suite(s) or option(s): {', '.join(unknown)}; known suites: {', '.join(SUITES)}; option: --mutants"
    )
if show_mutants:
    from .mutants import report

    print(report(names))
else:
    for path in write_all(names=names):
        print(f"wrote {path}")
