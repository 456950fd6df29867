"""Out-of-core deconvolution of a spot store: passes, halo graph, block solver, results.

The math is the in-memory estimator's (:class:`dflashdeconv.FlashDeconv`): the same
parameters, gene selection, transform and solver kernel; only the data each call sees
differs. With ``inner_sweeps=1`` the proportions equal the in-memory fit on the same rows.

A run holds the store's lock, records its progress in ``uns/<key>_run`` (the gene
selection after pass 1, a flag per projected block, a checkpoint per solver round) and
publishes results only when complete, so an interrupted run resumes with
``resume=True`` and ends with the result an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from ..core.genes import (
    MIN_SHARED_GENES,
    check_shared_genes,
    leverage_scores,
    shared_genes,
)
from ..core.model import (
    FlashDeconv,
    build_transform,
    fit_parameters,
    penalties,
    select_model_genes,
    warn_empty_spots,
    warn_not_converged,
)
from ..core.params import EXECUTION, params_record
from ..core.refine import warn_refinement
from ..core.validation import check_reference
from . import passes
from .blocks import build_graph
from .cluster import connect, shared
from .lock import StoreLock
from .refine import fit_refinement
from .results import (
    open_run,
    prepare_staging,
    publish,
    record,
    record_halos,
    write_block_results,
)
from .solve import BlockSolver, make_problem
from .store import SpotStore, open_zarr


def run_fingerprint(store: SpotStore, X, types, genes, params: dict, inner_sweeps: int) -> str:
    """Hash of everything a run's result depends on (a resume must match it)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, np.float64).tobytes())
    h.update(json.dumps({"types": [str(t) for t in types], "genes": [str(g) for g in genes],
                         "params": {k: v for k, v in params.items() if k not in EXECUTION},
                         "inner_sweeps": int(inner_sweeps), "n_spots": store.n_spots,
                         "nnz": store.nnz, "chunk_rows": store.chunk_rows},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def deconvolve_store(path, X, cell_type_names, reference_genes, *, key_added="flashdeconv",
                     scheduler=None, inner_sweeps: int = 1, overwrite: bool = False,
                     resume: bool = False, progress: bool = True,
                     min_shared_genes: int = MIN_SHARED_GENES, **params) -> dict:
    """Deconvolve the spot store at ``path`` against reference profiles ``X`` (K x genes).

    ``params`` are :class:`~dflashdeconv.FlashDeconv`'s. ``scheduler``: a Client, a
    scheduler address or None (a LocalCluster for the duration of the call). Results go
    into the store under ``key_added`` (see :mod:`~dflashdeconv.engine.results`);
    ``resume`` continues an interrupted run with the same inputs. Returns the run summary
    (convergence record and the time of each phase).
    """
    params = fit_parameters(FlashDeconv(**params))
    store = SpotStore.open(path)
    X = check_reference(X, len(reference_genes), cell_type_names)
    types = np.asarray(cell_type_names).astype(str)
    common, store_cols, ref_cols = shared_genes(store.gene_names, reference_genes)
    X = X[:, ref_cols]
    check_shared_genes(X, types, min_shared_genes, stacklevel=4)
    fingerprint = run_fingerprint(store, X, types, common, params, inner_sweeps)
    with StoreLock(store.path, f"deconvolve {key_added}"):
        run_path, recorded = open_run(store, key_added, types, fingerprint, overwrite=overwrite,
                                      resume=resume)
        if recorded.get("status") == "complete":
            from anndata.io import read_elem

            return read_elem(store.root()["uns"][f"{key_added}_params"]) | {"resumed": True}
        with connect(scheduler, quiet=not progress) as client:
            summary = _run(client, store, X, types, store_cols, params, key_added, run_path,
                           recorded, inner_sweeps, progress)
    return summary


def _run(client, store, X, types, store_cols, params, key, run_path, recorded, inner_sweeps,
         progress) -> dict:
    timings = {}
    t0 = time.perf_counter()
    selection = recorded.get("selection")
    if selection is None:
        column_map = np.full(store.n_genes, -1, np.int64)
        column_map[store_cols] = np.arange(store_cols.size)
        moments = passes.statistics_pass(client, store, column_map, progress=progress)
        genes = select_model_genes(moments, X, params)
        selection = {"genes": genes.tolist(), "raw_mean": moments.raw_mean[genes].tolist(),
                     "n_empty": int(moments.n_empty)}
        record(run_path, selection=selection)
    genes = np.asarray(selection["genes"], np.intp)
    warn_empty_spots(selection["n_empty"], store.n_spots, stacklevel=4)
    leverage = leverage_scores(X[:, genes])
    transform = build_transform(np.asarray(selection["raw_mean"]), X, genes, leverage,
                                store.n_genes, params, columns=store_cols)
    timings["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    done = np.asarray(open_zarr(run_path, "r")["projected"][...])
    refining = params["refine"] != "none"
    projection = passes.projection_pass(client, store, transform, run_path, done,
                                        subsample=refining, progress=progress)
    timings["projection"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graphs, mean_degree, radius_used = build_graph(
        client, store, params["spatial_method"], params["k_neighbors"], params["radius"],
        progress=progress)
    timings["graph"] = time.perf_counter() - t0

    gram = transform.rep.gram
    lam, rho = penalties(gram, mean_degree, params)
    t0 = time.perf_counter()
    problems = client.map(make_problem, graphs, pure=False)
    del graphs  # the problems keep the graph rows they need
    solver = BlockSolver(client, problems, [store.block_rows(b) for b in range(store.n_blocks)],
                         run_path, len(types))
    record_halos(run_path, solver.halos)
    bar = _RoundProgress(params["tol"]) if progress else None
    # a checkpoint is only resumable with the neighbours' exports of its round beside it
    # (a run group recorded before they were kept starts the solver over)
    resume_from = recorded.get("checkpoint") if recorded.get("exports_ready") else None

    def on_round(round_, change, checkpoint):
        record(run_path, checkpoint=checkpoint)
        if bar:
            bar.update(round_, change)

    try:
        solution = solver.solve(gram, lam, rho, max_iter=params["max_iter"], tol=params["tol"],
                                inner_sweeps=inner_sweeps,
                                resume_from=resume_from, on_round=on_round)
    finally:
        if bar:
            bar.close()
    timings["solver"] = time.perf_counter() - t0
    if not solution.converged:
        warn_not_converged(params, solution.changes[-1], stacklevel=4)
    objective = solver.objective(solution.slot, gram, lam, rho)

    refinement, refine_record = None, {}
    if refining:
        t0 = time.perf_counter()
        model = fit_refinement(client, store, X, genes, projection, run_path, solution.slot,
                               params["refine"])
        refinement = shared(client, (transform.gene_pos, model))
        timings["refine"] = time.perf_counter() - t0
    del projection

    t0 = time.perf_counter()
    prepare_staging(store, key, run_path)
    written = client.map(write_block_results, [store] * store.n_blocks,
                         [run_path] * store.n_blocks, range(store.n_blocks),
                         [solution.slot] * store.n_blocks, [refinement] * store.n_blocks,
                         pure=False)
    passes.track(written, "writing results", enabled=progress)
    outcomes = client.gather(written)
    if refining:
        failed = np.concatenate([o[1] for o in outcomes])
        examples = store.obs_names(failed[:5]) if failed.size else []
        ok = warn_refinement(model, failed.size, examples, store.n_spots, stacklevel=4)
        refine_record = {"refine_result": model.record() | {"n_failed": int(failed.size),
                                                            "ok": ok}}
    summary = params_record(
        params, lambda_used=lam, types=types, n_genes_used=genes.size,
        converged=solution.converged, n_iterations=solution.n_rounds, changes=solution.changes,
        n_zero_signal=sum(o[0] for o in outcomes)) | {
        "rho_used": float(rho),
        "genes_used": [str(g) for g in store.gene_names[store_cols[genes]]],
        "inner_sweeps": int(inner_sweeps),
        "final_objective": float(objective),
        "mean_degree": float(mean_degree),
        "n_spots": int(store.n_spots),
        "n_genes_shared": int(store_cols.size),
        "n_blocks": int(store.n_blocks),
    } | refine_record
    if radius_used is not None:
        summary["radius_used"] = float(radius_used)
    publish(store, key, summary | {"timings": timings})
    timings["results"] = time.perf_counter() - t0
    return summary | {"timings": timings, "key_added": key, "store": store.path}


class _RoundProgress:
    """Solver progress on stderr: rounds and the change against the tolerance."""

    def __init__(self, tol: float):
        from rich.console import Console
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=Console(stderr=True))
        self._task = self._progress.add_task("solver", total=None)
        self._tol = tol
        self._progress.start()

    def update(self, round_, change):
        self._progress.update(self._task, description=f"solver: round {round_}, change "
                                                      f"{change:.2e} (tol {self._tol:.0e})")

    def close(self):
        self._progress.stop()
