"""What every command shares: the summary table, spinners and line progress on stderr,
exit codes."""

from __future__ import annotations

import sys
import time

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOT_CONVERGED, EXIT_LOCKED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


def print_summary(lines: list[tuple[str, str]]) -> None:
    """The one-screen summary that ends a command (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in lines:
        table.add_row(f"[bold]{key}[/bold]", value)
    Console(stderr=False).print(table)


def status(message: str, quiet: bool):
    """A spinner on stderr for a step without a measurable length."""
    from contextlib import nullcontext

    if quiet:
        return nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def line_progress():
    """``report(stage, done, total)`` printing a line on stderr at most every 2 s."""
    last = [0.0]

    def report(stage, done, total):
        now = time.perf_counter()
        if now - last[0] > 2 or (total and done >= total):
            last[0] = now
            of = f"/{total:,}" if total else ""
            print(f"{stage}: {done:,}{of}", file=sys.stderr, flush=True)
    return report
