"""Orders of spots along space-filling curves: consecutive rows form compact patches.

The spot store keeps its rows in this order so that its row chunks are spatial blocks.
"""

from __future__ import annotations

import numpy as np


def hilbert_distance(ix: np.ndarray, iy: np.ndarray, order: int) -> np.ndarray:
    """Distance along the Hilbert curve of integer cells (vectorised bit rotation)."""
    x = ix.astype(np.int64).copy()
    y = iy.astype(np.int64).copy()
    d = np.zeros(x.shape, np.int64)
    s = np.int64(1) << (order - 1)
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so that the curve inside it has the standard orientation
        flip = ~ry & rx
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def spatial_order(coords: np.ndarray, tie_key: np.ndarray | None = None, bits: int = 16) -> np.ndarray:
    """Permutation that sorts spots along a Hilbert curve (2-D) or Z-order curve (3-D).

    Coordinates are quantised to a ``2**bits`` grid over their bounding box; spots in one
    cell keep the order of ``tie_key`` (default: input order).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    tie_key = np.arange(n) if tie_key is None else np.asarray(tie_key)
    lo = coords.min(axis=0)
    span = np.maximum(coords.max(axis=0) - lo, 1e-300)
    cells = np.minimum(((coords - lo) / span.max() * (2**bits)).astype(np.int64), 2**bits - 1)
    if coords.shape[1] == 2:
        key = hilbert_distance(cells[:, 0], cells[:, 1], bits)
    else:
        key = np.zeros(n, np.int64)
        for bit in range(min(bits, 21)):
            for axis in range(3):
                key |= ((cells[:, axis] >> (bits - 1 - bit)) & 1) << (62 - 3 * bit - axis)
    return np.lexsort((tie_key, key))
