// Op schemas, argument checks and CPU implementations of the gacc ops, plus the Python module
// stub that makes `import gacc_kernels._C` load this library (and so register the ops).
// The math follows gacc_kernels/kernels/reference.py: fp32, one rounding per step, no FMA (this file is
// compiled with -ffp-contract=off).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "gacc.h"
#include "python_methods.h"

namespace gacc {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_fp32_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous; call .contiguous() first");
}

void check_same_device(
    const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(
      t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
      ref.device(), "; move it to ", ref_name, "'s device first");
}

// A 1-element fp32 tensor on buf's device (scale, found_inf).
void check_fp32_scalar(const char* op, const char* name, const at::Tensor& t, const at::Tensor& buf) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have exactly 1 element, got ", t.numel());
  check_same_device(op, name, t, "buf", buf);
}

// The optional cast target of finalize_ / scale_.
void check_cast_out(const char* op, const std::optional<at::Tensor>& out, const at::Tensor& buf) {
  if (!out.has_value()) {
    return;
  }
  TORCH_CHECK(
      is_float_type(out->scalar_type()), op, ": out must be float32, bfloat16 or float16, got ",
      out->scalar_type());
  TORCH_CHECK(out->is_contiguous(), op, ": out must be contiguous; call .contiguous() first");
  TORCH_CHECK(
      out->numel() == buf.numel(), op, ": out has ", out->numel(), " elements but buf has ", buf.numel());
  check_same_device(op, "out", *out, "buf", buf);
}

}  // namespace

void check_accumulate(const at::Tensor& out, const at::Tensor& grad) {
  constexpr const char* op = "gacc::accumulate_";
  check_fp32_contiguous(op, "out", out);
  TORCH_CHECK(
      is_float_type(grad.scalar_type()), op, ": grad must be float32, bfloat16 or float16, got ",
      grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous; call .contiguous() first");
  check_same_device(op, "grad", grad, "out", out);
  TORCH_CHECK(
      out.numel() == grad.numel(), op, ": out has ", out.numel(), " elements but grad has ", grad.numel(),
      "; they must match (shapes may differ)");
}

void check_accumulate_many(
    const at::Tensor& buf, at::TensorList grads, at::IntArrayRef offsets, const c10::List<bool>& store) {
  constexpr const char* op = "gacc::accumulate_many_";
  check_fp32_contiguous(op, "buf", buf);
  TORCH_CHECK(buf.dim() == 1, op, ": buf must be 1-D, got ", buf.dim(), " dims; pass buf.view(-1)");
  TORCH_CHECK(
      offsets.size() == grads.size() && store.size() == grads.size(), op,
      ": grads, offsets and store must have the same length, got ", grads.size(), ", ", offsets.size(),
      " and ", store.size());
  if (grads.empty()) {
    return;
  }
  const at::ScalarType dtype = grads[0].scalar_type();
  TORCH_CHECK(
      is_float_type(dtype), op, ": grads must be float32, bfloat16 or float16, got ", dtype);
  const int64_t buf_numel = buf.numel();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(
        g.scalar_type() == dtype, op, ": all grads must have one dtype; grads[0] is ", dtype, " but grads[",
        i, "] is ", g.scalar_type(), "; group the grads by dtype and call once per group");
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", i, "] must be contiguous; call .contiguous() first");
    TORCH_CHECK(
        g.device() == buf.device(), op, ": grads[", i, "] is on ", g.device(), " but buf is on ",
        buf.device(), "; move it to buf's device first");
    // Written so that it cannot overflow: 0 <= offset and numel <= buf_numel - offset.
    TORCH_CHECK(
        offsets[i] >= 0 && offsets[i] <= buf_numel && g.numel() <= buf_numel - offsets[i], op,
        ": the range of grads[", i, "], buf[", offsets[i], " : ", offsets[i], " + ", g.numel(),
        "], is not inside buf of ", buf_numel, " elements; fix the offsets");
  }
}

void check_finalize(
    const at::Tensor& buf,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    const std::optional<at::Tensor>& out) {
  constexpr const char* op = "gacc::finalize_";
  check_fp32_contiguous(op, "buf", buf);
  check_fp32_scalar(op, "scale", scale, buf);
  check_fp32_scalar(op, "found_inf", found_inf, buf);
  check_fp32_contiguous(op, "norm_partials", norm_partials);
  TORCH_CHECK(
      norm_partials.dim() == 1 && norm_partials.numel() >= 1, op,
      ": norm_partials must be 1-D with at least 1 element, got shape ", norm_partials.sizes());
  check_same_device(op, "norm_partials", norm_partials, "buf", buf);
  check_cast_out(op, out, buf);
}

void check_scale(const at::Tensor& buf, const at::Tensor& scale, const std::optional<at::Tensor>& out) {
  constexpr const char* op = "gacc::scale_";
  check_fp32_contiguous(op, "buf", buf);
  check_fp32_scalar(op, "scale", scale, buf);
  check_cast_out(op, out, buf);
}

void check_stat_partials(
    const char* op,
    const std::optional<at::Tensor>& stat_partials,
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets) {
  if (!stat_partials.has_value()) {
    return;
  }
  check_fp32_contiguous(op, "stat_partials", *stat_partials);
  check_same_device(op, "stat_partials", *stat_partials, "buf", buf);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t chunks = (grads[i].numel() + kFinalizeChunk - 1) / kFinalizeChunk;
    TORCH_CHECK(
        offsets[i] % kFinalizeChunk == 0, op, ": offsets[", i, "] = ", offsets[i], " is not a multiple of ",
        kFinalizeChunk, "; stat_partials needs every slot aligned to ", kFinalizeChunk, " elements");
    TORCH_CHECK(
        offsets[i] / kFinalizeChunk + chunks <= stat_partials->numel(), op, ": stat_partials has ",
        stat_partials->numel(), " elements; it needs one per ", kFinalizeChunk, " elements of buf");
  }
}

void check_accumulate_finalize(
    const at::Tensor& buf,
    at::TensorList grads,
    at::IntArrayRef offsets,
    const c10::List<bool>& store,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials) {
  constexpr const char* op = "gacc::accumulate_finalize_";
  check_accumulate_many(buf, grads, offsets, store);
  check_fp32_scalar(op, "scale", scale, buf);
  check_fp32_scalar(op, "found_inf", found_inf, buf);
  check_fp32_contiguous(op, "norm_partials", norm_partials);
  check_same_device(op, "norm_partials", norm_partials, "buf", buf);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t begin = offsets[i];
    const int64_t chunks = (grads[i].numel() + kFinalizeChunk - 1) / kFinalizeChunk;
    TORCH_CHECK(
        begin % kFinalizeChunk == 0, op, ": offsets[", i, "] = ", begin, " is not a multiple of ",
        kFinalizeChunk, "; align every slot of the buffer to ", kFinalizeChunk, " elements");
    TORCH_CHECK(
        begin / kFinalizeChunk + chunks <= norm_partials.numel(), op, ": norm_partials has ",
        norm_partials.numel(), " elements; it needs one per ", kFinalizeChunk, " elements of buf");
  }
}

namespace {

constexpr int64_t kGrainSize = 32768;  // elements per at::parallel_for task

// out[i] = w * float(grad[i])  or  out[i] = out[i] + w * float(grad[i]), each step rounded to fp32.
template <typename T>
void accumulate_range(float* out, const T* grad, int64_t n, float w, bool store) {
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    if (store) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = w * static_cast<float>(grad[i]);
      }
    } else {
      for (int64_t i = begin; i < end; ++i) {
        const float t = w * static_cast<float>(grad[i]);
        out[i] = out[i] + t;
      }
    }
  });
}

// accumulate_range over one chunk, serially, returning the chunk's sum of t * g, where t = w * float(g)
// is what it adds: the micro-step's weighted squared norm (stat_partials). The sum is kept in kLanes
// fp32 partial sums (so the loop vectorizes), added up in double.
template <typename T>
double accumulate_chunk_stat(float* out, const T* grad, int64_t n, float w, bool store) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float g = static_cast<float>(grad[i + l]);
      const float t = w * g;
      out[i + l] = store ? t : out[i + l] + t;
      lanes[l] += t * g;
    }
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(grad[i]);
    const float t = w * g;
    out[i] = store ? t : out[i] + t;
    lanes[0] += t * g;
  }
  double acc = 0.0;
  for (const float lane : lanes) {
    acc += lane;
  }
  return acc;
}

// stat_partials[index] = (store ? 0 : itself) + sum.
void write_stat(float* stat_partials, int64_t index, double sum, bool store) {
  const float s = static_cast<float>(sum);
  stat_partials[index] = store ? s : stat_partials[index] + s;
}

void accumulate_cpu(const at::Tensor& out, const at::Tensor& grad, double weight, bool store) {
  check_accumulate(out, grad);
  if (out.numel() == 0) {
    return;
  }
  dispatch_float_types(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    accumulate_range(
        out.mutable_data_ptr<float>(), grad.const_data_ptr<T>(), out.numel(), static_cast<float>(weight), store);
  });
}

void accumulate_many_cpu(
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
  float* base = buf.mutable_data_ptr<float>();
  const float w = static_cast<float>(weight);
  float* stats = stat_partials.has_value() ? stat_partials->mutable_data_ptr<float>() : nullptr;
  dispatch_float_types(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (size_t i = 0; i < grads.size(); ++i) {
      const int64_t n = grads[i].numel();
      const T* grad = grads[i].const_data_ptr<T>();
      if (stats == nullptr) {
        accumulate_range(base + offsets[i], grad, n, w, store.get(i));
        continue;
      }
      const int64_t grain = kGrainSize / kFinalizeChunk;  // chunks per task, as accumulate_range splits
      at::parallel_for(0, (n + kFinalizeChunk - 1) / kFinalizeChunk, grain, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          const int64_t begin = c * kFinalizeChunk;
          const int64_t end = std::min(begin + kFinalizeChunk, n);
          const double sum =
              accumulate_chunk_stat(base + offsets[i] + begin, grad + begin, end - begin, w, store.get(i));
          write_stat(stats, offsets[i] / kFinalizeChunk + c, sum, store.get(i));
        }
      });
    }
  });
}

// v = buf[i] * s; buf[i] = v; out[i] = cast(v) (round to nearest even) over [begin, end).
// With kReduce it also returns the sum of v * v (in double) and whether any v is inf or NaN.
// OutT is the cast target's element type, or NoOut for no cast.
template <bool kReduce, typename OutT>
void scale_range(
    float* buf, OutT* out, float s, int64_t begin, int64_t end, double* sumsq, bool* nonfinite) {
  double acc = 0.0;
  bool bad = false;
  for (int64_t i = begin; i < end; ++i) {
    const float v = buf[i] * s;
    buf[i] = v;
    if constexpr (!std::is_same_v<OutT, NoOut>) {
      out[i] = static_cast<OutT>(v);
    }
    if constexpr (kReduce) {
      bad |= !std::isfinite(v);
      acc += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  if constexpr (kReduce) {
    *sumsq = acc;
    *nonfinite = bad;
  }
}

void finalize_cpu(
    const at::Tensor& buf,
    const at::Tensor& scale,
    const at::Tensor& found_inf,
    const at::Tensor& norm_partials,
    const std::optional<at::Tensor>& out) {
  check_finalize(buf, scale, found_inf, norm_partials, out);
  const int64_t n = buf.numel();
  const int64_t parts = norm_partials.numel();
  const int64_t chunk = (n + parts - 1) / parts;  // partial p sums buf[p * chunk : (p + 1) * chunk]
  float* data = buf.mutable_data_ptr<float>();
  float* partials = norm_partials.mutable_data_ptr<float>();
  const float s = scale.const_data_ptr<float>()[0];
  std::atomic<bool> any_nonfinite{false};
  with_out_ptr(out, [&](auto out_ptr) {
    at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
      for (int64_t p = p_begin; p < p_end; ++p) {
        const int64_t begin = std::min(p * chunk, n);
        const int64_t end = std::min(begin + chunk, n);
        double sumsq = 0.0;
        bool nonfinite = false;
        scale_range<true>(data, out_ptr, s, begin, end, &sumsq, &nonfinite);
        partials[p] = static_cast<float>(sumsq);
        if (nonfinite) {
          any_nonfinite.store(true, std::memory_order_relaxed);
        }
      }
    });
  });
  if (any_nonfinite.load()) {
    found_inf.mutable_data_ptr<float>()[0] = 1.0f;
  }
}

void accumulate_finalize_cpu(
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
  float* base = buf.mutable_data_ptr<float>();
  float* partials = norm_partials.mutable_data_ptr<float>();
  float* stats = stat_partials.has_value() ? stat_partials->mutable_data_ptr<float>() : nullptr;
  const float s = scale.const_data_ptr<float>()[0];
  const float w = static_cast<float>(weight);
  std::atomic<bool> any_nonfinite{false};
  dispatch_float_types(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (size_t t = 0; t < grads.size(); ++t) {
      const int64_t n = grads[t].numel();
      float* dst = base + offsets[t];
      T* grad = grads[t].mutable_data_ptr<T>();
      at::parallel_for(0, (n + kFinalizeChunk - 1) / kFinalizeChunk, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          const int64_t begin = c * kFinalizeChunk;
          const int64_t end = std::min(begin + kFinalizeChunk, n);
          if (stats == nullptr) {
            accumulate_range(dst + begin, grad + begin, end - begin, w, store.get(t));
          } else {
            const double sum = accumulate_chunk_stat(dst + begin, grad + begin, end - begin, w, store.get(t));
            write_stat(stats, offsets[t] / kFinalizeChunk + c, sum, store.get(t));
          }
          double sumsq = 0.0;
          bool nonfinite = false;
          if (write_grads) {  // the cast goes back over the grad it came from
            scale_range<true>(dst, grad, s, begin, end, &sumsq, &nonfinite);
          } else {
            scale_range<true>(dst, static_cast<NoOut*>(nullptr), s, begin, end, &sumsq, &nonfinite);
          }
          partials[offsets[t] / kFinalizeChunk + c] = static_cast<float>(sumsq);
          if (nonfinite) {
            any_nonfinite.store(true, std::memory_order_relaxed);
          }
        }
      });
    }
  });
  if (any_nonfinite.load()) {
    found_inf.mutable_data_ptr<float>()[0] = 1.0f;
  }
}

void scale_cpu(const at::Tensor& buf, const at::Tensor& scale, const std::optional<at::Tensor>& out) {
  check_scale(buf, scale, out);
  float* data = buf.mutable_data_ptr<float>();
  const float s = scale.const_data_ptr<float>()[0];
  with_out_ptr(out, [&](auto out_ptr) {
    at::parallel_for(0, buf.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
      scale_range<false>(data, out_ptr, s, begin, end, nullptr, nullptr);
    });
  });
}

}  // namespace
}  // namespace gacc

TORCH_LIBRARY(gacc, m) {
  m.def("accumulate_(Tensor(a!) out, Tensor grad, float weight, bool store) -> ()");
  m.def(
      "accumulate_many_(Tensor(a!) buf, Tensor[] grads, int[] offsets, bool[] store, float weight, "
      "Tensor(b!)? stat_partials=None) -> ()");
  m.def(
      "finalize_(Tensor(a!) buf, Tensor scale, Tensor(b!) found_inf, Tensor(c!) norm_partials, "
      "Tensor(d!)? out) -> ()");
  m.def("scale_(Tensor(a!) buf, Tensor scale, Tensor(b!)? out) -> ()");
  m.def(
      "accumulate_finalize_(Tensor(a!) buf, Tensor(b!)[] grads, int[] offsets, bool[] store, float weight, "
      "Tensor scale, Tensor(c!) found_inf, Tensor(d!) norm_partials, bool write_grads, "
      "Tensor(e!)? stat_partials=None) -> ()");
}

TORCH_LIBRARY_IMPL(gacc, CPU, m) {
  m.impl("accumulate_", &gacc::accumulate_cpu);
  m.impl("accumulate_many_", &gacc::accumulate_many_cpu);
  m.impl("finalize_", &gacc::finalize_cpu);
  m.impl("scale_", &gacc::scale_cpu);
  m.impl("accumulate_finalize_", &gacc::accumulate_finalize_cpu);
}

// `import gacc_kernels._C` loads this library, which runs the registrations above. The ops are
// reached through torch.ops.gacc; the module holds CHUNK, the chunk size compiled in, which
// gacc_kernels/kernels/ops.py compares with reference.CHUNK at load time, and fused_linear's functions.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, gacc::python_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "CHUNK", GACC_CHUNK) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
