"""A slide image on SpatialData: tile geometry, and tiles read from the right pyramid level.

Every slide is a multiscale, dask-backed SpatialData image whose level 0 is the full
resolution; its intrinsic coordinates are level-0 pixels (x = column, y = row) and spots and
tiles are always given in them. Tiles are read a batch at a time from the coarsest pyramid
level that still resolves the requested microns per pixel: the full-resolution slide is
never held in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from ..errors import InputError

#: Default key of the slide image in a SpatialData object.
IMAGE_KEY = "he"
#: Key of this package's metadata (microns per pixel, source) in ``SpatialData.attrs``.
ATTRS_KEY = "dflashdeconv"
#: Chunk side of converted images and of lazily coarsened levels.
CHUNK_PX = 1024
#: Pyramids are extended by 2x mean-pooling until the longest side fits this.
SMALLEST_LEVEL_PX = 1024
#: Longest side of the level used for tissue detection (at least).
TISSUE_LEVEL_PX = 1024
#: White, the padding of tiles that reach past the slide's edge.
BACKGROUND = 255


def cache_dir(path=None) -> Path:
    """Folder for converted slides and cached features: ``path``, else the environment
    variable ``DFLASHDECONV_CACHE``, else ``~/.cache/dflashdeconv``."""
    if path is None:
        path = os.environ.get("DFLASHDECONV_CACHE") or Path.home() / ".cache" / "dflashdeconv"
    return Path(path)


def check_tiles(tiles) -> np.ndarray:
    """``tiles`` as an array, checked to be uint8 RGB tiles of shape (n, h, w, 3)."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise InputError(f"tiles must be uint8 RGB arrays of shape (n, h, w, 3), got "
                         f"{tiles.shape} {tiles.dtype}")
    return tiles


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


def _pyramid(level0: da.Array) -> list[da.Array]:
    """Level 0 plus 2x mean-pooled levels down to :data:`SMALLEST_LEVEL_PX`."""
    levels = [level0]
    while max(levels[-1].shape[1:]) > SMALLEST_LEVEL_PX and min(levels[-1].shape[1:]) >= 4:
        pooled = da.coarsen(np.mean, levels[-1].astype(np.float32), {1: 2, 2: 2}, trim_excess=True)
        levels.append(pooled.round().astype(np.uint8).rechunk((3, CHUNK_PX, CHUNK_PX)))
    return levels


def _rgb(array: da.Array, name: str) -> da.Array:
    channels = array.shape[0]
    if channels == 4:  # RGBA: the alpha channel carries no stain
        return array[:3]
    if channels != 3:
        raise InputError(f"{name}: an RGB image with 3 channels expected, got {channels}")
    return array
