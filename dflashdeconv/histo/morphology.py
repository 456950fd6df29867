"""Hand-made H&E tile features: the default encoder, deterministic, no weights.

Colour statistics, Ruifrok & Johnston stain deconvolution into haematoxylin and eosin,
nuclei counts and sizes, gradient and texture statistics (see :class:`MorphologyFeatures`).
The arithmetic is torch, batched, on the task's device (a GPU worker's GPU, else the CPU);
resizing the tiles and labelling the connected components of the nuclei masks run on the
host (PIL, scipy).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

#: Ruifrok & Johnston optical densities of haematoxylin, eosin and DAB (rows, RGB).
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAINS = _STAINS / np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNMIX = np.linalg.inv(_STAINS).astype(np.float32)
#: Optical-density thresholds of nuclei (haematoxylin) and eosin-rich pixels.
_NUCLEUS_OD, _EOSIN_OD = 0.35, 0.25
#: Background (glass, bare array): bright and unsaturated pixels.
_BACKGROUND_VALUE, _BACKGROUND_SATURATION = 0.85, 0.15
#: Inner edges of the stain histograms' bins: [0, 0.05), [0.05, 0.1), ..., [0.8, inf).
_HISTOGRAM_EDGES = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)


def _quantiles(flat: torch.Tensor, quantiles) -> torch.Tensor:
    """(len(quantiles), n) quantiles of each row (linear interpolation). On the CPU numpy's
    partial sort does it (several times faster than torch's full sort there)."""
    if flat.device.type != "cpu":
        return torch.quantile(flat, torch.tensor(quantiles, dtype=flat.dtype,
                                                 device=flat.device), dim=1)
    return torch.from_numpy(np.quantile(flat.numpy(), quantiles, axis=1).astype(np.float32))


def _stats(values: torch.Tensor, prefix: str, quantiles=(0.1, 0.5, 0.9)) -> dict[str, torch.Tensor]:
    """Mean, standard deviation and quantiles over all dimensions but the first."""
    flat = values.reshape(values.shape[0], -1)
    std, mean = torch.std_mean(flat, dim=1, correction=0)
    out = {f"{prefix}_mean": mean, f"{prefix}_std": std}
    for q, value in zip(quantiles, _quantiles(flat, quantiles)):
        out[f"{prefix}_q{int(q * 100)}"] = value
    return out


def _gradient(channel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Central-difference gradients (gx, gy) and magnitude of (n, h, w) images."""
    gx = torch.zeros_like(channel)
    gy = torch.zeros_like(channel)
    gx[:, :, 1:-1] = (channel[:, :, 2:] - channel[:, :, :-2]) / 2
    gy[:, 1:-1, :] = (channel[:, 2:, :] - channel[:, :-2, :]) / 2
    return gx, gy, torch.hypot(gx, gy)


def _texture(channel: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Gradient strength, Laplacian energy and orientation coherence (fibres vs cells)."""
    gx, gy, magnitude = _gradient(channel)
    laplacian = (channel[:, 1:-1, 2:] + channel[:, 1:-1, :-2] + channel[:, 2:, 1:-1]
                 + channel[:, :-2, 1:-1] - 4 * channel[:, 1:-1, 1:-1])
    jxx, jyy, jxy = (gx * gx).mean((1, 2)), (gy * gy).mean((1, 2)), (gx * gy).mean((1, 2))
    spread = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)
    return {**_stats(magnitude, f"{prefix}_gradient", (0.5, 0.9)),
            f"{prefix}_laplacian_energy": torch.sqrt((laplacian ** 2).mean((1, 2))),
            f"{prefix}_coherence": spread / torch.clamp(jxx + jyy, min=1e-8)}


def _nuclei(haematoxylin: torch.Tensor) -> dict[str, torch.Tensor]:
    """Count and size of haematoxylin blobs (nuclei) per tile; the masks are labelled on
    the host (connected components do not batch), the rest stays on the device."""
    from scipy import ndimage

    masks = (haematoxylin > _NUCLEUS_OD).cpu().numpy()
    out = np.zeros((3, masks.shape[0]), np.float32)
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask)
        if count:
            areas = np.bincount(labels.ravel())[1:]
            areas = areas[areas >= 4]
            if areas.size:
                out[:, i] = areas.size, areas.mean(), np.mean(areas > 60)
    counts, mean_area, large = torch.from_numpy(out).to(haematoxylin.device)
    return {"nuclei_count": counts, "nuclei_mean_area": mean_area, "nuclei_large_fraction": large}


def _lbp_histogram(gray: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rotation-invariant uniform local binary pattern histogram (8 neighbours, radius 1)."""
    centre = gray[:, 1:-1, 1:-1]
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    h, w = gray.shape[1:]
    bits = [(gray[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] >= centre).to(torch.uint8)
            for dy, dx in offsets]
    ones = torch.zeros_like(bits[0])
    transitions = torch.zeros_like(bits[0])
    for k, bit in enumerate(bits):  # around the circle: bit k against bit k - 1
        ones += bit
        transitions += bit != bits[k - 1]
    code = torch.where(transitions <= 2, ones, torch.full_like(ones, 9)).long()
    histogram = _histogram(code, 10)
    return {f"lbp_{k}": histogram[:, k] for k in range(10)}


def _fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of true pixels of each of (n, ...) boolean masks."""
    flat = mask.reshape(mask.shape[0], -1)
    return flat.sum(1, dtype=torch.float32) / flat.shape[1]


def _histogram(codes: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(n, n_bins) fraction of the pixels of each of (n, ...) integer images in each bin."""
    flat = codes.reshape(codes.shape[0], -1)
    counts = torch.zeros(flat.shape[0], n_bins, dtype=torch.float32, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones(flat.shape, dtype=torch.float32, device=flat.device))
    return counts / flat.shape[1]


class MorphologyFeatures(torch.nn.Module):
    """Deterministic hand-made tile features, in torch on the tiles' device.

    Colour statistics (RGB, HSV), stain deconvolution into haematoxylin and eosin optical
    densities (statistics, histograms, area fractions), nuclei counts and sizes, and
    gradient / Laplacian / orientation-coherence / local-binary-pattern texture at two
    scales, computed for each of ``fields``: the central square of that fraction of the
    tile's side (1.0: the whole tile). Several fields describe a spot and its surroundings
    (the default encoder reads the central half and the whole of a 224 um tile). Each
    field is first brought to ``work_size`` pixels (box filter) so every tile spec gives
    comparable statistics. With several fields, feature names start with
    ``field<percent>_``. A module without parameters: ``encoder.embed`` resizes the fields
    on the host (:meth:`prepare`) and moves them, and the module, to the task's device.
    """

    def __init__(self, work_size: int = 128, fields: tuple[float, ...] = (1.0,)):
        super().__init__()
        fields = tuple(float(f) for f in fields)
        if not fields or any(not 0.0 < f <= 1.0 for f in fields) or len(set(fields)) < len(fields):
            raise InputError(f"fields must be distinct fractions of the tile side in (0, 1], "
                             f"got {fields}")
        if work_size < 8 or work_size % 2:
            raise InputError(f"work_size must be an even number of at least 8 pixels, got {work_size}")
        self.work_size, self.fields = work_size, fields
        self.register_buffer("unmix", torch.from_numpy(_UNMIX), persistent=False)
        names = tuple(self._features(torch.zeros((1, 3, 8, 8)), self.unmix))
        self.feature_names = names if len(fields) == 1 else tuple(
            f"field{round(100 * f)}_{name}" for f in fields for name in names)

    def prepare(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles (n, h, w, 3) -> each field's centre crop resized to ``work_size`` by
        PIL's box filter (on the host: several times faster there than any torch resize
        on a CPU), uint8 (n, n_fields, size, size, 3)."""
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
        return np.stack(fields, axis=1)

    @staticmethod
    def transform(fields: torch.Tensor) -> torch.Tensor:
        """The output of :meth:`prepare`, as a tensor on the task's device -> float32 in
        [0, 1], channels first: (n, n_fields, 3, size, size)."""
        return fields.permute(0, 1, 4, 2, 3).float().div_(255.0)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """(n, n_features) float32 features of the output of :meth:`transform`."""
        return torch.cat([torch.stack(list(self._features(rgb[:, i], self.unmix).values()), 1)
                          for i in range(rgb.shape[1])], 1).float()

    @staticmethod
    def _features(rgb: torch.Tensor, unmix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named features of float RGB tiles in [0, 1], channels first (n, 3, h, w)."""
        f: dict[str, torch.Tensor] = {}
        for c, name in enumerate("rgb"):
            f.update(_stats(rgb[:, c], f"{name}"))
        value, low = rgb.amax(1), rgb.amin(1)
        saturation = torch.where(value > 0, (value - low) / torch.clamp(value, min=1e-6),
                                 torch.zeros_like(value))
        f.update(_stats(saturation, "saturation"))
        f.update(_stats(value, "value", (0.5,)))
        od = -torch.log(torch.clamp(rgb, 1 / 255, 1.0))
        hed = torch.clamp(torch.einsum("nchw,cs->nshw", od, unmix), min=0.0)
        haematoxylin, eosin = hed[:, 0].contiguous(), hed[:, 1].contiguous()
        total = od.sum(1)
        f.update(_stats(haematoxylin, "haematoxylin", (0.5, 0.75, 0.9, 0.99)))
        f.update(_stats(eosin, "eosin", (0.5, 0.75, 0.9, 0.99)))
        f.update(_stats(total, "optical_density"))
        f["nuclear_fraction"] = _fraction(haematoxylin > _NUCLEUS_OD)
        f["eosin_fraction"] = _fraction(eosin > _EOSIN_OD)
        f["background_fraction"] = _fraction((value > _BACKGROUND_VALUE)
                                             & (saturation < _BACKGROUND_SATURATION))
        h_mean, e_mean = haematoxylin.mean((1, 2)), eosin.mean((1, 2))
        f["h_over_e"] = h_mean / (h_mean + e_mean + 1e-6)
        edges = torch.tensor(_HISTOGRAM_EDGES, dtype=rgb.dtype, device=rgb.device)
        for stain, values in (("haematoxylin", haematoxylin), ("eosin", eosin)):
            histogram = _histogram(torch.bucketize(values, edges, right=True), len(edges) + 1)
            f.update({f"{stain}_hist_{k}": histogram[:, k] for k in range(len(edges) + 1)})
        gray = rgb.mean(1)
        f.update(_texture(gray, "gray"))
        f.update(_texture(haematoxylin, "haematoxylin"))
        n, h, w = gray.shape
        coarse = gray.reshape(n, h // 2, 2, w // 2, 2).mean((2, 4))
        f.update(_texture(coarse, "gray_coarse"))
        f.update(_nuclei(haematoxylin))
        f.update(_lbp_histogram(gray))
        return f


__all__ = ["MorphologyFeatures"]
