"""Where the work runs: a LocalCluster by default, an existing scheduler or Client otherwise.

GPU workers are ordinary Dask workers that declare the resource ``GPU=1``
(``dask worker ADDRESS --resources GPU=1``); tasks that want a GPU are submitted with
``resources={"GPU": 1}`` when such workers exist and run on any worker otherwise.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

import psutil

from ..core.threads import available_cores, limit

#: Resource name that GPU workers declare.
GPU_RESOURCE = "GPU"

#: Environment of the worker processes a LocalCluster starts. numba's OpenMP layer
#: launches each parallel kernel in ~10 us with passive waiting but in ~8 ms with
#: libgomp's default spin-then-sleep policy on small machines (measured on 2 cores); block
#: tasks launch kernels thousands of times. libgomp reads it when it loads, so it is set
#: before the worker process starts (the deploy images set it too); a user's own wins.
WORKER_ENVIRON = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def worker_threads() -> int:
    """Threads a task's kernels may use: the Dask worker's thread count (bounded by the
    cores the process may use), or every available core outside a worker."""
    try:
        from distributed import get_worker

        n_threads = get_worker().state.nthreads
    except (ImportError, ValueError):
        return available_cores()
    return max(1, min(n_threads, available_cores()))


def worker_task(function):
    """Run ``function`` with its numba kernels limited to :func:`worker_threads` (numba's
    thread count is per calling thread, so it is set inside the task)."""

    @functools.wraps(function)
    def task(*args, **kwargs):
        with limit(worker_threads()):
            return function(*args, **kwargs)

    return task


def local_cluster_options(n_workers: int | None = None, threads_per_worker: int | None = None,
                          memory_limit: int | str | None = None) -> dict:
    """LocalCluster sizing from the machine: one single-threaded worker per core the
    process may use (its affinity and container quota; a task's kernels use its worker's
    threads) and the memory the machine has available, split between workers, with a
    quarter kept back for the client and the OS."""
    cores = available_cores()
    n_workers = n_workers or cores
    threads_per_worker = threads_per_worker or max(1, cores // n_workers)
    if memory_limit is None:
        memory_limit = int(psutil.virtual_memory().available * 0.75 / n_workers)
    return {"n_workers": n_workers, "threads_per_worker": threads_per_worker,
            "memory_limit": memory_limit, "env": dict(WORKER_ENVIRON)}


@dataclass
class Connection:
    """A Client and what this process created, and so must close: the client (connected to
    an address) and the cluster (a LocalCluster)."""

    client: object
    owns_cluster: bool
    owns_client: bool = False

    def close(self) -> None:
        if self.owns_cluster:
            cluster = self.client.cluster
            self.client.close()
            if cluster is not None:
                cluster.close()
        elif self.owns_client:
            self.client.close()

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.close()


def connect(scheduler=None, *, n_workers=None, threads_per_worker=None, memory_limit=None,
            quiet: bool = False, **cluster_kwargs) -> Connection:
    """A Dask client for the engine.

    ``scheduler`` may be a ``distributed.Client`` (used as is), a scheduler address such
    as ``tcp://10.0.0.5:8786`` (connected to) or None: the address in Dask's
    ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``, set by the Dask operator in
    a DaskJob) if any, else a LocalCluster sized from the machine, closed with the
    connection. The dashboard address is printed unless ``quiet``.
    """
    import dask
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return Connection(scheduler, owns_cluster=False)
    scheduler = scheduler or dask.config.get("scheduler-address", None)
    if scheduler is not None:
        client = Client(scheduler)
        owns, owns_client = False, True
    else:
        options = local_cluster_options(n_workers, threads_per_worker, memory_limit)
        options.update(cluster_kwargs)
        options.setdefault("processes", True)
        if not options["processes"]:
            options.pop("env")  # thread workers share this process's environment
        cluster = LocalCluster(dashboard_address=":0", **options)
        client = Client(cluster)
        owns, owns_client = True, True
    if not quiet:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
    return Connection(client, owns_cluster=owns, owns_client=owns_client)


def kube_cluster_spec(name: str, image: str, *, n_workers: int = 2, worker_memory: str = "8Gi",
                      worker_cpu: str = "2", env: dict | None = None, secret: str | None = None) -> dict:
    """DaskCluster manifest (Dask operator) for a dflashdeconv cluster: single-threaded
    workers with a memory limit matching their pods, object-store credentials from a
    Secret. Needs the ``kubernetes`` extra (``dask-kubernetes``)."""
    from dask_kubernetes.operator import make_cluster_spec

    resources = {"requests": {"cpu": worker_cpu, "memory": worker_memory},
                 "limits": {"cpu": worker_cpu, "memory": worker_memory}}
    spec = make_cluster_spec(name=name, image=image, n_workers=n_workers, resources=resources,
                             env={"NUMBA_CACHE_DIR": "/tmp/numba-cache", **(env or {})})
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] = ["dask-worker", "--name", "$(DASK_WORKER_NAME)", "--nthreads", "1",
                      "--memory-limit", worker_memory.replace("Gi", "GiB"), "--dashboard",
                      "--dashboard-address", "8788"]
    if secret:
        for role in ("scheduler", "worker"):
            for container in spec["spec"][role]["spec"]["containers"]:
                container["envFrom"] = [{"secretRef": {"name": secret}}]
    return spec


def kube_cluster(name: str, image: str, **options):
    """Start a dask-kubernetes ``KubeCluster`` from :func:`kube_cluster_spec` (needs the
    ``kubernetes`` extra and a cluster running the Dask operator)."""
    from dask_kubernetes.operator import KubeCluster

    return KubeCluster(custom_cluster_spec=kube_cluster_spec(name, image, **options))
