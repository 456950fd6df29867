"""Writing spot stores: blocks are made and written by the Dask workers, in parallel.

A store is written into a hidden sibling (``.NAME.partial``) and moved into place when
complete, so an interrupted write leaves nothing that looks like a store and never blocks
the next one (on object stores, where nothing can be renamed, the layout record written
last is the completion mark). An existing destination is refused before any work unless
``overwrite``.

The per-spot arrays (names, input rows, coordinates, ``obsm`` extras) are chunked like
the blocks, so each block task writes its own chunks. The counts' CSR arrays are 1-D with
their own chunks, which straddle blocks: a block task keeps its non-zeros in its worker's
memory, and as soon as the blocks before it are known (their non-zero counts give its
offset), a task on the same worker writes the chunks of ``X`` that lie inside the block and
small tasks assemble each chunk shared by neighbouring blocks from their slices (every
chunk is written by exactly one task, and the non-zeros are compressed once). Blocks are
started a few at a time, so at most ``2 x workers`` blocks wait in memory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import zarr
from scipy import sparse

from ..errors import InputError
from .cluster import worker_task
from .elements import dict_group, encoded
from .stop import check as check_stop
from .store import (
    FORMAT_VERSION,
    LAYOUT_KEY,
    NNZ_CHUNK,
    SpotStore,
    fast_codec,
    local_path,
    open_zarr,
)

SCRATCH = "_scratch"


@dataclass
class BlockRows:
    """One block of a store in its final (spatial) order."""

    names: np.ndarray
    input_rows: np.ndarray
    coords: np.ndarray
    counts: sparse.csr_matrix
    obsm: dict = field(default_factory=dict)


def _all_chunks():
    """Store every chunk, also all-zero ones: a missing chunk then always means damage."""
    return zarr.config.set({"array.write_empty_chunks": True})


def _exists(path: str) -> bool:
    local = local_path(path)
    if local is not None:
        return local.exists()
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def check_destination(path, overwrite: bool = False) -> None:
    """Refuse an existing destination unless ``overwrite`` (called before long work)."""
    if not overwrite and _exists(str(path)):
        raise InputError(f"{path} already exists: pass --overwrite (command line) or "
                         "overwrite=True (Python) to replace it, or choose another path")


class StoreTarget:
    """Where a new store is written: checked first, written aside, moved into place."""

    def __init__(self, path, *, overwrite: bool = False):
        self.path = str(path)
        self.local = local_path(self.path)
        check_destination(self.path, overwrite)
        if self.local is not None:
            self.work = str(self.local.parent / f".{self.local.name}.partial")
            shutil.rmtree(self.work, ignore_errors=True)  # left by an interrupted write
            self.local.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.work = self.path
            if _exists(self.path):
                import fsspec

                fs, inner = fsspec.core.url_to_fs(self.path)
                fs.rm(inner, recursive=True)
        root = open_zarr(self.work, "w")
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        root.create_group(SCRATCH)

    def root(self):
        return open_zarr(self.work, "r+")

    def commit(self, layout: dict) -> SpotStore:
        """Drop the scratch, write the layout record and move the store into place."""
        root = self.root()
        if SCRATCH in root:
            del root[SCRATCH]
        group = dict_group(root["uns"], LAYOUT_KEY)
        group.attrs.update({"format_version": FORMAT_VERSION, **layout})
        if self.local is not None:
            if self.local.exists():
                old = self.local.parent / f".{self.local.name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(self.local, old)
                os.rename(self.work, self.local)
                shutil.rmtree(old)
            else:
                os.rename(self.work, self.local)
        return SpotStore.open(self.path)

    def abandon(self) -> None:
        """Remove what an interrupted or failed write left (local stores)."""
        if self.local is not None:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            self.abandon()


def _skeleton(root, *, n_spots, gene_names, chunk_rows, coords_dim, obsm, dtype):
    """Every element of the AnnData layout, empty, chunked like the blocks."""
    from anndata.io import write_elem

    obs = encoded(root.create_group("obs"), "dataframe")
    obs.attrs.update({"_index": "_index", "column-order": ["input_row", "block"]})
    rows = (chunk_rows,)
    encoded(obs.create_array("_index", shape=(n_spots,), dtype=str, chunks=rows), "string-array")
    for name, kind in (("input_row", np.int64), ("block", np.int32)):
        encoded(obs.create_array(name, shape=(n_spots,), dtype=kind, chunks=rows,
                                  compressors=fast_codec()), "array")
    write_elem(root, "var", pd.DataFrame(index=pd.Index(np.asarray(gene_names).astype(str))))
    group = dict_group(root, "obsm")
    encoded(group.create_array("spatial", shape=(n_spots, coords_dim), dtype=np.float64,
                                chunks=(chunk_rows, coords_dim), compressors=fast_codec()), "array")
    for name, (tail, kind) in (obsm or {}).items():
        encoded(group.create_array(name, shape=(n_spots, *tail), dtype=kind,
                                    chunks=(chunk_rows, *tail), compressors=fast_codec()), "array")
    for name in ("obsp", "varm", "varp", "layers", "uns"):
        dict_group(root, name)
    X = encoded(root.create_group("X"), "csr_matrix", "0.1.0")
    X.attrs["shape"] = [int(n_spots), len(gene_names)]
    X.create_array("data", shape=(0,), dtype=dtype, chunks=(NNZ_CHUNK,), compressors=fast_codec())
    X.create_array("indices", shape=(0,), dtype=np.int32, chunks=(NNZ_CHUNK,),
                   compressors=fast_codec())


@dataclass
class BlockCounts:
    """A written block's non-zeros, held by its worker until they are placed in ``X``."""

    block: int
    indptr: np.ndarray
    data: np.ndarray
    indices: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    def __sizeof__(self) -> int:  # what Dask weighs: tasks on it run where it is
        return object.__sizeof__(self) + self.indptr.nbytes + self.data.nbytes + \
            self.indices.nbytes


@worker_task
def write_block(work: str, block: int, make_block: Callable, args: tuple, chunk_rows: int,
                n_genes: int, dtype) -> BlockCounts:
    """Make block ``block``, write its per-spot chunks and keep its non-zeros."""
    rows: BlockRows = make_block(*args)
    counts = sparse.csr_matrix(rows.counts)
    if counts.shape[1] != n_genes:
        raise InputError(f"block {block} has {counts.shape[1]} genes, the store {n_genes}")
    counts.sum_duplicates()
    counts.sort_indices()
    start, stop = block * chunk_rows, block * chunk_rows + counts.shape[0]
    root = open_zarr(work, "r+")
    with _all_chunks():
        obs = root["obs"]
        obs["_index"][start:stop] = np.asarray(rows.names).astype(str)
        obs["input_row"][start:stop] = np.asarray(rows.input_rows, np.int64)
        obs["block"][start:stop] = np.full(stop - start, block, np.int32)
        root["obsm"]["spatial"][start:stop] = np.asarray(rows.coords, np.float64)
        for name, values in rows.obsm.items():
            root["obsm"][name][start:stop] = values
    return BlockCounts(block, counts.indptr.astype(np.int64),
                       counts.data.astype(dtype, copy=False),
                       counts.indices.astype(np.int32, copy=False))


def block_size(counts: BlockCounts) -> tuple[int, int, np.ndarray]:
    """(block, non-zeros, indptr from 0): what the client needs of a written block."""
    return counts.block, counts.nnz, counts.indptr


def _write_x(work: str, low: int, data: np.ndarray, indices: np.ndarray) -> None:
    X = open_zarr(work, "r+")["X"]
    with _all_chunks():
        X["data"][low:low + data.size] = data
        X["indices"][low:low + data.size] = indices


@worker_task
def place_block(work: str, counts: BlockCounts, offset: int, inside, pieces) -> list:
    """Write the whole chunks of ``X`` inside the block at ``offset`` (``inside = (low,
    high)`` or None) and return its ``(a, z)`` pieces of the chunks it shares, copied."""
    if inside is not None:
        low, high = inside
        _write_x(work, low, counts.data[low - offset:high - offset],
                 counts.indices[low - offset:high - offset])
    return [(counts.data[a:z].copy(), counts.indices[a:z].copy()) for a, z in pieces]


def piece_of(pieces: list, i: int):
    return pieces[i]


@worker_task
def place_shared(work: str, low: int, *pieces) -> None:
    """Write one chunk of ``X`` not held whole by one block, from its pieces in order."""
    _write_x(work, low, np.concatenate([p[0] for p in pieces]),
             np.concatenate([p[1] for p in pieces]))


class _Placement:
    """The client's book-keeping: the blocks' offsets in X, known in block order, and the
    chunks of X no single block holds whole (assembled from the blocks' pieces)."""

    def __init__(self, n_blocks: int):
        self.nnz = [None] * n_blocks
        self.offsets = [0]  # offsets[b] is known for every b < len(offsets)
        self.placed = 0  # blocks whose writes are assigned
        self.next_shared = 0  # shared chunks below it are assigned
        self.pieces: dict[int, list] = {}  # chunk -> its piece futures, in block order

    def record(self, block: int, nnz: int) -> None:
        self.nnz[block] = nnz
        while len(self.offsets) <= len(self.nnz) and self.nnz[len(self.offsets) - 1] is not None:
            self.offsets.append(self.offsets[-1] + self.nnz[len(self.offsets) - 1])

    @property
    def complete(self) -> bool:
        return len(self.offsets) == len(self.nnz) + 1

    def newly_placed(self):
        """``(block, offset, inside, pieces)`` of each block whose offset became known:
        ``inside = (low, high)`` the whole chunks inside it (or None) and ``pieces`` the
        ``(chunk, a, z)`` slices of it that belong to shared chunks."""
        while self.placed < len(self.offsets) - 1:
            b = self.placed
            offset, end = self.offsets[b], self.offsets[b + 1]
            inside, pieces = None, []
            if end > offset:
                low = -(-offset // NNZ_CHUNK) * NNZ_CHUNK
                high = max(end // NNZ_CHUNK * NNZ_CHUNK, low)
                if high > low:
                    inside = (low, high)
                for chunk in range(offset // NNZ_CHUNK, (end - 1) // NNZ_CHUNK + 1):
                    c_low, c_high = chunk * NNZ_CHUNK, (chunk + 1) * NNZ_CHUNK
                    if inside and inside[0] <= c_low and c_high <= inside[1]:
                        continue
                    pieces.append((chunk, max(c_low, offset) - offset, min(c_high, end) - offset))
            self.placed += 1
            yield b, offset, inside, pieces

    def ready_shared(self):
        """``(chunk, [piece futures])`` of the shared chunks whose every piece is known:
        the blocks known reach past the chunk's end, or every block is known."""
        for chunk in sorted(c for c in self.pieces
                            if self.complete or (c + 1) * NNZ_CHUNK <= self.offsets[-1]):
            yield chunk, self.pieces.pop(chunk)


def write_store(target: StoreTarget, make_block: Callable, block_args: list[tuple], *,
                n_spots: int, gene_names, chunk_rows: int, coords_dim: int, source: str,
                obsm: dict | None = None, dtype=np.float32, scheduler=None,
                progress=None) -> SpotStore:
    """Write a store whose block ``b`` is ``make_block(*block_args[b])`` (a
    :class:`BlockRows`), on the workers of ``scheduler`` (a Client, an address or None for
    a LocalCluster). ``obsm``: extra per-spot arrays, name -> (trailing shape, dtype).
    ``progress(done, total)`` is called as blocks are written."""
    from distributed import as_completed

    from .cluster import connect

    n_blocks = len(block_args)
    if n_blocks != -(-n_spots // chunk_rows):
        raise ValueError(f"{n_blocks} blocks for {n_spots} spots of {chunk_rows} rows")
    n_genes = len(gene_names)
    _skeleton(target.root(), n_spots=n_spots, gene_names=gene_names, chunk_rows=chunk_rows,
              coords_dim=coords_dim, obsm=obsm, dtype=dtype)
    placement = _Placement(n_blocks)
    indptr = [None] * n_blocks
    # an in-memory file system lives in this process: its workers must be threads
    in_process = {"processes": False} if target.work.startswith("memory://") else {}
    with connect(scheduler, quiet=True, **in_process) as client:
        window = 2 * max(len(client.nthreads()), 1)  # blocks in memory at most
        blocks, users = {}, {}  # block futures; write task -> the block it frees (or None)
        waiting = as_completed()
        submitted = done = 0
        X = target.root()["X"]

        def start_blocks():
            nonlocal submitted
            while submitted < n_blocks and len(blocks) < window:
                b = submitted
                blocks[b] = client.submit(write_block, target.work, b, make_block,
                                          block_args[b], chunk_rows, n_genes, dtype, pure=False)
                waiting.add(client.submit(block_size, blocks[b], pure=False))
                submitted += 1

        def uses(task, block):
            users[task] = block
            waiting.add(task)

        start_blocks()
        for future in waiting:
            check_stop()
            result = future.result()  # raises a task's error
            if future in users:  # a block's or a shared chunk's write is done
                block = users.pop(future)
                if block is not None:
                    del blocks[block]  # its non-zeros are in X or in pieces
                    start_blocks()
                continue
            block, nnz, local_indptr = result
            indptr[block] = local_indptr
            placement.record(block, nnz)
            done += 1
            if progress is not None:
                progress(done, n_blocks)
            if placement.offsets[-1] > X["data"].shape[0]:
                for name in ("data", "indices"):
                    X[name].resize((placement.offsets[-1],))
            for b, offset, inside, pieces in placement.newly_placed():
                if inside is not None or pieces:
                    placed = client.submit(place_block, target.work, blocks[b], offset, inside,
                                           [(a, z) for _, a, z in pieces], pure=False)
                    for i, (chunk, _, _) in enumerate(pieces):
                        piece = client.submit(piece_of, placed, i, pure=False)
                        placement.pieces.setdefault(chunk, []).append(piece)
                    uses(placed, b)
                else:  # no non-zeros
                    del blocks[b]
                    start_blocks()
            for chunk, pieces in placement.ready_shared():
                uses(client.submit(place_shared, target.work, chunk * NNZ_CHUNK, *pieces,
                                   pure=False), None)
    nnz_total = placement.offsets[-1]
    full = np.concatenate([np.zeros(1, np.int64)] +
                          [indptr[b][1:] + placement.offsets[b] for b in range(n_blocks)])
    with _all_chunks():
        array = target.root()["X"].create_array(
            "indptr", shape=full.shape, dtype=np.int64, chunks=(max(chunk_rows, 1 << 16),),
            compressors=fast_codec())
        array[...] = full
    return target.commit({"chunk_rows": int(chunk_rows), "source": source,
                          "n_spots": int(n_spots), "nnz": int(nnz_total)})


__all__ = ["BlockRows", "StoreTarget", "check_destination", "write_store"]
