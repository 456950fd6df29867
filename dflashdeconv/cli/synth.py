"""``dflashdeconv synth``: a synthetic spot store with known proportions."""

from __future__ import annotations

import time
from pathlib import Path

from .common import EXIT_OK, line_progress, print_summary


def add_parser(commands):
    p = commands.add_parser("synth", help="write a synthetic spot store with known proportions",
                            description="Write a synthetic tissue of --spots spots chunk by "
                                        "chunk, its single-cell reference (.h5ad) and the truth.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--spots", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=3000)
    p.add_argument("--types", type=int, default=15)
    p.add_argument("--depth", type=float, default=3900.0, help="mean UMI per spot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", help="reference .h5ad path (default: STORE_reference.h5ad)")
    p.add_argument("--chunk-rows", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..datasets import SyntheticTissue

    tissue = SyntheticTissue(n_spots=args.spots, n_genes=args.genes, n_types=args.types,
                             depth=args.depth, seed=args.seed)
    start = time.perf_counter()
    store = tissue.write_store(args.store, chunk_rows=args.chunk_rows,
                               progress=None if args.quiet else
                               (lambda done, total, p=line_progress(): p("writing", done, total)))
    reference = args.reference or str(Path(args.store.rstrip("/")).with_suffix("")) + "_reference.h5ad"
    tissue.reference().write_h5ad(reference)
    print_summary([("store", store.path), ("spots", f"{store.n_spots:,}"),
                   ("non-zeros per spot", f"{store.nnz / store.n_spots:.0f}"),
                   ("reference", reference), ("truth", "obsm/proportions of the store"),
                   ("time", f"{time.perf_counter() - start:.1f} s")])
    return EXIT_OK
