"""Vector cases for the ESimCSE momentum-encoder update ``ema_update``, by the reference.

Each case is one in-place multi-tensor call
``ema_update(targets, sources, decay=λ)`` (θ_k ← λ·θ_k + (1 − λ)·θ_q) and the
targets after it. The edge cases: λ = 0 (copy the sources), λ = 1 (no change),
scalars and size-1 tensors, tiny and huge magnitudes, and a resumed EMA whose
targets and sources nearly cancel.
"""
from __future__ import annotations

import numpy as np

from fisheropt.refimpl.esimcse_momentum import MOMENTUM, ema_update

from . import encode

# Two products and a sum in the param dtype: the reference, Numba and CuPy agree
# bit for bit; the tolerance allows an implementation that fuses the multiply-add.
_RTOL = {"float32": 3e-7, "float64": 5e-16}
_ATOL_PER_SCALE = {"float32": 1e-7, "float64": 2e-16}

SHAPES = [(3, 4), (7,), (), (1,), (2, 3, 5)]


def _case(name, dtype, decay, *, scale=1.0, shapes=SHAPES, seed=0, near=False, description=""):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    sources = [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]
    if near:  # a momentum encoder that has tracked the encoder for a long time
        targets = [np.asarray(q + rng.standard_normal(q.shape) * scale * 1e-3, dtype=dt) for q in sources]
    else:
        targets = [np.asarray(rng.standard_normal(s) * scale, dtype=dt) for s in shapes]
    args = {"targets": [t.copy() for t in targets], "sources": [q.copy() for q in sources], "decay": decay}
    out = [t.copy() for t in targets]
    ema_update(out, sources, decay=decay)
    return {
        "name": name,
        "kind": "inplace",
        "function": "ema_update",
        "dtype": dt.name,
        "description": description or f"θ_k ← {decay}·θ_k + (1 − {decay})·θ_q over {len(shapes)} tensors",
        "tolerance": {"rtol": _RTOL[dt.name], "atol": _ATOL_PER_SCALE[dt.name] * scale},
        "args": encode(args),
        "expected": encode({"targets": out}),
    }


def ema_cases():
    cases = []
    for dtype in ("float32", "float64"):
        cases += [
            _case(f"ema_{dtype}_default", dtype, MOMENTUM, seed=1),
            _case(f"ema_{dtype}_decay0_copies_sources", dtype, 0.0, seed=2,
                  description="λ = 0: the targets become the sources"),
            _case(f"ema_{dtype}_decay1_keeps_targets", dtype, 1.0, seed=3,
                  description="λ = 1: the targets do not change"),
            _case(f"ema_{dtype}_decay_0p9", dtype, 0.9, seed=4),
            _case(f"ema_{dtype}_tiny", dtype, MOMENTUM, scale=1e-20, seed=5),
            _case(f"ema_{dtype}_huge", dtype, MOMENTUM, scale=1e20, seed=6),
            _case(f"ema_{dtype}_near_cancellation", dtype, MOMENTUM, seed=7, near=True,
                  description="targets ≈ sources: the update is a tiny correction"),
            _case(f"ema_{dtype}_one_big_tensor", dtype, MOMENTUM, shapes=[(16, 9)], seed=8),
        ]
    return cases
