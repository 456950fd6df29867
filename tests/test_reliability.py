"""Faults: lost workers, interrupted runs, concurrent writers. Nothing lost, nothing wrong."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from conftest import store_digest

from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine import stop
from dflashdeconv.engine.lock import LOCK_NAME, StoreLock, StoreLockedError
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.run import deconvolve_store
from dflashdeconv.engine.store import SpotStore, open_zarr
from dflashdeconv.errors import InputError, Terminated
from dflashdeconv.io import load_reference

TISSUE = SyntheticTissue(n_spots=6000, n_genes=400, n_types=6, depth=400, seed=21,
                         markers_per_type=12)
RUN = dict(tol=1e-9, progress=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    store = TISSUE.write_store(folder / "tissue.zarr", chunk_rows=200)  # 30 blocks
    reference = folder / "reference.h5ad"
    TISSUE.reference().write_h5ad(reference)
    return store, reference


@pytest.fixture(scope="module")
def undisturbed(source, tmp_path_factory, dask_client):
    store, reference = source
    path = tmp_path_factory.mktemp("undisturbed") / "copy.zarr"
    shutil.copytree(store.path, path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, **RUN)
    return read_results(path).to_numpy(), summary


def _copy(store, tmp_path, name="run.zarr"):
    shutil.copytree(store.path, tmp_path / name)
    return str(tmp_path / name)


def _killer(client, prefix: str, condition=lambda: True):
    """Thread that kills (SIGKILL) the worker processing a task whose key starts with
    ``prefix`` once ``condition()`` holds; returns (thread, event set when it killed)."""
    pids = client.run(os.getpid)
    killed = threading.Event()

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not killed.is_set():
            for worker, keys in client.processing().items():
                if any(str(k).startswith(prefix) for k in keys) and condition():
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.set()
                    return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.parametrize("phase", ["block_moments", "block_projection", "block_round"])
def test_worker_killed_mid_phase(source, undisturbed, tmp_path, phase):
    from distributed import Client, LocalCluster

    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))

    def solver_started():  # kill a round only once some rounds are checkpointed
        return phase != "block_round" or "checkpoint" in open_zarr(
            f"{path}/uns/flashdeconv_run", "r").attrs

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        thread, killed = _killer(client, phase, solver_started)
        with warnings.catch_warnings():  # the solver warns when it restarts a round
            warnings.simplefilter("ignore", RuntimeWarning)
            deconvolve_store(path, X, types, genes, scheduler=client, **RUN)
        thread.join(1)
    assert killed.is_set(), f"no {phase} task was seen running"
    assert np.array_equal(read_results(path).to_numpy(), undisturbed[0])


def test_worker_killed_while_writing_a_store(tmp_path):
    """A block's non-zeros wait in its worker's memory until they are placed: a worker
    killed with blocks in it loses them, and they are made again; the store is exact."""
    import anndata as ad
    from distributed import Client, LocalCluster

    tissue = SyntheticTissue(n_spots=6000, n_genes=400, n_types=6, depth=400, seed=5)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        thread, killed = _killer(client, "write_block", lambda: len(client.who_has()) > 4)
        store = tissue.write_store(tmp_path / "s.zarr", chunk_rows=200, scheduler=client)
        thread.join(1)
    assert killed.is_set(), "no write_block task was seen running"
    assert (ad.read_zarr(store.path).X != tissue.counts()[store.input_rows()]).nnz == 0


def _cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "dflashdeconv.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _freeze_when(process, ready, timeout=180) -> bool:
    """Stop ``process`` (SIGSTOP) the moment ``ready()`` holds, so the step it is in cannot
    finish before the signal under test arrives, however fast the machine; False if the
    process ended (or time ran out) first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready():
            process.send_signal(signal.SIGSTOP)
            return True
        time.sleep(0.005)
    return False


def _run_attrs(path) -> dict:
    """The run group's attributes, read from its metadata file (cheap enough to poll);
    empty while the group does not exist or its file is being rewritten."""
    try:
        with open(os.path.join(path, "uns", "flashdeconv_run", "zarr.json")) as file:
            return json.load(file).get("attributes", {})
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("stage", ["projection", "solver"])
def test_sigterm_then_resume_equals_uninterrupted(source, undisturbed, tmp_path, stage):
    store, reference = source
    path = _copy(store, tmp_path)
    before = store_digest(path)
    if stage == "projection":
        def ready():
            try:
                flags = open_zarr(f"{path}/uns/flashdeconv_run", "r")["projected"][...]
            except (KeyError, FileNotFoundError, ValueError):
                return False
            return 0 < np.sum(flags) < len(flags)
    else:
        def ready():  # a round is checkpointed; the run needs 9
            return _run_attrs(path).get("checkpoint", {}).get("round", 0) >= 1
    args = ["deconvolve", path, str(reference), "--tol", "1e-9", "--quiet"]
    process = _cli(args)
    assert _freeze_when(process, ready), (process.communicate()[1], _run_attrs(path))
    process.send_signal(signal.SIGTERM)  # held while stopped, handled once continued
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "--resume" in err
    # nothing looks complete, and the lock was released
    with pytest.raises(InputError, match="no completed results"):
        read_results(path)
    assert not os.path.exists(os.path.join(path, LOCK_NAME))
    assert _run_attrs(path)["status"] == "running"
    resumed = _cli(args + ["--resume"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert np.array_equal(read_results(path).to_numpy(), undisturbed[0])
    assert store_digest(path) == before
    params = read_params(path)
    assert params["n_iterations"] == undisturbed[1]["n_iterations"]


def test_sigterm_is_not_swallowed_by_library_error_handling():
    """The handler raises wherever the main thread is; distributed's serialisation catches
    ``Exception`` and re-raises a TypeError (seen as exit 1): SIGTERM must pass through such
    code unchanged."""
    from distributed.protocol import serialize

    class StopsWhilePickled:
        def __reduce__(self):
            raise Terminated()

    with pytest.raises(Terminated):
        serialize(StopsWhilePickled(), on_error="raise")


def _stopped_at_round_2(path, X, types, genes, client, monkeypatch):
    """Run until a stop request arrives as solver round 2 is recorded (a SIGTERM whose raise
    was lost); returns the engine's own ``record`` for the caller to put back."""
    from dflashdeconv.engine import run as engine_run

    recorded = engine_run.record

    def record(run_path, **attrs):
        recorded(run_path, **attrs)
        if attrs.get("checkpoint", {}).get("round") == 2:
            stop.request()

    monkeypatch.setattr(engine_run, "record", record)
    try:
        with pytest.raises(Terminated):
            deconvolve_store(path, X, types, genes, scheduler=client, **RUN)
    finally:
        stop.clear()
    return recorded


def test_a_stop_whose_raise_was_lost_ends_the_run_at_the_next_round(
        source, undisturbed, tmp_path, dask_client, monkeypatch):
    """Where the handler's raise lands in code that drops it (a gc callback: Python prints
    "Exception ignored", seen in CI as exit 0), the recorded request stops the engine at its
    next safe point; the run resumes to the undisturbed result."""
    from dflashdeconv.engine import run as engine_run

    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    recorded = _stopped_at_round_2(path, X, types, genes, dask_client, monkeypatch)
    assert _run_attrs(path)["checkpoint"]["round"] == 2
    assert not os.path.exists(os.path.join(path, LOCK_NAME))
    with pytest.raises(InputError, match="no completed results"):
        read_results(path)
    monkeypatch.setattr(engine_run, "record", recorded)
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True, **RUN)
    assert summary["n_iterations"] == undisturbed[1]["n_iterations"]  # counted from round 2
    assert np.array_equal(read_results(path).to_numpy(), undisturbed[0])


def test_a_checkpoint_without_its_exports_starts_the_solver_over(
        source, undisturbed, tmp_path, dask_client, monkeypatch):
    """A run interrupted by a version that kept the boundary rows in worker memory left a
    checkpoint without the neighbours' exports: resuming must not read a halo of zeros."""
    from dflashdeconv.engine import run as engine_run
    from dflashdeconv.engine.solve import EXPORTS

    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    recorded = _stopped_at_round_2(path, X, types, genes, dask_client, monkeypatch)
    run = open_zarr(f"{path}/uns/flashdeconv_run", "r+")
    del run[EXPORTS]  # the layout of the earlier version
    del run.attrs["exports_ready"]
    monkeypatch.setattr(engine_run, "record", recorded)
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True, **RUN)
    assert summary["n_iterations"] == undisturbed[1]["n_iterations"]
    assert np.array_equal(read_results(path).to_numpy(), undisturbed[0])


def read_params(path):
    from anndata.io import read_elem

    return read_elem(open_zarr(path, "r")["uns"]["flashdeconv_params"])


def test_resume_refuses_other_parameters(source, tmp_path, dask_client):
    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    # nothing recorded: --resume starts the run (what a restarted batch job needs)
    first = deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True, **RUN)
    assert "resumed" not in first
    with pytest.raises(InputError, match="used other inputs or parameters"):
        deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True,
                         preprocess="pearson", **RUN)
    again = deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True, **RUN)
    assert again["resumed"] and again["converged"]


def test_concurrent_writers_are_refused_with_a_clear_error(source, tmp_path, dask_client):
    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    with StoreLock(path, "another run"):
        with pytest.raises(StoreLockedError, match=r"in use by another run \(another run, pid"):
            deconvolve_store(path, X, types, genes, scheduler=dask_client, **RUN)
        second = _cli(["deconvolve", path, str(reference), "--quiet"])
        _, err = second.communicate(timeout=300)
        assert second.returncode == 4 and "in use by another run" in err
    # a lock left by a process that is gone is stale and taken over
    (tmp_path / "run.zarr" / LOCK_NAME).write_text(json.dumps(
        {"host": __import__("socket").gethostname(), "pid": 2**22 + 12345, "purpose": "crashed"}))
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, **RUN)
    assert summary["converged"] and not (tmp_path / "run.zarr" / LOCK_NAME).exists()


def test_two_cli_runs_against_one_store(source, tmp_path):
    store, reference = source
    path = _copy(store, tmp_path)
    first = _cli(["deconvolve", path, str(reference), "--quiet", "--tol", "1e-9"])
    # held while it holds the lock, so the second run meets it however fast the first is
    assert _freeze_when(first, lambda: os.path.exists(os.path.join(path, LOCK_NAME)))
    second = _cli(["deconvolve", path, str(reference), "--quiet", "--key", "other"])
    _, err_second = second.communicate(timeout=300)
    first.send_signal(signal.SIGCONT)
    _, err_first = first.communicate(timeout=600)
    assert first.returncode == 0, err_first
    assert second.returncode == 4 and "in use by another run" in err_second
    assert SpotStore.open(path).n_spots == TISSUE.n_spots
    np.testing.assert_allclose(read_results(path).sum(axis=1), 1.0)


def test_resume_after_an_interrupted_publish(source, undisturbed, tmp_path, dask_client):
    store, reference = source
    path = _copy(store, tmp_path)
    X, types, genes = load_reference(__import__("anndata").read_h5ad(reference))
    deconvolve_store(path, X, types, genes, scheduler=dask_client, **RUN)
    # as if stopped between moving the results into place and writing the completion mark
    root = open_zarr(path, "r+")
    del root["uns"]["flashdeconv_params"]
    root["uns"]["flashdeconv_run"].attrs["status"] = "running"
    with pytest.raises(InputError, match="no completed results"):
        read_results(path)
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, resume=True, **RUN)
    assert summary["converged"] and "resumed" not in summary
    assert np.array_equal(read_results(path).to_numpy(), undisturbed[0])


def test_a_lock_is_never_seen_without_its_owner(tmp_path):
    """The lock file appears with its owner written (linked into place): a lock read empty
    or unreadable (as a half-written one would be) is busy, never stale and taken over."""
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / LOCK_NAME).write_text("")
    with pytest.raises(StoreLockedError, match="in use by another run"):
        StoreLock(store, "second").acquire()
    (store / LOCK_NAME).unlink()
    with StoreLock(store, "first"):
        owner = json.loads((store / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["purpose"] == "first"
        with pytest.raises(StoreLockedError, match=r"\(first, pid"):
            StoreLock(store, "second").acquire()
    assert sorted(p.name for p in store.iterdir()) == []  # no lock, no draft left
