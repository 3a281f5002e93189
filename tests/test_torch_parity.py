"""Adam and AdamW follow torch.optim.Adam / AdamW: a user switching from PyTorch gets the same trajectory."""

import numpy as np
import pytest
from conftest import host_backend_params

import fisheropt as fo

torch = pytest.importorskip("torch")

SHAPES = [(5, 7), (13,), (), (3, 1, 4)]


def _run_both(cls_fo, cls_torch, dtype, backend, steps, **hp):
    rng = np.random.default_rng(7)
    init = [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    grads = [[np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES] for _ in range(steps)]
    ours = [p.copy() for p in init]
    opt = cls_fo(ours, backend=backend, **hp)
    theirs = [torch.tensor(p.copy()) for p in init]
    for t in theirs:
        t.requires_grad_(True)
    topt = cls_torch(theirs, foreach=False, **hp)
    worst = 0.0
    for g in grads:
        opt.step(g)
        for t, gi in zip(theirs, g):
            t.grad = torch.tensor(gi)
        topt.step()
        for a, t in zip(ours, theirs):
            b = t.detach().numpy()
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b) / (np.abs(b) + 1.0))) if a.size else 0.0)
    return worst


# Tolerances: the same formula in the same order, except torch's lerp form of the
# first-moment EMA; float64 differences stay at rounding level over 60 steps,
# float32 at a few ulp of the parameter scale (1).
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("name,wd", [("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.0), ("AdamW", 0.3)])
def test_matches_torch(backend, dtype, tol, name, wd):
    cls_fo, cls_torch = getattr(fo, name), getattr(torch.optim, name)
    worst = _run_both(cls_fo, cls_torch, dtype, backend, 60, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    assert worst < tol


def test_parity_check_can_fail():
    """A deliberately different hyperparameter must be detected by the same measure."""
    rng = np.random.default_rng(0)
    p = [rng.standard_normal(10)]
    t = torch.tensor(p[0].copy(), requires_grad=True)
    opt = fo.Adam(p, lr=1e-2, betas=(0.9, 0.999), backend="numpy")
    topt = torch.optim.Adam([t], lr=1e-2, betas=(0.9, 0.99))
    for _ in range(5):
        g = rng.standard_normal(10)
        opt.step([g])
        t.grad = torch.tensor(g)
        topt.step()
    assert np.max(np.abs(p[0] - t.detach().numpy())) > 1e-6
