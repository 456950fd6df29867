"""Patch encoders: a registry mapping a name to (model, transform, feature width).

- ``"morphology"`` (default): hand-made, deterministic features that always work (no
  weights): colour statistics, H&E stain deconvolution, nuclei, gradient and texture
  statistics, of tiles stain-normalised per slide (:mod:`.stain`;
  ``stain_normalize=False`` reads them as scanned); torch on the task's device.
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
from .image import TileSpec, check_tiles, file_fingerprint
from .morphology import MorphologyFeatures


@dataclass(frozen=True)
class Encoder:
    """A frozen patch encoder: ``model(transform(prepare(tiles)))`` is an (n, n_features)
    array.

    ``tiles`` are uint8 RGB arrays (n, h, w, 3). ``prepare`` (optional) runs on the host,
    numpy to numpy (e.g. resampling with PIL); for a torch ``model`` its output is then
    moved to the task's device, where ``transform`` and the model run. ``identity`` names
    the encoder and its weights for feature caches. With ``stain_normalize`` the pipeline
    re-renders a slide's tiles with reference stains (:mod:`.stain`, one estimate per
    slide) before embedding.
    """

    name: str
    model: Callable
    transform: Callable
    n_features: int
    identity: str
    stain_normalize: bool = False
    prepare: Callable | None = None

    @property
    def uses_torch(self) -> bool:
        import torch

        return isinstance(self.model, torch.nn.Module)

    def embed(self, tiles: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
        """Features of ``tiles`` as float32 (n, n_features), computed on ``device``."""
        tiles = check_tiles(tiles)
        out = np.empty((tiles.shape[0], self.n_features), np.float32)

        def batches():
            for start in range(0, tiles.shape[0], batch_size):
                batch = tiles[start:start + batch_size]
                yield start, batch if self.prepare is None else self.prepare(batch)

        if not self.uses_torch:
            for start, batch in batches():
                out[start:start + len(batch)] = self.model(self.transform(batch))
            return out
        import torch

        model = self.model.to(device).eval()
        with torch.inference_mode():
            for start, batch in batches():
                batch = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
                out[start:start + len(batch)] = model(self.transform(batch)).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------- morphology

#: The morphology encoder's fields: the central half of a tile (112 um of the default
#: 224 um tile: the spot) and the whole tile (its surroundings); chosen by
#: leave-one-section-out on HER2ST C2-C4 (a third, 448 um field lifted the linear probe
#: more than STFlow).
MORPHOLOGY_FIELDS = (0.5, 1.0)


#: Whether the morphology encoder's tiles are stain-normalised unless told otherwise
#: (HER2ST C2-C4, leave-one-section-out, 3 seeds: STFlow 0.470 -> 0.480).
MORPHOLOGY_STAIN_NORMALIZE = True


def _morphology_encoder(weights=None, work_size: int = 128,
                        fields: tuple[float, ...] = MORPHOLOGY_FIELDS,
                        stain_normalize: bool = MORPHOLOGY_STAIN_NORMALIZE) -> Encoder:
    if weights is not None:
        raise InputError("the morphology encoder has no weights; do not pass weights=")
    features = MorphologyFeatures(work_size, tuple(fields))
    return Encoder("morphology", features, features.transform, len(features.feature_names),
                   encoder_identity("morphology", None,
                                    {"work_size": work_size, "fields": features.fields,
                                     "stain_normalize": bool(stain_normalize)}),
                   stain_normalize=bool(stain_normalize), prepare=features.prepare)


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

#: Bumped when an encoder's features change (for the morphology encoder: also a change to
#: :mod:`.stain`), so that stale cached features are not reused.
_REVISIONS = {"morphology": 6}

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


#: Tiles each encoder reads unless told otherwise: pathology ViTs were trained on 224 px
#: at about 0.5 um/px; the morphology encoder reads 448 px at 0.5 um/px (its central half
#: is the same 112 um field at full resolution, the whole is its 224 um surroundings).
_TILE_SPECS = {"morphology": TileSpec(448, 0.5)}


#: Encoders light enough that reading and stain-normalising their tiles (CPU work in any
#: worker) costs more than their arithmetic: their tiles go to every worker, each of which
#: embeds on its own device (a GPU worker on its GPU, the others on their CPU), rather
#: than queueing on the GPU workers alone.
_ANY_WORKER_ENCODERS = {"morphology"}


def wants_gpu(encoder) -> bool:
    """Whether ``encoder``'s tiles (a name or an :class:`Encoder`) go to the GPU workers
    when there are any: the ViTs' do; the morphology encoder's go to every worker, and an
    :class:`Encoder` whose model is not torch runs on any worker's CPU."""
    if isinstance(encoder, Encoder):
        return encoder.uses_torch and encoder.name not in _ANY_WORKER_ENCODERS
    return encoder not in _ANY_WORKER_ENCODERS


def stain_normalized(encoder, options: dict | None = None) -> bool:
    """Whether tiles are stain-normalised for ``encoder`` (a name with its ``options``, or
    an :class:`Encoder`): the morphology encoder's are unless ``stain_normalize=False``;
    the ViTs read tiles as their pretraining saw them."""
    if isinstance(encoder, Encoder):
        return encoder.stain_normalize
    return encoder == "morphology" and bool((options or {}).get("stain_normalize",
                                                                MORPHOLOGY_STAIN_NORMALIZE))


def default_tile_spec(encoder) -> TileSpec:
    """The tile spec ``encoder`` (a name or an :class:`Encoder`) reads by default."""
    name = encoder.name if isinstance(encoder, Encoder) else encoder
    return _TILE_SPECS.get(name, TileSpec())


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
           "default_tile_spec", "wants_gpu", "stain_normalized", "available_encoders",
           "vit_encoder", "features_key", "encoder_identity"]

