"""Kernel threads follow the worker's thread count, the container's CPU quota and n_jobs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from dflashdeconv import FlashDeconv
from dflashdeconv.core import threads
from dflashdeconv.engine.cluster import connect, local_cluster_options, worker_task


@worker_task
def kernel_threads() -> int:
    return threads.current()


def test_cgroup_quota_bounds_the_cores(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cpu_quota(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cpu_quota(tmp_path) is None
    monkeypatch.setattr(threads, "cpu_quota", lambda: 1)
    assert threads.available_cores() == 1
    assert local_cluster_options()["n_workers"] == 1


def test_n_jobs_follows_scikit_learn(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert [threads.resolve(n) for n in (None, -1, -2, 1, 3, 64)] == [8, 8, 7, 1, 3, 8]


def test_limit_sets_and_restores_the_calling_threads_count():
    before = numba.get_num_threads()
    with threads.limit(1):
        assert threads.current() == 1
    assert numba.get_num_threads() == before


def test_in_memory_fit_uses_n_jobs_with_the_same_result(small_problem):
    Y, X, coords, _ = small_problem
    one = FlashDeconv(n_jobs=1).fit(Y, X, coords).proportions_
    every = FlashDeconv().fit(Y, X, coords).proportions_
    assert np.array_equal(one, every)
    with pytest.raises(ValueError, match="'n_jobs' parameter"):
        FlashDeconv(n_jobs=0).fit(Y, X, coords)


@pytest.mark.parametrize("threads_per_worker", [1, 2])
def test_a_tasks_kernels_use_its_workers_threads(threads_per_worker):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=threads_per_worker, processes=True,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        used = client.submit(kernel_threads, pure=False).result()
    assert used == min(threads_per_worker, threads.available_cores())


def _codec_threads():
    import numcodecs.blosc
    import zarr

    return numcodecs.blosc.get_nthreads(), zarr.config.get("threading.max_workers")


@pytest.mark.parametrize("threads_per_worker", [1, 2])
def test_the_default_clusters_workers_decompress_with_their_own_threads(threads_per_worker):
    """Blosc and zarr's pool would otherwise use every core in every worker."""
    from dflashdeconv.engine.cluster import connect

    with connect(None, n_workers=1, threads_per_worker=threads_per_worker, gpus=0,
                 quiet=True) as client:
        blosc, pool = client.submit(_codec_threads, pure=False).result()
    expected = min(threads_per_worker, threads.available_cores())
    assert (blosc, pool) == (expected, expected)


def _served_by_fresh_mapping(n_bytes: int) -> bool:
    """Whether glibc's malloc serves ``n_bytes`` by mapping fresh pages (its chunk header's
    IS_MMAPPED bit) rather than from its heap."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    address = libc.malloc(n_bytes)
    try:
        return bool(ctypes.c_size_t.from_address(address - ctypes.sizeof(ctypes.c_size_t)).value & 2)
    finally:
        libc.free(ctypes.c_void_p(address))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_local_cluster_workers_reuse_heap_memory_for_large_arrays():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which pins glibc's mmap threshold at 128 KiB
    (a process started so maps every 1 MiB array afresh); connect()'s workers start with a
    64 MiB threshold and serve it from the heap."""
    probe = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             "from test_threads import _served_by_fresh_mapping as f; print(f(2 ** 20))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    dask_default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  env={**env, "MALLOC_TRIM_THRESHOLD_": "65536"}, check=True)
    assert dask_default.stdout.strip() == "True"
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    with connect(n_workers=1, threads_per_worker=1, quiet=True) as client:
        assert list(client.run(_served_by_fresh_mapping, 2 ** 20).values()) == [False]
        environ = client.run(lambda: dict(os.environ))
        assert os.environ.get("MALLOC_MMAP_THRESHOLD_") == before  # this process's: as it was
    [environ] = environ.values()
    assert environ["MALLOC_MMAP_THRESHOLD_"] == str(64 * 2 ** 20)
    assert environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # Dask's trimming is kept
