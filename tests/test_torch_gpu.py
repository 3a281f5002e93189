"""fisheropt.torch on CUDA tensors: the cupy backend through DLPack, zero copy, on torch's current
stream, no host synchronisation inside a step (check_finite=False). Marked ``gpu``: skipped with the
reason where CuPy, a CUDA build of torch or a GPU is missing (tests/conftest.py)."""

import numpy as np
import pytest

from fisheropt.refimpl import RULES

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="GPU test: no CUDA device for torch here (torch.cuda.is_available() is False)",
    ),
]

SHAPES = [(64, 48), (300,), (), (5, 3, 2)]


def _pair(name, seed=0, dtype=torch.float32):
    """(cuda params, cpu params, cuda opt, cpu opt) with the same initial values and groups."""
    rule = RULES[name]
    rng = np.random.default_rng(seed)
    host = [
        torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=np.float32)).to(dtype))
        for s in SHAPES
    ]
    dev = [torch.nn.Parameter(p.detach().cuda()) for p in host]
    cls = getattr(fot, rule.title)

    def build(ps, backend):
        if rule.tensor_flag is not None:
            return cls(
                [{"params": ps[:1], rule.tensor_flag.name: True}, {"params": ps[1:], "lr": 2e-2}],
                lr=1e-2,
                backend=backend,
            )
        return cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-2}], lr=1e-2, backend=backend)

    return dev, host, build(dev, "auto"), build(host, "numpy")


def _grads(rng, params):
    return [
        torch.from_numpy(np.asarray(rng.standard_normal(tuple(p.shape)), dtype=np.float32)).to(p.dtype) for p in params
    ]


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_step_matches_the_reference(name, dtype):
    dev, host, opt, ref = _pair(name, dtype=dtype)
    assert opt.backends == {"cuda:0": "cupy"}
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = _grads(rng, host)
        if step == 2:
            grads[1] = None
        for d, h, g in zip(dev, host, grads):
            d.grad = None if g is None else g.cuda()
            h.grad = None if g is None else g.clone()
        opt.step()
        ref.step()
    rtol = 2e-5 if dtype == torch.float32 else 1e-12
    for d, h in zip(dev, host):
        np.testing.assert_allclose(d.detach().cpu().numpy(), h.detach().numpy(), rtol=rtol, atol=1e-7)
    assert float(opt.state[dev[1]]["step"]) == 4 and opt.state[dev[1]]["step"].device.type == "cpu"


def test_cuda_views_are_zero_copy(monkeypatch):
    dev, _, opt, _ = _pair("adamw")
    backend = opt._backends[0]
    seen = []
    real = backend.adamw_step

    def spy(p, g, m, v, **kw):
        seen.append(
            ([a.data.ptr for a in p], [a.data.ptr for a in g], [a.data.ptr for a in m], [a.data.ptr for a in v])
        )
        return real(p, g, m, v, **kw)

    monkeypatch.setattr(backend, "adamw_step", spy)
    opt.check_finite = False
    rng = np.random.default_rng(2)
    for d, g in zip(dev, _grads(rng, dev)):
        d.grad = g.cuda()
    opt.step()
    pp, gp, mp, vp = seen[0]
    assert pp == [p.data_ptr() for p in dev]
    assert gp == [p.grad.data_ptr() for p in dev]
    assert mp == [opt.state[p]["exp_avg"].data_ptr() for p in dev]
    assert vp == [opt.state[p]["exp_avg_sq"].data_ptr() for p in dev]


@pytest.mark.parametrize("name", sorted(RULES))
def test_no_host_synchronisation_inside_a_step(monkeypatch, name):
    import cupy

    dev, _, opt, _ = _pair(name)
    opt.check_finite = False
    rng = np.random.default_rng(3)
    for d, g in zip(dev, _grads(rng, dev)):
        d.grad = g.cuda()
    opt.step()  # first step: kernels compiled, state allocated
    for d, g in zip(dev, _grads(rng, dev)):
        d.grad = g.cuda()
    torch.cuda.synchronize()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a step")

    monkeypatch.setattr(cupy.ndarray, "get", forbidden)
    monkeypatch.setattr(cupy.cuda.Stream, "synchronize", forbidden)
    monkeypatch.setattr(cupy.cuda.ExternalStream, "synchronize", forbidden)
    try:
        monkeypatch.setattr(cupy.cuda.Device, "synchronize", forbidden)
    except TypeError:  # CuPy >= 14: an immutable extension type; the stream and .get() checks remain
        pass
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_runs_on_torchs_current_stream():
    dev, host, opt, ref = _pair("fadam")
    rng = np.random.default_rng(4)
    side = torch.cuda.Stream()
    for _ in range(3):
        grads = _grads(rng, host)
        with torch.cuda.stream(side):
            for d, g in zip(dev, grads):
                d.grad = g.cuda(non_blocking=False)
            opt.step()
        for h, g in zip(host, grads):
            h.grad = g.clone()
        ref.step()
    side.synchronize()
    for d, h in zip(dev, host):
        np.testing.assert_allclose(d.detach().cpu().numpy(), h.detach().numpy(), rtol=2e-5, atol=1e-7)


def test_cpu_and_cuda_parameters_in_one_optimizer():
    rng = np.random.default_rng(5)
    a = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32)))
    b = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32)).cuda())
    opt = fot.AdamW([a, b], lr=1e-2)
    assert set(opt.backends) == {"cpu", "cuda:0"}
    ref_a, ref_b = a.detach().clone(), b.detach().cpu().clone()
    ref = fot.AdamW([torch.nn.Parameter(ref_a), torch.nn.Parameter(ref_b)], lr=1e-2, backend="numpy")
    for _ in range(3):
        g = [torch.from_numpy(rng.standard_normal((8, 4)).astype(np.float32)) for _ in range(2)]
        a.grad, b.grad = g[0].clone(), g[1].cuda()
        for p, gi in zip(ref.param_groups[0]["params"], g):
            p.grad = gi.clone()
        opt.step()
        ref.step()
    for p, q in zip([a, b], ref.param_groups[0]["params"]):
        np.testing.assert_allclose(p.detach().cpu().numpy(), q.detach().numpy(), rtol=2e-5, atol=1e-7)


def test_cuda_checkpoint_loads_on_the_cpu(tmp_path):
    dev, host, opt, ref = _pair("adamw")
    rng = np.random.default_rng(6)
    for d, g in zip(dev, _grads(rng, dev)):
        d.grad = g.cuda()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True, map_location="cpu")
    ref.load_state_dict(sd)
    for d, h in zip(dev, host):
        assert torch.equal(opt.state[d]["exp_avg"].cpu(), ref.state[h]["exp_avg"])


def test_non_finite_gradient_on_cuda_is_refused():
    dev, _, opt, _ = _pair("adamw")
    rng = np.random.default_rng(7)
    for d, g in zip(dev, _grads(rng, dev)):
        d.grad = g.cuda()
    dev[0].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in dev]
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dev)) and not opt.state
