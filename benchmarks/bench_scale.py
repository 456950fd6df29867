"""Scale-out of the out-of-core engine: one store, LocalClusters of 1, 2, 4, ... workers.

A synthetic store (``SyntheticTissue``, default 300k spots x 3,000 genes x 15 types at
~3.9k UMI) is written once into ``--data-dir`` (its writing time is printed when it is
written) and reused. For each worker count (powers of two up to the cores this process
may use, single-threaded workers, memory split evenly, set up as the engine's own
LocalCluster sets its workers up: kernels and codecs on the worker's one thread) a
LocalCluster is started, then
``tl.deconvolve(store, reference, scheduler=client)`` is timed (cluster start excluded)
with its phases; the speed-up is against one worker, and the largest difference of the
proportions against the one-worker run is printed (the engine's results do not depend on
the number of workers). With each cluster the store is also written again into a scratch
copy, timed (``write s``: store writing against deconvolving). ``--report DIR`` saves Dask performance reports (task stream,
profile) of each run.

    python benchmarks/bench_scale.py --data-dir /tmp/dfd-bench [--spots 300000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from dflashdeconv import tl
from dflashdeconv.core.threads import available_cores
from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.store import SpotStore
from dflashdeconv.errors import InputError


def store_for(tissue: SyntheticTissue, folder: Path, client) -> SpotStore:
    path = folder / f"scale_{tissue.n_spots}_{tissue.depth:.0f}.zarr"
    try:
        return SpotStore.open(path)
    except InputError:
        pass
    start = time.perf_counter()
    store = tissue.write_store(path, scheduler=client)
    print(f"store written: {store.n_spots:,} spots, {store.nnz / store.n_spots:.0f} non-zeros "
          f"per spot, {store.n_blocks} blocks, {time.perf_counter() - start:.1f} s "
          f"({len(client.scheduler_info()['workers'])} workers)")
    return store


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--spots", type=int, default=300_000)
    parser.add_argument("--depth", type=float, default=3900.0)
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="worker counts (default: 1, 2, 4, ... up to the cores)")
    parser.add_argument("--report", type=Path, default=None,
                        help="folder for Dask performance reports (HTML)")
    args = parser.parse_args()
    from distributed import Client, LocalCluster, performance_report

    cores = available_cores()
    counts = args.workers or [n for n in (1, 2, 4, 8, 16, 32) if n <= cores]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    tissue = SyntheticTissue(n_spots=args.spots, n_genes=3000, n_types=15, depth=args.depth, seed=0)
    reference = tissue.reference()
    print(f"machine: {cores} cores available; worker counts {counts}")
    rows, first = [], None
    for n in counts:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=":0", silence_logs=logging.ERROR,
                          preload=["dflashdeconv.engine.worker_setup"]) as cluster, \
                Client(cluster) as client:
            store = store_for(tissue, args.data_dir, client)
            copy = args.data_dir / f"write_{n}.zarr"  # the same store written again, timed
            start = time.perf_counter()
            tissue.write_store(copy, scheduler=client, overwrite=True)
            written = time.perf_counter() - start
            shutil.rmtree(copy)
            report = (performance_report(filename=str(args.report / f"workers_{n}.html"))
                      if args.report else contextlib.nullcontext())
            if args.report:
                args.report.mkdir(parents=True, exist_ok=True)
            with report:
                start = time.perf_counter()
                summary = tl.deconvolve(store.path, reference, scheduler=client,
                                        key_added=f"w{n}", overwrite=True, progress=False)
                seconds = time.perf_counter() - start
        proportions = read_results(store.path, f"w{n}").to_numpy()
        first = proportions if first is None else first
        rows.append((n, seconds, written, summary["timings"],
                     float(np.abs(proportions - first).max())))
        print(f"{n:3d} workers: {seconds:6.1f} s (store written in {written:.1f} s)  " + ", ".join(
            f"{k} {v:.1f}" for k, v in summary["timings"].items()), flush=True)
    base = rows[0][1]
    print(f"\n{args.spots:,} spots at {args.depth:.0f} UMI, single-threaded workers")
    print(f"{'workers':>7} {'total s':>8} {'speed-up':>8} {'max diff':>9} {'write s':>8}"
          "  phases (s)")
    for n, seconds, written, timings, diff in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        print(f"{n:7d} {seconds:8.1f} {base / seconds:8.2f} {diff:9.1e} {written:8.1f}  {phases}")


if __name__ == "__main__":
    main()
