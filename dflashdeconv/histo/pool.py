"""The GPU worker pool: histology tasks on Dask workers that declare ``GPU=1``.

Torch tasks (training, sampling, torch encoders) are submitted with
``resources={"GPU": 1}`` when the cluster has such workers (``dask worker ADDRESS
--resources GPU=1``, one worker per GPU) and run on the device
:func:`~dflashdeconv.histo.devices.task_device` picks there; without them the same tasks
run on any worker, on CPU. Tiles for the morphology encoder go to every worker (each
embeds on its own device: reading and stain-normalising tiles is CPU work).
Workers read their own tiles from the lazy slide, so only coordinates go out and only
features come back.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.threads import limit
from ..engine.cluster import worker_threads
from ..errors import InputError
from .devices import gpu_task_options, task_device
from .encoders import (
    Encoder,
    encoder_identity,
    features_key,
    get_encoder,
    stain_normalized,
    wants_gpu,
)
from .image import SlideImage, TileSpec, cache_dir
from .stain import StainEstimate, normalize_stains, slide_stains

#: Tile pixels read and embedded per task (bounds a task's memory: 77 MB of RGB, 512
#: tiles of 224 px or 128 of 448 px).
PIXELS_PER_TASK = 512 * 224 * 224

# Encoders built in this worker process, by (name, weights, options): weights load once.
_ENCODERS: dict[tuple, Encoder] = {}


@dataclass(frozen=True)
class TaskRecord:
    """Where a task ran."""

    worker: str
    device: str


def _record() -> TaskRecord:
    from distributed import get_worker

    try:
        address = get_worker().address
    except ValueError:  # run in the client process, not on a worker
        address = "local"
    return TaskRecord(address, task_device())


@contextlib.contextmanager
def task_threads():
    """numba's kernels and torch's CPU operations of a torch task on the worker's threads
    (:func:`~dflashdeconv.engine.cluster.worker_threads`).

    numba's OpenMP pool, when it starts in a thread (at its first kernel or thread query,
    e.g. STFlow's neighbour spacing), sets that thread's OpenMP thread count to every core,
    and torch shares that libgomp: each single-threaded worker of a 2-core LocalCluster
    then ran torch on 2 threads (the ~4k-spot pipeline on 2 cores took 212 s instead of
    177 s). The pool starts here first, then torch's count is set.
    """
    import torch

    n_threads = worker_threads()
    with limit(n_threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def _worker_encoder(encoder, weights, options) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder
    key = (encoder, None if weights is None else str(weights), tuple(sorted(options.items())))
    if key not in _ENCODERS:
        _ENCODERS[key] = get_encoder(encoder, weights=weights, **options)
    return _ENCODERS[key]


def embed_task(slide: SlideImage, centres: np.ndarray, spec: TileSpec, encoder, weights=None,
               options: dict | None = None, stains: StainEstimate | None = None
               ) -> tuple[np.ndarray, TaskRecord]:
    """Read the tiles at ``centres`` from the slide (re-rendered with the reference stains
    when given the slide's ``stains``) and embed them on this worker's device."""
    record = _record()
    model = _worker_encoder(encoder, weights, options or {})
    tiles = slide.read_tiles(centres, spec)
    if stains is not None:
        tiles = normalize_stains(tiles, stains)
    # numpy encoders use neither torch nor numba's kernels: nothing to hold
    with task_threads() if model.uses_torch else contextlib.nullcontext():
        return model.embed(tiles, device=record.device), record


def train_task(model, features, coords, expression, slide_ids, gene_names, metadata):
    """Fit an unfitted :class:`~dflashdeconv.histo.stflow.STFlow` on this worker's device;
    the fitted model comes back on CPU (a client without a GPU can unpickle it)."""
    record = _record()
    model.set_params(device=record.device)
    with task_threads():
        model.fit(features, coords, expression, slide_ids, gene_names=gene_names,
                  metadata=metadata)
    model.model_.to("cpu")
    model.set_params(device=None)
    return model, record


def sample_task(model, features, coords, slide_ids=None):
    """:meth:`STFlow.sample <dflashdeconv.histo.stflow.STFlow.sample>` on this worker's
    device (a fitted member of an ensemble: see ``fitted_members``)."""
    record = _record()
    model.model_.to(record.device)  # sampling runs where the network's weights are
    try:
        with task_threads():
            return model.sample(features, coords, slide_ids), record
    finally:
        model.model_.to("cpu")


def train_ensemble(client, model, features, coords, expression, slide_ids, gene_names,
                   metadata, description: str | None = None):
    """Fit an unfitted STFlow with one task per network of its ensemble (``members()``,
    on the GPU workers when the cluster has them) and join them: the fitted model equals
    one fitted whole. Returns it and the task records."""
    # the data go out once, under keys of their own (an earlier call's copy of the same
    # data may still be being released)
    data = client.scatter([features, coords, expression, slide_ids], hash=False, broadcast=False)
    futures = [submit(client, train_task, member, *data, gene_names, metadata)
               for member in model.members()]
    trained = gather(futures, description)
    return type(model).from_members([member for member, _ in trained]), [r for _, r in trained]


def sample_ensemble(client, model, features, coords, description: str | None = None):
    """Expression predicted by a fitted STFlow with one sampling task per network
    (``fitted_members()``): the mean of their samples, mapped back to expression. Returns
    it and the task records."""
    data = client.scatter([features, coords], hash=False, broadcast=False)
    futures = [submit(client, sample_task, member, *data) for member in model.fitted_members()]
    sampled = gather(futures, description)
    mean = np.mean([part for part, _ in sampled], axis=0)
    return model.to_expression(mean), [r for _, r in sampled]


def submit(client, function, *args, gpu: bool = True, **kwargs):
    """``client.submit`` that sends the task to a GPU worker when the cluster has one
    (and ``gpu``), else to any worker."""
    options = gpu_task_options(client) if gpu else {}
    return client.submit(function, *args, pure=False, **options, **kwargs)


def gather(futures, description: str | None = None):
    """Results of ``futures`` in order, with a progress bar (on stderr, like the engine's)
    when ``description`` is given."""
    from ..engine.progress import track

    return [f.result() for f in track(futures, description or "", enabled=description is not None)]


def _spatial_order(centres: np.ndarray, side: float) -> np.ndarray:
    """Row-major order of tiles by bands of one tile height: neighbours share chunks."""
    band = np.floor(centres[:, 1] / max(side, 1e-9))
    return np.lexsort((centres[:, 0], band))


def embed_tiles(client, slide: SlideImage, centres, spec: TileSpec, encoder="morphology", *,
                weights=None, options: dict | None = None, cache=None, use_cache: bool = True,
                tiles_per_task: int | None = None, description: str | None = None):
    """Features (n, F) of the tiles of ``spec`` at ``centres`` and the task records.

    Tasks of ``tiles_per_task`` tiles (default: :data:`PIXELS_PER_TASK` worth) run on the
    GPU workers for a torch encoder, on all workers for a CPU one. Features are cached per
    (slide, tile spec, encoder, centres) under ``cache_dir(cache)/features``; a cached
    result is returned without any task. For an encoder that wants it
    (:func:`~dflashdeconv.histo.encoders.stain_normalized`) the slide's stains are
    estimated once, in the caller, from tiles spread over its tissue.
    """
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    if len(centres) == 0:
        raise InputError("no tiles to embed")
    options = dict(options or {})
    identity = encoder.identity if isinstance(encoder, Encoder) else \
        encoder_identity(encoder, weights, options)
    path = cache_dir(cache) / "features" / \
        f"{features_key(identity, slide.fingerprint, spec.to_dict(), centres)}.npy"
    if use_cache and path.exists():
        return np.load(path), []
    stains = slide_stains(slide, spec, centres) if stain_normalized(encoder, options) else None
    tiles_per_task = tiles_per_task or max(1, PIXELS_PER_TASK // spec.size ** 2)
    order = _spatial_order(centres, slide.field_px(spec))
    # sent once, not with every task (an in-memory image travels inside the slide's
    # graph); to every worker when every worker embeds
    gpu = wants_gpu(encoder)
    [shared_slide] = client.scatter([slide], hash=False, broadcast=not gpu)
    futures = [submit(client, embed_task, shared_slide, centres[order[start:start + tiles_per_task]],
                      spec, encoder, weights, options, stains, gpu=gpu)
               for start in range(0, len(order), tiles_per_task)]
    parts = gather(futures, description)
    features = np.empty((len(centres), parts[0][0].shape[1]), np.float32)
    features[order] = np.concatenate([part for part, _ in parts])
    if use_cache:
        _save_atomic(path, features)
    return features, [record for _, record in parts]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, suffix=".npy")
    with os.fdopen(handle, "wb") as out:
        np.save(out, array)
    os.replace(scratch, path)


__all__ = ["task_threads", "embed_task", "train_task", "sample_task", "train_ensemble",
           "sample_ensemble", "submit", "gather", "embed_tiles", "TaskRecord", "PIXELS_PER_TASK"]
