"""The converters' common path: source rows, streamed in the source's order, split by
destination block into scratch (an external bucket sort), then each block assembled in
spatial (Hilbert) order and written by the workers. No converter holds the whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.order import spatial_order
from ..core.validation import check_coords
from ..errors import InputError
from .store import SpotStore, choose_chunk_rows, open_zarr
from .writer import SCRATCH, BlockRows, StoreTarget, write_store

#: Source rows read at a time by the converters.
SOURCE_CHUNK_ROWS = 1 << 16


def _check_rows(source: str, start: int, rows: sparse.csr_matrix) -> None:
    """NaN/inf or negative counts: :class:`InputError` naming the source and the row."""
    data = rows.data
    if data.dtype.kind not in "fiu":
        raise InputError(f"{source}: counts must be numeric, got dtype {data.dtype}")
    bad = ~np.isfinite(data) | (data < 0) if data.dtype.kind == "f" else data < 0
    if bad.any():
        q = int(np.flatnonzero(bad)[0])
        row = start + int(np.searchsorted(rows.indptr, q, side="right") - 1)
        kind = "negative" if np.isfinite(data[q]) else "NaN or infinite"
        raise InputError(f"{source}: {kind} count {data[q]} in row {row}")


def _check_spots(source: str, names, coords) -> np.ndarray:
    names = pd.Index(np.asarray(names).astype(str))
    duplicated = names.duplicated(keep=False)
    if duplicated.any():
        first = names[duplicated][0]
        rows = np.flatnonzero(names == first)[:5].tolist()
        raise InputError(f"{source}: duplicate barcode {first!r} in rows {rows} "
                         f"({int(names.duplicated().sum())} duplicates in all)")
    return check_coords(coords, len(names), f"{source}: spot coordinates")


def write_sorted(path, obs_names, gene_names, coords, chunks: Iterator, *, source: str,
                 chunk_rows: int | None = None, scheduler=None, overwrite: bool = False,
                 progress=None) -> SpotStore:
    """Write source rows (``chunks`` yields ``(first row, CSR rows)`` in source order) as a
    spot store sorted along the Hilbert curve.

    The source is read once, by this process, each chunk split by destination block into
    the store's scratch; the workers then assemble and write the blocks in parallel
    (:mod:`~dflashdeconv.engine.writer`). Memory is bounded by one chunk/block."""
    coords = _check_spots(source, obs_names, coords)
    n = coords.shape[0]
    if n == 0:
        raise InputError(f"{source}: no spots")
    order = spatial_order(coords)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    with StoreTarget(path, overwrite=overwrite) as target:
        pieces = target.root()[SCRATCH].create_group("pieces")
        seen, n_genes = 0, len(gene_names)
        block_pieces: dict[int, list[str]] = {}  # scratch pieces of each block, in source order
        for start, rows in chunks:
            rows = sparse.csr_matrix(rows)
            _check_rows(source, start, rows)
            if chunk_rows is None:
                chunk_rows = choose_chunk_rows(rows.nnz / max(rows.shape[0], 1))
            dest = rank[start:start + rows.shape[0]]
            bucket = dest // chunk_rows
            for b in np.unique(bucket):
                mine = np.flatnonzero(bucket == b)
                piece = rows[mine]
                key = f"b{b}_{start}"
                group = pieces.create_group(key)
                for name, values in (("data", piece.data), ("indices", piece.indices),
                                     ("indptr", piece.indptr), ("dest", dest[mine])):
                    group.create_array(name, shape=values.shape, dtype=values.dtype,
                                       compressors=None)[...] = values
                block_pieces.setdefault(int(b), []).append(key)
            seen += rows.shape[0]
            if progress:
                progress("reading", seen, n)
        if seen != n:
            raise InputError(f"{source}: {seen} count rows for {n} spots")
        names, coords = np.asarray(obs_names).astype(str)[order], coords[order]
        blocks = [(target.work, block_pieces.get(b, []), names[lo:lo + chunk_rows],
                   order[lo:lo + chunk_rows], coords[lo:lo + chunk_rows], n_genes)
                  for b, lo in enumerate(range(0, n, chunk_rows))]
        return write_store(target, _assemble_block, blocks, n_spots=n, gene_names=gene_names,
                           chunk_rows=chunk_rows, coords_dim=coords.shape[1], source=source,
                           scheduler=scheduler,
                           progress=None if progress is None else
                           (lambda done, total: progress("writing blocks", done, total)))


def _assemble_block(work: str, keys: list[str], names, input_rows, coords, n_genes: int):
    """A block from its scratch pieces, rows in the block's order."""
    pieces = open_zarr(work, "r")[SCRATCH]["pieces"]
    parts, dest = [], []
    for key in keys:
        group = pieces[key]
        rows = group["dest"][...]
        parts.append(sparse.csr_matrix((group["data"][...], group["indices"][...],
                                        group["indptr"][...]), shape=(rows.size, n_genes)))
        dest.append(rows)
    if not parts:
        return BlockRows(names, input_rows, coords, sparse.csr_matrix((len(names), n_genes)))
    block = sparse.vstack(parts, format="csr")
    return BlockRows(names, input_rows, coords, block[np.argsort(np.concatenate(dest))])


def unique_names(names: np.ndarray) -> pd.Index:
    """Gene symbols made unique the scanpy way: repeats get ``-1``, ``-2``, ..."""
    out = pd.Series(names)
    repeat = out.groupby(out).cumcount()
    out[repeat > 0] = out[repeat > 0] + "-" + repeat[repeat > 0].astype(str)
    return pd.Index(out)
