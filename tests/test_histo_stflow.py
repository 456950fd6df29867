"""STFlow on small synthetic slides (CPU, a tiny model, a few epochs)."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.base
import torch
from conftest import digest
from scipy.spatial import cKDTree

from dflashdeconv.errors import InputError, NotFittedError
from dflashdeconv.histo import stflow
from dflashdeconv.histo.stflow import (
    LINEAR_ALPHAS,
    LINEAR_RANKS,
    STFlow,
    _batch,
    _graph,
    neighbors,
    sample_prior,
)

TINY = dict(hidden_dim=32, n_layers=2, n_heads=2, n_neighbors=6, epochs=25, chunks_per_slide=4,
            batch_size=4, learning_rate=3e-3, dropout=0.1, n_models=1, n_samples=8,
            whole_slide_max_spots=0)


def make_slide(seed: int, n_spots: int = 60, n_features: int = 12, n_genes: int = 10):
    """Spots at random positions; features and log1p counts both follow a smooth field."""
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 2000, (n_spots, 2))
    field = np.sin(coords[:, 0] / 400) + np.cos(coords[:, 1] / 300)
    loadings = np.random.default_rng(99).normal(size=(2, n_features))
    features = np.column_stack([field, field ** 2]) @ loadings + rng.normal(0, 0.3, (n_spots, n_features))
    effect = np.random.default_rng(98).normal(0, 0.8, n_genes)
    counts = rng.poisson(np.exp(1.0 + effect[None, :] * field[:, None]))
    return features.astype(np.float32), coords, np.log1p(counts).astype(np.float32)


@pytest.fixture(scope="module")
def training():
    slides = [make_slide(s) for s in (1, 2)]
    features = np.vstack([s[0] for s in slides])
    coords = np.vstack([s[1] for s in slides])
    expression = np.vstack([s[2] for s in slides])
    ids = np.repeat([0, 1], [len(s[0]) for s in slides])
    return features, coords, expression, ids


@pytest.fixture(scope="module")
def fitted(training):
    return STFlow(**TINY, random_state=3).fit(*training)


def test_loss_falls_and_beats_the_mean_predictor(training, fitted):
    assert fitted.loss_curve_[-1] < 0.5 * fitted.loss_curve_[0]
    features, coords, expression = make_slide(7)
    predicted = fitted.predict(features, coords)
    mse = np.mean((predicted - expression) ** 2)
    mean_mse = np.mean((training[2].mean(0) - expression) ** 2)
    assert mse < 0.8 * mean_mse
    correlation = np.mean([np.corrcoef(predicted[:, g], expression[:, g])[0, 1]
                           for g in range(expression.shape[1])])
    assert correlation > 0.5


def test_invariant_to_rotation_reflection_translation_and_scale(fitted):
    features, coords, _ = make_slide(8)
    reference = fitted.predict(features, coords)
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for moved in (coords @ rotation.T, coords * [-1, 1], coords + [1e4, -3e3], coords * 2.5,
                  (coords @ rotation.T) * [1, -1] + 17):
        np.testing.assert_allclose(fitted.predict(features, moved), reference, atol=2e-4)


def test_padding_does_not_change_results(fitted):
    small = make_slide(9, n_spots=20)
    large = make_slide(10, n_spots=45)
    net = fitted.model_[0]
    k = fitted.n_neighbors
    outputs = []
    for items in ([small], [small, large]):  # features as the networks see them
        batch = _batch([(fitted._slides(f, c, None)[0].features, c / 100, e) for f, c, e in items],
                       k, "cpu")
        t = torch.full((len(items),), 0.4)
        with torch.no_grad():
            outputs.append(net(batch["features"], batch["expression"], t, batch["index"],
                               batch["valid"], batch["geometry"])[0, :20].numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_precomputed_graphs_give_the_same_batch():
    """Training reuses each whole slide's graph; the batch must be the one computed afresh."""
    items = [(f, c / 100, e) for f, c, e in (make_slide(9, n_spots=20), make_slide(10, n_spots=45))]
    fresh = _batch(items, 6, "cpu")
    cached = _batch(items, 6, "cpu", [_graph(items[0][1], 6, "cpu"), None])
    assert fresh.keys() == cached.keys()
    for name in fresh:
        torch.testing.assert_close(cached[name], fresh[name], rtol=0, atol=0)
    assert fresh["geometry"][0, 20:].abs().max() == 0  # padded spots have no edges


@pytest.mark.parametrize("prior", ["gaussian", "zinb"])
def test_draws_sampled_together_equal_draws_one_at_a_time(training, fitted, monkeypatch, prior):
    model = fitted if prior == "gaussian" else STFlow(
        **{**TINY, "epochs": 2}, prior="zinb", standardize=False).fit(*training)
    features, coords, _ = make_slide(15)
    together = model.predict(features, coords)
    monkeypatch.setattr(stflow, "SAMPLE_ELEMENTS", {"cpu": 1})  # one draw per pass
    one_at_a_time = model.predict(features, coords)
    np.testing.assert_allclose(together, one_at_a_time, atol=1e-5)
    assert np.ptp(together, axis=0).min() > 1e-3  # every gene varies over the spots


def test_members_fitted_apart_equal_the_ensemble_fitted_whole(training):
    model = STFlow(**{**TINY, "epochs": 3, "n_models": 3}, random_state=7)
    whole = sklearn.base.clone(model).fit(*training)
    members = [member.fit(*training) for member in model.members()]
    assert [m.random_state for m in members] == [7, 8, 9]
    joined = STFlow.from_members(members)
    assert joined.get_params() == model.get_params()
    features, coords, _ = make_slide(16)
    np.testing.assert_array_equal(joined.predict(features, coords), whole.predict(features, coords))
    np.testing.assert_allclose(joined.loss_curve_, whole.loss_curve_, rtol=1e-6)
    with pytest.raises(InputError, match="members differ"):
        STFlow.from_members([members[0], members[2]])  # a network missing
    other = STFlow(**{**TINY, "epochs": 3, "n_models": 1}, random_state=8).fit(
        training[0] + 1, *training[1:])
    with pytest.raises(InputError, match="members differ"):
        STFlow.from_members([members[0], other])  # fitted on other data
    with pytest.raises(NotFittedError):
        STFlow.from_members(model.members())


def test_fitted_members_sample_to_the_ensembles_prediction(training):
    model = STFlow(**{**TINY, "epochs": 2, "n_models": 3}, random_state=4).fit(*training)
    features, coords, _ = make_slide(17)
    members = model.fitted_members()
    assert [m.random_state for m in members] == [4, 5, 6]
    sampled = np.mean([member.sample(features, coords) for member in members], axis=0)
    np.testing.assert_allclose(sampled, model.sample(features, coords), atol=1e-6)
    np.testing.assert_allclose(model.to_expression(sampled), model.predict(features, coords),
                               atol=1e-5)
    assert (model.predict(features, coords) >= 0).all() and (sampled < 0).any()  # clipped after
    np.testing.assert_array_equal(STFlow.from_members(members).predict(features, coords),
                                  model.predict(features, coords))
    with pytest.raises(InputError, match=r"sampled values must be \(spots, 10\)"):
        model.to_expression(sampled[:, :3])


def test_any_panel_size_works():
    features, coords, expression = make_slide(11, n_genes=37)
    model = STFlow(**{**TINY, "epochs": 2}).fit(features, coords, expression,
                                                gene_names=[f"G{i}" for i in range(37)])
    assert model.n_genes_ == 37 and model.gene_names_[-1] == "G36"
    predicted = model.predict(features, coords)
    assert predicted.shape == (60, 37) and np.isfinite(predicted).all() and (predicted >= 0).all()


def test_deterministic_under_a_seed(training):
    features, coords, _ = make_slide(12)
    runs = [STFlow(**{**TINY, "epochs": 3}, random_state=seed).fit(*training).predict(features, coords)
            for seed in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3


def test_fits_in_concurrent_threads_equal_fits_one_after_another(training):
    """Workers run tasks in threads; dropout draws from torch's global generator."""
    from concurrent.futures import ThreadPoolExecutor

    features, coords, _ = make_slide(18)
    models = [STFlow(**{**TINY, "epochs": 4}, random_state=seed) for seed in (1, 2, 3, 4)]
    alone = [sklearn.base.clone(m).fit(*training).predict(features, coords) for m in models]
    with ThreadPoolExecutor(4) as threads:
        together = list(threads.map(lambda m: m.fit(*training).predict(features, coords), models))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_inputs_are_not_modified(training):
    before = digest(*training)
    STFlow(**{**TINY, "epochs": 1}).fit(*training)
    assert digest(*training) == before


def test_whole_slide_training_and_sample_averaging(training):
    model = STFlow(**{**TINY, "epochs": 5, "whole_slide_max_spots": 1000, "n_samples": 3}).fit(*training)
    assert len(model.loss_curve_) == 5
    features, coords, _ = make_slide(13)
    assert model.predict(features, coords).shape == (60, 10)


def test_save_and_load_round_trip(fitted, tmp_path):
    path = tmp_path / "stflow.pt"
    fitted.save(path)
    loaded = STFlow.load(path)
    features, coords, _ = make_slide(14)
    np.testing.assert_array_equal(loaded.predict(features, coords), fitted.predict(features, coords))
    assert loaded.get_params() == {**fitted.get_params(), "device": None}
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a saved STFlow model"):
        STFlow.load(tmp_path / "junk.pt")


def test_neighbours_match_brute_force_and_handle_tiny_slides():
    rng = np.random.default_rng(0)
    coords = rng.uniform(size=(50, 2))
    index, valid = neighbors(coords, 8)
    distance = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    expected = np.sort(np.argsort(distance, axis=1)[:, :8], axis=1)
    np.testing.assert_array_equal(np.sort(index, axis=1), expected)
    assert valid.all()
    index, valid = neighbors(coords[:3], 8)
    assert valid.sum(1).tolist() == [2, 2, 2]
    assert (index[~valid] == np.repeat(np.arange(3), 6)).all()


def test_priors_live_on_the_requested_device_in_log1p_space():
    generator = torch.Generator().manual_seed(0)
    draws = sample_prior("zinb", (20000,), generator, "cpu")
    assert draws.device.type == "cpu"
    counts = torch.expm1(draws).round()
    # zero-inflated (gate 0.5) geometric counts with success logit 0.1: P(0) = 0.5 + 0.5 * 0.475
    assert abs(float((counts == 0).float().mean()) - (0.5 + 0.5 * (1 - 0.52498))) < 0.02
    assert abs(float(counts.mean()) - 0.5 * 0.52498 / (1 - 0.52498)) < 0.05
    assert float(sample_prior("zero", (5,), generator, "cpu").abs().sum()) == 0.0
    gaussian = sample_prior("gaussian", (20000,), generator, "cpu")
    assert abs(float(gaussian.std()) - 1.0) < 0.03


def test_bad_input_is_rejected(training):
    features, coords, expression, ids = training
    with pytest.raises(InputError, match="NaN"):
        STFlow(**TINY).fit(np.where(np.eye(*features.shape) > 0, np.nan, features), coords, expression)
    with pytest.raises(InputError, match="rows"):
        STFlow(**TINY).fit(features, coords[:-1], expression)
    with pytest.raises(InputError, match="negative"):
        STFlow(**TINY).fit(features, coords, expression - 5)
    with pytest.raises(InputError, match="prior"):
        STFlow(**TINY, prior="poisson").fit(features, coords, expression)
    with pytest.raises(InputError, match="duplicate coordinates"):
        STFlow(**TINY).fit(features, np.zeros_like(coords), expression)
    with pytest.raises(NotFittedError):
        STFlow().predict(features, coords)


@pytest.mark.parametrize("name,value,message", [
    ("epochs", -1, r"'epochs' parameter of STFlow must be an int in the range \[0, inf\)"),
    ("n_sample_steps", 1, r"'n_sample_steps' parameter of STFlow must be an int in the range \[2"),
    ("dropout", 1.0, r"'dropout' parameter of STFlow must be a float in the range \[0.0, 1.0\)"),
    ("feature_norm", "batch", r"'feature_norm' parameter of STFlow must be a str among"),
])
def test_parameters_are_checked_by_their_constraints(training, name, value, message):
    features, coords, expression, _ = training
    with pytest.raises(InputError, match=message):
        STFlow(**{**TINY, name: value}).fit(features, coords, expression)


def test_verbose_logs_the_training_loss(training, capsys):
    features, coords, expression, _ = training
    STFlow(**{**TINY, "epochs": 11, "n_models": 2, "verbose": True}).fit(features, coords, expression)
    lines = [line for line in capsys.readouterr().out.splitlines() if "STFlow epoch" in line]
    assert [line.split(":")[0] for line in lines] == [
        f"[dflashdeconv] STFlow epoch {epoch}/11 (network {net}/2)"
        for net in (1, 2) for epoch in (1, 11)]


def test_a_gpu_asked_for_where_there_is_none_is_named(training):
    features, coords, expression, _ = training
    if torch.cuda.is_available():  # on a GPU machine: a device beyond the visible ones
        with pytest.raises(InputError, match=r"device='cuda:99': only \d+ GPU"):
            STFlow(**TINY, device="cuda:99").fit(features, coords, expression)
    else:  # never a silent CPU run when the user asked for a GPU
        with pytest.raises(InputError, match="asked for a GPU but CUDA is not available"):
            STFlow(**TINY, device="cuda").fit(features, coords, expression)
    with pytest.raises(InputError, match="'gpu0' is not a torch device"):
        STFlow(**TINY, device="gpu0").fit(features, coords, expression)


def test_an_ensemble_is_the_mean_of_its_members(training):
    """Network i of an ensemble is the network that seed ``random_state + i`` trains alone."""
    features, coords, _ = make_slide(15)
    options = {**TINY, "epochs": 4, "non_negative": False}
    ensemble = STFlow(**{**options, "n_models": 2}, random_state=4).fit(*training)
    alone = [STFlow(**options, random_state=seed).fit(*training) for seed in (4, 5)]
    assert len(ensemble.model_) == 2
    members = np.mean([m.predict(features, coords) for m in alone], axis=0)
    np.testing.assert_allclose(ensemble.predict(features, coords), members, rtol=1e-5, atol=1e-5)
    assert np.abs(alone[0].predict(features, coords) - members).max() > 1e-3


def _slide_centred(values, ids):
    """target_norm="slide", written out: each slide's column means moved to the pooled ones."""
    centred = values.astype(np.float64)
    for slide in np.unique(ids):
        centred[ids == slide] += values.mean(0) - values[ids == slide].mean(0)
    return centred


def test_genes_are_learnt_standardised_and_predicted_on_their_own_scale(training):
    features, coords, expression, ids = training
    scaled = expression * np.linspace(0.01, 100, expression.shape[1], dtype=np.float32)
    model = STFlow(**TINY, linear_weight=0.0).fit(features, coords, scaled, ids)  # the networks
    centred = _slide_centred(scaled, ids)
    np.testing.assert_allclose(model.target_mean_, scaled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.target_scale_, centred.std(0), rtol=1e-4)
    predicted = model.predict(features, coords, ids)
    ratio = predicted.std(0) / centred.std(0)  # every gene on its own scale, none collapsed
    assert ratio.min() > 0.3 and ratio.max() < 1.5
    with pytest.raises(InputError, match="prior='zinb' draws log1p counts"):
        STFlow(**TINY, prior="zinb").fit(features, coords, expression)
    raw = STFlow(**{**TINY, "epochs": 2}, prior="zinb", standardize=False).fit(features, coords, expression)
    assert raw.target_mean_ is None and (raw.predict(features, coords) >= 0).all()


def test_models_saved_by_earlier_formats_still_load(training, tmp_path):
    """A format-1 file (one network on log1p values) and a format-2 file (no linear part)
    predict as they did: the networks alone."""
    options = {**TINY, "epochs": 2, "standardize": False, "prior": "zinb", "linear_weight": 0.0}
    model = STFlow(**options).fit(*training)
    model.save(tmp_path / "new.pt")
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    for name in ("linear_coef", "linear_intercept", "linear_alpha"):
        del state[name]
    del state["params"]["linear_weight"]
    second = {**state, "format": "dflashdeconv.stflow/2"}
    first = {**state, "format": "dflashdeconv.stflow/1",
             "params": {k: v for k, v in state["params"].items()
                        if k not in ("standardize", "n_models")},
             "state_dict": {k.split(".", 1)[1]: v for k, v in state["state_dict"].items()}}
    for name in ("target_mean", "target_scale"):
        del first[name]
    features, coords, _ = make_slide(16)
    for old in (first, second):
        torch.save(old, tmp_path / "old.pt")
        loaded = STFlow.load(tmp_path / "old.pt")
        assert loaded.linear_weight == 0.0 and loaded.linear_coef_ is None
        np.testing.assert_array_equal(loaded.predict(features, coords), model.predict(features, coords))


def _per_slide_design(features, coords):
    """The linear part's inputs, written out here: per-slide standardised features and
    their mean over the 6 nearest other spots."""
    z = (features - features.mean(0)) / features.std(0)
    _, nearest = cKDTree(coords).query(coords, 7)
    return np.hstack([z, z[nearest[:, 1:]].mean(1)])


def _reduced_rank(predicted, training_targets, rank):
    """Predictions with their deviations from the training mean projected on the ``rank``
    leading principal axes of the training targets (rank 0: unchanged)."""
    if rank == 0:
        return predicted
    mean = training_targets.mean(0)
    _, _, axes = np.linalg.svd(training_targets - mean, full_matrices=False)
    return (predicted - mean) @ axes[:rank].T @ axes[:rank] + mean


def test_linear_part_is_a_per_slide_reduced_rank_ridge_blended_with_the_networks(training, tmp_path):
    from sklearn.linear_model import Ridge

    features, coords, expression, ids = training
    model = STFlow(**{**TINY, "epochs": 3}, random_state=5).fit(*training)
    assert model.linear_weight == 0.4 and model.linear_alpha_ in LINEAR_ALPHAS
    assert model.linear_rank_ in LINEAR_RANKS
    query, query_coords, _ = make_slide(17)
    centred = _slide_centred(expression, ids)
    standardised = (centred - centred.mean(0)) / centred.std(0)
    design = np.vstack([_per_slide_design(features[ids == i], coords[ids == i]) for i in (0, 1)])
    ridge = Ridge(alpha=model.linear_alpha_).fit(design, standardised)
    linear = _reduced_rank(ridge.predict(_per_slide_design(query, query_coords)), standardised,
                           model.linear_rank_)
    networks = STFlow(**{**TINY, "epochs": 3}, random_state=5, linear_weight=0.0).fit(*training)
    assert networks.linear_coef_ is None
    with pytest.raises(InputError, match="fitted without its linear part"):
        networks.set_params(linear_weight=0.4).predict(query, query_coords)
    networks.set_params(linear_weight=0.0)
    np.testing.assert_allclose(model.sample(query, query_coords),
                               0.6 * networks.sample(query, query_coords) + 0.4 * linear,
                               rtol=1e-4, atol=1e-4)
    model.save(tmp_path / "model.pt")
    loaded = STFlow.load(tmp_path / "model.pt")
    assert (loaded.linear_alpha_, loaded.linear_rank_) == (model.linear_alpha_, model.linear_rank_)
    np.testing.assert_array_equal(loaded.predict(query, query_coords), model.predict(query, query_coords))
    # the linear part alone ignores a query slide's affine shift of its features
    model.set_params(linear_weight=1.0)
    np.testing.assert_allclose(model.predict(query * 1.5 + 2.0, query_coords),
                               model.predict(query, query_coords), atol=1e-4)


def test_linear_penalty_and_rank_are_chosen_on_held_out_slides():
    """The (penalty, rank) is the one whose reduced-rank ridge, fitted on the other slides,
    scores the highest mean per-gene Pearson on the held-out slide; one slide is cut in
    two halves."""
    from sklearn.linear_model import Ridge

    from dflashdeconv.metrics import pearson

    rng = np.random.default_rng(0)
    slides = [make_slide(s, n_spots=150) for s in (21, 22, 23)]
    features = np.vstack([f for f, _, _ in slides])
    coords = np.vstack([c for _, c, _ in slides])
    ids = np.repeat([0, 1, 2], 150)
    # 30 genes driven by 2 programmes of the features, each with its own noise
    programmes = features @ rng.normal(size=(12, 2))
    genes = (programmes @ rng.normal(size=(2, 30)) + rng.normal(0, 6.0, (450, 30)) + 60)
    genes = genes.astype(np.float32)
    standardised = (genes - genes.mean(0)) / genes.std(0)
    designs = [_per_slide_design(features[ids == i], coords[ids == i]) for i in range(3)]

    def held_out_score(alpha, rank):
        scores = []
        for i in range(3):
            rest = [j for j in range(3) if j != i]
            y = np.vstack([standardised[ids == j] for j in rest])
            ridge = Ridge(alpha=alpha).fit(np.vstack([designs[j] for j in rest]), y)
            predicted = _reduced_rank(ridge.predict(designs[i]), y, rank)
            scores.append(pearson(predicted, standardised[ids == i], per_cell_type=True).mean())
        return np.mean(scores)

    grid = [(alpha, rank) for alpha in LINEAR_ALPHAS for rank in LINEAR_RANKS]
    scores = np.array([held_out_score(alpha, rank) for alpha, rank in grid])
    best = grid[int(np.argmax(scores))]
    assert best[1] != 0  # reduced rank wins here ...
    assert np.ptp(scores) > 0.01  # ... and the choice matters
    options = {**TINY, "epochs": 0}
    model = STFlow(**options).fit(features, coords, genes, ids)
    assert (model.linear_alpha_, model.linear_rank_) == best
    clean = (features @ rng.normal(size=(12, 4)) + 40).astype(np.float32)
    assert STFlow(**options).fit(features[:150], coords[:150], clean[:150]).linear_alpha_ <= 10


def test_slide_centred_targets_ignore_slide_wide_expression_levels(training):
    """With target_norm='slide' a slide-wide offset of one training slide's expression
    changes nothing but the pooled level of the predictions; with 'global' it is learnt."""
    features, coords, expression, ids = training
    offset = np.where(ids == 1, 2.0, 0.0)[:, None]
    shifted = expression + offset
    kept = shifted.copy()
    params = {**TINY, "epochs": 3, "non_negative": False, "random_state": 5}
    query = make_slide(7)[:2]
    base = STFlow(**params).fit(features, coords, expression, ids)
    moved = STFlow(**params).fit(features, coords, shifted, ids)
    np.testing.assert_array_equal(shifted, kept)
    single = STFlow(**params).fit(features, coords, shifted.astype(np.float32), ids)
    assert single.predict(*query).dtype == np.float32  # centring keeps float32 targets float32
    np.testing.assert_allclose(moved.target_mean_, expression.mean(0) + offset.mean(), rtol=1e-5)
    np.testing.assert_allclose(moved.predict(*query), base.predict(*query) + offset.mean(),
                               atol=1e-4)
    learnt = [STFlow(**params, target_norm="global").fit(features, coords, y, ids).predict(*query)
              for y in (expression, shifted)]
    change = learnt[1] - learnt[0]
    assert np.abs(change - change.mean()).max() > 0.05


def test_feature_norm_keeps_removes_or_pairs_a_slide_wide_shift(training):
    """'global' keeps a query slide's shift in every feature (tissue make-up is
    information); 'slide' removes any per-slide affine change of the features; 'both'
    gives the networks the two views side by side."""
    features, coords, _ = make_slide(11)
    shifted = features * 1.5 + 2.0
    by_slide = STFlow(**{**TINY, "epochs": 3}, feature_norm="slide").fit(*training)
    np.testing.assert_allclose(by_slide.predict(shifted, coords),
                               by_slide.predict(features, coords), atol=1e-4)
    assert by_slide.feature_mean_ is None
    by_training = STFlow(**{**TINY, "epochs": 3}, feature_norm="global").fit(*training)
    np.testing.assert_allclose(by_training.feature_mean_, training[0].mean(0), rtol=1e-5, atol=1e-5)
    moved = np.abs(by_training.predict(shifted, coords) - by_training.predict(features, coords))
    assert moved.mean() > 0.05
    paired = STFlow(**{**TINY, "epochs": 3}, feature_norm="both").fit(*training)
    assert paired.model_[0].feature_proj[1].in_features == 2 * features.shape[1]
    np.testing.assert_array_equal(paired.feature_mean_, by_training.feature_mean_)
    seen = paired._slides(features, coords, None)[0].features
    globally = (features - paired.feature_mean_) / paired.feature_scale_
    within = (features - features.mean(0)) / features.std(0)
    np.testing.assert_allclose(seen, np.hstack([globally, within]), rtol=1e-4, atol=1e-4)
