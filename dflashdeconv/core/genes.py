"""Gene selection: streaming HVG statistics, reference markers and leverage scores.

HVG selection needs only per-gene sums of the log-normalised values and of their squares,
so the statistics are computed chunk by chunk (:func:`gene_moments`) and merged with ``+``.
The sums of the log values are accumulated as fixed-point integers: integer addition is
associative, so the selected genes do not depend on how the rows were chunked or on the
number of threads and workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import InputError

#: Library size that spots are scaled to before ``log1p`` (CP10k).
LIBRARY_SCALE = 1e4

# Fixed-point resolution of the HVG sums: 2**-26 ~ 1.5e-8 per value. The int64 sums hold
# ~1.4e11 in value units, i.e. more than 1e9 spots at the largest possible log value.
_FIXED_POINT = float(2**26)


@dataclass
class GeneMoments:
    """Mergeable per-gene statistics of a set of spots (one pass over the non-zeros).

    ``log_sum``/``log_sumsq`` are fixed-point sums of ``log1p(1e4 * y / total)`` and its
    square; ``raw_sum`` is the plain sum of counts (for Pearson means); ``n_spots`` counts
    rows and ``n_empty`` rows without any count.
    """

    log_sum: np.ndarray
    log_sumsq: np.ndarray
    raw_sum: np.ndarray
    n_spots: int
    n_empty: int

    @classmethod
    def zeros(cls, n_genes: int) -> "GeneMoments":
        return cls(
            np.zeros(n_genes, np.int64), np.zeros(n_genes, np.int64), np.zeros(n_genes), 0, 0
        )

    def __add__(self, other: "GeneMoments") -> "GeneMoments":
        if self.log_sum.shape != other.log_sum.shape:
            raise ValueError("cannot merge GeneMoments over different gene sets")
        return GeneMoments(
            self.log_sum + other.log_sum,
            self.log_sumsq + other.log_sumsq,
            self.raw_sum + other.raw_sum,
            self.n_spots + other.n_spots,
            self.n_empty + other.n_empty,
        )

    @property
    def mean(self) -> np.ndarray:
        """Mean of the log-normalised values per gene."""
        return self.log_sum / _FIXED_POINT / max(self.n_spots, 1)

    @property
    def var(self) -> np.ndarray:
        """Sample variance (ddof=1) of the log-normalised values per gene, clipped at 0."""
        n = self.n_spots
        if n < 2:
            return np.zeros(self.log_sum.shape)
        mean = self.mean
        mean_sq = self.log_sumsq / _FIXED_POINT / n
        return np.maximum(n / (n - 1) * (mean_sq - mean**2), 0.0)

    @property
    def raw_mean(self) -> np.ndarray:
        """Mean raw count per gene (the ``mu`` of the Pearson preprocessing)."""
        return self.raw_sum / max(self.n_spots, 1)


@njit(parallel=True, cache=True)
def _moments_kernel(indptr, indices, data, column_map, n_genes, n_parts):
    n_rows = indptr.shape[0] - 1
    log_sum = np.zeros((n_parts, n_genes), np.int64)
    log_sumsq = np.zeros((n_parts, n_genes), np.int64)
    raw_sum = np.zeros((n_parts, n_genes), np.float64)
    n_empty = np.zeros(n_parts, np.int64)
    for part in prange(n_parts):
        lo = part * n_rows // n_parts
        hi = (part + 1) * n_rows // n_parts
        for i in range(lo, hi):
            total = 0.0
            for q in range(indptr[i], indptr[i + 1]):
                if column_map[indices[q]] >= 0:
                    total += data[q]
            if total <= 0.0:
                n_empty[part] += 1
            scale = LIBRARY_SCALE / max(total, 1.0)
            for q in range(indptr[i], indptr[i + 1]):
                g = column_map[indices[q]]
                if g < 0:
                    continue
                x = np.float64(data[q])
                v = np.log1p(x * scale)
                log_sum[part, g] += np.int64(np.rint(v * _FIXED_POINT))
                log_sumsq[part, g] += np.int64(np.rint(v * v * _FIXED_POINT))
                raw_sum[part, g] += x
    return log_sum.sum(axis=0), log_sumsq.sum(axis=0), raw_sum.sum(axis=0), n_empty.sum()


def gene_moments(indptr, indices, data, n_genes: int, column_map=None) -> GeneMoments:
    """Per-gene HVG statistics of the CSR rows described by ``indptr`` (absolute offsets).

    ``column_map`` (matrix column -> gene position, -1 to ignore) restricts the statistics,
    library sizes included, to a subset of the columns, as if the matrix had been subset
    to the genes shared with a reference; ``n_genes`` is then the subset's size. The rows
    are split over the numba threads; the result does not depend on that split.
    """
    n_rows = len(indptr) - 1
    if n_rows == 0:
        return GeneMoments.zeros(n_genes)
    if column_map is None:
        column_map = np.arange(n_genes, dtype=np.int64)
    n_parts = int(min(max(n_rows // 256, 1), 64))
    log_sum, log_sumsq, raw_sum, n_empty = _moments_kernel(
        indptr, indices, data, np.asarray(column_map, np.int64), n_genes, n_parts
    )
    return GeneMoments(log_sum, log_sumsq, raw_sum, n_rows, int(n_empty))


def _argsort_desc(values: np.ndarray) -> np.ndarray:
    """Indices sorting ``values`` in descending order; ties keep the lower index first."""
    return np.argsort(-np.asarray(values), kind="stable")


def standardized_dispersion(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Variance z-scored within quantile bins of the mean (edges from positive means).

    Genes below the lowest edge (zero mean) fall into the first bin, as in the reference
    package; bins holding a single gene keep z = 0.
    """
    z = np.zeros(mean.shape)
    positive = mean[mean > 0]
    if positive.size < 2:
        return z
    edges = np.unique(np.percentile(positive, np.linspace(0, 100, n_bins + 1)))
    if edges.size < 2:
        return z
    bin_of = np.clip(np.digitize(mean, edges) - 1, 0, edges.size - 2)
    for b in range(edges.size - 1):
        members = bin_of == b
        if members.sum() > 1:
            v = var[members]
            z[members] = (v - v.mean()) / (v.std() + 1e-10)
    return z


def select_hvg(
    moments: GeneMoments,
    n_top: int = 2000,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
) -> np.ndarray:
    """Highly variable genes (sorted indices) from merged :class:`GeneMoments`.

    Genes with mean in ``[min_mean, max_mean]`` and z >= ``min_disp`` ranked by z; when
    fewer than ``n_top`` pass, the top ``n_top`` by z without the filters.
    """
    if n_top <= 0:
        return np.empty(0, np.intp)
    mean = moments.mean
    z = standardized_dispersion(mean, moments.var)
    passing = np.flatnonzero((mean >= min_mean) & (mean <= max_mean) & (z >= min_disp))
    if passing.size < n_top:
        chosen = _argsort_desc(z)[:n_top]
    else:
        chosen = passing[_argsort_desc(z[passing])[:n_top]]
    return np.sort(chosen).astype(np.intp)


def select_markers(X: np.ndarray, n_markers: int = 50) -> np.ndarray:
    """Marker genes of each cell type (sorted union of indices).

    Rows are scaled to sum 1; a gene belongs to the type where it is highest, with
    specificity = highest minus second highest; each type keeps its ``n_markers`` most
    specific genes, or its most expressed genes when no gene belongs to it.
    """
    n_types, n_genes = X.shape
    if n_markers <= 0 or n_types == 0 or n_genes == 0:
        return np.empty(0, np.intp)
    profile = X / (X.sum(axis=1, keepdims=True) + 1e-10)
    if n_types == 1:
        return np.arange(min(n_markers, n_genes), dtype=np.intp)
    ordered = np.sort(profile, axis=0)
    specificity = ordered[-1] - ordered[-2]
    owner = np.argmax(profile, axis=0)
    markers = []
    for k in range(n_types):
        owned = np.flatnonzero(owner == k)
        if owned.size:
            markers.append(owned[_argsort_desc(specificity[owned])[:n_markers]])
        else:
            markers.append(_argsort_desc(profile[k])[:n_markers])
    return np.unique(np.concatenate(markers)).astype(np.intp)


def leverage_scores(X: np.ndarray, regularization: float = 1e-6) -> np.ndarray:
    """Leverage of each gene (column of ``X``) in the centred type space, summing to 1.

    A gene scores high when it defines a direction that separates types, whatever its
    magnitude, so markers of rare types are not drowned by highly expressed genes.
    """
    centred = X - X.mean(axis=0, keepdims=True)
    try:
        loadings, singular, _ = np.linalg.svd(centred.T, full_matrices=False)
    except np.linalg.LinAlgError:
        var = X.var(axis=0)
        return var / (var.sum() + regularization)
    weight = singular**2 / (singular**2 + regularization)
    score = (loadings**2 * weight).sum(axis=1)
    return score / (score.sum() + regularization)


def select_genes(
    moments: GeneMoments, X: np.ndarray, n_hvg: int = 2000, n_markers_per_type: int = 50
) -> np.ndarray:
    """Genes used by the model: union of HVGs (from ``moments``) and markers (from ``X``)."""
    genes = np.union1d(select_hvg(moments, n_hvg), select_markers(X, n_markers_per_type))
    if genes.size == 0:
        raise InputError("no genes selected: increase n_hvg or n_markers_per_type")
    return genes.astype(np.intp)


def shared_genes(genes_spatial, genes_ref):
    """``(common names (sorted), spatial indices, reference indices)`` of the shared genes.

    Raises when either list repeats a name or when no gene is shared.
    """
    genes_spatial = np.asarray(genes_spatial).astype(str)
    genes_ref = np.asarray(genes_ref).astype(str)
    for name, g in (("spatial", genes_spatial), ("reference", genes_ref)):
        _, first, counts = np.unique(g, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = g[np.sort(first[counts > 1])][:5].tolist()
            raise InputError(f"duplicate gene names in the {name} data, e.g. {dup}; make them "
                             "unique (AnnData.var_names_make_unique)")
    common, spatial_idx, ref_idx = np.intersect1d(genes_spatial, genes_ref, return_indices=True)
    if common.size == 0:
        raise InputError(
            "no genes in common between the spatial data and the reference "
            f"(e.g. {genes_spatial[:3].tolist()} vs {genes_ref[:3].tolist()}); check that both "
            "use the same gene identifiers (symbols vs Ensembl IDs)"
        )
    return common, spatial_idx, ref_idx


#: Shared genes below which a reference is refused unless the caller lowers the floor.
MIN_SHARED_GENES = 50
#: Genes where a type is clearly the highest (1.5x the next) below which it is warned about.
MIN_MARKERS = 3
MARKER_FOLD = 1.5


def check_shared_genes(X: np.ndarray, cell_type_names, min_shared_genes: int = MIN_SHARED_GENES,
                       stacklevel: int = 3) -> None:
    """Refuse a reference sharing fewer than ``min_shared_genes`` genes with the spots
    (``X`` is restricted to the shared genes), and warn about cell types with fewer than
    :data:`MIN_MARKERS` shared genes where they are the most expressed type by
    :data:`MARKER_FOLD`: their proportions are poorly identified."""
    import warnings

    from ..errors import DataWarning

    n_genes = X.shape[1]
    if n_genes < min_shared_genes:
        raise InputError(f"only {n_genes} genes are shared by the spots and the reference "
                         f"(at least {min_shared_genes} expected): check the gene identifiers, "
                         "or lower min_shared_genes (--min-shared-genes) to run anyway")
    profile = np.asarray(X, np.float64)
    profile = profile / np.maximum(profile.sum(axis=1, keepdims=True), 1e-300)
    ranked = np.sort(profile, axis=0)
    top, second = ranked[-1], ranked[-2] if profile.shape[0] > 1 else np.zeros(n_genes)
    clear = (top > 0) & (top >= MARKER_FOLD * second)
    owners = np.argmax(profile, axis=0)[clear]
    markers = np.bincount(owners, minlength=profile.shape[0])
    thin = [str(cell_type_names[k]) for k in np.flatnonzero(markers < MIN_MARKERS)]
    if thin:
        warnings.warn(f"thin marker coverage: cell type(s) {thin} have fewer than {MIN_MARKERS} "
                      f"of the {n_genes} shared genes where they are the most expressed type "
                      f"(by {MARKER_FOLD:g}x); their proportions are poorly identified", DataWarning,
                      stacklevel=stacklevel)
