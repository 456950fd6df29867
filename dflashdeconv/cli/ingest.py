"""``dflashdeconv ingest``: h5ad / SpatialData / GEM / GEF / Visium HD to a spot store."""

from __future__ import annotations

import time

from .common import (
    EXIT_OK,
    add_deprecated_flag,
    add_output_options,
    line_progress,
    positive_int,
    print_summary,
)


def add_parser(commands):
    p = commands.add_parser("ingest", help="convert h5ad / SpatialData / GEM / GEF / Visium HD to a spot store",
                            description="Stream INPUT into a spot store (AnnData zarr, rows in "
                                        "spatial order), never holding the whole matrix.")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--format", default="auto",
                   choices=("auto", "h5ad", "spatialdata", "gem", "gef", "visium-hd"))
    p.add_argument("--bin-size", type=positive_int, default=50,
                   help="GEM/GEF bin size in DNB (default: %(default)s)")
    p.add_argument("--table-key", help="SpatialData table name (default: the only table)")
    add_deprecated_flag(p, "--table", "--table-key", "table_key")
    p.add_argument("--spatial-key", default="spatial",
                   help="obsm key of the coordinates (h5ad; default: %(default)s)")
    p.add_argument("--layer", help="counts layer (h5ad; default: X)")
    p.add_argument("--chunk-rows", type=positive_int,
                   help="spots per block (default: from the data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE")
    add_output_options(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..engine import ingest

    progress = None if args.quiet else line_progress()
    start = time.perf_counter()
    kind = args.format if args.format != "auto" else ingest.guess_format(args.input)
    options = {"h5ad": dict(spatial_key=args.spatial_key, layer=args.layer),
               "spatialdata": dict(table_key=args.table_key), "gem": dict(bin_size=args.bin_size),
               "gef": dict(bin_size=args.bin_size)}.get(kind, {})
    store = ingest.from_path(args.input, args.store, kind, chunk_rows=args.chunk_rows,
                             overwrite=args.overwrite, progress=progress, **options)
    print_summary([("store", store.path), ("spots", f"{store.n_spots:,}"),
                   ("genes", f"{store.n_genes:,}"), ("non-zeros", f"{store.nnz:,}"),
                   ("blocks", f"{store.n_blocks} x {store.chunk_rows} rows"),
                   ("time", f"{time.perf_counter() - start:.1f} s")])
    return EXIT_OK
