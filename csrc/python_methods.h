// The functions of the Python module gacc_kernels._C (fused_linear.cpp), besides the ops it registers.
#pragma once

#include <Python.h>

namespace gacc {
extern PyMethodDef python_methods[];
}  // namespace gacc
