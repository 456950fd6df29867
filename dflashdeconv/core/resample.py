"""Counter-based random numbers for the Poisson bootstrap, keyed by (seed, replicate, spot).

Each spot draws from its own stream, so resampled counts do not depend on chunking, on
thread scheduling or on the number of Dask workers.
"""

import math

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ROW_KEY = np.uint64(0xD1B54A32D192ED03)
_REPLICATE_KEY = np.uint64(0x8CB92BA72F3D8DD7)


@njit(cache=True)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def spot_stream(seed, replicate, spot):
    """Initial state of the stream of one spot in one bootstrap replicate."""
    key = np.uint64(seed) + _mix(np.uint64(replicate) * _REPLICATE_KEY + _GOLDEN)
    return _mix(key ^ (np.uint64(spot) * _ROW_KEY))


@njit(cache=True)
def next_bits(state):
    """(new state, 64 random bits) from a splitmix64 stream."""
    state = state + _GOLDEN
    return state, _mix(state)


@njit(cache=True)
def next_uniform(state):
    """(new state, uniform in [0, 1)) from a splitmix64 stream."""
    state = state + _GOLDEN
    return state, np.float64(_mix(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def poisson(lam, state):
    """(new state, Poisson(lam) draw): multiplication method below 10, else PTRS.

    PTRS is the transformed rejection sampler of Hoermann (1993), "The transformed
    rejection method for generating Poisson random variables".
    """
    if lam <= 0.0:
        return state, 0.0
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        state, prod = next_uniform(state)
        while prod > limit:
            k += 1
            state, u = next_uniform(state)
            prod *= u
        return state, np.float64(k)
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state, u = next_uniform(state)
        u -= 0.5
        state, v = next_uniform(state)
        us = 0.5 - abs(u)
        if us <= 0.0:
            continue
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= v_r:
            return state, np.float64(k)
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return state, np.float64(k)


@njit(cache=True)
def normal(state):
    """(new state, standard normal draw) by the Box-Muller transform."""
    state, u1 = next_uniform(state)
    state, u2 = next_uniform(state)
    return state, math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True)
def gamma(shape, state):
    """(new state, Gamma(shape, 1) draw): Marsaglia & Tsang (2000), boosted below 1."""
    boost = 1.0
    if shape < 1.0:
        state, u = next_uniform(state)
        boost = (1.0 - u) ** (1.0 / shape)
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        state, x = normal(state)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        state, u = next_uniform(state)
        if u < 1.0 - 0.0331 * x**4 or math.log(max(u, 1e-300)) < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            return state, d * v * boost
