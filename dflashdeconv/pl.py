"""Maps of deconvolution results a biologist can read, from a hundred spots to millions.

Spots are drawn at their size: circles of the spot diameter (recorded in ``uns`` or the
median distance between neighbouring spots) where spots lie anywhere, squares of the grid
spacing where they lie on a grid (Visium HD / Stereo-seq bins, pseudo-spots), and, beyond
``max_spots`` spots, a rasterised image that averages the spots of each pixel (a million
spots draw in seconds). Axes are in micrometres where the data record the scale
(``uns['um_per_pixel']`` or ``uns['px_per_um']``). Every function takes ``ax=`` (one
panel) or a list of axes (several), returns the figure, and can ``save`` it.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .errors import InputError

#: Above this many spots maps are rasterised images instead of one shape per spot.
MAX_SPOTS = 200_000


def raster(coords, values, pixel_size: float | None = None, max_side: int = 1200):
    """Average ``values`` (N,) or (N, C) of the spots in each pixel.

    Returns ``(image, extent)``: image (rows, cols[, C]) with NaN where no spot falls,
    extent for ``imshow(origin="lower")``. The default pixel is the spot spacing (median
    nearest-neighbour distance), enlarged so that no side exceeds ``max_side`` pixels.
    """
    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    values = np.asarray(values, dtype=np.float64)
    if coords.shape[0] != values.shape[0]:
        raise InputError(f"{coords.shape[0]} coordinates for {values.shape[0]} values")
    lo = coords.min(axis=0)
    span = coords.max(axis=0) - lo
    if pixel_size is None:
        pixel_size = spacing(coords)
    pixel_size = max(pixel_size, float(span.max()) / max_side, 1e-12)
    cols, rows = (np.floor((coords - lo) / pixel_size + 0.5).astype(np.int64)).T
    shape = (rows.max() + 1, cols.max() + 1)
    flat = rows * shape[1] + cols
    n = np.bincount(flat, minlength=shape[0] * shape[1]).astype(np.float64)
    n[n == 0] = np.nan
    channels = values.reshape(values.shape[0], -1)
    image = np.stack([np.bincount(flat, weights=channels[:, c], minlength=n.size) / n
                      for c in range(channels.shape[1])], axis=-1)
    image = image.reshape(*shape, channels.shape[1])
    if values.ndim == 1:
        image = image[..., 0]
    half = pixel_size / 2
    extent = (lo[0] - half, lo[0] + (shape[1] - 0.5) * pixel_size,
              lo[1] - half, lo[1] + (shape[0] - 0.5) * pixel_size)
    return image, extent


def spacing(coords: np.ndarray) -> float:
    """Median distance between neighbouring spots (from a sample of 20,000 at most,
    scaled to the whole density)."""
    sample = coords[:: max(1, coords.shape[0] // 20000)]
    if sample.shape[0] < 2:
        return 1.0
    distance = float(np.median(cKDTree(sample).query(sample, k=2)[0][:, 1])) or 1.0
    return distance * max(coords.shape[0] / sample.shape[0], 1) ** -0.5


def _on_grid(coords: np.ndarray, step: float) -> bool:
    """Spots on a square grid of ``step`` (bins, pseudo-spots): squares tile them exactly."""
    offsets = (coords - coords.min(axis=0)) / step
    return bool(np.median(np.abs(offsets - np.round(offsets))) < 0.05)


class Layout:
    """How the spots of one AnnData are drawn: display coordinates, spot size, unit."""

    def __init__(self, adata, spatial_key: str, max_spots: int):
        if spatial_key not in adata.obsm:
            raise InputError(f"no coordinates under obsm[{spatial_key!r}]")
        coords = np.asarray(adata.obsm[spatial_key], np.float64)[:, :2]
        uns = getattr(adata, "uns", {})
        scale = None
        if "um_per_pixel" in uns:
            scale = float(uns["um_per_pixel"])
        elif "px_per_um" in uns:
            scale = 1.0 / float(uns["px_per_um"])
        self.unit = "µm" if scale else "coordinate units"
        self.coords = coords * (scale or 1.0)
        step = spacing(self.coords)
        recorded = uns.get("spot_diameter_px", uns.get("spot_size_px"))
        self.size = float(recorded) * (scale or 1.0) if recorded is not None else step
        self.mode = ("raster" if coords.shape[0] > max_spots else
                     "grid" if _on_grid(self.coords, step) else "circles")
        self.step = step

    def draw(self, ax, values, **style):
        """Draw ``values`` (N,) with ``style`` (``cmap`` and ``norm``; circles also take
        ``facecolors``, one colour per spot): the artist."""
        from matplotlib.collections import EllipseCollection

        if self.mode == "circles":
            size = np.full(self.coords.shape[0], self.size)
            options = ({"facecolors": style["facecolors"]} if "facecolors" in style else
                       {"array": np.asarray(values, np.float64), "cmap": style["cmap"],
                        "norm": style["norm"]})
            artist = EllipseCollection(size, size, np.zeros_like(size), units="xy",
                                       offsets=self.coords, offset_transform=ax.transData,
                                       linewidths=0, **options)
            ax.add_collection(artist)
            pad = self.size
            ax.set_xlim(self.coords[:, 0].min() - pad, self.coords[:, 0].max() + pad)
            ax.set_ylim(self.coords[:, 1].min() - pad, self.coords[:, 1].max() + pad)
        else:
            pixel = self.step if self.mode == "grid" else None
            image, extent = raster(self.coords, values, pixel)
            artist = ax.imshow(image, origin="lower", extent=extent, cmap=style["cmap"],
                               norm=style["norm"], interpolation="nearest")
        ax.set_aspect("equal")
        ax.set_xlabel(f"x ({self.unit})", fontsize=8)
        ax.set_ylabel(f"y ({self.unit})", fontsize=8)
        ax.tick_params(labelsize=7)
        return artist


def _results(adata, key: str):
    if key not in adata.obsm:
        raise InputError(f"no results under obsm[{key!r}]; run dflashdeconv.tl.deconvolve first")
    table = adata.obsm[key]
    return np.asarray(table), [str(c) for c in table.columns]


def _chosen(names: list, cell_types, where: str) -> list:
    """``cell_types`` (default: all ``names``), each checked to be one of ``names``."""
    chosen = names if cell_types is None else list(cell_types)
    missing = [t for t in chosen if t not in names]
    if missing:
        raise InputError(f"cell types {missing} not in {where} ({names})")
    return chosen


def _axes(ax, n_panels: int, ncols: int, panel_size=(3.4, 3.2)):
    """(figure, list of axes): the caller's ``ax`` (an Axes, or one per panel) or new ones."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = list(np.ravel([ax]))
        if len(axes) != n_panels:
            raise InputError(f"{n_panels} panels to draw but {len(axes)} axes given (ax=)")
        return axes[0].figure, axes
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
                             squeeze=False, layout="constrained")
    for extra in grid.ravel()[n_panels:]:
        extra.axis("off")
    return fig, list(grid.ravel()[:n_panels])


def _colorbar(fig, artist, axes, label: str):
    bar = fig.colorbar(artist, ax=axes, shrink=0.7)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def _finish(fig, save, show):
    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig


def _maps(adata, table, chosen, *, key, title, label, cmap, scale, spatial_key, ncols, ax,
          max_spots, save, show):
    """One map per column of ``table`` in ``chosen``, shared or per-panel colour scale."""
    from matplotlib.colors import Normalize

    if scale not in ("shared", "per_type"):
        raise InputError(f"scale must be 'shared' or 'per_type', got {scale!r}")
    layout = Layout(adata, spatial_key, max_spots)
    fig, axes = _axes(ax, len(chosen), ncols)
    values = np.asarray(table[chosen], np.float64)
    top = np.nanmax(values) if values.size else 1.0
    for panel, name in zip(axes, chosen):
        column = values[:, chosen.index(name)]
        high = (np.nanmax(column) if scale == "per_type" else max(top, 1e-12)) or 1.0
        artist = layout.draw(panel, column, cmap=cmap, norm=Normalize(0.0, high))
        panel.set_title(f"{title}: {name}", fontsize=9)
        if scale == "per_type":
            _colorbar(fig, artist, panel, label)
    if scale == "shared":
        _colorbar(fig, artist, axes, label)
    return _finish(fig, save, show)


def proportions(adata, key: str = "flashdeconv", cell_types=None, *, spatial_key: str = "spatial",
                scale: str = "shared", cmap: str = "viridis", ncols: int = 4, ax=None,
                max_spots: int = MAX_SPOTS, save=None, show: bool = False):
    """One map per cell type of its proportion in each spot.

    Parameters
    ----------
    adata : AnnData
        With the results of :func:`dflashdeconv.tl.deconvolve` in ``obsm[key]``.
    key : str
        ``key_added`` of the run.
    cell_types : list of str, optional
        The types to draw (default: all).
    spatial_key : str
        ``obsm`` key of the coordinates.
    scale : {"shared", "per_type"}
        One colour scale for all panels (0 to the largest proportion), or one per type
        (rare types stay visible).
    cmap, ncols : str, int
        Colour map; panels per row.
    ax : Axes or list of Axes, optional
        Where to draw (one per cell type); new figure by default.
    max_spots : int
        Above this many spots the map is a rasterised image.
    save : path, optional
        Write the figure (PNG, PDF, ... by suffix).
    show : bool
        ``plt.show()`` the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _, names = _results(adata, key)
    chosen = _chosen(names, cell_types, f"obsm[{key!r}]")
    return _maps(adata, adata.obsm[key], chosen, key=key, title=key, label="proportion",
                 cmap=cmap, scale=scale, spatial_key=spatial_key, ncols=ncols, ax=ax,
                 max_spots=max_spots, save=save, show=show)


def dominant(adata, key: str = "flashdeconv", *, spatial_key: str = "spatial", ax=None,
             max_spots: int = MAX_SPOTS, save=None, show: bool = False):
    """Map of the dominant cell type of each spot, with a legend of the types present.

    Parameters
    ----------
    adata : AnnData
        With the results of :func:`dflashdeconv.tl.deconvolve` in ``obsm[key]``.
    key : str
        ``key_added`` of the run.
    spatial_key : str
        ``obsm`` key of the coordinates.
    ax : Axes, optional
        Where to draw; a new figure by default.
    max_spots : int
        Above this many spots the map is a rasterised image (the majority type per pixel).
    save : path, optional
        Write the figure.
    show : bool
        ``plt.show()`` the figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    values, names = _results(adata, key)
    layout = Layout(adata, spatial_key, max_spots)
    fig, (axis,) = _axes(ax, 1, 1, panel_size=(7.0, 6.0))
    base = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colours = [base(k % base.N) for k in range(len(names))]
    label = np.argmax(values, axis=1)
    style = {"cmap": ListedColormap(colours),
             "norm": BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))}
    if layout.mode == "circles":
        layout.draw(axis, label, facecolors=[colours[k] for k in label], **style)
    else:  # majority type of each pixel from the rasterised one-hot
        image, extent = raster(layout.coords, np.eye(len(names))[label],
                               layout.step if layout.mode == "grid" else None)
        empty = np.isnan(image[..., 0])
        majority = np.where(empty, np.nan, np.argmax(np.nan_to_num(image), axis=-1))
        axis.imshow(majority, origin="lower", extent=extent, interpolation="nearest", **style)
        axis.set_aspect("equal")
        axis.set_xlabel(f"x ({layout.unit})", fontsize=8)
        axis.set_ylabel(f"y ({layout.unit})", fontsize=8)
    present = np.unique(label)
    axis.set_title(f"{key}: dominant cell type", fontsize=10)
    axis.legend(handles=[Patch(color=colours[k], label=names[k]) for k in present],
                loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
                title=f"{len(present)} of {len(names)} types")
    return _finish(fig, save, show)


def uncertainty(adata, key: str = "flashdeconv", cell_types=None, what: str = "ci_width", *,
                spatial_key: str = "spatial", scale: str = "shared", ncols: int = 4, ax=None,
                max_spots: int = MAX_SPOTS, save=None, show: bool = False):
    """Maps of the uncertainty of each type's proportion.

    Parameters
    ----------
    adata : AnnData
        Deconvolved with ``tl.deconvolve(..., uncertainty=True)``.
    key : str
        ``key_added`` of the run.
    cell_types : list of str, optional
        The types to draw (default: all).
    what : {"ci_width", "detected"}
        The width of the 95% interval (upper - lower bound), or whether the type is
        detected in the spot (Benjamini-Hochberg, q = 0.1).
    spatial_key, scale, ncols, ax, max_spots, save, show
        As in :func:`proportions`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if what not in ("ci_width", "detected"):
        raise InputError(f"what must be 'ci_width' or 'detected', got {what!r}")
    needed = [f"{key}_ci_lower", f"{key}_ci_upper"] if what == "ci_width" else [f"{key}_detected"]
    missing = [k for k in needed if k not in adata.obsm]
    if missing:
        raise InputError(f"no {missing} in obsm: run tl.deconvolve(..., uncertainty=True)")
    if what == "ci_width":
        table = adata.obsm[needed[1]] - adata.obsm[needed[0]]
    else:
        table = adata.obsm[needed[0]].astype(float)
    chosen = _chosen([str(c) for c in table.columns], cell_types, f"obsm[{needed[0]!r}]")
    label = "95% interval width" if what == "ci_width" else "detected"
    return _maps(adata, table, chosen, key=key, title=f"{key} {label}", label=label,
                 cmap="magma" if what == "ci_width" else "Greens", scale=scale,
                 spatial_key=spatial_key, ncols=ncols, ax=ax, max_spots=max_spots, save=save,
                 show=show)


def convergence(adata, key: str = "flashdeconv", *, ax=None, save=None, show: bool = False):
    """The solver's largest relative change per iteration against its tolerance.

    Parameters
    ----------
    adata : AnnData or dict
        With ``uns[key + '_params']`` (or that record itself, e.g. a store run's summary).
    key : str
        ``key_added`` of the run.
    ax : Axes, optional
        Where to draw; a new figure by default.
    save, show
        As in :func:`proportions`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    params = adata.uns.get(f"{key}_params") if hasattr(adata, "uns") else adata
    if not params or "changes" not in params:
        raise InputError(f"no convergence record in uns[{key + '_params'!r}]")
    changes = np.asarray(params["changes"], dtype=float)
    fig, (axis,) = _axes(ax, 1, 1, panel_size=(5.0, 3.5))
    axis.semilogy(np.arange(1, changes.size + 1), changes, marker="o")
    axis.axhline(float(params["tol"]), color="grey", linestyle="--", label=f"tol {params['tol']:g}")
    unit = "iteration" if "inner_sweeps" not in params else "round"
    axis.set_xlabel(unit)
    axis.set_ylabel("max |change| / max |beta|")
    state = "converged" if params.get("converged") else "not converged"
    axis.set_title(f"solver: {state} after {changes.size} {unit}{'s' if changes.size != 1 else ''}")
    axis.legend()
    return _finish(fig, save, show)


def expression(predicted, genes, measured=None, *, spatial_key: str = "spatial", ax=None,
               max_spots: int = MAX_SPOTS, save=None, show: bool = False):
    """Maps of predicted expression (e.g. STFlow's tiles x genes AnnData) per gene, beside
    the measured expression when ``measured`` (an AnnData with the same genes) is given.

    Parameters
    ----------
    predicted : AnnData
        Expression per spot or tile, coordinates in ``obsm[spatial_key]`` (slide pixels).
    genes : str or list of str
        The genes to draw.
    measured : AnnData, optional
        Measured expression of the same genes: a second row of maps.
    spatial_key : str
        ``obsm`` key of the coordinates.
    ax : list of Axes, optional
        One per map (genes x rows, row by row); a new figure by default.
    max_spots, save, show
        As in :func:`proportions`.

    Returns
    -------
    matplotlib.figure.Figure
        Each gene shares one colour scale between its two maps; slide pixels grow
        downwards, so the maps are drawn the way up the H&E image is.
    """
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else list(genes)
    sources = [("predicted", predicted)] + ([("measured", measured)] if measured is not None else [])
    for label, data in sources:
        missing = [g for g in genes if g not in data.var_names]
        if missing:
            raise InputError(f"genes {missing} not in the {label} AnnData")
    fig, axes = _axes(ax, len(sources) * len(genes), len(genes))
    grid = np.array(axes, dtype=object).reshape(len(sources), len(genes))
    for col, gene in enumerate(genes):
        maps = []
        for _, data in sources:
            values = data[:, gene].X
            maps.append(np.asarray(values.toarray() if hasattr(values, "toarray") else values,
                                   np.float64).ravel())
        top = max(np.nanmax(m) for m in maps) or 1.0
        for row, ((label, data), values) in enumerate(zip(sources, maps)):
            panel = grid[row, col]
            artist = Layout(data, spatial_key, max_spots).draw(
                panel, values, cmap="viridis", norm=Normalize(0.0, top))
            panel.invert_yaxis()  # slide pixels: y grows downwards, as in the H&E image
            panel.set_title(f"{gene} ({label})", fontsize=10)
        bar = fig.colorbar(artist, ax=list(grid[:, col]), orientation="horizontal", shrink=0.8)
        bar.set_label("expression", fontsize=8)
    return _finish(fig, save, show)
