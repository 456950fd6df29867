"""Runs one deconvolution for bench_engine.py and prints a JSON line.

usage: engine_runner.py engine STORE REFERENCE.h5ad [--inner-sweeps N]
       engine_runner.py memory STORE REFERENCE.h5ad OUT.npy   (in-memory FlashDeconv on the
                                                              store's rows, for comparison)
"""

import json
import sys
import time

import anndata as ad
import numpy as np
from scipy import sparse

from dflashdeconv import FlashDeconv
from dflashdeconv.engine.run import deconvolve_store
from dflashdeconv.engine.store import SpotStore
from dflashdeconv.io import load_reference


def main():
    mode, store_path, reference = sys.argv[1], sys.argv[2], sys.argv[3]
    X, types, genes = load_reference(ad.read_h5ad(reference))
    if mode == "engine":
        inner = int(sys.argv[sys.argv.index("--inner-sweeps") + 1]) if "--inner-sweeps" in sys.argv else 1
        start = time.perf_counter()
        summary = deconvolve_store(store_path, X, types, genes, overwrite=True,
                                   inner_sweeps=inner, progress=False)
        print(json.dumps({"seconds": time.perf_counter() - start, "phases": summary["timings"],
                          "n_iterations": summary["n_iterations"]}))
        return
    store = SpotStore.open(store_path)
    X_all = store.root()["X"]
    Y = sparse.csr_matrix((X_all["data"][...], X_all["indices"][...], X_all["indptr"][...]),
                          shape=(store.n_spots, store.n_genes))
    coords = store.coords()
    keys = store.input_rows()
    # the in-memory path in the source order (ties of the k-NN graph break by source row)
    order = np.argsort(keys)
    start = time.perf_counter()
    model = FlashDeconv().fit(Y[order], X, coords[order])
    elapsed = time.perf_counter() - start
    proportions = np.empty_like(model.proportions_)
    proportions[order] = model.proportions_
    np.save(sys.argv[4], proportions)
    print(json.dumps({"seconds": elapsed, "phases": model.info_["timings"],
                      "n_iterations": model.info_["n_iterations"]}))


if __name__ == "__main__":
    main()
