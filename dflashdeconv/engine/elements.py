"""AnnData elements in zarr that many tasks fill block by block.

anndata's ``write_elem`` writes an element from memory in one call; the engine's per-spot
arrays are created empty and filled by one task per block, so they are created here, with
the encoding attributes anndata's readers expect, in one place.
"""

from __future__ import annotations

from .store import fast_codec

#: Store every chunk, also all-zero ones: a missing chunk then always means damage.
ALL_CHUNKS = {"write_empty_chunks": True}


def encoded(node, encoding: str, version: str = "0.2.0"):
    """``node`` marked as an AnnData element of ``encoding``."""
    node.attrs.update({"encoding-type": encoding, "encoding-version": version})
    return node


def dict_group(parent, name: str):
    """A group that anndata reads as a dict (created if missing)."""
    return encoded(parent.require_group(name), "dict", "0.1.0")


def array_element(group, name, shape, dtype, chunks, **options):
    """An array that anndata reads as an array element, replacing any of that name
    (``options`` go to zarr)."""
    array = group.create_array(name, shape=shape, dtype=dtype, overwrite=True, chunks=chunks,
                               config=ALL_CHUNKS, **options)
    return encoded(array, "array")


def row_array(group, name, shape, dtype, chunk_rows):
    """A per-spot array chunked like the store's blocks."""
    return array_element(group, name, shape, dtype, (chunk_rows, *shape[1:]),
                         compressors=fast_codec())
