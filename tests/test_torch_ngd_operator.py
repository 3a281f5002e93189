"""The matrix-free exact Fisher (FisherOperator) and its conjugate-gradient solve."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# torch's forward-mode AD scripts its decompositions on first use (torch's own DeprecationWarning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

from torch_models import TokenModel  # noqa: E402

import fisheropt.torch as fot  # noqa: E402
from fisheropt import fisher  # noqa: E402
from fisheropt.torch.fisher_operator import operator_ngd_direction  # noqa: E402

nn = torch.nn


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 3)).to(dtype)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)


def autograd_ggn(model, x, layout):
    """curvlinops-style reference, all plain autograd: J by torch.autograd.functional.jacobian of the
    logits w.r.t. the flat parameters, H_n by torch.autograd.functional.hessian of the summed CE
    w.r.t. each sample's logits (its value does not depend on the label), GGN = Σ_n J_nᵀ H_n J_n."""
    theta = layout.get_flat()

    def f(flat):
        return torch.func.functional_call(model, layout.unflatten_dict(flat), (x,))

    J = torch.autograd.functional.jacobian(f, theta)
    z = f(theta).detach()
    F = torch.zeros(layout.P, layout.P, dtype=torch.float64)
    for n in range(x.shape[0]):
        H = torch.autograd.functional.hessian(
            lambda zz: nn.functional.cross_entropy(zz[None], torch.tensor([0]), reduction="sum"), z[n]
        )
        F += J[n].T @ H @ J[n]
    return F


@pytest.mark.parametrize("mode, chunk_size", [("jvp", None), ("vjp", None), ("jvp", 4), ("auto", 2)])
def test_matvec_matches_dense_exact_and_autograd_ggn(batch, mode, chunk_size):
    x, y = batch
    m = mlp()
    op = fot.FisherOperator(m, x, y, mode=mode, chunk_size=chunk_size)
    J = fot.logit_jacobians(m, x).numpy()
    F_dense = fisher.exact(J, op.probs.numpy())
    F_auto = autograd_ggn(m, x, op.layout).numpy()
    np.testing.assert_allclose(F_dense, F_auto, atol=1e-12)
    V = np.random.default_rng(0).standard_normal((3, op.P))
    for v in V:
        np.testing.assert_allclose(op.matvec(v), F_auto @ v, rtol=1e-11, atol=1e-12)
        out = op.matvec(torch.from_numpy(v))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(op.as_linear_operator() @ V[0], F_dense @ V[0], rtol=1e-11, atol=1e-12)
    # ∇L from one reverse product
    G = fot.per_sample_grads(m, x, y).G.numpy()
    np.testing.assert_allclose(op.gradient().numpy(), G.sum(0), atol=1e-12)


def test_sampled_fisher_operator_matches_dense_sampled(batch):
    x, y = batch
    m = mlp()
    op = fot.FisherOperator(m, x, y, kind="sf", n_samples=3, generator=torch.Generator().manual_seed(0))
    J = fot.logit_jacobians(m, x).numpy()
    SF = fisher.sampled(J, op.probs.numpy(), op.labels_sampled.numpy())
    v = np.random.default_rng(1).standard_normal(op.P)
    np.testing.assert_allclose(op.matvec(v), SF @ v, rtol=1e-11, atol=1e-12)


def test_sequence_operator_sums_over_counted_tokens():
    torch.manual_seed(2)
    m = TokenModel(vocab=5, width=3, classes=4).double()
    ids = torch.randint(0, 5, (3, 4))
    y = torch.randint(0, 4, (3, 4))
    y[1, 2:] = -100
    op = fot.FisherOperator(m, ids, y)
    J = fot.logit_jacobians(m, ids)  # (N, T, C, P)
    keep = (y != -100).reshape(-1)
    Jt = J.reshape(-1, 4, op.P)[keep].numpy()
    F = fisher.exact(Jt, op.probs[keep].numpy())  # token-level exact Fisher
    v = np.random.default_rng(2).standard_normal(op.P)
    np.testing.assert_allclose(op.matvec(v), F @ v, rtol=1e-11, atol=1e-12)


def test_cg_direction_equals_ngd_direction_exact(batch):
    x, y = batch
    m = mlp()
    op = fot.FisherOperator(m, x, y)
    G = fot.per_sample_grads(m, x, y).G.numpy()
    J = fot.logit_jacobians(m, x).numpy()
    for lam in (1e-2, 1.0):
        ref = fisher.ngd_direction("exact", G=G, J=J, probs=op.probs.numpy(), damping=lam)
        res = op.solve(op.gradient(), lam, rtol=1e-12, maxiter=500)
        assert res.converged and res.residual <= 1e-12
        np.testing.assert_allclose(res.x.numpy(), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
        # the proposed fisheropt.fisher hook: an operator in place of J
        d = operator_ngd_direction(op.as_linear_operator(), G=G, damping=lam)
        np.testing.assert_allclose(d, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
        d2 = operator_ngd_direction(fisher.exact_operator(J, op.probs.numpy()), G=G, damping=lam)
        np.testing.assert_allclose(d2, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())


def test_cg_cap_warns_with_the_residual_or_raises(batch):
    x, y = batch
    op = fot.FisherOperator(mlp(), x, y)
    g = op.gradient()
    with pytest.warns(fot.CGConvergenceWarning, match="relative residual"):
        res = op.solve(g, 1e-4, maxiter=2)
    assert not res.converged and res.iterations == 2 and res.residual > 1e-4
    assert float(res.x @ g) > 0  # still a descent direction
    with pytest.raises(fot.CGNotConverged, match="did not converge"):
        op.solve(g, 1e-4, maxiter=2, on_fail="raise")
    with pytest.raises(fisher.DampingTooSmall):
        operator_ngd_direction(op.as_linear_operator(), grad=g.numpy(), damping=1e-4, maxiter=2)


def test_relative_quality_agrees_with_fisheropt_fisher(batch):
    x, y = batch
    m = mlp()
    op = fot.FisherOperator(m, x, y)
    g = op.gradient()
    d = torch.randn(op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = fisher.relative_quality(d.numpy(), op.as_linear_operator(), g.numpy())
    assert op.relative_quality(d, g) == pytest.approx(ref, rel=1e-10)
    assert op.relative_quality(g, g) == pytest.approx(1.0)


def test_conjugate_gradient_on_numpy_and_validation():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 5))
    M = A.T @ A
    b = rng.standard_normal(5)
    res = fot.conjugate_gradient(lambda v: M @ v, b, damping=0.1, rtol=1e-12)
    np.testing.assert_allclose(res.x, np.linalg.solve(M + 0.1 * np.eye(5), b), rtol=1e-10)
    assert fot.conjugate_gradient(lambda v: M @ v, 0 * b, damping=0.1).x.tolist() == [0.0] * 5
    with pytest.raises(fot.CGNotConverged, match="not positive definite"):
        fot.conjugate_gradient(lambda v: -M @ v, b, damping=0.0, on_fail="raise")
    with pytest.raises(ValueError, match="not finite"):
        fot.conjugate_gradient(lambda v: M @ v * np.nan, b, damping=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fot.conjugate_gradient(lambda v: M @ v, b, damping=0.1)
