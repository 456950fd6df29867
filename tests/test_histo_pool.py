"""The GPU worker pool and the H&E -> expression -> cell types pipeline on a real cluster.

The default cluster of ``connect()`` with one CPU worker and one GPU worker for a faked
device "0" (declaring the resource GPU=1 and pinned with CUDA_VISIBLE_DEVICES; no CUDA
here, so it computes on CPU) runs every histology task; the tests check where they land.
"""

from __future__ import annotations

import copy

import anndata as ad
import numba
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
from conftest import digest
from spatialdata.models import Image2DModel

from dflashdeconv.engine.cluster import connect, visible_gpus
from dflashdeconv.errors import InputError
from dflashdeconv.histo import pool
from dflashdeconv.histo.devices import gpu_workers
from dflashdeconv.histo.predict import (
    TOTAL_COUNTS,
    predict_expression,
    resolve_tile_spec,
    select_genes,
    train_expression_model,
)
from dflashdeconv.histo.slide import (
    TileSpec,
    add_spots,
    slide_image,
    spots_table,
)
from dflashdeconv.histo.stflow import STFlow
from dflashdeconv.histo.synthetic import synthetic_slide
from dflashdeconv.histo.tissue import tile_grid
from dflashdeconv.tl import predict_cell_types

TINY = dict(hidden_dim=32, n_layers=2, n_heads=2, n_neighbors=6, epochs=20, chunks_per_slide=8,
            learning_rate=3e-3, dropout=0.1, random_state=0)
SPEC = dict(tile_size=32, tile_mpp=2.0)


@pytest.fixture(scope="module")
def gpu_pool():
    with connect(n_workers=1, gpus=["0"], quiet=True) as client:
        client.wait_for_workers(2)
        yield client


def test_the_default_cluster_starts_one_pinned_worker_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert visible_gpus() == ["0", "1"]
    for hidden in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-7f3a,GPU-11b2")
    with connect(n_workers=1, gpus=None, quiet=True) as client:
        client.wait_for_workers(3)
        workers = client.scheduler_info()["workers"]
        pinned = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert len(workers) == 3 and len(gpu_workers(client)) == 2
        assert sorted(pinned[a] for a in gpu_workers(client)) == ["GPU-11b2", "GPU-7f3a"]
        cpu = [a for a in workers if a not in gpu_workers(client)]
        assert workers[cpu[0]]["resources"] == {} and workers[cpu[0]]["nthreads"] >= 1
    with pytest.raises(InputError, match="gpus=3 but 2 GPU"):
        connect(gpus=3, quiet=True)
    with pytest.raises(InputError, match="GPU workers are processes"):
        connect(gpus=1, processes=False, quiet=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with connect(n_workers=1, quiet=True) as client:  # no GPU: the CPU-only LocalCluster
        assert gpu_workers(client) == [] and type(client.cluster).__name__ == "LocalCluster"


def make_sdata(seed: int, with_spots: bool = True):
    slide = synthetic_slide(1600, spot_spacing=100, seed=seed)
    image = Image2DModel.parse(np.moveaxis(slide.image, -1, 0), dims=("c", "y", "x"),
                               c_coords=["r", "g", "b"], scale_factors=[2], chunks=(3, 512, 512))
    sdata = sd.SpatialData(images={"he": image})
    sdata.attrs["dflashdeconv"] = {"images": {"he": {"mpp": slide.mpp}}}
    if with_spots:
        add_spots(sdata, slide.spots)
    return sdata, slide.spots


@pytest.fixture(scope="module")
def training():
    return [make_sdata(seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def trained(training, gpu_pool, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    model = train_expression_model([s for s, _ in training], genes=20, encoder="morphology",
                                   tile_spec=TileSpec(32, 2.0), model=STFlow(**TINY),
                                   scheduler=gpu_pool, cache=cache)
    return model, cache


def test_torch_encoders_run_on_the_gpu_worker_and_cpu_encoders_on_all(gpu_pool, training,
                                                                       tmp_path):
    import torch

    from dflashdeconv.histo.vit import VisionTransformer, ViTConfig

    gpu = gpu_workers(gpu_pool)
    workers = set(gpu_pool.scheduler_info()["workers"])
    assert len(gpu) == 1 and len(workers) == 2
    sdata, spots = training[0]
    slide = slide_image(sdata)
    centres = spots_table(sdata).centres
    torch.manual_seed(0)
    torch.save(VisionTransformer(ViTConfig(32, 8, 32, 2, 2, 64, 1e-5)).state_dict(),
               tmp_path / "vit.pt")
    _, records = pool.embed_tiles(gpu_pool, slide, centres, TileSpec(32, 2.0), "vit",
                                  weights=tmp_path / "vit.pt", options={"n_heads": 2},
                                  tiles_per_task=4, cache=tmp_path)
    assert len(records) == -(-len(centres) // 4)
    assert {r.worker for r in records} == set(gpu) and {r.device for r in records} == {"cpu"}
    features, records = pool.embed_tiles(gpu_pool, slide, centres, TileSpec(32, 2.0),
                                         tiles_per_task=4, cache=tmp_path)
    assert {r.worker for r in records} == workers  # numpy work: every worker's cores
    # the features are those of tiles read in this process, re-rendered with the
    # reference stains from the slide's one estimate, in the caller's order
    from dflashdeconv.histo.encoders import get_encoder
    from dflashdeconv.histo.stain import normalize_stains, slide_stains

    tiles = slide.read_tiles(centres, TileSpec(32, 2.0))
    local = get_encoder().embed(normalize_stains(tiles, slide_stains(slide, TileSpec(32, 2.0))))
    np.testing.assert_allclose(features, local, rtol=1e-5, atol=1e-6)
    assert np.abs(get_encoder().embed(tiles) - features).max() > 0.01
    unnormalised, _ = pool.embed_tiles(gpu_pool, slide, centres, TileSpec(32, 2.0),
                                       options={"stain_normalize": False}, cache=tmp_path)
    np.testing.assert_allclose(unnormalised, get_encoder().embed(tiles), rtol=1e-5, atol=1e-6)
    # cached: the second call runs no task
    again, records = pool.embed_tiles(gpu_pool, slide, centres, TileSpec(32, 2.0), cache=tmp_path)
    assert records == [] and np.array_equal(again, features)


def test_without_gpu_workers_the_same_tasks_run_on_cpu_workers(training, tmp_path):
    sdata, _ = training[0]
    with connect(n_workers=1, gpus=0, quiet=True) as client:
        assert gpu_workers(client) == []
        _, records = pool.embed_tiles(client, slide_image(sdata), spots_table(sdata).centres[:8],
                                      TileSpec(32, 2.0), cache=tmp_path)
    assert [r.device for r in records] == ["cpu"] and records[0].worker.startswith("tcp://")


def test_an_ensembles_networks_train_and_sample_as_parallel_tasks(training):
    """Each network is its own task (several workers work at once); joined, the networks
    give exactly what one process fitting and sampling the whole ensemble gives."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 12)).astype(np.float32)
    coords = rng.uniform(0, 1000, (120, 2))
    expression = np.log1p(rng.poisson(np.exp(features[:, :5] * 0.5))).astype(np.float32)
    ids = np.repeat([0, 1], 60)
    model = STFlow(**{**TINY, "epochs": 3})
    whole = STFlow(**{**TINY, "epochs": 3}).fit(features, coords, expression, ids)
    with connect(n_workers=2, gpus=0, quiet=True) as client:
        client.wait_for_workers(2)
        joined, trained = pool.train_ensemble(client, model, features, coords, expression,
                                              ids, None, {})
        # one slide per call, as the pipeline samples a query
        predicted, sampled = pool.sample_ensemble(client, joined, features[:60], coords[:60])
    assert len(trained) == len(sampled) == 3
    assert len({record.worker for record in trained + sampled}) == 2
    np.testing.assert_allclose(predicted, whole.predict(features[:60], coords[:60]), atol=1e-5)


def test_predict_expression_on_the_tile_grid(trained, gpu_pool, training):
    model, cache = trained
    query, _ = make_sdata(3, with_spots=False)
    result = predict_expression(query, model=model, scheduler=gpu_pool, cache=cache, **SPEC)
    grid = tile_grid(slide_image(query), TileSpec(32, 2.0))
    assert model.metadata_["target"] == "cp10k" and model.gene_names_[-1] == TOTAL_COUNTS
    assert result.shape == (len(grid), 20) and result.var_names.tolist() == model.gene_names_[:-1]
    np.testing.assert_array_equal(result.obsm["spatial"], grid)
    uns = result.uns["stflow"]
    # sampling ran on the GPU worker; morphology tiles may have gone to either worker
    assert set(gpu_workers(gpu_pool)) <= set(uns["workers"]) and uns["devices"] == ["cpu"]
    # where the model trained travels with it (the faked GPU worker has no CUDA)
    assert model.metadata_["training_devices"] == uns["training_devices"] == ["cpu"]
    assert uns["tile_spec"] == {"size": 32, "mpp": 2.0} and uns["encoder"] == "morphology"
    assert query.tables["stflow"] is result and len(query.shapes["stflow_tiles"]) == len(grid)
    assert np.isfinite(result.X).all() and (result.X >= 0).all()
    result.write_h5ad(cache / "prediction.h5ad")  # the metadata serialises


def _targets(spots, genes):
    """(log1p CP10k, log1p counts) of ``genes``, as the pipeline trains on them."""
    counts = np.asarray(spots.X.toarray() if hasattr(spots.X, "toarray") else spots.X, np.float64)
    panel = counts[:, spots.var_names.get_indexer(genes)]
    return np.log1p(panel / counts.sum(1, keepdims=True) * 1e4), np.log1p(panel)


def _per_gene_r(predicted, observed) -> float:
    """Mean per-gene Pearson; a constant column scores 0."""
    return float(np.mean([np.corrcoef(predicted[:, g], observed[:, g])[0, 1]
                          if predicted[:, g].std() > 0 and observed[:, g].std() > 0 else 0.0
                          for g in range(predicted.shape[1])]))


def test_training_and_prediction_at_spots_track_the_truth(trained, gpu_pool, training, tmp_path):
    model, cache = trained
    before = [digest(spots.X) for _, spots in training]
    query, truth = make_sdata(4)
    result = predict_expression(query, model=model, locations="spots", scheduler=gpu_pool,
                                cache=cache, **SPEC)
    assert query.tables["stflow"].uns["spatialdata_attrs"]["region"] == "spots"
    assert result.obs_names.tolist() == truth.obs_names.tolist()  # rows are the spots, by name
    observed, observed_counts = _targets(truth[result.obs_names], result.var_names)
    assert _per_gene_r(result.X, observed) > 0.2  # the tiny model, on sparse synthetic counts
    assert _per_gene_r(result.layers["log1p_counts"], observed_counts) > 0.2
    assert model.loss_curve_[-1] < model.loss_curve_[0]
    # trained on raw log1p counts, the same tiny model beats the training mean's error
    raw = train_expression_model([s for s, _ in training], genes=20, target="log1p",
                                 tile_spec=TileSpec(32, 2.0), model=STFlow(**TINY),
                                 scheduler=gpu_pool, cache=cache)
    result = predict_expression(query, model=raw, locations="spots", scheduler=gpu_pool,
                                cache=cache, key_added="raw", **SPEC)
    assert "log1p_counts" not in result.layers and result.uns["raw"]["target"] == "log1p"
    _, training_counts = _targets(ad.concat([s for _, s in training]), result.var_names)
    _, observed_counts = _targets(truth[result.obs_names], result.var_names)
    assert _per_gene_r(result.X, observed_counts) > 0.25
    mean_error = np.mean((training_counts.mean(0) - observed_counts) ** 2)
    assert np.mean((result.X - observed_counts) ** 2) < 0.9 * mean_error
    assert [digest(spots.X) for _, spots in training] == before


def test_train_and_predict_in_one_call(training, gpu_pool, tmp_path):
    query, _ = make_sdata(5, with_spots=False)
    result = predict_expression(query, [s for s, _ in training], genes=12,
                                stflow=STFlow(**{**TINY, "epochs": 2}), scheduler=gpu_pool,
                                cache=tmp_path, key_added="he_expression", **SPEC)
    assert result.n_vars == 12 and "training" in result.uns["he_expression"]["timings"]
    assert "he_expression" in query.tables


def test_cell_type_maps_from_he_only(trained, gpu_pool, training):
    model, cache = trained
    query, _ = make_sdata(6, with_spots=False)
    # no tile spec given: the one the model was trained with
    result = predict_expression(query, model=model, scheduler=gpu_pool, cache=cache)
    assert result.uns["stflow"]["tile_spec"] == {"size": 32, "mpp": 2.0}
    # a "single-cell" reference: training spots labelled by cellularity
    spots = ad.concat([s for _, s in training])
    label = pd.cut(spots.obs["cellularity"], [-1, 0.35, 0.65, 2], labels=["sparse", "mid", "dense"])
    reference = ad.AnnData(spots.X, obs=pd.DataFrame({"cell_type": label.astype(str).to_numpy()}),
                           var=pd.DataFrame(index=spots.var_names))
    proportions = predict_cell_types(result, reference, n_hvg=20)
    assert proportions.shape == (result.n_obs, 3)
    np.testing.assert_allclose(proportions.sum(1), 1.0, atol=1e-6)
    assert result.obsm["cell_types"] is proportions
    dense_share = proportions["dense"].to_numpy()
    haematoxylin = result.X.mean(1)  # denser tissue -> more expression of the dense genes
    assert np.isfinite(dense_share).all() and dense_share.std() > 0.01 and haematoxylin.std() > 0
    renamed = reference.copy()
    renamed.var_names = [f"OTHER{i}" for i in range(renamed.n_vars)]
    with pytest.raises(InputError, match="panel genes"):
        predict_cell_types(result, renamed)


def test_bad_input_is_rejected_before_work(trained, gpu_pool, training):
    model, cache = trained
    query, _ = make_sdata(3, with_spots=False)
    with pytest.raises(InputError, match="SpatialData"):
        predict_expression(np.zeros((10, 10, 3)), model=model, scheduler=gpu_pool)
    with pytest.raises(InputError, match="either training slides or a fitted model"):
        predict_expression(query, scheduler=gpu_pool)
    with pytest.raises(InputError, match="locations"):
        predict_expression(query, model=model, locations="everywhere", scheduler=gpu_pool)
    with pytest.raises(InputError, match="query tiles must share"):
        predict_expression(query, model=model, tile_size=64, tile_mpp=2.0, scheduler=gpu_pool)
    assert model.metadata_["stain_normalize"] is True
    with pytest.raises(InputError, match="trained on normalised stains.*stain_normalize"):
        predict_expression(query, model=model, encoder_options={"stain_normalize": False},
                           scheduler=gpu_pool)
    with pytest.raises(InputError, match="no table annotating spot shapes"):
        train_expression_model([query], scheduler=gpu_pool)
    with pytest.raises(InputError, match="not measured on every training slide"):
        train_expression_model([s for s, _ in training], genes=["GENE1", "NOPE"],
                               scheduler=gpu_pool)


def test_the_query_is_stain_normalised_as_the_model_was_trained(trained, gpu_pool):
    """Unless asked, a query's tiles follow the model's record; a model saved before
    stain normalisation (no record) gets unnormalised tiles, as it was trained on."""
    model, cache = trained
    query, _ = make_sdata(3)
    older = copy.deepcopy(model)
    del older.metadata_["stain_normalize"]
    uns = {name: predict_expression(query, model=m, locations="spots", scheduler=gpu_pool,
                                    cache=cache).uns["stflow"]
           for name, m in (("current", model), ("older", older))}
    assert uns["current"]["stain_normalize"] is True and uns["older"]["stain_normalize"] is False


def test_command_line_predicts_from_files(gpu_pool, tmp_path):
    import argparse

    from PIL import Image

    from dflashdeconv.cli import predict_expression as command

    paths = []
    for seed in (1, 2):
        slide = synthetic_slide(1600, spot_spacing=100, seed=seed)
        Image.fromarray(slide.image).save(tmp_path / f"slide{seed}.png")
        slide.spots.write_h5ad(tmp_path / f"spots{seed}.h5ad")
        paths += [str(tmp_path / f"slide{seed}.png"), str(tmp_path / f"spots{seed}.h5ad")]
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "predict-expression", paths[2], "--train", paths[0], paths[1], "--slide-mpp", "1.0",
        "--out", str(tmp_path / "out.h5ad"), "--save-model", str(tmp_path / "model.pt"),
        "--genes", "GENE1,GENE2,GENE3", "--tile-size", "32", "--tile-mpp", "2.0",
        "--epochs", "1", "--feature-norm", "global", "--scheduler", gpu_pool.scheduler.address,
        "--cache", str(tmp_path)])
    assert args.run(args) == 0
    result = ad.read_h5ad(tmp_path / "out.h5ad")
    assert result.var_names.tolist() == ["GENE1", "GENE2", "GENE3"] and result.n_obs > 100
    assert result.layers["log1p_counts"].shape == result.shape
    saved = STFlow.load(tmp_path / "model.pt")
    assert saved.gene_names_ == ["GENE1", "GENE2", "GENE3", TOTAL_COUNTS]
    assert saved.feature_norm == "global" and saved.epochs == 1
    args = parser.parse_args(["predict-expression", paths[2], "--model", str(tmp_path / "x.pt"),
                              "--out", str(tmp_path / "o.h5ad"), "--reference",
                              str(tmp_path / "absent.h5ad")])
    with pytest.raises(InputError, match="not found"):
        args.run(args)


def test_predicting_twice_at_spots_ignores_earlier_predictions(trained, gpu_pool):
    model, cache = trained
    query, _ = make_sdata(4)
    first = predict_expression(query, model=model, locations="spots", scheduler=gpu_pool,
                               cache=cache, **SPEC)
    second = predict_expression(query, model=model, locations="spots", scheduler=gpu_pool,
                                cache=cache, key_added="again", **SPEC)
    np.testing.assert_array_equal(first.X, second.X)
    assert spots_table(query).table.n_vars == 60  # the measured counts, not a prediction


def test_the_panel_is_chosen_on_the_counts_the_model_learns():
    """With the counts in a layer (``.X`` normalised), the panel's variance is read from that
    layer, as the training targets are: the same panel as a table holding them in ``.X``."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 20.0, 40), (300, 40)).astype(np.float32)
    genes = [f"g{i}" for i in range(40)]
    plain = ad.AnnData(counts, var=pd.DataFrame(index=genes))
    layered = ad.AnnData(np.log1p(counts) / 3.0, var=pd.DataFrame(index=genes),
                         layers={"counts": counts})
    expected = select_genes([plain], 10)
    assert list(select_genes([layered], 10, layer="counts")) == list(expected)
    assert list(select_genes([layered], 10)) != list(expected)  # .X ranks genes otherwise


def test_a_partial_tile_spec_takes_the_rest_from_the_model_else_the_encoder(trained):
    model, _ = trained
    assert resolve_tile_spec(None, None, "morphology", model) == TileSpec(32, 2.0)
    assert resolve_tile_spec(64, None, "morphology", model) == TileSpec(64, 2.0)
    assert resolve_tile_spec(None, 1.0, "morphology") == TileSpec(448, 1.0)
    assert resolve_tile_spec(None, None, "uni") == TileSpec(224, 0.5)
    with pytest.raises(InputError, match="tile size must be an integer of at least 8"):
        resolve_tile_spec(0, None, "morphology")  # never silently the default


def _torch_threads_after_numba_starts() -> tuple[tuple[int, int], int, int]:
    """In a worker's task thread: torch's thread count at first, once numba's OpenMP pool has
    started there (as STFlow's neighbour spacing starts it within a fit), then inside
    :func:`pool.task_threads` (torch and numba)."""
    import numba
    import torch

    first = torch.get_num_threads()
    numba.get_num_threads()  # starts numba's pool in this thread
    started = (first, torch.get_num_threads())
    with pool.task_threads():
        return started, torch.get_num_threads(), numba.get_num_threads()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba's pool has one thread")
def test_histology_tasks_keep_torch_on_the_workers_threads():
    """numba's OpenMP pool, started in a task's thread, sets its OpenMP thread count to every
    core, and torch shares that libgomp; histology tasks put torch (and numba) back on the
    worker's one thread."""
    with connect(n_workers=1, threads_per_worker=1, quiet=True) as client:
        started, in_task, numba_threads = client.submit(_torch_threads_after_numba_starts,
                                                        pure=False).result()
    assert started == (1, numba.config.NUMBA_NUM_THREADS)  # what the tasks ran with before
    assert (in_task, numba_threads) == (1, 1)
