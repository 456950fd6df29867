"""Single-machine FlashDeconv math: numpy, scipy and numba only (no dask, no I/O).

The distributed engine (:mod:`dflashdeconv.engine`) calls the same chunk-level kernels
on row chunks of a zarr store; :class:`~dflashdeconv.core.model.FlashDeconv` calls them on
an in-memory matrix. Submodules load on use: importing ``core.graph`` does not compile
or load the solver's kernels.
"""

__all__ = ["FlashDeconv"]


def __getattr__(name):
    if name == "FlashDeconv":
        from .model import FlashDeconv

        return FlashDeconv
    raise AttributeError(f"module 'dflashdeconv.core' has no attribute {name!r}")
