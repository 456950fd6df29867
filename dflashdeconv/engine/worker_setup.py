"""Preloaded by the workers of the LocalClusters the engine starts (``preload=``).

A terminal sends Ctrl-C (SIGINT) to the whole process group: without this each worker
process would print its own traceback. Workers ignore it; the client handles the
interrupt and closes the cluster, which stops them.
"""

import signal
import threading


def dask_setup(worker) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
