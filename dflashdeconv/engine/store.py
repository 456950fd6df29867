"""The spot store: an AnnData zarr (v3) store whose rows follow a Hilbert curve over space.

Because rows are in Hilbert order, every run of consecutive rows is a compact patch of
tissue, so the engine's spatial blocks are simply regular row chunks of ``chunk_rows``
rows: zarr chunks of the per-spot arrays align with blocks and each block is read, and
its results written, by exactly one task.

Layout (``anndata.read_zarr`` opens it)::

    X/{data,indices,indptr}      CSR counts, appended chunk by chunk (input, read only)
    obs/_index, obs/input_row    spot names, row of the spot in the source
    obs/block                    the spatial block (row chunk) of each spot
    var/_index                   gene names
    obsm/spatial                 coordinates (N x 2 or N x 3), chunked by blocks
    uns/dflashdeconv_layout      chunk_rows, source, format version; written last

Stores are written by :mod:`dflashdeconv.engine.writer`; results are written under other
keys (see :mod:`dflashdeconv.engine.results`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from ..errors import InputError

LAYOUT_KEY = "dflashdeconv_layout"
FORMAT_VERSION = 1
#: Elements per zarr chunk of the 1-D CSR arrays (16 MiB of float32).
NNZ_CHUNK = 1 << 22


def fast_codec():
    """LZ4 with bit shuffling: counts and sorted gene indices compress ~4x and decompress
    several times faster than zarr's default zstd, which makes the passes I/O-light."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
#: Default number of non-zeros per block (row chunk): ~256 MB of float32 data + int32 indices.
TARGET_BLOCK_NNZ = 1 << 25


def _quiet_zarr():
    """zarr warns about v3 features (consolidated metadata, sharding) on every write."""
    warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")


_quiet_zarr()


def choose_chunk_rows(nnz_per_row: float, target_nnz: int = TARGET_BLOCK_NNZ) -> int:
    """Rows per block so that a block holds about ``target_nnz`` non-zeros (multiple of 1024)."""
    rows = int(target_nnz / max(nnz_per_row, 1.0))
    return int(min(max(1024, rows // 1024 * 1024), 1 << 20))


# --------------------------------------------------------------------------- opening stores
def local_path(path) -> Path | None:
    """The local path of ``path`` (a plain path or a ``file://`` URL); None for other URLs."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        return None
    return Path(path.removeprefix("file://"))


def open_zarr(path, mode: str = "r"):
    """A zarr group for a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``)."""
    local = local_path(path)
    if local is None:
        from zarr.storage import FsspecStore

        store = FsspecStore.from_url(str(path), read_only=(mode == "r"))
        return zarr.open_group(store, mode=mode, zarr_format=3 if mode == "w" else None)
    return zarr.open_group(str(local), mode=mode, zarr_format=3 if mode == "w" else None)


def missing_chunks(array) -> list[int]:
    """Indices of the chunks of a 1-D/2-D-by-rows zarr array that are not stored.

    zarr reads a missing chunk as its fill value, silently: the store writer stores every
    chunk (``write_empty_chunks``), so a missing one means a damaged store.
    """
    from zarr.core.sync import sync

    async def listing():
        return [key async for key in array.store.list_prefix(array.path + "/c/")]

    stored = {int(key.rsplit("/c/", 1)[1].split("/")[0]) for key in sync(listing())}
    return [c for c in range(array._chunk_grid_shape[0]) if c not in stored]


def _read_index(group) -> pd.Index:
    name = group.attrs.get("_index", "_index")
    return pd.Index(np.asarray(group[name][...]).astype(object)).astype(str)


@dataclass
class SpotStore:
    """Read-only handle on a spot store: metadata in memory, counts read block by block."""

    path: str
    n_spots: int
    n_genes: int
    chunk_rows: int
    nnz: int
    gene_names: np.ndarray
    source: str

    @classmethod
    def open(cls, path) -> "SpotStore":
        """Open and check a store written by :class:`StoreWriter`."""
        try:
            root = open_zarr(path, "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
            raise InputError(f"no zarr store at {path}") from error
        uns = root.get("uns")
        if uns is None or LAYOUT_KEY not in uns:
            raise InputError(
                f"{path} is not a complete dflashdeconv spot store (no uns/{LAYOUT_KEY}); "
                "convert it with `dflashdeconv ingest` (an interrupted ingest leaves no layout)")
        layout = dict(uns[LAYOUT_KEY].attrs)
        for key in ("X", "var", "obsm"):
            if key not in root:
                raise InputError(f"{path} has no {key!r}: not a spot store")
        if "spatial" not in root["obsm"]:
            raise InputError(f"{path} has no obsm/spatial: spot coordinates are missing")
        X = root["X"]
        shape = tuple(X.attrs.get("shape", ()))
        if X.attrs.get("encoding-type") != "csr_matrix" or len(shape) != 2:
            raise InputError(f"{path}/X is not a CSR matrix (encoding {X.attrs.get('encoding-type')})")
        genes = _read_index(root["var"])
        if genes.size != shape[1]:
            raise InputError(f"{path}: {genes.size} gene names for {shape[1]} columns")
        if genes.size == 0:
            raise InputError(f"{path} has no genes")
        if root["obsm"]["spatial"].shape[0] != shape[0]:
            raise InputError(f"{path}: obsm/spatial has {root['obsm']['spatial'].shape[0]} rows "
                             f"for {shape[0]} spots")
        for name, array, unit in (("X/indptr", X["indptr"], "rows"),
                                  ("X/indices", X["indices"], "non-zeros"),
                                  ("X/data", X["data"], "non-zeros"),
                                  ("obsm/spatial", root["obsm"]["spatial"], "rows")):
            missing = missing_chunks(array)
            if missing:
                size = array.chunks[0]
                raise InputError(f"{path}: {name} is missing {len(missing)} chunk(s), e.g. chunk "
                                 f"{missing[0]} ({unit} {missing[0] * size}-{(missing[0] + 1) * size - 1})")
        return cls(str(path), int(shape[0]), int(shape[1]), int(layout["chunk_rows"]),
                   int(X["indptr"][-1]), genes.to_numpy(), str(layout.get("source", "")))

    @property
    def n_blocks(self) -> int:
        return -(-self.n_spots // self.chunk_rows)

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_spots)

    def root(self, mode: str = "r"):
        return open_zarr(self.path, mode)

    def read_block(self, block: int):
        """``(indptr, indices, data)`` of a block's rows, ``indptr`` starting at 0.

        A chunk that cannot be decoded raises :class:`InputError` naming the block and rows.
        """
        start, stop = self.block_rows(block)
        X = self.root()["X"]
        where = f"{self.path}: X of block {block} (rows {start}-{stop - 1})"
        try:
            indptr = np.asarray(X["indptr"][start:stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            indices = X["indices"][lo:hi]
            data = X["data"][lo:hi]
        except Exception as error:  # zarr raises codec and I/O errors of many types
            raise InputError(f"{where} cannot be read: {error}") from error
        if indptr.size != stop - start + 1 or np.any(np.diff(indptr) < 0) or hi > self.nnz:
            raise InputError(f"{where} has an inconsistent indptr (corrupt chunk)")
        return indptr - lo, indices, data

    def coords(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.root()["obsm"]["spatial"][start:stop], dtype=np.float64)

    def obs_names(self, rows=None) -> pd.Index:
        """Spot names, all or those at ``rows`` (read without loading the others)."""
        obs = self.root()["obs"]
        if rows is None:
            return _read_index(obs)
        index = obs[obs.attrs.get("_index", "_index")]
        return pd.Index([str(index[int(row)]) for row in rows])

    def input_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Row of each spot in the source it was converted from (the k-NN tie-break key)."""
        obs = self.root()["obs"]
        stop = self.n_spots if stop is None else stop
        if "input_row" not in obs:
            return np.arange(start, stop)
        return np.asarray(obs["input_row"][start:stop])


def default_scratch(path) -> str:
    """A scratch folder beside a local output store (same file system), else the tmp dir."""
    import tempfile

    local = local_path(path)
    if local is None:
        return tempfile.gettempdir()
    return str(Path(os.path.abspath(local)).parent)
