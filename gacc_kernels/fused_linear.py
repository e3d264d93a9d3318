"""Zero-pass weight grads: attach(..., fuse_linear=True).

The weight grad of a linear layer is one GEMM, dW = dY^T X. Through autograd, the GEMM writes it in
the weight's dtype and gacc's hook reads it again into the fp32 slot: 12 bytes per element (write 2,
read 2, read and write 4 each; 8 in the window's first micro-step, which stores), and a bf16 rounding
of each micro-step's grad. Here the GEMM itself accumulates into the slot in fp32, main = beta * main
+ w * dY^T X (_C.weight_grad_into: on CUDA, addmm with out_dtype=float32): 8 bytes per element (4 when
it stores), no bf16 grad, no rounding but fp32's. The accumulator decides beta (0 for the window's
first grad), w (the micro-step's weight) and where the grad goes (events.Events.write_fused).

The layer's autograd Function is C++ (csrc/fused_linear.cpp), so that its host cost is at most a stock
linear's: forward is F.linear; backward computes the input and bias grads as stock does and returns no
weight grad to autograd. The weight grad goes one of two ways:
    armed   capture arms the layers at the backward's start with where each grad goes (slot, beta,
            alpha; Capture._arm), and the C++ backward writes it there without a call into Python; gacc
            counts those grads at the backward's end, and their buckets launch the other grads they hold
            then. In the window's last micro-step this means one finalize pass after backward, not in
            the bucket launches, so data parallel (whose buckets go on the wire as they complete) arms
            all micro-steps but the last
    called  otherwise (data parallel's last micro-step; micro_step() contexts; a second grad of a layer
            in one backward; backward(inputs=...) and torch.autograd.grad; a reentrant checkpoint's
            inner backward), one Python call, _weight_grad, with dY and X
A graph made before remove() gives autograd the weight grad, as stock would.

Fused: each module of type exactly nn.Linear (not subclasses: LoRA, quantized layers) whose weight is
a managed, contiguous bf16/fp16 parameter of no other nn.Linear on a device with that GEMM (CUDA, when
addmm takes out_dtype), when the C++ extension is built. A call takes stock F.linear, and the weight's
grad the hook path, under torch.compile, under autocast to another dtype, and when the weight has tensor
hooks (p.register_hook); the grad is returned to autograd when the backward does not accumulate into
p.grad (torch.autograd.grad).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .kernels import ops
from .layout import Slot
from .patch import plain_copies, set_attr

# Tests: fuse on the CPU too, where _C.weight_grad_into upcasts the operands (the fp32 reference).
_FORCE = False

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], None]
WeightGrad = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]

# The C++ autograd Function (csrc/fused_linear.cpp): without the extension nothing is fused.
_C = ops.extension

_routes: dict[int, WeightGrad] = {}  # route number -> the weight grad of one fused layer
_route_numbers = itertools.count()


def _weight_grad(route: int, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """What the C++ backward calls with dY and X (2-D): the weight grad for autograd, or None."""
    weight_grad = _routes.get(route)
    if weight_grad is None:  # a graph made before remove(): the stock grad
        return dy.t().mm(x)
    return weight_grad(dy, x)


if _C is not None:
    _C.set_weight_grad(_weight_grad)


@functools.cache
def _cuda_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """_C.weight_grad_into (addmm with out_dtype on CUDA) works here: a tiny call, checked (the store
    ignores what `out` held)."""
    try:
        out = torch.tensor([[float("nan")]], device=device)
        a = torch.tensor([[3.0]], device=device, dtype=dtype)
        _C.weight_grad_into(out, a, a, 0.0, 0.5)
        _C.weight_grad_into(out, a, a, 1.0, 2.0)
        return out.item() == 22.5
    except (RuntimeError, TypeError):
        return False


def gemm_for(device: torch.device, dtype: torch.dtype) -> Gemm | None:
    """out = beta * out + alpha * dY^T X in fp32 on this device (_C.weight_grad_into): on CUDA where addmm
    takes out_dtype; on the CPU only for tests (_FORCE), with the operands upcast."""
    if _C is None:
        return None
    if device.type == "cuda":
        return _C.weight_grad_into if _cuda_gemm_works(device, dtype) else None
    return _C.weight_grad_into if _FORCE else None


def arm(routes: list[int], outs: list[torch.Tensor], betas: list[float], alpha: float, task: int) -> None:
    """In graph task `task`, each route's next weight grad goes into its out (out = beta * out + alpha *
    dY^T X) from the C++ backward, without a call back."""
    _C.arm_weight_grads(routes, outs, betas, alpha, task)


def disarm(routes: list[int]) -> list[int]:
    """Disarm the routes; the ones whose weight grad went into its out while armed."""
    return _C.disarm_weight_grads(routes)


def install(model: torch.nn.Module, slots: list[Slot], capture, undo: contextlib.ExitStack) -> int:
    """Give each fusable nn.Linear of the model a forward through the C++ FusedLinear; how many."""
    slot_of = {id(s.param): s for s in slots}
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    # a weight shared by several layers takes the hook path: one route per weight, one writer per slot
    uses = collections.Counter(id(m.weight) for m in linears)
    fused = 0
    for module in linears:
        slot = slot_of.get(id(module.weight)) if uses[id(module.weight)] == 1 else None
        if slot is None or slot.param.dtype not in (torch.bfloat16, torch.float16) or \
                not slot.main.is_contiguous():
            continue
        if slot.sharded:  # an FSDP2 shard: its layer runs on the unsharded weight
            continue
        gemm = gemm_for(slot.param.device, slot.param.dtype)
        if gemm is not None:
            route = next(_route_numbers)
            _routes[route] = _slot_weight_grad(capture, slot, gemm)
            undo.callback(_routes.pop, route)
            if gemm is _C.weight_grad_into:  # a wrapped GEMM (tests) takes every grad through Python
                capture.add_route(slot, route, undo)
            set_attr(module, "forward", _forward(module, slot.param, route), undo)
            plain_copies(module, undo, attrs=("forward",))
            fused += 1
    return fused


def why_none_fused() -> str:
    """For the warning when attach(fuse_linear=True) fused no layer."""
    if _C is None:
        return ops.EXTENSION_ERROR
    return ("a layer is fused when it is exactly nn.Linear, its weight is trainable, contiguous and "
            "bf16/fp16, on CUDA with a torch whose addmm takes out_dtype")


def _forward(module: torch.nn.Linear, param: torch.Tensor,
             route: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if w is param and not w._backward_hooks and not torch.compiler.is_compiling():
            y = _C.fused_linear(x, w, b, route)  # None: no grad mode, autocast to another dtype, mixed dtypes
            if y is not None:
                return y
        return F.linear(x, w, b)
    return forward


def _slot_weight_grad(capture, slot: Slot, gemm: Gemm) -> WeightGrad:
    """A layer's weight grad: into the slot when this backward accumulates into the weight; the grad
    itself when it is captured (torch.autograd.grad of the weight); else nothing (no one reads it)."""
    node = torch.autograd.graph.get_gradient_edge(slot.param).node  # the weight's AccumulateGrad

    def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        try:  # private: whether the engine's current graph task runs this node
            accumulates = torch._C._will_engine_execute_node(node)
        except RuntimeError:  # torch.autograd.grad(..., inputs=[weight])
            return dy.t().mm(x)
        if not accumulates:
            return None
        capture.fused_grad(slot, lambda out, beta, alpha: gemm(out, dy, x, beta, alpha))
        return None
    return weight_grad
