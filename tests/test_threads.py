"""Kernel threads follow the worker's thread count, the container's CPU quota and n_jobs."""

from __future__ import annotations

import logging

import numba
import numpy as np
import pytest

from dflashdeconv import FlashDeconv
from dflashdeconv.core import threads
from dflashdeconv.engine.cluster import local_cluster_options, worker_task


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
