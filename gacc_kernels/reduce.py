"""Reduce: what happens between the last micro-step's launches and finalize.

A Reducer hears of each bucket that the last micro-step has finished writing (`on_bucket_ready`,
where an overlapped collective would start) and finishes the window's reduction (`finish`), returning
which slots hold a gradient on any rank and the total weight over all ranks.
"""
from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.distributed as dist

from .layout import Bucket, DeviceBuffer


class Reducer(Protocol):
    #: the last micro-step's launches may finalize as they go (no collective between them and finalize)
    fuses_last_pass: bool

    def on_bucket_ready(self, bucket: Bucket) -> None: ...

    def finish(self, buffers: list[DeviceBuffer], written: list[bool],
               weight_sum: float) -> tuple[list[bool], float | torch.Tensor]: ...


class LocalReducer:
    """One process: nothing to reduce."""
    fuses_last_pass = True

    def on_bucket_ready(self, bucket: Bucket) -> None:
        pass

    def finish(self, buffers, written, weight_sum):
        return written, weight_sum


class DDPAllReduce:
    """DistributedDataParallel: DDP's per-backward all-reduce is turned off (its reducer would
    all-reduce the cleared grads, i.e. zeros); the flat buffer and the weights are summed over the
    ranks once per window, after the last backward."""
    fuses_last_pass = False

    def __init__(self, model: torch.nn.parallel.DistributedDataParallel, undo: contextlib.ExitStack):
        self.group = model.process_group
        model.require_backward_grad_sync = False
        undo.callback(setattr, model, "require_backward_grad_sync", True)

    def on_bucket_ready(self, bucket: Bucket) -> None:
        pass

    def finish(self, buffers, written, weight_sum):
        (buffer,) = buffers  # one device per process
        flags = torch.tensor(written, dtype=torch.uint8, device=buffer.device)
        total = torch.tensor([weight_sum], dtype=torch.float64, device=buffer.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(total, group=self.group)
        dist.all_reduce(buffer.buf, group=self.group)
        return [bool(f) for f in flags.tolist()], total
