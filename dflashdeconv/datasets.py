"""Bundled real data and a synthetic tissue generator with known proportions.

- :func:`starmap_cortex`: STARmap mouse visual cortex pseudo-spots (581 spots, 12 types,
  ground-truth proportions) and their single-cell reference, shipped in the package
  (MIT licence, see ``data/starmap_cortex/ATTRIBUTION.md``).
- :class:`SyntheticTissue`: a seeded tissue whose every spot is a deterministic function
  of (seed, spot index): smooth Dirichlet proportions over space, negative-binomial
  single-cell reference, Poisson spot counts. Rows can be generated in any chunks, in any
  order, on any worker, and always come out identical; :func:`synthetic` builds AnnData
  objects in memory and the engine writes million-spot stores chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
from numba import njit, prange
from scipy import sparse

from .core.resample import gamma, next_bits, poisson, spot_stream

# Stream ids separating the random draws of the generator (proportions, counts).
_PROPORTION_STREAM = 1 << 40
_COUNT_STREAM = (1 << 40) + 1


def starmap_cortex():
    """``(spots, reference)`` AnnData of the bundled STARmap cortex data.

    ``spots.obsm['proportions']`` holds the ground truth (DataFrame, 12 types);
    ``reference.obs['cell_type']`` the labels; coordinates are pixels in
    ``spots.obsm['spatial']``. Sources and licence: ``data/starmap_cortex/ATTRIBUTION.md``.
    """
    import anndata as ad

    folder = resources.files("dflashdeconv") / "data" / "starmap_cortex"
    with resources.as_file(folder / "pseudospots.h5ad") as spots_path, \
            resources.as_file(folder / "reference.h5ad") as ref_path:
        return ad.read_h5ad(spots_path), ad.read_h5ad(ref_path)


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of a discrete distribution (O(1) sampling)."""
    n = p.size
    scaled = p / p.sum() * n
    prob = np.ones(n)
    alias = np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


@njit(parallel=True, cache=True)
def _dirichlet_rows(mean, concentration, seed, spot_ids):
    n, K = mean.shape
    out = np.empty((n, K))
    for i in prange(n):
        state = spot_stream(seed, _PROPORTION_STREAM, spot_ids[i])
        total = 0.0
        for k in range(K):
            state, g = gamma(max(concentration * mean[i, k], 1e-3), state)
            out[i, k] = g
            total += g
        for k in range(K):
            out[i, k] /= total
    return out


@njit(cache=True)
def _type_counts(depth, proportions, state, out):
    """Molecules of each type in one spot: independent Poisson(depth x proportion) draws."""
    total = 0
    for k in range(proportions.shape[0]):
        state, c = poisson(depth * proportions[k], state)
        out[k] = np.int64(c)
        total += out[k]
    return state, total


@njit(parallel=True, cache=True)
def _count_rows(proportions, depth, alias_prob, alias_idx, seed, spot_ids):
    """CSR (indptr, indices, data) of Poisson(depth x mixture) counts, row by row.

    A spot draws its molecules of each type (Poisson(depth_i x p_ik), independent), then
    each molecule's gene from that type's profile by the alias method, from one 64-bit
    draw (high bits: the column, low bits: the alias test): the same law as independent
    Poisson counts per gene.
    """
    n, K = proportions.shape
    G = alias_prob.shape[1]
    totals = np.empty(n, np.int64)
    for i in prange(n):
        per_type = np.empty(K, np.int64)
        _, totals[i] = _type_counts(depth[i], proportions[i],
                                    spot_stream(seed, _COUNT_STREAM, spot_ids[i]), per_type)
    bound = np.zeros(n + 1, np.int64)
    for i in range(n):
        bound[i + 1] = bound[i] + min(totals[i], G)
    indices = np.empty(bound[n], np.int32)
    data = np.empty(bound[n], np.float32)
    nnz = np.zeros(n, np.int64)
    low_mask = np.uint64(0xFFFFFFFF)
    scale = 1.0 / 4294967296.0
    for i in prange(n):
        per_type = np.empty(K, np.int64)
        state, _ = _type_counts(depth[i], proportions[i],
                                spot_stream(seed, _COUNT_STREAM, spot_ids[i]), per_type)
        counts = np.zeros(G, np.int64)
        for k in range(K):
            for _ in range(per_type[k]):
                state, bits = next_bits(state)
                col = min(np.int64(((bits >> np.uint64(32)) * np.uint64(G)) >> np.uint64(32)), G - 1)
                u = np.float64(bits & low_mask) * scale
                gene = col if u < alias_prob[k, col] else alias_idx[k, col]
                counts[gene] += 1
        q = bound[i]
        for g in range(G):
            if counts[g]:
                indices[q] = g
                data[q] = counts[g]
                q += 1
        nnz[i] = q - bound[i]
    indptr = np.zeros(n + 1, np.int64)
    for i in range(n):
        indptr[i + 1] = indptr[i] + nnz[i]
    out_indices = np.empty(indptr[n], np.int32)
    out_data = np.empty(indptr[n], np.float32)
    for i in prange(n):
        m = nnz[i]
        out_indices[indptr[i]:indptr[i] + m] = indices[bound[i]:bound[i] + m]
        out_data[indptr[i]:indptr[i] + m] = data[bound[i]:bound[i] + m]
    return indptr, out_indices, out_data


@dataclass(frozen=True)
class SyntheticTissue:
    """A seeded synthetic tissue on a square grid (spacing 1), spots in row-major order.

    Parameters: number of spots, genes and cell types, mean counts per spot (``depth``),
    ``concentration`` of the Dirichlet around the smooth spatial mean (lower = noisier),
    ``gene_sigma`` the log-normal spread of baseline gene expression (sets sparsity),
    ``markers_per_type`` strongly specific genes per type and ``platform_sd`` the log-normal
    spread of gene-wise platform factors that scale the spots' expression but not the
    reference's (a reference from another technology; 0 = none).
    """

    n_spots: int = 2000
    n_genes: int = 3000
    n_types: int = 15
    depth: float = 3900.0
    seed: int = 0
    concentration: float = 8.0
    gene_sigma: float = 1.3
    markers_per_type: int = 30
    cells_per_type: int = 60
    platform_sd: float = 0.0

    def __post_init__(self):
        for name in ("n_spots", "n_genes", "n_types", "cells_per_type"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_types * self.markers_per_type > self.n_genes:
            raise ValueError("n_types x markers_per_type exceeds n_genes")
        if not self.depth > 0:
            raise ValueError(f"depth must be positive, got {self.depth}")

    @property
    def width(self) -> int:
        """Grid columns (the tissue is about square)."""
        return int(math.ceil(math.sqrt(self.n_spots)))

    @property
    def gene_names(self) -> np.ndarray:
        return np.array([f"Gene{g:05d}" for g in range(self.n_genes)])

    @property
    def cell_type_names(self) -> np.ndarray:
        return np.array([f"Type{k:02d}" for k in range(self.n_types)])

    def _rng(self, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, purpose])

    def profiles(self) -> np.ndarray:
        """True expression profiles (K x G), each row a distribution over genes."""
        rng = self._rng(1)
        K, G = self.n_types, self.n_genes
        base = rng.lognormal(0.0, self.gene_sigma, G)
        log_fold = rng.normal(0.0, 0.5, (K, G))
        markers = rng.permutation(G)[: K * self.markers_per_type].reshape(K, -1)
        for k in range(K):
            log_fold[k, markers[k]] += rng.uniform(1.5, 3.0, self.markers_per_type)
        profile = base[None, :] * np.exp(log_fold)
        return profile / profile.sum(axis=1, keepdims=True)

    def platform_factors(self) -> np.ndarray:
        """Gene-wise factors (G,) of the spots' technology relative to the reference's."""
        return np.exp(self._rng(4).normal(0.0, self.platform_sd, self.n_genes))

    def spot_profiles(self) -> np.ndarray:
        """The profiles the spots are drawn from: :meth:`profiles` scaled by the platform
        factors, each row renormalised (the profiles themselves without factors)."""
        if self.platform_sd == 0:
            return self.profiles()
        profile = self.profiles() * self.platform_factors()[None, :]
        return profile / profile.sum(axis=1, keepdims=True)

    def _field(self):
        rng = self._rng(2)
        n_waves = 4
        freq = rng.normal(0.0, 2 * np.pi * 2.5 / self.width, (self.n_types, n_waves, 2))
        phase = rng.uniform(0, 2 * np.pi, (self.n_types, n_waves))
        amp = rng.uniform(0.5, 1.5, (self.n_types, n_waves))
        return freq, phase, amp

    def _ids(self, start, stop) -> np.ndarray:
        return np.arange(start, self.n_spots if stop is None else stop)

    def coords(self, start: int = 0, stop: int | None = None, *, ids=None) -> np.ndarray:
        """Grid coordinates (x = column, y = row) of spots ``start:stop`` (or ``ids``)."""
        idx = self._ids(start, stop) if ids is None else np.asarray(ids)
        return np.column_stack([idx % self.width, idx // self.width]).astype(np.float64)

    def proportions(self, start: int = 0, stop: int | None = None, *, ids=None) -> np.ndarray:
        """True proportions: Dirichlet around a smooth softmax field over space."""
        ids = self._ids(start, stop) if ids is None else np.asarray(ids, np.int64)
        xy = self.coords(ids=ids)
        freq, phase, amp = self._field()
        logits = np.einsum("kw,nkw->nk", amp, np.cos(np.einsum("kwd,nd->nkw", freq, xy) + phase))
        mean = np.exp(2.0 * logits)
        mean /= mean.sum(axis=1, keepdims=True)
        return _dirichlet_rows(mean, float(self.concentration), self.seed, ids)

    def spot_depths(self, start: int = 0, stop: int | None = None, *, ids=None) -> np.ndarray:
        """Expected counts per spot (log-normal around ``depth``, smooth in space)."""
        xy = self.coords(start, stop, ids=ids)
        wave = np.sin(xy[:, 0] * 2 * np.pi / max(self.width / 3, 1)) * np.cos(
            xy[:, 1] * 2 * np.pi / max(self.width / 4, 1))
        return self.depth * np.exp(0.25 * wave)

    def counts(self, start: int = 0, stop: int | None = None, *, ids=None) -> sparse.csr_matrix:
        """Spot counts (CSR float32, spots x genes) of ``start:stop`` (or ``ids``)."""
        ids = self._ids(start, stop) if ids is None else np.asarray(ids, np.int64)
        tables = [_alias_table(p) for p in self.spot_profiles()]
        alias_prob = np.stack([t[0] for t in tables])
        alias_idx = np.stack([t[1] for t in tables]).astype(np.int64)
        indptr, indices, data = _count_rows(self.proportions(ids=ids), self.spot_depths(ids=ids),
                                            alias_prob, alias_idx, self.seed, ids)
        return sparse.csr_matrix((data, indices, indptr), shape=(ids.size, self.n_genes))

    def write_store(self, path, chunk_rows: int | None = None, *, scheduler=None,
                    overwrite: bool = False, progress=None):
        """Write the tissue as a spot store in spatial order, its blocks generated and
        written by the Dask workers in parallel (``scheduler``: a Client, an address or
        None for a LocalCluster; see :mod:`dflashdeconv.engine.writer`).

        Every spot is a function of (seed, spot index), so the store holds exactly the
        spots :meth:`counts` returns, with the true proportions in ``obsm['proportions']``
        (columns: :attr:`cell_type_names`). An existing ``path`` is refused unless
        ``overwrite``. Returns the opened :class:`~dflashdeconv.engine.store.SpotStore`.
        """
        from .core.order import spatial_order
        from .engine.store import choose_chunk_rows
        from .engine.writer import StoreTarget, write_store

        with StoreTarget(path, overwrite=overwrite) as target:
            order = spatial_order(self.coords())
            if chunk_rows is None:
                sample = self.counts(ids=order[: min(2000, self.n_spots)])
                chunk_rows = choose_chunk_rows(sample.nnz / sample.shape[0])
            blocks = [(order[start:start + chunk_rows],)
                      for start in range(0, self.n_spots, chunk_rows)]
            return write_store(target, self.block_rows, blocks, n_spots=self.n_spots,
                               gene_names=self.gene_names, chunk_rows=chunk_rows, coords_dim=2,
                               source=f"synthetic:{self.__repr__()}",
                               obsm={"proportions": ((self.n_types,), np.float64)},
                               scheduler=scheduler, progress=progress)

    def block_rows(self, ids):
        """The spots ``ids`` as a block of a store (names, counts, coordinates, truth)."""
        from .engine.writer import BlockRows

        ids = np.asarray(ids, np.int64)
        return BlockRows(np.char.add("spot", np.char.zfill(ids.astype(str), 9)), ids,
                         self.coords(ids=ids), self.counts(ids=ids),
                         {"proportions": self.proportions(ids=ids)})

    def reference(self):
        """Single-cell reference AnnData: negative-binomial cells, ``obs['cell_type']``."""
        import anndata as ad
        import pandas as pd

        rng = self._rng(3)
        profile = self.profiles()
        n = self.cells_per_type
        labels = np.repeat(np.arange(self.n_types), n)
        library = rng.lognormal(np.log(3000.0), 0.4, labels.size)
        mean = profile[labels] * library[:, None]
        theta = 5.0
        counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(self.cell_type_names[labels],
                                         categories=self.cell_type_names)},
            index=[f"cell{i:06d}" for i in range(labels.size)],
        )
        return ad.AnnData(sparse.csr_matrix(counts), obs=obs,
                          var=pd.DataFrame(index=self.gene_names))

    def spots(self, start: int = 0, stop: int | None = None):
        """Spot AnnData of spots ``start:stop``: counts, ``obsm['spatial']`` and the truth
        in ``obsm['proportions']`` (DataFrame)."""
        import anndata as ad
        import pandas as pd

        stop = self.n_spots if stop is None else stop
        names = pd.Index(np.char.add("spot", np.char.zfill(self._ids(start, stop).astype(str), 9)))
        truth = pd.DataFrame(self.proportions(start, stop), index=names,
                             columns=self.cell_type_names)
        adata = ad.AnnData(self.counts(start, stop), obs=pd.DataFrame(index=names),
                           var=pd.DataFrame(index=self.gene_names))
        adata.obsm["spatial"] = self.coords(start, stop)
        adata.obsm["proportions"] = truth
        adata.uns["synthetic"] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return adata


def synthetic(n_spots: int = 2000, n_genes: int = 3000, n_types: int = 15,
              depth: float = 3900.0, seed: int = 0, **kwargs):
    """``(spots, reference)`` AnnData of a :class:`SyntheticTissue` (truth in
    ``spots.obsm['proportions']``)."""
    tissue = SyntheticTissue(n_spots=n_spots, n_genes=n_genes, n_types=n_types, depth=depth,
                             seed=seed, **kwargs)
    return tissue.spots(), tissue.reference()


def pseudospots(cells, cell_type_key: str = "cell_type", *, spatial_key: str = "spatial",
                size: float = 500.0, origin=None, scale: float = 1000.0):
    """Pseudo-spots with known truth from single-cell spatial data (SDePER's recipe for
    the STARmap gold standard).

    Cells are binned into ``size`` x ``size`` squares (grid corner ``origin``, default the
    floor of the smallest coordinates); a square's counts are
    ``ceil(scale x mean over its cells of (counts / cell total))`` and its truth is the
    fraction of its cells per type (``obsm['proportions']``, DataFrame). Coordinates are
    the squares' centres. Returns an AnnData of the non-empty squares.
    """
    import anndata as ad
    import pandas as pd

    counts = sparse.csr_matrix(cells.X, dtype=np.float64)
    xy = np.asarray(cells.obsm[spatial_key], np.float64)[:, :2]
    labels = cells.obs[cell_type_key].astype(str).to_numpy()
    types = np.unique(labels)
    origin = np.floor(xy.min(axis=0)) if origin is None else np.asarray(origin, np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    normalised = sparse.diags(1.0 / np.maximum(totals, 1.0)) @ counts
    cell_square = np.floor((xy - origin) / size).astype(np.int64)
    squares, square_of = np.unique(cell_square, axis=0, return_inverse=True)
    square_of = square_of.ravel()
    n = squares.shape[0]
    member = sparse.csr_matrix((np.ones(square_of.size), (square_of, np.arange(square_of.size))),
                               shape=(n, square_of.size))
    n_cells = np.asarray(member.sum(axis=1)).ravel()
    mean = sparse.diags(1.0 / n_cells) @ member @ normalised
    spot_counts = sparse.csr_matrix(np.ceil(scale * mean.toarray() - 1e-9))
    truth = np.zeros((n, types.size))
    np.add.at(truth, (square_of, np.searchsorted(types, labels)), 1.0)
    truth /= n_cells[:, None]
    corners = origin + squares * size
    names = pd.Index([f"x{x:g}y{y:g}" for x, y in corners])
    spots = ad.AnnData(spot_counts, obs=pd.DataFrame({"n_cells": n_cells.astype(int)}, index=names),
                       var=pd.DataFrame(index=cells.var_names))
    spots.obsm["spatial"] = corners + size / 2
    spots.obsm["proportions"] = pd.DataFrame(truth, index=names, columns=types)
    return spots
