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

import numpy as np

from ._checks import array_module
from .refimpl import fisher_ngd as reference
from .refimpl.fisher_exact import fisher_factor
from .refimpl.fisher_sampled import sampled_grads

KINDS = ("exact", "ef", "sf", "ief")


def parameter_space_solve(xp):
    """(gram + λI)⁻¹ rhs for the arrays of ``xp``: the reference's (LAPACK) on the host, the cupy
    backend's (cuSOLVER) on the GPU."""
    if xp is np:
        return reference.solve_damped_gram
    from .backends.cupy.fisher import solve_damped_gram

    return solve_damped_gram


def ngd_direction(kind, *, G, damping, s=None, J=None, probs=None, labels_sampled=None, backend, exact_method="auto"):
    """The direction of ``kind`` (see :data:`KINDS`), (P,) in G's dtype, computed by ``backend``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    xp = array_module(G)
    if kind in ("ef", "ief"):
        rhs = xp.ones(G.shape[0], dtype=xp.float64) if kind == "ef" else s.astype(xp.float64)
        return backend.fisher_sample_space_direction(G, rhs, damping)
    grad = reference.batch_gradient(G, xp)
    if kind == "sf":
        factor = sampled_grads(J, probs, labels_sampled, xp=xp, dtype=xp.float64)
    elif reference.choose_exact_method(exact_method, J.shape) == "cg":
        return reference.exact_cg_solve(J, probs, grad, damping, xp=xp).astype(G.dtype)
    else:
        factor = fisher_factor(J, probs, xp=xp)
    return reference.factor_direction(
        factor, grad, damping, gram=backend.fisher_gram, solve=parameter_space_solve(xp), xp=xp
    ).astype(G.dtype)
