"""Natural-gradient directions on a backend: which backend function solves which system.

refimpl/fisher_ngd.py states every direction in NumPy. :func:`ngd_direction` runs the same
formulas on the backend that fisheropt.fisher selected, on that backend's arrays:

* EF and iEF: the backend's ``fisher_sample_space_direction`` (rhs = 1, or s);
* SF and exact (Woodbury): the factor (Ĝ, or the Fisher factor) built on the arrays' device,
  then ``refimpl.fisher_ngd.factor_direction`` with the backend's ``fisher_gram`` and the
  parameter-space solve of the arrays' device (:func:`parameter_space_solve`);
* exact (CG): ``refimpl.fisher_ngd.exact_cg_solve`` on the arrays' device.

A backend here is any object with the Fisher functions of the backend interface,
``fisher_gram`` and ``fisher_sample_space_direction`` (a registry module, its ``fisher``
module, or fisheropt.refimpl.fisher_ngd itself). Inputs are assumed valid.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ._checks import array_module
from ._types import FloatArray
from .refimpl import fisher_ngd as reference
from .refimpl.fisher_exact import fisher_factor
from .refimpl.fisher_sampled import sampled_grads

KINDS = ("exact", "ef", "sf", "ief")


def parameter_space_solve(xp: ModuleType) -> Callable[..., Any]:
    """(gram + λI)⁻¹ rhs for the arrays of ``xp``: the reference's (LAPACK) on the host, the cupy
    backend's (cuSOLVER) on the GPU."""
    if xp is np:
        return reference.solve_damped_gram
    from .backends.cupy.fisher import solve_damped_gram

    return solve_damped_gram


def ngd_direction(
    kind: str, *, G: FloatArray, damping: float, backend: Any, exact_method: str = "auto", **arrays: Any
) -> FloatArray:
    """The direction of ``kind`` (see :data:`KINDS`), (P,) in G's dtype, computed by ``backend``.

    ``arrays``: ``s``, ``J``, ``probs`` (in J's dtype) and ``labels_sampled`` as ``kind`` uses them
    (:func:`fisheropt.fisher.ngd_direction` checks them)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    unknown = set(arrays) - {"s", "J", "probs", "labels_sampled"}
    if unknown:
        raise TypeError(f"ngd_direction() got unexpected keyword arguments {sorted(unknown)}")
    xp = array_module(G)
    if kind == "ef":
        return backend.fisher_sample_space_direction(G, xp.ones(G.shape[0], dtype=xp.float64), damping)
    if kind == "ief":
        return backend.fisher_sample_space_direction(G, arrays["s"].astype(xp.float64), damping)
    J: FloatArray = arrays["J"]
    probs: FloatArray = arrays["probs"]
    grad = reference.batch_gradient(G, xp)
    if kind == "sf":
        factor = sampled_grads(J, probs, arrays["labels_sampled"], xp=xp, dtype=xp.float64)
    elif reference.choose_exact_method(exact_method, J.shape) == "cg":
        return reference.exact_cg_solve(J, probs, grad, damping, xp=xp).astype(G.dtype)
    else:
        factor = fisher_factor(J, probs, xp=xp)
    return reference.factor_direction(
        factor, grad, damping, gram=backend.fisher_gram, solve=parameter_space_solve(xp), xp=xp
    ).astype(G.dtype)
