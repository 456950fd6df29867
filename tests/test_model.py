import warnings

import numpy as np
import pytest
from conftest import digest

from dflashdeconv import FlashDeconv
from dflashdeconv.errors import DataWarning, InputError, NotFittedError
from dflashdeconv.metrics import pearson, rmse


def test_starmap_accuracy_at_least_the_reference_package(starmap):
    Y, X, coords, types, truth = starmap
    P = FlashDeconv().fit_transform(Y, X, coords, cell_type_names=types)
    # flashdeconv 0.2.0 at its defaults: Pearson 0.8751, RMSE 0.1066
    assert pearson(P, truth) >= 0.875
    assert rmse(P, truth) <= 0.107
    np.testing.assert_allclose(P.sum(axis=1), 1.0)


def test_fitted_attributes_and_accessors(small_problem):
    Y, X, coords, truth = small_problem
    model = FlashDeconv()
    assert model.summary() == {"fitted": False}
    with pytest.raises(NotFittedError):
        model.get_cell_type_proportions()
    assert model.fit(Y, X, coords) is model
    n, K = Y.shape[0], X.shape[0]
    assert model.beta_.shape == model.proportions_.shape == (n, K)
    assert np.all(model.beta_ >= 0)
    np.testing.assert_allclose(model.proportions_,
                               model.beta_ / model.beta_.sum(axis=1, keepdims=True))
    assert np.array_equal(model.get_dominant_cell_type(), model.proportions_.argmax(axis=1))
    assert model.get_abundances() is model.beta_
    assert model.gene_idx_.size == model.gene_weights_.size <= Y.shape[1]
    assert model.lambda_used_ > 0 and model.info_["converged"]
    summary = model.summary()
    assert summary["n_spots"] == n and summary["n_cell_types"] == K
    assert pearson(model.proportions_, truth) > 0.9


def test_sklearn_parameter_conventions():
    model = FlashDeconv(tol=1e-6, preprocess="pearson")
    assert model.get_params()["tol"] == 1e-6
    assert model.set_params(k_neighbors=8) is model and model.k_neighbors == 8
    assert "preprocess='pearson'" in repr(model)
    with pytest.raises(ValueError, match="Invalid parameter .bogus."):
        model.set_params(bogus=1)
    FlashDeconv(preprocess="bogus")  # __init__ stores without checking; fit validates


@pytest.mark.parametrize("weighting", ["expected", "countsketch"])
def test_same_seed_same_output(small_problem, weighting):
    Y, X, coords, _ = small_problem
    a = FlashDeconv(gene_weighting=weighting, random_state=3).fit_transform(Y, X, coords)
    b = FlashDeconv(gene_weighting=weighting, random_state=3).fit_transform(Y, X, coords)
    assert np.array_equal(a, b)
    if weighting == "countsketch":
        c = FlashDeconv(gene_weighting=weighting, random_state=4).fit_transform(Y, X, coords)
        assert not np.array_equal(a, c)


@pytest.mark.parametrize("preprocess", ["log_cpm", "pearson", "raw"])
def test_dense_and_sparse_input_give_the_same_result(small_problem, preprocess):
    Y, X, coords, _ = small_problem
    sparse_fit = FlashDeconv(preprocess=preprocess).fit_transform(Y, X, coords)
    dense_fit = FlashDeconv(preprocess=preprocess).fit_transform(Y.toarray(), X, coords)
    csc_fit = FlashDeconv(preprocess=preprocess).fit_transform(Y.tocsc(), X, coords)
    np.testing.assert_allclose(dense_fit, sparse_fit, atol=1e-12)
    np.testing.assert_allclose(csc_fit, sparse_fit, atol=1e-12)


def test_inputs_are_not_modified(small_problem):
    Y, X, coords, _ = small_problem
    before = digest(Y, X, coords)
    model = FlashDeconv(preprocess="pearson").fit(Y, X, coords)
    model.compute_uncertainty()
    model.bootstrap_uncertainty(n_bootstrap=2)
    assert digest(Y, X, coords) == before


def test_three_dimensional_coordinates(small_problem):
    Y, X, coords, truth = small_problem
    coords3 = np.column_stack([coords, np.zeros(len(coords))])
    P2 = FlashDeconv().fit_transform(Y, X, coords)
    P3 = FlashDeconv().fit_transform(Y, X, coords3)
    np.testing.assert_allclose(P2, P3, atol=1e-12)  # a flat z adds no information


def test_all_zero_spots_are_flagged_not_silently_uniform(small_problem):
    Y, X, coords, _ = small_problem
    Y = Y.tolil()
    Y[[4, 10]] = 0
    Y = Y.tocsr()
    with pytest.warns(DataWarning, match="2 of 900 spots have no counts"):
        model = FlashDeconv().fit(Y, X, coords)
    assert model.zero_signal_[[4, 10]].all()
    assert model.zero_signal_.sum() == 2
    np.testing.assert_allclose(model.proportions_[4], 1 / X.shape[0])


BAD_INPUTS = {
    "nan counts": (lambda Y, X, c: (_with(Y, np.nan), X, c), "NaN or infinite"),
    "inf counts": (lambda Y, X, c: (_with(Y, np.inf), X, c), "NaN or infinite"),
    "negative counts": (lambda Y, X, c: (_with(Y, -1.0), X, c), "negative"),
    "nan reference": (lambda Y, X, c: (Y, _set(X, (0, 0), np.nan), c), "reference X contains"),
    "negative reference": (lambda Y, X, c: (Y, _set(X, (1, 3), -2.0), c), "negative"),
    "one cell type": (lambda Y, X, c: (Y, X[:1], c), "at least 2 cell types"),
    "empty cell type profile": (lambda Y, X, c: (Y, _set(X, (2, slice(None)), 0.0), c),
                                "all-zero reference profile"),
    "gene count mismatch": (lambda Y, X, c: (Y, X[:, :-1], c), "gene mismatch"),
    "coordinates missing": (lambda Y, X, c: (Y, X, None), "coords are missing"),
    "coordinates nan": (lambda Y, X, c: (Y, X, _set(c, (7, 1), np.nan)), "NaN or infinite"),
    "coordinates 1-D": (lambda Y, X, c: (Y, X, c[:, 0]), "shape"),
    "coordinates 4 columns": (lambda Y, X, c: (Y, X, np.tile(c, 2)), "shape"),
    "spot count mismatch": (lambda Y, X, c: (Y, X, c[:-3]), "rows but the spot matrix has"),
    "text counts": (lambda Y, X, c: (np.full(Y.shape, "a"), X, c), "numeric"),
}


def _with(Y, value):
    Y = Y.copy()
    Y.data[5] = value
    return Y


def _set(a, index, value):
    a = np.array(a, dtype=float)
    a[index] = value
    return a


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(small_problem, case):
    Y, X, coords, _ = small_problem
    make, message = BAD_INPUTS[case]
    with pytest.raises(InputError, match=message):
        FlashDeconv().fit(*make(Y, X, coords))


@pytest.mark.parametrize("params, message", [
    ({"preprocess": "scran"}, "'preprocess' parameter of FlashDeconv must be a str among"),
    ({"gene_weighting": "random"}, "'gene_weighting' parameter of FlashDeconv must be"),
    ({"spatial_method": "delaunay"}, "'spatial_method' parameter of FlashDeconv must be"),
    ({"spatial_method": "radius"}, "needs a positive radius"),
    ({"lambda_spatial": "big"}, "'lambda_spatial' parameter"),
    ({"lambda_spatial": -1.0}, "'lambda_spatial' parameter"),
    ({"lambda_spatial": float("nan")}, "'lambda_spatial' parameter"),
    ({"tol": 0}, r"'tol' parameter of FlashDeconv must be a float in the range \(0.0, inf\)"),
    ({"k_neighbors": -1}, "'k_neighbors' parameter"),
    ({"sketch_dim": 0}, "'sketch_dim' parameter"),
    ({"n_hvg": 2.5}, "'n_hvg' parameter of FlashDeconv must be an int"),
])
def test_bad_parameters_raise_before_work(small_problem, params, message):
    Y, X, coords, _ = small_problem
    with pytest.raises(InputError, match=message):
        FlashDeconv(**params).fit(Y, X, coords)


def test_fixed_lambda_and_unconverged_warning(small_problem):
    Y, X, coords, _ = small_problem
    model = FlashDeconv(lambda_spatial=0.0).fit(Y, X, coords)
    assert model.lambda_used_ == 0.0 and model.info_["n_iterations"] <= 2
    with pytest.warns(RuntimeWarning, match="did not reach"):
        FlashDeconv(max_iter=1, tol=1e-12).fit(Y, X, coords)


def test_verbose_reports_phases(small_problem, capsys):
    Y, X, coords, _ = small_problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlashDeconv(verbose=True).fit(Y, X, coords)
    out = capsys.readouterr().out
    assert "genes selected" in out and "solver:" in out
