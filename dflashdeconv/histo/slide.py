"""Whole-slide H&E images opened as SpatialData: files read lazily or converted once.

Pyramidal TIFF / OME-TIFF / SVS files are read in place through tifffile's zarr
interface. JPEG and PNG cannot be region-decoded, so they are decoded once and written into
a chunked, pyramidal SpatialData zarr store in the cache (:func:`cache_dir`); later opens
are lazy and instant. The slide image and its tiles are :mod:`.image`'s, the spots
:mod:`.spots`'; this module re-exports both for ``from dflashdeconv.histo.slide import``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from ..errors import InputError
from .image import (
    CHUNK_PX,
    IMAGE_KEY,
    SlideImage,
    TileSpec,
    _pyramid,
    _rgb,
    _set_slide_attrs,
    _single_image_key,
    _slide_attrs,
    cache_dir,
    file_fingerprint,
    image_transformations,
    slide_image,
)
from .spots import Spots, add_spots, check_points_in_image, mpp_from_adata, spots_table

#: Files read lazily with tifffile (pyramids in place).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
#: Files decoded once with Pillow and converted to a zarr pyramid.
PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Approximate chunk side over tiled TIFFs (a whole number of TIFF tiles).
TIFF_CHUNK_PX = 512


def open_slide(source, *, slide_mpp: float | None = None, image_key: str = IMAGE_KEY,
               spots=None, spot_diameter_px: float | None = None, spatial_key: str = "spatial",
               cache: str | os.PathLike | None = None):
    """Open an H&E slide as a SpatialData object with one multiscale image ``image_key``.

    ``source``: a pyramidal TIFF / OME-TIFF / SVS (read lazily in place), a JPEG or PNG
    (converted once into a zarr pyramid under ``cache``, see :func:`cache_dir`) or a
    SpatialData zarr store. ``slide_mpp`` (microns per level-0 pixel) overrides what the
    file records; without either, it is taken from ``spots`` (:func:`mpp_from_adata`).
    ``spots``: an AnnData whose ``obsm[spatial_key]`` holds spot centres in level-0
    pixels, attached with :func:`add_spots`.
    """
    import spatialdata as sd

    path = Path(source)
    if not path.exists():
        raise InputError(f"slide not found: {path}")
    spots_mpp = mpp_from_adata(spots) if spots is not None and hasattr(spots, "uns") else None
    if slide_mpp is not None and not (np.isfinite(slide_mpp) and slide_mpp > 0):
        raise InputError(f"slide_mpp must be a positive number of microns, got {slide_mpp!r}")
    suffix = path.suffix.lower()
    if path.is_dir():
        sdata = _read_spatialdata_store(path)
        # the default key means "the store's image"; another key must name one of its images
        key = _single_image_key(sdata, None if image_key == IMAGE_KEY else image_key)
        _set_slide_attrs(sdata, key, slide_mpp or _slide_attrs(sdata, key).get("mpp") or spots_mpp,
                         None)
    elif suffix in PIL_SUFFIXES:
        store = _converted_store(path, cache)
        sdata = sd.read_zarr(store)
        if image_key != IMAGE_KEY:
            sdata.images[image_key] = sdata.images.pop(IMAGE_KEY)
        _set_slide_attrs(sdata, image_key, slide_mpp or spots_mpp, file_fingerprint(path))
    elif suffix in TIFF_SUFFIXES:
        levels, file_mpp = _tiff_levels(path)
        sdata = sd.SpatialData(images={image_key: _multiscale(levels)})
        _set_slide_attrs(sdata, image_key, slide_mpp or file_mpp or spots_mpp,
                         file_fingerprint(path))
    else:
        raise InputError(f"unsupported slide format {path.suffix!r} ({path.name}); expected one of "
                         f"{TIFF_SUFFIXES + PIL_SUFFIXES} or a SpatialData .zarr store")
    if spots is not None:
        add_spots(sdata, spots, image_key=key if path.is_dir() else image_key,
                  spot_diameter_px=spot_diameter_px, spatial_key=spatial_key)
    return sdata



def _read_spatialdata_store(path: Path):
    import spatialdata as sd

    try:
        sdata = sd.read_zarr(path)
    except Exception as error:  # noqa: BLE001 - any failure means "not a SpatialData store"
        raise InputError(f"{path} is not a readable SpatialData zarr store ({error})") from error
    if not sdata.images:
        raise InputError(f"the SpatialData store {path} holds no image")
    return sdata


@contextlib.contextmanager
def _pillow_without_pixel_limit():
    """Whole-slide JPEGs exceed Pillow's decompression-bomb limit by design."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _converted_store(path: Path, cache) -> Path:
    """Zarr pyramid of a JPEG/PNG in the cache, written once (atomically) and reused."""
    import spatialdata as sd
    from PIL import Image, UnidentifiedImageError

    folder = cache_dir(cache) / "slides"
    store = folder / f"{path.stem}-{file_fingerprint(path)}.zarr"
    if store.exists():
        return store
    with _pillow_without_pixel_limit():
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise InputError(f"{path} is not a readable image ({error})") from error
    level0 = da.from_array(np.moveaxis(rgb, -1, 0), chunks=(3, CHUNK_PX, CHUNK_PX))
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder))
    try:
        partial = scratch / store.name
        with dask.config.set(scheduler="threads"):  # the pixels live here, not on a cluster
            sd.SpatialData(images={IMAGE_KEY: _multiscale(_pyramid(level0))}).write(partial)
        try:
            partial.rename(store)
        except OSError:
            if not store.exists():  # another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return store


def _multiscale(levels: list[da.Array]):
    """SpatialData multiscale image (DataTree) of ``(c, y, x)`` levels, level 0 first."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, Scale

    height, width = levels[0].shape[1:]
    scales = {}
    for i, level in enumerate(levels):
        sy, sx = height / level.shape[1], width / level.shape[2]
        transform = Identity() if i == 0 else Scale([sy, sx], axes=("y", "x"))
        element = Image2DModel.parse(xr.DataArray(level, dims=("c", "y", "x")),
                                     c_coords=["r", "g", "b"],
                                     transformations={"global": transform})
        scales[f"scale{i}"] = xr.Dataset({"image": element})
    return xr.DataTree.from_dict(scales)


class _TiffLevel:
    """Picklable lazy reader of one TIFF pyramid level (``__getitem__`` for dask).

    The file is opened on first use in each process, so dask graphs over it can be sent
    to workers (tifffile's zarr store itself holds an open file and cannot be pickled).
    """

    def __init__(self, path, level: int, shape, dtype, axes: str):
        self.path, self.level, self.axes = str(path), level, axes
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._array = None

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def __getitem__(self, key):
        if self._array is None:
            import tifffile
            import zarr

            store = tifffile.TiffFile(self.path).series[0].aszarr(level=self.level)
            self._array = zarr.open(store, mode="r")
        return self._array[key]


def _tiff_levels(path: Path) -> tuple[list[da.Array], float | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            shapes = [level.shape for level in series.levels]
            dtype = series.dtype
            mpp = _tiff_mpp(tif)
            tile = max(series.levels[0].keyframe.tilelength, series.levels[0].keyframe.tilewidth)
    except (tifffile.TiffFileError, OSError, IndexError, ValueError) as error:
        raise InputError(f"{path} is not a readable TIFF image ({error})") from error
    if dtype != np.uint8:
        raise InputError(f"{path.name}: 8-bit RGB H&E expected, got pixel type {dtype}")
    if axes not in ("YXS", "SYX", "CYX", "YXC"):
        raise InputError(f"{path.name}: an RGB image (axes YXS or CYX) expected, got axes {axes!r} "
                         f"with shape {shapes[0]}")
    # dask chunks of whole TIFF tiles, about TIFF_CHUNK_PX wide: a tile read touches few
    side = tile * max(1, round(TIFF_CHUNK_PX / tile)) if tile else CHUNK_PX
    levels = []
    for i, shape in enumerate(shapes):
        reader = _TiffLevel(path, i, shape, dtype, axes)
        chunks = (side, side, shape[2]) if axes[-1] in "SC" else (shape[0], side, side)
        array = da.from_array(reader, chunks=chunks, name=f"tiff-{file_fingerprint(path)}-{i}",
                              lock=False, meta=np.empty((0, 0, 0), np.uint8))
        array = da.moveaxis(array, -1, 0) if axes[-1] in "SC" else array
        levels.append(_rgb(array, path.name))
    return levels, mpp


def _tiff_mpp(tif) -> float | None:
    """Microns per pixel from OME, Aperio (SVS) or TIFF resolution tags, if recorded."""
    import re

    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if match and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            return float(match.group(1))
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    resolution = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if resolution is not None and unit is not None:
        numerator, denominator = resolution.value
        per_unit = numerator / denominator if denominator else 0.0
        microns = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if per_unit > 0 and microns:
            return microns / per_unit
    return None



__all__ = ["TileSpec", "SlideImage", "Spots", "open_slide", "add_spots", "spots_table",
           "mpp_from_adata", "image_transformations",
           "slide_image", "cache_dir", "file_fingerprint",
           "check_points_in_image", "IMAGE_KEY"]
