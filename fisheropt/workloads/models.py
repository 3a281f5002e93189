r"""A small NumPy model zoo: the workload of the Fisher estimators, the demo and the experiments.

Two classifiers with softmax cross-entropy and analytic derivatives (no autodiff):

* :class:`SoftmaxRegression` — :math:`z = XW + b`;
* :class:`MLP` — :math:`z = \tanh(XW_1 + b_1)W_2 + b_2` (one hidden layer).

Conventions (the inputs that spec/fisher.md takes):

* ``params`` is a list of arrays (``[W, b]`` or ``[W1, b1, W2, b2]``) that the
  optimizers update **in place**; the model reads them on every call, so never
  rebind them (``model.params[0] = ...``); write into them (``[...] =``) or use
  :meth:`FlatParams.set_flat`;
* the flat parameter vector :math:`\theta\in\mathbb{R}^P` concatenates the
  params in list order, each flattened in C order (``W`` is (in, out), so
  ``W[i, j]`` is entry ``i*out + j`` of its block);
* :meth:`MLP.loss` (and the other models' ``loss``) is the **sum** over samples of the cross-entropy,
  :math:`L = \sum_n l_n`, with :math:`l_n = \operatorname{logsumexp}(z_n) - z_{n,y_n}`;
  the mean loss is ``loss / N`` and the mean gradient is ``grads / N``;
* :meth:`MLP.per_sample_grads` returns :math:`G\in\mathbb{R}^{N\times P}` with row
  :math:`n` equal to :math:`\nabla_\theta l_n = J_n^\top (p_n - e_{y_n})`;
* :meth:`MLP.logit_jacobians` returns :math:`J\in\mathbb{R}^{N\times C\times P}`,
  :math:`J_{n,c,:} = \partial z_{n,c}/\partial\theta`.

Everything is computed in the model's dtype (float32 or float64).

Shared by every model of :mod:`fisheropt.workloads`: :func:`log_softmax`,
:func:`softmax`, the argument checks :func:`float_dtype` and :func:`positive_int`,
and the flat-parameter views of :class:`FlatParams`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "MLP",
    "FlatParams",
    "SoftmaxRegression",
    "float_dtype",
    "load_digits_split",
    "log_softmax",
    "positive_int",
    "softmax",
]


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, stable (max subtracted)."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable (max subtracted)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def float_dtype(dtype: DTypeLike) -> np.dtype:
    """``dtype`` as a NumPy dtype; TypeError unless it is float32 or float64."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def positive_int(name: str, value) -> int:
    """``value`` as an int; ValueError (naming ``name``) unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class FlatParams:
    """Flat views of ``self.params`` (a list of arrays): θ of length P is the params
    concatenated in list order, each flattened in C order."""

    params: list

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params))

    def get_flat(self) -> np.ndarray:
        """A copy of theta, shape (P,)."""
        return self.flatten(self.params)

    def set_flat(self, theta) -> None:
        """Write theta (P,) into the params in place (the arrays keep their identity)."""
        theta = np.asarray(theta)
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta must have shape ({self.n_params},), got {theta.shape}")
        if not np.all(np.isfinite(theta)):
            raise ValueError("theta contains NaN or Inf")
        for p, block in zip(self.params, self._blocks(theta)):
            p[...] = block

    def flatten(self, arrays) -> np.ndarray:
        """Concatenate a list aligned with params (e.g. grads) into a (P,) vector."""
        return np.concatenate([np.asarray(a).ravel() for a in arrays])

    def unflatten(self, vector) -> list:
        """Split a (P,) vector into new arrays shaped like params."""
        vector = np.asarray(vector)
        if vector.shape != (self.n_params,):
            raise ValueError(f"vector must have shape ({self.n_params},), got {vector.shape}")
        return [block.copy() for block in self._blocks(vector)]

    def _blocks(self, vector):
        """Views of ``vector`` (P,) shaped like each param, in params order."""
        offset = 0
        for p in self.params:
            yield vector[offset : offset + p.size].reshape(p.shape)
            offset += p.size


class _Classifier(FlatParams):
    """Shared machinery: input validation, softmax cross-entropy, gradients from dL/dz."""

    params: list
    n_features: int
    n_classes: int
    dtype: np.dtype

    # --- provided by subclasses ---
    def _forward(self, X):
        """(logits (N, C), cache for the backward pass)."""
        raise NotImplementedError

    def _backward(self, X, cache, dlogits, /):
        """Per-sample gradients (N, P) from dlogits = dl_n/dz_n (N, C)."""
        raise NotImplementedError

    def _batch_grads(self, X, cache, dlogits, /):
        """[dL/dparam for param in params] with L = sum_n l_n, from dlogits (N, C)."""
        raise NotImplementedError

    def _check_X(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (N, {self.n_features}), got {X.shape}")
        if X.dtype.kind not in "fiub":
            raise TypeError(f"X must be numeric, got dtype {X.dtype}")
        X = X.astype(self.dtype, copy=False)
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN or Inf")
        return X

    def _check_y(self, y, n) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},), got {y.shape}")
        if y.dtype.kind not in "iu":
            if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= self.n_classes):
            raise ValueError(f"labels must lie in 0..{self.n_classes - 1}, got range {y.min()}..{y.max()}")
        return y.astype(np.intp, copy=False)

    # --- public API ---
    def logits(self, X) -> np.ndarray:
        """z = f(X; theta), shape (N, C)."""
        return self._forward(self._check_X(X))[0]

    def probs(self, X) -> np.ndarray:
        """softmax(z), shape (N, C), computed stably."""
        return softmax(self.logits(X))

    def loss(self, X, y) -> float:
        """SUM over samples of the cross-entropy (mean = loss / N)."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        return _summed_cross_entropy(self._forward(X)[0], y)

    def loss_and_grads(self, X, y):
        """(sum loss, [dL/dparam for param in params]) with L = sum_n l_n."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        z, cache = self._forward(X)
        return _summed_cross_entropy(z, y), self._batch_grads(X, cache, _cross_entropy_dlogits(z, y))

    def per_sample_grads(self, X, y) -> np.ndarray:
        """G (N, P): row n = grad of l_n, flattened in params order (C order each)."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        z, cache = self._forward(X)
        return self._backward(X, cache, _cross_entropy_dlogits(z, y))

    def logit_jacobians(self, X) -> np.ndarray:
        """J (N, C, P): J[n, c] = d z_{n,c} / d theta (flat, params order)."""
        X = self._check_X(X)
        z, cache = self._forward(X)
        N, C = z.shape
        # Back-propagate each unit vector e_c in place of dl/dz: row c of J_n.
        J = np.empty((N, C, self.n_params), dtype=self.dtype)
        for c in range(C):
            unit = np.zeros((N, C), dtype=self.dtype)
            unit[:, c] = 1
            J[:, c, :] = self._backward(X, cache, unit)
        return J

    def accuracy(self, X, y) -> float:
        """Fraction of samples whose argmax logit equals the label."""
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        if X.shape[0] == 0:
            return float("nan")
        return float(np.mean(np.argmax(self._forward(X)[0], axis=1) == y))


def _summed_cross_entropy(z, y) -> float:
    """sum_n (logsumexp(z_n) - z_{n,y_n}), accumulated in float64."""
    return float(-log_softmax(z)[np.arange(z.shape[0]), y].astype(np.float64).sum())


def _cross_entropy_dlogits(z, y) -> np.ndarray:
    """dl_n/dz_n = p_n - e_{y_n}, shape (N, C)."""
    dlogits = softmax(z)
    dlogits[np.arange(z.shape[0]), y] -= 1
    return dlogits


class SoftmaxRegression(_Classifier):
    r"""Multinomial logistic regression: :math:`z = XW + b`.

    ``params = [W (n_features, n_classes), b (n_classes,)]``; W is drawn from
    :math:`\mathcal N(0, 0.01^2)` with ``numpy.random.default_rng(seed)``, b = 0.
    """

    def __init__(self, n_features: int, n_classes: int, *, seed: int = 0, dtype: DTypeLike = np.float64) -> None:
        self.n_features = positive_int("n_features", n_features)
        self.n_classes = positive_int("n_classes", n_classes)
        self.dtype = float_dtype(dtype)
        rng = np.random.default_rng(seed)
        W = (0.01 * rng.standard_normal((self.n_features, self.n_classes))).astype(self.dtype)
        b = np.zeros(self.n_classes, dtype=self.dtype)
        self.params = [W, b]

    def _forward(self, X):
        W, b = self.params
        return X @ W + b, None

    def _backward(self, X, cache, dlogits, /):
        N = X.shape[0]
        dW = (X[:, :, None] * dlogits[:, None, :]).reshape(N, -1)
        return np.concatenate([dW, dlogits], axis=1).astype(self.dtype, copy=False)

    def _batch_grads(self, X, cache, dlogits, /):
        return [X.T @ dlogits, dlogits.sum(axis=0)]


class MLP(_Classifier):
    r"""One-hidden-layer tanh network: :math:`z = \tanh(XW_1 + b_1)W_2 + b_2`.

    ``params = [W1 (n_features, n_hidden), b1 (n_hidden,), W2 (n_hidden, n_classes),
    b2 (n_classes,)]``; weights are Glorot-normal,
    :math:`W \sim \mathcal N(0, 2/(\text{fan\_in}+\text{fan\_out}))`, biases 0,
    drawn with ``numpy.random.default_rng(seed)``.
    """

    def __init__(
        self, n_features: int, n_hidden: int, n_classes: int, *, seed: int = 0, dtype: DTypeLike = np.float64
    ) -> None:
        self.n_features = positive_int("n_features", n_features)
        self.n_hidden = positive_int("n_hidden", n_hidden)
        self.n_classes = positive_int("n_classes", n_classes)
        self.dtype = float_dtype(dtype)
        rng = np.random.default_rng(seed)
        F, H, C = self.n_features, self.n_hidden, self.n_classes
        W1 = (np.sqrt(2.0 / (F + H)) * rng.standard_normal((F, H))).astype(self.dtype)
        W2 = (np.sqrt(2.0 / (H + C)) * rng.standard_normal((H, C))).astype(self.dtype)
        self.params = [W1, np.zeros(H, dtype=self.dtype), W2, np.zeros(C, dtype=self.dtype)]

    def _forward(self, X):
        W1, b1, W2, b2 = self.params
        hidden = np.tanh(X @ W1 + b1)
        return hidden @ W2 + b2, hidden

    def _dpreactivation(self, hidden, dlogits):
        """dl/d(X W1 + b1), (N, H): back through W2 and tanh."""
        return (dlogits @ self.params[2].T) * (1 - hidden * hidden)

    def _backward(self, X, hidden, dlogits, /):
        N = X.shape[0]
        dpre = self._dpreactivation(hidden, dlogits)
        dW1 = (X[:, :, None] * dpre[:, None, :]).reshape(N, -1)
        dW2 = (hidden[:, :, None] * dlogits[:, None, :]).reshape(N, -1)
        return np.concatenate([dW1, dpre, dW2, dlogits], axis=1).astype(self.dtype, copy=False)

    def _batch_grads(self, X, hidden, dlogits, /):
        dpre = self._dpreactivation(hidden, dlogits)
        return [X.T @ dpre, dpre.sum(axis=0), hidden.T @ dlogits, dlogits.sum(axis=0)]


def load_digits_split(seed: int = 0, test_fraction: float = 0.25, dtype: DTypeLike = np.float64):
    """scikit-learn's bundled 8x8 digits (1797 samples, 64 features, 10 classes).

    Returns ``(X_train, y_train, X_test, y_test)``: a seeded random split
    (``test_fraction`` of the samples in the test set), features standardised
    with the training mean and standard deviation (constant pixels keep std 1),
    X in ``dtype``, y as int64. Needs scikit-learn (``pip install fisheropt[demo]``);
    the data ship with it, so no network access is needed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_split needs scikit-learn, which is not installed; "
            "install it with `pip install scikit-learn` or `pip install fisheropt[demo]`"
        ) from exc
    dtype = float_dtype(dtype)
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    features, labels = load_digits(return_X_y=True)
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(X.shape[0])
    n_test = round(test_fraction * X.shape[0])
    test, train = order[:n_test], order[n_test:]
    mean = X[train].mean(axis=0)
    std = X[train].std(axis=0)
    std[std == 0] = 1.0
    Xs = (X - mean) / std
    return (Xs[train].astype(dtype), y[train].copy(), Xs[test].astype(dtype), y[test].copy())
