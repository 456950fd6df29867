"""Where the tissue is and where tiles go: a tissue mask from a low-resolution level and a
grid of tile centres over it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .image import TISSUE_LEVEL_PX, SlideImage, TileSpec


@dataclass(frozen=True)
class TissueMask:
    """Tissue pixels of a low-resolution level; ``downsample`` level-0 pixels per pixel."""

    mask: np.ndarray
    downsample: float

    def fraction(self, centres: np.ndarray, side_px: float) -> np.ndarray:
        """Fraction of tissue in the square of ``side_px`` level-0 pixels around each centre."""
        integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = self.mask.shape
        half = side_px / self.downsample / 2
        c = np.asarray(centres, dtype=np.float64) / self.downsample
        x0 = np.clip(np.round(c[:, 0] - half), 0, w).astype(np.int64)
        x1 = np.clip(np.round(c[:, 0] + half), 0, w).astype(np.int64)
        y0 = np.clip(np.round(c[:, 1] - half), 0, h).astype(np.int64)
        y1 = np.clip(np.round(c[:, 1] + half), 0, h).astype(np.int64)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = max(1.0, (2 * half) ** 2)
        return np.clip(inside / area, 0.0, 1.0)


#: Masks of the last few slides, by (fingerprint, min_side): tiling a query and estimating
#: its stains both ask for the same mask.
_MASKS: dict[tuple[str, int], TissueMask] = {}
_MASKS_KEPT = 8


def detect_tissue(slide: SlideImage, *, min_side: int = TISSUE_LEVEL_PX) -> TissueMask:
    """Tissue on a low-resolution level: Otsu threshold of the HSV saturation (stained
    tissue is saturated, glass and the ST array background are not), closed, holes
    filled and specks removed. Computed once per slide (its fingerprint) and read-only."""
    key = (slide.fingerprint, int(min_side))
    if key not in _MASKS:
        while len(_MASKS) >= _MASKS_KEPT:
            _MASKS.pop(next(iter(_MASKS)))
        tissue = _detect_tissue(slide, min_side)
        tissue.mask.flags.writeable = False
        _MASKS[key] = tissue
    return _MASKS[key]


def _detect_tissue(slide: SlideImage, min_side: int) -> TissueMask:
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    pixels, downsample = slide.thumbnail(min_side)
    saturation = rgb2hsv(pixels)[..., 1]
    if np.ptp(saturation) < 0.05:  # a uniform image: blank glass or a solid block
        mask = np.full(saturation.shape, np.median(saturation) > 0.15)
        return TissueMask(mask, downsample)
    mask = saturation > threshold_otsu(saturation)
    yy, xx = np.mgrid[-2:3, -2:3]
    mask = ndimage.binary_closing(mask, structure=xx**2 + yy**2 <= 4, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    labels, n_objects = ndimage.label(mask)
    if n_objects:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(16, int(mask.size * 1e-4))
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask.astype(bool), downsample)


def tile_grid(slide: SlideImage, spec: TileSpec, *, stride_um: float | None = None,
              tissue: TissueMask | bool = True, min_tissue: float = 0.5) -> np.ndarray:
    """Centres (n, 2; level-0 px, x, y) of a square grid of tiles of ``spec``.

    ``stride_um`` defaults to the tile's field of view (adjacent tiles). With ``tissue``
    (True: :func:`detect_tissue`; or a given mask) only tiles with at least
    ``min_tissue`` of their area on tissue are kept.
    """
    side = slide.field_px(spec)
    stride = side if stride_um is None else stride_um / slide.require_mpp()
    if not stride > 0:
        raise InputError(f"stride_um must be positive, got {stride_um!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise InputError(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    height, width = slide.shape
    xs = np.arange(side / 2, width - side / 2 + 1e-9, stride)
    ys = np.arange(side / 2, height - side / 2 + 1e-9, stride)
    if xs.size == 0 or ys.size == 0:
        raise InputError(f"tiles of {spec.field_um:g} um ({side:.0f} px) do not fit the "
                         f"{width} x {height} px slide")
    gx, gy = np.meshgrid(xs, ys)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    if tissue is True:
        tissue = detect_tissue(slide)
    if isinstance(tissue, TissueMask):
        centres = centres[tissue.fraction(centres, side) >= min_tissue]
        if centres.shape[0] == 0:
            raise InputError("no tile is on tissue: the tissue mask is empty at min_tissue="
                             f"{min_tissue}; pass tissue=False to tile the whole slide")
    return centres


__all__ = ["TissueMask", "detect_tissue", "tile_grid"]
