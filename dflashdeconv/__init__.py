"""dflashdeconv: Dask-distributed, out-of-core FlashDeconv for spatial transcriptomics.

Public API: :class:`FlashDeconv` (in-memory estimator), the scanpy-style namespaces
``tl`` and ``pl``, and ``io``, ``datasets``, ``metrics``. Submodules load on first use so
that the command line starts quickly.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"tl", "pl", "io", "datasets", "metrics", "errors", "core", "engine", "histo"}

__all__ = ["FlashDeconv", "tl", "pl", "io", "datasets", "metrics", "__version__"]


def __getattr__(name):
    if name == "FlashDeconv":
        from .core.model import FlashDeconv

        return FlashDeconv
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dflashdeconv' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
