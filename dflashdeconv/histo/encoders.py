"""Patch encoders: a registry mapping a name to (model, transform, feature width).

- ``"morphology"`` (default): hand-made, deterministic CPU features that always work:
  colour statistics, H&E stain deconvolution, nuclei, gradient and texture statistics.
- ``"uni"``, ``"uni2-h"``, ``"conch"``, ``"virchow"``, ``"virchow2"``, ``"gigapath"``,
  ``"h-optimus-0"``: pathology foundation ViTs (:mod:`.vit`, plain PyTorch with timm's
  parameter names) from their released checkpoints (``.bin``/``.pt``/``.safetensors``),
  without timm or torchvision; ``"vit"`` reads any timm-named ViT's shape off its weights.
- ``"timm:<model name>"``: any timm architecture (needs timm and a torchvision that
  imports; on CPU-only torch from PyPI it often does not).

Torch encoders only ever read a local weights file given by the caller: nothing here
downloads weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from .slide import file_fingerprint


@dataclass(frozen=True)
class Encoder:
    """A frozen patch encoder: ``model(transform(tiles))`` is an (n, n_features) array.

    ``tiles`` are uint8 RGB arrays (n, h, w, 3). ``identity`` names the encoder and its
    weights for feature caches.
    """

    name: str
    model: Callable
    transform: Callable
    n_features: int
    identity: str

    @property
    def uses_torch(self) -> bool:
        import torch

        return isinstance(self.model, torch.nn.Module)

    def embed(self, tiles: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
        """Features of ``tiles`` as float32 (n, n_features), computed on ``device``."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise InputError(f"tiles must be uint8 RGB arrays of shape (n, h, w, 3), got "
                             f"{tiles.shape} {tiles.dtype}")
        out = np.empty((tiles.shape[0], self.n_features), np.float32)
        if not self.uses_torch:
            for start in range(0, tiles.shape[0], batch_size):
                out[start:start + batch_size] = self.model(self.transform(tiles[start:start + batch_size]))
            return out
        import torch

        model = self.model.to(device).eval()
        with torch.inference_mode():
            for start in range(0, tiles.shape[0], batch_size):
                batch = torch.from_numpy(tiles[start:start + batch_size]).to(device)
                out[start:start + batch_size] = model(self.transform(batch)).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------- morphology

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
    scales. Tiles are first brought to ``work_size`` pixels so every tile spec gives
    comparable statistics.
    """

    def __init__(self, work_size: int = 128):
        self.work_size = work_size
        self.feature_names = tuple(self._features(np.zeros((1, 8, 8, 3), np.float32)))

    def transform(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles resized to ``work_size`` (area averaging), as float32 in [0, 1]."""
        from PIL import Image

        size = self.work_size
        if tiles.shape[1:3] != (size, size):
            tiles = np.stack([np.asarray(Image.fromarray(t).resize((size, size), Image.Resampling.BOX))
                              for t in tiles])
        return tiles.astype(np.float32) / 255.0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(n, n_features) float32 features of the output of :meth:`transform`."""
        return np.column_stack(list(self._features(rgb).values())).astype(np.float32)

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


def _morphology_encoder(weights=None, work_size: int = 128) -> Encoder:
    if weights is not None:
        raise InputError("the morphology encoder has no weights; do not pass weights=")
    features = MorphologyFeatures(work_size)
    return Encoder("morphology", features, features.transform, len(features.feature_names),
                   encoder_identity("morphology", None, {"work_size": work_size}))


# ---------------------------------------------------------------------------- torch encoders

def _torch_transform(size: int, mean, std) -> Callable:
    """uint8 (n, h, w, 3) tensor -> normalised float (n, 3, size, size) on its device."""

    def transform(batch):
        import torch
        import torch.nn.functional as F

        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return (x - m) / s

    return transform


def vit_encoder(name: str = "vit", weights=None, *, preset: str | None = None,
                **options) -> Encoder:
    """A pathology ViT (:mod:`.vit`) from a local checkpoint: the architecture of ``preset``
    (checked against the weights) or read off the weights (``options``: ``n_heads``,
    ``pool``, ``mean``, ``std``)."""
    if weights is None:
        raise InputError(f"encoder {name!r} needs a local weights file: pass weights=PATH "
                         "(nothing is downloaded)")
    from .vit import load_vit

    model = load_vit(weights, preset, **options)
    config = model.config
    return Encoder(name, model, _torch_transform(config.img_size, config.mean, config.std),
                   model.n_features, encoder_identity(name, weights, {"preset": preset, **options}))


def _preset_factory(preset: str) -> Callable[..., Encoder]:
    def factory(weights=None, **options) -> Encoder:
        return vit_encoder(preset, weights, preset=preset, **options)

    factory.__doc__ = f"The {preset!r} ViT from a local checkpoint."
    return factory


def _timm_encoder(model_name: str, weights=None, **options) -> Encoder:
    if weights is None:
        raise InputError(f"encoder 'timm:{model_name}' needs a local weights file: pass "
                         "weights=PATH (nothing is downloaded)")
    try:
        import timm
    except Exception as error:  # noqa: BLE001 - timm fails in many ways without torchvision
        raise InputError(f"encoder 'timm:{model_name}' needs timm with a working torchvision "
                         f"({type(error).__name__}: {error})") from error
    from .vit import IMAGENET_MEAN, IMAGENET_STD, load_state

    model = timm.create_model(model_name, pretrained=False, num_classes=0, **options)
    load_state(model, weights)
    config = model.pretrained_cfg
    size = int(config.get("input_size", (3, 224, 224))[-1])
    transform = _torch_transform(size, tuple(config.get("mean", IMAGENET_MEAN)),
                                 tuple(config.get("std", IMAGENET_STD)))
    return Encoder(f"timm:{model_name}", model.eval(), transform, int(model.num_features),
                   encoder_identity(f"timm:{model_name}", weights, options))


# ---------------------------------------------------------------------------- registry

#: Bumped when an encoder's features change, so that stale cached features are not reused.
_REVISIONS = {"morphology": 2}

_REGISTRY: dict[str, Callable[..., Encoder]] = {
    "morphology": _morphology_encoder,
    "vit": lambda weights=None, **options: vit_encoder("vit", weights, **options),
    **{preset: _preset_factory(preset) for preset in ("uni", "uni2-h", "conch", "virchow",
                                                      "virchow2", "gigapath", "h-optimus-0")},
}


def register_encoder(name: str, factory: Callable[..., Encoder], *, overwrite: bool = False) -> None:
    """Make ``get_encoder(name, weights=..., **options)`` call ``factory(weights=..., **options)``.

    Registered in the calling process: Dask workers build encoders by calling the
    factory, so register at import time of a module the workers import too (or pass
    an :class:`Encoder` object, which is pickled to them).
    """
    if name in _REGISTRY and not overwrite:
        raise InputError(f"encoder {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = factory


def available_encoders() -> list[str]:
    """Registered names; ``"timm:<model name>"`` works on top of these when timm imports."""
    return sorted(_REGISTRY)


def get_encoder(name: str = "morphology", *, weights=None, **options) -> Encoder:
    """Build the encoder ``name`` (see :func:`available_encoders`) with local ``weights``."""
    if isinstance(name, Encoder):
        return name
    if not isinstance(name, str):
        raise InputError(f"encoder must be a name or an Encoder, got {type(name).__name__}")
    if name.startswith("timm:"):
        return _timm_encoder(name.split(":", 1)[1], weights=weights, **options)
    if name not in _REGISTRY:
        raise InputError(f"unknown encoder {name!r}; available: {available_encoders()} or "
                         "'timm:<model name>'")
    return _REGISTRY[name](weights=weights, **options)


def encoder_identity(name: str, weights, options: dict) -> str:
    """Cache identity of an encoder: name, revision of its code, options, weights file."""
    revision = _REVISIONS.get(name, 1)
    options_key = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    weights_key = "none" if weights is None else file_fingerprint(weights)
    return f"{name}|r{revision}|{options_key}|{weights_key}"


def features_key(identity: str, slide_fingerprint: str, spec_dict: dict, centres) -> str:
    """Cache key of the features of ``centres`` of one slide, tile spec and encoder."""
    import hashlib

    h = hashlib.sha256()
    h.update(f"{identity}|{slide_fingerprint}|{sorted(spec_dict.items())}".encode())
    h.update(np.ascontiguousarray(np.asarray(centres, np.float64)).tobytes())
    return h.hexdigest()[:32]


__all__ = ["Encoder", "MorphologyFeatures", "get_encoder", "register_encoder",
           "available_encoders", "vit_encoder", "features_key", "encoder_identity"]

