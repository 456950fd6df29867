"""Refinement of a FlashDeconv fit on the raw counts: a negative-binomial weighted NNLS
with gene-wise platform factors (``refine="nb"``, what ``"auto"`` means), or the same with
Poisson variances and no factors (``refine="wls"``). Written down in docs/REFINE.md.

Model, for spot i and used gene g (mu_k = row k of the reference profiles X, scaled to
sum 1 over all genes, floored at 1e-7):

    E y_ig = f_g sum_k a_ik mu_kg,        Var y_ig = n_i e_g (1 + n_i e_g / theta)

a_ik >= 0 are the transcripts of spot i from type k, f_g a platform factor shared by all
spots (the reference's technology differs from the spots'), n_i the spot's count on the
used genes, e_g = f_g mb_g / sum f mb the pooled expected share of gene g (mb = A0 mu with
A0 the warm start's pooled abundances) and theta one negative-binomial dispersion. With the
variance fixed at its pooled value, each spot solves an exact non-negative weighted least
squares problem

    min_{a >= 0}  1/2 a' Gamma(n_i) a - h_i' a,
    h_i = sum_g y_ig f_g mu_g / (e_g (1 + n_i e_g / theta)),
    Gamma(n) = sum_g f_g^2 mu_g mu_g' / (e_g (1 + n e_g / theta)),

by the solver's active-set method; Gamma is tabulated on 24 log-spaced depths and
interpolated. Global parameters (f, theta) come from a subsample of at most
``SUBSAMPLE`` spots (the spots whose input row is a multiple of a stride: the same spots
in memory and in a store); then one pass over all spots computes every h_i and solves.
Proportions are a_i / sum_k a_ik: the fraction of a spot's transcripts from each type.

:func:`fit_global` is phase 1 (the client, from the subsample); :func:`refine_rows` is
phase 2, called on the whole matrix in memory and per block by the engine.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit, prange
from scipy import sparse

from .solver import _active_set

#: Spots at most in the subsample that estimates the gene factors and the dispersion
#: (2k and 10k gave the same accuracy as all spots at 100k).
SUBSAMPLE = 10_000
#: Depths on which Gamma(n) is tabulated (400 points changed proportions by <= 2e-6).
GRID_POINTS = 24
#: Profile floor: a gene a type never expresses still has a small expected share.
PROFILE_FLOOR = 1e-7
#: Rounds of phase 1 at most (10-20 are used in practice).
MAX_ROUNDS = 50


@dataclass
class RefineModel:
    """The global part of a refinement (phase 1) and everything phase 2 needs."""

    mode: str
    mu: np.ndarray  # (K, G_sel) profiles on the used genes
    factors: np.ndarray  # (G_sel,) platform factors f
    share: np.ndarray  # (G_sel,) pooled expected shares e
    inv_theta: float
    log_grid: np.ndarray  # (m,) log depths of the Gamma table
    grams: np.ndarray  # (m, K, K)
    converged: bool
    n_rounds: int
    prior_variance: float = float("nan")  # empirical-Bayes variance of log f

    @property
    def loadings(self) -> np.ndarray:
        """(G_sel, K) per-gene weights of h_i before the depth term."""
        return np.ascontiguousarray((self.mu * (self.factors / self.share)).T)

    def record(self) -> dict:
        """Storable summary (``uns[key + '_params']['refine']``)."""
        return {"mode": self.mode, "converged": bool(self.converged),
                "n_rounds": int(self.n_rounds), "dispersion": float(1 / self.inv_theta)
                if self.inv_theta > 0 else float("inf"),
                "factor_log_sd": float(np.std(np.log(self.factors))),
                "factor_prior_variance": float(self.prior_variance)}

    def to_arrays(self) -> dict:
        """The model as plain arrays (recorded in a store to resume phase 2)."""
        return {"factors": self.factors, "share": self.share, "log_grid": self.log_grid,
                "inv_theta": np.array([self.inv_theta]), "grams": self.grams,
                "state": np.array([float(self.converged), float(self.n_rounds),
                                   self.prior_variance])}

    @classmethod
    def from_arrays(cls, mode: str, mu: np.ndarray, arrays: dict) -> "RefineModel":
        state = np.asarray(arrays["state"])
        return cls(mode, mu, np.asarray(arrays["factors"]), np.asarray(arrays["share"]),
                   float(np.asarray(arrays["inv_theta"])[0]), np.asarray(arrays["log_grid"]),
                   np.asarray(arrays["grams"]), bool(state[0]), int(state[1]), float(state[2]))


def resolve(refine: str) -> str:
    """The refinement a ``refine`` value names ("auto" is the most accurate one)."""
    from .params import AUTO_REFINEMENT

    return AUTO_REFINEMENT if refine == "auto" else refine


def profiles(X: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """(K, G_sel) profiles: each type's mean counts scaled to sum 1 over all genes of X,
    floored, restricted to the used ``genes``."""
    X = np.asarray(X, np.float64)
    mu = X / np.maximum(X.sum(axis=1, keepdims=True), 1e-300)
    mu = np.maximum(mu, PROFILE_FLOOR)
    mu /= mu.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(mu[:, genes])


def subsample_stride(n_spots: int, size: int = SUBSAMPLE) -> int:
    return max(1, int(np.ceil(n_spots / size)))


def in_subsample(input_rows: np.ndarray, n_spots: int) -> np.ndarray:
    """Mask of the spots of phase 1: input row a multiple of the stride (the same spots
    whatever the order or blocking of the rows)."""
    return np.asarray(input_rows) % subsample_stride(n_spots) == 0


# ----------------------------------------------------------------------------- kernels

@njit(parallel=True, cache=True)
def _spot_sums(indptr, indices, data, gene_pos, load, share, inv_theta, h, depth):
    """h_i = sum_g y_ig load_g / (1 + n_i e_g / theta) and n_i (counts on the used genes)
    of every row of a CSR chunk."""
    n = indptr.shape[0] - 1
    K = load.shape[1]
    n_parts = min(max(n // 64, 1), 1024)
    for part in prange(n_parts):
        acc = np.empty(K)
        for i in range(part * n // n_parts, (part + 1) * n // n_parts):
            total = 0.0
            for q in range(indptr[i], indptr[i + 1]):
                if gene_pos[indices[q]] >= 0:
                    total += data[q]
            depth[i] = total
            acc[:] = 0.0
            scale = total * inv_theta
            for q in range(indptr[i], indptr[i + 1]):
                g = gene_pos[indices[q]]
                if g >= 0:
                    w = data[q] / (1.0 + scale * share[g])
                    for k in range(K):
                        acc[k] += w * load[g, k]
            for k in range(K):
                h[i, k] = acc[k]


@njit(cache=True)
def _interpolated_gram(grams, log_grid, log_depth, Q):
    m = log_grid.shape[0]
    if log_depth <= log_grid[0]:
        j, t = 0, 0.0
    elif log_depth >= log_grid[m - 1]:
        j, t = m - 2, 1.0
    else:
        lo, hi = 0, m - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if log_grid[mid] <= log_depth:
                lo = mid
            else:
                hi = mid
        j = lo
        t = (log_depth - log_grid[j]) / (log_grid[j + 1] - log_grid[j])
    K = Q.shape[0]
    for k in range(K):
        for l in range(K):
            Q[k, l] = (1.0 - t) * grams[j, k, l] + t * grams[j + 1, k, l]


@njit(parallel=True, cache=True)
def _solve_spots(h, depth, grams, log_grid, start, out, failed):
    """Per-spot NNLS ``min 1/2 a'Gamma(n_i)a - h_i'a``, exact, warm-started from the
    support of ``start``; spots without counts keep ``start``. ``failed[i]``: the active
    set met a singular block (the spot keeps ``start``)."""
    n, K = h.shape
    n_parts = min(max(n // 64, 1), 1024)
    for part in prange(n_parts):
        Q = np.empty((K, K))
        L = np.empty((K, K))
        c = np.empty(K)
        z = np.empty(K)
        free = np.empty(K, np.int64)
        free_mask = np.empty(K, np.bool_)
        for i in range(part * n // n_parts, (part + 1) * n // n_parts):
            b = out[i]
            failed[i] = False
            if depth[i] <= 0.0:
                b[:] = start[i]
                continue
            _interpolated_gram(grams, log_grid, np.log(depth[i]), Q)
            n_positive = 0
            for k in range(K):
                c[k] = h[i, k]
                b[k] = start[i, k]
                free_mask[k] = b[k] > 0.0
                n_positive += free_mask[k]
            if n_positive == K and K > 3:
                b[:] = 0.0
                free_mask[:] = False
            if not _active_set(Q, c, b, free_mask, L, z, free):
                b[:] = start[i]
                failed[i] = True


# ----------------------------------------------------------------------------- phase 1

def _starting_abundances(proportions: np.ndarray, depth: np.ndarray, mu_f: np.ndarray):
    """Warm start a_i = p_i scaled so that its expected count equals the spot's depth."""
    expected = proportions @ mu_f.sum(axis=1)
    return proportions * (depth / np.maximum(expected, 1e-300))[:, None]


def start_proportions(beta: np.ndarray) -> np.ndarray:
    """Row-normalised warm start (uniform where the base fit is all zero)."""
    beta = np.maximum(np.asarray(beta, np.float64), 0.0)
    total = beta.sum(axis=1, keepdims=True)
    return np.where(total > 0, beta / np.where(total > 0, total, 1.0), 1.0 / beta.shape[1])


def _shrunk_factors(counts: np.ndarray, predicted: np.ndarray, min_count: float = 10.0):
    """Gene factors f_g = Ysum_g / predicted_g (Poisson MLE given the pooled abundances),
    centred to a count-weighted geometric mean of 1 and shrunk to 1 by empirical Bayes:
    log f_g ~ N(0, s2) with sampling variance 1/Ysum_g."""
    y = np.maximum(counts, 0.5)
    weight = np.maximum(counts, 0.0)
    log_f = np.log(y / np.maximum(predicted, 1e-300))
    log_f -= np.sum(weight * log_f) / max(weight.sum(), 1e-300)
    enough = counts >= min_count
    s2 = max(float(np.mean(log_f[enough] ** 2 - 1.0 / counts[enough])), 0.0) if enough.any() else 0.0
    log_f *= s2 / (s2 + 1.0 / y)
    log_f -= np.sum(weight * log_f) / max(weight.sum(), 1e-300)
    return np.exp(np.maximum(log_f, np.log(1e-3))), s2


def _gram_table(mu, factors, share, inv_theta, log_grid):
    weight = factors**2 / share
    out = np.empty((log_grid.size, mu.shape[0], mu.shape[0]))
    for j, depth in enumerate(np.exp(log_grid)):
        out[j] = (mu * (weight / (1.0 + depth * share * inv_theta))) @ mu.T
    return out


def depth_grid(min_depth: float, max_depth: float, inv_theta: float) -> np.ndarray:
    """Log depths of the Gamma table (two points when Gamma does not depend on depth)."""
    if inv_theta <= 0 or not (max_depth > 0):
        return np.array([0.0, 1.0])
    lo, hi = np.log(max(min_depth, 1e-300)), np.log(max_depth)
    return np.linspace(lo, max(hi, lo + 1e-3), GRID_POINTS)


def fit_global(sub_counts: sparse.csr_matrix, sub_start: np.ndarray, mu: np.ndarray,
               mode: str, depth_range: tuple[float, float], *, max_rounds: int | None = None,
               tol: float = 1e-3) -> RefineModel:
    """Phase 1 on the subsample: ``sub_counts`` (n_sub x G_sel, the used genes),
    ``sub_start`` their warm-start proportions, ``mu`` the profiles; ``depth_range`` the
    smallest positive and the largest depth over all spots (for the Gamma table).

    Alternates per-spot NNLS (Poisson variance) with the gene factors until no factor
    moves by more than ``tol`` on the log scale (``"nb"``), then sets the dispersion by
    moments. ``"wls"`` keeps f = 1 and Poisson variances."""
    sub_counts = sparse.csr_matrix(sub_counts, dtype=np.float64)
    n_sub, n_genes = sub_counts.shape
    gene_pos = np.arange(n_genes, dtype=np.int64)
    depth = np.asarray(sub_counts.sum(axis=1)).ravel()
    counts = np.asarray(sub_counts.sum(axis=0)).ravel()
    abundance = _starting_abundances(sub_start, depth, mu)
    pooled = np.maximum(abundance.sum(axis=0) @ mu, 1e-300)  # mb
    h_poisson, _ = _sums(sub_counts, gene_pos, np.ascontiguousarray((mu / pooled).T),
                         pooled, 0.0)
    factors = np.ones(n_genes)
    prior_variance = float("nan")
    two_point = np.array([0.0, 1.0])
    failed = np.zeros(n_sub, np.bool_)
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    converged, rounds = mode != "nb", 0
    for rounds in range(1, (max_rounds if mode == "nb" else 1) + 1):
        total = float((factors * pooled).sum())
        share = factors * pooled / total
        gram = (mu * (factors**2 / share)) @ mu.T
        solved = np.empty_like(abundance)
        _solve_spots(h_poisson * total, depth, np.stack([gram, gram]), two_point, abundance,
                     solved, failed)
        abundance = solved
        if mode != "nb":
            break
        new, prior_variance = _shrunk_factors(counts, abundance.sum(axis=0) @ mu)
        step = float(np.abs(np.log(new) - np.log(factors)).max())
        factors = new
        if step < tol:
            converged = True
            break
    total = float((factors * pooled).sum())
    share = factors * pooled / total
    inv_theta = 0.0
    if mode == "nb":
        mu_f = mu * factors
        h_f, _ = _sums(sub_counts, gene_pos, np.ascontiguousarray(mu_f.T), pooled, 0.0)
        sum_ym = float(np.sum(abundance * h_f))
        sum_m2 = float(np.sum((abundance.T @ abundance) * (mu_f @ mu_f.T)))
        sum_m = float(np.sum(abundance.sum(axis=0) @ mu_f))
        sum_y2 = float(sub_counts.multiply(sub_counts).sum())
        inv_theta = max((sum_y2 - 2.0 * sum_ym + sum_m2 - sum_m) / max(sum_m2, 1e-300), 0.0)
    log_grid = depth_grid(*depth_range, inv_theta)
    grams = _gram_table(mu, factors, share, inv_theta, log_grid)
    return RefineModel(mode, mu, factors, share, inv_theta, log_grid, grams, converged, rounds,
                       prior_variance)


def _sums(counts: sparse.csr_matrix, gene_pos, load, share, inv_theta):
    n = counts.shape[0]
    h, depth = np.empty((n, load.shape[1])), np.empty(n)
    _spot_sums(counts.indptr, counts.indices, counts.data, gene_pos, load, share, inv_theta,
               h, depth)
    return h, depth


# ----------------------------------------------------------------------------- phase 2

def refine_rows(indptr, indices, data, gene_pos: np.ndarray, model: RefineModel,
                start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phase 2 on a CSR row chunk (``gene_pos``: column -> used-gene position or -1):
    refined proportions and the mask of spots whose solve failed (they keep ``start``)."""
    n, K = start.shape
    h, depth = np.empty((n, K)), np.empty(n)
    mu_f = model.mu * model.factors
    _spot_sums(indptr, indices, data, gene_pos, model.loadings, model.share, model.inv_theta,
               h, depth)
    abundance = _starting_abundances(start, depth, mu_f)
    out = np.empty_like(abundance)
    failed = np.zeros(n, np.bool_)
    _solve_spots(h, depth, model.grams, model.log_grid, abundance, out, failed)
    total = out.sum(axis=1, keepdims=True)
    proportions = np.where(total > 0, out / np.where(total > 0, total, 1.0), start)
    return proportions, failed


def warn_refinement(model: RefineModel, n_failed: int, examples, n_spots: int,
                    stacklevel: int = 3) -> bool:
    """Warn when phase 1 did not converge or spots could not be refined (``examples``: the
    first few of their names); True if all went well (the command line exits with 3
    otherwise)."""
    ok = True
    if not model.converged:
        warnings.warn(f"refine={model.mode!r}: the gene factors did not converge in "
                      f"{model.n_rounds} rounds", RuntimeWarning, stacklevel=stacklevel)
        ok = False
    if n_failed:
        shown = ", ".join(str(s) for s in list(examples)[:5])
        warnings.warn(f"refine={model.mode!r}: {n_failed} of {n_spots} spots could not "
                      f"be refined and keep the base fit (e.g. {shown})", RuntimeWarning,
                      stacklevel=stacklevel)
        ok = False
    return ok
