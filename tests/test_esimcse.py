"""ESimCSE reference pieces: word repetition, the momentum queue, the EMA update,
the InfoNCE loss and its gradient (spec/esimcse.md); and the tiny sentence encoder,
a workload (fisheropt.workloads.esimcse_encoder) that the experiment trains."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from fisheropt.refimpl.esimcse_loss import TEMPERATURE, info_nce, info_nce_with_grad
from fisheropt.refimpl.esimcse_momentum import MOMENTUM, ema_coefficients, ema_update, ema_update_tensor
from fisheropt.refimpl.esimcse_queue import MomentumQueue, default_queue_size
from fisheropt.refimpl.esimcse_repetition import (
    DUP_RATE,
    apply_repetition,
    max_dup_len,
    repetition_positions,
    word_repetition,
    word_repetition_batch,
)
from fisheropt.workloads import esimcse_encoder as enc


# ---- word repetition ------------------------------------------------------------
def test_repetition_defaults_and_bounds():
    assert DUP_RATE == 0.32
    assert max_dup_len(0) == 2 and max_dup_len(6) == 2 and max_dup_len(7) == 2  # int(0.32·7) = 2
    assert max_dup_len(10) == 3 and max_dup_len(25) == 8 and max_dup_len(100) == 32
    assert max_dup_len(10, dup_rate=0.5) == 5


def test_repetition_duplicates_in_place():
    tokens = np.array([5, 6, 7, 8])
    np.testing.assert_array_equal(apply_repetition(tokens, [1, 3]), [5, 6, 6, 7, 8, 8])
    np.testing.assert_array_equal(apply_repetition(tokens, []), tokens)


@given(n=st.integers(0, 60), seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.1, 0.32, 0.5, 1.0]))
def test_repetition_properties(n, seed, rate):
    tokens = np.arange(100, 100 + n)  # distinct, so duplicates are visible
    out = word_repetition(tokens, dup_rate=rate, rng=seed)
    k = len(out) - n
    assert 0 <= k <= min(n, max_dup_len(n, rate))
    values, counts = np.unique(out, return_counts=True)
    np.testing.assert_array_equal(values, tokens)  # nothing new, nothing lost
    assert set(counts.tolist()) <= {1, 2} and int((counts == 2).sum()) == k
    assert np.all(np.diff(out) >= 0)  # order kept; a copy sits next to its original
    np.testing.assert_array_equal(out, word_repetition(tokens, dup_rate=rate, rng=seed))  # deterministic


def test_repetition_is_deterministic_given_a_seed():
    sents = [np.arange(n) for n in (5, 12, 30, 31)]
    a = word_repetition_batch(sents, rng=7)
    b = word_repetition_batch(sents, rng=np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = word_repetition_batch(sents, rng=8)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c))


def test_repetition_dup_len_is_uniform_on_its_range():
    """dup_len ~ U{0..max(2, int(0.32·N))}, both ends included (chi-square)."""
    rng = np.random.default_rng(0)
    for n, trials in ((25, 4500), (4, 1500)):
        hi = max_dup_len(n)
        k = np.array([len(repetition_positions(n, rng=rng)) for _ in range(trials)])
        observed = np.bincount(k, minlength=hi + 1)
        assert observed.size == hi + 1 and observed.min() > 0  # 0 and hi both reached, nothing above
        assert stats.chisquare(observed).pvalue > 1e-3
        assert abs(k.mean() - hi / 2) < 4 * math.sqrt(((hi + 1) ** 2 - 1) / 12 / trials)


def test_repetition_positions_are_uniform_and_distinct():
    rng = np.random.default_rng(1)
    n, trials = 20, 3000
    hits = np.zeros(n)
    for _ in range(trials):
        pos = repetition_positions(n, rng=rng)
        assert len(set(pos.tolist())) == len(pos) and np.all(np.diff(pos) > 0)
        hits[pos] += 1
    assert stats.chisquare(hits).pvalue > 1e-3
    # E[hits per position] = E[dup_len]/N = (max_dup_len/2)/N
    assert hits.sum() / trials == pytest.approx(max_dup_len(n) / 2, rel=0.08)


def test_repetition_tiny_sentences():
    rng = np.random.default_rng(2)
    assert len(word_repetition(np.array([], dtype=np.int64), rng=rng)) == 0
    lengths = {len(word_repetition(np.array([9]), rng=rng)) for _ in range(200)}
    assert lengths == {1, 2}  # dup_len clamped to N = 1
    with pytest.raises(ValueError):
        word_repetition(np.zeros((2, 2)), rng=rng)


# ---- momentum queue ---------------------------------------------------------------
def test_default_queue_size_is_two_and_a_half_batches():
    assert default_queue_size(64) == 160 and default_queue_size(4) == 10 and default_queue_size(3) == 7


def test_queue_is_fifo_oldest_first():
    q = MomentumQueue(dim=2, size=default_queue_size(4))
    assert len(q) == 0 and q.negatives().shape == (0, 2)
    history = []
    for b in range(6):
        ids = np.arange(4 * b, 4 * b + 4)
        batch = np.stack([ids, -ids], axis=1).astype(float)
        q.enqueue(batch)
        history.extend(ids.tolist())
        got = q.negatives()
        assert got.shape == (min(len(history), 10), 2)
        np.testing.assert_array_equal(got[:, 0], history[-10:])  # the last Q, oldest first
        np.testing.assert_array_equal(got[:, 1], -got[:, 0])  # rows intact


def test_queue_big_batch_keeps_newest_and_returns_copies():
    q = MomentumQueue(dim=1, size=3)
    q.enqueue(np.arange(5.0)[:, None])
    np.testing.assert_array_equal(q.negatives()[:, 0], [2, 3, 4])
    q.negatives()[:] = -1
    np.testing.assert_array_equal(q.negatives()[:, 0], [2, 3, 4])
    q.clear()
    assert len(q) == 0
    with pytest.raises(ValueError):
        q.enqueue(np.zeros((2, 3)))
    empty = MomentumQueue(dim=1, size=0)
    empty.enqueue(np.ones((2, 1)))
    assert len(empty) == 0


# ---- momentum (EMA) update, reference -----------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ema_reference_formula(dtype):
    rng = np.random.default_rng(3)
    k = [rng.standard_normal(s).astype(dtype) for s in [(4, 3), (5,), ()]]
    q = [rng.standard_normal(s).astype(dtype) for s in [(4, 3), (5,), ()]]
    expect = [MOMENTUM * a.astype(np.float64) + (1 - MOMENTUM) * b.astype(np.float64) for a, b in zip(k, q)]
    ema_update(k, q, decay=MOMENTUM)
    tol = 4 * np.finfo(dtype).eps
    for got, want in zip(k, expect):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_ema_coefficients_rounded_to_dtype():
    a, b = ema_coefficients(0.995, np.float32)
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert b == np.float32(1.0 - 0.995)  # 1 − λ in float64 first, then rounded
    assert MOMENTUM == 0.995


def test_ema_edge_decays_and_tracking():
    rng = np.random.default_rng(4)
    q = rng.standard_normal(6)
    k0 = rng.standard_normal(6)
    np.testing.assert_array_equal(ema_update_tensor(k0, q, decay=0.0), q)
    np.testing.assert_array_equal(ema_update_tensor(k0, q, decay=1.0), k0)
    k = [k0.copy()]
    for _ in range(2000):  # a fixed source: θ_k → θ_q geometrically
        ema_update(k, [q], decay=0.995)
    np.testing.assert_allclose(k[0], q + 0.995**2000 * (k0 - q), rtol=1e-9, atol=1e-12)


# ---- InfoNCE loss -----------------------------------------------------------------
def _cos(x, y):
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _naive_loss(h, hp, neg, tau):
    total = 0.0
    for i in range(len(h)):
        logits = [_cos(h[i], hp[j]) / tau for j in range(len(hp))]
        logits += [_cos(h[i], n) / tau for n in (neg if neg is not None else [])]
        total -= logits[i] - math.log(sum(math.exp(x) for x in logits))
    return total / len(h)


def _numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f()
        x[idx] = old - eps
        down = f()
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("n_neg", [None, 0, 5])
@pytest.mark.parametrize("tau", [TEMPERATURE, 0.5])
def test_info_nce_value_and_gradient_by_finite_differences(n_neg, tau):
    rng = np.random.default_rng(5)
    B, d = 4, 6
    h, hp = rng.standard_normal((B, d)), rng.standard_normal((B, d))
    hp[1] = h[1] + 0.3 * rng.standard_normal(d)  # one easy positive
    neg = None if n_neg is None else rng.standard_normal((n_neg, d))
    loss, gh, ghp = info_nce_with_grad(h, hp, neg, tau=tau)
    assert loss == pytest.approx(_naive_loss(h, hp, neg, tau), rel=1e-12)
    num_h = _numeric_grad(lambda: info_nce(h, hp, neg, tau=tau), h)
    num_hp = _numeric_grad(lambda: info_nce(h, hp, neg, tau=tau), hp)
    scale = max(np.abs(num_h).max(), np.abs(num_hp).max())
    np.testing.assert_allclose(gh, num_h, rtol=1e-5, atol=1e-7 * scale)
    np.testing.assert_allclose(ghp, num_hp, rtol=1e-5, atol=1e-7 * scale)


@given(
    seed=st.integers(0, 2**32 - 1), B=st.integers(1, 6), Q=st.integers(0, 7), scale=st.sampled_from([1e-3, 1.0, 1e3])
)
def test_info_nce_invariances(seed, B, Q, scale):
    rng = np.random.default_rng(seed)
    d = 5
    h, hp, neg = rng.standard_normal((B, d)), rng.standard_normal((B, d)), rng.standard_normal((Q, d))
    loss, gh, ghp = info_nce_with_grad(h, hp, neg)
    # cosine similarity: invariant to each row's scale, so the gradient is orthogonal to its row
    loss2, gh2, _ = info_nce_with_grad(h * scale, hp, neg * 7.0)
    assert loss2 == pytest.approx(loss, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(gh2 * scale, gh, rtol=1e-7, atol=1e-9 * (1 + np.abs(gh).max()))
    np.testing.assert_allclose(np.sum(gh * h, axis=1), 0, atol=1e-8 * (1 + np.abs(gh).max() * np.abs(h).max()))
    np.testing.assert_allclose(np.sum(ghp * hp, axis=1), 0, atol=1e-8 * (1 + np.abs(ghp).max() * np.abs(hp).max()))
    assert math.isfinite(loss) and loss >= -1e-12
    # negatives only add terms to the denominator: the loss can only grow
    assert loss >= info_nce(h, hp, None) - 1e-12


def test_info_nce_lower_bound_and_rejects_bad_shapes():
    h = np.eye(3)
    # perfect positives, orthogonal others: loss = log(1 + 2 e^{-1/τ})
    assert info_nce(h, h * 2.0) == pytest.approx(math.log(1 + 2 * math.exp(-1 / TEMPERATURE)), rel=1e-12)
    with pytest.raises(ValueError):
        info_nce(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError):
        info_nce(np.ones((2, 3)), np.ones((2, 3)), np.ones((4, 2)))


# ---- encoder (a workload: fisheropt.workloads.esimcse_encoder) --------------------
def _tiny_model(seed=0):
    rng = np.random.default_rng(seed)
    params = enc.init_params(12, 9, 4, 3, rng=rng)
    params[3][...] = rng.standard_normal(3)  # non-zero bias, so its gradient is tested
    sents = [rng.integers(1, 12, size=n) for n in (3, 7, 9, 1)]
    return params, sents


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_encoder_gradient_by_finite_differences(dropout):
    params, sents = _tiny_model()
    tokens, lengths = enc.pad_batch(sents, 9)
    R = np.random.default_rng(1).standard_normal((len(sents), 3))

    def f():
        return float(np.sum(enc.forward(params, tokens, lengths, dropout=dropout, rng=11)[0] * R))

    _, cache = enc.forward(params, tokens, lengths, dropout=dropout, rng=11)
    grads = enc.backward(params, cache, R)
    assert [g.shape for g in grads] == [p.shape for p in params]
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g, _numeric_grad(f, p), rtol=1e-6, atol=1e-8)
    assert np.all(grads[0][0] == 0)  # padding never gets a gradient


def test_encoder_end_to_end_gradient_through_info_nce():
    params, sents = _tiny_model(2)
    tokens, lengths = enc.pad_batch(sents, 9)
    neg = np.random.default_rng(3).standard_normal((5, 3))

    def f():
        z1 = enc.forward(params, tokens, lengths, dropout=0.2, rng=21)[0]
        z2 = enc.forward(params, tokens, lengths, dropout=0.2, rng=22)[0]
        return info_nce(z1, z2, neg, tau=0.2)

    z1, c1 = enc.forward(params, tokens, lengths, dropout=0.2, rng=21)
    z2, c2 = enc.forward(params, tokens, lengths, dropout=0.2, rng=22)
    _, g1, g2 = info_nce_with_grad(z1, z2, neg, tau=0.2)
    grads = [a + b for a, b in zip(enc.backward(params, c1, g1), enc.backward(params, c2, g2))]
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g, _numeric_grad(f, p), rtol=1e-5, atol=1e-8)


def test_encoder_padding_truncation_and_encode():
    params, sents = _tiny_model(4)
    alone = enc.encode(params, sents[:1], max_len=9)
    batched = enc.encode(params, sents, max_len=9, batch_size=2)
    np.testing.assert_allclose(batched[0], alone[0], rtol=1e-13)  # padding does not leak into the mean
    tokens, lengths = enc.pad_batch([np.arange(1, 20)], 9)
    assert tokens.shape == (1, 9) and lengths[0] == 9
    with pytest.raises(ValueError):
        enc.pad_batch([np.array([], dtype=np.int64)], 9)
    z0 = enc.forward(params, *enc.pad_batch(sents, 9))[0]
    np.testing.assert_array_equal(z0, enc.forward(params, *enc.pad_batch(sents, 9), dropout=0.0, rng=5)[0])
    assert len(enc.COUPLED) == len(params) and enc.COUPLED[0] is True
