"""Stain normalisation: Macenko's estimate recovers the stains a slide was rendered with,
re-rendering gives the reference's, and features stop following a re-stained slide."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dflashdeconv.errors import InputError
from dflashdeconv.histo.encoders import get_encoder
from dflashdeconv.histo.image import TileSpec
from dflashdeconv.histo.slide import open_slide, slide_image
from dflashdeconv.histo.stain import (
    REFERENCE,
    StainEstimate,
    estimate_stains,
    normalize_stains,
    slide_stains,
)
from dflashdeconv.histo.synthetic import GLASS, synthetic_slide

#: Ruifrok & Johnston's haematoxylin and eosin: another rendering than the reference.
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
RUIFROK = RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True)


def rendered(vectors, n=200_000, seed=0):
    """uint8 pixels mixing two stains with random amounts, plus some glass."""
    rng = np.random.default_rng(seed)
    amounts = rng.gamma(2.0, 0.4, (n, 2)) * rng.integers(0, 2, (n, 2))
    density = amounts @ vectors
    pixels = np.clip(np.rint(255 * np.exp(-density)), 0, 255).astype(np.uint8)
    return pixels, amounts


def cosines(a, b):
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_estimate_recovers_the_stains_the_pixels_were_rendered_with():
    pixels, amounts = rendered(RUIFROK)
    estimate = estimate_stains(pixels)
    assert (cosines(estimate.vectors, RUIFROK) > 0.99).all()  # haematoxylin first
    mixed = amounts[(amounts > 0).all(1)]
    np.testing.assert_allclose(estimate.max_concentrations, np.percentile(mixed, 99, axis=0),
                               rtol=0.25)
    # the estimate does not depend on the order of the pixels
    shuffled = estimate_stains(pixels[np.random.default_rng(1).permutation(len(pixels))])
    np.testing.assert_allclose(shuffled.vectors, estimate.vectors, atol=0.01)


def test_normalised_tiles_show_the_reference_stains_and_the_input_is_kept():
    pixels, _ = rendered(RUIFROK)
    tiles = pixels.reshape(8, 125, 200, 3)
    tiles[0, :10] = GLASS
    before = tiles.copy()
    source = estimate_stains(tiles)
    out = normalize_stains(tiles, source)
    assert out.dtype == np.uint8 and out.shape == tiles.shape
    np.testing.assert_array_equal(tiles, before)
    again = estimate_stains(out)
    assert (cosines(again.vectors, REFERENCE.vectors) > 0.99).all()
    np.testing.assert_allclose(again.max_concentrations, REFERENCE.max_concentrations, rtol=0.1)
    assert (out[0, :10] >= np.array(GLASS) - 12).all()  # glass stays glass
    # normalising to the slide's own stains leaves its stain mixtures within rounding
    # (not the glass, whose colour is outside their span, nor pixels clipped at 0)
    same = np.abs(normalize_stains(tiles, source, source).astype(int) - tiles)
    assert np.mean(same[1:] <= 1) > 0.999 and same[0, :10].max() > 2


def test_unusable_pixels_are_named():
    with pytest.raises(InputError, match="stained pixels"):
        estimate_stains(np.full((64, 64, 3), 250, np.uint8))
    with pytest.raises(InputError, match="one stain colour"):
        estimate_stains(rendered(RUIFROK[:1].repeat(2, 0))[0])
    with pytest.raises(InputError, match="uint8 RGB"):
        estimate_stains(np.zeros((10, 3)))
    with pytest.raises(InputError, match="uint8 RGB"):
        normalize_stains(np.zeros((2, 8, 8)), REFERENCE)


def test_features_of_a_restained_slide_follow_the_stain_only_without_normalisation(tmp_path):
    """The same synthetic section rendered with other stain colours and amounts: the
    morphology features of its spots move with the stain unless tiles are normalised."""
    slide = synthetic_slide(800, spot_spacing=80, seed=4)
    own = estimate_stains(slide.image)
    other = StainEstimate(RUIFROK, own.max_concentrations * [0.7, 1.4])
    restained = normalize_stains(slide.image[None], own, other)[0]
    spec = TileSpec(64, 1.0)
    centres = np.asarray(slide.spots.obsm["spatial"], np.float64)
    encoder = get_encoder()
    features = {}
    for name, image in (("original", slide.image), ("restained", restained)):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        opened = slide_image(open_slide(tmp_path / f"{name}.png", slide_mpp=1.0, cache=tmp_path))
        tiles = opened.read_tiles(centres, spec)
        stains = slide_stains(opened, spec)
        features[name] = (encoder.embed(tiles), encoder.embed(normalize_stains(tiles, stains)))
    spread = features["original"][0].std(0)
    varies = spread > 1e-3 * np.abs(features["original"][0]).mean(0)

    def shift(i):  # median absolute change of a feature, in its spread over the spots
        change = np.abs(features["original"][i] - features["restained"][i]).mean(0)
        return np.median(change[varies] / spread[varies])

    assert shift(0) > 0.8 and shift(1) < 0.25 * shift(0)  # measured: 1.13 and 0.20
