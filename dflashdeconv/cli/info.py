"""``dflashdeconv info``: what a spot store holds and the state of its results."""

from __future__ import annotations

from .common import EXIT_OK, add_output_options, print_summary


def add_parser(commands):
    p = commands.add_parser("info", help="describe a spot store and its results")
    p.add_argument("store", metavar="STORE")
    add_output_options(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..engine.results import stored_runs
    from ..engine.store import SpotStore
    from ..errors import InputError
    from ..io import anndata_kind

    kind = anndata_kind(args.store, "STORE")
    if kind != "store":
        raise InputError(f"{args.store} is {'an AnnData' if kind == 'anndata' else 'a SpatialData store'}"
                         ", not a spot store: `info` describes spot stores (`dflashdeconv ingest` "
                         "converts it into one)")
    store = SpotStore.open(args.store)
    lines = [("store", store.path), ("source", store.source), ("spots", f"{store.n_spots:,}"),
             ("genes", f"{store.n_genes:,}"), ("non-zeros", f"{store.nnz:,} "
              f"({store.nnz / max(store.n_spots, 1):.0f} per spot)"),
             ("blocks", f"{store.n_blocks} x {store.chunk_rows} rows")]
    for key, params, state in stored_runs(store):
        if params is not None:
            lines.append((f"result {key!r}",
                          f"{params['n_cell_types']} types, "
                          f"{'converged' if params['converged'] else 'NOT converged'}"
                          f" in {params['n_iterations']} iterations, "
                          f"preprocess={params['preprocess']}, "
                          f"weighting={params['gene_weighting']}"))
        elif state is not None:
            lines.append((f"run {key!r}", "interrupted; `deconvolve --resume` continues it"))
    print_summary(lines)
    return EXIT_OK
