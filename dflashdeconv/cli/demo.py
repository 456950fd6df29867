"""``dflashdeconv demo``: deconvolve the bundled STARmap cortex data and score it."""

from __future__ import annotations

import time
from pathlib import Path

from .common import EXIT_OK, add_output_options


def add_parser(commands):
    p = commands.add_parser(
        "demo", help="deconvolve the bundled STARmap cortex data and score it",
        description="Deconvolve the bundled STARmap cortex pseudo-spots, print Pearson r and "
                    "RMSE against the ground truth and the time taken, and write PNG maps.")
    p.add_argument("--out", default="results/demo", help="output folder (default: %(default)s)")
    add_output_options(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from .. import metrics, pl, tl
    from ..datasets import starmap_cortex

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
