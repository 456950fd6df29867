"""Preloaded by the workers of the LocalClusters the engine starts (``preload=``).

A terminal sends Ctrl-C (SIGINT) to the whole process group: without this each worker
process would print its own traceback. Workers ignore it; the client handles the
interrupt and closes the cluster, which stops them.

A worker's codec threads follow its thread count, as its numba kernels do
(:func:`~dflashdeconv.engine.cluster.worker_threads`): Blosc and zarr's thread pool would
otherwise decompress with every core in each worker, so one "single-threaded" worker
already used the whole machine and N workers ran N x cores codec threads.
"""

import signal
import threading


def limit_codec_threads(n_threads: int) -> None:
    """Blosc's and zarr's codec threads of this process, at most ``n_threads``."""
    import numcodecs.blosc
    import zarr

    numcodecs.blosc.set_nthreads(n_threads)
    zarr.config.set({"threading.max_workers": n_threads})


def dask_setup(worker) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .cluster import worker_threads_of

    limit_codec_threads(worker_threads_of(worker.state.nthreads))
