"""Command line: ``dflashdeconv <command>``. Heavy imports happen inside the commands, so
``--help`` answers at once.

One module per command (``add_parser`` and ``run``); :mod:`.common` holds what they
share. Exit codes for batch systems: 0 success, 1 unexpected failure, 2 bad input (the message
names the problem), 3 the solver did not converge, 4 the store is locked by another run,
130 interrupted (Ctrl-C) and 143 terminated (SIGTERM); an interrupted ``deconvolve``
continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from .common import (  # noqa: F401 - the exit codes are part of the CLI's API
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NOT_CONVERGED,
    EXIT_OK,
    EXIT_TERMINATED,
)

#: The sub-commands, one module each, in the order ``--help`` lists them.
COMMANDS = ("deconvolve", "ingest", "synth", "info", "predict_expression", "demo")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dflashdeconv",
        description="Out-of-core FlashDeconv cell-type deconvolution for spatial transcriptomics.",
        epilog="Exit codes: 0 ok, 1 failure, 2 bad input, 3 not converged, 4 store locked, "
               "130 interrupted, 143 terminated.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(version("dflashdeconv"))
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_FAILURE
    import signal

    from ..engine import stop
    from ..engine.lock import StoreLockedError
    from ..errors import InputError, Terminated
    from .common import configured_output

    def terminate(signum, frame):
        stop.request()  # kept for the engine's next safe point should this raise be lost
        raise Terminated()

    stop.clear()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with configured_output(args.quiet, args.verbose):
            return args.run(args)
    except InputError as error:
        print(f"dflashdeconv: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StoreLockedError as error:
        print(f"dflashdeconv: error: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except (KeyboardInterrupt, Terminated) as interruption:
        # the abandoned run's pending zarr I/O tasks are dropped at exit; asyncio would log
        # "Task was destroyed but it is pending!" for each, and Python warn of each coroutine
        # not yet started ("was never awaited"), burying the one line below
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        resume = " (continue with --resume)" if args.command == "deconvolve" else ""
        print(f"dflashdeconv: interrupted{resume}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.clear()
