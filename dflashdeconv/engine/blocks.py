"""The spatial graph built block by block with halo exchange.

Blocks are the store's row chunks (compact patches, rows in Hilbert order). For a block:

1. its own spots give each spot an upper bound on its k-th neighbour distance;
2. a halo of spots from other blocks within radius ``r`` of the block's bounding box is
   fetched (only the blocks whose boxes are that close are touched) and the k-NN query
   runs over block + halo. A spot whose k-th distance ``d`` is at most ``r`` is exact:
   every spot within ``d`` of it lies within ``r`` of the box. Where some spot's ``d``
   exceeds ``r`` the halo is grown to that distance and the query repeated;
3. directed k-NN edges are exchanged between blocks and symmetrised, so each block ends
   with the complete rows of the global graph for its spots (ties broken by the spot's
   source row, as in :func:`dflashdeconv.core.graph.knn_graph`).

The union of the blocks' rows is exactly the global graph of the core (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

from ..core.graph import knn_indices
from ..core.threads import current as current_threads
from .cluster import worker_task
from .progress import track
from .store import SpotStore


@dataclass
class BlockPoints:
    """Coordinates of one block's spots, their source rows (tie keys) and first row."""

    coords: np.ndarray
    keys: np.ndarray
    row_start: int

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.row_start, self.row_start + len(self.coords))

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        return self.coords.min(axis=0), self.coords.max(axis=0)


@dataclass
class BlockGraph:
    """The complete adjacency rows of one block: CSR over global column ids, each row's
    columns in ascending order (the summation order of the global solver)."""

    row_start: int
    indptr: np.ndarray
    columns: np.ndarray


def read_points(store: SpotStore, block: int) -> BlockPoints:
    start, stop = store.block_rows(block)
    return BlockPoints(store.coords(start, stop), store.input_rows(start, stop).astype(np.int64),
                       start)


def box_of(points: BlockPoints):
    return points.box


def box_distance(box_a, box_b) -> float:
    """Smallest distance between two axis-aligned boxes (0 if they overlap)."""
    gap = np.maximum(0.0, np.maximum(box_b[0] - box_a[1], box_a[0] - box_b[1]))
    return float(np.sqrt(np.sum(gap**2)))


@worker_task
def own_knn_radius(points: BlockPoints, k: int) -> float:
    """Largest k-th neighbour distance within the block alone (inf if it has <= k spots)."""
    n = len(points.coords)
    if n <= k:
        return float("inf")
    dist, _ = cKDTree(points.coords).query(points.coords, k=k + 1, workers=current_threads())
    return float(dist[:, k].max())


def _halo(points: BlockPoints, others: list[BlockPoints], radius: float):
    """Spots of ``others`` within ``radius`` of ``points``' box: (coords, keys, rows)."""
    lo, hi = points.box
    parts = []
    for other in others:
        gap = np.maximum(0.0, np.maximum(lo - other.coords, other.coords - hi))
        near = np.sqrt((gap**2).sum(axis=1)) <= radius
        parts.append((other.coords[near], other.keys[near], other.rows[near]))
    if not parts:
        d = points.coords.shape[1]
        return np.empty((0, d)), np.empty(0, np.int64), np.empty(0, np.int64)
    return tuple(np.concatenate(p) for p in zip(*parts))


def _knn(points: BlockPoints, others: list[BlockPoints], k: int, radius: float):
    """``(neighbour rows (n, k), k-th distances)`` over block + halo, or ``None`` when a
    spot's k-th neighbour may lie beyond the halo (its k-th distance exceeds ``radius``),
    with the radius that suffices."""
    coords, keys, rows = _halo(points, others, radius)
    cand_coords = np.concatenate([points.coords, coords])
    cand_keys = np.concatenate([points.keys, keys])
    cand_rows = np.concatenate([points.rows, rows])
    if len(cand_coords) <= k:  # too few candidates even to rank: widen the halo
        return None, radius * 2
    position = knn_indices(cKDTree(cand_coords), points.coords, points.keys, k,
                           candidate_ids=cand_keys)
    kth = np.linalg.norm(cand_coords[position[:, -1]] - points.coords, axis=1)
    if np.any(kth > radius):
        return None, float(kth.max())
    return (cand_rows[position], kth), radius


@worker_task
def knn_edges(points: BlockPoints, others: list[BlockPoints], radius: float, k: int, n_total: int):
    """Directed k-NN edges ``(source rows, target rows)`` of the block's spots, or
    ``{"need": r}`` when the halo must grow to ``r``."""
    k = min(k, n_total - 1)
    if k <= 0:
        return {"edges": (np.empty(0, np.int64), np.empty(0, np.int64))}
    found, need = _knn(points, others, k, radius)
    if found is None:
        return {"need": need}
    return {"edges": (np.repeat(points.rows, k), found[0].ravel())}


@worker_task
def nearest_distances(points: BlockPoints, others: list[BlockPoints], radius: float, n_total: int):
    """Distance of each spot to its nearest other spot (the ``grid`` spacing statistic)."""
    if n_total < 2:
        return {"distances": np.zeros(len(points.coords))}
    found, need = _knn(points, others, 1, radius)
    return {"need": need} if found is None else {"distances": found[1]}


@worker_task
def radius_edges(points: BlockPoints, others: list[BlockPoints], radius: float):
    """All (source row, target row) pairs within ``radius`` for the block's spots."""
    coords, _, rows = _halo(points, others, radius)
    cand_coords = np.concatenate([points.coords, coords])
    cand_rows = np.concatenate([points.rows, rows])
    lists = cKDTree(cand_coords).query_ball_point(points.coords, r=radius, workers=current_threads())
    src = np.repeat(points.rows, [len(x) for x in lists])
    dst = cand_rows[np.concatenate(lists).astype(np.int64)] if len(src) else np.empty(0, np.int64)
    keep = src != dst
    return {"edges": (src[keep], dst[keep])}


def split_by_target(edges, chunk_rows: int, own_block: int) -> dict:
    """The block's directed edges ``(src, dst)`` that end in other blocks, by target block
    (small: boundary spots only); the target needs them to symmetrise its rows."""
    src, dst = edges
    target = dst // chunk_rows
    crossing = target != own_block
    return {int(c): (src[crossing & (target == c)], dst[crossing & (target == c)])
            for c in np.unique(target[crossing])}


def assemble_rows(row_start: int, n_rows: int, own_edges, incoming) -> BlockGraph:
    """Symmetric adjacency rows of a block: its own directed edges ``(src, dst)`` (each
    gives row src -> dst, and dst -> src when dst is inside) and the edges of other blocks
    that end inside it (each gives row dst -> src)."""
    stop = row_start + n_rows
    src, dst = own_edges
    inside = (dst >= row_start) & (dst < stop)
    rows = [src, dst[inside]] + [d for _, d in incoming]
    columns = [dst, src[inside]] + [s for s, _ in incoming]
    rows = np.concatenate(rows) - row_start
    columns = np.concatenate(columns)
    # CSR construction sorts each row's columns and merges repeated edges in O(edges)
    width = int(columns.max()) + 1 if columns.size else 1
    A = sparse.csr_matrix((np.ones(rows.size, np.int8), (rows, columns)), shape=(n_rows, width))
    A.sum_duplicates()
    return BlockGraph(row_start, A.indptr.astype(np.int64), A.indices.astype(np.int64))


def _halo_blocks(boxes, block: int, radius: float) -> list[int]:
    return [c for c in range(len(boxes))
            if c != block and box_distance(boxes[block], boxes[c]) <= radius]


def _run_with_halo(client, fn, points, boxes, radii, extra, progress, label):
    """Run ``fn(points_b, halo_points, radius_b, *extra)`` per block, growing halos on
    request; returns the per-block futures and the halo block lists used."""
    n = len(points)
    results = [None] * n
    halos = [None] * n
    pending = list(range(n))
    first = True
    while pending:
        futures = {}
        for b in pending:
            halos[b] = _halo_blocks(boxes, b, radii[b])
            futures[b] = client.submit(fn, points[b], [points[c] for c in halos[b]],
                                       radii[b], *extra, pure=False)
        track(list(futures.values()), label if first else f"{label} (grown halos)",
              enabled=progress)
        first = False
        needs = dict(zip(futures, client.gather(client.map(_field, list(futures.values()),
                                                           ["need"] * len(futures)))))
        pending = []
        for b, future in futures.items():
            if needs[b] is None:
                results[b] = future
            else:
                radii[b] = max(needs[b], radii[b] * 1.0001)
                pending.append(b)
    return results, halos


def build_graph(client, store: SpotStore, method: str = "knn", k: int = 6,
                radius: float | None = None, *, progress: bool = True):
    """Per-block :class:`BlockGraph` futures of the global spatial graph.

    Returns ``(graphs, mean_degree)``; coordinates never leave the workers except for the
    block boxes (and, for ``grid``, one distance per spot to take the global median).
    """
    n_blocks, n_total = store.n_blocks, store.n_spots
    points = client.map(read_points, [store] * n_blocks, range(n_blocks), pure=False)
    boxes = client.gather(client.map(box_of, points))
    if method == "knn":
        radii = client.gather(client.map(own_knn_radius, points, [k] * n_blocks))
        edges, halos = _run_with_halo(client, knn_edges, points, boxes, list(radii),
                                      (k, n_total), progress, "graph: k-NN with halos")
    else:
        if method == "grid":
            radii = client.gather(client.map(own_knn_radius, points, [1] * n_blocks))
            spacing, _ = _run_with_halo(client, nearest_distances, points, boxes, list(radii),
                                        (n_total,), progress, "graph: grid spacing")
            distances = np.concatenate([r["distances"] for r in client.gather(spacing)])
            radius = 1.5 * float(np.median(distances))
        edges, halos = _run_with_halo(client, radius_edges, points, boxes, [radius] * n_blocks,
                                      (), progress, "graph: radius neighbours")
    edge_lists = client.map(_field, edges, ["edges"] * n_blocks, pure=False)
    crossing = client.map(split_by_target, edge_lists, [store.chunk_rows] * n_blocks,
                          range(n_blocks), pure=False)
    # block b needs the crossing edges of every block whose halo reached b
    sources = [[c for c in range(n_blocks) if b in halos[c]] for b in range(n_blocks)]
    graphs = [client.submit(_assemble, b, store.block_rows(b)[0],
                            store.block_rows(b)[1] - store.block_rows(b)[0], edge_lists[b],
                            *[crossing[c] for c in sources[b]], pure=False)
              for b in range(n_blocks)]
    track(graphs, "graph: symmetrise", enabled=progress)
    total_degree = sum(client.gather(client.map(_n_edges, graphs)))
    return graphs, total_degree / max(n_total, 1), (radius if method != "knn" else None)


def _assemble(block, row_start, n_rows, own_edges, *crossing):
    return assemble_rows(row_start, n_rows, own_edges,
                         [part[block] for part in crossing if block in part])


def _field(result: dict, name: str):
    return result.get(name)


def _n_edges(graph: BlockGraph) -> int:
    return int(graph.indptr[-1])
