"""Where a micro-step's time goes on the bench_e2e model (16 layers, micro-batch 1 x 2048): host time of
forward and of backward (until the call returns), the whole micro-step with a sync on each side, and the
GPU's busy time (the sum of kernel times, from one profiled micro-step), for stock bf16 accumulation,
gacc's hook path and fuse_linear=True. Busy time well under the synced time means the GPU waits for the
host; then a variant is as fast as its host work.

    python bench/bench_backward_host.py [--out DIR] [--rounds 4]   (CUDA)
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


def micro_steps(model, tokens, mode, n):
    """(forward host ms, backward host ms, synced ms) of n micro-steps after 2 warm-ups, and GPU busy ms."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = None
    if mode != "stock":
        acc = gacc_kernels.attach(model, opt, steps=10**6, fuse_linear=mode == "gacc-fused")
    rows = []
    for i in range(n + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_of(model, tokens)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 2:
            rows.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t0) * 1e3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_of(model, tokens).backward()
        torch.cuda.synchronize()
    busy = sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    if acc is not None:
        acc.remove()
    opt.zero_grad(set_to_none=True)
    return [statistics.median(c) for c in zip(*rows)], busy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model = build(16)
    tokens = torch.randint(0, 32000, (1, 2048), device="cuda")
    got = {m: [] for m in MODES}
    for rnd in range(args.rounds):  # modes interleaved, the order rotated each round
        for mode in MODES[rnd % 3:] + MODES[:rnd % 3]:
            got[mode].append(micro_steps(model, tokens, mode, 6))
    rows = []
    for mode in MODES:
        fwd, bwd, synced = (statistics.median(r[0][i] for r in got[mode]) for i in range(3))
        busy = statistics.median(r[1] for r in got[mode])
        spread = [r[0][2] for r in got[mode]]
        rows.append([mode, fwd, bwd, synced, f"{min(spread):.1f}-{max(spread):.1f}", busy])
    md = [f"# Host and GPU time of one micro-step\n\n{stamp()}\n", __doc__,
          f"Medians over {args.rounds} rounds (modes interleaved), each the median of 6 micro-steps.\n",
          table(["mode", "forward host ms", "backward host ms", "micro-step ms (synced)", "synced, range of rounds",
                 "GPU busy ms"], rows)]
    write_report(args.out, "backward_host.md", md)


if __name__ == "__main__":
    main()
