"""What every command shares: the summary table, spinners and line progress on stderr,
exit codes."""

from __future__ import annotations

import argparse
import contextlib
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clean message otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1 expected, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number expected, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a positive number expected, got {text}")
    return value


def _auto_or_float(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number expected, got {text!r}") from None


def model_params(args) -> dict:
    """The model parameters of parsed arguments, by the spec's names."""
    from ..core.params import MODEL

    return {p.name: getattr(args, p.name) for p in MODEL if p.cli}


def add_output_options(parser) -> None:
    """-q/-v of every command: progress, library log messages and warnings."""
    group = parser.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars, log messages or warnings; errors only")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log each phase (-vv: debugging detail)")


@contextlib.contextmanager
def configured_output(quiet: bool, verbose: int):
    """Library messages (logger ``dflashdeconv``) and warnings as one line each on stderr,
    at the level -q/-v ask for, while the command runs (restored after it); Dask's and
    bokeh's own logs only when they are errors (left so: their background threads may log
    after an interrupted command returns)."""
    import logging
    import warnings

    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dflashdeconv: %(message)s"))
    logger = logging.getLogger("dflashdeconv")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    shown = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if not quiet:
            print(f"dflashdeconv: warning: {message}", file=sys.stderr, flush=True)

    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR if verbose < 2 else logging.INFO)
    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = shown
        logger.handlers[:], logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
