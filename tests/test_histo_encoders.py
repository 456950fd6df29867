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
    vision_transformer,
    vit_encoder,
)
from dflashdeconv.histo.synthetic import GLASS, NUCLEUS, STROMA

TINY_VIT = {"img_size": 32, "patch_size": 8, "dim": 32, "depth": 2, "n_heads": 2,
            "mlp_ratio": 2.0, "layer_scale": 1e-5}


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
    assert named["haematoxylin_mean"][0] > 2 * named["haematoxylin_mean"][1]
    assert named["eosin_fraction"][1] > named["eosin_fraction"][2]
    assert named["background_fraction"][2] > 0.9 > named["background_fraction"][0]
    # the same content at another tile size gives nearly the same features
    np.testing.assert_allclose(encoder.embed(flat_tiles(NUCLEUS, size=96))[0, :6],
                               features[0, :6], atol=0.02)


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


def test_vit_loads_local_weights_and_reproduces_the_model(tmp_path):
    torch.manual_seed(0)
    model = vision_transformer(**TINY_VIT).eval()
    path = tmp_path / "vit.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    encoder = vit_encoder("tiny-vit", TINY_VIT, path)
    tiles = flat_tiles(NUCLEUS, STROMA, size=48)
    features = encoder.embed(tiles)
    with torch.no_grad():
        expected = model(encoder.transform(torch.from_numpy(tiles))).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    assert features.shape == (2, 32) and np.abs(features[0] - features[1]).max() > 1e-3


def test_weights_that_do_not_fit_are_named(tmp_path):
    other = vision_transformer(**{**TINY_VIT, "depth": 3})
    torch.save(other.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(InputError, match=r"does not fit .*unexpected \['blocks.2"):
        vit_encoder("tiny-vit", TINY_VIT, tmp_path / "deeper.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match="not a readable PyTorch weights file"):
        vit_encoder("tiny-vit", TINY_VIT, tmp_path / "junk.pt")
    with pytest.raises(InputError, match="weights file not found"):
        vit_encoder("tiny-vit", TINY_VIT, tmp_path / "absent.pt")


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
    encoder = vit_encoder("tiny-vit", TINY_VIT, tmp_path / "timm.pt")
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
    except Exception:  # noqa: BLE001
        with pytest.raises(InputError, match="needs timm"):
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
