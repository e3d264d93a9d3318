"""The gradient noise scale from every micro-batch's own gradient estimate, kept whole in float64: the
reference that acc.stats() is checked against (McCandlish et al. 2018, appendix A.1, weighted)."""
import math

import torch


def flat(grads, keep=None) -> torch.Tensor:
    """One float64 vector of a micro-batch's grads (None: zeros of no size); keep: which to include."""
    return torch.cat([g.double().reshape(-1) for i, g in enumerate(grads)
                      if g is not None and (keep is None or keep[i])])


def reference(estimates: list[torch.Tensor], weights: list[float], units_per_weight: float = 1.0):
    """(g2, trace, n, units) from each micro-batch's estimate of the gradient (the grad of its own mean
    loss) and its weight (its units: tokens, or 1)."""
    n, total = len(estimates), sum(weights)
    g = sum(w * e for w, e in zip(weights, estimates)) / total
    s_big = float(g @ g)
    s_small = sum(w * float(e @ e) for w, e in zip(weights, estimates)) / total
    if n == 1:
        return math.nan, math.nan, n, total * units_per_weight
    units = total * units_per_weight
    return (n * s_big - s_small) / (n - 1), units * (s_small - s_big) / (n - 1), n, units


def ema(values: list[float], beta: float) -> float:
    """The bias-corrected exponential moving average of values (oldest first)."""
    avg = weight = 0.0
    for v in values:
        avg, weight = beta * avg + (1 - beta) * v, beta * weight + (1 - beta)
    return avg / weight


def assert_stats(stats, g2, trace, n, units, rtol=1e-4):
    assert stats.n == n and math.isclose(stats.units, units, rel_tol=1e-9)
    assert math.isclose(stats.g2, g2, rel_tol=rtol), (stats.g2, g2)
    assert math.isclose(stats.trace, trace, rel_tol=rtol), (stats.trace, trace)
    assert math.isclose(stats.b_simple, trace / g2, rel_tol=2 * rtol)
