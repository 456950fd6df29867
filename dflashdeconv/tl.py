"""Scanpy-style tools: results are written into the AnnData (or store) under ``key_added``."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd

from .core.genes import MIN_SHARED_GENES, check_shared_genes
from .core.model import FlashDeconv
from .core.params import MODEL_NAMES, params_record, renamed
from .errors import DataWarning, InputError
from .io import check_labels, prepare_data, result_to_anndata
from .tables import annotated_centroids, spatialdata_table


def deconvolve(adata_st, adata_ref, cell_type_key: str = "cell_type", *, sketch_dim: int = 512,
               lambda_spatial="auto", rho_sparsity: float = 0.01, n_hvg: int = 2000,
               n_markers_per_type: int = 50, spatial_method: str = "knn", k_neighbors: int = 6,
               radius: float | None = None, max_iter: int = 1000, tol: float = 1e-4,
               preprocess: str = "log_cpm", random_state: int = 0,
               gene_weighting: str = "expected", refine: str = "none", n_jobs: int | None = None,
               layer: str | None = None,
               layer_ref: str | None = None, spatial_key: str = "spatial",
               table_key: str | None = None, min_shared_genes: int = MIN_SHARED_GENES,
               key_added: str = "flashdeconv", copy: bool = False, scheduler=None,
               inner_sweeps: int = 1, overwrite: bool = False, resume: bool = False,
               progress: bool = True, uncertainty: bool = False, **deprecated):
    """Cell-type proportions of every spot of ``adata_st`` from the reference ``adata_ref``.

    The model parameters (``sketch_dim`` ... ``n_jobs``) are
    :class:`~dflashdeconv.FlashDeconv`'s, with its defaults (``refine="auto"`` for the most
    accurate proportions, see docs/REFINE.md). Counts are taken from ``.X``
    or ``layer``/``layer_ref``, coordinates from ``obsm[spatial_key]``. Genes are matched
    by name; fewer than ``min_shared_genes`` shared genes is an error, a cell type with
    few genes of its own among them a warning. The count matrices are read, never
    modified. (``layer_st`` is the deprecated name of ``layer``.)

    ``adata_st`` may be a SpatialData object: its table ``table_key`` (default: its only
    table) is deconvolved, coordinates from the table's ``obsm[spatial_key]`` or else the
    centroids of the shapes it annotates, and the results are written into that table
    (``copy=True`` returns a copy of the table instead).

    ``adata_st`` may also be the path or fsspec URL of a spot store (see
    ``dflashdeconv ingest``): the run is then out of core on Dask (``scheduler``: a
    Client, a scheduler address or None for a LocalCluster; ``inner_sweeps`` solver steps
    per boundary exchange), results go into the store under the same keys (an existing
    ``key_added`` only with ``overwrite``; ``resume`` continues an interrupted run) and the
    run summary is returned.

    Writes (returns None, or the modified copy with ``copy=True``):

    - ``obsm[key_added]``: proportions (DataFrame, spots x cell types)
    - ``obs[key_added + '_dominant']``: the largest type per spot (categorical)
    - ``obs[key_added + '_zero_signal']``: spots without counts on the used genes, whose
      (uniform) proportions carry no information
    - ``uns[key_added + '_params']``: parameters, penalties used and convergence
      (``changes``: the largest relative change of each iteration)
    - with ``uncertainty=True`` (in memory only): ``obsm[key_added + '_ci_lower']``,
      ``obsm[key_added + '_ci_upper']`` (95% sandwich intervals of the proportions) and
      ``obsm[key_added + '_detected']`` (Benjamini-Hochberg detection calls at q = 0.1)
    """
    arguments = locals()
    params = {name: arguments[name] for name in MODEL_NAMES if name in arguments}
    layer = renamed("deconvolve", deprecated, {"layer_st": "layer"}, {"layer": layer})["layer"]
    if isinstance(adata_st, (str, os.PathLike)):
        if uncertainty:
            raise InputError("uncertainty=True is available for in-memory AnnData input only")
        from .engine.run import deconvolve_store
        from .io import load_reference

        X, types, ref_genes = load_reference(adata_ref, cell_type_key=cell_type_key, layer=layer_ref)
        return deconvolve_store(
            adata_st, X, types, ref_genes, key_added=key_added, scheduler=scheduler,
            inner_sweeps=inner_sweeps, overwrite=overwrite, resume=resume, progress=progress,
            min_shared_genes=min_shared_genes, **params)
    source, coords = adata_st, None
    if hasattr(adata_st, "tables") and hasattr(adata_st, "shapes"):  # SpatialData
        name, source = spatialdata_table(adata_st, table_key)
        if spatial_key not in source.obsm:
            coords = annotated_centroids(adata_st, source, name)
    adata = source.copy() if copy else source
    Y, X, data_coords, types, genes = prepare_data(
        _with_coords(adata, coords, spatial_key), adata_ref, cell_type_key=cell_type_key,
        spatial_key=spatial_key, layer=layer, layer_ref=layer_ref)
    check_shared_genes(X, types, min_shared_genes, stacklevel=3)
    coords = data_coords
    model = FlashDeconv(**params)
    proportions = model.fit_transform(Y, X, coords, cell_type_names=types)
    result_to_anndata(proportions, adata, types, key_added=key_added)
    adata.obs[f"{key_added}_zero_signal"] = model.zero_signal_
    adata.uns[f"{key_added}_params"] = params_record(
        model.get_params(), lambda_used=model.lambda_used_, types=types,
        n_genes_used=model.gene_idx_.size, converged=model.info_["converged"],
        n_iterations=model.info_["n_iterations"], changes=model.info_["changes"],
        n_zero_signal=np.sum(model.zero_signal_)) | {
        "n_genes_shared": int(len(genes)), "n_spots": int(adata.n_obs)}
    if hasattr(model, "refine_"):
        adata.uns[f"{key_added}_params"]["refine_result"] = {
            k: v for k, v in model.refine_.items() if k not in ("factors", "failed")} | {
            "n_failed": int(model.refine_["failed"].size)}
    if uncertainty:
        uq = model.compute_uncertainty()
        for name in ("ci_lower", "ci_upper", "detected"):
            adata.obsm[f"{key_added}_{name}"] = pd.DataFrame(
                uq[name], index=adata.obs_names, columns=[str(t) for t in types])
    return adata if copy else None


def _with_coords(adata, coords, spatial_key: str):
    """``adata``, or a light AnnData over the same counts with ``coords`` (centroids of a
    SpatialData table's shapes) when given: the caller's table is not touched."""
    if coords is None:
        return adata
    import anndata as ad

    view = ad.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]],
                      layers=dict(adata.layers))
    view.obsm[spatial_key] = coords
    return view


def predict_expression(query, training=None, **kwargs):
    """Expression predicted from H&E with STFlow for every tile (or spot) of ``query``.

    Returns an AnnData (tiles x genes, ``obsm['spatial']`` = tile centres, ``uns`` with the
    run's metadata) and writes a table into the query's SpatialData object. See
    :func:`dflashdeconv.histo.predict.predict_expression` for the parameters.
    """
    from .histo.predict import predict_expression as predict

    return predict(query, training, **kwargs)


def predict_cell_types(expression, reference, cell_type_key: str = "cell_type", *,
                       key_added: str = "cell_types", **deconvolve_params) -> pd.DataFrame:
    """Per-tile cell-type proportions from H&E alone: FlashDeconv on the expression that
    :func:`predict_expression` returned, with a single-cell ``reference``.

    The values ``expm1(X)`` of ``expression`` (log1p counts per 10k, or log1p counts) go
    into :func:`deconvolve` with ``reference`` (genes matched by name; a reference without enough of the panel's
    genes is an error). Writes ``obsm[key_added]``, ``obs[key_added + '_dominant']`` and
    ``uns[key_added + '_params']`` into ``expression`` and returns the proportions.
    """
    import anndata as ad

    check_labels(reference, cell_type_key)
    panel = pd.Index(expression.var_names.astype(str))
    shared = panel.intersection(pd.Index(reference.var_names.astype(str)))
    n_types = reference.obs[cell_type_key].nunique()
    if shared.size < max(2, n_types):
        raise InputError(f"the reference has {shared.size} of the {panel.size} panel genes "
                         f"(missing e.g. {list(panel.difference(shared)[:5])}); deconvolving "
                         f"{n_types} cell types needs at least {max(2, n_types)}: train STFlow "
                         "on a panel the reference measures (genes=[...])")
    if shared.size < panel.size:
        warnings.warn(f"{panel.size - shared.size} panel genes are not in the reference and are "
                      "left out of the deconvolution", DataWarning, stacklevel=2)
    counts = ad.AnnData(X=np.expm1(np.clip(np.asarray(expression.X, np.float64), 0, None)),
                        obs=pd.DataFrame(index=expression.obs_names),
                        var=pd.DataFrame(index=panel))
    counts.obsm["spatial"] = np.asarray(expression.obsm["spatial"])
    deconvolve_params.setdefault("min_shared_genes", max(2, n_types))  # checked above
    deconvolve(counts, reference, cell_type_key=cell_type_key, key_added=key_added,
               **deconvolve_params)
    proportions = counts.obsm[key_added]
    expression.obsm[key_added] = proportions
    expression.obs[f"{key_added}_dominant"] = counts.obs[f"{key_added}_dominant"]
    expression.uns[f"{key_added}_params"] = counts.uns[f"{key_added}_params"]
    return proportions
