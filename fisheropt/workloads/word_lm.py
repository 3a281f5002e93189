r"""A tiny word-level language model with a weight-tied embedding, in NumPy,
with analytic gradients: the test bed of the Coupled Adam experiment.

The model predicts word t from the k words before it (a fixed-window neural LM,
Bengio et al. 2003) and reuses the input embedding E as the output layer:

.. math::
    x_n &= [e_{c_{n,1}}; \dots; e_{c_{n,k}}] \in \mathbb{R}^{kd}
        && \text{concatenated context embeddings}\\
    h_n &= \tanh(x_n W_1 + b_1) \in \mathbb{R}^{H}\\
    s_n &= h_n W_2 + b_2 \in \mathbb{R}^{d}
        && \text{predicted ``next-word embedding''}\\
    z_n &= E\, s_n + b_{\text{out}} \in \mathbb{R}^{V}
        && \text{tied output layer}\\
    L &= \frac1N \sum_n \big(\operatorname{logsumexp}(z_n) - z_{n,y_n}\big)
        && \text{MEAN cross-entropy over the N predicted tokens}

Unlike :mod:`fisheropt.workloads.models` (sum over samples), the loss here is the
mean per token, as in language modelling, so learning rates do not depend on the
batch size. ``params = [E (V,d), W1 (kd,H), b1 (H,), W2 (H,d), b2 (d,), b_out (V,)]``;
E is the only embedding (``coupled = [True, False, False, False, False, False]``
for :class:`fisheropt.CoupledAdam`).

The gradient of E has two parts. The output part,
:math:`\partial L/\partial e_i = \frac1N\sum_n (p_{n,i} - [y_n = i])\, s_n`,
is dense: every row moves every step, and a word that never occurs as a target
is pushed along :math:`-\sum_n p_{n,i} s_n`, a direction shared by all rare
words. That common drift, amplified for rare words by Adam's per-element second
moment, is the anisotropy mechanism the Coupled Adam paper describes. The input
part adds the back-propagated context gradient to the rows of the context words.

Also here: :func:`load_pydoc_corpus`, a word-level English corpus that ships
with CPython (``pydoc_data.topics``, the text of ``help()``), so the experiment
needs no download.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from numpy.typing import DTypeLike

from .models import FlatParams, float_dtype, log_softmax, positive_int

__all__ = ["WordLM", "load_pydoc_corpus", "make_windows", "tokenize"]

UNK = "<unk>"


class WordLM(FlatParams):
    """Fixed-window word LM with a tied embedding (see the module docstring).

    Initialisation (``numpy.random.default_rng(seed)``): E ~ N(0, 0.1²)
    (larger than GPT-2's 0.02 so that the tiny model trains in a few hundred
    steps), W1 ~ N(0, 1/(kd)), W2 ~ N(0, 1/H), biases 0."""

    def __init__(
        self,
        vocab_size: int,
        dim: int = 32,
        context: int = 3,
        hidden: int = 64,
        *,
        seed: int = 0,
        dtype: DTypeLike = np.float64,
        embed_std: float = 0.1,
    ) -> None:
        self.V, self.d, self.k, self.H = (
            positive_int(name, value)
            for name, value in (("vocab_size", vocab_size), ("dim", dim), ("context", context), ("hidden", hidden))
        )
        self.dtype = float_dtype(dtype)
        rng = np.random.default_rng(seed)
        V, d, k, H = self.V, self.d, self.k, self.H
        E = embed_std * rng.standard_normal((V, d))
        W1 = rng.standard_normal((k * d, H)) / np.sqrt(k * d)
        W2 = rng.standard_normal((H, d)) / np.sqrt(H)
        self.params = [a.astype(self.dtype) for a in (E, W1, np.zeros(H), W2, np.zeros(d), np.zeros(V))]
        self.param_names = ["E", "W1", "b1", "W2", "b2", "b_out"]
        self.coupled = [True, False, False, False, False, False]

    @property
    def embedding(self) -> np.ndarray:
        """The tied embedding E (V×d), the live array (do not write into it)."""
        return self.params[0]

    def _check(self, contexts, targets=None):
        context_ids = np.asarray(contexts)
        if context_ids.ndim != 2 or context_ids.shape[1] != self.k or context_ids.dtype.kind not in "iu":
            raise ValueError(
                f"contexts must be an int array of shape (N, {self.k}), got {context_ids.shape} {context_ids.dtype}"
            )
        if context_ids.size and (context_ids.min() < 0 or context_ids.max() >= self.V):
            raise ValueError("context ids out of range")
        if targets is None:
            return context_ids, None
        y = np.asarray(targets)
        if y.shape != (context_ids.shape[0],) or y.dtype.kind not in "iu":
            raise ValueError(f"targets must be an int array of shape ({context_ids.shape[0]},)")
        if y.size and (y.min() < 0 or y.max() >= self.V):
            raise ValueError("target ids out of range")
        if context_ids.shape[0] == 0:
            raise ValueError("need at least one (context, target) pair")
        return context_ids, y

    def _forward(self, context_ids):
        E, W1, b1, W2, b2, b_out = self.params
        x = E[context_ids].reshape(context_ids.shape[0], self.k * self.d)
        h = np.tanh(x @ W1 + b1)
        s = h @ W2 + b2
        z = s @ E.T + b_out
        return z, (x, h, s)

    def logits(self, contexts) -> np.ndarray:
        """z (N, V)."""
        context_ids, _ = self._check(contexts)
        return self._forward(context_ids)[0]

    def loss(self, contexts, targets, *, chunk=4096) -> float:
        """MEAN cross-entropy (nats per token), evaluated in chunks to bound memory."""
        context_ids, y = self._check(contexts, targets)
        assert y is not None  # targets were given
        total = 0.0
        for start in range(0, context_ids.shape[0], chunk):
            z = self._forward(context_ids[start : start + chunk])[0]
            log_probs = log_softmax(z)
            total += float(-log_probs[np.arange(z.shape[0]), y[start : start + chunk]].astype(np.float64).sum())
        return total / context_ids.shape[0]

    def loss_and_grads(self, contexts, targets):
        """(mean loss, [dL/dparam for param in params]), analytic backprop."""
        context_ids, y = self._check(contexts, targets)
        E, W1, b1, W2, b2, b_out = self.params
        N = context_ids.shape[0]
        z, (x, h, s) = self._forward(context_ids)
        log_probs = log_softmax(z)
        loss = float(-log_probs[np.arange(N), y].astype(np.float64).sum()) / N
        dz = np.exp(log_probs)
        dz[np.arange(N), y] -= 1
        dz /= N
        dE = dz.T @ s  # output (tied) part, dense
        db_out = dz.sum(axis=0)
        ds = dz @ E
        dW2 = h.T @ ds
        db2 = ds.sum(axis=0)
        da = (ds @ W2.T) * (1 - h * h)
        dW1 = x.T @ da
        db1 = da.sum(axis=0)
        dx = (da @ W1.T).reshape(N * self.k, self.d)
        np.add.at(dE, context_ids.reshape(-1), dx)  # input part, sparse rows
        grads = [dE, dW1, db1, dW2, db2, db_out]
        return loss, [g.astype(self.dtype, copy=False) for g in grads]


def tokenize(text: str) -> list[str]:
    """Lower-cased alphabetic words (``[a-z]+``); punctuation and digits are dropped."""
    return re.findall(r"[a-z]+", text.lower())


def make_windows(ids, context):
    """(contexts (N, k), targets (N,)) for every position t >= k of the id stream."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size <= context:
        raise ValueError(f"need a 1-D id stream longer than the context ({context})")
    n = ids.size - context
    idx = np.arange(n)[:, None] + np.arange(context)[None, :]
    return ids[idx], ids[context:].copy()


def load_pydoc_corpus(vocab_size: int = 2000, val_fraction: float = 0.1):
    """The English text of CPython's ``help()`` topics as word ids, offline.

    Topics are read in sorted-key order and concatenated; the last
    ``val_fraction`` of the token stream is the validation split. The vocabulary
    is the ``vocab_size - 1`` most frequent training words (ties broken
    alphabetically) plus ``<unk>`` at id 0. Returns
    ``(train_ids, val_ids, vocab, counts)`` where ``counts[i]`` is word i's
    frequency in the training split (a Zipf-like spread of rare and frequent
    words, which is what the anisotropy story is about)."""
    from pydoc_data.topics import topics

    words = tokenize("\n".join(topics[key] for key in sorted(topics)))
    n_val = int(round(val_fraction * len(words)))
    train_words, val_words = words[: len(words) - n_val], words[len(words) - n_val :]
    freq = Counter(train_words)
    ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
    vocab = [UNK] + [w for w, _ in ranked]
    index = {w: i for i, w in enumerate(vocab)}
    train_ids = np.array([index.get(w, 0) for w in train_words], dtype=np.int64)
    val_ids = np.array([index.get(w, 0) for w in val_words], dtype=np.int64)
    counts = np.bincount(train_ids, minlength=len(vocab))
    return train_ids, val_ids, vocab, counts
