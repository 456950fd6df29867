"""Out-of-core engine at scale, side by side with the in-memory path and flashdeconv 0.2.0.

Scenarios (synthetic tissues, 3,000 genes, 15 types; stores are written once and reused
from --data-dir):

- 1M spots at ~3.9k UMI/spot (~1.3e9 non-zeros): engine end to end from the store
  (target <= 150 s, peak RSS of client + workers <= 4 GB) and the in-memory estimator on
  the same rows (same proportions). flashdeconv 0.2.0 would need ~48 GB: not run.
- 1M spots at ~390 UMI/spot: engine vs flashdeconv 0.2.0 on the same data (target >= 3x
  faster at <= 1/4 of its peak memory).
- 100k spots at ~3.9k UMI: linear growth, time(1M) / time(100k) <= 11.

    python benchmarks/bench_engine.py [--data-dir DIR] [--skip-reference] [--skip-memory]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
from _inputs import save_inputs
from _measure import run_report
from _refenv import reference_command

from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.store import SpotStore
from dflashdeconv.io import load_reference
from dflashdeconv.metrics import pearson, rmse

HERE = Path(__file__).resolve().parent


def ensure_store(folder: Path, n_spots: int, depth: float):
    path = folder / f"synthetic_{n_spots}_{int(depth)}.zarr"
    tissue = SyntheticTissue(n_spots=n_spots, n_genes=3000, n_types=15, depth=depth, seed=0)
    reference = path.with_suffix(".reference.h5ad")
    if not (path / "uns" / "dflashdeconv_layout").exists():
        if path.exists():
            import shutil

            shutil.rmtree(path)
        start = time.perf_counter()
        tissue.write_store(path)
        tissue.reference().write_h5ad(reference)
        print(f"  wrote {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return SpotStore.open(path), reference


def truth_of(store):
    return np.asarray(store.root()["obsm"]["proportions"][...])


def phases(report):
    return ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=Path(tempfile.gettempdir()) / "dflashdeconv-bench",
                        type=Path)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--inner-sweeps", type=int, default=1)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    runner = [sys.executable, HERE / "engine_runner.py"]
    engine_args = ["--inner-sweeps", args.inner_sweeps]
    rows = []

    print("1M spots x 3,000 genes x 15 types at ~3.9k UMI/spot", flush=True)
    big, big_ref = ensure_store(args.data_dir, 1_000_000, 3900)
    print(f"  {big.nnz:.3g} non-zeros, {big.n_blocks} blocks", flush=True)
    engine_1m = run_report([*runner, "engine", big.path, big_ref, *engine_args])
    P_engine = read_results(big.path).to_numpy()
    truth = truth_of(big)
    rows.append(("engine, 1M @ 3.9k", engine_1m, P_engine, truth))
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            memory = run_report([*runner, "memory", big.path, big_ref, Path(tmp) / "p.npy"])
            P_memory = np.load(Path(tmp) / "p.npy")
        rows.append(("in-memory, 1M @ 3.9k", memory, P_memory, truth))
        print(f"  engine vs in-memory: max |difference| = {np.abs(P_engine - P_memory).max():.2e}")

    print("100k spots at ~3.9k UMI/spot", flush=True)
    small, small_ref = ensure_store(args.data_dir, 100_000, 3900)
    engine_100k = run_report([*runner, "engine", small.path, small_ref, *engine_args])
    rows.append(("engine, 100k @ 3.9k", engine_100k, read_results(small.path).to_numpy(),
                 truth_of(small)))

    print("1M spots at ~390 UMI/spot", flush=True)
    shallow, shallow_ref = ensure_store(args.data_dir, 1_000_000, 390)
    shallow_truth = truth_of(shallow)
    engine_390 = run_report([*runner, "engine", shallow.path, shallow_ref, *engine_args])
    rows.append(("engine, 1M @ 390", engine_390, read_results(shallow.path).to_numpy(),
                 shallow_truth))
    ref_390 = None
    if not args.skip_reference:
        with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
            X_all = shallow.root()["X"]
            from scipy import sparse

            order = np.argsort(shallow.input_rows())
            Y = sparse.csr_matrix((X_all["data"][...], X_all["indices"][...], X_all["indptr"][...]),
                                  shape=(shallow.n_spots, shallow.n_genes))[order]
            X, _, _ = load_reference(ad.read_h5ad(shallow_ref))
            save_inputs(Path(tmp) / "inputs.npz", Y, X, shallow.coords()[order])
            del Y
            ref = run_report(reference_command(Path(tmp) / "inputs.npz", [{}],
                                               Path(tmp) / "ref.npz", measure=True))
            fit = ref["fits"][0]
            ref_390 = {"seconds": fit["seconds"], "phases": fit["phases"],
                       "n_iterations": fit["n_iterations"], "peak_gb": ref["peak_gb"],
                       "wall": ref["wall"]}
            P_ref = np.empty((shallow.n_spots, 15))
            P_ref[order] = np.load(Path(tmp) / "ref.npz")["proportions_0"]
        rows.append(("flashdeconv 0.2.0, 1M @ 390", ref_390, P_ref, shallow_truth))

    print()
    print(f"{'run':30} {'time s':>8} {'wall s':>8} {'peak GB':>8} {'iters':>6} {'pearson':>8} "
          f"{'rmse':>7}  phases (s)")
    for name, report, P, truth in rows:
        print(f"{name:30} {report['seconds']:8.1f} {report['wall']:8.1f} {report['peak_gb']:8.2f} "
              f"{report['n_iterations']:6d} {pearson(P, truth):8.4f} {rmse(P, truth):7.4f}  "
              f"{phases(report)}")
    print()
    print(f"1M @ 3.9k: {engine_1m['wall']:.0f} s end to end (target <= 150), peak "
          f"{engine_1m['peak_gb']:.2f} GB (target <= 4)")
    print(f"linear growth: time(1M) / time(100k) = {engine_1m['wall'] / engine_100k['wall']:.1f} "
          "(target <= 11)")
    if ref_390:
        print(f"1M @ 390: {ref_390['wall'] / engine_390['wall']:.1f}x faster than flashdeconv 0.2.0 "
              f"(target >= 3), memory {engine_390['peak_gb'] / ref_390['peak_gb']:.2f} of its peak "
              "(target <= 0.25)")


if __name__ == "__main__":
    main()
