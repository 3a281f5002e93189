"""fisheropt.torch state dicts: plain tensors (weights_only), exchange with torch.optim.AdamW in both
directions, resume bit for bit, and load_state_dict that checks everything before changing anything."""

import copy
import io
import pickle

import numpy as np
import pytest
from conftest import host_backend_params

from fisheropt.refimpl import RULES

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")

SHAPES = [(6, 4), (5,), (), (3, 2)]


def make_params(rng, shapes=SHAPES, dtype=np.float32):
    return [torch.nn.Parameter(torch.from_numpy(np.asarray(rng.standard_normal(s), dtype=dtype))) for s in shapes]


def grads_for(rng, params):
    return [torch.from_numpy(np.asarray(rng.standard_normal(tuple(p.shape)), dtype=np.float32)) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def step_together(grads, *runs):
    """One step of each (optimizer, its parameters) of ``runs``, all on the same gradients."""
    for opt, params in runs:
        set_grads(params, grads)
        opt.step()


def build(name, params, backend="numpy", **kw):
    rule = RULES[name]
    cls = getattr(fot, rule.title)
    if rule.tensor_flag is not None:
        flag = rule.tensor_flag.name
        groups = [{"params": [params[0]], flag: True}, {"params": params[1:]}]
        return cls(groups, lr=1e-2, backend=backend, **kw)
    return cls(params, lr=1e-2, backend=backend, **kw)


def via_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt, params):
    return (
        [p.detach().numpy().tobytes() for p in params],
        {id(p): {k: v.numpy().tobytes() for k, v in s.items()} for p, s in opt.state.items() if s},
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("name", sorted(RULES))
def test_resume_from_weights_only_checkpoint_is_bit_exact(backend, name):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    init = [p.detach().clone() for p in params]
    grads = [grads_for(rng, params) for _ in range(6)]
    grads[2][1] = None  # a skipped parameter: its own step count travels with the checkpoint
    opt = build(name, params, backend)
    for g in grads[:3]:
        set_grads(params, g)
        opt.step()
    sd = via_bytes(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = build(name, resumed, backend)
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        step_together(g, (opt, params), (opt2, resumed))
    for a, b in zip(params, resumed):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()
    assert float(opt2.state[resumed[1]]["step"]) == 5 and float(opt2.state[resumed[0]]["step"]) == 6
    # and the trajectory differs from a fresh start (the loaded state mattered)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in init]
    assert not all(torch.equal(a, b) for a, b in zip(fresh, resumed))


def test_state_dict_is_plain_tensors_and_torch_keys():
    opt, params = _trained()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    for entry in sd["state"].values():
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(type(v) is torch.Tensor for v in entry.values())
        assert entry["step"].dtype == torch.float32 and entry["step"].dim() == 0
    topt = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    assert set(sd["param_groups"][0]) == set(topt.state_dict()["param_groups"][0])


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_checkpoint_exchange_with_torch_optim_both_ways(tmp_path, backend, name):
    """torch.optim -> fot and fot -> torch.optim through torch.save/torch.load(weights_only=True),
    with two param groups and a scheduler: training continues on the same trajectory."""
    rng = np.random.default_rng(3)
    TorchCls, FotCls = getattr(torch.optim, name), getattr(fot, name)
    init = make_params(rng)
    grads = [grads_for(rng, init) for _ in range(12)]

    def torch_opt(groups):
        return TorchCls(groups, lr=1e-2, foreach=False)

    def fot_opt(groups):
        return FotCls(groups, lr=1e-2, backend=backend)

    def start(make_opt, ps, file=None):
        """An optimizer with two param groups over ``ps`` and its scheduler, resumed from ``file``."""
        opt = make_opt([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "lr": 3e-2, "weight_decay": 0.0}])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        if file is not None:
            checkpoint = torch.load(file, weights_only=True)
            opt.load_state_dict(checkpoint["opt"])
            sched.load_state_dict(checkpoint["sched"])
        return opt, sched

    def train(opt, sched, ps, gs, file=None):
        for g in gs:
            set_grads(ps, g)
            opt.step()
            sched.step()
        if file is not None:
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, file)

    def copies(ps):
        return [torch.nn.Parameter(p.detach().clone()) for p in ps]

    # reference: torch all the way
    ref = copies(init)
    ropt, rsched = start(torch_opt, ref)
    train(ropt, rsched, ref, grads)

    # torch for 4 steps -> fot for 4 -> torch for 4
    ps = copies(init)
    a, sa = start(torch_opt, ps)
    train(a, sa, ps, grads[:4], tmp_path / "a.pt")
    ps2 = copies(ps)
    b, sb = start(fot_opt, ps2, tmp_path / "a.pt")
    assert b.param_groups[1]["lr"] == a.param_groups[1]["lr"]
    train(b, sb, ps2, grads[4:8], tmp_path / "b.pt")
    ps3 = copies(ps2)
    c, sc = start(torch_opt, ps3, tmp_path / "b.pt")
    train(c, sc, ps3, grads[8:])

    for x, y in zip(ps3, ref):
        np.testing.assert_allclose(x.detach().numpy(), y.detach().numpy(), rtol=0, atol=2e-6)
    for x, y in zip(ps3, ref):
        assert float(c.state[x]["step"]) == float(ropt.state[y]["step"]) == 12
    # the exchange carried state: a fot optimizer that ignored the checkpoint ends elsewhere
    ps4 = copies(ps)
    d, sched_d = start(fot_opt, ps4)
    train(d, sched_d, ps4, grads[4:8])
    assert max(float((x - y).detach().abs().max()) for x, y in zip(ps4, ps2)) > 1e-4


def _trained():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    opt = build("adamw", params)
    for _ in range(2):
        set_grads(params, grads_for(rng, params))
        opt.step()
    return opt, params


def _mutations():
    """name -> (an edit that makes a valid state dict bad, the message that refuses it)."""
    found = {}

    def refused_with(message):
        def register(edit):
            found[edit.__name__] = (edit, message)
            return edit

        return register

    @refused_with(r"state\[1\].*'exp_avg'.*shape \(6,\).*\(5,\)")
    def shape(sd):
        sd["state"][1]["exp_avg"] = torch.zeros(6)

    @refused_with("dtype torch.float64")
    def dtype(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].double()

    @refused_with("NaN or Inf")
    def nan(sd):
        sd["state"][0]["exp_avg"][0, 0] = float("nan")

    @refused_with("negative")
    def negative(sd):
        sd["state"][0]["exp_avg_sq"][0, 0] = -1.0

    @refused_with("expected the entries")
    def missing(sd):
        del sd["state"][2]["exp_avg_sq"]

    @refused_with("AMSGrad")
    def amsgrad_state(sd):
        sd["state"][0]["max_exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].clone()

    @refused_with("non-negative whole")
    def step_negative(sd):
        sd["state"][3]["step"] = torch.tensor(-1.0)

    @refused_with("whole number")
    def step_fraction(sd):
        sd["state"][3]["step"] = torch.tensor(2.5)

    @refused_with("2 parameter groups")
    def groups_count(sd):
        sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))

    @refused_with("3 parameters")
    def params_count(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    @refused_with("lr must be >= 0")
    def bad_lr(sd):
        sd["param_groups"][0]["lr"] = -1.0

    @refused_with("amsgrad=True")
    def amsgrad(sd):
        sd["param_groups"][0]["amsgrad"] = True

    @refused_with("parameter id 99")
    def unknown_id(sd):
        sd["state"][99] = sd["state"][0]

    @refused_with("must be a Tensor")
    def not_a_tensor(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].numpy()

    @refused_with("missing hyperparameter 'betas'")
    def missing_hyper(sd):
        del sd["param_groups"][0]["betas"]

    return found


def _differing_state_dict(opt):
    """A valid copy of opt's state dict that differs from the live state, so that a partial load would show."""
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        entry["exp_avg"] = entry["exp_avg"] + 1.0
        entry["step"] = entry["step"] + 5
    sd["param_groups"][0]["lr"] = 0.5
    return sd


@pytest.mark.parametrize("mutation", sorted(_mutations()))
def test_bad_state_dict_is_refused_and_changes_nothing(mutation):
    mutate, message = _mutations()[mutation]
    opt, params = _trained()
    sd = _differing_state_dict(opt)
    mutate(sd)
    before = snapshot(opt, params)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(sd)
    assert snapshot(opt, params) == before


def test_a_valid_dict_is_loaded_by_the_same_code():
    """The control for the refusals above: the same edits minus the bad one do load."""
    opt, params = _trained()
    opt.load_state_dict(_differing_state_dict(opt))
    assert opt.param_groups[0]["lr"] == 0.5
    assert float(opt.state[params[0]]["step"]) == 7


def test_swapped_parameters_are_refused_by_name():
    rng = np.random.default_rng(5)
    a, b = make_params(rng, [(4, 3), (4, 3)])
    opt = fot.AdamW([("enc.weight", a), ("dec.weight", b)], backend="numpy")
    set_grads([a, b], grads_for(rng, [a, b]))
    opt.step()
    sd = opt.state_dict()
    other = fot.AdamW([("dec.weight", b), ("enc.weight", a)], backend="numpy")
    with pytest.raises(ValueError, match=r"'dec\.weight' here but 'enc\.weight'"):
        other.load_state_dict(sd)
    assert not other.state


def test_shape_error_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = fot.AdamW(model.named_parameters(), backend="numpy")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    other_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    other = fot.AdamW(other_model.named_parameters(), backend="numpy")
    with pytest.raises(ValueError, match=r"state\[2\].*'1\.weight'.*shape \(2, 4\).*\(5, 4\)"):
        other.load_state_dict(sd)


def test_coupled_flag_must_match():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    opt = build("coupled_adam", params)
    set_grads(params, grads_for(rng, params))
    opt.step()
    sd = opt.state_dict()
    assert tuple(sd["state"][0]["exp_avg_sq"].shape) == (4,)  # per column
    other = fot.CoupledAdam([{"params": [params[0]]}, {"params": params[1:]}], backend="numpy")
    with pytest.raises(ValueError, match="coupled=True"):
        other.load_state_dict(sd)


def test_loading_replaces_the_whole_state_as_torch_does():
    rng = np.random.default_rng(8)
    params = make_params(rng)
    opt = fot.AdamW(params, backend="numpy")
    sd_empty = opt.state_dict()
    set_grads(params, grads_for(rng, params))
    opt.step()
    m = opt.state[params[0]]["exp_avg"]
    ptr = m.data_ptr()
    sd = copy.deepcopy(opt.state_dict())
    opt.step()
    opt.load_state_dict(sd)
    assert opt.state[params[0]]["exp_avg"].data_ptr() == ptr  # copied into the same memory
    assert torch.equal(opt.state[params[0]]["exp_avg"], sd["state"][0]["exp_avg"])
    opt.load_state_dict(sd_empty)
    assert not any(opt.state.get(p) for p in params)
    set_grads(params, grads_for(rng, params))
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 1


def test_pickled_optimizer_keeps_training():
    rng = np.random.default_rng(9)
    params = make_params(rng)
    opt = fot.FAdam(params, backend="numpy", check_finite=False)
    set_grads(params, grads_for(rng, params))
    opt.step()
    params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.check_finite is False and opt2.backends == {"cpu": "numpy"}
    step_together(grads_for(rng, params), (opt, params), (opt2, params2))
    for a, b in zip(params, params2):
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()
    assert float(opt2.state[params2[0]]["step"]) == 2


def test_state_entry_replaced_as_a_whole_is_checked_and_adopted():
    """opt.state[p] = {...} (as torch.optim code sometimes does): used from the next step on, like
    load_state_dict; a bad one is refused at the step, naming the parameter, and changes nothing."""
    rng = np.random.default_rng(10)
    params = make_params(rng, [(4, 3), (5,)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fot.AdamW(params, lr=1e-2, backend="numpy")
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    step_together(grads_for(rng, params), (opt, params), (ref, twins))
    new = {"step": torch.tensor(7.0), "exp_avg": torch.full((4, 3), 0.1), "exp_avg_sq": torch.full((4, 3), 0.2)}
    opt.state[params[0]] = {k: v.clone() for k, v in new.items()}
    ref.state[twins[0]] = {k: v.clone() for k, v in new.items()}
    for _ in range(2):
        step_together(grads_for(rng, params), (opt, params), (ref, twins))
    for p, t in zip(params, twins):
        np.testing.assert_allclose(p.detach().numpy(), t.detach().numpy(), rtol=0, atol=2e-6)
    assert float(opt.state[params[0]]["step"]) == 9
    opt.state[params[1]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(5), "exp_avg_sq": -torch.ones(5)}
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"state of param_groups\[0\]\['params'\]\[1\].*negative"):
        opt.step()
    assert snapshot(opt, params) == before
