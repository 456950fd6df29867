import numba
import numpy as np
import pytest
from scipy import sparse

from dflashdeconv.core.graph import knn_graph
from dflashdeconv.core.solver import objective, solve, sweep


def _problem(n=400, k=6, seed=0, collinear=False):
    rng = np.random.default_rng(seed)
    X = rng.gamma(1.0, 1.0, (k, 50))
    if collinear:
        X[1] = X[0] * 1.001 + 1e-3
    gram = X @ X.T
    beta_true = rng.dirichlet(np.full(k, 0.5), n) * 3
    Yr = beta_true @ X + rng.normal(0, 0.3, (n, 50))
    H = Yr @ X.T
    A = knn_graph(rng.uniform(0, 20, (n, 2)), 6)
    lam = 0.005 * np.mean(np.diag(gram)) / np.mean(A.sum(axis=1))
    rho = 0.01 * np.mean(np.diag(gram))
    return H, gram, A, lam, rho, float((Yr**2).sum())


def _kkt_violation(beta, H, gram, A, lam, rho):
    deg = np.asarray(A.sum(axis=1)).ravel()
    grad = beta @ gram - H + lam * (deg[:, None] * beta - A @ beta) + rho
    viol = np.where(beta > 0, np.abs(grad), np.maximum(-grad, 0))
    return viol.max() / np.mean(np.diag(gram))


@pytest.mark.parametrize("collinear", [False, True])
def test_solution_satisfies_kkt_conditions(collinear):
    H, gram, A, lam, rho, _ = _problem(collinear=collinear)
    # nearly collinear types leave one direction to the spatial term alone: slower
    beta, info = solve(H, gram, A, lam, rho, tol=1e-12, max_iter=3000)
    assert info["converged"]
    assert beta.min() >= 0
    assert _kkt_violation(beta, H, gram, A, lam, rho) < 1e-10


def test_objective_never_increases():
    H, gram, A, lam, rho, ysq = _problem(seed=1)
    start = np.full(H.shape, 1.0 / H.shape[1])
    trace = [objective(start, H, gram, ysq, A, lam, rho)]
    solve(H, gram, A, lam, rho, tol=1e-10,
          callback=lambda it, ch, b: trace.append(objective(b, H, gram, ysq, A, lam, rho)))
    steps = np.diff(trace)
    assert len(trace) > 3
    assert np.all(steps <= 1e-12 * abs(trace[-1]))
    assert trace[-1] < trace[0]


def test_optimum_beats_perturbations():
    H, gram, A, lam, rho, ysq = _problem(seed=2)
    beta, _ = solve(H, gram, A, lam, rho, tol=1e-12, max_iter=500)
    best = objective(beta, H, gram, ysq, A, lam, rho)
    rng = np.random.default_rng(0)
    for _ in range(5):
        other = np.maximum(beta + rng.normal(0, 1e-3, beta.shape), 0)
        assert objective(other, H, gram, ysq, A, lam, rho) > best


def test_result_does_not_depend_on_thread_count():
    H, gram, A, lam, rho, _ = _problem(n=3000, seed=3)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, _ = solve(H, gram, A, lam, rho)
    finally:
        numba.set_num_threads(threads)
    many, _ = solve(H, gram, A, lam, rho)
    assert np.array_equal(one, many)


def test_block_step_with_frozen_halo_equals_global_step():
    H, gram, A, lam, rho, _ = _problem(seed=4)
    n, K = H.shape
    beta = np.random.default_rng(5).uniform(0, 1, (n, K))
    full = np.empty_like(beta)
    change, size = np.zeros(n), np.zeros(n)
    sweep(H, gram, beta, full, A.indptr.astype(np.int64), A.indices.astype(np.int64), lam, rho,
          change, size)
    block = np.arange(100, 180)
    halo = np.setdiff1d(np.unique(A[block].indices), block)
    local = np.concatenate([block, halo])
    position = np.full(n, -1)
    position[local] = np.arange(local.size)
    sub = sparse.csr_matrix(A[block][:, local])
    beta_local = beta[local].copy()
    out = beta_local.copy()
    sweep(H[block], gram, beta_local, out, sub.indptr.astype(np.int64),
          sub.indices.astype(np.int64), lam, rho, np.zeros(block.size), np.zeros(block.size))
    assert np.array_equal(out[: block.size], full[block])
    assert np.array_equal(out[block.size:], beta[halo])  # halo rows are never written


def test_solve_validates_warm_start_and_reports_history():
    H, gram, A, lam, rho, _ = _problem(n=50)
    with pytest.raises(ValueError, match="beta_init"):
        solve(H, gram, A, lam, rho, beta_init=np.zeros((3, 3)))
    beta, info = solve(H, gram, A, lam, rho, max_iter=2, tol=1e-15)
    assert not info["converged"] and info["n_iterations"] == 2 and len(info["changes"]) == 2
