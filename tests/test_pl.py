"""Plots: spots drawn at their size (circles off a grid, squares on one, an image beyond
max_spots), every plot writes a PNG, axes in micrometres where known, and missing inputs are
named."""

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from dflashdeconv import pl, tl  # noqa: E402
from dflashdeconv.datasets import starmap_cortex  # noqa: E402
from dflashdeconv.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def deconvolved():
    spots, reference = starmap_cortex()
    tl.deconvolve(spots, reference, cell_type_key="cell_type", uncertainty=True)
    return spots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def images_only(fig) -> int:
    """Number of images drawn; fails if any axes holds scatter/marker collections."""
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            assert not ax.collections, "spots drawn as markers, not rasterised"
    return sum(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_images())


def test_raster_places_and_averages_values():
    coords = np.array([[0, 0], [10, 0], [20, 0], [0, 10], [20, 10], [20.4, 10.2]])
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 7.0])
    image, extent = pl.raster(coords, values, pixel_size=10)
    assert image.shape == (2, 3)
    np.testing.assert_array_equal(image[0], [1, 2, 3])
    assert image[1, 0] == 4 and np.isnan(image[1, 1]) and image[1, 2] == 6  # (5 + 7) / 2
    np.testing.assert_allclose(extent, (-5, 25, -5, 15))
    channels, _ = pl.raster(coords, np.column_stack([values, -values]), pixel_size=10)
    np.testing.assert_array_equal(channels[..., 1], -image)


def test_raster_default_pixel_is_the_spot_spacing_and_bounded():
    y, x = np.mgrid[0:30, 0:40] * 2.5
    coords = np.column_stack([x.ravel(), y.ravel()])
    image, _ = pl.raster(coords, np.arange(coords.shape[0], dtype=float))
    assert image.shape == (30, 40) and not np.isnan(image).any()
    rng = np.random.default_rng(0)
    many = rng.uniform(0, 50_000, size=(1_000_000, 2))
    values = rng.uniform(size=1_000_000)
    image, _ = pl.raster(many, values, max_side=500)
    assert max(image.shape) <= 501
    assert np.nanmin(image) >= 0 and np.nanmax(image) <= 1
    assert abs(np.nanmean(image) - values.mean()) < 0.01


def test_raster_rejects_mismatched_lengths():
    with pytest.raises(InputError, match="3 coordinates for 2 values"):
        pl.raster(np.zeros((3, 2)), np.zeros(2))


def test_proportion_dominant_and_uncertainty_maps_write_pngs(deconvolved, tmp_path):
    types = list(deconvolved.obsm["flashdeconv"].columns)
    figures = {
        "proportions": pl.proportions(deconvolved, save=tmp_path / "p.png"),
        "dominant": pl.dominant(deconvolved, save=tmp_path / "d.png"),
        "ci": pl.uncertainty(deconvolved, save=tmp_path / "u.png"),
        "detected": pl.uncertainty(deconvolved, what="detected", cell_types=types[:3],
                                   save=tmp_path / "det.png"),
    }
    assert images_only(figures["proportions"]) == len(types)
    assert images_only(figures["dominant"]) == 1
    assert images_only(figures["ci"]) == len(types)
    assert images_only(figures["detected"]) == 3
    for name in ("p", "d", "u", "det"):
        png = mpimg.imread(tmp_path / f"{name}.png")
        assert png.shape[0] > 200 and png.shape[1] > 200 and png[..., :3].std() > 0.05


def test_dominant_map_shows_each_spots_dominant_type(deconvolved):
    fig = pl.dominant(deconvolved)
    label = fig.axes[0].get_images()[0].get_array()
    coords = np.asarray(deconvolved.obsm["spatial"]) * deconvolved.uns["um_per_pixel"]
    proportions = deconvolved.obsm["flashdeconv"].to_numpy()
    image, _ = pl.raster(coords, proportions, pl.spacing(coords))  # the plot's grid
    shown = ~np.isnan(image[..., 0])
    assert np.ma.getdata(label)[shown].tolist() == np.argmax(image[shown], axis=1).tolist()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    names = list(deconvolved.obsm["flashdeconv"].columns)
    assert legend == [names[k] for k in np.unique(np.argmax(proportions, axis=1))]
    assert fig.axes[0].get_title() == "flashdeconv: dominant cell type"
    assert fig.axes[0].get_xlabel() == "x (µm)"  # uns['um_per_pixel'] is recorded


def test_spots_off_a_grid_are_circles_of_their_size_and_many_are_an_image(tmp_path):
    from matplotlib.collections import EllipseCollection

    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1000, (300, 2))
    table = pd.DataFrame(rng.dirichlet(np.ones(3), 300), columns=["A", "B", "C"],
                         index=[str(i) for i in range(300)])
    adata = ad.AnnData(np.zeros((300, 1)), obs=pd.DataFrame(index=table.index),
                       obsm={"spatial": coords, "flashdeconv": table})
    adata.uns["spot_diameter_px"] = 12.0
    fig = pl.proportions(adata, scale="per_type", save=tmp_path / "c.png")
    circles = [c for ax in fig.axes for c in ax.collections if isinstance(c, EllipseCollection)]
    assert len(circles) == 3 and all(np.allclose(c._widths * 2, 12.0) for c in circles)
    assert [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"] == [
        "flashdeconv: A", "flashdeconv: B", "flashdeconv: C"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3  # one scale per type
    dominant = pl.dominant(adata)
    assert isinstance(dominant.axes[0].collections[0], EllipseCollection)
    assert images_only(pl.proportions(adata, max_spots=100)) == 3  # rasterised beyond max_spots


def test_every_plot_draws_into_given_axes(deconvolved):
    fig, axes = plt.subplots(1, 3)
    assert pl.dominant(deconvolved, ax=axes[0]) is fig
    assert pl.convergence(deconvolved, ax=axes[1]) is fig
    assert pl.proportions(deconvolved, cell_types=["Astro"], ax=axes[2]) is fig
    assert all(ax.get_images() or ax.get_lines() for ax in axes)
    with pytest.raises(InputError, match="2 panels to draw but 1 axes given"):
        pl.proportions(deconvolved, cell_types=["Astro", "Endo"], ax=axes[0])


def test_convergence_plot_follows_the_record(deconvolved):
    params = deconvolved.uns["flashdeconv_params"]
    fig = pl.convergence(deconvolved)
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_ydata(), params["changes"])
    assert fig.axes[0].get_title() == f"solver: converged after {len(params['changes'])} iterations"


def test_plots_name_what_is_missing(deconvolved):
    bare = ad.AnnData(np.zeros((3, 2)), obsm={"spatial": np.zeros((3, 2))})
    with pytest.raises(InputError, match=r"obsm\['flashdeconv'\]"):
        pl.proportions(bare)
    with pytest.raises(InputError, match="uncertainty=True"):
        pl.uncertainty(ad.AnnData(np.zeros((3, 2)), obsm={"flashdeconv": pd.DataFrame(
            np.zeros((3, 2)), columns=["a", "b"], index=[str(i) for i in range(3)])}))
    with pytest.raises(InputError, match="what must be"):
        pl.uncertainty(deconvolved, what="width")
    with pytest.raises(InputError, match="not in obsm"):
        pl.proportions(deconvolved, cell_types=["no such type"])
    with pytest.raises(InputError, match=r"cell types \['no such type'\] not in obsm\['flashdeconv_detected'\]"):
        pl.uncertainty(deconvolved, what="detected", cell_types=["no such type"])
    with pytest.raises(InputError, match=r"no coordinates under obsm\['xy'\]"):
        pl.uncertainty(deconvolved, spatial_key="xy")
    with pytest.raises(InputError, match="convergence record"):
        pl.convergence(bare)


def test_expression_maps_share_a_scale_per_gene_and_keep_the_slide_upright(tmp_path):
    y, x = np.mgrid[0:20, 0:30] * 100.0
    coords = np.column_stack([x.ravel(), y.ravel()])
    top_bright = np.column_stack([(coords[:, 1] < 500) * 5.0, coords[:, 0] / 1000])
    predicted = ad.AnnData(top_bright.astype(np.float32), var=pd.DataFrame(index=["A", "B"]),
                           obsm={"spatial": coords})
    measured = predicted.copy()
    measured.X = measured.X * 2
    fig = pl.expression(predicted, ["A", "B"], measured=measured, save=tmp_path / "e.png")
    maps = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in maps] == ["A (predicted)", "B (predicted)",
                                               "A (measured)", "B (measured)"]
    assert images_only(fig) == 4
    for ax in maps:  # image y (pixel rows) grows downwards, as on the H&E
        bottom, top = ax.get_ylim()
        assert bottom > top
    a_predicted, a_measured = maps[0].get_images()[0], maps[2].get_images()[0]
    assert a_predicted.get_clim() == a_measured.get_clim() == (0, 10)
    with pytest.raises(InputError, match=r"genes \['C'\] not in the predicted"):
        pl.expression(predicted, ["C"])
