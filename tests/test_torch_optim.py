"""fisheropt.torch: the update rules as torch.optim.Optimizer subclasses.

Same update as fisheropt.* (bit for bit), torch.optim semantics (param groups,
per-parameter steps, None gradients, add_param_group, zero_grad), Adam/AdamW
parity with torch.optim, zero-copy views and one fused backend call per step.
"""

import inspect

import numpy as np
import pytest
from conftest import host_backend_params

import fisheropt as fo
from fisheropt.refimpl import RULES

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")

SHAPES = [(6, 4), (5,), (), (3, 1, 4)]
NP = {torch.float32: np.float32, torch.float64: np.float64}


def numba_takes_lists():
    """Whether the numba backend already takes per-tensor hyperparameters and steps (the contract)."""
    if "numba" not in fo.backends.available():
        return False
    mod = fo.backends.get("numba")
    p = [np.zeros(3, np.float32), np.zeros(2, np.float32)]
    g = [np.ones(3, np.float32), np.ones(2, np.float32)]
    try:
        mod.adamw_step(
            [x.copy() for x in p],
            g,
            [x.copy() for x in p],
            [x.copy() for x in p],
            step=[1, 2],
            lr=[0.1, 0.2],
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=[0.0, 0.1],
        )
    except (TypeError, ValueError):
        return False
    return True


def group_backends():
    """Backends for tests with several param groups (lists of hyperparameters in one call)."""
    out = []
    for param in host_backend_params():
        name = param.values[0]
        marks = list(param.marks)
        if name == "numba" and not numba_takes_lists():
            marks.append(pytest.mark.skip(reason="numba backend does not take per-tensor hyperparameters yet"))
        out.append(pytest.param(name, marks=marks))
    return out


def make_params(rng, shapes=SHAPES, dtype=torch.float32):
    return [torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=NP[dtype]))) for s in shapes]


def grads_for(rng, params, scale=1.0):
    return [
        torch.from_numpy(np.asarray(rng.standard_normal(tuple(p.shape)) * scale, dtype=NP[p.dtype])) for p in params
    ]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def flags_for(rule, shapes):
    if rule.tensor_flag is None:
        return None
    return [len(s) == 2 for s in shapes]


def fot_groups(rule, params, flags):
    """One group, or (a rule with a tensor flag) one flagged and one unflagged group, in params order."""
    if flags is None:
        return [{"params": params}], params
    yes = [p for p, f in zip(params, flags) if f]
    no = [p for p, f in zip(params, flags) if not f]
    return [{"params": yes, rule.tensor_flag.name: True}, {"params": no}], yes + no


def step_with_twin(rng, steps, opt, params, fo_opt, arrays):
    """``steps`` steps of ``opt`` and of its fisheropt twin ``fo_opt`` on the same gradients; then the
    parameters must have the same bytes."""
    for _ in range(steps):
        grads = grads_for(rng, params)
        set_grads(params, grads)
        opt.step()
        fo_opt.step([g.numpy() for g in grads])
    for p, a in zip(params, arrays):
        assert p.detach().numpy().tobytes() == a.tobytes()


def snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
    )


def assert_same(opt, params, snap):
    before_p, before_s = snap
    for a, p in zip(before_p, params):
        assert a.numpy().tobytes() == p.detach().numpy().tobytes()
    assert {id(p) for p in opt.state if opt.state[p]} == set(before_s)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert before_s[id(p)][k].numpy().tobytes() == v.numpy().tobytes(), k


# ---- the classes ------------------------------------------------------------------------
def test_one_class_per_rule_of_the_registry():
    assert set(fot.CLASSES) == set(RULES)
    for name, rule in RULES.items():
        cls = fot.CLASSES[name]
        assert getattr(fot, rule.title) is cls
        assert issubclass(cls, torch.optim.Optimizer)
        sig = inspect.signature(cls)
        fo_sig = inspect.signature(getattr(fo, rule.title))
        for h in rule.hyperparams:
            assert sig.parameters[h.name].default == fo_sig.parameters[h.name].default == h.default
        assert sig.parameters["backend"].default == "auto"
        assert sig.parameters["check_finite"].default is True
        assert cls.rule is rule
        assert rule.title in (cls.__doc__ or "") or rule.summary in (cls.__doc__ or "")


def test_a_new_rule_gets_a_class():
    """optimizer_class works from the descriptor alone (e.g. Lion, added to the registry later)."""
    import dataclasses

    rule = dataclasses.replace(RULES["adamw"], name="adamw_copy", title="AdamWCopy")
    cls = fot.optimizer_class(rule)
    assert cls.__name__ == "AdamWCopy" and issubclass(cls, fot.Optimizer)
    assert "weight_decay" in inspect.signature(cls).parameters


# ---- same bits as fisheropt.* -------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_as_fisheropt(backend, name, dtype):
    rule = RULES[name]
    rng = np.random.default_rng(3)
    params = make_params(rng, dtype=dtype)
    init = [p.detach().numpy().copy() for p in params]
    flags = flags_for(rule, SHAPES)
    groups, _ = fot_groups(rule, params, flags)
    opt = getattr(fot, rule.title)(groups, lr=3e-2, backend=backend)
    arrays = [a.copy() for a in init]
    fo_opt = getattr(fo, rule.title)(
        arrays, lr=3e-2, backend=backend, **({rule.tensor_flag.name: flags} if flags else {})
    )
    step_with_twin(rng, 5, opt, params, fo_opt, arrays)
    for i, p in enumerate(params):
        st = opt.state[p]
        assert int(st["step"]) == 5
        for key, spec in zip(opt.state_keys, rule.state):
            assert st[key].numpy().tobytes() == fo_opt.state[spec.name][i].tobytes()


@pytest.mark.parametrize("backend", group_backends())
@pytest.mark.parametrize("name", sorted(RULES))
def test_param_groups_equal_separate_fisheropt_optimizers(backend, name):
    """Two groups with their own hyperparameters in ONE call give the bits of one fo optimizer per group."""
    rule = RULES[name]
    rng = np.random.default_rng(5)
    a, b = make_params(rng), make_params(rng)
    fa, fb = flags_for(rule, SHAPES), flags_for(rule, SHAPES)
    flag = rule.tensor_flag.name if rule.tensor_flag else None
    ga = {"params": a, "lr": 1e-2, "weight_decay": 0.0}
    gb = {"params": b, "lr": 3e-2, "weight_decay": 0.2, "betas": (0.8, 0.95)}
    if flag:  # flag within groups: flagged 2-D tensors in their own groups
        ga = [
            {**ga, "params": [p for p, f in zip(a, fa) if f], flag: True},
            {**ga, "params": [p for p, f in zip(a, fa) if not f]},
        ]
        gb = [
            {**gb, "params": [p for p, f in zip(b, fb) if f], flag: True},
            {**gb, "params": [p for p, f in zip(b, fb) if not f]},
        ]
        a = ga[0]["params"] + ga[1]["params"]
        b = gb[0]["params"] + gb[1]["params"]
        groups = ga + gb
    else:
        groups = [ga, gb]
    arr_a = [p.detach().numpy().copy() for p in a]
    arr_b = [p.detach().numpy().copy() for p in b]
    opt = getattr(fot, rule.title)(groups, backend=backend)
    kw_a = {flag: [len(x.shape) == 2 for x in arr_a]} if flag else {}
    kw_b = {flag: [len(x.shape) == 2 for x in arr_b]} if flag else {}
    fo_a = getattr(fo, rule.title)(arr_a, lr=1e-2, weight_decay=0.0, backend=backend, **kw_a)
    fo_b = getattr(fo, rule.title)(arr_b, lr=3e-2, weight_decay=0.2, betas=(0.8, 0.95), backend=backend, **kw_b)
    for _ in range(4):
        g_a, g_b = grads_for(rng, a), grads_for(rng, b)
        set_grads(a, g_a)
        set_grads(b, g_b)
        opt.step()
        fo_a.step([g.numpy() for g in g_a])
        fo_b.step([g.numpy() for g in g_b])
    for p, x in zip(a + b, arr_a + arr_b):
        assert p.detach().numpy().tobytes() == x.tobytes()


def test_one_backend_call_per_step_whatever_the_groups(monkeypatch):
    """Per-group hyperparameters and per-parameter steps go to the kernel as lists, in one call;
    float32 and float64 parameters share the call too."""
    rng = np.random.default_rng(0)
    groups = [
        {
            "params": make_params(rng, [(4, 3), (2,)], dtype=torch.float32 if i % 2 else torch.float64),
            "lr": 1e-3 * (i + 1),
            "weight_decay": 0.01 * i,
        }
        for i in range(6)
    ]
    opt = fot.AdamW(groups, backend="numpy")
    backend = fo.backends.get("numpy")
    calls = []
    real = backend.adamw_step

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "adamw_step", spy)
    params = [p for g in opt.param_groups for p in g["params"]]
    set_grads(params, grads_for(rng, params))
    opt.step()
    assert len(calls) == 1
    assert calls[0]["lr"] == [1e-3 * (i + 1) for i in range(6) for _ in range(2)]
    assert calls[0]["step"] == 1
    # a parameter that skipped a step has its own count: the step becomes a list
    params[0].grad = None
    opt.step()
    set_grads(params, grads_for(rng, params))
    opt.step()
    assert len(calls) == 3 and calls[2]["step"] == [2] + [3] * (len(params) - 1)
    assert calls[1]["step"] == 2 and len(calls[1]["lr"]) == len(params) - 1


# ---- torch.optim semantics ------------------------------------------------------------------
TORCH = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def _torch_twin(name, params_fot, groups_kw):
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params_fot]
    groups = []
    k = 0
    for kw in groups_kw:
        n = kw["n"]
        groups.append({"params": twins[k : k + n], **{x: y for x, y in kw.items() if x != "n"}})
        k += n
    return twins, groups


@pytest.mark.parametrize("backend", group_backends())
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_adam_adamw_follow_torch_with_param_groups(backend, name, dtype, tol):
    """fot.Adam/AdamW vs torch.optim.Adam/AdamW(foreach=False), per-group hyperparameters, parameters
    whose grad is sometimes None (skipped, own step count), within the tolerances of test_torch_parity."""
    rng = np.random.default_rng(11)
    params = make_params(rng, dtype=dtype)
    spec = [
        {"n": 2, "lr": 3e-2, "weight_decay": 0.1},
        {"n": 2, "lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0},
    ]
    twins, tgroups = _torch_twin(name, params, spec)
    groups, k = [], 0
    for kw in spec:
        groups.append({"params": params[k : k + kw["n"]], **{x: y for x, y in kw.items() if x != "n"}})
        k += kw["n"]
    opt = getattr(fot, name)(groups, backend=backend)
    topt = TORCH[name](tgroups, foreach=False)
    worst = 0.0
    for step in range(40):
        grads = grads_for(rng, params)
        if step % 3 == 1:
            grads[1] = None  # skipped: no decay, no step count
        if step < 5:
            grads[3] = None  # starts late: its own step count from 1
        set_grads(params, grads)
        set_grads(twins, grads)
        opt.step()
        topt.step()
        for a, t in zip(params, twins):
            x, y = a.detach().numpy().astype(np.float64), t.detach().numpy().astype(np.float64)
            worst = max(worst, float(np.max(np.abs(x - y) / (np.abs(y) + 1.0))) if x.size else 0.0)
    assert worst < tol
    for a, t in zip(params, twins):
        assert float(opt.state[a]["step"]) == float(topt.state[t]["step"])


def test_none_gradient_skips_the_parameter_entirely():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    opt = fot.AdamW(params, lr=0.1, weight_decay=0.5, backend="numpy")
    before = params[2].detach().clone()
    grads = grads_for(rng, params)
    grads[2] = None
    set_grads(params, grads)
    opt.step()
    assert params[2].detach().numpy().tobytes() == before.numpy().tobytes()  # no decay either
    assert params[2] not in opt.state or not opt.state[params[2]]
    assert all(int(opt.state[p]["step"]) == 1 for i, p in enumerate(params) if i != 2)
    opt.zero_grad()
    opt.step()  # nothing has a gradient: nothing changes
    assert all(int(opt.state[p]["step"]) == 1 for i, p in enumerate(params) if i != 2)


def test_zero_grad_sets_to_none_or_zeroes_in_place():
    rng = np.random.default_rng(2)
    params = make_params(rng)
    opt = fot.FAdam(params, backend="numpy")
    set_grads(params, grads_for(rng, params))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    set_grads(params, grads_for(rng, params))
    ptrs = [p.grad.data_ptr() for p in params]
    opt.zero_grad(set_to_none=False)
    assert [p.grad.data_ptr() for p in params] == ptrs
    assert all(not p.grad.any() for p in params)


@pytest.mark.parametrize("backend", group_backends())
def test_add_param_group_follows_torch(backend):
    rng = np.random.default_rng(4)
    first, later = make_params(rng, [(5, 3), (4,)]), make_params(rng, [(2, 2)])
    twins_first = [torch.nn.Parameter(p.detach().clone()) for p in first]
    twins_later = [torch.nn.Parameter(p.detach().clone()) for p in later]
    opt = fot.AdamW(first, lr=1e-2, backend=backend)
    topt = torch.optim.AdamW(twins_first, lr=1e-2, foreach=False)
    for step in range(8):
        if step == 3:
            opt.add_param_group({"params": later, "lr": 5e-2, "weight_decay": 0.0})
            topt.add_param_group({"params": twins_later, "lr": 5e-2, "weight_decay": 0.0})
        ps = first + (later if step >= 3 else [])
        ts = twins_first + (twins_later if step >= 3 else [])
        grads = grads_for(rng, ps)
        set_grads(ps, grads)
        set_grads(ts, grads)
        opt.step()
        topt.step()
    for p, t in zip(first + later, twins_first + twins_later):
        np.testing.assert_allclose(p.detach().numpy(), t.detach().numpy(), rtol=0, atol=2e-6)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 5e-2
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)  # defaults filled in, as torch does


def test_param_groups_edited_by_hand_are_picked_up():
    """A parameter appended to group['params'] directly (not via add_param_group) is checked and stepped."""
    rng = np.random.default_rng(6)
    a, b = make_params(rng, [(3,), (4,)])
    opt = fot.AdamW([a], lr=1e-2, backend="numpy")
    opt.param_groups[0]["params"].append(b)
    set_grads([a, b], grads_for(rng, [a, b]))
    opt.step()
    assert int(opt.state[b]["step"]) == 1
    opt.param_groups[0]["params"].append(a)  # now a parameter twice: refused, nothing changes
    snap = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="same tensor"):
        opt.step()
    assert_same(opt, [a, b], snap)


def test_closure_is_evaluated_with_grad_enabled():
    rng = np.random.default_rng(7)
    (w,) = make_params(rng, [(3,)])
    opt = fot.Adam([w], lr=0.1, backend="numpy")

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert float(loss) > 0 and int(opt.state[w]["step"]) == 1


# ---- zero copy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
def test_zero_copy_views_of_params_grads_and_state(monkeypatch, backend):
    """The backend receives arrays on the tensors' own memory: parameters, gradients and state."""
    rng = np.random.default_rng(8)
    params = make_params(rng, [(64, 32), (32,), (7, 3)])
    opt = fot.AdamW(params, backend=backend)
    module = opt._backends["cpu"]
    seen = []
    for fn in ("adamw_step", "adamw_step_checked"):
        real = getattr(module, fn, None)
        if real is None:
            continue

        def spy(p, g, m, v, *args, _real=real, **kwargs):
            seen.append(
                (
                    [a.ctypes.data for a in p],
                    [a.ctypes.data for a in g],
                    [a.ctypes.data for a in m],
                    [a.ctypes.data for a in v],
                )
            )
            return _real(p, g, m, v, *args, **kwargs)

        monkeypatch.setattr(module, fn, spy)
    ptrs = [p.data_ptr() for p in params]
    for _ in range(2):
        set_grads(params, grads_for(rng, params))
        opt.step()
        pp, gp, mp, vp = seen[-1]
        assert pp == [p.data_ptr() for p in params] == ptrs
        assert gp == [p.grad.data_ptr() for p in params]
        assert mp == [opt.state[p]["exp_avg"].data_ptr() for p in params]
        assert vp == [opt.state[p]["exp_avg_sq"].data_ptr() for p in params]
    assert len(seen) == 2
    # the same array objects every step (the numba plan cache keys on them)
    assert all(opt._records[p].view is opt._records[p].view for p in params)


def test_views_are_made_once_per_parameter(monkeypatch):
    rng = np.random.default_rng(9)
    params = make_params(rng, [(8, 8), (8,)])
    opt = fot.AdamW(params, backend="numpy")
    module = fo.backends.get("numpy")
    ids = []
    real = module.adamw_step

    def spy(p, g, m, v, **kw):
        ids.append(tuple(map(id, p + m + v)))
        return real(p, g, m, v, **kw)

    monkeypatch.setattr(module, "adamw_step", spy)
    for _ in range(3):
        set_grads(params, grads_for(rng, params))
        opt.step()
    assert ids[1] == ids[2]


# ---- layouts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("name", ["AdamW", "FAdam"])
def test_channels_last_and_transposed_parameters_are_updated_in_place(backend, name):
    """Dense non-C-order parameters are updated in their own memory order, like contiguous copies
    (elementwise rules bit for bit; FAdam's RMS sums then add in another order: a few ulp)."""
    rng = np.random.default_rng(10)
    conv = torch.nn.Parameter(
        torch.from_numpy(rng.standard_normal((4, 3, 5, 5), dtype=np.float32)).to(memory_format=torch.channels_last)
    )
    tr = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((6, 5), dtype=np.float32)).t())  # strides (1, 5)
    assert not conv.is_contiguous() and not tr.is_contiguous()
    twins = [torch.nn.Parameter(conv.detach().contiguous().clone()), torch.nn.Parameter(tr.detach().contiguous())]
    params = [conv, tr]
    strides = [p.stride() for p in params]
    ptrs = [p.data_ptr() for p in params]
    opt = getattr(fot, name)(params, lr=1e-2, backend=backend)
    ref = getattr(fot, name)(twins, lr=1e-2, backend=backend)
    for step in range(3):
        grads = [torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32)) for p in params]
        for p, g in zip(params, grads):  # autograd-like: the grad has the param's strides
            p.grad = torch.empty_like(p).copy_(g) if step != 1 else g.clone()  # step 1: another layout (copied)
        set_grads(twins, grads)
        opt.step()
        ref.step()
    for p, t in zip(params, twins):
        if name == "AdamW":
            np.testing.assert_array_equal(p.detach().contiguous().numpy(), t.detach().numpy())
        else:
            np.testing.assert_allclose(p.detach().contiguous().numpy(), t.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert [p.stride() for p in params] == strides and [p.data_ptr() for p in params] == ptrs
    key = opt.state_keys[0]
    assert opt.state[conv][key].stride() == conv.stride()


def test_float32_and_float64_parameters_together():
    rng = np.random.default_rng(12)
    p32 = make_params(rng, [(5, 5)], dtype=torch.float32)
    p64 = make_params(rng, [(5, 5)], dtype=torch.float64)
    params = p32 + p64
    arrays = [p.detach().numpy().copy() for p in params]
    opt = fot.FAdam(params, backend="numpy")
    step_with_twin(rng, 3, opt, params, fo.FAdam(arrays, backend="numpy"), arrays)


def test_named_parameters_give_names_in_messages():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = fot.AdamW(model.named_parameters(), backend="numpy")
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model[1].weight.grad = torch.full_like(model[1].weight, float("nan"))
    with pytest.raises(FloatingPointError, match=r"'1\.weight'"):
        opt.step()


def test_repr_and_backends():
    rng = np.random.default_rng(0)
    opt = fot.AdamW(make_params(rng, [(3,)]), backend="numpy")
    assert opt.backends == {"cpu": "numpy"}
    assert "backends" in repr(opt) and "lr: 0.001" in repr(opt)


def test_auto_backend_prefers_numba_on_cpu():
    rng = np.random.default_rng(0)
    opt = fot.FAdam(make_params(rng, [(3,)]))
    expected = "numba" if "fadam_step" in fo.backends.functions("numba") else "numpy"
    assert opt.backends == {"cpu": expected}


def test_group_hyperparameters_are_validated_only_when_they_change(monkeypatch):
    """A step does not re-validate unchanged groups (the cost of a step does not grow with the groups);
    a changed value is validated at the next step."""
    import fisheropt.torch.optim as fot_optim

    rng = np.random.default_rng(13)
    groups = [{"params": make_params(rng, [(3,)]), "lr": 1e-3 * (i + 1)} for i in range(20)]
    opt = fot.AdamW(groups, backend="numpy")
    params = [p for g in opt.param_groups for p in g["params"]]
    calls = []
    real = fot_optim.check_hyperparams

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fot_optim, "check_hyperparams", spy)
    for _ in range(3):
        set_grads(params, grads_for(rng, params))
        opt.step()
    assert calls == []
    opt.param_groups[7]["lr"] = 0.5
    opt.param_groups[8]["betas"] = [0.8, 0.9]  # a list, as torch accepts
    opt.step()
    assert len(calls) == 2
    opt.step()
    assert len(calls) == 2
    opt.param_groups[8]["betas"][0] = 0.7  # edited in place: seen too
    opt.step()
    assert len(calls) == 3


def test_empty_state_entries_are_no_state():
    rng = np.random.default_rng(14)
    params = make_params(rng, [(3,), (4,)])
    opt = fot.AdamW(params, backend="numpy")
    params[0].grad = grads_for(rng, params)[0]
    opt.step()
    opt.state[params[1]]  # a defaultdict access creates {}
    sd = opt.state_dict()
    assert sd["state"][1] == {}
    other = fot.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], backend="numpy")
    other.load_state_dict(sd)
    set_grads(params, grads_for(rng, params))
    opt.step()  # {} is replaced by fresh state at the first gradient
    assert int(opt.state[params[1]]["step"]) == 1
