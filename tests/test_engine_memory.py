"""Memory is bounded by the block size, not by the data: a store several times larger than
a worker's memory limit runs without any worker being restarted or exceeding its limit."""

import logging
import os
import threading
import time

import numpy as np
import psutil
import pytest

from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.run import deconvolve_store
from dflashdeconv.io import load_reference

LIMIT = 550 * 2**20


@pytest.mark.slow
def test_store_larger_than_worker_memory(tmp_path):
    from distributed import Client, LocalCluster

    tissue = SyntheticTissue(n_spots=150_000, n_genes=3000, n_types=10, depth=3900, seed=2)
    store = tissue.write_store(tmp_path / "big.zarr", chunk_rows=2048)
    counts_bytes = store.nnz * (4 + 4) + 8 * (store.n_spots + 1)  # X in memory, uncompressed
    assert counts_bytes > 2.5 * LIMIT
    X, types, genes = load_reference(tissue.reference())
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=LIMIT,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        peak = {addr: 0 for addr in pids}
        done = threading.Event()

        def watch():
            while not done.is_set():
                for addr, pid in pids.items():
                    try:
                        peak[addr] = max(peak[addr], psutil.Process(pid).memory_info().rss)
                    except psutil.NoSuchProcess:
                        peak[addr] = float("inf")
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        summary = deconvolve_store(store.path, X, types, genes, scheduler=client, progress=False)
        done.set()
        watcher.join()
        assert client.run(os.getpid) == pids  # no worker was restarted
    assert summary["converged"]
    print(f"X uncompressed {counts_bytes / 2**20:.0f} MiB; worker limit {LIMIT / 2**20:.0f} MiB; "
          f"worker peaks {[f'{p / 2**20:.0f} MiB' for p in peak.values()]}")
    assert max(peak.values()) < LIMIT, {a: f"{p / 2**20:.0f} MiB" for a, p in peak.items()}
    estimate = read_results(store.path).to_numpy()
    truth = np.asarray(store.root()["obsm"]["proportions"][...])
    assert np.corrcoef(estimate.ravel(), truth.ravel())[0, 1] > 0.95
