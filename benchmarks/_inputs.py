"""The npz hand-over between a benchmark and its runners (ours and the reference's venv):
numpy and scipy only, so that both environments can import it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import sparse


def save_inputs(path: Path, Y, X, coords) -> None:
    """Y (CSR) as its parts, X and coords as arrays."""
    np.savez_compressed(path, Y_data=Y.data, Y_indices=Y.indices, Y_indptr=Y.indptr,
                        Y_shape=np.array(Y.shape), X=X, coords=coords)


def load_inputs(path: Path):
    """(Y, X, coords) as written by ``save_inputs``."""
    d = np.load(path)
    Y = sparse.csr_matrix((d["Y_data"], d["Y_indices"], d["Y_indptr"]), shape=tuple(d["Y_shape"]))
    return Y, d["X"], d["coords"]
