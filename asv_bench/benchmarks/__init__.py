"""asv benchmarks for fisheropt (they import the installed fisheropt; _common.py has the helpers)."""
