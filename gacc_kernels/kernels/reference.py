"""Pure-PyTorch reference ops: the spec that the Triton kernels and the C++/CUDA extension follow.

Every op works in fp32 with one rounding per arithmetic step, in this order (no fused multiply-add):
    accumulate:  t = fp32(w) * fp32(g);  out = t if store else out + t
    finalize:    v = buf * s;  buf = v;  out = cast(v);  found_inf = 1 if any(!isfinite(v));
                 sum(norm_partials) = sum(v * v)
    scale:       v = buf * s;  buf = v;  out = cast(v)
    accumulate_finalize (the last micro-step): accumulate, then finalize what it wrote, with one
                 norm partial per CHUNK elements of each grad; the cast goes back over the grad
    stat_partials (optional, accumulate_many and accumulate_finalize; offsets are multiples of CHUNK):
                 chunk c of grads[i] makes stat_partials[offsets[i] // CHUNK + c] =
                 (store ? 0 : itself) + sum(t * fp32(g)) over the chunk, i.e. sum(w * g^2), the
                 micro-step's weighted squared norm (stats.py). A statistic, not a result: the sum is
                 taken in fp32 or better, in any order. None: nothing else changes, bit for bit.
Buffers are fp32 and contiguous; grads are fp32, bf16 or fp16 and contiguous; `s` is a
1-element fp32 tensor on the buffer's device, so no host sync is needed to read it.
"""
from __future__ import annotations

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = GRAD_DTYPES
# accumulate_finalize_ writes one norm partial per CHUNK elements. The one definition: setup.py reads
# this line and compiles the C++/CUDA code with -DGACC_CHUNK=CHUNK (a power of two, as tl.arange needs).
CHUNK = 1024


def norm_partials_size(numel: int) -> int:
    """How many partial sums finalize should write for `numel` elements: one per CHUNK-element
    block, so the pass runs with a one-shot grid. Any size >= 1 is correct."""
    return max(1, -(-numel // CHUNK))


def accumulate_ref(out: torch.Tensor, grad: torch.Tensor, weight: float, store: bool) -> None:
    """out = w * float(grad) (store) or out += w * float(grad); out is fp32 with grad's numel."""
    t = grad.reshape(-1).float() * torch.tensor(weight, dtype=torch.float32)
    if store:
        out.view(-1).copy_(t)
    else:
        out.view(-1).add_(t)


def accumulate_many_ref(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float,
    stat_partials: torch.Tensor | None = None,
) -> None:
    """accumulate_ref of each grads[i] into buf[offsets[i] : offsets[i] + grads[i].numel()]."""
    for g, off, st in zip(grads, offsets, store):
        accumulate_ref(buf[off : off + g.numel()], g, weight, st)
        if stat_partials is not None:
            _stat_ref(stat_partials, g, off, weight, st)


def _stat_ref(stat_partials: torch.Tensor, g: torch.Tensor, off: int, weight: float, store: bool) -> None:
    """One grad's chunks of stat_partials: (store ? 0 : itself) + sum(t * fp32(g)) per chunk."""
    if off % CHUNK:
        raise ValueError(f"stat_partials: offset {off} is not a multiple of {CHUNK}")
    n = g.numel()
    chunks = -(-n // CHUNK)
    flat = g.reshape(-1).float()
    products = torch.zeros(chunks * CHUNK, dtype=torch.float64, device=g.device)
    products[:n] = flat * torch.tensor(weight, dtype=torch.float32) * flat
    sums = products.view(chunks, CHUNK).sum(1).float()
    target = stat_partials[off // CHUNK: off // CHUNK + chunks]
    target.copy_(sums if store else target + sums)


def finalize_ref(
    buf: torch.Tensor,
    scale: torch.Tensor,
    found_inf: torch.Tensor,
    norm_partials: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    """buf *= scale in place; flag non-finite values in found_inf; squared norm into norm_partials."""
    buf.mul_(scale.float().reshape(()))
    if not torch.isfinite(buf).all():
        found_inf.fill_(1.0)
    norm_partials.zero_()
    norm_partials[0] = buf.square().sum()
    if out is not None:
        out.view(-1).copy_(buf.view(-1))


def accumulate_finalize_ref(
    buf: torch.Tensor, grads: list[torch.Tensor], offsets: list[int], store: list[bool], weight: float,
    scale: torch.Tensor, found_inf: torch.Tensor, norm_partials: torch.Tensor, write_grads: bool = False,
    stat_partials: torch.Tensor | None = None,
) -> None:
    """accumulate_many_ and finalize_ in one pass over each grads[i]'s range of buf (the last micro-step).

    offsets are multiples of CHUNK; chunk c of grads[i] writes its sum of squares to
    norm_partials[offsets[i] // CHUNK + c]; with write_grads, grads[i] is overwritten with the cast
    of its finished range (so it can serve as p.grad without a new allocation)."""
    for g, off, st in zip(grads, offsets, store):
        if off % CHUNK:
            raise ValueError(f"accumulate_finalize_: offset {off} is not a multiple of {CHUNK}")
        n = g.numel()
        region = buf[off: off + n]
        if stat_partials is not None:
            _stat_ref(stat_partials, g, off, weight, st)
        accumulate_ref(region, g, weight, st)
        region.mul_(scale.float().reshape(()))
        if not torch.isfinite(region).all():
            found_inf.fill_(1.0)
        chunks = -(-n // CHUNK)
        squares = torch.zeros(chunks * CHUNK, dtype=torch.float32, device=buf.device)
        squares[:n] = region.square()
        norm_partials[off // CHUNK: off // CHUNK + chunks] = squares.view(chunks, CHUNK).sum(1)
        if write_grads:
            g.view(-1).copy_(region)


def scale_ref(buf: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> None:
    """buf *= scale in place (clipping by a device-side coefficient); optionally cast into out."""
    buf.mul_(scale.float().reshape(()))
    if out is not None:
        out.view(-1).copy_(buf.view(-1))
