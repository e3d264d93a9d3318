"""DistributedDataParallel and plain process groups: which group gacc reduces over, and DDP's own
machinery, which gacc takes over (its reducer would all-reduce the grads gacc has taken, i.e. zeros)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..patch import set_attr


def find_ddp(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper in the model, wherever it sits (a framework's module may hold it)."""
    found = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
    if len(found) > 1:
        raise ValueError("the model holds several DistributedDataParallel wrappers; gacc supports one")
    return found[0] if found else None


def check_ddp(ddp: DistributedDataParallel) -> None:
    if getattr(ddp, "static_graph", False):
        raise ValueError("gacc does not support DistributedDataParallel(static_graph=True): DDP's reducer then "
                         "expects its own per-backward hooks, which gacc turns off; build DDP without static_graph")


def data_parallel_group(ddp: DistributedDataParallel | None, process_group):
    """The process group to reduce over: the DDP wrapper's, or the one given; None on one process."""
    if ddp is not None:
        if process_group is not None and process_group is not ddp.process_group:
            raise ValueError("process_group= differs from the DistributedDataParallel model's; leave it out")
        return ddp.process_group
    if process_group is not None and not dist.is_initialized():
        raise ValueError("process_group= was given, but torch.distributed is not initialized")
    return process_group


def broadcast_from_first_rank(model: torch.nn.Module, group) -> None:
    """Every rank starts from the same weights and buffers, as DistributedDataParallel does."""
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=src, group=group)


def take_over(ddp: DistributedDataParallel, undo: contextlib.ExitStack) -> None:
    """Turn DDP's per-backward all-reduce off while gacc is attached."""
    set_attr(ddp, "require_backward_grad_sync", False, undo)
