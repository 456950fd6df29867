"""Accuracy of estimated proportions against a ground truth (spots x cell types).

Overall scores are computed over all entries flattened, as the reference package
reports them; ``per_cell_type=True`` gives one value per column.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

from .errors import InputError


def _pair(pred, true):
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise InputError(f"pred {pred.shape} and true {true.shape} must be equal 2-D shapes")
    return pred, true


def rmse(pred, true, per_cell_type: bool = False):
    """Root mean squared error."""
    pred, true = _pair(pred, true)
    return np.sqrt(np.mean((pred - true) ** 2, axis=0 if per_cell_type else None))


def mae(pred, true, per_cell_type: bool = False):
    """Mean absolute error."""
    pred, true = _pair(pred, true)
    return np.mean(np.abs(pred - true), axis=0 if per_cell_type else None)


def _correlation(a, b, method: str) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0  # undefined for constant input
    if method == "spearman":
        return float(spearmanr(a, b)[0])
    return float(np.corrcoef(a, b)[0, 1])


def correlation(pred, true, method: str = "pearson", per_cell_type: bool = False):
    """Pearson or Spearman correlation (0 where an input is constant)."""
    if method not in ("pearson", "spearman"):
        raise InputError(f"method must be 'pearson' or 'spearman', got {method!r}")
    pred, true = _pair(pred, true)
    if per_cell_type:
        return np.array([_correlation(pred[:, k], true[:, k], method) for k in range(pred.shape[1])])
    return _correlation(pred.ravel(), true.ravel(), method)


def pearson(pred, true, per_cell_type: bool = False):
    """Pearson correlation (flattened, or per cell type)."""
    return correlation(pred, true, "pearson", per_cell_type)


def spearman(pred, true, per_cell_type: bool = False):
    """Spearman correlation (flattened, or per cell type)."""
    return correlation(pred, true, "spearman", per_cell_type)


def jsd(pred, true, epsilon: float = 1e-10) -> np.ndarray:
    """Jensen-Shannon divergence (nats) per spot."""
    pred, true = _pair(pred, true)
    p = np.clip(pred, epsilon, 1 - epsilon)
    q = np.clip(true, epsilon, 1 - epsilon)
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    m = 0.5 * (p + q)
    return 0.5 * (np.sum(p * np.log(p / m), axis=1) + np.sum(q * np.log(q / m), axis=1))


def evaluate(pred, true, cell_type_names=None) -> dict:
    """All scores: ``{"overall": {...}, "per_cell_type": {name: {...}}}``."""
    pred, true = _pair(pred, true)
    names = (list(cell_type_names) if cell_type_names is not None
             else [f"CellType_{k}" for k in range(pred.shape[1])])
    overall = {
        "rmse": float(rmse(pred, true)),
        "mae": float(mae(pred, true)),
        "pearson": pearson(pred, true),
        "spearman": spearman(pred, true),
        "mean_jsd": float(np.mean(jsd(pred, true))),
    }
    per = zip(names, rmse(pred, true, True), mae(pred, true, True), pearson(pred, true, True),
              spearman(pred, true, True), true.mean(axis=0), pred.mean(axis=0))
    per_cell_type = {
        str(name): {"rmse": float(r), "mae": float(a), "pearson": float(p), "spearman": float(s),
                    "mean_proportion_true": float(t), "mean_proportion_pred": float(q)}
        for name, r, a, p, s, t, q in per
    }
    return {"overall": overall, "per_cell_type": per_cell_type}
