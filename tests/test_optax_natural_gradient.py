"""fisheropt.optax.natural_gradient: per-sample gradients, the matrix-free exact Fisher and the
EF / iEF / exact directions in JAX, jitted, against fisheropt.fisher on the same G (and J, p)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="fisheropt.optax needs jax: pip install 'fisheropt[jax]'")
pytest.importorskip("optax", reason="fisheropt.optax needs optax: pip install 'fisheropt[jax]'")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import fisheropt as fo  # noqa: E402
from fisheropt.optax import natural_gradient as ng  # noqa: E402

N_IN, HIDDEN, C = 4, 3, 3


def mlp(rng, dtype):
    return {
        "w1": jnp.asarray(rng.standard_normal((N_IN, HIDDEN)), dtype),
        "b1": jnp.zeros(HIDDEN, dtype),
        "w2": jnp.asarray(rng.standard_normal((HIDDEN, C)), dtype),
        "b2": jnp.asarray(rng.standard_normal(C), dtype),
    }


def logits_fn(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def sample_loss(params, x, y):
    return -jax.nn.log_softmax(logits_fn(params, x))[y]


def problem(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = mlp(rng, dtype)
    x = jnp.asarray(rng.standard_normal((n, N_IN)), dtype)
    y = jnp.asarray(rng.integers(0, C, n))
    return params, x, y


def test_per_sample_grads_are_the_rows_of_G():
    with jax.enable_x64(True):
        params, x, y = problem(5, jnp.float64)
        G = jax.jit(ng.per_sample_grads, static_argnums=0)(sample_loss, params, x, y)
        rows = [ravel_pytree(jax.grad(sample_loss)(params, x[n], y[n]))[0] for n in range(5)]
        np.testing.assert_allclose(np.asarray(G), np.stack(rows), rtol=1e-13, atol=1e-15)
        # and their sum is the batch gradient of the sum loss
        total = ravel_pytree(jax.grad(lambda p: jnp.sum(jax.vmap(sample_loss, (None, 0, 0))(p, x, y)))(params))[0]
        np.testing.assert_allclose(np.asarray(ng.batch_gradient(G)), np.asarray(total), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [6, 40])  # N < P (Gram N×N) and N > P (P×P): P = 27
@pytest.mark.parametrize("kind", ["ief", "ef"])
def test_directions_match_ngd_direction_on_the_same_G(kind, n):
    with jax.enable_x64(True):
        params, x, y = problem(n, jnp.float64, seed=n)
        G = ng.per_sample_grads(sample_loss, params, x, y)
        s = ng.logit_grad_sq_norms(logits_fn(params, x), y)
        damping = 1e-3
        if kind == "ief":
            d = jax.jit(ng.ief_direction)(G, s, damping)
            want = fo.fisher.ngd_direction("ief", G=np.asarray(G), s=np.asarray(s), damping=damping)
        else:
            d = jax.jit(ng.ef_direction)(G, damping)
            want = fo.fisher.ngd_direction("ef", G=np.asarray(G), damping=damping)
        assert d.dtype == jnp.float64 and d.shape == want.shape
        np.testing.assert_allclose(np.asarray(d), want, rtol=1e-8, atol=1e-8 * np.max(np.abs(want)))


def test_ief_float32_without_x64():
    """float32 G, float32 Gram and solve (no x64): relative error within ~ε₃₂·κ of the reference."""
    params, x, y = problem(8, jnp.float32, seed=3)
    G = ng.per_sample_grads(sample_loss, params, x, y)
    s = ng.logit_grad_sq_norms(logits_fn(params, x), y)
    damping = 1e-1
    d = np.asarray(jax.jit(ng.ief_direction)(G, s, damping), np.float64)
    Gn = np.asarray(G)
    want = fo.fisher.ngd_direction("ief", G=Gn, s=np.asarray(s, np.float64), damping=damping).astype(np.float64)
    K = Gn.astype(np.float64) @ Gn.T.astype(np.float64) + damping * np.eye(8)
    kappa = np.linalg.cond(K)
    err = np.max(np.abs(d - want)) / np.max(np.abs(want))
    assert err <= 50 * np.finfo(np.float32).eps * kappa, (err, kappa)


def test_fisher_matvec_is_the_exact_fisher():
    with jax.enable_x64(True):
        params, x, y = problem(5, jnp.float64, seed=1)
        flat, unravel = ravel_pytree(params)
        J = jax.jacrev(lambda f: logits_fn(unravel(f), x))(flat)  # (N, C, P)
        probs = jax.nn.softmax(logits_fn(params, x), axis=-1)
        F = fo.fisher.exact(np.asarray(J), np.asarray(probs))
        v = jnp.asarray(np.random.default_rng(0).standard_normal(flat.shape[0]))
        mv = jax.jit(lambda p, x, v: ng.fisher_matvec(logits_fn, p, x)(v))
        got = ravel_pytree(mv(params, x, unravel(v)))[0]
        np.testing.assert_allclose(np.asarray(got), F @ np.asarray(v), rtol=1e-10, atol=1e-12)


def test_exact_direction_matches_ngd_direction():
    with jax.enable_x64(True):
        params, x, y = problem(6, jnp.float64, seed=2)
        flat, unravel = ravel_pytree(params)
        J = np.asarray(jax.jacrev(lambda f: logits_fn(unravel(f), x))(flat))
        probs = np.asarray(jax.nn.softmax(logits_fn(params, x), axis=-1))
        G = np.asarray(ng.per_sample_grads(sample_loss, params, x, y))
        damping = 1e-2
        d = jax.jit(lambda p, x, y: ng.exact_direction(logits_fn, p, x, y, damping, tol=1e-12))(params, x, y)
        want = fo.fisher.ngd_direction("exact", G=G, J=J, probs=probs, damping=damping)
        np.testing.assert_allclose(np.asarray(ravel_pytree(d)[0]), want, rtol=1e-7, atol=1e-7 * np.max(np.abs(want)))
