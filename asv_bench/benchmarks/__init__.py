"""asv benchmarks for fisheropt (they import the installed fisheropt).

Shared helpers: ``_ceiling.measure_ceiling_gbs`` (the in-process memory-bandwidth
ceiling, ``a += s*b`` in Numba) for judging memory-bound kernels as a ratio.
"""
