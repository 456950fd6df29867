"""In-memory speed and memory against flashdeconv 0.2.0, side by side on the same data.

Synthetic tissue: 100k spots x 3,000 genes x 15 types at ~3.9k UMI per spot (CSR float32),
default parameters, and dflashdeconv again with ``refine="auto"``. Each fit runs in its own
process (the reference in its venv, see _refenv.py); the peak RSS of each process tree
includes the loaded data. Targets: >= 3x faster at <= 1/2 of the reference's peak memory
with the same accuracy; ``refine="auto"`` at most 2x the default fit's time and 1.2x its
peak memory.

    python benchmarks/bench_core.py [--spots 100000] [--depth 3900]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _inputs import save_inputs
from _measure import run_report
from _refenv import reference_command

from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.io import load_reference
from dflashdeconv.metrics import pearson, rmse

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=3000)
    parser.add_argument("--types", type=int, default=15)
    parser.add_argument("--depth", type=float, default=3900.0)
    args = parser.parse_args()
    tissue = SyntheticTissue(n_spots=args.spots, n_genes=args.genes, n_types=args.types,
                             depth=args.depth, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        Y = tissue.counts()
        X, _, _ = load_reference(tissue.reference())
        truth = tissue.proportions()
        save_inputs(tmp / "inputs.npz", Y, X, tissue.coords())
        print(f"data: {args.spots} spots x {args.genes} genes x {args.types} types, "
              f"{Y.nnz / args.spots:.0f} non-zeros and {Y.sum() / args.spots:.0f} UMI per spot "
              f"({time.perf_counter() - t0:.0f} s to generate)")
        del Y
        ref = run_report(reference_command(tmp / "inputs.npz", [{}], tmp / "ref.npz",
                                           measure=True))
        ours = run_report([sys.executable, HERE / "ours_runner.py", tmp / "inputs.npz",
                           json.dumps({}), tmp / "ours.npy"])
        refined = run_report([sys.executable, HERE / "ours_runner.py", tmp / "inputs.npz",
                              json.dumps({"refine": "auto"}), tmp / "refined.npy"])
        ref_fit, our_fit = ref["fits"][0], ours
        P_ref = np.load(tmp / "ref.npz")["proportions_0"]
        P_ours = np.load(tmp / "ours.npy")
        P_refined = np.load(tmp / "refined.npy")
    rows = [("flashdeconv 0.2.0", ref_fit, ref, P_ref), ("dflashdeconv", our_fit, ours, P_ours),
            ("  refine='auto'", refined, refined, P_refined)]
    print(f"{'package':18} {'fit s':>7} {'iters':>6} {'peak RSS GB':>12} {'pearson':>8} {'rmse':>7}  phases (s)")
    for name, fit, run, P in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in fit["phases"].items())
        print(f"{name:18} {fit['seconds']:7.2f} {fit['n_iterations']:6d} "
              f"{run['peak_gb']:12.2f} {pearson(P, truth):8.4f} {rmse(P, truth):7.4f}  {phases}")
    print(f"speed-up: {ref_fit['seconds'] / our_fit['seconds']:.1f}x (target >= 3x); "
          f"memory: {ours['peak_gb'] / ref['peak_gb']:.2f} of the reference's "
          f"peak (target <= 0.5); max |ours - reference| = {np.abs(P_ours - P_ref).max():.2e}")
    print(f"refine='auto': {refined['seconds'] / ours['seconds']:.2f}x the default fit's time "
          f"(target <= 2), {refined['peak_gb'] / ours['peak_gb']:.2f}x its peak memory "
          "(target <= 1.2)")


if __name__ == "__main__":
    main()
