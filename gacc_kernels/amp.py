"""amp: the only code that touches GradScaler internals.

The fused pass unscales and checks for inf/NaN, so the scaler must neither unscale again nor look
for infs itself. `scaler.unscale_(opt)` hands it gacc's found_inf for that optimizer's parameters;
`scaler.step(opt)` does that first, so that optimizers that unscale inside their own step (fused
Adam/AdamW/SGD, any optimizer with `_step_supports_amp_scaling`) get `grad_scale=None` and gacc's
found_inf instead of dividing by the scale a second time. A step the scaler skips still ends the
window's life: the window counts as stepped.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import OptState

from .patch import plain_copies, set_attr


class ScalerBridge:
    def __init__(self, scaler: torch.amp.GradScaler, optimizers: list[torch.optim.Optimizer],
                 found_infs: Callable[[torch.optim.Optimizer], dict[torch.device, torch.Tensor]],
                 stepped: Callable[[], None], manages: Callable[[torch.optim.Optimizer], bool], group=None):
        """found_infs(opt) finalizes a pending window and returns the found_inf of opt's parameters per
        device; stepped() marks the window stepped; manages(opt): opt steps parameters gacc manages;
        group: the ranks holding the model's other parameters, over which found_inf is agreed at unscale
        (pipeline stages: outside the schedule, where a collective cannot cross its sends)."""
        self.scaler, self.optimizers = scaler, optimizers
        self.found_infs, self.stepped, self.manages, self.group = found_infs, stepped, manages, group

    def install(self, undo: contextlib.ExitStack) -> None:
        set_attr(self.scaler, "unscale_", self.unscale_, undo)
        set_attr(self.scaler, "step", self.step, undo)
        plain_copies(self.scaler, undo, attrs=("unscale_", "step"))

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def _attached(self, optimizer) -> bool:
        return any(optimizer is o for o in self.optimizers)

    def inv_scale(self, device: torch.device) -> torch.Tensor:
        """1 / the loss scale, on the device, without a host sync."""
        # private: GradScaler's scale tensor (read, never written)
        if self.scaler._scale is None:
            raise RuntimeError("the GradScaler has no scale yet: use scaler.scale(loss).backward()")
        return self.scaler._scale.double().reciprocal().float().to(device)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        scaler = self.scaler
        if not self._attached(optimizer):
            if self.manages(optimizer):
                raise RuntimeError(
                    f"scaler.unscale_() of a {type(optimizer).__name__} that steps parameters gacc manages "
                    "but was not given to attach(): gacc has unscaled them already. Give attach() every "
                    "optimizer: attach(model, [opt1, opt2], steps=K, scaler=scaler).")
            return type(scaler).unscale_(scaler, optimizer)
        if not scaler.is_enabled():
            return
        found = self.found_infs(optimizer)
        if self.group is not None:
            for flag in found.values():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        # private: GradScaler's per-optimizer state, as its own unscale_ writes it
        state = scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last "
                               "update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        state["found_inf_per_device"] = found
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        scaler = self.scaler
        attached = self._attached(optimizer)
        if attached and scaler.is_enabled() and \
                scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
            self.unscale_(optimizer)
        result = type(scaler).step(scaler, optimizer, *args, **kwargs)
        if attached:
            self.stepped()  # also where the scaler skipped optimizer.step() (an inf)
        return result
