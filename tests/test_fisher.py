"""Fisher estimators and natural-gradient directions (fisheropt.fisher, refimpl/fisher_*.py)."""

import numpy as np
import pytest

import fisheropt as fo
from fisheropt.refimpl import fisher_empirical, fisher_exact, fisher_improved, fisher_ngd, fisher_sampled
from fisheropt.workloads.models import MLP, SoftmaxRegression

F_ = fo.fisher


def _problem(rng, N=7, F=4, H=3, C=3, dtype=np.float64, model="mlp", spread=1.0):
    m = (
        MLP(F, H, C, seed=int(rng.integers(1 << 30)), dtype=dtype)
        if model == "mlp"
        else SoftmaxRegression(F, C, seed=int(rng.integers(1 << 30)), dtype=dtype)
    )
    m.set_flat((m.get_flat() + spread * rng.standard_normal(m.n_params)).astype(dtype))
    X = rng.standard_normal((N, F)).astype(dtype)
    y = rng.integers(0, C, N)
    J, p = m.logit_jacobians(X), m.probs(X)
    G = m.per_sample_grads(X, y)
    s = F_.logit_grad_sq_norms(p, y)
    return m, X, y, J, p, G, s


def _kwargs(kind, G, s, J, p, ls, lam, **extra):
    """ngd_direction's keyword arguments for ``kind``: the arrays it needs, the damping and ``extra``."""
    kw = {"G": G, "damping": lam, **extra}
    if kind == "ief":
        kw["s"] = s
    if kind in ("sf", "exact"):
        kw.update(J=J, probs=p)
    if kind == "sf":
        kw["labels_sampled"] = ls
    return kw


# ---- per-sample quantities ------------------------------------------------------------
def test_per_sample_grads_and_s_against_brute_force(rng):
    m, X, y, J, p, G, s = _problem(rng)
    G2 = F_.per_sample_grads(J, p, y)
    np.testing.assert_allclose(G2, G, rtol=1e-12, atol=1e-14)
    for n in range(X.shape[0]):
        # loss gradient of sample n by central differences on the model
        theta = m.get_flat()
        fd = np.empty_like(theta)
        for i in range(theta.size):
            e = np.zeros_like(theta)
            e[i] = 1e-6
            m.set_flat(theta + e)
            lp = m.loss(X[n : n + 1], y[n : n + 1])
            m.set_flat(theta - e)
            lm = m.loss(X[n : n + 1], y[n : n + 1])
            fd[i] = (lp - lm) / 2e-6
        m.set_flat(theta)
        np.testing.assert_allclose(G2[n], fd, rtol=1e-5, atol=1e-7)
        r = p[n].copy()
        r[y[n]] -= 1
        assert s[n] == pytest.approx(float(r @ r))
    # s is the squared norm of the logits gradient: check it by differences in z
    z = m.logits(X)
    for n in range(X.shape[0]):
        gz = np.array(
            [
                (
                    np.logaddexp.reduce(z[n] + 1e-6 * np.eye(3)[c])
                    - (z[n] + 1e-6 * np.eye(3)[c])[y[n]]
                    - np.logaddexp.reduce(z[n] - 1e-6 * np.eye(3)[c])
                    + (z[n] - 1e-6 * np.eye(3)[c])[y[n]]
                )
                / 2e-6
                for c in range(3)
            ]
        )
        assert s[n] == pytest.approx(float(gz @ gz), rel=1e-6)


# ---- dense estimators against brute-force loops ------------------------------------------
def test_dense_estimators_against_brute_force(rng):
    _, _, _, J, p, G, s = _problem(rng)
    ls = F_.sample_labels(p, 4, seed=1)
    F = F_.exact(J, p)
    np.testing.assert_allclose(F, fisher_exact.exact_bruteforce(J, p), rtol=1e-10, atol=1e-12)
    # the exact Fisher is the expectation over model labels of g g^T
    np.testing.assert_allclose(F, fisher_exact.exact_expectation_bruteforce(J, p), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(F_.empirical(G), fisher_empirical.empirical_bruteforce(G), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        F_.sampled(J, p, ls), fisher_sampled.sampled_bruteforce(J, p, ls), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(
        F_.improved_empirical(G, s), fisher_improved.improved_empirical_bruteforce(G, s), rtol=1e-10, atol=1e-12
    )
    # the Fisher factor: A^T A = F
    A = fisher_exact.fisher_factor(J, p)
    np.testing.assert_allclose(A.T @ A, F, rtol=1e-10, atol=1e-12)
    for M in (F, F_.empirical(G), F_.improved_empirical(G, s)):
        np.testing.assert_allclose(M, M.T, atol=1e-12)
        assert np.linalg.eigvalsh(M).min() > -1e-10


def test_sampled_fisher_converges_to_exact(rng):
    _, _, _, J, p, _, _ = _problem(rng, N=3, spread=0.3)
    F = F_.exact(J, p)
    SF = F_.sampled(J, p, F_.sample_labels(p, 20000, seed=0))
    assert np.abs(SF - F).max() < 0.05 * np.abs(F).max()


def test_sample_labels_distribution():
    p = np.array([[0.1, 0.6, 0.3], [1.0, 0.0, 0.0]])
    ls = F_.sample_labels(p, 20000, seed=3)
    assert ls.shape == (20000, 2) and ls.dtype == np.int64
    np.testing.assert_allclose(np.bincount(ls[:, 0], minlength=3) / 20000, p[0], atol=0.015)
    assert np.all(ls[:, 1] == 0)


def test_operators_match_dense(rng):
    _, _, _, J, p, G, s = _problem(rng)
    ls = F_.sample_labels(p, 2, seed=0)
    v = rng.standard_normal(G.shape[1])
    pairs = [
        (F_.exact_operator(J, p, 0.1), F_.exact(J, p)),
        (F_.empirical_operator(G, 0.1), F_.empirical(G)),
        (F_.sampled_operator(J, p, ls, 0.1), F_.sampled(J, p, ls)),
        (F_.improved_operator(G, s, 0.1), F_.improved_empirical(G, s)),
    ]
    for op, dense in pairs:
        np.testing.assert_allclose(op.matvec(v), dense @ v + 0.1 * v, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(op.rmatvec(v), op.matvec(v))


def test_diagonals_match_dense(rng):
    _, _, _, J, p, G, s = _problem(rng)
    ls = F_.sample_labels(p, 3, seed=0)
    np.testing.assert_allclose(F_.diag_exact(J, p), np.diag(F_.exact(J, p)), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(F_.diag_empirical(G), np.diag(F_.empirical(G)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F_.diag_sampled(J, p, ls), np.diag(F_.sampled(J, p, ls)), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(F_.diag_improved(G, s), np.diag(F_.improved_empirical(G, s)), rtol=1e-10, atol=1e-13)


# ---- directions: sample space == dense (F + λI)^{-1} form --------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lam", [1e-3, 1e-1, 10.0])
@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (12, 3, 2, 4)], ids=["P>N", "P<N*C"])
def test_directions_equal_dense_forms(rng, dtype, lam, shape):
    N, F, H, C = shape
    _, _, _, J, p, G, s = _problem(rng, N=N, F=F, H=H, C=C, dtype=dtype)
    ls = F_.sample_labels(p, 2, seed=0)
    g = G.astype(np.float64).sum(axis=0)
    EF = F_.empirical(G.astype(np.float64))
    dense = {
        "ef": fisher_ngd.dense_direction(EF, g, lam),
        "ief": fisher_ngd.dense_direction(EF, G.astype(np.float64).T @ s.astype(np.float64), lam),
        "sf": fisher_ngd.dense_direction(F_.sampled(J.astype(np.float64), p.astype(np.float64), ls), g, lam),
        "exact": fisher_ngd.dense_direction(F_.exact(J.astype(np.float64), p.astype(np.float64)), g, lam),
    }
    tol = 1e-9 if dtype == np.float64 else 2e-3
    for kind in F_.KINDS:
        d = F_.ngd_direction(kind, **_kwargs(kind, G, s, J, p, ls, lam))
        assert d.dtype == dtype and d.shape == g.shape
        scale = np.abs(dense[kind]).max()
        np.testing.assert_allclose(d, dense[kind], rtol=tol, atol=tol * scale, err_msg=kind)
    d_cg = F_.ngd_direction("exact", G=G, J=J, probs=p, damping=lam, exact_method="cg")
    np.testing.assert_allclose(d_cg, dense["exact"], rtol=tol, atol=tol * np.abs(dense["exact"]).max())


def test_ief_is_the_pseudo_inverse_natural_gradient_of_the_ief_matrix(rng):
    """Damping on the Gram (the paper's Eq. 8): as λ -> 0 the iEF direction tends to
    F̃⁺ ∇L with F̃ = G^T diag(s)^{-1} G, when G has full row rank."""
    _, _, _, _, _, G, s = _problem(rng, N=4, F=4, H=3, C=3)
    d = F_.ngd_direction("ief", G=G, s=s, damping=1e-10)
    target = np.linalg.pinv(F_.improved_empirical(G, s), rcond=1e-12) @ G.sum(axis=0)
    np.testing.assert_allclose(d, target, rtol=1e-5, atol=1e-6 * np.abs(target).max())
    # and it solves the per-sample loss-reduction conditions g_n^T d = s_n (up to λ)
    np.testing.assert_allclose(G @ d, s, rtol=1e-6, atol=1e-8)


def test_exact_direction_large_nc_uses_cg(rng, monkeypatch):
    _, _, _, J, p, G, _ = _problem(rng, N=6)
    monkeypatch.setattr(fisher_ngd, "EXACT_WOODBURY_MAX_ROWS", 4)
    d = F_.ngd_direction("exact", G=G, J=J, probs=p, damping=0.05)
    dense = fisher_ngd.dense_direction(F_.exact(J, p), G.sum(axis=0), 0.05)
    np.testing.assert_allclose(d, dense, rtol=1e-8, atol=1e-10 * np.abs(dense).max())


def test_ill_conditioned_damped_gram_raises_instead_of_a_fallback(rng):
    """No eigh fallback with clipped eigenvalues: a damped Gram the float64 solve cannot
    handle to the accuracy contract (spec/fisher.md §3) is refused, with a damping that works."""
    G = rng.standard_normal((5, 8))
    G[4] = G[0]  # a duplicated sample: exactly singular Gram
    rhs = rng.standard_normal(5)
    with pytest.raises(fisher_ngd.DampingTooSmall, match=r"damping=1e-12 is too small"):
        fisher_ngd.fisher_sample_space_direction(G, rhs, 1e-12)
    # numerically indefinite (a negative rounding eigenvalue): refused, not clipped and amplified
    with pytest.raises(fisher_ngd.DampingTooSmall, match="condition number inf"):
        fisher_ngd.solve_damped_gram(np.diag([1.0, -1e-3]), np.ones(2), 1e-4)
    # the public API says the same, and the error is a ValueError
    with pytest.raises(ValueError, match="use damping >="):
        F_.ngd_direction("ief", G=G, s=np.abs(rhs), damping=1e-12)


def test_more_samples_than_parameters_solves_the_small_system(rng, monkeypatch):
    """N > P: GGᵀ (N×N) is singular, so the direction goes through GᵀG (P×P) instead."""
    G = rng.standard_normal((40, 3))
    calls = []
    orig = fisher_ngd.solve_damped_gram
    monkeypatch.setattr(fisher_ngd, "solve_damped_gram", lambda K, r, lam: calls.append(K.shape) or orig(K, r, lam))
    d = fisher_ngd.sample_space_direction(
        G, np.ones(40), 1e-300, gram=fisher_ngd.fisher_gram, solve=fisher_ngd.solve_damped_gram
    )
    assert calls == [(3, 3)]
    np.testing.assert_allclose(d, np.linalg.solve(G.T @ G, G.sum(axis=0)), rtol=1e-12)


def test_float32_gram_blocks_accumulate_in_float64(rng, monkeypatch):
    monkeypatch.setattr(fisher_ngd, "GRAM_BLOCK", 64)
    G = rng.standard_normal((6, 1000)).astype(np.float32)
    K = fisher_ngd.fisher_gram(G)
    assert K.dtype == np.float64
    exact = G.astype(np.float64) @ G.astype(np.float64).T
    np.testing.assert_allclose(K, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
    d = fisher_ngd.fisher_sample_space_direction(G, np.ones(6), 1e-2)
    want = G.astype(np.float64).T @ np.linalg.solve(exact + 1e-2 * np.eye(6), np.ones(6))
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_ef_and_ief_coincide_when_s_is_constant(rng):
    G = rng.standard_normal((4, 9))
    d1 = F_.ngd_direction("ef", G=G, damping=0.2)
    d2 = F_.ngd_direction("ief", G=G, s=np.full(4, 2.0), damping=0.2)
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-12)


# ---- quality indicator --------------------------------------------------------------
def test_quality_indicator_definition_and_invariance(rng):
    _, _, _, J, p, G, _ = _problem(rng)
    F = F_.exact(J, p)
    g = G.sum(axis=0)
    d = rng.standard_normal(g.size)
    gamma = F_.quality_indicator(d, F, g)
    assert gamma == pytest.approx(np.sqrt(d @ F @ d) / abs(d @ g))
    assert F_.quality_indicator(-3.5 * d, F, g) == pytest.approx(gamma)
    assert F_.quality_indicator(d, F_.exact_operator(J, p), g) == pytest.approx(gamma)
    assert F_.relative_quality(g, F, g) == pytest.approx(1.0)
    # the minimum: the (pseudo-inverse) natural gradient
    d_ng = np.linalg.pinv(F, rcond=1e-12) @ g
    gmin = F_.quality_indicator(d_ng, F, g)
    assert gmin == pytest.approx(1 / np.sqrt(g @ d_ng), rel=1e-6)
    for _ in range(20):
        assert F_.quality_indicator(rng.standard_normal(g.size), F, g) >= gmin * (1 - 1e-9)
    assert F_.quality_indicator(np.zeros_like(g), F, g) == float("inf")


# ---- validation: clear errors, nothing half-done -------------------------------------
def test_validation_errors(rng):
    _, _, y, J, p, G, s = _problem(rng, N=5)
    ls = F_.sample_labels(p, 2, seed=0)
    nd = F_.ngd_direction
    with pytest.raises(ValueError, match="unknown kind"):
        nd("newton", G=G, damping=1.0)
    with pytest.raises(ValueError, match="missing: s"):
        nd("ief", G=G, damping=1.0)
    with pytest.raises(ValueError, match="missing: J, probs"):
        nd("exact", G=G, damping=1.0)
    with pytest.raises(ValueError, match="missing: labels_sampled"):
        nd("sf", G=G, J=J, probs=p, damping=1.0)
    with pytest.raises(ValueError, match="does not use"):
        nd("ef", G=G, s=s, damping=1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            nd("ef", G=G, damping=bad)
    with pytest.raises(TypeError, match="damping"):
        nd("ef", G=G, damping="1")
    Gn = G.copy()
    Gn[0, 0] = np.nan
    with pytest.raises(ValueError, match="G contains NaN"):
        nd("ef", G=Gn, damping=1.0)
    with pytest.raises(ValueError, match="s has shape"):
        nd("ief", G=G, s=s[:-1], damping=1.0)
    with pytest.raises(ValueError, match="s must be >= 0"):
        nd("ief", G=G, s=-s, damping=1.0)
    with pytest.raises(ValueError, match="J has shape"):
        nd("exact", G=G[:, :-1], J=J, probs=p, damping=1.0)
    with pytest.raises(ValueError, match="probs"):
        nd("exact", G=G, J=J, probs=p[:-1], damping=1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        nd("exact", G=G, J=J, probs=2 * p, damping=1.0)
    with pytest.raises(ValueError, match="labels_sampled must lie"):
        nd("sf", G=G, J=J, probs=p, labels_sampled=ls + 5, damping=1.0)
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        nd("sf", G=G, J=J, probs=p, labels_sampled=ls[:, :-1], damping=1.0)
    with pytest.raises(TypeError, match="integer"):
        nd("sf", G=G, J=J, probs=p, labels_sampled=ls.astype(float), damping=1.0)
    with pytest.raises(TypeError, match="dtype"):
        nd("ef", G=G.astype(np.float16), damping=1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        nd("ef", G=G, damping=1.0, backend="fortran")
    with pytest.raises(ValueError, match="exact_method"):
        nd("exact", G=G, J=J, probs=p, damping=1.0, exact_method="lu")
    with pytest.raises(ValueError, match="labels must lie"):
        F_.per_sample_grads(J, p, y + 10)
    with pytest.raises(ValueError, match="labels has shape"):
        F_.logit_grad_sq_norms(p, y[:-1])
    with pytest.raises(ValueError, match="s must be > 0"):
        F_.improved_empirical(G, np.zeros_like(s))
    with pytest.raises(ValueError, match="expected"):
        F_.quality_indicator(G[0], np.eye(3), G[0])
    with pytest.raises(ValueError, match="grad has shape"):
        F_.quality_indicator(G[0], F_.empirical(G), G[0][:-1])
    # inputs are never modified
    G0, s0 = G.copy(), s.copy()
    nd("ief", G=G, s=s, damping=1.0)
    np.testing.assert_array_equal(G, G0)
    np.testing.assert_array_equal(s, s0)


def test_exact_direction_from_an_operator_equals_the_one_from_J(rng):
    """ngd_direction("exact", G=G, F=operator): the Fisher as products (never J), conjugate gradients
    with the contract of exact_method="cg"; equal to the Woodbury solve from J and probs."""
    N, C, P = 6, 4, 15
    J = rng.standard_normal((N, C, P))
    logits = rng.standard_normal((N, C))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, C, N)
    G = fo.fisher.per_sample_grads(J, probs, labels)
    want = fo.fisher.ngd_direction("exact", G=G, J=J, probs=probs, damping=0.1, exact_method="woodbury")
    got = fo.fisher.ngd_direction("exact", G=G, F=fo.fisher.exact_operator(J, probs), damping=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12 * np.abs(want).max())
    with pytest.raises(ValueError, match="either J and probs, or the operator F"):
        fo.fisher.ngd_direction("exact", G=G, F=fo.fisher.exact_operator(J, probs), J=J, probs=probs, damping=0.1)
    with pytest.raises(ValueError, match="kind 'exact' only"):
        fo.fisher.ngd_direction("ef", G=G, F=fo.fisher.exact_operator(J, probs), damping=0.1)
    with pytest.raises(ValueError, match="shape"):
        fo.fisher.ngd_direction("exact", G=G, F=fo.fisher.exact_operator(J[:, :, :5], probs), damping=0.1)
