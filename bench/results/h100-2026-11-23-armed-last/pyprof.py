"""cProfile of gacc's Python per window on the GPU host (fused and hook path), K=8 at 1 x 2048."""
import cProfile
import pstats
import sys

sys.path.insert(0, "bench")
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
