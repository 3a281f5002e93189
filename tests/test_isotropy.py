"""refimpl.isotropy: the embedding measures of the Coupled Adam paper, checked by hand."""

import math

import numpy as np
import pytest

from fisheropt.refimpl.isotropy import condition_number, embedding_report, isotropy, log_partition, mean_embedding_norm


def _naive_isotropy(E):
    """The definition, written out literally with both eigenvector signs."""
    _, U = np.linalg.eigh(E.T @ E)
    z = [np.sum(np.exp(E @ (s * u))) for u in U.T for s in (1.0, -1.0)]
    return min(z) / max(z)


def test_matches_literal_definition():
    E = np.random.default_rng(0).standard_normal((50, 5))
    assert isotropy(E) == pytest.approx(_naive_isotropy(E), rel=1e-10)


def test_symmetric_point_set_is_perfectly_isotropic():
    # Rows ±e_k (scaled): E^T E ∝ I, Z(u) is the same for every eigenvector.
    E = 0.7 * np.concatenate([np.eye(4), -np.eye(4)])
    assert isotropy(E) == pytest.approx(1.0)


def test_mean_shift_destroys_isotropy_and_is_sign_invariant():
    E = np.random.default_rng(1).standard_normal((400, 8))
    shifted = E + 2.0
    assert isotropy(shifted) < 1e-3 < isotropy(E)
    assert isotropy(-shifted) == pytest.approx(isotropy(shifted), rel=1e-9)
    # Invariant to rotations of the embedding space.
    Q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((8, 8)))
    assert isotropy(E @ Q) == pytest.approx(isotropy(E), rel=1e-8)


def test_log_space_does_not_overflow():
    E = 500.0 * np.random.default_rng(3).standard_normal((100, 4))
    value = isotropy(E)
    assert 0.0 <= value <= 1.0 and math.isfinite(value)
    U = np.eye(4)
    assert np.all(np.isfinite(log_partition(E, U)))


def test_mean_embedding_norm():
    E = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    mu, ratio = mean_embedding_norm(E)
    mean_vec = np.array([1.0, 2.0 / 3.0])
    assert mu == pytest.approx(np.linalg.norm(mean_vec))
    assert ratio == pytest.approx(np.linalg.norm(mean_vec) / ((1 + 1 + math.sqrt(5)) / 3))
    same = np.tile([3.0, 4.0], (5, 1))
    assert mean_embedding_norm(same) == pytest.approx((5.0, 1.0))


def test_condition_number():
    assert condition_number(np.diag([4.0, 2.0, 0.5])) == pytest.approx(8.0)
    assert condition_number(np.array([[1.0, 1.0], [1.0, 1.0]])) == math.inf
    E = np.random.default_rng(4).standard_normal((30, 6))
    assert condition_number(E) == pytest.approx(np.linalg.cond(E))


def test_report_and_validation():
    rep = embedding_report(np.random.default_rng(5).standard_normal((20, 3)))
    assert set(rep) == {"isotropy", "mu_norm", "mu_ratio", "condition_number"}
    with pytest.raises(ValueError):
        isotropy(np.zeros(3))
    with pytest.raises(ValueError):
        isotropy(np.array([[np.nan, 1.0]]))
