"""The heavy data pass: preprocessing + gene weighting + projection ``H = Y_repr X_repr^T``.

One numba kernel reads each non-zero of a CSR row chunk once, applies the preprocessing
and the representation on the fly and accumulates the spot's K-vector ``H_i`` and
``||y_repr_i||^2``. After this pass the data are N x K and Y is never needed by the solver.
The same row-gathering helper serves the uncertainty and bootstrap passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .genes import LIBRARY_SCALE
from .preprocess import MODE_CODES
from .resample import poisson, spot_stream
from .weights import Representation

_LOG_CPM, _PEARSON, _RAW = MODE_CODES["log_cpm"], MODE_CODES["pearson"], MODE_CODES["raw"]


@njit(cache=True)
def gather_row(
    i, indptr, indices, data, gene_pos, mode, gene_scale, seed, replicate, row_offset, pos, val
):
    """Preprocessed values of the selected genes of row ``i`` into ``pos``/``val``.

    With ``seed >= 0`` the counts are first replaced by Poisson draws keyed by
    (seed, replicate, row_offset + i). Returns (number of values, selected count total).
    """
    n = 0
    total = 0.0
    state = spot_stream(seed, replicate, row_offset + i) if seed >= 0 else np.uint64(0)
    for q in range(indptr[i], indptr[i + 1]):
        j = gene_pos[indices[q]]
        if j < 0:
            continue
        x = np.float64(data[q])
        if seed >= 0:
            state, x = poisson(x, state)
        if x == 0.0:
            continue
        pos[n] = j
        val[n] = x
        total += x
        n += 1
    if mode == _LOG_CPM:
        scale = LIBRARY_SCALE / (total if total > 0.0 else 1.0)
        for t in range(n):
            val[t] = np.log1p(val[t] * scale)
    elif mode == _PEARSON:
        for t in range(n):
            val[t] *= gene_scale[pos[t]]
    return n, total


@njit(parallel=True, cache=True)
def _project_kernel(
    indptr, indices, data, gene_pos, mode, gene_scale, column, coef, loadings, dim,
    unique_columns, seed, replicate, row_offset, max_row_nnz, n_parts,
):
    n_rows = indptr.shape[0] - 1
    n_types = loadings.shape[1]
    H = np.zeros((n_rows, n_types))
    ysq = np.zeros(n_rows)
    totals = np.zeros(n_rows)
    for part in prange(n_parts):
        pos = np.empty(max_row_nnz, np.int64)
        val = np.empty(max_row_nnz)
        scratch = np.zeros(1 if unique_columns else dim)
        lo = part * n_rows // n_parts
        hi = (part + 1) * n_rows // n_parts
        for i in range(lo, hi):
            n, total = gather_row(
                i, indptr, indices, data, gene_pos, mode, gene_scale, seed, replicate,
                row_offset, pos, val,
            )
            totals[i] = total
            ss = 0.0
            for t in range(n):
                j = pos[t]
                v = val[t]
                for k in range(n_types):
                    H[i, k] += v * loadings[j, k]
                w = v * coef[j]
                if unique_columns:
                    ss += w * w
                else:
                    scratch[column[j]] += w
            if not unique_columns:
                for t in range(n):
                    c = column[pos[t]]
                    ss += scratch[c] * scratch[c]
                    scratch[c] = 0.0
            ysq[i] = ss
    return H, ysq, totals


@dataclass
class SpotTransform:
    """Everything the per-row kernels need to map raw counts to the solver's space."""

    gene_pos: np.ndarray  # (G_all,) position among the selected genes, -1 if unused
    mode: int
    gene_scale: np.ndarray  # (G_sel,)
    rep: Representation

    @classmethod
    def build(cls, n_genes: int, genes: np.ndarray, method: str, gene_scale, rep):
        gene_pos = np.full(n_genes, -1, np.int64)
        gene_pos[genes] = np.arange(genes.size)
        return cls(gene_pos, MODE_CODES[method], np.ascontiguousarray(gene_scale, np.float64), rep)


def _parts(n_rows: int) -> int:
    return int(min(max(n_rows // 512, 1), 256))


def max_row_nnz(indptr) -> int:
    return int(np.diff(indptr).max()) if len(indptr) > 1 else 0


def project(indptr, indices, data, transform: SpotTransform, *, seed: int = -1,
            replicate: int = 0, row_offset: int = 0):
    """``(H, ysq, selected_totals)`` of a CSR row chunk (``indptr`` with absolute offsets).

    ``H`` is spot-major (n_rows x K), ``ysq`` the squared norm of each spot in the solver's
    space, ``selected_totals`` the count total over the selected genes (0 = no signal).
    ``seed >= 0`` projects a Poisson-resampled copy of the counts instead (bootstrap).
    """
    rep = transform.rep
    n_rows = len(indptr) - 1
    return _project_kernel(
        indptr, indices, data, transform.gene_pos, transform.mode, transform.gene_scale,
        rep.column, rep.coef, rep.loadings, rep.dim, rep.unique_columns, seed, replicate,
        row_offset, max(max_row_nnz(indptr), 1), _parts(n_rows),
    )


@njit(parallel=True, cache=True)
def _selected_sums_kernel(indptr, indices, data, gene_pos, n_selected, seed, replicate,
                          row_offset, max_row_nnz, n_parts):
    n_rows = indptr.shape[0] - 1
    sums = np.zeros((n_parts, n_selected))
    unit = np.ones(n_selected)
    for part in prange(n_parts):
        pos = np.empty(max_row_nnz, np.int64)
        val = np.empty(max_row_nnz)
        for i in range(part * n_rows // n_parts, (part + 1) * n_rows // n_parts):
            n, _ = gather_row(i, indptr, indices, data, gene_pos, _RAW, unit, seed, replicate,
                              row_offset, pos, val)
            for t in range(n):
                sums[part, pos[t]] += val[t]
    return sums.sum(axis=0)


def selected_gene_sums(indptr, indices, data, gene_pos, n_selected, *, seed=-1, replicate=0,
                       row_offset=0):
    """Per selected gene count sums of a row chunk (resampled with ``seed >= 0``).

    The bootstrap needs them for the Pearson means of each resampled data set.
    """
    n_rows = len(indptr) - 1
    return _selected_sums_kernel(indptr, indices, data, gene_pos, n_selected, seed, replicate,
                                 row_offset, max(max_row_nnz(indptr), 1), _parts(n_rows))
