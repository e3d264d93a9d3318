"""Per-window gradient statistics: the gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", appendix A.1), from sums of squares the accumulate kernels take in the
pass they already make (attach(grad_stats=True)).

The model. Micro-batch i of w_i units (its weight: tokens with set_weight(n_tokens), else 1 unit = one
micro-batch) gives an estimate g^_i of the true gradient mu, with covariance Sigma / w_i (Sigma: per
unit). The window's result is G = (1/W) sum_i w_i g^_i, W = sum_i w_i. gacc computes G = s sum_i w_i g_i
from the raw grads g_i (s is finalize's scale: 1/sum(w) or 1/ranks, 1/loss_scale, 1/the GradScaler's
scale), so g^_i = W s g_i whatever the loop's own normalisation. With n micro-batches,

    S_big   = |G|^2                                    (the finalize pass's norm partials)
    S_small = sum_i w_i |g^_i|^2 / W = W s^2 q,   q = sum_i w_i |g_i|^2    (the kernels' stat partials)
    E[S_big] = |mu|^2 + tr(Sigma) / W,   E[S_small] = |mu|^2 + n tr(Sigma) / W
    |G|^2 ~ (n S_big - S_small) / (n - 1),   tr(Sigma) ~ W (S_small - S_big) / (n - 1)
    B_simple = tr(Sigma) / |G|^2, in units (tokens, or micro-batches: times b for examples)

With equal weights this is appendix A.1 exactly (S_small the mean of |g_i|^2, units of one micro-batch).
B_simple does not depend on any overall factor of the loss. Data parallel: the micro-batches are every
rank's (n = ranks x micro-steps, q summed over the ranks). FSDP2 sums the ranks' grads before gacc sees
them: a micro-batch is the ranks' together (n = micro-steps, each of ranks x w_i units).

Covered: the parameters whose every micro-grad goes through the accumulate kernels once per micro-step.
Not covered, and left out of both S_small and S_big: fused_linear's weights and layers that add into
p.main_grad (their grads never pass through the kernels), and a parameter that gets two grads in one
micro-step (tied weights, reentrant checkpointing, micro_step() contexts), where q would hold the
squares of the parts, not of their sum. The coverage is assumed to be the same on every rank.

Only this module assigns GradStats' fields.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .distributed.reducer import Reducer
from .kernels.reference import CHUNK
from .layout import DeviceBuffer, Slot


class Stats(NamedTuple):
    """What acc.stats() returns: the last finished window's estimates and their moving averages."""
    g2: float            # |G|^2, the squared norm of the true gradient, in the units of p.grad
    trace: float         # tr(Sigma), the per-unit gradient noise
    b_simple: float      # trace / g2: the critical batch, in units; compare with `units`
    g2_ema: float        # the exponential moving averages (bias-corrected) over the windows counted
    trace_ema: float
    b_simple_ema: float  # trace_ema / g2_ema
    n: int               # micro-batches in the last window (NaN estimates when 1)
    units: float         # the last window's batch, in units (the sum of the weights, times ranks)
    covered: float       # the fraction of the gradient's elements that the statistics cover
    windows: int         # windows in the averages (skipped: n = 1, inf/NaN, a GradScaler's skipped step)

    def metrics(self) -> dict[str, float]:
        """What the framework integrations log: the noise scale (and its average), |G|^2 and tr(Sigma)."""
        return {"gacc/b_simple": self.b_simple, "gacc/b_simple_ema": self.b_simple_ema,
                "gacc/g2": self.g2, "gacc/trace": self.trace}


class GradStats:
    def __init__(self, buffers: list[DeviceBuffer], reducer: Reducer, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"stats_beta must be in [0, 1), got {beta}")
        self.buffers, self.reducer, self.beta = buffers, reducer, beta
        for buffer in buffers:
            buffer.keep_stats()
        device = buffers[0].device
        self.uncovered: set[Slot] = set()
        self.masks: list[torch.Tensor | None] = [None] * len(buffers)  # per chunk 1 covered, 0 not; None: all
        self.covered = 1.0
        self.dirty = False  # the masks are behind `uncovered`
        self.last = torch.full((4,), math.nan, dtype=torch.float64, device=device)  # g2, trace, n, units
        self.ema = torch.zeros(3, dtype=torch.float64, device=device)  # g2, trace, their weight
        self.windows = torch.zeros((), dtype=torch.int64, device=device)
        self.skip = False  # the window in progress lost its earlier micro-steps' sums (a checkpoint)

    def uncover(self, slot: Slot) -> None:
        """The slot's grads bypass the kernels, or come twice in a micro-step: leave it out from now on."""
        if slot not in self.uncovered:
            self.uncovered.add(slot)
            self.dirty = True

    def _update_masks(self) -> None:
        """Rebuild the per-chunk masks on the host; one copy to each device, only when coverage changed."""
        total = covered = 0
        for i, buffer in enumerate(self.buffers):
            mask = torch.ones(buffer.partials.numel(), dtype=torch.float64)
            for slot in buffer.slots:
                total += slot.numel
                if slot in self.uncovered:
                    mask[slot.start // CHUNK: slot.start // CHUNK + -(-slot.numel // CHUNK)] = 0.0
                else:
                    covered += slot.numel
            self.masks[i] = None if bool(mask.all()) else mask.to(buffer.device)
        self.covered = covered / max(total, 1)
        self.dirty = False

    def close(self, scale: torch.Tensor, weight_sum: float, micro_steps: int) -> None:
        """The window is finalized (norm partials final, found_inf agreed): its estimates and the
        averages, on the device, with no host sync. scale: what the window was multiplied by."""
        if self.dirty:
            self._update_masks()
        first = self.buffers[0].device
        sums = []
        for buffer, mask in zip(self.buffers, self.masks):
            q, sbig = buffer.stat_partials.double(), buffer.partials.double()
            if mask is not None:
                q, sbig = q * mask, sbig * mask
            sums.append(torch.stack([q.sum(), sbig.sum(), buffer.found_inf.double().reshape(())]).to(first))
        local = torch.stack(sums).sum(0) if len(sums) > 1 else sums[0]
        found_inf = local[2]
        fill = torch.full((2,), 0.0, dtype=torch.float64, device=first)
        fill[0], fill[1] = weight_sum, micro_steps  # fills on the device: no copy from the host
        q, sbig, weights, n, units = self.reducer.stats_totals(torch.cat([local[:2], fill])).unbind()
        small = weights * scale.to(first).double().reshape(()).square() * q
        g2 = (n * sbig - small) / (n - 1)
        trace = units * (small - sbig) / (n - 1)
        several = n > 1
        g2, trace = (torch.where(several, x, math.nan) for x in (g2, trace))
        self.last.copy_(torch.stack([g2, trace, n, units]))
        valid = several & g2.isfinite() & trace.isfinite() & (found_inf == 0) & (not self.skip)
        ema = self.beta * self.ema + (1.0 - self.beta) * torch.stack([g2, trace, torch.ones_like(g2)])
        self.ema.copy_(torch.where(valid, ema, self.ema))
        self.windows.add_(valid.long())
        self.skip = False

    def read(self) -> Stats:
        """The estimates as floats: one copy to the host (a sync)."""
        if self.dirty:
            self._update_masks()
        g2, trace, n, units, eg2, etrace, eweight, windows = torch.cat(
            [self.last, self.ema, self.windows.double().reshape(1)]).tolist()
        eg2, etrace = (x / eweight if eweight else math.nan for x in (eg2, etrace))
        return Stats(g2, trace, _ratio(trace, g2), eg2, etrace, _ratio(etrace, eg2),
                     0 if math.isnan(n) else int(n), units, self.covered, int(windows))

    # -- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.tolist(), "windows": int(self.windows),
                "stat_partials": [b.stat_partials.clone() for b in self.buffers]}

    def load_state_dict(self, state: dict[str, Any] | None, micro_steps: int) -> None:
        """A checkpoint's averages and window in progress; None (saved without statistics): the resumed
        window is left out of the averages, since its earlier micro-steps' sums were not saved."""
        if state is None:
            self.skip = micro_steps > 0
            return
        self.ema.copy_(torch.tensor(state["ema"], dtype=torch.float64))
        self.windows.fill_(state["windows"])
        for buffer, saved in zip(self.buffers, state["stat_partials"]):
            buffer.stat_partials.copy_(saved)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0.0 else math.nan
