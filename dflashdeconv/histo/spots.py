"""Spots on a slide: attached from an AnnData as SpatialData shapes, read back as centres
in level-0 pixels with their diameter and table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..tables import annotated_centroids
from .image import (
    _check_spatialdata,
    _image_source,
    image_transformations,
    slide_image,
)

#: ``uns`` key that marks a table of predictions (not measured counts) in a SpatialData.
PREDICTION_MARKER = "dflashdeconv_prediction"
#: Diameter of a Visium spot in microns.
VISIUM_SPOT_UM = 55.0


def _spot_diameter(adata, coords: np.ndarray, spot_diameter_px) -> float:
    """Spot diameter in level-0 px: given, ``uns['spot_diameter_px']``, Visium's
    ``spot_diameter_fullres``, else half the median centre-to-centre distance."""
    if spot_diameter_px is not None:
        if not (np.isfinite(spot_diameter_px) and spot_diameter_px > 0):
            raise InputError(f"spot_diameter_px must be positive, got {spot_diameter_px!r}")
        return float(spot_diameter_px)
    if "spot_diameter_px" in adata.uns:
        return float(adata.uns["spot_diameter_px"])
    visium = _visium_spot_diameter(adata)
    if visium is not None:
        return visium
    if coords.shape[0] < 2:
        return 1.0
    from ..core.graph import grid_spacing

    return grid_spacing(coords) / 2


def _visium_spot_diameter(adata) -> float | None:
    """Space Ranger's ``spot_diameter_fullres`` from ``uns['spatial']``, if recorded."""
    for library in adata.uns.get("spatial", {}).values():
        scalefactors = library.get("scalefactors", {}) if isinstance(library, dict) else {}
        if "spot_diameter_fullres" in scalefactors:
            return float(scalefactors["spot_diameter_fullres"])
    return None


def mpp_from_adata(adata) -> float | None:
    """Microns per full-resolution pixel recorded in an AnnData: ``uns['px_per_um']``,
    ``uns['mpp']``, or Visium's ``spot_diameter_fullres`` (spots are 55 um across)."""
    if "px_per_um" in adata.uns:
        return 1.0 / float(adata.uns["px_per_um"])
    if "mpp" in adata.uns:
        return float(adata.uns["mpp"])
    diameter = _visium_spot_diameter(adata)
    return VISIUM_SPOT_UM / diameter if diameter else None


def check_points_in_image(coords, shape: tuple[int, int], what: str = "spots") -> np.ndarray:
    """Finite (n, 2) float coordinates inside an image of ``shape`` (height, width)."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in "fiu":
        raise InputError(f"{what} coordinates must be a numeric (n, 2) array of (x, y) level-0 "
                         f"pixels, got shape {coords.shape} and dtype {coords.dtype}")
    coords = coords.astype(np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(f"{bad.sum()} {what} have NaN or infinite coordinates, e.g. rows "
                         f"{np.flatnonzero(bad)[:5].tolist()}")
    height, width = shape
    outside = (coords[:, 0] < 0) | (coords[:, 0] >= width) | (coords[:, 1] < 0) | \
        (coords[:, 1] >= height)
    if outside.any():
        first = np.flatnonzero(outside)[:3]
        raise InputError(
            f"{outside.sum()} of {len(coords)} {what} lie outside the {width} x {height} px image, "
            f"e.g. {coords[first].round(1).tolist()}; coordinates must be (x = column, y = row) "
            "pixels of the full-resolution image (scale low-resolution coordinates by "
            "1 / scalefactor)")
    return coords


def add_spots(sdata, adata, *, image_key: str | None = None, spatial_key: str = "spatial",
              spot_diameter_px: float | None = None, shapes_key: str = "spots",
              table_key: str = "table") -> None:
    """Attach spots as circles ``shapes[shapes_key]`` with a linked ``tables[table_key]``.

    ``adata.obsm[spatial_key]`` holds the centres in level-0 pixels of the image; the
    circles get the image's coordinate transformations, so they overlay it in every
    coordinate system. ``adata`` is copied, never modified; ``sdata`` gains two elements.
    """
    import anndata as ad
    from spatialdata.models import ShapesModel, TableModel

    _check_spatialdata(sdata)
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"spots must be an AnnData, got {type(adata).__name__}")
    if spatial_key not in adata.obsm:
        raise InputError(f"spot coordinates missing: no obsm[{spatial_key!r}] "
                         f"(obsm has {list(adata.obsm)})")
    slide = slide_image(sdata, image_key)
    coords = check_points_in_image(adata.obsm[spatial_key], slide.shape)
    diameter = _spot_diameter(adata, coords, spot_diameter_px)
    transformations = image_transformations(sdata, image_key)
    circles = ShapesModel.parse(coords, geometry=0, radius=np.full(len(coords), diameter / 2),
                                index=np.arange(len(coords)), transformations=transformations)
    table = adata.copy()
    table.obs["region"] = shapes_key
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["spot_id"] = np.arange(len(coords))
    sdata.shapes[shapes_key] = circles
    sdata.tables[table_key] = TableModel.parse(table, region=shapes_key, region_key="region",
                                               instance_key="spot_id")


@dataclass(frozen=True)
class Spots:
    """Spots of a slide: their table, centres (level-0 px of the image) and shapes key."""

    table: object
    centres: np.ndarray
    shapes_key: str
    instance_ids: np.ndarray


def spots_table(sdata, *, image_key: str | None = None, shapes_key: str | None = None,
                table_key: str | None = None) -> Spots:
    """The table annotating a spots shapes element, with the spot centres in level-0
    pixels of the image, row for row.

    Spots are mapped into the image through the coordinate systems they share; spots and
    image without a shared coordinate system are an error (they cannot be aligned).
    """
    _check_spatialdata(sdata)
    table_key, table = _annotating_table(sdata, shapes_key, table_key)
    attrs = table.uns["spatialdata_attrs"]
    regions = [attrs["region"]] if isinstance(attrs["region"], str) else list(attrs["region"])
    region = shapes_key if shapes_key is not None else next(r for r in regions if r in sdata.shapes)
    rows = table.obs[attrs["region_key"]].astype(str).to_numpy() == region
    table = table[rows]
    instance = table.obs[attrs["instance_key"]].to_numpy()
    local = annotated_centroids(sdata, table, table_key)
    _, key = _image_source(sdata, image_key)
    centres = _to_image_pixels(sdata, region, key, local)
    shape = slide_image(sdata, key).shape
    return Spots(table, check_points_in_image(centres, shape), region, instance)


def _annotating_table(sdata, shapes_key, table_key):
    """The one table annotating spot shapes; prediction tables are only taken by name."""
    candidates = []
    for name, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region")
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        if (table_key is not None and name != table_key) or \
                (table_key is None and PREDICTION_MARKER in table.uns):
            continue
        if any(r in sdata.shapes and (shapes_key is None or r == shapes_key) for r in regions):
            candidates.append((name, table))
    if not candidates:
        raise InputError(f"no table annotating spot shapes{'' if shapes_key is None else f' {shapes_key!r}'}"
                         f" in the SpatialData object (tables: {list(sdata.tables)}, shapes: "
                         f"{list(sdata.shapes)}); attach spots with histo.add_spots")
    if len(candidates) > 1:
        raise InputError(f"several tables annotate spot shapes ({[n for n, _ in candidates]}): "
                         "pass table_key=")
    return candidates[0]


def _to_image_pixels(sdata, shapes_key: str, image_key: str | None, local: np.ndarray):
    """Shape coordinates mapped into the image's level-0 pixels via a shared coordinate system."""
    from spatialdata.transformations import get_transformation

    to_space = get_transformation(sdata.shapes[shapes_key], get_all=True)
    if image_key is None:  # wsidata: slide-reader pixels are the "global" system
        if "global" not in to_space:
            raise InputError(f"spots {shapes_key!r} are not in the slide's 'global' coordinate "
                             f"system (they are in {sorted(to_space)})")
        return _apply(to_space["global"], local)
    image_to_space = get_transformation(sdata.images[image_key], get_all=True)
    shared = sorted(set(to_space) & set(image_to_space))
    if not shared:
        raise InputError(
            f"mismatched coordinate systems: spots {shapes_key!r} are in {sorted(to_space)}, "
            f"image {image_key!r} in {sorted(image_to_space)}; register them to a common one")
    space = "global" if "global" in shared else shared[0]
    in_space = _apply(to_space[space], local)
    inverse = image_to_space[space].inverse()
    return _apply(inverse, in_space)


def _apply(transformation, xy: np.ndarray) -> np.ndarray:
    matrix = transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return xy @ matrix[:2, :2].T + matrix[:2, 2]

