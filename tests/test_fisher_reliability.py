"""Reliability of fisheropt.fisher (issue 13): wrong array types are refused, every direction is
accurate within the bound of spec/fisher.md §3 ("Accuracy") or raises the documented ValueError
(checked against an exact rational solve), subnormal s never yields Inf/NaN, and the mean-loss
recipe of the docs gives the mean-loss directions."""

import sys
from fractions import Fraction

import numpy as np
import pytest
from conftest import host_backend_params
from hypothesis import example, given
from hypothesis import strategies as st
from test_fisher import _kwargs

import fisheropt as fo
from fisheropt.workloads.models import MLP

F_ = fo.fisher
EPS = np.finfo(np.float64).eps
TINY = 2.0**-1074  # the smallest subnormal
# spec/fisher.md §3: a returned float64 direction has relative error <= C·ε·κ and at most
# MAX_ERROR; otherwise ngd_direction raises ValueError("damping ... too small ...").
C_BOUND, MAX_ERROR = 10.0, 1e-6

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, on purpose


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _random_problem(rng, N, C, P, K=2, J_scale=1.0, logit_scale=1.0, duplicate=False):
    J = J_scale * rng.standard_normal((N, C, P))
    p = _softmax(logit_scale * rng.standard_normal((N, C)))
    y = rng.integers(0, C, N)
    if duplicate and N > 1:  # a repeated sample: exactly singular Grams
        J[-1], p[-1], y[-1] = J[0], p[0], y[0]
    G = F_.per_sample_grads(J, p, y)
    return {
        "G": G,
        "J": J,
        "p": p,
        "y": y,
        "s": F_.logit_grad_sq_norms(p, y),
        "ls": F_.sample_labels(p, K, seed=int(rng.integers(1 << 30))),
    }


# ---- 1. array types and byte order ------------------------------------------------------------
def _calls(pr):
    G, J, p, s, y, ls = pr["G"], pr["J"], pr["p"], pr["s"], pr["y"], pr["ls"]
    g = G.sum(axis=0)
    return {
        "per_sample_grads": (F_.per_sample_grads, {"J": J, "probs": p, "labels": y}),
        "logit_grad_sq_norms": (F_.logit_grad_sq_norms, {"probs": p, "labels": y}),
        "empirical": (F_.empirical, {"G": G}),
        "improved_empirical": (F_.improved_empirical, {"G": G, "s": s}),
        "exact": (F_.exact, {"J": J, "probs": p}),
        "sampled": (F_.sampled, {"J": J, "probs": p, "labels_sampled": ls}),
        "diag_improved": (F_.diag_improved, {"G": G, "s": s}),
        "exact_operator": (F_.exact_operator, {"J": J, "probs": p}),
        "ngd_ef": (lambda **kw: F_.ngd_direction("ef", damping=1.0, **kw), {"G": G}),
        "ngd_ief": (lambda **kw: F_.ngd_direction("ief", damping=1.0, **kw), {"G": G, "s": s}),
        "ngd_exact": (lambda **kw: F_.ngd_direction("exact", damping=1.0, **kw), {"G": G, "J": J, "probs": p}),
        "ngd_sf": (
            lambda **kw: F_.ngd_direction("sf", damping=1.0, **kw),
            {"G": G, "J": J, "probs": p, "labels_sampled": ls},
        ),
        "quality": (F_.quality_indicator, {"d": g, "F": F_.empirical(G), "grad": g}),
    }


def _swapped(a):
    """The same values in the other byte order (e.g. '>f8' on a little-endian machine)."""
    return a.astype(a.dtype.newbyteorder("S"))


@pytest.mark.parametrize("name", list(_calls(_random_problem(np.random.default_rng(0), 4, 3, 5))))
def test_non_native_byte_order_floats_are_refused(name):
    pr = _random_problem(np.random.default_rng(1), 4, 3, 5)
    fn, kwargs = _calls(pr)[name]
    fn(**kwargs)  # the native call works
    for arg, value in kwargs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            bad = dict(kwargs, **{arg: _swapped(value)})
            with pytest.raises(TypeError, match=rf"{arg} has non-native byte order"):
                fn(**bad)


@pytest.mark.parametrize("name", ["ngd_ief", "improved_empirical", "exact", "quality", "per_sample_grads"])
def test_ndarray_subclasses_scalars_and_other_tensors_are_refused(name):
    pr = _random_problem(np.random.default_rng(2), 4, 3, 5)
    fn, kwargs = _calls(pr)[name]
    for arg, value in kwargs.items():
        if not isinstance(value, np.ndarray):
            continue
        bad_values = [value.view(np.recarray) if value.ndim else value, value.flat[0]]  # subclass; NumPy scalar
        if value.ndim == 2:
            bad_values.append(np.asmatrix(value))
        for bad in bad_values:
            with pytest.raises(TypeError, match=rf"{arg} (must be|is a) .*ndarray"):
                fn(**dict(kwargs, **{arg: bad}))


def test_torch_tensors_get_a_type_error_not_an_attribute_error():
    torch = pytest.importorskip("torch")
    pr = _random_problem(np.random.default_rng(3), 4, 3, 5)
    for fn, kwargs in _calls(pr).values():
        for arg, value in kwargs.items():
            if isinstance(value, np.ndarray):
                with pytest.raises(TypeError, match=rf"{arg} must be .*ndarray.*torch"):
                    fn(**dict(kwargs, **{arg: torch.from_numpy(value)}))


def test_non_native_integer_labels_give_the_native_result():
    """Labels are only ever read through NumPy indexing and min/max, which convert byte order."""
    pr = _random_problem(np.random.default_rng(4), 5, 3, 4)
    J, p, y, ls = pr["J"], pr["p"], pr["y"], pr["ls"]
    for labels in (y.astype(">i8"), y.astype("<i4"), y.astype(">u2")):
        np.testing.assert_array_equal(F_.per_sample_grads(J, p, labels), F_.per_sample_grads(J, p, y))
        np.testing.assert_array_equal(F_.logit_grad_sq_norms(p, labels), F_.logit_grad_sq_norms(p, y))
    want = F_.ngd_direction("sf", G=pr["G"], J=J, probs=p, labels_sampled=ls, damping=0.1)
    got = F_.ngd_direction("sf", G=pr["G"], J=J, probs=p, labels_sampled=_swapped(ls), damping=0.1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(F_.sampled(J, p, _swapped(ls)), F_.sampled(J, p, ls))


# ---- 2. small damping: exact rational oracle -----------------------------------------------------
def _fr(a):
    return np.vectorize(Fraction, otypes=[object])(np.asarray(a, dtype=np.float64))


def _exact_matrix_and_rhs(kind, pr):
    """The dense (P, P) matrix M and right-hand side g of d* = (M + λI)⁻¹ g, in exact rational
    arithmetic from the float64 inputs (spec/fisher.md §3, "dense equivalent")."""
    G = _fr(pr["G"])
    g = G.sum(axis=0)
    if kind in ("ef", "ief"):
        M = G.T @ G
        if kind == "ief":
            g = G.T @ _fr(pr["s"])
        return M, g
    J, p = _fr(pr["J"]), _fr(pr["p"])
    N, C, P = J.shape
    M = np.full((P, P), Fraction(0), dtype=object)
    if kind == "exact":
        for n in range(N):
            u = J[n].T @ p[n]
            M += (J[n].T * p[n]) @ J[n] - np.outer(u, u)
        return M, g
    ls = pr["ls"]
    for k in range(ls.shape[0]):
        for n in range(N):
            r = p[n].copy()
            r[ls[k, n]] -= 1
            gh = J[n].T @ r
            M += np.outer(gh, gh)
    return M / ls.shape[0], g


def _exact_solve(M, g, lam):
    """(M + λI)⁻¹ g by Gaussian elimination with partial pivoting over the rationals."""
    n = len(g)
    A = [[M[i, j] + (Fraction(lam) if i == j else 0) for j in range(n)] + [g[i]] for i in range(n)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(A[r][c]))
        A[c], A[piv] = A[piv], A[c]
        for r in range(c + 1, n):
            f = A[r][c] / A[c][c]
            if f:
                A[r] = [a - f * b for a, b in zip(A[r], A[c])]
    x = [Fraction(0)] * n
    for i in range(n - 1, -1, -1):
        x[i] = (A[i][n] - sum(A[i][j] * x[j] for j in range(i + 1, n))) / A[i][i]
    return x


def _kappa(kind, pr, lam):
    """The condition number the spec's bound uses: the damped matrix the direction depends on
    (ef/ief: the smaller Gram, GGᵀ or GᵀG; sf/exact: M + λI, M the P×P dense matrix)."""
    if kind in ("ef", "ief"):
        G = pr["G"]
        S = G @ G.T if G.shape[0] <= G.shape[1] else G.T @ G
    else:
        S = np.array(_exact_matrix_and_rhs(kind, pr)[0], dtype=np.float64)
    w = np.linalg.eigvalsh(S)
    with np.errstate(over="ignore"):
        return (w[-1] + lam) / (max(w[0], 0.0) + lam)


def _formation_scales(kind, pr):
    """(M_abs, g_abs): the matrix and right-hand side built from absolute values, whose size against
    M and g measures the cancellation in forming them (spec §3: the ρ of the bound). The exact
    Fisher factor's rows (I − uuᵀ)diag(u)J_n are formed as diag(u)J_n − u(uᵀdiag(u)J_n)."""
    G, J, p = np.abs(pr["G"]), np.abs(pr["J"]), pr["p"]
    rhs = pr["s"] if kind == "ief" else np.ones(G.shape[0])
    g_abs = G.T @ np.abs(rhs)
    if kind in ("ef", "ief"):
        return G.T @ G, g_abs
    if kind == "sf":
        ls = pr["ls"]
        R = np.broadcast_to(p, (ls.shape[0],) + p.shape).copy()
        R[np.arange(ls.shape[0])[:, None], np.arange(p.shape[0])[None, :], ls] -= 1
        rows = np.einsum("ncp,knc->knp", J, np.abs(R)).reshape(-1, J.shape[2])
        return rows.T @ rows / ls.shape[0], g_abs
    u = np.sqrt(p)
    A = u[:, :, None] * J
    A = A + u[:, :, None] * np.einsum("nc,ncp->np", u, A)[:, None, :]
    A = A.reshape(-1, J.shape[2])
    return A.T @ A, g_abs


def _check_against_oracle(kind, pr, lam, d_or_error, cg=False):
    """Accurate within the spec's bound, or the documented ValueError; never NaN/Inf.

    Bound (spec/fisher.md §3): ‖d − d*‖ ≤ C·ε·κ·(ρ‖d*‖ + ‖g_abs‖/(‖M‖ + λ)),
    ρ = ‖M_abs‖/(‖M‖ + λ); CG adds its own stopping error, at most min(κ·1e-10, MAX_ERROR)·‖d*‖."""
    M, g = _exact_matrix_and_rhs(kind, pr)
    x = _exact_solve(M, g, lam)
    representable = all(abs(v) < 1e308 for v in x)
    if isinstance(d_or_error, ValueError):
        assert "damping" in str(d_or_error) or "overflow" in str(d_or_error), d_or_error
        return "raised"
    d = d_or_error
    assert np.all(np.isfinite(d)), f"{kind} λ={lam:g}: non-finite direction returned"
    assert representable, f"{kind} λ={lam:g}: returned {d} for a direction beyond float64"
    want = np.array([float(v) for v in x])
    kappa = _kappa(kind, pr, lam)
    M_abs, g_abs = _formation_scales(kind, pr)
    top = np.linalg.norm(np.array(M, dtype=np.float64), 2) + lam
    scale = np.linalg.norm(want)
    bound = C_BOUND * EPS * kappa * (np.linalg.norm(M_abs, 2) / top * scale + np.linalg.norm(g_abs) / top)
    if cg:
        bound += min(kappa * 1.1e-10, MAX_ERROR) * scale
    err = np.linalg.norm(d - want)
    floor = 4 * np.sqrt(d.size) * TINY  # subnormal outputs carry absolute rounding
    assert err <= bound + floor, (
        f"{kind} λ={lam:g}: relative error {err / scale:.3g}, κ={kappa:.3g}, bound {bound / scale:.3g}"
    )
    return "accurate"


def _direction(kind, pr, lam, **extra):
    try:
        return F_.ngd_direction(kind, **_kwargs(kind, pr["G"], pr["s"], pr["J"], pr["p"], pr["ls"], lam, **extra))
    except ValueError as exc:
        return exc


# The issue's well-conditioned problem: F, EF and SF full rank with condition numbers ≈ 4–12, so
# every damping must give a float64-accurate direction (no error is acceptable here).
ISSUE_DAMPINGS = [1e2, 1e-4, 1e-10, 1e-14, 1e-16, 1e-100, 1e-200, 1e-300, 5e-324]


@pytest.fixture(scope="module")
def well_conditioned():
    return _random_problem(np.random.default_rng(0), 30, 3, 6)


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("kind", F_.KINDS)
def test_well_conditioned_problem_is_accurate_at_every_damping(well_conditioned, kind, backend):
    pr = well_conditioned
    M, g = (np.array(a, dtype=np.float64) for a in _exact_matrix_and_rhs(kind, pr))
    assert np.linalg.cond(M) < 20
    for lam in ISSUE_DAMPINGS:
        want = np.linalg.solve(M + lam * np.eye(M.shape[0]), g)  # cond ≤ 20: an accurate oracle
        d = F_.ngd_direction(kind, **_kwargs(kind, pr["G"], pr["s"], pr["J"], pr["p"], pr["ls"], lam, backend=backend))
        assert np.linalg.norm(d - want) <= 1e-12 * np.linalg.norm(want), (kind, lam)


@pytest.mark.parametrize("lam", ISSUE_DAMPINGS)
def test_exact_cg_is_accurate_or_refuses(well_conditioned, lam):
    pr = well_conditioned
    res = _direction("exact", pr, lam, exact_method="cg")
    _check_against_oracle("exact", pr, lam, res, cg=True)
    if lam >= 1e-4:
        assert not isinstance(res, ValueError), res


@st.composite
def damped_problems(draw):
    N, C, P = draw(st.integers(1, 5)), draw(st.integers(2, 4)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pr = _random_problem(
        rng,
        N,
        C,
        P,
        K=draw(st.integers(1, 2)),
        J_scale=10.0 ** draw(st.integers(-2, 2)),
        logit_scale=draw(st.sampled_from([0.1, 1.0, 6.0])),
        duplicate=draw(st.booleans()),
    )
    if draw(st.booleans()):  # s down to subnormals (iEF's right-hand side)
        pr["s"] = pr["s"] * 10.0 ** -draw(st.integers(300, 323))
    lam = draw(
        st.one_of(
            st.builds(lambda e, m: m * 10.0**e, st.integers(-300, 6), st.floats(1.0, 9.99)),
            st.sampled_from([5e-324, 1e-310, 2.2250738585072014e-308]),
        )
    )
    return pr, lam


@given(
    damped_problems(),
    st.sampled_from([(k, "auto") for k in F_.KINDS] + [("exact", "woodbury"), ("exact", "cg")]),
    st.sampled_from(["numpy", "numba"]),
)
def test_direction_is_accurate_or_raises_property(problem, kind_method, backend):
    if backend in fo.backends.unavailable():
        pytest.skip(f"{backend} backend unavailable")
    pr, lam = problem
    kind, method = kind_method
    extra = {"backend": backend} if kind != "exact" else {"backend": backend, "exact_method": method}
    outcome = _check_against_oracle(kind, pr, lam, _direction(kind, pr, lam, **extra), cg=method == "cg")
    # and it does not refuse a well-conditioned problem (the estimate of κ may exceed the true
    # κ by the estimator's slack and the dimension; CG certifies against λ alone)
    kappa = _kappa(kind, pr, lam)
    if method != "cg" and C_BOUND * EPS * kappa * 100 <= MAX_ERROR:
        assert outcome == "accurate", f"refused a problem with κ={kappa:.3g}"


def test_ief_full_row_rank_stays_accurate_at_tiny_damping():
    """Damping on the Gram: with GGᵀ well conditioned the iEF direction is well defined as λ → 0
    (it tends to F̃⁺∇L, test_fisher.py), so no damping is too small there."""
    pr = _random_problem(np.random.default_rng(5), 4, 3, 12)
    for lam in (1e-10, 1e-100, 1e-300, 5e-324):
        d = F_.ngd_direction("ief", G=pr["G"], s=pr["s"], damping=lam)
        assert _check_against_oracle("ief", pr, lam, d) == "accurate"


def test_too_small_damping_error_names_a_damping_that_works():
    pr = _random_problem(np.random.default_rng(6), 3, 3, 12, duplicate=True)  # P > N·C: F singular
    for kind in F_.KINDS:
        kw = _kwargs(kind, pr["G"], pr["s"], pr["J"], pr["p"], pr["ls"], 1e-30)
        with pytest.raises(ValueError, match=r"damping=1e-30 is too small") as info:
            F_.ngd_direction(kind, **kw)
        suggested = float(str(info.value).split("use damping >= ")[1].split()[0])
        assert 1e-30 < suggested
        d = F_.ngd_direction(kind, **dict(kw, damping=suggested))
        assert _check_against_oracle(kind, pr, suggested, d) == "accurate"


# ---- subnormal s in the iEF matrix, its diagonal and its operator -----------------------------
@given(seed=st.integers(0, 2**32 - 1), s_exp=st.integers(-323, 0), g_exp=st.integers(-170, 5))
@example(seed=0, s_exp=-320, g_exp=-10)  # the issue's s = 1e-320: g/s overflows, g²/s does not
@example(seed=0, s_exp=-320, g_exp=0)  # g²/s itself beyond float64: a clear error, not Inf
def test_ief_matrix_diagonal_and_operator_with_tiny_s(seed, s_exp, g_exp):
    rng = np.random.default_rng(seed)
    N, P = 3, 4
    G = rng.standard_normal((N, P)) * 10.0**g_exp
    s = rng.uniform(0.1, 1.0, N)
    s[0] = max(10.0**s_exp * rng.uniform(1, 9), TINY)
    Gf, sf = _fr(G), _fr(s)
    dense = sum(np.outer(Gf[n], Gf[n]) / sf[n] for n in range(N))  # exact G^T diag(s)^-1 G
    fits = all(abs(v) < 1e308 for v in dense.ravel())
    v = rng.standard_normal(P)
    for name, call, want in (
        ("diag_improved", lambda: F_.diag_improved(G, s), np.diag(dense)),
        ("improved_empirical", lambda: F_.improved_empirical(G, s), dense),
        (
            "improved_operator",
            lambda: F_.improved_operator(G, s, 0.5).matvec(v),
            dense @ _fr(v) + Fraction(0.5) * _fr(v),
        ),
    ):
        try:
            got = call()
        except ValueError as exc:
            assert "overflow" in str(exc), exc
            assert not fits or any(abs(x) >= 1e308 for x in np.ravel(want)), f"{name}: refused a representable result"
            continue
        assert np.all(np.isfinite(got)), f"{name}: Inf/NaN for s_0 = {s[0]:g}"
        w = np.array([float(x) for x in np.ravel(want)]).reshape(np.shape(want))
        # results in the subnormal range carry the absolute rounding of subnormals
        np.testing.assert_allclose(got, w, rtol=1e-13, atol=1e-13 * np.abs(w).max() + 64 * TINY, err_msg=name)


# ---- 3. the mean-loss recipe ------------------------------------------------------------------------
def test_mean_loss_recipe_gives_the_mean_loss_directions():
    """Follow the docstring's recipe literally for the mean loss L̄ = L/N with damping λ̄:
    pass the sum-loss G (= N × the mean-loss per-sample gradients) and damping N·λ̄; the result
    must equal (M̄ + λ̄I)⁻¹∇L̄ with every curvature matrix of the mean loss M̄ = M/N (curvlinops'
    reduction="mean": the GGN/Fisher of the mean loss, and the EF c·Σ∇lₙ∇lₙᵀ with c = 1/N)."""
    doc = " ".join(F_.__doc__.split())
    assert "divide G and ∇L by N" not in doc  # the old, wrong recipe
    assert "damping N·λ̄" in doc and "divided by N" in doc
    rng = np.random.default_rng(7)
    N, lam_bar = 9, 0.05
    model = MLP(3, 2, 3, seed=1)
    X, y = rng.standard_normal((N, 3)), rng.integers(0, 3, N)
    J, p = model.logit_jacobians(X), model.probs(X)
    G_mean = model.per_sample_grads(X, y) / N  # ∇θ (lₙ / N)
    grad_mean = model.loss_and_grads(X, y)[1]
    grad_mean = model.flatten(grad_mean) / N  # ∇L̄
    s = F_.logit_grad_sq_norms(p, y)
    ls = F_.sample_labels(p, 2, seed=0)
    # the mean-loss matrices from their definitions (not from fisheropt's sum-loss functions)
    H = np.einsum("nc,cd->ncd", p, np.eye(3)) - np.einsum("nc,nd->ncd", p, p)
    mean = {
        "exact": np.einsum("ncp,ncd,ndq->pq", J, H / N, J),
        "ef": N * G_mean.T @ G_mean,  # (1/N) Σ ∇lₙ ∇lₙᵀ
        "sf": sum(
            np.outer(J[n].T @ (p[n] - np.eye(3)[ls[k, n]]), J[n].T @ (p[n] - np.eye(3)[ls[k, n]]))
            for k in range(2)
            for n in range(N)
        )
        / (2 * N),
    }
    rhs = {k: grad_mean for k in mean}
    rhs["ief"] = N * G_mean.T @ s / N  # iEF direction: (EF̄ + λ̄I)⁻¹ (Gᵀs)/N, same rule
    mean["ief"] = mean["ef"]
    G_sum = N * G_mean  # the recipe: the sum-loss G
    for kind in F_.KINDS:
        want = np.linalg.solve(mean[kind] + lam_bar * np.eye(mean[kind].shape[0]), rhs[kind])
        d = F_.ngd_direction(kind, **_kwargs(kind, G_sum, s, J, p, ls, N * lam_bar))
        np.testing.assert_allclose(d, want, rtol=1e-9, atol=1e-12, err_msg=kind)
        # the estimators: sum-loss ones divided by N
    np.testing.assert_allclose(F_.exact(J, p) / N, mean["exact"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F_.empirical(G_sum) / N, mean["ef"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F_.sampled(J, p, ls) / N, mean["sf"], rtol=1e-12, atol=1e-14)
    # the old recipe (G/N with damping N·λ̄) does not give it
    old = F_.ngd_direction("ef", G=G_mean, damping=N * lam_bar)
    assert not np.allclose(old, np.linalg.solve(mean["ef"] + lam_bar * np.eye(mean["ef"].shape[0]), grad_mean))


if __name__ == "__main__":  # print the accuracy table quoted in the report
    pr = _random_problem(np.random.default_rng(0), 30, 3, 6)
    for backend in ("numpy", "numba"):
        print(backend, " ".join(f"{lam:8.0e}" for lam in ISSUE_DAMPINGS))
        for kind, extra in [(k, {}) for k in F_.KINDS] + [("exact", {"exact_method": "cg"})]:
            row = []
            for lam in ISSUE_DAMPINGS:
                res = _direction(kind, pr, lam, backend=backend, **extra)
                if isinstance(res, ValueError):
                    row.append("   raise")
                    continue
                want = np.array([float(v) for v in _exact_solve(*_exact_matrix_and_rhs(kind, pr), lam)])
                row.append(f"{np.linalg.norm(res - want) / np.linalg.norm(want):8.1e}")
            print(f"{kind + ('/cg' if extra else ''):9}", " ".join(row), file=sys.stdout)
