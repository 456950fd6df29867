"""Spot stores from source files: one reader per format, found by its ``guess_can_open``
hook (suffix or a cheap look at the content), as xarray's backends are. Readers for
AnnData / h5ad, SpatialData tables and Visium HD live here; Stereo-seq GEM and GEF in
:mod:`~dflashdeconv.engine.stereoseq`. Every reader streams its rows through
:func:`~dflashdeconv.engine.convert.write_sorted`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.params import renamed
from ..errors import InputError
from ..tables import annotated_centroids, layer_matrix, spatialdata_table
from .convert import SOURCE_CHUNK_ROWS, unique_names, write_sorted
from .stereoseq import from_gef, from_gem
from .store import (
    SpotStore,
)


@dataclass(frozen=True)
class Reader:
    """A source format: ``guess_can_open(path)`` says whether a path looks like one;
    ``convert(source, store_path, **options)`` writes the spot store."""

    name: str
    guess_can_open: Callable[[Path], bool]
    convert: Callable[..., SpotStore]
    description: str


#: Readers by format name, tried in this order by :func:`guess_format`.
READERS: dict[str, Reader] = {}


def register_reader(reader: Reader, *, overwrite: bool = False) -> None:
    """Make ``from_path(..., format=reader.name)`` (and format guessing) use ``reader``."""
    if reader.name in READERS and not overwrite:
        raise InputError(f"a reader for {reader.name!r} is registered; pass overwrite=True")
    READERS[reader.name] = reader


def guess_format(path) -> str:
    """The reader for a source path, a name of :data:`READERS`, from its suffix or content."""
    for reader in READERS.values():
        if reader.guess_can_open(Path(path)):
            return reader.name
    known = ", ".join(r.description for r in READERS.values())
    raise InputError(f"cannot tell the format of {path} ({known}): name it with --format "
                     "(command line) or format= (Python)")


def from_path(source, path, format: str | None = None, **kwargs) -> SpotStore:
    """Spot store from a source file or folder of ``format`` (default: guessed; ``kind`` is
    its deprecated name)."""
    if "kind" in kwargs:
        format = renamed("from_path", {"kind": kwargs.pop("kind")}, {"kind": "format"},
                         {"format": format})["format"]
    name = format or guess_format(source)
    if name not in READERS:
        raise InputError(f"unknown format {name!r}; known: {sorted(READERS)}")
    return READERS[name].convert(source, path, **kwargs)


# --------------------------------------------------------------------------- AnnData / h5ad
def _anndata_chunks(matrix, n_rows: int) -> Iterator:
    for start in range(0, n_rows, SOURCE_CHUNK_ROWS):
        rows = matrix[start:start + SOURCE_CHUNK_ROWS]
        yield start, rows if sparse.issparse(rows) else sparse.csr_matrix(np.asarray(rows))


def from_anndata(adata, path, *, spatial_key: str = "spatial", layer: str | None = None,
                 source: str = "AnnData", **kwargs) -> SpotStore:
    """Spot store from an AnnData (in memory or backed), read ``SOURCE_CHUNK_ROWS`` at a time."""
    matrix = layer_matrix(adata, layer, source)
    if spatial_key not in adata.obsm:
        raise InputError(f"{source}: coordinates missing: no obsm[{spatial_key!r}] "
                         f"(obsm has {list(adata.obsm)})")
    coords = np.asarray(adata.obsm[spatial_key])
    return write_sorted(path, adata.obs_names, adata.var_names, coords,
                        _anndata_chunks(matrix, adata.n_obs), source=source, **kwargs)


def from_h5ad(h5ad_path, path, **kwargs) -> SpotStore:
    """Spot store from an .h5ad file opened in backed mode (X streamed from disk)."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(h5ad_path, backed="r")
    except (OSError, KeyError) as error:
        raise InputError(f"{h5ad_path}: cannot be read as h5ad: {error}") from error
    try:
        return from_anndata(adata, path, source=str(h5ad_path), **kwargs)
    finally:
        adata.file.close()


def from_spatialdata(sdata, path, *, table_key: str | None = None, **kwargs) -> SpotStore:
    """Spot store from a SpatialData table (``table_key``, required when there are several;
    ``table`` is its deprecated name); coordinates from the table's ``obsm['spatial']`` or,
    failing that, from the centroids of the shapes the table annotates."""
    if "table" in kwargs:
        table_key = renamed("from_spatialdata", {"table": kwargs.pop("table")},
                            {"table": "table_key"}, {"table_key": table_key})["table_key"]
    table, adata = spatialdata_table(sdata, table_key)
    spatial_key = kwargs.get("spatial_key", "spatial")
    if spatial_key not in adata.obsm:
        import anndata as ad

        # a new AnnData over the same arrays: the caller's table is not touched
        adata = adata.to_memory() if adata.isbacked else adata
        adata = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, layers=dict(adata.layers),
                           obsm={spatial_key: annotated_centroids(sdata, adata, table)})
    return from_anndata(adata, path, source=f"SpatialData table {table!r}", **kwargs)


# --------------------------------------------------------------------------- Visium HD
def from_visium_hd(folder, path, *, gene_ids: bool = False, in_tissue_only: bool = True,
                   **kwargs) -> SpotStore:
    """Spot store from a Space Ranger binned output folder (``square_008um`` etc.).

    Reads ``filtered_feature_bc_matrix.h5`` barcode by barcode range (its CSC layout is
    the barcodes x genes CSR) and ``spatial/tissue_positions.parquet``; coordinates are
    full-resolution pixels (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``).
    Genes are named by symbol made unique (``-1``, ``-2``), or by ID with ``gene_ids``.
    """
    import h5py

    folder = Path(folder)
    matrix_file = folder / "filtered_feature_bc_matrix.h5"
    positions_file = folder / "spatial" / "tissue_positions.parquet"
    for file in (matrix_file, positions_file):
        if not file.exists():
            raise InputError(f"{file} not found: not a Visium HD binned output folder")
    positions = pd.read_parquet(positions_file)
    needed = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
              "pxl_col_in_fullres"]
    if list(positions.columns[:6]) != needed:
        raise InputError(f"{positions_file}: columns {list(positions.columns)}, expected {needed}")
    if positions["barcode"].duplicated().any():
        dup = positions["barcode"][positions["barcode"].duplicated()].iloc[0]
        raise InputError(f"{positions_file}: duplicate barcode {dup!r}")
    with h5py.File(matrix_file, "r") as f:
        group = f["matrix"]
        barcodes = pd.Index(np.asarray(group["barcodes"]).astype(str))
        features = group["features"]
        names = np.asarray(features["id" if gene_ids else "name"]).astype(str)
        genes = pd.Index(names) if gene_ids else unique_names(names)
        n_genes, n_barcodes = (int(v) for v in group["shape"][:])
        if n_barcodes != barcodes.size or n_genes != genes.size:
            raise InputError(f"{matrix_file}: shape {(n_genes, n_barcodes)} does not match "
                             f"{genes.size} features and {barcodes.size} barcodes")
        table = positions.set_index("barcode")
        missing = ~barcodes.isin(table.index)
        if missing.any():
            raise InputError(f"{matrix_file}: {missing.sum()} barcode(s) not in {positions_file}, "
                             f"e.g. {barcodes[missing][0]!r}")
        table = table.loc[barcodes]
        keep = table["in_tissue"].to_numpy() == 1 if in_tissue_only else np.ones(barcodes.size, bool)
        coords = table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)[keep]
        indptr = np.asarray(group["indptr"], np.int64)

        def chunks():
            written = 0
            for start in range(0, n_barcodes, SOURCE_CHUNK_ROWS):
                stop = min(start + SOURCE_CHUNK_ROWS, n_barcodes)
                lo, hi = indptr[start], indptr[stop]
                rows = sparse.csr_matrix(
                    (np.asarray(group["data"][lo:hi], np.float32),
                     np.asarray(group["indices"][lo:hi]), indptr[start:stop + 1] - lo),
                    shape=(stop - start, n_genes))
                rows = rows[keep[start:stop]]
                yield written, rows
                written += rows.shape[0]

        return write_sorted(path, barcodes[keep], genes, coords, chunks(),
                            source=str(matrix_file), **kwargs)


def _read_spatialdata_zarr(source, path, **kwargs) -> SpotStore:
    import spatialdata as sd

    return from_spatialdata(sd.read_zarr(source), path, **kwargs)


for _reader in (
        Reader("h5ad", lambda p: p.name.endswith(".h5ad"), from_h5ad, ".h5ad"),
        Reader("gem", lambda p: p.name.endswith((".gem", ".gem.gz", ".txt.gz", ".tsv.gz")),
               from_gem, ".gem[.gz]"),
        Reader("gef", lambda p: p.name.endswith(".gef"), from_gef, ".gef"),
        Reader("visium-hd", lambda p: (p / "filtered_feature_bc_matrix.h5").exists(),
               from_visium_hd, "a Visium HD binned folder"),
        Reader("spatialdata", lambda p: (p / "zarr.json").exists() or (p / ".zgroup").exists(),
               _read_spatialdata_zarr, "a SpatialData .zarr store")):
    register_reader(_reader)
