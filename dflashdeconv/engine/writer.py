"""Writing spot stores: blocks are made and written by the Dask workers, in parallel.

A store is written into a hidden sibling (``.NAME.partial``) and moved into place when
complete, so an interrupted write leaves nothing that looks like a store and never blocks
the next one (on object stores, where nothing can be renamed, the layout record written
last is the completion mark). An existing destination is refused before any work unless
``overwrite``.

The per-spot arrays (names, input rows, coordinates, ``obsm`` extras) are chunked like
the blocks, so each block task writes its own chunks. The counts' CSR arrays are 1-D with
their own chunks, which straddle blocks: a block task writes its non-zeros to a scratch
group, and as soon as the blocks before it are known, tasks copy whole chunk ranges from
scratch into ``X`` (each chunk is written by exactly one task) and the scratch of the
copied blocks is dropped, so scratch holds only the blocks in flight.
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

#: Non-zeros copied from scratch into X per task (8 zarr chunks).
COPY_ELEMENTS = 8 * NNZ_CHUNK
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


@worker_task
def write_block(work: str, block: int, make_block: Callable, args: tuple, chunk_rows: int,
                n_genes: int, dtype) -> tuple[int, int, np.ndarray]:
    """Make block ``block`` and write its per-spot chunks and its non-zeros (to scratch).
    Returns (block, non-zeros, its indptr starting at 0)."""
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
        scratch = root[SCRATCH].create_group(f"b{block}")
        for name, values in (("data", counts.data.astype(dtype, copy=False)),
                             ("indices", counts.indices.astype(np.int32, copy=False))):
            scratch.create_array(name, shape=values.shape, dtype=values.dtype,
                                 chunks=(NNZ_CHUNK,), compressors=fast_codec())[...] = values
    return block, int(counts.nnz), counts.indptr.astype(np.int64)


@worker_task
def copy_range(work: str, low: int, high: int, sources: list[tuple[int, int]]) -> None:
    """Non-zeros ``low:high`` of X from the scratch of the blocks ``(block, offset)``."""
    root = open_zarr(work, "r+")
    data, indices = [], []
    for block, offset in sources:
        scratch = root[SCRATCH][f"b{block}"]
        a = max(low - offset, 0)
        z = min(high - offset, scratch["data"].shape[0])
        data.append(scratch["data"][a:z])
        indices.append(scratch["indices"][a:z])
    with _all_chunks():
        root["X"]["data"][low:high] = np.concatenate(data)
        root["X"]["indices"][low:high] = np.concatenate(indices)


class _Copies:
    """The client's book-keeping of phase B: which non-zeros can be copied, and which
    blocks' scratch is no longer needed."""

    def __init__(self, n_blocks: int):
        self.nnz = [None] * n_blocks
        self.offsets = [0]
        self.written = 0
        self.pending: dict = {}  # copy future -> blocks it reads
        self.readers = [0] * n_blocks  # copy tasks still reading each block

    def record(self, block: int, nnz: int) -> None:
        """A block is written; extend the offsets over the blocks now known in order."""
        self.nnz[block] = nnz
        while len(self.offsets) <= len(self.nnz) and self.nnz[len(self.offsets) - 1] is not None:
            self.offsets.append(self.offsets[-1] + self.nnz[len(self.offsets) - 1])

    def copied(self, block: int) -> bool:
        """Every non-zero of ``block`` is assigned to a copy and none is still reading it."""
        return (len(self.offsets) > block + 1 and self.written >= self.offsets[block + 1]
                and self.readers[block] == 0)

    def ranges(self) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """Chunk-aligned ranges now known (the last partial chunk once every block is)."""
        known = self.offsets[-1]
        complete = len(self.offsets) - 1 == len(self.nnz)
        limit = known if complete else known // NNZ_CHUNK * NNZ_CHUNK
        out = []
        offsets = np.asarray(self.offsets)
        while self.written < limit:
            low, high = self.written, min(self.written + COPY_ELEMENTS, limit)
            first = int(np.searchsorted(offsets, low, side="right") - 1)
            last = int(np.searchsorted(offsets, high, side="left") - 1)
            blocks = [(b, int(offsets[b])) for b in range(first, last + 1) if self.nnz[b]]
            out.append((low, high, blocks))
            self.written = high
        return out


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
    copies = _Copies(n_blocks)
    indptr = [None] * n_blocks
    # an in-memory file system lives in this process: its workers must be threads
    in_process = {"processes": False} if target.work.startswith("memory://") else {}
    with connect(scheduler, quiet=True, **in_process) as client:
        blocks = client.map(write_block, [target.work] * n_blocks, range(n_blocks),
                            [make_block] * n_blocks, block_args, [chunk_rows] * n_blocks,
                            [n_genes] * n_blocks, [dtype] * n_blocks, pure=False)
        waiting = as_completed(blocks)
        done = 0
        for future in waiting:
            check_stop()
            if future in copies.pending:
                future.result()
                for block in copies.pending.pop(future):
                    copies.readers[block] -= 1
                    if copies.copied(block):
                        del target.root()[SCRATCH][f"b{block}"]
                continue
            block, nnz, local_indptr = future.result()
            indptr[block] = local_indptr
            copies.record(block, nnz)
            done += 1
            if progress is not None:
                progress(done, n_blocks)
            ranges = copies.ranges()
            if ranges:
                X = target.root()["X"]
                for name in ("data", "indices"):
                    X[name].resize((copies.written,))
            for low, high, sources in ranges:
                copy = client.submit(copy_range, target.work, low, high, sources, pure=False)
                copies.pending[copy] = [b for b, _ in sources]
                for b, _ in sources:
                    copies.readers[b] += 1
                waiting.add(copy)
    nnz_total = copies.offsets[-1]
    starts = np.cumsum([0] + [copies.nnz[b] for b in range(n_blocks)])
    full = np.concatenate([np.zeros(1, np.int64)] +
                          [indptr[b][1:] + starts[b] for b in range(n_blocks)])
    with _all_chunks():
        array = target.root()["X"].create_array(
            "indptr", shape=full.shape, dtype=np.int64, chunks=(max(chunk_rows, 1 << 16),),
            compressors=fast_codec())
        array[...] = full
    return target.commit({"chunk_rows": int(chunk_rows), "source": source,
                          "n_spots": int(n_spots), "nnz": int(nnz_total)})


__all__ = ["BlockRows", "StoreTarget", "check_destination", "write_store"]
