"""Finalize: scale by 1/sum(w) and 1/loss scale, flag inf/NaN, norm partials, cast.

Either the last micro-step's own launches do it (`arm`, then layout.Bucket.flush with
accumulate_finalize_), or one pass per segment runs afterwards (`whole_pass`: after a window that ends
early, under data parallel, and where fused_linear's layers are armed, whose grads bypass the
launches). Slots the fused launches did not reach are finished one by one (`slot`).
"""
from __future__ import annotations

import torch

from .kernels import ops
from .layout import DeviceBuffer, Slot
from .kernels.reference import CHUNK


def arm(buffers: list[DeviceBuffer], scales: list[torch.Tensor] | None) -> None:
    """The launches from now on finalize as they go, with these scales (None: they don't)."""
    for i, buffer in enumerate(buffers):
        buffer.last_scale = None if scales is None else scales[i]
        if scales is not None:
            buffer.found_inf.zero_()


def whole_pass(buffers: list[DeviceBuffer], scales: list[torch.Tensor]) -> None:
    """One finalize_ launch per segment; bf16/fp16 segments are cast into new tensors (buffer.outs)."""
    for buffer, scale in zip(buffers, scales):
        buffer.found_inf.zero_()
        buffer.outs = [None if dtype == torch.float32 else torch.empty(e - b, dtype=dtype, device=buffer.device)
                       for dtype, b, e in buffer.segments]
        for (_, b, e), out in zip(buffer.segments, buffer.outs):
            ops.finalize_(buffer.buf[b:e], scale, buffer.found_inf, buffer.partials[b // CHUNK: e // CHUNK], out)


def slot(s: Slot, scale: torch.Tensor) -> None:
    """Finalize one slot: a parameter the fused launches did not reach."""
    buffer = s.buffer
    dtype = buffer.segments[s.segment][0]
    if dtype != torch.float32 and s.out is None:
        s.out = torch.empty_strided(s.shape, s.strides, dtype=dtype, device=buffer.device)
    ops.finalize_(s.flat(buffer.buf), scale, buffer.found_inf, s.partials(),
                  None if s.out is None else s.out.as_strided((s.numel,), (1,)))


def add_to_finished(s: Slot, g: torch.Tensor, weight: float) -> None:
    """A second grad for a slot the fused launch already finalized: add it scaled, redo cast and norm.
    Exact to fp32 rounding; fusion then stays off (double grads repeat every micro-step)."""
    s.main.add_(g.float().mul_(weight).mul_(s.buffer.last_scale))
    slot(s, torch.ones(1, device=s.buffer.device))


def clip_(buffers: list[DeviceBuffer], coef: torch.Tensor) -> None:
    """Multiply the finished window by coef (a device tensor), in the buffer and in p.grad."""
    for buffer in buffers:
        c = coef.to(buffer.device)
        for i, ((dtype, b, e), out) in enumerate(zip(buffer.segments, buffer.outs)):
            if dtype == torch.float32 or out is not None:  # fp32, or one cast of the whole segment
                ops.scale_(buffer.buf[b:e], c, out)
            else:  # p.grad are the last micro-step's grads, one tensor each
                for s in buffer.slots:
                    if s.segment == i and s.out is not None:
                        ops.scale_(s.flat(buffer.buf), c, s.out.as_strided((s.numel,), (1,)))
        buffer.partials.mul_(c.square())  # the norm stays the norm of what p.grad holds
