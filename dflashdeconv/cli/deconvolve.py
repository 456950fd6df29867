"""``dflashdeconv deconvolve``: cell-type proportions of a spot store (out of core) or an
.h5ad (in memory)."""

from __future__ import annotations

import time
from pathlib import Path

from .common import (
    EXIT_NOT_CONVERGED,
    EXIT_OK,
    add_deprecated_flag,
    add_model_options,
    model_params,
    print_summary,
    status,
)


def add_parser(commands):
    p = commands.add_parser(
        "deconvolve", help="cell-type proportions of a spot store (out of core) or an .h5ad",
        description="Deconvolve SPATIAL (a spot store path/URL, run out of core on Dask, "
                    "results written into the store; or an .h5ad, run in memory, results "
                    "written to --out) against REFERENCE (a single-cell .h5ad).")
    p.add_argument("spatial", metavar="SPATIAL")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--cell-type-key", default="cell_type")
    p.add_argument("--key-added", default="flashdeconv",
                   help="key of the results (obsm/KEY, obs/KEY_dominant, uns/KEY_params; "
                        "default: %(default)s)")
    add_deprecated_flag(p, "--key", "--key-added", "key_added")
    p.add_argument("--out", help="output .h5ad (h5ad input) or proportions .csv (store input)")
    p.add_argument("--plot", metavar="DIR", help="write dominant-type and proportion maps (PNG)")
    p.add_argument("--layer", help="counts layer of SPATIAL (.h5ad input)")
    p.add_argument("--layer-ref", help="counts layer of REFERENCE")
    p.add_argument("--spatial-key", default="spatial")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--inner-sweeps", type=int, default=1,
                   help="solver steps per boundary exchange (store input)")
    p.add_argument("--overwrite", action="store_true", help="replace results under --key-added")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run under --key-added (same inputs and options); "
                        "starts one if none is recorded")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write 95%% intervals and detection calls (.h5ad input)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(p)
    p.set_defaults(run=run)
    return p


def _is_store(path: str) -> bool:
    """A spot store path or URL (anything but an .h5ad file)."""
    return not str(path).endswith(".h5ad")


def run(args) -> int:
    from .. import tl
    from ..io import read_anndata

    reference = read_anndata(args.reference)
    params = model_params(args)
    key = args.key_added
    start = time.perf_counter()
    if _is_store(args.spatial):
        summary = tl.deconvolve(args.spatial, reference, cell_type_key=args.cell_type_key,
                                key_added=key, layer_ref=args.layer_ref,
                                scheduler=args.scheduler, inner_sweeps=args.inner_sweeps,
                                overwrite=args.overwrite, resume=args.resume,
                                progress=not args.quiet, uncertainty=args.uncertainty,
                                **params)
        where = f"{args.spatial} (obsm/{key}, obs/{key}_dominant, uns/{key}_params)"
        n_spots, converged = summary["n_spots"], summary["converged"]
        iterations, types = summary["n_iterations"], summary["cell_type_names"]
        refined = summary.get("refine_result")
        adata = None
        if args.out or args.plot:  # results read from the store once, for both
            from ..io import read_store_view

            adata = read_store_view(args.spatial, key)
        if args.out:
            adata.obsm[key].to_csv(args.out)
            where += f"; proportions also in {args.out}"
    else:
        if not args.out:
            from ..errors import InputError

            raise InputError("--out OUT.h5ad is needed for an .h5ad input (the input is not modified)")
        adata = read_anndata(args.spatial)
        with status(f"deconvolving {adata.n_obs:,} spots in memory", args.quiet):
            tl.deconvolve(adata, reference, cell_type_key=args.cell_type_key, key_added=key,
                          layer=args.layer, layer_ref=args.layer_ref,
                          spatial_key=args.spatial_key, uncertainty=args.uncertainty, **params)
        with status(f"writing {args.out}", args.quiet):
            adata.write_h5ad(args.out)
        p = adata.uns[f"{key}_params"]
        n_spots, converged, iterations = adata.n_obs, p["converged"], p["n_iterations"]
        types, where, refined = p["cell_type_names"], args.out, p.get("refine_result")
    elapsed = time.perf_counter() - start
    if args.plot:
        plot_maps(adata, key, args.plot)
        where += f"; maps in {args.plot}"
    lines = [("spots", f"{n_spots:,}"), ("cell types", f"{len(types)}: {', '.join(types[:8])}"
              + (" ..." if len(types) > 8 else "")),
             ("time", f"{elapsed:.1f} s"),
             ("convergence", f"{'converged' if converged else 'NOT converged'} after "
                             f"{iterations} iterations (tol {args.tol:g})")]
    if refined is not None:
        lines.append(("refinement", f"{refined['mode']}: "
                      f"{'converged' if refined['converged'] else 'NOT converged'} in "
                      f"{refined['n_rounds']} rounds, {refined['n_failed']} spots kept the "
                      "base fit"))
    print_summary(lines + [("results", where)])
    ok = converged and (refined is None or refined["ok"])
    return EXIT_OK if ok else EXIT_NOT_CONVERGED


def plot_maps(adata, key: str, folder: str) -> None:
    """Dominant-type and proportion maps of ``adata``'s results under ``key`` as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from .. import pl

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pl.dominant(adata, key=key, save=out / f"{key}_dominant.png")
    pl.proportions(adata, key=key, save=out / f"{key}_proportions.png")
