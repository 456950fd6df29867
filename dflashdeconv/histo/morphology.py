"""Hand-made H&E tile features: the default encoder, deterministic, CPU, no weights.

Colour statistics, Ruifrok & Johnston stain deconvolution into haematoxylin and eosin,
nuclei counts and sizes, gradient and texture statistics (see :class:`MorphologyFeatures`).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

#: Ruifrok & Johnston optical densities of haematoxylin, eosin and DAB (rows, RGB).
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(_STAINS).astype(np.float32)
#: Optical-density thresholds of nuclei (haematoxylin) and eosin-rich pixels.
_NUCLEUS_OD, _EOSIN_OD = 0.35, 0.25
#: Background (glass, bare array): bright and unsaturated pixels.
_BACKGROUND_VALUE, _BACKGROUND_SATURATION = 0.85, 0.15
_HISTOGRAM_EDGES = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, np.inf], np.float32)


def _stats(values: np.ndarray, prefix: str, quantiles=(0.1, 0.5, 0.9)) -> dict[str, np.ndarray]:
    """Mean, standard deviation and quantiles over all axes but the first."""
    flat = values.reshape(values.shape[0], -1)
    out = {f"{prefix}_mean": flat.mean(1), f"{prefix}_std": flat.std(1)}
    for q, value in zip(quantiles, np.quantile(flat, quantiles, axis=1)):
        out[f"{prefix}_q{int(q * 100)}"] = value
    return out


def _gradient(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central-difference gradients (gx, gy) and magnitude of (n, h, w) images."""
    gx = np.zeros_like(channel)
    gy = np.zeros_like(channel)
    gx[:, :, 1:-1] = (channel[:, :, 2:] - channel[:, :, :-2]) / 2
    gy[:, 1:-1, :] = (channel[:, 2:, :] - channel[:, :-2, :]) / 2
    return gx, gy, np.hypot(gx, gy)


def _texture(channel: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """Gradient strength, Laplacian energy and orientation coherence (fibres vs cells)."""
    gx, gy, magnitude = _gradient(channel)
    laplacian = (channel[:, 1:-1, 2:] + channel[:, 1:-1, :-2] + channel[:, 2:, 1:-1]
                 + channel[:, :-2, 1:-1] - 4 * channel[:, 1:-1, 1:-1])
    jxx, jyy, jxy = (gx * gx).mean((1, 2)), (gy * gy).mean((1, 2)), (gx * gy).mean((1, 2))
    spread = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)
    return {**_stats(magnitude, f"{prefix}_gradient", (0.5, 0.9)),
            f"{prefix}_laplacian_energy": np.sqrt((laplacian ** 2).mean((1, 2))),
            f"{prefix}_coherence": spread / np.maximum(jxx + jyy, 1e-8)}


def _nuclei(haematoxylin: np.ndarray) -> dict[str, np.ndarray]:
    """Count and size of haematoxylin blobs (nuclei) per tile."""
    from scipy import ndimage

    n = haematoxylin.shape[0]
    counts, mean_area, large = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        labels, count = ndimage.label(haematoxylin[i] > _NUCLEUS_OD)
        if count:
            areas = np.bincount(labels.ravel())[1:]
            areas = areas[areas >= 4]
            counts[i] = areas.size
            mean_area[i] = areas.mean() if areas.size else 0.0
            large[i] = np.mean(areas > 60) if areas.size else 0.0
    return {"nuclei_count": counts, "nuclei_mean_area": mean_area,
            "nuclei_large_fraction": large}


def _lbp_histogram(gray: np.ndarray) -> dict[str, np.ndarray]:
    """Rotation-invariant uniform local binary pattern histogram (8 neighbours, radius 1)."""
    centre = gray[:, 1:-1, 1:-1]
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    h, w = gray.shape[1:]
    bits = np.stack([gray[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] >= centre for dy, dx in offsets])
    ones = bits.sum(0)
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(0)
    code = np.where(transitions <= 2, ones, 9)
    histogram = np.stack([(code == k).mean((1, 2)) for k in range(10)], axis=1)
    return {f"lbp_{k}": histogram[:, k] for k in range(10)}


class MorphologyFeatures:
    """Deterministic hand-made tile features (numpy/scipy, CPU).

    Colour statistics (RGB, HSV), stain deconvolution into haematoxylin and eosin optical
    densities (statistics, histograms, area fractions), nuclei counts and sizes, and
    gradient / Laplacian / orientation-coherence / local-binary-pattern texture at two
    scales, computed for each of ``fields``: the central square of that fraction of the
    tile's side (1.0: the whole tile). Several fields describe a spot and its surroundings
    (the default encoder reads the central half and the whole of a 224 um tile). Each
    field is first brought to ``work_size`` pixels so every tile spec gives comparable
    statistics. With several fields, feature names start with ``field<percent>_``.
    """

    def __init__(self, work_size: int = 128, fields: tuple[float, ...] = (1.0,)):
        fields = tuple(float(f) for f in fields)
        if not fields or any(not 0.0 < f <= 1.0 for f in fields) or len(set(fields)) < len(fields):
            raise InputError(f"fields must be distinct fractions of the tile side in (0, 1], "
                             f"got {fields}")
        if work_size < 8 or work_size % 2:
            raise InputError(f"work_size must be an even number of at least 8 pixels, got {work_size}")
        self.work_size, self.fields = work_size, fields
        names = tuple(self._features(np.zeros((1, 8, 8, 3), np.float32)))
        self.feature_names = names if len(fields) == 1 else tuple(
            f"field{round(100 * f)}_{name}" for f in fields for name in names)

    def transform(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles (n, h, w, 3) -> each field's centre crop resized to ``work_size``
        (area averaging), float32 in [0, 1], (n, n_fields, work_size, work_size, 3)."""
        from PIL import Image

        size = self.work_size
        h, w = tiles.shape[1:3]
        fields = []
        for fraction in self.fields:
            ch, cw = max(1, round(fraction * h)), max(1, round(fraction * w))
            top, left = (h - ch) // 2, (w - cw) // 2
            crop = tiles[:, top:top + ch, left:left + cw]
            if crop.shape[1:3] != (size, size):
                crop = np.stack([np.asarray(Image.fromarray(t).resize((size, size), Image.Resampling.BOX))
                                 for t in crop])
            fields.append(crop)
        return np.stack(fields, axis=1).astype(np.float32) / 255.0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(n, n_features) float32 features of the output of :meth:`transform`."""
        return np.column_stack([np.column_stack(list(self._features(rgb[:, i]).values()))
                                for i in range(rgb.shape[1])]).astype(np.float32)

    @staticmethod
    def _features(rgb: np.ndarray) -> dict[str, np.ndarray]:
        """Named features of float RGB tiles in [0, 1], (n, h, w, 3)."""
        f: dict[str, np.ndarray] = {}
        for c, name in enumerate("rgb"):
            f.update(_stats(rgb[..., c], f"{name}"))
        value, low = rgb.max(-1), rgb.min(-1)
        saturation = np.where(value > 0, (value - low) / np.maximum(value, 1e-6), 0.0)
        f.update(_stats(saturation, "saturation"))
        f.update(_stats(value, "value", (0.5,)))
        od = -np.log(np.clip(rgb, 1 / 255, 1.0))
        hed = np.maximum(od @ _UNMIX, 0.0)
        haematoxylin, eosin = hed[..., 0], hed[..., 1]
        total = od.sum(-1)
        f.update(_stats(haematoxylin, "haematoxylin", (0.5, 0.75, 0.9, 0.99)))
        f.update(_stats(eosin, "eosin", (0.5, 0.75, 0.9, 0.99)))
        f.update(_stats(total, "optical_density"))
        f["nuclear_fraction"] = (haematoxylin > _NUCLEUS_OD).mean((1, 2))
        f["eosin_fraction"] = (eosin > _EOSIN_OD).mean((1, 2))
        f["background_fraction"] = ((value > _BACKGROUND_VALUE)
                                    & (saturation < _BACKGROUND_SATURATION)).mean((1, 2))
        f["h_over_e"] = haematoxylin.mean((1, 2)) / (haematoxylin.mean((1, 2)) + eosin.mean((1, 2)) + 1e-6)
        for stain, values in (("haematoxylin", haematoxylin), ("eosin", eosin)):
            flat = values.reshape(values.shape[0], -1)
            histogram = np.stack([((flat >= lo) & (flat < hi)).mean(1) for lo, hi in
                                  zip(_HISTOGRAM_EDGES[:-1], _HISTOGRAM_EDGES[1:])], axis=1)
            f.update({f"{stain}_hist_{k}": histogram[:, k] for k in range(histogram.shape[1])})
        gray = rgb.mean(-1)
        f.update(_texture(gray, "gray"))
        f.update(_texture(haematoxylin, "haematoxylin"))
        coarse = gray.reshape(gray.shape[0], gray.shape[1] // 2, 2, gray.shape[2] // 2, 2).mean((2, 4))
        f.update(_texture(coarse, "gray_coarse"))
        f.update(_nuclei(haematoxylin))
        f.update(_lbp_histogram(gray))
        return f


__all__ = ["MorphologyFeatures"]
