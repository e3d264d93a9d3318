"""The Reducer protocol: what happens between the last micro-step's launches and finalize.

A reducer hears of each bucket that the window's last micro-step has finished writing (a collective
may start there, overlapped with the rest of backward) and of grads that come after their bucket was
sent; `finish` completes the reduction. Collectives go through torch.distributed directly; a reducer
keeps only what one window's reduction needs.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..layout import Bucket, DeviceBuffer, Slot


class RanksDisagree(RuntimeError):
    """The ranks ran windows that cannot be reduced into one exact result."""


class Reducer(Protocol):
    #: The last micro-step's launches may finalize as they go: no collective sits between them and
    #: finalize. False where buckets are sent as they complete.
    fuses_last_pass: bool
    #: How many ranks' grads are summed: reduction="sum" divides by it, as DDP and FSDP average.
    ranks: int

    def before_backward(self, first: bool) -> None:
        """A micro-step's backward starts (`first`: the window's first): refuse a setting the reducer
        cannot be exact under."""

    def takes_unsharded(self) -> bool:
        """Whole grads of sharded parameters go to the reducer (FSDP2 with gradient sync off)."""

    def on_bucket_ready(self, bucket: Bucket, weight_sum: float) -> None:
        """The last micro-step has written this bucket; weight_sum is the window's total weight."""

    def is_sending(self, bucket: Bucket) -> bool:
        """The bucket's collective is in flight: its slots must not be written."""

    def take_late(self, slot: Slot, grad: torch.Tensor, weight: float) -> bool:
        """A grad for a slot whose bucket is being sent: True if the reducer keeps it (sends it after)."""

    def finish(self, buffers: list[DeviceBuffer], written: list[bool],
               weight_sum: float) -> tuple[list[bool], float | torch.Tensor]:
        """Complete the reduction: which slots hold a gradient on any rank, and the total weight over
        the ranks (a device tensor where it was summed). Raises RanksDisagree."""

    def after_finalize(self, buffers: list[DeviceBuffer]) -> None:
        """found_inf is final on this rank: agree on it over the ranks."""

    def global_sq_norm(self, local: torch.Tensor) -> torch.Tensor:
        """The squared norm over the ranks, from this rank's."""

    def abort(self) -> None:
        """A backward raised: wait for what is in flight; the window is dropped."""

    def state_dict(self) -> dict:
        """What the reducer holds of a window in progress, for a checkpoint."""

    def load_state_dict(self, state: dict) -> None: ...

    def stats_totals(self, local: torch.Tensor) -> torch.Tensor:
        """The window's statistics over the ranks (stats.GradStats), from this rank's float64
        [q, S_big, weight sum, micro-steps]: [q, S_big, W, n, units], in one small collective."""


class LocalReducer:
    """One process: nothing to reduce. The base of the others: a stage they don't need does nothing."""
    fuses_last_pass = True
    ranks = 1

    def before_backward(self, first):
        pass

    def takes_unsharded(self):
        return False

    def on_bucket_ready(self, bucket, weight_sum):
        pass

    def is_sending(self, bucket):
        return False

    def take_late(self, slot, grad, weight):
        return False

    def finish(self, buffers, written, weight_sum):
        return written, weight_sum

    def after_finalize(self, buffers):
        pass

    def global_sq_norm(self, local):
        return local

    def abort(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def stats_totals(self, local):
        return torch.cat([local, local[2:3]])
