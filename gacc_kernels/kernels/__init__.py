"""The kernels, one op at a time: `reference` (the spec, pure PyTorch), `triton_ops`, the C++/CUDA
extension (`gacc_kernels._C`), and `ops`, the one place that chooses among them."""
