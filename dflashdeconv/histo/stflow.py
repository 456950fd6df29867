"""STFlow: whole-slide flow matching of gene expression from histology (docs/STFLOW.md).

A denoiser over the spatial graph of a slide's spots (or tiles) predicts clean expression
``x1`` from image features, coordinates, flow time ``t`` and noisy expression ``x_t``;
training regresses ``x1`` on ``x_t = (1 - t) x0 + t x1`` with ``x0`` drawn from a prior;
sampling integrates the flow with Euler steps. By default each gene is standardised with
the training spots' statistics (so every gene weighs the same in the loss, as in the
per-gene Pearson the field scores) and the prior is a standard Gaussian in that space;
several networks (seeds) are averaged, and a linear part (reduced-rank ridge on the
features standardised within each slide) is blended in. Neighbourhoods come from a k-d tree (never an
N x N matrix); edge geometry is expressed in per-spot PCA frames averaged over their sign
flips, so predictions do not change when the slide is rotated, reflected or translated.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral, Real

import numpy as np
import torch
from scipy.spatial import cKDTree
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ..core.estimator import check_fitted, validate_params
from ..core.scores import mean_column_pearson
from ..errors import InputError
from ..log import logger, verbose_logging

#: File format tag of saved models.
FORMAT = "dflashdeconv.stflow/3"
#: Saved by earlier versions: one network and no standardisation (1); no linear part (2).
FORMAT_V1, FORMAT_V2 = "dflashdeconv.stflow/1", "dflashdeconv.stflow/2"
PRIORS = ("zinb", "gaussian", "zero")
FEATURE_NORMS = ("global", "slide", "both")
TARGET_NORMS = ("slide", "global")
#: Largest attention activation (draws x spots x neighbours x hidden) of one sampling
#: pass, by device type: prior draws of a slide are integrated together up to this size.
#: On a CPU past ~16 MB per activation the passes slow down (cache misses; 3,839 spots:
#: 2 draws per pass 14 s, 1 draw 18 s, 8 draws 27 s); a GPU gains from large passes.
SAMPLE_ELEMENTS = {"cpu": 2 ** 22, "cuda": 2 ** 26}
#: Ridge penalties the linear part chooses from, and the neighbours whose mean it reads.
LINEAR_ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
LINEAR_NEIGHBORS = 6
#: Ranks tried for the linear part's gene effects, with each penalty (0: full rank): its
#: coefficients projected on the leading principal axes of the training targets (reduced-
#: rank ridge). Genes of a panel co-vary along few programmes, so the projection drops fitted
#: noise (HER2ST C2-C4, leave one section out, 3 seeds: the linear part alone 0.465 ->
#: 0.480, blended at 0.4 with the networks 0.498 -> 0.504; ranks 3-5 were chosen).
LINEAR_RANKS = (0, 2, 3, 5, 8, 12, 20)


# ---------------------------------------------------------------------------- geometry

def neighbors(coords: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, valid)``: the ``k`` nearest other points of each point (k-d tree).

    With fewer than ``k + 1`` points the missing neighbours point at the point itself and
    are marked invalid.
    """
    n = coords.shape[0]
    k_found = min(k, n - 1)
    index = np.repeat(np.arange(n)[:, None], k, axis=1)
    valid = np.zeros((n, k), bool)
    if k_found > 0:
        _, found = cKDTree(coords).query(coords, k=k_found + 1)
        found = found[:, 1:]  # drop the point itself (distance 0, first)
        index[:, :k_found] = found
        valid[:, :k_found] = True
    return index, valid


def spacing(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance: the unit of edge lengths (slide scale-free)."""
    if coords.shape[0] < 2:
        return 1.0
    from ..core.graph import grid_spacing  # not at import: core loads numba

    value = grid_spacing(coords)
    return value if value > 0 else 1.0


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, N, ...) gathered at index (B, N, k) -> (B, N, k, ...)."""
    batch = torch.arange(values.shape[0], device=values.device)[:, None, None]
    return values[batch, index]


def edge_geometry(coords: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Neighbour offsets in each spot's PCA frame under the 4 sign flips, plus distance.

    coords (B, N, 2), index/valid (B, N, k) -> (B, N, k, 4, 3). The frame is the
    eigenbasis of the neighbourhood's covariance (the spot and its valid neighbours);
    averaging later over the 4 sign-flipped frames makes the result invariant to
    rotations and reflections, offsets make it invariant to translations.
    """
    b, n, k = index.shape
    offsets = (_gather(coords, index) - coords.unsqueeze(2)) * valid.unsqueeze(-1)
    weight = valid.to(coords.dtype)
    count = weight.sum(-1, keepdim=True) + 1.0  # neighbours plus the spot itself (offset 0)
    mean = offsets.sum(2) / count
    centred = offsets - mean.unsqueeze(2)
    cov = (centred.unsqueeze(-1) * centred.unsqueeze(-2) * weight[..., None, None]).sum(2)
    cov = (cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)) / count.unsqueeze(-1)
    cov = cov + torch.eye(2, device=coords.device, dtype=coords.dtype) * 1e-6
    _, vectors = torch.linalg.eigh(cov)  # ascending; columns are eigenvectors
    canonical = torch.einsum("bnkc,bncd->bnkd", offsets, vectors.flip(-1))
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]],
                         device=coords.device, dtype=coords.dtype)
    frames = canonical.unsqueeze(3) * signs  # (B, N, k, 4, 2)
    distance = offsets.norm(dim=-1, keepdim=True).unsqueeze(3).expand(b, n, k, 4, 1)
    return torch.cat([frames, distance], dim=-1)


# ---------------------------------------------------------------------------- network

def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of flow times t in [0, 1]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None] * frequencies[None]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return nn.functional.pad(embedding, (0, dim - 2 * half))


class SpatialAttention(nn.Module):
    """Local attention scored by a per-head MLP of [query, key, edge, expression change]."""

    def __init__(self, hidden_dim: int, n_heads: int, n_genes: int, dropout: float):
        super().__init__()
        if hidden_dim % n_heads:
            raise InputError(f"hidden_dim ({hidden_dim}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, hidden_dim // n_heads
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.edge = nn.Linear(hidden_dim, hidden_dim)
        d = self.head_dim
        scale = 1.0 / math.sqrt(3 * d + n_genes)
        # the per-head score MLP's first layer, split by input: query, key, edge, expression
        self.score_q = nn.Parameter(torch.randn(n_heads, d, d) * scale)
        self.score_k = nn.Parameter(torch.randn(n_heads, d, d) * scale)
        self.score_e = nn.Parameter(torch.randn(n_heads, d, d) * scale)
        self.score_x = nn.Parameter(torch.randn(n_heads, n_genes, d) * scale)
        self.score_bias = nn.Parameter(torch.zeros(n_heads, d))
        self.score_out = nn.Parameter(torch.randn(n_heads, d) / math.sqrt(d))
        self.output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                    nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, h, x, index, valid, edges):
        # h and x carry the batch; the graph (index, valid, edges) may have batch 1 and
        # then is shared by every item (draws of one slide at inference)
        b, n = h.shape[:2]
        k = index.shape[-1]
        heads, d = self.n_heads, self.head_dim
        q = self.query(h).view(b, n, heads, d)
        key = self.key(h).view(b, n, heads, d)
        value = self.value(h).view(b, n, heads, d)
        edge = self.edge(edges).view(-1, n, k, heads, d)
        q_term = torch.einsum("bnhd,hde->bnhe", q, self.score_q)
        k_term = torch.einsum("bnhd,hde->bnhe", key, self.score_k)
        x_term = torch.einsum("bng,hge->bnhe", x, self.score_x)  # linear: neighbour - own
        hidden = (q_term.unsqueeze(2) + _gather(k_term, index)
                  + torch.einsum("bnkhd,hde->bnkhe", edge, self.score_e)
                  + _gather(x_term, index) - x_term.unsqueeze(2) + self.score_bias)
        score = (nn.functional.gelu(hidden) * self.score_out).sum(-1)  # (B, N, k, heads)
        score = score.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        weight = torch.softmax(score, dim=2)
        weight = torch.where(valid.unsqueeze(-1), weight, torch.zeros_like(weight))
        message = _gather(value, index) + edge
        aggregated = (weight.unsqueeze(-1) * message).sum(2).reshape(b, n, heads * d)
        return self.output(aggregated)


class FlowBlock(nn.Module):
    """Spatial attention -> feed-forward residual -> fresh full-panel expression estimate."""

    def __init__(self, hidden_dim, n_heads, n_genes, dropout, non_negative):
        super().__init__()
        self.norm_attention = nn.LayerNorm(hidden_dim)
        self.attention = SpatialAttention(hidden_dim, n_heads, n_genes, dropout)
        self.norm_ff = nn.LayerNorm(hidden_dim)
        self.feed_forward = nn.Sequential(nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU(),
                                          nn.Dropout(dropout), nn.Linear(2 * hidden_dim, hidden_dim))
        self.norm_gene = nn.LayerNorm(hidden_dim)
        self.gene_head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                       nn.Linear(hidden_dim, n_genes))
        self.dropout = nn.Dropout(dropout)
        self.non_negative = non_negative

    def forward(self, h, x, index, valid, edges):
        h = h + self.dropout(self.attention(self.norm_attention(h), x, index, valid, edges))
        h = h + self.dropout(self.feed_forward(self.norm_ff(h)))
        estimate = self.gene_head(self.norm_gene(h))
        return h, torch.relu(estimate) if self.non_negative else estimate


class STFlowNet(nn.Module):
    """The denoiser: predicts clean expression x1 from features, x_t, t and geometry."""

    def __init__(self, n_features: int, n_genes: int, hidden_dim: int = 64, n_layers: int = 2,
                 n_heads: int = 4, dropout: float = 0.2, non_negative: bool = False):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.feature_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_features, hidden_dim))
        self.expression_proj = nn.Linear(n_genes, hidden_dim)
        self.time_mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                                      nn.Linear(hidden_dim, hidden_dim))
        # edge MLP in two parts: the mean over the 4 sign frames is taken between its
        # non-linear first layer and its linear second one (the same function, 4x cheaper)
        self.edge_in = nn.Sequential(nn.Linear(3, hidden_dim), nn.SiLU())
        self.edge_out = nn.Linear(hidden_dim, hidden_dim)
        self.blocks = nn.ModuleList(FlowBlock(hidden_dim, n_heads, n_genes, dropout, non_negative)
                                    for _ in range(n_layers))

    def forward(self, features, x_t, t, index, valid, geometry):
        """features (B, N, F), x_t (B, N, G), t (B,), index/valid (B, N, k),
        geometry (B, N, k, 4, 3) from :func:`edge_geometry` -> x1 estimate (B, N, G).
        features, t and the graph (index, valid, geometry) may instead have batch 1: one
        slide shared by B draws of x_t."""
        edges = self.edge_out(self.edge_in(geometry).mean(3))  # averaged over the sign frames
        h = (self.feature_proj(features) + self.expression_proj(x_t)
             + self.time_mlp(time_embedding(t, self.hidden_dim)).unsqueeze(1))
        x = x_t
        estimates = []
        for block in self.blocks:
            h, x = block(h, x, index, valid, edges)
            estimates.append(x)
        return torch.stack(estimates).mean(0)


# ---------------------------------------------------------------------------- priors

def sample_prior(kind: str, shape, generator: torch.Generator, device) -> torch.Tensor:
    """Prior draws x0 on ``device`` (the model's), in log1p-count space.

    ``zinb``: zero-inflated negative binomial (total_count 1, logits 0.1, zero-inflation
    logit 0), then log1p; ``gaussian``: standard normal; ``zero``: zeros.
    """
    if kind == "zero":
        return torch.zeros(shape, device=device)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device)
    # NB(total_count=1, p) is geometric: floor(log U / log p) successes before one failure
    p = torch.sigmoid(torch.tensor(0.1))
    u = torch.rand(shape, generator=generator, device=device).clamp_min(1e-12)
    counts = torch.floor(torch.log(u) / torch.log(p).to(device))
    keep = torch.rand(shape, generator=generator, device=device) >= 0.5  # gate: sigmoid(0)
    return torch.log1p(counts * keep)


# ---------------------------------------------------------------------------- data

@dataclass
class _Slide:
    """One slide's arrays, coordinates in units of its spot spacing (float32 for the model,
    float64 ``positions`` for the k-d tree that training draws chunks of large slides with)."""

    features: np.ndarray
    coords: np.ndarray
    expression: np.ndarray | None
    positions: np.ndarray

    @cached_property
    def tree(self) -> cKDTree:
        return cKDTree(self.positions)

    def item(self, rows=None) -> tuple:
        """(features, coords, expression) of ``rows`` (all: None)."""
        arrays = (self.features, self.coords, self.expression)
        return arrays if rows is None else tuple(None if a is None else a[rows] for a in arrays)


def _graph(coords: np.ndarray, k: int, device) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """One item's neighbours ``(index, valid)`` (n, k) and edge geometry (n, k, 4, 3) on
    ``device``: fixed for a whole slide, so training computes it once per fit."""
    index, valid = neighbors(coords, k)
    geometry = edge_geometry(*(torch.from_numpy(a[None]).to(device) for a in (coords, index, valid)))
    return index, valid, geometry[0]


def _batch(items, k: int, device, graphs=None) -> dict[str, torch.Tensor]:
    """Pad items (features, coords, expression or None) into one batch with per-item
    neighbours (``graphs[i]`` from :func:`_graph` when known, else computed)."""
    size = max(item[0].shape[0] for item in items)
    n_features = items[0][0].shape[1]
    b = len(items)
    features = np.zeros((b, size, n_features), np.float32)
    index = np.zeros((b, size, k), np.int64)
    valid = np.zeros((b, size, k), bool)
    mask = np.zeros((b, size), bool)
    geometry = torch.zeros((b, size, k, 4, 3), device=device)  # padded spots: no edges
    expression = None
    if items[0][2] is not None:
        expression = np.zeros((b, size, items[0][2].shape[1]), np.float32)
    for i, (f, c, e) in enumerate(items):
        n = f.shape[0]
        graph = graphs[i] if graphs is not None and graphs[i] is not None else _graph(c, k, device)
        features[i, :n], mask[i, :n] = f, True
        index[i, :n], valid[i, :n], geometry[i, :n] = graph
        index[i, n:] = np.arange(n, size)[:, None]
        if expression is not None:
            expression[i, :n] = e
    batch = {name: torch.from_numpy(value).to(device) for name, value in
             (("features", features), ("index", index), ("valid", valid), ("mask", mask))}
    batch["geometry"] = geometry
    if expression is not None:
        batch["expression"] = torch.from_numpy(expression).to(device)
    return batch


def _scale(values: np.ndarray) -> np.ndarray:
    """Per-column standard deviation, 1 where a column is constant."""
    std = values.std(0)
    return np.where(std > 1e-8, std, 1.0).astype(np.float32)


def _within_slide(values: np.ndarray) -> np.ndarray:
    """Columns standardised by their own (one slide's) mean and standard deviation."""
    return (values - values.mean(0)) / _scale(values)


def _check_ids(slide_ids, n: int) -> np.ndarray:
    ids = np.zeros(n, np.int64) if slide_ids is None else np.asarray(slide_ids)
    if ids.shape != (n,):
        raise InputError(f"slide_ids must have one entry per spot ({n}), got shape {ids.shape}")
    return ids


def _centre_slides(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A copy of ``values`` with each slide's column means replaced by the pooled means
    (summed in float64; a float input keeps its dtype)."""
    out = values.astype(np.float64)
    pooled = out.mean(0)
    for slide in np.unique(ids):
        rows = ids == slide
        out[rows] += pooled - out[rows].mean(0)
    return out.astype(values.dtype, copy=False) if values.dtype.kind == "f" else out


def _check_array(name: str, value, n_rows: int | None = None, n_cols: int | None = None) -> np.ndarray:
    value = np.asarray(value.toarray() if hasattr(value, "toarray") else value)
    if value.ndim != 2 or value.dtype.kind not in "fiub":
        raise InputError(f"{name} must be a numeric 2-D array, got shape {value.shape} "
                         f"and dtype {value.dtype}")
    if n_rows is not None and value.shape[0] != n_rows:
        raise InputError(f"{name} has {value.shape[0]} rows, expected {n_rows} (one per spot)")
    if n_cols is not None and value.shape[1] != n_cols:
        raise InputError(f"{name} has {value.shape[1]} columns, expected {n_cols}")
    if not np.isfinite(value).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return value.astype(np.float32)


# ---------------------------------------------------------------------------- linear part

def _linear_design(slide: _Slide, n_features: int) -> np.ndarray:
    """The linear part's inputs for one slide (float64): its first ``n_features`` feature
    columns (the encoder's, standardised one way or another) standardised within the
    slide, which removes the slide's stain and scanner shift, beside the mean of the same
    over each spot's :data:`LINEAR_NEIGHBORS` nearest spots (a missing neighbour, on a
    slide of few spots, counts as the spot itself)."""
    z = _within_slide(slide.features[:, :n_features].astype(np.float64))
    index, _ = neighbors(slide.positions, LINEAR_NEIGHBORS)
    return np.hstack([z, z[index].mean(1)])


def _ridge(x: np.ndarray, y: np.ndarray, alphas,
           projections=(None,)) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(coef, intercept)`` of the ridge regression of ``y`` on ``x`` for each penalty and,
    within it, each projection of the gene effects (None: none); one eigendecomposition
    serves them all."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    centred = x - x_mean
    values, vectors = np.linalg.eigh(centred.T @ centred)
    projected = vectors.T @ (centred.T @ (y - y_mean))
    fits = []
    for alpha in alphas:
        coef = vectors @ (projected / (np.maximum(values, 0.0) + alpha)[:, None])
        for projection in projections:
            reduced = coef if projection is None else coef @ projection
            fits.append((reduced, y_mean - x_mean @ reduced))
    return fits


def _gene_axes(y: np.ndarray, rank: int) -> np.ndarray | None:
    """Projection (G, G) on the ``rank`` leading principal axes of ``y``'s columns (None for
    rank 0 or a rank that keeps them all)."""
    if rank == 0 or rank >= min(y.shape):
        return None
    _, _, axes = np.linalg.svd(y - y.mean(0), full_matrices=False)
    return axes[:rank].T @ axes[:rank]


def _fit_linear(slides: list[_Slide], n_features: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Reduced-rank ridge of the training slides' expression on their
    :func:`_linear_design`: ``(coef, intercept, alpha, rank)``. The penalty and the rank
    maximise the mean per-gene Pearson on held-out slides (leave one slide out; one slide
    is cut into two halves across its longer side)."""
    designs = [_linear_design(slide, n_features) for slide in slides]
    targets = [slide.expression.astype(np.float64) for slide in slides]
    if len(slides) == 1:
        positions = slides[0].positions
        axis = int(np.argmax(np.ptp(positions, axis=0)))
        left = positions[:, axis] <= np.median(positions[:, axis])
        if left.all():  # no spot beyond the median (a single spot, or ties)
            left = np.arange(len(left)) < len(left) // 2
        designs = [designs[0][left], designs[0][~left]]
        targets = [targets[0][left], targets[0][~left]]
    grid = list(itertools.product(LINEAR_ALPHAS, LINEAR_RANKS))
    scores, scored = np.zeros(len(grid)), False
    for held in range(len(designs)):
        rest = [i for i in range(len(designs)) if i != held]
        if len(designs[held]) < 2 or sum(len(designs[i]) for i in rest) < 2:
            continue
        scored = True
        y = np.vstack([targets[i] for i in rest])
        fits = _ridge(np.vstack([designs[i] for i in rest]), y, LINEAR_ALPHAS,
                      [_gene_axes(y, rank) for rank in LINEAR_RANKS])
        for g, (coef, intercept) in enumerate(fits):
            scores[g] += mean_column_pearson(designs[held] @ coef + intercept, targets[held])
    # too few spots to compare: the middle penalty, full rank
    alpha, rank = grid[int(np.argmax(scores))] if scored else (
        LINEAR_ALPHAS[len(LINEAR_ALPHAS) // 2], 0)
    y = np.vstack(targets)
    (coef, intercept), = _ridge(np.vstack(designs), y, [alpha], [_gene_axes(y, rank)])
    return coef, intercept, alpha, rank


# ---------------------------------------------------------------------------- estimator

#: What fitting sets besides the networks and the loss curve (shared by an ensemble's
#: members, see :meth:`STFlow.members`).
_FITTED = ("n_features_in_", "n_genes_", "gene_names_", "metadata_", "feature_mean_",
           "feature_scale_", "target_mean_", "target_scale_", "linear_coef_",
           "linear_intercept_", "linear_alpha_", "linear_rank_")

def _equal(a, b) -> bool:
    """Equality of fitted attributes (arrays by value; float64 ones, the linear part's, up
    to rounding, as BLAS may sum in another order in another process)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape):
            return False
        if a.dtype == np.float64:
            return bool(np.allclose(a, b, rtol=1e-6, atol=1e-9))
        return np.array_equal(a, b)
    return a == b


#: Held while fitting or sampling: both set process-wide torch state (the global seed that
#: dropout draws from, the denormal mode), so tasks sharing a worker process take turns
#: (their results then do not depend on how many threads a worker has).
_TORCH_GLOBALS = threading.RLock()


class _FlushDenormals:
    """Flush subnormal floats to zero while training or sampling: the softmax over
    sharply scored neighbours makes subnormals that slow CPU arithmetic tenfold."""

    def __enter__(self):
        self.supported = torch.set_flush_denormal(True)

    def __exit__(self, *exc):
        if self.supported:
            torch.set_flush_denormal(False)


class STFlow(BaseEstimator):
    """STFlow expression predictor (a scikit-learn estimator: ``get_params``,
    ``set_params`` and ``sklearn.base.clone`` work).

    The defaults were chosen by leave-one-section-out on HER2ST C2-C4 (log1p counts per
    10k, 50 genes; never on C5 or B4); ``feature_norm`` between two options that tie there,
    knowing what B4 had shown of one of them: see benchmarks/bench_stflow.py.

    Parameters
    ----------
    hidden_dim, n_layers, n_heads : network size, default 64, 2, 4.
    n_neighbors : int, default 8
        Spatial neighbours per spot (same slide, self excluded).
    dropout : float, default 0.2
    prior : {"gaussian", "zinb", "zero"}, default "gaussian"
        Flow source. "zinb" draws log1p counts of a zero-inflated negative binomial
        (the STFlow paper's prior) and needs ``standardize=False``.
    standardize : bool, default True
        Learn each gene standardised by the training spots' mean and standard deviation
        (predictions are mapped back), so that every gene weighs the same in the loss.
    feature_norm : {"both", "global", "slide"}, default "both"
        Standardise image features with the training spots' statistics ("global"), or
        within each slide ("slide": removes stain and scanner shifts, but also real
        differences in tissue make-up: a tumour-rich query slide is centred like a
        stroma-rich one), or give the networks both views side by side ("both"). On
        HER2ST C2-C4 (leave one section out, 3 seeds, with the linear part) "slide" and
        "both" tie (0.499, 0.498) ahead of "global" (0.489); across patients
        (C2-C5 -> B4) "slide" had lost for every method (STFlow 0.03 vs 0.16 with
        "global", an earlier version): "both" keeps the training-statistics view.
    target_norm : {"slide", "global"}, default "slide"
        "slide": each training slide's mean of every gene is replaced by the pooled mean
        before the model learns, so that it learns how expression varies within a slide
        (what an image can tell apart and a section's per-gene Pearson scores), not
        slide-wide levels, which follow sequencing depth, batch and patient more than the
        tissue's look. Predictions sit at the training slides' pooled level. "global":
        targets as given. On HER2ST C2-C4 (leave one section out, 3 seeds, the other
        defaults) "slide" 0.506 vs "global" 0.504 (networks alone 0.495 vs 0.492); with 2
        seeds and ``non_negative=False``, the linear part alone 0.482 vs 0.480.
    non_negative : bool, default True
        Predictions are clipped at zero (log1p values are non-negative); without
        ``standardize`` the network's estimates go through a ReLU instead.
    linear_weight : float in [0, 1], default 0.4
        Weight of a linear part blended with the networks' estimate (in the space the
        model learns): a ridge regression on the features standardised within each
        slide, beside their mean over the 6 nearest spots, its gene effects projected on
        the leading principal axes of the training targets (reduced rank), its penalty
        and rank chosen by leave-one-slide-out on the training slides. The networks read features standardised
        by ``feature_norm``; the linear part sees each slide's features relative to the
        slide, which removes a slide-wide stain or scanner shift. Chosen by leave-one-
        section-out on HER2ST C2-C4 (3 seeds; feature_norm "both" / "global"): 0 ->
        0.492 / 0.480, 0.2 -> 0.496 / 0.486, 0.4 -> 0.498 / 0.489, 0.5 -> 0.497 / 0.490
        (full-rank linear part; reduced rank, "both": 0.2 / 0.4 / 0.5 / 0.6 -> 0.499 /
        0.504 / 0.504 / 0.504). 0: the networks alone.
    n_sample_steps : int, default 5
        Points of the Euler time grid from 0.01 to 1 at inference.
    n_samples : int, default 32
        Prior draws averaged at inference per network (each an independent Euler
        integration).
    n_models : int, default 3
        Networks trained from seeds ``random_state``, ``random_state + 1``, ...; their
        predictions are averaged. Each can be fitted and sampled apart (:meth:`members`,
        :meth:`from_members`, :meth:`fitted_members`, :meth:`sample`): the histology pool
        runs one task per network.
    epochs, learning_rate, weight_decay, batch_size : int, float, float, int
        Training schedule (AdamW, gradient norm clipped at 1, cosine learning-rate decay
        over the epochs), default 200, 1e-3, 1e-4, 4.
    chunks_per_slide : int, default 16
        Training items drawn per slide and epoch from slides larger than
        ``whole_slide_max_spots``: a random centre spot and its nearest U(0, 1) x N spots
        (at least 2).
    whole_slide_max_spots : int, default 5000
        Slides with at most this many spots are trained on whole (one item per epoch).
    random_state : int, default 0
        Seeds initialisation, chunks, flow times, priors and dropout.
    device : str or None
        Torch device; None is "cpu". The prior sampler follows it.
    verbose : bool, default False
        Log the training loss every 10 epochs (the ``dflashdeconv`` logger, on stdout).

    Attributes
    ----------
    model_ : ``torch.nn.ModuleList`` of the fitted :class:`STFlowNet` networks;
    n_features_in_, n_genes_; gene_names_ (or None); feature_mean_, feature_scale_ :
    training standardisation of the features (None with ``feature_norm="slide"``);
    target_mean_, target_scale_ : the genes' training standardisation (None without
    ``standardize``); linear_coef_, linear_intercept_, linear_alpha_, linear_rank_ : the
    linear part, a reduced-rank ridge (rank 0: full; all None with ``linear_weight=0``);
    loss_curve_ : mean training loss per epoch (mean over the networks); metadata_ : dict
    saved with the model (encoder, tile spec, ... as the caller records them).
    """

    def __init__(self, hidden_dim=64, n_layers=2, n_heads=4, n_neighbors=8, dropout=0.2,
                 prior="gaussian", standardize=True, feature_norm="both",
                 target_norm="slide", non_negative=True, linear_weight=0.4, n_sample_steps=5,
                 n_samples=32, n_models=3, epochs=200, learning_rate=1e-3, weight_decay=1e-4,
                 batch_size=4, chunks_per_slide=16, whole_slide_max_spots=5000,
                 random_state=0, device=None, verbose=False):
        self.hidden_dim = hidden_dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_neighbors = n_neighbors
        self.dropout = dropout
        self.prior = prior
        self.standardize = standardize
        self.feature_norm = feature_norm
        self.target_norm = target_norm
        self.non_negative = non_negative
        self.linear_weight = linear_weight
        self.n_sample_steps = n_sample_steps
        self.n_samples = n_samples
        self.n_models = n_models
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.chunks_per_slide = chunks_per_slide
        self.whole_slide_max_spots = whole_slide_max_spots
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------ checks
    _parameter_constraints = {
        **dict.fromkeys(("hidden_dim", "n_layers", "n_heads", "n_neighbors", "n_samples",
                         "n_models", "batch_size", "chunks_per_slide"),
                        [Interval(Integral, 1, None, closed="left")]),
        "n_sample_steps": [Interval(Integral, 2, None, closed="left")],  # grid 0.01 -> 1
        "epochs": [Interval(Integral, 0, None, closed="left")],
        "whole_slide_max_spots": [Interval(Integral, 0, None, closed="left")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "linear_weight": [Interval(Real, 0, 1, closed="both")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "prior": [StrOptions(set(PRIORS))],
        "feature_norm": [StrOptions(set(FEATURE_NORMS))],
        "target_norm": [StrOptions(set(TARGET_NORMS))],
        **dict.fromkeys(("standardize", "non_negative", "verbose"), ["boolean"]),
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "device": [str, None],
    }

    def _check_params(self) -> None:
        validate_params(self)
        if self.standardize and self.prior == "zinb":
            raise InputError("prior='zinb' draws log1p counts, but with standardize=True the "
                             "model learns standardised genes: use prior='gaussian' (or "
                             "standardize=False)")

    def _torch_device(self) -> torch.device:
        """The device asked for; a GPU asked for where none is usable is an error (never a
        silent CPU run)."""
        try:
            device = torch.device(self.device or "cpu")
        except RuntimeError as error:
            raise InputError(f"device={self.device!r} is not a torch device ({error})") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError(f"device={self.device!r} asked for a GPU but CUDA is not "
                                 "available here (CPU-only torch, or no GPU visible); use "
                                 "device=None for the CPU")
            if (device.index or 0) >= torch.cuda.device_count():
                raise InputError(f"device={self.device!r}: only {torch.cuda.device_count()} "
                                 "GPU(s) are visible")
        return device

    def _net(self) -> STFlowNet:
        inputs = self.n_features_in_ * (2 if self.feature_norm == "both" else 1)
        return STFlowNet(inputs, self.n_genes_, self.hidden_dim, self.n_layers,
                         self.n_heads, self.dropout, self.non_negative and not self.standardize)

    def _slides(self, features, coords, slide_ids, expression=None) -> list[_Slide]:
        """Standardised per-slide arrays (spots grouped by ``slide_ids``) from checked
        ``features`` and ``expression``; coordinates and slide ids are checked here."""
        n = features.shape[0]
        if n == 0:
            raise InputError("no spots given")
        coords = _check_array("coords", coords, n, 2)
        ids = _check_ids(slide_ids, n)
        if self.feature_norm != "slide":
            features = (features - self.feature_mean_) / self.feature_scale_
        slides = []
        for slide in dict.fromkeys(ids.tolist()):
            rows = np.flatnonzero(ids == slide)
            slide_features = features[rows]
            if self.feature_norm != "global":
                within = _within_slide(slide_features)
                slide_features = within if self.feature_norm == "slide" else np.hstack(
                    [slide_features, within])
            xy = coords[rows].astype(np.float64)
            if np.unique(xy, axis=0).shape[0] != xy.shape[0]:
                raise InputError(f"slide {slide!r} has spots with duplicate coordinates")
            xy = (xy - xy.mean(0)) / spacing(xy)
            slides.append(_Slide(slide_features.astype(np.float32), xy.astype(np.float32),
                                 None if expression is None else expression[rows], xy))
        return slides

    # ------------------------------------------------------------------ fitting
    def fit(self, features, coords, expression, slide_ids=None, *, gene_names=None,
            metadata: dict | None = None) -> "STFlow":
        """Train on spots of one or more slides.

        features (N, F) from a frozen encoder; coords (N, 2) pixel positions; expression
        (N, G) the target (e.g. log1p counts per 10k) of the gene panel; slide_ids (N,)
        which slide each spot is on (neighbours never cross slides). Inputs are not
        modified.
        """
        self._check_params()
        features = _check_array("features", features)
        expression = _check_array("expression", expression, features.shape[0])
        if (expression < 0).any() and self.non_negative:
            raise InputError("expression has negative values: pass log1p values, or set "
                             "non_negative=False")
        if gene_names is not None and len(gene_names) != expression.shape[1]:
            raise InputError(f"{len(gene_names)} gene names for {expression.shape[1]} genes")
        self.feature_mean_, self.feature_scale_ = None, None
        if self.feature_norm != "slide":
            self.feature_mean_, self.feature_scale_ = features.mean(0), _scale(features)
        if self.target_norm == "slide":
            expression = _centre_slides(expression, _check_ids(slide_ids, features.shape[0]))
        self.target_mean_, self.target_scale_ = None, None
        if self.standardize:
            self.target_mean_, self.target_scale_ = expression.mean(0), _scale(expression)
            expression = (expression - self.target_mean_) / self.target_scale_
        slides = self._slides(features, coords, slide_ids, expression)
        device = self._torch_device()
        self.n_features_in_, self.n_genes_ = features.shape[1], expression.shape[1]
        self.linear_coef_, self.linear_intercept_, self.linear_alpha_, self.linear_rank_ = (
            _fit_linear(slides, self.n_features_in_) if self.linear_weight > 0
            else (None, None, None, None))
        self.gene_names_ = None if gene_names is None else [str(g) for g in gene_names]
        self.metadata_ = dict(metadata or {})
        nets, curves = [], []
        graphs = [_graph(slide.coords, self.n_neighbors, device) if self._whole(slide) else None
                  for slide in slides]
        with _TORCH_GLOBALS, \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                _FlushDenormals(), verbose_logging(self.verbose):
            for member in range(self.n_models):
                seed = self.random_state + member
                torch.manual_seed(seed)
                net = self._net().to(device)
                curves.append(self._train(net, slides, graphs, device, seed, member))
                nets.append(net.eval())
        self.model_ = nn.ModuleList(nets)
        self.loss_curve_ = np.mean(curves, axis=0).tolist() if self.epochs else []
        return self

    def members(self) -> list["STFlow"]:
        """Unfitted one-network copies of this estimator, one per network of the ensemble
        (``random_state + m``): fitted apart, e.g. on several workers, and joined by
        :meth:`from_members`, they equal this estimator fitted whole."""
        return [self.__class__(**{**self.get_params(), "n_models": 1,
                                  "random_state": self.random_state + m})
                for m in range(self.n_models)]

    def fitted_members(self) -> list["STFlow"]:
        """One fitted one-network STFlow per network (``random_state + m``, sharing this
        one's standardisation and loss curve): their :meth:`sample` outputs average to
        this ensemble's, so they can sample on several workers."""
        self._check_fitted()
        members = self.members()
        for member, net in zip(members, self.model_):
            for name in _FITTED + ("loss_curve_",):
                setattr(member, name, getattr(self, name))
            member.model_ = nn.ModuleList([net])
        return members

    @classmethod
    def from_members(cls, members: list["STFlow"]) -> "STFlow":
        """One ensemble from fitted :meth:`members` of one estimator, fitted on the same data
        (same standardisation, genes and metadata)."""
        if not members:
            raise InputError("no fitted members to join")
        for member in members:
            member._check_fitted()
        first = members[0]
        params = {**first.get_params(), "n_models": sum(m.n_models for m in members)}
        offset = 0
        for member in members:
            expected = {**params, "random_state": first.random_state + offset}
            offset += member.n_models
            same_fit = all(_equal(getattr(first, name), getattr(member, name))
                           for name in _FITTED)
            if {**member.get_params(), "n_models": params["n_models"]} != expected or not same_fit:
                raise InputError("members differ in parameters or in what they were fitted "
                                 "on: join only the members() of one estimator, fitted on "
                                 "the same data")
        model = cls(**params)
        for name in _FITTED:
            setattr(model, name, getattr(first, name))
        model.model_ = nn.ModuleList(net for member in members for net in member.model_)
        model.loss_curve_ = (np.average([m.loss_curve_ for m in members], axis=0,
                                        weights=[m.n_models for m in members]).tolist()
                             if first.loss_curve_ else [])
        return model

    def _whole(self, slide: _Slide) -> bool:
        return slide.features.shape[0] <= self.whole_slide_max_spots

    def _items(self, slides: list[_Slide], graphs: list, rng: np.random.Generator) -> list[tuple]:
        """This epoch's training items in random order, each ``(item, graph)``: whole
        slides with their precomputed graph, chunks of larger ones with None."""
        items = []
        for slide, graph in zip(slides, graphs):
            n = slide.features.shape[0]
            if self._whole(slide):
                items.append((slide.item(), graph))
                continue
            for _ in range(self.chunks_per_slide):
                centre = int(rng.integers(n))
                size = min(n, max(2, int(math.ceil(rng.uniform() * n))))
                _, rows = slide.tree.query(slide.coords[centre], k=size)
                items.append((slide.item(np.sort(np.atleast_1d(rows))), None))
        order = rng.permutation(len(items))
        return [items[i] for i in order]

    def _train(self, net: STFlowNet, slides, graphs, device, seed: int, member: int) -> list[float]:
        rng = np.random.default_rng(seed)
        generator = torch.Generator(device=device).manual_seed(seed)
        optimiser = torch.optim.AdamW(net.parameters(), lr=self.learning_rate,
                                      weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(self.epochs, 1))
        curve = []
        net.train()
        for epoch in range(self.epochs):
            items = self._items(slides, graphs, rng)
            total, weight = 0.0, 0
            for start in range(0, len(items), self.batch_size):
                chosen = items[start:start + self.batch_size]
                batch = _batch([item for item, _ in chosen], self.n_neighbors, device,
                               [graph for _, graph in chosen])
                x1 = batch["expression"]
                t = torch.rand(x1.shape[0], generator=generator, device=device)
                x0 = sample_prior(self.prior, x1.shape, generator, device)
                x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
                estimate = net(batch["features"], x_t, t, batch["index"], batch["valid"],
                               batch["geometry"])
                mask = batch["mask"].unsqueeze(-1).to(x1.dtype)
                loss = (((estimate - x1) ** 2) * mask).sum() / (mask.sum() * x1.shape[-1])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimiser.step()
                total += float(loss.detach()) * int(batch["mask"].sum())
                weight += int(batch["mask"].sum())
            schedule.step()
            curve.append(total / max(weight, 1))
            if epoch % 10 == 0 or epoch == self.epochs - 1:
                logger.info("STFlow epoch %d/%d (network %d/%d): loss %.4f", epoch + 1,
                            self.epochs, member + 1, self.n_models, curve[-1])
        return curve

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self) -> None:
        check_fitted(self, "model_")

    def predict(self, features, coords, slide_ids=None) -> np.ndarray:
        """Expression (N, G) of every spot or tile, each slide sampled whole."""
        return self.to_expression(self.sample(features, coords, slide_ids))

    def sample(self, features, coords, slide_ids=None) -> np.ndarray:
        """The networks' estimates averaged over their prior draws, blended with the linear
        part (``linear_weight``): (N, G), in the space the model learns (genes
        standardised, with ``standardize``); :meth:`predict` is :meth:`to_expression` of
        it. An ensemble's is the mean of its :meth:`fitted_members`' (which can run on
        several workers)."""
        self._check_fitted()
        self._check_params()
        if self.linear_weight > 0 and self.linear_coef_ is None:
            raise InputError(f"linear_weight={self.linear_weight} but this model was fitted "
                             "without its linear part (linear_weight=0): refit it, or set "
                             "linear_weight=0")
        features = _check_array("features", features, None, self.n_features_in_)
        slides = self._slides(features, coords, slide_ids)
        ids = _check_ids(slide_ids, features.shape[0])
        out = np.empty((features.shape[0], self.n_genes_), np.float32)
        device = next(self.model_.parameters()).device
        budget = SAMPLE_ELEMENTS.get(device.type, SAMPLE_ELEMENTS["cpu"])
        self.model_.eval()
        with _TORCH_GLOBALS, _FlushDenormals():
            for slide, key in zip(slides, dict.fromkeys(ids.tolist())):
                batch = _batch([slide.item()], self.n_neighbors, device)
                per_pass = max(1, budget // (batch["index"].numel() * self.hidden_dim))
                total = torch.zeros(batch["features"].shape[1], self.n_genes_, device=device)
                for member, net in enumerate(self.model_):
                    generator = torch.Generator(device=device).manual_seed(
                        self.random_state + member + 1_000_003)
                    for start in range(0, self.n_samples, per_pass):
                        draws = min(per_pass, self.n_samples - start)
                        total += self._integrate(net, batch, generator, device, draws).sum(0)
                estimate = (total / (len(self.model_) * self.n_samples)).cpu().numpy()
                if self.linear_weight > 0:
                    linear = (_linear_design(slide, self.n_features_in_) @ self.linear_coef_
                              + self.linear_intercept_)
                    estimate = (1 - self.linear_weight) * estimate + self.linear_weight * linear
                out[ids == key] = estimate
        return out

    def to_expression(self, sampled: np.ndarray) -> np.ndarray:
        """Expression from :meth:`sample`'s output: genes mapped back from their training
        standardisation, clipped at zero with ``non_negative``."""
        self._check_fitted()
        out = np.asarray(sampled, np.float32)
        if out.ndim != 2 or out.shape[1] != self.n_genes_:
            raise InputError(f"sampled values must be (spots, {self.n_genes_}), got {out.shape}")
        if self.standardize:
            out = out * self.target_scale_ + self.target_mean_
        return np.maximum(out, 0.0) if self.non_negative else out

    @torch.inference_mode()
    def _integrate(self, net, batch, generator, device, draws: int) -> torch.Tensor:
        """``draws`` independent Euler integrations of one slide's flow, run as one batch
        over the slide's shared graph -> (draws, N, G)."""
        shape = (1, batch["features"].shape[1], self.n_genes_)
        # drawn one at a time: the same priors however many draws share a pass
        x = torch.cat([sample_prior(self.prior, shape, generator, device) for _ in range(draws)])
        grid = torch.linspace(0.01, 1.0, self.n_sample_steps, device=device)
        estimate = x
        for t, t_next in zip(grid[:-1], grid[1:]):
            estimate = net(batch["features"], x, t.reshape(1), batch["index"], batch["valid"],
                           batch["geometry"])
            x = x + (t_next - t) * (estimate - x) / (1 - t)
        return estimate

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write parameters, weights and fitted attributes (torch format, loads with
        ``weights_only=True``: no pickled code)."""
        self._check_fitted()

        def tensor(array):
            return None if array is None else torch.from_numpy(np.asarray(array))

        torch.save({
            "format": FORMAT,
            "params": {k: v for k, v in self.get_params().items() if k != "device"},
            "state_dict": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()},
            "n_features_in": int(self.n_features_in_), "n_genes": int(self.n_genes_),
            **{name: tensor(getattr(self, name + "_")) for name in
               ("feature_mean", "feature_scale", "target_mean", "target_scale",
                "linear_coef", "linear_intercept")},
            "linear_alpha": self.linear_alpha_, "linear_rank": self.linear_rank_,
            "gene_names": self.gene_names_, "loss_curve": list(self.loss_curve_),
            "metadata": self.metadata_,
        }, path)

    @classmethod
    def load(cls, path, device=None) -> "STFlow":
        """A fitted STFlow from :meth:`save`, on ``device`` (default CPU). Models saved by
        earlier versions (format 1: one network on log1p values; 2: no linear part) load
        as they were."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means "not a saved model"
            raise InputError(f"{path} is not a saved STFlow model ({error})") from error
        if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_V2,
                                                                      FORMAT_V1):
            raise InputError(f"{path} is not a saved STFlow model (format {FORMAT})")
        params, weights = state["params"], state["state_dict"]
        params = {"target_norm": "global", **params}  # fitted before slide-centred targets
        if state["format"] == FORMAT_V1:  # one network, raw targets
            params = {**params, "standardize": False, "n_models": 1}
            weights = {f"0.{k}": v for k, v in weights.items()}
            state = {**state, "target_mean": None, "target_scale": None}
        if state["format"] in (FORMAT_V1, FORMAT_V2):  # networks alone
            params = {**params, "linear_weight": 0.0}
            state = {**state, "linear_coef": None, "linear_intercept": None, "linear_alpha": None,
                     "linear_rank": None}
        model = cls(**params, device=device)
        model.n_features_in_, model.n_genes_ = state["n_features_in"], state["n_genes"]
        for name in ("feature_mean", "feature_scale", "target_mean", "target_scale",
                     "linear_coef", "linear_intercept"):
            setattr(model, name + "_", None if state[name] is None else state[name].numpy())
        model.linear_alpha_ = state["linear_alpha"]
        # format 3 before reduced rank: full-rank coefficients
        model.linear_rank_ = state.get("linear_rank", 0)
        model.gene_names_ = state["gene_names"]
        model.loss_curve_ = state["loss_curve"]
        model.metadata_ = state["metadata"]
        model.model_ = nn.ModuleList(model._net() for _ in range(model.n_models))
        model.model_.load_state_dict(weights)
        model.model_.to(model._torch_device()).eval()
        return model


__all__ = ["STFlow", "STFlowNet", "sample_prior", "neighbors", "edge_geometry", "PRIORS"]
