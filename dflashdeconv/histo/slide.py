"""Whole-slide H&E images on SpatialData: open lazily, attach spots, find tissue, cut tiles.

Every slide is a multiscale, dask-backed SpatialData image whose level 0 is the full
resolution; its intrinsic coordinates are level-0 pixels (x = column, y = row) and spots and
tiles are always given in them. Pyramidal TIFF / OME-TIFF / SVS files are read in place
through tifffile's zarr interface. JPEG and PNG cannot be region-decoded, so they are
decoded once and written into a chunked, pyramidal SpatialData zarr store in the cache
(:func:`cache_dir`); later opens are lazy and instant. Tiles are read a batch at a time
from the coarsest pyramid level that still resolves the requested microns per pixel: the
full-resolution slide is never held in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from ..errors import InputError
from ..tables import annotated_centroids

#: Default key of the slide image in a SpatialData object.
IMAGE_KEY = "he"
#: Key of this package's metadata (microns per pixel, source) in ``SpatialData.attrs``.
ATTRS_KEY = "dflashdeconv"
#: Files read lazily with tifffile (pyramids in place).
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff")
#: Files decoded once with Pillow and converted to a zarr pyramid.
PIL_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Chunk side of converted images and of lazily coarsened levels.
CHUNK_PX = 1024
#: Approximate chunk side over tiled TIFFs (a whole number of TIFF tiles).
TIFF_CHUNK_PX = 512
#: Pyramids are extended by 2x mean-pooling until the longest side fits this.
SMALLEST_LEVEL_PX = 1024
#: Longest side of the level used for tissue detection (at least).
TISSUE_LEVEL_PX = 1024
#: ``uns`` key that marks a table of predictions (not measured counts) in a SpatialData.
PREDICTION_MARKER = "dflashdeconv_prediction"
#: Diameter of a Visium spot in microns.
VISIUM_SPOT_UM = 55.0
#: White, the padding of tiles that reach past the slide's edge.
BACKGROUND = 255


def cache_dir(path=None) -> Path:
    """Folder for converted slides and cached features: ``path``, else the environment
    variable ``DFLASHDECONV_CACHE``, else ``~/.cache/dflashdeconv``."""
    if path is None:
        path = os.environ.get("DFLASHDECONV_CACHE") or Path.home() / ".cache" / "dflashdeconv"
    return Path(path)


def file_fingerprint(path) -> str:
    """Identity of a file for caches: resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class TileSpec:
    """Square tiles of ``size`` pixels at ``mpp`` microns per pixel.

    Reference patches and query tiles must share one spec, so that the encoder sees the
    same field of view (``size * mpp`` microns) at the same resolution in both.
    """

    size: int = 224
    mpp: float = 0.5

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) \
                or self.size < 8:
            raise InputError(f"tile size must be an integer of at least 8 pixels, got {self.size!r}")
        if not (isinstance(self.mpp, (int, float, np.floating)) and math.isfinite(self.mpp)
                and self.mpp > 0):
            raise InputError(f"tile microns per pixel must be positive, got {self.mpp!r}")

    @property
    def field_um(self) -> float:
        """Side of a tile in microns."""
        return self.size * self.mpp

    def to_dict(self) -> dict:
        return {"size": int(self.size), "mpp": float(self.mpp)}


@dataclass(frozen=True)
class SlideImage:
    """A slide pyramid as lazy ``(c, y, x)`` uint8 dask arrays, level 0 first.

    Small and picklable (the arrays are dask graphs over files), so it travels to Dask
    workers, which read their tiles themselves.
    """

    levels: tuple
    downsamples: tuple
    mpp: float | None
    fingerprint: str

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return int(self.levels[0].shape[1]), int(self.levels[0].shape[2])

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise InputError("the slide's microns per pixel are unknown (not in the file): pass "
                             "slide_mpp=, e.g. 1 / adata.uns['px_per_um'] or 0.25 at 40x")
        return self.mpp

    def field_px(self, spec: TileSpec) -> float:
        """Side of a tile of ``spec`` in level-0 pixels."""
        return spec.field_um / self.require_mpp()

    def level_for(self, spec: TileSpec) -> int:
        """Coarsest level whose pixels are still at most ``spec.mpp`` microns (1 % slack)."""
        best = 0
        for level, ds in enumerate(self.downsamples):
            if ds * self.require_mpp() <= spec.mpp * 1.01:
                best = level
        return best

    def read_tiles(self, centres, spec: TileSpec) -> np.ndarray:
        """``(n, size, size, 3)`` uint8 tiles centred on ``centres`` (level-0 px, x, y).

        Windows are cut from the chosen level with a one-pixel margin and resampled to the
        exact (fractional) field of view; parts beyond the slide's edge are white.
        """
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        level = self.level_for(spec)
        ds = float(self.downsamples[level])
        array = self.levels[level]
        _, h, w = array.shape
        half = self.field_px(spec) / ds / 2
        boxes = []
        crops = []
        for cx, cy in centres / ds:
            x0, y0 = math.floor(cx - half) - 1, math.floor(cy - half) - 1
            x1, y1 = math.ceil(cx + half) + 1, math.ceil(cy + half) + 1
            boxes.append((x0, y0, x1, y1, cx, cy))
            crops.append(array[:, max(y0, 0):min(max(y1, 0), h), max(x0, 0):min(max(x1, 0), w)])
        with dask.config.set(scheduler="threads"):
            crops = dask.compute(*crops)
        return np.stack([_resample(crop, box, half, h, w, spec.size)
                         for crop, box in zip(crops, boxes)]) if boxes else \
            np.zeros((0, spec.size, spec.size, 3), np.uint8)

    def thumbnail(self, min_side: int = TISSUE_LEVEL_PX) -> tuple[np.ndarray, float]:
        """``(yxc uint8 array, downsample)`` of the coarsest level with a side >= ``min_side``."""
        level = 0
        for i, array in enumerate(self.levels):
            if max(array.shape[1:]) >= min_side:
                level = i
        pixels = self.levels[level].compute(scheduler="threads")
        return np.moveaxis(pixels, 0, -1), float(self.downsamples[level])


def _resample(crop, box, half, h, w, size) -> np.ndarray:
    from PIL import Image

    x0, y0, x1, y1, cx, cy = box
    window = np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)
    oy, ox = max(y0, 0) - y0, max(x0, 0) - x0
    window[oy:oy + crop.shape[1], ox:ox + crop.shape[2]] = np.moveaxis(crop, 0, -1)
    field = (cx - half - x0, cy - half - y0, cx + half - x0, cy + half - y0)
    resized = Image.fromarray(window).resize((size, size), Image.Resampling.BILINEAR, box=field)
    return np.asarray(resized)


# ---------------------------------------------------------------------------- opening

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


def _pyramid(level0: da.Array) -> list[da.Array]:
    """Level 0 plus 2x mean-pooled levels down to :data:`SMALLEST_LEVEL_PX`."""
    levels = [level0]
    while max(levels[-1].shape[1:]) > SMALLEST_LEVEL_PX and min(levels[-1].shape[1:]) >= 4:
        pooled = da.coarsen(np.mean, levels[-1].astype(np.float32), {1: 2, 2: 2}, trim_excess=True)
        levels.append(pooled.round().astype(np.uint8).rechunk((3, CHUNK_PX, CHUNK_PX)))
    return levels


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


def _rgb(array: da.Array, name: str) -> da.Array:
    channels = array.shape[0]
    if channels == 4:  # RGBA: the alpha channel carries no stain
        return array[:3]
    if channels != 3:
        raise InputError(f"{name}: an RGB image with 3 channels expected, got {channels}")
    return array


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


def _set_slide_attrs(sdata, image_key: str, mpp: float | None, fingerprint: str | None) -> None:
    images = sdata.attrs.setdefault(ATTRS_KEY, {}).setdefault("images", {})
    record = dict(images.get(image_key, {}))
    if mpp is not None:
        record["mpp"] = float(mpp)
    if fingerprint is not None:
        record["fingerprint"] = fingerprint
    images[image_key] = record


def _slide_attrs(sdata, image_key: str) -> dict:
    return dict(sdata.attrs.get(ATTRS_KEY, {}).get("images", {}).get(image_key, {}))


# ---------------------------------------------------------------------------- SpatialData access

def _check_spatialdata(sdata) -> None:
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise InputError(f"a SpatialData (or wsidata WSIData) object expected, got "
                         f"{type(sdata).__name__}; open an image with histo.open_slide(path)")


def _single_image_key(sdata, image_key: str | None) -> str:
    keys = list(sdata.images)
    if image_key is not None:
        if image_key not in sdata.images:
            raise InputError(f"image {image_key!r} not found in the SpatialData object "
                             f"(images: {keys})")
        return image_key
    if len(keys) == 1:
        return keys[0]
    if IMAGE_KEY in keys:
        return IMAGE_KEY
    raise InputError(f"the SpatialData object holds {len(keys)} images {keys}: pass image_key=")


def _wsi_reader(sdata):
    """The slide reader of a wsidata ``WSIData`` (a SpatialData subclass), else None."""
    reader = getattr(sdata, "reader", None)
    return reader if reader is not None and hasattr(reader, "get_region") else None


def _image_source(sdata, image_key: str | None):
    """``(reader, None)`` where the pixels come from a wsidata slide reader (no
    ``image_key`` naming one of the object's images), else ``(None, key)`` of the image."""
    reader = _wsi_reader(sdata)
    if reader is not None and (image_key is None or image_key not in sdata.images):
        return reader, None
    return None, _single_image_key(sdata, image_key)


def slide_image(sdata, image_key: str | None = None, slide_mpp: float | None = None) -> SlideImage:
    """The :class:`SlideImage` of an image of ``sdata`` (a wsidata ``WSIData`` reads
    through its slide reader). Microns per pixel: ``slide_mpp``, else what
    :func:`open_slide` recorded, else the WSIData's slide properties. Levels coarser than
    the source's own are added lazily, so tissue detection always reads a small one."""
    _check_spatialdata(sdata)
    reader, key = _image_source(sdata, image_key)
    if reader is not None:
        levels = _reader_levels(reader)
        mpp = slide_mpp or reader.properties.mpp
        fingerprint = f"wsi-{file_fingerprint(reader.file)}"
    else:
        levels = _element_levels(sdata.images[key], key)
        attrs = _slide_attrs(sdata, key)
        mpp = slide_mpp or attrs.get("mpp")
        fingerprint = attrs.get("fingerprint") or f"dask-{levels[0].name}"
    levels = levels + _pyramid(levels[-1])[1:]
    height, width = levels[0].shape[1:]
    downsamples = tuple(float(np.sqrt(height / lv.shape[1] * width / lv.shape[2])) for lv in levels)
    return SlideImage(tuple(levels), downsamples, None if mpp is None else float(mpp), fingerprint)


def _element_levels(element, key: str) -> list[da.Array]:
    """The ``(c, y, x)`` uint8 RGB dask arrays of a SpatialData image, level 0 first."""
    if hasattr(element, "children"):  # multiscale DataTree
        arrays = [element[name]["image"] for name in element.children]
    else:
        arrays = [element]
    if list(arrays[0].dims) != ["c", "y", "x"]:
        raise InputError(f"image {key!r} must have dims (c, y, x), got {arrays[0].dims}")
    levels = [_rgb(array.data, f"image {key!r}") for array in arrays]
    if levels[0].dtype != np.uint8:
        raise InputError(f"image {key!r}: 8-bit RGB H&E expected, got pixel type {levels[0].dtype}")
    return levels


def image_transformations(sdata, image_key: str | None = None) -> dict:
    """Transformations from the image's level-0 pixels to each coordinate system (a
    WSIData's slide reader is the identity to "global", wsidata's convention)."""
    from spatialdata.transformations import Identity, get_transformation

    reader, key = _image_source(sdata, image_key)
    if reader is not None:
        return {"global": Identity()}
    return get_transformation(sdata.images[key], get_all=True)


def _read_reader_block(reader, level, block_info=None):
    _, (y0, y1), (x0, x1) = block_info[None]["array-location"]
    ds = reader.properties.level_downsample[level]
    region = reader.get_region(int(math.ceil(x0 * ds)), int(math.ceil(y0 * ds)), x1 - x0,
                               y1 - y0, level=level)
    return np.moveaxis(np.asarray(region)[..., :3], -1, 0)


def _reader_levels(reader) -> list[da.Array]:
    levels = []
    for level, (height, width) in enumerate(reader.properties.level_shape):
        chunks = da.core.normalize_chunks((3, CHUNK_PX, CHUNK_PX), (3, height, width))
        levels.append(da.map_blocks(_read_reader_block, reader, level, chunks=chunks,
                                    dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8)))
    return levels


# ---------------------------------------------------------------------------- spots

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


__all__ = ["TileSpec", "SlideImage", "Spots", "open_slide", "add_spots", "spots_table",
           "mpp_from_adata", "image_transformations",
           "slide_image", "cache_dir", "file_fingerprint",
           "check_points_in_image", "IMAGE_KEY"]
