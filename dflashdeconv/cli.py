"""Command line: ``dflashdeconv <command>``. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

#: Exit codes a batch system can act on.
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflashdeconv",
        description="Out-of-core FlashDeconv cell-type deconvolution for spatial transcriptomics.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="deconvolve the bundled STARmap cortex data and score it",
        description="Deconvolve the bundled STARmap cortex pseudo-spots, print Pearson r and "
                    "RMSE against the ground truth and the time taken, and write PNG maps.")
    demo.add_argument("--out", default="results/demo", help="output folder (default: %(default)s)")
    demo.set_defaults(run=_demo)
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
    from .errors import InputError

    try:
        return args.run(args)
    except InputError as error:
        print(f"dflashdeconv: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
