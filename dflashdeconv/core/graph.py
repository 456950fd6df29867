"""Spatial graphs: k nearest neighbours, radius and grid adjacency (2-D or 3-D).

Graphs are binary, symmetric CSR matrices without self loops. The k-NN graph breaks ties
at the k-th distance by spot index, so it is a function of the coordinates alone (on
regular grids many spots share the k-th distance) and can be rebuilt block by block.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from . import threads
from .params import GRAPH_METHODS


def knn_indices(tree: cKDTree, points: np.ndarray, point_ids: np.ndarray, k: int,
                candidate_ids: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` nearest other points of each query point, ranked by (distance, id).

    ``tree`` indexes the candidate points whose ids are ``candidate_ids`` (tree order by
    default); ``point_ids`` are the ids of the query ``points`` (to exclude themselves).
    Queries are repeated with more candidates until every point tied with the k-th
    distance has been seen. Returns (n_points, k) positions of the neighbours in the tree.
    """
    n_candidates = tree.n
    ids = np.arange(n_candidates) if candidate_ids is None else np.asarray(candidate_ids)
    out = np.empty((len(points), k), np.int64)
    todo = np.arange(len(points))
    m = min(k + 2, n_candidates)
    while todo.size:
        dist, idx = tree.query(points[todo], k=m, workers=threads.current())
        dist = dist.reshape(todo.size, m)
        position = np.minimum(idx.reshape(todo.size, m), n_candidates - 1)
        cand = ids[position]
        dist = np.where(cand == point_ids[todo, None], np.inf, dist)
        order = np.lexsort((cand, dist), axis=-1)
        dist = np.take_along_axis(dist, order, axis=1)
        position = np.take_along_axis(position, order, axis=1)
        # complete when every candidate tied with the k-th one was retrieved: the farthest
        # non-self retrieved candidate is strictly farther, or all candidates were seen
        done = (m == n_candidates) | (dist[:, m - 2] > dist[:, k - 1])
        out[todo[done]] = position[done, :k]
        todo = todo[~done]
        m = min(2 * m, n_candidates)
    return out


def symmetric_adjacency(rows: np.ndarray, cols: np.ndarray, n: int) -> sparse.csr_matrix:
    """Binary symmetric CSR adjacency with sorted indices from directed edges."""
    both_rows = np.concatenate([rows, cols])
    both_cols = np.concatenate([cols, rows])
    A = sparse.csr_matrix(
        (np.ones(both_rows.size), (both_rows, both_cols)), shape=(n, n)
    )
    A.data[:] = 1.0
    A.sort_indices()
    return A


def knn_graph(coords: np.ndarray, k: int = 6, tie_key: np.ndarray | None = None) -> sparse.csr_matrix:
    """Symmetrised k-NN graph (each spot keeps its k nearest others; degree >= k).

    Ties at the k-th distance go to the lower ``tie_key`` (default: the row index; the
    engine passes the row a spot had in its source, so sorting rows changes nothing).
    """
    n = coords.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return sparse.csr_matrix((n, n))
    key = np.arange(n) if tie_key is None else np.asarray(tie_key, np.int64)
    neighbours = knn_indices(cKDTree(coords), coords, key, k, candidate_ids=key)
    return symmetric_adjacency(np.repeat(np.arange(n), k), neighbours.ravel(), n)


def radius_graph(coords: np.ndarray, radius: float) -> sparse.csr_matrix:
    """All pairs of spots at distance <= ``radius``."""
    n = coords.shape[0]
    pairs = cKDTree(coords).query_pairs(r=radius, output_type="ndarray")
    if pairs.size == 0:
        return sparse.csr_matrix((n, n))
    return symmetric_adjacency(pairs[:, 0], pairs[:, 1], n)


def grid_spacing(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot."""
    dist, _ = cKDTree(coords).query(coords, k=2, workers=threads.current())
    return float(np.median(dist[:, 1]))


def spatial_graph(coords: np.ndarray, method: str = "knn", k: int = 6,
                  radius: float | None = None, tie_key: np.ndarray | None = None) -> sparse.csr_matrix:
    """Adjacency of ``method`` (``knn``, ``radius`` or ``grid`` = 1.5 x grid spacing)."""
    coords = np.asarray(coords, dtype=np.float64)
    if method == "knn":
        return knn_graph(coords, k, tie_key)
    if method == "radius":
        if radius is None:
            raise ValueError("spatial_method='radius' needs a radius")
        return radius_graph(coords, radius)
    if method == "grid":
        if coords.shape[0] < 2:
            return sparse.csr_matrix((coords.shape[0],) * 2)
        return radius_graph(coords, 1.5 * grid_spacing(coords))
    raise ValueError(f"spatial_method must be one of {GRAPH_METHODS}, got {method!r}")


def laplacian(A: sparse.spmatrix) -> sparse.csr_matrix:
    """Combinatorial Laplacian ``L = D - A``."""
    degree = np.asarray(A.sum(axis=1)).ravel()
    return (sparse.diags(degree) - A).tocsr()
