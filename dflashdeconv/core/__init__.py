"""Single-machine FlashDeconv math: numpy, scipy and numba only (no dask, no I/O).

The distributed engine (:mod:`dflashdeconv.engine`) calls the same chunk-level kernels
on row chunks of a zarr store; :class:`~dflashdeconv.core.model.FlashDeconv` calls them on
an in-memory matrix.
"""

import os

# numba's OpenMP layer launches each parallel kernel in ~10 us with passive waiting, but
# in ~8 ms with libgomp's default spin-then-sleep policy on small machines (measured on
# 2 cores). Block tasks call kernels thousands of times, so passive is the default here;
# it must be set before libgomp loads, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .model import FlashDeconv  # noqa: E402

__all__ = ["FlashDeconv"]
