import numpy as np
import pytest
from scipy.sparse.linalg import eigsh

from dflashdeconv.core.graph import knn_graph, laplacian, radius_graph, spatial_graph


def _brute_knn(coords, k):
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    ids = np.arange(len(coords))
    return np.array([np.lexsort((ids, row))[:k] for row in d])


def _edges(A):
    coo = A.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


@pytest.mark.parametrize("dim", [2, 3])
def test_knn_graph_matches_brute_force_with_index_tie_breaks(dim):
    rng = np.random.default_rng(dim)
    grid = np.stack(np.meshgrid(*[np.arange(6)] * dim, indexing="ij"), -1).reshape(-1, dim)
    coords = np.vstack([grid, rng.uniform(0, 5, (40, dim))]).astype(float)  # many ties
    k = 6
    A = knn_graph(coords, k)
    nn = _brute_knn(coords, k)
    expected = {(i, int(j)) for i in range(len(coords)) for j in nn[i]}
    expected |= {(j, i) for i, j in expected}
    assert _edges(A) == expected
    assert np.all(A.data == 1.0) and A.diagonal().sum() == 0
    assert (A != A.T).nnz == 0
    assert np.asarray(A.sum(axis=1)).min() >= k


def test_knn_graph_is_a_function_of_coordinates():
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(12), np.arange(9)), -1).reshape(-1, 2).astype(float)
    perm = rng.permutation(len(coords))
    A = knn_graph(coords, 6)
    B = knn_graph(coords[perm], 6)
    # relabel B back to the original order: edges differ only through tie-breaking by index
    back = {(int(perm[i]), int(perm[j])) for i, j in _edges(B)}
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    differing = back ^ _edges(A)
    kth = np.sort(d + np.diag(np.full(len(coords), np.inf)), axis=1)[:, 5]
    assert all(np.isclose(d[i, j], kth[i]) or np.isclose(d[i, j], kth[j]) for i, j in differing)


def test_radius_and_grid_graphs():
    coords = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2).astype(float)
    A = radius_graph(coords, 1.0)
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    expected = {(i, j) for i in range(20) for j in range(20) if i != j and d[i, j] <= 1.0}
    assert _edges(A) == expected
    G = spatial_graph(coords, "grid")  # 1.5 x spacing: 8-neighbourhood
    expected = {(i, j) for i in range(20) for j in range(20) if i != j and d[i, j] <= 1.5}
    assert _edges(G) == expected
    with pytest.raises(ValueError, match="radius"):
        spatial_graph(coords, "radius")
    assert knn_graph(coords[:1], 6).nnz == 0


def test_laplacian_properties():
    rng = np.random.default_rng(1)
    A = knn_graph(rng.uniform(0, 10, (200, 2)), 6)
    L = laplacian(A)
    assert np.allclose(np.asarray(L.sum(axis=1)).ravel(), 0)
    assert (L != L.T).nnz == 0
    assert np.allclose(L.diagonal(), np.asarray(A.sum(axis=1)).ravel())
    smallest = eigsh(L.astype(float), k=3, which="SA", return_eigenvectors=False)
    assert smallest.min() > -1e-8
    x = rng.normal(size=200)
    coo = A.tocoo()
    assert x @ L @ x == pytest.approx(0.5 * np.sum((x[coo.row] - x[coo.col]) ** 2))
