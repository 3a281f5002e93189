"""ESimCSE workload benchmarks (airspeed velocity): the momentum-encoder EMA kernel on each
host backend (and CuPy where a GPU is usable), the InfoNCE loss with its gradient, word
repetition, and one training step of the tiny encoder.

The EMA moves 3 × itemsize bytes per parameter (read θ_k and θ_q, write θ_k).
"""
from __future__ import annotations

import numpy as np


def _backend(name):
    import fisheropt as fo
    if name in fo.backends.unavailable():
        raise NotImplementedError(f"{name}: {fo.backends.unavailable()[name]}")   # asv: skip
    return fo.backends.get(name)


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
        self.mod.ema_update(self.k, self.q, decay=0.995)      # compile / warm up

    def time_ema_update(self, backend, dtype, parameters):
        self.mod.ema_update(self.k, self.q, decay=0.995)
        if self.sync is not None:
            self.sync.get_current_stream().synchronize()


class InfoNCE:
    params = ([64, 256], [0, 160, 4096])
    param_names = ["batch", "queue"]

    def setup(self, batch, queue):
        rng = np.random.default_rng(1)
        self.h = rng.standard_normal((batch, 128))
        self.hp = rng.standard_normal((batch, 128))
        self.neg = rng.standard_normal((queue, 128))

    def time_info_nce_with_grad(self, batch, queue):
        from fisheropt.refimpl.esimcse_loss import info_nce_with_grad
        info_nce_with_grad(self.h, self.hp, self.neg)


class WordRepetition:
    def setup(self):
        rng = np.random.default_rng(2)
        self.batch = [rng.integers(2, 5000, size=n) for n in rng.integers(5, 33, size=64)]

    def time_word_repetition_batch_64(self):
        from fisheropt.refimpl.esimcse_repetition import word_repetition_batch
        word_repetition_batch(self.batch, rng=3)


class EncoderStep:
    """Forward + backward of both views of a batch of 64 sentences (d = 64, V = 1500)."""

    def setup(self):
        from fisheropt.refimpl import esimcse_encoder as enc
        self.enc = enc
        rng = np.random.default_rng(4)
        self.params = enc.init_params(1500, 48, 64, 64, rng=rng, dtype=np.float32)
        sents = [rng.integers(2, 1500, size=n) for n in rng.integers(5, 33, size=64)]
        self.tokens, self.lengths = enc.pad_batch(sents, 48)
        self.dz = rng.standard_normal((64, 64))

    def time_forward_backward(self):
        _, cache = self.enc.forward(self.params, self.tokens, self.lengths, dropout=0.1, rng=5)
        self.enc.backward(self.params, cache, self.dz)
