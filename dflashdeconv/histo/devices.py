"""Which worker and which torch device a histology task gets.

GPU workers are Dask workers that declare the resource ``GPU=1``
(:data:`~dflashdeconv.engine.cluster.GPU_RESOURCE`), one per GPU, each pinned to it by
``CUDA_VISIBLE_DEVICES``; tasks that want a GPU are submitted with ``resources={"GPU": 1}``
when such workers exist and run on any worker otherwise.
"""

from __future__ import annotations

import contextlib

from ..engine.cluster import GPU_RESOURCE


def gpu_workers(client) -> list[str]:
    """Addresses of the workers that declare a GPU resource."""
    info = client.scheduler_info()["workers"]
    return sorted(addr for addr, w in info.items() if w.get("resources", {}).get(GPU_RESOURCE, 0) > 0)


def gpu_task_options(client) -> dict:
    """``client.submit`` keyword arguments that send a task to a GPU worker when there is one."""
    return {"resources": {GPU_RESOURCE: 1}} if gpu_workers(client) else {}


def task_device() -> str:
    """Torch device for the task running in this worker: its GPU if the worker declares
    one and CUDA is usable, else ``"cpu"``.

    A worker is pinned to one GPU by ``CUDA_VISIBLE_DEVICES`` (one worker per GPU), so the
    device is always ``cuda:0`` within the worker.
    """
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        worker = get_worker()
        declares = worker.state.total_resources.get(GPU_RESOURCE, 0) > 0
        import torch

        if declares and torch.cuda.is_available():
            return "cuda:0"
    return "cpu"
