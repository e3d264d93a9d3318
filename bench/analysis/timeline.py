"""Per micro-step host vs GPU timeline (CUDA events aligned to the host clock after a sync).

The script that made timeline.txt in bench/results/h100-2026-11-23-armed/ (before/timeline.txt there ran the
same statements) and in bench/results/h100-2026-11-23-armed-last/; K and R (rounds) from the environment:

    K=8 R=6 python bench/analysis/timeline.py > timeline.txt   (CUDA, gacc_kernels installed)
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # bench/, for bench_e2e
from bench_e2e import Setup, build, loss_of, micro_batches

K = int(os.environ.get("K", "8"))
R = int(os.environ.get("R", "6"))
data = micro_batches(K, 1, 2048)
variants = ["a-bf16", "gacc-fused", "gacc"]
setups = {v: Setup(build(16), v, K) for v in variants}
for s in setups.values():
    s.window(data)
    s.window(data)


def window(s):
    marks = []  # (host time, event) at: fwd start, bwd start, bwd end (per micro-step), window end

    def mark():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        marks.append((time.perf_counter(), e))
    torch.cuda.synchronize()
    for t in data:
        mark()
        loss = loss_of(s.model, t)
        if s.variant == "a-bf16":
            loss = loss / K
        mark()
        loss.backward()
        mark()
    s.opt.zero_grad()
    mark()
    torch.cuda.synchronize()
    end = time.perf_counter()
    h0, e0 = marks[0]
    host = [(h - h0) * 1e3 for h, _ in marks]
    gpu = [e0.elapsed_time(e) for _, e in marks]
    return host, gpu, (end - h0) * 1e3


def med(rows, f):
    return statistics.median(f(h, g) for h, g, _ in rows)


acc = {v: [] for v in variants}
for r in range(R):
    for v in variants[r % 3:] + variants[:r % 3]:
        acc[v].append(window(setups[v]))
for v in variants:
    rows = acc[v]
    print(f"== {v}: window {statistics.median(t for *_, t in rows):.1f} ms")
    for m in range(K):
        i = 3 * m
        host_fwd = med(rows, lambda h, g, i=i: h[i + 1] - h[i])
        host_bwd = med(rows, lambda h, g, i=i: h[i + 2] - h[i + 1])
        gpu_fwd = med(rows, lambda h, g, i=i: g[i + 1] - g[i])
        gpu_bwd = med(rows, lambda h, g, i=i: g[i + 2] - g[i + 1])
        lags = [med(rows, lambda h, g, j=j: g[j] - h[j]) for j in (i, i + 1, i + 2)]
        print(f"  micro {m}: host fwd {host_fwd:6.2f} bwd {host_bwd:6.2f} | "
              f"gpu fwd {gpu_fwd:6.2f} bwd {gpu_bwd:6.2f} | "
              f"lag at fwd start {lags[0]:6.2f} bwd start {lags[1]:6.2f} bwd end {lags[2]:6.2f}")
    zg_host = med(rows, lambda h, g: h[-1] - h[-2])
    zg_gpu = med(rows, lambda h, g: g[-1] - g[-2])
    drain = statistics.median(t - h[-1] for h, g, t in rows)
    print(f"  zero_grad host {zg_host:.2f} gpu {zg_gpu:.2f}; drain after last mark {drain:.2f}")
    sys.stdout.flush()
