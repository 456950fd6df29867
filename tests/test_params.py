"""One parameter spec (core.params.MODEL) behind the estimator, tl.deconvolve and the CLI,
and the deprecated names that still work for one release."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

from dflashdeconv import FlashDeconv, io, tl
from dflashdeconv.cli import build_parser
from dflashdeconv.core.params import MODEL, renamed


def _deconvolve_parser():
    return build_parser()._subparsers._group_actions[0].choices["deconvolve"]


def test_estimator_signature_and_constraints_are_the_spec():
    signature = inspect.signature(FlashDeconv.__init__).parameters
    assert [n for n in signature if n != "self"] == [p.name for p in MODEL]
    assert all(signature[p.name].default == p.default for p in MODEL)
    assert set(FlashDeconv._parameter_constraints) == {p.name for p in MODEL}


def test_tl_deconvolve_takes_every_model_parameter_with_its_default():
    signature = inspect.signature(tl.deconvolve).parameters
    for p in MODEL:
        if p.name == "verbose":
            continue
        assert p.name in signature, p.name
        assert signature[p.name].default == p.default, p.name


def test_cli_options_are_generated_from_the_spec():
    parser = _deconvolve_parser()
    defaults = {}
    for action in parser._actions:  # a deprecated alias shares its dest; the first one counts
        defaults.setdefault(action.dest, action.default)
    flags = {o for a in parser._actions for o in a.option_strings}
    for p in MODEL:
        if p.cli:
            assert p.flag in flags and defaults[p.name] == p.default, p.name
    assert {"--rho-sparsity", "--uncertainty", "--key-added", "--random-state"} <= flags
    args = parser.parse_args(["s.h5ad", "r.h5ad", "--rho-sparsity", "0.05", "--lambda-spatial",
                              "2.5", "--radius", "3"])
    assert (args.rho_sparsity, args.lambda_spatial, args.radius) == (0.05, 2.5, 3.0)


def test_cli_rejects_a_bad_value_with_a_clean_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _deconvolve_parser().parse_args(["s.h5ad", "r.h5ad", "--lambda-spatial", "abc"])
    assert exit_info.value.code == 2
    assert "'auto' or a number expected, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("old, new, value", [("--seed", "random_state", "7"),
                                             ("--key", "key_added", "mine")])
def test_deprecated_cli_flags_still_work(old, new, value, capsys):
    args = _deconvolve_parser().parse_args(["s.h5ad", "r.h5ad", old, value])
    assert str(getattr(args, new)) == value
    assert f"{old} is deprecated" in capsys.readouterr().err


def test_renamed_arguments_warn_and_refuse_ambiguity():
    with pytest.warns(FutureWarning, match="'old' is deprecated .* use 'new'"):
        assert renamed("f", {"old": 3}, {"old": "new"}, {"new": None}) == {"new": 3}
    with pytest.raises(TypeError, match="got both 'old' and its new name 'new'"):
        renamed("f", {"old": 3}, {"old": "new"}, {"new": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'typo'"):
        renamed("f", {"typo": 3}, {"old": "new"}, {"new": None})


def test_deprecated_python_names_give_the_same_result(small_tissue):
    spots, reference = small_tissue
    spots = spots.copy()
    spots.layers["counts"] = spots.X.copy()
    new = tl.deconvolve(spots, reference, layer="counts", copy=True, n_hvg=200)
    with pytest.warns(FutureWarning, match="'layer_st' is deprecated"):
        old = tl.deconvolve(spots, reference, layer_st="counts", copy=True, n_hvg=200)
    np.testing.assert_array_equal(new.obsm["flashdeconv"], old.obsm["flashdeconv"])
    with pytest.warns(FutureWarning, match="'spatial_coord_key' is deprecated"):
        Y, _, coords, _, _ = io.prepare_data(spots, reference, spatial_coord_key="spatial")
    with pytest.warns(FutureWarning, match="'coord_key' is deprecated"):
        _, coords_old, _ = io.load_spatial_data(spots, coord_key="spatial")
    np.testing.assert_array_equal(coords, coords_old)
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer_sp'"):
        tl.deconvolve(spots, reference, layer_sp="counts")


def test_parameter_errors_name_the_parameter(small_problem):
    Y, X, coords, _ = small_problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="'rho_sparsity' parameter of FlashDeconv"):
            FlashDeconv(rho_sparsity=-0.1).fit(Y, X, coords)
