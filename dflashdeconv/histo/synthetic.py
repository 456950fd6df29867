"""A seeded synthetic H&E slide whose spot expression follows its morphology.

For demos and tests without real slides: a pale background, a tissue region whose
cellularity varies smoothly in space (dense haematoxylin nuclei where it is high,
eosin-pink stroma where it is low), and spots on a jittered lattice whose Poisson counts
depend on the cellularity under them, so that image features carry expression signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: RGB of glass, nuclei (haematoxylin) and stroma (eosin).
GLASS, NUCLEUS, STROMA = (244, 236, 242), (78, 58, 140), (228, 150, 190)
#: Seed of the genes' baseline and cellularity response, shared by all slides.
GENE_PROGRAMME_SEED = 20250101


@dataclass(frozen=True)
class SyntheticSlide:
    """``image`` (h, w, 3) uint8; ``spots`` AnnData (raw counts, ``obsm['spatial']`` in
    pixels, ``obs['cellularity']``); ``mpp`` microns per pixel."""

    image: np.ndarray
    spots: object
    mpp: float


def _smooth_field(rng, size: int, scale: float) -> np.ndarray:
    """A smooth random field in [0, 1] with features about ``scale`` pixels wide, made
    on a coarse grid and interpolated up (a wide Gaussian filter at full size is slow)."""
    from scipy import ndimage

    step = max(1, int(scale // 8))
    coarse = ndimage.gaussian_filter(rng.normal(size=(-(-size // step),) * 2), scale / step,
                                     mode="reflect")
    field = ndimage.zoom(coarse, step, order=1)[:size, :size]
    field -= field.min()
    return field / max(field.max(), 1e-12)


def synthetic_slide(size: int = 1600, *, spot_spacing: int = 100, n_genes: int = 60,
                    mpp: float = 1.0, seed: int = 0) -> SyntheticSlide:
    """A ``size`` x ``size`` px slide with spots every ``spot_spacing`` px on its tissue."""
    import anndata as ad
    import pandas as pd
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tissue = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.36) ** 2 < 1.0
    cellularity = _smooth_field(rng, size, size / 8)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
    texture = (texture - texture.mean()) / texture.std()
    nuclei = tissue & (texture > 1.6 - 2.2 * cellularity)
    image = np.empty((size, size, 3), np.float32)
    image[:] = GLASS
    image[tissue] = STROMA
    image[nuclei] = NUCLEUS
    image += rng.normal(0, 6, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    lattice = np.arange(spot_spacing, size - spot_spacing / 2, spot_spacing, dtype=np.float64)
    gx, gy = np.meshgrid(lattice, lattice)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    centres += rng.uniform(-0.15, 0.15, centres.shape) * spot_spacing
    rows = np.clip(centres[:, 1].astype(int), 0, size - 1)
    cols = np.clip(centres[:, 0].astype(int), 0, size - 1)
    centres = centres[tissue[rows, cols]]
    local = np.array([cellularity[int(y), int(x)] for x, y in centres])
    genome = np.random.default_rng(GENE_PROGRAMME_SEED)  # the same biology on every slide
    base = genome.normal(1.5, 0.7, n_genes)
    effect = genome.normal(0.0, 1.2, n_genes)
    rate = np.exp(base[None, :] + effect[None, :] * (local[:, None] - 0.5))
    counts = rng.poisson(rate).astype(np.int32)
    spots = ad.AnnData(X=counts, obs=pd.DataFrame({"cellularity": local},
                                                  index=[f"spot_{i}" for i in range(len(local))]),
                       var=pd.DataFrame(index=[f"GENE{g}" for g in range(n_genes)]))
    spots.obsm["spatial"] = centres
    spots.uns["mpp"] = mpp
    spots.uns["spot_diameter_px"] = spot_spacing / 2
    return SyntheticSlide(image, spots, mpp)


__all__ = ["SyntheticSlide", "synthetic_slide"]
