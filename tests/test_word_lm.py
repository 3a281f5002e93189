"""fisheropt.workloads.word_lm: analytic gradients against finite differences, corpus loading, tying."""

import numpy as np
import pytest

import fisheropt as fo
from fisheropt.workloads.word_lm import WordLM, load_pydoc_corpus, make_windows, tokenize


def _small(seed=0):
    model = WordLM(vocab_size=11, dim=4, context=2, hidden=5, seed=seed)
    rng = np.random.default_rng(seed + 100)
    # Perturb the zero biases so that their gradients are exercised at a generic point.
    for p in model.params:
        p += 0.1 * rng.standard_normal(p.shape)
    C = rng.integers(0, 11, size=(7, 2))
    y = rng.integers(0, 11, size=7)
    return model, C, y


def test_gradients_match_central_differences():
    model, C, y = _small()
    loss, grads = model.loss_and_grads(C, y)
    assert loss == pytest.approx(model.loss(C, y), rel=1e-12)
    theta = model.get_flat()
    analytic = np.concatenate([g.ravel() for g in grads])
    numeric = np.empty_like(theta)
    h = 1e-6
    for i in range(theta.size):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += h
        tm[i] -= h
        model.set_flat(tp)
        lp = model.loss(C, y)
        model.set_flat(tm)
        lm = model.loss(C, y)
        numeric[i] = (lp - lm) / (2 * h)
    model.set_flat(theta)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_output_layer_is_tied_to_the_embedding():
    model, C, _ = _small()
    z = model.logits(C)
    E, W1, b1, W2, b2, b_out = model.params
    x = E[C].reshape(len(C), -1)
    s = np.tanh(x @ W1 + b1) @ W2 + b2
    np.testing.assert_allclose(z, s @ E.T + b_out)
    # Changing E changes the output layer too.
    E += 1.0
    assert not np.allclose(model.logits(C), z)


def test_unseen_words_get_a_common_output_gradient():
    # Words that are neither context nor target only receive the dense output
    # gradient p_{n,i} s_n: the mechanism behind the common drift of rare words.
    model = WordLM(vocab_size=20, dim=3, context=1, hidden=4, seed=1)
    C = np.array([[0], [1], [2]])
    y = np.array([1, 2, 0])
    _, grads = model.loss_and_grads(C, y)
    assert np.all(np.linalg.norm(grads[0][3:], axis=1) > 0)


def test_windows_and_corpus():
    C, y = make_windows([5, 6, 7, 8], 2)
    np.testing.assert_array_equal(C, [[5, 6], [6, 7]])
    np.testing.assert_array_equal(y, [7, 8])
    assert tokenize("The `for` statement, 2x!") == ["the", "for", "statement", "x"]
    train, val, vocab, counts = load_pydoc_corpus(vocab_size=300)
    assert len(vocab) == 300 and vocab[0] == "<unk>"
    assert train.size > 10 * val.size / 2 > 0
    assert counts.sum() == train.size and counts[1] >= counts[2] >= counts[-1]
    assert train.max() < 300 and val.max() < 300


def test_trains_with_coupled_adam_and_rejects_bad_input():
    tr, _, _, _ = load_pydoc_corpus(vocab_size=200)
    C, y = make_windows(tr[:2000], 2)
    model = WordLM(200, dim=8, context=2, hidden=16, seed=0)
    opt = fo.CoupledAdam(model.params, lr=1e-2, coupled=model.coupled, backend="numpy")
    first = model.loss(C, y)
    for _ in range(30):
        _, grads = model.loss_and_grads(C[:256], y[:256])
        opt.step(grads)
    assert model.loss(C, y) < first
    with pytest.raises(ValueError):
        model.loss_and_grads(C[:, :1], y)
    with pytest.raises(ValueError):
        model.loss_and_grads(C, y + 1000)


def test_flat_views_and_checks_are_the_model_zoos():
    from fisheropt.workloads.models import MLP, FlatParams

    model, _, _ = _small()
    assert isinstance(model, FlatParams) and isinstance(MLP(3, 2, 2), FlatParams)
    theta = model.get_flat()
    assert theta.shape == (model.n_params,)
    blocks = model.unflatten(theta)
    for p, block in zip(model.params, blocks):
        np.testing.assert_array_equal(p, block)
        assert block is not p and block.dtype == p.dtype
    np.testing.assert_array_equal(model.flatten(blocks), theta)
    with pytest.raises(ValueError, match="NaN"):
        model.set_flat(np.full(model.n_params, np.nan))
    with pytest.raises(ValueError, match="shape"):
        model.set_flat(theta[:-1])
    with pytest.raises(TypeError):
        WordLM(5, dtype=np.int32)
    with pytest.raises(ValueError, match="hidden"):
        WordLM(5, hidden=0)
