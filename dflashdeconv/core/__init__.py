"""Single-machine FlashDeconv math: numpy, scipy and numba only (no dask, no I/O).

The distributed engine (:mod:`dflashdeconv.engine`) calls the same chunk-level kernels
on row chunks of a zarr store; :class:`~dflashdeconv.core.model.FlashDeconv` calls them on
an in-memory matrix.
"""

from .model import FlashDeconv

__all__ = ["FlashDeconv"]
