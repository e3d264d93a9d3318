// The autograd Function of attach(..., fuse_linear=True): F.linear whose weight grad is not returned to
// autograd but handed, with dY and X, to gacc_kernels.fused_linear._weight_grad (set once through
// _C.set_weight_grad), which accumulates it into the weight's fp32 slot. It is C++ so that a layer costs
// the host about what a stock linear does: one C++ node, and one Python call in backward for the weight grad.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include "python_methods.h"

namespace gacc {
namespace {

PyObject* weight_grad_callback = nullptr;  // weight_grad(route: int, dy, x) -> Tensor | None

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
      dw = call_weight_grad(ctx->saved_data["route"].toInt(), dy, x.reshape({-1, x.size(-1)}));
    }
    return {dx, dw, db, at::Tensor()};
  }

  static at::Tensor call_weight_grad(int64_t route, const at::Tensor& dy, const at::Tensor& x) {
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
};

// _C.fused_linear(x, weight, bias or None, route) -> Tensor
PyObject* fused_linear(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 4, "fused_linear(x, weight, bias, route) takes 4 arguments");
  TORCH_CHECK(weight_grad_callback != nullptr, "fused_linear: set_weight_grad was not called");
  TORCH_CHECK(THPVariable_Check(args[0]) && THPVariable_Check(args[1]), "fused_linear: x and weight must be tensors");
  TORCH_CHECK(args[2] == Py_None || THPVariable_Check(args[2]), "fused_linear: bias must be a tensor or None");
  const int64_t route = PyLong_AsLongLong(args[3]);
  if (route == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  const std::optional<at::Tensor> bias =
      args[2] == Py_None ? std::nullopt : std::optional<at::Tensor>(THPVariable_Unpack(args[2]));
  return THPVariable_Wrap(FusedLinear::apply(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), bias, route));
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

}  // namespace

PyMethodDef python_methods[] = {
    {"fused_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fused_linear)), METH_FASTCALL,
     "F.linear whose weight grad goes to the weight_grad callback instead of autograd."},
    {"set_weight_grad", set_weight_grad, METH_O, "Set the callback of fused_linear's weight grads."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace gacc
