import numpy as np
import pytest

from dflashdeconv.core.weights import (
    build_representation,
    countsketch_hash,
    expected_weights,
    leverage_amplitudes,
)


def test_expected_weights_match_monte_carlo_hashing():
    rng = np.random.default_rng(0)
    leverage = rng.dirichlet(np.full(60, 0.4))
    d = 8
    a = leverage_amplitudes(leverage)
    trials = 20000
    bucket = rng.integers(0, d, (trials, a.size))
    load = np.zeros((trials, d))
    for t in range(trials):
        np.add.at(load[t], bucket[t], a**2)
    simulated = (a[None, :] / np.sqrt(np.take_along_axis(load, bucket, axis=1))).mean(axis=0)
    np.testing.assert_allclose(expected_weights(leverage, d), simulated, rtol=0.01)


def test_expected_weights_single_bucket_is_exact():
    leverage = np.array([0.1, 0.2, 0.7])
    a = leverage_amplitudes(leverage)
    np.testing.assert_allclose(expected_weights(leverage, 1), a / np.sqrt(np.sum(a**2)))


def test_countsketch_representation_equals_explicit_sketch_matrix():
    rng = np.random.default_rng(1)
    G, d = 50, 7
    leverage = rng.dirichlet(np.ones(G))
    X_tilde = rng.gamma(2.0, 1.0, (4, G))
    rep = build_representation(X_tilde, leverage, "countsketch", d, random_state=3)
    bucket, sign = countsketch_hash(G, d, 3)
    S = np.zeros((G, d))
    S[np.arange(G), bucket] = sign * leverage_amplitudes(leverage)
    norms = np.linalg.norm(S, axis=0)
    S = S * np.sqrt(G / d) / np.where(norms > 0, norms, 1)
    np.testing.assert_allclose(rep.X_repr, X_tilde @ S, atol=1e-12)
    np.testing.assert_allclose(rep.gram, (X_tilde @ S) @ (X_tilde @ S).T, atol=1e-9)
    np.testing.assert_allclose(rep.loadings, S @ (X_tilde @ S).T, atol=1e-9)
    assert not rep.unique_columns


def test_countsketch_hash_is_seeded():
    a = countsketch_hash(100, 16, 5)
    b = countsketch_hash(100, 16, 5)
    c = countsketch_hash(100, 16, 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_expected_representation_scales_columns():
    rng = np.random.default_rng(2)
    X_tilde = rng.gamma(2.0, 1.0, (3, 20))
    leverage = rng.dirichlet(np.ones(20))
    rep = build_representation(X_tilde, leverage, "expected", 512)
    np.testing.assert_allclose(rep.X_repr, X_tilde * expected_weights(leverage, 512))
    assert rep.unique_columns
    with pytest.raises(ValueError, match="gene_weighting"):
        build_representation(X_tilde, leverage, "bogus")
