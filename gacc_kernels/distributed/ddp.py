"""DistributedDataParallel and plain process groups: which group gacc reduces over, and DDP's own
machinery, which gacc takes over.

DDP's reducer must never run while gacc is attached: it would all-reduce the grads gacc has taken away,
i.e. zeros. DDP decides at each forward, from `require_backward_grad_sync`, whether the coming backward
syncs. That flag stays the loop's (`model.no_sync()`, `model.require_backward_grad_sync = ...`, Fabric's
`no_backward_sync`): gacc reads it at each forward as the loop's word on the window, and hides it from
DDP's forward only. So:
  - once the loop has turned sync off at some forward, a forward with sync on marks the micro-step
    that ends the window (as in stock DDP, where the synced micro-step is the window's last);
  - buffers are broadcast as stock DDP does (`broadcast_buffers`): at the forward after a synced one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def find_ddp(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper in the model, wherever it sits (a framework's module may hold it)."""
    found = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
    if len(found) > 1:
        raise ValueError("the model holds several DistributedDataParallel wrappers; gacc supports one")
    return found[0] if found else None


def check_ddp(ddp: DistributedDataParallel) -> None:
    if getattr(ddp, "static_graph", False):
        raise ValueError("gacc does not support DistributedDataParallel(static_graph=True): DDP's reducer "
                         "then expects its own per-backward hooks, which gacc turns off; build DDP without "
                         "static_graph")


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


class SyncFlag:
    """The loop's `require_backward_grad_sync`, read at each forward and hidden from DDP's."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp
        self.toggled = False  # the loop has turned sync off at some forward since attach
        self.sync = True      # the flag at the last forward with grad enabled
        self._loop = True     # the loop's flag while DDP's forward runs with it hidden

    def install(self, undo: contextlib.ExitStack) -> None:
        pre = self.ddp.register_forward_pre_hook(self._before_forward, prepend=True)
        post = self.ddp.register_forward_hook(self._after_forward, always_call=True)
        undo.callback(pre.remove)
        undo.callback(post.remove)

    def _before_forward(self, module, args) -> None:
        ddp = self.ddp
        self._loop = ddp.require_backward_grad_sync  # _after_forward puts it back, also after an exception
        if torch.is_grad_enabled():
            self.sync = bool(self._loop)
            self.toggled |= not self.sync
        ddp.require_backward_grad_sync = False  # DDP's forward then prepares no reduction

    def _after_forward(self, module, args, output) -> None:
        ddp = self.ddp
        ddp.require_backward_grad_sync = self._loop
        # what DDP's own forward would have left: buffers go out at the forward after a synced one
        ddp.require_forward_param_sync = torch.is_grad_enabled() and bool(self._loop)

    def ends_window(self) -> bool:
        """Read as each backward starts: the loop synced this micro-step, having not synced others."""
        return self.toggled and self.sync
