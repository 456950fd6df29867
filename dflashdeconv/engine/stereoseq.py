"""Stereo-seq readers: GEM text (gzip streamed once) and square-bin GEF (HDF5, read in
slices), both binned by one code path into scratch parquet buckets by position along the
Hilbert curve, then written through :func:`~dflashdeconv.engine.convert.write_sorted`.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from zlib import error as zlib_error

import numpy as np
import pandas as pd
from scipy import sparse

from ..core.order import hilbert_distance
from ..errors import InputError
from .convert import unique_names, write_sorted
from .store import SpotStore, default_scratch
from .writer import check_destination

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
    names = unique_names(names).to_numpy() if gene_names else names
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
            key = hilbert_distance(np.minimum(bx, 2**16 - 1), np.minimum(by, 2**16 - 1), 16)
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
