"""The refinement on the raw counts (core.refine): accuracy on real and built sets, the
same result in memory and out of core, resume through it, and its errors."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from dflashdeconv import FlashDeconv, metrics, tl
from dflashdeconv.core import refine as refine_math
from dflashdeconv.datasets import SyntheticTissue
from dflashdeconv.engine import stop
from dflashdeconv.engine.results import read_results
from dflashdeconv.engine.run import deconvolve_store
from dflashdeconv.engine.store import SpotStore
from dflashdeconv.errors import InputError, Terminated
from dflashdeconv.io import load_reference, prepare_data

PLATFORM = SyntheticTissue(n_spots=1500, n_genes=800, n_types=6, depth=2000, seed=5,
                           markers_per_type=20, platform_sd=0.5)


def _scores(model, truth):
    return metrics.pearson(model.proportions_, truth), metrics.rmse(model.proportions_, truth)


def test_starmap_refined_reaches_the_published_best(starmap):
    Y, X, coords, types, truth = starmap
    base = _scores(FlashDeconv().fit(Y, X, coords), truth)
    refined = FlashDeconv(refine="auto").fit(Y, X, coords, cell_type_names=types)
    r, error = _scores(refined, truth)
    assert base == pytest.approx((0.8751, 0.1066), abs=1e-4)
    assert r >= 0.90 and error <= 0.095  # SONAR 0.90 / 0.093, RCTD 0.89 / 0.099
    assert refined.refine_["mode"] == "nb" and refined.refine_["converged"]
    assert refined.refine_["failed"].size == 0
    np.testing.assert_allclose(refined.proportions_.sum(axis=1), 1.0)


@pytest.mark.parametrize("tissue", [PLATFORM, SyntheticTissue(
    n_spots=1500, n_genes=800, n_types=6, depth=300, seed=6, markers_per_type=20)],
    ids=["platform-factors", "low-depth"])
def test_refinement_beats_the_base_fit_where_it_claims_to(tissue):
    Y, X, coords, types, _ = prepare_data(tissue.spots(), tissue.reference())
    truth = tissue.proportions()
    base = _scores(FlashDeconv().fit(Y, X, coords), truth)
    refined = _scores(FlashDeconv(refine="auto").fit(Y, X, coords), truth)
    assert refined[0] > base[0] + 0.003 and refined[1] < base[1] * 0.95


def test_platform_factors_are_recovered():
    Y, X, coords, types, genes = prepare_data(PLATFORM.spots(), PLATFORM.reference())
    model = FlashDeconv(refine="nb").fit(Y, X, coords)
    true = np.log(PLATFORM.platform_factors())[model.gene_idx_]
    estimated = np.log(model.refine_["factors"])
    assert np.corrcoef(true, estimated)[0, 1] > 0.8


def test_unknown_refinement_and_uncertainty_of_a_refined_fit(small_problem):
    Y, X, coords, _ = small_problem
    with pytest.raises(InputError, match=r"'refine' parameter of FlashDeconv must be a str among "
                                         r"\{.*'auto'.*\}"):
        FlashDeconv(refine="poisson-ish").fit(Y, X, coords)
    model = FlashDeconv(refine="wls").fit(Y, X, coords)
    with pytest.raises(InputError, match="describes the base fit"):
        model.compute_uncertainty()
    assert not hasattr(model.set_params(refine="none").fit(Y, X, coords), "refine_")


def test_a_refinement_that_does_not_converge_is_named(monkeypatch, small_tissue, tmp_path):
    from dflashdeconv import cli

    monkeypatch.setattr(refine_math, "MAX_ROUNDS", 1)
    spots, reference = small_tissue
    with pytest.warns(RuntimeWarning, match="gene factors did not converge in 1 rounds"):
        tl.deconvolve(spots, reference, refine="nb", copy=True)
    spots.write_h5ad(tmp_path / "spots.h5ad")
    reference.write_h5ad(tmp_path / "reference.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["deconvolve", str(tmp_path / "spots.h5ad"), str(tmp_path / "reference.h5ad"),
                         "--out", str(tmp_path / "out.h5ad"), "--refine", "auto", "--quiet"])
    assert code == cli.EXIT_NOT_CONVERGED


@pytest.fixture(scope="module")
def platform_store(tmp_path_factory):
    return PLATFORM.write_store(tmp_path_factory.mktemp("refine") / "platform.zarr",
                                chunk_rows=200)


@pytest.fixture(scope="module")
def in_memory():
    Y, X, coords, types, _ = prepare_data(PLATFORM.spots(), PLATFORM.reference())
    return FlashDeconv(refine="auto").fit(Y, X, coords, cell_type_names=types)


def _copy(store, tmp_path, name):
    shutil.copytree(store.path, tmp_path / name)
    return str(tmp_path / name)


def test_out_of_core_refinement_equals_in_memory_for_any_blocks(platform_store, in_memory,
                                                                 dask_client, tmp_path):
    from dflashdeconv.io import to_store

    X, types, genes = load_reference(PLATFORM.reference())
    order = platform_store.input_rows()
    path = _copy(platform_store, tmp_path, "a.zarr")
    summary = deconvolve_store(path, X, types, genes, scheduler=dask_client, refine="auto",
                               progress=False)
    assert summary["refine_result"]["converged"] and summary["refine_result"]["n_failed"] == 0
    assert np.abs(read_results(path).to_numpy() - in_memory.proportions_[order]).max() < 1e-10
    # other blocks (rebuilt from the spots, 7 blocks instead of 8): the same proportions
    other = to_store(PLATFORM.spots(), tmp_path / "b.zarr", chunk_rows=230)
    deconvolve_store(other.path, X, types, genes, scheduler=dask_client, refine="auto",
                     progress=False)
    assert other.n_blocks != platform_store.n_blocks
    np.testing.assert_allclose(read_results(other.path).to_numpy(),
                               in_memory.proportions_[other.input_rows()], atol=1e-10)


def test_an_interrupted_refinement_resumes_at_its_second_phase(platform_store, in_memory,
                                                               dask_client, tmp_path,
                                                               monkeypatch):
    from dflashdeconv.engine import run as engine_run

    X, types, genes = load_reference(PLATFORM.reference())
    path = _copy(platform_store, tmp_path, "r.zarr")
    fit_refinement = engine_run.fit_refinement

    def stopped(*args, **kwargs):  # a SIGTERM once phase 1 is recorded
        result = fit_refinement(*args, **kwargs)
        stop.request()
        return result

    monkeypatch.setattr(engine_run, "fit_refinement", stopped)
    try:
        with pytest.raises(Terminated):
            deconvolve_store(path, X, types, genes, scheduler=dask_client, refine="auto",
                             progress=False)
    finally:
        stop.clear()
    with pytest.raises(InputError, match="no completed results"):
        read_results(path)
    monkeypatch.setattr(engine_run, "fit_refinement", fit_refinement)
    monkeypatch.setattr(refine_math, "fit_global", lambda *a, **k: pytest.fail("phase 1 rerun"))
    with pytest.raises(InputError, match="other inputs or parameters"):
        deconvolve_store(path, X, types, genes, scheduler=dask_client, refine="wls",
                         resume=True, progress=False)
    deconvolve_store(path, X, types, genes, scheduler=dask_client, refine="auto", resume=True,
                     progress=False)
    expected = in_memory.proportions_[SpotStore.open(path).input_rows()]
    assert np.abs(read_results(path).to_numpy() - expected).max() < 1e-10
