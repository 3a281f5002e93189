"""The NumPy model zoo (fisheropt.workloads.models): analytic derivatives against finite differences."""

import numpy as np
import pytest

from fisheropt.workloads.models import MLP, SoftmaxRegression, load_digits_split, softmax


def _models(dtype=np.float64):
    return [SoftmaxRegression(5, 3, seed=1, dtype=dtype), MLP(5, 4, 3, seed=2, dtype=dtype)]


def _batch(rng, N=6, F=5, C=3):
    return rng.standard_normal((N, F)), rng.integers(0, C, N)


@pytest.mark.parametrize("model", _models(), ids=["softmax", "mlp"])
def test_loss_gradients_match_central_differences(model, rng):
    X, y = _batch(rng)
    model.set_flat(model.get_flat() + 0.3 * rng.standard_normal(model.n_params))
    loss, grads = model.loss_and_grads(X, y)
    assert [g.shape for g in grads] == [p.shape for p in model.params]
    theta = model.get_flat()
    fd = np.empty_like(theta)
    h = 1e-6
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        model.set_flat(theta + e)
        lp = model.loss(X, y)
        model.set_flat(theta - e)
        lm = model.loss(X, y)
        fd[i] = (lp - lm) / (2 * h)
    model.set_flat(theta)
    np.testing.assert_allclose(model.flatten(grads), fd, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(model.loss(X, y))


@pytest.mark.parametrize("model", _models(), ids=["softmax", "mlp"])
def test_logit_jacobians_match_central_differences(model, rng):
    X, _ = _batch(rng, N=3)
    J = model.logit_jacobians(X)
    assert J.shape == (3, 3, model.n_params)
    theta = model.get_flat()
    h = 1e-6
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        model.set_flat(theta + e)
        zp = model.logits(X)
        model.set_flat(theta - e)
        zm = model.logits(X)
        np.testing.assert_allclose(J[:, :, i], (zp - zm) / (2 * h), rtol=1e-6, atol=1e-8)
    model.set_flat(theta)


@pytest.mark.parametrize("model", _models(), ids=["softmax", "mlp"])
def test_per_sample_grads_are_the_per_sample_loss_gradients(model, rng):
    X, y = _batch(rng)
    G = model.per_sample_grads(X, y)
    assert G.shape == (6, model.n_params)
    for n in range(6):  # brute force: the batch gradient of a one-sample batch
        _, g = model.loss_and_grads(X[n : n + 1], y[n : n + 1])
        np.testing.assert_allclose(G[n], model.flatten(g), rtol=1e-12, atol=1e-14)
    _, g = model.loss_and_grads(X, y)
    np.testing.assert_allclose(G.sum(axis=0), model.flatten(g), rtol=1e-12, atol=1e-13)
    J, p = model.logit_jacobians(X), model.probs(X)
    R = p.copy()
    R[np.arange(6), y] -= 1
    np.testing.assert_allclose(np.einsum("ncp,nc->np", J, R), G, rtol=1e-12, atol=1e-14)


def test_params_are_updated_in_place_and_read_on_every_call(rng):
    model = MLP(5, 4, 3, seed=0)
    X, y = _batch(rng)
    ids = [id(p) for p in model.params]
    before = model.loss(X, y)
    for p in model.params:
        p -= 0.1 * np.sign(p + 0.5)
    assert model.loss(X, y) != before
    model.set_flat(np.zeros(model.n_params))
    assert [id(p) for p in model.params] == ids
    np.testing.assert_allclose(model.probs(X), 1 / 3)
    assert model.loss(X, y) == pytest.approx(6 * np.log(3))


def test_flat_layout_is_params_order_c_order():
    model = MLP(3, 2, 4, seed=0)
    theta = model.get_flat()
    assert model.n_params == 3 * 2 + 2 + 2 * 4 + 4 == theta.size
    np.testing.assert_array_equal(theta[:6], model.params[0].ravel())
    np.testing.assert_array_equal(theta[-4:], model.params[3])
    parts = model.unflatten(theta)
    for a, p in zip(parts, model.params):
        np.testing.assert_array_equal(a, p)


def test_probs_are_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]])
    p = softmax(z)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1)
    model = SoftmaxRegression(2, 3, seed=0)
    model.params[0][...] = [[1e3, 0, -1e3], [0, 0, 0]]
    X = np.array([[1.0, 0.0]])
    assert np.isfinite(model.loss(X, np.array([2])))
    assert model.loss(X, np.array([2])) == pytest.approx(2000.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype, rng):
    for model in _models(dtype):
        X, y = _batch(rng)
        assert model.logits(X).dtype == dtype
        assert model.per_sample_grads(X, y).dtype == dtype
        assert model.logit_jacobians(X).dtype == dtype
        assert all(g.dtype == dtype for g in model.loss_and_grads(X, y)[1])
        assert isinstance(model.loss(X, y), float)


def test_seeded_and_deterministic():
    a, b, c = MLP(5, 4, 3, seed=3), MLP(5, 4, 3, seed=3), MLP(5, 4, 3, seed=4)
    np.testing.assert_array_equal(a.get_flat(), b.get_flat())
    assert not np.array_equal(a.get_flat(), c.get_flat())


def test_input_validation(rng):
    model = MLP(5, 4, 3)
    X, y = _batch(rng)
    with pytest.raises(ValueError, match="shape"):
        model.logits(X[:, :4])
    with pytest.raises(ValueError, match="labels"):
        model.loss(X, np.full(6, 3))
    with pytest.raises(ValueError, match="shape"):
        model.loss(X, y[:5])
    with pytest.raises(ValueError, match="NaN"):
        model.logits(np.full((1, 5), np.nan))
    with pytest.raises(ValueError):
        model.set_flat(np.zeros(model.n_params + 1))
    with pytest.raises(TypeError):
        MLP(5, 4, 3, dtype=np.int32)
    with pytest.raises(ValueError):
        SoftmaxRegression(0, 3)


def test_digits_split_and_a_short_training_run():
    Xtr, ytr, Xte, yte = load_digits_split(seed=0)
    assert Xtr.shape[1] == 64 and Xtr.shape[0] + Xte.shape[0] == 1797
    assert abs(Xte.shape[0] - 0.25 * 1797) <= 1
    np.testing.assert_allclose(Xtr.mean(axis=0), 0, atol=1e-12)
    assert set(np.unique(ytr)) == set(range(10))
    X32 = load_digits_split(seed=0, dtype=np.float32)[0]
    assert X32.dtype == np.float32
    model = SoftmaxRegression(64, 10, seed=0)
    acc0 = model.accuracy(Xte, yte)
    for _ in range(50):
        _, grads = model.loss_and_grads(Xtr, ytr)
        for p, g in zip(model.params, grads):
            p -= 0.5 * g / Xtr.shape[0]
    assert model.accuracy(Xte, yte) > max(0.85, acc0)
