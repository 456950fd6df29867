"""The FlashDeconv parameters, written once: names, defaults, allowed values and help.

Everything that takes model parameters is built from or tested against :data:`MODEL`:
``FlashDeconv`` (its ``__init__`` and scikit-learn ``_parameter_constraints``),
``tl.deconvolve``, the out-of-core engine (which validates through ``FlashDeconv``) and the
``dflashdeconv deconvolve`` options (generated from it). Plain Python only, so that the
command line can build its options without loading numpy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

GRAPH_METHODS = ("knn", "radius", "grid")
PREPROCESSINGS = ("log_cpm", "pearson", "raw")
WEIGHTINGS = ("expected", "countsketch")
#: Refinements of the fit on the raw counts (core.refine); "auto" is the most accurate one.
REFINEMENTS = ("none", "wls", "nb", "auto")
AUTO_REFINEMENT = "nb"


@dataclass(frozen=True)
class Parameter:
    """One model parameter.

    ``kind``: "int" / "float" (with ``minimum``; ``open_minimum`` excludes it), "choice"
    (one of ``choices``), "auto_or_float" ("auto" or a float >= ``minimum``),
    "optional_float" (None or a float > ``minimum``), "bool", "seed" (an int >= 0) or
    "jobs" (scikit-learn's ``n_jobs``: None, a positive or a negative int).
    """

    name: str
    default: object
    kind: str
    help: str
    choices: tuple = ()
    minimum: float | None = None
    open_minimum: bool = False
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


MODEL = (
    Parameter("sketch_dim", 512, "int", "CountSketch buckets d (the gene weights of 'expected', "
              "the sketch size of 'countsketch')", minimum=1),
    Parameter("lambda_spatial", "auto", "auto_or_float",
              "graph-Laplacian strength: 'auto' (0.005 x mean Gram diagonal / mean degree) or "
              "a number >= 0", minimum=0),
    Parameter("rho_sparsity", 0.01, "float", "L1 penalty as a fraction of the mean Gram "
              "diagonal", minimum=0),
    Parameter("n_hvg", 2000, "int", "highly variable genes of the spots kept", minimum=0),
    Parameter("n_markers_per_type", 50, "int", "marker genes kept per reference cell type",
              minimum=0),
    Parameter("spatial_method", "knn", "choice", "spatial graph", choices=GRAPH_METHODS),
    Parameter("k_neighbors", 6, "int", "neighbours per spot of the knn graph", minimum=0),
    Parameter("radius", None, "optional_float", "neighbour radius of spatial_method='radius' "
              "(coordinate units)", minimum=0, open_minimum=True),
    Parameter("max_iter", 1000, "int", "solver iterations at most", minimum=0),
    Parameter("tol", 1e-4, "float", "stop when no abundance moves by more than tol x the "
              "largest abundance in one iteration", minimum=0, open_minimum=True),
    Parameter("preprocess", "log_cpm", "choice", "preprocessing of spots and reference",
              choices=PREPROCESSINGS),
    Parameter("random_state", 0, "seed", "seed of the 'countsketch' hashing (unused by "
              "'expected')"),
    Parameter("verbose", False, "bool", "log each phase (logger 'dflashdeconv')", cli=False),
    Parameter("gene_weighting", "expected", "choice", "gene weighting",
              choices=WEIGHTINGS),
    Parameter("refine", "none", "choice", "refinement on the raw counts after the fit: 'none' "
              "(the reference package's result), 'wls' (Poisson-weighted NNLS), 'nb' "
              "(negative-binomial weights and gene platform factors) or 'auto' (= 'nb', the "
              "most accurate)", choices=REFINEMENTS),
    Parameter("n_jobs", None, "jobs", "threads of the in-memory kernels: None or -1 = every "
              "core the process may use, -2 = all but one; out of core each worker's threads "
              "decide", cli=False),
)

#: Parameters that change how a fit runs, not its result (left out of a run's fingerprint).
EXECUTION = ("verbose", "n_jobs")

#: Names of the model parameters, in ``FlashDeconv.__init__`` order.
MODEL_NAMES = tuple(p.name for p in MODEL)
DEFAULTS = {p.name: p.default for p in MODEL}


def renamed(function: str, kwargs: dict, renames: dict[str, str], values: dict,
            defaults: dict | None = None) -> dict:
    """Resolve deprecated keyword names: ``kwargs`` holds what a function received beyond
    its signature, ``renames`` maps old -> new names, ``values`` the new names' current
    values and ``defaults`` their defaults (None where absent). Returns ``values`` updated;
    warns (FutureWarning) for each old name used, and raises TypeError for unknown names or
    an old name given beside a new name set to something else than its default."""
    values, defaults = dict(values), defaults or {}
    for old, value in kwargs.items():
        if old not in renames:
            raise TypeError(f"{function}() got an unexpected keyword argument {old!r}")
        new = renames[old]
        if values.get(new) != defaults.get(new):
            raise TypeError(f"{function}() got both {old!r} and its new name {new!r}")
        warnings.warn(f"{function}(): {old!r} is deprecated and will be removed in the next "
                      f"release; use {new!r}", FutureWarning, stacklevel=3)
        values[new] = value
    return values


def params_record(params: dict, *, lambda_used, types, n_genes_used: int, converged: bool,
                  n_iterations: int, changes, n_zero_signal: int) -> dict:
    """The ``uns[key + '_params']`` record of a run, the same for AnnData and spot stores:
    the model parameters (a missing radius as -1, storable) and how the fit went."""
    return {
        **{k: v for k, v in params.items() if k not in ("verbose", "radius", "n_jobs")},
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
