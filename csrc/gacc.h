// Declarations shared by the CPU (gacc.cpp) and CUDA (gacc_cuda.cu) implementations.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>

namespace gacc {

// Argument validation, one function per op; each throws (TORCH_CHECK) with a message that
// names the op, the argument and the fix. Both backends call these before touching memory.
void check_accumulate(const at::Tensor& out, const at::Tensor& grad);
void check_accumulate_many(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store);
void check_finalize(
    const at::Tensor& buf,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    const std::optional<at::Tensor>& out);
void check_scale(const at::Tensor& buf, const at::Tensor& scale, const std::optional<at::Tensor>& out);
// The optional stat partials of accumulate_many_ / accumulate_finalize_: fp32, contiguous, on buf's
// device, every offset a multiple of kFinalizeChunk and one partial per kFinalizeChunk elements.
void check_stat_partials(
    const char* op,
    const std::optional<at::Tensor>& stat_partials,
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets);
void check_accumulate_finalize(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials);

// accumulate_finalize_ works in chunks of this many elements: one norm partial per chunk.
// Defined once, as CHUNK in gacc_kernels/kernels/reference.py; setup.py passes it as -DGACC_CHUNK.
#ifndef GACC_CHUNK
#error "GACC_CHUNK is not defined: build with setup.py, which passes -DGACC_CHUNK=<gacc_kernels.reference.CHUNK>"
#endif
constexpr int64_t kFinalizeChunk = GACC_CHUNK;

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half for the matching dtype.
// Callers have already checked that the dtype is one of the three.
template <typename F>
void dispatch_float_types(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "gacc: unsupported dtype ", dtype, "; expected float32, bfloat16 or float16");
  }
}

// Stands for "no cast target" in the finalize_ / scale_ implementations.
struct NoOut {};

// Calls f(ptr) with a typed pointer (float*, c10::BFloat16* or c10::Half*) to out's data, or with
// a null NoOut* when there is no out, so that the implementations can be templated on it.
template <typename F>
void with_out_ptr(const std::optional<at::Tensor>& out, F&& f) {
  if (!out.has_value()) {
    f(static_cast<NoOut*>(nullptr));
    return;
  }
  dispatch_float_types(out->scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    f(out->mutable_data_ptr<T>());
  });
}

}  // namespace gacc
