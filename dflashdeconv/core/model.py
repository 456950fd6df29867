"""The in-memory FlashDeconv estimator (scikit-learn conventions, reference-package names)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator

from ..errors import DataWarning, InputError
from ..log import logger, verbose_logging
from . import genes as gene_selection
from . import refine as refine_math
from .estimator import check_fitted, constraints, validate_params
from .graph import spatial_graph
from .params import MODEL
from .preprocess import preprocess_reference, spot_gene_scale
from .project import SpotTransform, project, selected_gene_sums
from .solver import auto_lambda, normalize_proportions, objective, scaled_rho, solve
from .threads import limit
from .threads import resolve as resolve_jobs
from .uncertainty import (
    OrderStatistics,
    active_set_intervals,
    entropy,
    laplace_diagonal_variance,
    one_sided_tests,
)
from .validation import as_count_matrix, check_coords, check_projection, check_reference
from .weights import build_representation

#: Rows per block when a dense spot matrix is streamed through the CSR kernels.
DENSE_BLOCK_ROWS = 4096


def csr_chunks(Y):
    """``(row_start, indptr, indices, data)`` row chunks of ``Y`` for the CSR kernels.

    A CSR matrix is one chunk and is not copied; a dense matrix is converted block by block.
    """
    if sparse.issparse(Y):
        yield 0, Y.indptr, Y.indices, Y.data
        return
    for start in range(0, Y.shape[0], DENSE_BLOCK_ROWS):
        block = sparse.csr_matrix(Y[start:start + DENSE_BLOCK_ROWS])
        yield start, block.indptr, block.indices, block.data


def fit_parameters(model) -> dict[str, Any]:
    """Validated copy of an estimator's parameters (scikit-learn: checked in ``fit``)."""
    p = validate_params(model)
    if p["spatial_method"] == "radius" and p["radius"] is None:
        raise InputError("spatial_method='radius' needs a positive radius, got None")
    return p


def select_model_genes(moments, X, params) -> np.ndarray:
    """Step 1 of a fit, shared by the in-memory model and the engine: the genes used
    (HVGs of the spots' ``moments`` + markers of ``X``)."""
    return gene_selection.select_genes(moments, X, params["n_hvg"], params["n_markers_per_type"])


def penalties(gram: np.ndarray, mean_degree: float, params) -> tuple[float, float]:
    """``(lambda, rho)`` in the solver's units (the spatial term follows the graph's mean
    degree when ``lambda_spatial="auto"``; a graph without edges, e.g. ``k_neighbors=0``,
    means no spatial term: lambda 0)."""
    if mean_degree <= 0:
        lam = 0.0
    elif params["lambda_spatial"] == "auto":
        lam = auto_lambda(gram, [mean_degree])
    else:
        lam = float(params["lambda_spatial"])
    return lam, scaled_rho(gram, params["rho_sparsity"])


def warn_empty_spots(n_empty: int, n_spots: int, stacklevel: int = 3) -> None:
    if n_empty:
        warnings.warn(f"{n_empty} of {n_spots} spots have no counts on the shared genes; their "
                      "proportions are uniform and flagged as zero signal", DataWarning,
                      stacklevel=stacklevel)


def warn_not_converged(params, final_change: float, stacklevel: int = 3) -> None:
    warnings.warn(f"the solver did not reach tol={params['tol']} in {params['max_iter']} "
                  f"iterations (last change {final_change:.2e})", RuntimeWarning,
                  stacklevel=stacklevel)


def build_transform(spot_gene_mean, X, genes, leverage, n_columns, params,
                    columns=None) -> SpotTransform:
    """The map from raw counts to the solver's space for the selected ``genes``.

    ``columns`` gives the count-matrix column of each gene of ``X`` when the matrix has
    more genes than the reference (a store); by default gene j is column j.
    """
    X_tilde = preprocess_reference(X[:, genes], params["preprocess"])
    rep = build_representation(X_tilde, leverage, params["gene_weighting"],
                               params["sketch_dim"], params["random_state"])
    scale = spot_gene_scale(params["preprocess"], spot_gene_mean, genes.size)
    selected_columns = genes if columns is None else np.asarray(columns)[genes]
    return SpotTransform.build(n_columns, selected_columns, params["preprocess"], scale, rep)


class FlashDeconv(BaseEstimator):
    """Spatially regularised cell-type deconvolution (FlashDeconv, Yang, Zhang & Chen 2025).

    Parameters and defaults are those of the reference package ``flashdeconv`` 0.2.0, so
    code written for it runs unchanged.

    Parameters
    ----------
    sketch_dim : int, default 512
        CountSketch buckets d (the gene weights of ``expected``; the sketch size of
        ``countsketch``).
    lambda_spatial : float or "auto", default "auto"
        Graph-Laplacian strength; "auto" = 0.005 x mean Gram diagonal / mean degree.
    rho_sparsity : float, default 0.01
        L1 penalty as a fraction of the mean Gram diagonal.
    n_hvg, n_markers_per_type : int, default 2000, 50
        Genes used: HVGs of the spots plus markers of each reference type.
    spatial_method : {"knn", "radius", "grid"}, default "knn"
    k_neighbors : int, default 6
        0 means no spatial term (lambda 0).
    radius : float, optional
        Needed with ``spatial_method="radius"``.
    max_iter : int, default 1000
    tol : float, default 1e-4
        Stop when the largest change of any abundance over one iteration is below ``tol``
        times the largest abundance.
    preprocess : {"log_cpm", "pearson", "raw"}, default "log_cpm"
    random_state : int, default 0
        Seed of the ``countsketch`` hashing (unused by ``expected``).
    verbose : bool, default False
    gene_weighting : {"expected", "countsketch"}, default "expected"
    refine : {"none", "wls", "nb", "auto"}, default "none"
        A second model on the raw counts of the used genes, warm-started from the fit
        (:mod:`dflashdeconv.core.refine`, docs/REFINE.md): "nb" weighs every gene by a
        negative-binomial variance and estimates gene-wise platform factors across all
        spots; "wls" uses Poisson variances without factors; "auto" is "nb", the most
        accurate on the benchmarks. Proportions are then fractions of each spot's
        transcripts; "none" keeps the reference package's result.
    n_jobs : int or None, default None
        Threads of the kernels (scikit-learn's convention): None or -1 = every core the
        process may use (its affinity, bounded by a container's CPU quota), -2 = all but
        one, n > 0 = n.

    Attributes
    ----------
    beta_ : (N, K) abundances; proportions_ : (N, K) row-normalised abundances.
    gene_idx_ : genes used (columns of Y and X); gene_weights_ : their weights
        (``expected``) or None; leverage_scores_ : their leverage.
    lambda_used_, rho_used_ : penalties in the solver's units.
    adjacency_ : (N, N) binary spatial graph.
    zero_signal_ : (N,) bool, spots with no counts on the used genes or an all-zero fit;
        their proportions are uniform and carry no information.
    info_ : dict with ``converged``, ``n_iterations``, ``final_change``, ``changes``,
        ``final_objective``, ``XtX`` (Gram), ``n_neighbors`` and ``timings`` (s per phase).
    refine_ : dict (with ``refine`` other than "none"): the refinement's record
        (``converged``, ``n_rounds``, ``dispersion``, ``factor_log_sd``, ...), its gene
        ``factors`` and the indices of ``failed`` spots, which keep the base fit;
        ``beta_`` stays the base fit's abundances.
    """

    _parameter_constraints = {p.name: constraints(p) for p in MODEL}

    def __init__(self, sketch_dim=512, lambda_spatial="auto", rho_sparsity=0.01, n_hvg=2000,
                 n_markers_per_type=50, spatial_method="knn", k_neighbors=6, radius=None,
                 max_iter=1000, tol=1e-4, preprocess="log_cpm", random_state=0, verbose=False,
                 gene_weighting="expected", refine="none", n_jobs=None):
        self.sketch_dim = sketch_dim
        self.lambda_spatial = lambda_spatial
        self.rho_sparsity = rho_sparsity
        self.n_hvg = n_hvg
        self.n_markers_per_type = n_markers_per_type
        self.spatial_method = spatial_method
        self.k_neighbors = k_neighbors
        self.radius = radius
        self.max_iter = max_iter
        self.tol = tol
        self.preprocess = preprocess
        self.random_state = random_state
        self.verbose = verbose
        self.gene_weighting = gene_weighting
        self.refine = refine
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------ fitting
    def fit(self, Y, X, coords, cell_type_names=None) -> "FlashDeconv":
        """Estimate abundances from spot counts ``Y`` (N x G), profiles ``X`` (K x G).

        ``Y`` may be dense or sparse; it is never copied or modified (a CSR matrix is read
        in place). Coordinates are (N, 2) or (N, 3).
        """
        params = fit_parameters(self)
        Y = as_count_matrix("spot counts Y", Y)
        X = check_reference(X, Y.shape[1], cell_type_names)
        coords = check_coords(coords, Y.shape[0])
        if Y.shape[0] == 0:
            raise InputError("the spot matrix has no spots")
        with verbose_logging(params["verbose"]), limit(resolve_jobs(params["n_jobs"])):
            return self._fit(Y, X, coords, cell_type_names, params)

    def _fit(self, Y, X, coords, cell_type_names, params) -> "FlashDeconv":
        n_spots, n_genes = Y.shape
        timings = {}

        t0 = time.perf_counter()
        moments = gene_selection.GeneMoments.zeros(n_genes)
        for _, indptr, indices, data in csr_chunks(Y):
            moments = moments + gene_selection.gene_moments(indptr, indices, data, n_genes)
        warn_empty_spots(moments.n_empty, n_spots, stacklevel=4)
        genes = select_model_genes(moments, X, params)
        leverage = gene_selection.leverage_scores(X[:, genes])
        timings["gene_selection"] = time.perf_counter() - t0
        logger.info("%d genes selected (%.2f s)", genes.size, timings["gene_selection"])

        t0 = time.perf_counter()
        transform = build_transform(moments.raw_mean[genes], X, genes, leverage, n_genes, params)
        H, ysq, totals = self._project(Y, transform, n_spots)
        check_projection(H, ysq)
        timings["projection"] = time.perf_counter() - t0
        logger.info("projected to %d dimensions (%.2f s)", transform.rep.dim, timings["projection"])

        t0 = time.perf_counter()
        A = spatial_graph(coords, params["spatial_method"], params["k_neighbors"], params["radius"])
        degree = np.diff(A.indptr).astype(np.float64)
        timings["graph"] = time.perf_counter() - t0

        gram = transform.rep.gram
        lam, rho = penalties(gram, float(degree.mean()) if degree.size else 0.0, params)
        t0 = time.perf_counter()
        beta, info = solve(H, gram, A, lam, rho, max_iter=params["max_iter"], tol=params["tol"],
                           callback=self._progress_callback())
        timings["solver"] = time.perf_counter() - t0
        logger.info("solver: %d iterations, converged=%s (%.2f s)", info["n_iterations"],
                    info["converged"], timings["solver"])
        if not info["converged"]:
            warn_not_converged(params, info["final_change"], stacklevel=4)

        proportions, all_zero = normalize_proportions(beta)
        self.__dict__.pop("refine_", None)  # a refit without refinement has none
        if params["refine"] != "none":
            t0 = time.perf_counter()
            proportions, self.refine_ = self._refine(Y, X, genes, transform, proportions,
                                                     totals, params["refine"])
            timings["refine"] = time.perf_counter() - t0
            logger.info("refine %r: %s (%.2f s)", self.refine_["mode"], self.refine_,
                        timings["refine"])
        info.update(final_objective=objective(beta, H, gram, float(ysq.sum()), A, lam, rho),
                    XtX=gram, n_neighbors=degree, timings=timings)
        self.n_spots_, self.n_genes_, self.n_cell_types_ = n_spots, n_genes, X.shape[0]
        self.cell_type_names_ = None if cell_type_names is None else np.asarray(cell_type_names)
        self.gene_idx_ = genes
        self.leverage_scores_ = leverage
        self.gene_weights_ = transform.rep.coef if params["gene_weighting"] == "expected" else None
        self.X_repr_ = transform.rep.X_repr
        self.lambda_used_, self.rho_used_ = lam, rho
        self.adjacency_ = A
        self.H_, self.ysq_ = H, ysq
        self.beta_, self.proportions_ = beta, proportions
        self.zero_signal_ = all_zero | (totals <= 0)
        self.info_ = info
        self._transform_ = transform
        self._Y, self._X = Y, X
        return self

    @staticmethod
    def _refine(Y, X, genes, transform, start, depth, refine) -> tuple[np.ndarray, dict]:
        """Phase 1 on the subsample, phase 2 on every chunk (core.refine)."""
        n_spots = Y.shape[0]
        mode = refine_math.resolve(refine)
        mu = refine_math.profiles(X, genes)
        rows = np.flatnonzero(refine_math.in_subsample(np.arange(n_spots), n_spots))
        subsample = Y[rows][:, genes]
        positive = depth[depth > 0]
        depth_range = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 1.0)
        model = refine_math.fit_global(sparse.csr_matrix(subsample), start[rows], mu, mode,
                                       depth_range)
        proportions = np.empty_like(start)
        failed = np.zeros(n_spots, bool)
        for row, indptr, indices, data in csr_chunks(Y):
            stop = row + len(indptr) - 1
            proportions[row:stop], failed[row:stop] = refine_math.refine_rows(
                indptr, indices, data, transform.gene_pos, model, start[row:stop])
        failed_rows = np.flatnonzero(failed)
        ok = refine_math.warn_refinement(model, failed_rows.size, failed_rows[:5], n_spots,
                                         stacklevel=6)
        return proportions, {**model.record(), "ok": ok, "factors": model.factors,
                             "failed": failed_rows}

    def fit_transform(self, Y, X, coords, **kwargs) -> np.ndarray:
        """``fit`` and return the proportions (N x K, rows sum to 1)."""
        return self.fit(Y, X, coords, **kwargs).proportions_

    @staticmethod
    def _project(Y, transform, n_spots, **resample):
        K = transform.rep.X_repr.shape[0]
        H, ysq, totals = np.empty((n_spots, K)), np.empty(n_spots), np.empty(n_spots)
        for start, indptr, indices, data in csr_chunks(Y):
            stop = start + len(indptr) - 1
            H[start:stop], ysq[start:stop], totals[start:stop] = project(
                indptr, indices, data, transform, row_offset=start, **resample)
        return H, ysq, totals

    def _progress_callback(self):
        if not self.verbose:
            return None

        def report(iteration, change, beta):
            if iteration % 10 == 0:
                logger.info("  iteration %d: change %.3e", iteration, change)
        return report

    # ------------------------------------------------------------------ results
    def _check_fitted(self) -> None:
        check_fitted(self, "beta_")

    def _check_unrefined(self, what: str) -> None:
        if hasattr(self, "refine_"):
            raise InputError(f"{what} describes the base fit, not refine={self.refine!r}; fit "
                             "with refine='none' for intervals")

    def get_cell_type_proportions(self) -> np.ndarray:
        self._check_fitted()
        return self.proportions_

    def get_abundances(self) -> np.ndarray:
        self._check_fitted()
        return self.beta_

    def get_dominant_cell_type(self) -> np.ndarray:
        """Index of the largest proportion per spot."""
        self._check_fitted()
        return np.argmax(self.proportions_, axis=1)

    def summary(self) -> dict[str, Any]:
        """Parameters and fit statistics (``{"fitted": False}`` before ``fit``)."""
        if not hasattr(self, "beta_"):
            return {"fitted": False}
        return {
            "fitted": True,
            "n_spots": self.n_spots_,
            "n_cell_types": self.n_cell_types_,
            "n_genes_used": int(self.gene_idx_.size),
            "sketch_dim": self.sketch_dim,
            "gene_weighting": self.gene_weighting,
            "representation_dim": int(self.X_repr_.shape[1]),
            "lambda_spatial": self.lambda_used_,
            "rho_sparsity": self.rho_sparsity,
            "preprocess_method": self.preprocess,
            "converged": self.info_["converged"],
            "n_iterations": self.info_["n_iterations"],
            "final_objective": self.info_["final_objective"],
            "n_zero_signal": int(self.zero_signal_.sum()),
        }

    # ------------------------------------------------------------------ uncertainty
    def compute_uncertainty(self, alpha: float = 0.05, method: str = "sandwich",
                            fdr_q: float = 0.1) -> dict[str, Any]:
        """Model-based intervals for the proportions (opt-in; one more pass over Y).

        ``method``: "sandwich" (HC0 robust, default), "model" (``s^2 H_A^-1``) or the
        deprecated "laplace_diag". Returns (and stores in ``uncertainty_``) ``se_prop``,
        ``ci_lower``/``ci_upper``, ``z_score``, ``p_value``, ``detected`` (BH at
        ``fdr_q``), ``entropy``, ``residual_ss``, ``residual_norm`` and ``mean_ci_width``.
        These describe count sampling under the fitted model, not reference mismatch.
        """
        self._check_fitted()
        self._check_unrefined("compute_uncertainty")
        if method not in ("sandwich", "model", "laplace_diag"):
            raise InputError(f"method must be 'sandwich', 'model' or 'laplace_diag', got {method!r}")
        if not 0.0 < alpha < 1.0:
            raise InputError(f"alpha must be in (0, 1), got {alpha}")
        from scipy.stats import norm

        beta = self.beta_
        degree = self.info_["n_neighbors"]
        nsum = np.asarray(self.adjacency_ @ beta)
        rho = self.rho_used_
        parts = []
        for start, indptr, indices, data in csr_chunks(self._Y):
            stop = start + len(indptr) - 1
            parts.append(active_set_intervals(
                indptr, indices, data, self._transform_, beta[start:stop], degree[start:stop],
                nsum[start:stop], self.lambda_used_, rho, alpha,
                "model" if method == "model" else "sandwich"))
        res = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        residual_ss = res.pop("residual_ss")
        uq: dict[str, Any] = {
            "entropy": entropy(self.proportions_),
            "residual_ss": residual_ss,
            "residual_norm": residual_ss / np.maximum(self.ysq_, 1e-10),
            "method": method,
            "alpha": alpha,
        }
        z = norm.ppf(1 - alpha / 2)
        if method == "laplace_diag":
            warnings.warn("method='laplace_diag' ignores collinearity between cell types and "
                          "under-covers; use method='sandwich'", DeprecationWarning, stacklevel=2)
            var_prop = laplace_diagonal_variance(beta, self.info_["XtX"], residual_ss,
                                                 self.X_repr_.shape[1], self.lambda_used_, degree)
            se = np.sqrt(np.maximum(var_prop, 0))
            uq.update(ci_lower=np.clip(self.proportions_ - z * se, 0, 1),
                      ci_upper=np.clip(self.proportions_ + z * se, 0, 1),
                      detection_confident=np.clip(self.proportions_ - z * se, 0, 1) > 0.01)
        else:
            se = res["se_prop"]
            p_value, detected = one_sided_tests(res["z_score"], fdr_q)
            uq.update(ci_lower=res["ci_lower"], ci_upper=res["ci_upper"], z_score=res["z_score"],
                      p_value=p_value, detected=detected, detection_confident=detected, fdr_q=fdr_q)
        cv = np.zeros_like(self.proportions_)
        nonzero = (self.proportions_ > 1e-6) & np.isfinite(se)
        cv[nonzero] = se[nonzero] / self.proportions_[nonzero]
        uq.update(se_prop=se, var_prop=se**2, ci_half_width=z * se, cv=cv,
                  mean_ci_width=float(np.mean(uq["ci_upper"] - uq["ci_lower"])))
        self.uncertainty_ = uq
        return uq

    def bootstrap_uncertainty(self, n_bootstrap: int = 100, max_iter_boot: int | None = None,
                              seed: int = 42, verbose: bool = False, tol: float | None = None,
                              alpha: float = 0.05) -> dict[str, Any]:
        """Parametric Poisson bootstrap, streamed: replicates are never held together.

        Each replicate draws ``Y* ~ Poisson(Y)`` on the used genes (per-spot random streams
        keyed by the seed: independent of chunking and workers), applies the same
        preprocessing and weights, and re-solves with the fitted lambda and rho from
        ``beta_``. Only the running mean/variance and the few extreme values needed for
        the exact percentile interval are kept.
        """
        self._check_fitted()
        self._check_unrefined("bootstrap_uncertainty")
        if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
            raise InputError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
        if not 0.0 < alpha < 1.0:
            raise InputError(f"alpha must be in (0, 1), got {alpha}")
        max_iter = self.max_iter if max_iter_boot is None else max_iter_boot
        tol = self.tol if tol is None else tol
        stats = OrderStatistics(n_bootstrap, alpha, self.beta_.shape)
        n_iterations = np.zeros(n_bootstrap, np.int64)
        final_change = np.zeros(n_bootstrap)
        converged = np.zeros(n_bootstrap, bool)
        transform = self._transform_
        with verbose_logging(verbose):
            for b in range(n_bootstrap):
                if self.preprocess == "pearson":
                    transform = self._resampled_pearson_transform(seed, b)
                H, _, _ = self._project(self._Y, transform, self.n_spots_, seed=seed, replicate=b)
                beta, info = solve(H, self.info_["XtX"], self.adjacency_, self.lambda_used_,
                                   self.rho_used_, max_iter=max_iter, tol=tol, beta_init=self.beta_)
                stats.add(normalize_proportions(beta)[0])
                n_iterations[b], final_change[b] = info["n_iterations"], info["final_change"]
                converged[b] = info["converged"]
                logger.info("bootstrap %d/%d: %d iterations", b + 1, n_bootstrap,
                            info["n_iterations"])
        if not converged.all():
            warnings.warn(f"{(~converged).sum()} of {n_bootstrap} bootstrap refits did not reach "
                          f"tol={tol} in {max_iter} iterations", RuntimeWarning, stacklevel=2)
        lower, upper = stats.interval()
        cv = np.zeros_like(stats.mean)
        nonzero = stats.mean > 1e-6
        cv[nonzero] = stats.std[nonzero] / stats.mean[nonzero]
        self.bootstrap_ = {
            "boot_mean": stats.mean, "boot_std": stats.std, "boot_ci_lower": lower,
            "boot_ci_upper": upper, "boot_cv": cv, "n_bootstrap": n_bootstrap,
            "n_converged": int(converged.sum()), "n_iterations": n_iterations,
            "final_change": final_change, "warm_start": True,
        }
        return self.bootstrap_

    def _resampled_pearson_transform(self, seed: int, replicate: int) -> SpotTransform:
        """Pearson scaling recomputed from the gene means of one resampled data set."""
        base = self._transform_
        sums = np.zeros(self.gene_idx_.size)
        for start, indptr, indices, data in csr_chunks(self._Y):
            sums += selected_gene_sums(indptr, indices, data, base.gene_pos, self.gene_idx_.size,
                                       seed=seed, replicate=replicate, row_offset=start)
        scale = spot_gene_scale("pearson", sums / self.n_spots_, self.gene_idx_.size)
        return SpotTransform(base.gene_pos, base.mode, scale, base.rep)
