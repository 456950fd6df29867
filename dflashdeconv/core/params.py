"""The record of a fit's parameters, shared by the in-memory and the out-of-core paths."""

from __future__ import annotations


def params_record(params: dict, *, lambda_used, types, n_genes_used: int, converged: bool,
                  n_iterations: int, changes, n_zero_signal: int) -> dict:
    """The ``uns[key + '_params']`` record of a run, the same for AnnData and spot stores:
    the model parameters (a missing radius as -1, storable) and how the fit went."""
    return {
        **{k: v for k, v in params.items() if k not in ("verbose", "radius")},
        "radius": -1.0 if params["radius"] is None else float(params["radius"]),
        "lambda_spatial": float(lambda_used),
        "lambda_spatial_requested": str(params["lambda_spatial"]),
        "n_genes_used": int(n_genes_used),
        "n_cell_types": len(types),
        "cell_type_names": [str(t) for t in types],
        "converged": bool(converged),
        "n_iterations": int(n_iterations),
        "changes": [float(c) for c in changes],
        "n_zero_signal": int(n_zero_signal),
    }
