"""Where the work runs: a LocalCluster by default, an existing scheduler or Client otherwise.

GPU workers are ordinary Dask workers that declare the resource ``GPU=1``
(``dask worker ADDRESS --resources GPU=1``); tasks that want a GPU are submitted with
``resources={"GPU": 1}`` when such workers exist and run on any worker otherwise. The
default local cluster starts one such worker per visible CUDA GPU, pinned to it with
``CUDA_VISIBLE_DEVICES`` (as dask-cuda's LocalCUDACluster does), beside its CPU workers.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import psutil

from ..core.threads import available_cores, limit
from ..errors import InputError

#: Resource name that GPU workers declare.
GPU_RESOURCE = "GPU"

#: Environment of the worker processes a LocalCluster starts. numba's OpenMP layer
#: launches each parallel kernel in ~10 us with passive waiting but in ~8 ms with
#: libgomp's default spin-then-sleep policy on small machines (measured on 2 cores); block
#: tasks launch kernels thousands of times. libgomp reads it when it loads, so it is set
#: before the worker process starts (the deploy images set it too); a user's own wins.
WORKER_ENVIRON = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

#: Environment set before a LocalCluster's worker processes start (Dask's
#: ``distributed.nanny.pre-spawn-environ``: glibc reads it as the process starts). Dask sets
#: ``MALLOC_TRIM_THRESHOLD_`` there, which also freezes glibc's mmap threshold at 128 KiB:
#: every larger array is then mapped afresh and its pages faulted in, allocation after
#: allocation. A 64 MiB threshold lets them reuse freed heap memory (trimming still returns
#: it). On 2 cores: the ~4k-spot H&E pipeline 370 s -> 212 s (bench_stflow.py --timing),
#: the engine on 1M spots 63 s -> 57 s for ~0.16 GB more peak memory. A user's own value
#: wins; the deploy images set it too.
WORKER_PRE_SPAWN_ENVIRON = {
    "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(64 * 2 ** 20))}


def worker_threads_of(n_threads: int) -> int:
    """A worker's thread count bounded by the cores the process may use."""
    return max(1, min(n_threads, available_cores()))


def worker_threads() -> int:
    """Threads a task's kernels may use: the Dask worker's thread count (bounded by the
    cores the process may use), or every available core outside a worker."""
    try:
        from distributed import get_worker

        n_threads = get_worker().state.nthreads
    except (ImportError, ValueError):
        return available_cores()
    return worker_threads_of(n_threads)


def worker_task(function):
    """Run ``function`` with its numba kernels limited to :func:`worker_threads` (numba's
    thread count is per calling thread, so it is set inside the task)."""

    @functools.wraps(function)
    def task(*args, **kwargs):
        with limit(worker_threads()):
            return function(*args, **kwargs)

    return task


def _value(value):
    return value


def shared(client, value):
    """A future of ``value`` for many tasks to depend on: sent to the cluster once (not
    with every task) and, unlike scattered data, recomputed if the worker holding it is
    lost (the task that makes it keeps the value)."""
    return client.submit(_value, value, pure=False)


def local_cluster_options(n_workers: int | None = None, threads_per_worker: int | None = None,
                          memory_limit: int | str | None = None, extra_workers: int = 0) -> dict:
    """LocalCluster sizing from the machine: one single-threaded worker per core the
    process may use (its affinity and container quota; a task's kernels use its worker's
    threads) and the memory the machine has available, split between workers (and
    ``extra_workers`` GPU workers), with a quarter kept back for the client and the OS."""
    cores = available_cores()
    n_workers = n_workers or cores
    threads_per_worker = threads_per_worker or max(1, cores // n_workers)
    if memory_limit is None:
        memory_limit = int(psutil.virtual_memory().available * 0.75
                           / (n_workers + extra_workers))
    return {"n_workers": n_workers, "threads_per_worker": threads_per_worker,
            "memory_limit": memory_limit, "env": dict(WORKER_ENVIRON),
            "silence_logs": logging.ERROR, "preload": [f"{__package__}.worker_setup"]}


def visible_gpus() -> list[str]:
    """CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: that
    variable's list when it is set (empty, ``-1`` or ``NoDevFiles``: none), else the GPUs
    ``nvidia-smi -L`` lists (none without the NVIDIA driver). torch is not imported."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        entries = [e.strip() for e in declared.split(",") if e.strip()]
        if not entries or entries[0] in ("-1", "NoDevFiles"):
            return []
        return entries
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20,
                                 check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def _gpu_list(gpus) -> list[str]:
    """``gpus`` of :func:`connect` as device entries: None -> every visible GPU, an int ->
    the first n visible ones, a sequence -> those."""
    if gpus is None:
        return visible_gpus()
    if isinstance(gpus, bool) or (isinstance(gpus, int) and gpus < 0):
        raise InputError(f"gpus must be None, a non-negative number or a list of device "
                         f"ids, got {gpus!r}")
    if isinstance(gpus, int):
        visible = visible_gpus()
        if gpus > len(visible):
            raise InputError(f"gpus={gpus} but {len(visible)} GPU(s) are visible "
                             f"({visible or 'no NVIDIA driver / CUDA_VISIBLE_DEVICES'})")
        return visible[:gpus]
    return [str(g) for g in gpus]


def _local_cluster(options: dict, gpus: list[str]):
    """A LocalCluster's scheduler and CPU workers, plus one single-threaded worker per GPU
    that declares ``GPU=1`` and sees only its GPU."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    if not gpus:
        return LocalCluster(dashboard_address=":0", **options)
    options = dict(options)
    n_workers = options.pop("n_workers")
    silence_logs = options.pop("silence_logs")
    worker = {"nthreads": options.pop("threads_per_worker"), "host": "127.0.0.1",
              "memory_limit": options.pop("memory_limit"), "env": options.pop("env"),
              "preload": options.pop("preload"), "silence_logs": silence_logs}
    options.pop("processes")
    if options:
        raise InputError(f"options {sorted(options)} are not supported with GPU workers; "
                         "pass gpus=0 for a CPU-only LocalCluster")
    workers = {f"cpu-{i}": {"cls": Nanny, "options": worker} for i in range(n_workers)}
    for gpu in gpus:
        workers[f"gpu-{gpu}"] = {"cls": Nanny, "options": {
            **worker, "nthreads": 1, "resources": {GPU_RESOURCE: 1},
            "env": {**worker["env"], "CUDA_VISIBLE_DEVICES": gpu}}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=silence_logs,
                       name="dflashdeconv")


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
            gpus=None, quiet: bool = False, **cluster_kwargs) -> Connection:
    """A Dask client for the engine.

    ``scheduler`` may be a ``distributed.Client`` (used as is), a scheduler address such
    as ``tcp://10.0.0.5:8786`` (connected to) or None: the address in Dask's
    ``scheduler-address`` setting (``DASK_SCHEDULER_ADDRESS``, set by the Dask operator in
    a DaskJob) if any, else a LocalCluster sized from the machine, closed with the
    connection. The local cluster adds one GPU worker per GPU of ``gpus`` (None: every
    visible CUDA GPU, see :func:`visible_gpus`; a number; a list of device ids; 0: none)
    beside its CPU workers; its worker processes start with :data:`WORKER_ENVIRON` and
    :data:`WORKER_PRE_SPAWN_ENVIRON`. The dashboard address is printed unless ``quiet``.
    """
    import dask
    from distributed import Client

    if isinstance(scheduler, Client):
        return Connection(scheduler, owns_cluster=False)
    scheduler = scheduler or dask.config.get("scheduler-address", None)
    if scheduler is not None:
        client = Client(scheduler)
        owns, owns_client = False, True
    else:
        processes = cluster_kwargs.get("processes", True)
        if not processes and gpus:
            raise InputError("GPU workers are processes: pass processes=True or gpus=0")
        devices = _gpu_list(gpus) if processes else []
        options = local_cluster_options(n_workers, threads_per_worker, memory_limit,
                                        extra_workers=len(devices))
        options.update(cluster_kwargs, processes=processes)
        if not processes:
            options.pop("env")  # thread workers share this process's environment
        # the Nannies also write their pre-spawn environment into this process's: put
        # ours back, so that clusters the caller starts later are not changed by it
        saved = {key: os.environ.get(key) for key in WORKER_PRE_SPAWN_ENVIRON}
        try:
            with dask.config.set({"distributed.nanny.pre-spawn-environ": {
                    **dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                    **WORKER_PRE_SPAWN_ENVIRON}}):
                cluster = _local_cluster(options, devices)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
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
                      "--preload", f"{__package__}.worker_setup",
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
