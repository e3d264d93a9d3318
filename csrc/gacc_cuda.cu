// CUDA implementations of the gacc ops (schemas and argument checks are in gacc.cpp).
// Every fp32 multiply and add is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn), so the
// compiler cannot fuse them into FMAs and the results match gacc_kernels/reference.py bit for bit.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "gacc.h"

namespace gacc {
namespace {

constexpr int kThreads = 256;  // threads per block; block_sum relies on it
constexpr int kBlocksPerSm = 8;  // 8 x 256 = 2048 threads, a full SM
constexpr int kMaxTensorsPerLaunch = 64;  // tensors per accumulate_many_ launch (gridDim.y)

int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Largest grid worth launching for a grid-stride loop on `device`: kBlocksPerSm blocks per SM.
// The SM count is read once per device.
int64_t max_blocks(c10::DeviceIndex device) {
  static std::atomic<int> sm_counts[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK(
      device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "gacc: unexpected CUDA device index ", device);
  int sms = sm_counts[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    sm_counts[device].store(sms, std::memory_order_relaxed);
  }
  return static_cast<int64_t>(sms) * kBlocksPerSm;
}

// N elements of T loaded or stored as one aligned vector access (16 bytes in the uses below).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
using Float4 = Pack<float, 4>;

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Exponent bits all ones: inf or NaN.
__device__ __forceinline__ bool is_nonfinite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// Elements of T per 16-byte vector: 4 for fp32, 8 for bf16 / fp16.
template <typename T>
constexpr int kGradVec = 16 / sizeof(T);

// out[i] = w * float(grad[i]) (store) or out[i] + w * float(grad[i]) for i in [0, n), shared by
// the blocks block, block + nblocks, ... of a grid-stride loop. 16-byte vectors (kGradVec<T>
// elements) when both pointers are 16-byte aligned, single elements otherwise and for the tail.
template <typename T>
__device__ void accumulate_tensor(
    float* out, const T* grad, int64_t n, float w, bool store, int64_t block, int64_t nblocks) {
  constexpr int kVec = kGradVec<T>;
  constexpr int kOutPacks = kVec / 4;  // float4s of out per vector of grad
  const int64_t stride = nblocks * kThreads;
  const int64_t start = block * kThreads + threadIdx.x;

  int64_t n_vec = 0;  // number of vectors done by the vector loop
  if (is_aligned16(out) && is_aligned16(grad)) {
    n_vec = n / kVec;
    for (int64_t i = start; i < n_vec; i += stride) {
      const Pack<T, kVec> g = reinterpret_cast<const Pack<T, kVec>*>(grad)[i];
      Float4* o = reinterpret_cast<Float4*>(out + i * kVec);
      Float4 acc[kOutPacks];
      if (!store) {
#pragma unroll
        for (int j = 0; j < kOutPacks; ++j) {
          acc[j] = o[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kOutPacks; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float t = __fmul_rn(w, static_cast<float>(g.v[j * 4 + k]));
          acc[j].v[k] = store ? t : __fadd_rn(acc[j].v[k], t);
        }
        o[j] = acc[j];
      }
    }
  }
  for (int64_t i = n_vec * kVec + start; i < n; i += stride) {
    const float t = __fmul_rn(w, static_cast<float>(grad[i]));
    if (store) {
      out[i] = t;
    } else {
      out[i] = __fadd_rn(out[i], t);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(float* out, const T* grad, int64_t n, float w, bool store) {
  accumulate_tensor(out, grad, n, w, store, blockIdx.x, gridDim.x);
}

// One accumulate_many_ launch: up to kMaxTensorsPerLaunch tensors, passed by value (about 1.6 KB,
// under the 4 KB kernel-parameter limit) so that a call needs no allocation or copy.
template <typename T>
struct ManyArgs {
  const T* grads[kMaxTensorsPerLaunch];
  int64_t offsets[kMaxTensorsPerLaunch];  // into buf, in elements
  int64_t numels[kMaxTensorsPerLaunch];
  bool store[kMaxTensorsPerLaunch];
};
static_assert(sizeof(ManyArgs<float>) + 64 <= 4096, "kernel arguments must stay under 4 KB");

// blockIdx.y picks the tensor; blockIdx.x grid-strides over it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_many_kernel(float* buf, const ManyArgs<T> args, float w) {
  const int t = blockIdx.y;
  accumulate_tensor(
      buf + args.offsets[t], args.grads[t], args.numels[t], w, args.store[t], blockIdx.x, gridDim.x);
}

// Sum of v over the block (kThreads threads, all of which must call it); the result is valid in
// thread 0. Fixed order, so deterministic.
__device__ float block_sum(float v) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  return v;
}

// Elements per vector iteration of scale_kernel: 8 when out is bf16 / fp16 (one 16-byte store of
// out, two of buf), 4 otherwise.
template <typename OutT>
constexpr int kScaleVec = (!std::is_same_v<OutT, NoOut> && sizeof(OutT) == 2) ? 8 : 4;

// v = buf[i] * s; buf[i] = v; out[i] = OutT(v) (round to nearest even; skipped for OutT = NoOut).
// kReduce (finalize_): also sets *found_inf = 1 if any v is inf or NaN, and writes this block's
// sum of v * v to norm_partials[blockIdx.x]; the grid is then exactly norm_partials.numel() blocks.
// Vector path (16-byte accesses) when buf and out are 16-byte aligned; single elements otherwise
// and for the tail.
template <typename OutT, bool kReduce>
__global__ void __launch_bounds__(kThreads) scale_kernel(
    float* buf, const float* scale, OutT* out, int64_t n, float* found_inf, float* norm_partials) {
  constexpr bool kHasOut = !std::is_same_v<OutT, NoOut>;
  constexpr int kVec = kScaleVec<OutT>;
  constexpr int kBufPacks = kVec / 4;
  const float s = *scale;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float sumsq = 0.0f;
  bool nonfinite = false;

  int64_t n_vec = 0;  // number of vectors done by the vector loop
  if (is_aligned16(buf) && (!kHasOut || is_aligned16(out))) {
    n_vec = n / kVec;
    for (int64_t i = start; i < n_vec; i += stride) {
      Float4* b = reinterpret_cast<Float4*>(buf + i * kVec);
      Float4 v[kBufPacks];
#pragma unroll
      for (int j = 0; j < kBufPacks; ++j) {
        v[j] = b[j];
      }
#pragma unroll
      for (int j = 0; j < kBufPacks; ++j) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float x = __fmul_rn(v[j].v[k], s);
          v[j].v[k] = x;
          if constexpr (kReduce) {
            nonfinite |= is_nonfinite(x);
            sumsq = fmaf(x, x, sumsq);
          }
        }
        b[j] = v[j];
      }
      if constexpr (kHasOut) {
        Pack<OutT, kVec> o;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          o.v[j] = static_cast<OutT>(v[j / 4].v[j % 4]);
        }
        reinterpret_cast<Pack<OutT, kVec>*>(out)[i] = o;
      }
    }
  }
  for (int64_t i = n_vec * kVec + start; i < n; i += stride) {
    const float x = __fmul_rn(buf[i], s);
    buf[i] = x;
    if constexpr (kHasOut) {
      out[i] = static_cast<OutT>(x);
    }
    if constexpr (kReduce) {
      nonfinite |= is_nonfinite(x);
      sumsq = fmaf(x, x, sumsq);
    }
  }

  if constexpr (kReduce) {
    if (nonfinite) {
      *found_inf = 1.0f;  // only ever set, never cleared: a plain store is enough
    }
    sumsq = block_sum(sumsq);
    if (threadIdx.x == 0) {
      norm_partials[blockIdx.x] = sumsq;
    }
  }
}

void accumulate_cuda(const at::Tensor& out, const at::Tensor& grad, double weight, bool store) {
  check_accumulate(out, grad);
  const int64_t n = out.numel();
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  dispatch_float_types(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t blocks = std::min(cdiv(n, kThreads * kGradVec<T>), max_blocks(out.device().index()));
    accumulate_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        out.mutable_data_ptr<float>(), grad.const_data_ptr<T>(), n, static_cast<float>(weight), store);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void accumulate_many_cuda(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store,
    double weight) {
  check_accumulate_many(buf, grads, offsets, store);
  if (grads.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  const int64_t cap = max_blocks(buf.device().index());
  float* base = buf.mutable_data_ptr<float>();
  const float w = static_cast<float>(weight);
  dispatch_float_types(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    ManyArgs<T> args{};
    int count = 0;  // tensors in args
    int64_t max_numel = 0;  // largest of them, sets gridDim.x
    const auto launch = [&] {
      const int64_t blocks_x = std::min(cdiv(max_numel, kThreads * kGradVec<T>), cap);
      const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(count));
      accumulate_many_kernel<T><<<grid, kThreads, 0, stream>>>(base, args, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      count = 0;
      max_numel = 0;
    };
    for (size_t i = 0; i < grads.size(); ++i) {
      const int64_t numel = grads[i].numel();
      if (numel == 0) {
        continue;
      }
      args.grads[count] = grads[i].const_data_ptr<T>();
      args.offsets[count] = offsets[i];
      args.numels[count] = numel;
      args.store[count] = store.get(i);
      max_numel = std::max(max_numel, numel);
      if (++count == kMaxTensorsPerLaunch) {
        launch();
      }
    }
    if (count > 0) {
      launch();
    }
  });
}

void finalize_cuda(
    const at::Tensor& buf,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    const std::optional<at::Tensor>& out) {
  check_finalize(buf, scale, found_inf, norm_partials, out);
  const int64_t parts = norm_partials.numel();
  TORCH_CHECK(
      parts <= INT32_MAX, "gacc::finalize_: norm_partials has ", parts,
      " elements, more than the grid allows; use at most 1024");
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  // Launched even when buf is empty, so that norm_partials is still written (zeros).
  with_out_ptr(out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    scale_kernel<OutT, true><<<static_cast<unsigned>(parts), kThreads, 0, stream>>>(
        buf.mutable_data_ptr<float>(), scale.const_data_ptr<float>(), out_ptr, buf.numel(),
        found_inf.mutable_data_ptr<float>(), norm_partials.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_cuda(const at::Tensor& buf, const at::Tensor& scale, const std::optional<at::Tensor>& out) {
  check_scale(buf, scale, out);
  const int64_t n = buf.numel();
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  with_out_ptr(out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    const int64_t blocks =
        std::min(cdiv(n, kThreads * kScaleVec<OutT>), max_blocks(buf.device().index()));
    scale_kernel<OutT, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        buf.mutable_data_ptr<float>(), scale.const_data_ptr<float>(), out_ptr, n, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace gacc

TORCH_LIBRARY_IMPL(gacc, CUDA, m) {
  m.impl("accumulate_", &gacc::accumulate_cuda);
  m.impl("accumulate_many_", &gacc::accumulate_many_cuda);
  m.impl("finalize_", &gacc::finalize_cuda);
  m.impl("scale_", &gacc::scale_cuda);
}
