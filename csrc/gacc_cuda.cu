// CUDA implementations of the gacc ops (schemas and argument checks are in gacc.cpp).
// Every fp32 multiply and add is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn), so the
// compiler cannot fuse them into FMAs and the results match gacc_kernels/kernels/reference.py bit for bit.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gacc.h"

namespace gacc {
namespace {

// Every kernel is one pass with a one-shot grid: a block owns kChunk consecutive elements and each
// thread kItem of them, one float4 of the fp32 buffer. Measured on an H100 (bench/NOTES.md), this
// layout reaches 97-99% of a device-to-device copy, where grid-stride loops stopped at 92-94%.
constexpr int kThreads = 256;  // threads per block; block_sum relies on it
constexpr int kItem = 4;  // elements per thread
constexpr int kChunk = kThreads * kItem;  // elements per block
// kFinalizeChunk is CHUNK in gacc_kernels/kernels/reference.py: changing it there means changing kThreads or kItem here.
static_assert(kChunk == kFinalizeChunk, "kThreads * kItem must equal GACC_CHUNK: one norm partial per block");
constexpr int kMaxTensorsPerLaunch = 64;  // tensors per accumulate_many_ launch

int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// N elements of T loaded or stored as one aligned vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
using Float4 = Pack<float, 4>;

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p, size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Streaming (evict-first) vector loads and stores: every byte is touched once per pass.
template <typename T>
__device__ __forceinline__ Pack<T, kItem> load_stream(const T* p) {
  static_assert(sizeof(Pack<T, kItem>) == 8 || sizeof(Pack<T, kItem>) == 16);
  Pack<T, kItem> r;
  if constexpr (sizeof(Pack<T, kItem>) == 8) {
    *reinterpret_cast<uint2*>(&r) = __ldcs(reinterpret_cast<const uint2*>(p));
  } else {
    *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void store_stream(T* p, const Pack<T, kItem>& v) {
  if constexpr (sizeof(Pack<T, kItem>) == 8) {
    __stcs(reinterpret_cast<uint2*>(p), *reinterpret_cast<const uint2*>(&v));
  } else {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&v));
  }
}

// Stores the kItem floats of v at p as OutT, rounded to nearest even.
template <typename OutT>
__device__ __forceinline__ void store_cast(OutT* p, const Float4& v) {
  Pack<OutT, kItem> o;
#pragma unroll
  for (int k = 0; k < kItem; ++k) {
    o.v[k] = static_cast<OutT>(v.v[k]);
  }
  store_stream(p, o);
}

// Exponent bits all ones: inf or NaN.
__device__ __forceinline__ bool is_nonfinite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ float accumulate_one(float prev, float g, float w, bool store) {
  const float t = __fmul_rn(w, g);
  return store ? t : __fadd_rn(prev, t);
}

// This thread's kItem elements of chunk `chunk`: out[i] = w * float(grad[i]) (store) or
// out[i] + w * float(grad[i]). One vector access each when aligned, single elements otherwise.
// kStats: returns this thread's sum of t * g, t = w * float(g) being what it adds (else 0).
template <typename T, bool kStats>
__device__ __forceinline__ float accumulate_item(
    float* out, const T* grad, int64_t n, float w, bool store, int64_t chunk) {
  float stat = 0.0f;
  const int64_t i = chunk * kChunk + threadIdx.x * kItem;
  if (i + kItem <= n && is_aligned(out, 16) && is_aligned(grad, sizeof(Pack<T, kItem>))) {
    const Pack<T, kItem> g = load_stream(grad + i);
    Float4 o;
    if (!store) {
      o = load_stream(out + i);
    }
#pragma unroll
    for (int k = 0; k < kItem; ++k) {
      const float x = static_cast<float>(g.v[k]);
      o.v[k] = accumulate_one(o.v[k], x, w, store);
      if constexpr (kStats) {
        stat = fmaf(__fmul_rn(w, x), x, stat);
      }
    }
    store_stream(out + i, o);
  } else {
    for (int64_t j = i; j < n && j < i + kItem; ++j) {
      const float x = static_cast<float>(grad[j]);
      out[j] = accumulate_one(store ? 0.0f : out[j], x, w, store);
      if constexpr (kStats) {
        stat = fmaf(__fmul_rn(w, x), x, stat);
      }
    }
  }
  return stat;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(float* out, const T* grad, int64_t n, float w, bool store) {
  accumulate_item<T, false>(out, grad, n, w, store, blockIdx.x);
}

// One accumulate_many_ launch: up to kMaxTensorsPerLaunch tensors, passed by value (about 2 KB,
// under the 4 KB kernel-parameter limit) so that a call needs no allocation or copy. Tensor t
// owns the blocks [block_end[t - 1], block_end[t]).
template <typename T>
struct ManyArgs {
  const T* grads[kMaxTensorsPerLaunch];
  int64_t offsets[kMaxTensorsPerLaunch];  // into buf, in elements
  int64_t numels[kMaxTensorsPerLaunch];
  int64_t block_end[kMaxTensorsPerLaunch];
  bool store[kMaxTensorsPerLaunch];
};
static_assert(sizeof(ManyArgs<float>) + 64 <= 4096, "kernel arguments must stay under 4 KB");

// The tensor of this block, and the block's chunk within it.
template <typename T>
__device__ __forceinline__ int tensor_of_block(const ManyArgs<T>& args, int64_t* chunk) {
  const int64_t block = blockIdx.x;
  int t = 0;
  while (block >= args.block_end[t]) {
    ++t;
  }
  *chunk = block - (t == 0 ? 0 : args.block_end[t - 1]);
  return t;
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

// stat_partials[index] = (store ? 0 : itself) + stat summed over the block (written by thread 0).
__device__ __forceinline__ void write_stat(float* stat_partials, int64_t index, float stat, bool store) {
  stat = block_sum(stat);
  if (threadIdx.x == 0) {
    stat_partials[index] = store ? stat : __fadd_rn(stat_partials[index], stat);
  }
}

// kStats: block = chunk c of tensor t also writes its sum of w * g^2 to stat_partials[offset / kChunk + c].
template <typename T, bool kStats>
__global__ void __launch_bounds__(kThreads) accumulate_many_kernel(
    float* buf, const __grid_constant__ ManyArgs<T> args, float w, float* stat_partials) {
  int64_t chunk;
  const int t = tensor_of_block(args, &chunk);
  const float stat =
      accumulate_item<T, kStats>(buf + args.offsets[t], args.grads[t], args.numels[t], w, args.store[t], chunk);
  if constexpr (kStats) {
    write_stat(stat_partials, args.offsets[t] / kChunk + chunk, stat, args.store[t]);
  }
}

// v = buf[i] * s; buf[i] = v; out[i] = OutT(v) (round to nearest even; skipped for OutT = NoOut).
// kReduce (finalize_): also sets *found_inf = 1 if any v is inf or NaN, and writes this block's
// sum of v * v to norm_partials[blockIdx.x]. Block b does chunks b, b + gridDim.x, ...; with
// gridDim.x = cdiv(n, kChunk) (what norm_partials_size asks for) that is one chunk.
template <typename OutT, bool kReduce>
__global__ void __launch_bounds__(kThreads) scale_kernel(
    float* buf, const float* scale, OutT* out, int64_t n, float* found_inf, float* norm_partials) {
  constexpr bool kHasOut = !std::is_same_v<OutT, NoOut>;
  const float s = *scale;
  float sumsq = 0.0f;
  bool nonfinite = false;
  const auto visit = [&](float x) {
    if constexpr (kReduce) {
      nonfinite |= is_nonfinite(x);
      sumsq = fmaf(x, x, sumsq);
    }
  };
  const bool vectors = is_aligned(buf, 16);
  bool out_vectors = true;
  if constexpr (kHasOut) {
    out_vectors = is_aligned(out, sizeof(Pack<OutT, kItem>));
  }
  for (int64_t chunk = blockIdx.x; chunk * kChunk < n; chunk += gridDim.x) {
    const int64_t i = chunk * kChunk + threadIdx.x * kItem;
    if (i + kItem <= n && vectors && out_vectors) {
      Float4 v = load_stream(buf + i);
#pragma unroll
      for (int k = 0; k < kItem; ++k) {
        v.v[k] = __fmul_rn(v.v[k], s);
        visit(v.v[k]);
      }
      store_stream(buf + i, v);
      if constexpr (kHasOut) {
        store_cast(out + i, v);
      }
    } else {
      for (int64_t j = i; j < n && j < i + kItem; ++j) {
        const float x = __fmul_rn(buf[j], s);
        buf[j] = x;
        if constexpr (kHasOut) {
          out[j] = static_cast<OutT>(x);
        }
        visit(x);
      }
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

// accumulate_many_ and finalize_ in one pass, for the last micro-step: with acc the accumulated
// value, v = acc * s is written to buf and, with kWriteGrads, cast back over the grad it came from
// (which then serves as p.grad); found_inf as in finalize_; block = chunk c of tensor t writes its
// sum of v * v to norm_partials[offset / kChunk + c].
struct FinalArgs {
  const float* scale;
  float* found_inf;
  float* norm_partials;
  float* stat_partials;  // written with kStats, as in accumulate_many_kernel
};

template <typename T, bool kWriteGrads, bool kStats>
__global__ void __launch_bounds__(kThreads) accumulate_finalize_kernel(
    float* buf, const __grid_constant__ ManyArgs<T> args, float w, const FinalArgs fin) {
  int64_t chunk;
  const int t = tensor_of_block(args, &chunk);
  const int64_t n = args.numels[t];
  const bool store = args.store[t];
  T* grad = const_cast<T*>(args.grads[t]);  // the op's schema marks grads mutable
  float* dst = buf + args.offsets[t];
  const bool vectors = is_aligned(dst, 16) && is_aligned(grad, sizeof(Pack<T, kItem>));
  const float s = *fin.scale;
  float sumsq = 0.0f;
  float stat = 0.0f;
  bool nonfinite = false;
  const int64_t i = chunk * kChunk + threadIdx.x * kItem;
  if (i + kItem <= n && vectors) {
    const Pack<T, kItem> g = load_stream(grad + i);
    Float4 v;
    if (!store) {
      v = load_stream(dst + i);
    }
#pragma unroll
    for (int k = 0; k < kItem; ++k) {
      const float x = static_cast<float>(g.v[k]);
      v.v[k] = __fmul_rn(accumulate_one(v.v[k], x, w, store), s);
      if constexpr (kStats) {
        stat = fmaf(__fmul_rn(w, x), x, stat);
      }
      nonfinite |= is_nonfinite(v.v[k]);
      sumsq = fmaf(v.v[k], v.v[k], sumsq);
    }
    store_stream(dst + i, v);
    if constexpr (kWriteGrads) {
      store_cast(grad + i, v);
    }
  } else {
    for (int64_t j = i; j < n && j < i + kItem; ++j) {
      const float x = static_cast<float>(grad[j]);
      const float v = __fmul_rn(accumulate_one(store ? 0.0f : dst[j], x, w, store), s);
      if constexpr (kStats) {
        stat = fmaf(__fmul_rn(w, x), x, stat);
      }
      dst[j] = v;
      if constexpr (kWriteGrads) {
        grad[j] = static_cast<T>(v);
      }
      nonfinite |= is_nonfinite(v);
      sumsq = fmaf(v, v, sumsq);
    }
  }
  if (nonfinite) {
    *fin.found_inf = 1.0f;
  }
  sumsq = block_sum(sumsq);
  if (threadIdx.x == 0) {
    fin.norm_partials[args.offsets[t] / kChunk + chunk] = sumsq;
  }
  if constexpr (kStats) {
    __syncthreads();  // block_sum's shared memory is read by warp 0 above before it is written again
    write_stat(fin.stat_partials, args.offsets[t] / kChunk + chunk, stat, store);
  }
}

unsigned grid_for(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= INT32_MAX, op, ": ", blocks, " blocks are more than one launch allows");
  return static_cast<unsigned>(blocks);
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
    accumulate_kernel<T><<<grid_for(cdiv(n, kChunk), "gacc::accumulate_"), kThreads, 0, stream>>>(
        out.mutable_data_ptr<float>(), grad.const_data_ptr<T>(), n, static_cast<float>(weight), store);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Calls launch(args, blocks) once per group of up to kMaxTensorsPerLaunch non-empty grads.
template <typename T, typename Launch>
void for_each_launch(
    at::TensorList grads, at::IntArrayRef offsets, const c10::List<bool>& store, const Launch& launch) {
  ManyArgs<T> args{};
  int count = 0;  // tensors in args
  int64_t blocks = 0;  // blocks they need
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t numel = grads[i].numel();
    if (numel == 0) {
      continue;
    }
    args.grads[count] = grads[i].const_data_ptr<T>();
    args.offsets[count] = offsets[i];
    args.numels[count] = numel;
    args.store[count] = store.get(i);
    blocks += cdiv(numel, kChunk);
    args.block_end[count] = blocks;
    if (++count == kMaxTensorsPerLaunch) {
      launch(args, blocks);
      count = 0;
      blocks = 0;
    }
  }
  if (count > 0) {
    launch(args, blocks);
  }
}

void accumulate_many_cuda(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store,
    double weight,
    const std::optional<at::Tensor>& stat_partials) {
  check_accumulate_many(buf, grads, offsets, store);
  check_stat_partials("gacc::accumulate_many_", stat_partials, buf, grads, offsets);
  if (grads.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  float* base = buf.mutable_data_ptr<float>();
  const float w = static_cast<float>(weight);
  float* stats = stat_partials.has_value() ? stat_partials->mutable_data_ptr<float>() : nullptr;
  dispatch_float_types(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_launch<T>(grads, offsets, store, [&](const ManyArgs<T>& args, int64_t blocks) {
      const unsigned grid = grid_for(blocks, "gacc::accumulate_many_");
      if (stats == nullptr) {
        accumulate_many_kernel<T, false><<<grid, kThreads, 0, stream>>>(base, args, w, nullptr);
      } else {
        accumulate_many_kernel<T, true><<<grid, kThreads, 0, stream>>>(base, args, w, stats);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void accumulate_finalize_cuda(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store,
    double weight,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    bool write_grads,
    const std::optional<at::Tensor>& stat_partials) {
  check_accumulate_finalize(buf, grads, offsets, store, scale, found_inf, norm_partials);
  check_stat_partials("gacc::accumulate_finalize_", stat_partials, buf, grads, offsets);
  if (grads.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  float* base = buf.mutable_data_ptr<float>();
  const float w = static_cast<float>(weight);
  float* stats = stat_partials.has_value() ? stat_partials->mutable_data_ptr<float>() : nullptr;
  const FinalArgs fin{
      scale.const_data_ptr<float>(), found_inf.mutable_data_ptr<float>(), norm_partials.mutable_data_ptr<float>(),
      stats};
  dispatch_float_types(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_launch<T>(grads, offsets, store, [&](const ManyArgs<T>& args, int64_t blocks) {
      const unsigned grid = grid_for(blocks, "gacc::accumulate_finalize_");
      // the kernel for (write_grads, stats), each a compile-time flag
      const auto launch = [&](auto write, auto with_stats) {
        accumulate_finalize_kernel<T, decltype(write)::value, decltype(with_stats)::value>
            <<<grid, kThreads, 0, stream>>>(base, args, w, fin);
      };
      if (write_grads) {
        stats == nullptr ? launch(std::true_type{}, std::false_type{}) : launch(std::true_type{}, std::true_type{});
      } else {
        stats == nullptr ? launch(std::false_type{}, std::false_type{}) : launch(std::false_type{}, std::true_type{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void finalize_cuda(
    const at::Tensor& buf,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    const std::optional<at::Tensor>& out) {
  check_finalize(buf, scale, found_inf, norm_partials, out);
  const c10::cuda::CUDAGuard guard(buf.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index());
  // Launched even when buf is empty, so that norm_partials is still written (zeros).
  with_out_ptr(out, [&](auto* out_ptr) {
    using OutT = std::remove_pointer_t<decltype(out_ptr)>;
    scale_kernel<OutT, true><<<grid_for(norm_partials.numel(), "gacc::finalize_"), kThreads, 0, stream>>>(
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
    scale_kernel<OutT, false><<<grid_for(cdiv(n, kChunk), "gacc::scale_"), kThreads, 0, stream>>>(
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
  m.impl("accumulate_finalize_", &gacc::accumulate_finalize_cuda);
}
