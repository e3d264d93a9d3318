"""Tensor parallelism (parallelize_module on a 1-D mesh): every rank runs the same micro-steps on the same
data and holds its shards of the DTensor parameters (and whole copies of the replicated ones), so there is
nothing to sum; gacc accumulates each rank's local values. Only what spans the ranks is agreed: found_inf
(a shard's inf is on one rank) and the norm, where a sharded parameter's squares are summed over the ranks
and a replicated one's counted once."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..layout import DeviceBuffer
from .reducer import LocalReducer


def tp_mesh(model: torch.nn.Module):
    """The device mesh of the model's DTensor parameters, or None."""
    return next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)


def replicated(param) -> bool:
    """Whole on every rank: a plain tensor, or a DTensor replicated over its mesh."""
    return not hasattr(param, "placements") or all(pl.is_replicate() for pl in param.placements)


def sq_norm_counted_once(local: torch.Tensor, copies: list, group, ranks: int) -> torch.Tensor:
    """The squared norm over `group` from this rank's (`local`): every rank's squares summed, except those
    of `copies`, slots that all `ranks` ranks of the group hold alike, counted once. One collective."""
    whole = sum((s.partials().sum() for s in copies), torch.zeros((), device=local.device))
    parts = torch.stack([local - whole, whole])
    dist.all_reduce(parts, group=group)
    return parts[0] + parts[1] / ranks


class TensorParallel(LocalReducer):
    fuses_last_pass = False  # found_inf is agreed after the last pass

    def __init__(self, mesh, buffer: DeviceBuffer):
        self.group, self.ranks_held = mesh.get_group(), mesh.size()
        self.copies = [s for s in buffer.slots if replicated(s.param)]

    def after_finalize(self, buffers):
        for buffer in buffers:
            dist.all_reduce(buffer.found_inf, op=dist.ReduceOp.MAX, group=self.group)

    def global_sq_norm(self, local):
        return sq_norm_counted_once(local, self.copies, self.group, self.ranks_held)

    def stats_totals(self, local):
        raise RuntimeError("grad_stats under tensor parallelism is not supported yet: attach without it")
