import numpy as np
import pytest
from scipy import sparse

from dflashdeconv.core import genes


def _random_counts(n=300, g=80, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.lognormal(0, 1.2, g)[None, :] * rng.uniform(0.2, 2, (n, 1)))
    dense[5] = 0  # an empty spot
    return sparse.csr_matrix(dense.astype(np.float32))


def test_moments_match_dense_statistics():
    Y = _random_counts()
    m = genes.gene_moments(Y.indptr, Y.indices, Y.data, Y.shape[1])
    dense = Y.toarray().astype(np.float64)
    log = np.log1p(dense * 1e4 / np.maximum(dense.sum(1, keepdims=True), 1))
    np.testing.assert_allclose(m.mean, log.mean(0), atol=1e-8)
    np.testing.assert_allclose(m.var, log.var(0, ddof=1), atol=1e-7)
    np.testing.assert_allclose(m.raw_mean, dense.mean(0), rtol=1e-12)
    assert m.n_spots == 300 and m.n_empty == 1


@pytest.mark.parametrize("splits", [[1], [7, 150, 299], [100, 101, 102]])
def test_moments_do_not_depend_on_chunking(splits):
    Y = _random_counts()
    whole = genes.gene_moments(Y.indptr, Y.indices, Y.data, Y.shape[1])
    total = genes.GeneMoments.zeros(Y.shape[1])
    bounds = [0, *splits, Y.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        total = total + genes.gene_moments(Y.indptr[a:b + 1], Y.indices, Y.data, Y.shape[1])
    # integer sums: bit-identical statistics and therefore the same genes
    assert np.array_equal(total.log_sum, whole.log_sum)
    assert np.array_equal(total.log_sumsq, whole.log_sumsq)
    assert total.n_spots == whole.n_spots
    assert np.array_equal(genes.select_hvg(total, 20), genes.select_hvg(whole, 20))


def _moments_with(mean, var, n=1000):
    """GeneMoments whose per-gene mean and (ddof=1) variance are the given values."""
    scale = float(2**26)
    sumsq = (var * (n - 1) / n + mean**2) * n
    return genes.GeneMoments(np.rint(mean * n * scale).astype(np.int64),
                             np.rint(sumsq * scale).astype(np.int64), mean * n, n, 0)


def test_hvg_ranks_variance_within_mean_bins_and_applies_filters():
    g = 200
    mean = np.linspace(0.02, 2.9, g)
    var = 1.0 + 0.01 * np.sin(np.arange(g))  # near-constant dispersion
    loud = np.array([10, 55, 120, 170])  # over-dispersed genes in different mean bins
    var[loud] = 3.0
    too_high = 199
    mean[too_high], var[too_high] = 4.0, 3.0  # over-dispersed but mean above max_mean
    m = _moments_with(mean, var)
    np.testing.assert_allclose(m.var, var, rtol=1e-6)
    chosen = genes.select_hvg(m, n_top=4)
    assert chosen.tolist() == loud.tolist()
    assert genes.select_hvg(m, n_top=0).size == 0
    # fewer genes pass the filters than asked: the top n by z without the filters
    fallback = genes.select_hvg(m, n_top=5, min_disp=2.0)
    assert fallback.tolist() == sorted([*loud, too_high])


def test_markers_pick_specific_genes_with_stable_ties():
    K, G = 3, 12
    X = np.ones((K, G))
    X[0, 2] = X[1, 5] = X[2, 9] = 10.0  # one clear marker per type
    X[0, 3] = X[0, 4] = 4.0  # tied second markers of type 0: lower index first
    assert genes.select_markers(X, 1).tolist() == [2, 5, 9]
    # after scaling rows to sum 1, flat genes are highest in types 1 and 2 (smaller totals)
    # and belong to type 1, the first maximum, with specificity 0; its tie goes to gene 0
    assert genes.select_markers(X, 2).tolist() == [0, 2, 3, 5, 9]


def test_markers_fall_back_to_expression_when_a_type_owns_no_gene():
    X = np.array([[5.0, 1.0, 1.0, 1.0], [1.0, 5.0, 1.0, 1.0], [1.0, 1.0, 4.0, 4.0],
                  [0.9, 0.9, 3.9, 3.9]])
    # type 3 is never the highest: its markers are its most expressed genes (2, 3)
    markers = genes.select_markers(X, 2)
    assert {2, 3} <= set(markers)


def test_leverage_scores_sum_to_one_and_ignore_shared_genes():
    rng = np.random.default_rng(2)
    X = rng.gamma(2.0, 1.0, (5, 40))
    X[:, 7] = 3.0  # identical in all types: defines no direction between them
    score = genes.leverage_scores(X)
    assert score.sum() == pytest.approx(1.0, abs=1e-6)
    assert score[7] < 1e-12
    np.testing.assert_allclose(genes.leverage_scores(X + 2.0), score, atol=1e-12)


def test_select_genes_is_union_and_raises_when_empty():
    Y = _random_counts()
    m = genes.gene_moments(Y.indptr, Y.indices, Y.data, Y.shape[1])
    X = np.random.default_rng(3).gamma(2.0, 1.0, (4, Y.shape[1]))
    union = genes.select_genes(m, X, 10, 3)
    assert set(union) == set(genes.select_hvg(m, 10)) | set(genes.select_markers(X, 3))
    with pytest.raises(ValueError, match="no genes selected"):
        genes.select_genes(m, X, 0, 0)
