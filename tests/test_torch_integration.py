"""fisheropt.torch inside PyTorch training loops: GradScaler, LR schedulers, torch.compile,
and the Coupled Adam param-group helper."""

import numpy as np
import pytest
from conftest import host_backend_params

import fisheropt as fo

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")
nn = torch.nn


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)) for _ in range(n)]


def params_bytes(model):
    return [p.detach().numpy().tobytes() for p in model.parameters()]


def state_bytes(opt):
    return {id(p): {k: v.numpy().tobytes() for k, v in s.items()} for p, s in opt.state.items() if s}


# ---- GradScaler -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["AdamW", "FAdam", "CoupledAdam"])
def test_grad_scaler_skips_overflowing_steps_and_unscales_the_others(name):
    model, ref = tiny_model(), tiny_model()
    kw = {"coupled": False} if name == "CoupledAdam" else {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = getattr(fot, name)(model.parameters(), lr=1e-2, **kw)
        ropt = getattr(fot, name)(ref.parameters(), lr=1e-2, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(4)
    for x, y in data[:2]:
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        rloss = ((ref(x) - y) ** 2).mean()
        rloss.backward()
        ropt.step()
        ropt.zero_grad()
    # unscaled gradients were used: the same bits as training without the scaler (scale = 2^10)
    assert params_bytes(model) == params_bytes(ref)
    # a scale that overflows: the step is skipped, nothing changes, the scale shrinks
    before_p, before_s = params_bytes(model), state_bytes(opt)
    scaler.update(new_scale=3.0e38)
    x, y = data[2]
    loss = ((model(x) - y) ** 2).mean() * 1e3
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert params_bytes(model) == before_p and state_bytes(opt) == before_s
    assert scaler.get_scale() < 3.0e38
    # and the step after it runs normally
    scaler.update(new_scale=2.0**8)
    loss = ((model(x) - y) ** 2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert params_bytes(model) != before_p


# ---- schedulers -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("sched", ["cosine", "lambda", "onecycle"])
def test_lr_schedulers_drive_the_next_step_as_in_torch(backend, sched):
    model, twin = tiny_model(), tiny_model()
    opt = fot.AdamW(model.parameters(), lr=1e-2, backend=backend)
    topt = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)

    def make(o):
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
        if sched == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-2, total_steps=12)  # also cycles betas

    s, ts = make(opt), make(topt)
    for x, y in batches(12):
        for m, o, sc in ((model, opt, s), (twin, topt, ts)):
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            sc.step()
            o.zero_grad()
        assert opt.param_groups[0]["lr"] == topt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0, atol=2e-6)


def test_learning_rate_changes_take_effect_at_the_next_step():
    model = tiny_model()
    opt = fot.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ((x, y),) = batches(1)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.param_groups[0]["lr"] = 0.0  # lr 0: θ(1 - 0·λ) - 0·(...) = θ exactly
    before = params_bytes(model)
    opt.step()
    assert params_bytes(model) == before
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()
    assert params_bytes(model) != before


# ---- torch.compile ----------------------------------------------------------------------------
def test_compiled_model_trains_like_the_eager_one(monkeypatch):
    """torch.compile(model) with the optimizer outside; the kernels never run while tracing."""
    eager, compiled = tiny_model(), tiny_model()
    opt = fot.AdamW(eager.parameters(), lr=1e-2, backend="numpy")
    copt = fot.AdamW(compiled.parameters(), lr=1e-2, backend="numpy")
    cmodel = torch.compile(compiled, backend="aot_eager")
    module = fo.backends.get("numpy")
    tracing = []
    real = module.adamw_step

    def spy(*args, **kwargs):
        tracing.append(torch.compiler.is_compiling())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "adamw_step", spy)

    def train_step(m, o, x, y):
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    ctrain = torch.compile(train_step, backend="aot_eager")  # the step inside: a graph break
    for i, (x, y) in enumerate(batches(4)):
        train_step(eager, opt, x, y)
        (ctrain if i % 2 else train_step)(cmodel, copt, x, y)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert tracing == [False] * 8


def test_step_inside_fullgraph_compile_says_why():
    model = tiny_model()
    opt = fot.FAdam(model.parameters(), backend="numpy")
    ((x, y),) = batches(1)
    ((model(x) - y) ** 2).mean().backward()

    def step():
        opt.step()

    with pytest.raises(Exception, match="run their update outside torch.compile"):
        torch.compile(step, backend="eager", fullgraph=True)()
    assert not opt.state  # nothing ran


# ---- Coupled Adam groups --------------------------------------------------------------------
class TiedLM(nn.Module):
    def __init__(self, vocab=50, d=8, context=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)  # not vocabulary: excluded below
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied output projection

    def forward(self, ids):
        h = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        return self.head(self.norm(torch.tanh(self.mix(h))))


def test_coupled_param_groups_flags_embeddings_and_tied_heads():
    torch.manual_seed(0)
    model = TiedLM()
    groups = fot.coupled_param_groups(model, exclude=[model.pos], weight_decay=0.05)
    assert [g["coupled"] for g in groups] == [True, False]
    assert [n for n, _ in groups[0]["params"]] == ["tok.weight"]
    rest = [n for n, _ in groups[1]["params"]]
    assert "pos.weight" in rest and "head.weight" not in rest  # tied: listed once, as tok.weight
    assert all(g["weight_decay"] == 0.05 for g in groups)
    assert len(groups[0]["params"]) + len(rest) == len(list(model.parameters()))
    assert [n for n, _ in fot.coupled_param_groups(model)[0]["params"]] == ["tok.weight", "pos.weight"]
    with pytest.raises(ValueError, match="no nn.Embedding"):
        fot.coupled_param_groups(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="sparse"):
        fot.coupled_param_groups(nn.Embedding(5, 3, sparse=True))


@pytest.mark.parametrize("backend", host_backend_params())
def test_coupled_adam_on_a_tied_model_matches_fisheropt(backend):
    torch.manual_seed(0)
    model = TiedLM()
    opt = fot.CoupledAdam(fot.coupled_param_groups(model, exclude=[model.pos]), lr=1e-2, backend=backend)
    order = [p for g in opt.param_groups for p in g["params"]]
    arrays = [p.detach().numpy().copy() for p in order]
    ref = fo.CoupledAdam(arrays, lr=1e-2, coupled=[p is model.tok.weight for p in order], backend=backend)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        ids = torch.randint(0, 50, (8, 4), generator=g)
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1))
        loss.backward()
        grads = [p.grad.numpy().copy() for p in order]
        opt.step()
        opt.zero_grad()
        ref.step(grads)
    for p, a in zip(order, arrays):
        assert p.detach().numpy().tobytes() == a.tobytes()
    assert tuple(opt.state[model.tok.weight]["exp_avg_sq"].shape) == (8,)


def test_coupled_adam_without_coupled_tensors_warns():
    with pytest.warns(UserWarning, match="no parameter has coupled=True"):
        fot.CoupledAdam(tiny_model().parameters(), backend="numpy")


def test_step_keeps_torchs_thread_count():
    """numba's OpenMP layer shares libgomp with torch; a step must not change torch's thread count."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p = nn.Parameter(torch.zeros(1 << 18))  # big enough for a parallel launch
        p.grad = torch.ones_like(p)
        opt = fot.AdamW([p])
        opt.step()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
