"""Fisher natural-gradient directions (airspeed velocity).

The headline workload is an EF/iEF direction for N = 128 samples and P = 2^20 float32
parameters: the target is direction time <= 1.3 x the G·Gᵀ product alone, with peak extra
memory O(N² + P) on top of G (no float64 copy of G, nothing P×P). ``track_time_ratio``
and ``track_peak_extra_mib`` report exactly those two numbers; ``time_*`` and
``peakmem_*`` give the raw figures.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np


def _backend(name):
    """The backend ``name``; NotImplementedError (asv: skipped) where this commit or environment lacks it."""
    try:
        import fisheropt as fo
    except ImportError as exc:
        raise NotImplementedError(f"fisheropt does not import: {exc}") from exc
    if name not in fo.backends.available():
        raise NotImplementedError(f"{name}: {fo.backends.unavailable().get(name, 'no such backend')}")
    mod = fo.backends.get(name)
    if not hasattr(mod, "fisher_sample_space_direction"):
        raise NotImplementedError(f"{name} has no Fisher directions at this commit")
    return mod


def _models():
    """The reference models module (fisheropt.workloads.models; fisheropt.refimpl.models in older
    commits) and fisheropt; NotImplementedError (asv: skipped) at commits before them."""
    import importlib

    try:
        import fisheropt as fo

        fo.fisher.ngd_direction  # noqa: B018
    except (ImportError, AttributeError) as exc:
        raise NotImplementedError(f"no Fisher API at this commit: {exc}") from exc
    for name in ("fisheropt.workloads.models", "fisheropt.refimpl.models"):
        try:
            return importlib.import_module(name), fo
        except ImportError:
            pass
    raise NotImplementedError("no reference models at this commit")


def _sync(xp):
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.get_current_stream().synchronize()


class SampleSpaceDirection:
    """d = Gᵀ(GGᵀ + λI)⁻¹ rhs (EF: rhs = 1, iEF: rhs = s) against the bare Gram product."""

    params = (("numpy", "numba", "cupy"), ("float32", "float64"), ("32x65536", "128x1048576"))
    param_names = ("backend", "dtype", "NxP")
    timeout = 300

    def setup(self, backend, dtype, shape):
        self.mod = _backend(backend)
        self.xp = self.mod.array_module
        N, P = map(int, shape.split("x"))
        if dtype == "float64" and P > 1 << 18 and backend != "cupy":
            raise NotImplementedError("float64 at P = 2^20 is 1 GiB per G; skipped on the host")
        rng = np.random.default_rng(0)
        self.G = self.xp.asarray(rng.standard_normal((N, P), dtype=np.float32).astype(dtype))
        self.rhs = self.xp.asarray(rng.uniform(0.1, 1.0, N))
        self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)  # compile / warm up
        _sync(self.xp)

    def time_gram_product_alone(self, backend, dtype, shape):
        self.G @ self.G.T
        _sync(self.xp)

    def time_gram(self, backend, dtype, shape):
        self.mod.fisher_gram(self.G)
        _sync(self.xp)

    def time_direction(self, backend, dtype, shape):
        self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)
        _sync(self.xp)

    def peakmem_direction(self, backend, dtype, shape):
        self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)

    def track_time_ratio(self, backend, dtype, shape):
        """min-of-5 direction time / min-of-5 time of G @ G.T alone (interleaved)."""
        t_gram, t_dir = [], []
        for _ in range(5):
            t = time.perf_counter()
            self.G @ self.G.T
            _sync(self.xp)
            t_gram.append(time.perf_counter() - t)
            t = time.perf_counter()
            self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)
            _sync(self.xp)
            t_dir.append(time.perf_counter() - t)
        return min(t_dir) / min(t_gram)

    track_time_ratio.unit = "ratio"

    def track_peak_extra_mib(self, backend, dtype, shape):
        """Peak host memory traced during the call, beyond the inputs (tracemalloc)."""
        if self.xp is not np:
            raise NotImplementedError("tracemalloc sees host memory only")
        tracemalloc.start()
        try:
            self.mod.fisher_sample_space_direction(self.G, self.rhs, 1e-3)
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()

    track_peak_extra_mib.unit = "MiB"


class DirectionsOnDigitsMLP:
    """All four kinds on the digits MLP (64-32-10, P = 2410), batch N = 128."""

    params = (("ef", "ief", "sf", "exact", "exact-cg"),)
    param_names = ("kind",)

    def setup(self, kind):
        models, fo = _models()
        MLP, load_digits_split = models.MLP, models.load_digits_split
        X, y, _, _ = load_digits_split(seed=0)
        X, y = X[:128], y[:128]
        m = MLP(64, 32, 10, seed=0)
        p = m.probs(X)
        self.fo = fo
        self.kw = {"G": m.per_sample_grads(X, y), "damping": 1e-3}
        if kind == "ief":
            self.kw["s"] = fo.fisher.logit_grad_sq_norms(p, y)
        if kind in ("sf", "exact", "exact-cg"):
            self.kw.update(J=m.logit_jacobians(X), probs=p)
        if kind == "sf":
            self.kw["labels_sampled"] = fo.fisher.sample_labels(p, 1, seed=0)
        if kind == "exact-cg":
            self.kw["exact_method"] = "cg"
        self.kind = "exact" if kind == "exact-cg" else kind

    def time_direction(self, kind):
        self.fo.fisher.ngd_direction(self.kind, **self.kw)


class DenseEstimators:
    """Dense P×P estimators (small P only), for scale."""

    params = (("exact", "empirical", "improved_empirical"),)
    param_names = ("estimator",)

    def setup(self, estimator):
        _, fo = _models()
        rng = np.random.default_rng(0)
        N, C, P = 64, 10, 512
        self.J = rng.standard_normal((N, C, P))
        self.p = rng.dirichlet(np.ones(C), N)
        self.G = rng.standard_normal((N, P))
        self.s = rng.uniform(0.1, 1, N)
        self.fo = fo

    def time_estimator(self, estimator):
        f = self.fo.fisher
        if estimator == "exact":
            f.exact(self.J, self.p)
        elif estimator == "empirical":
            f.empirical(self.G)
        else:
            f.improved_empirical(self.G, self.s)


if __name__ == "__main__":
    # The headline numbers without asv: python asv_bench/benchmarks/bench_fisher.py [N P]
    import sys

    import fisheropt as fo

    N, P = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (128, 1 << 20)
    shape = f"{N}x{P}"
    for name in fo.backends.available():
        bench = SampleSpaceDirection()
        bench.setup(name, "float32", shape)
        ratio = bench.track_time_ratio(name, "float32", shape)
        peak = bench.track_peak_extra_mib(name, "float32", shape)
        print(
            f"{name:6s} N={N} P={P} float32: direction / (G @ G.T) = {ratio:.3f} (min of 5), "
            f"peak extra {peak:.2f} MiB (G itself {bench.G.nbytes / 2**20:.0f} MiB)"
        )
