"""Where a micro-step's time goes on the bench_e2e model (16 layers, micro-batch 1 x 2048): host time of
forward and of backward (until the call returns), the whole micro-step with a sync on each side, and the
GPU's busy time (the sum of kernel times, from one profiled micro-step), for stock bf16 accumulation,
gacc's hook path and fuse_linear=True. Busy time well under the synced time means the GPU waits for the
host; then a variant is as fast as its host work.

Three copies of the model, one per mode, each in its steady state (stock adds into bf16 p.grad, gacc's
windows never end), and the modes alternate micro-step by micro-step, so that the host's drift, which
moves a round by 10-30% on a shared machine, falls on all three alike; the differences to stock are
taken cycle by cycle.

    python bench/bench_backward_host.py [--out DIR] [--cycles 30]   (CUDA)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import gacc_kernels
from bench_e2e import build, loss_of
from common import stamp, table, write_report

MODES = ("stock", "gacc", "gacc-fused")


def micro_step(model, tokens):
    """(forward host ms, backward host ms, synced ms)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = loss_of(model, tokens)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t0) * 1e3


def gpu_busy_ms(model, tokens):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_of(model, tokens).backward()
        torch.cuda.synchronize()
    return sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return f"{q[1]:.2f} ({q[0]:.2f} to {q[2]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cycles", type=int, default=30)
    args = ap.parse_args()
    tokens = torch.randint(0, 32000, (1, 2048), device="cuda")
    models = {}
    for mode in MODES:
        models[mode] = model = build(16)
        if mode != "stock":
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            gacc_kernels.attach(model, opt, steps=10**6, fuse_linear=mode == "gacc-fused")
    got = {m: [] for m in MODES}
    for cycle in range(args.cycles + 3):  # 3 warm-up cycles
        for mode in MODES[cycle % 3:] + MODES[:cycle % 3]:
            t = micro_step(models[mode], tokens)
            if cycle >= 3:
                got[mode].append(t)
    rows = []
    for mode in MODES:
        fwd, bwd, synced = (statistics.median(t[i] for t in got[mode]) for i in range(3))
        diff = [t[2] - s[2] for t, s in zip(got[mode], got["stock"])]
        rows.append([mode, fwd, bwd, synced, quartiles(diff), gpu_busy_ms(models[mode], tokens)])
    md = [f"# Host and GPU time of one micro-step\n\n{stamp()}\n", __doc__,
          (f"Medians over {args.cycles} cycles of the three modes; the difference to stock is taken within each "
           "cycle (median and quartiles).\n"),
          table(["mode", "forward host ms", "backward host ms", "micro-step ms (synced)",
                 "synced - stock's, same cycle (quartiles)", "GPU busy ms"], rows)]
    write_report(args.out, "backward_host.md", md)


if __name__ == "__main__":
    main()
