"""Progress of Dask futures as a rich progress bar (works with any scheduler)."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from .stop import check as check_stop


def track(futures: Iterable, description: str, *, enabled: bool = True):
    """Wait for ``futures`` showing a progress bar; returns them in their original order.

    The first failed task's exception is raised as is (an
    :class:`~dflashdeconv.errors.InputError` raised on a worker arrives here unchanged); a
    requested stop (:mod:`.stop`) is raised between tasks.
    """
    from distributed import as_completed

    futures = list(futures)
    check_stop()
    if not futures:
        return futures
    if not enabled:
        for future in as_completed(futures):
            future.result()
            check_stop()
        return futures
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    from rich.console import Console

    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=len(futures))
        for future in as_completed(futures):
            future.result()
            check_stop()
            bar.advance(task)
    return futures
