"""Input checks run before any long computation, with messages that name the problem."""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from scipy import sparse

from ..errors import InputError


@njit(parallel=True, cache=True)
def _count_bad(values):
    n_nonfinite = 0
    n_negative = 0
    for i in prange(values.shape[0]):
        v = values[i]
        if not np.isfinite(v):
            n_nonfinite += 1
        elif v < 0:
            n_negative += 1
    return n_nonfinite, n_negative


def check_values(name: str, values: np.ndarray) -> None:
    """Raise :class:`InputError` if ``values`` (1-D view) hold NaN/inf or negative numbers."""
    if values.size == 0:
        return
    if values.dtype.kind not in "fiu":
        raise InputError(f"{name} must be numeric, got dtype {values.dtype}")
    if values.dtype.kind == "u":
        return
    n_nonfinite, n_negative = _count_bad(values)
    if n_nonfinite:
        raise InputError(f"{name} contains {n_nonfinite} NaN or infinite value(s)")
    if n_negative:
        raise InputError(
            f"{name} contains {n_negative} negative value(s); raw non-negative counts expected"
        )


#: Value types the kernels are compiled for; others are converted (a copy) to float32.
KERNEL_DTYPES = (np.float32, np.float64, np.int32, np.int64)


def as_count_matrix(name: str, M):
    """CSR matrix or 2-D ndarray of counts, values checked; the input is never modified.

    A canonical CSR matrix of a kernel dtype is used as is (no copy); other formats,
    duplicate or unsorted entries (which the kernels would transform one by one) and
    other dtypes are converted into a copy first.
    """
    if not sparse.issparse(M):
        M = np.asarray(M)
    if M.ndim != 2:
        raise InputError(f"{name} must be 2-D (rows x genes), got shape {M.shape}")
    if M.dtype.kind not in "fiub":
        raise InputError(f"{name} must be numeric, got dtype {M.dtype}")
    if sparse.issparse(M):
        if M.format != "csr":
            M = sparse.csr_matrix(M)
        elif not M.has_canonical_format:
            M = M.copy()
            M.sum_duplicates()
    if M.dtype.type not in KERNEL_DTYPES:
        M = M.astype(np.float32)
    check_values(name, M.data if sparse.issparse(M) else M.reshape(-1))
    return M


def check_coords(coords, n_spots: int, name: str = "coords") -> np.ndarray:
    """Float64 (N, 2) or (N, 3) coordinates, finite, one row per spot."""
    if coords is None:
        raise InputError(f"{name} are missing: spatial coordinates (N x 2 or N x 3) are required")
    coords = np.asarray(coords)
    if coords.dtype.kind not in "fiu":
        raise InputError(f"{name} must be numeric, got dtype {coords.dtype}")
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise InputError(f"{name} must have shape (n_spots, 2) or (n_spots, 3), got {coords.shape}")
    if coords.shape[0] != n_spots:
        raise InputError(
            f"{name} has {coords.shape[0]} rows but the spot matrix has {n_spots} spots"
        )
    coords = coords.astype(np.float64, copy=False)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise InputError(f"{name} contain NaN or infinite values in {bad.sum()} spot(s), e.g. rows {first}")
    return coords


def check_reference(X: np.ndarray, n_genes: int, cell_type_names=None) -> np.ndarray:
    """Float64 K x G reference with K >= 2 non-zero, finite, non-negative profiles."""
    X = np.asarray(X.toarray() if sparse.issparse(X) else X)
    if X.ndim != 2:
        raise InputError(f"reference X must be 2-D (cell types x genes), got shape {X.shape}")
    if X.shape[1] != n_genes:
        raise InputError(
            f"gene mismatch: the spot matrix has {n_genes} genes, the reference {X.shape[1]}; "
            "align them first (dflashdeconv.io.align_genes)"
        )
    if X.shape[0] < 2:
        raise InputError(f"the reference needs at least 2 cell types, got {X.shape[0]}")
    check_values("reference X", X.reshape(-1))
    X = X.astype(np.float64, copy=False)
    empty = np.flatnonzero(X.sum(axis=1) <= 0)
    if empty.size:
        names = [str(cell_type_names[k]) if cell_type_names is not None else str(k) for k in empty]
        raise InputError(f"cell type(s) {names} have an all-zero reference profile")
    if cell_type_names is not None and len(cell_type_names) != X.shape[0]:
        raise InputError(
            f"{len(cell_type_names)} cell type names for {X.shape[0]} reference profiles"
        )
    return X


def check_projection(H: np.ndarray, ysq: np.ndarray, where: str = "the spot counts") -> None:
    """Overflow guard: counts so large that the solver's inputs are not finite."""
    if not (np.isfinite(H).all() and np.isfinite(ysq).all()):
        raise InputError(f"{where} are too large to deconvolve (the projected data overflow "
                         "float64); use raw counts, or preprocess='log_cpm'")
