"""Parity with the reference package flashdeconv 0.2.0, mode by mode, side by side.

For the STARmap data and a synthetic fixture, fits every mode (3 preprocessings x 2 gene
weightings x knn/radius graphs) with both packages at a tight tolerance (tol=1e-7, where
both reach the optimum) and at the default tol=1e-4, and prints the largest difference in
proportions. With ``--write`` it pins the reference's tight-tolerance proportions and gene
selections in ``tests/data/parity_reference.npz`` (and the synthetic inputs in
``tests/data/parity_synthetic_inputs.npz``) for ``tests/test_parity.py``.

    python benchmarks/parity.py [--write]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
from _inputs import save_inputs
from _refenv import run_reference
from scipy import sparse

from dflashdeconv import FlashDeconv
from dflashdeconv.datasets import SyntheticTissue, starmap_cortex
from dflashdeconv.io import load_reference, prepare_data

TEST_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
TIGHT, DEFAULT = 1e-7, 1e-4
MAX_ITER = 100_000


def modes(radius: float) -> list[dict]:
    """The 12 model configurations compared (tol and max_iter added per run)."""
    out = []
    for pre, weighting, graph in itertools.product(("log_cpm", "pearson", "raw"),
                                                   ("expected", "countsketch"),
                                                   ("knn", "radius")):
        out.append({"preprocess": pre, "gene_weighting": weighting, "spatial_method": graph,
                    "radius": radius if graph == "radius" else None})
    return out


def starmap_inputs():
    spots, reference = starmap_cortex()
    Y, X, coords, _, _ = prepare_data(spots, reference)
    return sparse.csr_matrix(Y), X, np.asarray(coords, dtype=np.float64)


def synthetic_inputs():
    tissue = SyntheticTissue(n_spots=400, n_genes=2500, n_types=8, depth=800, seed=11,
                             markers_per_type=25)
    Y = tissue.counts().astype(np.int32)  # integer counts: same arithmetic in both packages
    X, _, _ = load_reference(tissue.reference())
    return sparse.csr_matrix(Y), X, tissue.coords()


FIXTURES = {"starmap": (starmap_inputs, 800.0), "synthetic": (synthetic_inputs, 1.5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="pin the reference values in tests/data")
    args = parser.parse_args()
    pinned = {}
    worst_tight = 0.0
    print(f"{'fixture':10} {'mode':30} {'ref it':>7} {'our it':>7} {'|d| tol=1e-7':>13} "
          f"{'|d| tol=1e-4':>13} {'ref@1e-4 vs opt':>16} {'ours@1e-4 vs opt':>17}")
    for name, (make, radius) in FIXTURES.items():
        Y, X, coords = make()
        configs = modes(radius)
        runs = [dict(c, tol=tol, max_iter=MAX_ITER) for c in configs for tol in (TIGHT, DEFAULT)]
        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / "inputs.npz"
            save_inputs(inputs, Y, X, coords)
            report = run_reference(inputs, runs, Path(tmp) / "out.npz")
            ref = dict(np.load(Path(tmp) / "out.npz"))
        if name == "synthetic" and args.write:
            save_inputs(TEST_DATA / "parity_synthetic_inputs.npz", Y, X, coords)
        for i, config in enumerate(configs):
            label = f"{config['preprocess']}/{config['gene_weighting']}/{config['spatial_method']}"
            ours = {}
            iterations = {}
            for tol in (TIGHT, DEFAULT):
                model = FlashDeconv(**dict(config, tol=tol, max_iter=MAX_ITER)).fit(Y, X, coords)
                ours[tol] = model.proportions_
                iterations[tol] = model.info_["n_iterations"]
                if tol == TIGHT:
                    assert np.array_equal(model.gene_idx_, ref[f"gene_idx_{2 * i}"]), label
            ref_tight, ref_default = ref[f"proportions_{2 * i}"], ref[f"proportions_{2 * i + 1}"]
            d_tight = np.abs(ours[TIGHT] - ref_tight).max()
            worst_tight = max(worst_tight, d_tight)
            print(f"{name:10} {label:30} {report['fits'][2 * i + 1]['n_iterations']:7d} "
                  f"{iterations[DEFAULT]:7d} {d_tight:13.2e} "
                  f"{np.abs(ours[DEFAULT] - ref_default).max():13.2e} "
                  f"{np.abs(ref_default - ref_tight).max():16.2e} "
                  f"{np.abs(ours[DEFAULT] - ref_tight).max():17.2e}")
            pinned[f"{name}/{label}/proportions"] = ref_tight.astype(np.float32)
            pinned[f"{name}/{label}/gene_idx"] = ref[f"gene_idx_{2 * i}"].astype(np.int32)
            pinned[f"{name}/{label}/lambda"] = np.array(report["fits"][2 * i]["lambda"])
    print(f"largest difference at tol=1e-7 over all modes: {worst_tight:.2e} (target < 1e-4)")
    if args.write:
        np.savez_compressed(TEST_DATA / "parity_reference.npz", **pinned)
        print(f"pinned {len(pinned) // 3} modes in {TEST_DATA / 'parity_reference.npz'}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
