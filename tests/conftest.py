"""Shared fixtures: the real data in ../shared/data (skipped when absent) and small
synthetic tissues."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

# the worker environment connect() gives LocalClusters (see engine.cluster.WORKER_ENVIRON),
# for the clusters the tests start themselves: inherited by their worker processes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"


def shared_file(*parts) -> Path:
    """Path of a file in ../shared/data; the test is skipped when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def digest(*arrays) -> str:
    """Hash of arrays (dense or sparse) to prove that inputs were not modified."""
    h = hashlib.sha256()
    for a in arrays:
        if sparse.issparse(a):
            for part in (a.data, a.indices, a.indptr):
                h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def starmap():
    """(Y, X, coords, cell_types, truth) of the bundled STARmap data."""
    from dflashdeconv.datasets import starmap_cortex
    from dflashdeconv.io import prepare_data

    spots, reference = starmap_cortex()
    Y, X, coords, types, _ = prepare_data(spots, reference)
    truth = spots.obsm["proportions"][list(types)].to_numpy()
    return Y, X, coords, types, truth


@pytest.fixture(scope="session")
def small_tissue():
    """(spots, reference) AnnData of a 900-spot synthetic tissue with 8 types."""
    from dflashdeconv.datasets import synthetic

    return synthetic(n_spots=900, n_genes=1200, n_types=8, depth=800, seed=7,
                     markers_per_type=20)


@pytest.fixture(scope="session")
def small_problem(small_tissue):
    """(Y, X, coords, truth) arrays of ``small_tissue``."""
    from dflashdeconv.io import prepare_data

    spots, reference = small_tissue
    Y, X, coords, types, _ = prepare_data(spots, reference)
    return Y, X, coords, spots.obsm["proportions"][list(types)].to_numpy()


@pytest.fixture(scope="session")
def dask_client():
    """A real two-worker LocalCluster (processes) shared by the engine tests."""
    import logging

    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def store_digest(path) -> str:
    """Hash of every file of a store's input arrays (X, obsm/spatial, var, obs/_index)."""
    h = hashlib.sha256()
    root = Path(path)
    for part in ("X", "obsm/spatial", "var", "obs/_index", "obs/input_row"):
        for file in sorted((root / part).rglob("*")):
            if file.is_file():
                h.update(str(file.relative_to(root)).encode())
                h.update(file.read_bytes())
    return h.hexdigest()
