"""Preprocessing of the selected genes: ``log_cpm``, ``pearson`` or ``raw``.

The spot side is applied value by value inside the projection kernel (one pass over the
non-zeros of each chunk, see :mod:`dflashdeconv.core.project`); this module holds the
reference side and the per-gene factors the kernel needs.
"""

from __future__ import annotations

import numpy as np

from .genes import LIBRARY_SCALE
from .params import PREPROCESSINGS

#: Integer codes used inside the numba kernels.
MODE_CODES = {"log_cpm": 0, "pearson": 1, "raw": 2}

#: Dispersion of the (uncentred) Pearson residuals, sigma^2 = mu + mu^2 / theta.
PEARSON_THETA = 100.0


def pearson_inverse_sigma(mean: np.ndarray) -> np.ndarray:
    """``1 / sqrt(mu + mu^2 / 100)`` with ``mu`` = gene mean + 1e-6."""
    mu = np.asarray(mean, dtype=np.float64) + 1e-6
    return 1.0 / np.sqrt(mu + mu**2 / PEARSON_THETA)


def preprocess_reference(X: np.ndarray, method: str) -> np.ndarray:
    """Preprocess the reference profiles (K x G_sel) the way spots are preprocessed.

    ``log_cpm`` scales each type to 1e4 over the selected genes, ``pearson`` divides each
    gene by its sigma across types, ``raw`` only casts.
    """
    X = np.asarray(X, dtype=np.float64)
    if method == "log_cpm":
        return np.log1p(X / (X.sum(axis=1, keepdims=True) + 1e-10) * LIBRARY_SCALE)
    if method == "pearson":
        return X * pearson_inverse_sigma(X.mean(axis=0))[None, :]
    if method == "raw":
        return X.copy()
    raise ValueError(f"preprocess must be one of {PREPROCESSINGS}, got {method!r}")


def spot_gene_scale(method: str, spot_gene_mean: np.ndarray | None, n_genes: int) -> np.ndarray:
    """Per-gene factor applied to spot counts before weighting (1 except for ``pearson``)."""
    if method == "pearson":
        if spot_gene_mean is None:
            raise ValueError("pearson preprocessing needs the spot gene means")
        return pearson_inverse_sigma(spot_gene_mean)
    return np.ones(n_genes)
