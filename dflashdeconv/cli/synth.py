"""``dflashdeconv synth``: a synthetic spot store with known proportions."""

from __future__ import annotations

import time
from pathlib import Path

from .common import (
    EXIT_OK,
    add_deprecated_flag,
    add_output_options,
    line_progress,
    positive_float,
    positive_int,
    print_summary,
)


def add_parser(commands):
    p = commands.add_parser("synth", help="write a synthetic spot store with known proportions",
                            description="Write a synthetic tissue of --spots spots chunk by "
                                        "chunk, its single-cell reference (.h5ad) and the truth.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--spots", type=positive_int, default=100_000,
                   help="spots (default: %(default)s)")
    p.add_argument("--genes", type=positive_int, default=3000, help="genes (default: %(default)s)")
    p.add_argument("--types", type=positive_int, default=15,
                   help="cell types (default: %(default)s)")
    p.add_argument("--depth", type=positive_float, default=3900.0,
                   help="mean UMI per spot (default: %(default)s)")
    p.add_argument("--random-state", type=int, default=0, help="seed (default: %(default)s)")
    add_deprecated_flag(p, "--seed", "--random-state", "random_state", type=int)
    p.add_argument("--reference", help="reference .h5ad path (default: STORE_reference.h5ad)")
    p.add_argument("--chunk-rows", type=positive_int,
                   help="spots per block (default: from the data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing STORE")
    add_output_options(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..datasets import SyntheticTissue
    from ..engine.writer import check_destination
    from ..errors import InputError

    try:
        tissue = SyntheticTissue(n_spots=args.spots, n_genes=args.genes, n_types=args.types,
                                 depth=args.depth, seed=args.random_state)
    except ValueError as error:
        raise InputError(str(error)) from None
    check_destination(args.store, args.overwrite)
    reference = args.reference or str(Path(args.store.rstrip("/")).with_suffix("")) + "_reference.h5ad"
    start = time.perf_counter()
    store = tissue.write_store(args.store, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
                               progress=None if args.quiet else
                               (lambda done, total, p=line_progress(): p("writing", done, total)))
    tissue.reference().write_h5ad(reference)
    print_summary([("store", store.path), ("spots", f"{store.n_spots:,}"),
                   ("non-zeros per spot", f"{store.nnz / store.n_spots:.0f}"),
                   ("reference", reference), ("truth", "obsm/proportions of the store"),
                   ("time", f"{time.perf_counter() - start:.1f} s")])
    return EXIT_OK
