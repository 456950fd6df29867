"""Progress of Dask futures as a rich progress bar (works with any scheduler)."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def track(futures: Iterable, description: str, *, enabled: bool = True):
    """Wait for ``futures`` showing a progress bar; returns them in their original order.

    The first failed task's exception is raised as is (an
    :class:`~dflashdeconv.errors.InputError` raised on a worker arrives here unchanged).
    """
    from distributed import as_completed

    futures = list(futures)
    if not futures:
        return futures
    if not enabled:
        for future in as_completed(futures):
            future.result()
        return futures
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    from rich.console import Console

    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=len(futures))
        for future in as_completed(futures):
            future.result()
            bar.advance(task)
    return futures
