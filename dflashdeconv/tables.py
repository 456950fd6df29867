"""AnnData and SpatialData accessors shared by the engine, histology and I/O layers.

The data-model rules every layer follows in one place: where a table's counts are (``.X``
or a layer), which table of a SpatialData object is meant (the named one, or the only
one) and where the rows of a SpatialData table sit (the centroids of the shapes
they annotate). Imports nothing of dflashdeconv but its errors, so any layer may use it.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def layer_matrix(adata, layer: str | None, what: str):
    """``adata.X`` or ``adata.layers[layer]``; a missing one is an :class:`InputError`
    naming ``what`` (e.g. "the reference AnnData") and the layers it has."""
    if layer is None:
        if adata.X is None:
            raise InputError(f"{what} has no .X; pass layer=")
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found in {what}.layers ({list(adata.layers)})")
    return adata.layers[layer]


def annotated_centroids(sdata, adata, table: str) -> np.ndarray:
    """Centroid of the shape each row of table ``adata`` annotates, row for row, in the
    shapes' own (intrinsic) coordinates. A table may annotate several shapes elements;
    each row names its own through the region key."""
    attrs = adata.uns.get("spatialdata_attrs", {})
    region_key, instance_key = attrs.get("region_key"), attrs.get("instance_key")
    if region_key not in adata.obs or instance_key not in adata.obs:
        raise InputError(f"table {table!r}: no obsm['spatial'] and no annotated shapes to take "
                         "coordinates from")
    row_regions = adata.obs[region_key].astype(str).to_numpy()
    ids = adata.obs[instance_key].to_numpy()
    coords = np.empty((adata.n_obs, 2), dtype=np.float64)
    for region in np.unique(row_regions):
        if region not in sdata.shapes:
            raise InputError(f"table {table!r}: rows annotate {region!r}, which is not a shapes "
                             f"element (shapes: {list(sdata.shapes)})")
        rows = row_regions == region
        shapes = sdata.shapes[region]
        position = shapes.index.get_indexer(ids[rows])
        if (position < 0).any():
            raise InputError(f"table {table!r}: {(position < 0).sum()} rows annotate no shape "
                             f"of {region!r}")
        centroid = shapes.geometry.centroid
        coords[rows] = np.column_stack([centroid.x.to_numpy(), centroid.y.to_numpy()])[position]
    return coords


def spatialdata_table(sdata, table_key: str | None = None):
    """``(name, table)`` of a SpatialData object: ``table_key`` or its only table."""
    tables = list(sdata.tables)
    if not tables:
        raise InputError("the SpatialData object has no table")
    if table_key is None:
        if len(tables) != 1:
            raise InputError(f"the SpatialData object has {len(tables)} tables ({tables}); "
                             "name one with table_key= (--table-key)")
        table_key = tables[0]
    if table_key not in sdata.tables:
        raise InputError(f"no table {table_key!r} in the SpatialData object ({tables})")
    return table_key, sdata.tables[table_key]
