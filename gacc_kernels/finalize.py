"""Finalize: scale by 1/sum(w) and 1/loss scale, flag inf/NaN, norm partials, cast.

Either the last micro-step's own launches do it (`arm` with the scales, then layout.Bucket.flush with
accumulate_finalize_), or one pass per segment runs afterwards (`whole_pass`: after a window that ends
early, under data parallel, and where fused_linear's layers are armed, whose grads bypass the
launches). Slots the fused launches did not reach are finished one by one (`slot`).

The Finalizer owns the last-pass plan (the armed scale per buffer), the scale itself, and the casts of
a whole pass (`outs`, which p.grad of bf16/fp16 parameters are views of).
"""
from __future__ import annotations

import torch

from .amp import ScalerBridge
from .distributed.reducer import RanksDisagree, Reducer
from .kernels import ops
from .kernels.reference import CHUNK
from .layout import DeviceBuffer, Slot
from .window import Window


class Finalizer:
    def __init__(self, buffers: list[DeviceBuffer], mean: bool, loss_scale: float,
                 scaler: ScalerBridge | None, ranks: int):
        self.buffers, self.mean, self.loss_scale, self.scaler = buffers, mean, loss_scale, scaler
        self.ranks = ranks  # reduction="sum" averages over the data-parallel ranks, as DDP and FSDP do
        self._armed: list[torch.Tensor | None] = [None] * len(buffers)  # the last pass's scale, while armed
        self._index = {id(b): i for i, b in enumerate(buffers)}
        # per buffer, the cast of each bf16/fp16 segment by a whole pass (p.grad are views of it)
        self.outs: list[list[torch.Tensor | None]] = [[None] * len(b.segments) for b in buffers]
        self.applied: torch.Tensor | None = None  # the scale the last finished window was multiplied by

    def use_scaler(self, scaler: ScalerBridge) -> None:
        """The GradScaler whose scale each window is divided by."""
        self.scaler = scaler

    def scales(self, weight_sum: float | torch.Tensor) -> list[torch.Tensor]:
        """Per buffer: 1 / (sum(w) over micro-steps and ranks (reduction="mean"), or the number of ranks
        ("sum"), times loss_scale), times 1 / the GradScaler's scale."""
        if self.mean and float(weight_sum) == 0.0:
            raise ValueError("every micro-step in this window had weight 0; cannot take the weighted mean")
        if isinstance(weight_sum, torch.Tensor):  # summed over the ranks, on the device
            total = (weight_sum.double() if self.mean
                     else torch.full_like(weight_sum, self.ranks, dtype=torch.float64))
            inv = (total * self.loss_scale).reciprocal().float().reshape(1)
        else:
            inv = 1.0 / ((weight_sum if self.mean else self.ranks) * self.loss_scale)
        scales = []
        for buffer in self.buffers:
            if isinstance(inv, torch.Tensor):
                scale = inv.to(buffer.device)
            else:  # a fill on the device, no copy from the host
                scale = torch.full((1,), inv, dtype=torch.float32, device=buffer.device)
            if self.scaler is not None and self.scaler.enabled:
                scale = scale * self.scaler.inv_scale(buffer.device)
            scales.append(scale)
        return scales

    # -- the last pass in the launches --------------------------------------------------------------

    def arm(self, scales: list[torch.Tensor] | None) -> None:
        """The launches from now on finalize as they go, with these scales (None: they don't)."""
        for i, buffer in enumerate(self.buffers):
            self._armed[i] = None if scales is None else scales[i]
            if scales is not None:
                buffer.found_inf.zero_()

    def armed(self, buffer: DeviceBuffer) -> torch.Tensor | None:
        """The scale this buffer's launches finalize with now, or None."""
        return self._armed[self._index[id(buffer)]]

    def add_to_finished(self, s: Slot, g: torch.Tensor, weight: float) -> None:
        """A second grad for a slot the fused launch already finalized: add it scaled, redo cast and norm.
        Exact to fp32 rounding; fusion then stays off (double grads repeat every micro-step)."""
        s.main.add_(g.float().mul_(weight).mul_(self.armed(s.buffer)))
        self.slot(s, torch.ones(1, device=s.buffer.device))

    # -- the end of the window ----------------------------------------------------------------------

    def run(self, window: Window, slots: list[Slot], reducer: Reducer, fused: bool) -> list[bool] | None:
        """Finish the window's values in the buffers: which slots hold a gradient (on any rank), or None
        where the ranks disagree (the window is then broken)."""
        written = [s.holds(window.id) for s in slots]
        for slot, wrote in zip(slots, written):
            if not wrote:  # stale values from an earlier window: not part of this one
                slot.main.zero_()
                slot.partials().zero_()
                if slot.buffer.stat_partials is not None:
                    slot.partials(slot.buffer.stat_partials).zero_()
            elif fused and not slot.finalized(window.finalizing):  # no grad in the fused last micro-step
                self.slot(slot, self.armed(slot.buffer))
        if fused:
            self.applied = self.armed(self.buffers[0])
        else:
            try:
                written, weight_sum = reducer.finish(self.buffers, written, window.weight_sum)
            except RanksDisagree as e:  # raised at the step, not inside backward (FSDP's callbacks go on)
                window.break_(f"{e} Call optimizer.zero_grad() to discard this window.")
                return None
            scales = self.scales(weight_sum)
            self.whole_pass(scales)
            self.applied = scales[0]
            reducer.after_finalize(self.buffers)
        self.arm(None)
        return written

    def whole_pass(self, scales: list[torch.Tensor]) -> None:
        """One finalize_ launch per segment; bf16/fp16 segments are cast into new tensors (outs)."""
        for buffer, outs, scale in zip(self.buffers, self.outs, scales):
            buffer.found_inf.zero_()
            for i, (dtype, b, e) in enumerate(buffer.segments):
                out = (None if dtype == torch.float32
                       else torch.empty(e - b, dtype=dtype, device=buffer.device))
                outs[i] = out
                ops.finalize_(buffer.buf[b:e], scale, buffer.found_inf,
                              buffer.partials[b // CHUNK: e // CHUNK], out)

    def slot(self, s: Slot, scale: torch.Tensor) -> None:
        """Finalize one slot: a parameter the fused launches did not reach."""
        buffer = s.buffer
        dtype = buffer.segments[s.segment][0]
        if dtype != torch.float32 and s.out is None:
            s.set_out(torch.empty_strided(s.shape, s.strides, dtype=dtype, device=buffer.device))
        ops.finalize_(s.flat(buffer.buf), scale, buffer.found_inf, s.partials(),
                      None if s.out is None else s.out.as_strided((s.numel,), (1,)))

    def reset(self) -> None:
        """A new window: no plan, no casts."""
        self.arm(None)
        for outs in self.outs:
            outs[:] = [None] * len(outs)

    def clip_(self, coef: torch.Tensor) -> None:
        """Multiply the finished window by coef (a device tensor), in the buffer and in p.grad."""
        for buffer, outs in zip(self.buffers, self.outs):
            c = coef.to(buffer.device)
            for i, ((dtype, b, e), out) in enumerate(zip(buffer.segments, outs)):
                if dtype == torch.float32 or out is not None:  # fp32, or one cast of the whole segment
                    ops.scale_(buffer.buf[b:e], c, out)
                else:  # p.grad are the last micro-step's grads, one tensor each
                    for s in buffer.slots:
                        if s.segment == i and s.out is not None:
                            ops.scale_(s.flat(buffer.buf), c, s.out.as_strided((s.numel,), (1,)))
            buffer.partials.mul_(c.square())  # the norm stays the norm of what p.grad holds

    def local_sq_norm(self) -> torch.Tensor:
        """This process's squared norm of the finished window, from the pass's partials."""
        first = self.buffers[0].device
        return torch.stack([b.partials.sum().to(first) for b in self.buffers]).sum()
