import numpy as np
import pytest
from scipy.stats import norm

from dflashdeconv import FlashDeconv
from dflashdeconv.core.uncertainty import OrderStatistics, benjamini_hochberg


@pytest.fixture(scope="module")
def fitted(small_problem):
    Y, X, coords, _ = small_problem
    return FlashDeconv().fit(Y, X, coords), Y


def _explicit_spot(model, Y, i, z):
    """Sandwich intervals of spot i with explicit matrices and np.linalg.inv."""
    t = model._transform_
    genes = model.gene_idx_
    row = Y[i].toarray().ravel().astype(float)[genes]
    y_tilde = np.log1p(row * 1e4 / max(row.sum(), 1))
    y = np.zeros(t.rep.dim)
    np.add.at(y, t.rep.column, y_tilde * t.rep.coef)
    X = t.rep.X_repr
    b = model.beta_[i]
    e = y - b @ X
    active = np.flatnonzero(b > 0)
    pen = model.lambda_used_ * model.info_["n_neighbors"][i]
    G = model.info_["XtX"]
    H_inv = np.linalg.inv(G[np.ix_(active, active)] + pen * np.eye(active.size))
    M = (X * e**2) @ X.T
    cov = H_inv @ M[np.ix_(active, active)] @ H_inv
    S = b.sum()
    p = b[active] / S
    J = (np.eye(active.size) - p[None, :].T @ np.ones((1, active.size))) / S  # dp/db
    se_active = np.sqrt(np.diag(J @ cov @ J.T))
    out = {"se": dict(zip(active, se_active)), "z": dict(zip(active, b[active] / np.sqrt(np.diag(cov))))}
    nsum = np.asarray(model.adjacency_[i] @ model.beta_).ravel()
    for k in np.setdiff1d(np.arange(len(b)), active):
        h = G[active, k]
        v = H_inv @ h
        schur = G[k, k] + pen - h @ v
        step = (X[k] @ e + model.lambda_used_ * nsum[k] - model.rho_used_) / schur
        c = np.zeros(len(b))
        c[active] = -v / schur
        c[k] = 1 / schur
        sk = np.sqrt(c @ M @ c)
        upper = max(step + z * sk, 0)
        out.setdefault("upper", {})[k] = min(upper / (S + upper), 1)
        out["z"][k] = step / sk
    return out


def test_sandwich_matches_explicit_inverse(fitted):
    model, Y = fitted
    uq = model.compute_uncertainty(alpha=0.1)
    z = norm.ppf(0.95)
    for i in [0, 17, 333, 899]:
        ref = _explicit_spot(model, Y, i, z)
        for k, se in ref["se"].items():
            assert uq["se_prop"][i, k] == pytest.approx(se, rel=1e-6, abs=1e-12)
            p = model.proportions_[i, k]
            assert uq["ci_lower"][i, k] == pytest.approx(np.clip(p - z * se, 0, 1), abs=1e-9)
        for k, upper in ref.get("upper", {}).items():
            assert uq["ci_lower"][i, k] == 0
            assert uq["ci_upper"][i, k] == pytest.approx(upper, rel=1e-6)
        for k, zk in ref["z"].items():
            assert uq["z_score"][i, k] == pytest.approx(zk, rel=1e-6)


def test_uncertainty_outputs_are_consistent(fitted):
    model, _ = fitted
    uq = model.compute_uncertainty()
    P = model.proportions_
    assert np.all(uq["ci_lower"] <= P + 1e-12) and np.all(P <= uq["ci_upper"] + 1e-12)
    np.testing.assert_allclose(uq["p_value"], norm.sf(uq["z_score"]))
    assert uq["detected"].dtype == bool
    assert uq["detected"][P > 0.5].mean() > 0.9  # dominant types are detected
    assert np.all(uq["residual_ss"] >= 0) and np.all(uq["residual_norm"] <= 1.0 + 1e-9)
    model_based = model.compute_uncertainty(method="model")
    assert not np.allclose(model_based["se_prop"], uq["se_prop"], equal_nan=True)
    with pytest.warns(DeprecationWarning):
        diag = model.compute_uncertainty(method="laplace_diag")
    assert np.all(diag["se_prop"][model.beta_ == 0] == 0)
    with pytest.raises(ValueError, match="method"):
        model.compute_uncertainty(method="jackknife")


def test_benjamini_hochberg_matches_definition():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0, 1, 300), rng.uniform(0, 1e-3, 40), [np.nan]])
    q = 0.1
    finite = np.sort(p[np.isfinite(p)])
    m = finite.size
    passing = np.flatnonzero(finite <= q * np.arange(1, m + 1) / m)
    threshold = finite[passing[-1]] if passing.size else -1
    expected = np.isfinite(p) & (p <= threshold)
    assert np.array_equal(benjamini_hochberg(p, q), expected)


@pytest.mark.parametrize("n, alpha", [(37, 0.1), (100, 0.05), (5, 0.5)])
def test_order_statistics_equal_numpy_percentiles(n, alpha):
    rng = np.random.default_rng(n)
    reps = rng.normal(size=(n, 30, 4))
    stats = OrderStatistics(n, alpha, (30, 4))
    for r in reps:
        stats.add(r)
    lower, upper = stats.interval()
    np.testing.assert_allclose(lower, np.percentile(reps, 100 * alpha / 2, axis=0), atol=1e-12)
    np.testing.assert_allclose(upper, np.percentile(reps, 100 * (1 - alpha / 2), axis=0),
                               atol=1e-12)
    np.testing.assert_allclose(stats.mean, reps.mean(axis=0))
    np.testing.assert_allclose(stats.std, reps.std(axis=0))
    assert stats.smallest.shape[0] < n or n <= 5


def test_bootstrap_is_seeded_and_brackets_the_estimate(small_problem):
    Y, X, coords, _ = small_problem
    model = FlashDeconv().fit(Y, X, coords)
    a = model.bootstrap_uncertainty(n_bootstrap=12, seed=1)
    b = model.bootstrap_uncertainty(n_bootstrap=12, seed=1)
    c = model.bootstrap_uncertainty(n_bootstrap=12, seed=2)
    assert np.array_equal(a["boot_ci_lower"], b["boot_ci_lower"])
    assert not np.array_equal(a["boot_mean"], c["boot_mean"])
    assert np.all(a["boot_ci_lower"] <= a["boot_mean"] + 1e-12)
    assert np.all(a["boot_mean"] <= a["boot_ci_upper"] + 1e-12)
    assert a["n_converged"] == 12
    # resampling noise is small for deep spots: the bootstrap mean stays near the fit
    assert np.abs(a["boot_mean"] - model.proportions_).mean() < 0.02
    dense = FlashDeconv().fit(Y.toarray(), X, coords).bootstrap_uncertainty(n_bootstrap=12, seed=1)
    np.testing.assert_allclose(dense["boot_ci_upper"], a["boot_ci_upper"], atol=1e-12)
