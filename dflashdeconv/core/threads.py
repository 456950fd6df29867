"""How many threads the numba kernels use.

numba starts one pool sized by the machine's cores, whatever a Dask worker's thread count
or a container's CPU quota: 16 single-threaded workers on 16 cores would run 256 kernel
threads, and a pod limited to 2 CPUs as many as its node has cores. :func:`limit` sets the
count for the calling thread (numba's setting is per thread, so it is set inside each task);
:func:`available_cores` is what the process may really use.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a container's cgroup allows this process (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``), rounded up; None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a container's quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cpu_quota()
    return max(1, min(cores or 1, quota or cores or 1))


def resolve(n_jobs: int | None) -> int:
    """scikit-learn's ``n_jobs``: None or -1 = every available core, -2 = all but one, a
    positive number = that many (at most the available cores)."""
    cores = available_cores()
    if n_jobs is None:
        return cores
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    return max(1, min(int(n_jobs), cores))


def current() -> int:
    """Threads the calling thread's kernels use now (what :func:`limit` set): also the
    ``workers=`` of scipy's k-d tree queries, so they follow the same budget."""
    import numba

    return numba.get_num_threads()


@contextlib.contextmanager
def limit(n_threads: int):
    """Kernels called by this thread inside the block use ``n_threads`` threads (at most
    numba's pool size); the previous setting is restored after it."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
