"""H&E to expression: tile, embed, train STFlow and predict on the pool.

:func:`train_expression_model` learns a gene panel from paired slides (H&E + spot
counts); :func:`predict_expression` predicts it for every tile of a query slide (or its
spots) and writes a table into the SpatialData object. ``tl.predict_cell_types`` feeds
that prediction into FlashDeconv with a single-cell reference, so H&E alone gives
per-tile cell-type proportions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone

from ..core.validation import as_count_matrix
from ..errors import InputError
from ..tables import layer_matrix
from . import pool
from .encoders import default_tile_spec, stain_normalized
from .image import TileSpec, image_transformations, slide_image
from .slide import open_slide
from .spots import PREDICTION_MARKER, spots_table
from .stflow import STFlow
from .tissue import tile_grid

#: Where :func:`predict_expression` predicts.
LOCATIONS = ("tiles", "spots")
#: What STFlow learns: log1p counts per 10k of each spot's total ("cp10k", HEST-Bench's
#: target, with the log1p total predicted beside the genes so that counts can be
#: recovered) or raw log1p counts ("log1p", which follow each spot's library size).
TARGETS = ("cp10k", "log1p")
#: Name of the extra output column of a "cp10k" model: log1p of the spot's total counts.
TOTAL_COUNTS = "__log1p_total_counts__"


def training_target(counts: np.ndarray, totals: np.ndarray, target: str) -> np.ndarray:
    """The STFlow training matrix of ``counts`` (spots x panel) for ``target``; spots with
    no counts get zeros."""
    if target == "log1p":
        return np.log1p(counts)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    return np.hstack([np.log1p(counts * scale[:, None]), np.log1p(totals)[:, None]])


def _as_spatialdata(source, slide_mpp, cache, what: str):
    from spatialdata import SpatialData

    if isinstance(source, SpatialData):
        return source
    if isinstance(source, (str, Path)):
        return open_slide(source, slide_mpp=slide_mpp, cache=cache)
    raise InputError(f"{what} must be a SpatialData object or a slide path, got "
                     f"{type(source).__name__}")


def _count_matrix(table, genes: np.ndarray, layer: str | None, what: str) -> np.ndarray:
    """Dense (spots, genes) raw counts of ``genes``, checked finite and non-negative."""
    position = pd.Index(table.var_names.astype(str)).get_indexer(genes)
    counts = as_count_matrix(what, layer_matrix(table, layer, what)[:, position])
    return np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, np.float64)


def select_genes(tables, genes=50, within=None, target: str = "cp10k", *,
                 layer: str | None = None, totals: list | None = None) -> np.ndarray:
    """The gene panel: the listed ``genes`` (each must be in every table), or the
    ``genes`` most variable genes (variance of the ``target`` over all spots) among the
    genes every table measures (and, if given, that are ``within`` these names, e.g. a
    single-cell reference's genes). Counts are the tables' ``layer`` (default ``.X``);
    ``totals``: each table's spot totals when the caller has them already."""
    names = [pd.Index(t.var_names.astype(str)) for t in tables]
    if any(not n.is_unique for n in names):
        raise InputError("duplicate gene names in a training table; make them unique "
                         "(AnnData.var_names_make_unique)")
    shared = names[0]
    for n in names[1:]:
        shared = shared.intersection(n)
    if within is not None and isinstance(genes, (int, np.integer)):
        shared = shared.intersection(pd.Index(np.asarray(within).astype(str)))
    if isinstance(genes, (int, np.integer)) and not isinstance(genes, bool):
        if genes < 1:
            raise InputError(f"genes must be a positive number or a list of names, got {genes}")
        if shared.size == 0:
            raise InputError("the training slides share no gene names")
        shared = np.asarray(sorted(shared))
        totals = totals or [_totals(t, layer) for t in tables]
        values = np.vstack([training_target(_count_matrix(t, shared, layer, "training table"),
                                            total, target)[:, :shared.size]
                            for t, total in zip(tables, totals)])
        variance = values.var(axis=0)
        order = np.argsort(-variance, kind="stable")[:genes]
        return shared[np.sort(order)]
    panel = np.asarray([str(g) for g in genes])
    if panel.size == 0 or pd.Index(panel).has_duplicates:
        raise InputError("the gene panel must list at least one gene, each once")
    missing = [g for g in panel if g not in shared]
    if missing:
        raise InputError(f"{len(missing)} panel genes are not measured on every training slide, "
                         f"e.g. {missing[:5]}")
    return panel


def _totals(table, layer: str | None) -> np.ndarray:
    """Each spot's total counts over all the table's genes (its library size)."""
    matrix = layer_matrix(table, layer, "training table")
    return np.asarray(matrix.sum(axis=1), np.float64).ravel()


def _training_slides(training, cache) -> list:
    slides = training if isinstance(training, (list, tuple)) else [training]
    if not slides:
        raise InputError("no training slides given")
    return [_as_spatialdata(s, None, cache, "a training slide") for s in slides]


def train_expression_model(training, *, genes=50, genes_within=None, target: str = "cp10k",
                           encoder: str = "morphology",
                           encoder_weights=None, encoder_options: dict | None = None,
                           tile_spec: TileSpec | None = None,
                           model: STFlow | None = None, layer: str | None = None,
                           image_key: str | None = None, scheduler=None, cache=None,
                           use_cache: bool = True, progress: bool = False) -> STFlow:
    """Fit STFlow on paired slides: SpatialData objects (or zarr paths) with an H&E image
    and spots whose table holds raw counts (see :func:`~dflashdeconv.histo.open_slide`).

    ``genes``: a number of most variable genes (among ``genes_within`` if given) or a
    list. ``target``: what the model learns (:data:`TARGETS`): log1p counts per 10k
    (default; the spot's total counts are learnt beside them) or raw log1p counts.
    ``encoder``: a name of :func:`~dflashdeconv.histo.available_encoders` (a pathology
    ViT such as ``"uni"`` with its local ``encoder_weights`` and ``encoder_options``, e.g.
    ``{"n_heads": 16}`` for ``"vit"``). Reference patches are centred on the spots with
    ``tile_spec`` (default: the encoder's, :func:`~dflashdeconv.histo.encoders.default_tile_spec`;
    the same spec must be used for the query tiles; it is recorded in the model).
    ``model``: an unfitted
    :class:`STFlow` carrying the training parameters (default ``STFlow()``). Tasks run
    on the GPU pool of ``scheduler`` (a Client or address; None starts a LocalCluster).
    """
    from ..engine.cluster import connect

    spec = tile_spec or default_tile_spec(encoder)
    if model is not None and not isinstance(model, STFlow):
        raise InputError(f"model must be an STFlow, got {type(model).__name__}")
    model = STFlow() if model is None else clone(model)  # never fit the caller's object
    model._check_params()
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, got {target!r}")
    sdatas = _training_slides(training, cache)
    spots = [spots_table(s, image_key=image_key) for s in sdatas]
    slides = [slide_image(s, image_key) for s in sdatas]
    for slide in slides:
        slide.require_mpp()
    totals = [_totals(s.table, layer) for s in spots]
    panel = select_genes([s.table for s in spots], genes, genes_within, target, layer=layer,
                         totals=totals)
    expression = np.vstack([
        training_target(_count_matrix(s.table, panel, layer, f"training slide {i}"), total,
                        target) for i, (s, total) in enumerate(zip(spots, totals))])
    outputs = list(panel) + ([TOTAL_COUNTS] if target == "cp10k" else [])
    coords = np.vstack([s.centres for s in spots])
    slide_ids = np.concatenate([np.full(len(s.centres), i) for i, s in enumerate(spots)])
    with connect(scheduler, quiet=not progress) as client:
        features = [pool.embed_tiles(client, slide, s.centres, spec, encoder,
                                     weights=encoder_weights, options=encoder_options,
                                     cache=cache, use_cache=use_cache,
                                     description=f"embedding training slide {i + 1}" if progress else None)[0]
                    for i, (slide, s) in enumerate(zip(slides, spots))]
        metadata = {"encoder": encoder if isinstance(encoder, str) else encoder.name,
                    "tile_spec": spec.to_dict(), "n_training_slides": len(slides),
                    "target": target,
                    "stain_normalize": stain_normalized(encoder, encoder_options)}
        model, records = pool.train_ensemble(client, model, np.vstack(features), coords,
                                             expression, slide_ids, outputs, metadata,
                                             "training STFlow" if progress else None)
    model.metadata_ = {**model.metadata_,
                       "training_devices": sorted({record.device for record in records})}
    return model


def resolve_tile_spec(tile_size: int | None, tile_mpp: float | None, encoder,
                      model: STFlow | None = None) -> TileSpec:
    """The tile spec asked for, its missing parts from the fitted ``model``'s recorded spec,
    else from the ``encoder``'s default."""
    recorded = None if model is None else model.metadata_.get("tile_spec")
    default = TileSpec(**recorded) if recorded else default_tile_spec(encoder)
    return TileSpec(default.size if tile_size is None else tile_size,
                    default.mpp if tile_mpp is None else tile_mpp)


def _trained_stain_normalize(model: STFlow) -> bool | None:
    """Whether the pipeline stain-normalised the model's training tiles (models saved
    before it recorded this were not normalised); None for a model fitted outside it."""
    if "encoder" not in model.metadata_:
        return None
    return bool(model.metadata_.get("stain_normalize", False))


def _resolve_encoder_options(encoder, options: dict | None, model: STFlow | None) -> dict:
    """The encoder options asked for; the morphology encoder's stain normalisation, when
    not asked for, follows the fitted ``model``'s record."""
    options = dict(options or {})
    trained = None if model is None else _trained_stain_normalize(model)
    if encoder == "morphology" and "stain_normalize" not in options and trained is not None:
        options["stain_normalize"] = trained
    return options


def _check_model_spec(model: STFlow, encoder, spec: TileSpec, options: dict | None) -> None:
    recorded = model.metadata_.get("tile_spec")
    if recorded is not None and TileSpec(**recorded) != spec:
        raise InputError(f"the model was trained on tiles {recorded}, the query would use "
                         f"{spec.to_dict()}; query tiles must share the reference patches' spec")
    name = encoder if isinstance(encoder, str) else encoder.name
    if model.metadata_.get("encoder") not in (None, name):
        raise InputError(f"the model was trained on {model.metadata_['encoder']!r} features, "
                         f"not {name!r}")
    trained = _trained_stain_normalize(model)
    if trained is not None and trained != stain_normalized(encoder, options):
        raise InputError(f"the model was trained on {'' if trained else 'un'}normalised "
                         f"stains, the query tiles would {'not ' if trained else ''}be "
                         f"stain-normalised; pass encoder_options={{'stain_normalize': "
                         f"{trained}}}")


def predict_expression(query, training=None, *, model: STFlow | str | None = None, genes=50,
                       encoder: str = "morphology", encoder_weights=None,
                       encoder_options: dict | None = None, tile_size: int | None = None,
                       tile_mpp: float | None = None, locations: str = "tiles",
                       stride_um: float | None = None, min_tissue: float = 0.5,
                       slide_mpp: float | None = None, image_key: str | None = None,
                       stflow: STFlow | None = None, layer: str | None = None,
                       target: str = "cp10k", scheduler=None,
                       cache=None, use_cache: bool = True, key_added: str = "stflow",
                       progress: bool = False):
    """Expression predicted from H&E for every tile of ``query`` (AnnData, tiles x genes).

    ``query``: a SpatialData / WSIData object or a slide path. Either ``training``
    (paired slides, see :func:`train_expression_model`; ``genes``, ``target``, ``stflow``
    and ``layer`` apply) or a fitted ``model`` (an :class:`STFlow` or the path of a saved
    one). ``locations="tiles"`` predicts on a grid of ``tile_size`` px tiles at
    ``tile_mpp`` over the detected tissue (``stride_um``, default the tile's side;
    ``min_tissue``), ``"spots"`` at the query's own spots. The tile spec defaults to the
    fitted model's (recorded at training), else the encoder's (448 px at 0.5 um/px for
    ``"morphology"``, 224 px at 0.5 um/px for the ViTs); so does the morphology encoder's
    stain normalisation (``encoder_options={"stain_normalize": ...}``, default on).

    Returns the AnnData (X = the model's target: log1p counts per 10k, with the count
    scale in ``layers['log1p_counts']`` (from the predicted totals), or log1p counts for
    a model trained with ``target="log1p"``; ``obsm['spatial']`` = tile centres in
    level-0 pixels; ``uns[key_added]`` = run metadata) and writes it into the query as
    ``tables[key_added]`` (annotating ``shapes[key_added + '_tiles']``, or the spots).
    """
    from ..engine.cluster import connect

    timings = {}
    start = time.perf_counter()
    if locations not in LOCATIONS:
        raise InputError(f"locations must be one of {LOCATIONS}, got {locations!r}")
    if (training is None) == (model is None):
        raise InputError("pass either training slides or a fitted model (not both, not neither)")
    if model is not None:
        model = STFlow.load(model) if isinstance(model, (str, Path)) else model
        model._check_fitted()
    spec = resolve_tile_spec(tile_size, tile_mpp, encoder, model)
    encoder_options = _resolve_encoder_options(encoder, encoder_options, model)
    sdata = _as_spatialdata(query, slide_mpp, cache, "query")
    slide = slide_image(sdata, image_key, slide_mpp)
    slide.require_mpp()
    if model is not None:
        _check_model_spec(model, encoder, spec, encoder_options)
    if locations == "spots":
        spots = spots_table(sdata, image_key=image_key)
        centres, region, instance = spots.centres, spots.shapes_key, spots.instance_ids
        names = spots.table.obs_names.to_numpy()
    else:
        centres = tile_grid(slide, spec, stride_um=stride_um, min_tissue=min_tissue)
        region, instance, names = None, None, np.array([f"tile_{i}" for i in range(len(centres))])
    timings["tiling"] = time.perf_counter() - start

    with connect(scheduler, quiet=not progress) as client:
        if model is None:
            t0 = time.perf_counter()
            model = train_expression_model(training, genes=genes, target=target, encoder=encoder,
                                           encoder_weights=encoder_weights,
                                           encoder_options=encoder_options, tile_spec=spec,
                                           model=stflow, layer=layer, image_key=None,
                                           scheduler=client, cache=cache, use_cache=use_cache,
                                           progress=progress)
            timings["training"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        features, embed_records = pool.embed_tiles(
            client, slide, centres, spec, encoder, weights=encoder_weights,
            options=encoder_options, cache=cache,
            use_cache=use_cache, description="embedding query tiles" if progress else None)
        timings["embedding"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        predicted, sample_records = pool.sample_ensemble(
            client, model, features, centres, "sampling STFlow" if progress else None)
        timings["prediction"] = time.perf_counter() - t0

    records = embed_records + sample_records
    genes = list(model.gene_names_ or [f"gene_{g}" for g in range(model.n_genes_)])
    target = model.metadata_.get("target", "log1p")
    log1p_counts = None
    if target == "cp10k":  # the last output is the log1p total: counts follow from it
        genes, totals, predicted = genes[:-1], np.expm1(predicted[:, -1]), predicted[:, :-1]
        log1p_counts = np.log1p(np.expm1(predicted) * (totals / 1e4)[:, None])
    uns = {
        "genes": genes, "target": target,
        "encoder": encoder if isinstance(encoder, str) else encoder.name,
        "tile_spec": spec.to_dict(), "locations": locations,
        "stain_normalize": stain_normalized(encoder, encoder_options),
        "slide_mpp": float(slide.mpp), "slide_fingerprint": slide.fingerprint,
        "stflow_params": {k: v for k, v in model.get_params().items() if v is not None},
        "workers": sorted({r.worker for r in records}),
        "devices": sorted({r.device for r in records}),
        "training_devices": list(model.metadata_.get("training_devices", [])),
        "timings": {k: float(v) for k, v in timings.items()},
    }
    return _write_table(sdata, predicted, centres, names, uns, (region, instance), key_added,
                        tile_shapes=(slide, spec, image_key), log1p_counts=log1p_counts)


def _write_table(sdata, predicted, centres, names, uns, annotates, key_added, tile_shapes,
                 log1p_counts=None):
    """The prediction as a table with rows ``names`` (the spots' own names, or tile names);
    it annotates the spots (``annotates`` = (shapes key, instance ids)) or, when that is
    (None, None), new square tile shapes."""
    import anndata as ad
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel, TableModel

    region, instance = annotates
    n = centres.shape[0]
    adata = ad.AnnData(X=predicted.astype(np.float32),
                       obs=pd.DataFrame(index=pd.Index(names, dtype=str)),
                       var=pd.DataFrame(index=pd.Index(uns["genes"], dtype=str)))
    adata.obsm["spatial"] = centres.copy()
    if log1p_counts is not None:
        adata.layers["log1p_counts"] = log1p_counts.astype(np.float32)
    adata.uns[key_added] = uns
    adata.uns[PREDICTION_MARKER] = key_added
    if region is None:
        slide, spec, image_key = tile_shapes
        region, instance = f"{key_added}_tiles", np.arange(n)
        half = slide.field_px(spec) / 2
        boxes = shapely.box(centres[:, 0] - half, centres[:, 1] - half,
                            centres[:, 0] + half, centres[:, 1] + half)
        sdata.shapes[region] = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=boxes, index=instance),
            transformations=image_transformations(sdata, image_key))
    adata.obs["region"] = pd.Categorical([region] * n)
    adata.obs["instance_id"] = instance
    table = TableModel.parse(adata, region=region, region_key="region", instance_key="instance_id")
    sdata.tables[key_added] = table
    return table


__all__ = ["train_expression_model", "predict_expression", "select_genes", "training_target",
           "resolve_tile_spec", "LOCATIONS", "TARGETS"]
