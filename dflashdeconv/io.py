"""AnnData in, arrays out and back: the reference package's loading helpers.

``prepare_data`` turns a spatial AnnData and a single-cell reference into ``(Y, X,
coords, cell_type_names, gene_names)`` with the genes both share; ``result_to_anndata``
writes proportions back. Every check raises :class:`~dflashdeconv.errors.InputError`
naming the offending key, before any computation.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from .core.genes import shared_genes
from .core.params import renamed
from .errors import DataWarning, InputError
from .tables import layer_matrix

#: Labels that mean "no cell type" (matched case-insensitively, whole label).
UNLABELLED = re.compile(
    r"^\s*(unknown|unassigned|unclassified|undefined|unlabell?ed|ambiguous|unstable|doublets?|"
    r"na|nan|none|other|low[ _-]?quality|not[ _-]?assigned|-|\?)\s*$",
    re.IGNORECASE,
)


def load_spatial_data(adata, layer: str | None = None, spatial_key: str = "spatial", **deprecated):
    """``(Y, coords, gene_names)`` of a spatial AnnData (``Y`` is not copied).

    Coordinates come from ``obsm[spatial_key]`` (``coord_key`` is its deprecated name); as
    fallbacks the reference package's ``obsm['X_spatial']``, ``obs[['x', 'y']]`` or
    ``obs[['array_row', 'array_col']]``.
    """
    spatial_key = renamed("load_spatial_data", deprecated, {"coord_key": "spatial_key"},
                          {"spatial_key": spatial_key}, {"spatial_key": "spatial"})["spatial_key"]
    Y = layer_matrix(adata, layer, "the spatial AnnData")
    if spatial_key in adata.obsm:
        coords = np.asarray(adata.obsm[spatial_key])
    elif "X_spatial" in adata.obsm:
        coords = np.asarray(adata.obsm["X_spatial"])
    elif {"x", "y"} <= set(adata.obs.columns):
        coords = adata.obs[["x", "y"]].to_numpy()
    elif {"array_row", "array_col"} <= set(adata.obs.columns):
        coords = adata.obs[["array_row", "array_col"]].to_numpy()
    else:
        raise InputError(
            f"spatial coordinates missing: no obsm[{spatial_key!r}] (obsm has {list(adata.obsm)}) "
            "and no obs x/y columns"
        )
    return Y, coords, np.asarray(adata.var_names)


def check_labels(reference, cell_type_key: str = "cell_type") -> None:
    """A single-cell reference is an AnnData with labels in ``obs[cell_type_key]``
    (checked before any long work; :func:`load_reference` checks the rest)."""
    import anndata as ad

    if not isinstance(reference, ad.AnnData):
        raise InputError(f"reference must be an AnnData, got {type(reference).__name__}")
    if cell_type_key not in reference.obs:
        raise InputError(f"cell type key {cell_type_key!r} not found in the reference's .obs "
                         f"(columns: {list(reference.obs.columns)})")


def load_reference(adata_ref, cell_type_key: str = "cell_type", layer: str | None = None,
                   method: str = "mean"):
    """``(X, cell_type_names, gene_names)``: mean (or summed) profile per labelled type.

    Raises on missing labels, a category without cells or fewer than 2 types; warns on
    labels such as "Unknown" or "Unassigned", which become a type of their own.
    """
    if method not in ("mean", "sum"):
        raise InputError(f"method must be 'mean' or 'sum', got {method!r}")
    check_labels(adata_ref, cell_type_key)
    labels = adata_ref.obs[cell_type_key]
    n_missing = int(labels.isna().sum())
    if n_missing:
        raise InputError(f"{n_missing} reference cells have no {cell_type_key!r} label; drop them "
                         f"first, e.g. adata_ref[adata_ref.obs[{cell_type_key!r}].notna()]")
    if isinstance(labels.dtype, pd.CategoricalDtype):
        counts = labels.value_counts(sort=False)
        empty = counts.index[counts.to_numpy() == 0].tolist()
        if empty:
            raise InputError(f"cell type(s) {empty} have no cells in the reference "
                             f"(unused categories of obs[{cell_type_key!r}]); remove them with "
                             f".cat.remove_unused_categories()")
    values = labels.astype(str).to_numpy()
    types, codes = np.unique(values, return_inverse=True)
    if types.size < 2:
        raise InputError(f"the reference needs at least 2 cell types, got {types.tolist()}")
    unlabelled = [t for t in types if UNLABELLED.match(t)]
    if unlabelled:
        warnings.warn(f"reference labels {unlabelled} look like missing annotations; they are "
                      "kept as cell types of their own", DataWarning, stacklevel=2)
    expr = layer_matrix(adata_ref, layer, "the reference AnnData")
    indicator = sparse.csr_matrix(
        (np.ones(codes.size), (codes, np.arange(codes.size))), shape=(types.size, codes.size)
    )
    X = indicator @ expr
    X = X.toarray() if sparse.issparse(X) else np.asarray(X, dtype=np.float64)
    if method == "mean":
        X /= np.bincount(codes, minlength=types.size)[:, None]
    return X, types, np.asarray(adata_ref.var_names)


def align_genes(Y, X, genes_spatial, genes_ref):
    """Restrict ``Y`` and ``X`` to their common genes, in sorted name order."""
    common, spatial_idx, ref_idx = shared_genes(genes_spatial, genes_ref)
    return Y[:, spatial_idx], X[:, ref_idx], common


def prepare_data(adata_st, adata_ref, cell_type_key: str = "cell_type",
                 spatial_key: str = "spatial", layer: str | None = None,
                 layer_ref: str | None = None, **deprecated):
    """``(Y, X, coords, cell_type_names, gene_names)`` ready for ``FlashDeconv.fit``
    (``spatial_coord_key`` and ``layer_st`` are the deprecated names of ``spatial_key``
    and ``layer``)."""
    values = renamed("prepare_data", deprecated,
                     {"spatial_coord_key": "spatial_key", "layer_st": "layer"},
                     {"spatial_key": spatial_key, "layer": layer}, {"spatial_key": "spatial"})
    spatial_key, layer = values["spatial_key"], values["layer"]
    Y, coords, genes_st = load_spatial_data(adata_st, layer=layer, spatial_key=spatial_key)
    X, types, genes_ref = load_reference(adata_ref, cell_type_key=cell_type_key, layer=layer_ref)
    Y, X, genes = align_genes(Y, X, genes_st, genes_ref)
    return Y, X, coords, types, genes


def result_to_anndata(proportions, adata, cell_type_names=None, key_added: str = "flashdeconv"):
    """Store proportions in ``obsm[key_added]`` (DataFrame) and the dominant type in
    ``obs[key_added + '_dominant']`` (categorical)."""
    proportions = np.asarray(proportions)
    if proportions.ndim != 2 or proportions.shape[0] != adata.n_obs:
        raise InputError(f"proportions of shape {proportions.shape} do not fit {adata.n_obs} spots")
    columns = (np.asarray(cell_type_names).astype(str) if cell_type_names is not None
               else np.array([f"CellType_{k}" for k in range(proportions.shape[1])]))
    if columns.size != proportions.shape[1]:
        raise InputError(f"{columns.size} cell type names for {proportions.shape[1]} columns")
    adata.obsm[key_added] = pd.DataFrame(proportions, index=adata.obs_names, columns=columns)
    adata.obs[f"{key_added}_dominant"] = pd.Categorical(
        columns[np.argmax(proportions, axis=1)], categories=columns)
    return adata


def read_anndata(path: str):
    """An AnnData from a local or fsspec URL (``s3://``, ``gs://``) .h5ad or .zarr;
    a missing or unreadable file raises :class:`InputError`."""
    import anndata as ad

    path = str(path)
    remote = "://" in path and not path.startswith("file://")
    if not remote and not Path(path).exists():
        raise InputError(f"{path} not found")
    try:
        if not path.endswith(".h5ad"):
            return ad.read_zarr(path)
        if not remote:
            return ad.read_h5ad(path)
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return ad.read_h5ad(handle)
    except Exception as error:  # anndata raises many types for unreadable files
        raise InputError(f"{path} cannot be read as AnnData: {error}") from error


def anndata_kind(path, what: str) -> str:
    """What ``path`` holds, from its layout (read nothing big): ``"store"`` (a spot store),
    ``"spatialdata"`` (a SpatialData zarr store) or ``"anndata"`` (.h5ad or AnnData zarr).
    Anything else, or nothing, is an :class:`InputError` naming ``what``."""
    text = str(path)
    remote = "://" in text and not text.startswith("file://")
    if text.endswith(".h5ad"):
        if not remote and not Path(text).is_file():
            raise InputError(f"{what} {text} not found")
        return "anndata"
    from .engine.store import LAYOUT_KEY, open_zarr

    try:
        root = open_zarr(text, "r")
    except Exception as error:  # a file, a folder without zarr metadata, a wrong URL
        if not remote and not Path(text.removeprefix("file://")).exists():
            raise InputError(f"{what} {text} not found") from error
        raise InputError(f"{what} {text} is neither an AnnData (.h5ad, .zarr), a spot store "
                         "nor a SpatialData .zarr store") from error
    if "uns" in root and LAYOUT_KEY in root["uns"]:
        return "store"
    if "tables" in root or "spatialdata_attrs" in root.attrs or "spatialdata" in root.attrs:
        return "spatialdata"
    if root.attrs.get("encoding-type") == "anndata":
        return "anndata"
    raise InputError(f"{what} {text} is a zarr store but neither an AnnData, a spot store nor a "
                     "SpatialData store")


def proportions_to_obs(adata, key: str = "flashdeconv", prefix: str = "") -> list[str]:
    """Copy the proportions in ``obsm[key]`` into ``obs`` columns (``prefix + cell type``),
    the layout ``scanpy.pl.spatial(adata, color="Astrocytes")`` and cell2location users
    expect (existing columns of those names are replaced). Returns the column names."""
    if key not in adata.obsm:
        raise InputError(f"no results under obsm[{key!r}]; run dflashdeconv.tl.deconvolve first")
    table = adata.obsm[key]
    columns = [f"{prefix}{c}" for c in table.columns]
    for name, column in zip(table.columns, columns):
        adata.obs[column] = table[name].to_numpy()
    return columns


def to_store(source, path, **kwargs):
    """Convert ``source`` to a spot store at ``path`` (a local path or fsspec URL), streaming.

    ``source``: an AnnData (in memory or backed), a SpatialData object, or the path of an
    ``.h5ad`` file, a Stereo-seq GEM file (``.gem``/``.gem.gz``) or square-bin GEF file
    (``.gef``; both with ``bin_size=`` 50 by default), a Visium HD binned output folder or a
    SpatialData ``.zarr`` store (``format=`` names the format when it cannot be guessed).
    Keyword arguments go to the converter (:mod:`dflashdeconv.engine.ingest`). Returns the
    opened store.
    """
    from .engine import ingest

    if isinstance(source, (str, Path)):
        return ingest.from_path(str(source), path, **kwargs)
    if hasattr(source, "tables") and hasattr(source, "shapes"):
        return ingest.from_spatialdata(source, path, **kwargs)
    return ingest.from_anndata(source, path, **kwargs)


def read_results(path, key: str = "flashdeconv"):
    """Proportions (DataFrame) of a completed run stored in a spot store."""
    from .engine.results import read_results as read

    return read(path, key)


def read_store_view(path, key: str = "flashdeconv"):
    """AnnData with a spot store's results, coordinates and obs, without the counts."""
    from .engine.results import read_store_view as read

    return read(path, key)
