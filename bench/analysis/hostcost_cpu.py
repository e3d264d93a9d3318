"""Host time per hook on the CPU: a chain of tiny Linears, where gradient handling is all host work.

    PYTHONPATH=<tree> python bench/analysis/hostcost_cpu.py [--layers 200] [--k 8] [--windows 30]
Prints the median time of one K-micro-step window (forward, backward and step) and per parameter hook,
for stock autograd and for gacc, alternating window by window in one process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gacc_kernels


def window(model, opt, x, k):
    for _ in range(k):
        model(x).sum().backward()
    opt.step()
    opt.zero_grad()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--windows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    stock = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)])
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)])
    opt_s = torch.optim.SGD(stock.parameters(), lr=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gacc_kernels.attach(model, opt, steps=args.k, reduction="mean")
    times = {"stock": [], "gacc": []}
    for i in range(args.windows + 3):
        for name, m, o in (("stock", stock, opt_s), ("gacc", model, opt)):
            t = time.perf_counter()
            window(m, o, x, args.k)
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    hooks = 2 * args.layers * args.k
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"gacc {gacc_kernels.__file__}")
    print(f"{args.layers} Linear(8, 8), K={args.k}, {args.windows} windows; median ms per window: "
          f"stock {med['stock']:.2f}, gacc {med['gacc']:.2f}; gacc - stock per hook: "
          f"{(med['gacc'] - med['stock']) * 1e3 / hooks:.2f} us")


if __name__ == "__main__":
    main()
