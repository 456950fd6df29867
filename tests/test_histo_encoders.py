"""Patch encoders: the morphology default, the registry, local weights, no downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dflashdeconv.errors import InputError
from dflashdeconv.histo import encoders
from dflashdeconv.histo.encoders import (
    Encoder,
    available_encoders,
    encoder_identity,
    features_key,
    get_encoder,
    register_encoder,
)
from dflashdeconv.histo.synthetic import GLASS, NUCLEUS, STROMA
from dflashdeconv.histo.vit import PRESETS, VisionTransformer, ViTConfig, infer_config

#: Tiny randomly initialised ViTs in the layouts of released pathology checkpoints.
TINY = {
    "uni-like": ViTConfig(32, 8, 32, 2, 2, 64, 1e-5),
    "uni2-like": ViTConfig(28, 7, 32, 2, 2, 48, 1e-5, reg_tokens=8, no_embed_class=True,
                           mlp="swiglu"),
    "virchow2-like": ViTConfig(28, 7, 32, 3, 2, 40, 1e-5, reg_tokens=4, mlp="swiglu_packed",
                               pool="cls+mean"),
    "conch-like": ViTConfig(48, 16, 32, 2, 2, 64, None),
}


def flat_tiles(*colours, size=64, seed=0):
    rng = np.random.default_rng(seed)
    tiles = np.stack([np.broadcast_to(np.array(c, np.float64), (size, size, 3)) for c in colours])
    return np.clip(tiles + rng.normal(0, 4, tiles.shape), 0, 255).astype(np.uint8)


def test_morphology_features_are_deterministic_and_read_the_stains():
    encoder = get_encoder()
    assert encoder.name == "morphology" and encoder.n_features == len(encoder.model.feature_names)
    assert encoder.n_features >= 80
    tiles = flat_tiles(NUCLEUS, STROMA, GLASS)
    features = encoder.embed(tiles)
    assert features.shape == (3, encoder.n_features) and np.isfinite(features).all()
    np.testing.assert_array_equal(features, encoder.embed(tiles.copy()))
    named = dict(zip(encoder.model.feature_names, features.T))
    assert named["field100_haematoxylin_mean"][0] > 2 * named["field100_haematoxylin_mean"][1]
    assert named["field100_eosin_fraction"][1] > named["field100_eosin_fraction"][2]
    assert named["field100_background_fraction"][2] > 0.9 > named["field100_background_fraction"][0]
    # the same content at another tile size gives nearly the same features
    np.testing.assert_allclose(encoder.embed(flat_tiles(NUCLEUS, size=96))[0, :6],
                               features[0, :6], atol=0.02)


def test_morphology_fields_read_the_spot_and_its_surroundings():
    """The default encoder describes the central half of a tile and the whole tile: a
    nucleus-dense spot on glass differs between the two, and each field is the
    single-field encoder of that crop."""
    tile = flat_tiles(GLASS, size=128)[0]
    tile[32:96, 32:96] = flat_tiles(NUCLEUS, size=64, seed=1)[0]
    features = get_encoder().embed(tile[None])
    named = dict(zip(get_encoder().model.feature_names, features[0]))
    assert named["field50_background_fraction"] < 0.05 and named["field100_background_fraction"] > 0.7
    assert named["field50_nuclear_fraction"] > 2 * named["field100_nuclear_fraction"]
    centre = get_encoder(fields=(1.0,)).embed(np.ascontiguousarray(tile[None, 32:96, 32:96]))
    np.testing.assert_allclose(features[:, :centre.shape[1]], centre, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="fields must be distinct fractions"):
        get_encoder(fields=(0.5, 1.5))
    with pytest.raises(InputError, match="work_size must be an even number"):
        get_encoder(work_size=63)


def test_tiles_must_be_uint8_rgb():
    with pytest.raises(InputError, match="uint8 RGB"):
        get_encoder().embed(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(InputError, match="uint8 RGB"):
        get_encoder().embed(np.zeros((2, 32, 32, 3), np.float32))


def test_registry_names_and_errors():
    assert {"morphology", "uni"} <= set(available_encoders())
    with pytest.raises(InputError, match="unknown encoder 'nope'"):
        get_encoder("nope")
    with pytest.raises(InputError, match="needs a local weights file"):
        get_encoder("uni")
    with pytest.raises(InputError, match="has no weights"):
        get_encoder("morphology", weights="x.pt")
    with pytest.raises(InputError, match="already registered"):
        register_encoder("morphology", lambda weights=None: None)


def test_a_registered_encoder_is_built_by_name():
    def factory(weights=None, scale=1.0):
        return Encoder("mean-colour", lambda x: x.mean((1, 2)) * scale, lambda t: t / 255.0, 3,
                       encoder_identity("mean-colour", weights, {"scale": scale}))

    register_encoder("mean-colour", factory, overwrite=True)
    try:
        features = get_encoder("mean-colour", scale=2.0).embed(flat_tiles(GLASS))
        np.testing.assert_allclose(features[0], np.array(GLASS) / 255 * 2, atol=0.02)
    finally:
        encoders._REGISTRY.pop("mean-colour")


def tiny_checkpoint(tmp_path, name: str, layout: str):
    """Write a random ViT of ``TINY[name]`` as a released model would ship it."""
    torch.manual_seed(0)
    model = VisionTransformer(TINY[name]).eval()
    for p in model.parameters():  # zero-initialised tokens would hide a misplaced position
        torch.nn.init.normal_(p, std=0.2)
    state = model.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "ddp":  # {"state_dict": {"module.…"}}, as DDP training scripts save
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "open_clip":  # CONCH: the image trunk inside a CLIP model, a text tower beside
        path = tmp_path / f"{name}.bin"
        torch.save({**{f"visual.trunk.{k}": v for k, v in state.items()},
                    "text.token_embedding.weight": torch.zeros(4, 8)}, path)
    else:  # timm's pytorch_model.bin, with a classifier head that encoders drop
        path = tmp_path / f"{name}.bin"
        torch.save({**state, "head.weight": torch.zeros(3, model.n_features)}, path)
    return model, path


@pytest.mark.parametrize("name,layout", [("uni-like", "timm"), ("uni2-like", "safetensors"),
                                         ("virchow2-like", "ddp"), ("conch-like", "open_clip")])
def test_vit_checkpoints_load_from_their_released_layouts(tmp_path, name, layout):
    model, path = tiny_checkpoint(tmp_path, name, layout)
    encoder = get_encoder("vit", weights=path, n_heads=2, pool=TINY[name].pool)
    config = encoder.model.config
    for field in ("img_size", "patch_size", "dim", "depth", "mlp_hidden", "reg_tokens",
                  "no_embed_class", "mlp", "class_token"):
        assert getattr(config, field) == getattr(TINY[name], field), field
    tiles = flat_tiles(NUCLEUS, STROMA, size=40)
    features = encoder.embed(tiles, batch_size=1)
    with torch.no_grad():
        expected = model(encoder.transform(torch.from_numpy(tiles))).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert features.shape == (2, TINY[name].n_features)
    assert np.abs(features[0] - features[1]).max() > 1e-2  # the two tiles differ
    assert encoder.identity != get_encoder("vit", weights=path, n_heads=1,
                                           pool=TINY[name].pool).identity


def test_presets_describe_the_released_architectures():
    assert {"uni", "uni2-h", "conch", "virchow", "virchow2", "gigapath", "h-optimus-0",
            "vit"} <= set(available_encoders())
    assert PRESETS["uni"].dim == 1024 and PRESETS["uni"].n_features == 1024
    assert PRESETS["virchow2"].n_features == 2560 and PRESETS["uni2-h"].n_features == 1536
    # a full-size UNI state dict (shapes only, on the meta device) is recognised as UNI
    with torch.device("meta"):
        state = VisionTransformer(PRESETS["uni"]).state_dict()
    inferred = infer_config(state, n_heads=16)
    assert inferred == PRESETS["uni"]


def test_weights_that_do_not_fit_are_named(tmp_path):
    _, path = tiny_checkpoint(tmp_path, "uni-like", "timm")
    with pytest.raises(InputError, match=r"does not fit 'uni': .*dim 32 in the checkpoint, "
                                         r"1024 expected"):
        get_encoder("uni", weights=path)
    with pytest.raises(InputError, match="not a multiple of n_heads=3"):
        get_encoder("vit", weights=path, n_heads=3)
    state = torch.load(path, weights_only=True)
    state.pop("blocks.1.attn.proj.weight")
    torch.save(state, tmp_path / "truncated.pt")
    with pytest.raises(InputError, match=r"missing \['blocks.1.attn.proj.weight'\]"):
        get_encoder("vit", weights=tmp_path / "truncated.pt")
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(InputError, match="not a timm-style ViT checkpoint"):
        get_encoder("vit", weights=tmp_path / "resnet.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable PyTorch weights file"):
        get_encoder("vit", weights=tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        get_encoder("vit", weights=tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="weights file not found"):
        get_encoder("uni", weights=tmp_path / "absent.pt")
    with pytest.raises(InputError, match="needs a local weights file"):
        get_encoder("virchow2")


def _timm():
    try:
        import timm
    except Exception as error:  # noqa: BLE001 - torchvision breaks timm's import on CPU torch
        pytest.skip(f"timm cannot be imported here ({type(error).__name__})")
    return timm


def test_plain_vit_matches_timm_parameter_names_and_outputs(tmp_path):
    timm = _timm()
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        init_values=1e-5, num_classes=0).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pt")
    encoder = get_encoder("vit", weights=tmp_path / "timm.pt", n_heads=2)
    tiles = flat_tiles(NUCLEUS, size=32)
    with torch.no_grad():
        expected = reference(encoder.transform(torch.from_numpy(tiles))).numpy()
    np.testing.assert_allclose(encoder.embed(tiles), expected, rtol=1e-4, atol=1e-5)


def test_timm_encoders_need_weights_and_a_working_timm(tmp_path):
    with pytest.raises(InputError, match="local weights file"):
        get_encoder("timm:resnet18")
    (tmp_path / "w.pt").write_bytes(b"")
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 - where timm cannot import, the error says so
        with pytest.raises(InputError, match="needs timm with a working torchvision"):
            get_encoder("timm:resnet18", weights=tmp_path / "w.pt")
    else:  # where it imports, an empty file is a bad checkpoint, named as such
        with pytest.raises(InputError, match="not a readable PyTorch weights file"):
            get_encoder("timm:resnet18", weights=tmp_path / "w.pt")


def test_feature_cache_keys_separate_slides_specs_encoders_and_tiles():
    centres = np.array([[1.0, 2.0]])
    identity = encoder_identity("morphology", None, {"work_size": 128})
    base = features_key(identity, "slide-a", {"size": 224, "mpp": 0.5}, centres)
    assert base == features_key(identity, "slide-a", {"mpp": 0.5, "size": 224}, centres.copy())
    assert len({base,
                features_key(identity, "slide-b", {"size": 224, "mpp": 0.5}, centres),
                features_key(identity, "slide-a", {"size": 224, "mpp": 1.0}, centres),
                features_key(encoder_identity("uni", None, {}), "slide-a",
                             {"size": 224, "mpp": 0.5}, centres),
                features_key(identity, "slide-a", {"size": 224, "mpp": 0.5}, centres + 1)}) == 5


def test_each_encoder_has_its_tile_spec_and_device():
    from dflashdeconv.histo.encoders import default_tile_spec, wants_gpu
    from dflashdeconv.histo.image import TileSpec

    assert default_tile_spec("morphology") == TileSpec(448, 0.5)  # 112 um centre at full resolution
    assert default_tile_spec(get_encoder()) == TileSpec(448, 0.5)
    assert default_tile_spec("uni") == TileSpec(224, 0.5)
    assert not wants_gpu("morphology") and not wants_gpu(get_encoder())
    from dflashdeconv.histo.encoders import stain_normalized

    assert stain_normalized("morphology") and stain_normalized(get_encoder())
    assert not stain_normalized("morphology", {"stain_normalize": False})
    assert not stain_normalized(get_encoder(stain_normalize=False))
    assert not stain_normalized("uni") and not stain_normalized("timm:resnet18")
    assert wants_gpu("uni") and wants_gpu("timm:resnet18")


def test_morphology_runs_in_torch_batch_by_batch():
    """The morphology encoder is a torch module (moved to the task's device with the
    fields its host step resized); a tile's features do not depend on the batch it came
    in, and the CPU's quantiles (numpy's partial sort) are the ones torch computes on a
    GPU."""
    import torch

    from dflashdeconv.histo.morphology import _quantiles

    encoder = get_encoder()
    assert encoder.uses_torch and isinstance(encoder.model, torch.nn.Module)
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    fields = encoder.prepare(tiles)
    assert fields.shape == (5, 2, 128, 128, 3) and fields.dtype == np.uint8
    large = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    np.testing.assert_array_equal(encoder.prepare(large)[:, 1], large)  # already work size
    together = encoder.embed(tiles, batch_size=5)
    apart = np.vstack([encoder.embed(tiles[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, apart, rtol=1e-5, atol=1e-6)
    values = torch.from_numpy(rng.random((4, 1001)).astype(np.float32))
    levels = (0.1, 0.5, 0.75, 0.99)
    np.testing.assert_allclose(_quantiles(values, levels).numpy(),
                               torch.quantile(values, torch.tensor(levels), dim=1).numpy(),
                               rtol=1e-6)
