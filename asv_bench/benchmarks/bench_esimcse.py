"""ESimCSE workload benchmarks (airspeed velocity): the momentum-encoder EMA kernel on each
host backend (and CuPy where a GPU is usable), the InfoNCE loss with its gradient, word
repetition, and one training step of the tiny encoder.

The EMA moves 3 × itemsize bytes per parameter (read θ_k and θ_q, write θ_k).
"""

from __future__ import annotations

import numpy as np

from . import _common as C


def _backend(name):
    mod = C.backend(name)
    if not hasattr(mod, "ema_update"):
        C.skip(f"{name} has no ema_update at this commit")
    return mod


def _module(name):
    """fisheropt.workloads.<name>, or fisheropt.refimpl.<name> in older commits; asv skips the
    benchmark at commits before either existed."""
    import importlib

    for package in ("fisheropt.workloads", "fisheropt.refimpl"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ImportError:
            pass
    C.skip(f"no {name} module at this commit")


class EmaUpdate:
    """θ_k ← 0.995·θ_k + 0.005·θ_q over a BERT-base-like list of tensors (scaled by ``size``)."""

    params = (["numpy", "numba", "cupy"], ["float32", "float64"], [10_000, 1_000_000, 20_000_000])
    param_names = ["backend", "dtype", "parameters"]

    def setup(self, backend, dtype, parameters):
        self.mod = _backend(backend)
        xp = self.mod.array_module
        rng = np.random.default_rng(0)
        # one big "embedding" and many small tensors, ~ the shape mix of an encoder
        sizes = [parameters // 4] + [parameters * 3 // 4 // 40] * 40
        self.k = [xp.asarray(rng.standard_normal(s).astype(dtype)) for s in sizes]
        self.q = [xp.asarray(rng.standard_normal(s).astype(dtype)) for s in sizes]
        self.sync = getattr(xp, "cuda", None)
        self.mod.ema_update(self.k, self.q, decay=0.995)  # compile / warm up

    def time_ema_update(self, backend, dtype, parameters):
        self.mod.ema_update(self.k, self.q, decay=0.995)
        if self.sync is not None:
            self.sync.get_current_stream().synchronize()


class InfoNCE:
    params = ([64, 256], [0, 160, 4096])
    param_names = ["batch", "queue"]

    def setup(self, batch, queue):
        self.info_nce_with_grad = _module("esimcse_loss").info_nce_with_grad
        rng = np.random.default_rng(1)
        self.h = rng.standard_normal((batch, 128))
        self.hp = rng.standard_normal((batch, 128))
        self.neg = rng.standard_normal((queue, 128))

    def time_info_nce_with_grad(self, batch, queue):
        self.info_nce_with_grad(self.h, self.hp, self.neg)


class WordRepetition:
    def setup(self):
        self.word_repetition_batch = _module("esimcse_repetition").word_repetition_batch
        rng = np.random.default_rng(2)
        self.batch = [rng.integers(2, 5000, size=n) for n in rng.integers(5, 33, size=64)]

    def time_word_repetition_batch_64(self):
        self.word_repetition_batch(self.batch, rng=3)


class EncoderStep:
    """Forward + backward of both views of a batch of 64 sentences (d = 64, V = 1500)."""

    def setup(self):
        self.enc = enc = _module("esimcse_encoder")
        rng = np.random.default_rng(4)
        self.params = enc.init_params(1500, 48, 64, 64, rng=rng, dtype=np.float32)
        sents = [rng.integers(2, 1500, size=n) for n in rng.integers(5, 33, size=64)]
        self.tokens, self.lengths = enc.pad_batch(sents, 48)
        self.dz = rng.standard_normal((64, 64))

    def time_forward_backward(self):
        _, cache = self.enc.forward(self.params, self.tokens, self.lengths, dropout=0.1, rng=5)
        self.enc.backward(self.params, cache, self.dz)
