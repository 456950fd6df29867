"""Uncertainty of the fitted abundances: sandwich / model variances and the bootstrap.

All quantities are conditional on the fitted model (reference, genes, penalties): they
describe count-sampling variability, not reference mismatch.

- :func:`active_set_intervals` (a row-chunk kernel): per spot, the Hessian on the active
  set ``A = {k : beta_ik > 0}`` is ``H_A = Gram_AA + lambda deg_i I``; the covariance is
  ``H_A^-1 M_AA H_A^-1`` with ``M = X diag(e^2) X^T`` (``e`` the spot's residual in the
  solver's space) or ``s^2 H_A^-1``; the delta method carries it to proportions. A type
  at zero gets a one-sided interval ``[0, u]`` from one Newton step on ``A + {k}``.
- :class:`OrderStatistics` keeps the exact percentile interval of a stream of bootstrap
  replicates without holding them: only the few smallest and largest values per entry.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy.stats import norm

from .project import SpotTransform, _parts, gather_row, max_row_nnz

#: z-statistic reported when a standard error is exactly zero.
Z_CAP = 50.0


@njit(cache=True)
def _spot_intervals(y, X, gram, b, deg, nsum, lam, rho, z, sandwich, lo, hi, se, zstat):
    K, p = X.shape
    active = np.flatnonzero(b > 0.0)
    na = active.size
    e = y.copy()
    for a in active:
        for g in range(p):
            e[g] -= b[a] * X[a, g]
    ee = 0.0
    for g in range(p):
        ee += e[g] * e[g]
    total = 0.0
    for a in active:
        total += b[a]
    if total <= 0.0:
        lo[:] = 0.0
        hi[:] = 1.0
        se[:] = np.nan
        zstat[:] = 0.0
        return ee
    grad = np.zeros(K)
    m_diag = np.zeros(K)
    m_act = np.zeros((na, K))
    for k in range(K):
        if b[k] <= 0.0:
            acc = 0.0
            for g in range(p):
                acc += X[k, g] * e[g]
            grad[k] = acc
    if sandwich:
        for k in range(K):
            acc = 0.0
            for g in range(p):
                acc += X[k, g] * X[k, g] * e[g] * e[g]
            m_diag[k] = acc
        for u in range(na):
            a = active[u]
            for k in range(K):
                acc = 0.0
                for g in range(p):
                    acc += X[a, g] * X[k, g] * e[g] * e[g]
                m_act[u, k] = acc
    pen = lam * deg
    h_act = np.empty((na, na))
    for u in range(na):
        for v in range(na):
            h_act[u, v] = gram[active[u], active[v]]
        h_act[u, u] += pen
    h_inv = np.linalg.pinv(h_act)
    if sandwich:
        m_aa = np.empty((na, na))
        for u in range(na):
            for v in range(na):
                m_aa[u, v] = m_act[u, active[v]]
        cov = h_inv @ m_aa @ h_inv
    else:
        cov = (ee / max(p - na, 1)) * h_inv
    row = cov.sum(axis=1)
    grand = row.sum()
    for u in range(na):
        k = active[u]
        pk = b[k] / total
        var = (cov[u, u] - 2.0 * pk * row[u] + pk * pk * grand) / (total * total)
        sd = np.sqrt(max(var, 0.0))
        se[k] = sd
        lo[k] = min(max(pk - z * sd, 0.0), 1.0)
        hi[k] = min(max(pk + z * sd, 0.0), 1.0)
        sb = np.sqrt(max(cov[u, u], 0.0))
        zstat[k] = b[k] / sb if sb > 0.0 else Z_CAP
    h = np.empty(na)
    for k in range(K):
        if b[k] > 0.0:
            continue
        for u in range(na):
            h[u] = gram[active[u], k]
        v = h_inv @ h
        schur = gram[k, k] + pen
        for u in range(na):
            schur -= h[u] * v[u]
        lo[k] = 0.0
        if schur <= 1e-12 * (gram[k, k] + pen + 1e-300):
            hi[k] = 1.0
            se[k] = np.nan
            zstat[k] = 0.0
            continue
        step = (grad[k] + lam * nsum[k] - rho) / schur
        if sandwich:
            q = m_diag[k]
            for u in range(na):
                q -= 2.0 * v[u] * m_act[u, k]
                for t in range(na):
                    q += v[u] * v[t] * m_act[u, active[t]]
            var_k = q / (schur * schur)
        else:
            var_k = (ee / max(p - na - 1, 1)) / schur
        sk = np.sqrt(max(var_k, 0.0))
        upper = max(step + z * sk, 0.0)
        hi[k] = min(upper / (total + upper), 1.0)
        se[k] = sk / total
        if sk > 0.0:
            zstat[k] = step / sk
        else:
            zstat[k] = -Z_CAP if step <= 0.0 else Z_CAP
    return ee


@njit(parallel=True, cache=True)
def _intervals_kernel(indptr, indices, data, gene_pos, mode, gene_scale, column, coef, X, gram,
                      beta, degree, nsum, lam, rho, z, sandwich, max_row_nnz, n_parts):
    n_rows = indptr.shape[0] - 1
    K, p = X.shape
    lo = np.zeros((n_rows, K))
    hi = np.zeros((n_rows, K))
    se = np.zeros((n_rows, K))
    zstat = np.zeros((n_rows, K))
    residual_ss = np.zeros(n_rows)
    for part in prange(n_parts):
        pos = np.empty(max_row_nnz, np.int64)
        val = np.empty(max_row_nnz)
        y = np.zeros(p)
        for i in range(part * n_rows // n_parts, (part + 1) * n_rows // n_parts):
            n, _ = gather_row(i, indptr, indices, data, gene_pos, mode, gene_scale, -1, 0, 0,
                              pos, val)
            y[:] = 0.0
            for t in range(n):
                y[column[pos[t]]] += val[t] * coef[pos[t]]
            residual_ss[i] = _spot_intervals(y, X, gram, beta[i].copy(), degree[i], nsum[i], lam,
                                             rho, z, sandwich, lo[i], hi[i], se[i], zstat[i])
    return lo, hi, se, zstat, residual_ss


def active_set_intervals(indptr, indices, data, transform: SpotTransform, beta, degree, nsum,
                         lam, rho, alpha=0.05, variance="sandwich"):
    """Per-spot intervals of a CSR row chunk; ``beta``, ``degree``, ``nsum`` are its rows.

    Returns ``ci_lower``, ``ci_upper``, ``se_prop``, ``z_score`` (one-sided Wald statistic
    for abundance > 0) and ``residual_ss`` (squared residual norm in the solver's space).
    """
    if variance not in ("sandwich", "model"):
        raise ValueError(f"variance must be 'sandwich' or 'model', got {variance!r}")
    rep = transform.rep
    lo, hi, se, zstat, residual_ss = _intervals_kernel(
        indptr, indices, data, transform.gene_pos, transform.mode, transform.gene_scale,
        rep.column, rep.coef, np.ascontiguousarray(rep.X_repr), rep.gram,
        np.ascontiguousarray(beta, np.float64), np.ascontiguousarray(degree, np.float64),
        np.ascontiguousarray(nsum, np.float64), float(lam), float(rho),
        float(norm.ppf(1 - alpha / 2)), variance == "sandwich",
        max(max_row_nnz(indptr), 1), _parts(len(indptr) - 1),
    )
    return {"ci_lower": lo, "ci_upper": hi, "se_prop": se, "z_score": zstat,
            "residual_ss": residual_ss}


def benjamini_hochberg(pvalues: np.ndarray, q: float = 0.1) -> np.ndarray:
    """Step-up BH rejections over all entries; NaN p-values are never rejected."""
    if not 0 < q < 1:
        raise ValueError(f"fdr_q must be in (0, 1), got {q}")
    flat = np.asarray(pvalues, dtype=np.float64).ravel()
    finite = np.flatnonzero(np.isfinite(flat))
    reject = np.zeros(flat.shape, bool)
    if finite.size:
        order = finite[np.argsort(flat[finite], kind="stable")]
        passed = np.flatnonzero(flat[order] <= q * np.arange(1, finite.size + 1) / finite.size)
        if passed.size:
            reject[order[: passed[-1] + 1]] = True
    return reject.reshape(np.shape(pvalues))


def entropy(proportions: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each spot's proportions."""
    p = np.clip(proportions, 1e-10, 1.0)
    return -np.sum(p * np.log(p), axis=1)


def one_sided_tests(z_score: np.ndarray, fdr_q: float):
    """p-values of the one-sided Wald tests and their BH detection calls."""
    p_value = norm.sf(z_score)
    return p_value, benjamini_hochberg(p_value, fdr_q)


def laplace_diagonal_variance(beta, gram, residual_ss, dim, lam, degree):
    """Deprecated ``sigma^2 / (Gram_kk + lambda deg_i)`` variance of the proportions."""
    active = beta > 0
    sigma2 = residual_ss / np.maximum(dim - active.sum(axis=1), 1.0)
    var_beta = np.where(active, sigma2[:, None] / (np.diag(gram)[None, :] + lam * degree[:, None]),
                        0.0)
    return var_beta / np.maximum(beta.sum(axis=1, keepdims=True) ** 2, 1e-20)


class OrderStatistics:
    """Exact streaming percentile interval, mean and standard deviation of replicates.

    ``np.percentile``'s linear interpolation at level q over B values needs the order
    statistics ``floor((B-1) q)`` and the next one; for a two-sided interval at level
    ``alpha`` these are among the ``m = floor((B-1) alpha/2) + 2`` smallest and largest
    values, so only ``2 m`` arrays of the replicate's shape are kept, not ``B``.
    """

    def __init__(self, n_replicates: int, alpha: float, shape):
        self.n_replicates = n_replicates
        self.alpha = alpha
        self.m = min(int(np.floor((n_replicates - 1) * alpha / 2)) + 2, n_replicates)
        self.smallest = np.full((self.m, *shape), np.inf)
        self.largest = np.full((self.m, *shape), -np.inf)
        self.count = 0
        self.mean = np.zeros(shape)
        self._m2 = np.zeros(shape)

    def add(self, value: np.ndarray) -> None:
        """Fold in one replicate (Welford for mean/variance)."""
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (value - self.mean)
        self.smallest = np.sort(np.concatenate([self.smallest, value[None]]), axis=0)[: self.m]
        self.largest = np.sort(np.concatenate([self.largest, value[None]]), axis=0)[-self.m:]

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), as ``np.std``."""
        return np.sqrt(self._m2 / max(self.count, 1))

    def _percentile(self, level: float, low_side: bool) -> np.ndarray:
        position = (self.count - 1) * level
        below = int(np.floor(position))
        frac = position - below
        above = min(below + 1, self.count - 1)
        if low_side:
            first, second = self.smallest[below], self.smallest[above]
        else:
            # index r from the top among the largest (sorted ascending, last = maximum)
            top = self.largest.shape[0] - self.count
            first, second = self.largest[top + below], self.largest[top + above]
        return first + (second - first) * frac

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval ``(alpha/2, 1 - alpha/2)`` with linear interpolation."""
        if self.count != self.n_replicates:
            raise RuntimeError(f"{self.count} of {self.n_replicates} replicates added")
        return (self._percentile(self.alpha / 2, True),
                self._percentile(1 - self.alpha / 2, False))
