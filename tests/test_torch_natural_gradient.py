"""fisheropt.torch.NaturalGradient: the first step is fisheropt.fisher.ngd_direction, torch semantics,
LoRA, and rejected steps that leave everything byte-identical."""

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# torch's forward-mode AD scripts its decompositions on first use (torch's own DeprecationWarning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

from torch_models import TokenModel  # noqa: E402

import fisheropt.torch as fot  # noqa: E402
from fisheropt import fisher  # noqa: E402

nn = torch.nn


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def snapshot(model, opt=None):
    s = {k: v.clone() for k, v in model.state_dict().items()}
    if opt is not None:
        s["__opt__"] = repr(opt.state_dict())
    return s


def assert_identical(before, model, opt=None):
    after = snapshot(model, opt)
    assert before.keys() == after.keys()
    for k in before:
        if k == "__opt__":
            assert before[k] == after[k]
        else:
            assert torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype, k


def reference_direction(kind, x, y, damping, mode, seed_labels=None):
    """fisheropt.fisher.ngd_direction on G (and J) of a fresh copy of the model."""
    m = mlp()
    G, logits, _ = fot.per_sample_grads(m, x, y)
    G = G.numpy()
    probs = torch.softmax(logits, 1).numpy()
    kw = {"G": G}
    scale = float((G**2).sum(1).mean())
    if kind == "ief":
        kw["s"] = fisher.logit_grad_sq_norms(probs, y.numpy())
    if kind in ("sf", "exact"):
        J = fot.logit_jacobians(m, x).numpy()
        kw.update(J=J, probs=probs)
        if kind == "exact":
            scale = np.trace(fisher.exact(J, probs)) / x.shape[0]
    if kind == "sf":
        ls = torch.multinomial(
            torch.softmax(logits, 1), 1, replacement=True, generator=torch.Generator().manual_seed(seed_labels)
        ).T.numpy()
        kw["labels_sampled"] = ls
        scale = np.trace(fisher.sampled(kw["J"], probs, ls)) / x.shape[0]
    lam = damping * scale if mode == "relative" else damping
    return fisher.ngd_direction(kind, damping=lam, **kw), lam


@pytest.mark.parametrize(
    "kind, method, mode",
    [
        ("ief", "auto", "relative"),
        ("ief", "auto", "absolute"),
        ("ef", "auto", "relative"),
        ("sf", "woodbury", "relative"),
        ("exact", "woodbury", "relative"),
        ("exact", "woodbury", "absolute"),
        ("exact", "cg", "absolute"),
        ("sf", "cg", "absolute"),
    ],
)
def test_first_step_equals_ngd_direction(batch, kind, method, mode):
    x, y = batch
    m = mlp()
    theta0 = flat(m)
    lr, damping = 0.3, (1e-2 if mode == "relative" else 0.05)
    opt = fot.NaturalGradient(
        m,
        kind=kind,
        lr=lr,
        damping=damping,
        damping_mode=mode,
        exact_method=method,
        generator=torch.Generator().manual_seed(4),
        cg_rtol=1e-12,
        cg_maxiter=1000,
    )
    loss = opt.step(x, y)
    d = ((theta0 - flat(m)) / lr).numpy()
    ref, lam = reference_direction(kind, x, y, damping, mode, seed_labels=4)
    assert opt.last_stats["damping"] == pytest.approx(lam, rel=1e-9)
    tol = 1e-8 if method == "cg" else 1e-10
    np.testing.assert_allclose(d, ref, rtol=tol, atol=tol * np.abs(ref).max())
    ref_loss = nn.functional.cross_entropy(mlp()(x), y, reduction="sum")
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-12)


def test_exact_cg_relative_damping_uses_an_unbiased_trace_estimate(batch):
    x, y = batch
    opt = fot.NaturalGradient(
        mlp(),
        kind="exact",
        exact_method="cg",
        damping=1e-2,
        lr=0.0,
        cg_maxiter=1,
        generator=torch.Generator().manual_seed(0),
    )
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fot.CGConvergenceWarning)  # one CG step: only the scale matters here
        for _ in range(20):
            opt.step(x, y)
            scales.append(opt.last_stats["scale"])
    m = mlp()
    J = fot.logit_jacobians(m, x).numpy()
    exact = np.trace(fisher.exact(J, torch.softmax(m(x), 1).detach().numpy())) / x.shape[0]
    assert np.std(scales) > 0 and np.mean(scales) == pytest.approx(exact, rel=0.2)


class LoRA(nn.Module):
    def __init__(self, base, r=2):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, dtype=torch.float64) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_features, r, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("kind", ["ief", "exact"])
def test_only_lora_parameters_are_updated(batch, kind):
    x, y = batch
    m = mlp()
    m[0] = LoRA(m[0])
    m[2] = LoRA(m[2])
    lora = [m[0].A, m[0].B, m[2].A, m[2].B]
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not n.endswith((".A", ".B"))}
    before = [p.detach().clone() for p in lora]
    # exact NGD takes huge steps for confidently wrong samples (H_n ≈ 0): it needs more damping than iEF
    opt = fot.NaturalGradient(
        m, kind=kind, lr=0.3, params=lora, exact_method="cg", damping=1e-3 if kind == "ief" else 0.3
    )
    assert opt.layout.P == sum(p.numel() for p in lora)
    l0 = float(opt.step(x, y))
    for _ in range(3):
        loss = float(opt.step(x, y))
    assert loss < l0
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(a, b) for a, b in zip(before, lora))


def test_momentum_param_groups_scheduler_and_state_dict(batch):
    x, y = batch
    m = mlp()
    groups = [
        {"params": [m[0].weight, m[0].bias], "lr": 0.2, "momentum": 0.5},
        {"params": [m[2].weight, m[2].bias], "lr": 0.1},
    ]
    opt = fot.NaturalGradient(m, kind="ief", params=groups, damping=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    t0 = flat(m)
    opt.step(x, y)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    # first step: group lr times the direction (momentum buffer = d)
    ref, _ = reference_direction("ief", x, y, 1e-2, "relative")
    P0 = 5 * 8 + 8
    step = (t0 - flat(m)).numpy()
    np.testing.assert_allclose(step[:P0], 0.2 * ref[:P0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(step[P0:], 0.1 * ref[P0:], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(opt.state[m[0].weight]["momentum_buffer"].reshape(-1).numpy(), ref[:40], rtol=1e-10)
    assert "momentum_buffer" not in opt.state[m[2].weight]
    # state_dict round trip: a copy continues identically
    sd = opt.state_dict()
    m2 = mlp()
    m2.load_state_dict(m.state_dict())
    opt2 = fot.NaturalGradient(
        m2,
        kind="ief",
        damping=1e-2,
        params=[
            {"params": [m2[0].weight, m2[0].bias], "lr": 0.2, "momentum": 0.5},
            {"params": [m2[2].weight, m2[2].bias], "lr": 0.1},
        ],
    )
    opt2.load_state_dict(sd)
    opt.step(x, y)
    opt2.step(x, y)
    torch.testing.assert_close(flat(m), flat(m2), rtol=0, atol=0)
    assert float(opt.state[m[0].weight]["step"]) == 2


def test_weight_decay_is_decoupled(batch):
    x, y = batch
    m = mlp()
    t0 = flat(m)
    opt = fot.NaturalGradient(m, kind="ef", lr=0.1, damping=1e-2, weight_decay=0.5)
    opt.step(x, y)
    ref, _ = reference_direction("ef", x, y, 1e-2, "relative")
    np.testing.assert_allclose(flat(m).numpy(), (t0 * (1 - 0.05)).numpy() - 0.1 * ref, rtol=1e-10, atol=1e-13)


def test_quality_is_logged_with_the_matrix_free_fisher(batch):
    x, y = batch
    q = {}
    for kind in ("ief", "ef", "exact"):
        opt = fot.NaturalGradient(
            mlp(),
            kind=kind,
            lr=0.0,
            damping=1e-4,
            track_quality=True,
            cg_rtol=1e-10,
            exact_method="cg",
            cg_maxiter=1000,
        )
        opt.step(x, y)
        q[kind] = opt.last_stats["quality"]
        assert math.isfinite(q[kind]) and q[kind] > 0
    assert q["exact"] <= min(q["ief"], q["ef"]) + 1e-6  # the exact natural gradient minimises γ


def test_sequence_model_with_padding_steps_and_descends():
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (8, 6))
    y = torch.randint(0, 5, (8, 6))
    y[:, :2] = -100
    y[3] = -100  # a sample with no counted token is left out
    for kind in ("ief", "exact"):
        m = TokenModel(vocab=6, width=4, classes=5)
        opt = fot.NaturalGradient(m, kind=kind, lr=0.5, damping=1e-2)
        losses = [float(opt.step(ids, y)) for _ in range(5)]
        assert losses[-1] < losses[0]
        assert opt.last_stats["N"] == 8 if kind == "exact" else opt.last_stats["N"] == 7


# ---- rejected steps: clear errors, parameters and state byte-identical ------------------
class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return {"logits": self.lin(x)}


def test_bad_steps_leave_everything_untouched(batch):
    x, y = batch
    m = mlp()
    opt = fot.NaturalGradient(m, kind="ief", lr=0.1, momentum=0.9)
    opt.step(x, y)  # some state exists
    before = snapshot(m, opt)
    bad = [
        ((x, torch.full_like(y, 3)), ValueError, "0..2"),
        ((x, y.double()), TypeError, "integer"),
        ((x[:5], y), ValueError, "shape"),
        ((x.float(), y), RuntimeError, "dtype|type"),
        ((x * float("nan"), y), ValueError, "not finite|NaN"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            opt.step(*args)
        assert_identical(before, m, opt)
    with pytest.raises(TypeError, match="takes the batch"):
        opt.step()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(x, y)
    opt.param_groups[0]["lr"] = 0.1
    assert_identical(before, m, opt)


def test_model_not_returning_logits_is_refused(batch):
    x, y = batch
    m = Tuple()
    opt = fot.NaturalGradient(m, kind="ef")
    before = snapshot(m)
    with pytest.raises(TypeError, match="logits tensor"):
        opt.step(x, y)
    assert_identical(before, m)


@pytest.mark.parametrize("kind", ["ief", "ef", "exact"])
def test_damping_too_small_raises_and_leaves_parameters(batch, kind):
    x, y = batch
    x = torch.cat([x[:4], x[:4]])  # duplicated samples: a singular Gram matrix
    y = torch.cat([y[:4], y[:4]])
    m = mlp()
    before = snapshot(m)
    opt = fot.NaturalGradient(m, kind=kind, lr=0.1, damping=1e-300, damping_mode="absolute", exact_method="woodbury")
    with pytest.raises(fisher.DampingTooSmall, match="parameters are unchanged"):
        opt.step(x, y)
    assert_identical(before, m, None)


def test_cg_that_does_not_converge_warns_or_raises(batch):
    x, y = batch
    m = mlp()
    opt = fot.NaturalGradient(m, kind="exact", exact_method="cg", damping=1e-6, cg_maxiter=2, lr=0.1)
    with pytest.warns(fot.CGConvergenceWarning, match="residual"):
        opt.step(x, y)
    assert opt.last_stats["cg_converged"] is False and opt.last_stats["cg_residual"] > 1e-4
    before = snapshot(m, opt)
    opt.on_cg_fail = "raise"
    with pytest.raises(fot.CGNotConverged):
        opt.step(x, y)
    assert_identical(before, m, opt)


def test_constructor_validation():
    m = mlp()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fot.NaturalGradient(m, params=[nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(ValueError, match="unknown kind"):
        fot.NaturalGradient(m, kind="kfac")
    with pytest.raises(ValueError, match="damping"):
        fot.NaturalGradient(m, damping=0.0)
    with pytest.raises(ValueError, match="momentum"):
        fot.NaturalGradient(m, momentum=1.0)
    with pytest.raises(ValueError, match="damping_mode"):
        fot.NaturalGradient(m, damping_mode="mean")
    with pytest.raises(ValueError, match="backend"):
        fot.NaturalGradient(m, backend="jax")
    with pytest.raises(TypeError, match="Module"):
        fot.NaturalGradient([m[0].weight])
    opt = fot.NaturalGradient(m, params=[{"params": [m[0].weight]}, {"params": [m[2].weight], "damping": 0.5}])
    with pytest.raises(ValueError, match="same in every group"):
        opt.step(torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert len(opt.param_groups) == 2


def test_training_with_ief_reduces_the_loss_on_float32_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    X = torch.randn(64, 6)
    Y = (X[:, :4] + 0.3 * torch.randn(64, 4)).argmax(1)
    opt = fot.NaturalGradient(m, kind="ief", lr=0.5, damping=1e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(15):
            losses.append(float(opt.step(X[16 * (i % 4) : 16 * (i % 4 + 1)], Y[16 * (i % 4) : 16 * (i % 4 + 1)])))
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4])
