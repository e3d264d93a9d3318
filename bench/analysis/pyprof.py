"""cProfile of gacc's Python per window on the GPU host (fused and hook path), K=8 at 1 x 2048.

The script that made bench/results/h100-2026-11-23-armed-last/pyprof.txt:

    python bench/analysis/pyprof.py > pyprof.txt   (CUDA, gacc_kernels installed)
"""
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # bench/, for bench_e2e
from bench_e2e import Setup, build, micro_batches

data = micro_batches(8, 1, 2048)
for v in ("gacc-fused", "gacc"):
    s = Setup(build(16), v, 8)
    for _ in range(2):
        s.window(data)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        s.window(data)
    pr.disable()
    print(f"===== {v}: 5 windows")
    st = pstats.Stats(pr)
    st.sort_stats("cumtime").print_stats("gacc_kernels", 25)
    st.sort_stats("tottime").print_stats(15)
    s.remove()
    del s
