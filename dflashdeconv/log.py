"""The library's one logger, ``logging.getLogger("dflashdeconv")``.

Libraries log, applications decide what to show: the command line sets the level from
``-q``/``-v``; an estimator's ``verbose=True`` shows its INFO messages on stdout for the
duration of the call when nothing else handles them.
"""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger("dflashdeconv")


@contextlib.contextmanager
def verbose_logging(enabled: bool):
    """INFO messages of the package on stdout while the block runs (``verbose=True``),
    unless the application has configured the ``dflashdeconv`` logger itself."""
    if not enabled or logger.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[dflashdeconv] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
