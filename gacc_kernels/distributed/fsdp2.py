"""FSDP2 (fully_shard): gacc accumulates the shards that FSDP hands its hooks after each reduce-scatter.

FSDP's own settings go through its public setters (FSDPModule.set_gradient_divide_factor,
set_force_sum_reduction_for_comms); a torch without them is refused, since FSDP would then average
the ranks and gacc would divide again. The one private read, each group's current values (to restore
them at remove), is in `_current_settings`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .reducer import LocalReducer, RanksDisagree

_SETTERS = ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms")


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that fully_shard (FSDP2) manages."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(module) -> list:
    # private: FSDPState's parameter groups (one per module before torch 2.12, several after)
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _current_settings(module) -> tuple:
    """The module's divide factor and sum-only flag now (private fields of its parameter groups)."""
    groups = _param_groups(module)
    if not groups:
        return None, False
    return groups[0].gradient_divide_factor, groups[0].force_sum_reduction_for_comms


class ShardedReducer(LocalReducer):
    """FSDP reduce-scatters each micro-step's grads and hands gacc this rank's shard, through the
    post-accumulate-grad hooks it calls after the reduce-scatter. gacc has FSDP sum instead of average
    (gradient divide factor 1, plain SUM), accumulates the shards in fp32 (4/N bytes per parameter),
    and finalizes with the weights, the flags, found_inf and the norm agreed by all ranks. A
    micro-step's weight multiplies the ranks' sum, so it must be the same on every rank: checked at the
    end of each window."""
    fuses_last_pass = False

    def __init__(self, model: torch.nn.Module, window, undo: contextlib.ExitStack):
        self.window = window
        modules = fsdp2_modules(model)
        missing = [name for name in _SETTERS if not hasattr(modules[0], name)]
        if missing:
            raise RuntimeError(f"this torch ({torch.__version__}) has no FSDPModule.{missing[0]}: gacc "
                               "cannot make FSDP2 sum the ranks' grads, and would divide them twice. Use "
                               "torch >= 2.9")
        self.groups = [g for m in modules for g in _param_groups(m)]
        mesh = next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
        self.group = mesh.get_group()
        self.world = self.ranks = dist.get_world_size(self.group)
        for m in modules:  # a plain SUM (gloo has no PREMUL_SUM), then a division by 1
            factor, sum_only = _current_settings(m)
            undo.callback(m.set_gradient_divide_factor, factor)
            undo.callback(m.set_force_sum_reduction_for_comms, sum_only)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)

    def before_backward(self):
        if not all(g.reduce_grads for g in self.groups):
            raise RuntimeError(
                "FSDP2 with set_requires_gradient_sync(False) (no_sync): FSDP then accumulates the grads "
                "itself, at its own precision, and gacc would count one micro-step for several. gacc "
                "accumulates in fp32 already: leave gradient sync on for every micro-step")

    def finish(self, buffers, written, weight_sum):
        (buffer,) = buffers
        steps, weights = self.window.steps, self.window.weights
        padded = weights + [0.0] * (steps - len(weights))
        t = torch.tensor([len(weights), *padded, *(-w for w in padded), *written], dtype=torch.float64,
                         device=buffer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        got = t.tolist()
        if got[0] != len(weights) or got[1: steps + 1] != [-w for w in got[steps + 1: 2 * steps + 1]]:
            raise RanksDisagree(
                f"under FSDP2 every rank must run the same micro-steps with the same weights (this rank: "
                f"{weights}); FSDP sums the ranks' grads before gacc sees them, so a per-rank weight "
                "cannot be applied. Weigh each rank's loss yourself and attach with reduction='sum'.")
        return [bool(f) for f in got[2 * steps + 1:]], weight_sum * self.world

    def after_finalize(self, buffers):
        for buffer in buffers:
            dist.all_reduce(buffer.found_inf, op=dist.ReduceOp.MAX, group=self.group)

    def global_sq_norm(self, local):
        dist.all_reduce(local, group=self.group)
        return local

    def stats_totals(self, local):
        """The grads came summed over the ranks: a micro-batch is the ranks' together. q and S_big are
        sums over the shards; the micro-steps and weights are this rank's (the same on every rank),
        each micro-batch holding `world` times its weight in units."""
        shards = local[:2].clone()
        dist.all_reduce(shards, group=self.group)
        return torch.cat([shards, local[2:4], local[2:3] * self.world])
