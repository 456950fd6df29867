import numpy as np
import pytest
from numba import njit
from scipy import sparse

from dflashdeconv.core.genes import gene_moments
from dflashdeconv.core.preprocess import preprocess_reference, spot_gene_scale
from dflashdeconv.core.project import SpotTransform, project, selected_gene_sums
from dflashdeconv.core.resample import poisson, spot_stream
from dflashdeconv.core.weights import build_representation


def _problem(seed=0, n=120, g=90, k=5):
    rng = np.random.default_rng(seed)
    Y = rng.poisson(rng.lognormal(0, 1, g)[None, :] * rng.uniform(0.3, 3, (n, 1)))
    Y[3] = 0
    X = rng.gamma(2.0, 1.0, (k, g))
    genes = np.sort(rng.choice(g, 40, replace=False))
    return sparse.csr_matrix(Y.astype(np.float32)), X, genes


def _transform(Y, X, genes, method, weighting):
    moments = gene_moments(Y.indptr, Y.indices, Y.data, Y.shape[1])
    X_tilde = preprocess_reference(X[:, genes], method)
    leverage = np.random.default_rng(1).dirichlet(np.ones(genes.size))
    rep = build_representation(X_tilde, leverage, weighting, 16, random_state=2)
    scale = spot_gene_scale(method, moments.raw_mean[genes], genes.size)
    return SpotTransform.build(Y.shape[1], genes, method, scale, rep)


def _explicit_y_tilde(Y, genes, method):
    sub = Y.toarray().astype(np.float64)[:, genes]
    if method == "log_cpm":
        total = sub.sum(axis=1, keepdims=True)
        return np.log1p(sub * 1e4 / np.where(total > 0, total, 1))
    if method == "pearson":
        mu = Y.toarray().astype(np.float64).mean(axis=0)[genes] + 1e-6
        return sub / np.sqrt(mu + mu**2 / 100)
    return sub


@pytest.mark.parametrize("method", ["log_cpm", "pearson", "raw"])
@pytest.mark.parametrize("weighting", ["expected", "countsketch"])
def test_projection_equals_explicit_linear_algebra(method, weighting):
    Y, X, genes = _problem()
    t = _transform(Y, X, genes, method, weighting)
    S = np.zeros((genes.size, t.rep.dim))
    S[np.arange(genes.size), t.rep.column] = t.rep.coef
    Y_repr = _explicit_y_tilde(Y, genes, method) @ S
    H, ysq, totals = project(Y.indptr, Y.indices, Y.data, t)
    np.testing.assert_allclose(H, Y_repr @ t.rep.X_repr.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ysq, (Y_repr**2).sum(axis=1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(totals, Y.toarray()[:, genes].sum(axis=1))
    assert totals[3] == 0 and np.all(H[3] == 0)


def test_projection_is_chunk_invariant_and_input_untouched():
    Y, X, genes = _problem(3)
    before = (Y.data.copy(), Y.indices.copy(), Y.indptr.copy())
    t = _transform(Y, X, genes, "log_cpm", "countsketch")
    whole = project(Y.indptr, Y.indices, Y.data, t)
    parts = [project(Y.indptr[a:b + 1], Y.indices, Y.data, t, row_offset=a)
             for a, b in [(0, 17), (17, 64), (64, 120)]]
    for i in range(3):
        assert np.array_equal(whole[i], np.concatenate([p[i] for p in parts]))
    for a, b in zip(before, (Y.data, Y.indices, Y.indptr)):
        assert np.array_equal(a, b)


def test_resampled_projection_is_keyed_by_spot_not_by_chunk():
    Y, X, genes = _problem(4)
    t = _transform(Y, X, genes, "log_cpm", "expected")
    whole = project(Y.indptr, Y.indices, Y.data, t, seed=11, replicate=2)
    part = project(Y.indptr[50:91], Y.indices, Y.data, t, seed=11, replicate=2, row_offset=50)
    assert np.array_equal(whole[0][50:90], part[0])
    other = project(Y.indptr, Y.indices, Y.data, t, seed=11, replicate=3)
    assert not np.array_equal(whole[0], other[0])
    sums = selected_gene_sums(Y.indptr, Y.indices, Y.data, t.gene_pos, genes.size, seed=11,
                              replicate=2)
    assert sums.sum() == pytest.approx(whole[2].sum())


@njit
def _draws(lam, n):
    out = np.empty(n)
    state = spot_stream(5, 0, 0)
    for i in range(n):
        state, out[i] = poisson(lam, state)
    return out


@pytest.mark.parametrize("lam", [0.3, 4.0, 25.0, 900.0])
def test_poisson_sampler_mean_and_variance(lam):
    draws = _draws(lam, 40000)
    assert np.all(draws == np.round(draws)) and draws.min() >= 0
    se = np.sqrt(lam / draws.size)
    assert abs(draws.mean() - lam) < 5 * se
    assert abs(draws.var() / lam - 1) < 0.05
