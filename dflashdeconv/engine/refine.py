"""The refinement (core.refine) over a spot store: phase 1 on the client from a subsample
the projection pass set aside, phase 2 per block on the workers as the results are written
(:func:`dflashdeconv.engine.results.write_block_results`).

The subsample is the same spots as in memory (input row a multiple of the stride), so the
gene factors and the dispersion are the in-memory ones up to summation order, and phase 2
is the in-memory kernel on each block: the result equals the in-memory refinement
whatever the blocking or the number of workers. Phase 1's model is recorded in the run
group, so an interrupted run resumes at phase 2.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ..core import refine as refine_math
from .elements import array_element
from .solve import read_beta
from .store import SpotStore, open_zarr

#: Run-group array holding the recorded phase-1 model.
MODEL_GROUP = "refine_model"


def block_subsample(store: SpotStore, block: int, indptr, indices, data,
                    gene_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    """The block's spots of the phase-1 subsample: (positions in the block, input rows,
    their counts on the used genes). Called in the projection pass, which has the block."""
    start, stop = store.block_rows(block)
    input_rows = store.input_rows(start, stop)
    positions = np.flatnonzero(refine_math.in_subsample(input_rows, store.n_spots))
    used = np.empty(int(gene_pos.max()) + 1, np.int64)
    columns = np.flatnonzero(gene_pos >= 0)
    used[gene_pos[columns]] = columns
    rows = sparse.csr_matrix((data, indices, indptr), shape=(stop - start, store.n_genes))
    return positions, input_rows[positions], rows[positions][:, used].tocsr()


def _subsample_start(projected, run_path: str, slot, rows: tuple[int, int], n_types: int):
    positions, input_rows, counts = projected[1]
    beta = read_beta(open_zarr(run_path, "r"), slot, *rows, n_types)
    return input_rows, counts, refine_math.start_proportions(beta[positions])


def _depth_range(projected) -> tuple[float, float]:
    return projected[0]


def fit_model(client, store: SpotStore, projection: list, run_path: str, slot, mu: np.ndarray,
              mode: str) -> refine_math.RefineModel:
    """Phase 1 from the subsample rows held with the projection futures and the solver's
    abundances at ``slot``."""
    rows = [store.block_rows(b) for b in range(store.n_blocks)]
    n = len(projection)
    parts = client.gather(client.map(_subsample_start, projection, [run_path] * n, [slot] * n,
                                     rows, [mu.shape[0]] * n, pure=False))
    input_rows = np.concatenate([p[0] for p in parts])
    order = np.argsort(input_rows, kind="stable")
    counts = sparse.vstack([p[1] for p in parts]).tocsr()[order]
    start = np.concatenate([p[2] for p in parts])[order]
    ranges = client.gather(client.map(_depth_range, projection, pure=False))
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    depth_range = (low, high) if high > 0 else (1.0, 1.0)
    return refine_math.fit_global(counts, start, mu, mode, depth_range)


def record_model(run_path: str, model: refine_math.RefineModel) -> None:
    run = open_zarr(run_path, "r+")
    group = run.require_group(MODEL_GROUP)
    for name, values in model.to_arrays().items():
        values = np.asarray(values, np.float64)
        array_element(group, name, values.shape, np.float64, values.shape or (1,))[...] = values
    run.attrs["refine_recorded"] = True


def recorded_model(run_path: str, mode: str, mu: np.ndarray):
    """The phase-1 model of an interrupted run, or None."""
    run = open_zarr(run_path, "r")
    if not run.attrs.get("refine_recorded"):
        return None
    group = run[MODEL_GROUP]
    return refine_math.RefineModel.from_arrays(
        mode, mu, {name: np.asarray(group[name][...]) for name in group.array_keys()})


def refine_block(store: SpotStore, block: int, gene_pos: np.ndarray,
                 model: refine_math.RefineModel, beta: np.ndarray):
    """Phase 2 on one block: (refined proportions, global rows of failed spots)."""
    indptr, indices, data = store.read_block(block)
    start = refine_math.start_proportions(beta)
    proportions, failed = refine_math.refine_rows(indptr, indices, data, gene_pos, model, start)
    return proportions, store.block_rows(block)[0] + np.flatnonzero(failed)


def fit_refinement(client, store: SpotStore, X: np.ndarray, genes: np.ndarray, projection: list,
                   run_path: str, slot, refine: str) -> refine_math.RefineModel:
    """Phase 1's model, fitted and recorded (or the one an interrupted run recorded)."""
    mode = refine_math.resolve(refine)
    mu = refine_math.profiles(X, genes)
    model = recorded_model(run_path, mode, mu)
    if model is None:
        model = fit_model(client, store, projection, run_path, slot, mu, mode)
        record_model(run_path, model)
    return model
