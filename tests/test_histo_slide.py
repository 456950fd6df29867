"""Slides on SpatialData: formats, lazy tiles, spots, coordinate systems, tissue, grids."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import spatialdata as sd
import tifffile
from conftest import digest, shared_file
from PIL import Image
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale

from dflashdeconv.errors import InputError
from dflashdeconv.histo import slide as slides
from dflashdeconv.histo.slide import (
    TileSpec,
    open_slide,
    slide_image,
    spots_table,
)
from dflashdeconv.histo.synthetic import synthetic_slide
from dflashdeconv.histo.tissue import detect_tissue, tile_grid

SIZE = 2200


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_slide(SIZE, spot_spacing=200, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, synthetic):
    """The synthetic slide as JPEG, PNG, a pyramidal OME-TIFF (0.5 um/px) and a flat TIFF."""
    folder = tmp_path_factory.mktemp("slides")
    image = synthetic.image
    Image.fromarray(image).save(folder / "slide.jpg", quality=92)
    Image.fromarray(image).save(folder / "slide.png")
    with tifffile.TiffWriter(folder / "slide.ome.tif", bigtiff=True) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                                              "PhysicalSizeY": 0.5}, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    tifffile.imwrite(folder / "flat.tif", image, photometric="rgb")
    (folder / "broken.jpg").write_text("this is not an image")
    (folder / "broken.tif").write_text("this is not a TIFF")
    return folder


def levels_of(sdata, key="he"):
    tree = sdata.images[key]
    return [tree[name]["image"] for name in tree.children]


def test_jpeg_is_converted_once_into_a_lazy_cached_pyramid(files, synthetic, tmp_path):
    sdata = open_slide(files / "slide.jpg", slide_mpp=1.0, cache=tmp_path)
    levels = levels_of(sdata)
    assert [lv.shape[1:] for lv in levels] == [(SIZE, SIZE), (SIZE // 2,) * 2, (SIZE // 4,) * 2]
    assert all(isinstance(lv.data, da.Array) for lv in levels)
    with Image.open(files / "slide.jpg") as decoded:
        expected = np.asarray(decoded.convert("RGB"))[100:300, 500:700]
    np.testing.assert_array_equal(np.moveaxis(levels[0].data[:, 100:300, 500:700].compute(), 0, -1),
                                  expected)
    store = next((tmp_path / "slides").glob("slide-*.zarr"))
    stamp = store.stat().st_mtime_ns
    again = open_slide(files / "slide.jpg", slide_mpp=1.0, cache=tmp_path)
    assert store.stat().st_mtime_ns == stamp and len(list((tmp_path / "slides").iterdir())) == 1
    assert slide_image(again).mpp == 1.0


def test_png_tiles_are_exact_crops_at_the_native_resolution(files, synthetic, tmp_path):
    slide = slide_image(open_slide(files / "slide.png", slide_mpp=0.5, cache=tmp_path))
    spec = TileSpec(size=64, mpp=0.5)
    tiles = slide.read_tiles([[400.0, 600.0], [10.0, 10.0]], spec)
    np.testing.assert_array_equal(tiles[0], synthetic.image[568:632, 368:432])
    # beyond the slide's edge tiles are padded with white
    assert (tiles[1][:22, :] == 255).all() and (tiles[1][:, :22] == 255).all()
    np.testing.assert_array_equal(tiles[1][22:, 22:], synthetic.image[:42, :42])


def test_pyramidal_tiff_is_read_lazily_from_the_right_level(files, synthetic, monkeypatch):
    sdata = open_slide(files / "slide.ome.tif")
    slide = slide_image(sdata)
    assert slide.mpp == 0.5
    assert slide.downsamples[:3] == (1.0, 2.0, 4.0)
    spec = TileSpec(size=32, mpp=2.0)
    assert slide.level_for(spec) == 2
    pixels_read = []
    original = slides._TiffLevel.__getitem__

    def spy(self, key):
        block = original(self, key)
        pixels_read.append(block.shape[0] * block.shape[1])
        return block

    monkeypatch.setattr(slides._TiffLevel, "__getitem__", spy)
    tiles = slide.read_tiles([[1100.0, 1100.0]], spec)
    assert tiles.shape == (1, 32, 32, 3)
    level2 = synthetic.image[::4, ::4]
    np.testing.assert_array_equal(tiles[0], level2[275 - 16:275 + 16, 275 - 16:275 + 16])
    pixels_read.clear()
    native = slide.read_tiles([[800.0, 800.0]], TileSpec(size=64, mpp=0.5))
    np.testing.assert_array_equal(native[0], synthetic.image[768:832, 768:832])
    assert 0 < sum(pixels_read) <= 512 * 512  # one chunk of TIFF tiles, not the whole level


def test_flat_tiff_without_resolution_needs_slide_mpp(files):
    slide = slide_image(open_slide(files / "flat.tif"))
    assert slide.mpp is None
    with pytest.raises(InputError, match="microns per pixel"):
        tile_grid(slide, TileSpec())
    slide = slide_image(open_slide(files / "flat.tif", slide_mpp=1.0))
    assert len(slide.levels) >= 2 and slide.levels[1].shape[1:] == (SIZE // 2, SIZE // 2)


def test_coarse_levels_are_added_to_a_multiscale_image_that_stops_early(synthetic):
    image = Image2DModel.parse(np.moveaxis(synthetic.image, -1, 0), dims=("c", "y", "x"),
                               scale_factors=[2], chunks=(3, 512, 512))
    slide = slide_image(sd.SpatialData(images={"he": image}), slide_mpp=0.5)
    assert [lv.shape[1:] for lv in slide.levels] == [(SIZE, SIZE), (SIZE // 2,) * 2,
                                                     (SIZE // 4,) * 2]
    assert slide.downsamples == (1.0, 2.0, 4.0)
    level1 = slide.levels[1].compute().astype(np.float32)
    pooled = level1.reshape(3, SIZE // 4, 2, SIZE // 4, 2).mean(axis=(2, 4)).round()
    np.testing.assert_array_equal(slide.levels[2].compute(), pooled.astype(np.uint8))


def test_spatialdata_store_round_trip(files, tmp_path):
    sdata = open_slide(files / "slide.png", slide_mpp=0.8, cache=tmp_path)
    sdata.write(tmp_path / "copy.zarr")
    reopened = open_slide(tmp_path / "copy.zarr")
    assert slide_image(reopened).mpp == 0.8


@pytest.mark.parametrize("name, message", [("broken.jpg", "not a readable image"),
                                           ("broken.tif", "not a readable TIFF"),
                                           ("missing.png", "not found")])
def test_files_that_are_not_images_are_rejected(files, tmp_path, name, message):
    with pytest.raises(InputError, match=message):
        open_slide(files / name, cache=tmp_path)


def test_unsupported_format_is_rejected(tmp_path):
    (tmp_path / "slide.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported slide format"):
        open_slide(tmp_path / "slide.txt")


def test_spots_are_attached_as_circles_with_a_linked_table(files, synthetic, tmp_path):
    before = digest(synthetic.spots.X, synthetic.spots.obsm["spatial"])
    sdata = open_slide(files / "slide.png", cache=tmp_path, spots=synthetic.spots)
    assert slide_image(sdata).mpp == synthetic.mpp  # from spots.uns['mpp']
    spots = spots_table(sdata)
    np.testing.assert_allclose(spots.centres, synthetic.spots.obsm["spatial"])
    assert spots.shapes_key == "spots" and spots.table.n_obs == synthetic.spots.n_obs
    assert (sdata.shapes["spots"]["radius"] == 50).all()
    assert digest(synthetic.spots.X, synthetic.spots.obsm["spatial"]) == before


def test_spots_outside_the_image_are_rejected(files, synthetic, tmp_path):
    sdata = open_slide(files / "slide.png", slide_mpp=1.0, cache=tmp_path)
    moved = synthetic.spots.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] * 4  # e.g. low-resolution coordinates
    with pytest.raises(InputError, match="outside the 2200 x 2200 px image"):
        slides.add_spots(sdata, moved)


def _image_sdata(synthetic, transform):
    image = Image2DModel.parse(np.moveaxis(synthetic.image, -1, 0), dims=("c", "y", "x"),
                               c_coords=["r", "g", "b"], transformations=transform)
    return sd.SpatialData(images={"he": image})


def _attach(sdata, coords, transform):
    sdata.shapes["spots"] = ShapesModel.parse(coords, geometry=0, radius=np.ones(len(coords)),
                                              transformations=transform)
    import anndata as ad
    import pandas as pd

    table = ad.AnnData(np.ones((len(coords), 2)),
                       obs=pd.DataFrame({"region": pd.Categorical(["spots"] * len(coords)),
                                         "spot": np.arange(len(coords))}))
    sdata.tables["table"] = TableModel.parse(table, region="spots", region_key="region",
                                             instance_key="spot")


def test_spots_reach_the_image_through_shared_coordinate_systems(synthetic):
    # a half-resolution image placed in "global" by a scale, spots in full-resolution "global"
    half = synthetic_slide(SIZE // 2, spot_spacing=100, seed=3)
    sdata = _image_sdata(half, {"global": Scale([2.0, 2.0], axes=("y", "x"))})
    coords = np.array([[400.0, 800.0], [1000.0, 200.0]])
    _attach(sdata, coords, {"global": Identity()})
    np.testing.assert_allclose(spots_table(sdata).centres, coords / 2)


def test_mismatched_coordinate_systems_are_rejected(synthetic):
    sdata = _image_sdata(synthetic, {"global": Identity()})
    _attach(sdata, np.array([[100.0, 100.0]]), {"aligned": Identity()})
    with pytest.raises(InputError, match="mismatched coordinate systems"):
        spots_table(sdata)


def test_tissue_detection_and_grid_follow_the_tissue(files, synthetic, tmp_path):
    slide = slide_image(open_slide(files / "slide.png", slide_mpp=1.0, cache=tmp_path))
    mask = detect_tissue(slide)
    assert mask.downsample == 2.0
    yy, xx = np.mgrid[0:mask.mask.shape[0], 0:mask.mask.shape[1]] / mask.mask.shape[0]
    ellipse = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.36) ** 2 < 1.0
    assert mask.mask[ellipse].mean() > 0.95 and mask.mask[~ellipse].mean() < 0.02
    spec = TileSpec(size=50, mpp=2.0)  # 100 um = 100 px tiles
    every = tile_grid(slide, spec, tissue=False)
    assert every.shape == (22 * 22, 2) and every.min() == 50.0
    on_tissue = tile_grid(slide, spec, min_tissue=0.9)
    inside = ((on_tissue[:, 0] / SIZE - 0.5) / 0.42) ** 2 + ((on_tissue[:, 1] / SIZE - 0.5) / 0.36) ** 2
    assert 150 < len(on_tissue) < 0.5 * len(every) and (inside < 1.05).all()
    dense = tile_grid(slide, spec, stride_um=50, min_tissue=0.9)
    assert 3.5 * len(on_tissue) < len(dense) < 4.5 * len(on_tissue)


def test_tissue_mask_is_computed_once_per_slide(files, tmp_path, monkeypatch):
    """Tiling a query and estimating its stains share one mask (the thumbnail is read once)."""
    from dflashdeconv.histo.image import SlideImage
    from dflashdeconv.histo.stain import slide_stains

    slide = slide_image(open_slide(files / "slide.png", slide_mpp=1.0, cache=tmp_path))
    mask = detect_tissue(slide)
    assert detect_tissue(slide) is mask and not mask.mask.flags.writeable

    def read_again(*args, **kwargs):
        raise AssertionError("the slide's thumbnail was read a second time")

    monkeypatch.setattr(SlideImage, "thumbnail", read_again)
    spec = TileSpec(size=50, mpp=2.0)
    assert len(tile_grid(slide, spec, min_tissue=0.9)) > 150
    assert slide_stains(slide, spec) is not None


def test_tile_spec_is_validated():
    with pytest.raises(InputError, match="tile size"):
        TileSpec(size=2)
    with pytest.raises(InputError, match="microns per pixel"):
        TileSpec(mpp=0)
    assert TileSpec(224, 0.5).field_um == 112.0


def test_her2st_section_opens_with_its_spots(tmp_path):
    import anndata as ad

    spots = ad.read_h5ad(shared_file("her2st", "C5.h5ad"))
    sdata = open_slide(shared_file("her2st", "C5_HE.jpg"), spots=spots, cache=tmp_path)
    slide = slide_image(sdata)
    assert slide.shape == (9901, 9272)
    assert slide.mpp == pytest.approx(1 / spots.uns["px_per_um"])
    spec = TileSpec()
    on_spots = detect_tissue(slide).fraction(spots_table(sdata).centres, slide.field_px(spec))
    assert on_spots.mean() > 0.85
    assert 400 < len(tile_grid(slide, spec)) < 800


def test_wsidata_slides_are_read_through_their_reader(tmp_path, synthetic):
    wsidata = pytest.importorskip("wsidata")
    with tifffile.TiffWriter(tmp_path / "wsi.tif", bigtiff=True) as tif:
        tif.write(synthetic.image, tile=(256, 256), photometric="rgb", compression="zlib",
                  resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    wsi = wsidata.open_wsi(tmp_path / "wsi.tif")
    slide = slide_image(wsi)
    assert slide.mpp == 0.5 and slide.shape == (SIZE, SIZE) and len(slide.levels) > 1
    tiles = slide.read_tiles([[400.0, 600.0]], TileSpec(64, 0.5))
    np.testing.assert_array_equal(tiles[0], synthetic.image[568:632, 368:432])
    slides.add_spots(wsi, synthetic.spots)
    np.testing.assert_allclose(spots_table(wsi).centres, synthetic.spots.obsm["spatial"])
