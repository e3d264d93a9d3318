"""Is a micro-step's backward host-bound? Host time (until backward() returns) against host plus GPU
time (after a synchronize), for gacc's hook path and for fuse_linear=True, on the bench_e2e model
(16 layers, micro-batch 1 x 2048). Equal times mean the GPU waits for the host.

    python bench/bench_backward_host.py      (CUDA; prints two lines per mode, each a median of 6)
"""
import time

import torch

import gacc_kernels
from bench_e2e import build, loss_of

model = build(16)
tokens = torch.randint(0, 32000, (1, 2048), device="cuda")
for fused in (False, True, False, True):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gacc_kernels.attach(model, opt, steps=1000, fuse_linear=fused)
    host, total = [], []
    for i in range(8):
        loss = loss_of(model, tokens)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 2:
            host.append((t1 - t0) * 1e3)
            total.append((time.perf_counter() - t0) * 1e3)
    acc.remove()
    opt.zero_grad()
    print(f"fuse_linear={fused}: backward host {sorted(host)[3]:.1f} ms, host+GPU {sorted(total)[3]:.1f} ms")
