"""Fit dflashdeconv on npz inputs (the counterpart of reference_runner.py).

usage: ours_runner.py INPUTS.npz CONFIG_JSON OUTPUT.npz
Prints one JSON line: fit seconds, per-phase seconds, iterations.
"""

import json
import sys
import time

import numpy as np
from _inputs import load_inputs

from dflashdeconv import FlashDeconv


def main():
    inputs, config, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    Y, X, coords = load_inputs(inputs)
    # compile/load the numba kernels on a tiny problem first (cached on disk after one run)
    FlashDeconv().fit(Y[:300], X, coords[:300])
    start = time.perf_counter()
    model = FlashDeconv(**config).fit(Y, X, coords)
    elapsed = time.perf_counter() - start
    np.save(output, model.proportions_)
    print(json.dumps({"seconds": elapsed, "phases": model.info_["timings"],
                      "n_iterations": int(model.info_["n_iterations"])}))


if __name__ == "__main__":
    main()
