"""Plots of deconvolution results, rasterised so that a million spots draw in seconds.

Spots are binned onto a pixel grid (the spot spacing, or coarser for large tissues) and
shown with ``imshow``: one image per panel instead of one marker per spot.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from .errors import InputError


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
        sample = coords[:: max(1, coords.shape[0] // 20000)]
        dist = cKDTree(sample).query(sample, k=2)[0][:, 1] if sample.shape[0] > 1 else [1.0]
        pixel_size = float(np.median(dist)) or 1.0
        pixel_size *= max(coords.shape[0] / sample.shape[0], 1) ** -0.5
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


def _coords(adata, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise InputError(f"no coordinates under obsm[{spatial_key!r}]")
    return np.asarray(adata.obsm[spatial_key])


def _results(adata, key: str, spatial_key: str):
    if key not in adata.obsm:
        raise InputError(f"no results under obsm[{key!r}]; run dflashdeconv.tl.deconvolve first")
    table = adata.obsm[key]
    return _coords(adata, spatial_key), np.asarray(table), list(table.columns)


def _chosen(names: list, cell_types, where: str) -> list:
    """``cell_types`` (default: all ``names``), each checked to be one of ``names``."""
    chosen = names if cell_types is None else list(cell_types)
    missing = [t for t in chosen if t not in names]
    if missing:
        raise InputError(f"cell types {missing} not in {where} ({names})")
    return chosen


def _finish(fig, save, show):
    if save is not None:
        fig.savefig(save, dpi=120, bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return fig


def _panels(image, extent, titles, ncols: int, cmap: str, label: str):
    """One map per channel of ``image`` on a 0-1 colour scale shared by all panels."""
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(titles))
    nrows = int(np.ceil(len(titles) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, c in zip(axes.ravel(), range(len(titles))):
        shown = ax.imshow(image[..., c], origin="lower", extent=extent, vmin=0, vmax=1,
                          cmap=cmap, interpolation="nearest")
        ax.set_title(str(titles[c]), fontsize=10)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(titles):]:
        ax.axis("off")
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6, label=label)
    return fig


def proportions(adata, key: str = "flashdeconv", cell_types=None, spatial_key: str = "spatial",
                ncols: int = 4, pixel_size: float | None = None, save=None, show: bool = False):
    """One map per cell type of its proportion (0-1 colour scale)."""
    coords, values, names = _results(adata, key, spatial_key)
    chosen = _chosen(names, cell_types, f"obsm[{key!r}]")
    image, extent = raster(coords, values[:, [names.index(t) for t in chosen]], pixel_size)
    fig = _panels(image, extent, chosen, ncols, "viridis", "proportion")
    return _finish(fig, save, show)


def dominant(adata, key: str = "flashdeconv", spatial_key: str = "spatial",
             pixel_size: float | None = None, save=None, show: bool = False):
    """Map of the dominant cell type of each spot, one colour per type."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    coords, values, names = _results(adata, key, spatial_key)
    # rasterise the one-hot of the dominant type, then take the majority per pixel
    one_hot = np.eye(len(names))[np.argmax(values, axis=1)]
    image, extent = raster(coords, one_hot, pixel_size)
    empty = np.isnan(image[..., 0])
    label = np.where(empty, np.nan, np.argmax(np.nan_to_num(image), axis=-1))
    base = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colours = [base(k % base.N) for k in range(len(names))]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(label, origin="lower", extent=extent, cmap=ListedColormap(colours),
              vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
    ax.set_aspect("equal")
    ax.set_title("dominant cell type")
    ax.legend(handles=[Patch(color=colours[k], label=str(n)) for k, n in enumerate(names)],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _finish(fig, save, show)


def uncertainty(adata, key: str = "flashdeconv", cell_types=None, what: str = "ci_width",
                spatial_key: str = "spatial", ncols: int = 4, pixel_size: float | None = None,
                save=None, show: bool = False):
    """Maps of the uncertainty of each type's proportion: ``what="ci_width"`` (upper - lower
    bound of the 95% interval) or ``"detected"`` (share of the spots in a pixel where the
    type is detected, BH q = 0.1). Needs ``tl.deconvolve(..., uncertainty=True)``."""
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
    chosen = _chosen(list(table.columns), cell_types, f"obsm[{needed[0]!r}]")
    image, extent = raster(_coords(adata, spatial_key), table[chosen].to_numpy(), pixel_size)
    label = "95% interval width" if what == "ci_width" else "detected (share of spots)"
    fig = _panels(image, extent, chosen, ncols, "magma" if what == "ci_width" else "Greens", label)
    return _finish(fig, save, show)


def convergence(adata, key: str = "flashdeconv", save=None, show: bool = False):
    """The solver's largest relative change per iteration against its tolerance."""
    import matplotlib.pyplot as plt

    params = adata.uns.get(f"{key}_params") if hasattr(adata, "uns") else adata
    if not params or "changes" not in params:
        raise InputError(f"no convergence record in uns[{key + '_params'!r}]")
    changes = np.asarray(params["changes"], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(np.arange(1, changes.size + 1), changes, marker="o")
    ax.axhline(float(params["tol"]), color="grey", linestyle="--", label=f"tol {params['tol']:g}")
    unit = "iteration" if "inner_sweeps" not in params else "round"
    ax.set_xlabel(unit)
    ax.set_ylabel("max |change| / max |beta|")
    state = "converged" if params.get("converged") else "not converged"
    ax.set_title(f"solver: {state} after {changes.size} {unit}{'s' if changes.size != 1 else ''}")
    ax.legend()
    return _finish(fig, save, show)


def expression(predicted, genes, measured=None, spatial_key: str = "spatial",
               pixel_size: float | None = None, save=None, show: bool = False):
    """Maps of predicted expression (e.g. STFlow's tiles x genes AnnData) per gene, beside
    the measured expression when ``measured`` (an AnnData with the same genes) is given.
    Each gene shares one colour scale between the two rows; coordinates are slide pixels,
    so the maps are drawn the way up the H&E image is."""
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else list(genes)
    sources = [("predicted", predicted)] + ([("measured", measured)] if measured is not None else [])
    for label, data in sources:
        missing = [g for g in genes if g not in data.var_names]
        if missing:
            raise InputError(f"genes {missing} not in the {label} AnnData")
    fig, axes = plt.subplots(len(sources), len(genes), squeeze=False,
                             figsize=(3.2 * len(genes), 3.0 * len(sources)))
    for col, gene in enumerate(genes):
        maps = []
        for _, data in sources:
            values = data[:, gene].X
            values = np.asarray(values.toarray() if hasattr(values, "toarray") else values).ravel()
            maps.append(raster(np.asarray(data.obsm[spatial_key]), values, pixel_size))
        top = max(np.nanmax(m[0]) for m in maps) or 1.0
        for row, ((label, _), (image, extent)) in enumerate(zip(sources, maps)):
            ax = axes[row, col]
            shown = ax.imshow(image, origin="lower", extent=extent, vmin=0, vmax=top,
                              cmap="viridis", interpolation="nearest")
            ax.invert_yaxis()  # slide pixels: y grows downwards, as in the H&E image
            ax.set_title(f"{gene} ({label})", fontsize=10)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(shown, ax=axes[:, col].tolist(), orientation="horizontal", shrink=0.8,
                     pad=0.04, label="log1p expression")
    return _finish(fig, save, show)
