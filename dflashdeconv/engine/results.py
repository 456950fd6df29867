"""Results written back into a spot store without touching the input, and never half-visible.

For ``key_added = K`` a run works in ``uns/K_run`` (intermediates ``H``, ``ysq``,
``selected_totals``, ``beta`` and the ``staging`` group). Blocks write their rows of the
results into ``staging``; when all are written they are published:

    obsm/K                 proportions (AnnData DataFrame: one column per cell type)
    obs/K_dominant         dominant type (categorical)
    obs/K_zero_signal      spots without counts on the used genes
    uns/K_params           parameters and convergence, written last: the completion mark

On a local file system publishing is a directory rename (atomic); on object stores the
arrays are copied. :func:`read_results` refuses a key without ``uns/K_params``.
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pandas as pd

from ..errors import DataWarning, InputError
from .cluster import worker_task
from .elements import ALL_CHUNKS, array_element, dict_group, encoded, row_array
from .store import SpotStore, fast_codec, local_path, open_zarr

INPUT_KEYS = {"spatial", "input_row", "_index"}


def run_group_name(key: str) -> str:
    return f"{key}_run"


def open_run(store: SpotStore, key: str, cell_types, fingerprint: str, *, overwrite: bool = False,
             resume: bool = False) -> tuple[str, dict]:
    """The run group ``uns/K_run`` for a new run, or the recorded one to resume.

    Returns its path and the attributes recorded so far (``selection`` after the
    statistics pass, ``checkpoint`` after solver rounds). A resumed run must have the same
    ``fingerprint`` (inputs and parameters); with nothing recorded, ``resume`` starts a new
    run (so a batch job can always pass it). A new run refuses to replace results unless
    ``overwrite``.
    """
    if not key or "/" in key or key in INPUT_KEYS:
        raise InputError(f"key_added {key!r} is not allowed (reserved or contains '/')")
    names = pd.Index([str(t) for t in cell_types])
    if names.duplicated().any() or any("/" in t or t in ("", ".", "..") for t in names):
        raise InputError(f"cell type names must be unique, non-empty and free of '/': {list(names)}")
    root = store.root("r+")
    run_name = run_group_name(key)
    run_path = f"{store.path.rstrip('/')}/uns/{run_name}"
    if resume and run_name in root["uns"]:
        attrs = dict(root["uns"][run_name].attrs)
        if attrs.get("fingerprint") != fingerprint:
            raise InputError(f"the run under {key!r} in {store.path} used other inputs or "
                             "parameters; start a new run (without --resume) or use them")
        return run_path, attrs
    if key in root["obsm"] and f"{key}_params" not in root["uns"] and run_name not in root["uns"]:
        raise InputError(f"obsm/{key} in {store.path} was not written by dflashdeconv; "
                         "choose another key_added")
    if (key in root["obsm"] or f"{key}_params" in root["uns"]) and not overwrite:
        raise InputError(f"{store.path} already holds results under {key!r}: replace them with "
                         "--overwrite (overwrite=True), or write under another --key-added "
                         "(key_added=)")
    if run_name in root["uns"]:
        if root["uns"][run_name].attrs.get("status") != "complete":
            warnings.warn(f"{store.path}: the interrupted run under {key!r} is started over; "
                          "--resume (resume=True) continues it instead", DataWarning,
                          stacklevel=4)
        del root["uns"][run_name]
    n, K, rows = store.n_spots, len(cell_types), store.chunk_rows
    run = dict_group(root["uns"], run_name)
    for name, shape in (("H", (n, K)), ("beta", (n, K)), ("ysq", (n,)), ("selected_totals", (n,))):
        row_array(run, name, shape, np.float64, rows)
    array_element(run, "beta_checkpoint", (2, n, K), np.float64, (1, rows, K),
                  compressors=fast_codec())
    done = array_element(run, "projected", (store.n_blocks,), bool, (1,), fill_value=False)
    done[...] = False
    run.attrs.update({"status": "running", "cell_types": list(names), "fingerprint": fingerprint})
    return run_path, dict(run.attrs)


def prepare_staging(store: SpotStore, key: str, run_path: str) -> None:
    """Fresh staging arrays for the results; leftovers of a publish that was interrupted
    (results without ``uns/K_params``) are removed first."""
    root = store.root("r+")
    if f"{key}_params" not in root["uns"]:
        for group, name in (("obsm", key), ("obs", f"{key}_dominant"), ("obs", f"{key}_zero_signal")):
            if name in root[group]:
                del root[group][name]
    run = open_zarr(run_path, "r+")
    if "staging" in run:
        del run["staging"]
    names = list(run.attrs["cell_types"])
    n, rows = store.n_spots, store.chunk_rows
    staging = dict_group(run, "staging")
    frame = encoded(staging.require_group("proportions"), "dataframe")
    frame.attrs.update({"_index": "_index", "column-order": names})
    for name in names:
        row_array(frame, name, (n,), np.float64, rows)
    row_array(staging, "dominant_codes", (n,), np.int16, rows)
    row_array(staging, "zero_signal", (n,), bool, rows)


def record_halos(run_path: str, halos: list) -> None:
    """The solver halo of every block (the spots of other blocks its graph rows reach), as
    a ragged array: ``halo_rows[halo_indptr[b]:halo_indptr[b + 1]]`` for block b."""
    run = open_zarr(run_path, "r+")
    indptr = np.concatenate([[0], np.cumsum([len(h) for h in halos])]).astype(np.int64)
    rows = np.concatenate(halos).astype(np.int64) if halos else np.empty(0, np.int64)
    for name, values in (("halo_indptr", indptr), ("halo_rows", rows)):
        array_element(run, name, values.shape, np.int64, (max(values.size, 1),))[...] = values


def record(run_path: str, **attrs) -> None:
    """Record progress (``selection``, ``checkpoint``, ``status``) in the run group."""
    open_zarr(run_path, "r+").attrs.update(attrs)


@worker_task
def write_block_results(store: SpotStore, run_path: str, block: int, slot: int | None,
                        refinement=None) -> tuple[int, np.ndarray]:
    """One block's rows of ``beta`` (the solver's, at checkpoint ``slot``), proportions,
    dominant type and zero-signal flag. ``refinement = (gene_pos, model)`` refines the
    proportions first (phase 2, on the block's counts). Returns the number of zero-signal
    spots and the global rows of spots whose refinement failed."""
    from ..core.solver import normalize_proportions
    from .refine import refine_block
    from .solve import read_beta

    start, stop = store.block_rows(block)
    run = open_zarr(run_path, "r+")
    names = run.attrs["cell_types"]
    beta = read_beta(run, slot, start, stop, len(names))
    proportions, all_zero = normalize_proportions(beta)
    failed = np.empty(0, np.int64)
    if refinement is not None:
        proportions, failed = refine_block(store, block, *refinement, beta)
    run["beta"][start:stop] = beta
    frame = run["staging"]["proportions"]
    for k, name in enumerate(names):
        frame[name][start:stop] = proportions[:, k]
    run["staging"]["dominant_codes"][start:stop] = np.argmax(proportions, axis=1).astype(np.int16)
    zero = all_zero | (np.asarray(run["selected_totals"][start:stop]) <= 0)
    run["staging"]["zero_signal"][start:stop] = zero
    return int(zero.sum()), failed


def _move(store: SpotStore, source: str, target: str) -> None:
    """Move a zarr node inside the store: a rename on disk, else a copy then delete."""
    local = local_path(store.path)
    if local is not None:
        if (local / target).exists():
            shutil.rmtree(local / target)
        os.rename(local / source, local / target)
        return
    root = store.root("r+")
    src = root[source]
    parent_path, _, name = target.rpartition("/")
    parent = root[parent_path]
    if name in parent:
        del parent[name]
    _copy_node(src, parent, name)
    del root[source.rpartition("/")[0]][source.rpartition("/")[2]]


def _copy_array(src, parent, name):
    """Copy a zarr array (same data type, chunks, codecs and attributes) a row chunk at a
    time, so that memory follows the chunk size."""
    v3 = src.metadata.zarr_format == 3
    codecs = {"serializer": src.serializer} if v3 else {}
    out = parent.create_array(name, shape=src.shape,
                              dtype=src.metadata.data_type if v3 else src.metadata.dtype,
                              chunks=src.chunks, compressors=src.compressors,
                              filters=src.filters, overwrite=True, config=ALL_CHUNKS, **codecs)
    step = src.chunks[0] if src.ndim else 1
    for start in range(0, src.shape[0] if src.ndim else 1, max(step, 1)):
        rows = slice(start, start + step) if src.ndim else ...
        out[rows] = src[rows]
    out.attrs.update(src.attrs.asdict())
    return out


def _copy_node(src, parent, name):
    import zarr

    if isinstance(src, zarr.Array):
        _copy_array(src, parent, name)
        return
    group = parent.create_group(name)
    group.attrs.update(src.attrs.asdict())
    for child_name, child in src.members():
        _copy_node(child, group, child_name)


def publish(store: SpotStore, key: str, params: dict) -> None:
    """Make a complete run visible: obsm/K, obs columns, then uns/K_params last."""
    from anndata.io import write_elem

    root = store.root("r+")
    run_name = run_group_name(key)
    run = root["uns"][run_name]
    cell_types = list(run.attrs["cell_types"])
    staging = run["staging"]
    obs = root["obs"]
    _copy_array(obs[obs.attrs.get("_index", "_index")], staging["proportions"], "_index")
    codes = np.asarray(staging["dominant_codes"][...])
    write_elem(staging, "dominant", pd.Categorical.from_codes(codes, categories=cell_types))
    _move(store, f"uns/{run_name}/staging/proportions", f"obsm/{key}")
    _move(store, f"uns/{run_name}/staging/dominant", f"obs/{key}_dominant")
    _move(store, f"uns/{run_name}/staging/zero_signal", f"obs/{key}_zero_signal")
    root = store.root("r+")
    obs = root["obs"]
    order = [c for c in obs.attrs.get("column-order", []) if c not in (f"{key}_dominant",
                                                                        f"{key}_zero_signal")]
    obs.attrs["column-order"] = order + [f"{key}_dominant", f"{key}_zero_signal"]
    root["uns"][run_name].attrs["status"] = "complete"
    if f"{key}_params" in root["uns"]:
        del root["uns"][f"{key}_params"]
    write_elem(root["uns"], f"{key}_params", params)


def stored_runs(store: SpotStore):
    """``(key, params, status)`` of every result or run recorded in the store: ``params``
    of a completed run (else None) and the state of a run that is not complete (else None)."""
    from anndata.io import read_elem

    uns = store.root()["uns"]
    for name in sorted(uns):
        if name.endswith("_params"):
            yield name[:-len("_params")], read_elem(uns[name]), None
        elif name.endswith("_run") and uns[name].attrs.get("status") != "complete":
            yield name[:-len("_run")], None, uns[name].attrs.get("status", "interrupted")


def read_results(path, key: str = "flashdeconv") -> pd.DataFrame:
    """Proportions of a completed run (DataFrame spots x cell types)."""
    from anndata.io import read_elem

    root = open_zarr(path, "r")
    if f"{key}_params" not in root["uns"]:
        raise InputError(f"{path} holds no completed results under {key!r}")
    return read_elem(root["obsm"][key])


def read_store_view(path, key: str = "flashdeconv"):
    """AnnData with a store's results, coordinates and obs but not its counts (for plots)."""
    import anndata as ad
    from anndata.io import read_elem

    proportions = read_results(path, key)
    root = open_zarr(path, "r")
    view = ad.AnnData(obs=read_elem(root["obs"]))
    view.obsm["spatial"] = np.asarray(root["obsm"]["spatial"][...])
    view.obsm[key] = proportions
    view.uns[f"{key}_params"] = read_elem(root["uns"][f"{key}_params"])
    return view
