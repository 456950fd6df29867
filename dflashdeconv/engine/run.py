"""Out-of-core deconvolution of a spot store: passes, halo graph, block solver, results.

The math is the in-memory estimator's (:class:`dflashdeconv.FlashDeconv`): the same
parameters, gene selection, transform and solver kernel; only the data each call sees
differs. With ``inner_sweeps=1`` the proportions equal the in-memory fit on the same rows.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from ..core import genes as gene_selection
from ..core.model import FlashDeconv, build_transform, fit_parameters
from ..core.solver import auto_lambda, scaled_rho
from ..core.validation import check_reference
from ..errors import DataWarning
from ..io import shared_genes
from . import passes
from .blocks import build_graph
from .cluster import connect
from .results import prepare_run, publish, write_block_results
from .solve import BlockSolver, beta_of, make_problem
from .store import SpotStore


def deconvolve_store(path, X, cell_type_names, reference_genes, *, key_added="flashdeconv",
                     scheduler=None, inner_sweeps: int = 1, overwrite: bool = False,
                     progress: bool = True, **params) -> dict:
    """Deconvolve the spot store at ``path`` against reference profiles ``X`` (K x genes).

    ``params`` are :class:`~dflashdeconv.FlashDeconv`'s. ``scheduler``: a Client, a
    scheduler address or None (a LocalCluster for the duration of the call). Results go
    into the store under ``key_added`` (see :mod:`~dflashdeconv.engine.results`); the
    returned summary holds the convergence record and the time of each phase.
    """
    params = fit_parameters(FlashDeconv(**params))
    store = SpotStore.open(path)
    X = check_reference(X, len(reference_genes), cell_type_names)
    types = np.asarray(cell_type_names).astype(str)
    _, store_cols, ref_cols = shared_genes(store.gene_names, reference_genes)
    X = X[:, ref_cols]
    column_map = np.full(store.n_genes, -1, np.int64)
    column_map[store_cols] = np.arange(store_cols.size)
    timings = {}
    with connect(scheduler, quiet=not progress) as client:
        t0 = time.perf_counter()
        moments = passes.statistics_pass(client, store, column_map, progress=progress)
        if moments.n_empty:
            warnings.warn(f"{moments.n_empty} of {store.n_spots} spots have no counts on the "
                          "shared genes; their proportions are uniform and flagged",
                          DataWarning, stacklevel=2)
        genes = gene_selection.select_genes(moments, X, params["n_hvg"],
                                            params["n_markers_per_type"])
        leverage = gene_selection.leverage_scores(X[:, genes])
        transform = build_transform(moments.raw_mean[genes], X, genes, leverage, store.n_genes,
                                    params, columns=store_cols)
        timings["statistics"] = time.perf_counter() - t0

        run_path = prepare_run(store, key_added, types, overwrite)
        t0 = time.perf_counter()
        projection = passes.projection_pass(client, store, transform, run_path, progress=progress)
        timings["projection"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        graphs, mean_degree, radius_used = build_graph(
            client, store, params["spatial_method"], params["k_neighbors"], params["radius"],
            progress=progress)
        timings["graph"] = time.perf_counter() - t0

        gram = transform.rep.gram
        lam = (auto_lambda(gram, [mean_degree]) if params["lambda_spatial"] == "auto"
               else float(params["lambda_spatial"]))
        rho = scaled_rho(gram, params["rho_sparsity"])
        t0 = time.perf_counter()
        problems = client.map(make_problem, graphs, projection, pure=False)
        solver = BlockSolver(client, problems, [store.block_rows(b) for b in range(store.n_blocks)])
        bar = _RoundProgress(params["tol"]) if progress else None
        solution = solver.solve(gram, lam, rho, n_types=len(types), max_iter=params["max_iter"],
                                tol=params["tol"], inner_sweeps=inner_sweeps,
                                on_round=bar.update if bar else None)
        if bar:
            bar.close()
        timings["solver"] = time.perf_counter() - t0
        if not solution.converged:
            warnings.warn(f"the block solver did not reach tol={params['tol']} in "
                          f"{params['max_iter']} rounds", RuntimeWarning, stacklevel=2)
        ysq = client.map(_part, projection, [1] * len(projection), pure=False)
        totals = client.map(_part, projection, [2] * len(projection), pure=False)
        objective = solver.objective(solution.states, ysq, gram, lam, rho)
        beta = client.map(beta_of, solution.states, pure=False)

        t0 = time.perf_counter()
        written = client.map(write_block_results, [store] * store.n_blocks,
                             [run_path] * store.n_blocks, range(store.n_blocks), beta,
                             totals, pure=False)
        passes.track(written, "writing results", enabled=progress)
        n_zero_signal = int(sum(client.gather(written)))
        summary = {
            **{k: v for k, v in params.items() if k not in ("verbose", "radius")},
            "radius": -1.0 if params["radius"] is None else float(params["radius"]),
            "lambda_spatial": float(lam),
            "lambda_spatial_requested": str(params["lambda_spatial"]),
            "rho_used": float(rho),
            "n_genes_used": int(genes.size),
            "n_cell_types": int(types.size),
            "cell_type_names": [str(t) for t in types],
            "genes_used": [str(g) for g in store.gene_names[store_cols[genes]]],
            "converged": bool(solution.converged),
            "n_iterations": int(solution.n_rounds),
            "inner_sweeps": int(inner_sweeps),
            "changes": [float(c) for c in solution.changes],
            "final_objective": float(objective),
            "mean_degree": float(mean_degree),
            "n_spots": int(store.n_spots),
            "n_blocks": int(store.n_blocks),
            "n_zero_signal": n_zero_signal,
        }
        if radius_used is not None:
            summary["radius_used"] = float(radius_used)
        publish(store, key_added, summary | {"timings": timings})
        timings["results"] = time.perf_counter() - t0
    summary["timings"] = timings
    summary["key_added"] = key_added
    summary["store"] = store.path
    return summary


def _part(item, index):
    return item[index]


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

    def update(self, round_, change, beta):
        self._progress.update(self._task, description=f"solver: round {round_}, change "
                                                      f"{change:.2e} (tol {self._tol:.0e})")

    def close(self):
        self._progress.stop()
