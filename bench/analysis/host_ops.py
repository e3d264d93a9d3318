"""Host cost per call of the fused GEMM against stock mm (tiny, so the GPU waits), and a CPU profile per op.

The ad-hoc script of bench/results/h100-2026-11-23-cpp-fused/profile/ (lint-formatted; the same statements
as ran there, on commit 99fd4fa). It writes host_ops.txt and prof_<mode>.txt into $OUT:

    OUT=DIR python bench/analysis/host_ops.py   (CUDA, gacc_kernels installed)
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # bench/, for bench_e2e
import gacc_kernels
from bench_e2e import build, loss_of

out = os.environ["OUT"]
lines = []


def say(s):
    print(s, flush=True)
    lines.append(s)


a = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
b = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
o = torch.zeros(256, 256, device="cuda")
calls = {
    "mm (stock wgrad)": lambda: torch.mm(a.t(), b),
    "addmm out_dtype=fp32 out=": lambda: torch.addmm(o, a.t(), b, beta=1.0, alpha=1.0, out_dtype=torch.float32, out=o),
    "mm + add_ (stock accumulate)": lambda: o[:1].add_(o[:1]),  # misnamed: the add_ alone
}
for _ in range(3):
    for name, f in calls.items():
        for _ in range(200):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            f()
        host = (time.perf_counter() - t) / 2000 * 1e6
        torch.cuda.synchronize()
        say(f"{name}: {host:.2f} us host per call")
model = build(16)
tokens = torch.randint(0, 32000, (1, 2048), device="cuda")
for mode in ("stock", "gacc", "gacc-fused"):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=10**6, fuse_linear=mode == "gacc-fused") if mode != "stock" else None
    for _ in range(3):
        loss_of(model, tokens).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_of(model, tokens).backward()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    with open(f"{out}/prof_{mode}.txt", "w") as f:
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=45))
    say(f"{mode}: profiled self CPU total {sum(e.self_cpu_time_total for e in ka) / 1e3:.1f} ms")
    if acc:
        acc.remove()
    opt.zero_grad(set_to_none=True)
with open(f"{out}/host_ops.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
