"""Streaming converters to spot stores: AnnData / h5ad, SpatialData tables, Stereo-seq GEM
and square-bin GEF, Visium HD. No converter holds the whole count matrix: rows are streamed
in the source's order, split by destination block into scratch files (an external bucket
sort), then each block is assembled in spatial order and appended to the store.
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Iterator
from pathlib import Path
from zlib import error as zlib_error

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.params import renamed
from ..core.validation import check_coords
from ..errors import InputError
from ..tables import annotated_centroids, layer_matrix
from .store import (
    SpotStore,
    _hilbert_2d,
    choose_chunk_rows,
    default_scratch,
    open_zarr,
    spatial_order,
)
from .writer import SCRATCH, BlockRows, StoreTarget, check_destination, write_store

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


FORMATS = ("h5ad", "spatialdata", "gem", "gef", "visium-hd")


def guess_format(path) -> str:
    """The converter for a source path, one of :data:`FORMATS`, from its suffix or content."""
    text, folder = str(path), Path(path)
    if text.endswith(".h5ad"):
        return "h5ad"
    if text.endswith((".gem", ".gem.gz", ".txt.gz", ".tsv.gz")):
        return "gem"
    if text.endswith(".gef"):
        return "gef"
    if (folder / "filtered_feature_bc_matrix.h5").exists():
        return "visium-hd"
    if (folder / "zarr.json").exists() or (folder / ".zgroup").exists():
        return "spatialdata"
    raise InputError(f"cannot tell the format of {text} (.h5ad, .gem[.gz], .gef, a Visium HD "
                     "binned folder or a SpatialData .zarr store): name it with --format "
                     "(command line) or format= (Python)")


def from_path(source, path, format: str | None = None, **kwargs) -> SpotStore:
    """Spot store from a source file or folder of ``format`` (default: guessed; ``kind`` is
    its deprecated name)."""
    if "kind" in kwargs:
        format = renamed("from_path", {"kind": kwargs.pop("kind")}, {"kind": "format"},
                         {"format": format})["format"]
    kind = format or guess_format(source)
    if kind == "spatialdata":
        import spatialdata as sd

        return from_spatialdata(sd.read_zarr(source), path, **kwargs)
    convert = {"h5ad": from_h5ad, "gem": from_gem, "gef": from_gef,
               "visium-hd": from_visium_hd}[kind]
    return convert(source, path, **kwargs)


# --------------------------------------------------------------------------- AnnData / h5ad
def _anndata_chunks(matrix, n_rows: int) -> Iterator:
    for start in range(0, n_rows, SOURCE_CHUNK_ROWS):
        rows = matrix[start:start + SOURCE_CHUNK_ROWS]
        yield start, rows if sparse.issparse(rows) else sparse.csr_matrix(np.asarray(rows))


def from_anndata(adata, path, *, spatial_key: str = "spatial", layer: str | None = None,
                 source: str = "AnnData", **kwargs) -> SpotStore:
    """Spot store from an AnnData (in memory or backed), read ``SOURCE_CHUNK_ROWS`` at a time."""
    matrix = layer_matrix(adata, layer, source)
    if spatial_key not in adata.obsm:
        raise InputError(f"{source}: coordinates missing: no obsm[{spatial_key!r}] "
                         f"(obsm has {list(adata.obsm)})")
    coords = np.asarray(adata.obsm[spatial_key])
    return write_sorted(path, adata.obs_names, adata.var_names, coords,
                        _anndata_chunks(matrix, adata.n_obs), source=source, **kwargs)


def from_h5ad(h5ad_path, path, **kwargs) -> SpotStore:
    """Spot store from an .h5ad file opened in backed mode (X streamed from disk)."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(h5ad_path, backed="r")
    except (OSError, KeyError) as error:
        raise InputError(f"{h5ad_path}: cannot be read as h5ad: {error}") from error
    try:
        return from_anndata(adata, path, source=str(h5ad_path), **kwargs)
    finally:
        adata.file.close()


def from_spatialdata(sdata, path, *, table_key: str | None = None, **kwargs) -> SpotStore:
    """Spot store from a SpatialData table (``table_key``, default the first; ``table`` is
    its deprecated name); coordinates from the table's ``obsm['spatial']`` or, failing
    that, from the centroids of the shapes the table annotates."""
    if "table" in kwargs:
        table_key = renamed("from_spatialdata", {"table": kwargs.pop("table")},
                            {"table": "table_key"}, {"table_key": table_key})["table_key"]
    tables = list(sdata.tables)
    if not tables:
        raise InputError("the SpatialData object has no table")
    table = table_key or tables[0]
    if table not in sdata.tables:
        raise InputError(f"no table {table!r} in the SpatialData object ({tables})")
    adata = sdata.tables[table]
    spatial_key = kwargs.get("spatial_key", "spatial")
    if spatial_key not in adata.obsm:
        import anndata as ad

        # a new AnnData over the same arrays: the caller's table is not touched
        adata = adata.to_memory() if adata.isbacked else adata
        adata = ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var, layers=dict(adata.layers),
                           obsm={spatial_key: annotated_centroids(sdata, adata, table)})
    return from_anndata(adata, path, source=f"SpatialData table {table!r}", **kwargs)


# --------------------------------------------------------------------------- Visium HD
def from_visium_hd(folder, path, *, gene_ids: bool = False, in_tissue_only: bool = True,
                   **kwargs) -> SpotStore:
    """Spot store from a Space Ranger binned output folder (``square_008um`` etc.).

    Reads ``filtered_feature_bc_matrix.h5`` barcode by barcode range (its CSC layout is
    the barcodes x genes CSR) and ``spatial/tissue_positions.parquet``; coordinates are
    full-resolution pixels (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``).
    Genes are named by symbol made unique (``-1``, ``-2``), or by ID with ``gene_ids``.
    """
    import h5py

    folder = Path(folder)
    matrix_file = folder / "filtered_feature_bc_matrix.h5"
    positions_file = folder / "spatial" / "tissue_positions.parquet"
    for file in (matrix_file, positions_file):
        if not file.exists():
            raise InputError(f"{file} not found: not a Visium HD binned output folder")
    positions = pd.read_parquet(positions_file)
    needed = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
              "pxl_col_in_fullres"]
    if list(positions.columns[:6]) != needed:
        raise InputError(f"{positions_file}: columns {list(positions.columns)}, expected {needed}")
    if positions["barcode"].duplicated().any():
        dup = positions["barcode"][positions["barcode"].duplicated()].iloc[0]
        raise InputError(f"{positions_file}: duplicate barcode {dup!r}")
    with h5py.File(matrix_file, "r") as f:
        group = f["matrix"]
        barcodes = pd.Index(np.asarray(group["barcodes"]).astype(str))
        features = group["features"]
        names = np.asarray(features["id" if gene_ids else "name"]).astype(str)
        genes = pd.Index(names) if gene_ids else _make_unique(names)
        n_genes, n_barcodes = (int(v) for v in group["shape"][:])
        if n_barcodes != barcodes.size or n_genes != genes.size:
            raise InputError(f"{matrix_file}: shape {(n_genes, n_barcodes)} does not match "
                             f"{genes.size} features and {barcodes.size} barcodes")
        table = positions.set_index("barcode")
        missing = ~barcodes.isin(table.index)
        if missing.any():
            raise InputError(f"{matrix_file}: {missing.sum()} barcode(s) not in {positions_file}, "
                             f"e.g. {barcodes[missing][0]!r}")
        table = table.loc[barcodes]
        keep = table["in_tissue"].to_numpy() == 1 if in_tissue_only else np.ones(barcodes.size, bool)
        coords = table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)[keep]
        indptr = np.asarray(group["indptr"], np.int64)

        def chunks():
            written = 0
            for start in range(0, n_barcodes, SOURCE_CHUNK_ROWS):
                stop = min(start + SOURCE_CHUNK_ROWS, n_barcodes)
                lo, hi = indptr[start], indptr[stop]
                rows = sparse.csr_matrix(
                    (np.asarray(group["data"][lo:hi], np.float32),
                     np.asarray(group["indices"][lo:hi]), indptr[start:stop + 1] - lo),
                    shape=(stop - start, n_genes))
                rows = rows[keep[start:stop]]
                yield written, rows
                written += rows.shape[0]

        return write_sorted(path, barcodes[keep], genes, coords, chunks(),
                            source=str(matrix_file), **kwargs)


def _make_unique(names: np.ndarray) -> pd.Index:
    """Gene symbols made unique the scanpy way: repeats get ``-1``, ``-2``, ..."""
    out = pd.Series(names)
    repeat = out.groupby(out).cumcount()
    out[repeat > 0] = out[repeat > 0] + "-" + repeat[repeat > 0].astype(str)
    return pd.Index(out)


# --------------------------------------------------------------------------- Stereo-seq GEM
GEM_COUNT_COLUMNS = ("MIDCount", "MIDCounts", "UMICount")


def _gem_header(file) -> tuple[int, list[str]]:
    """Number of leading ``#`` lines and the column names of a GEM file."""
    opener = gzip.open if str(file).endswith(".gz") else open
    try:
        with opener(file, "rt", encoding="utf-8") as handle:
            skipped = 0
            for line in handle:
                if line.startswith("#"):
                    skipped += 1
                    continue
                return skipped, line.rstrip("\n").split("\t")
    except (OSError, EOFError, UnicodeDecodeError, zlib_error) as error:
        raise InputError(f"{file}: cannot be read as a GEM file: {error}") from error
    raise InputError(f"{file}: no header line (empty GEM file)")


def _gem_frames(file, skip: int, chunk_lines: int):
    """The GEM data lines in chunks; a truncated, undecodable or malformed file raises
    :class:`InputError` naming it and the line reached."""
    line = skip + 2
    try:
        reader = pd.read_csv(file, sep="\t", skiprows=skip, header=0, chunksize=chunk_lines,
                             dtype=str, compression="infer", na_filter=False, encoding="utf-8")
        for frame in reader:
            yield frame
            line += len(frame)
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, zlib_error) as error:
        raise InputError(f"{file}: unreadable after line {line - 1} (truncated or corrupt "
                         f"file?): {error}") from error


def _gem_numbers(file, frame, column: str, first_line: int) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{file}: line {first_line + i}: {column} {frame[column].iloc[i]!r} "
                         "is not a number")
    return values


def _check_bin_size(bin_size) -> None:
    if not isinstance(bin_size, (int, np.integer)) or isinstance(bin_size, bool) or bin_size < 1:
        raise InputError(f"bin_size must be a positive integer, got {bin_size!r}")


def from_gem(gem_file, path, *, bin_size: int = 50, chunk_lines: int = 2_000_000,
             n_buckets: int = 64, scratch=None, progress=None, **kwargs) -> SpotStore:
    """Spot store from a Stereo-seq GEM file (``.gem`` or ``.gem.gz``) binned to ``bin_size``.

    Bins follow Stereopy's ``read_gem``: ``bin_x = (x // N) * N`` (likewise y), named
    ``str((bin_x << 32) | bin_y)``, positioned at the bin corner (DNB units). The file is
    streamed once (gzip is sequential) into scratch parquet buckets by position along the
    Hilbert curve; dask.dataframe then sums the buckets by (bin, gene), a few in parallel
    at a time, so memory stays bounded by a bucket.
    """
    _check_bin_size(bin_size)
    gem_file = str(gem_file)
    skip, columns = _gem_header(gem_file)
    count_column = next((c for c in GEM_COUNT_COLUMNS if c in columns), None)
    missing = [c for c in ("geneID", "x", "y") if c not in columns]
    if count_column is None or missing:
        raise InputError(f"{gem_file}: columns {columns}; need geneID, x, y and one of "
                         f"{GEM_COUNT_COLUMNS}")

    def records():
        line = skip + 2  # first data line (1-based)
        for frame in _gem_frames(gem_file, skip, chunk_lines):
            counts = _gem_numbers(gem_file, frame, count_column, line)
            x = _gem_numbers(gem_file, frame, "x", line)
            y = _gem_numbers(gem_file, frame, "y", line)
            bad = (counts < 0) | (x < 0) | (y < 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                what = f"{count_column} {counts[i]:g}" if counts[i] < 0 else "coordinate"
                raise InputError(f"{gem_file}: line {line + i}: negative {what}")
            yield frame["geneID"].to_numpy(), x, y, counts
            line += len(frame)
            if progress:
                progress("reading GEM", line - skip - 2, None)

    return _binned_store(records(), path, bin_size=bin_size, n_buckets=n_buckets,
                         scratch=scratch, progress=progress, empty=f"{gem_file}: no data lines",
                         source=f"{gem_file} (bin{bin_size})", **kwargs)


def from_gef(gef_file, path, *, bin_size: int = 50, gene_names: bool = False,
             read_rows: int = 5_000_000, n_buckets: int = 64, scratch=None, progress=None,
             **kwargs) -> SpotStore:
    """Spot store from a square-bin Stereo-seq GEF (HDF5) file, binned to ``bin_size``.

    Reads the finest ``/geneExp/bin{N}`` group with ``N`` dividing ``bin_size`` (its x/y are
    DNB coordinates, multiples of N) in slices of ``read_rows`` expression rows, and bins
    exactly as :func:`from_gem` does, so a GEF and the GEM written from it give the same
    store (GEF coordinates are taken as stored). Genes are named by their ID (``geneID``,
    or ``gene`` before GEF version 4), or by ``geneName`` made unique with
    ``gene_names=True``.
    """
    import h5py

    _check_bin_size(bin_size)
    gef_file = str(gef_file)
    try:
        handle = h5py.File(gef_file, "r")
    except OSError as error:
        raise InputError(f"{gef_file}: cannot be read as a GEF (HDF5) file: {error}") from error
    with handle:
        where, expression, gene_of_row, names = _gef_bin_group(handle, gef_file, bin_size,
                                                               gene_names)

        def records():
            for lo in range(0, expression.shape[0], read_rows):
                hi = min(lo + read_rows, expression.shape[0])
                try:
                    rows = expression[lo:hi]
                except (OSError, ValueError) as error:
                    raise InputError(f"{gef_file}: {where}/expression rows {lo}-{hi} cannot be "
                                     f"read: {error}") from error
                x, y = rows["x"].astype(np.float64), rows["y"].astype(np.float64)
                counts = rows["count"].astype(np.float64)
                bad = (counts < 0) | (x < 0) | (y < 0)
                if bad.any():
                    raise InputError(f"{gef_file}: {where}/expression row "
                                     f"{lo + int(np.flatnonzero(bad)[0])}: negative value")
                yield names[gene_of_row(lo, hi)], x, y, counts
                if progress:
                    progress("reading GEF", hi, expression.shape[0])

        return _binned_store(records(), path, bin_size=bin_size, n_buckets=n_buckets,
                             scratch=scratch, progress=progress,
                             empty=f"{gef_file}: {where} holds no expression",
                             source=f"{gef_file} (bin{bin_size})", **kwargs)


def _gef_bin_group(handle, gef_file: str, bin_size: int, gene_names: bool):
    """The bin group to read: its path, expression dataset, a function mapping expression
    rows to gene indices, and the gene names."""
    if "geneExp" not in handle:
        kind = "a cell-bin GEF" if "cellBin" in handle else "not a square-bin GEF"
        raise InputError(f"{gef_file}: no /geneExp group ({kind}); a square-bin GEF is needed")
    available = sorted(int(k[3:]) for k in handle["geneExp"] if k.startswith("bin") and k[3:].isdigit())
    usable = [n for n in available if bin_size % n == 0]
    if not usable:
        raise InputError(f"{gef_file}: no bin group divides bin_size {bin_size} "
                         f"(groups: {['bin%d' % n for n in available]})")
    where = f"/geneExp/bin{usable[0]}"
    group = handle[where]
    if "expression" not in group or "gene" not in group:
        raise InputError(f"{gef_file}: {where} needs datasets 'expression' and 'gene'")
    expression, table = group["expression"], group["gene"][...]
    missing = [f for f in ("x", "y", "count") if f not in (expression.dtype.names or ())]
    fields = table.dtype.names or ()
    id_field = "geneID" if "geneID" in fields else "gene"
    if missing or id_field not in fields or "offset" not in fields or "count" not in fields:
        raise InputError(f"{gef_file}: {where}: expression fields {expression.dtype.names}, gene "
                         f"fields {fields}; need x, y, count and gene/geneID, offset, count")
    if gene_names and "geneName" not in fields:
        raise InputError(f"{gef_file}: gene_names=True but {where}/gene has no geneName "
                         "(GEF version < 4): use gene IDs")
    raw = table["geneName" if gene_names else id_field]
    try:
        names = raw.astype(str) if raw.dtype.kind == "U" else np.char.decode(raw.astype(bytes), "utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{gef_file}: {where}/gene names are not UTF-8: {error}") from error
    names = _make_unique(names).to_numpy() if gene_names else names
    if not gene_names and pd.Index(names).has_duplicates:
        raise InputError(f"{gef_file}: {where}/gene repeats gene IDs")
    counts = table["count"].astype(np.int64)
    ends = np.cumsum(counts)
    if not np.array_equal(table["offset"].astype(np.int64), ends - counts) or \
            (ends[-1] if ends.size else 0) != expression.shape[0]:
        raise InputError(f"{gef_file}: {where}/gene offsets and counts do not tile the "
                         f"{expression.shape[0]} expression rows (corrupt file?)")

    def gene_of_row(lo: int, hi: int) -> np.ndarray:
        return np.searchsorted(ends, np.arange(lo, hi), side="right")

    return where, expression, gene_of_row, names


def _binned_store(records, path, *, bin_size: int, n_buckets: int, scratch, progress,
                  empty: str, source: str, **kwargs) -> SpotStore:
    """Spot store from DNB-level ``(gene names, x, y, counts)`` record batches, summed into
    ``bin_size`` bins through scratch parquet buckets along the Hilbert curve."""
    import dask.dataframe as dd

    check_destination(path, kwargs.get("overwrite", False))  # before reading the records
    gene_codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="dflashdeconv-bins-",
                                     dir=scratch or default_scratch(path)) as tmp:
        tmp = Path(tmp)
        for part, (genes, x, y, counts) in enumerate(records):
            for g in pd.unique(genes):
                gene_codes.setdefault(g, len(gene_codes))
            bx = (x // bin_size).astype(np.int64)
            by = (y // bin_size).astype(np.int64)
            key = _hilbert_2d(np.minimum(bx, 2**16 - 1), np.minimum(by, 2**16 - 1), 16)
            piece = pd.DataFrame({"key": key, "bin": (bx << 32) | by,
                                  "gene": pd.Series(genes).map(gene_codes).to_numpy(np.int32),
                                  "count": counts.astype(np.float32)})
            for bucket, rows in piece.groupby((key * n_buckets) >> 32):
                rows.to_parquet(tmp / f"b{bucket:04d}_{part:06d}.parquet")
        if not gene_codes:
            raise InputError(empty)
        names = np.array(list(gene_codes))
        order = np.argsort(names)  # genes sorted by name, as AnnData readers do
        remap = np.empty(names.size, np.int32)
        remap[order] = np.arange(names.size)
        groups = {}
        for f in sorted(tmp.glob("b*.parquet")):
            groups.setdefault(f.name[:5], []).append(str(f))
        # the raw records are read once: each bucket is summed (in parallel) into one
        # much smaller parquet part, which gives both the bins and then the rows
        aggregated = tmp / "aggregated"
        dd.from_map(_aggregate_bucket, list(groups.values()), remap=remap,
                    meta=_AGGREGATED_META, enforce_metadata=False).to_parquet(
            aggregated, write_index=False, write_metadata_file=False,
            name_function=lambda i: f"part.{i:06d}.parquet")
        parts = sorted(aggregated.glob("part.*.parquet"))
        bins = pd.concat([pd.read_parquet(f, columns=["key", "bin"]).drop_duplicates("bin")
                          for f in parts])
        bin_id = bins["bin"].to_numpy()
        bin_x, bin_y = (bin_id >> 32) * bin_size, (bin_id & 0xFFFFFFFF) * bin_size
        obs_names = ((bin_x << 32) | bin_y).astype(str)
        coords = np.column_stack([bin_x, bin_y]).astype(np.float64)

        def chunks():
            start = 0
            for part in parts:
                rows = _bucket_rows(pd.read_parquet(part), names.size)
                yield start, rows
                start += rows.shape[0]

        return write_sorted(path, obs_names, names[order], coords, chunks(), source=source,
                            progress=progress, **kwargs)


_AGGREGATED_META = pd.DataFrame({"key": pd.Series(dtype=np.int64), "bin": pd.Series(dtype=np.int64),
                                 "gene": pd.Series(dtype=np.int32),
                                 "count": pd.Series(dtype=np.float32)})


def _aggregate_bucket(files: list[str], remap: np.ndarray) -> pd.DataFrame:
    """Sum one bucket's GEM rows by (bin, gene); rows ordered by curve position, bin, gene."""
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame["gene"] = remap[frame["gene"].to_numpy()]
    summed = frame.groupby(["key", "bin", "gene"], sort=True, as_index=False)["count"].sum()
    return summed[summed["count"] > 0].astype({"count": np.float32})


def _bucket_rows(frame: pd.DataFrame, n_genes: int) -> sparse.csr_matrix:
    """CSR rows of an aggregated bucket, one row per bin, in the bucket's order."""
    bins = frame["bin"].to_numpy()
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    indptr = np.r_[starts, bins.size]
    return sparse.csr_matrix((frame["count"].to_numpy(), frame["gene"].to_numpy(), indptr),
                             shape=(starts.size, n_genes))
