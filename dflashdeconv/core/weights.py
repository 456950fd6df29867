"""Gene weighting: the solver's gene representation of Y and X.

Both modes are described by the same small object, :class:`Representation`: every
selected gene ``j`` lands in column ``column[j]`` of a ``dim``-dimensional space with
coefficient ``coef[j]``.

- ``expected``: one column per gene, ``coef`` = the exact expected CountSketch weight.
- ``countsketch``: ``column`` = the gene's hash bucket, ``coef`` = sign x amplitude x
  bucket normalisation.

``Y_repr = Y_tilde S`` and ``X_repr = X_tilde S`` for the sparse ``G x dim`` matrix ``S``
this defines, and ``H = Y_repr X_repr^T = Y_tilde (S X_repr^T)``: the projection kernel
only needs the ``G x K`` matrix :attr:`Representation.loadings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .params import WEIGHTINGS


def leverage_amplitudes(leverage: np.ndarray) -> np.ndarray:
    """Per-gene CountSketch amplitude ``clip(sqrt(G * l_j + 1e-10), 0.1, 10)``."""
    leverage = np.asarray(leverage, dtype=np.float64)
    p = leverage / (leverage.sum() + 1e-10)
    return np.clip(np.sqrt(p * leverage.size + 1e-10), 0.1, 10.0)


def expected_weights(
    leverage: np.ndarray, sketch_dim: int = 512, n_quad: int = 3000, max_elements: int = 2**23
) -> np.ndarray:
    """Expected weight of each gene after CountSketch bucket normalisation.

    ``w_j = E[a_j / sqrt(a_j^2 + sum_{i != j} a_i^2 B_i)]``, ``B_i ~ Bernoulli(1/d)``,
    evaluated exactly through ``x^-1/2 = pi^-1/2 int t^-1/2 exp(-t x) dt``: the expectation
    of ``exp(-t S_j)`` factorises over genes. Trapezoid rule in ``log t`` on ``n_quad``
    nodes in ``[1e-7, 1e5]``; the product over genes is taken in log space. The global
    factor ``sqrt(G / d)`` is left out (lambda and rho scale with the Gram matrix).
    """
    if sketch_dim <= 0:
        raise ValueError(f"sketch_dim must be positive, got {sketch_dim}")
    a2 = leverage_amplitudes(leverage) ** 2
    if a2.size == 0:
        return np.empty(0)
    if sketch_dim == 1:
        return np.sqrt(a2 / a2.sum())
    log_t = np.linspace(np.log(1e-7), np.log(1e5), n_quad)
    integral = np.zeros(a2.size)
    step = max(2, max_elements // a2.size)
    start = 0
    while start < n_quad - 1:
        stop = min(start + step, n_quad)
        t = np.exp(log_t[start:stop])
        decay = a2[:, None] * t[None, :]
        # log of E[exp(-t a_i^2 B_i)] = log(1 - (1 - exp(-t a_i^2)) / d), per gene and node
        log_factor = np.log1p(np.expm1(-decay) / sketch_dim)
        others = log_factor.sum(axis=0)[None, :] - log_factor
        # t^-1/2 dt = t^1/2 d(log t)
        integrand = np.sqrt(t)[None, :] * np.exp(others - decay)
        integral += np.trapezoid(integrand, log_t[start:stop], axis=1)
        start = stop - 1
    return np.sqrt(a2) * integral / np.sqrt(np.pi)


def countsketch_hash(n_genes: int, sketch_dim: int, random_state) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and sign of each gene.

    Drawn as ``RandomState(seed).randint(0, d, G)`` then ``choice([-1, 1], G)``, the
    protocol of the reference package, so that a seed gives the same sketch in both.
    """
    if isinstance(random_state, np.random.RandomState):
        rng = random_state
    else:
        rng = np.random.RandomState(random_state)
    bucket = rng.randint(0, sketch_dim, size=n_genes)
    sign = rng.choice([-1, 1], size=n_genes)
    return bucket.astype(np.int64), sign.astype(np.float64)


@dataclass
class Representation:
    """Where each selected gene goes in the solver's gene space, and the reference there.

    Attributes
    ----------
    column, coef : (G_sel,) gene j contributes ``coef[j] * y_j`` to column ``column[j]``.
    dim : size of the representation space.
    X_repr : (K, dim) reference in that space.
    """

    column: np.ndarray
    coef: np.ndarray
    dim: int
    X_repr: np.ndarray

    @classmethod
    def build(cls, X_tilde: np.ndarray, column: np.ndarray, coef: np.ndarray, dim: int):
        """Representation of the preprocessed reference ``X_tilde`` (K x G_sel)."""
        X_repr = np.zeros((X_tilde.shape[0], dim))
        np.add.at(X_repr.T, column, (X_tilde * coef[None, :]).T)
        return cls(np.ascontiguousarray(column, np.int64), np.asarray(coef, np.float64), dim, X_repr)

    @property
    def unique_columns(self) -> bool:
        """True when no two genes share a column (the ``expected`` mode)."""
        return self.dim == self.column.size and np.array_equal(self.column, np.arange(self.dim))

    @property
    def gram(self) -> np.ndarray:
        """``X_repr X_repr^T`` (K x K)."""
        return self.X_repr @ self.X_repr.T

    @property
    def loadings(self) -> np.ndarray:
        """``S X_repr^T`` (G_sel x K): ``H_i = sum_j y_tilde_ij loadings[j]``."""
        return np.ascontiguousarray(self.coef[:, None] * self.X_repr[:, self.column].T)


def build_representation(
    X_tilde: np.ndarray,
    leverage: np.ndarray,
    weighting: str = "expected",
    sketch_dim: int = 512,
    random_state=0,
) -> Representation:
    """The solver's gene representation for a preprocessed reference ``X_tilde``."""
    n_genes = X_tilde.shape[1]
    if weighting == "expected":
        weights = expected_weights(leverage, sketch_dim)
        return Representation.build(X_tilde, np.arange(n_genes), weights, n_genes)
    if weighting == "countsketch":
        bucket, sign = countsketch_hash(n_genes, sketch_dim, random_state)
        amplitude = sign * leverage_amplitudes(leverage)
        norms = np.sqrt(np.bincount(bucket, weights=amplitude**2, minlength=sketch_dim))
        coef = amplitude * np.sqrt(n_genes / sketch_dim) / np.maximum(norms, 1e-10)[bucket]
        return Representation.build(X_tilde, bucket, coef, sketch_dim)
    raise ValueError(f"gene_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
