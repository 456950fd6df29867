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


def add_deprecated_flag(parser, old: str, new: str, dest: str, **options) -> None:
    """Keep ``old`` working as a hidden alias of ``new`` for one release (it stores into
    ``dest`` and says on stderr that it is deprecated)."""
    import argparse

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"dflashdeconv: warning: {old} is deprecated and will be removed in the next "
                  f"release; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, True if self.nargs == 0 else values)

    parser.add_argument(old, dest=dest, action=Deprecated, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **options)


def add_model_options(parser) -> None:
    """One option per model parameter of the spec (``core.params.MODEL``): the same names,
    defaults and allowed values as ``FlashDeconv`` and ``tl.deconvolve``."""
    from ..core.params import MODEL

    group = parser.add_argument_group("model (defaults of flashdeconv 0.2.0)")
    for p in MODEL:
        if not p.cli:
            continue
        options = {"default": p.default, "help": f"{p.help} (default: %(default)s)",
                   "dest": p.name}
        if p.kind == "choice":
            options["choices"] = p.choices
        else:
            options["type"] = {"int": int, "seed": int, "float": float, "optional_float": float,
                               "auto_or_float": _auto_or_float}[p.kind]
        group.add_argument(p.flag, **options)
    add_deprecated_flag(group, "--seed", "--random-state", "random_state", type=int)


def _auto_or_float(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"'auto' or a number expected, got {text!r}") from None


def model_params(args) -> dict:
    """The model parameters of parsed arguments, by the spec's names."""
    from ..core.params import MODEL

    return {p.name: getattr(args, p.name) for p in MODEL if p.cli}
