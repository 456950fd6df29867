"""Vision transformers of pathology foundation models, in plain PyTorch with timm's names.

UNI, UNI2-h, CONCH's image trunk, Virchow, Virchow2, Prov-GigaPath and H-optimus are timm
``VisionTransformer`` variants; their released checkpoints (``pytorch_model.bin``,
``.safetensors``) load here without timm (or torchvision). The architecture is read off the
checkpoint itself (width, depth, patch size, image size, register tokens, layer scale, MLP
kind); only the number of attention heads cannot be, so it comes from a preset or the
``n_heads`` option. Nothing is downloaded: weights are always a local file.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

#: Mean and standard deviation of the tiles' RGB as most pathology models expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Key prefixes of wrapped checkpoints (DDP, open_clip's CONCH, DINO teachers).
PREFIXES = ("module.", "visual.trunk.", "trunk.", "backbone.", "encoder.")
MLPS = ("gelu", "swiglu_packed", "swiglu")
POOLS = ("cls", "cls+mean", "mean")


@dataclass(frozen=True)
class ViTConfig:
    """A ViT's shape. ``mlp``: "gelu" (fc1 -> GELU -> fc2), "swiglu_packed" (Virchow:
    one fc1 whose halves gate each other) or "swiglu" (UNI2: fc1_g, fc1_x). ``pool``: the
    feature of a tile, "cls" (class token), "cls+mean" (class token and mean of the patch
    tokens, Virchow) or "mean". ``no_embed_class``: positions cover the patch tokens only."""

    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    n_heads: int = 12
    mlp_hidden: int = 3072
    layer_scale: float | None = None
    reg_tokens: int = 0
    class_token: bool = True
    no_embed_class: bool = False
    qkv_bias: bool = True
    mlp: str = "gelu"
    pool: str = "cls"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def n_features(self) -> int:
        return 2 * self.dim if self.pool == "cls+mean" else self.dim


#: Released models, by the shape of their checkpoints and their published tile features.
PRESETS = {
    "uni": ViTConfig(224, 16, 1024, 24, 16, 4096, 1e-5),
    "uni2-h": ViTConfig(224, 14, 1536, 24, 24, 4096, 1e-5, reg_tokens=8, no_embed_class=True,
                        mlp="swiglu"),
    "conch": ViTConfig(448, 16, 768, 12, 12, 3072, None),
    "virchow": ViTConfig(224, 14, 1280, 32, 16, 3416, 1e-5, mlp="swiglu_packed",
                         pool="cls+mean"),
    "virchow2": ViTConfig(224, 14, 1280, 32, 16, 3416, 1e-5, reg_tokens=4, mlp="swiglu_packed",
                          pool="cls+mean"),
    "gigapath": ViTConfig(224, 16, 1536, 40, 24, 6144, 1e-5),
    "h-optimus-0": ViTConfig(224, 14, 1536, 40, 24, 6144, 1e-5, reg_tokens=4,
                             mean=(0.707223, 0.578729, 0.703617),
                             std=(0.211883, 0.230117, 0.177517)),
}


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.fc1_g = nn.Linear(dim, hidden)
            self.fc1_x = nn.Linear(dim, hidden)
        else:
            self.fc1 = nn.Linear(dim, 2 * hidden if kind == "swiglu_packed" else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.fc2(nn.functional.silu(self.fc1_g(x)) * self.fc1_x(x))
        if self.kind == "swiglu_packed":
            gate, value = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(nn.functional.silu(gate) * value)
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, config.n_heads, config.qkv_bias)
        self.ls1 = _LayerScale(dim, config.layer_scale) if config.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, config.mlp_hidden, config.mlp)
        self.ls2 = _LayerScale(dim, config.layer_scale) if config.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A timm-compatible ViT whose forward gives the tile features of ``config.pool``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.mlp not in MLPS or config.pool not in POOLS:
            raise InputError(f"mlp must be one of {MLPS} and pool one of {POOLS}")
        if config.dim % config.n_heads:
            raise InputError(f"width {config.dim} is not a multiple of n_heads={config.n_heads}")
        self.config = config
        self.n_features = config.n_features
        dim, grid = config.dim, config.img_size // config.patch_size
        self.n_prefix = int(config.class_token) + config.reg_tokens
        self.patch_embed = _PatchEmbed(config.patch_size, dim)
        if config.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, config.reg_tokens, dim))
        n_positions = grid * grid + (0 if config.no_embed_class else self.n_prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_positions, dim))
        self.blocks = nn.Sequential(*[_Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        prefix = []
        if self.config.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.config.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.config.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        patches = x[:, self.n_prefix:]
        if self.config.pool == "mean":
            return patches.mean(1)
        if self.config.pool == "cls+mean":
            return torch.cat([x[:, 0], patches.mean(1)], dim=-1)
        return x[:, 0]


# ---------------------------------------------------------------------------- checkpoints

def read_state_dict(weights) -> dict:
    """The state dict of a local checkpoint (``.safetensors``, ``.bin``/``.pt``/``.pth``),
    unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``{"teacher": ...}``) and with
    wrapper prefixes (``module.``, CONCH's ``visual.trunk.``, ...) removed."""
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"weights file not found: {path} (encoders never download weights; "
                         "pass the path of a local file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise InputError(f"{path.name} is not a readable safetensors file ({error})") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise InputError(f"{path.name} is not a readable PyTorch weights file ({error})") from error
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{path.name} does not hold a state dict of tensors")
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_state(model: nn.Module, weights) -> None:
    """Load a local checkpoint into ``model`` strictly; keys that do not fit are named."""
    state = read_state_dict(weights)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{Path(weights).name} does not fit the {type(model).__name__} "
                         f"architecture: missing {result.missing_keys[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")


def infer_config(state: dict, *, n_heads: int | None = None, pool: str = "cls", **overrides) -> ViTConfig:
    """The :class:`ViTConfig` a timm-named ViT state dict was saved from. ``n_heads``
    (not recorded in the weights) defaults to width / 64, as in most released models."""
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise InputError(f"not a timm-style ViT checkpoint: no {missing} (keys: "
                         f"{sorted(state)[:5]} ...)")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    n_positions = int(state["pos_embed"].shape[1])
    prefix = int(class_token) + reg_tokens
    grid = math.isqrt(n_positions)
    no_embed_class = grid * grid == n_positions and prefix > 0
    if not no_embed_class:
        grid = math.isqrt(n_positions - prefix)
        if grid * grid != n_positions - prefix:
            raise InputError(f"pos_embed has {n_positions} positions: neither a square grid "
                             f"nor a grid plus {prefix} prefix tokens")
    if "blocks.0.mlp.fc1_g.weight" in state:
        mlp, hidden = "swiglu", int(state["blocks.0.mlp.fc1_g.weight"].shape[0])
    else:
        fc1, fc2 = state["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc2.weight"]
        mlp = "swiglu_packed" if fc1.shape[0] == 2 * fc2.shape[1] else "gelu"
        hidden = int(fc2.shape[1])
    config = ViTConfig(img_size=grid * patch, patch_size=int(patch), dim=int(dim), depth=depth,
                       n_heads=n_heads or max(1, int(dim) // 64), mlp_hidden=hidden,
                       # the initial value is irrelevant: the checkpoint's gammas replace it
                       layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,
                       reg_tokens=reg_tokens, class_token=class_token,
                       no_embed_class=no_embed_class,
                       qkv_bias="blocks.0.attn.qkv.bias" in state, mlp=mlp, pool=pool)
    return ViTConfig(**{**asdict(config), **overrides})


def load_vit(weights, preset: str | None = None, **options) -> VisionTransformer:
    """A :class:`VisionTransformer` with the local ``weights``: the architecture of
    ``preset`` (checked against the checkpoint) or inferred from it (``options``:
    ``n_heads``, ``pool``, ``mean``, ``std``)."""
    state = read_state_dict(weights)
    inferred = infer_config(state, **options)
    if preset is not None:
        expected = PRESETS[preset]
        shape = ("img_size", "patch_size", "dim", "depth", "mlp_hidden", "reg_tokens", "mlp")
        differ = {k: (getattr(inferred, k), getattr(expected, k)) for k in shape
                  if getattr(inferred, k) != getattr(expected, k)}
        if differ:
            raise InputError(f"{Path(weights).name} does not fit {preset!r}: "
                             + ", ".join(f"{k} {got} in the checkpoint, {want} expected"
                                         for k, (got, want) in differ.items()))
        inferred = ViTConfig(**{**asdict(expected), **options})
    model = VisionTransformer(inferred)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{Path(weights).name} does not fit the ViT it describes: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


__all__ = ["ViTConfig", "VisionTransformer", "PRESETS", "read_state_dict", "infer_config",
           "load_vit", "load_state", "IMAGENET_MEAN", "IMAGENET_STD"]
