"""``dflashdeconv info``: what a spot store holds and the state of its results."""

from __future__ import annotations

from .common import EXIT_OK, print_summary


def add_parser(commands):
    p = commands.add_parser("info", help="describe a spot store and its results")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..engine.results import stored_runs
    from ..engine.store import SpotStore

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
            lines.append((f"run {key!r}", f"incomplete ({state})"))
    print_summary(lines)
    return EXIT_OK
