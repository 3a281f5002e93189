r"""Natural-gradient pieces in JAX: per-sample gradients, the matrix-free exact Fisher, and
the EF / iEF / exact directions (spec/fisher.md), all jit-able.

Conventions as spec/fisher.md: the **sum** loss L = Σₙ lₙ, G (N, P) with row n = ∇θ lₙ,
the flat parameter vector = the params' leaves (``jax.tree.leaves`` order) each flattened
in C order (what ``jax.flatten_util.ravel_pytree`` does), s (N,) = ‖pₙ − e_{yₙ}‖², damping
λ > 0, update θ ← θ − η d.

* :func:`per_sample_grads`: G by ``jax.vmap(jax.grad(loss))``.
* :func:`logit_grad_sq_norms`: s from the logits and labels.
* :func:`ief_direction` / :func:`ef_direction`: d = Gᵀ(GGᵀ + λI)⁻¹ rhs (rhs = s, or 1), through
  the smaller Gram (P × P when N > P), solved by Cholesky — as
  :func:`fisheropt.fisher.ngd_direction`, which the tests compare against on the same G.
* :func:`fisher_matvec`: v ↦ F v = Σₙ Jₙᵀ(diag pₙ − pₙpₙᵀ)Jₙ v by one ``jax.linearize`` (J v) and its
  transpose (Jᵀ w), nothing P×P or N×C×P stored; :func:`exact_direction`: (F + λI)⁻¹∇L by
  conjugate gradients on it.

Precision: with ``jax_enable_x64`` the Gram matrix and the solve are float64, as the
reference; without, float32, so the relative error of a direction grows like ε₃₂·κ (κ the
condition number of GGᵀ + λI): use x64 when κ is large. Unlike the reference these
functions cannot raise under ``jit``: a damping too small for the dtype gives an inaccurate
(or NaN) direction instead of ``DampingTooSmall``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

from .._types import PyTree
from ._numerics import x64_enabled

__all__ = [
    "per_sample_grads",
    "logit_grad_sq_norms",
    "fisher_gram",
    "fisher_sample_space_direction",
    "ef_direction",
    "ief_direction",
    "fisher_matvec",
    "exact_direction",
    "batch_gradient",
    "ravel_pytree",
]


def _acc_dtype() -> type[Any]:
    return jnp.float64 if x64_enabled() else jnp.float32


def per_sample_grads(loss_fn: Callable[..., jax.Array], params: PyTree, *batch: ArrayLike) -> jax.Array:
    """G (N, P): row n = ∇θ ``loss_fn(params, *sample_n)``, where ``batch`` holds arrays whose
    leading axis is the sample index (``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, ...))``).
    Columns follow :func:`jax.flatten_util.ravel_pytree` of the params."""
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)
    leaves = jax.tree.leaves(grads)
    n = leaves[0].shape[0]
    return jnp.concatenate([leaf.reshape(n, -1) for leaf in leaves], axis=1)


def logit_grad_sq_norms(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """s (N,): sₙ = ‖softmax(zₙ) − e_{yₙ}‖² (the squared gradient of the loss w.r.t. the logits)."""
    p = jax.nn.softmax(logits, axis=-1)
    r = p - jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype)
    return jnp.sum(r * r, axis=-1)


def fisher_gram(G: jax.Array) -> jax.Array:
    """K = GGᵀ, (N, N), accumulated in float64 with x64 (float32 without)."""
    acc = _acc_dtype()
    Ga = G.astype(acc)
    return jnp.matmul(Ga, Ga.T, precision=jax.lax.Precision.HIGHEST)


def _solve_damped(K: jax.Array, rhs: jax.Array, damping: ArrayLike) -> jax.Array:
    n = K.shape[0]
    Kd = K + jnp.asarray(damping, K.dtype) * jnp.eye(n, dtype=K.dtype)
    c, lower = jsl.cho_factor(Kd, lower=True)
    return jsl.cho_solve((c, lower), rhs.astype(K.dtype))


def fisher_sample_space_direction(G: jax.Array, rhs: ArrayLike, damping: ArrayLike) -> jax.Array:
    """d = Gᵀ(GGᵀ + λI)⁻¹ rhs = (GᵀG + λI)⁻¹Gᵀ rhs, (P,) in G's dtype, through the smaller Gram
    (refimpl.fisher_ngd.sample_space_direction); rhs scaled by a power of two into [1, 2)
    for the solve and d scaled back (exact)."""
    N, P = G.shape
    acc = _acc_dtype()
    rhs = jnp.asarray(rhs).astype(acc)
    top = jnp.max(jnp.abs(rhs)) if N else jnp.zeros((), acc)
    _, e = jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, jnp.ones((), acc)))
    shift = (e - 1).astype(jnp.int32)
    rhs = jnp.ldexp(rhs, -shift)
    if P < N:  # GGᵀ singular: solve in parameter space
        Ga = G.astype(acc)
        S = jnp.matmul(Ga.T, Ga, precision=jax.lax.Precision.HIGHEST)
        d = _solve_damped(S, jnp.matmul(Ga.T, rhs, precision=jax.lax.Precision.HIGHEST), damping).astype(G.dtype)
    else:
        y = _solve_damped(fisher_gram(G), rhs, damping).astype(G.dtype)
        d = jnp.matmul(G.T, y, precision=jax.lax.Precision.HIGHEST)
    return jnp.ldexp(d, shift.astype(jnp.int32)).astype(G.dtype)


def ef_direction(G: jax.Array, damping: ArrayLike) -> jax.Array:
    """EF: d = Gᵀ(GGᵀ + λI)⁻¹1 = (EF + λI)⁻¹∇L."""
    return fisher_sample_space_direction(G, jnp.ones(G.shape[0], _acc_dtype()), damping)


def ief_direction(G: jax.Array, s: jax.Array, damping: ArrayLike) -> jax.Array:
    """iEF (Wu et al. 2024, Eq. 8): d = Gᵀ(GGᵀ + λI)⁻¹s — fisheropt.fisher.ngd_direction("ief", ...)."""
    return fisher_sample_space_direction(G, s, damping)


def batch_gradient(G: jax.Array) -> jax.Array:
    """∇L = Gᵀ1 = Σₙ gₙ."""
    return jnp.sum(G.astype(_acc_dtype()), axis=0)


def fisher_matvec(
    logits_fn: Callable[..., jax.Array], params: PyTree, *inputs: ArrayLike
) -> Callable[[PyTree], PyTree]:
    r"""The exact Fisher (= GGN of softmax cross-entropy, sum over the batch) as a function
    v ↦ F v on pytrees like ``params``: F v = Σₙ Jₙᵀ Hₙ Jₙ v with Hₙ w = pₙ⊙w − pₙ(pₙᵀw).

    ``logits_fn(params, *inputs)`` returns the (N, C) logits of the batch. J v is one
    forward-mode pass (``jax.linearize``), Jᵀ w its transpose (``jax.linear_transpose``);
    nothing P×P or N×C×P is formed."""
    logits, jvp = jax.linearize(lambda p: logits_fn(p, *inputs), params)
    vjp = jax.linear_transpose(jvp, params)
    p = jax.nn.softmax(logits, axis=-1)

    def matvec(v: PyTree) -> PyTree:
        jv = jvp(v)
        hjv = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
        return vjp(hjv)[0]

    return matvec


def exact_direction(
    logits_fn: Callable[..., jax.Array],
    params: PyTree,
    inputs: ArrayLike,
    labels: jax.Array,
    damping: ArrayLike,
    *,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> PyTree:
    """Exact natural gradient (F + λI)⁻¹∇L for the sum cross-entropy loss, by conjugate gradients
    on :func:`fisher_matvec` (matrix-free), as a pytree like ``params``."""

    def loss(p: PyTree) -> jax.Array:
        z = logits_fn(p, inputs)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), labels[:, None], axis=-1))

    grad = jax.grad(loss)(params)
    mv = fisher_matvec(logits_fn, params, inputs)
    lam = damping

    def damped(v: PyTree) -> PyTree:
        return jax.tree.map(lambda a, b: a + lam * b, mv(v), v)

    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    d, _ = jax.scipy.sparse.linalg.cg(damped, grad, tol=tol, maxiter=maxiter or 10 * n)
    return d
