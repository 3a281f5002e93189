r"""ESimCSE word repetition (Wu et al., 2021, §3.1): the positive-pair augmentation.

Spec: spec/esimcse.md. Unsup-SimCSE feeds the same sentence twice and lets
dropout make the two views differ, so a positive pair always has the same
length and the encoder can use length as a shortcut. ESimCSE instead repeats a
few random subwords of the sentence, which changes the length but hardly the
meaning. For a sentence of N tokens:

.. math::
    \text{dup\_len} \sim \mathcal U\{0, 1, \dots, \max(2, \lfloor r N\rfloor)\}
    \quad(\text{inclusive; } r = \text{dup\_rate} = 0.32)

then k = min(dup_len, N) distinct positions are drawn uniformly without
replacement (the first k of a uniform random permutation of 0..N−1) and each
chosen token is duplicated in place (written twice, adjacent). The result has
N + k tokens and the original order. The clamp to N only matters for N ≤ 1 (the
paper's code would fail there); N = 0 is returned unchanged.

Randomness comes only from the ``numpy.random.Generator`` (or integer seed)
passed in, so results are deterministic given a seed.
"""

from __future__ import annotations

import numpy as np

DUP_RATE = 0.32


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def max_dup_len(n_tokens: int, dup_rate: float = DUP_RATE) -> int:
    """The upper end (inclusive) of dup_len's uniform range: max(2, int(dup_rate·N))."""
    return max(2, int(dup_rate * n_tokens))


def repetition_positions(n_tokens: int, *, dup_rate: float = DUP_RATE, rng=None) -> np.ndarray:
    """The sorted positions (int64) whose tokens get duplicated in a sentence of N tokens."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if not (0.0 <= dup_rate):
        raise ValueError(f"dup_rate must be >= 0, got {dup_rate}")
    g = _rng(rng)
    dup_len = int(g.integers(0, max_dup_len(n_tokens, dup_rate), endpoint=True))
    k = min(dup_len, n_tokens)
    return np.sort(g.permutation(n_tokens)[:k]).astype(np.int64)  # a uniform k-subset


def apply_repetition(tokens, positions) -> np.ndarray:
    """Duplicate ``tokens[p]`` in place for every p in ``positions`` (distinct)."""
    tokens = np.asarray(tokens)
    counts = np.ones(len(tokens), dtype=np.int64)
    counts[np.asarray(positions, dtype=np.int64)] += 1
    return np.repeat(tokens, counts)


def word_repetition(tokens, *, dup_rate: float = DUP_RATE, rng=None) -> np.ndarray:
    """One sentence (1-D array of token ids) -> its word-repeated positive."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    return apply_repetition(tokens, repetition_positions(len(tokens), dup_rate=dup_rate, rng=rng))


def word_repetition_batch(sentences, *, dup_rate: float = DUP_RATE, rng=None) -> list[np.ndarray]:
    """Apply :func:`word_repetition` to each sentence in order with one generator."""
    g = _rng(rng)
    return [word_repetition(s, dup_rate=dup_rate, rng=g) for s in sentences]
