"""Vector cases for the Fisher backend functions (``fisher_gram``, ``fisher_sample_space_direction``).

Both are "function" cases: ``expected`` = [return value]. Inputs come from fixed seeds; the
edge cases are a single sample, more samples than parameters (a singular Gram), duplicated
samples (exactly singular), a zero sample, large and small magnitudes and the iEF right-hand
side. Tolerances: the Gram and the N x N solve are float64 on every backend (reduction order
differs: BLAS blocking, Cholesky variant), so rtol ~ 1e-10 relative to the largest entry;
float32 directions come out of a float32 gemv, so rtol ~ 1e-5.
"""

from __future__ import annotations

import numpy as np

from fisheropt.refimpl import fisher_ngd

from . import encode, tolerance


def _G(rng, N, P, dtype, scale=1.0):
    return (scale * rng.standard_normal((N, P))).astype(dtype)


def _tol(expected, dtype, *, rtol64=1e-10, rtol32=2e-5):
    peak = float(np.max(np.abs(expected))) if np.size(expected) else 1.0
    rtol = rtol32 if np.dtype(dtype) == np.float32 else rtol64
    return [tolerance(rtol=rtol, atol=rtol * peak)]  # one bound for the one returned array


# Mutants every Gram case / every direction case with N > 1 must kill (the dtype of the
# result, the sum convention); the cases add the ones they are designed for.
def _gram_case(name, G, description, kills=()):
    K = fisher_ngd.fisher_gram(G)
    always = (["gram_in_param_dtype"] if G.dtype != np.float64 else []) + (
        ["mean_convention"] if G.shape[0] > 1 else []
    )
    return {
        "name": name,
        "kind": "function",
        "function": "fisher_gram",
        "dtype": G.dtype.name,
        "description": description,
        "tags": [],
        "kills": always + list(kills),
        "tolerance": _tol(K, np.float64, rtol64=1e-6 if G.dtype == np.float32 else 1e-12),
        "args": encode({"G": G}),
        "expected": encode([K]),
    }


def _direction_case(name, G, rhs, damping, description, *, rtol64=1e-10, kills=(), damping_matters=True):
    d = fisher_ngd.fisher_sample_space_direction(G, rhs, damping)
    always = ["damping_all_entries", "mean_convention"] if G.shape[0] > 1 and damping_matters else []
    if G.dtype == np.float64:
        always.append("solve_in_float32")
    return {
        "name": name,
        "kind": "function",
        "function": "fisher_sample_space_direction",
        "dtype": G.dtype.name,
        "description": description,
        "tags": [],
        "kills": always + list(kills),
        "tolerance": _tol(d, G.dtype, rtol64=rtol64),
        "args": encode({"G": G, "rhs": np.asarray(rhs, dtype=np.float64), "damping": float(damping)}),
        "expected": encode([d]),
    }


def fisher_cases():
    cases = []
    for dtype in ("float32", "float64"):
        rng = np.random.default_rng(7 if dtype == "float32" else 8)
        tag = dtype
        cases += [
            _gram_case(f"gram_{tag}_5x7", _G(rng, 5, 7, dtype), "K = G G^T in float64"),
            _gram_case(f"gram_{tag}_1x4", _G(rng, 1, 4, dtype), "a single sample"),
            _gram_case(f"gram_{tag}_6x3_tall", _G(rng, 6, 3, dtype), "N > P: rank-deficient Gram"),
            _gram_case(f"gram_{tag}_4x6_scale1e3", _G(rng, 4, 6, dtype, 1e3), "large magnitudes"),
        ]
        G = _G(rng, 6, 11, dtype)
        cases.append(_direction_case(f"direction_{tag}_ef", G, np.ones(6), 1e-2, "EF: rhs = 1"))
        s = rng.uniform(0.05, 1.5, size=6)
        cases.append(
            _direction_case(
                f"direction_{tag}_ief",
                G,
                s,
                1e-3,
                "iEF: rhs = s",
                kills=["damping_wrong_side", "s_not_squared", "rhs_as_ones"],
            )
        )
        cases.append(
            _direction_case(
                f"direction_{tag}_single",
                _G(rng, 1, 5, dtype),
                np.array([0.7]),
                0.5,
                "N = 1: d = g * rhs / (|g|^2 + damping)",
            )
        )
        cases.append(
            _direction_case(
                f"direction_{tag}_tall",
                _G(rng, 8, 3, dtype),
                np.ones(8),
                1e-1,
                "N > P: singular Gram, regularised by the damping",
            )
        )
        Gd = _G(rng, 3, 7, dtype)
        Gd = np.concatenate([Gd, Gd[:2]]).astype(dtype)
        cases.append(
            _direction_case(
                f"direction_{tag}_duplicate_rows", Gd, np.ones(5), 1e-1, "duplicated samples: exactly singular Gram"
            )
        )
        Gz = _G(rng, 4, 6, dtype)
        Gz[2] = 0
        cases.append(
            _direction_case(
                f"direction_{tag}_zero_row",
                Gz,
                np.array([1.0, 0.5, 0.0, 2.0]),
                1e-2,
                "a zero per-sample gradient (a perfectly fitted sample)",
            )
        )
        cases.append(
            _direction_case(
                f"direction_{tag}_scale1e-3",
                _G(rng, 5, 9, dtype, 1e-3),
                np.ones(5),
                1e-8,
                "small gradients with damping at their scale",
            )
        )
        cases.append(
            _direction_case(
                f"direction_{tag}_scale1e3",
                _G(rng, 5, 9, dtype, 1e3),
                np.ones(5),
                10.0,
                "large gradients",
                damping_matters=dtype == "float64",
            )
        )
    return cases
