"""fisheropt.optax: every rule of the registry as an optax transformation (issue 17).

What is checked here (the golden vectors run in test_optax_vectors.py, the natural-gradient
pieces in test_optax_natural_gradient.py):

* one transformation per registry rule, its signature (names, defaults) from the registry,
  its ranges enforced from the registry; ``lion`` exactly when the registry has it;
* random pytrees (nested dicts/lists/tuples, 0-d, size-0 and size-1 leaves, magnitudes over
  six decades, a zero-gradient step, hyperparameters drawn from the registry's ``typical``
  ranges): ``foo.<rule>`` against ``fo.<Rule>(backend="numpy")`` within the spec's tolerances,
  float32 without x64 and float64 with x64;
* jit and eager agree; vmap over an ensemble agrees with one member at a time; schedules
  and chains; the building blocks' factorisations; Coupled Adam's (d,) state and its flags;
  bfloat16 parameters with float32 state; the scalars and reductions without x64.

Float64 runs inside ``with jax.enable_x64(True)``, so the other tests (and other modules)
keep JAX's default.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="fisheropt.optax needs jax: pip install 'fisheropt[jax]'")
optax = pytest.importorskip("optax", reason="fisheropt.optax needs optax: pip install 'fisheropt[jax]'")
import jax.numpy as jnp  # noqa: E402

import fisheropt as fo  # noqa: E402
import fisheropt.optax as foo  # noqa: E402
from fisheropt.optax import _numerics as nu  # noqa: E402
from fisheropt.optax import transforms  # noqa: E402
from fisheropt.optax.conformance import interpreted, interpreter_keeps_subnormals  # noqa: E402
from fisheropt.refimpl import RULES  # noqa: E402

RULE_NAMES = sorted(RULES)
DTYPES = ["float32", "float64"]


# ---- helpers ----------------------------------------------------------------------------------
def _x64(dtype):
    """The x64 context for a dtype: float64 needs it, float32 runs with JAX's default (no x64)."""
    return jax.enable_x64(np.dtype(dtype) == np.float64)


def _log_uniform(rng, lo, hi):
    if lo > 0:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def sample_hyperparams(rule, rng) -> dict:
    """Registry hyperparameters drawn from each one's ``typical`` range (else its default)."""
    hp = {}
    for h in rule.hyperparams:
        rng_ = getattr(h, "typical", None)
        if rng_ is None:
            hp[h.name] = h.default
        elif h.names:
            hp[h.name] = tuple(sorted(_log_uniform(rng, *rng_) for _ in h.names))
        else:
            hp[h.name] = _log_uniform(rng, *rng_)
    if "lr" in hp:
        hp["lr"] = min(hp["lr"], 0.1)
    return hp


def random_tree(rng, rule):
    """A nested pytree of shapes (dict / list / tuple) with 0-d, size-0, size-1, 1-D and 2-D leaves."""
    two_d = lambda: (int(rng.integers(1, 7)), int(rng.integers(1, 6)))  # noqa: E731
    shapes = {
        "embed": two_d(),
        "blocks": [{"w": two_d(), "b": (int(rng.integers(1, 9)),)}, ((),)],
        "empty": (0,),
        "one": (1,),
    }
    leaves, treedef = jax.tree.flatten(
        shapes, is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)
    )
    return leaves, treedef


def flags_for(rule, leaves, rng):
    if rule.tensor_flag is None:
        return None
    return [len(s) == 2 and bool(rng.random() < 0.7) for s in leaves]


def transform_kwargs(rule, hp, flags=None, treedef=None):
    kw = {k: v for k, v in hp.items() if k != "lr"}
    if rule.tensor_flag is not None:
        kw[rule.tensor_flag.name] = treedef.unflatten(flags)
    return kw


class Tolerance:
    """The vectors' tolerances (spec/vectors.md), grown with the number of steps k of a trajectory:
    θ within (k+1) ulp plus 16·eps·k·max|Δθ|, state within 4 ulp plus 4·eps·k·max|state|."""

    def __init__(self, dtype):
        self.eps = float(np.finfo(dtype).eps)
        self.dtheta = {}
        self.scale = {}

    def theta(self, i, k, got, want, before):
        want64 = want.astype(np.float64)
        if want.size == 0:
            return
        self.dtheta[i] = max(self.dtheta.get(i, 0.0), float(np.max(np.abs(want64 - before))))
        tol = (k + 1) * np.spacing(np.abs(want)).astype(np.float64) + 16 * self.eps * k * self.dtheta[i]
        err = np.abs(np.asarray(got, np.float64) - want64)
        assert np.all(err <= tol), f"params[{i}] at step {k}: excess {np.max(err - tol):.3g}"

    def state(self, key, k, got, want):
        if want.size == 0:
            return
        want64 = want.astype(np.float64)
        self.scale[key] = max(self.scale.get(key, 0.0), float(np.max(np.abs(want64))))
        tol = 4 * np.spacing(np.abs(want)).astype(np.float64) + 4 * self.eps * k * self.scale[key]
        err = np.abs(np.asarray(got, np.float64) - want64)
        assert np.all(err <= tol), f"state {key} at step {k}: excess {np.max(err - tol):.3g}"


def run_against_reference(rule, dtype, seed, *, steps=8, jit=True, hp=None, interpret=False, grad_exponents=(-2, 2)):
    """A trajectory of foo.<rule> and fo.<Rule>(backend="numpy") on the same random pytree, the
    update jitted, eager, or (``interpret``) update and apply run by the StableHLO interpreter;
    gradients of each leaf's scale times 10^u, u uniform in ``grad_exponents``."""
    rng = np.random.default_rng(seed)
    leaves, treedef = random_tree(rng, rule)
    hp = hp or sample_hyperparams(rule, rng)
    flags = flags_for(rule, leaves, rng)
    scale = 10.0 ** rng.uniform(-3, 3, len(leaves))
    params = [np.asarray(rng.standard_normal(s) * c, dtype) for s, c in zip(leaves, scale)]
    flag_kw = {rule.tensor_flag.name: flags} if flags is not None else {}
    ref = getattr(fo, rule.title)([p.copy() for p in params], backend="numpy", **hp, **flag_kw)
    tx = foo.TRANSFORMS[rule.name](learning_rate=hp["lr"], **transform_kwargs(rule, hp, flags, treedef))
    P = treedef.unflatten([jnp.asarray(p) for p in params])
    state = tx.init(P)
    update = jax.jit(tx.update) if jit else tx.update

    def update_and_apply(g, st, p):
        updates, st = tx.update(g, st, p)
        return optax.apply_updates(p, updates), st

    interpreted_step = interpreted(update_and_apply) if interpret else None
    tol = Tolerance(dtype)
    for k in range(1, steps + 1):
        grads = [
            np.asarray(rng.standard_normal(s) * c * 10.0 ** rng.uniform(*grad_exponents), dtype)
            for s, c in zip(leaves, scale)
        ]
        if k == 3:
            grads = [np.zeros_like(g) for g in grads]  # a zero-gradient step
        before = [p.astype(np.float64) for p in ref.params]
        ref.step([g.copy() for g in grads])
        if interpreted_step is not None:
            P, state = interpreted_step(treedef.unflatten(grads), state, P)
        else:
            updates, state = update(treedef.unflatten([jnp.asarray(g) for g in grads]), state, P)
            P = optax.apply_updates(P, updates)
        for i, (got, want) in enumerate(zip(jax.tree.leaves(P), ref.params)):
            assert got.dtype == want.dtype and got.shape == want.shape
            tol.theta(i, k, got, want, before[i])
        for name in rule.state_names:
            for i, (got, want) in enumerate(zip(jax.tree.leaves(getattr(state, name)), ref.state[name])):
                assert got.shape == want.shape, f"state {name}[{i}] shape"
                tol.state((name, i), k, got, want)
    assert int(state.count) == steps
    return P, state


# ---- the registry ------------------------------------------------------------------------------
def test_one_transform_per_registry_rule():
    assert set(foo.TRANSFORMS) == set(RULES), "every registry rule needs JAX math in fisheropt.optax.transforms.MATH"
    for name in RULES:
        assert getattr(foo, name) is foo.TRANSFORMS[name]


@pytest.mark.parametrize("name", RULE_NAMES)
def test_signature_comes_from_the_registry(name):
    import inspect

    rule = RULES[name]
    sig = inspect.signature(getattr(foo, name))
    expected = [("learning_rate" if h.name == "lr" else h.name, h.default) for h in rule.hyperparams]
    got = [(p.name, p.default) for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    flag = [(rule.tensor_flag.name, None)] if rule.tensor_flag is not None else []
    assert got == expected + flag
    assert "state_dtype" in sig.parameters
    assert isinstance(
        getattr(foo, name)(**({rule.tensor_flag.name: []} if rule.tensor_flag else {})), optax.GradientTransformation
    )


def test_lion_exactly_when_the_registry_has_it(monkeypatch):
    if "lion" in RULES:
        assert isinstance(foo.lion(), optax.GradientTransformation)
        assert isinstance(foo.scale_by_lion(), optax.GradientTransformation)
    else:
        with pytest.raises(AttributeError, match="'lion'.*registry"):
            foo.lion  # noqa: B018
    # without the descriptor (as before the rule was added): a clear error naming it
    monkeypatch.setattr(foo, "RULES", {k: v for k, v in RULES.items() if k != "lion"})
    monkeypatch.delattr(foo, "lion", raising=False)
    monkeypatch.delattr(foo, "scale_by_lion", raising=False)
    with pytest.raises(foo.MissingRule, match=r"'lion'.*refimpl/lion\.py"):
        foo.lion  # noqa: B018
    with pytest.raises(AttributeError, match="'lion'"):
        foo.scale_by_lion  # noqa: B018
    assert not hasattr(foo, "lion")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_ranges_come_from_the_registry(name):
    rule = RULES[name]
    flag = {rule.tensor_flag.name: []} if rule.tensor_flag else {}
    arg = lambda h: "learning_rate" if h.name == "lr" else h.name  # noqa: E731
    for h in rule.hyperparams:
        bad = []
        if h.low is not None:
            bad.append(h.low if h.low_open else h.low - 1.0)
        if h.high is not None:
            bad.append(h.high if h.high_open else h.high + 1.0)
        bad.append(float("nan"))
        for value in bad:
            v = tuple([value] * len(h.names)) if h.names else value
            with pytest.raises(ValueError):
                getattr(foo, name)(**{arg(h): v}, **flag)
    with pytest.raises(TypeError):
        getattr(foo, name)(learning_rate="1e-3", **flag)
    # a schedule is accepted as the learning rate
    assert isinstance(
        getattr(foo, name)(learning_rate=optax.constant_schedule(1e-3), **flag), optax.GradientTransformation
    )


@pytest.mark.parametrize("name", [n for n in RULE_NAMES if any(h.normal for h in RULES[n].hyperparams)])
def test_normal_hyperparameters_checked_against_the_param_dtype(name):
    """eps = 1e-40 is a positive float64 but subnormal in float32: refused at init for float32 params."""
    rule = RULES[name]
    h = next(h for h in rule.hyperparams if h.normal)
    flag = {rule.tensor_flag.name: [False]} if rule.tensor_flag else {}
    tx = getattr(foo, name)(**{h.name: 1e-40}, **flag)
    with pytest.raises(ValueError, match="smallest normal"):
        tx.init([jnp.ones(3, jnp.float32)])
    with jax.enable_x64(True):
        tx.init([jnp.ones(3, jnp.float64)])


# ---- against the NumPy reference -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RULE_NAMES)
def test_matches_numpy_reference_on_random_pytrees(name, dtype):
    """float32 (no x64): 16 steps with the registry's defaults; float64 (x64): 8 steps with
    hyperparameters drawn from the registry's typical ranges (the vectors cover other float32 ones)."""
    rule = RULES[name]
    seed = sum(map(ord, name + dtype))
    with _x64(dtype):
        if dtype == "float32":
            run_against_reference(rule, dtype, seed=seed, steps=16, hp=rule.defaults())
        else:
            run_against_reference(rule, dtype, seed=seed, steps=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RULE_NAMES)
def test_matches_numpy_reference_with_subnormal_gradients_interpreted(name, dtype):
    """Gradients down to the dtype's subnormals (float32 ~1e-45..1e-36, float64 ~1e-320..1e-300),
    which XLA:CPU flushes: the same programs run by the StableHLO interpreter (IEEE) follow the
    reference, 6 steps, hyperparameters from the typical ranges."""
    rule = RULES[name]
    seed = sum(map(ord, "subnormal" + name + dtype))
    exponents = (-44, -36) if dtype == "float32" else (-320, -300)
    with _x64(dtype):
        run_against_reference(rule, dtype, seed=seed, steps=6, interpret=True, grad_exponents=exponents)


def test_jit_and_eager_agree():
    """The same FAdam steps jitted and op by op (XLA may contract a·b + c into an FMA under jit
    only: agreement within a few ulp, not bit for bit)."""
    rng = np.random.default_rng(11)
    shapes = [(3, 2), ()]
    tx = foo.fadam(learning_rate=1e-2, clip=0.5, p=0.75)
    P1 = P2 = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    s1 = s2 = tx.init(P1)
    for _ in range(2):
        g = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
        u1, s1 = jax.jit(tx.update)(g, s1, P1)
        u2, s2 = tx.update(g, s2, P2)
        P1, P2 = optax.apply_updates(P1, u1), optax.apply_updates(P2, u2)
    eps = np.finfo(np.float32).eps
    for x, y in zip(jax.tree.leaves((P1, s1)), jax.tree.leaves((P2, s2))):  # the spec's tolerance form
        y = np.asarray(y, np.float64)
        np.testing.assert_allclose(np.asarray(x), y, rtol=8 * eps, atol=8 * eps * float(np.max(np.abs(y))))


def test_vmap_over_an_ensemble():
    """vmap(update) over 3 ensemble members equals jit(update) on each member."""
    rng = np.random.default_rng(5)
    shapes = [(4, 3), (5,), ()]
    tx = foo.fadam(learning_rate=1e-2)
    members = [[jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes] for _ in range(3)]
    grads = [[jnp.asarray(rng.standard_normal(s) * 10.0 ** (j - 1), jnp.float32) for s in shapes] for j in range(3)]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    states = [tx.init(p) for p in members]
    bp, bs = stack(members), stack(states)
    vupdate = jax.jit(jax.vmap(tx.update))
    for _ in range(3):
        bu, bs = vupdate(stack(grads), bs, bp)
        bp = optax.apply_updates(bp, bu)
        for j in range(3):
            u, states[j] = jax.jit(tx.update)(grads[j], states[j], members[j])
            members[j] = optax.apply_updates(members[j], u)
    for j in range(3):
        for x, y in zip(jax.tree.leaves(bp), members[j]):
            np.testing.assert_allclose(np.asarray(x[j]), np.asarray(y), rtol=4e-7, atol=0)


def test_schedule_and_chain_match_reference():
    """optax.chain(clip_by_global_norm, foo.fadam(cosine schedule)) = clipped grads into fo.FAdam with
    lr = schedule(t - 1) at step t (optax's convention: the schedule sees the count before the step)."""
    rng = np.random.default_rng(9)
    shapes = [(6, 4), (9,)]
    sched = optax.cosine_decay_schedule(1e-2, 10)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    clip = optax.clip_by_global_norm(1.0)
    tx = optax.chain(clip, foo.fadam(sched))
    P = [jnp.asarray(p) for p in params]
    state, cstate = tx.init(P), clip.init(P)
    ref = fo.FAdam([p.copy() for p in params], backend="numpy")
    tol = Tolerance("float32")
    update = jax.jit(tx.update)
    for k in range(1, 6):
        g = [jnp.asarray(rng.standard_normal(s) * 3, jnp.float32) for s in shapes]
        clipped, cstate = clip.update(g, cstate)
        ref.set_hyperparams(lr=float(sched(k - 1)))
        before = [p.astype(np.float64) for p in ref.params]
        ref.step([np.asarray(x).copy() for x in clipped])
        u, state = update(g, state, P)
        P = optax.apply_updates(P, u)
        for i, (x, y) in enumerate(zip(P, ref.params)):
            tol.theta(i, k, x, y, before[i])


@pytest.mark.parametrize("name", RULE_NAMES)
def test_building_blocks_factorise_the_rule(name):
    """FACTORISATIONS: the chain of blocks against the whole rule (bit-identical where stated)."""
    rule = RULES[name]
    formula, exact = foo.FACTORISATIONS[name]
    rng = np.random.default_rng(21)
    shapes = [(5, 3), (4,), ()]
    hp = sample_hyperparams(rule, rng)
    flags = [True, False, False] if rule.tensor_flag else None
    whole = foo.TRANSFORMS[name](
        learning_rate=hp["lr"], **{k: v for k, v in hp.items() if k != "lr"}, **({"coupled": flags} if flags else {})
    )
    betas = {"betas": hp["betas"]}
    wd = optax.add_decayed_weights(hp["weight_decay"])
    lr = optax.scale_by_learning_rate(hp["lr"])
    if name == "adam":
        chain = optax.chain(wd, foo.scale_by_adam(eps=hp["eps"], **betas), lr)
    elif name == "adamw":
        chain = optax.chain(foo.scale_by_adam(eps=hp["eps"], **betas), wd, lr)
    elif name == "coupled_adam":
        chain = optax.chain(foo.scale_by_coupled_adam(eps=hp["eps"], coupled=flags, **betas), wd, lr)
    elif name == "fadam":
        chain = optax.chain(foo.scale_by_fadam(**{k: v for k, v in hp.items() if k != "lr"}), lr)
    elif name == "lion":
        chain = optax.chain(foo.scale_by_lion(**betas), wd, lr)
    else:
        pytest.fail(f"no factorisation test for {name}: add one (and to FACTORISATIONS)")
    P1 = P2 = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    s1, s2 = whole.init(P1), chain.init(P2)
    for _ in range(5):
        g = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
        u1, s1 = jax.jit(whole.update)(g, s1, P1)
        u2, s2 = jax.jit(chain.update)(g, s2, P2)
        P1, P2 = optax.apply_updates(P1, u1), optax.apply_updates(P2, u2)
        for x, y in zip(P1, P2):
            if exact:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            else:  # a few ulp of the step
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7 * hp["lr"])


# ---- Coupled Adam --------------------------------------------------------------------------
def test_coupled_adam_keeps_a_length_d_second_moment():
    params = {"embed": jnp.ones((50, 8)), "w": jnp.ones((8, 8)), "b": jnp.ones(8)}
    mask = {"embed": True, "w": False, "b": False}
    state = foo.coupled_adam(coupled=mask).init(params)
    assert state.v["embed"].shape == (8,)  # 1/V of Adam's second moment
    assert state.v["w"].shape == (8, 8) and state.m["embed"].shape == (50, 8)
    # a function of the params gives the same mask
    state2 = foo.coupled_adam(coupled=lambda p: jax.tree.map(lambda x: x.shape == (50, 8), p)).init(params)
    assert jax.tree.map(jnp.shape, state2) == jax.tree.map(jnp.shape, state)
    with pytest.raises(ValueError, match="coupled is required"):
        foo.coupled_adam().init(params)
    with pytest.raises(ValueError, match="2-D"):
        foo.coupled_adam(coupled={"embed": True, "w": False, "b": True}).init(params)
    with pytest.raises(ValueError, match="structure"):
        foo.coupled_adam(coupled=[True, False]).init(params)
    with pytest.raises(TypeError, match="bool"):
        foo.coupled_adam(coupled={"embed": "yes", "w": False, "b": False}).init(params)


def test_weight_decay_needs_the_params():
    tx = foo.adamw()
    p = [jnp.ones(3)]
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(p, tx.init(p))
    tx = foo.adam()  # no decay: the params are not needed
    tx.update(p, tx.init(p))


# ---- bfloat16 parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("name", RULE_NAMES)
def test_bfloat16_params_with_float32_state(name):
    """bfloat16 params, float32 state and arithmetic (the default for bfloat16, also state_dtype=float32):
    against the float32 reference with θ rounded to bfloat16 after every step. Own tolerance: θ within
    one bfloat16 ulp (a float32 difference of a few ulp may flip one rounding), state as float32."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rule = RULES[name]
    rng = np.random.default_rng(13)
    shapes = [(6, 4), (7,), ()]
    flags = [True, False, False] if rule.tensor_flag else None
    hp = rule.defaults()
    hp["lr"] = 1e-2
    params32 = [np.asarray(rng.standard_normal(s), np.float32).astype(bf16).astype(np.float32) for s in shapes]
    ref = getattr(fo, rule.title)(
        [p.copy() for p in params32], backend="numpy", **hp, **({"coupled": flags} if flags else {})
    )
    tx = foo.TRANSFORMS[name](
        learning_rate=hp["lr"],
        **{k: v for k, v in hp.items() if k != "lr"},
        **({"coupled": flags} if flags else {}),
        state_dtype=jnp.float32,
    )
    P = [jnp.asarray(p, jnp.bfloat16) for p in params32]
    state = tx.init(P)
    assert all(jax.tree.leaves(jax.tree.map(lambda a: a.dtype == jnp.float32, state[1:])))
    update = jax.jit(tx.update)
    for k in range(1, 9):
        g = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
        ref.step([x.copy() for x in g])
        for p in ref.params:  # the bfloat16 parameter: rounded every step
            p[...] = p.astype(bf16).astype(np.float32)
        u, state = update([jnp.asarray(x, jnp.bfloat16) for x in g], state, P)
        P = optax.apply_updates(P, u)
        for i, (x, y) in enumerate(zip(P, ref.params)):
            assert x.dtype == jnp.bfloat16
            x = np.asarray(x.astype(jnp.float32), np.float64)
            ulp_bf16 = np.spacing(np.abs(y)).astype(np.float64) * 2.0**16  # float32 ulp × 2^16
            assert np.all(np.abs(x - y) <= ulp_bf16), f"{name} params[{i}] step {k}"


# ---- scalars and reductions ----------------------------------------------------------------
def test_scalars_with_x64_are_the_reference_host_arithmetic():
    """XLA's float64 pow gives the C library's β**t, so 1 − β**t is the reference's bit for bit."""
    ts = np.arange(1, 2001, dtype=np.int32)
    with jax.enable_x64(True):
        for beta in (0.9, 0.999, 0.9999):
            got = np.asarray(jax.jit(jax.vmap(lambda n, b=beta: nu.F64.one_minus_pow(b, n).x))(ts))
            want = np.array([1 - beta ** int(t) for t in ts])
            np.testing.assert_array_equal(got, want)


def test_scalars_without_x64_round_like_the_reference():
    """Float-float 1 − βᵗ, α/(1 − β₁ᵗ), √(1 − β₂ᵗ) and FAdam's β̂₂ rounded to float32 equal the
    reference's float64 values rounded to float32 (all t up to 600 and 200 random t < 2^31)."""
    rng = np.random.default_rng(0)
    ts = np.r_[np.arange(0, 600), rng.integers(0, 2**31 - 2, 200)].astype(np.int32)
    for beta in (0.9, 0.999, 0.95):

        def scalars(n, beta=beta):
            c = nu.DD.one_minus_pow(beta, n + 1)
            b2h = (nu.DD.const(beta) * nu.DD.one_minus_pow(beta, n)) / c
            return (
                c.round(jnp.float32),
                (nu.DD.const(1e-3) / c).round(jnp.float32),
                c.sqrt().round(jnp.float32),
                b2h.round(jnp.float32),
                (1.0 - b2h).round(jnp.float32),
            )

        got = [np.asarray(a) for a in jax.jit(jax.vmap(scalars))(ts)]
        want = [[], [], [], [], []]
        for n in ts:
            t = int(n) + 1
            c = 1 - beta**t
            b2h = beta * (1 - beta ** (t - 1)) / c
            for lst, v in zip(want, (c, 1e-3 / c, math.sqrt(c), b2h, 1 - b2h)):
                lst.append(np.float32(v))
        for what, g, w in zip(("1-b^t", "lr/(1-b^t)", "sqrt", "beta2_hat", "1-beta2_hat"), got, want):
            w = np.asarray(w)
            assert np.array_equal(g, w), f"{what} beta={beta}: {int(np.sum(g != w))} differ"


@pytest.mark.parametrize("scale", [1.0, 1e20, 3e36, 1e-25, 1e-36])
def test_float32_reductions_without_x64_emulate_float64(scale):
    """RMS of float32 data whose squares overflow or underflow float32 (not float64), without x64."""
    rng = np.random.default_rng(2)
    x = np.asarray(rng.standard_normal(1000) * scale, np.float32)
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(scale), x)  # no subnormal inputs
    got = float(jax.jit(lambda a: nu.rms(a, nu.DD).round(jnp.float32))(x))
    want = math.sqrt(np.mean(x.astype(np.float64) ** 2))
    assert abs(got - want) <= 2 * np.spacing(np.float32(want))
    g = np.asarray(rng.standard_normal((9, 4)) * scale, np.float32)
    g = np.where(np.abs(g) < np.finfo(np.float32).tiny, np.float32(scale), g)
    got = np.asarray(jax.jit(lambda a: nu.column_mean_of_squares(a, jnp.float32, nu.DD))(g), np.float64)
    with np.errstate(over="ignore", under="ignore"):
        want = np.mean(g.astype(np.float64) ** 2, axis=0).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(np.float32).eps, atol=0)


def test_xla_cpu_flushes_subnormals():
    """The one platform limit the vectors find (test_optax_vectors.py): XLA:CPU flushes subnormal
    inputs and results to zero. If this starts failing, XLA changed: run the subnormal vectors strictly."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU property")
    x = jnp.asarray(np.float32(1e-40))
    assert float(jax.jit(lambda a: a * 2)(x)) == 0.0


def test_xla_cpu_ftz_flag_does_not_keep_subnormals():
    """XLA has an ``--xla_cpu_ftz`` flag (an unknown flag would abort), but the CPU runtime still
    flushes with it set to false. If this starts failing, set the flag where the vectors run."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU property")
    code = "import jax, numpy as np; print(float(jax.jit(lambda a: a * 2)(np.float32(1e-40))))"
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_ftz=false", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == 0.0


def test_interpreter_keeps_subnormals_and_agrees_with_jit():
    """The StableHLO reference interpreter (conformance.interpreted) is IEEE: it keeps the
    subnormals XLA:CPU flushes, and on normal numbers it computes what jit does."""
    assert interpreter_keeps_subnormals()
    sub = np.asarray([1e-40, -3e-42, 2**-149], np.float32)
    np.testing.assert_array_equal(interpreted(lambda a: a * np.float32(3))(sub), sub * np.float32(3))
    rng = np.random.default_rng(5)
    x, y = (np.asarray(rng.standard_normal((3, 4)), np.float32) for _ in range(2))

    def f(a, *, b):
        return {"s": jnp.sqrt(jnp.abs(a)) / (b * b + 1), "n": jnp.sum(a * b, axis=0)}

    got, want = interpreted(f)(x, b=y), jax.jit(f)(x, b=y)
    for k in want:  # XLA may contract a·b + c into an FMA: a few ulps
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=4 * np.finfo(np.float32).eps, atol=1e-6)


def test_interpreter_refuses_custom_calls():
    """A LAPACK custom call would abort the process inside the interpreter: refused before."""
    if jax.default_backend() != "cpu":
        pytest.skip("LAPACK custom calls are the CPU lowering")
    spd = np.eye(3, dtype=np.float32) * 2
    with pytest.raises(ValueError, match="custom call"):
        interpreted(jnp.linalg.cholesky)(spd)


@pytest.mark.parametrize("k", [1, 2, 3, 112, 2**12 + 5, 2**20, 2**23 - 1])
def test_float32_rms_without_x64_keeps_every_subnormal(k):
    """RMS (float-float mode) of data as small as the smallest subnormal, run by the IEEE
    interpreter (XLA:CPU would flush the inputs): the float64 result, rounded. Squares of such data
    underflow float32 even after a 2^64 scaling (a FAdam vector failed on XLA:GPU that way)."""
    x = np.asarray([k, -k, k // 2, 0], np.float32) * np.float32(2.0**-149)
    got = interpreted(lambda a: nu.rms(a, nu.DD).round(jnp.float32))(x)
    want = np.float32(math.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert want > 0 and abs(float(got) - float(want)) <= float(np.spacing(want)), (got, want)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_adaptive_epsilon_without_x64_from_any_rms(p):
    """ε_t (float-float mode, run by the IEEE interpreter) against refimpl.fadam.adaptive_epsilon for
    RMS(g) from float32's smallest subnormals to overflowing squares: within 4 ulp (an RMS below the
    normal range keeps its bits through the unscaled factor of ScaledDD)."""
    import fisheropt.refimpl.fadam as ref_fadam

    eps, eps2 = 1e-8, 0.01
    eps_t = interpreted(
        lambda a: nu.adaptive_epsilon(nu.rms(a, nu.DD), eps=eps, eps2=eps2, p=p, dtype=jnp.float32, N=nu.DD)
    )
    rng = np.random.default_rng(int(p * 100))
    for exponent in [-45, -44, -42, -40, -38, -30, -12, -6, 0, 10, 20]:
        x = np.asarray(rng.standard_normal(7) * 10.0**exponent, np.float32)
        want = ref_fadam.adaptive_epsilon(ref_fadam.rms(x), eps=eps, eps2=eps2, p=p, dtype=np.float32)
        got = eps_t(x)
        assert got.dtype == np.float32
        assert abs(float(got) - float(want)) <= 4 * float(np.spacing(want)), (exponent, got, want)


def test_state_is_a_pytree_of_the_registry_state():
    for name, rule in RULES.items():
        flag = {rule.tensor_flag.name: {"a": False}} if rule.tensor_flag else {}
        st = foo.TRANSFORMS[name](**flag).init({"a": jnp.ones((2, 3))})
        assert type(st).__name__ == f"{rule.title}State"
        assert st._fields == ("count",) + rule.state_names
        assert st.count.dtype == jnp.int32 and int(st.count) == 0
        assert isinstance(transforms.state_class(f"{rule.title}State", rule.state_names), type)
