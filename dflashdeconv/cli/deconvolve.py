"""``dflashdeconv deconvolve``: cell-type proportions of a spot store (out of core), an
AnnData or a SpatialData store (in memory).

Everything the run will need is checked before it starts: the inputs' formats, the output's
suffix and folder, the plot folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from .common import (
    EXIT_NOT_CONVERGED,
    EXIT_OK,
    add_deprecated_flag,
    add_model_options,
    add_output_options,
    model_params,
    print_summary,
    status,
)

#: What ``--out`` may be, by suffix: the in-memory result (.h5ad) or the proportions.
OUT_SUFFIXES = (".h5ad", ".csv", ".parquet")


def add_parser(commands):
    p = commands.add_parser(
        "deconvolve", help="cell-type proportions of a spot store, an AnnData or a SpatialData store",
        description="Deconvolve SPATIAL against REFERENCE (a single-cell AnnData, .h5ad or "
                    ".zarr). SPATIAL is a spot store (see `ingest`; run out of core on Dask, "
                    "results written into the store), an AnnData .h5ad/.zarr (in memory, "
                    "results to --out) or a SpatialData .zarr store (in memory, results "
                    "written back into its table).")
    p.add_argument("spatial", metavar="SPATIAL")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--cell-type-key", default="cell_type",
                   help="obs column of REFERENCE with the labels (default: %(default)s)")
    p.add_argument("--key-added", default="flashdeconv",
                   help="key of the results (obsm/KEY, obs/KEY_dominant, uns/KEY_params; "
                        "default: %(default)s)")
    add_deprecated_flag(p, "--key", "--key-added", "key_added")
    p.add_argument("--out", help="output file by suffix: .h5ad (the AnnData with the results; "
                                 "in memory only), .csv or .parquet (the proportions)")
    p.add_argument("--plot", metavar="DIR", help="write dominant-type and proportion maps (PNG)")
    p.add_argument("--layer", help="counts layer of SPATIAL (default: X)")
    p.add_argument("--layer-ref", help="counts layer of REFERENCE (default: X)")
    p.add_argument("--spatial-key", default="spatial",
                   help="obsm key of the coordinates (default: %(default)s)")
    p.add_argument("--table-key", help="table of a SpatialData SPATIAL (default: its only table)")
    p.add_argument("--min-shared-genes", type=int, default=50,
                   help="refuse fewer genes shared by SPATIAL and REFERENCE (default: "
                        "%(default)s)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--inner-sweeps", type=int, default=1,
                   help="solver steps per boundary exchange (store input; default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace results under --key-added")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run under --key-added (same inputs and "
                        "options); starts one if none is recorded")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write 95%% intervals and detection calls (in memory only)")
    add_model_options(p)
    add_output_options(p)
    p.set_defaults(run=run)
    return p


def _check_plan(args) -> str:
    """The kind of SPATIAL, after checking every path of the run (exit 2 before any work)."""
    from ..errors import InputError
    from ..io import anndata_kind

    kind = anndata_kind(args.spatial, "SPATIAL")
    if anndata_kind(args.reference, "REFERENCE") != "anndata":
        raise InputError(f"REFERENCE {args.reference} must be a single-cell AnnData (.h5ad or "
                         ".zarr), not a spot store or SpatialData")
    if args.out:
        suffix = Path(args.out).suffix.lower()
        allowed = OUT_SUFFIXES if kind != "store" else OUT_SUFFIXES[1:]
        if suffix not in allowed:
            raise InputError(f"--out {args.out}: the suffix must be one of {allowed} "
                             f"({'a store keeps its results; ' if kind == 'store' else ''}"
                             ".csv/.parquet write the proportions)")
        folder = Path(args.out).resolve().parent
        if not folder.is_dir():
            raise InputError(f"--out {args.out}: folder {folder} does not exist")
    elif kind == "anndata":
        raise InputError("--out OUT.h5ad (or .csv/.parquet) is needed for an AnnData input "
                         "(the input is not modified)")
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise InputError(f"--plot {args.plot} is a file; give a folder for the PNG maps")
    if args.uncertainty and kind == "store":
        raise InputError("--uncertainty is available in memory only (not for spot stores)")
    return kind


def run(args) -> int:
    from .. import tl
    from ..io import read_anndata

    kind = _check_plan(args)
    reference = read_anndata(args.reference)
    params = model_params(args)
    key = args.key_added
    start = time.perf_counter()
    if kind == "store":
        summary = tl.deconvolve(args.spatial, reference, cell_type_key=args.cell_type_key,
                                key_added=key, layer_ref=args.layer_ref,
                                scheduler=args.scheduler, inner_sweeps=args.inner_sweeps,
                                overwrite=args.overwrite, resume=args.resume,
                                progress=not args.quiet, min_shared_genes=args.min_shared_genes,
                                **params)
        where = f"{args.spatial} (obsm/{key}, obs/{key}_dominant, uns/{key}_params)"
        adata = None
        if args.out or args.plot:  # results read from the store once, for both
            from ..io import read_store_view

            adata = read_store_view(args.spatial, key)
    else:
        adata, sdata, table = _read_in_memory(args, kind)
        with status(f"deconvolving {adata.n_obs:,} spots in memory", args.quiet):
            tl.deconvolve(sdata if sdata is not None else adata, reference,
                          cell_type_key=args.cell_type_key, key_added=key, layer=args.layer,
                          layer_ref=args.layer_ref, spatial_key=args.spatial_key,
                          table_key=args.table_key, uncertainty=args.uncertainty,
                          min_shared_genes=args.min_shared_genes, **params)
        summary = adata.uns[f"{key}_params"]
        where = ""
        if sdata is not None:
            with status(f"writing the results into {args.spatial}", args.quiet):
                # spatialdata refuses to overwrite an element inside its own store: the table
                # is in memory, so its old copy is deleted from disk, then it is written
                sdata.delete_element_from_disk(table)
                sdata.write_element(table)
            where = f"table {table!r} of {args.spatial}"
    if args.out:
        with status(f"writing {args.out}", args.quiet):
            _write_out(adata, key, args.out)
        where = f"{where}; {args.out}" if where else args.out
    elapsed = time.perf_counter() - start
    if args.plot:
        plot_maps(adata, key, args.plot)
        where += f"; maps in {args.plot}"
    print_summary(summary_lines(summary, elapsed, args.tol) + [("results", where)])
    refined = summary.get("refine_result")
    ok = summary["converged"] and (refined is None or refined["ok"])
    return EXIT_OK if ok else EXIT_NOT_CONVERGED


def _read_in_memory(args, kind):
    """(table AnnData, SpatialData or None, table name or None) of an in-memory SPATIAL."""
    from ..io import read_anndata
    from ..tables import spatialdata_table

    if kind == "anndata":
        return read_anndata(args.spatial), None, None
    import spatialdata as sd

    sdata = sd.read_zarr(args.spatial)
    table, adata = spatialdata_table(sdata, args.table_key)
    return adata, sdata, table


def _write_out(adata, key: str, out: str) -> None:
    suffix = Path(out).suffix.lower()
    if suffix == ".h5ad":
        adata.write_h5ad(out)
    elif suffix == ".csv":
        adata.obsm[key].to_csv(out)
    else:
        adata.obsm[key].to_parquet(out)


def summary_lines(summary: dict, elapsed: float, tol: float) -> list[tuple[str, str]]:
    """The run summary: spots, types, genes used, spatial term, time, convergence."""
    types = summary["cell_type_names"]
    lam = summary["lambda_spatial"]
    spatial = (f"lambda {lam:.3g} ({summary['spatial_method']}, "
               f"k={summary['k_neighbors']})" if lam > 0 else
               "none (lambda 0" + (", k_neighbors=0)" if summary["k_neighbors"] == 0 else ")"))
    lines = [("spots", f"{summary['n_spots']:,}"),
             ("cell types", f"{len(types)}: {', '.join(types[:8])}" + (" ..." if len(types) > 8 else "")),
             ("genes", f"{summary['n_genes_used']:,} used of {summary['n_genes_shared']:,} shared "
                       "with the reference"),
             ("spatial term", spatial),
             ("time", f"{elapsed:.1f} s"),
             ("convergence", f"{'converged' if summary['converged'] else 'NOT converged'} after "
                             f"{summary['n_iterations']} iterations (tol {tol:g})")]
    refined = summary.get("refine_result")
    if refined is not None:
        lines.append(("refinement", f"{refined['mode']}: "
                      f"{'converged' if refined['converged'] else 'NOT converged'} in "
                      f"{refined['n_rounds']} rounds, {refined['n_failed']} spots kept the "
                      "base fit"))
    return lines


def plot_maps(adata, key: str, folder: str) -> None:
    """Dominant-type and proportion maps of ``adata``'s results under ``key`` as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from .. import pl

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pl.dominant(adata, key=key, save=out / f"{key}_dominant.png")
    pl.proportions(adata, key=key, save=out / f"{key}_proportions.png")
