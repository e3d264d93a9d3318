// The autograd Function of attach(..., fuse_linear=True): F.linear whose weight grad is not returned to
// autograd but accumulated into the weight's fp32 slot, in one of two ways:
//   armed   gacc armed the layer's route for this backward (the window's micro-steps but its last, see
//           capture.Capture._arm): the GEMM goes straight into the slot, with no call into Python;
//   called  otherwise: gacc_kernels.fused_linear._weight_grad (set once through _C.set_weight_grad) gets
//           dY and X and does the bookkeeping and the GEMM, or returns the grad for autograd.
// It is C++ so that a layer costs the host no more than a stock linear: one node, and in the armed case
// one GEMM in place of stock's GEMM and add.
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <mutex>
#include <unordered_map>

#include "python_methods.h"

namespace gacc {
namespace {

PyObject* weight_grad_callback = nullptr;  // weight_grad(route: int, dy, x) -> Tensor | None

// out = beta * out + alpha * dy^T x, accumulated in fp32: on CUDA cuBLAS's fp32 output for bf16/fp16
// operands (addmm with out_dtype); elsewhere the operands upcast, the reference the CPU tests force.
void weight_grad_into(at::Tensor& out, const at::Tensor& dy, const at::Tensor& x, double beta, double alpha) {
  at::NoGradGuard no_grad;  // backward(create_graph=True): the buffer is in no graph
  if (out.is_cuda()) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    at::addmm_out(out, out, dy.t(), x, at::kFloat, beta, alpha);
#else
    TORCH_CHECK(false, "the fused weight grad needs torch 2.8 or later (addmm with out_dtype)");
#endif
  } else {
    out.addmm_(dy.t().to(at::kFloat), x.to(at::kFloat), beta, alpha);
  }
}

// Where an armed route's next weight grad goes, during one backward (graph task).
struct Armed {
  at::Tensor out;
  double beta;
  double alpha;
  int task;
  bool fired;  // it took one: the next comes through Python, after gacc has counted this one
};
std::mutex armed_mutex;  // backwards of several devices run on several threads
std::unordered_map<int64_t, Armed> armed;

// The armed write, if this route is armed for this backward; false: ask Python.
bool write_armed(int64_t route, const at::Tensor& dy, const at::Tensor& x) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (exec_info == nullptr || !exec_info->empty()) {  // backward(inputs=...), autograd.grad: Python decides
    return false;
  }
  at::Tensor out;
  double beta = 0.0, alpha = 0.0;
  {
    std::lock_guard<std::mutex> lock(armed_mutex);
    auto it = armed.find(route);
    if (it == armed.end() || it->second.fired || it->second.task != torch::autograd::get_current_graph_task_id()) {
      return false;
    }
    it->second.fired = true;  // before the GEMM: if it raises, gacc still sees a grad that may be partly in
    out = it->second.out;
    beta = it->second.beta;
    alpha = it->second.alpha;
  }
  weight_grad_into(out, dy, x, beta, alpha);
  return true;
}

at::Tensor call_weight_grad(int64_t route, const at::Tensor& dy, const at::Tensor& x) {
  pybind11::gil_scoped_acquire gil;
  PyObject* result = PyObject_CallFunction(
      weight_grad_callback, "LNN", static_cast<long long>(route), THPVariable_Wrap(dy), THPVariable_Wrap(x));
  if (result == nullptr) {
    python_error error;
    error.persist();
    throw std::move(error);
  }
  at::Tensor dw;
  if (THPVariable_Check(result)) {
    dw = THPVariable_Unpack(result);
  }
  Py_DECREF(result);
  return dw;
}

struct FusedLinear : public torch::autograd::Function<FusedLinear> {
  static at::Tensor forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
      const std::optional<at::Tensor>& bias, int64_t route) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["route"] = route;
    ctx->saved_data["bias"] = bias.has_value();
    return at::linear(x, weight, bias);
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor dy = grads[0].reshape({-1, grads[0].size(-1)});
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) {
      dx = dy.mm(weight).view(x.sizes());  // the ops of stock linear's backward
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) {  // an input without bias has 2 edges
      db = dy.sum(0);
    }
    if (ctx->needs_input_grad(1)) {
      const int64_t route = ctx->saved_data["route"].toInt();
      const at::Tensor x2 = x.reshape({-1, x.size(-1)});
      if (!write_armed(route, dy, x2)) {
        dw = call_weight_grad(route, dy, x2);
      }
    }
    return {dx, dw, db, at::Tensor()};
  }
};

bool unpack_route(PyObject* obj, int64_t* route) {
  *route = PyLong_AsLongLong(obj);
  return !(*route == -1 && PyErr_Occurred());
}

// _C.fused_linear(x, weight, bias or None, route) -> Tensor, or None where the caller runs stock F.linear:
// grad mode off, an argument that is not a tensor (an FX proxy), autocast to a dtype other than the
// weight's, or dtypes that differ. These checks are here, not in Python, for the host's sake.
PyObject* fused_linear(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 4, "fused_linear(x, weight, bias, route) takes 4 arguments");
  TORCH_CHECK(weight_grad_callback != nullptr, "fused_linear: set_weight_grad was not called");
  if (!at::GradMode::is_enabled() || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      (args[2] != Py_None && !THPVariable_Check(args[2]))) {
    Py_RETURN_NONE;
  }
  int64_t route = 0;
  if (!unpack_route(args[3], &route)) {
    return nullptr;
  }
  at::Tensor x = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const std::optional<at::Tensor> bias =
      args[2] == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(args[2]));
  const auto device_type = x.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {  // F.linear would cast x (but float64) to this dtype
    const auto cast = at::autocast::get_autocast_dtype(device_type);
    if (cast != weight.scalar_type()) {
      Py_RETURN_NONE;
    }
    if (x.is_floating_point() && x.scalar_type() != at::kDouble) {
      x = x.to(cast);
    }
  }
  if (x.scalar_type() != weight.scalar_type() || (bias && bias->scalar_type() != weight.scalar_type())) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(FusedLinear::apply(x, weight, bias, route));
  END_HANDLE_TH_ERRORS
}

// _C.weight_grad_into(out, dy, x, beta, alpha): out = beta * out + alpha * dy^T x in fp32.
PyObject* weight_grad_into_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 5, "weight_grad_into(out, dy, x, beta, alpha) takes 5 arguments");
  TORCH_CHECK(THPVariable_Check(args[0]) && THPVariable_Check(args[1]) && THPVariable_Check(args[2]),
              "weight_grad_into: out, dy and x must be tensors");
  const double beta = PyFloat_AsDouble(args[3]);
  const double alpha = PyFloat_AsDouble(args[4]);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  at::Tensor out = THPVariable_Unpack(args[0]);
  {
    pybind11::gil_scoped_release no_gil;
    weight_grad_into(out, THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]), beta, alpha);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _C.arm_weight_grads(routes, outs, betas, alpha, task): in graph task `task`, each route's next weight
// grad goes into its out (out = beta * out + alpha * dY^T X) without a call into Python.
PyObject* arm_weight_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 5, "arm_weight_grads(routes, outs, betas, alpha, task) takes 5 arguments");
  const double alpha = PyFloat_AsDouble(args[3]);
  const long task = PyLong_AsLong(args[4]);
  if (PyErr_Occurred()) {
    return nullptr;
  }
  TORCH_CHECK(PyList_Check(args[0]) && PyList_Check(args[1]) && PyList_Check(args[2]) &&
                  PyList_GET_SIZE(args[0]) == PyList_GET_SIZE(args[1]) &&
                  PyList_GET_SIZE(args[0]) == PyList_GET_SIZE(args[2]),
              "arm_weight_grads: routes, outs and betas must be lists of one length");
  std::vector<std::pair<int64_t, Armed>> entries;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); ++i) {
    int64_t route = 0;
    if (!unpack_route(PyList_GET_ITEM(args[0], i), &route)) {
      return nullptr;
    }
    PyObject* out = PyList_GET_ITEM(args[1], i);
    TORCH_CHECK(THPVariable_Check(out), "arm_weight_grads: outs must be tensors");
    const double beta = PyFloat_AsDouble(PyList_GET_ITEM(args[2], i));
    if (PyErr_Occurred()) {
      return nullptr;
    }
    entries.emplace_back(route, Armed{THPVariable_Unpack(out), beta, alpha, static_cast<int>(task), false});
  }
  std::lock_guard<std::mutex> lock(armed_mutex);
  for (auto& [route, entry] : entries) {
    armed.insert_or_assign(route, std::move(entry));
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// _C.disarm_weight_grads(routes) -> list of those that took a grad while armed; none stays armed.
PyObject* disarm_weight_grads(PyObject* /*module*/, PyObject* routes) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(PyList_Check(routes), "disarm_weight_grads takes a list of routes");
  PyObject* fired = PyList_New(0);
  if (fired == nullptr) {
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(armed_mutex);
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(routes); ++i) {
    PyObject* item = PyList_GET_ITEM(routes, i);
    int64_t route = 0;
    if (!unpack_route(item, &route)) {
      Py_DECREF(fired);
      return nullptr;
    }
    auto it = armed.find(route);
    if (it == armed.end()) {
      continue;
    }
    if (it->second.fired && PyList_Append(fired, item) != 0) {
      Py_DECREF(fired);
      return nullptr;
    }
    armed.erase(it);
  }
  return fired;
  END_HANDLE_TH_ERRORS
}

// _C.set_weight_grad(callable): what every FusedLinear backward calls (kept for the process's life).
PyObject* set_weight_grad(PyObject* /*module*/, PyObject* callback) {
  if (!PyCallable_Check(callback)) {
    PyErr_SetString(PyExc_TypeError, "set_weight_grad takes a callable");
    return nullptr;
  }
  Py_INCREF(callback);
  Py_XSETREF(weight_grad_callback, callback);
  Py_RETURN_NONE;
}

template <typename F>
PyCFunction fastcall(F f) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f));
}

}  // namespace

PyMethodDef python_methods[] = {
    {"fused_linear", fastcall(fused_linear), METH_FASTCALL,
     "F.linear whose weight grad goes into gacc's buffer (armed) or to the weight_grad callback."},
    {"weight_grad_into", fastcall(weight_grad_into_py), METH_FASTCALL,
     "out = beta * out + alpha * dy^T x, accumulated in fp32."},
    {"arm_weight_grads", fastcall(arm_weight_grads), METH_FASTCALL,
     "Let the routes' next weight grads in this backward go into their slots without a call back."},
    {"disarm_weight_grads", disarm_weight_grads, METH_O, "Disarm the routes; return those that fired."},
    {"set_weight_grad", set_weight_grad, METH_O, "Set the callback of fused_linear's weight grads."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace gacc
