r"""A tiny NumPy sentence encoder for the ESimCSE workload, with analytic gradients.

Described in spec/esimcse.md §6; a workload, not part of the reference: nothing
that the spec specifies depends on it. A bag of token + position embeddings with
dropout, mean pooling and a linear projection — the smallest model that, like a Transformer
with position embeddings, *can* encode a sentence's length (the mean of the
first L position embeddings is a function of L), which is what ESimCSE's
length-bias argument is about. For a padded batch of token ids t (B×L) with
lengths n_b:

.. math::
    x_{b\ell} &= \mathrm{drop}_p\big(E_{t_{b\ell}} + P_\ell\big) \in \mathbb{R}^d
        && \text{inverted dropout: } x \cdot \xi / (1-p),\ \xi \sim \mathrm{Bernoulli}(1-p)\\
    \bar x_b &= \frac1{n_b}\sum_{\ell < n_b} x_{b\ell}
        && \text{mean pooling over real tokens}\\
    z_b &= \bar x_b W + c \in \mathbb{R}^{k}
        && \text{projection; } z \text{ is the sentence embedding}

``params = [E (V,d), P (L_max,d), W (d,k), c (k,)]``; E is the vocabulary
embedding (``COUPLED = [True, False, False, False]`` for Coupled Adam). Token id
0 is padding and never contributes. Backward returns the gradients of a scalar
loss given dL/dz, aligned with params; E's gradient is scattered to the rows of
the tokens that occur. Computed in the params' dtype.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

PAD = 0
COUPLED = (True, False, False, False)
PARAM_NAMES = ("token_embedding", "position_embedding", "projection", "projection_bias")


def init_params(
    vocab_size: int,
    max_len: int,
    dim: int,
    out_dim: int,
    *,
    rng: np.random.Generator | None = None,
    dtype: DTypeLike = np.float64,
):
    """Fresh parameters: N(0, 1/d) embeddings, N(0, 1/d) projection, zero bias."""
    generator = np.random.default_rng(rng)  # a Generator passes through unchanged
    std = 1.0 / np.sqrt(dim)
    return [
        (generator.standard_normal((vocab_size, dim)) * std).astype(dtype),
        (generator.standard_normal((max_len, dim)) * std).astype(dtype),
        (generator.standard_normal((dim, out_dim)) * std).astype(dtype),
        np.zeros(out_dim, dtype=dtype),
    ]


def pad_batch(sentences, max_len: int):
    """List of 1-D int arrays -> (tokens (B, L) int64 padded with 0, lengths (B,) int64).

    Sentences longer than max_len are truncated; L is the longest kept length."""
    lengths = np.array([min(len(s), max_len) for s in sentences], dtype=np.int64)
    if np.any(lengths == 0):
        raise ValueError("empty sentence in batch")
    L = int(lengths.max())
    tokens = np.zeros((len(sentences), L), dtype=np.int64)
    for b, s in enumerate(sentences):
        tokens[b, : lengths[b]] = np.asarray(s, dtype=np.int64)[: lengths[b]]
    return tokens, lengths


def forward(params, tokens, lengths, *, dropout: float = 0.0, rng=None):
    """Sentence embeddings z (B, k) and the cache :func:`backward` needs.

    ``dropout`` > 0 draws a fresh mask from ``rng`` (a Generator or seed)."""
    E, P, W, c = params
    L = tokens.shape[1]
    valid = np.arange(L)[None, :] < lengths[:, None]  # (B, L)
    x = E[tokens] + P[:L][None, :, :]  # (B, L, d)
    keep = None
    if dropout > 0:
        keep = (np.random.default_rng(rng).random(x.shape) >= dropout).astype(x.dtype) * x.dtype.type(
            1.0 / (1.0 - dropout)
        )
        x = x * keep
    weights = (valid / lengths[:, None]).astype(x.dtype)  # (B, L): 1/n_b on real tokens
    pooled = np.einsum("bl,bld->bd", weights, x)
    z = pooled @ W + c
    return z, (tokens, weights, keep, pooled)


def backward(params, cache, dz):
    """Gradients [dE, dP, dW, dc] of a loss with dL/dz = ``dz`` (B, k)."""
    E, P, W, _ = params
    tokens, weights, keep, pooled = cache
    dz = np.asarray(dz, dtype=W.dtype)
    dW = pooled.T @ dz
    dc = dz.sum(axis=0)
    dpooled = dz @ W.T  # (B, d)
    dx = weights[:, :, None] * dpooled[:, None, :]  # (B, L, d)
    if keep is not None:
        dx = dx * keep
    dE = np.zeros_like(E)
    real = weights > 0
    tok = tokens[real]  # scatter-add dx rows into E's rows:
    order = np.argsort(tok, kind="stable")  # sort by token, sum each run
    tok_sorted = tok[order]
    starts = np.flatnonzero(np.r_[True, tok_sorted[1:] != tok_sorted[:-1]])
    dE[tok_sorted[starts]] = np.add.reduceat(dx[real][order], starts, axis=0)
    dP = np.zeros_like(P)
    dP[: tokens.shape[1]] = dx.sum(axis=0)
    return [dE, dP, dW, dc]


def encode(params, sentences, *, max_len: int, batch_size: int = 256):
    """Embeddings (N, k) of a list of sentences, dropout off (evaluation)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        tokens, lengths = pad_batch(sentences[i : i + batch_size], max_len)
        out.append(forward(params, tokens, lengths)[0])
    return np.concatenate(out, axis=0) if out else np.zeros((0, params[2].shape[1]), params[2].dtype)
