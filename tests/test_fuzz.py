"""Malformed inputs: every case ends in a valid result or a documented exception
(:class:`~dflashdeconv.errors.InputError`), never a hang, a crash or a silent wrong answer.

``CATALOGUE`` names each case; the property-based tests below explore around them.
"""

import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

from dflashdeconv import FlashDeconv, tl
from dflashdeconv.engine import ingest
from dflashdeconv.errors import InputError

RNG = np.random.default_rng(0)
N, G, K = 60, 40, 3
BASE_Y = RNG.poisson(3.0, (N, G)).astype(np.float32)
BASE_X = RNG.gamma(2.0, 2.0, (K, G))
BASE_XY = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2).astype(float)


def _valid(P, n):
    """A result must be finite proportions summing to 1 for every spot."""
    assert P.shape[0] == n and np.isfinite(P).all() and (P >= 0).all()
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-9)


def fit(Y=BASE_Y, X=BASE_X, coords=BASE_XY, **params):
    return FlashDeconv(**params).fit_transform(Y, X, coords)


def _with(value, at=(5, 7), base=BASE_Y, dtype=None):
    Y = np.array(base, dtype=dtype or base.dtype)
    Y[at] = value
    return Y


def _unsorted_csr():
    """Non-canonical CSR: repeated (row, gene) entries that must be summed, not each
    log-transformed."""
    coo = sparse.coo_matrix(BASE_Y)
    doubled = sparse.csr_matrix((np.r_[coo.data / 2, coo.data / 2], (np.r_[coo.row, coo.row],
                                 np.r_[coo.col, coo.col])), shape=BASE_Y.shape)
    doubled.has_canonical_format = False
    return doubled


def _non_canonical_equals_canonical():
    P = fit(_unsorted_csr())
    np.testing.assert_allclose(P, fit(BASE_Y), atol=1e-12)
    return P


def _labels_reference(labels):
    return ad.AnnData(RNG.poisson(2.0, (len(labels), G)).astype(np.float32),
                      obs=pd.DataFrame({"cell_type": labels}),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


def _spots():
    adata = ad.AnnData(BASE_Y.copy(), var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    adata.obsm["spatial"] = BASE_XY.copy()
    return adata


def _deconvolve_labels(labels):
    out = tl.deconvolve(_spots(), _labels_reference(labels), copy=True, min_shared_genes=G)
    return out.obsm["flashdeconv"].to_numpy()


def _truncated(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload[: len(payload) // 2])
    return path


def _h5ad_bytes(tmp_path):
    _spots().write_h5ad(tmp_path / "full.h5ad")
    return (tmp_path / "full.h5ad").read_bytes()


def _gem_bytes():
    body = "geneID\tx\ty\tMIDCount\n" + "".join(f"g{i % 7}\t{i}\t{2 * i}\t{1 + i % 3}\n"
                                                for i in range(3000))
    return gzip.compress(body.encode())


# name -> (callable(tmp_path) returning a result, or None when an InputError is expected
#          with the given message fragment)
CATALOGUE = {
    "NaN count": (lambda t: fit(_with(np.nan)), "NaN or infinite"),
    "infinite count": (lambda t: fit(_with(np.inf)), "NaN or infinite"),
    "negative count": (lambda t: fit(_with(-1)), "negative"),
    "complex dtype": (lambda t: fit(BASE_Y.astype(complex)), "numeric"),
    "string dtype": (lambda t: fit(BASE_Y.astype(str)), "numeric"),
    "no spots": (lambda t: fit(BASE_Y[:0], coords=BASE_XY[:0]), "no spots"),
    "no genes": (lambda t: fit(BASE_Y[:, :0], BASE_X[:, :0]), "all-zero reference profile"),
    "huge counts (overflow)": (lambda t: fit(_with(1e300, dtype=np.float64), preprocess="raw"),
                               "too large"),
    "huge counts, log_cpm": (lambda t: _valid(fit(_with(1e300, dtype=np.float64)), N), None),
    "int8 counts": (lambda t: _valid(fit(BASE_Y.astype(np.int8)), N), None),
    "uint16 counts": (lambda t: _valid(fit(BASE_Y.astype(np.uint16)), N), None),
    "float16 counts": (lambda t: _valid(fit(BASE_Y.astype(np.float16)), N), None),
    "boolean counts": (lambda t: _valid(fit(BASE_Y > 2), N), None),
    "non-canonical CSR": (lambda t: _valid(_non_canonical_equals_canonical(), N), None),
    "all coordinates equal": (lambda t: _valid(fit(coords=np.zeros((N, 2))), N), None),
    "single spot": (lambda t: _valid(fit(BASE_Y[:1], coords=BASE_XY[:1]), 1), None),
    "all-zero spot matrix": (lambda t: _valid(fit(np.zeros((N, G)), preprocess="raw"), N), None),
    "coordinates as text": (lambda t: fit(coords=BASE_XY.astype(str)), "numeric"),
    "infinite coordinate": (lambda t: fit(coords=_with(np.inf, (3, 0), BASE_XY)), "NaN or infinite"),
    "NaN reference": (lambda t: fit(X=_with(np.nan, (0, 1), BASE_X)), "reference X contains"),
    "duplicated gene names": (lambda t: tl.deconvolve(
        _spots()[:, [0, 0, 1, 2]], _labels_reference(["a", "b"] * 5)), "duplicate gene names"),
    "5 shared genes": (lambda t: tl.deconvolve(_spots()[:, :5], _labels_reference(["a", "b"] * 5)),
                       "only 5 genes are shared"),
    "non-UTF-8 labels": (lambda t: _valid(_deconvolve_labels(
        [b"\xff\xfe".decode("latin-1"), "\u00e9t\u00e9", "\udcff".encode("utf-8", "surrogatepass")
         .decode("latin-1")] * 4), N), None),
    "all labels unknown": (lambda t: _deconvolve_labels(["Unknown"] * 6), "at least 2 cell types"),
    "truncated h5ad": (lambda t: ingest.from_h5ad(_truncated(t, "t.h5ad", _h5ad_bytes(t)),
                                                  t / "s.zarr"), "cannot be read as h5ad"),
    "truncated gzip GEM": (lambda t: ingest.from_gem(_truncated(t, "t.gem.gz", _gem_bytes()),
                                                     t / "g.zarr"), "truncated or corrupt"),
    "non-UTF-8 GEM": (lambda t: ingest.from_gem(_truncated(t, "b.gem", b"\xff\xfe\x00bad" * 50),
                                                t / "b.zarr"), "cannot be read as a GEM"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue(case, tmp_path):
    run, message = CATALOGUE[case]
    if message is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(tmp_path)
        return
    with pytest.raises(InputError, match=message):
        run(tmp_path)


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 20


def test_all_zero_spot_matrix_is_flagged_uniform():
    with pytest.warns(UserWarning, match="60 of 60 spots have no counts"):
        model = FlashDeconv(preprocess="raw").fit(np.zeros((N, G)), BASE_X, BASE_XY)
    assert model.zero_signal_.all()
    np.testing.assert_allclose(model.proportions_, 1.0 / K)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), g=st.integers(1, 25), k=st.integers(1, 4),
       dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.float16]),
       poison=st.sampled_from([None, np.nan, np.inf, -1.0, 1e38]),
       sparse_input=st.booleans(), same_coords=st.booleans(),
       preprocess=st.sampled_from(["log_cpm", "pearson", "raw"]), seed=st.integers(0, 2**16))
def test_random_inputs_end_in_a_result_or_a_documented_error(n, g, k, dtype, poison, sparse_input,
                                                             same_coords, preprocess, seed):
    rng = np.random.default_rng(seed)
    Y = rng.poisson(rng.uniform(0.1, 5.0), (n, g)).astype(np.float64)
    if poison is not None:
        Y[rng.integers(n), rng.integers(g)] = poison
    with np.errstate(invalid="ignore", over="ignore"):
        Y = Y.astype(dtype)
    if sparse_input and Y.dtype == np.float16:
        Y = Y.astype(np.float32)  # scipy.sparse has no float16
    X = rng.gamma(1.0, 1.0, (k, g))
    coords = np.zeros((n, 2)) if same_coords else rng.uniform(0, 10, (n, 2))
    try:
        model = FlashDeconv(preprocess=preprocess).fit(sparse.csr_matrix(Y) if sparse_input else Y,
                                                       X, coords)
    except InputError as error:
        assert str(error)  # a message naming the problem
        return
    _valid(model.proportions_, n)
    assert np.isfinite(model.beta_).all()
