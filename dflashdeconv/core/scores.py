"""Scores used to choose hyper-parameters on held-out data (numpy only)."""

from __future__ import annotations

import numpy as np


def mean_column_pearson(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Pearson correlation of each column (e.g. gene) over the rows (spots), mean over the
    columns; a column constant in either input scores 0 (the field's per-gene Pearson)."""
    p = predicted - predicted.mean(0)
    o = observed - observed.mean(0)
    denominator = np.sqrt((p * p).sum(0) * (o * o).sum(0))
    r = np.divide((p * o).sum(0), denominator, out=np.zeros(p.shape[1]), where=denominator > 1e-12)
    return float(r.mean())
