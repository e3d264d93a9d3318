"""Triton kernels for the ops in reference.py (same math, same rounding; see its docstring).

Kernels upcast before any arithmetic (the interpreter computes bf16 arithmetic wrongly), use int64
offsets, and are launched with enable_fp_fusion=False so `out + w * g` is never contracted to an FMA.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import CHUNK, GRAD_DTYPES, OUT_DTYPES

BLOCK = 1024  # with 8 warps: 98-101% of a copy on an H100 (bench/NOTES.md)
assert BLOCK == CHUNK, "_accumulate_many_kernel's stat partials are one per tile"
NUM_WARPS = 8
# The interpreter's fp32 -> bf16 cast truncates; compiled Triton rounds to nearest even.
_ROUND_BF16_BY_HAND = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=["n", "weight"])
def _accumulate_kernel(out_ptr, grad_ptr, n, weight, STORE: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = (STORE ? 0 : out[i]) + fp32(weight) * fp32(grad[i]) for i < n.  out: [n] fp32, grad: [n]."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(grad_ptr + offs, mask=mask).to(tl.float32) * weight
    if not STORE:
        t = tl.load(out_ptr + offs, mask=mask) + t
    tl.store(out_ptr + offs, t, mask=mask)


@triton.jit(do_not_specialize=["weight"])
def _accumulate_many_kernel(buf_ptr, table_ptr, weight, stat_ptr, GRAD_DTYPE: tl.constexpr, STATS: tl.constexpr,
                            BLOCK: tl.constexpr):
    """For tensor t = program_id(1), with table[t] = (grad address, buffer offset, numel, store):
    buf[offset + i] = (store ? 0 : buf[offset + i]) + fp32(weight) * fp32(grad[i]), grid-strided on axis 0.
    STATS (BLOCK == CHUNK): stat[offset / BLOCK + tile] = (store ? 0 : itself) + sum(t * g) per tile."""
    row = table_ptr + tl.program_id(1).to(tl.int64) * 4
    grad_ptr = tl.load(row).to(tl.pointer_type(GRAD_DTYPE))
    offset = tl.load(row + 1)
    out_ptr = buf_ptr + offset
    n = tl.load(row + 2)
    keep = tl.load(row + 3) == 0  # accumulate (1 = store)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        t = g * weight
        # -0.0 is the identity of addition, so a store writes t bit for bit (and reads nothing).
        prev = tl.load(out_ptr + offs, mask=mask & keep, other=-0.0)
        tl.store(out_ptr + offs, prev + t, mask=mask)
        if STATS:
            at = stat_ptr + offset // BLOCK + start // BLOCK
            tl.store(at, tl.load(at, mask=keep, other=0.0) + tl.sum(tl.where(mask, t * g, 0.0), axis=0))


@triton.jit
def _accumulate_finalize_kernel(
    buf_ptr, table_ptr, weight, scale_ptr, found_inf_ptr, partials_ptr, stat_ptr,
    GRAD_DTYPE: tl.constexpr, WRITE_GRADS: tl.constexpr, STATS: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """The last micro-step: chunk c = program_id(0) of tensor t = program_id(1) (table as above):
    v = ((store ? 0 : buf) + fp32(weight) * fp32(grad)) * scale; buf = v; grad = cast(v) (WRITE_GRADS);
    found_inf = 1 if any v is not finite; partials[offset / CHUNK + c] = sum(v * v); STATS: as in
    _accumulate_many_kernel."""
    row = table_ptr + tl.program_id(1).to(tl.int64) * 4
    grad_ptr = tl.load(row).to(tl.pointer_type(GRAD_DTYPE))
    offset = tl.load(row + 1)
    n = tl.load(row + 2)
    keep = tl.load(row + 3) == 0
    chunk = tl.program_id(0).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    t = g * weight
    prev = tl.load(buf_ptr + offset + offs, mask=mask & keep, other=-0.0)
    v = (prev + t) * tl.load(scale_ptr)
    tl.store(buf_ptr + offset + offs, v, mask=mask)
    if WRITE_GRADS:
        tl.store(grad_ptr + offs, _cast(v, GRAD_DTYPE, BF16_BY_HAND), mask=mask)
    tl.store(partials_ptr + offset // CHUNK + chunk, tl.sum(tl.where(mask, v * v, 0.0), axis=0),
             mask=chunk * CHUNK < n)
    if STATS:
        at = stat_ptr + offset // CHUNK + chunk
        tl.store(at, tl.load(at, mask=keep, other=0.0) + tl.sum(tl.where(mask, t * g, 0.0), axis=0),
                 mask=chunk * CHUNK < n)
    bad = mask & ~(tl.abs(v) < float("inf"))
    tl.store(found_inf_ptr, 1.0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)


@triton.jit
def _cast(v, DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (by hand for bf16 in the interpreter)."""
    if BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit(do_not_specialize=["n"])
def _scale_kernel(
    buf_ptr, scale_ptr, out_ptr, found_inf_ptr, partials_ptr, n,
    HAS_OUT: tl.constexpr, STATS: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):
    """v = buf * scale; buf = v; out = cast(v) (HAS_OUT); with STATS: found_inf = 1 if any v is not
    finite, partials[pid] = sum(v * v) over this program's grid-strided tiles."""
    pid = tl.program_id(0)
    s = tl.load(scale_ptr)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    for start in range(pid.to(tl.int64) * BLOCK, n, tl.num_programs(0).to(tl.int64) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(buf_ptr + offs, mask=mask) * s
        tl.store(buf_ptr + offs, v, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offs, _cast(v, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=mask)
        if STATS:
            sq += tl.where(mask, v * v, 0.0)
            bad = bad | (mask & ~(tl.abs(v) < float("inf")))
    if STATS:
        tl.store(partials_ptr + pid, tl.sum(sq, axis=0))
        tl.store(found_inf_ptr, 1.0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)


def _check_flat(name: str, t: torch.Tensor, dtypes, what: str) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: {what} must be one of {dtypes}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: {what} must be contiguous; call .contiguous() first")


def _check_scalar(name: str, scale: torch.Tensor, buf: torch.Tensor) -> None:
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != buf.device:
        raise ValueError(f"{name}: scale must be a 1-element float32 tensor on {buf.device}")


def accumulate_(out: torch.Tensor, grad: torch.Tensor, weight: float, store: bool) -> None:
    _check_flat("accumulate_", out, (torch.float32,), "out")
    _check_flat("accumulate_", grad, GRAD_DTYPES, "grad")
    if out.numel() != grad.numel() or out.device != grad.device:
        raise ValueError(f"accumulate_: out ({out.numel()} on {out.device}) and grad "
                         f"({grad.numel()} on {grad.device}) must match in numel and device")
    n = grad.numel()
    if n:
        _accumulate_kernel[(triton.cdiv(n, BLOCK),)](
            out, grad, n, float(weight), STORE=bool(store), BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False)


def _grad_table(name: str, buf: torch.Tensor, grads, offsets, store) -> tuple[torch.Tensor, int]:
    """The (address, offset, numel, store) rows the multi-tensor kernels read, and the largest numel."""
    _check_flat(name, buf, (torch.float32,), "buf")
    if not (len(grads) == len(offsets) == len(store)):
        raise ValueError(f"{name}: grads, offsets and store must have the same length")
    rows = []
    for g, off, st in zip(grads, offsets, store):
        _check_flat(name, g, GRAD_DTYPES, "every grad")
        if g.dtype != grads[0].dtype or g.device != buf.device:
            raise ValueError(f"{name}: all grads need one dtype and buf's device; split the call by dtype")
        if off < 0 or off + g.numel() > buf.numel():
            raise IndexError(f"{name}: range [{off}, {off + g.numel()}) is outside buf of "
                             f"{buf.numel()} elements")
        rows.append((g.data_ptr(), off, g.numel(), int(bool(st))))
    return torch.tensor(rows, dtype=torch.int64, device=buf.device), max(r[2] for r in rows)


def _check_partials(name: str, stat_partials: torch.Tensor | None, buf: torch.Tensor, grads,
                         offsets, what: str = "stat_partials") -> None:
    """Offsets on CHUNK boundaries and one fp32 partial per CHUNK elements (norm or stat partials)."""
    if stat_partials is None:
        return
    _check_flat(name, stat_partials, (torch.float32,), what)
    if stat_partials.device != buf.device:
        raise ValueError(f"{name}: {what} must be on {buf.device}")
    for g, off in zip(grads, offsets):
        if off % CHUNK or off // CHUNK + triton.cdiv(g.numel(), CHUNK) > stat_partials.numel():
            raise ValueError(f"{name}: offsets must be multiples of {CHUNK} and {what} "
                             f"needs one element per {CHUNK} elements of buf")


def accumulate_many_(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float,
    stat_partials: torch.Tensor | None = None,
) -> None:
    if not grads:
        return
    table, most = _grad_table("accumulate_many_", buf, grads, offsets, store)
    _check_partials("accumulate_many_", stat_partials, buf, grads, offsets)
    if most:
        _accumulate_many_kernel[(triton.cdiv(most, BLOCK), len(grads))](
            buf, table, float(weight), stat_partials, GRAD_DTYPE=_TL_DTYPE[grads[0].dtype],
            STATS=stat_partials is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


def accumulate_finalize_(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float,
    scale: torch.Tensor, found_inf: torch.Tensor, norm_partials: torch.Tensor, write_grads: bool = False,
    stat_partials: torch.Tensor | None = None,
) -> None:
    if not grads:
        return
    table, most = _grad_table("accumulate_finalize_", buf, grads, offsets, store)
    _check_scalar("accumulate_finalize_", scale, buf)
    _check_partials("accumulate_finalize_", norm_partials, buf, grads, offsets, "norm_partials")
    _check_partials("accumulate_finalize_", stat_partials, buf, grads, offsets)
    if most:
        _accumulate_finalize_kernel[(triton.cdiv(most, CHUNK), len(grads))](
            buf, table, float(weight), scale, found_inf, norm_partials, stat_partials,
            GRAD_DTYPE=_TL_DTYPE[grads[0].dtype], WRITE_GRADS=bool(write_grads),
            STATS=stat_partials is not None, BF16_BY_HAND=_ROUND_BF16_BY_HAND, CHUNK=CHUNK,
            num_warps=NUM_WARPS, enable_fp_fusion=False)


def _launch_scale(buf, scale, out, found_inf, norm_partials) -> None:
    _check_flat("finalize_/scale_", buf, (torch.float32,), "buf")
    _check_scalar("finalize_/scale_", scale, buf)
    if out is not None:
        _check_flat("finalize_/scale_", out, OUT_DTYPES, "out")
        if out.numel() != buf.numel() or out.device != buf.device:
            raise ValueError("finalize_/scale_: out must have buf's numel and device")
    stats = norm_partials is not None
    n = buf.numel()
    grid = (norm_partials.numel(),) if stats else (max(1, triton.cdiv(n, BLOCK)),)
    _scale_kernel[grid](buf, scale, out, found_inf, norm_partials, n, HAS_OUT=out is not None,
                        STATS=stats, BF16_BY_HAND=_ROUND_BF16_BY_HAND, BLOCK=BLOCK, num_warps=NUM_WARPS)


def finalize_(
    buf: torch.Tensor,
    scale: torch.Tensor,
    found_inf: torch.Tensor,
    norm_partials: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    _launch_scale(buf, scale, out, found_inf, norm_partials)


def scale_(buf: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> None:
    _launch_scale(buf, scale, out, None, None)
