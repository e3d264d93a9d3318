"""Builds gacc_kernels._C, the C++ extension with the gacc ops (and their CUDA kernels when the
toolchain allows) and fuse_linear's autograd Function, against the torch already installed:

    pip install --no-build-isolation [-e] .

Environment:
    GACC_SKIP_EXT=1       build no extension (pure-Python install)
    GACC_CUDA=0 / 1       0: CPU-only extension; 1: CUDA required (error if it cannot be built);
                          unset: CUDA when torch is a CUDA build and nvcc is found under CUDA_HOME
    CUDA_HOME             the CUDA toolkit (else torch's guess from the nvcc on PATH)
    TORCH_CUDA_ARCH_LIST  GPU architectures; unset: the visible GPUs', or DEFAULT_ARCH_LIST if none
    MAX_JOBS              parallel compile jobs
"""
import os
import re

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer GPUs
HERE = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"gacc_kernels setup: {message}", flush=True)


def read_chunk():
    """CHUNK from gacc_kernels/kernels/reference.py, its one definition, read from the text (importing the
    package would import torch and the extension being built); the C++/CUDA code gets it as GACC_CHUNK."""
    path = os.path.join(HERE, "gacc_kernels", "kernels", "reference.py")
    with open(path, encoding="utf-8") as f:
        found = re.findall(r"^CHUNK\s*=\s*(\d+)\b", f.read(), flags=re.MULTILINE)
    if len(found) != 1:
        raise SystemExit(f"gacc_kernels: expected one line `CHUNK = <integer>` in {path}, found {len(found)}")
    chunk = int(found[0])
    if chunk <= 0 or chunk & (chunk - 1):
        raise SystemExit(f"gacc_kernels: CHUNK in {path} must be a power of two (Triton tl.arange), got {chunk}")
    return chunk


def cuda_toolchain_problem(torch, cpp_extension):
    """Why the CUDA file cannot be built here, or None if it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc was not found; set CUDA_HOME to the CUDA toolkit"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={home} has no include/cuda_runtime.h; set CUDA_HOME to the CUDA toolkit"
    return None


def extension_setup():
    """The ext_modules and cmdclass arguments of setup()."""
    if os.environ.get("GACC_SKIP_EXT") == "1":
        log("building no extension (GACC_SKIP_EXT=1)")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit(
            "gacc_kernels: building the extension needs torch; install torch first and build with "
            "`pip install --no-build-isolation .`, or set GACC_SKIP_EXT=1 for a pure-Python install"
        ) from e

    mode = os.environ.get("GACC_CUDA", "")
    if mode not in ("", "0", "1"):
        raise SystemExit(f"gacc_kernels: GACC_CUDA must be 0, 1 or unset, got {mode!r}")
    problem = None if mode == "0" else cuda_toolchain_problem(torch, cpp_extension)
    if mode == "1" and problem:
        raise SystemExit(f"gacc_kernels: GACC_CUDA=1 but the CUDA extension cannot be built: {problem}")
    build_cuda = mode != "0" and problem is None

    chunk_macro = f"-DGACC_CHUNK={read_chunk()}"
    cxx_flags = ["/O2", "/DNDEBUG"] if os.name == "nt" else ["-O3", "-DNDEBUG", "-ffp-contract=off"]
    cxx_flags.append(chunk_macro)
    sources = ["csrc/gacc.cpp", "csrc/fused_linear.cpp"]
    if build_cuda:
        # No --use_fast_math: it flushes denormals and changes the fp32 rounding the ops must keep.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"
        log(
            f"building C++ + CUDA extension (torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"nvcc in {cpp_extension.CUDA_HOME}, archs {arch_list})"
        )
        extension = cpp_extension.CUDAExtension(
            "gacc_kernels._C",
            [*sources, "csrc/gacc_cuda.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DNDEBUG", chunk_macro]},
        )
    else:
        reason = "GACC_CUDA=0" if mode == "0" else problem
        log(f"building C++ (CPU-only) extension: {reason}")
        extension = cpp_extension.CppExtension(
            "gacc_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}
        )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


setup(**extension_setup())
