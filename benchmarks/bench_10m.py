"""10M spots out of core on one machine: the store written by ``synth``, then deconvolved.

Both steps run as the command-line tool a user would run (``dflashdeconv synth``, then
``dflashdeconv deconvolve STORE REFERENCE --overwrite``, a LocalCluster of one
single-threaded worker per core), each timed from outside with the peak RSS of its whole
process tree (client, scheduler and workers) sampled every 50 ms. The store (default 10M
spots x 3,000 genes x 15 types at ~1k UMI/spot, ~600 non-zeros per spot, ~6e9 in all) is
written once into ``--data-dir`` and reused; ``--rewrite`` writes it again. The last
lines print the deconvolution's phases and its agreement with the synthetic truth.

Targets (issue 12): store write <= 20 min, deconvolution <= 20 min, peak RSS <= 4 GB, on 2
cores with 24 GiB.

    python benchmarks/bench_10m.py --data-dir /tmp/dfd-10m [--spots 10000000] [--depth 1000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from _measure import run_measured

from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.store import SpotStore


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--spots", type=int, default=10_000_000)
    parser.add_argument("--depth", type=float, default=1000.0)
    parser.add_argument("--rewrite", action="store_true", help="write the store again")
    args = parser.parse_args()
    tool = [sys.executable, "-m", "dflashdeconv.cli"]
    store_path = args.data_dir / f"synthetic_{args.spots}_{args.depth:.0f}.zarr"
    reference = args.data_dir / f"synthetic_{args.spots}_{args.depth:.0f}.reference.h5ad"
    args.data_dir.mkdir(parents=True, exist_ok=True)
    complete = (store_path / "uns" / "dflashdeconv_layout").exists() and reference.exists()
    if args.rewrite or not complete:
        shutil.rmtree(store_path, ignore_errors=True)
        run = run_measured([*tool, "synth", str(store_path), "--spots", str(args.spots),
                            "--depth", str(args.depth), "--reference", str(reference), "-q"])
        if run["returncode"]:
            raise SystemExit(f"synth failed:\n{run['stderr'][-3000:]}")
        store = SpotStore.open(store_path)
        print(f"store written: {store.n_spots:,} spots, {store.nnz / store.n_spots:.0f} "
              f"non-zeros per spot, {store.n_blocks} blocks: {run['seconds']:.1f} s, peak RSS "
              f"{run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    store = SpotStore.open(store_path)
    run = run_measured([*tool, "deconvolve", str(store_path), str(reference), "--overwrite",
                        "-q"])
    if run["returncode"]:
        raise SystemExit(f"deconvolve failed:\n{run['stderr'][-3000:]}")
    print(f"deconvolution: {run['seconds']:.1f} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({store.n_spots:,} spots, {store.n_blocks} blocks)", flush=True)
    from anndata.io import read_elem

    params = read_elem(store.root()["uns"]["flashdeconv_params"])
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in params["timings"].items())
          + f"; {params['n_iterations']} rounds, converged {params['converged']}")
    rows = slice(0, min(store.n_spots, 1_000_000))  # the truth of the first 1M spots
    estimate = read_results(store_path).to_numpy()[rows]
    truth = np.asarray(store.root()["obsm"]["proportions"][rows])
    print(f"agreement with the truth (first {rows.stop:,} spots): Pearson "
          f"{np.corrcoef(estimate.ravel(), truth.ravel())[0, 1]:.4f}")


if __name__ == "__main__":
    main()
