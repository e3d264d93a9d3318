"""Tuning sweep behind bench/NOTES.md: layouts of the bf16 -> fp32 accumulate/store loop in CUDA,
and block sizes of the Triton kernels, each against a device-to-device copy at 2^28 elements.

    python bench/tune_kernels.py
"""
from __future__ import annotations

import functools

import torch
from torch.utils.cpp_extension import load_inline

from common import gbps, stamp, time_ms
from gacc_kernels.kernels import reference, triton_ops

CUDA = r"""
#include <torch/extension.h>
#include <cuda_bf16.h>
#include <c10/cuda/CUDAStream.h>

struct alignas(8) Bf4 { __nv_bfloat16 v[4]; };
struct alignas(16) Bf8 { __nv_bfloat16 v[8]; };

// 16-byte grad loads, two float4 per thread (the layout of csrc/gacc_cuda.cu), grid-stride.
template <bool STORE>
__global__ void k_vec16(float* out, const Bf8* g, int64_t nv, float w) {
  for (int64_t i = blockIdx.x * 256LL + threadIdx.x; i < nv; i += (int64_t)gridDim.x * 256) {
    Bf8 x = g[i];
    float4* o = reinterpret_cast<float4*>(out) + 2 * i;
    float4 a = STORE ? make_float4(0, 0, 0, 0) : o[0], b = STORE ? make_float4(0, 0, 0, 0) : o[1];
    float r[8];
    for (int k = 0; k < 8; ++k) r[k] = __fmul_rn(w, __bfloat162float(x.v[k]));
    if (STORE) { a = make_float4(r[0], r[1], r[2], r[3]); b = make_float4(r[4], r[5], r[6], r[7]); }
    else {
      a.x = __fadd_rn(a.x, r[0]); a.y = __fadd_rn(a.y, r[1]); a.z = __fadd_rn(a.z, r[2]); a.w = __fadd_rn(a.w, r[3]);
      b.x = __fadd_rn(b.x, r[4]); b.y = __fadd_rn(b.y, r[5]); b.z = __fadd_rn(b.z, r[6]); b.w = __fadd_rn(b.w, r[7]);
    }
    o[0] = a; o[1] = b;
  }
}

// 8-byte grad loads, one float4 per item, U independent items per thread and iteration.
template <bool STORE, int U, bool GRID_STRIDE>
__global__ void k_vec8(float* out, const Bf4* g, int64_t nv, float w) {
  const int64_t step = GRID_STRIDE ? (int64_t)gridDim.x * 256 * U : 0;
  for (int64_t base = blockIdx.x * 256LL * U + threadIdx.x; base < nv; base += step) {
    Bf4 x[U]; float4 a[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int64_t i = base + u * 256;
      if (i < nv) {
        uint2 raw = __ldcs(reinterpret_cast<const uint2*>(g) + i);
        x[u] = *reinterpret_cast<Bf4*>(&raw);
        if (!STORE) a[u] = __ldcs(reinterpret_cast<const float4*>(out) + i);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int64_t i = base + u * 256;
      if (i < nv) {
        float r0 = __fmul_rn(w, __bfloat162float(x[u].v[0])), r1 = __fmul_rn(w, __bfloat162float(x[u].v[1]));
        float r2 = __fmul_rn(w, __bfloat162float(x[u].v[2])), r3 = __fmul_rn(w, __bfloat162float(x[u].v[3]));
        float4 o = STORE ? make_float4(r0, r1, r2, r3)
                         : make_float4(__fadd_rn(a[u].x, r0), __fadd_rn(a[u].y, r1),
                                       __fadd_rn(a[u].z, r2), __fadd_rn(a[u].w, r3));
        __stcs(reinterpret_cast<float4*>(out) + i, o);
      }
    }
    if (!GRID_STRIDE) break;
  }
}

void run(torch::Tensor out, torch::Tensor g, double w, int64_t variant, int64_t blocks_per_sm) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, out.device().index());
  float* o = out.data_ptr<float>();
  int64_t n = g.numel();
  int64_t cap = (int64_t)sms * blocks_per_sm;
  auto b = [&](int64_t items) { return (unsigned)std::min<int64_t>((items + 255) / 256, cap); };
  auto all = [&](int64_t items) { return (unsigned)((items + 255) / 256); };
  const void* gp = g.data_ptr();
  switch (variant) {
    case 0: k_vec16<false><<<b(n / 8), 256, 0, stream>>>(o, (const Bf8*)gp, n / 8, w); break;
    case 1: k_vec16<true><<<b(n / 8), 256, 0, stream>>>(o, (const Bf8*)gp, n / 8, w); break;
    case 2: k_vec8<false, 2, true><<<b(n / 4 / 2), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 3: k_vec8<true, 2, true><<<b(n / 4 / 2), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 4: k_vec8<false, 4, true><<<b(n / 4 / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 5: k_vec8<true, 4, true><<<b(n / 4 / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 6: k_vec8<false, 4, false><<<all(n / 4 / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 7: k_vec8<true, 4, false><<<all(n / 4 / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 8: k_vec8<false, 1, false><<<all(n / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
    case 9: k_vec8<true, 1, false><<<all(n / 4), 256, 0, stream>>>(o, (const Bf4*)gp, n / 4, w); break;
  }
}
"""

NAMES = ["vec16 acc", "vec16 store", "vec8x2 acc", "vec8x2 store", "vec8x4 acc", "vec8x4 store",
         "vec8x4 one-shot acc", "vec8x4 one-shot store", "vec8x1 one-shot acc", "vec8x1 one-shot store"]


def main() -> None:
    n = 1 << 28
    buf = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda").bfloat16()
    dst = torch.empty_like(buf)
    copy = gbps(8 * n, time_ms(lambda: dst.copy_(buf)))
    print(stamp())
    print(f"copy {copy:.0f} GB/s")

    def report(label, bpe, fn):
        bw = gbps(bpe * n, time_ms(fn))
        print(f"{label:<40} {bw:7.0f} GB/s {100 * bw / copy:6.1f} %")

    report("ext accumulate", 10, lambda: torch.ops.gacc.accumulate_(buf, g, 0.5, False))
    report("ext store", 6, lambda: torch.ops.gacc.accumulate_(buf, g, 0.5, True))
    mod = load_inline("gacc_tune", cpp_sources="void run(torch::Tensor, torch::Tensor, double, int64_t, int64_t);",
                      cuda_sources=CUDA, functions=["run"], extra_cuda_cflags=["-O3"], verbose=False)
    for v, name in enumerate(NAMES):
        for bps in ([4, 8, 16] if "one-shot" not in name else [0]):
            report(f"cuda {name} bps={bps}", 6 if "store" in name else 10,
                   lambda v=v, bps=bps: mod.run(buf, g, 0.5, v, bps))
    ref = buf.clone()
    reference.accumulate_ref(ref, g, 0.5, False)
    check = buf.clone()
    mod.run(check, g, 0.5, 4, 8)
    print("vec8x4 matches the reference:", torch.equal(check, ref))

    out16 = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    one = torch.ones(1, device="cuda")
    fi = torch.zeros(1, device="cuda")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            grid = (triton_ops.triton.cdiv(n, block),)
            for store in (False, True):
                # functools.partial binds this iteration's grid, store, block and warps now
                report(f"triton accumulate store={store} B={block} w={warps}", 6 if store else 10,
                       functools.partial(triton_ops._accumulate_kernel[grid], buf, g, n, 0.5, STORE=store,
                                         BLOCK=block, num_warps=warps, enable_fp_fusion=False))
            parts = torch.zeros(min(1024, n // block), device="cuda")
            report(f"triton finalize+bf16 B={block} w={warps}", 10,
                   functools.partial(triton_ops._scale_kernel[(parts.numel(),)],
                                     buf, one, out16, fi, parts, n, HAS_OUT=True, STATS=True, BF16_BY_HAND=False,
                                     BLOCK=block, num_warps=warps))


if __name__ == "__main__":
    main()
