"""Zero-pass weight grads: attach(..., fuse_linear=True).

The weight grad of a linear layer is one GEMM, dW = dY^T X. Through autograd, the GEMM writes it in
the weight's dtype and gacc's hook reads it again into the fp32 slot: 12 bytes per element (write 2,
read 2, read and write 4 each; 8 in the window's first micro-step, which stores), and a bf16 rounding
of each micro-step's grad. Here the GEMM itself accumulates into the slot in fp32, main = beta * main
+ w * dY^T X (torch.addmm with out_dtype=float32): 8 bytes per element (4 when it stores), no bf16
grad, no rounding but fp32's. Autograd gets no weight grad at all; the input and bias grads go on as
usual. The accumulator decides beta (0 for the window's first grad), w (the micro-step's weight) and
where the grad goes (GradAccumulator.write_fused).

Fused: each module of type exactly nn.Linear (not subclasses: LoRA, quantized layers) whose weight is
a managed, contiguous bf16/fp16 parameter on a device with that GEMM (CUDA, when addmm takes
out_dtype). A call takes stock F.linear, and the weight's grad the hook path, under torch.compile,
under autocast to another dtype, and when the weight has tensor hooks (p.register_hook); the grad is
returned to autograd when the backward does not accumulate into p.grad (torch.autograd.grad).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .layout import Slot
from .patch import plain_copies, set_attr

# Tests: take the fused route also where the device has no fused GEMM, with the fp32 reference.
_FORCE = False

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], None]


def _addmm_fp32(out: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """out = beta * out + alpha * dy^T x, bf16/fp16 operands accumulated in fp32 by cuBLAS."""
    torch.addmm(out, dy.t(), x, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)


def _reference(out: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """The same in fp32 on any device (for tests)."""
    out.addmm_(dy.t().float(), x.float(), beta=beta, alpha=alpha)


@functools.cache
def _device_gemm(device: torch.device, dtype: torch.dtype) -> Gemm | None:
    """addmm with out_dtype where it works: a tiny call, checked (the store ignores what `out` held)."""
    if device.type != "cuda":
        return None
    try:
        out = torch.tensor([[float("nan")]], device=device)
        a = torch.tensor([[3.0]], device=device, dtype=dtype)
        _addmm_fp32(out, a, a, 0.0, 0.5)
        _addmm_fp32(out, a, a, 1.0, 2.0)
        ok = out.item() == 22.5
    except (RuntimeError, TypeError):
        ok = False
    return _addmm_fp32 if ok else None


def gemm_for(device: torch.device, dtype: torch.dtype) -> Gemm | None:
    return _device_gemm(device, dtype) or (_reference if _FORCE else None)


def install(model: torch.nn.Module, slots: list[Slot], capture, undo: contextlib.ExitStack) -> None:
    """Give each fusable nn.Linear of the model a forward through _Linear."""
    slot_of = {id(s.param): s for s in slots}
    for module in model.modules():
        slot = slot_of.get(id(module.weight)) if type(module) is torch.nn.Linear else None
        if slot is None or slot.param.dtype not in (torch.bfloat16, torch.float16) or not slot.main.is_contiguous():
            continue
        if slot.sharded:  # an FSDP2 shard: its layer runs on the unsharded weight
            continue
        gemm = gemm_for(slot.param.device, slot.param.dtype)
        if gemm is not None:
            set_attr(module, "forward", _forward(module, (capture, slot, gemm)), undo)
            plain_copies(module, undo, attrs=("forward",))


def _forward(module: torch.nn.Linear, route: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    param = route[1].param

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or w is not param or w._backward_hooks:
            return F.linear(x, w, b)
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(kind))  # what autocast does for F.linear
        if x.dtype != w.dtype or (b is not None and b.dtype != w.dtype):
            return F.linear(x, w, b)
        return _Linear.apply(x, w, b, route)
    return forward


class _Linear(torch.autograd.Function):
    """F.linear whose weight grad goes into the weight's slot, not to autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, route):
        ctx.save_for_backward(x, weight)
        ctx.route = route
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dy2.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None  # the ops of stock linear
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        dw = _weight_grad(ctx, dy2, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return dx, dw, db, None


def _weight_grad(ctx, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Into the slot when this backward accumulates into the weight; the grad itself when it is
    captured (torch.autograd.grad of the weight); else nothing (no one reads it)."""
    capture, slot, gemm = ctx.route
    try:
        accumulates = torch._C._will_engine_execute_node(ctx.next_functions[1][0])
    except RuntimeError:  # torch.autograd.grad(..., inputs=[weight])
        return dy.t().mm(x)
    if accumulates:
        with torch.no_grad():
            capture.fused_grad(slot, lambda out, beta, alpha: gemm(out, dy, x, beta, alpha))
    return None
