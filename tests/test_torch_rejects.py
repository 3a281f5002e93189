"""fisheropt.torch refuses what it cannot update correctly, with a message naming the parameter,
and a refused step or group leaves parameters, state and param_groups byte-identical."""

import copy

import numpy as np
import pytest
from conftest import host_backend_params

from fisheropt.refimpl import RULES

torch = pytest.importorskip("torch")
fot = pytest.importorskip("fisheropt.torch")
from fisheropt.torch._tensors import UnsupportedTensor  # noqa: E402


def make_params(rng, shapes=((6, 4), (5,), (3, 2))):
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32))) for s in shapes]


def set_grads(rng, params):
    for p in params:
        p.grad = torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32))


def trained(name="adamw", backend="numpy", steps=2, **kw):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    rule = RULES[name]
    cls = getattr(fot, rule.title)
    if rule.tensor_flag is not None:
        opt = cls(
            [{"params": params[:1], rule.tensor_flag.name: True}, {"params": params[1:]}],
            lr=1e-2,
            backend=backend,
            **kw,
        )
    else:
        opt = cls(params, lr=1e-2, backend=backend, **kw)
    for _ in range(steps):
        set_grads(rng, params)
        opt.step()
    set_grads(rng, params)
    return opt, params


def snapshot(opt, params):
    return (
        [p.detach().numpy().tobytes() for p in params],
        {id(p): {k: v.numpy().tobytes() for k, v in s.items()} for p, s in opt.state.items() if s},
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        [list(map(id, g["params"])) for g in opt.param_groups],
    )


# ---- at step time ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_is_refused_and_changes_nothing(backend, name, bad):
    opt, params = trained(name, backend)
    params[1].grad[2] = bad
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match=r"param_groups\[\d\]\['params'\]\[\d\]"):
        opt.step()
    assert snapshot(opt, params) == before
    opt.check_finite = False  # the control: the same step goes through without the check
    if name != "fadam":  # (FAdam's RMS clip keeps a NaN step finite only sometimes)
        opt.step()
        assert snapshot(opt, params) != before


def _make_bad(kind, opt, params):
    a, b, c = params
    if kind == "sparse_grad":
        a.grad = a.grad.to_sparse()
    elif kind == "grad_is_a_param":
        c.grad = a.detach()[:3, :2].contiguous()  # fine, a copy ...
        c.grad = a.detach().view(-1)[:6].view(3, 2)  # ... but this shares a's memory
    elif kind == "shared_grad":
        c.grad = torch.ones(6).view(3, 2)
        b.grad = c.grad.view(-1)[:5]
    elif kind == "param_replaced":
        b.data = torch.zeros(5)
    elif kind == "model_to_double":
        for p in params:
            p.data = p.data.double()
            p.grad = p.grad.double()
    elif kind == "negative_lr":
        opt.param_groups[0]["lr"] = -1.0
    elif kind == "beta_one":
        opt.param_groups[0]["betas"] = (0.9, 1.0)
    elif kind == "eps_underflows":
        opt.param_groups[0]["eps"] = 1e-50
    elif kind == "tensor_lr":
        opt.param_groups[0]["lr"] = torch.tensor(0.01)
    elif kind == "maximize":
        opt.param_groups[0]["maximize"] = True
    elif kind == "amsgrad":
        opt.param_groups[0]["amsgrad"] = True
    elif kind == "foreign_option":
        opt.param_groups[0]["momentum"] = 0.9
    elif kind == "param_transposed":
        b.data = b.data[:5]  # same memory, same shape: accepted
        c.data = c.data.t()  # same memory, another shape and strides: refused
    elif kind == "grad_dtype":
        b.grad_dtype = None  # torch lets a gradient have another dtype then
        b.grad = torch.ones(5, dtype=torch.float64)
    else:
        raise AssertionError(kind)


BAD_STEPS = {
    "sparse_grad": (UnsupportedTensor, "sparse gradient"),
    "grad_is_a_param": (ValueError, "share memory"),
    "shared_grad": (ValueError, "share memory"),
    "param_replaced": (ValueError, r"\['params'\]\[1\] was replaced"),
    "model_to_double": (ValueError, "was replaced or changed"),
    "negative_lr": (ValueError, r"param_groups\[0\]: lr must be >= 0"),
    "beta_one": (ValueError, r"betas\[1\] must be < 1"),
    "eps_underflows": (ValueError, "below the smallest normal"),
    "tensor_lr": (TypeError, "lr is a Tensor"),
    "maximize": (ValueError, "maximize=True"),
    "amsgrad": (ValueError, "amsgrad=True"),
    "foreign_option": (ValueError, "momentum=0.9 is not an option"),
    "param_transposed": (ValueError, r"\['params'\]\[2\] was replaced or changed"),
    "grad_dtype": (
        UnsupportedTensor,
        r"\['params'\]\[1\] has dtype torch.float32 but its gradient has dtype torch.float64",
    ),
}


@pytest.mark.parametrize("backend", host_backend_params())
@pytest.mark.parametrize("kind", sorted(BAD_STEPS))
def test_bad_step_is_refused_and_changes_nothing(backend, kind):
    exc, message = BAD_STEPS[kind]
    opt, params = trained("adamw", backend)
    before = snapshot(opt, params)
    grads = [p.grad for p in params]
    _make_bad(kind, opt, params)
    before = (
        before[0]
        if kind not in ("param_replaced", "model_to_double", "param_transposed")
        else [p.detach().numpy().tobytes() for p in params],
    ) + before[1:]
    if kind in ("negative_lr", "beta_one", "eps_underflows", "tensor_lr", "maximize", "amsgrad", "foreign_option"):
        before = (
            before[:2]
            + (copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),)
            + before[3:]
        )
    with pytest.raises(exc, match=message):
        opt.step()
    assert snapshot(opt, params) == before
    del grads


def test_refused_hyperparameter_can_be_fixed_and_training_goes_on():
    opt, params = trained()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 3


def test_changing_the_coupled_flag_of_a_group_is_refused():
    opt, params = trained("coupled_adam")
    opt.param_groups[0]["coupled"] = False
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="coupled changed"):
        opt.step()
    assert snapshot(opt, params)[:2] == before[:2]


# ---- at construction and in add_param_group -------------------------------------------------
def _param(dtype=torch.float32, shape=(4, 3)):
    return torch.nn.Parameter(
        torch.zeros(shape, dtype=dtype), requires_grad=dtype.is_floating_point or dtype.is_complex
    )


def _views_of_one_buffer():
    base = torch.zeros(10)
    return [base[:6].detach().requires_grad_(), base[4:].detach().requires_grad_()]


def _twice():
    p = _param()
    return [p, p]


def _in_two_groups():
    p = _param()
    return [{"params": [p]}, {"params": [_param(), p]}]


BAD_PARAMS = {
    "bfloat16": (
        lambda: [_param(torch.bfloat16)],
        UnsupportedTensor,
        r"torch\.bfloat16.*torch\.float32 and torch\.float64.*no bfloat16",
    ),
    "float16": (
        lambda: [_param(torch.float16)],
        UnsupportedTensor,
        r"torch\.float16.*torch\.float32 and torch\.float64",
    ),
    "complex": (lambda: [_param(torch.complex64)], UnsupportedTensor, "complex"),
    "integer": (lambda: [torch.zeros(3, dtype=torch.int64)], UnsupportedTensor, "int64"),
    "non_dense": (lambda: [torch.zeros(10)[::2].requires_grad_()], UnsupportedTensor, "not a dense tensor"),
    "sparse_param": (lambda: [torch.zeros(3, 3).to_sparse().requires_grad_()], UnsupportedTensor, "layout"),
    "meta": (lambda: [torch.nn.Parameter(torch.empty(3, device="meta"))], UnsupportedTensor, "meta"),
    "overlap": (lambda: _views_of_one_buffer(), ValueError, r"\['params'\]\[0\] and .*\['params'\]\[1\] share memory"),
    "twice_in_group": (lambda: _twice(), ValueError, "same tensor"),
    "two_groups": (
        lambda: _in_two_groups(),
        ValueError,
        r"param_groups\[1\]\['params'\]\[1\] is already in param_groups\[0\]",
    ),
    "non_leaf": (lambda: [_param() * 2], ValueError, "non-leaf"),
    "not_a_tensor": (lambda: [np.zeros(3)], TypeError, "numpy.ndarray"),
}


@pytest.mark.parametrize("kind", sorted(BAD_PARAMS))
def test_unsupported_parameters_are_refused_by_name(kind):
    make, exc, message = BAD_PARAMS[kind]
    with pytest.raises(exc, match=message):
        fot.AdamW(make(), backend="numpy")


BAD_OPTIONS = {
    "maximize": ({"maximize": True}, "maximize=True"),
    "amsgrad": ({"amsgrad": True}, "amsgrad=True"),
    "capturable": ({"capturable": True}, "capturable=True"),
    "differentiable": ({"differentiable": True}, "differentiable=True"),
    "lr": ({"lr": -1e-3}, "lr must be >= 0"),
    "betas": ({"betas": (0.9,)}, "betas must be a pair"),
    "backend": ({"backend": "cuda"}, "unknown backend"),
}


@pytest.mark.parametrize("kind", sorted(BAD_OPTIONS))
def test_unsupported_options_are_refused(kind):
    kw, message = BAD_OPTIONS[kind]
    with pytest.raises((ValueError, TypeError), match=message):
        fot.Adam([_param()], **kw)


def test_foreach_and_fused_are_accepted():
    for kw in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": False}):
        fot.AdamW([_param()], backend="numpy", **kw)


def test_decoupled_weight_decay_must_match_the_class():
    with pytest.raises(ValueError, match="use fisheropt.torch.AdamW"):
        fot.Adam([_param()], decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="not an option of FAdam"):
        fot.FAdam([{"params": [_param()], "decoupled_weight_decay": True}])
    with pytest.raises(ValueError, match="eps2=0.5 is not an option of AdamW"):
        fot.AdamW([{"params": [_param()], "eps2": 0.5}])


def test_coupled_tensor_must_be_a_matrix():
    with pytest.raises(ValueError, match="must be 2-D"):
        fot.CoupledAdam([{"params": [_param(shape=(5,))], "coupled": True}], backend="numpy")
    with pytest.raises(ValueError, match="not C-contiguous"):
        fot.CoupledAdam([{"params": [torch.nn.Parameter(torch.zeros(4, 3).t())], "coupled": True}], backend="numpy")


@pytest.mark.parametrize("kind", ["bfloat16", "overlap_existing", "already_there", "bad_lr"])
def test_refused_param_group_changes_nothing(kind):
    opt, params = trained()
    before = snapshot(opt, params)
    if kind == "bfloat16":
        group = {"params": [_param(), _param(torch.bfloat16)]}
    elif kind == "overlap_existing":
        group = {"params": [params[1].detach().view(-1)[:2].requires_grad_()]}
    elif kind == "already_there":
        group = {"params": [_param(), params[2]]}
    else:
        group = {"params": [_param()], "lr": float("nan")}
    with pytest.raises((ValueError, TypeError)):
        opt.add_param_group(group)
    assert snapshot(opt, params) == before
    assert len(opt.param_groups) == 1 and len(opt._groups) == 1


def test_cuda_tensor_with_a_host_backend_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    with pytest.raises(TypeError, match="runs on CPU memory"):
        fot.AdamW([torch.nn.Parameter(torch.zeros(3, device="cuda"))], backend="numba")
