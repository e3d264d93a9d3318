"""Host cost per layer of forward and backward: stock nn.Linear, the hook path, fuse_linear (armed).

The script that made hostcost.txt in bench/results/h100-2026-11-23-armed-last/ and
bench/results/h100-2026-11-24-cpp-forward/:

    python bench/analysis/hostcost.py > hostcost.txt   (CUDA, gacc_kernels installed with its extension)
"""
import statistics
import time

import torch
import torch.nn.functional as F

import gacc_kernels
from gacc_kernels.kernels import ops

C = ops.extension


def chain(n, d):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(n)]).cuda().bfloat16()


def run(shape, rounds=40):
    n, d, t = shape
    models = {}
    for v in ("stock", "hook", "fused"):
        m = chain(n, d)
        if v != "stock":
            gacc_kernels.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), steps=10**6, fuse_linear=v == "fused")
        models[v] = m
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
    res = {v: ([], []) for v in models}
    for r in range(rounds + 3):
        for v, m in models.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = m(x)
            t1 = time.perf_counter()
            loss = y.float().sum()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            torch.cuda.synchronize()
            if r >= 3:
                res[v][0].append((t1 - t0) / n * 1e6)
                res[v][1].append((t3 - t2) / n * 1e6)
    print(f"-- {n} layers {d}x{d}, {t} tokens: host us per layer (median of {rounds})")
    for v, (f, b) in res.items():
        print(f"  {v:6s} fwd {statistics.median(f):6.1f}  bwd {statistics.median(b):6.1f}")
    w = models["fused"][0].weight
    fns = {"F.linear": lambda: F.linear(x, w), "_C.fused_linear": lambda: C.fused_linear(x, w, None, 0),
           "module (fused fwd)": lambda: models["fused"][0](x), "module (stock)": lambda: models["stock"][0](x)}
    for name, f in fns.items():
        ts = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            ts.append((time.perf_counter() - t0) / n * 1e6)
        print(f"  {name:20s} {statistics.median(ts):6.1f} us per call")


for shape in [(64, 256, 16), (16, 1536, 2048)]:
    run(shape)
