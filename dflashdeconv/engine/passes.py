"""The two streaming passes over a spot store, as Dask tasks over blocks.

Each task reads one block (a row chunk) and calls a core kernel on it, as dask-image
wraps scipy.ndimage: (a) :func:`~dflashdeconv.core.genes.gene_moments` for the HVG and
Pearson statistics, merged by exact integer sums; (b)
:func:`~dflashdeconv.core.project.project` for ``H = Y_repr X_repr^T`` and the spot norms,
written block-aligned into the run group of the store, from where the solver reads them:
only the refinement's small subsample and each block's depth range stay on the workers.
After (b) the counts are not read again by the solver.
"""

from __future__ import annotations

import numpy as np

from ..core.genes import GeneMoments, gene_moments
from ..core.project import SpotTransform, project
from ..core.validation import check_projection, check_values
from ..errors import InputError
from .cluster import shared, worker_task
from .progress import track
from .refine import block_subsample
from .store import SpotStore, open_zarr


def check_block(store: SpotStore, block: int, indices, data) -> None:
    """Raise :class:`InputError` naming the block, its rows and the problem."""
    start, stop = store.block_rows(block)
    where = f"{store.path}: block {block} (rows {start}-{stop - 1})"
    check_values(f"{where}: counts", data)
    if indices.size and (indices.min() < 0 or indices.max() >= store.n_genes):
        raise InputError(f"{where}: gene index out of range (corrupt X/indices)")


@worker_task
def block_moments(store: SpotStore, block: int, column_map: np.ndarray) -> GeneMoments:
    """Pass (a) on one block: checked HVG statistics over the mapped columns."""
    indptr, indices, data = store.read_block(block)
    check_block(store, block, indices, data)
    return gene_moments(indptr, indices, data, int(column_map.max()) + 1, column_map)


def merge_moments(parts) -> GeneMoments:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def statistics_pass(client, store: SpotStore, column_map: np.ndarray, *,
                    progress: bool = True) -> GeneMoments:
    """Gene statistics of the whole store over the columns that ``column_map`` keeps (store
    column -> gene position or -1); bad counts or chunks fail here, before any fit."""
    columns = shared(client, column_map)
    futures = client.map(block_moments, [store] * store.n_blocks, range(store.n_blocks),
                         [columns] * store.n_blocks, pure=False)
    track(futures, "pass 1/2 gene statistics", enabled=progress)
    return merge_moments(client.gather(futures))


def depth_range(totals: np.ndarray) -> tuple[float, float]:
    """Smallest and largest positive depth of a block ((inf, 0) if none is positive)."""
    positive = totals[totals > 0]
    return (float(positive.min()), float(positive.max())) if positive.size else (np.inf, 0.0)


@worker_task
def block_projection(store: SpotStore, block: int, transform: SpotTransform, run_path: str,
                     subsample: bool = False):
    """Pass (b) on one block: ``H``, ``ysq`` and the selected totals written to the run
    group, the block then marked done (an interrupted block is redone on resume). Returns
    ``(depth range, refinement subsample or None)``: with ``subsample`` the block's spots of
    the refinement's phase 1 are set aside while the block is in memory."""
    indptr, indices, data = store.read_block(block)
    start, stop = store.block_rows(block)
    H, ysq, totals = project(indptr, indices, data, transform, row_offset=start)
    check_projection(H, ysq, f"the counts of {store.path} block {block} (rows {start}-{stop - 1})")
    run = open_zarr(run_path, "r+")
    run["H"][start:stop] = H
    run["ysq"][start:stop] = ysq
    run["selected_totals"][start:stop] = totals
    run["projected"][block] = True
    kept = (block_subsample(store, block, indptr, indices, data, transform.gene_pos)
            if subsample else None)
    return depth_range(totals), kept


@worker_task
def load_projection(store: SpotStore, block: int, run_path: str, gene_pos=None):
    """What :func:`block_projection` returns, for a block an earlier, interrupted run
    projected (the refinement's subsample is read again from the block when ``gene_pos``
    is given)."""
    start, stop = store.block_rows(block)
    totals = np.asarray(open_zarr(run_path, "r")["selected_totals"][start:stop])
    kept = None
    if gene_pos is not None:
        kept = block_subsample(store, block, *store.read_block(block), gene_pos)
    return depth_range(totals), kept


def projection_pass(client, store: SpotStore, transform: SpotTransform, run_path: str,
                    done: np.ndarray, *, subsample: bool = False, progress: bool = True) -> list:
    """Futures of the per-block ``(depth range, refinement subsample)`` (the projection
    itself is in the run group); blocks marked ``done`` are not projected again."""
    gene_pos = transform.gene_pos if subsample else None
    transform_future = shared(client, transform)
    futures = [client.submit(load_projection, store, b, run_path, gene_pos, pure=False)
               if done[b] else
               client.submit(block_projection, store, b, transform_future, run_path, subsample,
                             pure=False)
               for b in range(store.n_blocks)]
    track(futures, "pass 2/2 projection", enabled=progress)
    return futures
