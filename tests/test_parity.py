"""Parity with flashdeconv 0.2.0 at tol=1e-7, against values pinned by
``benchmarks/parity.py --write`` (which runs the reference package in its own venv)."""

import itertools

import numpy as np
import pytest
from conftest import TEST_DATA
from scipy import sparse

from dflashdeconv import FlashDeconv

PINNED = np.load(TEST_DATA / "parity_reference.npz")
MODES = list(itertools.product(("starmap", "synthetic"), ("log_cpm", "pearson", "raw"),
                               ("expected", "countsketch"), ("knn", "radius")))


@pytest.fixture(scope="module")
def fixtures(starmap):
    Y, X, coords, _, _ = starmap
    d = np.load(TEST_DATA / "parity_synthetic_inputs.npz")
    synthetic = (sparse.csr_matrix((d["Y_data"], d["Y_indices"], d["Y_indptr"]),
                                   shape=tuple(d["Y_shape"])), d["X"], d["coords"])
    return {"starmap": ((Y, X, coords), 800.0), "synthetic": (synthetic, 1.5)}


@pytest.mark.parametrize("fixture, preprocess, weighting, graph", MODES)
def test_proportions_match_the_reference_package(fixtures, fixture, preprocess, weighting, graph):
    (Y, X, coords), radius = fixtures[fixture]
    key = f"{fixture}/{preprocess}/{weighting}/{graph}"
    model = FlashDeconv(preprocess=preprocess, gene_weighting=weighting, spatial_method=graph,
                        radius=radius if graph == "radius" else None, tol=1e-7,
                        max_iter=100_000).fit(Y, X, coords)
    assert np.array_equal(model.gene_idx_, PINNED[f"{key}/gene_idx"])
    assert model.lambda_used_ == pytest.approx(float(PINNED[f"{key}/lambda"]), rel=1e-9)
    assert np.abs(model.proportions_ - PINNED[f"{key}/proportions"]).max() < 1e-4
