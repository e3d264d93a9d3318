"""The one place that chooses an implementation for each op: the C++/CUDA extension, then Triton,
then the pure-PyTorch reference, by device and availability. `python -m gacc_kernels` prints it."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import reference

OPS = ("accumulate_", "accumulate_many_", "finalize_", "scale_", "accumulate_finalize_")

REBUILD = "rebuild it (pip install --no-build-isolation -e .)"
try:
    from .. import _C  # registers torch.ops.gacc.*

    if getattr(_C, "CHUNK", None) != reference.CHUNK:  # a stale build, from before CHUNK changed
        EXTENSION_ERROR = (f"C++ extension not used: built with CHUNK={getattr(_C, 'CHUNK', None)}, but "
                           f"reference.CHUNK is {reference.CHUNK}; {REBUILD}")
    elif not hasattr(_C, "arm_weight_grads"):  # a stale build, from before the armed fused weight grads
        EXTENSION_ERROR = f"C++ extension not used: built without the armed fused weight grads; {REBUILD}"
    else:
        EXTENSION_ERROR = None
except ImportError as e:  # not built, or built against another torch
    EXTENSION_ERROR = f"C++ extension not loaded: {e}"
# The loaded extension module (the C++ autograd Function of fused_linear), or None.
extension = _C if EXTENSION_ERROR is None else None

try:
    from . import triton_ops

    TRITON_ERROR = None
except ImportError as e:
    triton_ops = None
    TRITON_ERROR = f"Triton not available: {e}"


if EXTENSION_ERROR is None:
    # The ops mutate their arguments and return nothing, so the fake (meta) impls have nothing to do.
    for _name in OPS:
        torch.library.register_fake(f"gacc::{_name}")(lambda *args, **kwargs: None)


def _extension_has(op: str, key: str) -> bool:
    # private: whether the dispatcher holds a kernel of this op for this key
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"gacc::{op}", key)


class Choice(NamedTuple):
    backend: str  # "extension", "triton" or "reference"
    impl: Callable[..., None]
    reason: str


@functools.cache
def choose(op: str, device_type: str) -> Choice:
    """The implementation of `op` for tensors on `device_type`, and why it was chosen."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops are {OPS}")
    ref = getattr(reference, op.rstrip("_") + "_ref")
    if device_type == "cuda":
        if _extension_has(op, "CUDA"):
            return Choice("extension", getattr(torch.ops.gacc, op).default, "compiled CUDA kernels")
        why = EXTENSION_ERROR or ("CUDA extension not built: the extension was compiled without CUDA "
                                  "(torch had no CUDA, nvcc was not found, or GACC_CUDA=0)")
        if triton_ops is not None:
            return Choice("triton", getattr(triton_ops, op), why)
        return Choice("reference", ref, f"{why}; {TRITON_ERROR}")
    if device_type == "cpu":
        if _extension_has(op, "CPU"):
            return Choice("extension", getattr(torch.ops.gacc, op).default, "compiled C++ CPU kernels")
        return Choice("reference", ref, EXTENSION_ERROR or "extension has no CPU kernel")
    return Choice("reference", ref, f"no kernels for device type {device_type!r}")


def accumulate_(out: torch.Tensor, grad: torch.Tensor, weight: float = 1.0, store: bool = False) -> None:
    """out (fp32, flat slice) = (store ? 0 : out) + weight * float(grad)."""
    choose("accumulate_", out.device.type).impl(out, grad, weight, store)


def accumulate_many_(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float = 1.0,
    stat_partials: torch.Tensor | None = None,
) -> None:
    """accumulate_ of each grads[i] into buf[offsets[i]:], in one launch; all grads of one dtype.
    stat_partials: also each chunk's sum(w * g^2) (reference.py's docstring)."""
    choose("accumulate_many_", buf.device.type).impl(buf, grads, offsets, store, weight, stat_partials)


def finalize_(
    buf: torch.Tensor,
    scale: torch.Tensor,
    found_inf: torch.Tensor,
    norm_partials: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    """buf *= scale; found_inf = 1 on any inf/NaN; sum(norm_partials) = ||buf||^2; out = cast(buf)."""
    choose("finalize_", buf.device.type).impl(buf, scale, found_inf, norm_partials, out)


def scale_(buf: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """buf *= scale (a 1-element device tensor); out = cast(buf)."""
    choose("scale_", buf.device.type).impl(buf, scale, out)


def accumulate_finalize_(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float,
    scale: torch.Tensor, found_inf: torch.Tensor, norm_partials: torch.Tensor, write_grads: bool = False,
    stat_partials: torch.Tensor | None = None,
) -> None:
    """accumulate_many_ then finalize_ of what it wrote, in one pass (the last micro-step); offsets are
    multiples of reference.CHUNK, with one norm partial per CHUNK elements; write_grads casts the
    result back over each grad; stat_partials as in accumulate_many_."""
    choose("accumulate_finalize_", buf.device.type).impl(
        buf, grads, offsets, store, weight, scale, found_inf, norm_partials, write_grads, stat_partials)


def report() -> str:
    """One line per op and device type: the backend it uses and why."""
    lines = [(f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"GPU available: {torch.cuda.is_available()}")]
    for device_type in ("cpu", "cuda"):
        for op in OPS:
            c = choose(op, device_type)
            lines.append(f"{op:<21} on {device_type:<4}: {c.backend:<9} ({c.reason})")
    fused = ("C++ autograd Function (CUDA, where addmm takes out_dtype)" if extension
             else f"off ({EXTENSION_ERROR})")
    lines.append(f"{'fuse_linear=True':<29}: {fused}")
    return "\n".join(lines)
