"""Command line: ``dflashdeconv <command>``. Heavy imports happen inside the commands, so
``--help`` answers at once.

Exit codes for batch systems: 0 success, 1 unexpected failure, 2 bad input (the message
names the problem), 3 the solver did not converge, 4 the store is locked by another run,
130 interrupted (Ctrl-C) and 143 terminated (SIGTERM); an interrupted ``deconvolve``
continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOT_CONVERGED, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def _is_store(path: str) -> bool:
    """A spot store path or URL (anything but an .h5ad file)."""
    return not str(path).endswith(".h5ad")


def _model_params(args) -> dict:
    lam = args.lambda_spatial if args.lambda_spatial == "auto" else float(args.lambda_spatial)
    return dict(preprocess=args.preprocess, gene_weighting=args.gene_weighting,
                spatial_method=args.spatial_method, k_neighbors=args.k_neighbors,
                radius=args.radius, tol=args.tol, max_iter=args.max_iter, lambda_spatial=lam,
                n_hvg=args.n_hvg, n_markers_per_type=args.n_markers_per_type,
                sketch_dim=args.sketch_dim, random_state=args.seed)


def _print_summary(lines: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in lines:
        table.add_row(f"[bold]{key}[/bold]", value)
    Console(stderr=False).print(table)


def _deconvolve(args) -> int:
    from . import tl
    from .io import read_anndata

    reference = read_anndata(args.reference)
    params = _model_params(args)
    start = time.perf_counter()
    if _is_store(args.spatial):
        summary = tl.deconvolve(args.spatial, reference, cell_type_key=args.cell_type_key,
                                key_added=args.key, layer_ref=args.layer_ref,
                                scheduler=args.scheduler, inner_sweeps=args.inner_sweeps,
                                overwrite=args.overwrite, resume=args.resume,
                                progress=not args.quiet, **params)
        where = f"{args.spatial} (obsm/{args.key}, obs/{args.key}_dominant, uns/{args.key}_params)"
        n_spots, converged = summary["n_spots"], summary["converged"]
        iterations, types = summary["n_iterations"], summary["cell_type_names"]
        adata = None
        if args.out or args.plot:  # results read from the store once, for both
            from .engine.results import read_store_view

            adata = read_store_view(args.spatial, args.key)
        if args.out:
            adata.obsm[args.key].to_csv(args.out)
            where += f"; proportions also in {args.out}"
    else:
        if not args.out:
            from .errors import InputError

            raise InputError("--out OUT.h5ad is needed for an .h5ad input (the input is not modified)")
        adata = read_anndata(args.spatial)
        with _status(f"deconvolving {adata.n_obs:,} spots in memory", args.quiet):
            tl.deconvolve(adata, reference, cell_type_key=args.cell_type_key, key_added=args.key,
                          layer_st=args.layer, layer_ref=args.layer_ref,
                          spatial_key=args.spatial_key, **params)
        with _status(f"writing {args.out}", args.quiet):
            adata.write_h5ad(args.out)
        p = adata.uns[f"{args.key}_params"]
        n_spots, converged, iterations = adata.n_obs, p["converged"], p["n_iterations"]
        types, where = p["cell_type_names"], args.out
    elapsed = time.perf_counter() - start
    if args.plot:
        _plot(adata, args.key, args.plot)
        where += f"; maps in {args.plot}"
    _print_summary([("spots", f"{n_spots:,}"), ("cell types", f"{len(types)}: {', '.join(types[:8])}"
                     + (" ..." if len(types) > 8 else "")),
                    ("time", f"{elapsed:.1f} s"),
                    ("convergence", f"{'converged' if converged else 'NOT converged'} after "
                                    f"{iterations} iterations (tol {args.tol:g})"),
                    ("results", where)])
    return EXIT_OK if converged else EXIT_NOT_CONVERGED


def _status(message: str, quiet: bool):
    """A spinner on stderr for a step without a measurable length."""
    from contextlib import nullcontext

    if quiet:
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _plot(adata, key: str, folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from . import pl

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pl.dominant(adata, key=key, save=out / f"{key}_dominant.png")
    pl.proportions(adata, key=key, save=out / f"{key}_proportions.png")


def _ingest(args) -> int:
    from .engine import ingest

    progress = None if args.quiet else _line_progress()
    start = time.perf_counter()
    kind = args.format if args.format != "auto" else ingest.guess_format(args.input)
    options = {"h5ad": dict(spatial_key=args.spatial_key, layer=args.layer),
               "spatialdata": dict(table=args.table), "gem": dict(bin_size=args.bin_size),
               "gef": dict(bin_size=args.bin_size)}.get(kind, {})
    store = ingest.from_path(args.input, args.store, kind, chunk_rows=args.chunk_rows,
                             progress=progress, **options)
    _print_summary([("store", store.path), ("spots", f"{store.n_spots:,}"),
                    ("genes", f"{store.n_genes:,}"), ("non-zeros", f"{store.nnz:,}"),
                    ("blocks", f"{store.n_blocks} x {store.chunk_rows} rows"),
                    ("time", f"{time.perf_counter() - start:.1f} s")])
    return EXIT_OK


def _line_progress():
    last = [0.0]

    def report(stage, done, total):
        now = time.perf_counter()
        if now - last[0] > 2 or (total and done >= total):
            last[0] = now
            of = f"/{total:,}" if total else ""
            print(f"{stage}: {done:,}{of}", file=sys.stderr, flush=True)
    return report


def _synth(args) -> int:
    from .datasets import SyntheticTissue

    tissue = SyntheticTissue(n_spots=args.spots, n_genes=args.genes, n_types=args.types,
                             depth=args.depth, seed=args.seed)
    start = time.perf_counter()
    store = tissue.write_store(args.store, chunk_rows=args.chunk_rows,
                               progress=None if args.quiet else
                               (lambda done, total, p=_line_progress(): p("writing", done, total)))
    reference = args.reference or str(Path(args.store.rstrip("/")).with_suffix("")) + "_reference.h5ad"
    tissue.reference().write_h5ad(reference)
    _print_summary([("store", store.path), ("spots", f"{store.n_spots:,}"),
                    ("non-zeros per spot", f"{store.nnz / store.n_spots:.0f}"),
                    ("reference", reference), ("truth", "obsm/proportions of the store"),
                    ("time", f"{time.perf_counter() - start:.1f} s")])
    return EXIT_OK


def _info(args) -> int:
    from .engine.store import SpotStore

    store = SpotStore.open(args.store)
    root = store.root()
    lines = [("store", store.path), ("source", store.source), ("spots", f"{store.n_spots:,}"),
             ("genes", f"{store.n_genes:,}"), ("non-zeros", f"{store.nnz:,} "
              f"({store.nnz / max(store.n_spots, 1):.0f} per spot)"),
             ("blocks", f"{store.n_blocks} x {store.chunk_rows} rows")]
    for name in sorted(root["uns"]):
        if name.endswith("_params"):
            from anndata.io import read_elem

            p = read_elem(root["uns"][name])
            lines.append((f"result {name[:-7]!r}",
                          f"{p['n_cell_types']} types, {'converged' if p['converged'] else 'NOT converged'}"
                          f" in {p['n_iterations']} iterations, preprocess={p['preprocess']}, "
                          f"weighting={p['gene_weighting']}"))
        elif name.endswith("_run") and root["uns"][name].attrs.get("status") != "complete":
            lines.append((f"run {name[:-4]!r}", f"incomplete ({root['uns'][name].attrs.get('status')})"))
    _print_summary(lines)
    return EXIT_OK


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from . import metrics, pl, tl
    from .datasets import starmap_cortex

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spots, reference = starmap_cortex()
    truth = spots.obsm["proportions"]
    start = time.perf_counter()
    tl.deconvolve(spots, reference, cell_type_key="cell_type")
    elapsed = time.perf_counter() - start
    estimate = spots.obsm["flashdeconv"][truth.columns].to_numpy()
    r = metrics.pearson(estimate, truth.to_numpy())
    error = metrics.rmse(estimate, truth.to_numpy())
    params = spots.uns["flashdeconv_params"]
    pl.dominant(spots, save=out / "starmap_dominant.png")
    pl.proportions(spots, save=out / "starmap_proportions.png")
    spots.obsm["flashdeconv"].to_csv(out / "starmap_proportions.csv")
    print("STARmap mouse visual cortex: 581 spots x 1020 genes, 12 cell types")
    print(f"  Pearson r (all entries) = {r:.4f}   RMSE = {error:.4f}   vs ground truth")
    print(f"  time = {elapsed:.2f} s   solver iterations = {params['n_iterations']}   "
          f"converged = {params['converged']}")
    print(f"  results: {out / 'starmap_proportions.csv'}")
    print(f"  maps:    {out / 'starmap_dominant.png'}, {out / 'starmap_proportions.png'}")
    return EXIT_OK


def _add_model_options(parser) -> None:
    group = parser.add_argument_group("model (defaults of flashdeconv 0.2.0)")
    group.add_argument("--preprocess", default="log_cpm", choices=("log_cpm", "pearson", "raw"))
    group.add_argument("--gene-weighting", default="expected", choices=("expected", "countsketch"))
    group.add_argument("--spatial-method", default="knn", choices=("knn", "radius", "grid"))
    group.add_argument("--k-neighbors", type=int, default=6)
    group.add_argument("--radius", type=float, default=None)
    group.add_argument("--lambda-spatial", default="auto", help="'auto' or a number")
    group.add_argument("--n-hvg", type=int, default=2000)
    group.add_argument("--n-markers-per-type", type=int, default=50)
    group.add_argument("--sketch-dim", type=int, default=512)
    group.add_argument("--tol", type=float, default=1e-4)
    group.add_argument("--max-iter", type=int, default=1000)
    group.add_argument("--seed", type=int, default=0, help="CountSketch seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflashdeconv",
        description="Out-of-core FlashDeconv cell-type deconvolution for spatial transcriptomics.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad input, 3 not converged, 4 store locked, "
               "130 interrupted, 143 terminated.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser(
        "deconvolve", help="cell-type proportions of a spot store (out of core) or an .h5ad",
        description="Deconvolve SPATIAL (a spot store path/URL, run out of core on Dask, "
                    "results written into the store; or an .h5ad, run in memory, results "
                    "written to --out) against REFERENCE (a single-cell .h5ad).")
    p.add_argument("spatial", metavar="SPATIAL")
    p.add_argument("reference", metavar="REFERENCE")
    p.add_argument("--cell-type-key", default="cell_type")
    p.add_argument("--key", default="flashdeconv", help="key_added for the results")
    p.add_argument("--out", help="output .h5ad (h5ad input) or proportions .csv (store input)")
    p.add_argument("--plot", metavar="DIR", help="write dominant-type and proportion maps (PNG)")
    p.add_argument("--layer", help="counts layer of SPATIAL (.h5ad input)")
    p.add_argument("--layer-ref", help="counts layer of REFERENCE")
    p.add_argument("--spatial-key", default="spatial")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--inner-sweeps", type=int, default=1,
                   help="solver steps per boundary exchange (store input)")
    p.add_argument("--overwrite", action="store_true", help="replace results under --key")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run under --key (same inputs and options); "
                        "starts one if none is recorded")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_options(p)
    p.set_defaults(run=_deconvolve)

    p = commands.add_parser("ingest", help="convert h5ad / SpatialData / GEM / GEF / Visium HD to a spot store",
                            description="Stream INPUT into a spot store (AnnData zarr, rows in "
                                        "spatial order), never holding the whole matrix.")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--format", default="auto",
                   choices=("auto", "h5ad", "spatialdata", "gem", "gef", "visium-hd"))
    p.add_argument("--bin-size", type=int, default=50,
                   help="GEM/GEF bin size in DNB (default 50)")
    p.add_argument("--table", help="SpatialData table name")
    p.add_argument("--spatial-key", default="spatial")
    p.add_argument("--layer")
    p.add_argument("--chunk-rows", type=int, help="spots per block (default: from the data)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_ingest)

    p = commands.add_parser("synth", help="write a synthetic spot store with known proportions",
                            description="Write a synthetic tissue of --spots spots chunk by "
                                        "chunk, its single-cell reference (.h5ad) and the truth.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--spots", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=3000)
    p.add_argument("--types", type=int, default=15)
    p.add_argument("--depth", type=float, default=3900.0, help="mean UMI per spot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", help="reference .h5ad path (default: STORE_reference.h5ad)")
    p.add_argument("--chunk-rows", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_synth)

    p = commands.add_parser("info", help="describe a spot store and its results")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(run=_info)

    from .histo.command import add_parser as add_predict_expression

    add_predict_expression(commands)

    p = commands.add_parser(
        "demo", help="deconvolve the bundled STARmap cortex data and score it",
        description="Deconvolve the bundled STARmap cortex pseudo-spots, print Pearson r and "
                    "RMSE against the ground truth and the time taken, and write PNG maps.")
    p.add_argument("--out", default="results/demo", help="output folder (default: %(default)s)")
    p.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_FAILURE
    import signal

    from .engine import stop
    from .engine.lock import StoreLockedError
    from .errors import InputError, Terminated

    def terminate(signum, frame):
        stop.request()  # kept for the engine's next safe point should this raise be lost
        raise Terminated()

    stop.clear()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return args.run(args)
    except InputError as error:
        print(f"dflashdeconv: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreLockedError as error:
        print(f"dflashdeconv: error: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except (KeyboardInterrupt, Terminated) as interruption:
        resume = " (continue with --resume)" if args.command == "deconvolve" else ""
        print(f"dflashdeconv: interrupted{resume}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.clear()


if __name__ == "__main__":
    sys.exit(main())
